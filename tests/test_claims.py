"""The claims table and every verdict: both sides of each threshold, and the tie branch of each interval."""

import math

import numpy as np
import pytest
import torch

from atlas_core import claims, interval
from atlas_core.claims import TIE, Estimate


def est(value, lo, hi, units=8):
    return Estimate(value, lo, hi, units)


# ----------------------------------------------------------------------------- the table


def test_every_source_number_names_its_work_and_place():
    for name, s in claims.SOURCE.items():
        assert s.work in claims.WORKS and s.where and s.what, name
        if s.ci is not None:
            assert s.ci[0] <= s.value <= s.ci[1], name
    with pytest.raises(KeyError, match="no source number 'nope'"):
        claims.source("nope")
    with pytest.raises(ValueError, match="Source.work"):
        claims.Source(value=1.0, what="x", work="elsewhere", where="y")


def test_source_points_are_the_published_o_h_values():
    points = claims.source_points()
    assert len(points) == 7 + 7 + 4
    plain = [p[:4] for p in points]
    assert ("GPT-2 124M", 64, 4, 0.210) in plain and ("GPT-2 124M", 64, 10, 0.340) in plain
    assert ("Llama-3.1-8B", 128, 11, 0.248) in plain and ("from scratch, d_head 256", 256, 7, 0.14) in plain
    by = {(p.label, p.k): p.ci for p in points}
    assert by["Qwen2.5-0.5B", 7] == (0.285, 0.298) and by["GPT-2 124M", 7] == (0.276, 0.292)  # the source's own
    assert by["GPT-2 124M", 5] is None and by["from scratch, d_head 64", 7] is None  # none published


def test_the_revisions_archived_runs_give_its_published_summary():
    """The revision's own figures: 0 of 60 runs identical through 128 tokens, median first divergence 6, max 43."""
    from atlas_core.sparse.fidelity import survival_summary

    horizon = claims.source("revision_horizon")
    per_support = [d for _, d in claims.source("revision_first_divergence")]
    rows = [[None if d >= horizon else d for d in prefix] for prefix in zip(*per_support)]
    rev = survival_summary(rows, horizon)
    assert (rev["runs"], rev["median"], rev["identical"], rev["max"]) == (60, 6, 0, 43)


def test_direction_reads_the_interval_not_the_point():
    assert claims.direction(est(0.9, 0.8, 0.95), 1.0) == "lower"
    assert claims.direction(est(1.1, 1.05, 1.2), 1.0) == "higher"
    assert claims.direction(est(0.9, 0.8, 1.01), 1.0) == TIE
    assert claims.direction(est(math.nan, math.nan, math.nan), 0.0) == TIE


# ----------------------------------------------------------------------------- crossarch


def test_o_h_reproduced_by_the_rule_against_the_source_and_the_null():
    close = claims.o_h_reproduced(0.291, 0.295, (0.289, 0.299), est(0.0075, -0.005, 0.020), z=1.5)
    assert close.label == "reproduced"  # [−0.002, +0.008] inside ±0.01
    assert close.text == "reproduced; is not distinguishable from the null, +0.007 [-0.005, +0.020] (z-score 1.5)"
    higher = claims.o_h_reproduced(0.291, 0.305, (0.302, 0.308), est(0.008, 0.002, 0.014), z=2.7)
    assert higher.label == "differs" and higher.text.startswith("differs (higher); lies above the null, +0.008")
    wide = claims.o_h_reproduced(0.291, 0.311, (0.28, 0.342), est(0.0, -0.03, 0.03), z=1.0)
    assert wide.label == "not distinguishable"  # holds the source value, wider than the margin
    at_null = claims.o_h_reproduced(0.291, 0.29, (0.285, 0.295), est(0.001, -0.006, 0.008), z=0.5)
    assert "is equivalent, within ±0.01, to the null" in at_null.text


def test_intra_and_spearman_against_the_source():
    assert claims.intra_reproduced(0.49).label == "reproduced"
    assert claims.intra_reproduced(0.50).label == "differs"
    assert claims.intra_reproduced(0.49, (0.47, 0.51)).label == "not distinguishable"  # wider than ±0.01
    assert claims.intra_reproduced(0.485, (0.479, 0.49)).text == "reproduced (source 0.482)"
    assert claims.spearman_replicates(-0.4, 0.01).text == "replicates here: ρ < 0 with p < 0.05"
    assert claims.spearman_replicates(-0.4, 0.05).label == "not reproduced"  # p must be below α
    assert claims.spearman_replicates(0.4, 0.001).text == "does not replicate here"


def test_intra_above_null_needs_every_model():
    assert claims.intra_above_null([]).text == "no model in this run has heads that share a KV head"
    assert claims.intra_above_null([est(0.10, 0.07, 0.13), est(0.05, 0.01, 0.09)]).label == "above"
    mixed = claims.intra_above_null([est(0.10, 0.07, 0.13), est(0.02, -0.02, 0.06)])  # holds 0
    assert mixed.label == "not above" and mixed.text.endswith("in 1 of 2 models")
    assert mixed.figures["sides"] == [claims.HIGHER, TIE]


def test_colspace_alignment_counts_models_distinguishably_above():
    """The default model after W_O: O = 0.105 [0.094, 0.116] against the column-space null 0.092 ± 0.002, an excess
    of 0.013 whose interval, both spreads counted, stays above 0; one that holds 0 is not counted."""
    above = claims.null_excess(Estimate(0.105, 0.094, 0.116, 27), 0.092, 0.002)
    assert above.lo == pytest.approx(0.013 - math.hypot(0.011, 1.959964 * 0.002), abs=1e-6)
    straddles = claims.null_excess(Estimate(0.100, 0.088, 0.112, 27), 0.092, 0.002)
    every = claims.colspace_aligned({"a": above, "b": claims.null_excess(Estimate(0.123, 0.112, 0.136, 49), 0.092, 0.002)})
    assert every.text == "more aligned than chance in every model" and every.figures["excess"]["a"] is above
    assert claims.colspace_aligned({"a": above, "b": straddles}).text == "more aligned than chance in 1 of 2 models"
    with pytest.raises(ValueError, match="at least one model"):
        claims.colspace_aligned({})


