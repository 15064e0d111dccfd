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
