"""Click command group ``relion_dynamight``: one thin command per task, delegating to ``jobs/``.

Every command accepts ``--pipeline-control DIR`` (RELION 5 passes the dash form; the underscore form
is accepted too).  Heavy modules are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

from relion_dynamight import __version__
from relion_dynamight.tab_options import TabTaskCommand, log_notes, pick_epochs


CHECKPOINT_HELP = ("Use this training checkpoint instead of the final one: forward_deformations/checkpoints/"
                   "checkpoint_NNN.h5 (HDF5; kept: the 3 newest, every 10th epoch, the best validation epoch and "
                   "checkpoint_final.h5).  RELION 5's file browser filters *.pth: type the path into the field.")


class FiniteFloat(click.ParamType):
    """A float option that must be a finite number: ``nan`` and ``inf`` are refused for every numeric option
    of every command here, in one place (ranges are checked by each task)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()


def pipeline_control_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--pipeline-control", "--pipeline_control", "pipeline_control", type=click.Path(path_type=Path),
        default=None, help="Job directory for RELION's exit/abort files (RELION passes this itself).",
    )(func)


def gpu_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--gpu-id", "--gpu_id", "gpu_id", default="", show_default=False,
        help="GPU to use: empty = GPU of the MPI local rank (CPU when none), a number, a list '0,1', or 'cpu'.",
    )(func)


def _run(name: str, job_dir: Path | None, module: str, continues: bool = False, **options: Any) -> None:
    """Import ``relion_dynamight.jobs.<module>`` and run its ``run(job, **options)`` under the protocol.

    ``continues``: the task continues the DynaMight job ``options['output_directory']``; inside a RELION
    project that directory must not belong to another job type.
    """
    import importlib

    from relion_dynamight.jobs.runner import run_task

    ctx = click.get_current_context(silent=True)

    def task(job: Any) -> Any:
        log_notes(ctx)
        if continues:
            from relion_dynamight.relion.project import check_job_type

            check_job_type(Path("."), Path(options["output_directory"]))
        mod = importlib.import_module(f"relion_dynamight.jobs.{module}")
        return mod.run(job, **options)

    sys.exit(run_task(name, job_dir, task))


def _run_standalone(name: str, module: str, inputs: list[tuple[str, str]], job_options: dict[str, str],
                    **options: Any) -> None:
    """Run a task without --output-directory inside a RELION project, registered like a GUI job.

    Rank 0 creates and registers the next ``DynaMight/jobNNN/`` under RELION's lock; the final status
    (Succeeded/Failed/Aborted) and the output nodes are written to ``default_pipeline.star`` at the end.
    """
    from relion_dynamight.errors import InputError
    from relion_dynamight.jobs.runner import run_task
    from relion_dynamight.parallel.mpi import world
    from relion_dynamight.relion.jobdir import read_output_nodes
    from relion_dynamight.relion.project import finish_standalone_job, prepare_standalone_job

    comm = world()
    job_dir: Path | None = None
    message = None
    if comm.rank == 0:
        try:
            job_dir = prepare_standalone_job(Path("."), "dynamight", "relion_dynamight " + " ".join(sys.argv[1:]),
                                             inputs, job_options)
        except InputError as exc:
            message = str(exc)
    job_dir, message = comm.bcast((job_dir, message))
    if message is not None:
        print(f"ERROR: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    options["output_directory"] = job_dir
    import importlib

    def task(job: Any) -> Any:
        return importlib.import_module(f"relion_dynamight.jobs.{module}").run(job, **options)

    code = run_task(name, job_dir, task)
    if comm.rank == 0:
        status = {0: "Succeeded", 3: "Aborted"}.get(code, "Failed")
        nodes = read_output_nodes(job_dir) if (job_dir / "RELION_OUTPUT_NODES.star").exists() else []
        finish_standalone_job(Path("."), job_dir, status, nodes)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="relion_dynamight")
def cli() -> None:
    """DynaMight flexibility analysis for RELION (Schwab, Kimanius et al., Nature Methods 2024).

    The four DynaMight tasks run exactly as RELION 5's "DynaMight flexibility" job tab calls them;
    ``simulate`` and ``reconstruct`` are our own tools.
    """


@cli.command("optimize-deformations", cls=TabTaskCommand)
@click.option("--refinement-star-file", type=click.Path(path_type=Path), required=True,
              help="Particles STAR file of the consensus refinement (e.g. Refine3D/job010/run_data.star).")
