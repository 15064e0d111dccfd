"""Intrinsic dimension: estimators on exact ratio laws and on known manifolds, scikit-dimension agreement
(TwoNN, MLE, GRIDE with its outlier cut), the source variant's bias, layer profiles, duplicates, and
degenerate input (each estimator x each degenerate cloud: a finite value or a named ValueError)."""

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
    # n = 1 GRIDE is the unbiased Pareto MLE (N - 1) / sum log mu, skdim's TwoNN method='mle' at f = 0,
    # as long as GRIDE's outlier cut keeps every ratio (it does on these clouds).
    log_mu = np.log(np.divide(*I.knn_distances(X, 2).T[::-1]))
    assert len(I._gride_cut(log_mu)) == len(log_mu)
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


# The grid GRIDE is held to scikit-dimension on: 46 clouds of 1,200 points (Gaussian subspaces and spheres
# of d = 1..10 and hyper swiss rolls of d = 2..4, two seeds each) at orders n = 1, 2, 4, 8.
GRIDE_ORDERS = (1, 2, 4, 8)
GRIDE_CLOUDS = (
    [(f, d, s) for s in (0, 1) for d in range(1, 11) for f in ("linear", "sphere")]
    + [("roll", d, s) for s in (0, 1) for d in (2, 3, 4)]
)


def _gride_cloud(family: str, d: int, seed: int) -> np.ndarray:
    if family == "roll":
        return I.hyper_swiss_roll(1200, d, ambient=32, seed=seed)
    return FAMILIES[family](1200, d, ambient=32, seed=seed)


def test_gride_matches_scikit_dimension_on_every_cloud_and_order():
    skdim = pytest.importorskip("skdim")
    differ = []
    for cloud in GRIDE_CLOUDS:
        X = _gride_cloud(*cloud)
        for n, (_, d) in zip(GRIDE_ORDERS, I.gride_curve(X, GRIDE_ORDERS)):
            ref = skdim.id.GRIDE(n1=n).fit(X).dimension_
            if d != pytest.approx(ref, rel=1e-6):
                differ.append((cloud, n, d / ref - 1))
    # Without DADApy's cut, 5 of these 184 cases differed (by up to 3.8%: linear d = 1, seed 0, n = 1).
    assert differ == []


def test_gride_cut_drops_only_the_extreme_ratios():
    rng = np.random.default_rng(0)
    log_mu = rng.exponential(1 / 2, size=1200)  # Pareto(d = 2) ratios at n1 = 1, n2 = 2
    mu = np.exp(log_mu)
    q95, q50 = np.percentile(mu, [95, 50])
    assert mu.max() < q50 + 20 * (q95 - q50)  # nothing to cut in this sample
    np.testing.assert_array_equal(I._gride_cut(log_mu), log_mu)
    outliers = np.log([1e3, 1e4, 1e6])  # near-overlapping points: r1 tiny
    kept = I._gride_cut(np.concatenate([log_mu, outliers]))
    np.testing.assert_array_equal(kept, log_mu)
    # Kept, the three would pull the n = 1 estimate down by 4.4%.
    assert I._gride_mle(np.concatenate([log_mu, outliers]), 1, 2) / I._gride_mle(log_mu, 1, 2) < 0.96


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


# --------------------------------------------------------------------------- degenerate input
# Every estimator gives a finite value or a ValueError naming the problem, never inf or NaN.

ESTIMATOR_CALLS = {
    "twonn": I.twonn,
    "twonn-source": I.twonn_source,
    "mle": lambda X: I.mle_levina_bickel(X, k=5),
    "gride": lambda X: [d for _, d in I.gride_curve(X, orders=(1, 2))],
    "estimate": lambda X: I.estimate(X, "twonn"),
    "per_head": lambda X: list(I.per_head([X, X], "mle", k=5)),
}
_REGULAR_POLYGON = np.c_[np.cos(np.arange(40) * np.pi / 20), np.sin(np.arange(40) * np.pi / 20)]  # r1 = r2
_DEGENERATE = {
    "constant": (np.ones((50, 4)), "constant cloud"),
    "only duplicates": (np.repeat(I.linear_subspace(2, 2, ambient=4), 25, axis=0), "duplicates"),
    "too few points": (I.linear_subspace(2, 2, ambient=4), r"need at least \d+ points"),
    "NaN": (np.where(np.arange(60)[:, None] == 5, np.nan, I.linear_subspace(60, 2, ambient=4)), "NaN or infinite"),
    "inf": (np.where(np.arange(60)[:, None] == 5, -np.inf, I.linear_subspace(60, 2, ambient=4)), "NaN or infinite"),
    "no features": (np.zeros((50, 0)), "no features"),
}


