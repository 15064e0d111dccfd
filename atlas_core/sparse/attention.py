"""Condensate attention inside any supported model: a registered attention function, ``atlas_sparse``.

In every sparse layer the function scores all visible keys exactly, builds each query's kept set
(``kept.kept_mask`` or ``pages.page_mask``), and then calls the model's own ``eager_attention_forward``
with the model's mask narrowed to the kept set: the softmax is renormalised over the kept keys and
nothing else of the architecture is re-typed. With a kept set equal to the visible set the output is
bit-identical to eager attention. GQA (shared KV heads), sliding-window layers (their mask already hides
keys outside the window) and the KV cache during generation work as in the model itself: during decoding
the query is the newest token and the keys are whatever the cache returns.

Positions: the query positions come from ``position_ids`` when the model passes them, and the keys
returned by a cache are the contiguous positions ending at the newest query (true for full and for
sliding-window caches).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from atlas_core.extract import attention_modules
from atlas_core.sparse.kept import SparseConfig, kept_mask
from atlas_core.sparse.pages import page_mask, selection_recall

SPARSE = "atlas_sparse"
_STATE = "_atlas_sparse"  # attribute on each attention module while sparse: (layer, config, log)

__all__ = ["SPARSE", "MassLog", "positions", "sparse_attention", "sparse_attention_forward"]


@dataclass
class MassLog:
    """Per (layer, head) sums of the full-softmax mass on the fixed part, the selected part and the rest.

    Only queries at positions ≥ ``min_position`` count (by default the budget a + W + k, where the sparse
    rule can discard anything). ``recall`` sums the page selector's index and mass recall of exact top-k.
    """

    min_position: int | None = None
    sums: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> name -> (head,)
    counts: dict[int, int] = field(default_factory=dict)  # layer -> queries counted (per head)
    discarded: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [(head, query)] m values

    def add(self, layer: int, parts: dict[str, torch.Tensor]) -> None:
        """Accumulate per-query tensors (batch, head, query) of one forward call."""
        n = parts["fixed"].shape[0] * parts["fixed"].shape[2]
        sums = self.sums.setdefault(layer, {})
        for name, t in parts.items():
            sums[name] = sums.get(name, 0) + t.double().nansum(dim=(0, 2))
        self.counts[layer] = self.counts.get(layer, 0) + n
        self.discarded.setdefault(layer, []).append(parts["discarded"].transpose(0, 1).reshape(parts["discarded"].shape[1], -1))

    def means(self) -> dict[str, torch.Tensor]:
        """{name: (layer, head) mean over counted queries}, layers in logged order (sorted)."""
        layers = sorted(self.sums)
        return {name: torch.stack([self.sums[l][name] / self.counts[l] for l in layers]).float()
                for name in self.sums[layers[0]]} if layers else {}

    def discarded_values(self, layer: int) -> torch.Tensor:
        """(head, query) every counted query's discarded mass m in one layer."""
        return torch.cat(self.discarded[layer], dim=1)


def positions(position_ids: torch.Tensor | None, n_query: int, n_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of the queries (query,) and of the keys (key,) of one attention call."""
    if position_ids is None:
        q_pos = torch.arange(n_key - n_query, n_key)
    else:
        q_pos = position_ids.reshape(-1, position_ids.shape[-1])[0].cpu()
    k_pos = torch.arange(n_key) + (int(q_pos[-1]) - (n_key - 1))
    return q_pos, k_pos


def _visible(attention_mask, q_pos, k_pos, dtype) -> torch.Tensor:
    """(batch or 1, 1, query, key) bool: what the model's own mask lets each query see."""
    if attention_mask is None:
        return (k_pos[None, :] <= q_pos[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(dtype).min / 2


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function ``atlas_sparse``: eager attention restricted to each query's kept set.

    Args:
        query: (batch, head, query, d_head); key, value: (batch, kv_head, key, d_head).
        attention_mask: the model's additive mask (batch, 1, query, key) or None.
    Returns:
        (output (batch, query, head, d_head), probabilities (batch, head, query, key)), as eager does.
    """
    state = getattr(module, _STATE, None)
    if state is None:
        raise RuntimeError(f"the '{SPARSE}' attention runs only inside atlas_core.sparse.sparse_attention(model, config)")
    layer, cfg, log = state
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if layer < cfg.dense_layers:
        return eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    key_rep = repeat_kv(key, query.shape[1] // key.shape[1])  # (batch, head, key, d_head)
    scores = query @ key_rep.transpose(-1, -2) * scale  # (batch, head, query, key)
    if kwargs.get("softcap"):
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    q_pos, k_pos = (t.to(query.device) for t in positions(kwargs.get("position_ids"), query.shape[2], key.shape[2]))
    visible = _visible(attention_mask, q_pos, k_pos, query.dtype)
    if cfg.selector == "exact":
        fixed, chosen = kept_mask(scores, visible, q_pos, k_pos, cfg)
    else:
        fixed, chosen = page_mask(query, key_rep, scale, visible, q_pos, k_pos, cfg)
    narrowed = torch.zeros((), dtype=query.dtype).where(fixed | chosen, torch.finfo(query.dtype).min)
    if log is not None:
        _log(log, layer, scores, visible, q_pos, k_pos, fixed, chosen, cfg)
    return eager(module, query, key, value, narrowed, scaling=scaling, **kwargs)


def _log(log: MassLog, layer, scores, visible, q_pos, k_pos, fixed, chosen, cfg: SparseConfig) -> None:
    rows = q_pos >= (cfg.budget if log.min_position is None else log.min_position)
    if not rows.any():
        return
    s, vis = scores[:, :, rows], visible.expand_as(scores)[:, :, rows]
    probs = s.masked_fill(~vis, float("-inf")).softmax(-1)
    fixed, chosen = fixed[:, :, rows], chosen[:, :, rows]
    parts = {"fixed": (probs * fixed).sum(-1), "selected": (probs * chosen).sum(-1)}
    parts["discarded"] = (1 - parts["fixed"] - parts["selected"]).clamp_min(0)
    if cfg.selector == "pages":
        _, exact = kept_mask(s, vis, q_pos[rows], k_pos, cfg)
        parts["index_recall"], parts["mass_recall"] = selection_recall(probs, chosen, exact)
    log.add(layer, parts)


AttentionInterface.register(SPARSE, sparse_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(SPARSE, eager_mask)  # the additive masks eager attention gets


@contextlib.contextmanager
def sparse_attention(model, cfg: SparseConfig, log: MassLog | None = None):
    """Run ``model`` with condensate attention (``cfg``) in every layer from ``cfg.dense_layers`` on.

    Args:
        model: a transformers causal LM of a supported family (see ``atlas_core.extract.LAYOUTS``).
        cfg: the sparse rule.
        log: if given, collects the mass captured per (layer, head).
    """
    modules = attention_modules(model)
    if cfg.dense_layers > len(modules):
        raise ValueError(f"dense_layers={cfg.dense_layers} exceeds the model's {len(modules)} layers")
    previous = model.config._attn_implementation
    for layer, module in enumerate(modules):
        setattr(module, _STATE, (layer, cfg, log))
    model.set_attn_implementation(SPARSE)
    try:
        yield log
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            delattr(module, _STATE)
