"""Intrinsic dimension of point clouds: TwoNN, the source work's variant, MLE, GRIDE, layer profiles.

Every estimator takes a cloud ``X`` of shape ``(point, feature)`` (a NumPy array or a CPU tensor; it is
cast to float64) and works from nearest-neighbour distances (``knn_distances``).

- ``twonn``: Facco et al. 2017, the line through the origin of -log(1 - F(mu)) against log mu,
  mu = r2/r1, with the largest 10% of mu left out of the fit. This is the estimator to quote (its
  finite-sample bias at high d is in its docstring).
- ``twonn_source``: the source work's variant, d = n_kept / sum(log mu) after dropping the largest 10%
  of log mu. Biased upward (x1.34 for large N); here only to reproduce their numbers.
- ``mle_levina_bickel``: Levina & Bickel 2005 with the MacKay-Ghahramani pooling.
- ``gride_curve``: GRIDE (Denti et al. 2022) at neighbour orders n -> 2n, to show scale dependence, with
  DADApy's outlier cut (equal to scikit-dimension's ``GRIDE``).
- ``layer_profile``: d_int against relative depth, with peak and plateau (Valeriani et al. 2023).
- ``linear_subspace``, ``sphere``, ``swiss_roll``, ``hyper_swiss_roll``: seeded manifolds of known
  dimension, rotated into ``ambient`` dimensions, for validation.

Duplicates. A point at zero distance from its nearest neighbour has no ratio mu; such points are dropped
and counted in a ``DuplicatePointsWarning`` (real clouds have them: every block's first token, say), or,
with ``estimate_dropped``/``per_head_dropped``, the count is returned beside the estimate.
Nothing divides by zero.

Degenerate input. Every estimator returns a finite value or raises a ValueError that names the problem:
NaN/inf coordinates, too few points, a constant cloud or one made of duplicates, every ratio tied at 1
(a lattice), TwoNN's ``discard_fraction`` outside [0, 1) or keeping the ratio at F = 1. Clouds at any
scale or offset give the same estimate (``knn_distances``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import optimize
from scipy.special import betaln

ESTIMATORS: tuple[str, ...] = ("twonn", "twonn-source", "mle")
DISCARD_FRACTION = 0.1  # largest fraction of mu left out by TwoNN (Facco et al. 2017)
PLATEAU_DEPTH = 0.9  # relative depth of the "plateau" value (Valeriani et al. 2023)
_CHUNK_ELEMENTS = 2**22  # rows of the distance matrix held at once: this many float64 entries (32 MiB)
_TIE_LOG_RATIO = 1e-12  # log(r_far / r_near) below this is a tie: distances carry a few ulps of rounding
GRIDE_CUT = 20.0  # GRIDE keeps mu < q50 + GRIDE_CUT (q95 - q50) (DADApy's "very generous threshold")


class DuplicatePointsWarning(UserWarning):
    """Points at zero distance from a needed neighbour were dropped from an estimate."""


# --------------------------------------------------------------------------- nearest neighbours


def _is_int(n) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool)


def _as_cloud(X, min_points: int, why: str) -> np.ndarray:
    """Return ``X`` as a finite float64 array ``(point, feature)`` with at least ``min_points`` rows."""
    if hasattr(X, "detach"):  # a torch tensor
        X = X.detach().cpu().double().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected a cloud of shape (point, feature), got shape {X.shape}")
    if X.shape[1] == 0:
        raise ValueError("the cloud has no features (shape (point, 0))")
    if len(X) < min_points:
        raise ValueError(f"need at least {min_points} points ({why}), got {len(X)}")
    if not np.isfinite(X).all():
        raise ValueError("the cloud holds NaN or infinite values; drop or fix those points first")
    return X


def knn_distances(X, k: int) -> np.ndarray:
    """Sorted Euclidean distances from each point to its ``k`` nearest other points: ``(point, k)``.

    Exact brute force in row chunks (faster than a k-d tree for N ~ 1,000-4,000 in 64-256 dimensions).
    Candidates are chosen from the Gram-matrix expansion of the centred cloud, then their distances are
    recomputed from the coordinate differences, so a duplicate point sits at exactly 0. A point is never
    its own neighbour, but its duplicates are.

    Scale. The cloud is first scaled by a power of two (exact in binary floating point, so the distances
    are unchanged to the bit) to bring its largest coordinate into [0.5, 1): squares neither overflow
    (coordinates of 1e200) nor underflow to zero (1e-200). Centring matters for the candidates: the Gram
    expansion of a cloud offset far from the origin loses the differences (at an offset of 1e8 with unit
    spread, TwoNN fell from 2.8 to 2.1 on a 3-d subspace).

    Raises:
        ValueError: k is not a positive integer, fewer than k + 1 points, NaN/inf coordinates, or
        distances beyond float64's range.
    """
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    X = _as_cloud(X, k + 1, f"{k} neighbours each")
    exponent = int(np.frexp(np.abs(X).max())[1])  # largest |coordinate| = m 2^exponent, m in [0.5, 1)
    X = np.ldexp(X, -exponent)
    C = X - X.mean(axis=0)  # (point, feature): centred, for the Gram expansion only
    n = len(X)
    sq = np.einsum("pf,pf->p", C, C)  # (point,)
    out = np.empty((n, k))
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        d2 = C[start:stop] @ C.T  # (chunk, point): squared distances, built in place
        d2 *= -2.0
        d2 += sq[None, :]
        d2 += sq[start:stop, None]
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        idx = np.argpartition(d2, k - 1, axis=1)[:, :k]  # (chunk, k), unsorted
        exact = np.linalg.norm(X[idx] - X[start:stop, None, :], axis=2)  # (chunk, k)
        out[start:stop] = np.sort(exact, axis=1)
    out = np.ldexp(out, exponent)
    if not np.isfinite(out).all():
        raise ValueError("neighbour distances overflow float64; rescale the cloud")
    return out


def _drop_zero(r: np.ndarray, column: int, who: str, warn: bool = True) -> tuple[np.ndarray, int]:
    """Rows of ``r`` whose ``column``-th neighbour distance is positive, and how many were dropped; warn
    with that count unless ``warn`` is False (the caller then returns the count itself)."""
    keep = r[:, column] > 0
    n_drop = int((~keep).sum())
    if n_drop and warn:
        warnings.warn(
            f"{who}: dropped {n_drop} of {len(r)} points at zero distance from neighbour "
            f"{column + 1} (duplicate points)",
            DuplicatePointsWarning,
            stacklevel=4,
        )
    return r[keep], n_drop


def _log_ratio(far: np.ndarray, near: np.ndarray) -> np.ndarray:
    """log(far / near) for near > 0, with ratios within rounding of 1 set to exactly 0 (ties).

    Distances carry a few ulps of rounding, so a ratio of 1 + 1e-15 is a tie (a regular polygon's two
    neighbours), not evidence of d ~ 1e15.
    """
    log_mu = np.log(far) - np.log(near)  # no overflow of far / near for tiny near
    log_mu[log_mu < _TIE_LOG_RATIO] = 0.0
    return log_mu


def _twonn_log_mu(X, who: str, warn: bool = True) -> tuple[np.ndarray, int]:
    """log(r2/r1) per point ``(point,)``, duplicates dropped, and how many were dropped."""
    r = knn_distances(X, 2)
    n = len(r)
    r, n_drop = _drop_zero(r, 0, who, warn)
    if len(r) < 3:
        raise ValueError(f"{who}: only {len(r)} of {n} points have a positive distance to their nearest "
                         "neighbour, need at least 3 (a constant cloud, or nothing but duplicates)")
    return _log_ratio(r[:, 1], r[:, 0]), n_drop


def _check_discard(discard_fraction: float) -> None:
    if not 0 <= discard_fraction < 1:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}")


def _tied(who: str, what: str) -> ValueError:
    return ValueError(f"{who}: every {what} is 1 (tied neighbour distances, as on a lattice or a regular "
                      "polygon), so the dimension is not identifiable")


# --------------------------------------------------------------------------- estimators


def twonn(X, discard_fraction: float = DISCARD_FRACTION) -> float:
    """TwoNN (Facco et al. 2017): the line fit. The estimator to quote.

    mu = r2/r1 per point is Pareto with shape d, so -log(1 - F(mu)) = d log mu. With the N ratios sorted,
    F_i = i/N; the largest ``discard_fraction`` of them are left out (the ``int(N (1 - f))`` smallest are
    kept, F keeps its denominator N) and d is the least-squares slope through the origin. This is exactly
    scikit-dimension's ``TwoNN(discard_fraction=f)`` (method 'linear').

    Accuracy. On exactly Pareto ratios the fit is unbiased (within 1% for d = 2..16). On a manifold it is
    unbiased while the density is locally uniform out to the second neighbour; once N^(1/d) is small the
    neighbours feel the curvature or density gradient and it underestimates, as every nearest-neighbour
    estimator does. With N = 4,000 (mean of 10 seeds): within 2.5% on Gaussian linear subspaces up to
    d = 10 and on spheres up to d = 7; -5% on a 12-d subspace and -8% on S^12.

    Raises:
        ValueError: discard_fraction outside [0, 1) or so small that every ratio is kept (the largest
        then has F = 1 and -log(1 - F) = inf; scikit-dimension raises too), fewer than 3 distinct points,
        or every kept ratio tied at 1.
    """
    return _twonn_counted(X, discard_fraction)[0]


def _twonn_counted(X, discard_fraction: float = DISCARD_FRACTION, warn: bool = True) -> tuple[float, int]:
    _check_discard(discard_fraction)
    log_mu, n_drop = _twonn_log_mu(X, "twonn", warn)
    return _twonn_line(log_mu, discard_fraction), n_drop


def _twonn_line(log_mu: np.ndarray, discard_fraction: float = DISCARD_FRACTION) -> float:
    """The TwoNN line fit from log(r2/r1) per point (any order)."""
    _check_discard(discard_fraction)
    log_mu = np.sort(log_mu)
    n = len(log_mu)
    n_keep = int(n * (1 - discard_fraction))
    if n_keep < 2:
        raise ValueError(f"twonn: discard_fraction={discard_fraction} keeps {n_keep} of {n} ratios, need at least 2")
    if n_keep == n:
        raise ValueError(f"twonn: discard_fraction={discard_fraction} keeps all {n} ratios, and the largest has "
                         "empirical CDF F = 1, where -log(1 - F) is infinite; discard at least one "
                         f"(discard_fraction >= 1/N = {1 / n:.2g}; the default is {DISCARD_FRACTION})")
    x = log_mu[:n_keep]
    if not x.any():
        raise _tied("twonn", "kept ratio r2/r1")
    y = -np.log1p(-np.arange(1, n_keep + 1) / n)  # -log(1 - F), F_i = i/N < 1
    return float(x @ y / (x @ x))


def twonn_source(X, discard_fraction: float = DISCARD_FRACTION) -> float:
    """The SOURCE WORK's TwoNN variant, kept only to reproduce its numbers. Biased: do not quote as d_int.

    Drop the largest ``discard_fraction`` of log mu (keep the ``int(N (1 - f))`` smallest), then
    d = n_kept / sum(log mu). log mu is exponential with rate d, and the mean of its lower 90% is
    (1 - q e^{-q} / (1 - e^{-q})) / d = 0.744 / d with q = ln 10, so this overestimates d by x1.34 for
    large N (the truncation is not accounted for).

    Raises:
        ValueError: discard_fraction outside [0, 1), fewer than 3 distinct points, no ratio kept, or
        every kept ratio tied at 1.
    """
    return _twonn_source_counted(X, discard_fraction)[0]


def _twonn_source_counted(X, discard_fraction: float = DISCARD_FRACTION, warn: bool = True) -> tuple[float, int]:
    _check_discard(discard_fraction)
    log_mu, n_drop = _twonn_log_mu(X, "twonn-source", warn)
    return _twonn_source_fit(log_mu, discard_fraction), n_drop


def _twonn_source_fit(log_mu: np.ndarray, discard_fraction: float = DISCARD_FRACTION) -> float:
    """The source variant from log(r2/r1) per point (any order)."""
    _check_discard(discard_fraction)
    log_mu = np.sort(log_mu)
    n_keep = int(len(log_mu) * (1 - discard_fraction))
    if n_keep < 1:
        raise ValueError(f"twonn-source: discard_fraction={discard_fraction} keeps none of {len(log_mu)} ratios")
    total = log_mu[:n_keep].sum()
    if total == 0:
        raise _tied("twonn-source", "kept ratio r2/r1")
    return float(n_keep / total)


def mle_levina_bickel(X, k: int = 20) -> float:
    """Levina & Bickel (2005) maximum likelihood, pooled as MacKay & Ghahramani (2005) advise.

    Per point, with T_j its distance to the j-th neighbour, the inverse estimate is
    1/m(x) = (1/(k-1)) sum_{j<k} log(T_k/T_j). The global estimate is the inverse of the mean of these
    inverses (not the mean of the per-point m(x), which is biased upward). This equals
    scikit-dimension's ``MLE().fit(X, n_neighbors=k, comb='mle')``.

    Raises:
        ValueError: k not an integer >= 2, fewer than k + 1 points, no point with a positive
        nearest-neighbour distance (a constant cloud), or every T_k/T_j tied at 1.
    """
    return _mle_counted(X, k)[0]


def _mle_counted(X, k: int = 20, warn: bool = True) -> tuple[float, int]:
    if not _is_int(k) or k < 2:
        raise ValueError(f"k must be an integer of at least 2, got {k!r}")
    r = knn_distances(X, k)
    n = len(r)
    r, n_drop = _drop_zero(r, 0, "mle", warn)
    if len(r) == 0:
        raise ValueError(f"mle: none of {n} points has a positive distance to its nearest neighbour "
                         "(a constant cloud, or nothing but duplicates)")
    inv = _log_ratio(r[:, -1:], r[:, :-1]).mean(axis=1)  # (point,): 1/m(x)
    if not inv.any():
        raise _tied("mle", f"ratio T_{k}/T_j")
    return float(1.0 / inv.mean()), n_drop


def _gride_cut(log_mu: np.ndarray) -> np.ndarray:
    """The ratios GRIDE keeps: mu < q50 + 20 (q95 - q50), quantiles of mu (DADApy ``_filter_mus``).

    A handful of extreme ratios (a point whose n1-th neighbour nearly overlaps it) would otherwise pull
    the estimate down by several percent; the threshold is generous enough for fat-tailed mu.
    """
    mu = np.exp(log_mu)
    q95, q50 = np.percentile(mu, [95, 50])
    return log_mu[mu < q50 + GRIDE_CUT * (q95 - q50)]


def _gride_mle(log_mu: np.ndarray, n1: int, n2: int) -> float:
    """GRIDE estimate of d from log(r_{n2}/r_{n1}) > 0 per point (Denti et al. 2022, eq. for the ratio law).

    The ratio mu = r_{n2}/r_{n1} has density f(mu) = d (mu^d - 1)^{n2-n1-1} / (B(n2-n1, n1) mu^{(n2-1)d+1}).
    Its log-likelihood, up to a constant, is
        N log d + (n2-n1-1) sum log(1 - mu^-d) - n1 d sum log mu,
    and the score N/d + (n2-n1-1) sum log mu / (mu^d - 1) - n1 sum log mu decreases in d, from +inf at
    d -> 0 to -n1 sum log mu < 0, so its root is the unique maximum. As in DADApy (``utils_._loglik``),
    N is replaced by N - 1 in the score, which at n1 = 1, n2 = 2 gives the unbiased (N - 1) / sum log mu;
    the plain MLE differs by O(1/N). The ratios are taken as given (``gride_curve`` cuts outliers first).
    """
    n = len(log_mu)
    if n < 2:
        raise ValueError(f"gride (n={n1}): {n} ratios left to fit, need at least 2")
    if not (log_mu > 0).all():
        raise ValueError(f"gride (n={n1}): ratios r_{n2}/r_{n1} must exceed 1 (drop ties first)")
    s = log_mu.sum()

    def score(d: float) -> float:
        return (n - 1) / d + (n2 - n1 - 1) * np.sum(log_mu / np.expm1(d * log_mu)) - n1 * s

    lo, hi = 1e-3, 1.0
    while score(lo) <= 0:  # huge ratios put the root below 1e-3
        lo /= 2.0
    while score(hi) > 0:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(f"gride (n={n1}): the estimate exceeds d = 1e6 (ratios r_{n2}/r_{n1} all within "
                             "1e-6 of 1); the dimension is not identifiable")
    return float(optimize.brentq(score, lo, hi, xtol=1e-10))


def gride_loglik(d: float, log_mu: np.ndarray, n1: int, n2: int) -> float:
    """Full GRIDE log-likelihood of ``d`` (with its constant), for checks against ``_gride_mle``."""
    n = len(log_mu)
    return float(
        n * np.log(d)
        + (n2 - n1 - 1) * np.sum(np.log(-np.expm1(-d * log_mu)))
        - n1 * d * log_mu.sum()
        - log_mu.sum()
        - n * betaln(n2 - n1, n1)
    )


def _gride_log_mu(r: np.ndarray, n1: int) -> np.ndarray:
    """log(r_{2 n1} / r_{n1}) of the points GRIDE uses at order n1: duplicates and ties dropped (warned),
    then the outlier cut. ``r`` is (point, >= 2 n1) sorted neighbour distances."""
    who = f"gride (n={n1})"
    rn, _ = _drop_zero(r, n1 - 1, who)
    log_mu = _log_ratio(rn[:, 2 * n1 - 1], rn[:, n1 - 1])
    tied = log_mu == 0  # mu = 1 has zero density for n2 > n1 + 1 and says nothing of d; scikit-dimension drops it
    if tied.any():
        warnings.warn(f"{who}: dropped {int(tied.sum())} of {len(r)} points with r_{2 * n1} = r_{n1} (tied neighbours)",
                      DuplicatePointsWarning, stacklevel=3)
        log_mu = log_mu[~tied]
    if len(log_mu) < 2:
        raise ValueError(f"{who}: only {len(log_mu)} of {len(r)} points have distinct, positive r_{n1} and "
                         f"r_{2 * n1}, need at least 2 (a constant cloud, duplicates or a lattice)")
    kept = _gride_cut(log_mu)
    if len(kept) < 2:
        raise ValueError(f"{who}: only {len(kept)} of {len(log_mu)} ratios are below the outlier cut "
                         f"q50 + {GRIDE_CUT:g} (q95 - q50), need at least 2 (too few distinct ratios)")
    return kept


def gride_curve(X, orders: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> list[tuple[float, float]]:
    """GRIDE scale curve: for each order n, the MLE of d from mu = r_{2n}/r_n, at scale mean(r_{2n}).

    Returns ``[(scale, d), ...]`` in the order of ``orders``. At each order, points with r_n = 0
    (duplicates) or r_{2n} = r_n (ties) are dropped with a ``DuplicatePointsWarning``, then ratios
    above q50 + 20 (q95 - q50) are cut, as GRIDE is defined in DADApy (Denti et al. 2022's reference
    code) and scikit-dimension; the estimate then equals ``skdim.id.GRIDE(n1=n).fit(X).dimension_``.

    Raises:
        ValueError: orders not positive integers, fewer than 2 max(orders) + 1 points, fewer than 2
        usable ratios at an order, or an estimate beyond d = 1e6.
    """
    if not orders or not all(_is_int(n) and n >= 1 for n in orders):
        raise ValueError(f"orders must be positive integers, got {list(orders)}")
    orders = [int(n) for n in orders]
    r = knn_distances(X, 2 * max(orders))  # (point, 2 max n); column j is neighbour j + 1
    return [(float(r[:, 2 * n1 - 1].mean()), _gride_mle(_gride_log_mu(r, n1), n1, 2 * n1)) for n1 in orders]


_DISPATCH: dict[str, Callable[..., float]] = {
    "twonn": twonn,
    "twonn-source": twonn_source,
    "mle": mle_levina_bickel,
}


_COUNTED: dict[str, Callable[..., tuple[float, int]]] = {
    "twonn": _twonn_counted,
    "twonn-source": _twonn_source_counted,
    "mle": _mle_counted,
}


def estimate(X, estimator: str = "twonn", **kwargs) -> float:
    """Intrinsic dimension of one cloud with the named estimator (one of ``ESTIMATORS``)."""
    try:
        fn = _DISPATCH[estimator]
    except KeyError:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}") from None
    return fn(X, **kwargs)


def per_head(clouds, estimator: str = "twonn", **kwargs) -> np.ndarray:
    """Intrinsic dimension of each head's cloud: ``clouds`` is ``(head, point, d_head)`` or a sequence of
    ``(point, d_head)`` clouds. Returns ``(head,)``.

    Raises:
        ValueError: an array that is not 3-d, no clouds, or (from ``estimate``) a degenerate cloud.
    """
    _check_clouds(clouds)
    return np.array([estimate(c, estimator, **kwargs) for c in clouds], dtype=np.float64)


def estimate_dropped(X, estimator: str = "twonn", **kwargs) -> tuple[float, int]:
    """``estimate`` and how many points it dropped as duplicates, returned instead of warned.

    Args:
        X: (point, feature)
        estimator: one of ``ESTIMATORS``
    Returns:
        (d_int, points dropped: those at zero distance from their nearest neighbour)
    Raises:
        ValueError: as ``estimate``
    """
    try:
        fn = _COUNTED[estimator]
    except KeyError:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}") from None
    return fn(X, **kwargs, warn=False)


def per_head_dropped(clouds, estimator: str = "twonn", **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``per_head`` and how many points each head's estimate dropped as duplicates (no warning).

    Args:
        clouds: (head, point, d_head) or a sequence of (point, d_head) clouds
        estimator: one of ``ESTIMATORS``
    Returns:
        (d_int (head,) float64, dropped (head,) int64); d_int equals ``per_head``'s
    Raises:
        ValueError: as ``per_head``
    """
    _check_clouds(clouds)
    out = [estimate_dropped(c, estimator, **kwargs) for c in clouds]
    return np.array([v for v, _ in out], dtype=np.float64), np.array([n for _, n in out], dtype=np.int64)


