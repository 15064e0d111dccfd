"""Intrinsic dimension: estimators on exact ratio laws and on known manifolds, scikit-dimension agreement,
the source variant's bias, GRIDE, layer profiles, duplicates and errors."""

import functools
import warnings

import numpy as np
import pytest
from scipy import optimize

from atlas_core import intrinsic as I

N = 4000  # points per manifold in the accuracy tests
SEEDS = (0, 1)  # the accuracy tests average the estimate over these clouds
FAMILIES = {"linear": I.linear_subspace, "sphere": I.sphere}


@functools.lru_cache(maxsize=None)
def _twonn_ratio(family: str, d: int) -> float:
    """Mean TwoNN estimate over ``SEEDS`` divided by the true dimension."""
    if family == "swiss_roll":
        return float(np.mean([I.twonn(I.swiss_roll(N, seed=s)) for s in SEEDS])) / 2
    return float(np.mean([I.twonn(FAMILIES[family](N, d, seed=s)) for s in SEEDS])) / d


# --------------------------------------------------------------------------- the statistic itself


@pytest.mark.parametrize("d", range(2, 17))
def test_twonn_line_fit_is_unbiased_on_pareto_ratios(d):
    # mu = r2/r1 is exactly Pareto(d) for a locally uniform density: log mu ~ Exponential(rate d).
    rng = np.random.default_rng(d)
    log_mu = rng.exponential(1 / d, size=(20, 4000))
    fits = [I._twonn_line(row) for row in log_mu]
    assert np.mean(fits) == pytest.approx(d, rel=0.01)
    # The source variant ignores the truncation: mean of the lower 90% of Exp(d) is 0.744/d.
    q = np.log(10)
    expected = 1 / (1 - q * 0.1 / 0.9)
    assert expected == pytest.approx(1.3438, abs=1e-4)
    assert np.mean([I._twonn_source_fit(row) for row in log_mu]) / d == pytest.approx(expected, rel=0.01)


# --------------------------------------------------------------------------- known manifolds

# Within 5% wherever the manifold is locally flat with constant density at the scale of the second
# neighbour for N = 4000 points. Measured over 10 seeds, the mean bias is within 2.5% for these cases.
WITHIN_5PCT = [("linear", d) for d in range(2, 11)] + [("sphere", d) for d in range(2, 8)] + [("swiss_roll", 2)]
# Beyond that, N^(1/d) ~ 2: the neighbours span a good part of the manifold (curvature of the sphere,
# the Gaussian's density gradient), and TwoNN, like every nearest-neighbour estimator, underestimates.
# Measured mean ratio at N = 4000 (10 seeds): linear 11: 0.962, 12: 0.947; sphere 8: 0.957, 9: 0.961,
# 10: 0.942, 11: 0.934, 12: 0.924 (and sphere 12 reaches 0.945 at N = 16,000).
FINITE_N_BIAS = [("linear", 11), ("linear", 12), ("sphere", 8), ("sphere", 10), ("sphere", 12)]


@pytest.mark.parametrize("family,d", WITHIN_5PCT)
def test_twonn_within_5pct_on_known_manifolds(family, d):
    assert _twonn_ratio(family, d) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("family,d", FINITE_N_BIAS)
def test_twonn_high_d_bias_is_small_and_downward(family, d):
    assert 0.88 < _twonn_ratio(family, d) < 1.0


def test_twonn_on_a_curved_d_manifold():
    # The swiss roll's spiral times a cube: curved, with a boundary, d = 3.
    assert I.twonn(I.hyper_swiss_roll(N, 3, seed=0)) == pytest.approx(3, rel=0.05)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # skdim's own -log(1 - F) at F = 1
@pytest.mark.parametrize("family,d", [("linear", 3), ("sphere", 5), ("linear", 9)])
def test_twonn_matches_scikit_dimension(family, d):
    skdim = pytest.importorskip("skdim")
    X = FAMILIES[family](1000, d, seed=3)
    # Same convention: keep the int(N (1 - f)) smallest mu, F_i = i / N, least squares through 0.
    ref = skdim.id.TwoNN(discard_fraction=0.1).fit(X).dimension_
    assert I.twonn(X) == pytest.approx(ref, rel=1e-6)
    # n = 1 GRIDE is the unbiased Pareto MLE (N - 1) / sum log mu: skdim's method='mle' at f = 0.
    ref_mle = skdim.id.TwoNN(discard_fraction=0.0, method="mle").fit(X).dimension_
    assert I.gride_curve(X, orders=(1,))[0][1] == pytest.approx(ref_mle, rel=1e-6)


@pytest.mark.parametrize("d", range(6, 11))
def test_source_variant_is_biased_upward(d):
    X = I.linear_subspace(2000, d, seed=d)
    ratio = I.twonn_source(X) / d
    assert 1.2 < ratio < 1.45
    assert I.twonn_source(X) / I.twonn(X) == pytest.approx(1.344, rel=0.05)


@pytest.mark.parametrize("d", [2, 4, 6])
def test_mle_close_to_truth_on_linear_subspaces(d):
    assert I.mle_levina_bickel(I.linear_subspace(2000, d, seed=0)) == pytest.approx(d, rel=0.05)


def test_mle_matches_scikit_dimension():
    skdim = pytest.importorskip("skdim")
    X = I.sphere(800, 5, seed=2)
    ref = skdim.id.MLE().fit(X, n_neighbors=20, comb="mle").dimension_  # harmonic mean of (k-1)/sum log
    assert I.mle_levina_bickel(X, k=20) == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------- GRIDE


