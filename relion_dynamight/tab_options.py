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
        command = group.get_command(ctx, name)
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
        args, notes = reconcile(list(args), own, others)
        ctx.meta[NOTES_KEY] = notes
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