def test_published_values_are_judged_one_by_one_by_the_rule():
    """Qwen2.5-0.5B's 0.291 [0.285, 0.298] against the Haar pair mean 0.279 at d = 64, k = 7: its own interval
    excludes the null, so it lies above it; GPT-2's 0.284 [0.276, 0.292] holds it; a point without an interval
    within ±0.01 of the null is equivalent to it (as a point reads against the margin)."""
    qwen = claims.SourcePoint("Qwen2.5-0.5B", 64, 7, 0.291, (0.285, 0.298))
    gpt2 = claims.SourcePoint("GPT-2 124M", 64, 7, 0.284, (0.276, 0.292))
    scratch = claims.SourcePoint("from scratch, d_head 64", 64, 7, 0.279, None)
    e = claims.published_excess(qwen, 0.279)
    assert (e.value, e.lo, e.hi) == pytest.approx((0.012, 0.006, 0.019))
    points = {p.label: claims.published_excess(p, 0.279) for p in (gpt2, scratch)}
    assert claims.published_within_null(points).label == "explained by the null"
    assert claims.published_within_null(points).figures["sides"] == {"GPT-2 124M": TIE,
                                                                     "from scratch, d_head 64": claims.EQUIVALENT}
    one = claims.published_within_null({**points, "Qwen2.5-0.5B": e})  # 1 of 3 off: P(1 or more) = 0.14
    assert one.label == "explained by the null" and one.figures["off"] == ["Qwen2.5-0.5B"]
    assert ("1 of the 3 published values lies off it by the rule (its interval and the null's spread), "
            "Qwen2.5-0.5B (+0.012 [+0.006, +0.019], above it) (with 3 decisions") in one.text
    off = claims.published_within_null({"Qwen2.5-0.5B": e, "other": e})  # 2 of 2: P = 0.0025, beyond chance
    assert off.label == "not explained by the null alone" and "beyond chance" in off.text
    far = claims.published_excess(claims.SourcePoint("x", 64, 7, 0.30, None), 0.279)  # a point 0.021 away
    assert claims.published_within_null({"x": far}).figures["off"] == ["x"]
    assert claims.scratch_explained(points).text == "explained by the null, which does not depend on training at all"
    assert claims.cluster_explained(points, 0.9).label == "explained by the null"
    assert claims.cluster_explained(points, 0.89).label == "not explained by the null alone"
    mixed = claims.cluster_explained({**points, "Qwen2.5-0.5B": e}, 0.99)  # one exception, within chance
    assert mixed.label == "explained by the null" and "Qwen2.5-0.5B" in mixed.text and "within chance" in mixed.text
    assert claims.cluster_explained({"Qwen2.5-0.5B": e, "other": e}, 0.99).label == "not explained by the null alone"
    with pytest.raises(ValueError, match="at least one"):
        claims.published_within_null({})


def test_a_published_value_counts_the_nulls_spread_over_the_sources_pairs():
    """As for ours (``null_excess``): Qwen2.5-0.5B's 49 inter-group pairs give the null an s.d. of
    pair_std/√49, added in quadrature to the source's interval; without a pair count the null has no spread."""
    qwen = claims.SourcePoint("Qwen2.5-0.5B", 64, 7, 0.291, (0.285, 0.298), 49)
    e = claims.published_excess(qwen, 0.279, 0.0278)
    half = 1.96 * 0.0278 / 7
    assert (e.lo, e.hi) == pytest.approx((0.012 - math.hypot(0.006, half), 0.012 + math.hypot(0.007, half)), abs=1e-6)
    assert claims.published_excess(qwen._replace(n_pairs=None), 0.279, 0.0278).lo == pytest.approx(0.006)
    assert claims.published_excess(qwen, 0.279).lo == pytest.approx(0.006)  # no pair s.d. given
    assert claims.inter_group_pairs(14, 2) == 49 and claims.inter_group_pairs(8, 8) == 28
    assert claims.inter_group_pairs(32, 8) == 448
    assert {p.n_pairs for p in claims.source_points() if p.label.startswith("from scratch")} == {None}


def test_corpus_stability_at_three_times_the_sources_gap():
    assert claims.CORPUS_TOL == pytest.approx(3 * (0.284 - 0.277))
    spread = claims.corpus_spread({"a": est(0.280, 0.275, 0.285), "b": est(0.290, 0.287, 0.294),
                                   "c": est(0.285, 0.28, 0.29)})
    assert (spread.value, spread.lo, spread.hi) == pytest.approx(
        (0.010, 0.010 - math.hypot(0.003, 0.005), 0.010 + math.hypot(0.004, 0.005)))
    assert claims.corpus_stable(spread).label == "stable"
    assert claims.corpus_stable(spread).text.startswith("stable, as claimed: equivalent within ±0.021")
    wide = est(0.015, -0.01, 0.04)
    assert claims.corpus_stable(wide).label == "not shown"
    assert "are not distinguishable at this sample size" in claims.corpus_stable(wide).text
    apart = claims.corpus_stable(est(0.015, 0.001, 0.029))  # the default model: distinguishable, past the margin
    assert apart.label == "not shown" and apart.text.startswith(
        "stability within ±0.021 (three times the source's 0.007) is not shown: the corpora give distinguishably "
        "different O_h")
    assert claims.corpus_claim([wide, wide]).text.endswith("in none of the 2 models: every spread's interval reaches "
                                                           "past it")
    assert claims.corpus_stable(est(0.04, 0.03, 0.05)).label == "less stable"
    assert claims.corpus_claim([]).text == "n/a"
    assert claims.corpus_claim([spread, spread]).text == "within ±0.021 (three times the source's 0.007) in every model"
    assert claims.corpus_claim([spread, wide]).label == "not shown"
    assert claims.corpus_claim([spread, est(0.04, 0.03, 0.05)]).label == "less stable"
    wide_pair = claims.corpus_spread({"a": est(0.28, 0.20, 0.36), "b": est(0.30, 0.22, 0.38)})
    assert wide_pair.lo == 0.0 and wide_pair.hi > 0.1  # a spread is never negative
    with pytest.raises(ValueError, match="two corpora"):
        claims.corpus_spread({"a": spread})