@click.option("--output-directory", type=click.Path(path_type=Path), default=None,
              help="Job directory (RELION: DynaMight/jobNNN/). Inside a RELION project it may be omitted.")
@click.option("--initial-model", type=click.Path(path_type=Path), required=True,
              help="Consensus map (MRC) of the refinement.")
@click.option("--n-gaussians", type=int, default=10000, show_default=True, help="Number of Gaussians of the model.")
@click.option("--initial-threshold", type=FINITE, default=None,
              help="Map threshold for placing Gaussians. Default: automatic, the value above which the "
                   "brightest voxels hold the volume that the Gaussians can fill (see README).")
@click.option("--regularization-factor", type=FINITE, default=1.0, show_default=True,
              help="Ratio of the geometric regulariser's gradient to the data term's gradient.")
@click.option("--n-threads", type=int, default=1, show_default=True, help="CPU threads (torch intra-op threads).")
@click.option("--preload-images", is_flag=True, help="Keep all images in RAM (checked against free memory).")
@gpu_option
@click.option("--n-latent-dimensions", type=int, default=6, show_default=True)
@click.option("--n-epochs", type=int, default=50, show_default=True, help="Maximum number of epochs.")
@click.option("--training-epochs", type=int, default=None,
              help="Same as --n-epochs, but only for this task: safe in RELION's Additional arguments, which reach "
                   "every task of the job.")
@click.option("--batch-size", type=int, default=None, help="Particles per batch (default: from a memory estimate).")
@click.option("--checkpoint-file", type=click.Path(path_type=Path), default=None,
              help="Start from this checkpoint instead of the job's latest one.  Checkpoints are HDF5 files "
                   "forward_deformations/checkpoints/checkpoint_NNN.h5 (RELION 5's browser filters *.pth: type "
                   "the path).")
@click.option("--atomic-model", type=click.Path(path_type=Path), default=None,
              help="PDB/mmCIF to coarse-grain into the Gaussian model (risky: can bias the result).")
@click.option("--mask-file", type=click.Path(path_type=Path), default=None,
              help="Deform only Gaussians inside this mask.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--validation-fraction", type=FINITE, default=0.1, show_default=True)
@click.option("--rigid-body-masks", default=None,
              help="Rigid-body mode: comma-separated soft masks (MRC, the consensus map's box), one per body; each "
                   "particle gets one rotation and translation per body (written to rigid_transforms.star).")
@click.option("--live-every", type=int, default=5, show_default=True,
              help="Every N epochs rewrite forward_deformations/consensus_half*.mrc, the figures and report.html "
                   "(watch a running job; 0 = only at the end).")
@pipeline_control_option
def optimize_deformations(pipeline_control: Path | None, **options: Any) -> None:
    """Train the two half-set VAEs (deformations of a Gaussian model of the consensus map)."""
    pick_epochs(options, "training_epochs")
    if options.get("output_directory") is None and pipeline_control is None:
        inputs = [(str(options["refinement_star_file"]), "ParticleGroupMetadata.star.relion"),
                  (str(options["initial_model"]), "DensityMap.mrc")]
        job_options = {"fn_star": str(options["refinement_star_file"]), "fn_map": str(options["initial_model"]),
                       "nr_gaussians": str(options["n_gaussians"]), "reg_factor": str(options["regularization_factor"]),
                       "fn_dynamight_exe": "relion_dynamight"}
        _run_standalone("optimize-deformations", "optimize_deformations", inputs, job_options, **options)
    if options.get("output_directory") is None:
        options["output_directory"] = pipeline_control
    _run("optimize-deformations", pipeline_control or options["output_directory"], "optimize_deformations", **options)


@cli.command("optimize-inverse-deformations", cls=TabTaskCommand)
@click.argument("output_directory", type=click.Path(path_type=Path))
@click.option("--n-epochs", type=int, default=200, show_default=True,
              help="Epochs of the inverse network (RELION's tab field; a second --n-epochs from the Additional "
                   "arguments is the training's and is ignored here).")
@click.option("--inverse-epochs", type=int, default=None,
              help="Epochs of the inverse network, only for this task (wins over --n-epochs).")
@click.option("--checkpoint-file", type=click.Path(path_type=Path), default=None,
              help=CHECKPOINT_HELP)
