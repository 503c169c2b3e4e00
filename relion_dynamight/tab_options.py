"""RELION 5's DynaMight tab appends its "Additional arguments" to *every* task of the job (issue 13).

So ``--n-epochs 8`` meant for the training reaches ``deformable-backprojection`` (which has no such option) and
``optimize-inverse-deformations`` (whose own ``--n-epochs`` the tab already set), and ``--batch-size 64`` meant
for the training reaches the backprojection after its tab field ``--batch-size 10``.  The four tab tasks
therefore use :class:`TabTaskCommand`, which before Click parses the arguments:

* drops an option that this task does not have but another tab task has (with its value), and notes it;
* keeps the *first* occurrence of an option given more than once (RELION writes the tab's fields before the
  Additional arguments, so the tab's field wins) and notes the later ones it ignores.

An option no tab task knows is still an error ("No such option"): a typo must not pass silently.  The notes
are logged when the task starts (:func:`log_notes`).  Task-specific spellings that are never ambiguous:
``--training-epochs`` (optimize-deformations) and ``--inverse-epochs`` (optimize-inverse-deformations; it wins
over the tab's ``--n-epochs`` because the user wrote it on purpose).
"""

from __future__ import annotations

import logging
from typing import Any

import click

#: The tasks of RELION 5's DynaMight tab (their options are shared through "Additional arguments").
TAB_TASKS = ("optimize-deformations", "optimize-inverse-deformations", "deformable-backprojection",
             "explore-latent-space")
NOTES_KEY = "relion_dynamight.tab_notes"


FLAG, VALUE, MULTIPLE = "flag", "value", "multiple"