def test_null_side_and_the_o_h_claim():
    assert claims.null_side(est(0.01, -0.001, 0.021)).label == "is not distinguishable from"
    assert claims.null_side(est(0.011, 0.001, 0.021)).label == "lies above"
    assert claims.null_side(est(-0.011, -0.021, -0.001)).label == "lies below"
    assert claims.null_side(est(0.001, -0.003, 0.005)).label == "is equivalent, within ±0.01, to"
    assert claims.o_h_claim(est(-0.03, -0.05, -0.01)).text == (
        "replicates beyond the null: O_h lies below random frames in the same dimension")
    assert claims.o_h_claim(est(0.0, -0.02, 0.02)).text.startswith("does not replicate as a property of trained heads")
    assert claims.o_h_claim(est(0.001, -0.003, 0.005)).text.endswith(
        "O_h is equivalent, within ±0.01, to random frames in the same dimension")
    assert claims.o_h_claim(est(0.05, 0.03, 0.07)).text.startswith("does not replicate (more aligned than chance)")
    with pytest.raises(ValueError, match="o_h_claim's null"):
        claims.o_h_claim(est(0.0, -0.01, 0.01), null="gaussian")


def test_null_excess_counts_both_spreads():
    """O − null with each side's half-width the quadrature sum of the overlap's own (the bootstrap's, which may
    be asymmetric) and 1.96 null s.d.: z alone or the bootstrap alone can each call a difference the other
    does not, and the combined interval calls neither."""
    z = claims.OVERLAP_RULE.z_crit
    e = claims.null_excess(Estimate(0.30, 0.29, 0.32, 10), 0.28, 0.005)
    assert (e.value, e.lo, e.hi, e.units) == pytest.approx(
        (0.02, 0.02 - math.hypot(0.01, z * 0.005), 0.02 + math.hypot(0.02, z * 0.005), 10))
    # the headline of the default model: −0.004, bootstrap ±0.011 and null s.d. 0.0052 (z = −0.8)
    head = claims.null_excess(Estimate(0.2752, 0.2647, 0.2861, 27), 0.2795, 0.0052)
    assert claims.null_side(head).label == "is not distinguishable from"
    # four pairs: a tight bootstrap (it understates) is widened by the null's spread
    few = claims.null_excess(Estimate(0.30, 0.299, 0.301, 4), 0.28, 0.012)
    assert few.lo < 0 < few.hi and claims.null_side(few).label == "is not distinguishable from"
    # a large z with a wide bootstrap interval: not distinguishable either
    wide = claims.null_excess(Estimate(0.105, 0.088, 0.122, 27), 0.092, 0.001)
    assert claims.null_side(wide).label == "is not distinguishable from"
    # no null spread (a published value against an expectation): the overlap's interval alone
    assert claims.null_excess(Estimate(0.291, 0.285, 0.298, 0), 0.279).lo == pytest.approx(0.006)
    nan = claims.null_excess(Estimate(math.nan, math.nan, math.nan, 0), 0.28, 0.01)
    assert claims.null_side(nan).figures["decision"] == TIE
    with pytest.raises(ValueError, match="cannot be negative"):
        claims.null_excess(Estimate(0.3, 0.29, 0.31, 4), 0.28, -0.01)


def test_summary_excess_reads_each_null_from_a_stored_summary():
    m = {"o_h": 0.30, "ci": [0.29, 0.31], "null_mean": 0.28, "null_std": 0.005, "inter": 0.30, "inter_ci": [0.29, 0.31],
         "colspace_null_mean": 0.25, "colspace_null_std": 0.002, "intra": 0.6, "intra_ci": [0.55, 0.65],
         "intra_null_mean": 0.5, "intra_null_std": 0.03}
    assert claims.summary_excess(m).value == pytest.approx(0.02)
    assert claims.summary_excess(m, "colspace").value == pytest.approx(0.05)
    assert claims.summary_excess(m, "shared-value") == claims.null_excess(Estimate(0.6, 0.55, 0.65, 0), 0.5, 0.03)
    assert math.isnan(claims.summary_excess({**m, "intra": None, "intra_ci": None}, "shared-value").value)
    with pytest.raises(ValueError, match="summary_excess's null"):
        claims.summary_excess(m, "gaussian")


def test_multiplicity_counts_what_chance_gives():
    """1 of 16 decisions off the null at α = 0.05: 0.8 expected by chance, P(≥ 1) = 1 − 0.95¹⁶ = 0.56."""
    v = claims.multiplicity(16, 1)
    assert v.figures["p_at_least"] == pytest.approx(1 - 0.95 ** 16) and v.label == "within chance"
    assert v.text == ("with 16 decisions at α = 0.05, 0.8 would fall off their null by chance alone; 1 did "
                      "(P(1 or more) = 0.56), within chance")
    assert claims.multiplicity(16, 4).label == "beyond chance"  # P(≥ 4) ≈ 0.007
    assert "P(16 or more) < 0.001" in claims.multiplicity(30, 16).text  # not "= 0.00"
    at = est(0.0, -0.02, 0.02)
    swept = claims.sweep_clause({4: est(-0.03, -0.05, -0.01), 5: at, 6: at, 7: at})
    assert "4 decisions" in swept.text and "1 did" in swept.text  # a count off the null says what chance gives
    assert claims.multiplicity(16, 0).figures["p_at_least"] == pytest.approx(1.0)
    assert claims.multiplicity(3, 0).text.endswith("; none did")
    with pytest.raises(ValueError):
        claims.multiplicity(3, 4)


def test_o_h_claim_of_a_model_without_inter_group_pairs_is_judged_against_the_shared_value_null():
    # MQA: far above random frames (every pair averages the same values), at the shared-value null
    mqa = claims.o_h_claim(est(0.001, -0.004, 0.006), null="shared-value")
    assert mqa.figures["null"] == "shared-value" and mqa.label == "is equivalent, within ±0.01, to"
    assert mqa.text == ("does not replicate as a property of trained heads: O_h is equivalent, within ±0.01, to heads "
                        "that read the same keys and values with independent queries")
    below = claims.o_h_claim(est(-0.03, -0.05, -0.01), null="shared-value")
    assert below.label == "lies below" and below.text.startswith("replicates beyond the null")
    assert claims.o_h_claim(est(0.2, 0.19, 0.21)).figures["null"] == "haar"


