"""kvquant.verdicts: HeadQ's rank sweep judged against the paper's 84–94% by the one decision rule, each rank
beside its storage cost."""

from __future__ import annotations

import pytest

from atlas_core import claims
from atlas_core.interval import Estimate
from atlas_core.kvquant.verdicts import RankResult, headq_ranks


def est(value, lo, hi):
    return Estimate(value=value, lo=lo, hi=hi, units=32)


LOWER = est(-1.0, -2.0, -0.5)  # clearly below per-token keys
SAME = est(-0.1, -0.5, 0.3)  # the interval holds 0


def sweep(*specs):
    return [RankResult(rank=r, bits_key=b, excess=e, difference=d) for r, b, e, d in specs]


def test_rank_8_below_and_higher_ranks_within_the_range_are_both_said_with_their_bits():
    results = sweep((32, 5.5, est(0.934, 0.90, 0.96), LOWER), (8, 3.25, est(0.70, 0.65, 0.76), LOWER),
                    (16, 4.5, est(0.875, 0.84, 0.91), LOWER), (1, 2.375, est(0.2, 0.1, 0.3), LOWER))
    v = headq_ranks(results, headline=8)
    assert v.text == ("below the paper's 84–94% at ranks 1 and 8 (2.375 and 3.250 bits per key element); "
                      "consistent with the paper's 84–94% at ranks 16 and 32 (4.500 and 5.500 bits per key element)")
    assert v.label == "reached"
    assert v.figures["by_rank"][8].label == "below" and v.figures["by_rank"][16].label == "consistent"
    assert v.figures["bits"] == {1: 2.375, 8: 3.25, 16: 4.5, 32: 5.5}


def test_headline_outcome_comes_first_and_ties_follow_the_rule():
    results = sweep((1, 2.4, est(0.1, -0.3, 0.5), SAME), (8, 3.25, est(0.97, 0.95, 0.99), LOWER))
    v = headq_ranks(results, headline=8)
    assert v.text.startswith("above the paper's 84–94% at rank 8 (3.250 bits per key element); ")
    assert v.text.endswith(f"{claims.TIE.replace('not distinguishable', 'not distinguishable from its baseline')}"
                           " at rank 1 (2.400 bits per key element)")
    assert v.label == "reached"


def test_labels_below_and_tie():
    assert headq_ranks(sweep((8, 3.25, est(0.5, 0.4, 0.6), LOWER)), headline=8).label == "below"
    assert headq_ranks(sweep((8, 3.25, est(0.5, -0.4, 0.9), SAME)), headline=8).label == claims.TIE


def test_bad_input():
    with pytest.raises(ValueError, match="distinct ranks"):
        headq_ranks([], headline=8)
    with pytest.raises(ValueError, match="distinct ranks"):
        headq_ranks(sweep((8, 3.0, SAME, SAME), (8, 3.0, SAME, SAME)), headline=8)
    with pytest.raises(ValueError, match="headline rank 4"):
        headq_ranks(sweep((8, 3.0, SAME, SAME)), headline=4)


def test_an_undefined_share_is_not_placed_against_the_range():
    nan = float("nan")
    v = headq_ranks(sweep((8, 3.25, est(nan, nan, nan), LOWER), (16, 4.5, est(0.9, 0.86, 0.93), LOWER)), headline=8)
    assert v.text.startswith("not comparable with the paper's 84–94% (per-token keys have no excess over fp to remove) "
                             "at rank 8 (3.250 bits per key element); consistent with")
    assert v.figures["by_rank"][8].label == "undefined" and v.label == "reached"
    assert headq_ranks(sweep((8, 3.25, est(nan, nan, nan), LOWER)), headline=8).label == "undefined"
    assert headq_ranks(sweep((8, 3.25, est(nan, nan, nan), LOWER), (1, 2.4, est(0.1, -0.3, 0.5), SAME)),
                       headline=8).label == claims.TIE
