"""The command lines RELION 5's DynaMight tab builds (``getCommandsDynaMightJob``), byte for byte.

RELION builds one string (doubled spaces, trailing spaces, "Additional arguments" verbatim) and runs it through
the shell; ``--pipeline-control DIR/`` is always appended.  Used by the benchmark and the tests to run jobs
exactly as RELION does.
"""

from __future__ import annotations


def new_job(n_gaussians: int = 10000, threshold: str = "", preload: bool = False, gpu: str = "0",
            other: str = "", threads: int = 1, job: str = "DynaMight/job012/",
            star: str = "Refine3D/job010/run_data.star", volume: str = "Refine3D/job010/run_class001.mrc",
            exe: str = "relion_dynamight") -> str:
    """The string RELION 5 builds for a new job (same spacing); the tab's defaults unless given."""
    cmd = exe + " optimize-deformations "
    cmd += " --refinement-star-file " + star + " --output-directory " + job + " --initial-model " + volume
    cmd += " --n-gaussians " + str(n_gaussians)
    if threshold:
        cmd += " --initial-threshold " + threshold
    cmd += " --regularization-factor 1 --n-threads " + str(threads)
    if preload:
        cmd += " --preload-images "
    if gpu:
        cmd += " --gpu-id " + gpu
    return cmd + " " + other + " --pipeline-control " + job


def continue_job(task: str, checkpoint: str = "", preload: bool = False, store: bool = False, gpu: str = "0",
                 other: str = "", job: str = "DynaMight/job012/", half_set: int = 1, epochs: int = 200,
                 batch: int = 10, exe: str = "relion_dynamight") -> str:
    """The string RELION 5 builds for "Continue" with one task ticked: ``visualize``, ``inverse`` or
    ``backprojection`` (the tab's defaults: 200 inverse epochs, backprojection batch 10)."""
    if task == "visualize":
        cmd = exe + " explore-latent-space " + job + " --half-set " + str(half_set)
        if checkpoint:
            cmd += " --checkpoint-file " + checkpoint
    elif task == "inverse":
        cmd = exe + " optimize-inverse-deformations " + job + " --n-epochs " + str(epochs)
        if checkpoint:
            cmd += " --checkpoint-file " + checkpoint
        if store:
            cmd += " --save-deformations "
        if preload:
            cmd += " --preload-images"
    else:
        cmd = exe + " deformable-backprojection " + job + " --batch-size " + str(batch)
        if checkpoint:
            cmd += " --checkpoint-file " + checkpoint
        if preload:
            cmd += " --preload-images"
    if gpu:
        cmd += " --gpu-id " + gpu
    return cmd + " " + other + " --pipeline-control " + job