def test_sweep_claim_by_the_share_of_k_outside_the_band():
    at, up, down = est(0.0, -0.02, 0.02), est(0.03, 0.01, 0.05), est(-0.03, -0.05, -0.01)
    assert claims.sweep_claim({4: at, 5: at}).text == (
        "explained by the null: at no k of the sweep is it distinguishable from chance")
    mostly = claims.sweep_claim({4: at, 5: at, 6: up})
    assert mostly.label == "mostly explained by the null" and mostly.figures["outside"] == [6]
    assert "above chance at k = 6 and is not distinguishable from it at the other 2 values of k" in mostly.text
    half = claims.sweep_claim({4: down, 5: up})
    assert half.label == "not explained by the null alone" and "above or below chance at k = 4, 5" in half.text
    equal = claims.sweep_clause({4: est(0.001, -0.004, 0.006), 5: est(0.002, -0.003, 0.007)})
    assert equal.figures["sides"] == {4: claims.EQUIVALENT, 5: claims.EQUIVALENT} and equal.label == "within"


def test_intra_split_compares_the_two_intervals():
    base = dict(o_h_ci=(0.27, 0.29), n_intra=6, n_inter=85, all_pairs=0.3, mqa=False)
    assert claims.intra_split(**{**base, "intra": None, "intra_ci": None}).label == "none"
    more = claims.intra_split(**base, intra=0.5, intra_ci=(0.3, 0.7))
    assert more.text == ("the 6 intra-group pairs (two query heads reading the same KV head) overlap more, "
                         "O = 0.500 [0.300, 0.700], and all 91 pairs together give 0.300")
    assert claims.intra_split(**base, intra=0.2, intra_ci=(0.1, 0.26)).label == "less"
    assert claims.intra_split(**base, intra=0.3, intra_ci=(0.29, 0.4)).label == "about as much"  # the intervals meet
    assert claims.intra_split(**{**base, "mqa": True}, intra=0.5, intra_ci=(0.3, 0.7)).text == (
        "all 6 pairs share the single KV head, so the headline is over them (O = 0.500)")


def test_twonn_source_near_and_bias():
    assert claims.TWONN_IDEAL_RATIO == pytest.approx(1.3438, abs=1e-4)  # as test_intrinsic simulates
    smol = claims.twonn_source(est(11.2, 9.1, 13.6, 9), est(1.53, 1.41, 1.66, 9))  # the default model
    assert smol.label == "not near, biased"
    assert smol.text == ("the source's estimator reads 11.2 [9.1, 13.6] over heads here, distinguishably above the "
                         "source's 7.1; it reads 1.53× [1.41×, 1.66×] the unbiased fit on the same points, above the "
                         "1.34× it reads on ideal data, so these clouds depart from the law both fits assume: use the "
                         "unbiased fit")
    near = claims.twonn_source(est(7.0, 6.5, 7.6, 14), est(1.35, 1.25, 1.45, 14))
    assert near.label == "near, biased" and "equivalent within ±1 to the source's 7.1" in near.text
    assert "as on ideal data (1.34×, the truncation it ignores)" in near.text
    flat = claims.twonn_source(est(7.5, 5.0, 10.0, 9), est(1.02, 0.95, 1.10, 9))
    assert flat.label == "near" and not flat.text.endswith("use the unbiased fit")
    assert "below the 1.34×" in flat.text
    heads_v, heads_f = np.array([11.0, 9.0, 13.0, 12.0]), np.array([7.0, 6.0, 9.0, 8.0])
    over = claims.twonn_source_over_heads(heads_v, heads_f)
    assert over.figures["variant"] == interval.mean(heads_v[:, None])
    assert over.figures["ratio"] == interval.ratio_of_means(heads_v, heads_f)
    assert over.text == claims.twonn_source(over.figures["variant"], over.figures["ratio"]).text


def test_twonn_unbiased_against_the_sources_seven_with_its_margin():
    tie = claims.twonn_unbiased(est(7.31, 5.55, 9.39, 9))  # SmolLM2: wider than ±1 around 7.1
    assert tie.label == TIE and tie.text == (
        "the unbiased TwoNN, 7.31 [5.55, 9.39] over heads, is consistent with, but does not establish, a "
        "~7-dimensional manifold (not distinguishable at this sample size from ~7.1)")
    same = claims.twonn_unbiased(est(7.0, 6.2, 8.0, 9))  # inside [6.1, 8.1]
    assert same.label == claims.EQUIVALENT and "supports a ~7-dimensional manifold (equivalent within ±1 to ~7.1)" in same.text
    assert claims.twonn_unbiased(est(7.0, 6.0, 8.0, 9)).label == TIE  # 6.0 lies outside the margin
    low = claims.twonn_unbiased(est(4.3, 3.9, 4.7, 14))  # Qwen2.5's 4.3
    assert low.label == claims.LOWER and "does not support a ~7-dimensional manifold (distinguishable, lower than ~7.1)" in low.text
    assert claims.twonn_unbiased(est(9.0, 8.5, 9.5, 9)).label == claims.HIGHER
    nan = claims.twonn_unbiased(est(math.nan, math.nan, math.nan, 0))
    assert nan.label == claims.NOT_MEASURED and "nan" not in nan.text and "—" in nan.text


def test_top1_recovery_both_comparisons_and_their_ties():
    rec = est(0.40, 0.30, 0.50)
    tied = claims.top1_recovery(est(0.05, -0.01, 0.1), rec)
    assert tied.text.startswith("the frame and a random frame are not distinguishable at this sample size (+5.0% [")
    # the same formatter as the chapter's glued percentages (".1%"), so the two never differ in the last digit
    assert "(+12.0% [+8.0%, +16.1%] of the damage)" in claims.top1_recovery(est(0.1205, 0.08, 0.1605), rec).text
    assert "recovers less than the source's 55.9%" in tied.text
    assert claims.top1_recovery(est(0.05, 0.01, 0.1), rec).text.startswith("the frame recovers more than a random frame")
    assert "recovers less than a random frame" in claims.top1_recovery(est(-0.05, -0.1, -0.01), rec).text
    assert "not distinguishable from the source's 55.9%" in claims.top1_recovery(est(0.05, 0.01, 0.1),
                                                                                   est(0.5, 0.4, 0.6)).text
    assert "recovers more than the source's" in claims.top1_recovery(est(0.05, 0.01, 0.1), est(0.7, 0.6, 0.8)).text


