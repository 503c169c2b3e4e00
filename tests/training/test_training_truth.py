"""Ground-truth deformation error (analysis.deformation_errors) on the hinge simulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relion_dynamight.analysis.phantom import builtin_phantom
from relion_dynamight.jobs import optimize_deformations as od
from relion_dynamight.jobs.simulate import load_truth, simulate_project
from relion_dynamight.relion.particles import ParticleData
from relion_dynamight.training.config import default_config
from relion_dynamight.analysis.deformation_errors import deformation_errors
from relion_dynamight.training.half import HalfModel
from relion_dynamight.training.halves import make_split
from relion_dynamight.training.schedule import Schedule


class _TrueField(nn.Module):
    """Decoder stand-in: the phantom's exact displacement at latent z[0] = hinge angle / 10 degrees."""

    def __init__(self, phantom, scale: float = 1.0) -> None:
        super().__init__()
        self.phantom = phantom
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, positions, z):
        true = self.phantom.true_positions(z[:, 0].double() * 10.0).float()
        return self.scale * (true - positions[None].float())


def test_deformation_errors_exact_zero_and_half():
    phantom = builtin_phantom(32, 3.0)
    angles = torch.linspace(-20, 20, 9, dtype=torch.float64)
    z = torch.zeros(9, 6)
    z[:, 0] = angles.float() / 10.0
    truth = phantom.true_positions(angles)
    exact = deformation_errors(_TrueField(phantom), z, phantom.positions, truth, phantom.moving)
    assert float(exact.learned.max()) < 1e-4
    assert float((exact.learned_size - exact.true_size).abs().max()) < 1e-4
    assert float(exact.baseline[0]) > 0.2 and float(exact.baseline[4]) < 1e-9  # ±20° moves, 0° does not
    zero = deformation_errors(_TrueField(phantom, 0.0), z, phantom.positions, truth, phantom.moving)
    assert torch.allclose(zero.learned, zero.baseline, atol=1e-5)
    half = deformation_errors(_TrueField(phantom, 0.5), z, phantom.positions, truth, phantom.moving)
    assert torch.allclose(half.learned, 0.5 * half.baseline, atol=1e-4)


@pytest.mark.slow
def test_trained_half_beats_the_undeformed_consensus(tmp_path):
    """One half trained 20 epochs: the learned deformation is clearly closer to the truth than none."""
    sim = simulate_project(tmp_path / "p", n_particles=1000, box=32, pixel_size=3.0, snr=1.0, motion="hinge", seed=0)
    phantom, truth = load_truth(tmp_path / "p")
    data = ParticleData(sim["star"])
    volume, pixel = od._read_consensus(sim["consensus"], data)
    config = default_config(box=data.box, pixel_size=pixel, n_gaussians=150, batch_size=16, seed=0,
                            schedule={"n_epochs": 20, "warmup_epochs": 1, "consensus_every": 0, "freeze_every": 0})
    split = make_split(data.table, 0, 0.1)
    initial, _ = od._initial_model(volume, config, None, torch.device("cpu"))
    model = HalfModel(1, config, initial, split.indices(1, False), split.indices(1, True), torch.device("cpu"))
    model.set_normalisation(data)
    model.validate(data, lambda: None)
    schedule = Schedule(**config["schedule"])
    for epoch in range(schedule.n_epochs):
        model.train_epoch(epoch, schedule, data, lambda: None)
    idx = split.indices(1, None)
    angles = torch.as_tensor(truth["hinge_angle"].to_numpy()[idx])
    z = model.latents(data, idx, lambda: None)
    errors = deformation_errors(model.decoder, z, phantom.positions, phantom.true_positions(angles), phantom.moving)
    big = angles.abs() > 12
    ratio = float(errors.learned.mean() / errors.baseline.mean())
    size = float(errors.learned_size[big].mean() / errors.true_size[big].mean())
    print(f"{errors.summary()}; error/undeformed {ratio:.2f}; moving domain learned/true (|angle| > 12°) {size:.2f}")
    assert ratio < 0.85
    assert size > 0.4
