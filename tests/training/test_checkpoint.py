"""HDF5 checkpoints: round trip without pickle, atomic files, damaged files, other particle sets."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from relion_dynamight.training import checkpoint as ckpt


def _adam_tree() -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ELU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)
    return {"net": dict(net.state_dict()), "opt": opt.state_dict(), "gen": gen.get_state(), "lam": 0.25,
            "n": 3, "flag": True, "name": "x", "none": None, "arr": np.arange(4, dtype=np.int16),
            "big": 2**80 + 1, "nested": [1, (2.5, "a"), {"k": torch.ones(2, dtype=torch.float64)}]}


def _state(tree: dict, n: int = 10, epoch: int = 3) -> dict:
    return {"epoch": epoch, "config": {"box": 32, "schedule": {"n_epochs": 5}}, "fingerprint": (n, "abc"),
            "split_half": np.arange(n) % 2 + 1, "split_validation": np.arange(n) % 5 == 0,
            "initial": {"positions": torch.zeros(4, 3)}, "halves": {1: tree, 2: tree}}


def test_round_trip_exact_and_without_pickle(tmp_path):
    tree = _adam_tree()
    path = ckpt.save_checkpoint(tmp_path / "c.h5", _state(tree))
    with h5py.File(path) as f:  # plain HDF5: both halves with network weights and optimiser state
        assert {"half1", "half2", "split", "initial"} <= set(f)
        assert f["half2/opt/state/#int:0/exp_avg"].shape == (3, 4)
        assert f["half1/net/0.weight"].dtype == np.float32
    state = ckpt.load_checkpoint(path, fingerprint=(10, "abc"))
    back = state["halves"][2]
    assert state["epoch"] == 3 and state["config"]["schedule"]["n_epochs"] == 5
    for k, v in tree["net"].items():
        assert torch.equal(back["net"][k], v)
    assert back["opt"]["param_groups"][0]["betas"] == tree["opt"]["param_groups"][0]["betas"]
    for i, s in tree["opt"]["state"].items():
        for k, v in s.items():
            assert torch.equal(back["opt"]["state"][i][k], v) and back["opt"]["state"][i][k].dtype == v.dtype
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ELU(), torch.nn.Linear(3, 2))
    net.load_state_dict(back["net"])
    torch.optim.Adam(net.parameters()).load_state_dict(back["opt"])  # loadable as is
    gen = torch.Generator()
    gen.set_state(back["gen"])
    ref = torch.Generator()
    ref.set_state(tree["gen"])
    assert torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=ref))
    assert back["big"] == 2**80 + 1 and back["none"] is None and back["flag"] is True and back["name"] == "x"
    assert back["nested"][1] == (2.5, "a") and back["nested"][2]["k"].dtype == torch.float64
    assert np.array_equal(state["split_validation"], np.arange(10) % 5 == 0)


def test_other_particle_set_refused(tmp_path):
    ckpt.save_checkpoint(ckpt.epoch_path(tmp_path, 1), _state(_adam_tree()))
    with pytest.raises(ckpt.CheckpointError, match="another particle set"):
        ckpt.load_latest(tmp_path, fingerprint=(10, "other"))


def test_truncated_and_corrupt_files_fall_back(tmp_path, caplog):
    tree = _adam_tree()
    ckpt.save_checkpoint(ckpt.epoch_path(tmp_path, 1), _state(tree, epoch=1))
    ckpt.save_checkpoint(ckpt.epoch_path(tmp_path, 2), _state(tree, epoch=2))
    p3 = ckpt.save_checkpoint(ckpt.epoch_path(tmp_path, 3), _state(tree, epoch=3))
    data = p3.read_bytes()
    p3.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(p3)
    p2 = ckpt.epoch_path(tmp_path, 2)
    raw = bytearray(p2.read_bytes())
    raw[:64] = b"\0" * 64  # destroyed superblock
    p2.write_bytes(bytes(raw))
    state = ckpt.load_latest(tmp_path, fingerprint=(10, "abc"))
    assert state is not None and state["epoch"] == 1
    assert "checkpoint_003.h5" in caplog.text and "checkpoint_002.h5" in caplog.text


def test_listing_order_and_prune(tmp_path):
    tree = {"a": 1}
    for e in (1, 2, 10, 11):
        ckpt.save_checkpoint(ckpt.epoch_path(tmp_path, e), _state(tree, epoch=e))
    ckpt.save_checkpoint(ckpt.final_path(tmp_path), _state(tree, epoch=11))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["checkpoint_final.h5", "checkpoint_011.h5", "checkpoint_010.h5", "checkpoint_002.h5",
                     "checkpoint_001.h5"]
    ckpt.prune(tmp_path, keep=2, every=0)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == names[:3]
    assert not list(ckpt.checkpoint_dir(tmp_path).glob(".*tmp"))  # no temporary files left


def test_all_checkpoints_unreadable_is_refused_not_restarted(tmp_path):
    """Issue 12: when every checkpoint is damaged, training must not silently start at epoch 0 over them."""
    for e in (1, 2):
        p = ckpt.save_checkpoint(ckpt.epoch_path(tmp_path, e), _state({"a": 1}, epoch=e))
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 checkpoint.*new output directory"):
        ckpt.load_latest(tmp_path, fingerprint=(10, "abc"))
    assert ckpt.load_latest(tmp_path / "empty") is None          # no checkpoints at all: a fresh start


def test_keep_policy_keeps_every_tenth_and_the_best(tmp_path):
    for e in range(1, 26):
        ckpt.save_checkpoint(ckpt.epoch_path(tmp_path, e), _state({"a": 1}, epoch=e))
    ckpt.prune(tmp_path, keep=3, every=10, best_epoch=7)
    kept = sorted(p.name for p in ckpt.list_checkpoints(tmp_path))
    assert kept == ["checkpoint_007.h5", "checkpoint_010.h5", "checkpoint_020.h5", "checkpoint_023.h5",
                    "checkpoint_024.h5", "checkpoint_025.h5"]
