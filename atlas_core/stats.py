"""Spearman rank correlation with permutation p-values, per group (layer) and pooled.

Pooling caution. Pooling heads across layers can create a correlation that no single layer has: if
both variables drift with depth (deeper layers having, say, higher d_int and lower overlap), the pooled
ranks correlate through the layer effect alone, even when rho is 0 within every layer (Simpson's
paradox). ``spearman_by_group`` therefore returns each group beside ``"pooled"``; report both.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

N_PERM = 20_000  # shuffles per test (SPEC §7)
_BATCH_ELEMENTS = 2**20  # permuted ranks held at once: batch x n


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Return ``x`` and ``y`` as equal-length float vectors without NaN, or raise ``ValueError``."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} and {y.size}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError(
            f"NaN in input ({int(np.isnan(x).sum())} in x, {int(np.isnan(y).sum())} in y); "
            "drop or impute missing values before calling spearman_perm"
        )
    if x.size < 3:
        raise ValueError(f"need at least 3 pairs, got {x.size}")
    return x, y


def spearman_perm(x, y, n_perm: int = N_PERM, seed: int = 0) -> tuple[float, float, int]:
    """Spearman's rho and its two-sided permutation p-value: ``(rho, p, n)``.

    rho is Pearson's correlation of the ranks (average ranks for ties), equal to
    ``scipy.stats.spearmanr``. The null shuffles the ranks of ``y`` against those of ``x`` ``n_perm``
    times (a NumPy ``Generator`` seeded with ``seed``, so the result is deterministic), and
    p = (1 + #{|rho_perm| >= |rho|}) / (1 + n_perm), never 0. If either variable is constant rho is
    undefined and ``(nan, nan, n)`` is returned.
    """
    x, y = _pairs(x, y)
    n = x.size
    if n_perm < 1:
        raise ValueError(f"n_perm must be positive, got {n_perm}")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    norm = np.sqrt((rx @ rx) * (ry @ ry))
    if norm == 0:
        return float("nan"), float("nan"), n
    observed = rx @ ry
    rho = float(np.clip(observed / norm, -1.0, 1.0))
    # Centred (average) ranks are multiples of 1/2, so these dot products are exact multiples of 1/4:
    # compare numerators, with a margin far below 1/4, so permutations tying the observed value count.
    threshold = abs(observed) - 1e-6
    rng = np.random.default_rng(seed)
    batch = max(1, _BATCH_ELEMENTS // n)
    hits = 0
    for start in range(0, n_perm, batch):
        size = min(batch, n_perm - start)
        shuffled = rng.permuted(np.broadcast_to(ry, (size, n)), axis=1)  # (perm, n)
        hits += int((np.abs(shuffled @ rx) >= threshold).sum())
    return rho, (hits + 1) / (n_perm + 1), n


def spearman_by_group(x, y, groups, n_perm: int = N_PERM, seed: int = 0) -> dict:
    """``spearman_perm`` within each group (a layer, say) and over all pairs together.

    Returns ``{group: (rho, p, n), ..., "pooled": (rho, p, n)}`` with groups in sorted order; each test
    uses the same ``seed``. Groups with fewer than 3 pairs get ``(nan, nan, n)``. See the module note on
    why the pooled value can differ in kind from every per-group one.
    """
    x, y = _pairs(x, y)
    groups = np.asarray(groups).ravel()
    if groups.shape != x.shape:
        raise ValueError(f"groups has {groups.size} labels for {x.size} pairs")
    out: dict = {}
    for g in np.unique(groups):
        key = g.item() if hasattr(g, "item") else g
        if key == "pooled":
            raise ValueError('"pooled" is reserved; rename that group')
        m = groups == g
        out[key] = (spearman_perm(x[m], y[m], n_perm, seed) if m.sum() >= 3
                    else (float("nan"), float("nan"), int(m.sum())))
    out["pooled"] = spearman_perm(x, y, n_perm, seed)
    return out


def spearman_rows(x, ys) -> np.ndarray:
    """Spearman's rho of one vector against every row of a matrix, at once (no p-value).

    Fast path for the many draws of a null (``spearman_null``); ``spearman_perm``'s rho is the
    reference (``tests/test_stats.py`` holds them equal). Average ranks for ties; a constant row gives NaN.

    Args:
        x: (n,)
        ys: (draw, n)
    Returns:
        (draw,) rho of x against each row
    Raises:
        ValueError: ys is not (draw, n) for the n of x, or n < 3
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(ys, dtype=np.float64)
    if ys.ndim != 2 or ys.shape[1] != x.size or x.size < 3:
        raise ValueError(f"spearman_rows needs x (n,) with n >= 3 and ys (draw, n); got {x.shape} and {ys.shape}")
    centre = (x.size + 1) / 2  # the mean of ranks 1..n, with or without ties
    rx = rankdata(x) - centre  # (n,)
    ry = rankdata(ys, axis=1) - centre  # (draw, n)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant row: 0 / 0 = NaN, rho undefined
        return ry @ rx / np.sqrt((rx @ rx) * (ry * ry).sum(1))


def spearman_null(x, null_y, groups, n_perm: int = N_PERM, seed: int = 0) -> dict:
    """Spearman's rho of ``x`` against null draws of ``y``, per group and pooled.

    The null of a per-head correlation (d_int against mean overlap) keeps the real ``x`` and replaces
    ``y`` by draws made under the null, e.g. Haar-random frames (``geometry.haar_head_overlaps``). The
    first draw gets the full test (``spearman_by_group``, with its permutation p-value), every draw its
    rho (``spearman_rows``), whose spread shows how large a correlation chance gives at this many heads.

    Args:
        x: (n,) the real values (d_int per head, say)
        null_y: (draw, n) null draws of y
        groups: (n,) group (layer) of each pair
    Returns:
        {"first": spearman_by_group(x, null_y[0], groups), "rho": {group: (draw,), ..., "pooled": (draw,)}}
    Raises:
        ValueError: no draw, or shapes that do not match
    """
    null_y = np.asarray(null_y, dtype=np.float64)
    if null_y.ndim != 2 or len(null_y) == 0:
        raise ValueError(f"null_y must be (draw, n) with at least one draw, got shape {null_y.shape}")
    x, first = _pairs(x, null_y[0])
    groups = np.asarray(groups).ravel()
    if groups.shape != x.shape:
        raise ValueError(f"groups has {groups.size} labels for {x.size} pairs")
    rho = {"pooled": spearman_rows(x, null_y)}
    rho.update({(g.item() if hasattr(g, "item") else g): spearman_rows(x[groups == g], null_y[:, groups == g])
                for g in np.unique(groups)})
    return {"first": spearman_by_group(x, first, groups, n_perm, seed), "rho": rho}


def null_r2(observed, null) -> dict:
    """How much of the variance of a measured value a null accounts for, with no fitted parameter.

    R² = 1 − Σ (y − null)² / Σ (y − ȳ)²: 1 when every value sits on its null, 0 when the null does no better
    than the mean, negative when worse. Nothing is fitted (no slope, no intercept), so this is not a
    regression's R².

    Args:
        observed: (point,) measured values (O_h at each (model, k), say)
        null: (point,) the null's value at the same points
    Returns:
        {"r2", "max_abs_dev": max |y − null|, "n": points}; both NaN below 2 points, r2 NaN for a constant y
    Raises:
        ValueError: lengths differ or a value is not finite
    """
    y = np.asarray(observed, dtype=np.float64).ravel()
    m = np.asarray(null, dtype=np.float64).ravel()
    if y.shape != m.shape:
        raise ValueError(f"observed and null differ in length: {y.size} and {m.size}")
    if not (np.isfinite(y).all() and np.isfinite(m).all()):
        raise ValueError("observed and null must be finite")
    if y.size < 2:
        return {"r2": float("nan"), "max_abs_dev": float("nan"), "n": int(y.size)}
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1 - ((y - m) ** 2).sum() / total if total > 0 else float("nan")  # constant y: no variance to explain
    return {"r2": float(r2), "max_abs_dev": float(np.abs(y - m).max()), "n": int(y.size)}
