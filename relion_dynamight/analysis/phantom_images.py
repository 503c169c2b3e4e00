"""Noise-free particle images of a :class:`~.phantom.Phantom` in RELION's conventions (used by ``simulate``
and by the ground-truth oracle, :mod:`.oracle`).

Poses from the STAR angles (``A = Rz(psi)·Ry(tilt)·Rz(rot)``) and origins in Å; CTF from the particle's and its
optics group's columns; the image is ``CTF · projection`` translated by ``−origin`` (oversampled Gaussian
splatting, :func:`relion_dynamight.imaging.gaussians.project_gaussians`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from relion_dynamight.analysis.phantom import Phantom
from relion_dynamight.imaging.ctf import CtfParams, ctf_2d
from relion_dynamight.imaging.gaussians import project_gaussians, real_from_spectra
from relion_dynamight.imaging.geometry import euler_to_matrix


def particle_ctf(particles: pd.DataFrame, optics: pd.DataFrame, pixel: float) -> CtfParams:
    """RELION CTF parameters of each particle (its own defocus columns, its optics group's microscope)."""
    groups = optics.set_index("rlnOpticsGroup")

    def col(name: str) -> Tensor:
        return torch.tensor(particles[name].to_numpy(dtype=np.float64))

    def opt(name: str) -> Tensor:
        return torch.tensor(groups.loc[particles["rlnOpticsGroup"].to_numpy(), name].to_numpy(dtype=np.float64))

    return CtfParams(col("rlnDefocusU"), col("rlnDefocusV"), col("rlnDefocusAngle"), opt("rlnVoltage"),
                     opt("rlnSphericalAberration"), opt("rlnAmplitudeContrast"), col("rlnPhaseShift"),
                     col("rlnCtfBfactor"), col("rlnCtfScalefactor"), torch.full((len(particles),), float(pixel),
                                                                                 dtype=torch.float64))


def particle_poses(particles: pd.DataFrame, pixel: float) -> tuple[Tensor, Tensor]:
    """RELION matrices ``(B, 3, 3)`` from the STAR angles, origins ``(B, 2)`` in pixels (float64)."""
    ang = [torch.tensor(particles[c].to_numpy(dtype=np.float64)) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    origins = torch.tensor(particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=np.float64)) / pixel
    return euler_to_matrix(*ang), origins


def clean_images(phantom: Phantom, particles: pd.DataFrame, optics: pd.DataFrame, angles: np.ndarray,
                 box: int, pixel: float, envelope_bfactor: float = 0.0) -> Tensor:
    """Noise-free images ``(B, box, box)`` float32: CTF · projection of each particle's conformation.

    ``envelope_bfactor`` (Å²) adds an envelope ``exp(−B s²/4)`` that the STAR file does not state."""
    rotations, origins = particle_poses(particles, pixel)
    params = particle_ctf(particles, optics, pixel)
    params.bfactor = params.bfactor + float(envelope_bfactor)
    ctf = ctf_2d(params, box)
    positions = phantom.true_positions(torch.from_numpy(np.asarray(angles, dtype=np.float64))).float()
    spectra = project_gaussians(positions, phantom.amplitudes.float(), phantom.widths.float(), rotations.float(), box,
                                origins.float(), ctf, oversample=2)
    return real_from_spectra(spectra, box)
