"""Fidelity of sparse attention against the model's own dense attention (SPEC §10).

- Teacher forced, over token blocks: per position, KL(p_dense ‖ p_sparse) of the next-token
  distribution and whether the two argmax tokens agree (both over the positions ≥ a + W + k, where the
  sparse rule can drop anything), the perplexity of each, and the mass the kept sets capture.
- Greedy generation from one prompt, dense and sparse, with the KV cache: the fraction of generated
  positions where the tokens agree and the first position where they differ.
- The same first divergence for the price of one forward pass (``trajectory_agreement``): the sparse
  model reads the dense greedy continuation and we check, step by step, whether its own greedy choice
  would have been the dense token. Sparse greedy generation reproduces the dense tokens exactly up to
  the first step where that check fails, so both give the same first divergence (up to float ties).
- Greedy survival over many prompts (``greedy_survival``), by the revised source's protocol: a dense
  prefill shared by dense and sparse decoding, then free-running greedy decoding; per prompt the first
  divergence, summarised by its median and the share of runs identical through 128 tokens.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
from scipy.stats import beta as beta_dist
import torch.nn.functional as F
from atlas_core.progress import tqdm  # names the running chapter

from atlas_core.eval import token_logprobs
from atlas_core.geometry import bootstrap_ci
from atlas_core.models import LoadedModel
from atlas_core.sparse.attention import MassLog, sparse_attention
from atlas_core.sparse.kept import SparseConfig

__all__ = ["agreement", "budget_sweep", "clopper_pearson", "dense_logprobs", "fidelity_report", "greedy", "greedy_survival", "survival_agreement", "survival_summary",
           "teacher_forced", "trajectory_agreement"]


@torch.no_grad()
def dense_logprobs(lm: LoadedModel, blocks: torch.Tensor) -> list[torch.Tensor]:
    """The model's own next-token log-probabilities, one (token − 1, vocab) tensor per block."""
    return [token_logprobs(lm.model(block[None], use_cache=False).logits[0, :-1]) for block in blocks]


@torch.no_grad()
def teacher_forced(lm: LoadedModel, blocks: torch.Tensor, cfg: SparseConfig, progress: bool = False,
                   dense_lp: list[torch.Tensor] | None = None) -> dict:
    """Dense vs sparse next-token distributions over token blocks (one block per forward pass).

    Args:
        blocks: (block, token) token ids, each longer than the budget a + W + k.
        dense_lp: ``dense_logprobs(lm, blocks)`` when already computed (a sweep reuses them).
    Returns:
        {"kl", "top1_agree", "ppl_dense", "ppl_sparse", "ppl_change", "positions", "mass"}; kl and
        top1_agree average the positions ≥ budget; ``mass`` holds (layer, head) means of the fixed,
        selected and discarded mass (and page recall for the page selector) over the sparse layers.
    """
    if blocks.shape[1] <= cfg.budget + 1:
        raise ValueError(f"blocks of {blocks.shape[1]} tokens are too short for the budget a+W+k = {cfg.budget}: "
                         "nothing would be dropped; use longer blocks")
    log = MassLog()
    kl, agree, nll_dense, nll_sparse = [], [], [], []
    for i, block in enumerate(tqdm(blocks, desc=f"sparse W={cfg.window} k={cfg.topk}", disable=not progress, leave=False)):
        x = block[None]  # (1, token)
        dense = dense_lp[i] if dense_lp is not None else dense_logprobs(lm, x)[0]  # (token - 1, vocab)
        with sparse_attention(lm.model, cfg, log):
            sparse = token_logprobs(lm.model(x, use_cache=False).logits[0, :-1])  # (token - 1, vocab)
        if not (torch.isfinite(dense).all() and torch.isfinite(sparse).all()):
            raise FloatingPointError("non-finite logits; check the model's weights and dtype")
        active = slice(cfg.budget, None)  # logits at positions ≥ budget
        kl.append(F.kl_div(sparse[active], dense[active], log_target=True, reduction="none").sum(-1))
        agree.append(dense[active].argmax(-1) == sparse[active].argmax(-1))
        target = block[1:, None]
        nll_dense.append(-dense.gather(-1, target)[:, 0])
        nll_sparse.append(-sparse.gather(-1, target)[:, 0])
    ppl_dense = math.exp(torch.cat(nll_dense).double().mean().item())
    ppl_sparse = math.exp(torch.cat(nll_sparse).double().mean().item())
    kl, agree = torch.cat(kl), torch.cat(agree)
    return {"kl": kl.double().mean().item(), "top1_agree": agree.double().mean().item(),
            "ppl_dense": ppl_dense, "ppl_sparse": ppl_sparse, "ppl_change": ppl_sparse / ppl_dense - 1,
            "positions": int(kl.numel()), "mass": log.means(), "log": log}


