"""The source works' published numbers, the thresholds we judge them by, and one function per verdict.

The book's closing page (``book/claims.md``) sets each headline claim of a source work beside our own
measurement. Every number a chapter compares against is in ``SOURCE`` (with the work, the place in it and
what it measures), every threshold is a named constant below, and every verdict is a function here that
returns a ``Verdict``: a short ``label`` a table or a test can read, the ``text`` the book glues, and the
``figures`` it rests on.

One decision rule decides every comparison (``DecisionRule``, ``decide``; Methods, "One decision rule"): an
estimate with its 95% interval from the evaluation engine (``atlas_core.interval``), or a z-score against a
null with the null's spread, is "distinguishable, higher/lower" when the interval excludes the null value,
"equivalent within ±margin" when the whole interval lies inside the margin around it, and otherwise "not
distinguishable at this sample size" (``TIE``).

The numbers are those the sources report (recorded in the project's CLAIMS.md); none was re-run by us.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple
from statistics import NormalDist

import numpy as np

from atlas_core import interval
from atlas_core.glue import estimate_text, listing, number, times_text
from atlas_core.interval import Bootstrap, Estimate

__all__ = [
    "TIE", "Source", "SOURCE", "Verdict", "WORKS", "source", "SourcePoint", "source_points", "published_excess", "inter_group_pairs", "is_source_qwen", "direction",
    # the decision rule
    "DecisionRule", "RULE", "OVERLAP_RULE", "HIGHER", "LOWER", "EQUIVALENT", "decide", "null_excess", "summary_excess",
    # thresholds
    "REPRODUCED_TOL", "R2_NULL", "ALPHA", "CORPUS_TOL", "TWONN_TOL", "TWONN_IDEAL_RATIO",
    "FISHER_RANK_PR", "MASS_TOL", "M_ZERO", "RECALL_NEAR", "RECALL_MOST", "GATE_TESTS",
    # crossarch
    "o_h_reproduced", "intra_reproduced", "spearman_replicates", "intra_above_null", "colspace_aligned",
    "published_within_null", "scratch_explained", "cluster_explained", "corpus_spread", "corpus_stable", "corpus_claim",
    # atlas
    "null_side", "o_h_claim", "sweep_clause", "sweep_claim", "intra_split", "twonn_source", "twonn_source_over_heads", "twonn_unbiased",
    "top1_recovery", "NOT_MEASURED",
    # nqp
    "gate", "gate_ag1", "gate_ag2", "gate_ag3", "gate_ag4", "gates_idea", "best_text", "fisher_rank2",
    "fisher_collapse", "fisher_not_worse", "l2_predicts", "eight_bit",
    # kvquant
    "removal_verdict", "lower_verdict", "lowest_verdict", "range_verdict", "headq_range", "kv_headline",
    "fisher_predicts", "a2_offline", "side_code_clause", "side_code_cost",
    # sparse
    "lossless", "kept_mass", "multiplicity", "page_selection", "speedup", "survival_vs_revision",
]

TIE = "not distinguishable at this sample size"
NOT_MEASURED = "not measured"  # the label of a verdict whose figure is undefined (NaN) in this run

# ----------------------------------------------------------------------------- the source works

WORKS = {
    "atlas": "ATLAS (formerly NQP): its public repository's README and frozen preprint, 2026",
    "nqp": "NQP, the Fisher-quantization branch of the same repository (its A→B→C roadmap and refutation record)",
    "headq": "Ruiz Williams, HeadQ, arXiv 2605.03562 (abstract)",
    "condensate": "Ruiz Williams, The Condensate Theorem, arXiv 2602.06317 v1 (abstract) and its repository",
    "revision": "Ruiz Williams, Attention-Mass Condensation for Sparse Decoding (revision of arXiv 2602.06317); "
                "repository JorgeLRW/condensate-theorem, results/qwen_survival_clean.json",
}


@dataclass(frozen=True, kw_only=True)
class Source:
    """One published number (or a published series) and where it comes from.

    Attributes:
        value: the number as published; a tuple for a series (its order is given in ``what``).
        what: what it measures, with its model and protocol.
        work: a key of ``WORKS``.
        where: the place in that work (section, table, file).
        ci: the published 95% interval, where one is given.
    """

    value: float | tuple
    what: str
    work: str
    where: str
    ci: tuple[float, float] | None = None

    def __post_init__(self):
        if self.work not in WORKS:
            raise ValueError(f"Source.work must be one of {sorted(WORKS)}, got {self.work!r}")


_XA = "preprint §3.1b (cross-architecture table: deepest layer, k = 7, N = 1,200 points per head)"
SOURCE: dict[str, Source] = {
    # ATLAS: head manifolds (O_h = mean principal cosine between heads' k-frames)
    "oh_gpt2": Source(value=0.284, ci=(0.276, 0.292), what="O_h, GPT-2 124M (first 8 heads), d_head 64, k 7",
                      work="atlas", where=_XA),
    "oh_gpt2_medium": Source(value=0.277, ci=(0.267, 0.288), what="O_h, GPT-2 medium, d_head 64, k 7", work="atlas",
                             where=_XA),
    "oh_gpt2_large": Source(value=0.281, ci=(0.272, 0.290), what="O_h, GPT-2 large, d_head 64, k 7", work="atlas",
                            where=_XA),
    "oh_qwen": Source(value=0.291, ci=(0.285, 0.298), what="O_h, Qwen2.5-0.5B (14 q / 2 kv heads), d_head 64, k 7",
                      work="atlas", where=_XA),
    "oh_llama": Source(value=0.197, ci=(0.195, 0.199), what="O_h, Llama-3.1-8B (32 / 8), d_head 128, k 7",
                       work="atlas", where=_XA),
    "oh_mistral": Source(value=0.199, ci=(0.198, 0.201), what="O_h, Mistral-7B (32 / 8), d_head 128, k 7",
                         work="atlas", where=_XA),
    "oh_llama_k11": Source(value=0.248, what="O_h, Llama-3.1-8B at its per-model k = 11", work="atlas", where=_XA),
    "oh_mistral_k9": Source(value=0.226, what="O_h, Mistral-7B at its per-model k = 9", work="atlas", where=_XA),
    "oh_gpt2_by_k": Source(value=(0.210, 0.241, 0.264, 0.284, 0.300, 0.321, 0.340),
                           what="O_h, GPT-2 124M, k = 4, 5, …, 10", work="atlas", where="preprint, O_h versus k"),
    "oh_by_design": Source(value=((64, 0.28), (128, 0.20)), what="(d_head, O_h ≈): magnitude clusters by design",
                           work="atlas", where="README, 'The arc in one sentence' and 'Future directions'"),
    "oh_scratch": Source(value=((32, 0.40), (64, 0.279), (128, 0.197), (256, 0.14)),
                         what="(d_head, O_h) of models trained from scratch; k not stated beside them (the protocol's 7 "
                              "assumed)", work="atlas", where="preprint, from-scratch models"),
    "oh_scratch_d64_10": Source(value=0.2785, what="O_h of a model trained from scratch at 10% of training (d_head not stated; 64 by its value)",
                                work="atlas", where="preprint, from-scratch models"),
    "oh_scratch_d64_end": Source(value=0.2783, what="O_h of the same model at the end of training",
                                 work="atlas", where="preprint, from-scratch models"),
    "intra_qwen": Source(value=0.482, what="O_h of GQA intra-group pairs, Qwen2.5-0.5B", work="atlas",
                         where="preprint, GQA intra-group pairs"),
    "intra_llama": Source(value=0.64, what="O_h of GQA intra-group pairs, Llama-3.1-8B (≈)", work="atlas",
                          where="preprint, GQA intra-group pairs"),
    "corpus": Source(value=(0.284, 0.277), what="O_h on WikiText and on C4 (GPT-2)", work="atlas",
                     where="preprint, inter-corpus control"),
    "spearman_qwen": Source(value=(-0.53, 3e-4, 42), what="(ρ, p, n): Spearman of d_int against overlap, three "
                            "deepest layers pooled, Qwen2.5-0.5B", work="atlas", where="README, Status table"),
    "spearman_gpt2": Source(value=(-0.26, 0.13, 36), what="(ρ, p, n): the same on GPT-2 124M", work="atlas",
                            where="README, Status table ('GPT-2 same sign, n.s.')"),
    "twonn": Source(value=7.1, what="mean TwoNN dimension (their variant), GPT-2 and Qwen2.5-0.5B", work="atlas",
                    where=_XA),
    "top1_ppl": Source(value=7.7, what="perplexity added by hard top-1 attention in GPT-2's deepest layer",
                       work="atlas", where="preprint, top-1 intervention"),
    "top1_recovered": Source(value=0.559, what="share of the three-layer top-1 damage a rank-7 reconstruction "
                             "recovers (GPT-2)", work="atlas", where="preprint, top-1 intervention"),
    # NQP: weight quantization in the Fisher basis (GPT-2 small)
    "ppl8": Source(value=(34.06, 36.67), what="perplexity at 8 bits: (standard integer, Fisher-scaled)", work="nqp",
                   where="refutation record, NQP-C1"),
    "werr4": Source(value=(4.97e-2, 5.10e-2, 5.27e-2, 9.08e-2), what="mean layer L2 error at 4 bits: (RTN, Fisher "
                    "rotation, random rotation, Fisher with λ-scaled grid)", work="nqp",
                    where="refutation record, L2-error vs PPL"),
    "fisher_rank": Source(value=2, what="rank of the activation Fisher ('≈ 2')", work="nqp",
                          where="README, Original hypothesis (refuted)"),
    # The source's gates A-G1…A-G4 (their thresholds are the source's)
    "ag1_tol": Source(value=1e-5, what="A-G1: U orthogonal and W U Uᵀ = W to within this", work="nqp",
                      where="roadmap, gate A-G1"),
    "ag2_share": Source(value=0.6, what="A-G2: share of layers where the Fisher rotation's L2 weight error is below "
                        "RTN's at 4 bits", work="nqp", where="roadmap, gate A-G2"),
    # HeadQ
    "headq_removed": Source(value=(0.84, 0.94), what="share of the excess perplexity HeadQ removes, K-only 2-bit "
                            "decode, strongest rows (low, high)", work="headq", where="abstract"),
    # The Condensate Theorem and its revision
    "mass": Source(value=0.941, what="attention mass on 'the manifold' (5.9% outside the fixed part)",
                   work="condensate", where="the paper's own mass figure"),
    "speedup": Source(value=159.0, what="speed-up over flash SDPA at 131K tokens (3.94 ms vs 627.58 ms, RTX 4090 "
                      "laptop)", work="condensate", where="abstract"),
    "revision_first_divergence": Source(
        value=((97, (2, 13, 1, 5, 14, 2, 3, 9, 1, 4, 2, 1, 6, 3, 2)),
               (193, (10, 13, 7, 10, 14, 3, 3, 9, 1, 4, 4, 3, 6, 14, 2)),
               (385, (22, 25, 7, 4, 21, 4, 3, 17, 1, 11, 4, 3, 6, 15, 2)),
               (769, (22, 43, 27, 14, 16, 17, 3, 32, 8, 11, 4, 3, 3, 15, 11))),
        what="(support S, first divergence of each run): contexts 2K, 8K, 16K in turn, prompts 0-4 within each; "
             "a run identical through the horizon reads 128", work="revision", where="results/qwen_survival_clean.json"),
    "revision_horizon": Source(value=128, what="greedy tokens generated per run", work="revision",
                               where="README, survival protocol"),
    "revision_shortest_context": Source(value=2048, what="the shortest context of its runs (2K / 8K / 16K)",
                                        work="revision", where="README, survival protocol"),
}


class SourcePoint(NamedTuple):
    """One published O_h: the model (label), its d_head, the frame rank k, the value, the source's 95% interval
    (None where the source gives none) and the number of head pairs it averages (None where the protocol does
    not fix it)."""

    label: str
    d_head: int
    k: int
    o_h: float
    ci: tuple[float, float] | None
    n_pairs: int | None = None


def source(name: str) -> float | tuple:
    """The published value of ``SOURCE[name]``.

    Raises:
        KeyError: no such entry (the message lists them).
    """
    if name not in SOURCE:
        raise KeyError(f"no source number {name!r}; known: {', '.join(SOURCE)}")
    return SOURCE[name].value


def is_source_qwen(spec: dict) -> bool:
    """True for a model of the source's Qwen2.5-0.5B architecture (qwen2, 14 query / 2 KV heads, d_head 64), the
    only one of its models with a per-model claim we can test offline.

    Args:
        spec: a model spec as a dict (``ModelSpec.as_dict()``: "family", "n_heads", "n_kv_heads", "d_head").
    """
    return spec["family"] == "qwen2" and (spec["n_heads"], spec["n_kv_heads"], spec["d_head"]) == (14, 2, 64)


def source_points() -> list[SourcePoint]:
    """Every published O_h as a ``SourcePoint`` (label, d_head, k, O_h, the source's 95% interval or None), for
    the cross-architecture figure and its null."""
    gpt2_ks = range(4, 4 + len(source("oh_gpt2_by_k")))
    ci = {name: SOURCE[name].ci for name in SOURCE}
    # pairs by the source's protocol (one layer; inter-KV-group pairs only under GQA): GPT-2 small's first 8
    # heads; all 16 and 20 heads of medium and large; Qwen2.5-0.5B's 14 query heads in 2 groups of 7; 32 heads in
    # 8 groups of 4 for Llama-3.1-8B and Mistral-7B. The from-scratch models' head counts are not published.
    gpt2, medium, large, qwen, llama = (inter_group_pairs(h, kv) for h, kv in ((8, 8), (16, 16), (20, 20), (14, 2), (32, 8)))
    return ([SourcePoint("GPT-2 124M", 64, k, o, ci["oh_gpt2"] if k == 7 else None, gpt2)  # the table's k = 7 row
             for k, o in zip(gpt2_ks, source("oh_gpt2_by_k"))]
            + [SourcePoint("GPT-2 medium", 64, 7, source("oh_gpt2_medium"), ci["oh_gpt2_medium"], medium),
               SourcePoint("GPT-2 large", 64, 7, source("oh_gpt2_large"), ci["oh_gpt2_large"], large),
               SourcePoint("Qwen2.5-0.5B", 64, 7, source("oh_qwen"), ci["oh_qwen"], qwen),
               SourcePoint("Llama-3.1-8B", 128, 7, source("oh_llama"), ci["oh_llama"], llama),
               SourcePoint("Llama-3.1-8B", 128, 11, source("oh_llama_k11"), ci["oh_llama_k11"], llama),
               SourcePoint("Mistral-7B", 128, 7, source("oh_mistral"), ci["oh_mistral"], llama),
               SourcePoint("Mistral-7B", 128, 9, source("oh_mistral_k9"), ci["oh_mistral_k9"], llama)]
            + [SourcePoint(f"from scratch, d_head {d}", d, 7, o, None) for d, o in source("oh_scratch")])


def inter_group_pairs(n_heads: int, n_kv_heads: int) -> int:
    """How many head pairs lie in different KV groups (every pair under MHA, n_kv_heads = n_heads), as
    ``geometry.pair_groups`` forms them; Qwen2.5-0.5B's 14 query heads in 2 groups: 49."""
    from atlas_core.geometry import pair_groups

    return len(pair_groups(np.repeat(np.arange(n_kv_heads), n_heads // n_kv_heads))["inter"])


def published_excess(point: SourcePoint, null_mean: float, pair_std: float | None = None) -> Estimate:
    """A published O_h − the Haar null's mean, by the same rule as ours (``null_excess``): the source's own 95%
    interval (a point, lo = hi, where it publishes none) and the null's spread for a mean over the source's
    pairs, ``pair_std``/√n_pairs (pairs of Haar frames are uncorrelated even when they share a head:
    ``geometry.haar_null``). Where the source's pair count is unknown (``n_pairs`` None) or ``pair_std`` is not
    given, the null enters as its expectation, without spread.

    Args:
        point: the published value; null_mean: the Haar mean of one pair at its (d_head, k); pair_std: the
            s.d. of one pair's overlap there.
    Returns:
        the excess with its interval (``null_excess``).
    """
    lo, hi = point.ci if point.ci is not None else (point.o_h, point.o_h)
    null_std = pair_std / math.sqrt(point.n_pairs) if pair_std is not None and point.n_pairs else None
    return null_excess(Estimate(value=point.o_h, lo=lo, hi=hi, units=0), null_mean, null_std)


# ----------------------------------------------------------------------------- thresholds

R2_NULL = 0.9  # the null "explains" the sweep when it accounts for this share of the variance of O_h
ALPHA = 0.05  # the significance level of every test: 95% intervals, Spearman permutation p-values
CORPUS_TOL = 0.021  # three times the source's own WikiText-vs-C4 difference, 0.284 − 0.277 = 0.007
TWONN_TOL = 1.0  # the source variant's dimension is "near" the source's 7.1 within this
TWONN_IDEAL_RATIO = 1 / (1 - math.log(10) * 0.1 / 0.9)  # ×1.344: the source variant over the line fit on exactly
# Pareto ratios (it drops the largest 10% of log μ and ignores the truncation; ``intrinsic.twonn_source``)
FISHER_RANK_PR = 3.0  # "rank ≈ 2" holds when the median participation ratio is at most this
MASS_TOL = 0.03  # kept mass "close to" the source's 94.1% within this
M_ZERO = 1e-7  # a query's discarded mass below this counts as zero (fp32 softmax rounding)
RECALL_NEAR = 0.9  # a selector "finds nearly the same set" at this index recall of the exact top-k
RECALL_MOST = 0.5  # below this it "misses most" of the exact top-k


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """A verdict on one claim.

    Attributes:
        label: a short outcome a table or a test reads ("reproduced", "pass", ``TIE``, …).
        text: the sentence or clause the book glues.
        figures: the numbers the verdict rests on (floats, ``Estimate``s or lists of them), by name.
    """

    label: str
    text: str
    figures: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------- the decision rule

HIGHER, LOWER, EQUIVALENT = "higher", "lower", "equivalent"


@dataclass(frozen=True, kw_only=True)
class DecisionRule:
    """The book's one decision rule: a significance level and an equivalence margin.

    An estimate is judged by its two-sided (1 − ``alpha``) interval against a null value (0 for a difference,
    1 for a ratio, a null model's mean for an overlap): "distinguishable, higher/lower" when the interval
    excludes the null value; "equivalent within ±margin" when the whole interval lies inside
    [null − margin, null + margin] (two one-sided tests, TOST, read off the same interval: at the 95% interval
    each one-sided test runs at 2.5%, so the equivalence call is conservative); otherwise "not distinguishable
    at this sample size" (the interval holds the null value but is wider than the margin). A rule with no
    margin never calls equivalence. An interval inside the margin that also excludes the null value is
    equivalent (the difference is real but smaller than the margin); its ``figures`` say so.

    Attributes:
        alpha: two-sided significance level, 0 < alpha < 1 (0.05: the engine's 95% intervals).
        margin: the equivalence margin, in the estimate's own units (> 0), or None.
    Raises:
        ValueError: alpha outside (0, 1), or a margin that is not a positive finite number.
    """

    alpha: float = ALPHA
    margin: float | None = None

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"DecisionRule.alpha must lie in (0, 1), got {self.alpha!r}")
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin > 0):
            raise ValueError(f"DecisionRule.margin must be a positive finite number or None, got {self.margin!r}")

    @property
    def z_crit(self) -> float:
        """The two-sided normal quantile of ``alpha`` (1.96 at 0.05): a z-score beyond ±z_crit is distinguishable."""
        return NormalDist().inv_cdf(1 - self.alpha / 2)

    def half_width(self, std: float) -> float:
        """The interval's half-width, z_crit · std, of an estimate (or a null) with standard deviation ``std``."""
        return self.z_crit * std

    def can_show_equivalence(self, std: float) -> bool:
        """Whether an estimate of standard deviation ``std`` can ever be called equivalent: its interval must fit
        inside ±margin even when centred on the null (False without a margin)."""
        return self.margin is not None and self.half_width(std) <= self.margin


RULE = DecisionRule()  # comparisons of methods (paired differences and ratios): no equivalence margin
OVERLAP_RULE = DecisionRule(margin=0.01)  # overlaps O (mean principal cosines): ±0.01, the size of the source's
# own 95% half-widths (0.008 on GPT-2, 0.0065 on Qwen2.5-0.5B); "reproduces a published O_h" and "at the null"
REPRODUCED_TOL = OVERLAP_RULE.margin  # a point value within this of a published O_h (no interval to judge)


def null_excess(est: Estimate, null_mean: float, null_std: float | None = None,
                rule: DecisionRule = OVERLAP_RULE) -> Estimate:
    """An overlap's excess over a null model's mean, with an interval that counts both spreads.

    O − null mean varies for two reasons: other pairs of heads would give another O (the interval of ``est``,
    pairs or heads resampled), and a mean over this many pairs of random frames varies around the null's mean
    (the null's s.d. over its draws). The interval is that of a difference of two independent means: on each
    side the two half-widths add in quadrature, lo = Δ − √(h_lo² + (z·sd)²) and hi = Δ + √(h_hi² + (z·sd)²)
    (the bootstrap interval need not be symmetric). With few pairs, where a bootstrap understates the spread,
    the null's term still counts; with many, the pairs' term does. Every overlap-against-null verdict of the
    book reads this one interval (``null_side``).

    Args:
        est: the overlap O with its (1 − alpha) interval; a published value with no interval has lo = hi = value.
        null_mean: the null model's mean overlap over the same pairs (or its expectation for one pair).
        null_std: the null's s.d. of that mean over its draws; None or 0 when the null is an expectation with
            no sampling spread of its own (a published value against the Haar pair mean).
        rule: gives z (its ``z_crit``).
    Returns:
        ``Estimate`` of O − null mean with the combined interval (``units`` of ``est``); NaN figures stay NaN.
    Raises:
        ValueError: a negative null s.d.
    """
    if null_std is not None and null_std < 0:
        raise ValueError(f"a null's s.d. cannot be negative, got {null_std!r}")
    h_null = rule.z_crit * null_std if null_std else 0.0
    delta = est.value - null_mean
    return Estimate(value=delta, lo=delta - math.hypot(est.value - est.lo, h_null),
                    hi=delta + math.hypot(est.hi - est.value, h_null), units=est.units)


def decide(est: Estimate, null: float = 0.0, rule: DecisionRule = RULE) -> Verdict:
    """The one decision rule (``DecisionRule``) applied to an estimate with its interval.

    Args:
        est: the figure and its (1 − ``rule.alpha``) interval from the evaluation engine (``interval``).
        null: the value of no effect: 0 for a difference, 1 for a ratio.
    Returns:
        label ``HIGHER``, ``LOWER``, ``EQUIVALENT`` or ``TIE``; text "distinguishable, higher", "distinguishable,
        lower", "equivalent within ±m" or "not distinguishable at this sample size"; figures {"estimate",
        "null", "margin", "distinguishable"}. An undefined (NaN) interval is ``TIE``.
    """
    defined = not any(math.isnan(x) for x in (est.value, est.lo, est.hi))
    apart = defined and not est.lo <= null <= est.hi
    inside = (defined and rule.margin is not None
              and null - rule.margin <= est.lo and est.hi <= null + rule.margin)
    figures = {"estimate": est, "null": null, "margin": rule.margin, "distinguishable": apart}
    if inside:
        return Verdict(label=EQUIVALENT, text=f"equivalent within ±{rule.margin:g}", figures=figures)
    if apart:
        side = LOWER if est.hi < null else HIGHER
        return Verdict(label=side, text=f"distinguishable, {side}", figures=figures)
    return Verdict(label=TIE, text=TIE, figures=figures)


_NULL_FIELDS = {"haar": ("o_h", "ci", "null_mean", "null_std"),
                "colspace": ("inter", "inter_ci", "colspace_null_mean", "colspace_null_std"),
                "shared-value": ("intra", "intra_ci", "intra_null_mean", "intra_null_std")}


def summary_excess(summary, null: str = "haar") -> Estimate:
    """An overlap summary's excess over one of its nulls, with the interval that counts both spreads.

    Args:
        summary: ``OverlapResult`` or its ``summary()`` dict (the chapters' stored form); for "shared-value" it
            also holds "intra_null_mean" and "intra_null_std" (``protocol.intra_null_summary``).
        null: "haar" (the headline O_h against Haar frames of its size), "colspace" (the inter-group O_h after
            W_O against frames inside each head's W_O column space) or "shared-value" (the intra-group O_h
            against heads that read the same keys and values with independent queries).
    Returns:
        ``null_excess`` of that overlap with its interval against that null's mean and s.d.; NaN throughout when
        the overlap or the null is absent (no such pairs in the model, a null not drawn).
    Raises:
        ValueError: an unknown null.
    """
    if null not in _NULL_FIELDS:
        raise ValueError(f"summary_excess's null must be one of {sorted(_NULL_FIELDS)}, got {null!r}")
    get = summary.get if isinstance(summary, dict) else lambda f: getattr(summary, f, None)
    value, ci, mean, std = (get(f) for f in _NULL_FIELDS[null])
    if value is None or ci is None or mean is None:
        return Estimate(value=math.nan, lo=math.nan, hi=math.nan, units=0)
    return null_excess(Estimate(value=value, lo=ci[0], hi=ci[1], units=0), mean, std)


def direction(est: Estimate, null: float) -> str:
    """"lower" or "higher" when ``est``'s interval lies wholly below or above ``null``, else ``TIE``: the label
    of ``decide`` under ``RULE`` (no equivalence margin).

    Args:
        est: a paired difference (null 0) or ratio (null 1) with its interval.
    """
    return decide(est, null, RULE).label


# ----------------------------------------------------------------------------- crossarch


def o_h_reproduced(source_value: float, o_h: float, ci: tuple[float, float], excess: Estimate, z: float) -> Verdict:
    """Does our O_h reproduce a published value, and where does it lie against the Haar null? Both by the rule.

    Args:
        source_value: the published O_h; o_h, ci: ours and its 95% interval.
        excess: our O_h − Haar null mean with the interval that counts both spreads (``null_excess``).
        z: (O_h − null mean) / null s.d., quoted beside the excess as its size in the null's units.
    Returns:
        label "reproduced" (our O_h − source, with our interval, equivalent within ±``OVERLAP_RULE.margin``),
        "not distinguishable" (the interval holds the source value but is wider than the margin) or "differs"
        (the interval excludes it and leaves the margin); the text adds where O_h lies against the null
        (``null_side``) with the excess and its interval, and z.
    """
    versus = decide(Estimate(value=o_h - source_value, lo=ci[0] - source_value, hi=ci[1] - source_value, units=0),
                    0.0, OVERLAP_RULE)
    label = {EQUIVALENT: "reproduced", TIE: "not distinguishable", HIGHER: "differs", LOWER: "differs"}[versus.label]
    word = {EQUIVALENT: "reproduced", TIE: "not distinguishable from the source at this sample size",
            HIGHER: "differs (higher)", LOWER: "differs (lower)"}[versus.label]
    side = null_side(excess).text
    return Verdict(label=label, text=f"{word}; {side} the null, "
                                     f"{estimate_text(excess.value, excess.lo, excess.hi, '+.3f')} (z-score {z:.1f})",
                   figures={"source": source_value, "o_h": o_h, "ci": ci, "z": z, "excess": excess, "versus": versus})


def intra_reproduced(intra: float, ci: tuple[float, float] | None = None) -> Verdict:
    """Our GQA intra-group O_h against the source's Qwen2.5-0.5B value (0.482).

    Args:
        intra: our intra-group O_h; ci: its 95% interval (without it, the point is read against the margin alone).
    Returns:
        label "reproduced" (equivalent within ±``OVERLAP_RULE.margin``), "not distinguishable" or "differs".
    """
    value = source("intra_qwen")
    lo, hi = ci if ci is not None else (intra, intra)
    versus = decide(Estimate(value=intra - value, lo=lo - value, hi=hi - value, units=0), 0.0, OVERLAP_RULE)
    label = {EQUIVALENT: "reproduced", TIE: "not distinguishable", HIGHER: "differs", LOWER: "differs"}[versus.label]
    return Verdict(label=label, text=f"{label} (source {value:.3f})",
                   figures={"source": value, "intra": intra, "ci": ci, "versus": versus})


def spearman_replicates(rho: float, p: float) -> Verdict:
    """The source's intra-model Spearman result (ρ < 0, significant) on our pooled deepest layers.

    Returns:
        label "reproduced" when ρ < 0 and p < ``ALPHA``, else "not reproduced"; text for the claims page.
    """
    ok = p < ALPHA and rho < 0
    return Verdict(label="reproduced" if ok else "not reproduced",
                   text=f"replicates here: ρ < 0 with p < {ALPHA:g}" if ok else "does not replicate here",
                   figures={"rho": rho, "p": p, "source": source("spearman_qwen")})


def intra_above_null(excesses: list[Estimate]) -> Verdict:
    """Whether every model's intra-group O_h lies above the shared-value null (``intra_null.intra_group_null``).

    Args:
        excesses: per model with intra-group pairs, its intra-group O_h − the shared-value null's mean (heads
            reading the same keys and values with independent query weights, over the same pairs), with the
            interval that counts both spreads (``null_excess``).
    Returns:
        label "above" (every model distinguishable, higher, by ``OVERLAP_RULE``), "not above" or "n/a"; the text
        counts the models on each side; figures {"excesses", "sides"}.
    """
    if not excesses:
        return Verdict(label="n/a", text="no model in this run has heads that share a KV head")
    sides = [decide(e, 0.0, OVERLAP_RULE).label for e in excesses]
    n_above = sides.count(HIGHER)
    if n_above == len(sides):
        text = "more aligned than heads that read the same values with independent queries, in every model"
    else:
        text = (f"more aligned than heads that read the same values with independent queries in {n_above} of "
                f"{len(sides)} models")
    return Verdict(label="above" if n_above == len(sides) else "not above", text=text,
                   figures={"excesses": list(excesses), "sides": sides})


def colspace_aligned(excess: dict[str, Estimate]) -> Verdict:
    """How many models' inter-group O_h after W_O lies above the null inside W_O's column space, by the rule
    (``null_side``) on each model's excess.

    Args:
        excess: {model: O_h(c) of its inter-group pairs − the column-space null's mean, with the interval that
            counts both spreads (``null_excess``)}.
    Returns:
        label "every" or "<n> of <m>"; text "more aligned than chance in every model" or "... in n of m models";
        figures {"excess", "n_above"}.
    Raises:
        ValueError: no models.
    """
    if not excess:
        raise ValueError("colspace_aligned needs at least one model")
    n_above = sum(null_side(e).figures["decision"] == HIGHER for e in excess.values())
    every = n_above == len(excess)
    return Verdict(label="every" if every else f"{n_above} of {len(excess)}",
                   text="more aligned than chance in every model" if every else
                   f"more aligned than chance in {n_above} of {len(excess)} models",
                   figures={"excess": dict(excess), "n_above": n_above})


def published_within_null(points: dict[str, Estimate]) -> Verdict:
    """The published O_h values against the Haar null at each one's (d_head, k), each by the rule.

    Each point is the published value − the Haar mean overlap of one pair of random frames at its (d_head, k),
    with the interval ``published_excess`` gives it: the source's own 95% interval where it publishes one and
    the null's spread over the source's pairs where their number is known; ``decide`` with ``OVERLAP_RULE``
    then reads a point without either against the margin alone, as ``REPRODUCED_TOL`` reads a point.

    Args:
        points: {label (e.g. "Qwen2.5-0.5B, k = 7"): ``published_excess``}, at least one.
    Returns:
        label "explained by the null" when no point is distinguishable from it, or when the points off it are no
        more than chance gives among this many decisions (``multiplicity``); else "not explained by the null
        alone"; text names each exception with its excess and the chance count; figures {"sides": {label:
        decision}, "off": [labels], "chance": ``multiplicity``'s verdict}.
    Raises:
        ValueError: no points.
    """
    if not points:
        raise ValueError("published_within_null needs at least one published value")
    sides = {lab: decide(e, 0.0, OVERLAP_RULE).label for lab, e in points.items()}
    off = [lab for lab, side in sides.items() if side in (HIGHER, LOWER)]
    chance = multiplicity(len(points), len(off))
    figures = {"sides": sides, "off": off, "chance": chance}
    if not off:
        return Verdict(label="explained by the null", figures=figures,
                       text=f"explained by the null: none of the {len(points)} published values is distinguishable "
                            f"from random frames of its size")
    named = listing([f"{lab} ({estimate_text(points[lab].value, points[lab].lo, points[lab].hi, '+.3f')}, "
                     f"{'above' if sides[lab] == HIGHER else 'below'} it)" for lab in off])
    within = chance.label == "within chance"
    return Verdict(label="explained by the null" if within else "not explained by the null alone", figures=figures,
                   text=f"{'explained by the null' if within else 'not explained by the null alone'}: {len(off)} of "
                        f"the {len(points)} published values {'lies' if len(off) == 1 else 'lie'} off it by the rule "
                        f"(its interval and the null's spread), {named} ({chance.text})")


def scratch_explained(points: dict[str, Estimate]) -> Verdict:
    """The from-scratch models' O_h (source) against the Haar null, by the rule (``published_within_null``).

    Args:
        points: {label: published − Haar pair mean} of the from-scratch points (no published intervals).
    """
    found = published_within_null(points)
    if found.label == "explained by the null":
        return Verdict(label=found.label, figures=found.figures,
                       text="explained by the null, which does not depend on training at all")
    return found


def cluster_explained(points: dict[str, Estimate], r2: float) -> Verdict:
    """'Magnitude clusters by attention design': explained by the null when no published value is
    distinguishable from it (``published_within_null``) and the null accounts for at least ``R2_NULL`` of the
    variance of our O_h over (model, k).

    Args:
        points: {label: published − Haar pair mean, with the source's interval where published}.
        r2: the share of the variance of our O_h over (model, k) that the Haar null accounts for.
    """
    found = published_within_null(points)
    ok = found.label == "explained by the null" and r2 >= R2_NULL
    if r2 < R2_NULL:
        text = f"not explained by the null alone: it accounts for {r2:.0%} of the variance of our O_h, below {R2_NULL:.0%}"
    elif ok:
        text = ("explained by the null: random frames cluster by d_head in the same way"
                + ("" if not found.figures["off"] else f" ({found.text.removeprefix('explained by the null: ')})"))
    else:
        text = found.text
    return Verdict(label="explained by the null" if ok else "not explained by the null alone", text=text,
                   figures={**found.figures, "r2": r2})


def corpus_spread(by_corpus: dict[str, Estimate]) -> Estimate:
    """The spread of an overlap over corpora, highest − lowest, with its 95% interval.

    The corpora's clouds are independent samples, so each side's half-width is the quadrature sum of the two
    overlaps' own half-widths on the sides that move the difference that way (as ``null_excess`` adds two
    spreads). Picking the extremes after the fact makes the spread read a little high; with few corpora the
    effect is small next to the intervals.

    Args:
        by_corpus: {corpus: O_h with its 95% interval}, at least two.
    Returns:
        ``Estimate`` of max − min (units 0); its lower end is cut at 0, the least a spread can be.
    Raises:
        ValueError: fewer than two corpora.
    """
    if len(by_corpus) < 2:
        raise ValueError(f"corpus_spread needs at least two corpora, got {len(by_corpus)}")
    hi = max(by_corpus.values(), key=lambda e: e.value)
    lo = min(by_corpus.values(), key=lambda e: e.value)
    d = hi.value - lo.value
    low = d - math.hypot(hi.value - hi.lo, lo.hi - lo.value)
    return Estimate(value=d, lo=max(low, 0.0), hi=d + math.hypot(hi.hi - hi.value, lo.value - lo.lo), units=0)


def corpus_stable(spread: Estimate) -> Verdict:
    """The run model's O_h spread over corpora, by the rule with ``CORPUS_TOL`` (3× the source's WikiText–C4 gap)
    as the margin: "stable" when the spread's interval lies within it.

    Args:
        spread: ``corpus_spread`` of the run's model.
    Returns:
        label "stable" (equivalent to 0 within the margin), "not shown" (the interval reaches past it) or "less
        stable" (the interval lies beyond it); figures {"spread", "tolerance"}.
    """
    gap = source("corpus")[0] - source("corpus")[1]
    found = decide(spread, 0.0, DecisionRule(margin=CORPUS_TOL)).label
    beyond = spread.lo > CORPUS_TOL
    label = "stable" if found == EQUIVALENT else "less stable" if beyond else "not shown"
    moved = ("the corpora give distinguishably different O_h" if found == HIGHER else
             "the corpora's O_h are not distinguishable at this sample size")
    text = {"stable": f"stable, as claimed: equivalent within ±{CORPUS_TOL:g} (three times the source's {gap:.3f}); "
                      f"so is the null",
            "not shown": f"stability within ±{CORPUS_TOL:g} (three times the source's {gap:.3f}) is not shown: "
                         f"{moved}, and the spread's interval reaches past the margin",
            "less stable": f"less stable than claimed: the spread's interval lies beyond {CORPUS_TOL:g} (three times "
                           f"the source's {gap:.3f})"}[label]
    return Verdict(label=label, text=text, figures={"spread": spread, "tolerance": CORPUS_TOL})


def corpus_claim(spreads: list[Estimate]) -> Verdict:
    """The inter-corpus claim over every model with inter-group pairs, each spread by ``corpus_stable``."""
    gap = source("corpus")[0] - source("corpus")[1]
    if not spreads:
        return Verdict(label="n/a", text="n/a")
    labels = [corpus_stable(s).label for s in spreads]
    if all(lab == "stable" for lab in labels):
        label, text = "stable", f"within ±{CORPUS_TOL:g} (three times the source's {gap:.3f}) in every model"
    elif "less stable" in labels:
        label, text = "less stable", (f"beyond ±{CORPUS_TOL:g} (three times the source's {gap:.3f}) in "
                                      f"{labels.count('less stable')} of {len(labels)} models")
    else:
        n_in = labels.count("stable")
        label, text = "not shown", (f"shown within ±{CORPUS_TOL:g} (three times the source's {gap:.3f}) in "
                                    + (f"none of the {len(labels)} models: every spread's interval reaches past it"
                                       if not n_in else f"{n_in} of {len(labels)} models; the other intervals reach "
                                                        f"past it"))
    return Verdict(label=label, text=text, figures={"spreads": list(spreads), "labels": labels})


# ----------------------------------------------------------------------------- atlas


_SIDE = {TIE: "is not distinguishable from", HIGHER: "lies above", LOWER: "lies below"}


def null_side(excess: Estimate) -> Verdict:
    """Where an overlap lies against its null, by the rule (``decide`` with ``OVERLAP_RULE``) on its excess.

    Args:
        excess: O − null mean with the interval that counts both the pairs' and the null's spread
            (``null_excess``).
    Returns:
        label and text "lies above", "lies below", "is not distinguishable from" or "is equivalent, within
        ±0.01, to" (the prose continues with the null); figures {"excess", "decision"}.
    """
    found = decide(excess, 0.0, OVERLAP_RULE)
    side = (f"is equivalent, within ±{OVERLAP_RULE.margin:g}, to" if found.label == EQUIVALENT else
            _SIDE[found.label])
    return Verdict(label=side, text=side, figures={"excess": excess, "decision": found.label})


def multiplicity(n_tests: int, n_off: int, rule: DecisionRule = OVERLAP_RULE) -> Verdict:
    """How many of ``n_tests`` decisions at level alpha would fall off their null by chance alone, and how
    surprising ``n_off`` is if none truly does.

    Each decision is a 95% interval; with many, some exclude the null by chance. Under "no true effect
    anywhere" (and independent tests) the count off the null is Binomial(n_tests, alpha): the expected count
    is n·alpha, and P(X ≥ n_off) says whether the observed count is more than chance gives (Bonferroni's
    family-wise view in count form).

    Args:
        n_tests: decisions made (≥ 1); n_off: how many fell off their null (0 ≤ n_off ≤ n_tests).
    Returns:
        label "within chance" when P(X ≥ n_off) ≥ alpha (or n_off = 0), else "beyond chance"; text e.g. "with
        16 decisions at α = 0.05, 0.8 would fall off their null by chance alone; 1 did (P(1 or more) = 0.56),
        within chance"; figures {"expected", "p_at_least", "n_tests", "n_off"}.
    Raises:
        ValueError: counts out of range.
    """
    if n_tests < 1 or not 0 <= n_off <= n_tests:
        raise ValueError(f"multiplicity needs 1 ≤ n_tests and 0 ≤ n_off ≤ n_tests, got {n_tests}, {n_off}")
    a = rule.alpha
    p = sum(math.comb(n_tests, i) * a ** i * (1 - a) ** (n_tests - i) for i in range(n_off, n_tests + 1))
    label = "within chance" if n_off == 0 or p >= a else "beyond chance"
    did = ("none did" if n_off == 0 else
           f"{n_off} did (P({n_off} or more) {'< 0.001' if p < 0.001 else f'= {p:.2f}'}), {label}")
    text = f"with {n_tests} decisions at α = {a:g}, {n_tests * a:.1f} would fall off their null by chance alone; {did}"
    return Verdict(label=label, text=text, figures={"expected": n_tests * a, "p_at_least": p, "n_tests": n_tests,
                                                    "n_off": n_off})


_O_H_CLAIM = {TIE: "does not replicate as a property of trained heads",
              EQUIVALENT: "does not replicate as a property of trained heads",
              LOWER: "replicates beyond the null",
              HIGHER: "does not replicate (more aligned than chance)"}


_O_H_NULLS = {"haar": "random frames in the same dimension",
              "shared-value": "heads that read the same keys and values with independent queries"}


def o_h_claim(excess: Estimate, *, null: str = "haar") -> Verdict:
    """The claim "head manifolds are mutually non-aligned (O_h ≪ 1)" judged against its chance level.

    The chance level of heads that read different KV heads is Haar frames of the same size. A model with no
    inter-group pairs (multi-query: every head reads the one KV head) has a headline over pairs that average the
    same value vectors, so random frames are not its chance level; it is judged against the shared-value null
    instead (``intra_null.intra_group_null``: the same keys and values, each head's query weights rotated by an
    independent Haar rotation).

    Args:
        excess: the headline O_h − the chosen null's mean, with the interval that counts both spreads
            (``null_excess``).
        null: "haar" (inter-group headline) or "shared-value" (a model with no inter-group pairs).
    Returns:
        label: ``null_side``'s; text: whether the claim replicates beyond chance, naming that null; figures
        {"excess", "null"}.
    Raises:
        ValueError: an unknown null.
    """
    if null not in _O_H_NULLS:
        raise ValueError(f"o_h_claim's null must be one of {sorted(_O_H_NULLS)}, got {null!r}")
    side = null_side(excess)
    return Verdict(label=side.label, figures={"excess": excess, "null": null},
                   text=f"{_O_H_CLAIM[side.figures['decision']]}: O_h {side.label} {_O_H_NULLS[null]}")


def sweep_clause(excess_by_k: dict[int, Estimate]) -> Verdict:
    """At which k of a sweep O_h is distinguishable from chance (the rule at each k).

    Args:
        excess_by_k: {k: O_h − the Haar null's mean at that k, with the interval that counts both spreads}.
    Returns:
        label "within" or "outside"; ``figures["outside"]`` the k where O_h is distinguishable from the null;
        text a clause, with how many such k chance alone gives (``multiplicity``).
    """
    ks = list(excess_by_k)
    sides = {k: decide(excess_by_k[k], 0.0, OVERLAP_RULE).label for k in ks}
    outside = [k for k in ks if sides[k] in (HIGHER, LOWER)]
    if not outside:
        text = "at no k of the sweep is it distinguishable from chance"
    else:
        where = {"above" if sides[k] == HIGHER else "below" for k in outside}
        text = (f"over the sweep it lies distinguishably {' or '.join(sorted(where))} chance at "
                f"k = {', '.join(map(str, outside))} and is not distinguishable from it at the other "
                f"{len(ks) - len(outside)} values of k ({multiplicity(len(ks), len(outside)).text})")
    return Verdict(label="outside" if outside else "within", text=text,
                   figures={"excess": dict(excess_by_k), "outside": outside, "sides": sides})


def sweep_claim(excess_by_k: dict[int, Estimate]) -> Verdict:
    """"O_h rises with k" (source: 0.210 … 0.340 on GPT-2) judged by how much of the sweep the null explains."""
    clause = sweep_clause(excess_by_k)
    n_out, n = len(clause.figures["outside"]), len(excess_by_k)
    label = ("explained by the null" if not n_out else "mostly explained by the null" if n_out < n / 2 else
             "not explained by the null alone")
    return Verdict(label=label, text=f"{label}: {clause.text}", figures=clause.figures)


def intra_split(*, o_h_ci: tuple[float, float], intra: float | None, intra_ci: tuple[float, float] | None,
                n_intra: int, n_inter: int, all_pairs: float | None, mqa: bool) -> Verdict:
    """How heads that share a KV head overlap against the headline's pairs (their 95% intervals compared).

    Args:
        o_h_ci: the headline O_h's interval (inter-group pairs); intra, intra_ci: the intra-group pairs' O_h and
            interval (None without GQA); n_intra, n_inter: the pair counts; all_pairs: O_h over every pair;
            mqa: every head reads one KV head (the headline is then over intra-group pairs).
    Returns:
        label "none", "mqa", "more", "less" or "about as much" (the intervals overlap); text a clause.
    """
    if intra is None:
        return Verdict(label="none", text="every pair of heads reads a different KV head, so there is no intra-group split")
    if mqa:
        return Verdict(label="mqa", figures={"intra": intra},
                       text=f"all {n_intra} pairs share the single KV head, so the headline is over them (O = {intra:.3f})")
    more = "more" if intra_ci[0] > o_h_ci[1] else "less" if intra_ci[1] < o_h_ci[0] else "about as much"
    return Verdict(label=more, figures={"intra": intra, "intra_ci": intra_ci, "o_h_ci": o_h_ci, "all_pairs": all_pairs},
                   text=f"the {n_intra} intra-group pairs (two query heads reading the same KV head) overlap {more}, "
                        f"O = {estimate_text(intra, intra_ci[0], intra_ci[1], '.3f')}, and all {n_inter + n_intra} pairs "
                        f"together give {all_pairs:.3f}")


def twonn_source(variant: Estimate, ratio: Estimate) -> Verdict:
    """The source's TwoNN variant on our heads: does its number replicate (against the source's 7.1, by the rule
    with ``TWONN_TOL`` as margin), and how far it reads above the unbiased fit on the same points.

    The variant ignores the truncation of the largest 10% of log μ, which on ideal data (neighbour-distance
    ratios exactly Pareto) inflates it by ``TWONN_IDEAL_RATIO`` (×1.34, ``intrinsic.twonn_source``); a ratio
    distinguishable from that says the clouds depart from the Pareto law at the nearest neighbours, which
    moves the two fits apart further (or less).

    Args:
        variant: the heads' mean variant dimension with its 95% interval over heads (``interval.mean``).
        ratio: mean variant / mean line fit over the same heads with its interval (``interval.ratio_of_means``).
    Returns:
        label "near" / "not near" (+ ", biased" when the ratio's interval lies above 1); text, e.g. "the source's
        estimator reads 11.2 [9.1, 13.6] over heads here, distinguishably above the source's 7.1; it reads 1.53×
        [1.41×, 1.66×] the unbiased fit on the same points, above the 1.34× it reads on ideal data, so these clouds
        depart from the law both fits assume: use the unbiased fit"; figures {"variant", "ratio", "source",
        "versus", "bias"}.
    """
    value = source("twonn")
    versus = decide(variant, value, DecisionRule(margin=TWONN_TOL))
    near = versus.label in (EQUIVALENT, TIE)
    against = {EQUIVALENT: f"equivalent within ±{TWONN_TOL:g} to the source's {value}",
               TIE: f"not distinguishable at this sample size from the source's {value}",
               HIGHER: f"distinguishably above the source's {value}",
               LOWER: f"distinguishably below the source's {value}"}[versus.label]
    biased = decide(ratio, 1.0, RULE).label == HIGHER
    ideal = decide(ratio, TWONN_IDEAL_RATIO, RULE).label
    departs = {TIE: f"as on ideal data ({TWONN_IDEAL_RATIO:.2f}×, the truncation it ignores)",
               HIGHER: f"above the {TWONN_IDEAL_RATIO:.2f}× it reads on ideal data, so these clouds depart from the "
                       f"law both fits assume",
               LOWER: f"below the {TWONN_IDEAL_RATIO:.2f}× it reads on ideal data, so these clouds depart from the "
                      f"law both fits assume"}[ideal]
    text = (f"the source's estimator reads {estimate_text(variant.value, variant.lo, variant.hi, '.1f')} over heads "
            f"here, {against}; it reads {times_text(ratio.value, ratio.lo, ratio.hi, '.2f')} the unbiased fit "
            f"on the same points, {departs}" + (": use the unbiased fit" if biased else ""))
    return Verdict(label=("near" if near else "not near") + (", biased" if biased else ""), text=text,
                   figures={"variant": variant, "ratio": ratio, "source": value, "versus": versus.label,
                            "bias": ideal})


def twonn_source_over_heads(variant, line_fit, boot: Bootstrap = interval.DEFAULT) -> Verdict:
    """``twonn_source`` from per-head dimensions: the variant's mean over heads and its ratio to the line fit on
    the same heads, each with its 95% interval (heads resampled; ``interval.mean``, ``interval.ratio_of_means``).

    Args:
        variant, line_fit: (head,) the source variant's and the TwoNN line fit's dimension of each head.
    Returns:
        ``twonn_source``'s verdict; its figures hold the two Estimates ("variant", "ratio").
    Raises:
        ValueError: arrays of different lengths (``interval.ratio_of_means``).
    """
    variant, line_fit = np.asarray(variant, dtype=np.float64), np.asarray(line_fit, dtype=np.float64)
    return twonn_source(interval.mean(variant[:, None], boot), interval.ratio_of_means(variant, line_fit, boot))


_TWONN_SUPPORT = {EQUIVALENT: ("supports", "to"), TIE: ("is consistent with, but does not establish,", "from"),
                  HIGHER: ("does not support", "than"), LOWER: ("does not support", "than")}


def twonn_unbiased(est: Estimate) -> Verdict:
    """The unbiased TwoNN (mean over heads) against the source's ~7 (7.1), by the rule with ``TWONN_TOL`` as margin.

    Args:
        est: the heads' mean unbiased TwoNN dimension with its 95% interval (heads the resampled units,
            ``interval.mean``).
    Returns:
        label: ``decide``'s (``EQUIVALENT``, ``TIE``, ``HIGHER``, ``LOWER``), or ``NOT_MEASURED`` when the
        estimate is undefined (NaN); text e.g. "the unbiased TwoNN, 7.31 [5.55, 9.39] over heads, is consistent
        with, but does not establish, a ~7-dimensional manifold (not distinguishable at this sample size from
        ~7.1)": "supports" when equivalent, "does not support" when distinguishable; figures
        {"estimate", "source", "decision"}. The claim is about the manifold, so it is judged by the unbiased fit;
        whether the source's number itself replicates is its variant's question (``twonn_source``).
    """
    value = source("twonn")
    figures = {"estimate": est, "source": value}
    if math.isnan(est.value):
        return Verdict(label=NOT_MEASURED, figures=figures,
                       text=f"the unbiased TwoNN is not measured here (—), so it is not set against the source's {value}")
    found = decide(est, value, DecisionRule(margin=TWONN_TOL))
    verb, link = _TWONN_SUPPORT[found.label]
    return Verdict(label=found.label, figures={**figures, "decision": found},
                   text=f"the unbiased TwoNN, {estimate_text(est.value, est.lo, est.hi, '.2f')} over heads, {verb} a "
                        f"~7-dimensional manifold ({found.text} {link} ~{value})")


def top1_recovery(gain: Estimate, recovered: Estimate) -> Verdict:
    """The top-1 claim: does the fitted rank-k frame recover more than a random one, and how does its recovered
    share compare with the source's 55.9% (three layers of GPT-2)?

    Args:
        gain: recovered − recovered_random (paired; ``interval.excess_removed_difference``).
        recovered: the fitted frame's recovered fraction.
    Returns:
        label: "<frame direction>; <versus source>", each "higher"/"lower", ``TIE`` or ``NOT_MEASURED`` (an
        undefined, NaN, figure: no damage to recover, say); text a clause for the prose, in which an undefined
        interval end reads "—".
    """
    value = source("top1_recovered")
    frame = NOT_MEASURED if math.isnan(gain.value) else direction(gain, 0.0)
    frame_text = {TIE: f"the frame and a random frame are {TIE}", "higher": "the frame recovers more than a random frame",
                  "lower": "the frame recovers less than a random frame",
                  NOT_MEASURED: "the frame's recovery against a random frame is not measured in this run"}[frame]
    versus = NOT_MEASURED if math.isnan(recovered.value) else direction(recovered, value)
    versus_text = {TIE: f"its recovery is not distinguishable from the source's {value:.1%} at this sample size",
                   "lower": f"it recovers less than the source's {value:.1%}",
                   "higher": f"it recovers more than the source's {value:.1%}",
                   NOT_MEASURED: f"its recovery is not set against the source's {value:.1%}"}[versus]
    gain_text = "—" if frame == NOT_MEASURED else f"{estimate_text(gain.value, gain.lo, gain.hi, '+.1%')} of the damage"
    return Verdict(label=f"{frame}; {versus}", text=f"{frame_text} ({gain_text}), and {versus_text}",
                   figures={"gain": gain, "recovered": recovered, "source": value})


# ----------------------------------------------------------------------------- nqp


def gate(ratio: Estimate, want: str) -> str:
    """A gate that asks for ``want`` ("lower" or "higher") of a paired perplexity ratio: "pass", "fail", or
    ``TIE`` when the interval contains 1 (the sample cannot tell, so the gate neither passes nor fails).

    Raises:
        ValueError: ``want`` is neither "lower" nor "higher".
    """
    if want not in ("lower", "higher"):
        raise ValueError(f"a gate wants 'lower' or 'higher', got {want!r}")
    found = direction(ratio, 1.0)
    return TIE if found == TIE else "pass" if found == want else "fail"


def gate_ag1(orth: float, recon: float) -> Verdict:
    """A-G1: the Fisher basis U is orthogonal and W U Uᵀ = W, both to within the source's 1e-5.

    Args:
        orth: max |UᵀU − I| over layers; recon: max |W U Uᵀ − W|.
    """
    tol = source("ag1_tol")
    label = "pass" if orth < tol and recon < tol else "fail"
    return Verdict(label=label, text=f"max |UᵀU − I| = {orth:.1e}, max |WUUᵀ − W| = {recon:.1e}",
                   figures={"orth": orth, "recon": recon, "tolerance": tol})


def gate_ag2(share_lower: float) -> Verdict:
    """A-G2: the Fisher rotation's L2 weight error is below RTN's in at least 60% of layers at 4 bits."""
    need = source("ag2_share")
    return Verdict(label="pass" if share_lower >= need else "fail", text=f"{share_lower:.0%} of layers",
                   figures={"share_lower": share_lower, "needed": need})


def gate_ag3(ratio: Estimate, ppl_fisher: float, ppl_gptq: float, *, ppl_spec: str = ".2f",
             ratio_spec: str = ".3f") -> Verdict:
    """A-G3: Fisher-rotation perplexity ≤ GPTQ's at 4 bits (paired ratio PPL_fisher / PPL_GPTQ below 1); the
    specs format the perplexities and the ratio (the chapter's own formats)."""
    return Verdict(label=gate(ratio, "lower"),
                   text=f"{number(ppl_fisher, ppl_spec)} vs {number(ppl_gptq, ppl_spec)}, ratio {ratio:{ratio_spec}}",
                   figures={"ratio": ratio})


def gate_ag4(ratio: Estimate, ppl_fisher: float, ppl_haar: float, *, ppl_spec: str = ".2f",
             ratio_spec: str = ".3f") -> Verdict:
    """A-G4: the Fisher basis beats a Haar-random rotation at 4 bits (paired ratio below 1); specs as ``gate_ag3``."""
    return Verdict(label=gate(ratio, "lower"),
                   text=f"{number(ppl_fisher, ppl_spec)} vs {number(ppl_haar, ppl_spec)}, ratio {ratio:{ratio_spec}}",
                   figures={"ratio": ratio})


GATE_TESTS = {
    "A-G1": "U orthogonal and W U Uᵀ = W to < 1e-5",
    "A-G2": "Fisher rotation has lower L2 weight error than RTN in ≥ 60% of layers at 4 bits",
    "A-G3": "Fisher rotation perplexity ≤ GPTQ at 4 bits (paired ratio below 1)",
    "A-G4": "Fisher basis beats a random (Haar) rotation at 4 bits (paired ratio below 1)",
}


def gates_idea(outcomes: dict[str, str]) -> Verdict:
    """A-G2…A-G4 together (A-G1 tests the linear algebra; the other three test the idea).

    Args:
        outcomes: {"A-G2": "pass" | "fail" | TIE, "A-G3": …, "A-G4": …}.
    """
    by = {o: [g for g, v in outcomes.items() if v == o] for o in ("pass", "fail", TIE)}
    if len(by["fail"]) == len(outcomes) == 3:
        return Verdict(label="fail", text="The three gates that test the idea itself fail", figures=dict(outcomes))
    text = "Of the three gates that test the idea itself, " + "; ".join(f"{', '.join(v)}: {o}" for o, v in by.items() if v)
    return Verdict(label="mixed", text=text, figures=dict(outcomes))


def best_text(best: str, ties: list[str]) -> Verdict:
    """The best method (lowest perplexity) and those the sample cannot tell from it (``best_method``'s result)."""
    return Verdict(label=best, text=best + (f" ({', '.join(ties)} {TIE} from it)" if ties else ""),
                   figures={"ties": list(ties)})


def fisher_rank2(pr_median: float) -> Verdict:
    """"The activation Fisher has rank ≈ 2": holds when its median participation ratio over layers is at most
    ``FISHER_RANK_PR``."""
    ok = pr_median <= FISHER_RANK_PR
    return Verdict(label="holds" if ok else "does not hold",
                   text="holds" if ok else f"does not hold: the median participation ratio is {pr_median:.1f}",
                   figures={"pr_median": pr_median})


def fisher_collapse(ratio: Estimate, baseline: str, bits: int = 3, *, ratio_spec: str = ".3f") -> Verdict:
    """Fisher-basis quantization "collapses onto GPTQ + AWQ": the Fisher rotation against the better of the two.

    Args:
        ratio: PPL_fisher / PPL_baseline, paired; baseline: its name ("GPTQ" or "AWQ").
        ratio_spec: the ratio's format.
    """
    found = direction(ratio, 1.0)
    text = {"higher": f"the Fisher rotation is worse than {baseline}, the better of GPTQ and AWQ, at {bits} bits",
            "lower": f"the Fisher rotation beats {baseline}, the better of GPTQ and AWQ, at {bits} bits",
            TIE: f"the Fisher rotation and {baseline} are {TIE} at {bits} bits"}[found]
    return Verdict(label=found, text=text + f" (perplexity ratio {ratio:{ratio_spec}})", figures={"ratio": ratio})


def fisher_not_worse(ratios: dict[tuple[str, int, int | None], Estimate], *, ratio_spec: str = ".3f") -> Verdict:
    """The prose's claim that the Fisher rotation is worse than every other method below 8 bits.

    Args:
        ratios: {(other method, bits, group or None): PPL_fisher / PPL_other, paired}.
        ratio_spec: the ratios' format.
    Returns:
        label "worse everywhere" when every interval lies above 1, else "exceptions", naming them.
    """
    not_worse = [f"{o} at {b} bits" + (f" (g{grp})" if grp else "") + f": {direction(r, 1.0)} (ratio {r:{ratio_spec}})"
                 for (o, b, grp), r in ratios.items() if direction(r, 1.0) != "higher"]
    if not not_worse:
        text = ("The Fisher rotation does not collapse onto GPTQ and AWQ: it is worse than both, and worse than plain "
                "RTN, at every bit width below 8, per channel and in groups, and worse than a Haar-random rotation, the "
                "opposite of what the idea needs (every one of these paired ratios has its interval above 1)")
    else:
        text = ("The Fisher rotation is worse than RTN, GPTQ, AWQ and the Haar rotation below 8 bits except where the "
                "paired interval says otherwise: " + "; ".join(not_worse))
    return Verdict(label="exceptions" if not_worse else "worse everywhere", text=text, figures={"ratios": dict(ratios)})


def l2_predicts(difference: Estimate) -> Verdict:
    """Which error ranks the runs as perplexity does (Spearman ρ with perplexity).

    Args:
        difference: ρ(weight error, perplexity) − ρ(output error, perplexity) over the same runs, paired
            (``interval.spearman_difference``).
    Returns:
        label "weight", "output" or ``TIE`` (the interval of the difference contains 0).
    """
    found = direction(difference, 0.0)
    label = {"higher": "weight", "lower": "output", TIE: TIE}[found]
    text = {"weight": "weight error orders the methods as perplexity does, better than the layer output error",
            "output": "layer output error predicts perplexity better than weight error",
            TIE: f"neither weight nor layer output error ranks the methods distinguishably closer to perplexity "
                 f"(difference of the two ρ {estimate_text(difference.value, difference.lo, difference.hi, '+.2f')}: "
                 f"{TIE})"}[label]
    return Verdict(label=label, text=text, figures={"difference": difference, "source": source("werr4")})


WERR_METHODS = ("RTN", "the Fisher rotation", "the random rotation", "the λ-scaled grid")  # ``source("werr4")``'s order


def werr_order(errors: tuple, boot: Bootstrap = interval.DEFAULT) -> Verdict:
    """Our 4-bit weight errors against the source's order of the same four methods (``source("werr4")``).

    The magnitudes are not comparable (another model, another normalisation), so only the order is judged.
    Each error is the mean over the model's weight matrices; each step of our order is the ratio of the two
    means with a 95% interval over matrices (``interval.ratio_of_means``, matrices resampled in pairs), and a
    step whose interval holds 1 is written "≈": that part of the order is not settled.

    Args:
        errors: per-matrix relative weight errors at 4 bits of (RTN, Fisher rotation, random rotation,
            λ-scaled grid), four (matrix,) arrays over the same matrices.
        boot: the bootstrap.
    Returns:
        label "same order" or "another order" (of the four means); text e.g. "another order than the source's:
        the random rotation < RTN < ... here (each step ×1.04 [1.03, 1.05], ... over 210 weight matrices),
        RTN < ... in the source"; figures {"ours": the four means, "source", "steps": [Estimate], "settled"}.
    Raises:
        ValueError: not four methods, or arrays of different lengths (``interval.ratio_of_means``).
    """
    if len(errors) != len(WERR_METHODS):
        raise ValueError(f"werr_order needs {len(WERR_METHODS)} methods' errors, got {len(errors)}")
    means = [float(np.mean(e)) for e in errors]
    order = sorted(range(len(means)), key=lambda i: means[i])
    steps = [interval.ratio_of_means(errors[b], errors[a], boot) for a, b in zip(order, order[1:])]
    signs = [" < " if direction(st, 1.0) == HIGHER else " ≈ " for st in steps]
    chain = WERR_METHODS[order[0]] + "".join(s + WERR_METHODS[i] for s, i in zip(signs, order[1:]))
    src = source("werr4")
    src_chain = " < ".join(WERR_METHODS[i] for i in sorted(range(len(src)), key=lambda i: src[i]))
    same = [WERR_METHODS[i] for i in order] == src_chain.split(" < ")
    n = len(np.asarray(errors[0]).ravel())
    ratios = "; ".join(times_text(st.value, st.lo, st.hi, interval.auto_spec(st.lo, st.hi)) for st in steps)
    settled = all(s == " < " for s in signs)
    here = f"{chain} here (the ratio at each step: {ratios}; 95% intervals over {n} weight matrices)"
    text = (f"the same order as the source's: {here}" if same else
            f"another order than the source's: {here}, {src_chain} in the source")
    if not settled:
        text += "; a step marked ≈ is not distinguishable, so that part of the order is not settled"
    return Verdict(label="same order" if same else "another order", text=text,
                   figures={"ours": tuple(means), "source": src, "steps": steps, "settled": settled})


def eight_bit(ratio: Estimate, *, ratio_spec: str = ".3f") -> Verdict:
    """The source's 8-bit result (34.06 standard vs 36.67 λ-scaled) is a direction: λ-scaled worse.

    Args:
        ratio: PPL_λ-scaled / PPL_RTN at 8 bits, paired; ratio_spec: its format.
    """
    found = direction(ratio, 1.0)
    text = {"higher": "replicates in direction: the λ-scaled grid is worse than standard rounding at 8 bits, as on GPT-2",
            "lower": "does not replicate: at 8 bits the λ-scaled grid is better than standard rounding here",
            TIE: f"does not replicate: at 8 bits the λ-scaled grid and standard rounding are {TIE}"}[found]
    return Verdict(label=found, text=text + f" (perplexity ratio {ratio:{ratio_spec}})",
                   figures={"ratio": ratio, "source": source("ppl8")})


# ----------------------------------------------------------------------------- kvquant


def removal_verdict(excess: Estimate, difference: Estimate, spec: str = ".1%") -> Verdict:
    """What an excess-removed fraction allows one to say, judged by the paired difference to the baseline.

    Args:
        excess: (PPL_base − PPL)/(PPL_base − PPL_fp) with its interval (``interval.excess_removed``).
        difference: PPL − PPL_base on the same blocks (``interval.ppl_difference``).
    Returns:
        label ``direction(difference, 0)``; text "removes X [lo, hi] of the excess" (difference below 0),
        "adds to the excess (removes X [lo, hi])" (above 0), "is not distinguishable from its baseline at this
        sample size (removes X [lo, hi] of the excess)"; when the baseline has no excess over fp (the fraction is
        undefined) the difference alone is reported.
    """
    found, figures = direction(difference, 0.0), {"excess": excess, "difference": difference}
    if math.isnan(excess.value):  # the baseline is not above fp: the fraction is undefined, the difference is not
        what = {TIE: "is not distinguishable from", "lower": "is lower than", "higher": "is higher than"}[found]
        return Verdict(label=found, figures=figures,
                       text=f"{what} its baseline at this sample size (the baseline has no excess over fp to remove)")
    fraction = format(excess, spec)
    text = {TIE: f"is not distinguishable from its baseline at this sample size (removes {fraction} of the excess)",
            "lower": f"removes {fraction} of the excess", "higher": f"adds to the excess (removes {fraction})"}[found]
    return Verdict(label=found, text=text, figures=figures)


def lower_verdict(nll_a, nll_b, a: str, b: str, boot: Bootstrap = interval.DEFAULT, spec: str = ".3f") -> Verdict:
    """Which of two methods has the lower perplexity on the same blocks, or that the sample cannot tell.

    Args:
        nll_a, nll_b: (block, token) NLL of the two methods on the same blocks.
    Returns:
        label ``direction(ratio, 1)``; text "a is lower than b (perplexity ratio r [lo, hi])", "a is higher than
        b (…)", or "a and b are not distinguishable at this sample size (…)".
    """
    ratio = interval.ppl_ratio(nll_a, nll_b, boot)
    found = direction(ratio, 1.0)
    how = f"{a} and {b} are {TIE}" if found == TIE else f"{a} is {found} than {b}"
    return Verdict(label=found, text=f"{how} (perplexity ratio {ratio:{spec}})", figures={"ratio": ratio})


def lowest_verdict(nlls: dict, focus: str, boot: Bootstrap = interval.DEFAULT) -> Verdict:
    """Whether ``focus`` has the lowest perplexity of ``nlls`` (all on the same blocks), paired.

    Args:
        nlls: {name: (block, token) NLL}, ``focus`` among them.
    Returns:
        label: the best name; text "<focus> has the lowest perplexity, distinguishably below every other", "<focus>
        has the lowest perplexity, but is not distinguishable from A, B at this sample size", "<best> has a lower
        perplexity than <focus>", or "<best> has the lowest perplexity, but <focus> is not distinguishable from it
        at this sample size" (the measure is named: a table beside it may show another, e.g. excess removed);
        figures {"ppl": {name: point perplexity}}.
    Raises:
        ValueError: ``focus`` is not in ``nlls``.
    """
    if focus not in nlls:
        raise ValueError(f"{focus!r} is not among the compared methods {list(nlls)}")
    ppl = {name: math.exp(interval.unit_sums(v).mean()) for name, v in nlls.items()}
    best = min(ppl, key=ppl.get)
    tied = lambda x, y: direction(interval.ppl_ratio(nlls[x], nlls[y], boot), 1.0) == TIE  # noqa: E731
    if best != focus:
        text = (f"{best} has the lowest perplexity, but {focus} is not distinguishable from it at this sample size"
                if tied(focus, best) else f"{best} has a lower perplexity than {focus}")
    else:
        ties = [n for n in nlls if n != focus and tied(n, focus)]
        text = (f"{focus} has the lowest perplexity, but is not distinguishable from {', '.join(ties)} at this sample "
                f"size" if ties else f"{focus} has the lowest perplexity, distinguishably below every other")
    return Verdict(label=best, text=text, figures={"ppl": ppl})


def range_verdict(excess: Estimate, difference: Estimate, low: float, high: float,
                  source_name: str = "the paper's") -> Verdict:
    """Where an excess-removed fraction falls against a source's reported range [low, high].

    Args:
        excess: the fraction with its interval; difference: PPL − PPL_base on the same blocks.
    Returns:
        label ``TIE`` when the difference's interval contains 0 ("not distinguishable from its baseline at this
        sample size"); else "below" / "above" when the whole interval lies below ``low`` / above ``high``, and
        "consistent" when it meets the range.
    """
    reported = f"{source_name} {low:.0%}–{high:.0%}".replace("%–", "–")
    figures = {"excess": excess, "difference": difference, "range": (low, high)}
    if not difference.distinguishable(0.0):
        return Verdict(label=TIE, text="not distinguishable from its baseline at this sample size", figures=figures)
    label = "below" if excess.hi < low else "above" if excess.lo > high else "consistent"
    return Verdict(label=label, text=f"{'consistent with' if label == 'consistent' else label} {reported}",
                   figures=figures)


def headq_range(excess: Estimate, difference: Estimate) -> Verdict:
    """HeadQ's 2-bit K-only excess removed against the paper's 84–94% (``range_verdict``)."""
    low, high = source("headq_removed")
    return range_verdict(excess, difference, low, high)


def kv_headline(nll: dict, same: dict, focus: str, controls: dict, a2: tuple | None = None,
                boot: Bootstrap = interval.DEFAULT) -> dict[str, Verdict]:
    """The KV chapter's headline verdicts from one set of evaluation blocks (all on the same blocks).

    Args:
        nll: {"per-token 2b", "headq 2b", "fp", "kivi 2b": (block, token) NLL}.
        same: {label: NLL} of the methods at HeadQ's storage; focus: HeadQ's label among them.
        controls: {name: NLL}, "the query basis" among them.
        a2: (A² policy NLL, uniform NLL, uniform's value bits) where the engine sees attention weights.
    Returns:
        {claim name: Verdict}, in the chapter's order.
    """
    pt2, hq2, fp = nll["per-token 2b"], nll["headq 2b"], nll["fp"]
    low, high = source("headq_removed")
    out = {f"HeadQ against the paper's {low:.0%}–{high:.0%}".replace("%–", "–"):
           headq_range(interval.excess_removed(pt2, hq2, fp, boot), interval.ppl_difference(hq2, pt2, boot)),
           "HeadQ against KIVI": lower_verdict(hq2, nll["kivi 2b"], "HeadQ", "KIVI", boot),
           "equal storage": lowest_verdict(same, focus, boot),
           "controls": lowest_verdict(controls, "the query basis", boot)}
    if a2 is not None:
        a2_nll, uniform_nll, vbits = a2
        out["A² in decode"] = lower_verdict(a2_nll, uniform_nll, "the A² policy", f"uniform {vbits}-bit values", boot)
    return out


def fisher_predicts(difference: Estimate) -> Verdict:
    """"Score-space (Fisher) error predicts attention KL far better than key MSE": Spearman ρ with the KL.

    Args:
        difference: ρ(Fisher form, KL) − ρ(key MSE, KL) on the same (layer, head) units, paired
            (``interval.spearman_difference``).
    Returns:
        "replicates" when the difference's interval lies above 0, "does not replicate" below, else ``TIE``.
    """
    found = direction(difference, 0.0)
    label = {"higher": "replicates", "lower": "does not replicate", TIE: TIE}[found]
    return Verdict(label=label, text=label, figures={"difference": difference})


def a2_offline(ratio: Estimate) -> Verdict:
    """The A² value policy's offline output error (attention fixed) against uniform values at the same bits.

    Args:
        ratio: mean A² error / mean uniform error over paired (layer, block) units, with its interval
            (``interval.ratio_of_means``).
    Returns:
        label ``direction(ratio, 1)``; text "is lower than", "is higher than" or "is not distinguishable at this
        sample size from" (the prose continues with "that of uniform quantization").
    """
    found = direction(ratio, 1.0)
    text = {"lower": "is lower than", "higher": "is higher than", TIE: f"is {TIE} from"}[found]
    return Verdict(label=found, text=text, figures={"ratio": ratio})


def a2_claim(decode: Verdict | None, offline: Verdict) -> Verdict:
    """The source's "HeadQ + the A² value policy improves every model", on this model.

    Args:
        decode: ``lower_verdict`` of the A² policy against uniform values in decode (perplexity), None when the
            engine could not run it; offline: ``a2_offline`` (output error with attention fixed).
    Returns:
        label "holds", "does not hold" or ``TIE``; text "holds on this model", "does not hold on this model" or
        "not shown at this sample size". Perplexity in decode decides; the offline error decides only when the
        policy was not decoded. One model can refute "every model" but not establish it.
    """
    found = offline.label if decode is None else decode.label
    label = {"lower": "holds", "higher": "does not hold", TIE: TIE}[found]
    text = {"holds": "holds on this model", "does not hold": "does not hold on this model",
            TIE: "not shown at this sample size"}[label]
    return Verdict(label=label, text=text, figures={"decode": decode, "offline": offline})


def side_code_clause(difference: Estimate, baseline: str, distinct: str, tail: str) -> Verdict:
    """A prose clause on whether a side code changes perplexity beyond its baseline.

    Args:
        difference: PPL − PPL_baseline, paired; baseline: e.g. "no side code".
        distinct: the clause when the difference's interval excludes 0 (e.g. "already");
        tail: what follows "is not distinguishable from <baseline> at this sample size" otherwise (", though it").
    Returns:
        label ``direction(difference, 0)``; text ``distinct`` or the not-distinguishable clause (the prose continues
        with what the side code removes).
    """
    found = direction(difference, 0.0)
    text = f"is not distinguishable from {baseline} at this sample size{tail}" if found == TIE else distinct
    return Verdict(label=found, text=text, figures={"difference": difference})


# ----------------------------------------------------------------------------- sparse


def lossless(kl: list[float], first_divergence: list) -> Verdict:
    """"Anchor + window + top-k is lossless": holds only when every model's KL to dense is 0 and no greedy
    continuation diverges.

    Args:
        kl: per model, the mean KL(dense ‖ sparse) of next-token distributions.
        first_divergence: per model, its first diverging step, or None / "none" when identical throughout.
    """
    same = all(d is None or d == "none" for d in first_divergence)
    ok = all(v == 0 for v in kl) and same
    return Verdict(label="holds" if ok else "does not hold", text="holds" if ok else "does not hold",
                   figures={"kl": list(kl), "first_divergence": list(first_divergence)})


def kept_mass(kept: Estimate, discarded: np.ndarray) -> Verdict:
    """The kept set's attention mass against the source's 94.1%, by the rule with ``MASS_TOL`` as margin, and
    whether any query loses mass at all.

    Args:
        kept: the mean kept mass over sparse layers, heads and queries, with its 95% interval (blocks resampled).
        discarded: every (layer, head, query)'s discarded mass m (any shape).
    Returns:
        label: ``decide``'s (``EQUIVALENT``, ``HIGHER``, ``LOWER``, ``TIE``) against 94.1% with margin ``MASS_TOL``;
        figures {"kept", "zero_share", "source", "decision", "phrase"}, where "phrase" states both facts the
        interval gives, to stand before "the source's 94.1%": e.g. "within 3 percentage points of, but
        distinguishably below," when the interval lies inside the margin and excludes 94.1%; text the same
        sentence with the estimate, then whether the kept set is lossless.
    """
    value = source("mass")
    zero_share = float((np.asarray(discarded) < M_ZERO).mean())
    found = decide(kept, value, DecisionRule(margin=MASS_TOL))
    side = LOWER if kept.hi < value else HIGHER
    points = f"{100 * MASS_TOL:g} percentage points"
    if found.label == EQUIVALENT:
        phrase = f"within {points} of" + (f", but distinguishably {_BELOW[side]}," if found.figures["distinguishable"] else "")
    elif found.label == TIE:
        phrase = "not distinguishable at this sample size from"
    else:
        phrase = f"distinguishably {_BELOW[found.label]}, and more than {points} from,"
    zero = f"{M_ZERO:.0e}".replace("e-0", "e-")  # "1e-7"
    text = (f"{estimate_text(kept.value, kept.lo, kept.hi, '.1%')} on average, {phrase} the "
            f"source's {value:.1%}; but the attention mass dropped exceeds {zero} for {1 - zero_share:.1%} of queries, so "
            f"{'not ' if zero_share < 1 else ''}lossless")
    return Verdict(label=found.label, text=text, figures={"kept": kept, "zero_share": zero_share, "source": value,
                                                          "decision": found, "phrase": phrase})


_BELOW = {LOWER: "below", HIGHER: "above"}


def page_selection(index_recall: float) -> Verdict:
    """The page selector against exact top-k: the share of the exact top-k keys it finds."""
    if index_recall >= RECALL_NEAR:
        label, text = "near", "finds nearly the same set"
    elif index_recall < RECALL_MOST:
        label, text = "misses most", "a further approximation: it misses most of the exact top-k"
    else:
        label, text = "misses part", "a further approximation: it misses part of the exact top-k"
    return Verdict(label=label, text=text, figures={"index_recall": index_recall})


def speedup(measured: float) -> Verdict:
    """Our largest measured speed-up against the source's 159× (label and text "reached" / "not reached")."""
    label = "reached" if measured >= source("speedup") else "not reached"
    return Verdict(label=label, text=label, figures={"measured": measured, "source": source("speedup")})


def fused_decode(kernel: Estimate | dict[int, Estimate], step: Estimate | None) -> Verdict:
    """Whether a low-bit cache decodes faster than fp: the fused kernel against fp32 SDPA, and the whole step.

    Args:
        kernel: fp32 SDPA time / fused kernel time for one layer's decode attention (> 1: the kernel is faster),
            with its interval over timed rounds (``sparse.bench.speedup_estimate``); or {cached tokens: that
            ratio} over a sweep of contexts, of which the largest is quoted and every one is judged.
        step: the quantized cache's fused whole decode step / the fp cache's step (< 1: faster), with its
            interval; None when the whole step was not timed.
    Returns:
        by the rule on each interval (``direction`` against 1): label "faster" (the kernel distinguishably faster
        at every context and the step not distinguishably slower, or not timed), "kernel only" (the kernel
        faster at every context, the step distinguishably slower), "some contexts" (the kernel distinguishably
        faster at some contexts only) or "not faster" (at none); a sentence naming the figures with their
        intervals; figures {"kernel", "step", "faster_at", "slower_at"}.
    """
    kernels = kernel if isinstance(kernel, dict) else {0: kernel}
    n_max = max(kernels)
    top = kernels[n_max]
    faster_at = [n for n, k in kernels.items() if direction(k, 1.0) == HIGHER]
    slower_at = [n for n, k in kernels.items() if direction(k, 1.0) == LOWER]
    where = f" at {n_max:,} cached tokens" if isinstance(kernel, dict) else ""
    text = f"the fused 2-bit kernel runs at {times_text(top.value, top.lo, top.hi)} the speed of fp32 SDPA{where}"
    if isinstance(kernel, dict) and len(kernels) > 1:
        text += (f" (distinguishably faster at {len(faster_at)} of {len(kernels)} contexts"
                 + (f", slower at {listing(f'{n:,}' for n in sorted(slower_at))} tokens" if slower_at else "") + ")")
    if step is not None:
        text += f", and the whole decode step takes {times_text(step.value, step.lo, step.hi)} the fp cache's"
    slower_step = step is not None and direction(step, 1.0) == HIGHER
    if not faster_at:
        label = "not faster"
    elif len(faster_at) < len(kernels):
        label = "some contexts"
    elif slower_step:
        label = "kernel only"
    else:
        label = "faster"
    prefix = {"not faster": "not faster", "kernel only": "faster in the kernel only",
              "some contexts": "faster in the kernel at some contexts only", "faster": "faster"}[label]
    return Verdict(label=label, text=f"{prefix}: {text}",
                   figures={"kernel": kernel, "step": step, "faster_at": faster_at, "slower_at": slower_at})


def side_code_cost(ratio: Estimate) -> Verdict:
    """What a side code costs the fused decode step: its step time over the same cache's without it, by the rule.

    Args:
        ratio: median step time with the side code / without it, paired over interleaved rounds
            (``sparse.bench.speedup_estimate``), with its 95% interval.
    Returns:
        label ``direction`` against 1 ("higher": slower, "lower": faster, ``TIE``); text e.g. "takes 0.96× [0.76×,
        1.31×] the time of the same cache without it: not distinguishable at this sample size"; figures {"ratio"}.
    """
    found = direction(ratio, 1.0)
    word = {HIGHER: "distinguishably slower", LOWER: "distinguishably faster", TIE: TIE}[found]
    return Verdict(label=found, figures={"ratio": ratio},
                   text=f"takes {times_text(ratio.value, ratio.lo, ratio.hi)} the time of the same cache without it: "
                        f"{word}")


def survival_vs_revision(gaps: dict[int, list[str]], n_new: int, n_keys: int) -> Verdict:
    """Our greedy survival against the revision's, support by support.

    The revision's runs are other prompts on other models, so nothing pairs them with ours: each statistic is
    compared by whether our 95% interval and the revision's (exact for its share identical, bootstrap for its
    median first divergence) meet (``fidelity.survival_agreement``). Intervals that meet leave the two
    not distinguishable at these sample sizes; this is weaker than the paired rule (``decide``), which needs
    shared units.

    Args:
        gaps: {support S the revision also ran: ``fidelity.survival_agreement``'s phrases (empty: the
            intervals meet)}.
        n_new: tokens generated per run; n_keys: prompt + generated tokens (the keys a support is a share of).
    Returns:
        label "n/a", ``TIE`` (every support), "partly" or "differs" (every support); text for the claims page.
    """
    ran = [s for s, _ in source("revision_first_divergence")]
    alike = [str(s) for s, g in gaps.items() if not g]
    shortest = source("revision_shortest_context")
    differ = [f"at S = {s}, which keeps at least {s / n_keys:.0%} of our keys against at most {s / shortest:.0%} at the "
              f"revision's shortest context: " + " and ".join(g) for s, g in gaps.items() if g]
    if not gaps:
        return Verdict(label="n/a", text=f"cannot be compared with the revision: none of the supports run is one of its "
                                         f"{', '.join(map(str, ran))}")
    how = "(unpaired: each 95% interval meets the revision's)"
    if not differ:
        return Verdict(label=TIE, figures={"gaps": dict(gaps)},
                       text=f"are not distinguishable from the revision's at every support run (S = {', '.join(alike)}) "
                            f"{how}: runs identical through {n_new} tokens are as rare and first divergences as early")
    if alike:
        return Verdict(label="partly", figures={"gaps": dict(gaps)},
                       text=f"are not distinguishable from the revision's at S = {', '.join(alike)} {how}; they differ "
                            + "; ".join(differ))
    return Verdict(label="differs", figures={"gaps": dict(gaps)},
                   text="differ from the revision's at every support run: " + "; ".join(differ))
