"""The certified selector in the model, judged: fixed-budget rules at its bytes, and its calibration (issue 18).

The certified rule (``sparse/certified.py``) reads as many pages as its certificate needs, so the bytes it
reads are a measurement, not a setting. To compare it with the fixed-budget rules at *equal bytes read*, the
chapter first measures its share s of the key bytes (``MassLog``'s "key_bytes": the keys read plus every
candidate page's summaries, over all the keys the query sees) and then gives three fixed-budget rules the
same bytes per query at a context of n keys (``equal_bytes_rules``):

- **window only** (StreamingLLM, Xiao et al. 2024): exact selector, k = 0, a + W' = ⌊s·n⌋ keys;
- **the source's anchor + window + top-k** (Ruiz Williams 2026): W = 64 and k = ⌊s·n⌋ − a − W, the same number
  of *kept* keys (it ranks every key by its exact score, so it reads every key byte; ``key_bytes_read``);
- **Quest pages** (Tang et al. 2024): the fixed part, the min/max summary of every candidate page (2·d floats,
  two keys' worth) and r pages of P keys: (a + W) + 2·C + r·P = ⌊s·n⌋ keys, C the candidate pages, so
  r = ⌊(⌊s·n⌋ − a − W − 2·C) / P⌋ and k = r·P.

Every budget is clamped to a valid rule that can still drop a key in a block of n tokens (a + W + k ≤ n − 2,
``SparseConfig.check_block``), so a share near 1 gives rules that keep nearly every key.

``calibration`` collects every (certificate, true discarded mass) pair the certified rule logged: the
certificate is an upper bound of m by construction, so no pair may lie above the diagonal.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from atlas_core import interval
from atlas_core.sparse.attention import MassLog
from atlas_core.sparse.kept import SparseConfig

__all__ = ["EQUAL_BYTES", "SOURCE_WINDOW", "calibration", "candidate_pages", "equal_bytes_is_dense", "equal_bytes_rules", "key_bytes_estimate",
           "key_bytes_read", "pages_read_share"]

SOURCE_WINDOW = 64  # the source's window W
EQUAL_BYTES = ("window only", "anchor + window + top-k", "Quest pages")  # the names ``equal_bytes_rules`` returns
# m above the certificate by more than float rounding. The log's m is 1 − (fixed + selected mass) in float32
# (``attention._mass_parts``), whose absolute rounding grows with the context: up to 1.8e-7 on toy-llama and
# 1.5e-6 on smollm2-135m at 4,096 tokens, measured where every key is kept and the true m is exactly 0. The
# absolute tolerance is therefore that measured rounding floor, and at least 1e-6 (``calibration``).
VIOLATION_RTOL, VIOLATION_ATOL = 1e-5, 1e-6


def candidate_pages(cfg: SparseConfig, n_tokens: int) -> int:
    """Pages of ``cfg.page_size`` (aligned to absolute positions) that hold a candidate key of a query at position
    n − 1: the keys a ≤ j < n − W outside anchors and window (0 when there are none).

    Args:
        cfg: anchors a, window W, page size P; n_tokens: the keys the query sees (n).
    Returns:
        C = ⌈(n − W) / P⌉ − ⌊a / P⌋, or 0.
    """
    lo, hi = cfg.anchors, n_tokens - cfg.window
    return max(0, -(-hi // cfg.page_size) - lo // cfg.page_size) if hi > lo else 0


def key_bytes_read(cfg: SparseConfig, n_tokens: int, d_head: int) -> float:
    """Share of the key bytes a fixed-budget rule reads for a query that sees n keys (the certified rule's
    share is measured, ``key_bytes_estimate``).

    Exact top-k with k > 0 ranks every candidate by its exact score, so it reads every key (1.0), whatever it
    keeps; with k = 0 (window only) it reads a + W keys. The page selector reads the fixed keys, the 2·d-float
    min/max summary of every candidate page and its ⌈k/P⌉ pages.

    Args:
        cfg: a rule with selector "exact" or "pages"; n_tokens: n ≥ 1; d_head: floats per key (the summaries'
            2·d floats are two keys' worth whatever d is; d is taken for the units).
    Returns:
        the share in (0, 1] (pages: can exceed 1 when the summaries outweigh what they save).
    Raises:
        ValueError: another selector, or n_tokens < 1.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be ≥ 1, got {n_tokens}")
    fixed = min(cfg.anchors + cfg.window, n_tokens)
    if cfg.keeps_every_key(n_tokens):
        return 1.0
    if cfg.selector == "exact":
        return 1.0 if cfg.topk else fixed / n_tokens
    if cfg.selector == "pages":
        n_cand = n_tokens - fixed
        floats = fixed * d_head + candidate_pages(cfg, n_tokens) * 2 * d_head + min(cfg.n_pages * cfg.page_size, n_cand) * d_head
        return floats / (n_tokens * d_head)
    raise ValueError(f"key_bytes_read covers the fixed-budget selectors 'exact' and 'pages', got {cfg.selector!r} "
                     "(the certified rule's share is measured: key_bytes_estimate)")


def equal_bytes_rules(cfg_certified: SparseConfig, key_bytes_share: float, n_tokens: int, d_head: int,
                      source_window: int = SOURCE_WINDOW) -> dict[str, SparseConfig]:
    """Window only, the source's anchor + window + top-k and Quest pages at the certified rule's key bytes.

    The budget is K = ⌊s·n⌋ keys' worth of key bytes per query at a context of n keys (module docstring for
    each rule's arithmetic). Each rule keeps the certified rule's anchors, page size, dense layers and
    ``sparse_from``; each is clamped to a window ≥ 1, k ≥ 0 and a + W + k ≤ n − 2 (a block of n tokens still
    holds a position where it drops a key).

    Args:
        cfg_certified: the certified rule (its anchors a, window W for Quest's fixed part, page size P).
        key_bytes_share: its measured share s of the key bytes, in (0, 1] (summaries included; a share above 1
            is taken as 1).
        n_tokens: n, the context the share is a share of (in the chapter: the block length, a decode step's cache).
        d_head: floats per key.
        source_window: the source rule's window (64).
    Returns:
        {"window only", "anchor + window + top-k", "Quest pages"} → SparseConfig (``EQUAL_BYTES``).
    Raises:
        ValueError: a share not in (0, ∞), n_tokens too short for any rule (< a + 3), d_head < 1.
    """
    if isinstance(key_bytes_share, bool) or not isinstance(key_bytes_share, (int, float)) or not key_bytes_share > 0 \
            or not math.isfinite(key_bytes_share):
        raise ValueError(f"key_bytes_share must be a positive share of the key bytes, got {key_bytes_share!r}")
    a, size = cfg_certified.anchors, cfg_certified.page_size
    if n_tokens < a + 3:
        raise ValueError(f"n_tokens ({n_tokens}) must be at least a + 3 = {a + 3}: a block that short drops nothing")
    if d_head < 1:
        raise ValueError(f"d_head must be ≥ 1, got {d_head}")
    top = n_tokens - 2  # the largest budget a + W + k a block of n tokens still scores
    keys = min(math.floor(min(key_bytes_share, 1.0) * n_tokens), top)  # K: the budget in keys' worth of bytes
    # the fields every rule shares with the certified one; its eps, bound, rank and cap do not apply (left at
    # their defaults, so the rules at two ε of equal share are equal and run once)
    base = SparseConfig(anchors=a, window=1, topk=0, page_size=size, dense_layers=cfg_certified.dense_layers,
                        sparse_from=cfg_certified.sparse_from)
    window_only = dataclasses.replace(base, window=max(1, keys - a), topk=0)
    w = min(source_window, max(1, keys - a), top - a)
    source = dataclasses.replace(base, window=w, topk=max(0, keys - a - w))
    w_q = min(cfg_certified.window, top - a)
    quest_cfg = dataclasses.replace(base, selector="pages", window=w_q, topk=0)
    summaries = 2 * candidate_pages(quest_cfg, n_tokens)  # min and max per page: two keys' worth of floats
    pages = max(0, (keys - a - w_q - summaries) // size)
    quest = dataclasses.replace(quest_cfg, topk=min(pages * size, (top - a - w_q) // size * size))
    return dict(zip(EQUAL_BYTES, (window_only, source, quest)))


def equal_bytes_is_dense(key_bytes_share: float, n_tokens: int) -> bool:
    """Whether a fixed budget at this share of the key bytes would drop nothing: the equal-bytes comparison is
    then empty.

    ``equal_bytes_rules`` clamps every budget to a + W + k ≤ n − 2 (a block must still hold a position where a key
    is dropped). When the certified rule reads K = ⌊min(s, 1)·n⌋ ≥ n − 2 keys' worth of bytes, each fixed rule at
    that budget is dense attention except at the block's last positions, so setting it beside the certified rule
    measures nothing about budgets.

    Args:
        key_bytes_share: the certified rule's measured share s of the key bytes (> 0; above 1 with summaries).
        n_tokens: n, the context the share is a share of.
    Returns:
        True when ⌊min(s, 1)·n⌋ ≥ n − 2.
    """
    return math.floor(min(key_bytes_share, 1.0) * n_tokens) >= n_tokens - 2


def calibration(log: MassLog, eps: float) -> dict:
    """Every (certificate, true discarded mass) pair the certified rule logged, and how they stand.

    Args:
        log: the MassLog of a certified run (``teacher_forced_rules``' "log"); eps: its target.
    Returns:
        {"certificate", "discarded": (pair,) float64 arrays over layers, heads and queries (layer-major),
        "layer": (pair,) int array, "pairs": their count, "all_read": share of pairs with certificate 0 (every
        candidate page read: the kept set is the visible set, so the true m is exactly 0), "rounding_floor": the
        largest logged m among those (the float32 rounding of the log's m; 0 if none), "tolerance": the
        absolute tolerance max(1e-6, rounding_floor), "violations": pairs with m > certificate·(1 + 1e-5) +
        tolerance (must be 0), "certified_share": share of pairs with certificate ≤ eps (1 unless ``max_pages``
        capped the reading), "max_ratio": the largest m / certificate over pairs with a certificate above the
        tolerance (≤ 1 when the bound holds; NaN without any)}.
    Raises:
        ValueError: a log without certificates (not a certified run).
    """
    layers = sorted(log.certificates)
    if not layers:
        raise ValueError("calibration needs the MassLog of a certified run (selector='certified'); this one has no "
                         "certificates")
    cert = [log.certificate_values(l).double().flatten().numpy() for l in layers]
    m = [log.discarded_values(l).double().flatten().numpy() for l in layers]
    c, d = np.concatenate(cert), np.concatenate(m)
    zero = c == 0
    floor = float(d[zero].max()) if zero.any() else 0.0  # the logged m where the true m is 0: its rounding
    tol = max(VIOLATION_ATOL, floor)
    positive = c > tol  # ratios only where m's rounding cannot dominate
    return {"certificate": c, "discarded": d, "layer": np.repeat(layers, [len(x) for x in cert]), "pairs": int(c.size),
            "all_read": float(zero.mean()) if c.size else math.nan, "rounding_floor": floor, "tolerance": tol,
            "violations": int((d > c * (1 + VIOLATION_RTOL) + tol).sum()),
            # the log holds certificates in float32: compare with eps rounded the same way (rounding is monotone)
            "certified_share": float((c <= float(np.float32(eps))).mean()) if c.size else math.nan,
            "max_ratio": float((d[positive] / c[positive]).max()) if positive.any() else math.nan}


def key_bytes_estimate(log: MassLog) -> interval.Estimate:
    """Mean share of the key bytes the certified rule read, with its 95% block-bootstrap interval.

    Per forward call (one teacher-forced block), each counted query's share averaged over heads, then over the
    sparse layers; blocks are the resampling unit (``interval.mean``).

    Args:
        log: a certified run's MassLog (one forward call per block in every sparse layer).
    Raises:
        ValueError: no "key_bytes" logged, or layers with different numbers of calls.
    """
    logged = log.per_query.get("key_bytes", {})
    if not logged:
        raise ValueError("key_bytes_estimate needs the MassLog of a certified run; this one logged no key bytes")
    calls = {len(v) for v in logged.values()}
    if len(calls) != 1:
        raise ValueError(f"key_bytes_estimate: layers logged {sorted(calls)} calls; expected one per block in each")
    layers = sorted(logged)
    per_block = [torch.stack([logged[l][b] for l in layers]).mean(0) for b in range(calls.pop())]  # (query,) each
    return interval.mean(per_block)


def pages_read_share(log: MassLog) -> float:
    """Share of the candidate pages the certified rule read, pooled over sparse layers, heads and queries.

    Args:
        log: a certified run's MassLog (its per-(layer, head) means of "pages_read" and "candidate_pages").
    Returns:
        Σ pages read / Σ candidate pages of the (layer, head) means, in [0, 1] (each (layer, head) counts the
        same queries, so this is the pooled share).
    Raises:
        ValueError: no pages logged (not a certified run).
    """
    means = log.means()
    if "pages_read" not in means:
        raise ValueError("pages_read_share needs the MassLog of a certified run; this one logged no pages")
    return float(means["pages_read"].double().sum() / means["candidate_pages"].double().sum().clamp_min(1))
