"""What each chapter's parameters may be: checked by the runner before a kernel starts.

The runner already checks names and types against the notebook's ``parameters`` cell; this module
checks values: every element of a list (an integer where the notebook counts, a finite number, a known
name), ranges, and the cross-field rules. It does not restate the library's rules: it builds the
library's configs from the parameters (``SparseExperiment``, ``KVMethod``, ``WQuantSpec``,
``BlockSpec``, ``CloudSpec``, ``CalibConfig``, ``EvalSetup``) and lets their rules speak, with the
model's shape (read from its config and tokenizer, no weights: ``models.describe``) where a rule needs it
(k < d_head, a group that divides the widths it applies to, rank ≤ d_head). Every refusal is one
``ParameterValueError`` naming the parameter, never a traceback.

One explicit function per chapter, so that a reader sees every rule in one place. It runs in two stages,
split by its one ``yield``: first the rules that need no model (types, counts, ranges, the cross-field rules,
then the library's configs), then those that read the model's config or tokenizer (seconds: transformers
is imported, a tokenizer may be converted or a corpus tokenized). Between them ``check_values`` checks
that the corpora and models exist. So an impossible count (k = -3) is refused in the time of an import,
never after a model's files are read; this module imports no torch until a rule needs it. Every chapter
with an entry also gets the common rules (model, models, corpus, corpora must exist); a chapter without
one (a user's own notebook) gets none.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, Iterator

from atlas_core.zoo import ModelError  # no torch: zoo reads only names and packages

if TYPE_CHECKING:
    from atlas_core.corpus import BlockSpec
    from atlas_core.models import ModelSpec


class ParameterValueError(ValueError):
    """A parameter has the right type but an impossible value."""


def _fail(name: str, value, why: str) -> None:
    raise ParameterValueError(f"parameter {name!r} = {value!r}: {why}")


def _as(name: str, value, make: Callable):
    """``make()``: a library config or rule; its ValueError becomes a refusal of parameter ``name``."""
    try:
        return make()
    except (ParameterValueError, ModelError):
        raise
    except ValueError as err:
        _fail(name, value, str(err))


# --- elements and ranges ---------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(p: dict, *names: str, low: int = 1) -> None:
    """Integers ≥ ``low`` (counts: ≥ 1; seeds and offsets: ≥ 0); a list needs one and checks each element."""
    for name in names:
        value = p[name]
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            _fail(name, value, "needs at least one value")
        bad = [v for v in values if not _is_int(v)]
        if bad:
            _fail(name, value, f"must be integers; {bad[0]!r} is not" if isinstance(value, list) else "must be an integer")
        if any(v < low for v in values):
            what = "each must be" if isinstance(value, list) else "must be"
            _fail(name, value, f"{what} ≥ {low}" + (" (a count)" if low == 1 else ""))


def _number(p: dict, name: str, low: float, high: float) -> None:
    """A finite number in [low, high]."""
    value = p[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "must be a finite number")
    if not low <= value <= high:
        _fail(name, value, f"must lie in [{low}, {high}]")


def _names(p: dict, name: str, allowed: tuple[str, ...] | None = None) -> None:
    """Strings (a list needs one), each one of ``allowed`` when given."""
    value = p[name]
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        _fail(name, value, "needs at least one value")
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        _fail(name, value, f"must be names (strings); {bad[0]!r} is not")
    unknown = [v for v in values if allowed is not None and v not in allowed]
    if unknown:
        _fail(name, value, f"unknown {unknown}; choose from {', '.join(allowed)}")


def _contains(p: dict, name: str, needed: list) -> None:
    """The chapter's prose and verdicts compare these values: more may be added, none removed."""
    missing = [v for v in needed if v not in p[name]]
    if missing:
        _fail(name, p[name], f"the chapter compares {needed}; add {missing}")


def _units(p: dict, *names: str) -> None:
    """Block counts that the intervals resample: at least ``interval.MIN_UNITS`` (one resamples to itself)."""
    from atlas_core.interval import MIN_UNITS

    for name in names:
        if p[name] < MIN_UNITS:
            _fail(name, p[name], f"must be ≥ {MIN_UNITS}: the intervals resample these blocks (one gives a point)")


