"""The A² value policy: spend value bits where attention will carry their error to the output.

With attention a fixed, the output of query i is Σ_j a_ij v_j, so a value error δ_j reaches it as
Σ_j a_ij δ_j. For independent zero-mean errors of variance σ_j², the expected squared output error summed
over queries is Σ_j w_j σ_j² with w_j = Σ_i a_ij². The policy gives the tokens with the largest w_j more
bits (full precision by default) and the rest fewer, at the same mean payload bits per element as uniform
quantization. Payload bits only: the fp16 scale and zero of a quantized group are not counted in the
budget (they are the same for every quantized token; full-precision tokens carry none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from atlas_core.kvquant.quant import QuantSpec, dequantize, quantize


def a2_weights(probs: torch.Tensor) -> torch.Tensor:
    """w_j = Σ_i a_ij² from attention (..., query, key) -> (..., key)."""
    return probs.pow(2).sum(-2)


def a2_bits(w: torch.Tensor, budget: float, low: int = 2, high: int = 16) -> torch.Tensor:
    """Per-token bits (key,): ``high`` for the largest w_j, ``low`` for the rest, mean ≤ ``budget``.

    Args:
        w: (key,) weights from ``a2_weights`` (summed over heads/batches if needed).
        budget: mean payload bits per element, ``low ≤ budget``.
    """
    if budget < low:
        raise ValueError(f"budget {budget} is below the low precision {low}")
    n = w.shape[-1]
    n_high = min(n, int((budget - low) * n // (high - low)))
    bits = torch.full((n,), low, dtype=torch.long)
    bits[torch.argsort(w, descending=True)[:n_high]] = high
    return bits


def quantize_tokens(v: torch.Tensor, bits: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Dequantized values (..., key, d_head) with per-token bits (key,); 16 bits = kept as is."""
    out = v.clone()
    for b in bits.unique().tolist():
        if b >= 16:
            continue
        idx = (bits == b).nonzero().squeeze(-1)
        spec = QuantSpec(bits=b, group=group, axis="token")
        out[..., idx, :] = dequantize(quantize(v[..., idx, :], spec), spec, v.dtype)
    return out


