"""The claims table and every verdict: both sides of each threshold, and the tie branch of each interval."""

import math

import numpy as np
import pytest
import torch

from atlas_core import claims
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
    assert ("GPT-2 124M", 64, 4, 0.210) in points and ("GPT-2 124M", 64, 10, 0.340) in points
    assert ("Llama-3.1-8B", 128, 11, 0.248) in points and ("from scratch, d_head 256", 256, 7, 0.14) in points


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
    close = claims.o_h_reproduced(0.291, 0.295, (0.289, 0.299), z=1.5, delta=0.0075, null_std=0.005)
    assert close.label == "reproduced"  # [−0.002, +0.008] inside ±0.01
    assert close.text == "reproduced; is not distinguishable from the null, +0.007 (z-score 1.5)"
    higher = claims.o_h_reproduced(0.291, 0.305, (0.302, 0.308), z=2.7, delta=0.008, null_std=0.003)
    assert higher.label == "differs" and higher.text.startswith("differs (higher); lies above the null, +0.008")
    wide = claims.o_h_reproduced(0.291, 0.311, (0.28, 0.342), z=1.0, delta=0.0)
    assert wide.label == "not distinguishable"  # holds the source value, wider than the margin
    at_null = claims.o_h_reproduced(0.291, 0.29, (0.285, 0.295), z=0.5, delta=0.001, null_std=0.002)
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
    assert claims.intra_above_null([], [], []).text == "no model in this run has heads that share a KV head"
    assert claims.intra_above_null([0.60, 0.55], [0.50, 0.50], [0.01, 0.02]).label == "above"  # z 10 and 2.5
    mixed = claims.intra_above_null([0.60, 0.52], [0.50, 0.50], [0.01, 0.02])  # z = 1.0: not distinguishable
    assert mixed.label == "not above" and mixed.text.endswith("in 1 of 2 models")
    with pytest.raises(ValueError, match="one null per model"):
        claims.intra_above_null([0.4], [], [])


def test_colspace_alignment_counts_models_distinguishably_above():
    above, straddles = Estimate(0.105, 0.094, 0.116, 27), Estimate(0.100, 0.088, 0.112, 27)
    nulls = {"a": 0.092, "b": 0.092}
    every = claims.colspace_aligned({"a": above, "b": Estimate(0.123, 0.112, 0.136, 49)}, nulls)
    assert every.text == "more aligned than chance in every model"
    assert every.figures["excess"]["a"].lo == pytest.approx(0.002)  # the excess carries the overlap's interval
    # a large z (the null's spread alone) does not decide: this interval holds the null's mean
    assert claims.colspace_aligned({"a": above, "b": straddles}, nulls).text == "more aligned than chance in 1 of 2 models"
    with pytest.raises(ValueError, match="same models"):
        claims.colspace_aligned({"a": above}, {"b": 0.09})


def test_null_explains_published_values_within_0_02():
    assert claims.published_within_null(0.02).label == "explained by the null"
    assert claims.published_within_null(0.021).label == "not explained by the null alone"
    assert claims.scratch_explained(0.019).text == "explained by the null, which does not depend on training at all"
    assert claims.scratch_explained(0.05).text == "not explained by the null alone: a value lies 0.050 from it"
    assert claims.cluster_explained(0.01, 0.9).label == "explained by the null"
    assert claims.cluster_explained(0.01, 0.89).label == "not explained by the null alone"
    assert claims.cluster_explained(0.03, 0.99).label == "not explained by the null alone"


def test_corpus_stability_at_three_times_the_sources_gap():
    assert claims.CORPUS_TOL == pytest.approx(3 * (0.284 - 0.277))
    assert claims.corpus_stable(0.021).text == "stable, as claimed; so is the null"
    assert claims.corpus_stable(0.022).text == "less stable than claimed (the source's two corpora differ by 0.007)"
    assert claims.corpus_claim([]).text == "n/a"
    assert claims.corpus_claim([0.01, 0.02]).text == "same order as the source's 0.007 for inter-group headlines"
    assert claims.corpus_claim([0.01, 0.03]).text == "larger than the source's 0.007"


def test_twonn_variant_reports_the_ratio():
    v = claims.twonn_variant(8.0, 6.4)
    assert v.text == "the source's number is its variant's, which reads ×1.25 the line fit"
    assert v.figures["ratio"] == pytest.approx(1.25)