def test_top1_recovery_with_undefined_figures_reads_not_measured_never_nan():
    nan = est(math.nan, math.nan, math.nan, 0)
    none = claims.top1_recovery(nan, nan)  # toy-gpt2: no damage to recover
    assert none.label == f"{claims.NOT_MEASURED}; {claims.NOT_MEASURED}"
    assert none.text == ("the frame's recovery against a random frame is not measured in this run (—), and its recovery "
                         "is not set against the source's 55.9%")
    open_ends = claims.top1_recovery(est(0.05, math.nan, math.nan), est(0.4, math.nan, math.nan))
    assert "(+5.0% [—, —] of the damage)" in open_ends.text and "nan" not in open_ends.text


# ----------------------------------------------------------------------------- nqp


def test_gates_pass_fail_and_tie():
    assert claims.gate(est(0.9, 0.8, 0.95), "lower") == "pass"
    assert claims.gate(est(1.1, 1.05, 1.2), "lower") == "fail"
    assert claims.gate(est(1.1, 1.05, 1.2), "higher") == "pass"
    assert claims.gate(est(1.0, 0.9, 1.1), "lower") == TIE
    with pytest.raises(ValueError, match="'lower' or 'higher'"):
        claims.gate(est(1.0, 0.9, 1.1), "better")
    assert claims.gate_ag1(9e-6, 1e-7).label == "pass"
    assert claims.gate_ag1(1e-5, 1e-7).label == "fail"
    assert claims.gate_ag2(0.6).label == "pass" and claims.gate_ag2(0.59).label == "fail"
    assert claims.gate_ag2(0.6).text == "60% of layers"
    ag3 = claims.gate_ag3(est(1.2, 1.1, 1.3), 30.0, 25.0)
    assert (ag3.label, ag3.text) == ("fail", "30.00 vs 25.00, ratio 1.200 [1.100, 1.300]")
    assert claims.gate_ag4(est(1.0, 0.9, 1.1), 30.0, 30.0).label == TIE


def test_gates_idea_names_each_outcome():
    assert claims.gates_idea({"A-G2": "fail", "A-G3": "fail", "A-G4": "fail"}).text == (
        "The three gates that test the idea itself fail")
    assert claims.gates_idea({"A-G2": "pass", "A-G3": "fail", "A-G4": TIE}).text == (
        f"Of the three gates that test the idea itself, A-G2: pass; A-G3: fail; A-G4: {TIE}")


def test_nqp_verdicts():
    assert claims.best_text("gptq", []).text == "gptq"
    assert claims.best_text("gptq", ["awq", "rtn"]).text == f"gptq (awq, rtn {TIE} from it)"
    assert claims.fisher_rank2(3.0).text == "holds"
    assert claims.fisher_rank2(3.05).text == "does not hold: the median participation ratio is 3.0"
    worse = claims.fisher_collapse(est(1.5, 1.4, 1.6), "GPTQ")
    assert worse.text == ("the Fisher rotation is worse than GPTQ, the better of GPTQ and AWQ, at 3 bits "
                          "(perplexity ratio 1.500 [1.400, 1.600])")
    assert claims.fisher_collapse(est(0.9, 0.8, 0.95), "AWQ").text.startswith("the Fisher rotation beats AWQ")
    assert claims.fisher_collapse(est(1.0, 0.9, 1.1), "AWQ").text.startswith(f"the Fisher rotation and AWQ are {TIE}")
    assert claims.l2_predicts(est(0.1, 0.05, 0.2)).label == "weight"
    assert claims.l2_predicts(est(-0.1, -0.2, -0.05)).label == "output"
    tie = claims.l2_predicts(est(0.1, -0.05, 0.2))
    assert tie.label == claims.TIE and "difference of the two ρ +0.10 [-0.05, +0.20]: not distinguishable" in tie.text
    assert claims.eight_bit(est(1.1, 1.05, 1.2)).text.startswith("replicates in direction")
    assert claims.eight_bit(est(0.9, 0.8, 0.95)).text.startswith("does not replicate: at 8 bits the λ-scaled grid is better")
    assert claims.eight_bit(est(1.0, 0.9, 1.1)).label == TIE


def test_fisher_not_worse_lists_the_exceptions():
    worse = {("rtn", 4, None): est(1.2, 1.1, 1.3), ("gptq", 3, 128): est(1.5, 1.4, 1.6)}
    assert claims.fisher_not_worse(worse).label == "worse everywhere"
    mixed = claims.fisher_not_worse({**worse, ("rot-haar", 4, None): est(1.0, 0.9, 1.1)})
    assert mixed.label == "exceptions" and mixed.text.endswith(
        f"rot-haar at 4 bits: {TIE} (ratio 1.000 [0.900, 1.100])")
    assert "gptq at 3 bits (g128)" not in mixed.text  # worse there: not an exception


def test_nqp_verdicts_take_the_chapters_formats():
    # the chapter formats every perplexity with .3f and every paired ratio with .4f; its verdicts must agree
    r = est(1.00031, 0.99912, 1.00151)
    assert claims.gate_ag3(r, 251.7312, 251.6549, ppl_spec=".3f", ratio_spec=".4f").text == (
        "251.731 vs 251.655, ratio 1.0003 [0.9991, 1.0015]")
    assert claims.gate_ag4(r, 2.0, 3.0).text == "2.00 vs 3.00, ratio 1.000 [0.999, 1.002]"  # the defaults
    assert claims.gate_ag4(r, 2.0, 3.0, ppl_spec=".1f", ratio_spec=".2f").text == "2.0 vs 3.0, ratio 1.00"
    assert claims.fisher_collapse(r, "GPTQ", ratio_spec=".4f").text.endswith("(perplexity ratio 1.0003 [0.9991, 1.0015])")
    assert claims.eight_bit(r, ratio_spec=".4f").text.endswith("(perplexity ratio 1.0003 [0.9991, 1.0015])")
    assert claims.fisher_not_worse({("RTN", 4, None): r}, ratio_spec=".4f").text.endswith(
        "(ratio 1.0003 [0.9991, 1.0015])")


