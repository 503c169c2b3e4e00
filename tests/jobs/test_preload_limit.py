"""``--preload-images`` refuses with a clear message when the images do not fit (issue 7 item 3).

The limit is real: the job runs as a subprocess under an address-space limit (``RLIMIT_AS``, what
``ulimit -v`` sets on login nodes) 512 MiB above what the started program maps, and the STAR file
lists 8000 box-256 float32 images (2 GiB) in a sparse stack (no real disk use).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from relion_dynamight.relion.jobdir import EXIT_FAILURE
from relion_dynamight.relion.star import load_particles, write_particles
import fault_support as fs

N_IMAGES, BIG_BOX = 8000, 256
HEADROOM = 512 * 2**20

PROBE = ("import resource, torch, click, relion_dynamight.cli, relion_dynamight.jobs.optimize_deformations, "
         "relion_dynamight.relion.particles, relion_dynamight.jobs.runner\n"
         "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmPeak:')][0])")


@pytest.fixture(scope="module")
def big_star(tmp_path_factory) -> Path:
    project = fs.make_project(tmp_path_factory.mktemp("preload"))
    stack = project / "Big" / "sparse.mrcs"
    stack.parent.mkdir()
    with mrcfile.new_mmap(stack, shape=(N_IMAGES, BIG_BOX, BIG_BOX), mrc_mode=2, overwrite=True) as mrc:
        mrc.voxel_size = 3.0
    table = load_particles(project / "Refine3D/job001/run_data.star")
    table.optics["rlnImageSize"] = BIG_BOX
    rows = np.arange(N_IMAGES) % len(table)
    names = np.array([f"{i + 1:06d}@Big/sparse.mrcs" for i in range(N_IMAGES)])
    write_particles(table, project / "Big" / "particles.star", rows=rows, extra_columns={"rlnImageName": names})
    return project


def _limited_run(project: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **fs.ENV}
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    limit = int(probe.stdout.split()[-1]) + HEADROOM

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    job = "DynaMight/job009/"
    cmd = [sys.executable, "-m", "relion_dynamight.launcher", "optimize-deformations", "--refinement-star-file",
           "Big/particles.star", "--output-directory", job, "--initial-model", "Refine3D/job001/run_class001.mrc",
           "--gpu-id", "cpu", "--n-gaussians", "100", *extra, "--pipeline-control", job]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=set_limit)


def test_preload_refused_under_memory_limit(big_star):
    res = _limited_run(big_star, "--preload-images")
    assert res.returncode == 1, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1, res.stderr[-2000:]
    msg = errors[0]
    assert "preloading 8000 images of 256² pixels needs 2.0 GiB" in msg, msg
    assert "run without preloading images" in msg and "Big/particles.star" in msg
    assert "Traceback" not in res.stderr and "MemoryError" not in res.stderr
    assert (big_star / "DynaMight/job009" / EXIT_FAILURE).exists()


def test_without_preload_the_same_limit_is_fine(big_star):
    """Streaming needs no room for the images: the same run gets past data loading (and then stops at
    the next check, the consensus map's box of 24 against the images' 256)."""
    res = _limited_run(big_star)
    assert res.returncode == 1
    assert "preloading" not in res.stderr
    assert "differs from the particle box 256" in res.stderr, res.stderr[-2000:]
