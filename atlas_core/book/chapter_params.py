"""What each chapter's parameters may be: checked by the runner before a kernel starts.

The runner already checks names and types against the notebook's ``parameters`` cell; this module
checks values (a block count of 0, an unknown corpus or model, 1-bit quantization, a frame rank larger
than the head). One explicit function per chapter, so that a reader sees every rule in one place.
Every chapter with an entry also gets the common rules (model, models, corpus, corpora must exist); a
chapter without one (a user's own notebook) gets none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from atlas_core.corpus import CORPORA
from atlas_core.kvquant.experiment import ENGINES as KV_ENGINES
from atlas_core.models import check_model_name
from atlas_core.wquant.apply import METHODS as WQUANT_METHODS


class ParameterValueError(ValueError):
    """A parameter has the right type but an impossible value."""


def _fail(name: str, value, why: str) -> None:
    raise ParameterValueError(f"parameter {name!r} = {value!r}: {why}")


def _positive(p: dict, *names: str) -> None:
    for name in names:
        value = p[name]
        values = value if isinstance(value, list) else [value]
        if not values or any(v <= 0 for v in values):
            _fail(name, value, "must be > 0" + (" (and not empty)" if isinstance(value, list) else ""))


def _at_least(p: dict, name: str, low) -> None:
    value = p[name]
    if any(v < low for v in (value if isinstance(value, list) else [value])):
        _fail(name, value, f"must be ≥ {low}")


def _units(p: dict, *names: str) -> None:
    """Block counts that the intervals resample: at least ``interval.MIN_UNITS`` (one resamples to itself)."""
    from atlas_core.interval import MIN_UNITS

    for name in names:
        if p[name] < MIN_UNITS:
            _fail(name, p[name], f"must be ≥ {MIN_UNITS}: the intervals resample these blocks (one gives a point)")


def _fraction(p: dict, name: str) -> None:
    if not 0.0 <= p[name] <= 1.0:
        _fail(name, p[name], "must lie in [0, 1]")


def _corpus(name: str, corpus: str) -> None:
    if corpus not in CORPORA and not Path(corpus).expanduser().is_file():
        _fail(name, corpus, f"not a corpus ({', '.join(CORPORA)}) nor an existing text file")


def _common(p: dict) -> None:
    """Rules shared by every chapter: the models and corpora must exist."""
    for name in ("model", "models"):
        if name in p:
            for model in p[name] if isinstance(p[name], list) else [p[name]]:
                check_model_name(model)
    if "other_models" in p:  # a comma-separated string
        for model in filter(None, (m.strip() for m in p["other_models"].split(","))):
            check_model_name(model)
    if "corpus" in p:
        _corpus("corpus", p["corpus"])
    if "corpora" in p:
        if not p["corpora"]:
            _fail("corpora", p["corpora"], "needs at least one corpus")
        for corpus in p["corpora"]:
            _corpus("corpora", corpus)
    if "models" in p and not p["models"]:
        _fail("models", p["models"], "needs at least one model")


def _models(p: dict) -> None:
    _positive(p, "ppl_tokens", "ppl_seq_len", "invariant_blocks", "invariant_seq_len")
    if p["ppl_tokens"] % p["ppl_seq_len"]:
        _fail("ppl_tokens", p["ppl_tokens"], f"must be a multiple of ppl_seq_len ({p['ppl_seq_len']})")


def _atlas(p: dict) -> None:
    _positive(p, "seq_len", "n_blocks", "n_points", "k", "k_sweep", "n_boot", "null_draws",
              "blas_threads", "top1_seq_len", "top1_eval_blocks", "top1_calib_seq_len",
              "top1_calib_blocks")
    _at_least(p, "seq_len", 2)
    if p["metric"] not in ("source", "projection"):
        _fail("metric", p["metric"], "must be 'source' or 'projection'")
    if p["k"] not in p["k_sweep"]:
        _fail("k_sweep", p["k_sweep"], f"must contain the headline k = {p['k']}")
    if p["n_points"] > p["n_blocks"] * (p["seq_len"] - 1):
        _fail("n_points", p["n_points"], f"more than the {p['n_blocks'] * (p['seq_len'] - 1)} positions "
              "that n_blocks × (seq_len − 1) provide")


def _crossarch(p: dict) -> None:
    _positive(p, "k", "k_range", "n_points", "n_blocks", "seq_len", "n_deep", "n_boot",
              "null_draws", "n_perm", "spearman_null_draws")
    _at_least(p, "seeds", 0)
    if not p["seeds"]:
        _fail("seeds", p["seeds"], "needs at least one seed")
    _fraction(p, "mid_depth")
    if p["k"] not in p["k_range"]:
        _fail("k_range", p["k_range"], f"must contain the headline k = {p['k']}")


def _kvquant(p: dict) -> None:
    _positive(p, "seq_len", "eval_blocks", "prefill", "calib_blocks", "group", "ranks", "rank",
              "side_bits", "metric_blocks", "a2_budget")
    if not p["prefill"] <= p["seq_len"] - 2:
        _fail("prefill", p["prefill"], f"must be at most seq_len − 2 ({p['seq_len'] - 2}): a token must be decoded and scored after it")
    _units(p, "eval_blocks")
    for name, needed in (("bits", [2, 3]), ("kv_bits", [2])):  # the prose quotes these runs; more may be added
        if any(not 2 <= b <= 8 for b in p[name]) or any(b not in p[name] for b in needed):
            _fail(name, p[name], f"each must be in 2..8, and the chapter compares {needed}")
    if not 1 <= p["side_bits"] <= 8:
        _fail("side_bits", p["side_bits"], "must be in 1..8")
    if p["engine"] not in KV_ENGINES:
        _fail("engine", p["engine"], f"must be one of {', '.join(KV_ENGINES)}")
    if not 3 <= p["a2_budget"] <= 8:  # decode: values at a2_budget bits, the policy's at 2 bits and fp
        _fail("a2_budget", p["a2_budget"], "must be in 3..8 (payload bits per value; the policy's low values take 2)")


NQP_NEEDS = {"bits": [8, 4, 3],
             "methods": ["rtn", "gptq", "awq", "rot-fisher", "rot-haar", "rot-hadamard", "nqp-scaled"],
             "grouped_methods": ["rtn", "gptq", "awq", "rot-fisher"]}


def _nqp(p: dict) -> None:
    _positive(p, "seq_len", "calib_blocks", "eval_blocks", "group")
    _units(p, "eval_blocks")
    if not p["bits"] or any(not 2 <= b <= 16 for b in p["bits"]):
        _fail("bits", p["bits"], "each must be in 2..16")
    for name in ("methods", "grouped_methods"):
        unknown = [m for m in p[name] if m not in WQUANT_METHODS]
        if unknown:
            _fail(name, p[name], f"unknown {unknown}; choose from {', '.join(WQUANT_METHODS)}")
    # The chapter's prose and verdicts compare these settings; more may be added, none removed.
    for name, needed in NQP_NEEDS.items():
        missing = [v for v in needed if v not in p[name]]
        if missing:
            _fail(name, p[name], f"the chapter compares {needed}; add {missing}")


def _sparse(p: dict) -> None:
    _positive(p, "seq_len", "eval_blocks", "sweep_blocks", "prompt_tokens", "gen_tokens", "sweep_gen_tokens",
              "window", "windows", "page_size", "contexts", "bench_rounds")
    _at_least(p, "anchors", 0)
    _at_least(p, "topk", 0)
    _at_least(p, "topks", 0)
    if not p["topks"]:
        _fail("topks", p["topks"], "needs at least one value")
    _units(p, "eval_blocks", "sweep_blocks")
    if p["sweep_blocks"] > p["eval_blocks"]:
        _fail("sweep_blocks", p["sweep_blocks"], f"exceeds eval_blocks ({p['eval_blocks']}): the sweep reads the first of them")
    if p["sweep_gen_tokens"] > p["gen_tokens"]:
        _fail("sweep_gen_tokens", p["sweep_gen_tokens"], f"exceeds gen_tokens ({p['gen_tokens']})")
    longest = p["anchors"] + max([p["window"], *p["windows"]]) + max([p["topk"], *p["topks"]])  # the sweep's too
    if p["seq_len"] <= longest:
        _fail("seq_len", p["seq_len"], f"must be longer than anchors + window + topk of every rule run ({longest}), "
              "or nothing is dropped")
    _positive(p, "survival_prompts", "survival_prompt_tokens", "supports")
    _at_least(p, "survival_gen_tokens", 2)
    blocks = [(s - p["anchors"] - p["window"]) // p["page_size"] for s in p["supports"]]
    if any(r < 1 or p["anchors"] + p["window"] + r * p["page_size"] != s for r, s in zip(blocks, p["supports"])):
        _fail("supports", p["supports"], "each must be anchors + window + page_size·r with r ≥ 1 (the revision's block rule)")
    last = p["survival_prompt_tokens"] + p["survival_gen_tokens"] - 1 - p["anchors"] - p["window"]  # candidates
    if min(p["supports"]) - p["anchors"] - p["window"] >= last:
        _fail("survival_prompt_tokens", p["survival_prompt_tokens"],
              f"too short: every support keeps every key (the smallest, {min(p['supports'])}, needs more than "
              f"{min(p['supports']) - p['survival_gen_tokens'] + 1} prompt tokens)")


RULES: dict[str, Callable[[dict], None]] = {
    "models": _models, "atlas": _atlas, "crossarch": _crossarch,
    "kvquant": _kvquant, "nqp": _nqp, "sparse": _sparse,
}


def check_values(chapter: str, values: dict) -> None:
    """Check a chapter's full parameter set (defaults with overrides applied, types already coerced).

    Raises:
        ParameterValueError: a value is impossible (the message names it and says what is allowed).
        ModelError: a model cannot be found (the message lists what can be used).
    """
    rule = RULES.get(chapter)
    if rule is not None:
        _common(values)
        rule(values)