@torch.no_grad()
def greedy(lm: LoadedModel, prompt: torch.Tensor, n_new: int, cfg: SparseConfig | None = None,
           implementation: str | None = None, progress: bool = False) -> torch.Tensor:
    """Greedy continuation of one prompt through the KV cache, dense (cfg=None) or sparse.

    No end-of-sequence stop: exactly ``n_new`` tokens, so dense and sparse runs align position by position.

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
        identical), "identical_prefix": tokens before it}.
    """
    if reference.shape != other.shape:
        raise ValueError(f"sequences differ in length: {tuple(reference.shape)} vs {tuple(other.shape)}")
    same = reference == other
    diverge = (~same).nonzero()
    first = int(diverge[0]) if len(diverge) else None
    return {"agree": same.double().mean().item(), "first_divergence": first,
            "identical_prefix": first if first is not None else int(same.numel())}


@torch.no_grad()
def trajectory_agreement(lm: LoadedModel, prompt: torch.Tensor, dense_tokens: torch.Tensor, cfg: SparseConfig | None,
                         implementation: str | None = None) -> dict:
    """Would sparse greedy decoding choose each token of the dense greedy continuation?

    Args:
        prompt: (token,) the prompt; dense_tokens: (n_new,) the dense greedy continuation of it.
        cfg: the sparse rule, or None for dense attention with another backend (``implementation``),
            which measures how far two exact implementations agree.
    Returns:
        {"agree": fraction of steps where the sparse argmax equals the dense token, "first_divergence":
        first step where it does not (None if never), "identical_prefix"}.
    """
    x = torch.cat([prompt, dense_tokens[:-1]])[None]  # (1, prompt + n_new - 1)
    context = sparse_attention(lm.model, cfg) if cfg is not None else _implementation(lm.model, implementation)
    with context:
        logits = lm.model(x, use_cache=False, logits_to_keep=len(dense_tokens)).logits[0]  # (n_new, vocab)
    return agreement(dense_tokens, logits.argmax(-1))


def fidelity_report(lm: LoadedModel, cfg: SparseConfig, prompt: torch.Tensor, n_new: int, eval_blocks: torch.Tensor,
                    progress: bool = False) -> dict:
    """Everything ``atlas sparse`` prints: greedy agreement, teacher-forced KL / top-1 / perplexity, mass.

    Args:
        prompt: (token,) the generation prompt; n_new: tokens generated by each of dense and sparse.
        eval_blocks: (block, token) held-out text for the teacher-forced measures.
    """
    dense = greedy(lm, prompt, n_new, progress=progress)
    sparse = greedy(lm, prompt, n_new, cfg, progress=progress)
    tf = teacher_forced(lm, eval_blocks, cfg, progress=progress)
    gen = agreement(dense, sparse)
    return {"token_agreement": gen["agree"], "first_divergence": gen["first_divergence"],
            "identical_prefix": gen["identical_prefix"], "top1_agreement": tf["top1_agree"], "kl": tf["kl"],
            "ppl_dense": tf["ppl_dense"], "ppl_sparse": tf["ppl_sparse"], "ppl_change": tf["ppl_change"],
            "discarded_mass": tf["mass"]["discarded"].mean().item(), "fixed_mass": tf["mass"]["fixed"].mean().item(),
            "selected_mass": tf["mass"]["selected"].mean().item(), "tf_positions": tf["positions"]}


def budget_sweep(lm: LoadedModel, configs: list[SparseConfig], blocks: torch.Tensor, prompt: torch.Tensor,
                 dense_tokens: torch.Tensor, progress: bool = False) -> list[dict]:
    """Teacher-forced fidelity and greedy first divergence of each sparse rule, one row per config.

    Args:
        blocks: (block, token) held-out text; prompt: (token,); dense_tokens: (n_new,) the dense greedy
            continuation of the prompt (``greedy(lm, prompt, n_new)``).
    Returns:
        rows with the rule's settings, kl, top1_agree, ppl_dense, ppl_sparse, ppl_change, the mean fixed,
        selected and discarded mass (page recall for the page selector), step_agree and first_divergence.
    """
    rows, dense_lp = [], dense_logprobs(lm, blocks)
    for cfg in tqdm(configs, desc="sparse rules", disable=not progress):
        tf = teacher_forced(lm, blocks, cfg, dense_lp=dense_lp)
        traj = trajectory_agreement(lm, prompt, dense_tokens, cfg)
        mass = {"fixed": math.nan, "selected": math.nan, "discarded": math.nan}  # stay NaN if every layer is dense
        mass.update({name: t.mean().item() for name, t in tf["mass"].items()})
        rows.append({**cfg.__dict__, "kl": tf["kl"], "top1_agree": tf["top1_agree"], "ppl_dense": tf["ppl_dense"],
                     "ppl_sparse": tf["ppl_sparse"], "ppl_change": tf["ppl_change"], **mass,
                     "step_agree": traj["agree"], "first_divergence": traj["first_divergence"]})
    return rows


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