def _check_clouds(clouds) -> None:
    if hasattr(clouds, "ndim") and clouds.ndim != 3:
        raise ValueError(f"clouds must be (head, point, d_head) or a sequence of (point, d_head) clouds, "
                         f"got shape {tuple(clouds.shape)}")
    if len(clouds) == 0:
        raise ValueError("no clouds given")


# --------------------------------------------------------------------------- depth profile


def layer_profile(values_by_layer: dict[int, float], n_layers: int) -> dict:
    """d_int against relative depth layer / (n_layers - 1), with its peak and plateau.

    ``peak`` is the largest value and ``peak_layer``/``peak_depth`` where it is (first one on ties);
    ``plateau`` is the value at relative depth 0.9, linearly interpolated between the two measured layers
    around it, and NaN when 0.9 lies outside the measured depths (no extrapolation; "not measured").

    Raises:
        ValueError: n_layers not an integer >= 2, no layers, non-integer or out-of-range layer indices,
        or a non-finite value.
    """
    if not _is_int(n_layers) or n_layers < 2:
        raise ValueError(f"n_layers must be an integer of at least 2, got {n_layers!r}")
    if not values_by_layer:
        raise ValueError("no layers given")
    if not all(_is_int(l) for l in values_by_layer):
        raise ValueError(f"layer indices must be integers, got {list(values_by_layer)}")
    layers = sorted(values_by_layer)
    if layers[0] < 0 or layers[-1] > n_layers - 1:
        raise ValueError(f"layers must lie in [0, {n_layers - 1}], got {layers}")
    values = np.array([float(values_by_layer[l]) for l in layers])
    layers = [int(l) for l in layers]
    if not np.isfinite(values).all():
        bad = [l for l, v in zip(layers, values) if not np.isfinite(v)]
        raise ValueError(f"layer values must be finite; layers {bad} are not")
    depth = np.array(layers, dtype=np.float64) / (n_layers - 1)
    i = int(np.argmax(values))
    inside = depth[0] <= PLATEAU_DEPTH <= depth[-1]
    plateau = float(np.interp(PLATEAU_DEPTH, depth, values)) if inside else float("nan")
    return {
        "layers": layers,
        "depth": depth.tolist(),
        "values": values.tolist(),
        "peak": float(values[i]),
        "peak_layer": layers[i],
        "peak_depth": float(depth[i]),
        "plateau": plateau,
        "plateau_depth": PLATEAU_DEPTH,
    }


