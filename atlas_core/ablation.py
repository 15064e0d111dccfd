"""The ablation chapter's numbers: the source protocol on a checkpoint of a model trained from scratch, the
reading of its O_h against the right null, and the mediation statistic (does d_int explain O_h beyond d_head?).

``measure_checkpoint`` runs the protocol of ``protocol`` (the deepest layer's ε clouds, frames of rank k,
mean principal cosine, the Haar null; the shared-value null of intra-group pairs under GQA/MQA) on a loaded
checkpoint (``train.model.load_checkpoint``), and in every layer the per-head TwoNN dimension and the
per-head mean overlap, from which the depth profile's plateau and peak follow (``intrinsic.layer_profile``,
as the atlas chapter reads them). ``on_null`` reads a headline against its chance level by the book's rule;
``partial_correlation`` is the mediation statistic with its bootstrap interval.

Axis vocabulary as in ``geometry``: ``head``, ``point``, ``d``.
"""

from __future__ import annotations

import math

import numpy as np

from atlas_core import claims
from atlas_core.clouds import head_clouds, kv_groups
from atlas_core.geometry import head_mean_overlap
from atlas_core.interval import DEFAULT, Bootstrap, Estimate, check_units
from atlas_core.intrinsic import layer_profile, per_head_dropped
from atlas_core.models import LoadedModel
from atlas_core.protocol import Protocol, intra_null, intra_null_summary, overlap_summary, protocol_overlap

__all__ = ["AT_NULL", "NULL_NAMES", "checkpoint_title", "measure_checkpoint", "null_verdict", "on_null",
           "partial_correlation", "unigram_perplexity", "variant_title"]