def _corpus(name: str, value, corpus) -> None:
    """``corpus.check_corpus``'s rule (the one ``load_text`` applies), naming parameter ``name``."""
    from atlas_core.corpus import check_corpus

    _as(name, value, lambda: check_corpus(corpus))


def _block_spec(p: dict, name: str, corpus: str, seq_len: int, n_blocks: int, split: str = "eval") -> BlockSpec:
    """The blocks a chapter reads, naming ``name``: ``BlockSpec``'s rules (seq_len ≥ 2, ≥ 1 block), no model.
    ``_blocks`` checks them against the model once the model-free rules have passed."""
    from atlas_core.corpus import BlockSpec

    return _as(name, p[name], lambda: BlockSpec(corpus=corpus, seq_len=seq_len, n_blocks=n_blocks, split=split))


def _blocks(p: dict, name: str, spec: BlockSpec, models: list[str] | None = None) -> None:
    """The blocks ``spec`` (from ``_block_spec``) against each model, naming ``name``: no longer than its
    positions (``models.check_positions``), and no more than the corpus split holds (``corpus.check_blocks``
    with the model's tokenizer alone)."""
    from atlas_core.corpus import check_blocks, surely_holds
    from atlas_core.models import check_positions

    for model in models or [p["model"]]:
        _as(name, p[name], lambda model=model: check_positions(model, spec.seq_len, name))
        if not surely_holds(spec):  # count the tokens only when the text's length cannot vouch for them
            try:
                check_blocks(_tokenizer(model), spec)
            except (ParameterValueError, ModelError):
                raise
            except ValueError as err:  # a corpus too short for the blocks: name the corpus's parameter too
                owner = _corpus_parameter(p, spec.corpus)
                where = "" if owner is None else f" with {owner!r} = {p[owner]!r}"
                raise ParameterValueError(f"parameter {name!r} = {p[name]!r}{where}: {err}") from None


def _corpus_parameter(p: dict, corpus: str) -> str | None:
    """The parameter that chose ``corpus`` ("corpus", "corpora", "certified_corpus", ...), or None (fixed)."""
    return next((k for k, v in p.items() if ("corpus" in k or "corpora" in k)
                 and (v == corpus or (isinstance(v, (list, tuple)) and corpus in v))), None)


@functools.lru_cache(maxsize=16)
def _tokenizer(model: str):
    """The model's tokenizer and spec, no weights (``models.load_tokenizer``), once per model."""
    from atlas_core.models import load_tokenizer

    return load_tokenizer(model)


# --- the model's shape -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _shape(model: str) -> ModelSpec:
    """The model's attention shape from its config and tokenizer (no weights; ``models.describe``)."""
    from atlas_core.models import describe

    return describe(model)


@functools.lru_cache(maxsize=16)
def _linear_widths(model: str) -> tuple[int, ...]:
    """``wquant.layers.linear_widths`` of the model's config (no weights), once per model."""
    from atlas_core.models import model_config
    from atlas_core.wquant.layers import linear_widths

    return linear_widths(model_config(model))


def _k_below_d_head(p: dict, name: str, models: list[str]) -> None:
    """Frame ranks k of ε clouds: ``geometry.check_rank`` (1 ≤ k < d_head and k < n_points) on every model."""
    from atlas_core.geometry import check_rank

    ks = p[name] if isinstance(p[name], list) else [p[name]]
    for model in models:
        for k in ks:
            _as(name, p[name], lambda k=k: check_rank(k, _shape(model).d_head, p["n_points"]))


# --- rules every chapter shares ------------------------------------------------------------------------------

def _model(name: str, value, model: str) -> None:
    """``check_model_name(model)``, its refusal naming the parameter that gave the model."""
    from atlas_core.models import check_model_name

    try:
        check_model_name(model)
    except ModelError as err:
        given = f"parameter {name!r}" if repr(str(value)) in str(err) else f"parameter {name!r} = {value!r}"
        raise ModelError(f"{given}: {err}") from None  # the value once: the refusal usually quotes it already


