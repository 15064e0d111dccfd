"""Reading a greedy continuation segment by segment, and a decode kernel's bytes per second.

A rule's *step agreement* over a long continuation mixes two regimes: the first steps, where the dense
continuation is ordinary text, and later steps, where a small model's greedy continuation often falls into a
loop that any rule reproduces easily. ``segment_agreement`` reports the agreement of each stretch of steps
apart, and ``repeated_ngram_share`` says how repetitive the continuation is in each stretch. ``gb_per_s`` turns
a benchmark's bytes and seconds into the bandwidth a kernel achieved, which explains why a measured speed-up
can exceed the ratio of bytes read (``speedup_gap``).
"""

from __future__ import annotations

import math

import numpy as np


def segments(n_steps: int, cuts) -> list[tuple[int, int]]:
    """Consecutive [start, end) stretches of ``n_steps`` steps cut at ``cuts``.

    Args:
        n_steps: the steps of the whole continuation (≥ 1).
        cuts: the steps where a new segment starts, increasing, each in (0, n_steps); others are dropped.
    Returns:
        [(0, c1), (c1, c2), …, (ck, n_steps)].
    Raises:
        ValueError: n_steps < 1 or cuts not increasing.
    """
    if n_steps < 1:
        raise ValueError(f"a continuation needs at least 1 step, got {n_steps}")
    cuts = [int(c) for c in cuts]
    if cuts != sorted(set(cuts)):
        raise ValueError(f"segment cuts must be strictly increasing, got {cuts}")
    inner = [c for c in cuts if 0 < c < n_steps]
    edges = [0, *inner, n_steps]
    return list(zip(edges[:-1], edges[1:]))


def segment_agreement(matches, bounds: list[tuple[int, int]]) -> list[float]:
    """The step agreement of each segment: the share of its steps where the rule's greedy choice is the dense token.

    Args:
        matches: (step,) booleans, True where the rule chose the dense token (``trajectory_agreement``'s
            "matches"); it may be shorter than the segments (a rule checked over fewer steps).
        bounds: [start, end) segments (``segments``).
    Returns:
        one share in [0, 1] per segment; NaN for a segment the rule was not checked over entirely (a
        segment reaching past ``len(matches)``), so a partly measured stretch is never reported as whole.
    """
    m = np.asarray(matches, dtype=bool).reshape(-1)
    return [float(m[a:b].mean()) if b <= m.size and b > a else math.nan for a, b in bounds]


def repeated_ngram_share(tokens, n: int = 4) -> float:
    """The share of repeated n-grams in a token sequence: 1 − (distinct n-grams) / (all n-grams).

    Every window of ``n`` consecutive tokens is one n-gram (a sequence of L tokens has L − n + 1). Text that
    never repeats a phrase of ``n`` tokens scores 0; a continuation stuck in a loop of period p scores close
    to 1 (only its first p n-grams are new).

    Args:
        tokens: (token,) integer ids (a list, array or tensor).
        n: the n-gram length (≥ 1).
    Returns:
        the share in [0, 1); NaN when the sequence is shorter than ``n`` (no n-gram).
    Raises:
        ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"n-gram length must be at least 1, got {n}")
    t = [int(x) for x in np.asarray(tokens).reshape(-1)]
    grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
    if not grams:
        return math.nan
    return 1.0 - len(set(grams)) / len(grams)


def segment_repetition(tokens, bounds: list[tuple[int, int]], n: int = 4) -> list[float]:
    """``repeated_ngram_share`` of each [start, end) segment of ``tokens`` (n-grams inside the segment only);
    NaN for a segment that reaches past the tokens or holds fewer than ``n`` of them."""
    t = np.asarray(tokens).reshape(-1)
    return [repeated_ngram_share(t[a:b], n) if b <= t.size else math.nan for a, b in bounds]


def gb_per_s(n_bytes: float, seconds: float) -> float:
    """The bandwidth a kernel achieved: bytes it must read / its time, in GB/s (10⁹ bytes per second).

    Raises:
        ValueError: seconds not positive.
    """
    if not seconds > 0:
        raise ValueError(f"a time must be positive, got {seconds!r}")
    return n_bytes / seconds / 1e9


def speedup_gap(row: dict, kernel: str) -> dict:
    """Why a measured speed-up differs from the ratio of bytes read, from one benchmark row.

    speed-up = (dense s / kernel s) = (dense bytes / kernel bytes) × (kernel GB/s / dense GB/s), an identity: a
    speed-up above the bytes ratio means the sparse kernel streams its bytes faster than dense does.

    Args:
        row: a row of ``bench.bench_sparse_decode`` (``dense_s``, ``dense_bytes``, ``<kernel>_s``,
            ``<kernel>_bytes``).
        kernel: "topk" or "pages".
    Returns:
        {"speedup", "bytes_ratio", "dense_gbps", "kernel_gbps", "bandwidth_ratio"} with
        speedup == bytes_ratio × bandwidth_ratio.
    """
    dense = gb_per_s(row["dense_bytes"], row["dense_s"])
    own = gb_per_s(row[f"{kernel}_bytes"], row[f"{kernel}_s"])
    return {"speedup": row["dense_s"] / row[f"{kernel}_s"], "bytes_ratio": row["dense_bytes"] / row[f"{kernel}_bytes"],
            "dense_gbps": dense, "kernel_gbps": own, "bandwidth_ratio": own / dense}
