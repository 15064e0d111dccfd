"""Fidelity of sparse attention against the model's own dense attention (SPEC §10), with intervals (SPEC §11).

- Teacher forced, over token blocks (``teacher_forced_rules``): per block and position,
  KL(p_dense ‖ p_sparse) of the next-token distribution and whether the two argmax tokens agree (both at
  the positions ≥ a + W + k, where the sparse rule can drop anything), the NLL of each, and the mass the
  kept sets discard. The dense reference of a block is computed once and scored against every rule;
  blocks are the bootstrap unit of every interval (``atlas_core.interval``).
- Greedy generation from one prompt, dense and sparse, with the KV cache (``greedy``): the reference.
  The dense continuation is cached on disk (``dense_continuation``).
- The same first divergence for the price of one forward pass (``trajectory_agreement``): the sparse
  model reads the dense greedy continuation and we check, step by step, whether its own greedy choice
  would have been the dense token. Sparse greedy generation reproduces the dense tokens exactly up to
  the first step where that check fails, so both give the same first divergence (up to float ties: the
  one pass sums in another order than step-by-step decoding, so a step whose two best logits differ by
  float rounding can go either way).
- Greedy survival over many prompts (``greedy_survival``), by the revised source's protocol: a dense
  prefill shared by dense and sparse decoding, then greedy decoding with the rule active only in the
  decode steps (``SparseConfig.sparse_from``); per prompt the first divergence, summarised by its median
  and the share of runs identical through 128 tokens, prompts as the bootstrap unit. One sparse forward
  pass over the dense continuation on top of the dense prefill's cache gives it;
  ``greedy_survival_reference`` decodes free-running, step by step (a test holds the two equal).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta as beta_dist
import torch.nn.functional as F
from transformers import DynamicCache

from atlas_core import interval
from atlas_core.claims import TIE, direction
from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.cache import cache_dir, cache_key, cached, read_checked, tokens_hash, write_checked
from atlas_core.eval import token_logprobs
from atlas_core.models import LoadedModel
from atlas_core.progress import tqdm  # names the running chapter
from atlas_core.sparse.attention import MassLog, sparse_attention
from atlas_core.sparse.kept import SparseConfig

__all__ = ["MEASURES", "MODEL_FIGURES", "agreement", "budget_sweep", "clopper_pearson", "common_positions",
           "compare_rules", "dense_continuation", "fidelity_report", "fidelity_texts", "greedy", "greedy_survival",
           "greedy_survival_reference", "identical_count", "model_rows", "survival_agreement", "survival_summary",
           "teacher_forced", "teacher_forced_rules", "token_kl", "trajectory_agreement"]

# Teacher-forced figures, each with its interval: name -> what it is (per-token values averaged over blocks).
MEASURES = ("kl", "top1_agree", "ppl_dense", "ppl_sparse", "ppl_change", "discarded")



def token_kl(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """KL(dense ‖ sparse) of the next-token distributions at each position, in nats.

    Args:
        dense, sparse: (..., vocab) log-probabilities.
    Returns:
        (...,) float, ≥ 0. KL is never negative; a sum that rounds below 0 (the two distributions agree to
        float precision) is reported as 0, so that a mean and its interval cannot fall below 0.
    """
    return F.kl_div(sparse, dense, log_target=True, reduction="none").sum(-1).clamp_min(0)

def _check_finite(logprobs: torch.Tensor) -> None:
    if not torch.isfinite(logprobs).all():
        raise FloatingPointError("non-finite logits; check the model's weights and dtype")


@torch.no_grad()
def _block_logprobs(lm: LoadedModel, block: torch.Tensor) -> torch.Tensor:
    """(token − 1, vocab) next-token log-probabilities of one (token,) block, with the attention in force."""
    out = token_logprobs(lm.model(block[None], use_cache=False).logits[0, :-1])
    _check_finite(out)
    return out


# ----------------------------------------------------------------------------- stored runs (SPEC §12)

NUMERIC_SOURCES = ("attention.py", "blocks.py", "certified.py", "kept.py", "pages.py")  # the sparse attention itself


def code_version() -> str:
    """SHA-256 of what sets a stored sparse run's numbers: the sparse attention's modules, the library's attention
    hooks, the functions here that score a block or a prompt, and the torch and transformers versions. A stored
    run is reused only by the code that made it; editing the chapter's prose or this module's statistics does not
    discard it."""
    import transformers

    from atlas_core import attention as hooks

    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in [*(here / name for name in NUMERIC_SOURCES), Path(hooks.__file__)]:
        digest.update(path.name.encode() + path.read_bytes())
    for fn in (token_kl, token_logprobs, _block_logprobs, _tf_block, _survival_block, agreement, trajectory_agreement):
        digest.update(inspect.getsource(fn).encode())
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class _Store:
    """What every stored sparse run of one call shares in its key, computed once per call: the model's name, its
    weights fingerprint (a pass over every parameter) and ``code_version`` (reads the sparse modules' files)."""

    model: str
    weights: str
    code: str


def _store_for(lm: LoadedModel) -> _Store:
    from atlas_core.clouds import weights_fingerprint

    return _Store(model=lm.spec.name, weights=weights_fingerprint(lm.model), code=code_version())


def _stored(kind: str, store: _Store, compute, **fields):
    """``compute()``, kept on disk under a key of ``kind``, the call's ``_Store`` (model, weights, code) and
    ``fields`` (written atomically with its SHA-256 and verified on read, ``cache.cached``)."""
    key = cache_key(kind=kind, model=store.model, weights=store.weights, code=store.code, **fields)
    return cached(cache_dir("sparse", "runs") / f"{kind}-{key}.pt", compute, torch.save,
                  lambda p: torch.load(p, weights_only=True), f"sparse {kind}")


def _log_state(log: MassLog) -> dict:
    """A MassLog's contents as plain dicts and lists of tensors (what ``torch.save`` stores with weights_only)."""
    return {"sums": log.sums, "counts": log.counts, "discarded": log.discarded, "per_query": log.per_query,
            "certificates": log.certificates}


def _merge(log: MassLog, state: dict) -> None:
    """Add one block's logged state (``_log_state`` of a MassLog that logged only that block) to ``log``: the same
    sums, counts and per-call lists ``MassLog.add`` would have left had the block been logged into ``log``."""
    for layer, sums in state["sums"].items():
        into = log.sums.setdefault(layer, {})
        for name, t in sums.items():
            into[name] = into.get(name, 0) + t
    for layer, n in state["counts"].items():
        log.counts[layer] = log.counts.get(layer, 0) + n
    for field_ in ("discarded", "certificates"):
        for layer, values in state[field_].items():
            getattr(log, field_).setdefault(layer, []).extend(values)
    for name, layers in state["per_query"].items():
        for layer, values in layers.items():
            log.per_query.setdefault(name, {}).setdefault(layer, []).extend(values)


def _tf_block(lm: LoadedModel, block: torch.Tensor, cfg: SparseConfig, dense: torch.Tensor,
              min_position: int | None) -> dict:
    """One rule's teacher-forced pass over one block, scored against the block's dense log-probabilities.

    Returns:
        {"log": ``_log_state`` of the block's MassLog, "kl", "top1_agree" ((token − 1,) float64, NaN where the
        rule cannot drop a key), "nll_sparse" ((token − 1,) nats)}.
    """
    block_log = MassLog(min_position=min_position)
    with sparse_attention(lm.model, cfg, block_log):
        sparse = _block_logprobs(lm, block)  # (token - 1, vocab)
    counted = torch.arange(len(block) - 1) >= max(cfg.budget, cfg.sparse_from)  # (token - 1,)
    kl = token_kl(dense, sparse)  # (token - 1,)
    agree = (dense.argmax(-1) == sparse.argmax(-1)).double()
    return {"log": _log_state(block_log), "kl": kl.double().where(counted, math.nan),
            "top1_agree": agree.where(counted, math.nan), "nll_sparse": -sparse.gather(-1, block[1:, None])[:, 0]}


@torch.no_grad()
def teacher_forced_rules(lm: LoadedModel, blocks: torch.Tensor, configs: list[SparseConfig], progress: bool = False,
                         implementation: str | None = "sdpa", n_blocks: list[int] | None = None,
                         store: bool = False) -> list[dict]:
    """Dense vs sparse next-token distributions over token blocks, every rule on every block.

    Per block, one dense forward pass (``implementation``: SDPA by default, exact to float rounding and
    faster than eager) gives the reference that every rule's sparse pass is scored against; nothing
    dense is computed twice.

    Args:
        blocks: (block, token) token ids, each longer than every rule's budget a + W + k.
        configs: the sparse rules.
        implementation: dense attention backend of the reference (None: the loaded one).
        n_blocks: per rule, how many of the first blocks it is scored on (default: all); a rule on
            fewer blocks is paired with the others on those blocks.
        store: keep each (rule, block) pass and each block's dense NLL on disk and reuse them (``_stored``: keyed
            by the model's weights, the block's tokens, the rule, the backend and ``code_version``), so that a
            rerun, or a run resumed after an interruption, repeats no pass; the dense reference of a block is
            computed only when one of its rules is not stored.
    Returns:
        per rule, a dict: each of ``MEASURES`` as value, ``<name>_lo`` and ``<name>_hi`` (95% block
        bootstrap; ppl_change = PPL_sparse / PPL_dense − 1, paired), ``estimates`` (name -> Estimate),
        ``per_block`` (name -> list of per-block (token − 1,) float tensors: kl, top1_agree (0/1) and
        discarded NaN where not counted, nll_dense, nll_sparse in nats), ``positions`` (tokens counted for
        KL), ``blocks``, ``mass`` ((layer, head) means of the fixed, selected and discarded mass, and page
        recall for the page selector, over the sparse layers) and ``log`` (the MassLog).
    Raises:
        ValueError: a block too short for a rule's budget, or no rule.
    """
    if not configs:
        raise ValueError("teacher_forced_rules needs at least one sparse rule")
    n_blocks = [len(blocks)] * len(configs) if n_blocks is None else list(n_blocks)
    if len(n_blocks) != len(configs) or not all(1 <= n <= len(blocks) for n in n_blocks):
        raise ValueError(f"n_blocks must give each of the {len(configs)} rules 1 … {len(blocks)} blocks, got {n_blocks}")
    for cfg in configs:
        cfg.check_block(blocks.shape[1], "blocks")
    states = [{"log": MassLog(), "kl": [], "top1_agree": [], "nll_sparse": [], "parts": {}} for _ in configs]
    nll_dense = []
    box = _store_for(lm) if store else None
    for i, block in enumerate(tqdm(blocks[:max(n_blocks)], desc=f"sparse: {len(configs)} rule(s) per block",
                                   disable=not progress, leave=False)):
        dense = None  # (token - 1, vocab): computed once, and only when some pass of this block must run

        def reference() -> torch.Tensor:
            nonlocal dense
            if dense is None:
                with _implementation(lm.model, implementation):
                    dense = _block_logprobs(lm, block)
            return dense

        def run_dense() -> torch.Tensor:
            return -reference().gather(-1, block[1:, None])[:, 0]

        fields = {"block": tokens_hash(block), "attention": implementation}
        nll_dense.append(_stored("tf-dense", box, run_dense, **fields) if store else run_dense())
        for cfg, st, n in zip(configs, states, n_blocks):
            if i >= n:
                continue
            run = lambda: _tf_block(lm, block, cfg, reference(), st["log"].min_position)  # noqa: E731
            done = _stored("tf-pass", box, run, rule=repr(cfg), **fields) if store else run()
            _merge(st["log"], done["log"])
            for name in ("kl", "top1_agree", "nll_sparse"):
                st[name].append(done[name])
            for name, values in _block_parts(st["log"], len(st["kl"])).items():
                st["parts"].setdefault(name, []).append(values)
    return [_summary(st, nll_dense[:n]) for st, n in zip(states, n_blocks)]


MASS_PARTS = ("fixed", "selected", "discarded", "index_recall", "mass_recall")  # the last two: approximate selectors


def _block_parts(log: MassLog, n_blocks: int) -> dict[str, torch.Tensor]:
    """{part: (counted query,)} the newest block's fixed, selected and discarded mass (and an approximate
    selector's recall) per query, averaged over sparse layers and heads; NaN when every layer is dense."""
    out = {}
    for name in MASS_PARTS:
        logged = log.per_query.get(name, {})
        layers = [l for l in sorted(logged) if len(logged[l]) == n_blocks]  # layers that logged this block
        if layers:
            out[name] = torch.stack([logged[l][-1] for l in layers]).mean(0)
        elif name in ("fixed", "selected", "discarded"):  # every layer dense: nothing is measured
            out[name] = torch.full((1,), math.nan, dtype=torch.float64)
    return out


def _shift(est: interval.Estimate, by: float) -> interval.Estimate:
    return interval.Estimate(est.value + by, est.lo + by, est.hi + by, est.units)


def _summary(st: dict, nll_dense: list[torch.Tensor]) -> dict:
    """Values and 95% block-bootstrap intervals of one rule's teacher-forced measures."""
    est = {"kl": interval.mean(st["kl"]), "top1_agree": interval.mean(st["top1_agree"]),
           "ppl_dense": interval.perplexity(nll_dense), "ppl_sparse": interval.perplexity(st["nll_sparse"]),
           "ppl_change": _shift(interval.ppl_ratio(st["nll_sparse"], nll_dense), -1.0)}
    for name, values in st["parts"].items():  # fixed, selected, discarded mass (and page recall), per block
        est[name] = (interval.mean(values) if not all(torch.isnan(v).all() for v in values)
                     else interval.Estimate(math.nan, math.nan, math.nan, len(values)))
    out = {}
    for name, e in est.items():
        out.update({name: e.value, f"{name}_lo": e.lo, f"{name}_hi": e.hi})
    per_block = {"kl": st["kl"], "top1_agree": st["top1_agree"], "nll_dense": nll_dense, "nll_sparse": st["nll_sparse"],
                 **st["parts"]}
    return {**out, "estimates": est, "per_block": per_block, "positions": int(sum((~k.isnan()).sum() for k in st["kl"])),
            "blocks": len(nll_dense), "mass": st["log"].means(), "log": st["log"]}


def teacher_forced(lm: LoadedModel, blocks: torch.Tensor, cfg: SparseConfig, progress: bool = False,
                   implementation: str | None = "sdpa") -> dict:
    """``teacher_forced_rules`` for one rule (see there for Args and Returns)."""
    return teacher_forced_rules(lm, blocks, [cfg], progress, implementation)[0]


def compare_rules(a: dict, b: dict, measure: str, names: tuple[str, str] = ("A", "B"), spec: str = ".3g") -> dict:
    """Is rule a's teacher-forced ``measure`` different from rule b's? Paired on the same blocks and positions.

    Rules scored on different numbers of blocks are compared on the blocks both were scored on (the first
    ones: ``teacher_forced_rules`` gives each rule a prefix of the same blocks); rules of different budgets
    count different positions, so per-position measures are compared on the positions both count
    (``common_positions``).

    Args:
        a, b: ``teacher_forced_rules`` results on (prefixes of) the same blocks.
        measure: "kl", "top1_agree", "discarded" (difference of means) or "ppl" (ratio of the sparse
            perplexities).
        names: how the verdict names the two rules.
    Returns:
        {"difference": Estimate (a − b; for "ppl" the ratio PPL_a / PPL_b), "distinguishable": bool,
        "verdict": a phrase: "<a> has lower KL than <b> (difference … [lo, hi])", or "<a> and <b> are not
        distinguishable at this sample size (…)" when the interval contains 0 (1 for a ratio); never
        distinguishable on a single block, where the bootstrap has no spread}.
    Raises:
        ValueError: an unknown measure.
    """
    labels = {"kl": "KL", "top1_agree": "top-1 agreement", "discarded": "discarded mass", "ppl": "perplexity"}
    if measure not in labels:
        raise ValueError(f"measure must be one of {tuple(labels)}, got {measure!r}")
    if measure == "ppl":
        n = min(len(a["per_block"]["nll_sparse"]), len(b["per_block"]["nll_sparse"]))
        diff = interval.ppl_ratio(a["per_block"]["nll_sparse"][:n], b["per_block"]["nll_sparse"][:n])
        null, what = 1.0, "ratio"
    else:
        diff = interval.mean_difference(*common_positions(a["per_block"][measure], b["per_block"][measure]))
        null, what = 0.0, "difference"
    given = f"{what} {interval.format_estimate(diff, spec)}, {diff.units} blocks"
    if diff.units < 2:  # one block resamples to itself: a zero-width interval that says nothing
        return {"difference": diff, "distinguishable": False,
                "verdict": f"{names[0]} and {names[1]} cannot be compared on one block (no interval; {given})"}
    found = direction(diff, null)
    if found == TIE:
        text = f"{names[0]} and {names[1]} are {TIE} in {labels[measure]} ({given})"
    else:
        text = f"{names[0]} has {found} {labels[measure]} than {names[1]} ({given})"
    return {"difference": diff, "distinguishable": diff.distinguishable(null), "verdict": text}


def common_positions(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two rules' per-position values cut to the blocks and positions both count, for a paired comparison.

    Counted positions are a suffix of each block (from the rule's budget on), so the values are aligned at
    the block's end; a position either rule leaves out (NaN, or before its first counted position) is left
    out of both.

    Args:
        a, b: per block, (position,) values of one measure (NaN = not counted), as ``teacher_forced_rules``'
            ``per_block``; a rule scored on fewer blocks gives a shorter list.
    Returns:
        (a, b) on the first min(len(a), len(b)) blocks, each pair of blocks of equal length with NaN at the
        same positions.
    """
    out_a, out_b = [], []
    for x, y in zip(a, b):  # the blocks both were scored on
        m = min(len(x), len(y))
        x, y = x[len(x) - m:], y[len(y) - m:]  # (position,) aligned at the block's end
        both = ~(torch.isnan(x) | torch.isnan(y))
        out_a.append(x.where(both, math.nan))
        out_b.append(y.where(both, math.nan))
    return out_a, out_b


@torch.no_grad()
def greedy(lm: LoadedModel, prompt: torch.Tensor, n_new: int, cfg: SparseConfig | None = None,
           implementation: str | None = None, progress: bool = False) -> torch.Tensor:
    """Greedy continuation of one prompt through the KV cache, dense (cfg=None) or sparse.

    No end-of-sequence stop: exactly ``n_new`` tokens, so dense and sparse runs align position by position.
    A rule with ``sparse_from`` = len(prompt) decodes after a dense prefill.

    Args:
        prompt: (token,) token ids.
        implementation: dense attention backend to use instead of the loaded one (e.g. "sdpa").
    Returns:
        (n_new,) generated token ids.
    """
    if n_new < 1:
        raise ValueError(f"n_new must be ≥ 1, got {n_new}")
    model = lm.model
    context = sparse_attention(model, cfg) if cfg is not None else _implementation(model, implementation)
    out = []
    with context:
        step = model(prompt[None], use_cache=True)
        for _ in tqdm(range(n_new), desc="greedy" + (" sparse" if cfg else ""), disable=not progress, leave=False):
            token = step.logits[0, -1].argmax()
            out.append(token)
            if len(out) < n_new:
                step = model(token.view(1, 1), past_key_values=step.past_key_values, use_cache=True)
    return torch.stack(out)


def dense_continuation(lm: LoadedModel, prompt: torch.Tensor, n_new: int, implementation: str | None = None,
                       progress: bool = False) -> torch.Tensor:
    """``greedy(lm, prompt, n_new)`` (dense), cached on disk.

    Key (SPEC §12): the model's name and dtype, the attention backend, the prompt's tokens, n_new and the
    library cache version (``cache.cache_key``); written atomically with its SHA-256 and verified on read
    (``cache.cached``), so a half-written or damaged file is rebuilt, never used.

    Returns:
        (n_new,) token ids.
    """
    model = lm.model
    backend = implementation or model.config._attn_implementation
    key = cache_key(kind="sparse-dense-continuation", model=lm.spec.name, dtype=str(next(model.parameters()).dtype),
                    attention=backend, prompt=prompt.tolist(), n_new=int(n_new))
    path = cache_dir("sparse", "continuations") / f"{key}.pt"
    return cached(path, lambda: greedy(lm, prompt, n_new, implementation=implementation, progress=progress),
                  torch.save, lambda p: torch.load(p, weights_only=True), "dense continuation")


def fidelity_texts(lm: LoadedModel, *, corpus: str, seq_len: int, n_blocks: int, prompt_tokens: int, gen_tokens: int,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The texts a fidelity study reads: held-out blocks, a generation prompt and its dense greedy continuation.

    Args:
        corpus: the corpus name (``atlas_core.corpus``).
        seq_len, n_blocks: the held-out (evaluation split) blocks, teacher forced.
        prompt_tokens: the prompt's length, from the calibration split (never overlapping the blocks).
        gen_tokens: the dense greedy continuation's length (``dense_continuation``: cached on disk).
    Returns:
        (blocks (block, token), prompt (token,), dense_tokens (gen_tokens,)) token ids, BOS as the model wants.
    Raises:
        CorpusError: a split too small for the request.
    """
    blocks = token_blocks(lm, BlockSpec(corpus=corpus, seq_len=seq_len, n_blocks=n_blocks, split="eval"))  # the model's BOS
    prompt = token_blocks(lm, BlockSpec(corpus=corpus, seq_len=prompt_tokens, n_blocks=1, split="calib"))[0]
    return blocks, prompt, dense_continuation(lm, prompt, gen_tokens, progress=progress)


@contextlib.contextmanager
def _implementation(model, name: str | None):
    previous = model.config._attn_implementation
    if name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Position-wise agreement of two generated sequences of equal length.

    Returns:
        {"agree": fraction of equal positions, "first_divergence": first unequal position (None if
        identical), "identical_prefix": tokens before it, "matches": (position,) numpy booleans, True where
        the two agree (for ``segments.segment_agreement``)}.
    """
    if reference.shape != other.shape:
        raise ValueError(f"sequences differ in length: {tuple(reference.shape)} vs {tuple(other.shape)}")
    same = reference == other
    diverge = (~same).nonzero()
    first = int(diverge[0]) if len(diverge) else None
    return {"agree": same.double().mean().item(), "first_divergence": first,
            "identical_prefix": first if first is not None else int(same.numel()), "matches": same.cpu().numpy()}


@torch.no_grad()
def trajectory_agreement(lm: LoadedModel, prompt: torch.Tensor, dense_tokens: torch.Tensor, cfg: SparseConfig | None,
                         implementation: str | None = None, dense_prefill: bool = False) -> dict:
    """Would sparse greedy decoding choose each token of the dense greedy continuation?

    Args:
        prompt: (token,) the prompt; dense_tokens: (n_new,) the dense greedy continuation of it.
        cfg: the sparse rule, or None for dense attention with another backend (``implementation``),
            which measures how far two exact implementations agree.
        dense_prefill: the prompt's positions attend densely (the rule with ``sparse_from`` =
            len(prompt)), as in ``greedy_survival``; else the rule also runs in the prefill, as in
            ``greedy(lm, prompt, n, cfg)``.
    Returns:
        {"agree": fraction of steps where the sparse argmax equals the dense token, "first_divergence":
        first step where it does not (None if never), "identical_prefix", "matches" (step,) booleans}.
    """
    x = torch.cat([prompt, dense_tokens[:-1]])[None]  # (1, prompt + n_new - 1)
    if cfg is not None and dense_prefill:
        cfg = dataclasses.replace(cfg, sparse_from=len(prompt))
    context = sparse_attention(lm.model, cfg) if cfg is not None else _implementation(lm.model, implementation)
    with context:
        logits = lm.model(x, use_cache=False, logits_to_keep=len(dense_tokens)).logits[0]  # (n_new, vocab)
    return agreement(dense_tokens, logits.argmax(-1))


def fidelity_report(lm: LoadedModel, cfg: SparseConfig, prompt: torch.Tensor, n_new: int, eval_blocks: torch.Tensor,
                    progress: bool = False) -> dict:
    """Everything ``atlas sparse`` prints: greedy first divergence, teacher-forced KL / top-1 / perplexity, mass.

    Args:
        prompt: (token,) the generation prompt; n_new: tokens of the dense greedy continuation checked.
        eval_blocks: (block, token) held-out text for the teacher-forced measures.
    Returns:
        step_agreement and first_divergence along the dense continuation (one pass; the rule also in
        the prefill, as ``greedy(lm, prompt, n_new, cfg)``), and every teacher-forced measure of
        ``teacher_forced_rules`` with its ``_lo`` / ``_hi`` (95% block bootstrap), the mean fixed and
        selected mass, the positions counted and the blocks.
    """
    dense = dense_continuation(lm, prompt, n_new, progress=progress)
    gen = trajectory_agreement(lm, prompt, dense, cfg)
    tf = teacher_forced(lm, eval_blocks, cfg, progress=progress)
    figures = {k: tf[k] for name in MEASURES for k in (name, f"{name}_lo", f"{name}_hi")}
    out = {"step_agreement": gen["agree"], "first_divergence": gen["first_divergence"],
           "identical_prefix": gen["identical_prefix"], **figures,
           **{f"{part}_mass{suffix}": tf[f"{part}{suffix}"] for part in ("fixed", "selected") for suffix in ("", "_lo", "_hi")},
           "tf_positions": tf["positions"], "tf_blocks": tf["blocks"]}
    if cfg.selector == "certified":
        out.update(_certified_figures(tf["log"], cfg))
    return out


def _certified_figures(log: MassLog, cfg: SparseConfig) -> dict:
    """The certified rule's share of key bytes read (block-bootstrap interval), pages read, and its calibration:
    certificate and true m (mean, max) and the queries whose m exceeds the certificate (must be 0)."""
    from atlas_core.sparse.certified_eval import calibration, key_bytes_estimate, pages_read_share

    share = key_bytes_estimate(log)
    cal = calibration(log, cfg.eps)
    return {"key_bytes": share.value, "key_bytes_lo": share.lo, "key_bytes_hi": share.hi, "pages_read_share": pages_read_share(log),
            "certificate_mean": float(cal["certificate"].mean()), "certificate_max": float(cal["certificate"].max()),
            "m_mean": float(cal["discarded"].mean()), "m_max": float(cal["discarded"].max()), "violations": int(cal["violations"]),
            "calibration_pairs": cal["pairs"]}


def budget_sweep(lm: LoadedModel, configs: list[SparseConfig], blocks: torch.Tensor, prompt: torch.Tensor,
                 dense_tokens: torch.Tensor, progress: bool = False, n_blocks: list[int] | None = None,
                 store: bool = False) -> list[dict]:
    """Teacher-forced fidelity (with intervals) and greedy first divergence of each sparse rule, one row each.

    Args:
        blocks: (block, token) held-out text; prompt: (token,); dense_tokens: (n_new,) the dense greedy
            continuation of the prompt (``dense_continuation(lm, prompt, n_new)``).
        n_blocks: per rule, the first blocks it is scored on (``teacher_forced_rules``).
        store: keep the passes on disk and reuse them (``teacher_forced_rules``; each trajectory too).
    Returns:
        rows with the rule's settings, "blocks", each of ``MEASURES`` with its ``_lo`` / ``_hi``, the mean fixed,
        selected and discarded mass (page recall for the page selector), step_agree, step_matches ((step,)
        booleans: the sparse choice is the dense token) and first_divergence, and ``tf`` (the full ``teacher_forced_rules`` result, for paired comparisons).
    """
    rows = []
    results = teacher_forced_rules(lm, blocks, configs, progress, n_blocks=n_blocks, store=store)
    box = _store_for(lm) if store else None
    for cfg, tf in zip(configs, tqdm(results, desc="sparse rules: trajectories", disable=not progress, leave=False)):
        traj = _trajectory(lm, prompt, dense_tokens, cfg, box)
        mass = {f"{part}{suffix}": tf[f"{part}{suffix}"] for part in MASS_PARTS if part != "discarded" and part in tf
                for suffix in ("", "_lo", "_hi")}  # NaN if every layer is dense
        figures = {k: tf[k] for name in MEASURES for k in (name, f"{name}_lo", f"{name}_hi")}
        rows.append({**cfg.__dict__, "blocks": tf["blocks"], **figures, **mass, "step_agree": traj["agree"],
                     "step_matches": traj["matches"], "first_divergence": traj["first_divergence"], "tf": tf})
    return rows


def _trajectory(lm: LoadedModel, prompt: torch.Tensor, dense_tokens: torch.Tensor, cfg: SparseConfig,
                store: _Store | None) -> dict:
    """``trajectory_agreement`` of one rule, kept on disk under ``store`` when given ("matches" stored as a
    tensor)."""
    def run() -> dict:
        out = trajectory_agreement(lm, prompt, dense_tokens, cfg)
        return {**out, "matches": torch.from_numpy(out["matches"])}

    out = (_stored("trajectory", store, run, rule=repr(cfg), prompt=tokens_hash(prompt), dense=tokens_hash(dense_tokens))
           if store else run())
    return {**out, "matches": out["matches"].numpy()}


@torch.no_grad()
def _decode_from(model, cache, token: torch.Tensor, n_new: int, reference: torch.Tensor | None = None):
    """Greedy decoding through ``cache`` from an already chosen first token.

    Returns:
        (tokens (≤ n_new,), first divergence): with a ``reference`` (n_new,), decoding stops at the first
        token that differs from it (its index), or runs to n_new (None).
    """
    out = [token]
    while len(out) < n_new:
        step = model(out[-1].view(1, 1), past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        out.append(step.logits[0, -1].argmax())
        if reference is not None and out[-1] != reference[len(out) - 1]:
            return torch.stack(out), len(out) - 1
    return torch.stack(out), None


def _check_survival(n_new: int) -> None:
    if n_new < 2:
        raise ValueError(f"n_new must be ≥ 2 (the first token comes from the shared dense prefill), got {n_new}")


@torch.no_grad()
def greedy_survival(lm: LoadedModel, prompts: torch.Tensor, rules: dict[str, SparseConfig | None], n_new: int = 128,
                    implementation: str | None = None, progress: bool = False,
                    store: bool = False) -> dict[str, list[int | None]]:
    """First divergence from dense greedy decoding, per prompt and rule, by the revised source's protocol.

    Per prompt, the dense greedy continuation (``dense_continuation``, cached on disk) and one dense
    prefill of the prompt, whose KV cache every rule shares. Each rule then reads the continuation in ONE
    forward pass on top of a copy of that cache, active only in these decode positions (``sparse_from``
    = len(prompt)), and its first divergence is the first step whose greedy choice is not the dense token:
    up to float ties, where free-running decoding (``greedy_survival_reference``) first emits another
    token, since until then it has read exactly the dense tokens.

    Args:
        prompts: (prompt, token) token ids.
        rules: name -> sparse rule; None reads the continuation densely (a control: float noise only).
        n_new: generated tokens per run, the shared first one included.
        implementation: dense attention backend of the prefill and the dense decoding (None: the loaded one).
        store: keep each (rule, prompt) result on disk and reuse it (``_stored``, as ``teacher_forced_rules``).
    Returns:
        {name: [first divergence per prompt]}: the index (1 … n_new − 1) of the first generated token
        that differs from dense, the revision's one-based decode step with the shared first token
        excluded; None where all ``n_new`` tokens are identical.
    Raises:
        ValueError: n_new < 2 (the first token is shared, so nothing would be compared).

    Source: Ruiz Williams 2026 (revision of arXiv 2602.06317), condensate/decode.py ``evaluate_decode``.
    """
    _check_survival(n_new)
    model = lm.model
    result: dict[str, list[int | None]] = {name: [] for name in rules}
    box = _store_for(lm) if store else None
    for prompt in tqdm(prompts, desc="greedy survival", disable=not progress, leave=False):
        dense = dense_continuation(lm, prompt, n_new, implementation)  # (n_new,)
        prefill = None  # the shared dense prefill, made only when some rule of this prompt is not stored

        def shared() -> DynamicCache:
            nonlocal prefill
            if prefill is None:
                with _implementation(model, implementation):
                    prefill = model(prompt[None], use_cache=True, logits_to_keep=1).past_key_values
            return prefill

        for name, cfg in rules.items():
            run = lambda: _survival_block(lm, shared(), dense, cfg, len(prompt), implementation)  # noqa: E731
            first = (_stored("survival", box, run, rule=repr(cfg), prompt=tokens_hash(prompt), n_new=int(n_new),
                             attention=implementation) if store else run())
            result[name].append(None if first["first"] < 0 else int(first["first"]))
    return result


def _survival_block(lm: LoadedModel, prefill, dense: torch.Tensor, cfg: SparseConfig | None, prompt_len: int,
                    implementation: str | None) -> dict:
    """One rule's first divergence on one prompt (``greedy_survival``): {"first": the step, or −1 when none}.

    Args:
        prefill: the prompt's dense KV cache (copied here, never changed); dense: (n_new,) the dense continuation.
    """
    model = lm.model
    steps = dense[None, :-1]  # (1, n_new - 1): the inputs of decode steps 1 … n_new − 1
    context = (sparse_attention(model, dataclasses.replace(cfg, sparse_from=prompt_len)) if cfg is not None
               else _implementation(model, implementation))
    with context:
        logits = model(steps, past_key_values=copy.deepcopy(prefill), use_cache=True).logits[0]  # (n_new - 1, vocab)
    first = agreement(dense[1:], logits.argmax(-1))["first_divergence"]
    return {"first": -1 if first is None else first + 1}


@torch.no_grad()
def greedy_survival_reference(lm: LoadedModel, prompts: torch.Tensor, rules: dict[str, SparseConfig | None],
                              n_new: int = 128, implementation: str | None = None,
                              progress: bool = False) -> dict[str, list[int | None]]:
    """``greedy_survival`` by free-running decoding, one token at a time (the reference).

    Per prompt, one dense prefill gives the KV cache and the first generated token, shared by every run;
    dense greedy decoding continues it to ``n_new`` tokens. Each rule then decodes from a copy of the same
    cache and first token, with the rule active in every decode step, greedily and free-running, and
    stops at its first token that differs from the dense one. Args and Returns as ``greedy_survival``.

    Source: Ruiz Williams 2026 (revision of arXiv 2602.06317), condensate/decode.py ``evaluate_decode``.
    """
    _check_survival(n_new)
    model = lm.model
    result: dict[str, list[int | None]] = {name: [] for name in rules}
    for prompt in tqdm(prompts, desc="greedy survival (free-running)", disable=not progress, leave=False):
        with _implementation(model, implementation):
            prefill = model(prompt[None], use_cache=True)
            first = prefill.logits[0, -1].argmax()
            dense, _ = _decode_from(model, copy.deepcopy(prefill.past_key_values), first, n_new)
        for name, cfg in rules.items():
            context = sparse_attention(model, cfg) if cfg is not None else _implementation(model, implementation)
            with context:
                _, diverge = _decode_from(model, copy.deepcopy(prefill.past_key_values), first, n_new, dense)
            result[name].append(diverge)
    return result


def survival_summary(first_divergences: list, n_new: int = 128, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Median first divergence and the share of runs identical through ``n_new`` tokens, with 95% intervals.

    A run identical through n_new counts as diverging at n_new, as the revision's ``first_divergence``
    (= horizon for a surviving run) does, so the median is that of n_new-capped values.

    Args:
        first_divergences: per prompt, its first divergence, or a list of them (one per rule: runs that
            share the prompt), as ``greedy_survival`` gives them (None = identical through n_new).
    Returns:
        {"prompts", "runs", "median", "median_ci", "identical", "identical_ci", "max", "median_est",
        "identical_est"}: statistics over every run, with intervals (``_ci`` as (lo, hi), ``_est`` as
        ``interval.Estimate``). The median's comes from ``interval.median``, which resamples prompts, each
        with all its runs (seeded). The share identical is a count of k of n: with one run per prompt its
        interval is the exact one (``clopper_pearson``); with several runs per prompt the runs of a prompt are
        not independent, so prompts are resampled (``interval.share``), and where every run or none is
        identical (a bootstrap then has no spread) the exact interval over the prompts alone is used, as if
        each prompt were one trial (wider: it claims no more trials than there are prompts).
    Raises:
        ValueError: no prompt, or prompts with different numbers of runs.
    """
    rows = [list(d) if isinstance(d, (list, tuple)) else [d] for d in first_divergences]
    if not rows or not rows[0] or len({len(r) for r in rows}) != 1:
        raise ValueError("survival_summary needs at least one prompt, each with the same number (≥ 1) of runs")
    steps = np.array([[n_new if d is None else d for d in r] for r in rows], dtype=np.float64)  # (prompt, run)
    identical = np.array([[d is None for d in r] for r in rows], dtype=np.float64)
    boot = interval.Bootstrap(n_resamples=n_resamples, seed=seed)
    med, share = interval.median(steps, boot), interval.share(identical, boot)
    runs_per_prompt, k = steps.shape[1], int(identical.sum())
    if runs_per_prompt == 1 or k in (0, identical.size):  # a count: the exact interval (over prompts)
        n = len(rows)
        lo, hi = clopper_pearson(k if runs_per_prompt == 1 else (0 if k == 0 else n), n)
        share = interval.Estimate(value=share.value, lo=lo, hi=hi, units=n)
    return {"prompts": len(rows), "runs": steps.size, "median": med.value, "median_ci": (med.lo, med.hi),
            "identical": share.value, "identical_ci": (share.lo, share.hi), "max": int(steps.max()),
            "median_est": med, "identical_est": share}


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial share k / n.

    Args:
        k: successes, 0 ≤ k ≤ n; n: trials ≥ 1.
    Returns:
        (lo, hi), a ``level`` two-sided interval (lo = 0 at k = 0, hi = 1 at k = n).
    Raises:
        ValueError: k outside 0..n or n < 1.
    Source: Clopper & Pearson (1934), the beta-quantile form.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs 0 ≤ k ≤ n and n ≥ 1, got k={k}, n={n}")
    tail = (1 - level) / 2
    lo = float(beta_dist.ppf(tail, k, n - k + 1)) if k else 0.0
    hi = float(beta_dist.ppf(1 - tail, k + 1, n - k)) if k < n else 1.0
    return lo, hi


def survival_agreement(ours: dict, n_new: int, theirs_first_divergences: list, horizon: int) -> list[str]:
    """How one rule's greedy survival differs from another's published runs (empty: not distinguishable).

    Survival: our bootstrap interval of the share identical through the horizon against the exact
    interval of their k of n. Early divergence: the two medians' bootstrap intervals (both resampling
    prompts). Intervals that meet count as agreement.

    Args:
        ours: ``survival_summary`` of our runs, generated ``n_new`` tokens each.
        theirs_first_divergences: their runs' first divergences (≥ horizon: identical through it).
        horizon: their generation length.
    Returns:
        one phrase per statistic whose intervals do not meet, each side with its 95% interval, e.g. "the
        median first divergence is 30 [22, 41] (the revision: 14 [6, 19])".
    """
    theirs = survival_summary([None if d >= horizon else d for d in theirs_first_divergences], horizon)
    k, n = round(theirs["identical"] * theirs["runs"]), theirs["runs"]
    gaps = []
    exact = clopper_pearson(k, n)
    if not _meet(ours["identical_ci"], exact):
        gaps.append(f"{interval.interval_text(ours['identical'], *ours['identical_ci'], '.0%')} of runs stay identical "
                    f"through {n_new} tokens (the revision: {k} of {n}, {interval.interval_text(k / n, *exact, '.0%')})")
    if not _meet(ours["median_ci"], theirs["median_ci"]):
        gaps.append(f"the median first divergence is {interval.interval_text(ours['median'], *ours['median_ci'], '.0f')} "
                    f"(the revision: {interval.interval_text(theirs['median'], *theirs['median_ci'], '.0f')})")
    return gaps


def _meet(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


MODEL_FIGURES = tuple(f"{name}{suffix}" for name in ("kl", "top1_agree", "ppl_change", "discarded") for suffix in ("", "_lo", "_hi"))


def model_rows(name: str, lm: LoadedModel, configs: list[SparseConfig], blocks: torch.Tensor, prompt: torch.Tensor,
               dense_tokens: torch.Tensor, store: bool = False) -> list[dict]:
    """One model's row per rule for the cross-model table: teacher-forced figures and greedy agreement.

    Args:
        name: the model's name, for the table.
        configs: the rules (a rule with ``dense_layers`` is labelled "first 2 dense", the others "every layer").
        blocks, prompt, dense_tokens, store: as ``budget_sweep`` takes them (every rule on every block).
    Returns:
        [{"model", "rule", "blocks", each of ``MODEL_FIGURES``, "step_agree", "step_matches", "first_divergence"}],
        one per rule.
    """
    return [{"model": name, "rule": f"first {r['dense_layers']} dense" if r["dense_layers"] else "every layer",
             "blocks": r["blocks"], **{k: r[k] for k in (*MODEL_FIGURES, "step_agree", "step_matches", "first_divergence")}}
            for r in budget_sweep(lm, configs, blocks, prompt, dense_tokens, store=store)]


def identical_count(first_divergences: list, horizon: int) -> int:
    """How many runs stayed identical through ``horizon`` tokens.

    Args:
        first_divergences: per run, its first divergence (None, or ≥ horizon as the revision records a
            surviving run: identical through the horizon).
    """
    return sum(d is None or d >= horizon for d in first_divergences)


def block_discarded(log: MassLog) -> np.ndarray:
    """(block, layer · head · query) every logged (layer, head, query)'s discarded mass m, one row per block.

    Args:
        log: the MassLog of a teacher-forced run (one forward call per block, every block the same length).
    Raises:
        ValueError: the layers logged different numbers of calls, or the blocks differ in length.
    """
    layers = sorted(log.discarded)
    calls = {len(log.discarded[l]) for l in layers}
    if len(calls) != 1:
        raise ValueError(f"block_discarded: layers logged {sorted(calls)} calls; expected one per block in every layer")
    rows = [torch.cat([log.discarded[l][b].flatten() for l in layers]) for b in range(calls.pop())]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("block_discarded: blocks of different lengths; score equal-length blocks")
    return torch.stack(rows).double().numpy()


def discarded_statistics(m: np.ndarray, threshold: float, boot: interval.Bootstrap = interval.DEFAULT,
                         bins: int = 4000) -> dict[str, interval.Estimate]:
    """Median, 99th percentile, maximum of the discarded mass m, and the share of m below ``threshold``.

    Blocks are the resampling unit. The values are exact (over every logged (layer, head, query)); the
    intervals of the share and the maximum are exact per draw (sums of per-block counts, maxima of per-block
    maxima); those of the median and the 99th percentile come from per-block histograms on ``bins``
    log-spaced edges between 1e-12 and 1, the quantile interpolated log-linearly inside its bin (one bin is
    ±0.35% of the value at 4,000), since sorting every draw's millions of values would take minutes; the draws
    are then scaled by exact / binned quantile of the full sample, so that the binning's error, shared by every
    draw, does not shift the interval away from the exact value.

    Args:
        m: (block, value) discarded masses (``block_discarded``).
        threshold: the "negligible" bound (the claims' M_ZERO).
    Returns:
        {"median", "p99", "max", "share_below": Estimate}, units = blocks.
    Raises:
        ValueError: fewer than ``interval.MIN_UNITS`` blocks, or NaN in m.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or np.isnan(m).any():
        raise ValueError(f"discarded_statistics needs (block, value) masses without NaN, got shape {m.shape}")
    interval.check_units(len(m))
    idx = boot.draws(len(m))  # (resample, block)
    grid = np.logspace(-12, 0, bins)  # bin k in 1 … bins−1 is [grid[k−1], grid[k]); bin 0 below, bin ``bins`` above
    counts = np.stack([np.histogram(row, np.concatenate([[-np.inf], grid, [np.inf]]))[0] for row in m])  # (block, bin)
    drawn = np.concatenate([counts.sum(0, keepdims=True), counts[idx].sum(1)])  # (1 + resample, bin): the full sample first

    def binned(q: float) -> np.ndarray:
        """(1 + resample,) the q-quantile of each row of ``drawn``, log-linear inside its bin."""
        cum = drawn.cumsum(1) / drawn.sum(1, keepdims=True)
        rows = np.arange(len(cum))
        j = np.minimum((cum < q).sum(1), bins)  # the first bin whose cumulative share reaches q
        before = np.where(j > 0, cum[rows, np.maximum(j - 1, 0)], 0.0)
        frac = (q - before) / np.maximum(cum[rows, j] - before, 1e-300)  # how far into the bin q falls
        lower, upper = grid[np.clip(j - 1, 0, bins - 1)], grid[np.clip(j, 0, bins - 1)]
        return lower * (upper / lower) ** np.clip(frac, 0, 1)

    def quantile(q: float) -> interval.Estimate:
        exact, approx = float(np.quantile(m, q)), binned(q)
        # The draws carry the binning's error; so does the full sample's binned quantile. Scaling the draws by
        # exact / binned(full) removes that shared error, so the interval is about the exact value (a toy run's
        # exact 99th percentile fell outside its binned interval).
        scale = exact / approx[0] if approx[0] > 0 else 1.0
        return interval.estimate(exact, approx[1:] * scale, len(m), boot)

    below = (m < threshold).sum(1)  # (block,)
    return {"median": quantile(0.5), "p99": quantile(0.99),
            "max": interval.estimate(float(m.max()), m.max(1)[idx].max(1), len(m), boot),
            "share_below": interval.estimate(float(below.sum() / m.size), below[idx].sum(1) / (m.shape[1] * idx.shape[1]),
                                             len(m), boot)}
