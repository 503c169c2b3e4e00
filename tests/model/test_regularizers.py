"""Neighbour graph, edge-length and repulsion losses, mask lookup (issue 3)."""

from __future__ import annotations

import math

import torch

from relion_dynamight.model import regularizers
from relion_dynamight.model.regularizers import (
    edge_length_loss,
    mask_to_gaussian_weights,
    mean_neighbour_distance,
    neighbour_graph,
    repulsion_loss,
)


def _lattice(n: int, spacing: float = 2.0) -> torch.Tensor:
    c = torch.arange(n, dtype=torch.float32) * spacing
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1).reshape(-1, 3)


def _degrees(edges: torch.Tensor, m: int) -> torch.Tensor:
    return torch.bincount(edges.flatten(), minlength=m)


def test_lattice_graph_degrees_and_rest_lengths():
    pts = _lattice(5)
    centre = 2 * 25 + 2 * 5 + 2  # interior point (2, 2, 2)
    edges, rest = neighbour_graph(pts, factor=1.2)  # c_mean = spacing → only the 6 face neighbours
    assert int(_degrees(edges, len(pts))[centre]) == 6
    assert torch.allclose(rest, torch.full_like(rest, 2.0))
    assert bool((edges[:, 0] < edges[:, 1]).all())
    edges15, rest15 = neighbour_graph(pts, factor=1.5)  # the paper's factor also reaches √2 diagonals
    assert int(_degrees(edges15, len(pts))[centre]) == 18
    assert math.isclose(float(rest15.max()), 2.0 * math.sqrt(2.0), rel_tol=1e-5)
    assert math.isclose(mean_neighbour_distance(pts), 2.0, rel_tol=1e-6)


def test_graph_chunking_matches_single_block(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(600, 3, generator=gen) * 20
    edges_full, rest_full = neighbour_graph(pts)
    monkeypatch.setattr(regularizers, "_CHUNK_ELEMENTS", 1000)  # 1-row blocks
    edges_chunk, rest_chunk = neighbour_graph(pts)
    assert torch.equal(edges_full, edges_chunk)
    assert torch.allclose(rest_full, rest_chunk)


def test_edge_loss_zero_for_rigid_motion_positive_for_stretch():
    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(300, 3, generator=gen) * 15
    edges, rest = neighbour_graph(pts)
    angle = 0.7
    rot = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    rigid = torch.stack([pts @ rot.T + torch.tensor([3.0, -2.0, 5.0]), pts])
    assert float(edge_length_loss(rigid, edges, rest)) < 1e-8
    stretched = (pts * torch.tensor([1.2, 1.0, 1.0]))[None]
    assert float(edge_length_loss(stretched, edges, rest)) > 1e-2


def test_repulsion_only_for_close_pairs():
    pts = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    pairs = torch.tensor([[0, 1], [1, 2]])
    assert float(repulsion_loss(pts[None], pairs, 2.0)) == 0.0
    collapsed = pts.clone()
    collapsed[1] = torch.tensor([0.5, 0.0, 0.0])
    collapsed.requires_grad_(True)
    loss = repulsion_loss(collapsed[None], pairs, 2.0)
    assert math.isclose(float(loss.detach()), (1.5**2) / 2, rel_tol=1e-5)
    loss.backward()
    assert float(collapsed.grad[1, 0]) < 0.0  # a descent step moves it to +x, away from point 0


def test_mask_lookup_trilinear_and_outside():
    n = 16
    mask = torch.zeros(n, n, n)
    mask[:, :, n // 2 :] = 1.0  # x >= 0 (pixels from centre)
    pts = torch.tensor([[3.0, 0.0, 0.0], [-3.0, 1.0, 2.0], [-0.5, 0.0, 0.0], [40.0, 0.0, 0.0]])
    w = mask_to_gaussian_weights(mask, pts)
    assert torch.allclose(w, torch.tensor([1.0, 0.0, 0.5, 0.0]), atol=1e-6)
    # index order: mask[z, y, x]
    ramp = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, n, n) / (n - 1)  # grows with z
    val = mask_to_gaussian_weights(ramp, torch.tensor([[0.0, 0.0, 1.0]]))
    assert math.isclose(float(val), (n // 2 + 1) / (n - 1), rel_tol=1e-5)


# --- cell-list search against brute force -----------------------------------------------------------------

def _brute_force_graph(pts: torch.Tensor, factor: float = 1.5) -> tuple[torch.Tensor, float]:
    """The previous all-pairs implementation (float64 distances): edges (i < j, row-major) and c_mean."""
    d = torch.cdist(pts.double(), pts.double(), compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    c_mean = float(torch.topk(d, 2, dim=1, largest=False).values.mean())
    i, j = torch.nonzero(d < factor * c_mean, as_tuple=True)
    keep = i < j
    return torch.stack([i[keep], j[keep]], dim=1), c_mean


def _clustered_points(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(1500, 3, generator=gen) * 4.0 + 20.0
    sparse = torch.rand(300, 3, generator=gen) * 200.0 - 100.0  # isolated points: several cell doublings
    dup = dense[:20].clone()  # exact duplicates: zero distances
    return torch.cat([dense, sparse, dup])


def test_cell_list_graph_equals_brute_force_on_random_points():
    gen = torch.Generator().manual_seed(5)
    for pts in (torch.rand(1500, 3, generator=gen) * 34 - 17, _clustered_points(6)):
        edges, rest = neighbour_graph(pts)
        expected, c_mean = _brute_force_graph(pts)
        assert torch.equal(edges, expected)
        assert math.isclose(mean_neighbour_distance(pts), c_mean, rel_tol=1e-6)
        assert torch.allclose(rest, (pts[edges[:, 0]] - pts[edges[:, 1]]).norm(dim=1))


def test_cell_list_nearest_neighbours_equal_brute_force():
    pts = _clustered_points(7)
    d = torch.cdist(pts.double(), pts.double(), compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    expected = torch.topk(d, 3, dim=1, largest=False).values
    got = regularizers.nearest_neighbour_distances(pts, 3)
    assert got.dtype == pts.dtype and got.shape == (len(pts), 3)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)
    assert float(got[-20:, 0].abs().max()) == 0.0  # duplicates are each other's nearest neighbour


def test_graph_of_degenerate_inputs():
    same = torch.zeros(5, 3)  # all points coincide: c_mean 0, no edge (distance 0 is not < 0)
    edges, rest = neighbour_graph(same)
    assert edges.shape == (0, 2) and rest.shape == (0,)
    line = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    edges, _ = neighbour_graph(line)  # c_mean = (1.5 + 1 + 1.5 + 8.5) / 4 = 3.125 → radius 4.69
    assert edges.tolist() == [[0, 1], [0, 2], [1, 2]]
