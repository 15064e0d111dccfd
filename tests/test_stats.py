"""Spearman with permutation p-values: scipy's rho, exact small-sample p-values, determinism, groups."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from atlas_core.stats import spearman_by_group, spearman_perm


def test_rho_matches_scipy_exactly_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 40).astype(float)  # many ties
    y = x + rng.normal(0, 2, 40)
    rho, p, n = spearman_perm(x, y, n_perm=2000)
    assert n == 40
    assert rho == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-14)


def test_perfectly_monotone_gives_rho_one_and_the_smallest_p():
    x = np.arange(20.0)
    rho, p, n = spearman_perm(x, np.exp(x), n_perm=20_000)
    assert (rho, n) == (1.0, 20)
    # only 2 of 20! orderings reach |rho| = 1, so no shuffle does: p = 1 / (n_perm + 1)
    assert p == pytest.approx(1 / 20_001)
    assert spearman_perm(x, -x, n_perm=999)[:2] == (-1.0, 1 / 1000)


def test_p_value_matches_the_exact_permutation_distribution():
    # n = 6: enumerate all 720 orderings for the exact two-sided p, then compare the Monte Carlo estimate.
    import itertools

    x = np.array([1.0, 2, 3, 4, 5, 6])
    y = np.array([2.0, 1, 4, 3, 6, 5])
    rho = sps.spearmanr(x, y).statistic
    perms = np.array(list(itertools.permutations(y)))
    null = np.array([sps.spearmanr(x, q).statistic for q in perms])
    exact = np.mean(np.abs(null) >= abs(rho) - 1e-12)
    got_rho, p, _ = spearman_perm(x, y, n_perm=20_000, seed=1)
    assert got_rho == pytest.approx(rho)
    assert p == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20_000))


def test_independent_data_is_not_significant():
    rng = np.random.default_rng(5)
    rho, p, _ = spearman_perm(rng.normal(size=60), rng.normal(size=60))
    assert abs(rho) < 0.3 and p > 0.05


def test_deterministic_under_seed():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert spearman_perm(x, y, seed=3) == spearman_perm(x, y, seed=3)
    assert spearman_perm(x, y, n_perm=5000, seed=3)[1] != spearman_perm(x, y, n_perm=5000, seed=4)[1]


def test_nan_and_bad_input_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN in input"):
        spearman_perm([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="differ in length"):
        spearman_perm([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 3"):
        spearman_perm([1.0, 2.0], [2.0, 1.0])
    rho, p, n = spearman_perm([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])  # constant: rho undefined
    assert math.isnan(rho) and math.isnan(p) and n == 4


def test_pooling_creates_a_correlation_no_group_has():
    # Within each layer x and y are independent; the layer shifts both, so the pooled rho is large.
    rng = np.random.default_rng(0)
    layers = np.repeat([3, 4, 5], 12)
    x = rng.normal(size=36) + 3 * layers
    y = rng.normal(size=36) + 3 * layers
    out = spearman_by_group(x, y, layers, n_perm=5000)
    assert list(out) == [3, 4, 5, "pooled"]
    for layer in (3, 4, 5):
        rho, p, n = out[layer]
        assert n == 12
        assert out[layer] == spearman_perm(x[layers == layer], y[layers == layer], n_perm=5000)
        assert p > 0.05
    rho, p, n = out["pooled"]
    assert n == 36 and rho > 0.7 and p < 1e-3


# --- the null of a per-head correlation, and a null's R² (issue 16) --------------------------------------

from atlas_core.stats import null_r2, spearman_null, spearman_rows  # noqa: E402


def test_spearman_rows_equals_the_reference_rho_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 30).astype(float)  # ties
    ys = rng.integers(0, 7, (6, 30)).astype(float)
    ys[0] = x * 2 + 1  # a row perfectly monotone in x
    rho = spearman_rows(x, ys)
    np.testing.assert_allclose(rho, [spearman_perm(x, y, n_perm=1)[0] for y in ys], rtol=0, atol=1e-12)
    np.testing.assert_allclose(rho, [sps.spearmanr(x, y).statistic for y in ys], rtol=0, atol=1e-12)
    assert rho[0] == pytest.approx(1.0)
    assert np.isnan(spearman_rows(x, np.ones((1, 30)))[0])  # a constant row has no rho
    with pytest.raises(ValueError, match="spearman_rows"):
        spearman_rows(x, ys[:, :5])


def test_spearman_null_first_draw_gets_the_full_test_every_draw_its_rho():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(12)
    null_y = rng.standard_normal((8, 12))
    groups = np.repeat([3, 4, 5], 4)
    out = spearman_null(x, null_y, groups, n_perm=200, seed=2)
    assert out["first"] == spearman_by_group(x, null_y[0], groups, n_perm=200, seed=2)
    assert list(out["rho"]) == ["pooled", 3, 4, 5]
    np.testing.assert_array_equal(out["rho"]["pooled"], spearman_rows(x, null_y))
    np.testing.assert_array_equal(out["rho"][4], spearman_rows(x[4:8], null_y[:, 4:8]))
    with pytest.raises(ValueError, match="null_y"):
        spearman_null(x, np.empty((0, 12)), groups)
    with pytest.raises(ValueError, match="labels"):
        spearman_null(x, null_y, groups[:-1])


def test_null_r2_by_hand():
    assert null_r2([1, 2, 3], [1, 2, 3]) == {"r2": 1.0, "max_abs_dev": 0.0, "n": 3}
    assert null_r2([1, 2, 3], [2, 2, 2])["r2"] == 0.0  # the null does no better than the mean
    # residuals (0.5, -0.5, 1): 1 - 1.5 / 2 = 0.25, no slope or intercept fitted
    assert null_r2([1, 2, 3], [0.5, 2.5, 2]) == {"r2": 0.25, "max_abs_dev": 1.0, "n": 3}
    assert null_r2([1, 3], [3, 1])["r2"] == -3.0  # worse than the mean
    one = null_r2([0.3], [0.2])
    assert math.isnan(one["r2"]) and math.isnan(one["max_abs_dev"]) and one["n"] == 1
    assert math.isnan(null_r2([2, 2], [1, 3])["r2"])  # no variance to explain
    with pytest.raises(ValueError, match="length"):
        null_r2([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        null_r2([1, np.nan], [1, 2])
