"""The deformed backprojection's memory plan: measured coefficients, batch reduction, clear refusal."""

from __future__ import annotations

import resource

import pytest
import torch

from relion_dynamight.errors import InputError
from relion_dynamight.jobs.backprojection_memory import BYTES_PER_PADDED_VOXEL, free_bytes, plan_memory

CPU = torch.device("cpu")


def test_plan_keeps_the_batch_when_it_fits():
    plan = plan_memory(64, 10, CPU, available=8 << 30)
    assert plan.batch_size == 10
    assert plan.grid_bytes == BYTES_PER_PADDED_VOXEL * 128**3
    assert plan.total < 8 << 30


def test_plan_reduces_the_batch_and_says_so(caplog):
    grids = BYTES_PER_PADDED_VOXEL * 256**3
    with caplog.at_level("WARNING", logger="relion_dynamight"):
        plan = plan_memory(128, 64, CPU, available=int((grids + 5 * 200 * 128**2) / 0.9) + 1)
    assert plan.batch_size == 5
    assert "--batch-size 64 does not fit" in caplog.text and "5 particles at a time" in caplog.text


def test_box_too_large_is_one_clear_line():
    with pytest.raises(InputError) as err:
        plan_memory(400, 10, CPU, available=16 << 30)
    text = str(err.value)
    assert "\n" not in text
    assert "box 400" in text and "800^3" in text and "16.0 GiB are free" in text and "smaller box" in text


def test_free_bytes_on_cpu_honours_ulimit():
    """Under a real address-space limit the free memory reported is at most the headroom under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status", encoding="ascii") as fh:
        used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    try:
        resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), hard))
        assert free_bytes(CPU) <= 1 << 30
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
