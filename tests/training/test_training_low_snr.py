"""What the encoder sees and how strong the regulariser may get (issue 11: learning at realistic SNR)."""

from __future__ import annotations

import numpy as np
import torch

from relion_dynamight.imaging.fourier import freq_grid_2d
from relion_dynamight.model.consensus import initialize_from_map
from relion_dynamight.parallel.mpi import Comm
from relion_dynamight.training import rng
from relion_dynamight.training.config import default_config
from relion_dynamight.training.half import encoder_filter, gaussian_tree
from relion_dynamight.training.halves import HalfSplit
from relion_dynamight.training.trainer import Trainer
from training_sim import make_data

BOX, PIXEL = 32, 3.0


def test_encoder_filter_flips_contrast_and_low_passes() -> None:
    ctf = torch.linspace(-1, 1, BOX * (BOX // 2 + 1)).reshape(1, BOX, BOX // 2 + 1).repeat(2, 1, 1)
    premultiplied = torch.tensor([False, True])
    f = encoder_filter(ctf, premultiplied, BOX, PIXEL, None)
    assert torch.equal(f[0], torch.where(ctf[0] < 0, -1.0, 1.0))        # sign(CTF)
    assert torch.equal(f[1], torch.ones_like(f[1]))                      # CTF² data: nothing to flip
    low = encoder_filter(None, None, BOX, PIXEL, 10.0)[0]
    ky, kx = freq_grid_2d(BOX)
    s = torch.sqrt(kx**2 + ky**2) / PIXEL
    assert torch.all(low[s <= 0.8 / 10.0] == 1.0) and torch.all(low[s >= 1 / 10.0] == 0.0)
    assert torch.all((low >= 0) & (low <= 1))


def test_encoder_images_are_flipped_and_low_passed() -> None:
    """The encoder's input holds no power above the low-pass and is normalised to zero mean, unit variance."""
    data = make_data(64, BOX, snr=None)
    initial = gaussian_tree(initialize_from_map(data.sim.volume(0.0).float(), 60,
                                                generator=rng.generator(0, 0, 3)).params())
    config = default_config(box=BOX, pixel_size=PIXEL, n_gaussians=60, batch_size=16, encoder_lowpass=12.0)
    half = (np.arange(64) % 2 + 1).astype(np.int8)
    split = HalfSplit(half, np.zeros(64, dtype=bool), "test")
    trainer = Trainer(config, data, split, initial, torch.device("cpu"), Comm(None), "/tmp/unused", (64, "x"),
                      lambda: None)
    model = trainer.models[1]
    model.set_normalisation(data)
    _, images = model.encoder_input(data.batch(np.arange(16)))
    spectrum = torch.fft.rfft2(images)
    ky, kx = freq_grid_2d(BOX)
    beyond = torch.sqrt(kx**2 + ky**2) / PIXEL > 1 / 12.0
    assert float(spectrum[:, beyond].abs().max()) < 1e-3 * float(spectrum.abs().max())
    assert abs(float(images.mean())) < 0.05 and abs(float(images.std()) - 1) < 0.05     # normalised


def test_lambda_is_capped() -> None:
    """Near the identity deformation the gradient ratio explodes; λ stays at most ``lambda_max``."""
    data = make_data(96, BOX, snr=0.05, seed=3)
    initial = gaussian_tree(initialize_from_map(data.sim.volume(0.0).float(), 60,
                                                generator=rng.generator(0, 0, 3)).params())
    lams = {}
    for cap in (None, 1.0):
        config = default_config(box=BOX, pixel_size=PIXEL, n_gaussians=60, batch_size=16, lambda_max=cap, ramp_epochs=0,
                                schedule={"n_epochs": 2, "warmup_epochs": 0, "consensus_every": 0})
        half = (np.arange(96) % 2 + 1).astype(np.int8)
        trainer = Trainer(config, data, HalfSplit(half, np.arange(96) % 8 == 0, "test"), initial,
                          torch.device("cpu"), Comm(None), "/tmp/unused", (96, "x"), lambda: None)
        trainer.prepare()
        for epoch in range(2):
            for model in trainer.models.values():
                model.train_epoch(epoch, trainer.schedule, data, lambda: None)
        lams[cap] = max(m.lam for m in trainer.models.values())
    assert lams[None] > 1.0            # uncapped it exceeds the cap here
    assert lams[1.0] <= 1.0
