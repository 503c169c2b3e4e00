"""Half sets: rlnRandomSubset, seeded micrograph-grouped split, seeded validation particles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from relion_dynamight.errors import InputError
from relion_dynamight.training.halves import fingerprint, make_split


class _T:
    def __init__(self, n, subset=None, mics=20):
        self.particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@s.mrcs" for i in range(n)],
                                       "rlnMicrographName": [f"mic{i % mics:03d}.mrc" for i in range(n)]})
        self.random_subset = subset

    def __len__(self):
        return len(self.particles)


def test_random_subset_is_followed_and_validation_seeded():
    subset = np.array([1, 2, 2, 1] * 50)
    s = make_split(_T(200, subset), seed=3, validation_fraction=0.1)
    assert np.array_equal(s.half, subset) and s.source == "rlnRandomSubset"
    for h in (1, 2):
        assert len(s.indices(h, True)) == 10 and len(s.indices(h, False)) == 90
        assert set(s.indices(h, None)) == set(np.flatnonzero(subset == h))
    again = make_split(_T(200, subset), seed=3, validation_fraction=0.1)
    other = make_split(_T(200, subset), seed=4, validation_fraction=0.1)
    assert np.array_equal(s.validation, again.validation) and not np.array_equal(s.validation, other.validation)


def test_split_groups_micrographs_and_is_order_independent():
    s = make_split(_T(400), seed=1, validation_fraction=0.0)
    assert "micrograph" in s.source and not s.validation.any()
    mics = _T(400).particles["rlnMicrographName"].to_numpy()
    for m in np.unique(mics):
        assert len(set(s.half[mics == m])) == 1
    assert 100 <= (s.half == 1).sum() <= 300
    perm = np.random.default_rng(0).permutation(400)
    t = _T(400)
    t.particles = t.particles.iloc[perm].reset_index(drop=True)
    s2 = make_split(t, seed=1, validation_fraction=0.0)
    assert np.array_equal(s2.half, s.half[perm])


def test_bad_subsets():
    with pytest.raises(InputError, match="rlnRandomSubset of particle 3 is 3"):
        make_split(_T(4, np.array([1, 2, 3, 1])), 0, 0.1)
    with pytest.raises(InputError, match="half set 2 has no particles"):
        make_split(_T(4, np.array([1, 1, 1, 1])), 0, 0.1)
    with pytest.raises(InputError, match="validation-fraction"):
        make_split(_T(4, np.array([1, 2, 1, 2])), 0, 1.0)


def test_fingerprint():
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"])
    assert fingerprint(["a", "b"])[0] == 2
