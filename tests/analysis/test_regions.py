"""Per-region choice between two reconstructions, judged by their own half maps (analysis/regions.py)."""

from __future__ import annotations

import torch

from relion_dynamight.analysis.phantom import builtin_phantom
from relion_dynamight.analysis.regions import blend, fsc_shell, region_weights, regional_choice
from relion_dynamight.imaging.gaussians import render_volume

BOX, PIXEL = 32, 3.0


def _noise(seed: int, scale: float) -> torch.Tensor:
    return scale * torch.randn((BOX,) * 3, generator=torch.Generator().manual_seed(seed))


def test_region_weights_partition_the_model() -> None:
    phantom = builtin_phantom(BOX, PIXEL)
    w = region_weights(phantom.positions.float(), BOX, 8)
    assert w.shape == (8, BOX, BOX, BOX) and float(w.min()) >= 0
    total = w.sum(0)
    assert float(total.max()) <= 1.0 + 1e-5
    # inside the model the weights sum to 1; far outside to 0
    centre = phantom.positions[0].round().long() + BOX // 2
    assert float(total[centre[2], centre[1], centre[0]]) > 0.999
    assert float(total[0, 0, 0]) == 0.0


def test_fsc_shell_rewards_agreement() -> None:
    truth = render_volume(builtin_phantom(BOX, PIXEL).positions, torch.ones(1), torch.ones(1), BOX).float()
    mask = torch.ones_like(truth)
    clean = fsc_shell(truth + _noise(1, 0.005), truth + _noise(2, 0.005), mask)
    noisy = fsc_shell(truth + _noise(1, 0.05), truth + _noise(2, 0.05), mask)
    assert BOX // 2 >= clean > noisy > 0
    assert fsc_shell(truth, truth, mask) == BOX // 2                      # never falls: the last shell


def _lowpass(vol: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Gaussian blur of ``sigma_px`` (done in Fourier space; keeps the mean)."""
    k = torch.fft.fftfreq(BOX)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    g = torch.exp(-2 * (torch.pi * sigma_px) ** 2 * (kx**2 + ky**2 + kz**2))
    return torch.fft.ifftn(torch.fft.fftn(vol) * g).real.float()


def test_choice_keeps_the_better_reconstruction_per_region() -> None:
    """First pair ("standard"): the arm averaged over its motion, core sharp.  Second ("deformed"): the arm
    sharp, the core blurred (a harmful warp there).  The blend takes the better of each per region."""
    phantom = builtin_phantom(BOX, PIXEL)
    amps = phantom.amplitudes

    def render(angle: float, which: torch.Tensor) -> torch.Tensor:
        return render_volume(phantom.true_positions(angle), amps * which, phantom.widths, BOX).float()

    arm, core = phantom.moving.double(), (~phantom.moving).double()
    truth = render(0.0, arm) + render(0.0, core)
    smeared_arm = torch.stack([render(a, arm) for a in (-15.0, -7.5, 0.0, 7.5, 15.0)]).mean(0)
    sigma = 0.3 * float(truth.std())
    first_map = smeared_arm + render(0.0, core)
    second_map = render(0.0, arm) + _lowpass(render(0.0, core), 1.2)
    first = (first_map + _noise(1, sigma), first_map + _noise(2, sigma))
    second = (second_map + _noise(3, sigma), second_map + _noise(4, sigma))
    choice = regional_choice(first, second, phantom.positions.float(), n_regions=8)
    assert choice.use_second.any() and not choice.use_second.all()
    out = blend(first[0], second[0], choice.alpha())
    w = region_weights(phantom.positions.float(), BOX, 8).sum(0)

    def err(vol: torch.Tensor) -> float:
        return float(((_lowpass(vol, 0.7) - truth) * w).pow(2).sum())

    assert err(out) < err(first[0]) and err(out) < err(second[0])