NULL_NAMES = {"haar": "the Haar null", "shared-value": "the shared-value null"}  # ``on_null``'s nulls, in words
_AXIS_TITLES = {"base": "the base model", "mha": "MHA", "mqa": "MQA (one KV head)", "rope": "RoPE",
                "learned": "learned positions", "rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}


def variant_title(name: str) -> str:
    """A variant's name (``train.config.variants``: "dhead256", "gqa2", "learned", ...) in words for prose:
    "d_head 256", "GQA (2 KV heads)", "learned positions"; an unknown name is returned as it is."""
    if name.startswith("dhead") and name[5:].isdigit():
        return f"d_head {name[5:]}"
    if name.startswith("gqa") and name[3:].isdigit():
        return f"GQA ({name[3:]} KV heads)"
    return _AXIS_TITLES.get(name, name)


def checkpoint_title(fraction: float) -> str:
    """A checkpoint (fraction of training done) in words: "at initialisation", "at 10% of training", "at the end"."""
    return "at initialisation" if fraction == 0 else "at the end" if fraction == 1 else f"at {fraction:.0%} of training"

AT_NULL = (claims.TIE, claims.EQUIVALENT)  # decisions of an overlap not distinguishable from its null


def measure_checkpoint(lm: LoadedModel, p: Protocol) -> dict:
    """The protocol's numbers on one checkpoint, and the per-head statistics of every layer.

    Args:
        lm: a loaded model (``train.model.load_checkpoint``, or ``models.load_model``).
        p: the protocol; its first corpus and seed give the clouds (``Protocol.cloud_spec``), ``p.k`` the rank.
    Returns:
        {"main": ``overlap_summary`` of the deepest layer's ε (O_h, CI, pairs, Haar null, z, inter/intra, the
         mean and per-head TwoNN d_int) with "intra_null_mean", "intra_null_std", "intra_null_n_pairs",
         "intra_null_z" (the shared-value null, ``protocol.intra_null``; None under MHA),
         "profile": ``intrinsic.layer_profile`` of the mean TwoNN d_int over heads ("plateau": relative depth 0.9,
         "peak"), "heads": {"layer", "head", "d_int", "overlap"} per head of every layer (lists; overlap =
         ``geometry.head_mean_overlap``: with the heads of other KV groups, all others under MQA),
         "d_head", "n_layers", "kv_groups"}
    Raises:
        ValueError: a protocol the model cannot run (``Protocol.check``: k >= d_head); fewer than two layers
            (``layer_profile``).
    """
    s = lm.spec
    p.check(s.d_head, s.n_layers)
    groups = kv_groups(lm)
    layers = list(range(s.n_layers))
    deep = layers[-1]
    eps = head_clouds(lm, layers, "eps", p.cloud_spec(), progress=False)  # {layer: (head, point, d_head)}
    results = {L: protocol_overlap(eps[L], groups, p) for L in layers}
    d_int = {L: per_head_dropped(eps[L], "twonn")[0] for L in layers}  # {layer: (head,)}
    main = overlap_summary(results[deep], eps[deep])
    main.update(intra_null_summary(main["intra"], intra_null(lm, deep, p)))
    heads = {"layer": [L for L in layers for _ in range(s.n_heads)],
             "head": [h for _ in layers for h in range(s.n_heads)],
             "d_int": np.concatenate([d_int[L] for L in layers]).tolist(),
             "overlap": np.concatenate([head_mean_overlap(results[L].matrix, groups) for L in layers]).tolist()}
    profile = layer_profile({L: float(v.mean()) for L, v in d_int.items()}, s.n_layers)
    return {"main": main, "profile": profile, "heads": heads, "d_head": s.d_head, "n_layers": s.n_layers,
            "kv_groups": groups.tolist()}


def on_null(main: dict) -> claims.Verdict:
    """Where a headline O_h lies against its chance level, by the book's rule (``claims.null_side`` on
    ``claims.summary_excess``: the excess over the null with an interval that counts both the spread over pairs
    and the null's).

    The chance level of inter-group pairs (MHA, GQA) is the Haar null; a multi-query headline has only
    intra-group pairs, judged against the shared-value null (``claims.o_h_claim``'s choice).

    Args:
        main: ``measure_checkpoint(...)["main"]``.
    Returns:
        ``claims.null_side``'s verdict, with figures {"excess", "decision", "null": "haar" | "shared-value"}.
    Raises:
        ValueError: an intra-only (MQA) headline without a shared-value null.
    """
    if main["pairs"] == "inter":
        null = "haar"
    else:
        if main.get("intra_null_std") is None:
            raise ValueError("an intra-only (MQA) headline needs its shared-value null (intra_null_mean, intra_null_std)")
        null = "shared-value"
    side = claims.null_side(claims.summary_excess(main, null))
    return claims.Verdict(label=side.label, text=side.text, figures={**side.figures, "null": null})


def null_verdict(sides: dict[str, claims.Verdict]) -> claims.Verdict:
    """Whether every headline sits on its null, from ``on_null``'s verdicts, with equivalence kept apart from
    "not distinguishable" (the first is evidence of no effect within the margin, the second only of too small
    a sample to tell).

    Args:
        sides: {label (e.g. "base (seed 0) at end"): ``on_null`` verdict}, at least one.
    Returns:
        label "on the null" (no decision off the null) or "off the null"; text says how many lie off (naming
        each with its side) and how the rest split into equivalent and not distinguishable; figures {"n",
        "n_at_null", "n_equivalent", "n_tie", "off": [labels]}.
    Raises:
        ValueError: no verdicts.
    """
    if not sides:
        raise ValueError("null_verdict needs at least one verdict")
    off = {lab: v for lab, v in sides.items() if v.figures["decision"] not in AT_NULL}
    n_eq = sum(v.figures["decision"] == claims.EQUIVALENT for v in sides.values())
    n = len(sides)
    figures = {"n": n, "n_at_null": n - len(off), "n_equivalent": n_eq, "n_tie": n - len(off) - n_eq,
               "off": list(off)}
    split = (f"{n_eq} equivalent to it within ±{claims.OVERLAP_RULE.margin:g}, {figures['n_tie']} not "
             f"distinguishable from it at this sample size")
    if not off:
        return claims.Verdict(label="on the null", figures=figures, text=f"none of {n} lies off its null ({split})")
    named = "; ".join(f"{lab} {v.text} it" for lab, v in off.items())
    rest = f"; of the other {n - len(off)}, {split}" if len(off) < n else ""
    return claims.Verdict(label="off the null", figures=figures,
                          text=f"{len(off)} of {n} {'lies off its' if len(off) == 1 else 'lie off their'} null: {named}{rest}")


def unigram_perplexity(train_tokens, held_out_tokens, vocab_size: int) -> float:
    """Held-out perplexity of the unigram model of the training tokens (add-one smoothed): the floor a
    language model must beat before it has learned anything beyond token frequencies.

    Args:
        train_tokens: (token,) integer ids the model was trained on.
        held_out_tokens: (token,) or (block, token) integer ids it is evaluated on.
        vocab_size: the vocabulary's size (ids lie in [0, vocab_size)).
    Returns:
        exp of the mean negative log-probability of the held-out tokens (every one, as predicted targets
        are compared with a model's: callers pass the targets).
    Raises:
        ValueError: an id outside [0, vocab_size), or no tokens on either side.
    Source: Laplace (add-one) smoothing, Jurafsky & Martin, *Speech and Language Processing*, 3rd ed., §3.5.
    """
    train = np.asarray(train_tokens).ravel()
    held = np.asarray(held_out_tokens).ravel()
    if train.size == 0 or held.size == 0:
        raise ValueError("unigram_perplexity needs training and held-out tokens")
    for name, ids in (("train_tokens", train), ("held_out_tokens", held)):
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"{name}: ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(math.exp(-log_p[held].mean()))


def _partial_r(y: np.ndarray, x: np.ndarray, strata: np.ndarray) -> float:
    """Pearson correlation of y and x after each has its stratum mean removed (NaN when a side is constant)."""
    ry, rx = y.copy(), x.copy()
    for s in np.unique(strata):
        m = strata == s
        ry[m] -= ry[m].mean()
        rx[m] -= rx[m].mean()
    denom = math.sqrt(float((ry * ry).sum() * (rx * rx).sum()))
    return float((ry * rx).sum() / denom) if denom > 0 else math.nan


def partial_correlation(y, x, strata, boot: Bootstrap = DEFAULT) -> Estimate:
    """The correlation of y with x holding a stratum fixed (e.g. per-head overlap with d_int, d_head fixed).

    Both y and x lose their mean within each stratum; the statistic is the Pearson correlation of what
    remains, the partial correlation of y and x given the stratum as a categorical covariate (equivalently
    the standardized slope of x in the regression of y on x with one intercept per stratum). Its interval
    resamples units within each stratum (each keeps its size, so the covariate's design is fixed); a draw
    whose x or y is constant within every stratum has no correlation and is left out of the percentiles.

    Args:
        y, x: (unit,) values of the same units (e.g. each head's mean overlap and its TwoNN d_int), no NaN.
        strata: (unit,) the covariate held fixed (e.g. each head's d_head); a stratum of one unit adds nothing.
        boot: resamples, level and seed.
    Returns:
        ``Estimate`` (value in [-1, 1], NaN when x or y is constant within every stratum; ``units``: the units).
    Raises:
        ValueError: lengths differ, NaN, or fewer than ``interval.MIN_UNITS`` units.
    Source: the partial correlation coefficient (Fisher 1924; Cohen, Cohen, West & Aiken, *Applied Multiple
    Regression/Correlation Analysis*, 3rd ed., 2003, §3.3); the stratified bootstrap (Davison & Hinkley,
    *Bootstrap Methods and their Application*, 1997, §3.2).
    """
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    strata = np.asarray(strata)
    if not (y.ndim == x.ndim == strata.ndim == 1 and len(y) == len(x) == len(strata)):
        raise ValueError(f"partial_correlation needs y, x and strata of one length, got shapes {y.shape}, {x.shape}, "
                         f"{strata.shape}")
    if np.isnan(y).any() or np.isnan(x).any():
        raise ValueError("partial_correlation needs values without NaN")
    check_units(len(y), "units")
    value = _partial_r(y, x, strata)
    rng = np.random.default_rng(boot.seed)
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    resampled = np.empty(boot.n_resamples)
    for i in range(boot.n_resamples):
        idx = np.concatenate([rng.choice(m, size=len(m)) for m in members])
        resampled[i] = _partial_r(y[idx], x[idx], strata[idx])
    lo, hi = boot.interval(resampled)
    return Estimate(value=value, lo=lo, hi=hi, units=len(y))