# ----------------------------------------------------------------------------- kvquant


def test_removal_verdict_all_branches():
    excess = est(0.62, 0.48, 0.75)
    assert claims.removal_verdict(excess, est(-1.0, -1.5, -0.5)).text == "removes 62.0% [48.0%, 75.0%] of the excess"
    assert claims.removal_verdict(excess, est(1.0, 0.5, 1.5)).text == "adds to the excess (removes 62.0% [48.0%, 75.0%])"
    tie = claims.removal_verdict(excess, est(-0.1, -0.5, 0.4))
    assert tie.label == TIE and tie.text.startswith("is not distinguishable from its baseline at this sample size")
    nan = est(math.nan, math.nan, math.nan)
    assert claims.removal_verdict(nan, est(1.0, 0.5, 2.0)).text.startswith("is higher than its baseline")
    assert "not distinguishable" in claims.removal_verdict(nan, est(0.1, -0.5, 0.6)).text


def _nll(seed, shift=0.0, blocks=8, tokens=64):
    return torch.rand(blocks, tokens, generator=torch.Generator().manual_seed(seed)) + 2.0 + shift


def test_lower_and_lowest_verdicts_paired():
    base = _nll(0)
    clearly_lower, same = base - 0.3, base + 0.01 * torch.randn(base.shape, generator=torch.Generator().manual_seed(1))
    assert claims.lower_verdict(clearly_lower, base, "A", "B").text.startswith("A is lower than B (perplexity ratio 0.7")
    assert claims.lower_verdict(base + 0.3, base, "A", "B").label == "higher"
    tied = claims.lower_verdict(same, base, "A", "B")
    assert tied.label == TIE and tied.text.startswith(f"A and B are {TIE}")
    lowest = claims.lowest_verdict({"A": clearly_lower, "B": base}, "A")
    assert (lowest.label, lowest.text) == ("A", "A has the lowest perplexity, distinguishably below every other")
    assert claims.lowest_verdict({"A": base, "B": clearly_lower}, "A").text == "B has a lower perplexity than A"
    tie = claims.lowest_verdict({"A": base, "B": same, "C": base + 0.3}, "A")
    assert tie.text in ("A has the lowest perplexity, but is not distinguishable from B at this sample size",
                        "B has the lowest perplexity, but A is not distinguishable from it at this sample size")
    with pytest.raises(ValueError, match="not among the compared methods"):
        claims.lowest_verdict({"A": base}, "Z")


@pytest.mark.parametrize("excess, expected", [
    (est(0.5, 0.4, 0.6), "below the paper's 84–94%"),
    (est(0.97, 0.95, 0.99), "above the paper's 84–94%"),
    (est(0.8, 0.7, 0.85), "consistent with the paper's 84–94%"),
])
def test_headq_range_against_84_to_94(excess, expected):
    assert claims.headq_range(excess, est(-1.0, -2.0, -0.5)).text == expected
    assert claims.headq_range(excess, est(-1.0, -2.0, 0.5)).text == (
        "not distinguishable from its baseline at this sample size")


def test_kv_headline_on_paired_blocks():
    fp, pt2 = _nll(0), _nll(0, 1.0)
    hq2, kivi = _nll(0, 0.02), _nll(0, 0.5)
    out = claims.kv_headline({"per-token 2b": pt2, "headq 2b": hq2, "fp": fp, "kivi 2b": kivi},
                             {"HeadQ": hq2, "per-token 3b": _nll(0, 0.3)}, "HeadQ",
                             {"the query basis": hq2, "random basis": _nll(0, 0.6)}, a2=(_nll(0, 0.2), pt2, 2))
    assert list(out) == ["HeadQ against the paper's 84–94%", "HeadQ against KIVI", "equal storage", "controls",
                         "A² in decode"]
    assert out["HeadQ against the paper's 84–94%"].label == "above"  # (e − e^0.02)/(e − 1) = 99% removed
    assert out["HeadQ against KIVI"].label == "lower" and out["equal storage"].label == "HeadQ"
    assert out["A² in decode"].text.startswith("the A² policy is lower than uniform 2-bit values")


def test_kvquant_direction_verdicts():
    assert claims.fisher_predicts(est(0.6, 0.4, 0.8)).text == "replicates"
    assert claims.fisher_predicts(est(-0.2, -0.3, -0.1)).text == "does not replicate"
    assert claims.fisher_predicts(est(0.1, -0.1, 0.3)).text == claims.TIE
    assert claims.a2_offline(est(0.5, 0.4, 0.6)).text == "is lower than"
    assert claims.a2_offline(est(1.2, 1.1, 1.3)).label == "higher"
    assert claims.a2_offline(est(0.9, 0.7, 1.05)).text == "is not distinguishable at this sample size from"
    assert claims.side_code_clause(est(-1.0, -2.0, -0.5), "no side code", "already", ", though it").text == "already"
    assert claims.side_code_clause(est(1.0, 0.5, 2.0), "no side code", "already", ", though it").label == "higher"
    assert claims.side_code_clause(est(-1.0, -2.0, 0.5), "KIVI alone", "removes", "; it removes").text == (
        "is not distinguishable from KIVI alone at this sample size; it removes")


# ----------------------------------------------------------------------------- sparse


def test_lossless_needs_zero_kl_and_no_divergence():
    assert claims.lossless([0.0, 0.0], ["none", None]).text == "holds"
    assert claims.lossless([0.0, 1e-9], ["none", "none"]).text == "does not hold"
    assert claims.lossless([0.0], [12]).text == "does not hold"


