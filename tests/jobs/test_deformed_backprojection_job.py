"""optimize-inverse-deformations + deformable-backprojection as RELION runs them (real files, subprocesses).

The forward model is made from the simulator's TRUTH (a decoder regressed on the true hinge motion, the
latent code = hinge angle / max angle), so these tests measure the inverse training and the deformed
backprojection independently of how well optimize-deformations learns.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from runs import run_cli
from relion_dynamight.imaging.fourier import fsc
from relion_dynamight.jobs.simulate import load_truth, simulate_project
from relion_dynamight.model.decoder import DeformationDecoder
from relion_dynamight.relion.jobdir import read_output_nodes
from relion_dynamight.relion.mrc import read_map
from relion_dynamight.relion.star import load_particles, write_particles
from relion_dynamight.training import checkpoint as ckpt
from relion_dynamight.training.halves import fingerprint

BOX, PIXEL, MAX_ANGLE = 32, 4.0, 20.0
JOB = "DynaMight/job002"


def fit_decoder(phantom, seed: int, steps: int = 300) -> DeformationDecoder:
    """A forward decoder regressed on the true motion: z in [-1, 1] ↔ hinge angle z·MAX_ANGLE."""
    torch.manual_seed(seed)
    dec = DeformationDecoder(1, BOX)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    pos = phantom.positions.float()
    for _ in range(steps):
        z = torch.rand(32, 1) * 2 - 1
        target = phantom.true_positions(z[:, 0].double() * MAX_ANGLE).float() - pos
        loss = (dec(pos, z) - target).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec


def make_trained_job(root: Path, motion: str = "hinge", n: int = 400, snr: float = 0.5,
                     fit_steps: int = 300) -> Path:
    """A simulated project with a 'trained' forward job directory built from the truth.

    ``fit_steps``: regression steps of each half's decoder (~12 s of CPU for 300); 0 leaves the decoders
    untrained, enough for tests of the job's input checks.
    """
    sim = simulate_project(root, n_particles=n, box=BOX, pixel_size=PIXEL, snr=snr, motion=motion, seed=2,
                           max_angle=MAX_ANGLE, float16_groups=())
    phantom, truth = load_truth(root)
    star = Path(sim["star"]).relative_to(root)
    table = load_particles(root / star)
    half = table.random_subset.astype(np.int8)
    z = (truth["hinge_angle"].to_numpy() / MAX_ANGLE)[:, None].astype(np.float32)
    config = {"box": BOX, "pixel_size": PIXEL, "latent_dim": 1, "decoder_freqs": 10, "decoder_hidden": 32,
              "decoder_layers": 8, "star_file": str(star), "seed": 0}
    halves = {}
    for h in (1, 2):
        dec = fit_decoder(phantom, seed=h, steps=fit_steps)
        halves[h] = {"decoder": dict(dec.state_dict()), "gaussians": {"positions": phantom.positions.float()}}
    job = root / JOB
    ckpt.save_checkpoint(ckpt.final_path(job), {
        "epoch": 10, "config": config, "fingerprint": fingerprint(table.image_names), "split_half": half,
        "split_validation": np.zeros(len(half), dtype=bool), "initial": {"positions": phantom.positions.float()},
        "halves": halves})
    write_particles(table, job / "forward_deformations" / "latent_space.star", extra_columns={
        "rlnRandomSubset": half.astype(np.int64), "dmValidation": np.zeros(len(half), dtype=np.int64),
        "dmLatent1": z[:, 0].astype(np.float64)})
    return root


def cli(root: Path, *args: str, mpi: list[str] | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, "--pipeline-control", JOB + "/", cwd=root, mpi=mpi, timeout=900)


def moving_mask(root: Path) -> torch.Tensor:
    phantom, _ = load_truth(root)
    grid = torch.stack(torch.meshgrid(*(torch.arange(BOX, dtype=torch.float64) - BOX // 2,) * 3, indexing="ij"),
                       -1).flip(-1)
    d = torch.cdist(grid.reshape(-1, 3), phantom.positions[phantom.moving]).min(dim=1).values
    return (d < 2.5).reshape(BOX, BOX, BOX)


def corr(a, b, mask) -> float:
    x, y = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


@pytest.fixture(scope="module")
def hinge_job(tmp_path_factory) -> Path:
    root = make_trained_job(tmp_path_factory.mktemp("hinge"))
    res = cli(root, "optimize-inverse-deformations", JOB + "/", "--n-epochs", "12", "--batch-size", "16",
              "--save-deformations")
    assert res.returncode == 0, res.stderr + res.stdout
    res = cli(root, "deformable-backprojection", JOB + "/", "--batch-size", "64")
    assert res.returncode == 0, res.stderr + res.stdout
    return root


def test_outputs_and_nodes(hinge_job):
    job = hinge_job / JOB
    out = job / "backprojection"
    for name in ("map_half1.mrc", "map_half2.mrc", "map.mrc", "fsc.star", "fsc.png"):
        assert (out / name).is_file(), name
    data, pixel = read_map(out / "map_half1.mrc")
    assert data.shape == (BOX,) * 3 and data.dtype == np.float32 and abs(pixel - PIXEL) < 1e-4
    assert read_output_nodes(job) == [(f"{JOB}/backprojection/map_half1.mrc", "DensityMap.mrc.relion.halfmap.dynamight"),
                                      (f"{JOB}/backprojection/map_half2.mrc", "DensityMap.mrc.relion.halfmap.dynamight")] \
        or [Path(n).name for n, _ in read_output_nodes(job)] == ["map_half1.mrc", "map_half2.mrc"]
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    for h in (1, 2):
        with h5py.File(job / "inverse_deformations" / f"inverse_half{h}.h5") as f:
            assert f.attrs["epoch"] == 12 and f.attrs["complete"]
    log = (job / "run.out").read_text() if (job / "run.out").exists() else ""
    del log


def test_improved_maps_beat_standard_in_moving_domain(hinge_job):
    out = hinge_job / JOB / "backprojection"
    truth = torch.from_numpy(read_map(hinge_job / "truth" / "map_reference.mrc")[0])
    mask = moving_mask(hinge_job)
    scores = {}
    for kind in ("map", "standard"):
        for h in (1, 2):
            vol = torch.from_numpy(read_map(out / f"{kind}_half{h}.mrc")[0])
            mk = mask.float()
            scores[(kind, h)] = (corr(vol, truth, mask), fsc(vol * mk, truth * mk))
    for h in (1, 2):
        c_def, f_def = scores[("map", h)]
        c_std, f_std = scores[("standard", h)]
        print(f"half {h}: moving-domain CC vs truth {c_def:.4f} (deformed) vs {c_std:.4f} (standard); "
              f"masked FSC shells 4/6/8: {[round(float(f_def[i]), 3) for i in (4, 6, 8)]} vs "
              f"{[round(float(f_std[i]), 3) for i in (4, 6, 8)]}")
        # measured (box 32, 400 particles, hinge ±20°, arm 8 px): CC 0.979 vs 0.966, FSC shell 6 0.987 vs 0.946
        assert c_def > c_std + 0.007
        assert float(f_def[4:9].mean()) > float(f_std[4:9].mean()) + 0.015


def test_standard_maps_are_reconstruct_halves(hinge_job):
    """The job's standard maps are exactly ``reconstruct --halves`` of the same particles (issue 11: they used
    to carry an FSC-based Wiener term that cost resolution against the truth)."""
    res = run_cli("reconstruct", "--i", "Refine3D/job001/run_data.star", "--o", "Recon/plain.mrc", "--ctf",
                  "--halves", cwd=hinge_job, timeout=600)
    assert res.returncode == 0, res.stderr
    for h in (1, 2):
        job = read_map(hinge_job / JOB / "backprojection" / f"standard_half{h}.mrc")[0]
        plain = read_map(hinge_job / "Recon" / f"plain_half{h}.mrc")[0]
        assert np.abs(job - plain).max() <= 1e-5 * np.abs(plain).max()


def test_regional_choice_outputs(hinge_job):
    """map_half* = deformed_half* where the corrected half maps resolve better (the moving arm), standard elsewhere."""
    out = hinge_job / JOB / "backprojection"
    table = (out / "regions.star").read_text().split("_dmDeformedKept #5")[1].split()
    rows = np.array(table, dtype=float).reshape(-1, 5)
    assert 0 < rows[:, 4].sum() <= len(rows)                   # kept somewhere (the arm moves), a real choice
    # kept where the deformed half maps' FSC = 0.5 resolution (Å) is finer by more than 1 % in frequency
    assert np.all((rows[:, 4] == 1) == (rows[:, 2] > rows[:, 3] * 1.01))
    for h in (1, 2):
        final = read_map(out / f"map_half{h}.mrc")[0]
        deformed = read_map(out / f"deformed_half{h}.mrc")[0]
        standard = read_map(out / f"standard_half{h}.mrc")[0]
        # a convex combination of the two, voxel by voxel
        lo, hi = np.minimum(deformed, standard), np.maximum(deformed, standard)
        tol = 1e-5 * np.abs(standard).max()
        assert np.all(final >= lo - tol) and np.all(final <= hi + tol)


@pytest.mark.parametrize("kind", ["map", "standard", "deformed"])
def test_half_map_fsc_not_inflated(hinge_job, kind):
    """The half maps' FSC = 0.143 resolution is not finer than the map's FSC = 0.5 resolution against the truth
    (interpolated between shells, :mod:`relion_dynamight.analysis.truth_scores`) by more than 10 %."""
    from relion_dynamight.analysis.phantom import load_phantom
    from relion_dynamight.analysis.truth_scores import crossing, masked_fsc, region_masks

    out = hinge_job / JOB / "backprojection"
    h1, h2 = (torch.from_numpy(read_map(out / f"{kind}_half{h}.mrc")[0]) for h in (1, 2))
    truth = torch.from_numpy(read_map(hinge_job / "truth" / "map_reference.mrc")[0])
    mask = region_masks(load_phantom(hinge_job / "truth"), BOX)["full"]
    half_res = crossing(masked_fsc(h1, h2, mask), 0.143, BOX, PIXEL)
    truth_res = crossing(masked_fsc(0.5 * (h1 + h2), truth, mask), 0.5, BOX, PIXEL)
    print(f"{kind}: half-map FSC=0.143: {half_res:.2f} A; map vs truth FSC=0.5: {truth_res:.2f} A")
    assert half_res >= truth_res * 0.9        # an inflated half-map FSC would claim finer detail than there is


def test_relion_postprocess_reads_half_maps(hinge_job, relion, tmp_path):
    out = hinge_job / JOB / "backprojection"
    mask = (moving_mask(hinge_job) | (torch.from_numpy(read_map(hinge_job / "truth" / "map_reference.mrc")[0]) > 0.02))
    from relion_dynamight.relion.mrc import write_map

    write_map(tmp_path / "mask.mrc", mask.float().numpy(), PIXEL)
    (tmp_path / "pp").mkdir()
    res = subprocess.run(["relion_postprocess", "--i", str(out / "map_half1.mrc"), "--i2", str(out / "map_half2.mrc"),
                          "--mask", str(tmp_path / "mask.mrc"), "--angpix", str(PIXEL), "--o", str(tmp_path / "pp/postprocess")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    line = next(l for l in text.splitlines() if "FINAL RESOLUTION" in l)
    value = float(line.split(":")[-1].split()[0])
    print("relion_postprocess:", line.strip())
    assert 2 * PIXEL <= value < BOX * PIXEL


def test_mpi_two_ranks_equal_one(hinge_job, mpiexec, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(hinge_job, root)
    res = cli(root, "deformable-backprojection", JOB + "/", "--batch-size", "64", mpi=[mpiexec, "-n", "2"])
    assert res.returncode == 0, res.stderr + res.stdout
    for h in (1, 2):
        one = read_map(hinge_job / JOB / "backprojection" / f"map_half{h}.mrc")[0]
        two = read_map(root / JOB / "backprojection" / f"map_half{h}.mrc")[0]
        assert np.abs(one - two).max() < 1e-4 * np.abs(one).max()


def test_backprojection_before_inverse_is_a_clear_error(tmp_path_factory):
    root = tmp_path_factory.mktemp("noinverse")
    make_trained_job(root, n=200, fit_steps=0)  # only the input checks run: the decoders need no fitting
    res = cli(root, "deformable-backprojection", JOB + "/", "--batch-size", "64")
    assert res.returncode != 0
    assert "optimize-inverse-deformations" in res.stderr
    assert (root / JOB / "RELION_JOB_EXIT_FAILURE").exists()
    # a corrupt inverse file is named
    inv = root / JOB / "inverse_deformations"
    inv.mkdir(parents=True)
    for h in (1, 2):
        (inv / f"inverse_half{h}.h5").write_bytes(b"not hdf5")
    res = cli(root, "deformable-backprojection", JOB + "/")
    assert res.returncode != 0 and "inverse_half1.h5" in res.stderr and "corrupt" in res.stderr
    # a forward checkpoint of another particle set
    other = tmp_path_factory.mktemp("other")
    make_trained_job(other, n=120, fit_steps=0)
    res = cli(root, "optimize-inverse-deformations", JOB + "/", "--n-epochs", "1", "--checkpoint-file",
              str(ckpt.final_path(other / JOB)))
    assert res.returncode != 0 and "another particle set" in res.stderr


def test_mask_file_restricts_the_correction(hinge_job, tmp_path):
    """Issue 13 (6): ``--mask-file`` corrects the deformations only inside the mask: a mask of ones gives the
    unmasked maps, a mask far from the particle gives the standard maps where the particle is."""
    import shutil

    from relion_dynamight.relion.mrc import write_map

    root = tmp_path / "copy"
    shutil.copytree(hinge_job, root, symlinks=True)
    shutil.rmtree(root / JOB / "backprojection")
    ones = np.ones((BOX,) * 3, dtype=np.float32)
    corner = np.zeros((BOX,) * 3, dtype=np.float32)
    corner[:3, :3, :3] = 1.0
    write_map(root / "ones.mrc", ones, PIXEL)
    write_map(root / "corner.mrc", corner, PIXEL)
    maps = {}
    for name in ("ones", "corner"):
        res = cli(root, "deformable-backprojection", JOB + "/", "--batch-size", "64", "--mask-file", f"{name}.mrc")
        assert res.returncode == 0, res.stderr + res.stdout
        maps[name] = [read_map(root / JOB / "backprojection" / f"deformed_half{h}.mrc")[0] for h in (1, 2)]
    particle = moving_mask(hinge_job).numpy() > 0
    for h in (0, 1):
        unmasked = read_map(hinge_job / JOB / "backprojection" / f"deformed_half{h + 1}.mrc")[0]
        standard = read_map(hinge_job / JOB / "backprojection" / f"standard_half{h + 1}.mrc")[0]
        scale = np.abs(unmasked).max()
        assert np.abs(maps["ones"][h] - unmasked).max() <= 1e-4 * scale
        assert np.abs(maps["corner"][h] - standard)[particle].max() <= 1e-3 * scale
        assert np.abs(unmasked - standard)[particle].max() > 1e-2 * scale      # the correction is real there
    bad = cli(root, "deformable-backprojection", JOB + "/", "--mask-file", "Refine3D/job001/run_data.star")
    assert bad.returncode != 0 and "ERROR:" in bad.stderr