def test_gride_flat_at_all_scales_on_a_linear_subspace():
    curve = I.gride_curve(I.linear_subspace(3000, 4, seed=0))
    scales = [s for s, _ in curve]
    assert scales == sorted(scales)
    for _, d in curve:
        assert d == pytest.approx(4, rel=0.05)


def test_gride_swiss_roll_is_two_dimensional_at_small_scale():
    curve = I.gride_curve(I.swiss_roll(3000, seed=0), orders=(1, 2, 4))
    for _, d in curve:
        assert d == pytest.approx(2, rel=0.05)


def test_gride_root_is_the_likelihood_maximum():
    X = I.linear_subspace(1500, 5, seed=1)
    r = I.knn_distances(X, 16)
    log_mu = np.log(r[:, 15] / r[:, 7])  # n1 = 8, n2 = 16
    est = I._gride_mle(log_mu, 8, 16)
    best = optimize.minimize_scalar(lambda d: -I.gride_loglik(d, log_mu, 8, 16), bounds=(0.5, 50),
                                    method="bounded", options={"xatol": 1e-8}).x
    # The score uses N - 1 in place of N (as DADApy), a shift of O(1/N).
    assert est == pytest.approx(best, rel=2 / len(log_mu))


def test_gride_density_normalises():
    # For one ratio, gride_loglik is log f(mu); v = log mu has density f(e^v) e^v, which must integrate to 1.
    v = np.linspace(1e-6, 8, 5001)
    dens = np.exp([I.gride_loglik(3.0, np.array([t]), 4, 8) + t for t in v])
    assert np.trapezoid(dens, v) == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- layer profile


def test_layer_profile_peak_and_plateau():
    values = {0: 4.0, 3: 9.0, 6: 12.0, 9: 8.0, 11: 6.0}
    prof = I.layer_profile(values, n_layers=12)
    assert prof["layers"] == [0, 3, 6, 9, 11]
    assert prof["depth"] == pytest.approx([0, 3 / 11, 6 / 11, 9 / 11, 1])
    assert (prof["peak"], prof["peak_layer"]) == (12.0, 6)
    assert prof["peak_depth"] == pytest.approx(6 / 11)
    # 0.9 lies between layer 9 (9/11) and layer 11 (1): 8 + (0.9 - 9/11) / (2/11) * (6 - 8)
    assert prof["plateau"] == pytest.approx(8 + (0.9 - 9 / 11) / (2 / 11) * (6 - 8))
    assert np.isnan(I.layer_profile({0: 1.0, 5: 2.0}, 12)["plateau"])  # no extrapolation
    with pytest.raises(ValueError, match="layers must lie"):
        I.layer_profile({12: 1.0}, 12)


# --------------------------------------------------------------------------- plumbing


def test_knn_distances_match_a_kd_tree():
    from scipy.spatial import cKDTree

    X = I.sphere(500, 3, seed=0)
    ref, _ = cKDTree(X).query(X, k=6)
    np.testing.assert_allclose(I.knn_distances(X, 5), ref[:, 1:], rtol=1e-9)


def test_duplicates_are_dropped_and_counted_without_division_by_zero():
    X = I.linear_subspace(600, 3, seed=0)
    X = np.vstack([X, X[:7]])  # 7 pairs of duplicates: 14 points with r1 = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # any divide-by-zero would raise
        for fn in (I.twonn, I.twonn_source, I.mle_levina_bickel):
            with pytest.warns(I.DuplicatePointsWarning, match="dropped 14 of 607"):
                assert np.isfinite(fn(X))
        with pytest.warns(I.DuplicatePointsWarning):
            assert all(np.isfinite(d) for _, d in I.gride_curve(X, orders=(1, 2)))


def test_estimate_dispatch_and_per_head():
    clouds = np.stack([I.linear_subspace(400, d, ambient=32, seed=d) for d in (2, 3, 5)])  # (head, point, d_head)
    got = I.per_head(clouds, "twonn")
    assert got.shape == (3,)
    np.testing.assert_allclose(got, [I.twonn(c) for c in clouds])
    assert I.estimate(clouds[0], "twonn-source") == I.twonn_source(clouds[0])
    assert I.estimate(clouds[0], "mle", k=10) == I.mle_levina_bickel(clouds[0], k=10)
    with pytest.raises(ValueError, match="unknown estimator 'pca'.*twonn, twonn-source, mle"):
        I.estimate(clouds[0], "pca")


def test_manifolds_are_seeded_and_shaped():
    np.testing.assert_array_equal(I.sphere(50, 4, seed=7), I.sphere(50, 4, seed=7))
    assert not np.allclose(I.sphere(50, 4, seed=7), I.sphere(50, 4, seed=8))
    assert I.sphere(50, 4).shape == I.linear_subspace(50, 4).shape == I.swiss_roll(50).shape == (50, 64)
    np.testing.assert_allclose(np.linalg.norm(I.sphere(50, 4, seed=1), axis=1), 1.0)
    assert np.linalg.matrix_rank(I.linear_subspace(50, 6, seed=0)) == 6
    assert np.linalg.matrix_rank(I.swiss_roll(50, seed=0)) == 3


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="shape"):
        I.twonn(np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        I.twonn(np.full((10, 3), np.nan))