def _common(p: dict) -> None:
    """Rules shared by every chapter, run before its own, no model: models are names, corpora are given."""
    for name in ("model", "models", "other_models"):  # other_models: a comma-separated string
        if name in p:
            _names(p, name)
    for name in ("corpus", "corpora"):
        if name in p and isinstance(p[name], list) and not p[name]:
            _fail(name, p[name], "needs at least one corpus")


def _known(p: dict) -> None:
    """Rules shared by every chapter, run after its model-free rules: the corpora exist, then the models
    (``models.check_model_name``: the first rule that imports transformers; it reads no model's files)."""
    for name in ("corpus", "corpora"):
        if name in p:
            for corpus in p[name] if isinstance(p[name], list) else [p[name]]:
                _corpus(name, p[name], corpus)
    for name in ("model", "models"):
        if name in p:
            for model in p[name] if isinstance(p[name], list) else [p[name]]:
                _model(name, p[name], model)
    if "other_models" in p:
        for model in filter(None, (m.strip() for m in p["other_models"].split(","))):
            _model("other_models", p["other_models"], model)


def _rest(rules: Iterator[None]) -> None:
    """The rules after a chapter's ``yield``: those that read the model's config or tokenizer."""
    for _ in rules:
        pass


# --- per chapter: the rules that need no model, ``yield``, the rules on the model ----------------------------

