"""Intrinsic dimension of point clouds: TwoNN, the source work's variant, MLE, GRIDE, layer profiles.

Every estimator takes a cloud ``X`` of shape ``(point, feature)`` (a NumPy array or a CPU tensor; it is
cast to float64) and works from nearest-neighbour distances (``knn_distances``).

- ``twonn``: Facco et al. 2017, the line through the origin of -log(1 - F(mu)) against log mu,
  mu = r2/r1, with the largest 10% of mu left out of the fit. This is the estimator to quote (its
  finite-sample bias at high d is in its docstring).
- ``twonn_source``: the source work's variant, d = n_kept / sum(log mu) after dropping the largest 10%
  of log mu. Biased upward (x1.34 for large N); here only to reproduce their numbers.
- ``mle_levina_bickel``: Levina & Bickel 2005 with the MacKay-Ghahramani pooling.
- ``gride_curve``: GRIDE (Denti et al. 2022) at neighbour orders n -> 2n, to show scale dependence.
- ``layer_profile``: d_int against relative depth, with peak and plateau (Valeriani et al. 2023).
- ``linear_subspace``, ``sphere``, ``swiss_roll``, ``hyper_swiss_roll``: seeded manifolds of known
  dimension, rotated into ``ambient`` dimensions, for validation.

Duplicates. A point at zero distance from its nearest neighbour has no ratio mu; such points are dropped
and counted in a ``DuplicatePointsWarning`` (real clouds have them: every block's first token, say).
Nothing divides by zero.
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


class DuplicatePointsWarning(UserWarning):
    """Points at zero distance from a needed neighbour were dropped from an estimate."""


# --------------------------------------------------------------------------- nearest neighbours


def _as_cloud(X, min_points: int) -> np.ndarray:
    """Return ``X`` as a finite float64 array ``(point, feature)`` with at least ``min_points`` rows."""
    if hasattr(X, "detach"):  # a torch tensor
        X = X.detach().cpu().double().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected a cloud of shape (point, feature), got shape {X.shape}")
    if len(X) < min_points:
        raise ValueError(f"need at least {min_points} points, got {len(X)}")
    if not np.isfinite(X).all():
        raise ValueError("the cloud holds NaN or infinite values")
    return X


def knn_distances(X, k: int) -> np.ndarray:
    """Sorted Euclidean distances from each point to its ``k`` nearest other points: ``(point, k)``.

    Exact brute force in row chunks (faster than a k-d tree for N ~ 1,000-4,000 in 64-256 dimensions).
    Candidates are chosen from the Gram-matrix expansion, then their distances are recomputed from the
    coordinate differences, so a duplicate point sits at exactly 0. A point is never its own neighbour,
    but its duplicates are.
    """
    X = _as_cloud(X, k + 1)
    n = len(X)
    sq = np.einsum("pf,pf->p", X, X)  # (point,)
    out = np.empty((n, k))
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = X[start:stop]  # (chunk, feature)
        d2 = block @ X.T  # (chunk, point): squared distances, built in place
        d2 *= -2.0
        d2 += sq[None, :]
        d2 += sq[start:stop, None]
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        idx = np.argpartition(d2, k - 1, axis=1)[:, :k]  # (chunk, k), unsorted
        exact = np.linalg.norm(X[idx] - block[:, None, :], axis=2)  # (chunk, k)
        out[start:stop] = np.sort(exact, axis=1)
    return out


def _drop_zero(r: np.ndarray, column: int, who: str) -> np.ndarray:
    """Rows of ``r`` whose ``column``-th neighbour distance is positive; warn with the count dropped."""
    keep = r[:, column] > 0
    n_drop = int((~keep).sum())
    if n_drop:
        warnings.warn(
            f"{who}: dropped {n_drop} of {len(r)} points at zero distance from neighbour "
            f"{column + 1} (duplicate points)",
            DuplicatePointsWarning,
            stacklevel=3,
        )
    return r[keep]


def _twonn_log_mu(X) -> np.ndarray:
    """log(r2/r1) per point, duplicates dropped: ``(point,)``."""
    r = _drop_zero(knn_distances(X, 2), 0, "twonn")
    if len(r) < 3:
        raise ValueError("fewer than 3 points left after dropping duplicates")
    return np.log(r[:, 1] / r[:, 0])


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
    """
    return _twonn_line(_twonn_log_mu(X), discard_fraction)


def _twonn_line(log_mu: np.ndarray, discard_fraction: float = DISCARD_FRACTION) -> float:
    """The TwoNN line fit from log(r2/r1) per point (any order)."""
    if not 0 <= discard_fraction < 1:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    log_mu = np.sort(log_mu)
    n = len(log_mu)
    n_keep = int(n * (1 - discard_fraction))
    if n_keep < 2:
        raise ValueError("fewer than 2 ratios left to fit")
    x = log_mu[:n_keep]
    y = -np.log1p(-np.arange(1, n_keep + 1) / n)  # -log(1 - F), F_i = i/N
    return float(x @ y / (x @ x))


def twonn_source(X, discard_fraction: float = DISCARD_FRACTION) -> float:
    """The SOURCE WORK's TwoNN variant, kept only to reproduce its numbers. Biased: do not quote as d_int.

    Drop the largest ``discard_fraction`` of log mu (keep the ``int(N (1 - f))`` smallest), then
    d = n_kept / sum(log mu). log mu is exponential with rate d, and the mean of its lower 90% is
    (1 - q e^{-q} / (1 - e^{-q})) / d = 0.744 / d with q = ln 10, so this overestimates d by x1.34 for
    large N (the truncation is not accounted for).
    """
    return _twonn_source_fit(_twonn_log_mu(X), discard_fraction)