@pytest.mark.parametrize("case", list(_DEGENERATE))
@pytest.mark.parametrize("name", list(ESTIMATOR_CALLS))
def test_degenerate_clouds_are_refused_by_name(name, case):
    X, message = _DEGENERATE[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", I.DuplicatePointsWarning)
        with pytest.raises(ValueError, match=message):
            ESTIMATOR_CALLS[name](X)


@pytest.mark.parametrize("name", list(ESTIMATOR_CALLS))
def test_tied_ratios_give_a_clear_error_or_a_finite_value(name):
    # On a regular polygon every point's two nearest neighbours are equidistant: r2/r1 = 1 (to rounding),
    # d is not identifiable from it. TwoNN gave 1.4e15 here, and nan on a lattice line.
    line = np.arange(50.0)[:, None] * np.ones((1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", I.DuplicatePointsWarning)
        if name in ("mle", "per_head"):  # T_5/T_j is not tied: a finite value
            assert np.isfinite(ESTIMATOR_CALLS[name](_REGULAR_POLYGON)).all()
            assert np.isfinite(ESTIMATOR_CALLS[name](line)).all()
            return
        with pytest.raises(ValueError, match="tied|distinct"):
            ESTIMATOR_CALLS[name](_REGULAR_POLYGON)
        with pytest.raises(ValueError, match="tied|distinct|outlier cut"):
            ESTIMATOR_CALLS[name](line)


@pytest.mark.parametrize("name", list(ESTIMATOR_CALLS))
def test_estimates_do_not_depend_on_scale_or_offset(name):
    # Squares of 1e200 overflowed (NaN), of 1e-200 underflowed (every point a duplicate), and an offset
    # of 1e8 swamped the Gram expansion (TwoNN 2.06 instead of 2.78).
    X = I.linear_subspace(300, 3, ambient=8, seed=0)
    ref = np.asarray(ESTIMATOR_CALLS[name](X))
    for moved in (X * 1e200, X * 1e-200, X + 1e8):
        np.testing.assert_allclose(ESTIMATOR_CALLS[name](moved), ref, rtol=1e-6)


def test_knn_distances_scale_exactly_by_powers_of_two_and_ignore_offsets():
    X = I.sphere(400, 3, ambient=8, seed=1)
    r = I.knn_distances(X, 4)
    for e in (-700, 700):
        np.testing.assert_array_equal(I.knn_distances(np.ldexp(X, e), 4), np.ldexp(r, e))
    np.testing.assert_allclose(I.knn_distances(X + 1e8, 4), r, rtol=1e-6)  # offset: coordinates keep 1e-8
    with pytest.raises(ValueError, match="k must be a positive integer"):
        I.knn_distances(X, 0)


@pytest.mark.parametrize("fraction", [0.0, 1e-18])
def test_twonn_refuses_to_keep_the_ratio_at_f_equal_1(fraction):
    # Keeping all N ratios puts the largest at F = N/N = 1, where -log(1 - F) = inf: the fit was inf.
    X = I.linear_subspace(300, 3, ambient=8, seed=0)
    with pytest.raises(ValueError, match=r"F = 1.*discard_fraction >= 1/N"):
        I.twonn(X, discard_fraction=fraction)
    with pytest.raises(ValueError, match="F = 1"):
        I.estimate(X, "twonn", discard_fraction=fraction)
    assert np.isfinite(I.twonn(X, discard_fraction=1 / 300))  # one ratio left out is enough
    assert np.isfinite(I.twonn_source(X, discard_fraction=fraction))  # n / sum log mu has no F
    skdim = pytest.importorskip("skdim")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="infinity"):  # the reference refuses too
        warnings.simplefilter("ignore", RuntimeWarning)
        skdim.id.TwoNN(discard_fraction=fraction).fit(X)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize("name", ["twonn", "twonn-source"])
def test_discard_fraction_outside_0_1_is_refused(name, fraction):
    with pytest.raises(ValueError, match=r"discard_fraction must be in \[0, 1\)"):
        I.estimate(I.linear_subspace(100, 2, ambient=4), name, discard_fraction=fraction)


def test_bad_parameters_are_refused():
    X = I.linear_subspace(100, 2, ambient=4)
    for k in (1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an integer of at least 2"):
            I.mle_levina_bickel(X, k=k)
    for orders in ((), (0, 1), (1.5,), (True,)):
        with pytest.raises(ValueError, match="orders must be positive integers"):
            I.gride_curve(X, orders=orders)
    with pytest.raises(ValueError, match=r"\(head, point, d_head\)"):
        I.per_head(X)  # one cloud, not a stack of them
    with pytest.raises(ValueError, match="no clouds"):
        I.per_head([])
    with pytest.raises(ValueError, match=r"finite; layers \[3\]"):
        I.layer_profile({0: 1.0, 3: float("nan")}, 12)
    with pytest.raises(ValueError, match="layer indices must be integers"):
        I.layer_profile({0: 1.0, 2.5: 2.0}, 12)
    with pytest.raises(ValueError, match="n_layers must be an integer"):
        I.layer_profile({0: 1.0}, 1)


def test_dropped_points_are_returned_not_parsed_from_warnings():
    """Issue 16: the atlas chapter read the duplicate count by parsing the warning's text; now the estimators
    return it. 7 duplicated points make 14 points with r1 = 0 in every estimator."""
    X = I.linear_subspace(600, 3, seed=0)
    X = np.vstack([X, X[:7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: the count is returned
        for est, fn in (("twonn", I.twonn), ("twonn-source", I.twonn_source), ("mle", I.mle_levina_bickel)):
            value, dropped = I.estimate_dropped(X, est)
            assert dropped == 14
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", I.DuplicatePointsWarning)
                assert value == fn(X)
    Y = I.linear_subspace(605, 3, seed=1)
    clouds = np.stack([X, np.vstack([Y, Y[:2]])])  # (head, point, d): 14 and 4 points at zero distance
    values, dropped = I.per_head_dropped(clouds, "twonn")
    assert dropped.tolist() == [14, 4] and dropped.dtype == np.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", I.DuplicatePointsWarning)
        np.testing.assert_array_equal(values, I.per_head(clouds, "twonn"))
    assert I.per_head_dropped(I.linear_subspace(300, 2, seed=2)[None], "mle", k=10)[1].tolist() == [0]
    with pytest.raises(ValueError, match="unknown estimator"):
        I.estimate_dropped(X, "gride")
    with pytest.raises(ValueError, match="clouds must be"):
        I.per_head_dropped(X, "twonn")