@torch.no_grad()
def greedy_survival(lm: LoadedModel, prompts: torch.Tensor, rules: dict[str, SparseConfig | None], n_new: int = 128,
                    progress: bool = False) -> dict[str, list[int | None]]:
    """First divergence from dense greedy decoding, per prompt and rule, by the revised source's protocol.

    Per prompt, one dense prefill gives the KV cache and the first generated token, shared by every run;
    dense greedy decoding (the model's loaded attention) continues it to ``n_new`` tokens. Each rule
    then decodes from a copy of the same cache and first token, with the rule active in every decode
    step, greedily and free-running, and stops at its first token that differs from the dense one.

    Args:
        prompts: (prompt, token) token ids.
        rules: name -> sparse rule; None decodes dense again (a control: it never diverges).
        n_new: generated tokens per run, the shared first one included.
    Returns:
        {name: [first divergence per prompt]}: the index (1 … n_new − 1) of the first generated token
        that differs from dense, the revision's one-based decode step with the shared first token
        excluded; None where all ``n_new`` tokens are identical.
    Raises:
        ValueError: n_new < 2 (the first token is shared, so nothing would be compared).

    Source: Ruiz Williams 2026 (revision of arXiv 2602.06317), condensate/decode.py ``evaluate_decode``.
    """
    if n_new < 2:
        raise ValueError(f"n_new must be ≥ 2 (the first token comes from the shared dense prefill), got {n_new}")
    model = lm.model
    result: dict[str, list[int | None]] = {name: [] for name in rules}
    for prompt in tqdm(prompts, desc="greedy survival", disable=not progress, leave=False):
        prefill = model(prompt[None], use_cache=True)
        first = prefill.logits[0, -1].argmax()
        dense, _ = _decode_from(model, copy.deepcopy(prefill.past_key_values), first, n_new)
        for name, cfg in rules.items():
            context = sparse_attention(model, cfg) if cfg is not None else contextlib.nullcontext()
            with context:
                _, diverge = _decode_from(model, copy.deepcopy(prefill.past_key_values), first, n_new, dense)
            result[name].append(diverge)
    return result


def survival_summary(first_divergences: list, n_new: int = 128, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Median first divergence and the share of runs identical through ``n_new`` tokens, with 95% CIs.

    A run identical through n_new counts as diverging at n_new, as the revision's ``first_divergence``
    (= horizon for a surviving run) does, so the median is that of n_new-capped values.

    Args:
        first_divergences: per prompt, its first divergence, or a list of them (one per rule: runs that
            share the prompt), as ``greedy_survival`` gives them (None = identical through n_new).
    Returns:
        {"prompts", "runs", "median", "median_ci", "identical", "identical_ci", "max"}: statistics over
        every run; the CIs are percentile bootstrap intervals that resample prompts, each with all its
        runs (``geometry.bootstrap_ci`` over prompt indices, seeded).
    Raises:
        ValueError: no prompt, or prompts with different numbers of runs.
    """
    rows = [list(d) if isinstance(d, (list, tuple)) else [d] for d in first_divergences]
    if not rows or not rows[0] or len({len(r) for r in rows}) != 1:
        raise ValueError("survival_summary needs at least one prompt, each with the same number (≥ 1) of runs")
    steps = np.array([[n_new if d is None else d for d in r] for r in rows], dtype=np.float64)  # (prompt, run)
    identical = np.array([[d is None for d in r] for r in rows], dtype=np.float64)

    def over_prompts(values, reduce):
        """A statistic of resampled prompt indices (resample, prompt): ``reduce`` over all their runs."""
        return lambda idx, axis: reduce(values[idx.astype(np.int64)].reshape(len(idx), -1), axis=1)

    prompts = np.arange(len(rows))
    return {"prompts": len(rows), "runs": steps.size, "median": float(np.median(steps)),
            "median_ci": bootstrap_ci(prompts, n_resamples, seed=seed, statistic=over_prompts(steps, np.median)),
            "identical": float(identical.mean()),
            "identical_ci": bootstrap_ci(prompts, n_resamples, seed=seed, statistic=over_prompts(identical, np.mean)),
            "max": int(steps.max())}


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
        one phrase per statistic whose intervals do not meet, e.g. "the median first divergence is 30
        (the revision: 14)".
    """
    theirs = survival_summary([None if d >= horizon else d for d in theirs_first_divergences], horizon)
    k, n = round(theirs["identical"] * theirs["runs"]), theirs["runs"]
    gaps = []
    if not _meet(ours["identical_ci"], clopper_pearson(k, n)):
        gaps.append(f"{ours['identical']:.0%} of runs stay identical through {n_new} tokens (the revision: {k} of {n})")
    if not _meet(ours["median_ci"], theirs["median_ci"]):
        gaps.append(f"the median first divergence is {ours['median']:.0f} (the revision: {theirs['median']:.0f})")
    return gaps


def _meet(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]