def value_output_error(a: torch.Tensor, v: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
    """‖Σ_j a_ij (v̂_j − v_j)‖ per query (..., query), attention fixed."""
    return (a @ (v_hat - v)).norm(dim=-1)


def value_policy_errors(probs: torch.Tensor, v: torch.Tensor, kv_group: torch.Tensor, budget: float, group: int,
                        seed: int, per_block: bool = False) -> dict[str, float] | dict[str, np.ndarray]:
    """Offline output error of value quantization policies at a mean payload budget, attention held fixed.

    Per block and KV head, with w_j = Σ_i a_ij² summed over the KV group's query heads: every value at 2
    bits ("uniform 2b"); every value at ⌊budget⌋ bits ("uniform {budget}b"); the A² policy with w from all
    queries ("A² (oracle)") or from the first half of the queries ("A² (causal)"); and as many randomly
    chosen tokens in full precision as the oracle keeps ("random tokens fp"). Each is judged on the second
    half of the queries by ‖Σ_j a_ij (v̂_j − v_j)‖ (``value_output_error``).

    Args:
        probs: (block, head, query, key) attention weights of one layer (query = key positions).
        v: (block, kv_head, key, d_head) its values.
        kv_group: (head,) the KV head each query head reads.
        budget: mean payload bits per value element, ≥ 2.
        group: channels per per-token quantization group.
        seed: seeds the random-token control (the chapter passes seed + layer).
        per_block: return each block's mean (over KV heads, query heads and judged queries) instead of the
            overall mean, for block-bootstrap intervals of ratios between policies (``interval.ratio_of_means``).
    Returns:
        {policy: mean output error over blocks, KV heads, their query heads and the judged queries}, or with
        ``per_block`` {policy: (block,) array} whose mean is that figure.
    Raises:
        ValueError: budget below 2 bits (``a2_bits``).
    Source: our reconstruction of HeadQ's "A² value policy" (Ruiz-Williams 2026, abstract); heavy hitters as in
    H2O (Zhang et al. 2023).
    """
    n_block, _, n_query, n_key = probs.shape
    half = n_query // 2
    gen = torch.Generator().manual_seed(seed)
    uniform = QuantSpec(bits=int(math.floor(budget)), group=group, axis="token")
    errs: dict[str, list] = {}
    for blk in range(n_block):
        for kvh in range(v.shape[1]):
            p = probs[blk, (kv_group == kvh).nonzero().squeeze(-1)].float()  # (group head, query, key)
            vv = v[blk, kvh]  # (key, d_head)
            w_all = a2_weights(p).sum(0)  # (key,)
            w_causal = a2_weights(p[:, :half]).sum(0)
            n_high = a2_bits(w_all, budget).eq(16).sum()
            rand = torch.full((n_key,), 2, dtype=torch.long)
            rand[torch.randperm(n_key, generator=gen)[:n_high]] = 16
            choices = {"uniform 2b": torch.full((n_key,), 2), f"uniform {budget:g}b": None,
                       "A² (oracle)": a2_bits(w_all, budget), "A² (causal)": a2_bits(w_causal, budget),
                       "random tokens fp": rand}
            judged = p[:, half:]  # the second half of the queries, for every policy alike
            for name, b in choices.items():
                v_hat = dequantize(quantize(vv, uniform), uniform) if b is None else quantize_tokens(vv, b, group)
                errs.setdefault(name, []).append(value_output_error(judged, vv, v_hat).mean().item())
    if per_block:  # errs[name] holds block-major (block, kv_head) entries
        return {name: np.asarray(e).reshape(n_block, -1).mean(1) for name, e in errs.items()}
    return {name: float(np.mean(e)) for name, e in errs.items()}


# ----------------------------------------------------------------------------------------------------------------
# The causal policy inside decoding: bits chosen when a value is flushed into storage.


@dataclass(frozen=True, kw_only=True)
class ValuePolicy:
    """A² value bits chosen causally, at the mean payload bits of the uniform value quantizer it replaces.

    The cache's value quantizer (per token, ``b`` = its bits, its group and scale dtype) sets the budget:
    a share s = (b − low)/(high − low) of the flushed values may get ``high`` bits (16: kept in full
    precision), the rest get ``low``. Which ones is decided when a value is flushed, from the attention
    weights seen so far (``causal_a2_choice``).
    """

    low: int  # bits of the ordinary flushed values
    high: int = 16  # bits of the chosen ones; 16 = full precision

    def __post_init__(self):
        if not 1 <= self.low <= 8 or not (self.low < self.high <= 8 or self.high == 16):
            raise ValueError(f"value policy bits must satisfy 1 ≤ low < high ≤ 8 or high = 16, got low={self.low}, high={self.high}")

    def check(self, spec: QuantSpec | None) -> None:
        """Raise ValueError unless ``spec`` is a per-token value quantizer whose bits lie in [low, high]."""
        if spec is None or spec.axis != "token":
            raise ValueError("the A² value policy needs per-token quantized values (a value QuantSpec with axis='token', e.g. --vbits 2)")
        if not self.low <= spec.bits <= self.high:
            raise ValueError(f"the value bits {spec.bits} (the budget) must lie in [low, high] = [{self.low}, {self.high}]")

    def allowance(self, budget: int, n_flushed: int) -> int:
        """Most values of the first ``n_flushed`` that may hold ``high`` bits: ⌊(b − low)·N/(high − low)⌋ (exact integers)."""
        return (budget - self.low) * n_flushed // (self.high - self.low)

    def share(self, budget: int) -> float:
        return (budget - self.low) / (self.high - self.low)


def causal_a2_choice(w: torch.Tensor, n_seen: torch.Tensor, flushes: list[tuple[int, int]], policy: ValuePolicy, budget: int) -> torch.Tensor:
    """Which flushed values get ``high`` bits, deciding each flush with what was known at that flush.

    The rule, per (batch row, KV head), flush by flush in order (values are flushed oldest first, so a
    flush holds tokens lo … hi − 1 and tokens 0 … hi − 1 are then stored):

    1. w_j = Σ a_ij² over the queries i processed up to and including the update that flushes j, summed
       over the query heads of the KV group (the caller measures it; later queries never count), and
       r_j = w_j / n_j, n_j = i_last − j + 1 the queries from j up to the last one processed (tokens
       flushed from the prefill have been seen by more queries than tokens flushed while decoding, so w_j
       alone would rank every decoded token below the prefill's);
    2. allowance = ⌊(b − low)·hi/(high − low)⌋ − (values already given ``high``): a running budget, so
       the high share of the stored values never exceeds s = (b − low)/(high − low) and the mean payload
       bits of the stored values never exceed b, after every flush;
    3. candidates are the tokens of this flush with r_j ≥ τ, τ the (1 − s)-quantile (linear
       interpolation) of r over all stored tokens 0 … hi − 1; the candidates with the largest r_j (ties:
       older first) get ``high`` bits while the allowance lasts.

    An allowance not spent is carried to later flushes, not forced: the mean payload can end below b
    (``onepass_nll`` reports the spent payload as ``value_payload``). Payload bits only: the fp16 scale
    and zero of a quantized group and the fp window (the same as uniform quantization's) are not counted.

    Args:
        w: (..., token) weights; only entries of flushed tokens are read.
        n_seen: (token,) n_j ≥ 1, the queries that had been processed from j on when j was flushed.
        flushes: [(lo, hi)] contiguous token ranges from 0, one per flush, in order.
        budget: b, the bits of the uniform value quantizer.
    Returns:
        (..., token) bool, True where the value is stored with ``high`` bits (False for unflushed tokens).
    """
    high = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    r = w.double() / n_seen.to(w.device).clamp_min(1)  # (..., token) mean a² per query that saw j
    level = 1.0 - policy.share(budget)
    for lo, hi in flushes:
        room = policy.allowance(budget, hi) - high[..., :lo].sum(-1)  # (...,)
        tau = torch.quantile(r[..., :hi], level, dim=-1, keepdim=True)  # (..., 1)
        part = r[..., lo:hi]  # (..., flushed)
        cand = part >= tau
        order = torch.argsort(torch.where(cand, part, -math.inf), dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(hi - lo, device=w.device).expand_as(order))
        high[..., lo:hi] = cand & (rank < room[..., None])
    return high


def mixed_values(v: torch.Tensor, high: torch.Tensor, spec: QuantSpec, policy: ValuePolicy) -> torch.Tensor:
    """What attention sees of values (..., token, d_head) stored at ``policy.low`` bits, or ``high`` where
    ``high`` (..., token) is True (the values themselves when high = 16); per-token groups as in ``spec``."""
    low = replace(spec, bits=policy.low)
    out = dequantize(quantize(v, low), low, v.dtype)
    if policy.high == 16:
        return torch.where(high[..., None], v, out)
    top = replace(spec, bits=policy.high)
    return torch.where(high[..., None], dequantize(quantize(v, top), top, v.dtype), out)
