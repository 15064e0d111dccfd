"""Verdicts of the kvquant chapter that combine several runs, each part worded by the book's one decision rule
(``atlas_core.claims``: ``headq_range`` judges one rank's excess removed against the paper's 84–94%).
"""

from __future__ import annotations

from dataclasses import dataclass

from atlas_core import claims
from atlas_core.glue import listing
from atlas_core.interval import Estimate


@dataclass(frozen=True, kw_only=True)
class RankResult:
    """One HeadQ rank of the 2-bit K-only sweep.

    Attributes:
        rank: the side code's rank r.
        bits_key: stored bits per key element, measured from the cache's bytes.
        excess: (PPL_per-token − PPL)/(PPL_per-token − PPL_fp) with its 95% interval.
        difference: PPL − PPL_per-token on the same blocks, with its 95% interval.
    """

    rank: int
    bits_key: float
    excess: Estimate
    difference: Estimate


def headq_ranks(results: list[RankResult], headline: int) -> claims.Verdict:
    """HeadQ against the paper's 84–94% at every rank swept, each beside its storage cost, the headline rank first.

    Each rank is judged by ``claims.headq_range`` (the decision rule on the paired difference to per-token keys,
    then the excess-removed interval against the range); ranks with the same outcome are worded together, in rank
    order, e.g. "below the paper's 84–94% at rank 8 (3.250 bits per key element); consistent with the paper's
    84–94% at ranks 16 and 32 (4.500 and 5.500 bits per key element)".

    Args:
        results: one ``RankResult`` per rank (any order, ranks distinct).
        headline: the rank of the chapter's headline; its outcome is worded first.
    Returns:
        ``Verdict``: label "reached" when some rank is consistent with or above the range, else "below" when
        some rank is below it, else ``claims.TIE`` when some rank is not distinguishable from per-token keys, else
        "undefined"; text as above; figures {"by_rank":
        {rank: Verdict}, "bits": {rank: bits per key element}}.
    Raises:
        ValueError: no results, repeated ranks, or ``headline`` not among them.

    A rank whose share is undefined (per-token keys have no excess over fp: NaN) is "not comparable with the
    paper's 84–94%", label "undefined", rather than placed against the range.
    """
    ranks = [r.rank for r in results]
    if not results or len(set(ranks)) != len(ranks):
        raise ValueError(f"headq_ranks needs distinct ranks, got {ranks}")
    if headline not in ranks:
        raise ValueError(f"the headline rank {headline} is not among the ranks swept {sorted(ranks)}")
    ordered = sorted(results, key=lambda r: r.rank)
    by_rank = {r.rank: _judged(r) for r in ordered}
    groups: dict[str, list[RankResult]] = {}
    first = by_rank[headline].text
    for text in [first] + [by_rank[r.rank].text for r in ordered]:
        groups.setdefault(text, [])
    for r in ordered:
        groups[by_rank[r.rank].text].append(r)
    parts = []
    for text, members in groups.items():
        noun = "rank" if len(members) == 1 else "ranks"
        bits = listing(f"{m.bits_key:.3f}" for m in members)
        parts.append(f"{text} at {noun} {listing(m.rank for m in members)} ({bits} bits per key element)")
    labels = {v.label for v in by_rank.values()}
    label = ("reached" if labels & {"consistent", "above"} else "below" if "below" in labels
             else claims.TIE if claims.TIE in labels else "undefined")
    return claims.Verdict(label=label, text="; ".join(parts),
                          figures={"by_rank": by_rank, "bits": {r.rank: r.bits_key for r in ordered}})


def _judged(r: RankResult) -> claims.Verdict:
    """``claims.headq_range`` of one rank, or "not comparable" when its excess-removed share is undefined."""
    if r.excess.value != r.excess.value:  # NaN: the baseline has no excess over fp to remove
        low, high = claims.source("headq_removed")
        reported = f"the paper's {low:.0%}–{high:.0%}".replace("%–", "–")
        return claims.Verdict(label="undefined", figures={"excess": r.excess, "difference": r.difference},
                              text=f"not comparable with {reported} (per-token keys have no excess over fp to remove)")
    return claims.headq_range(r.excess, r.difference)