# ----------------------------------------------------------------------------- atlas


def test_null_side_and_the_o_h_claim():
    assert claims.null_side(1.95).label == "is not distinguishable from"
    assert claims.null_side(1.97).label == "lies above"
    assert claims.null_side(-1.97).label == "lies below"
    assert claims.null_side(0.5, std=0.002).label == "is equivalent, within ±0.01, to"  # 0.001 ± 0.004
    assert claims.null_side(0.5, std=0.01).label == "is not distinguishable from"  # 0.005 ± 0.0196
    assert claims.o_h_claim(-3.0).text == "replicates beyond the null: O_h lies below random frames in the same dimension"
    assert claims.o_h_claim(0.5).text.startswith("does not replicate as a property of trained heads")
    assert claims.o_h_claim(0.5, 0.002).text.endswith("O_h is equivalent, within ±0.01, to random frames in the same dimension")
    assert claims.o_h_claim(5.0).text.startswith("does not replicate (more aligned than chance)")


def test_null_side_interval_judges_the_overlap_by_its_own_interval():
    """After W_O the default model's z = +6.5 against the null's spread, but the overlap's own interval
    [0.094, 0.116] against the null mean 0.092: still above, by 0.013 [0.002, 0.024]; a z alone would call an
    interval that holds the null mean 'above'."""
    real = claims.null_side_interval(Estimate(value=0.105, lo=0.094, hi=0.116, units=60), 0.092)
    assert real.label == "lies above"
    d = real.figures["difference"]
    assert (d.value, d.lo, d.hi) == pytest.approx((0.013, 0.002, 0.024))
    held = claims.null_side_interval(Estimate(value=0.105, lo=0.090, hi=0.120, units=60), 0.092)
    assert held.label == "is not distinguishable from" and claims.null_side(6.5).label == "lies above"
    assert claims.null_side_interval(Estimate(value=0.05, lo=0.04, hi=0.06, units=60), 0.092).label == "lies below"
    assert claims.null_side_interval(Estimate(value=0.093, lo=0.088, hi=0.098, units=60), 0.092).label == \
        "is equivalent, within ±0.01, to"


