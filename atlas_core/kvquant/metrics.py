"""Key-quantization error as the model sees it.

All functions take one head's tensors with any leading batch axes:
q (..., query, d_head), k and k̂ (..., key, d_head), v (..., key, d_head), an optional boolean mask
(query, key) of allowed positions (True = attended), and the logit scale (1/√d_head by default).

- key MSE: mean (k̂ − k)².
- logit error e_ij = scale · q_i·(k̂_j − k_j); logit MSE = mean over allowed (i, j) of e².
- Fisher error ½ Σ_j a_ij (e_ij − ē_i)², ē_i = Σ_j a_ij e_ij: blind to a constant shift of a row of
  logits (as softmax is) and equal to KL(a‖â) to second order in e.
- attention KL(a‖â) = Σ_j a_ij log(a_ij / â_ij).
- output error ‖Σ_j (â_ij − a_ij) v_j‖ (values untouched, attention changed).
"""

from __future__ import annotations

import math

import torch


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def logits(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention logits (..., query, key)."""
    return (q @ k.transpose(-1, -2)) * _scale(q, scale)


def probs(logit: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over keys, masked positions get probability 0."""
    if mask is not None:
        logit = logit.masked_fill(~mask, float("-inf"))
    return torch.softmax(logit, dim=-1)


def causal_mask(n_query: int, n_key: int | None = None, window: int | None = None) -> torch.Tensor:
    """(query, key) bool mask of the keys each query sees: causal, and banded in a sliding-window layer.

    Args:
        n_query, n_key: the queries are the last ``n_query`` of ``n_key`` positions (the last query sees
            every key); ``n_key`` defaults to ``n_query``.
        window: a sliding-window layer's length (``ModelSpec.windows[layer]``): query i sees key j only
            when i − j < window; None for full attention.
    Returns:
        (query, key) bool, True where the key is seen.
    Raises:
        ValueError: ``window`` below 1.
    Source: transformers ``masking_utils.sliding_window_causal_mask_function`` (kv_idx > q_idx − window).
    """
    n_key = n_query if n_key is None else n_key
    offset = n_key - n_query  # query i sits at position i + offset
    mask = torch.ones(n_query, n_key, dtype=torch.bool).tril(diagonal=offset)
    if window is not None:
        if window < 1:
            raise ValueError(f"a sliding window must hold at least 1 key, got window={window}")
        mask &= ~torch.ones(n_query, n_key, dtype=torch.bool).tril(diagonal=offset - window)
    return mask


def key_mse(k: torch.Tensor, k_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared key error over all elements (a scalar)."""
    return (k_hat - k).pow(2).mean()


def logit_error(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """e (..., query, key) = scale · q·(k̂ − k)."""
    return logits(q, k_hat - k, scale)


def logit_mse(e: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of e² over allowed positions (a scalar)."""
    if mask is None:
        return e.pow(2).mean()
    m = mask.expand_as(e)
    return e.pow(2)[m].mean()


def fisher_error(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """½ Σ_j a_j (e_j − ē)², ē = Σ_j a_j e_j, per query (..., query); masked keys have a = 0."""
    e = torch.where(a > 0, e, torch.zeros_like(e))  # masked logits carry no error
    e_bar = (a * e).sum(-1, keepdim=True)
    return 0.5 * (a * (e - e_bar).pow(2)).sum(-1)


def attention_kl(a: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
    """KL(a‖â) per query (..., query), with 0 log 0 = 0."""
    ratio = torch.log(a.clamp_min(1e-30)) - torch.log(a_hat.clamp_min(1e-30))
    return torch.where(a > 0, a * ratio, torch.zeros_like(a)).sum(-1)


def output_error(a: torch.Tensor, a_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖Σ_j (â_j − a_j) v_j‖ per query (..., query)."""
    return ((a_hat - a) @ v).norm(dim=-1)


def key_error_report(
    q: torch.Tensor,
    k: torch.Tensor,
    k_hat: torch.Tensor,
    v: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> dict[str, float]:
    """Every metric for one head, averaged over queries (and leading axes).

    Returns:
        {"key_mse", "logit_mse", "fisher", "kl", "output_error" (when v is given)}
    """
    a = probs(logits(q, k, scale), mask)  # (..., query, key)
    a_hat = probs(logits(q, k_hat, scale), mask)
    e = logit_error(q, k, k_hat, scale)
    report = {
        "key_mse": key_mse(k, k_hat).item(),
        "logit_mse": logit_mse(e, mask).item(),
        "fisher": fisher_error(a, e).mean().item(),
        "kl": attention_kl(a, a_hat).mean().item(),
    }
    if v is not None:
        report["output_error"] = output_error(a, a_hat, v).mean().item()
    return report
