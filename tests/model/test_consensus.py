"""Consensus Gaussian model: automatic threshold, fit to a map, atomic coarse-graining (issue 3)."""

from __future__ import annotations

import math

import gemmi
import pytest
import torch

from relion_dynamight.errors import InputError
from relion_dynamight.imaging.gaussians import render_volume
from relion_dynamight.model.consensus import (
    GaussianModel,
    auto_threshold,
    fit_grid_size,
    from_atomic_model,
    initialize_from_map,
    map_correlation,
)
from relion_dynamight.model.render import gaussian_spectrum, render_splat, spectral_fit_loss

BOX = 32


def _two_blobs() -> torch.Tensor:
    c = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")

    def blob(cx: float, cy: float, cz: float, s: float, a: float) -> torch.Tensor:
        return a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s * s))

    return blob(-5, 0, 0, 3.0, 1.0) + blob(6, 2, 1, 2.5, 0.8)


def _noisy(vol: torch.Tensor, sd: float, seed: int = 0) -> torch.Tensor:
    return vol + sd * torch.randn(vol.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_auto_threshold_selects_voxels_inside_the_object(noise):
    clean = _two_blobs()
    vol = _noisy(clean, noise)
    thr = auto_threshold(vol, n_gaussians=200)
    selected = vol > thr
    assert int(selected.sum()) >= 200
    assert float((clean[selected] > 0.05).float().mean()) == 1.0  # no solvent voxel
    assert int(selected.sum()) > 0.2 * int((clean > 0.05).sum())  # and a fair part of the object


def test_auto_threshold_never_selects_fewer_voxels_than_gaussians():
    vol = _two_blobs()
    thr = auto_threshold(vol, n_gaussians=3000)
    assert int((vol > thr).sum()) >= 3000


def test_initialize_from_map_fits_the_two_blob_phantom():
    clean = _two_blobs()
    model = initialize_from_map(_noisy(clean, 0.02), 200, generator=torch.Generator().manual_seed(0), n_steps=100)
    assert model.n_gaussians == 200
    assert model.amplitudes.shape == () and model.widths.shape == ()
    with torch.no_grad():
        corr = map_correlation(model.render(BOX), clean)
    assert model.fit_correlation is not None and model.fit_correlation >= 0.95
    assert corr >= 0.95


def test_initialize_is_reproducible_with_a_seeded_generator():
    vol = _two_blobs()
    a = initialize_from_map(vol, 50, threshold=0.3, generator=torch.Generator().manual_seed(3), n_steps=2)
    b = initialize_from_map(vol, 50, threshold=0.3, generator=torch.Generator().manual_seed(3), n_steps=2)
    assert torch.equal(a.positions, b.positions)
    assert bool((vol[(a.positions.detach().round().long() + BOX // 2).flip(-1).unbind(-1)] > 0.2).all())


def test_threshold_selecting_no_voxel_is_an_input_error():
    with pytest.raises(InputError, match="threshold"):
        initialize_from_map(_two_blobs(), 10, threshold=5.0)


def test_params_round_trip():
    model = GaussianModel(torch.randn(5, 3), 2.0, 1.5, relative_amplitudes=torch.arange(1.0, 6.0))
    copy = GaussianModel.from_params(model.params())
    assert torch.equal(copy.positions, model.positions)
    assert torch.equal(copy.amplitudes, model.amplitudes)
    assert math.isclose(float(copy.widths.detach()), 1.5, rel_tol=1e-6)
    assert {n for n, _ in copy.named_parameters()} == {"positions", "log_amplitude", "log_width"}


def test_auto_threshold_ignores_flat_corners():
    """Reconstructions are often flat outside the inscribed sphere: that must not pass for noise-free solvent."""
    n = 48
    c = torch.arange(n, dtype=torch.float32) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.sqrt(x**2 + y**2 + z**2)
    clean = torch.exp(-(r / 6.0) ** 2 / 2)
    vol = _noisy(clean, 0.05, seed=2)
    vol[r > n / 2] = 0.0
    thr = auto_threshold(vol, n_gaussians=100)
    selected = vol > thr
    assert float((clean[selected] > 0.05).float().mean()) == 1.0
    assert 0.2 < thr < 0.4  # 5 SD of the noise (0.25) above the solvent level 0


# --- fast rendering and scaling ------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1.0, 1.6, 3.0])
def test_splat_renderer_matches_exact_render(width):
    gen = torch.Generator().manual_seed(4)
    pos = (torch.rand(300, 3, generator=gen) - 0.5) * 24
    amp = torch.rand(300, generator=gen) + 0.5
    exact = render_volume(pos, amp, width, 40)
    fast = render_splat(pos, amp, torch.tensor(width), 40)
    assert map_correlation(fast, exact) >= 0.999
    assert float((fast - exact).abs().max()) < 0.03 * float(exact.max())


def test_splat_renderer_with_two_width_classes():
    gen = torch.Generator().manual_seed(5)
    pos = (torch.rand(200, 3, generator=gen) - 0.5) * 20
    widths = torch.where(torch.arange(200) % 2 == 0, torch.tensor(1.8), torch.tensor(2.6))
    assert map_correlation(render_splat(pos, 1.0, widths, 32), render_volume(pos, 1.0, widths, 32)) >= 0.999


def test_spectral_fit_loss_matches_autograd_formula():
    gen = torch.Generator().manual_seed(6)
    box = 20
    for oversample in (1, 2):
        pos = ((torch.rand(40, 3, generator=gen) - 0.5) * 10).double().requires_grad_()
        amp = (torch.rand(40, generator=gen) + 0.5).double().requires_grad_()
        width = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
        target = torch.randn(box, box, box // 2 + 1, dtype=torch.complex128, generator=gen) * 1e-3
        weights = torch.rand(box, box, box // 2 + 1, dtype=torch.float64, generator=gen)
        ref = (weights * (gaussian_spectrum(pos, amp, width, box, oversample) - target).abs() ** 2).sum()
        fast = spectral_fit_loss(pos, amp, width, box, target, weights, oversample)
        assert torch.allclose(fast, ref, rtol=1e-12)
        for a, b in zip(torch.autograd.grad(ref, [pos, amp, width]), torch.autograd.grad(fast, [pos, amp, width])):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_fit_grid_is_cropped_for_wide_gaussians():
    assert fit_grid_size(256, 4.0) == 128
    assert fit_grid_size(256, 3.0) % 2 == 0 and 171 <= fit_grid_size(256, 3.0) <= 192
    assert fit_grid_size(64, 1.2) == 64
    assert fit_grid_size(100, 40.0) == 16


def _phantom_map(box: int, n: int, width: float, seed: int) -> torch.Tensor:
    """Gaussians filling a ball and a rod (radius box/5 and box/12), plus noise."""
    gen = torch.Generator().manual_seed(seed)
    ball = torch.randn(n, 3, generator=gen)
    ball = ball / ball.norm(dim=1, keepdim=True) * (box / 5) * torch.rand(n, 1, generator=gen) ** (1 / 3)
    rod = torch.randn(n // 3, 3, generator=gen) * (box / 24)
    rod[:, 0] = (torch.rand(n // 3, generator=gen) - 0.5) * box * 0.6
    pos = torch.cat([ball - torch.tensor([box / 10, 0.0, 0.0]), rod + torch.tensor([0.0, box / 6, 0.0])])
    clean = render_splat(pos, 1.0, torch.tensor(width), box)
    return clean + 0.05 * float(clean.std()) * torch.randn(clean.shape, generator=gen)


def test_initialize_box_128_with_5000_gaussians():
    vol = _phantom_map(128, 20000, 1.5, seed=7)
    model = initialize_from_map(vol, 5000, generator=torch.Generator().manual_seed(0), n_steps=60)
    assert model.n_gaussians == 5000
    assert model.fit_correlation is not None and model.fit_correlation >= 0.95
    with torch.no_grad():  # the reported correlation is the real one (checked with the fast renderer)
        rendered = render_splat(model.positions, model.amplitudes, model.widths, 128)
    assert abs(map_correlation(rendered, vol) - model.fit_correlation) < 2e-3


# --- atomic model --------------------------------------------------------------------------------------

def _residue(name: str, seq: int, atoms: list[tuple[str, str, tuple]]) -> gemmi.Residue:
    res = gemmi.Residue()
    res.name = name
    res.seqid = gemmi.SeqId(seq, " ")
    for atom_name, element, pos in atoms:
        atom = gemmi.Atom()
        atom.name = atom_name
        atom.element = gemmi.Element(element)
        atom.pos = gemmi.Position(*pos)
        atom.occ = 1.0
        res.add_atom(atom)
    return res


def _amino_acid(name: str, seq: int, x0: float, side: list[str]) -> gemmi.Residue:
    atoms = [("N", "N", (x0, 20.0, 20.0)), ("CA", "C", (x0 + 1.2, 20.5, 20.0)), ("C", "C", (x0 + 2.5, 20.0, 20.0)),
             ("O", "O", (x0 + 2.5, 18.8, 20.0)), ("H", "H", (x0, 21.0, 20.0))]
    atoms += [(a, a[0], (x0 + 1.2, 21.5 + 0.7 * i, 20.0)) for i, a in enumerate(side)]
    return _residue(name, seq, atoms)


def _nucleotide(name: str, seq: int, x0: float, base: list[str]) -> gemmi.Residue:
    backbone = ["P", "OP1", "OP2", "O5'", "C5'", "C4'", "O4'", "C3'", "O3'", "C2'", "O2'", "C1'"]
    atoms = [(a, a[0], (x0 + 0.3 * i, 40.0, 30.0)) for i, a in enumerate(backbone)]
    atoms[8] = ("O3'", "O", (x0 + 5.0, 40.0, 30.0))  # 1.6 Å from the next P (x0 + 6.6)
    atoms += [(a, a[0], (x0 + 3.3, 41.0 + 0.6 * i, 30.0)) for i, a in enumerate(base)]
    return _residue(name, seq, atoms)


@pytest.fixture
def tiny_pdb(tmp_path):
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(64, 64, 64, 90, 90, 90)
    model = gemmi.Model("1")
    protein = gemmi.Chain("A")
    specs = [("GLY", []), ("ALA", ["CB"]), ("LEU", ["CB", "CG", "CD1", "CD2"]),
             ("TYR", ["CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"]), ("PRO", ["CB", "CG", "CD"])]
    for i, (name, side) in enumerate(specs):
        protein.add_residue(_amino_acid(name, i + 1, 3.8 * i, side))  # C(i)–N(i+1) = 1.3 Å
    protein.add_residue(_amino_acid("SER", 7, 40.0, ["CB", "OG"]))  # chain break: no peptide bond
    protein.add_residue(_residue("HOH", 8, [("O", "O", (5.0, 5.0, 5.0))]))
    model.add_chain(protein)
    rna = gemmi.Chain("B")
    purine = ["N9", "C8", "N7", "C5", "C6", "N6", "N1", "C2", "N3", "C4"]
    pyrimidine = ["N1", "C2", "O2", "N3", "C4", "O4", "C5", "C6"]
    for i, (name, base) in enumerate([("A", purine), ("U", pyrimidine), ("A", purine)]):
        rna.add_residue(_nucleotide(name, i + 1, 6.6 * i, base))
    model.add_chain(rna)
    st.add_model(model)
    st.setup_entities()
    path = tmp_path / "tiny.pdb"
    st.write_pdb(str(path))
    return path


def test_atomic_coarse_graining_counts_edges_and_pixels(tiny_pdb):
    model, edges = from_atomic_model(tiny_pdb, box=BOX, pixel_size=2.0)
    # GLY 2, ALA 2, LEU 3, TYR 4, PRO 2, SER 2 = 15 protein; 3 nucleotides × 4 = 12; water ignored
    assert model.n_gaussians == 27
    # protein: within residues 1+1+2+3+1+1 = 9, peptide bonds 4 (SER is after a break);
    # RNA: within residues 3 × 3 = 9, O3'–P bonds 2
    assert edges.shape == (24, 2)
    pairs = {tuple(sorted(e)) for e in edges.tolist()}
    assert (0, 1) in pairs and (0, 2) in pairs  # GLY backbone–CA, GLY–ALA backbones
    assert model.amplitudes.shape == (27,)
    # GLY backbone N+C+O (Z 21) vs GLY CA (Z 6)
    assert math.isclose(float((model.amplitudes[0] / model.amplitudes[1]).detach()), 21.0 / 6.0, rel_tol=1e-5)
    # pixel = Å / pixel_size − N//2: GLY backbone centroid x = (0 + 2.5 + 2.5)/3 Å
    expected = torch.tensor([5.0 / 3.0, (20 + 20 + 18.8) / 3, 20.0]) / 2.0 - BOX // 2
    assert torch.allclose(model.positions[0].detach(), expected, atol=1e-4)


def test_atomic_model_without_polymer_is_an_input_error(tmp_path):
    st = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    chain.add_residue(_residue("HOH", 1, [("O", "O", (1.0, 1.0, 1.0))]))
    model.add_chain(chain)
    st.add_model(model)
    path = tmp_path / "water.pdb"
    st.write_pdb(str(path))
    with pytest.raises(InputError, match="no amino-acid or nucleotide"):
        from_atomic_model(path, box=BOX, pixel_size=1.0)
    with pytest.raises(InputError, match="missing.pdb: atomic model not found; check --atomic-model"):
        from_atomic_model(tmp_path / "missing.pdb", box=BOX, pixel_size=1.0)
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("data_x\nloop_\n_atom_site.id\n")
    with pytest.raises(InputError, match="garbage.cif: (cannot read|the atomic model holds no)"):
        from_atomic_model(garbage, box=BOX, pixel_size=1.0)