def test_multiplicity_counts_what_chance_gives():
    """1 of 16 decisions off the null at α = 0.05: 0.8 expected by chance, P(≥ 1) = 1 − 0.95¹⁶ = 0.56."""
    v = claims.multiplicity(16, 1)
    assert v.figures["p_at_least"] == pytest.approx(1 - 0.95 ** 16) and v.label == "within chance"
    assert v.text == ("with 16 decisions at α = 0.05, 0.8 would fall off their null by chance alone; 1 did "
                      "(P(1 or more) = 0.56), within chance")
    assert claims.multiplicity(16, 4).label == "beyond chance"  # P(≥ 4) ≈ 0.007
    assert "P(16 or more) < 0.001" in claims.multiplicity(30, 16).text  # not "= 0.00"
    swept = claims.sweep_clause({4: -3.0, 5: 0.5, 6: 0.2, 7: 1.0}, None)
    assert "4 decisions" in swept.text and "1 did" in swept.text  # a count off the null says what chance gives
    assert claims.multiplicity(16, 0).figures["p_at_least"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        claims.multiplicity(3, 4)


def test_o_h_claim_of_a_model_without_inter_group_pairs_is_judged_against_the_shared_value_null():
    # MQA: far above random frames (every pair averages the same values), at the shared-value null
    mqa = claims.o_h_claim(40.0, 0.01, shared_value=(0.5, 0.002))
    assert mqa.figures["null"] == "shared-value" and mqa.label == "is equivalent, within ±0.01, to"
    assert mqa.text == ("does not replicate as a property of trained heads: O_h is equivalent, within ±0.01, to heads "
                        "that read the same keys and values with independent queries")
    below = claims.o_h_claim(40.0, 0.01, shared_value=(-3.0, 0.01))
    assert below.label == "lies below" and below.text.startswith("replicates beyond the null")
    assert claims.o_h_claim(40.0, 0.01).figures["null"] == "haar"
    with pytest.raises(ValueError, match="spread must be positive"):
        claims.o_h_claim(40.0, 0.01, shared_value=(1.0, 0.0))


def test_sweep_claim_by_the_share_of_k_outside_the_band():
    assert claims.sweep_claim({4: 0.1, 5: -1.9}).text == (
        "explained by the null: at no k of the sweep is it distinguishable from chance")
    mostly = claims.sweep_claim({4: 0.1, 5: 1.0, 6: 2.5})
    assert mostly.label == "mostly explained by the null" and mostly.figures["outside"] == [6]
    assert "above chance at k = 6 and is not distinguishable from it at the other 2 values of k" in mostly.text
    half = claims.sweep_claim({4: -2.5, 5: 3.0})
    assert half.label == "not explained by the null alone" and "above or below chance at k = 4, 5" in half.text
    equal = claims.sweep_clause({4: 0.2, 5: 0.3}, {4: 0.001, 5: 0.001})
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
    near = claims.twonn_source(8.1, 7.0)
    assert near.text == ("the source's estimator reads 8.1 here, near the source's 7.1, and it is biased upward "
                         "(×1.16 the unbiased fit): use the unbiased fit")
    far = claims.twonn_source(8.2, 7.5)
    assert far.text == "the source's estimator reads 8.2 here, not the source's 7.1, and it agrees with the unbiased fit"


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
    assert claims.l2_predicts(est(0.1, -0.05, 0.2)).label == claims.TIE
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
    assert claims.gate_ag4(r, 2.0, 3.0, ppl_spec=".1f", ratio_spec=".2f").text == "2.0 vs 3.0, ratio 1.00 [1.00, 1.00]"
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
    assert claims.survival_vs_revision({97: [], 193: []}, 128, 1024).text.startswith(
        "agree with the revision at every support run (S = 97, 193): runs identical through 128 tokens")
    partly = claims.survival_vs_revision({97: [], 193: ["the median first divergence is 30 (the revision: 4)"]}, 128, 1024)
    assert partly.label == "partly" and partly.text == (
        "agree with the revision at S = 97; they differ at S = 193, which keeps at least 19% of our keys against at "
        "most 9% at the revision's shortest context: the median first divergence is 30 (the revision: 4)")
    assert claims.survival_vs_revision({97: ["x"]}, 128, 1024).text.startswith(
        "disagree with the revision at every support run: at S = 97")


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
        "O_h " + " / ".join(format(o, f) for (_, o), f in zip(scratch, (".2f", ".3f", ".3f", ".2f")))  # as published
        + " at d_head " + " / ".join(str(d) for d, _ in scratch),
        f"Qwen ρ = −{-rho:.2f} (p = {p:.0e}, n = {n})".replace("e-0", "e-"),
        f"WikiText {s('corpus')[0]:.3f} vs C4 {s('corpus')[1]:.3f}",
        f"{s('twonn')} (GPT-2, Qwen)",
        f"+{s('top1_ppl')} PPL, {s('top1_recovered'):.1%} (GPT-2)",
        f"GPT-2 small: perplexity {s('ppl8')[1]:.2f} vs {s('ppl8')[0]:.2f}",  # Fisher-scaled vs standard integer
        "GPT-2 small: {:.2e}, {:.2e}, {:.2e}, {:.2e}".format(*s("werr4")).replace("e-02", "e-2"),
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


def test_decide_z_reads_the_null_spread():
    assert claims.RULE.z_crit == pytest.approx(1.959964, abs=1e-6)
    assert claims.decide_z(1.96).label == claims.HIGHER and claims.decide_z(1.95).label == TIE
    assert claims.decide_z(-6.5).label == claims.LOWER
    z = claims.z_interval(2.0, 0.01)
    assert (z.value, z.lo, z.hi) == pytest.approx((0.02, 0.02 - 0.0196, 0.02 + 0.0196), abs=1e-4)
    assert claims.decide_z(0.2, 0.001, claims.OVERLAP_RULE).label == claims.EQUIVALENT
    assert claims.decide_z(0.2, None, claims.OVERLAP_RULE).label == TIE  # no spread: no equivalence call
    assert claims.decide_z(2.7, 0.003, claims.OVERLAP_RULE).text == "distinguishable, higher"
    with pytest.raises(ValueError, match="spread must be positive"):
        claims.z_interval(1.0, 0.0)


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
