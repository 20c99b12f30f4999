"""Utility, OPIS and eps-OPIS against hand-computed values and their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calibrate.consistency import eps_opis, opis, opis_terms, threshold_grid, utility


def test_utility_is_harmonic_mean_of_tar_and_trr():
    assert utility(np.array(0.8), np.array(0.2)) == pytest.approx(0.8)  # TAR = TRR = 0.8
    assert utility(np.array(1.0), np.array(0.5)) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert utility(np.array(0.0), np.array(1.0)) == 0.0  # 0/0 is defined as 0
    assert utility(np.array(0.0), np.array(0.3)) == 0.0


def test_beta_above_one_weighs_acceptance():
    tar, far = np.array(0.9), np.array(0.5)  # accepts well, rejects badly
    assert utility(tar, far, beta=2.0) > utility(tar, far, beta=1.0) > utility(tar, far, beta=0.5)
    b2 = 4.0
    assert utility(tar, far, beta=2.0) == pytest.approx((1 + b2) * 0.9 * 0.5 / (b2 * 0.5 + 0.9))


def test_opis_by_hand():
    u = np.array([[0.2, 0.4], [0.6, 0.8]])  # mean curve [0.4, 0.6]; deviations +-0.2
    assert opis_terms(u) == pytest.approx([0.04, 0.04])
    assert opis(u) == pytest.approx(0.04)


def test_identical_curves_are_perfectly_consistent():
    u = np.tile(np.linspace(0.1, 0.9, 11), (5, 1))
    assert opis(u) == 0.0
    assert eps_opis(u) == 0.0


def test_eps_opis_by_hand():
    # 20 members: ceil(0.05 * 20) = 1 best and 1 worst; constant curves 0..0.95.
    u = np.repeat(np.arange(20)[:, None] * 0.05, 3, axis=1)
    assert eps_opis(u, eps=0.05) == pytest.approx(0.95**2)
    # eps = 0.1 -> 2 per side: top mean 0.925, bottom mean 0.025.
    assert eps_opis(u, eps=0.1) == pytest.approx(0.9**2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="eps"):
        eps_opis(np.ones((3, 3)), eps=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        opis(np.ones((0, 3)))
    with pytest.raises(ValueError, match="NaN"):
        opis(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        threshold_grid(0.1, 0.9, 1)


def test_grid_includes_both_ends():
    g = threshold_grid(0.2, 0.7, 6)
    assert g[0] == 0.2 and g[-1] == 0.7 and len(g) == 6


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(2, 9)), elements=st.floats(0, 1))
)
def test_opis_equals_mean_variance_across_members(u):
    # OPIS is the population variance across members, averaged over the grid.
    assert opis(u) == pytest.approx(u.var(axis=0).mean(), abs=1e-12)
    assert 0.0 <= opis(u) <= 0.25 + 1e-12
    assert eps_opis(u) >= 0.0
