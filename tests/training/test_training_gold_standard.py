"""Gold standard: nothing from half 2's images reaches half 1's model (and vice versa)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from relion_dynamight.model.consensus import initialize_from_map
from relion_dynamight.parallel.mpi import Comm
from relion_dynamight.training import checkpoint as ckpt
from relion_dynamight.training import rng
from relion_dynamight.training.config import default_config
from relion_dynamight.training.half import gaussian_tree
from relion_dynamight.training.halves import HalfSplit
from relion_dynamight.training.trainer import Trainer
from training_sim import MemoryData, make_data

N = 160


def _train(data: MemoryData, split: HalfSplit, initial: dict, out) -> dict:
    config = default_config(box=32, pixel_size=3.0, n_gaussians=60, batch_size=16, seed=5,
                            schedule={"n_epochs": 3, "warmup_epochs": 1, "consensus_every": 1})
    trainer = Trainer(config, data, split, initial, torch.device("cpu"), Comm(None), out, (N, "x"), lambda: None)
    trainer.prepare()
    epochs = trainer.run()
    path = trainer.write_checkpoint(epochs, final=True)
    return ckpt.load_checkpoint(path)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a if k != "seconds")
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b)
    return a == b


def test_half2_images_do_not_reach_half1(tmp_path):
    data = make_data(N, 32, snr=1.0)
    initial = gaussian_tree(initialize_from_map(data.sim.volume(0.0).float(), 60,
                                                generator=rng.generator(0, 0, 3)).params())
    half = (np.arange(N) % 2 + 1).astype(np.int8)
    split = HalfSplit(half, np.arange(N) % 8 < 2, "test")
    changed = copy.copy(data)
    changed.images = data.images.clone()
    rows = torch.as_tensor(np.flatnonzero(half == 2))
    changed.images[rows] = torch.randn(len(rows), 32, 32, generator=torch.Generator().manual_seed(1))
    a = _train(data, split, initial, tmp_path / "a")
    b = _train(changed, split, initial, tmp_path / "b")
    assert _equal(a["halves"][1], b["halves"][1])  # half 1 bit-identical, including consensus, noise, RNG
    assert not _equal(a["halves"][2]["decoder"], b["halves"][2]["decoder"])  # the change did matter for half 2
    hist = a["halves"][1]["history"]
    assert (hist["network_phase"] > 0).sum() == 2 and hist["val_mse"].shape == (3,)