def test_kept_mass_against_94_1_percent_by_the_rule():
    """The kept mass is judged by its interval (decide, margin MASS_TOL), and the phrase gives both facts."""
    zero = np.zeros(10)
    est = lambda v, lo, hi: Estimate(value=v, lo=lo, hi=hi, units=32)  # noqa: E731
    real = claims.kept_mass(est(0.918, 0.916, 0.921), zero)  # the default model's run: inside ±0.03, excludes 0.941
    assert real.label == claims.EQUIVALENT
    assert real.figures["phrase"] == "within 3 percentage points of, but distinguishably below,"
    assert real.text == ("91.8% [91.6%, 92.1%] on average, within 3 percentage points of, but distinguishably below, "
                         "the source's 94.1%; but the attention mass dropped exceeds 1e-7 for 0.0% of queries, so lossless")
    assert claims.kept_mass(est(0.94, 0.93, 0.95), zero).figures["phrase"] == "within 3 percentage points of"
    # the point value inside the margin but the interval not: judged by the interval
    wide = claims.kept_mass(est(0.93, 0.90, 0.96), zero)
    assert wide.label == claims.TIE and wide.figures["phrase"] == "not distinguishable at this sample size from"
    low = claims.kept_mass(est(0.905, 0.90, 0.91), zero)
    assert low.label == claims.LOWER and low.figures["phrase"].startswith("distinguishably below, and more than 3")
    assert claims.kept_mass(est(0.98, 0.975, 0.985), zero).label == claims.HIGHER
    some = claims.kept_mass(est(0.99, 0.985, 0.995), np.array([0.0, 0.0, 0.0, 1e-3]))
    assert some.text.endswith("the attention mass dropped exceeds 1e-7 for 25.0% of queries, so not lossless") and some.figures["zero_share"] == 0.75


def test_page_selection_and_speedup_thresholds():
    assert claims.page_selection(0.9).label == "near"
    assert claims.page_selection(0.89).label == "misses part"
    assert claims.page_selection(0.5).label == "misses part" and claims.page_selection(0.49).label == "misses most"
    assert claims.speedup(159.0).text == "reached" and claims.speedup(158.9).text == "not reached"


def test_survival_against_the_revision():
    assert claims.survival_vs_revision({}, 128, 1024).text == (
        "cannot be compared with the revision: none of the supports run is one of its 97, 193, 385, 769")
    alike = claims.survival_vs_revision({97: [], 193: []}, 128, 1024)
    assert alike.label == TIE and alike.text.startswith(
        "are not distinguishable from the revision's at every support run (S = 97, 193) (unpaired: each 95% interval "
        "meets the revision's): runs identical through 128 tokens")
    partly = claims.survival_vs_revision({97: [], 193: ["the median first divergence is 30 (the revision: 4)"]}, 128, 1024)
    assert partly.label == "partly" and partly.text == (
        "are not distinguishable from the revision's at S = 97 (unpaired: each 95% interval meets the revision's); "
        "they differ at S = 193, which keeps at least 19% of our keys against at "
        "most 9% at the revision's shortest context: the median first divergence is 30 (the revision: 4)")
    assert claims.survival_vs_revision({97: ["x"]}, 128, 1024).text.startswith(
        "differ from the revision's at every support run: at S = 97")


def test_is_source_qwen_by_shape():
    spec = {"family": "qwen2", "n_heads": 14, "n_kv_heads": 2, "d_head": 64}
    assert claims.is_source_qwen(spec)
    assert not claims.is_source_qwen({**spec, "n_kv_heads": 7}) and not claims.is_source_qwen({**spec, "family": "llama"})


