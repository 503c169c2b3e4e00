"""RELION 5's DynaMight-tab command lines for the tests' job (``relion_dynamight.relion.relion5_lines``)."""

from __future__ import annotations

from relion_dynamight.relion import relion5_lines

EXE = "relion_dynamight"
JOB = "DynaMight/job012/"
STAR = "Refine3D/job010/run_data.star"
MAP = "Refine3D/job010/run_class001.mrc"
CKPT = "DynaMight/job012/forward_deformations/checkpoints/checkpoint_final.pth"


def new_job(*args, **kwargs) -> str:
    """RELION 5's new-job line (:func:`relion_dynamight.relion.relion5_lines.new_job`) for this file's job."""
    kwargs.setdefault("job", JOB)
    kwargs.setdefault("star", STAR)
    kwargs.setdefault("volume", MAP)
    return relion5_lines.new_job(*args, exe=EXE, **kwargs)


def continue_job(*args, **kwargs) -> str:
    """RELION 5's "Continue" line (:func:`relion_dynamight.relion.relion5_lines.continue_job`)."""
    kwargs.setdefault("job", JOB)
    return relion5_lines.continue_job(*args, exe=EXE, **kwargs)