@click.option("--save-deformations", is_flag=True, help="Cache deformed positions in RAM instead of recomputing.")
@click.option("--preload-images", is_flag=True)
@click.option("--batch-size", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@gpu_option
@pipeline_control_option
def optimize_inverse_deformations(pipeline_control: Path | None, **options: Any) -> None:
    """Train the inverse-deformation networks (deformed position → consensus position)."""
    pick_epochs(options, "inverse_epochs")
    _run("optimize-inverse-deformations", pipeline_control or options["output_directory"], "optimize_inverse", continues=True, **options)


@cli.command("deformable-backprojection", cls=TabTaskCommand)
@click.argument("output_directory", type=click.Path(path_type=Path))
@click.option("--batch-size", type=int, default=10, show_default=True, help="Particles per insertion batch.")
@click.option("--checkpoint-file", type=click.Path(path_type=Path), default=None,
              help=CHECKPOINT_HELP)
@click.option("--preload-images", is_flag=True)
@click.option("--group-resolution", type=FINITE, default=0.5, show_default=True,
              help="Particles whose deformations agree within this RMS (pixels) share one warp; 0 = one per particle.")
@click.option("--max-groups", type=int, default=128, show_default=True,
              help="At most this many warps per half set (the groups with the largest spread are split first); "
                   "0 = no limit.")
@click.option("--mask-file", type=click.Path(path_type=Path), default=None,
              help="Soft mask (MRC, values 0-1, the consensus map's box): correct the deformations only inside it "
                   "(the original's --mask-file); outside, the maps are the standard reconstruction's.")
@click.option("--regional-choice/--no-regional-choice", default=True, show_default=True,
              help="Region by region, keep the deformation-corrected map only where its half maps agree better "
                   "than the standard ones; elsewhere keep the standard reconstruction.")
@click.option("--field-spacing", type=FINITE, default=2.0, show_default=True,
              help="Grid spacing (pixels) on which the inverse deformation is evaluated before up-sampling.")
@click.option("--interpolation", type=click.Choice(["cubic", "linear"]), default="cubic", show_default=True,
              help="Warp interpolation: cubic B-spline (keeps amplitudes to Nyquist) or trilinear.")
@click.option("--map-frame", type=click.Choice(["initial", "consensus"]), default="initial", show_default=True,
              help="Conformation of the maps: 'initial' = the consensus refinement's (overlays Refine3D maps and "
                   "models); 'consensus' = each half's learned consensus Gaussians.")
@gpu_option
@pipeline_control_option
def deformable_backprojection(pipeline_control: Path | None, **options: Any) -> None:
    """Deformation-corrected weighted backprojection: improved half maps."""
    _run("deformable-backprojection", pipeline_control or options["output_directory"], "backprojection", continues=True, **options)


@cli.command("explore-latent-space", cls=TabTaskCommand)
@click.argument("output_directory", type=click.Path(path_type=Path))
@click.option("--half-set", type=int, default=1, show_default=True, help="1 or 2; 0 = validation particles.")
@click.option("--checkpoint-file", type=click.Path(path_type=Path), default=None,
              help=CHECKPOINT_HELP)
@click.option("--no-gui", is_flag=True, help="Headless: write figures, maps and subsets only.")
@click.option("--latent-points", type=click.Path(path_type=Path), default=None,
              help="Text file, one latent point per line (L numbers, or 2 PCA coordinates): a deformed map each.")
@click.option("--clusters", type=int, default=None,
              help="k-means clusters of the latent space: a map at each centre and a subset STAR per cluster.")
@click.option("--axis-range", "axis_range", multiple=True,
              help="Subset by ranges 'AXIS:MIN:MAX[,...]' (AXIS = latent dimension 1..L or pc1, pc2, ...; "
                   "empty MIN/MAX = open). Repeat for several subsets.")
@click.option("--polygon", type=click.Path(path_type=Path), multiple=True,
              help="Subset inside a polygon of the PCA plane: text file, one 'x y' vertex per line. Repeatable.")
@click.option("--movie-pcs", type=int, default=2, show_default=True,
              help="Movies along the first N principal components (0 = none).")
@click.option("--movie-path", type=click.Path(path_type=Path), default=None,
              help="Movie along a path through latent space: waypoints file, same format as --latent-points.")
@click.option("--n-frames", type=int, default=10, show_default=True, help="Frames per movie.")
@click.option("--refinement-star-file", type=click.Path(path_type=Path), default=None,
              help="Particles STAR file of the training (default: the one recorded in the checkpoint).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of k-means and UMAP.")
@click.option("--rigid-body-masks", default=None,
              help="Comma-separated body masks: each particle's best rigid motion of every body, and how far from "
                   "rigid the learned motion is, in explore/half<H>/rigid_transforms.star.")
@click.option("--mask-file", type=click.Path(path_type=Path), default=None,
              help="Soft mask (MRC, values 0-1, the consensus map's box): analyse, map and film the motion only "
                   "inside it (outside, nothing moves), as deformable-backprojection --mask-file.")
@gpu_option
@pipeline_control_option
def explore_latent_space(pipeline_control: Path | None, **options: Any) -> None:
    """Latent-space analysis: figures, maps, movies, subsets, error estimates (napari when available)."""
    _run("explore-latent-space", pipeline_control or options["output_directory"], "explore", continues=True, **options)


@cli.command("reconstruct")
@click.option("--i", "star", type=click.Path(path_type=Path), required=True, help="Particles STAR file.")
@click.option("--o", "output", type=click.Path(path_type=Path), required=True, help="Output map (.mrc).")
@click.option("--subset", type=int, default=None, help="Use only rlnRandomSubset 1 or 2.")
@click.option("--ctf", is_flag=True, help="Apply CTF correction.")
@click.option("--maxres", type=FINITE, default=None, help="Insert only up to this resolution (Å).")
@click.option("--halves", is_flag=True, help="Also write _half1/_half2 maps and the FSC.")
@click.option("--j", "threads", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@pipeline_control_option
def reconstruct(pipeline_control: Path | None, **options: Any) -> None:
    """Standard CTF-weighted Fourier reconstruction (like relion_reconstruct), MPI-distributable."""
    _run("reconstruct", pipeline_control, "reconstruct", **options)


@cli.command("simulate")
@click.option("--o", "output", type=click.Path(path_type=Path), required=True, help="New project directory.")
@click.option("--n-particles", type=int, default=2000, show_default=True)
@click.option("--box", type=int, default=64, show_default=True)
@click.option("--pixel-size", type=FINITE, default=3.0, show_default=True)
@click.option("--snr", type=FINITE, default=0.1, show_default=True, help="Signal-to-noise ratio (variance); 0 = no noise.")
@click.option("--motion", type=click.Choice(["hinge", "none", "adk"]), default="hinge", show_default=True,
              help="hinge: one domain turns ±20°; adk: adenylate kinase's LID and NMP domains between its closed "
                   "(1AKE) and open (4AKE) structures; none: one conformation.")
@click.option("--pdb", type=click.Path(path_type=Path), default=None, help="Atomic model (PDB/mmCIF) as phantom.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--envelope-bfactor", type=FINITE, default=0.0, show_default=True,
              help="B-factor (Å²) of an envelope on the images that the STAR file does not state.")
@click.option("--snr-region", type=click.Choice(["box", "disc"]), default="box", show_default=True,
              help="Where the signal variance of --snr is measured: the whole box or the particle's disc.")
@click.option("--limit", is_flag=True, help="Also write the same particles all in the reference conformation "
                                            "(truth/limit/particles.star): the best a flexibility correction can do.")
@pipeline_control_option
def simulate(pipeline_control: Path | None, **options: Any) -> None:
    """Write a RELION project with a flexible synthetic data set whose truth is known."""
    _run("simulate", pipeline_control, "simulate", **options)


def main() -> None:  # pragma: no cover - the console script uses relion_dynamight.launcher:main
    cli()


@cli.command("install-relion-gui")
@click.option("--project", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="RELION project directory to install into.")
@click.option("--force", is_flag=True, help="Replace files of ours that you have edited.")
def install_relion_gui(**options: Any) -> None:
    """Install the DynaMight tab defaults, External-job definitions and the Schemes/dynamight scheme."""
    _run("install-relion-gui", None, "install_gui", **options)


@cli.command("external", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                           "help_option_names": []})
@click.argument("command")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def external(command: str, args: tuple[str, ...]) -> None:
    """Run COMMAND as a RELION External job (fn_exe: 'relion_dynamight external COMMAND').

    Translates RELION's --o, --in_parts, --in_3dref, --in_mask, --j and --LABEL VALUE parameters into
    COMMAND's options and declares the outputs in the project's pipeline format.
    """
    from relion_dynamight.jobs.external import run_external

    sys.exit(run_external(command, list(args), cli.commands))