def test_the_claims_page_quotes_the_claims_table():
    """book/claims.md writes the source numbers as text: each must be the value in claims.SOURCE."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "book" / "claims.md").read_text(encoding="utf-8")
    s = claims.source
    by_k, scratch = s("oh_gpt2_by_k"), s("oh_scratch")
    rho, p, n = s("spearman_qwen")
    low, high = s("headq_removed")
    quoted = [
        f"{s('oh_gpt2'):.3f} (GPT-2), {s('oh_qwen'):.3f} (Qwen2.5-0.5B)",
        f"{s('oh_gpt2'):.3f}, {s('oh_gpt2_medium'):.3f}, {s('oh_gpt2_large'):.3f}, {s('oh_qwen'):.3f} (d_head 64); "
        f"{s('oh_llama'):.3f}, {s('oh_mistral'):.3f} (d_head 128)",
        f"{by_k[0]:.3f} … {by_k[-1]:.3f} for k = 4 … {3 + len(by_k)}",
        f"Qwen {s('intra_qwen'):.3f}, Llama ≈ {s('intra_llama'):.2f}",
        "Oₕ " + " / ".join(format(o, f) for (_, o), f in zip(scratch, (".2f", ".3f", ".3f", ".2f")))  # as published
        + " at d_head " + " / ".join(str(d) for d, _ in scratch),
        f"Qwen ρ = −{-rho:.2f} (p = {p:.0e}, n = {n})".replace("e-0", "e-"),
        f"WikiText {s('corpus')[0]:.3f} vs C4 {s('corpus')[1]:.3f}",
        f"{s('twonn')} (GPT-2, Qwen)",
        f"+{s('top1_ppl')} PPL, {s('top1_recovered'):.1%} (GPT-2)",
        f"GPT-2 small: perplexity {s('ppl8')[1]:.2f} vs {s('ppl8')[0]:.2f}",  # Fisher-scaled vs standard integer
        "GPT-2 small: {:#.3g}, {:#.3g}, {:#.3g}, {:#.3g}".format(*s("werr4")),  # as the book writes weight errors
        f"{low:.0%}–{high:.0%}".replace("%–", "–"),
        f"\"the manifold\": {s('mass'):.1%}",
        f"{s('speedup'):.0f}× over flash SDPA",
    ]
    missing = [q for q in quoted if q not in page]
    assert not missing, f"book/claims.md does not quote these as claims.SOURCE has them: {missing}"


def test_fused_decode_verdict_reads_both_figures():
    from atlas_core.claims import fused_decode

    def e(v, lo, hi):
        return Estimate(v, lo, hi, 10)

    fast, quick_step = e(1.8, 1.7, 1.9), e(0.9, 0.85, 0.95)
    assert fused_decode(fast, quick_step).label == "faster"
    assert "1.80× [1.70×, 1.90×]" in fused_decode(fast, quick_step).text
    assert fused_decode(fast, None).label == "faster" and "whole decode step" not in fused_decode(fast, None).text
    assert fused_decode(fast, e(1.2, 1.1, 1.3)).label == "kernel only"
    assert fused_decode(fast, e(1.05, 0.97, 1.12)).label == "faster"  # a step not distinguishably slower
    assert fused_decode(e(0.9, 0.85, 0.95), quick_step).label == "not faster"
    assert fused_decode(e(1.3, 0.95, 1.6), quick_step).label == "not faster"  # faster by its point only
    sweep = {1024: e(0.79, 0.71, 0.90), 4096: e(1.2, 1.1, 1.3), 16384: fast}  # slower at one context
    some = fused_decode(sweep, quick_step)
    assert some.label == "some contexts" and some.figures["slower_at"] == [1024]
    assert some.text == ("faster in the kernel at some contexts only: the fused 2-bit kernel runs at 1.80× [1.70×, "
                         "1.90×] the speed of fp32 SDPA at 16,384 cached tokens (distinguishably faster at 2 of 3 "
                         "contexts, slower at 1,024 tokens), and the whole decode step takes 0.90× [0.85×, 0.95×] the "
                         "fp cache's")
    assert fused_decode({1024: fast, 4096: fast}, quick_step).label == "faster"


# ----------------------------------------------------------------------------- the decision rule


def test_decide_every_branch_and_its_edges():
    rule = claims.DecisionRule(margin=0.1)
    assert claims.decide(est(0.3, 0.2, 0.4), 0.0, rule).text == "distinguishable, higher"
    assert claims.decide(est(-0.3, -0.4, -0.2), 0.0, rule).text == "distinguishable, lower"
    assert claims.decide(est(0.01, -0.05, 0.08), 0.0, rule).text == "equivalent within ±0.1"
    assert claims.decide(est(0.05, -0.05, 0.15), 0.0, rule).text == TIE  # holds 0, wider than the margin
    # edges: an interval touching the null value holds it; one touching the margin is inside it
    assert claims.decide(est(0.1, 0.0, 0.2), 0.0, claims.RULE).label == TIE
    assert claims.decide(est(0.0, -0.1, 0.1), 0.0, rule).label == claims.EQUIVALENT
    assert claims.decide(est(0.0, -0.1, 0.1 + 1e-9), 0.0, rule).label == TIE
    # distinguishable yet inside the margin: equivalent, and the figures keep the difference
    small = claims.decide(est(0.05, 0.02, 0.08), 0.0, rule)
    assert small.label == claims.EQUIVALENT and small.figures["distinguishable"] is True
    # a ratio against 1; no margin never calls equivalence; NaN is undefined
    assert claims.decide(est(1.001, 0.999, 1.003), 1.0, claims.RULE).label == TIE
    assert claims.decide(est(1.001, 0.999, 1.003), 1.0, claims.DecisionRule(margin=0.01)).label == claims.EQUIVALENT
    assert claims.decide(est(math.nan, math.nan, math.nan), 0.0, rule).label == TIE


def test_the_rule_s_critical_value():
    assert claims.RULE.z_crit == pytest.approx(1.959964, abs=1e-6)
    assert claims.OVERLAP_RULE.half_width(0.01) == pytest.approx(0.0196, abs=1e-4)


def test_the_rule_matches_the_engines_intervals_and_refuses_bad_settings():
    from atlas_core import interval

    assert interval.DEFAULT.level == pytest.approx(1 - claims.RULE.alpha)
    assert claims.OVERLAP_RULE.margin == claims.REPRODUCED_TOL == 0.01
    for bad in ({"alpha": 0.0}, {"alpha": 1.0}, {"margin": 0.0}, {"margin": -0.1}, {"margin": math.inf}):
        with pytest.raises(ValueError):
            claims.DecisionRule(**bad)
    with pytest.raises(Exception):
        claims.RULE.alpha = 0.1  # frozen


def test_equivalence_is_reachable_only_when_the_interval_fits_the_margin():
    """The ablation's question: can the rule call an overlap equivalent to its null at this null spread?"""
    rule = claims.OVERLAP_RULE  # ±0.01, z_crit 1.96
    assert rule.half_width(0.005) == pytest.approx(1.959964 * 0.005, rel=1e-5)
    assert rule.can_show_equivalence(0.005) and not rule.can_show_equivalence(0.0057)  # 0.0098 vs 0.0112
    assert not claims.RULE.can_show_equivalence(1e-9)  # no margin: never


def test_a2_claim_is_judged_by_decode_perplexity_then_offline_error():
    v = lambda label: claims.Verdict(label=label, text=label)  # noqa: E731
    assert claims.a2_claim(v("higher"), v("lower")).text == "does not hold on this model"  # decode decides
    assert claims.a2_claim(v("lower"), v("higher")).label == "holds"
    assert claims.a2_claim(v(TIE), v("lower")).text == "not shown at this sample size"
    assert claims.a2_claim(None, v("higher")).label == "does not hold"  # not decoded: the offline error decides
    assert claims.a2_claim(None, v(TIE)).label == TIE


def test_werr_order_judges_each_step_over_matrices():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.04, 0.06, 60)  # one error per weight matrix
    # the source's order (RTN < Fisher < random < λ-scaled), each step ×1.05 on every matrix: settled
    same = claims.werr_order((base, base * 1.05, base * 1.05 ** 2, base * 1.8))
    assert same.label == "same order" and same.figures["settled"]
    assert same.text.startswith("the same order as the source's: RTN < the Fisher rotation < the random rotation < "
                                "the λ-scaled grid here (the ratio at each step: 1.050× [1.050×, 1.050×]; ")
    assert "over 60 weight matrices" in same.text
    # the random rotation lowest; RTN and the Fisher rotation differ by noise alone: "≈", not settled
    noisy = base * rng.normal(1.0, 0.05, 60)
    other = claims.werr_order((base, noisy, base * 0.9, base * 1.8))
    assert other.label == "another order" and not other.figures["settled"]
    assert " ≈ " in other.text and other.text.endswith("so that part of the order is not settled")
    with pytest.raises(ValueError, match="4 methods"):
        claims.werr_order((base, base))


def test_side_code_cost_by_the_rule():
    tie = claims.side_code_cost(est(0.96, 0.76, 1.31, 5))
    assert tie.label == TIE and tie.text == ("takes 0.96× [0.76×, 1.31×] the time of the same cache without it: "
                                             "not distinguishable at this sample size")
    assert claims.side_code_cost(est(1.2, 1.1, 1.3, 5)).text.endswith("distinguishably slower")
    assert claims.side_code_cost(est(0.8, 0.7, 0.9, 5)).label == "lower"
