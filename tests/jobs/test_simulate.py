"""The simulator writes a RELION project whose images, metadata and truth agree with each other and with RELION."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from runs import run_cli
from relion_dynamight.errors import InputError
from relion_dynamight.imaging.gaussians import render_volume
from relion_dynamight.imaging.geometry import euler_to_matrix
from relion_dynamight.imaging.projection import project_map_real
from relion_dynamight.analysis.phantom_images import particle_ctf
from relion_dynamight.jobs.simulate import load_truth, simulate_project, true_positions
from relion_dynamight.jobs.simulate import run as simulate_run
from relion_dynamight.relion.jobdir import Job
from relion_dynamight.imaging.ctf import ctf_2d
from relion_dynamight.relion.mrc import read_map

BOX, PIXEL = 32, 3.0


def _cc(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def hinge_project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Noise-free flexible data set with the default float16 group 2."""
    return simulate_project(tmp_path_factory.mktemp("sim") / "proj", n_particles=120, box=BOX, pixel_size=PIXEL,
                            snr=0.0, motion="hinge", seed=3)


@pytest.fixture(scope="module")
def rigid_project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One conformation, no noise, float32 stacks only (RELION 3.1 cannot read float16)."""
    return simulate_project(tmp_path_factory.mktemp("rigid") / "proj", n_particles=400, box=BOX, pixel_size=PIXEL,
                            snr=0.0, motion="none", seed=1, float16_groups=())


def test_files_and_metadata(hinge_project: dict) -> None:
    proj = hinge_project["project"]
    star = starfile.read(proj / "Refine3D/job001/run_data.star", always_dict=True)
    assert set(star) == {"optics", "particles"}
    assert (proj / "Refine3D/job001/run_data.star").read_text().lstrip().startswith("# version 30001")
    optics, parts = star["optics"], star["particles"]
    assert list(optics["rlnOpticsGroup"]) == [1, 2] and set(optics["rlnImageSize"]) == {BOX}
    assert optics["rlnVoltage"].nunique() == 2
    for col in ("rlnImageName", "rlnMicrographName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
                "rlnCtfScalefactor", "rlnOpticsGroup", "rlnRandomSubset"):
        assert col in parts.columns, col
    assert len(parts) == 120
    assert ((parts["rlnDefocusU"] - parts["rlnDefocusV"]) >= 1500).all()
    # rlnRandomSubset and optics group constant per micrograph; both subsets hold both optics groups.
    per_mic = parts.groupby("rlnMicrographName")[["rlnRandomSubset", "rlnOpticsGroup", "rlnDefocusU"]].nunique()
    assert (per_mic == 1).all().all()
    assert set(map(tuple, parts[["rlnRandomSubset", "rlnOpticsGroup"]].drop_duplicates().to_numpy())) == \
        {(1, 1), (1, 2), (2, 1), (2, 2)}
    # Stacks: group 1 float32 (mode 2), group 2 float16 (mode 12); indices 1..n per stack.
    for stack, rows in parts.groupby(parts["rlnImageName"].str.split("@").str[1]):
        with mrcfile.open(proj / stack, permissive=True) as mrc:
            assert int(mrc.header.mode) == (12 if rows["rlnOpticsGroup"].iloc[0] == 2 else 2)
            assert mrc.data.shape == (len(rows), BOX, BOX)
            assert mrc.voxel_size.x == pytest.approx(PIXEL)
        assert sorted(int(n.split("@")[0]) for n in rows["rlnImageName"]) == list(range(1, len(rows) + 1))
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc"):
        data, pixel = read_map(proj / "Refine3D/job001" / name)
        assert data.shape == (BOX,) * 3 and pixel == pytest.approx(PIXEL)
    pipeline = (proj / "default_pipeline.star").read_text()
    assert "# version 50001" in pipeline and "Refine3D/job001/ None relion.refine3d Succeeded" in pipeline
    assert "Refine3D/job001/run_data.star ParticleGroupMetadata.star.relion.refine3d 1" in pipeline


def test_images_are_ctf_times_projection_of_the_true_conformation(hinge_project: dict) -> None:
    """Each image = CTF · projection (shifted by −origin) of the rendered true map of its own hinge angle."""
    proj = hinge_project["project"]
    phantom, truth = load_truth(proj)
    parts = hinge_project["particles"]
    assert list(truth["rlnImageName"]) == list(parts["rlnImageName"])
    assert np.allclose(truth["hinge_angle"], hinge_project["hinge_angles"])
    assert np.ptp(truth["hinge_angle"]) > 30  # uniform in [-20, 20]
    optics = starfile.read(proj / "Refine3D/job001/run_data.star")["optics"]
    for i in (0, 1, 7, 60, 119):  # both optics groups (float32 and float16 stacks)
        row = parts.iloc[[i]]
        index, stack = row["rlnImageName"].iloc[0].split("@")
        image = mrcfile.read(proj / stack)[int(index) - 1].astype(np.float64)
        angle = float(truth["hinge_angle"].iloc[i])
        vol = render_volume(true_positions(proj, angle), phantom.amplitudes, phantom.widths, BOX)
        rot = euler_to_matrix(*(torch.tensor(row[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
        shift = torch.tensor(row[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()) / PIXEL
        ctf = ctf_2d(particle_ctf(row, optics, PIXEL), BOX, dtype=torch.float64)
        expected = project_map_real(vol, rot, shift, ctf)[0]
        assert _cc(image, expected) > 0.995, i
        # a wrong conformation fits worse
        other = render_volume(true_positions(proj, -angle if abs(angle) > 8 else angle + 20), phantom.amplitudes,
                              phantom.widths, BOX)
        assert _cc(image, project_map_real(other, rot, shift, ctf)[0]) < _cc(image, expected)


def test_truth_folder(hinge_project: dict) -> None:
    truth = hinge_project["truth"]
    meta = json.loads((truth / "phantom.json").read_text())
    phantom = hinge_project["phantom"]
    assert meta["moving_indices"] and len(meta["moving_indices"]) < len(meta["positions"])
    assert [m["angle"] for m in meta["motion_maps"]] == [-20.0, -10.0, 0.0, 10.0, 20.0]
    ref, _ = read_map(truth / "map_reference.mrc")
    assert np.allclose(ref, render_volume(phantom.positions, phantom.amplitudes, phantom.widths, BOX).numpy(), atol=1e-4)
    end, _ = read_map(truth / "map_motion_4.mrc")
    moved = true_positions(truth, 20.0)
    assert torch.allclose(moved[~phantom.moving], phantom.positions[~phantom.moving])
    assert float((moved[phantom.moving] - phantom.positions[phantom.moving]).norm(dim=1).max()) > 2.0
    assert _cc(end, render_volume(moved, phantom.amplitudes, phantom.widths, BOX)) > 0.9999
    assert true_positions(phantom, torch.tensor([0.0, 5.0])).shape == (2, len(meta["positions"]), 3)


def test_relion_reconstruct_reproduces_true_map(rigid_project: dict, relion: None) -> None:
    proj = rigid_project["project"]
    subprocess.run(["relion_reconstruct", "--i", "Refine3D/job001/run_data.star", "--o", "rec.mrc", "--ctf"],
                   cwd=proj, check=True, capture_output=True, timeout=300)
    rec, _ = read_map(proj / "rec.mrc")
    truth, _ = read_map(rigid_project["reference_map"])
    cc_relion = _cc(rec, truth)
    consensus, _ = read_map(rigid_project["consensus"])
    cc_ours = _cc(consensus, truth)
    print(f"CC to the true map: relion_reconstruct {cc_relion:.5f}, simulator consensus {cc_ours:.5f}")
    assert cc_relion >= 0.99
    assert cc_ours >= 0.99
    # RELION reads the half sets too.
    subprocess.run(["relion_reconstruct", "--i", "Refine3D/job001/run_data.star", "--o", "half1.mrc", "--ctf",
                    "--subset", "1"], cwd=proj, check=True, capture_output=True, timeout=300)
    assert _cc(read_map(proj / "half1.mrc")[0], truth) > 0.95


def test_noise_level_and_determinism(tmp_path: Path) -> None:
    kw = dict(n_particles=16, box=BOX, pixel_size=PIXEL, motion="hinge", seed=5)
    a = simulate_project(tmp_path / "a", snr=0.5, **kw)
    b = simulate_project(tmp_path / "b", snr=0.5, **kw)
    clean = simulate_project(tmp_path / "c", snr=0.0, **kw)
    name = a["particles"]["rlnImageName"].iloc[0].split("@")[1]
    ia, ib, ic = (mrcfile.read(r["project"] / name).astype(np.float64) for r in (a, b, clean))
    assert np.array_equal(ia, ib)
    noise = ia - ic
    assert noise.var() == pytest.approx(a["noise_sigma"] ** 2, rel=0.1)
    assert ic.var() / noise.var() == pytest.approx(0.5, rel=0.35)  # SNR = signal variance / noise variance
    assert simulate_project(tmp_path / "d", snr=0.5, **{**kw, "seed": 6})["particles"]["rlnAngleRot"].iloc[0] != \
        a["particles"]["rlnAngleRot"].iloc[0]


@pytest.mark.parametrize("kwargs, word", [({"box": 33}, "--box"), ({"n_particles": 2}, "--n-particles"),
                                          ({"snr": -1.0}, "--snr"), ({"motion": "twist"}, "--motion")])
def test_bad_arguments(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(InputError, match=word):
        simulate_project(tmp_path / "x", **{"n_particles": 8, "box": BOX, **kwargs})


def test_pdb_phantom(tmp_path: Path) -> None:
    lines = []
    for i in range(60):  # a 60-residue CA helix, 1.5 Å rise, 100° per residue
        t = np.deg2rad(100.0 * i)
        x, y, z = 2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * i - 45.0
        chain = "A" if i < 30 else "B"
        lines.append(f"ATOM  {i + 1:5d}  CA  ALA {chain}{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C")
    pdb = tmp_path / "helix.pdb"
    pdb.write_text("\n".join(lines) + "\nEND\n")
    result = simulate_project(tmp_path / "p", n_particles=12, box=48, pixel_size=2.5, snr=0.0, pdb=pdb)
    phantom = result["phantom"]
    assert phantom.positions.shape == (60, 3) and int(phantom.moving.sum()) == 30
    assert json.loads((result["truth"] / "phantom.json").read_text())["source"] == str(pdb)
    with pytest.raises(InputError, match="--box"):
        simulate_project(tmp_path / "q", n_particles=8, box=16, pixel_size=2.5, pdb=pdb)


def test_cli_simulate(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = run_cli("simulate", "--o", str(out), "--n-particles", "12", "--box", "24", "--snr", "0.2", timeout=300)
    assert res.returncode == 0, res.stderr
    assert (out / "Refine3D/job001/run_data.star").exists() and (out / "default_pipeline.star").exists()
    before = (out / "Refine3D/job001/run_data.star").read_bytes()
    with pytest.raises(InputError, match="already exists"):
        simulate_run(Job(None), out, n_particles=12, box=24)
    assert (out / "Refine3D/job001/run_data.star").read_bytes() == before