# --------------------------------------------------------------------------- known manifolds


def _embed(Y: np.ndarray, ambient: int, rng: np.random.Generator) -> np.ndarray:
    """Rotate ``Y`` (point, m) into ``ambient`` dimensions by a random orthonormal (ambient, m) frame."""
    m = Y.shape[1]
    if ambient < m:
        raise ValueError(f"ambient dimension {ambient} is below the embedding dimension {m}")
    q, _ = np.linalg.qr(rng.standard_normal((ambient, m)))  # (ambient, m), orthonormal columns
    return Y @ q.T


def linear_subspace(n: int, d: int, ambient: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` standard Gaussian points of a random d-dimensional linear subspace of R^ambient: (point, ambient)."""
    rng = np.random.default_rng(seed)
    return _embed(rng.standard_normal((n, d)), ambient, rng)


def sphere(n: int, d: int, ambient: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` uniform points of the unit d-sphere S^d in R^(d+1), randomly rotated into R^ambient."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, d + 1))
    return _embed(y / np.linalg.norm(y, axis=1, keepdims=True), ambient, rng)


def swiss_roll(n: int, ambient: int = 64, seed: int = 0) -> np.ndarray:
    """The 2-D swiss roll (t cos t, h, t sin t), t in [1.5 pi, 4.5 pi], h in [0, 21], rotated into R^ambient."""
    return hyper_swiss_roll(n, 2, ambient, seed)


def hyper_swiss_roll(n: int, d: int, ambient: int = 64, seed: int = 0) -> np.ndarray:
    """A curved d-manifold: the swiss roll's spiral (t cos t, t sin t) times a (d-1)-cube [0, 21]^(d-1).

    d = 2 is the ordinary swiss roll. Rotated into R^ambient.
    """
    if d < 2:
        raise ValueError(f"hyper_swiss_roll needs d >= 2, got {d}")
    rng = np.random.default_rng(seed)
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    h = 21.0 * rng.random((n, d - 1))
    y = np.column_stack([t * np.cos(t), t * np.sin(t), h])  # (point, d + 1)
    return _embed(y, ambient, rng)