def _models(p: dict) -> Iterator[None]:
    _ints(p, "ppl_tokens", "ppl_seq_len", "invariant_blocks", "invariant_seq_len")
    if p["ppl_tokens"] % p["ppl_seq_len"]:
        _fail("ppl_tokens", p["ppl_tokens"], f"must be a multiple of ppl_seq_len ({p['ppl_seq_len']})")
    ppl = [_block_spec(p, "ppl_seq_len", corpus, p["ppl_seq_len"], p["ppl_tokens"] // p["ppl_seq_len"])
           for corpus in p["corpora"]]
    invariant = _block_spec(p, "invariant_seq_len", "britannica", p["invariant_seq_len"], p["invariant_blocks"])
    yield  # --- the model's positions and tokenizer
    for spec in ppl:
        _blocks(p, "ppl_seq_len", spec, models=p["models"])
    _blocks(p, "invariant_seq_len", invariant, models=p["models"])


def _cloud(p: dict, name: str, corpus: str, seed: int) -> None:
    """The point clouds a chapter reads: ``CloudSpec``'s rule (2 ≤ n_points ≤ n_blocks × (seq_len − 1))."""
    from atlas_core.clouds import CloudSpec

    _as(name, p[name], lambda: CloudSpec(corpus=corpus, seq_len=p["seq_len"], n_blocks=p["n_blocks"],
                                         n_points=p["n_points"], seed=seed))


def _atlas(p: dict) -> Iterator[None]:
    from atlas_core.geometry import METRICS  # no torch

    _ints(p, "seq_len", "n_blocks", "n_points", "k", "k_sweep", "n_boot", "null_draws", "intra_null_draws",
          "blas_threads", "top1_seq_len", "top1_eval_blocks", "top1_calib_seq_len", "top1_calib_blocks")
    _ints(p, "seed", low=0)
    _names(p, "metric", METRICS)
    if p["k"] not in p["k_sweep"]:
        _fail("k_sweep", p["k_sweep"], f"must contain the headline k = {p['k']}")
    from atlas_core.intra_null import IntraNullSpec

    _as("intra_null_draws", p["intra_null_draws"], lambda: IntraNullSpec(n_draws=p["intra_null_draws"]))
    blocks = {"seq_len": _block_spec(p, "seq_len", p["corpus"], p["seq_len"], p["n_blocks"]),
              "top1_seq_len": _block_spec(p, "top1_seq_len", p["corpus"], p["top1_seq_len"], p["top1_eval_blocks"]),
              "top1_calib_seq_len": _block_spec(p, "top1_calib_seq_len", p["corpus"], p["top1_calib_seq_len"],
                                                p["top1_calib_blocks"], "calib")}
    _cloud(p, "n_points", p["corpus"], p["seed"])
    yield  # --- the model's positions, tokenizer and d_head
    for name, spec in blocks.items():
        _blocks(p, name, spec)
    for name in ("k", "k_sweep"):
        _k_below_d_head(p, name, [p["model"]])


def _crossarch(p: dict) -> Iterator[None]:
    _ints(p, "k", "k_range", "n_points", "n_blocks", "seq_len", "n_deep", "n_boot", "null_draws", "n_perm",
          "spearman_null_draws")
    _ints(p, "intra_null_draws", low=2)  # a mean and a standard deviation of the draws
    _ints(p, "seeds", low=0)
    _number(p, "mid_depth", 0.0, 1.0)
    if p["k"] not in p["k_range"]:
        _fail("k_range", p["k_range"], f"must contain the headline k = {p['k']}")
    blocks = [_block_spec(p, "seq_len", corpus, p["seq_len"], p["n_blocks"]) for corpus in p["corpora"]]
    for seed in p["seeds"]:
        _cloud(p, "n_points", p["corpora"][0], seed)
    yield  # --- every model's positions, tokenizer, d_head and layers
    models = list(dict.fromkeys([p["model"], *p["models"]]))
    for spec in blocks:
        _blocks(p, "seq_len", spec, models=models)
    for name in ("k", "k_range"):
        _k_below_d_head(p, name, models)
    for model in models:  # the depth test reads the n_deep deepest layers of every model
        n_layers = _shape(model).n_layers
        if not 1 <= p["n_deep"] <= n_layers:
            _fail("n_deep", p["n_deep"], f"must be between 1 and the {n_layers} layers of {model}")


def kvquant_methods(p: dict) -> dict[str, list]:
    """The KV methods the kvquant chapter runs, by the parameter that sets them (bits, kv_bits, ranks, ...).

    Raises:
        ParameterValueError: a method the library refuses (``KVMethod``'s rules), naming the parameter.
    """
    from atlas_core.kvquant.experiment import CONTROLS, KVMethod

    def k(name, method, b, **kw):
        kw = {"group": p["group"], "rank": p["rank"], "side_bits": p["side_bits"], "seed": p["seed"], **kw}
        return _as(name, p[name], lambda: KVMethod(method=method, kbits=b, **kw))

    trio = ("per-token", "kivi", "headq")
    return {  # the settings every method shares first, so that a bad one is named, not the bits it ran with
        "side_bits": [k("side_bits", "headq", 2)],
        "seed": [k("seed", "headq", 2, control="random-basis")],
        "rank": [k("rank", "headq", 2, control=c) for c in CONTROLS] + [k("rank", "headq", 2, base="kivi")],
        "group": [k("group", "per-token", 2, vbits=2)]
        + [k("group", m, 2, group=p["group"] // 2) for m in ("per-token", "kivi")],  # HeadQ 2b's budget
        "bits": [k("bits", m, b) for b in p["bits"] for m in trio],
        "kv_bits": [k("kv_bits", m, b, vbits=b) for b in p["kv_bits"] for m in trio],
        "ranks": [k("ranks", "headq", 2, rank=r) for r in p["ranks"]],
        "a2_budget": [k("a2_budget", "headq", 2, vbits=p["a2_budget"]),
                      k("a2_budget", "headq", 2, vbits=p["a2_budget"], a2_low=2)],  # the policy's low values: 2 bits
    }


def _kvquant(p: dict) -> Iterator[None]:
    _ints(p, "seq_len", "eval_blocks", "prefill", "calib_blocks", "group", "bits", "kv_bits", "ranks", "rank",
          "side_bits", "metric_blocks", "a2_budget",
          "code_bits", "code_kv_bits", "speed_contexts")  # the key-code study and speed benchmarks (_kvquant_codes)
    _ints(p, "seed", low=0)
    _ints(p, "step_ctx", low=0)
    for name in ("engine", "metric_layers", "code_families", "code_kv_families"):
        _names(p, name)
    _units(p, "eval_blocks")
    if p["metric_blocks"] > p["eval_blocks"]:
        _fail("metric_blocks", p["metric_blocks"], f"exceeds eval_blocks ({p['eval_blocks']}): the study reads the first of them")
    for name, needed in (("bits", [2, 3]), ("kv_bits", [2])):  # the prose quotes these runs; more may be added
        _contains(p, name, needed)
    from atlas_core.kvquant.experiment import EvalSetup
    from atlas_core.kvquant.quant import QuantSpec  # the offline study groups each block's keys per channel (KIVI)

    setup = _as("engine", p["engine"], lambda: EvalSetup(engine=p["engine"], prefill=p["prefill"]))
    _as("prefill", p["prefill"], lambda: setup.check_block(p["seq_len"]))
    blocks = {"seq_len": _block_spec(p, "seq_len", p["corpus"], p["seq_len"], p["eval_blocks"]),
              "calib_blocks": _block_spec(p, "calib_blocks", p["corpus"], p["seq_len"], p["calib_blocks"], "calib")}
    methods = kvquant_methods(p)  # built in the order that names a setting every method shares, not its bits
    _as("group", p["group"], lambda: QuantSpec(bits=2, group=p["group"], axis="channel").check_tokens(p["seq_len"]))
    yield  # --- the model's positions, tokenizer and shape
    from atlas_core.kvquant.study import study_layers

    for name, spec in blocks.items():
        _blocks(p, name, spec)
    shape = _shape(p["model"])
    for name in sorted(methods, key=lambda name: {"group": 0, "rank": 1}.get(name, 2)):  # head rules: group, rank first
        for method in methods[name]:
            _as(name, p[name], lambda m=method: m.check_head(shape.d_head))
    _as("metric_layers", p["metric_layers"], lambda: study_layers(p["metric_layers"], shape.n_layers))
    _kvquant_codes(p, shape)


def _kvquant_codes(p: dict, shape) -> None:
    """The key-code study (``storage.study_methods``) and the speed benchmarks (``bench.check_kv_decode``,
    ``bench.check_bench``) of the kvquant chapter, by the rules those functions apply on the model's shape
    (their counts and names are checked with the chapter's model-free rules, in ``_kvquant``)."""
    from atlas_core.kvquant import bench, fused, storage

    pre_rope = shape.family != "gpt2"
    for bits, fams in (("code_bits", "code_families"), ("code_kv_bits", "code_kv_families")):
        chosen = tuple(f.strip() for f in p[fams].split(",") if f.strip()) or None
        _as(fams, p[fams], lambda b=bits, c=chosen: storage.study_methods(
            p[b], p["group"], b == "code_kv_bits", p["rank"], c, pre_rope, shape.d_head))
    if fused.available():
        _as("speed_contexts", p["speed_contexts"], lambda: bench.check_kv_decode(
            p["speed_contexts"], 2, shape.n_heads, shape.n_kv_heads, shape.d_head, 3, 3))
    if p["step_ctx"]:
        _as("step_ctx", p["step_ctx"], lambda: bench.check_bench(p["model"], p["step_ctx"], 8, 2, 2, p["group"], p["rank"],
                                                                  p["side_bits"]))


NQP_NEEDS = {"bits": [8, 4, 3],
             "methods": ["rtn", "gptq", "awq", "rot-fisher", "rot-haar", "rot-hadamard", "nqp-scaled"],
             "grouped_methods": ["rtn", "gptq", "awq", "rot-fisher"]}


def _nqp(p: dict) -> Iterator[None]:
    _ints(p, "seq_len", "calib_blocks", "eval_blocks", "group", "bits")
    _ints(p, "seed", low=0)
    if p["gptq_calib_tokens"] is not None:
        _ints(p, "gptq_calib_tokens")
    _units(p, "eval_blocks")
    from atlas_core.wquant.apply import METHODS
    from atlas_core.wquant.calib import CalibConfig
    from atlas_core.wquant.rtn import WQuantSpec

    for name in ("methods", "grouped_methods"):
        _names(p, name, METHODS)
    for name, needed in NQP_NEEDS.items():
        _contains(p, name, needed)
    for b in p["bits"]:
        _as("bits", p["bits"], lambda b=b: WQuantSpec(bits=b))
    blocks = {"seq_len": _block_spec(p, "seq_len", p["corpus"], p["seq_len"], p["eval_blocks"]),
              "calib_blocks": _block_spec(p, "calib_blocks", p["corpus"], p["seq_len"], p["calib_blocks"], "calib")}
    grouped = _as("group", p["group"], lambda: WQuantSpec(bits=3, group=p["group"]))  # the grouped comparison: 3 bits
    given = {"corpus": p["gptq_calib_corpus"], "tokens": p["gptq_calib_tokens"]}
    if given["corpus"] is not None:
        _corpus("gptq_calib_corpus", given["corpus"], given["corpus"])
    cal = _as("gptq_calib_tokens", given["tokens"], lambda: CalibConfig(**{k: v for k, v in given.items() if v is not None}))
    gptq_p = {**p, "gptq_calib_tokens": cal.tokens}
    gptq = _block_spec(gptq_p, "gptq_calib_tokens", cal.corpus, cal.seq_len, cal.block_spec().n_blocks, "calib")
    yield  # --- the model's positions, tokenizer and layer widths
    for name, spec in blocks.items():
        _blocks(p, name, spec)
    for width in _linear_widths(p["model"]):
        _as("group", p["group"], lambda width=width: grouped.group_size(width))
    _blocks(gptq_p, "gptq_calib_tokens", gptq)


def sparse_experiment(p: dict):
    """The sparse chapter's rules (``SparseExperiment``) from its parameters; refusals name the parameter."""
    from atlas_core.sparse.experiment import SparseExperiment
    from atlas_core.sparse.kept import SparseConfig

    rule = _as("window", p["window"], lambda: SparseConfig(anchors=p["anchors"], window=p["window"], topk=p["topk"],
                                                           page_size=p["page_size"]))
    return _as("windows", p["windows"], lambda: SparseExperiment(rule=rule, windows=tuple(p["windows"]),
                                                                 topks=tuple(p["topks"])))


def _sparse(p: dict) -> Iterator[None]:
    _ints(p, "seq_len", "eval_blocks", "sweep_blocks", "prompt_tokens", "gen_tokens", "sweep_gen_tokens", "window",
          "windows", "page_size", "contexts", "bench_rounds", "survival_prompts", "survival_prompt_tokens", "supports")
    _ints(p, "anchors", "topk", "topks", low=0)
    _ints(p, "survival_gen_tokens", low=2)
    _units(p, "eval_blocks", "sweep_blocks")
    if p["sweep_blocks"] > p["eval_blocks"]:
        _fail("sweep_blocks", p["sweep_blocks"], f"exceeds eval_blocks ({p['eval_blocks']}): the sweep reads the first of them")
    if p["sweep_gen_tokens"] > p["gen_tokens"]:
        _fail("sweep_gen_tokens", p["sweep_gen_tokens"], f"exceeds gen_tokens ({p['gen_tokens']})")
    from atlas_core.sparse.blocks import block_rule

    experiment = sparse_experiment(p)
    _as("seq_len", p["seq_len"], lambda: experiment.check_block(p["seq_len"], "seq_len"))
    _as("prompt_tokens", p["prompt_tokens"], lambda: experiment.check_prompt(p["prompt_tokens"], "prompt_tokens"))
    blocks = {"seq_len": _block_spec(p, "seq_len", p["corpus"], p["seq_len"], p["eval_blocks"]),
              "prompt_tokens": _block_spec(p, "prompt_tokens", p["corpus"], p["prompt_tokens"], 1, "calib"),
              "survival_prompt_tokens": _block_spec(p, "survival_prompt_tokens", p["corpus"], p["survival_prompt_tokens"],
                                                    p["survival_prompts"])}
    _as("contexts", p["contexts"], lambda: experiment.rule.check_context(min(p["contexts"]), "every context"))
    rules = [_as("supports", p["supports"], lambda s=s: block_rule(s, p["anchors"], p["window"], p["page_size"]))
             for s in p["supports"]]
    seen = p["survival_prompt_tokens"] + p["survival_gen_tokens"] - 1  # keys at the last decode step
    if all(rule.keeps_every_key(seen) for rule in rules):
        smallest = min(p["supports"])
        _fail("survival_prompt_tokens", p["survival_prompt_tokens"],
              f"too short: every support keeps every key (the smallest, {smallest}, needs more than "
              f"{smallest - p['survival_gen_tokens'] + 1} prompt tokens)")
    certified = _certified(p, [p["model"]])
    next(certified)  # its rules that need no model
    yield  # --- every model's positions and tokenizer
    from atlas_core.models import check_positions

    others = [m.strip() for m in p["other_models"].split(",") if m.strip()]
    _blocks(p, "seq_len", blocks["seq_len"], models=[p["model"], *others])
    _blocks(p, "prompt_tokens", blocks["prompt_tokens"], models=[p["model"], *others])
    _blocks(p, "survival_prompt_tokens", blocks["survival_prompt_tokens"])
    for model in [p["model"], *others]:  # a prompt and its generation share the positions
        _as("gen_tokens", p["gen_tokens"], lambda m=model: check_positions(m, p["prompt_tokens"] + p["gen_tokens"],
                                                                           "prompt_tokens + gen_tokens"))
    _as("survival_gen_tokens", p["survival_gen_tokens"],
        lambda: check_positions(p["model"], p["survival_prompt_tokens"] + p["survival_gen_tokens"],
                                "survival_prompt_tokens + survival_gen_tokens"))
    _rest(certified)  # its rules on the model


CERTIFIED_NEEDS = [1e-3]  # the certified section's prose reads its ε = 10⁻³ figures (the targets)


def certified_rules(p: dict) -> list:
    """The sparse chapter's certified rules, one per ``certified_eps`` (``SparseConfig``'s rules name the value)."""
    from atlas_core.sparse.kept import SparseConfig

    eps = p["certified_eps"]
    if not isinstance(eps, list) or not eps:
        _fail("certified_eps", eps, "needs at least one value")
    return [_as("certified_eps", eps, lambda e=e: SparseConfig(
        selector="certified", eps=e, bound=p["certified_bound"], anchors=p["anchors"], window=p["window"], topk=0,
        page_size=p["page_size"])) for e in eps]


def _certified(p: dict, models: list[str]) -> Iterator[None]:
    """Certified sparse decoding: its ε targets, page bound, block length, blocks and survival prompts; like a
    chapter, the rules that need no model, ``yield``, the rules on each model."""
    from atlas_core.sparse.kept import BOUNDS

    _ints(p, "certified_prompt_tokens", "certified_blocks", "certified_survival_prompts")
    _units(p, "certified_blocks")
    _names(p, "certified_bound", BOUNDS)
    _corpus("certified_corpus", p["certified_corpus"], p["certified_corpus"])
    rules = certified_rules(p)
    _contains(p, "certified_eps", CERTIFIED_NEEDS)
    n = p["certified_prompt_tokens"]
    _as("certified_prompt_tokens", n, lambda: rules[0].check_block(n, "certified_prompt_tokens"))
    blocks = _block_spec(p, "certified_prompt_tokens", p["certified_corpus"], n,
                         max(p["certified_blocks"], p["certified_survival_prompts"]))
    yield  # --- each model's d_head, positions and tokenizer
    from atlas_core.models import check_positions

    for model in models:
        _as("certified_bound", p["certified_bound"], lambda m=model: rules[0].check_head(_shape(m).d_head, "certified_bound's rank"))
        _as("certified_prompt_tokens", n, lambda m=model: check_positions(
            m, n + p["survival_gen_tokens"], "certified_prompt_tokens + survival_gen_tokens"))
    _blocks(p, "certified_prompt_tokens", blocks, models=models)


def _ablation(p: dict) -> Iterator[None]:
    """The models trained here: the library's configs and variants (``train.config``) decide what can be built;
    the pretrained model is not read, and the corpus's tokenizer (trained here) comes after the ``yield``."""
    from atlas_core.train.config import DEVICES, ArchConfig, TrainConfig, check_pair, variants  # no torch

    _ints(p, "d_model", "n_layers", "n_heads", "vocab_size", "tokens", "batch_size", "train_seq_len", "eval_blocks",
          "k", "n_points", "n_blocks", "seq_len", "n_boot", "null_draws", "d_heads")
    _ints(p, "intra_null_draws", low=2)
    _ints(p, "seeds", low=0)
    _names(p, "device", DEVICES)
    _number(p, "lr", 0.0, 1.0)
    _names(p, "variants")  # strings; which ones exist depends on n_heads and d_heads, checked below
    for name in ("seeds", "variants", "d_heads"):  # a repeat would train and count the same run twice
        if len(set(map(str, p[name]))) < len(p[name]):
            _fail(name, p[name], "lists a value twice")
    if p["n_layers"] < 2:
        _fail("n_layers", p["n_layers"], "must be ≥ 2 (the depth profile reads the plateau between layers)")
    base = _as("d_heads", p["d_heads"], lambda: ArchConfig(
        d_model=p["d_model"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p["n_heads"],
        d_head=p["d_heads"][0], vocab_size=p["vocab_size"], max_positions=max(256, p["train_seq_len"], p["seq_len"])))
    table = _as("d_heads", p["d_heads"], lambda: variants(base, tuple(p["d_heads"])))
    unknown = [v for v in p["variants"] if v not in table]
    if unknown:
        _fail("variants", p["variants"], f"unknown {unknown} with n_heads = {p['n_heads']} and d_heads = "
                                         f"{p['d_heads']}; choose from {', '.join(table)}")
    if all(table[v].n_kv_heads == 1 for v in p["variants"]):
        _fail("variants", p["variants"], "needs a variant with more than one KV head (the main headline and the "
                                         "mediation read pairs of heads from different KV groups)")
    train_fields = {"lr": "lr", "tokens": "tokens", "batch_size": "batch_size", "seq_len": "train_seq_len",
                    "eval_blocks": "eval_blocks", "device": "device", "corpus": "corpus"}
    try:
        cfg = TrainConfig(corpus=p["corpus"], tokens=p["tokens"], batch_size=p["batch_size"], seq_len=p["train_seq_len"],
                          lr=p["lr"], min_lr=p["lr"] / 10, eval_blocks=p["eval_blocks"], device=p["device"])
    except ValueError as err:  # blamed on the parameter the library's message names
        field = next((f for f in train_fields if str(err).startswith(f)), "tokens")
        _fail(train_fields[field], p[train_fields[field]], str(err))
    _as("train_seq_len", p["train_seq_len"], lambda: check_pair(base, cfg))
    from atlas_core.corpus import check_corpus
    from atlas_core.geometry import check_rank
    from atlas_core.train.loop import held_out_blocks, resolve_device

    _as("device", p["device"], lambda: resolve_device(p["device"]))
    _as("corpus", p["corpus"], lambda: check_corpus(p["corpus"]))
    _cloud(p, "n_points", p["corpus"], 0)
    for name in p["variants"]:  # k below every trained head's width
        _as("k", p["k"], lambda name=name: check_rank(p["k"], table[name].d_head, p["n_points"]))
    yield  # --- the corpus's tokenizer (trained on it once, then cached)
    from atlas_core.train.tokenizer import load_tokenizer

    _as("eval_blocks", p["eval_blocks"], lambda: held_out_blocks(load_tokenizer(p["corpus"], p["vocab_size"]), cfg))


RULES: dict[str, Callable[[dict], Iterator[None]]] = {
    "models": _models, "atlas": _atlas, "crossarch": _crossarch, "ablation": _ablation,
    "kvquant": _kvquant, "nqp": _nqp, "sparse": _sparse,
}


def check_values(chapter: str, values: dict) -> None:
    """Check a chapter's full parameter set (defaults with overrides applied, types already coerced): the rules
    that need no model first, so that an impossible value is refused before any model's files are read.

    Raises:
        ParameterValueError: a value is impossible (the message names it and says what is allowed).
        ModelError: a model cannot be found (the message lists what can be used).
    """
    rule = RULES.get(chapter)
    if rule is not None:
        _common(values)
        rules = rule(values)
        next(rules)  # the chapter's rules that need no model: types, counts, ranges, the library's configs
        _known(values)  # the corpora and models exist
        _rest(rules)  # the rules that read the model's config or tokenizer
