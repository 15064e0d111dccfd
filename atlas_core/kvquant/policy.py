"""The A² value policy: spend value bits where attention will carry their error to the output.

With attention a fixed, the output of query i is Σ_j a_ij v_j, so a value error δ_j reaches it as
Σ_j a_ij δ_j. For independent zero-mean errors of variance σ_j², the expected squared output error summed
over queries is Σ_j w_j σ_j² with w_j = Σ_i a_ij². The policy gives the tokens with the largest w_j more
bits (full precision by default) and the rest fewer, at the same mean payload bits per element as uniform
quantization. Payload bits only: the fp16 scale and zero of a quantized group are not counted in the
budget (they are the same for every quantized token; full-precision tokens carry none).
"""

from __future__ import annotations

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