def _twonn_source_fit(log_mu: np.ndarray, discard_fraction: float = DISCARD_FRACTION) -> float:
    """The source variant from log(r2/r1) per point (any order)."""
    if not 0 <= discard_fraction < 1:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    log_mu = np.sort(log_mu)
    n_keep = int(len(log_mu) * (1 - discard_fraction))
    if n_keep < 1:
        raise ValueError("no ratios left to fit")
    return float(n_keep / log_mu[:n_keep].sum())


def mle_levina_bickel(X, k: int = 20) -> float:
    """Levina & Bickel (2005) maximum likelihood, pooled as MacKay & Ghahramani (2005) advise.

    Per point, with T_j its distance to the j-th neighbour, the inverse estimate is
    1/m(x) = (1/(k-1)) sum_{j<k} log(T_k/T_j). The global estimate is the inverse of the mean of these
    inverses (not the mean of the per-point m(x), which is biased upward). This equals
    scikit-dimension's ``MLE().fit(X, n_neighbors=k, comb='mle')``.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    r = _drop_zero(knn_distances(X, k), 0, "mle")
    if len(r) == 0:
        raise ValueError("no points left after dropping duplicates")
    inv = np.log(r[:, -1:] / r[:, :-1]).mean(axis=1)  # (point,): 1/m(x)
    return float(1.0 / inv.mean())


def _gride_mle(log_mu: np.ndarray, n1: int, n2: int) -> float:
    """GRIDE estimate of d from log(r_{n2}/r_{n1}) per point (Denti et al. 2022, eq. for the ratio law).

    The ratio mu = r_{n2}/r_{n1} has density f(mu) = d (mu^d - 1)^{n2-n1-1} / (B(n2-n1, n1) mu^{(n2-1)d+1}).
    Its log-likelihood, up to a constant, is
        N log d + (n2-n1-1) sum log(1 - mu^-d) - n1 d sum log mu,
    and the score N/d + (n2-n1-1) sum log mu / (mu^d - 1) - n1 sum log mu decreases in d, so its root is
    the unique maximum. As in DADApy (``utils_._loglik``), N is replaced by N - 1 in the score, which at
    n1 = 1, n2 = 2 gives the unbiased (N - 1) / sum log mu; the plain MLE differs by O(1/N).
    """
    n = len(log_mu)
    s = log_mu.sum()

    tied = log_mu == 0  # r_{n2} = r_{n1} (duplicate neighbours): log mu / (mu^d - 1) -> 1/d

    def score(d: float) -> float:
        ratio = np.divide(log_mu, np.expm1(d * log_mu), out=np.full_like(log_mu, 1 / d), where=~tied)
        return (n - 1) / d + (n2 - n1 - 1) * ratio.sum() - n1 * s

    lo, hi = 1e-3, 1.0
    while score(hi) > 0:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError("GRIDE: no root of the score below d = 1e6")
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


def gride_curve(X, orders: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> list[tuple[float, float]]:
    """GRIDE scale curve: for each order n, the MLE of d from mu = r_{2n}/r_n, at scale mean(r_{2n}).

    Returns ``[(scale, d), ...]`` in the order of ``orders``. n = 1 is the TwoNN ratio (its MLE form).
    Points with r_n = 0 are dropped at that order.
    """
    orders = [int(n) for n in orders]
    if not orders or min(orders) < 1:
        raise ValueError(f"orders must be positive integers, got {orders}")
    r = knn_distances(X, 2 * max(orders))  # (point, 2 max n); column j is neighbour j + 1
    curve = []
    for n1 in orders:
        rn = _drop_zero(r, n1 - 1, f"gride (n={n1})")
        log_mu = np.log(rn[:, 2 * n1 - 1] / rn[:, n1 - 1])
        curve.append((float(r[:, 2 * n1 - 1].mean()), _gride_mle(log_mu, n1, 2 * n1)))
    return curve


_DISPATCH: dict[str, Callable[..., float]] = {
    "twonn": twonn,
    "twonn-source": twonn_source,
    "mle": mle_levina_bickel,
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
    ``(point, d_head)`` clouds. Returns ``(head,)``."""
    return np.array([estimate(c, estimator, **kwargs) for c in clouds], dtype=np.float64)


# --------------------------------------------------------------------------- depth profile


def layer_profile(values_by_layer: dict[int, float], n_layers: int) -> dict:
    """d_int against relative depth layer / (n_layers - 1), with its peak and plateau.

    ``peak`` is the largest value and ``peak_layer``/``peak_depth`` where it is (first one on ties);
    ``plateau`` is the value at relative depth 0.9, linearly interpolated between the two measured layers
    around it, and NaN when 0.9 lies outside the measured depths (no extrapolation).
    """
    if n_layers < 2:
        raise ValueError(f"n_layers must be at least 2, got {n_layers}")
    if not values_by_layer:
        raise ValueError("no layers given")
    layers = sorted(int(l) for l in values_by_layer)
    if layers[0] < 0 or layers[-1] > n_layers - 1:
        raise ValueError(f"layers must lie in [0, {n_layers - 1}], got {layers}")
    values = np.array([float(values_by_layer[l]) for l in layers])
    if not np.isfinite(values).all():
        raise ValueError("layer values must be finite")
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