IGNORE, REFUSE = "ignore", "refuse"
_FIXED = "fixed here at the original's default"
_TRAIN_ORIGINAL = {
    "--n-gaussian-widths": (REFUSE, VALUE, f"{_FIXED} (one width class)"),
    "--initial-resolution": (REFUSE, VALUE, "the Gaussians are fitted to the full consensus map"),
    "--n-positional-encoding-dimensions": (REFUSE, VALUE, f"{_FIXED} (10 frequencies)"),
    "--n-linear-layers": (REFUSE, VALUE, f"{_FIXED} (8 layers)"),
    "--n-neurons-per-layer": (REFUSE, VALUE, f"{_FIXED} (32 units)"),
    "--n-warmup-epochs": (REFUSE, VALUE, f"{_FIXED} (3 epochs)"),
    "--weight-decay": (REFUSE, VALUE, f"{_FIXED} (0)"),
    "--consensus-update-rate": (REFUSE, VALUE, "consensus updates follow the schedule in README"),
    "--consensus-update-decay": (REFUSE, VALUE, "consensus updates follow the schedule in README"),
    "--consensus-update-pooled-particles": (REFUSE, VALUE, f"{_FIXED} (100 particles)"),
    "--apply-bfactor": (REFUSE, VALUE, "sharpen the consensus map before training if you need it"),
    "--particle-diameter": (REFUSE, VALUE, "the encoder's input is CTF-flipped and low-passed at 10 Å instead of "
                                           "masked"),
    "--soft-edge-width": (REFUSE, VALUE, "no image mask is used (see --particle-diameter)"),
    "--combine-resolution": (REFUSE, VALUE, "not used here"),
    "--use-data-normalization": (IGNORE, FLAG, "the encoder's input is always normalised"),
    "--no-use-data-normalization": (REFUSE, FLAG, "the encoder's input is always normalised"),
    "--kld-factor": (REFUSE, VALUE, "the KL weight is 0.01 / box² relative to the data term, as the original's "
                                    "default"),
    "--n-workers": (IGNORE, VALUE, "images are read in the main process (use --preload-images to keep them in RAM)"),
}
_INVERSE_ORIGINAL = {
    "--refinement-star-file": (IGNORE, VALUE, "the particles are those of the training checkpoint"),
    "--add-noise": (REFUSE, FLAG, "not used here"),
    "--particle-diameter": (IGNORE, VALUE, "the inverse network is fitted to the decoder, not to images"),
    "--mask-soft-edge-width": (IGNORE, VALUE, "the inverse network is fitted to the decoder, not to images"),
    "--data-loader-threads": (IGNORE, VALUE, "no images are read by this task"),
}
_BACKPROJECTION_ORIGINAL = {
    "--refinement-star-file": (IGNORE, VALUE, "the particles are those of the training checkpoint"),
    "--vae-directory": (IGNORE, VALUE, "the job directory holds the forward model"),
    "--inverse-deformation-directory": (IGNORE, VALUE, "the job directory holds the inverse model"),
    "--backprojection-batch-size": (IGNORE, VALUE, "particles are grouped by deformation (--max-groups, "
                                                   "--group-resolution)"),
    "--particle-diameter": (IGNORE, VALUE, "the backprojection does not mask the images"),
    "--mask-soft-edge-width": (IGNORE, VALUE, "the backprojection does not mask the images"),
    "--data-loader-threads": (IGNORE, VALUE, "images are read in the main process"),
    "--downsample": (REFUSE, VALUE, "the fields are evaluated every --field-spacing pixels (default 2, the "
                                    "original's downsample 2)"),
    "--mask-reconstruction": (REFUSE, FLAG, "mask the maps afterwards (relion_postprocess)"),
    "--do-deformations": (IGNORE, FLAG, "both are written: map_half*.mrc and standard_half*.mrc (no deformation)"),
    "--no-do-deformations": (IGNORE, FLAG, "standard_half*.mrc are the maps without deformations"),
}
_EXPLORE_ORIGINAL = {
    "--refinement-star-file": (IGNORE, VALUE, "the particles are those of the training checkpoint"),
    "--particle-diameter": (IGNORE, VALUE, "not used for the exploration"),
    "--soft-edge-width": (IGNORE, VALUE, "not used for the exploration"),
    "--n-workers": (IGNORE, VALUE, "images are read in the main process"),
    "--batch-size": (IGNORE, VALUE, "the exploration sets its own batches"),
    "--preload-images": (IGNORE, FLAG, "the exploration reads only the images it needs"),
    "--no-preload-images": (IGNORE, FLAG, "the exploration reads only the images it needs"),
    "--dimensionality-reduction-method": (REFUSE, VALUE, "figures use PCA of the latent space; --clusters gives "
                                                         "k-means subsets"),
    "--inverse-deformation": (IGNORE, VALUE, "the job directory holds the inverse model"),
    "--atomic-model": (REFUSE, VALUE, "not available for explore-latent-space"),
    "--reduce-by-deformation": (REFUSE, FLAG, "figures use PCA of the latent space"),
    "--cluster": (REFUSE, FLAG, "use --clusters N"),
}
#: The original DynaMight's (3dem/DynaMight 358db04) options that our tasks do not have under the same name:
#: ``{task: {option: (IGNORE or REFUSE, FLAG or VALUE, what to use instead)}}``.
ORIGINAL_OPTIONS = {"optimize-deformations": _TRAIN_ORIGINAL, "optimize-inverse-deformations": _INVERSE_ORIGINAL,
                    "deformable-backprojection": _BACKPROJECTION_ORIGINAL, "explore-latent-space": _EXPLORE_ORIGINAL}


def translate_original(task: str, args: list[str], own: dict[str, str]) -> tuple[list[str], list[str]]:
    """``(arguments, notes)`` with the original DynaMight's options of ``task`` that we do not have handled:
    ignored with a note when they do not change the result here; :class:`click.UsageError` naming what to use
    instead when they would."""
    table = ORIGINAL_OPTIONS.get(task, {})
    out: list[str] = []
    notes: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        name = token.split("=", 1)[0]
        elsewhere = next((t for t, opts in ORIGINAL_OPTIONS.items() if name in opts), None)
        if not token.startswith("--") or name in own or (name not in table and elsewhere is None):
            out.append(token)
            i += 1
            continue
        if name in table:
            action, kind, text = table[name]
        else:        # the original's option of another task: RELION passes the Additional arguments to every task
            assert elsewhere is not None
            action, kind, text = IGNORE, ORIGINAL_OPTIONS[elsewhere][name][1], f"an option of {elsewhere}"
        span = 1 if ("=" in token or kind == FLAG) else 2
        shown = " ".join(args[i:i + span])
        if action == REFUSE:
            raise click.UsageError(f"{shown}: an option of the original DynaMight's {task} with no equivalent here: "
                                   f"{text}; remove it from the Additional arguments")
        notes.append(f"ignored {shown} (an option of the original DynaMight): {text}")
        i += span
    return out, notes


def option_kinds(params: list[click.Parameter]) -> dict[str, str]:
    """``{option spelling: FLAG | VALUE | MULTIPLE}`` of a command's options."""
    kinds: dict[str, str] = {}
    for param in params:
        if isinstance(param, click.Option):
            kind = FLAG if (param.is_flag or param.count) else (MULTIPLE if param.multiple else VALUE)
            for spelling in (*param.opts, *param.secondary_opts):
                kinds[spelling] = kind
    return kinds


def _option_table(group: click.Group | None, ctx: click.Context) -> dict[str, str]:
    """:func:`option_kinds` over every tab task."""
    table: dict[str, str] = {}
    for name in TAB_TASKS if group is not None else ():
        command = group.get_command(ctx, name) if group is not None else None
        table.update(option_kinds(list(getattr(command, "params", []))))
    return table


def reconcile(args: list[str], own: dict[str, str], others: dict[str, str]) -> tuple[list[str], list[str]]:
    """``(arguments to parse, notes)``: other tab tasks' options dropped, repeated options reduced to the first.

    ``own``/``others``: :func:`option_kinds` of this task and of all tab tasks (options given several times on
    purpose, ``multiple``, are all kept).
    ``--opt=value`` forms are handled; positional arguments and ``--`` pass through untouched.
    """
    out: list[str] = []
    notes: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out += args[i:]
            break
        name, has_inline = (token.split("=", 1)[0], "=" in token) if token.startswith("--") else (token, False)
        if not token.startswith("--") or (name not in own and name not in others) or name in ("--help", "-h"):
            out.append(token)
            i += 1
            continue
        kind = own.get(name, others.get(name, FLAG))
        span = 1 if (has_inline or kind == FLAG) else 2
        shown = " ".join(args[i:i + span])
        if name not in own:
            notes.append(f"ignored {shown}: an option of another DynaMight task (RELION passes the Additional "
                         "arguments to every task)")
        elif name in seen and kind == VALUE:
            notes.append(f"ignored the repeated {shown}: the first {name} (the job tab's field) applies")
        else:
            seen.add(name)
            out += args[i:i + span]
        i += span
    return out, notes


class TabTaskCommand(click.Command):
    """A tab task's command (see the module docstring)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        group = ctx.parent.command if ctx.parent is not None else None
        own = option_kinds(self.params)
        others = _option_table(group if isinstance(group, click.Group) else None, ctx)
        args, original = translate_original(str(self.name), list(args), own)
        args, notes = reconcile(args, own, others)
        ctx.meta[NOTES_KEY] = original + notes
        return super().parse_args(ctx, args)


def log_notes(ctx: click.Context | None = None) -> None:
    """Log the notes of :class:`TabTaskCommand` (call after logging is set up)."""
    ctx = ctx or click.get_current_context(silent=True)
    for note in (ctx.meta.get(NOTES_KEY, []) if ctx is not None else []):
        logging.getLogger("relion_dynamight").info("Note: %s", note)


def pick_epochs(options: dict[str, Any], specific: str) -> None:
    """Apply a task-specific epoch spelling (``training_epochs`` / ``inverse_epochs``) over ``n_epochs``."""
    value = options.pop(specific, None)
    if value is not None:
        if options.get("n_epochs") not in (None, value):
            logging.getLogger("relion_dynamight").info("Note: --%s %d replaces --n-epochs %s",
                                                       specific.replace("_", "-"), value, options.get("n_epochs"))
        options["n_epochs"] = value
