"""Condensate attention inside any supported model: a registered attention function, ``atlas_sparse``.

In every sparse layer the function scores all visible keys exactly, builds each query's kept set
(``kept.kept_mask``, ``pages.page_mask`` or ``blocks.block_mask``), and then takes the softmax over
the kept keys from those same scores (``kept_attention``, the same operations as eager attention under
the narrowed mask, without computing q·k twice). The plain reference (``sparse_attention(...,
reference=True)``, and always in training mode) calls the model's own ``eager_attention_forward`` with the
model's mask narrowed to the kept set; tests hold the two equal on every toy family and selector. With a
kept set equal to the visible set the output is bit-identical to eager attention. GQA (shared KV heads), sliding-window layers (their mask already hides
keys outside the window) and the KV cache during generation work as in the model itself: during decoding
the query is the newest token and the keys are whatever the cache returns.

Positions are per batch row, so a padded batch (left padding with per-row ``position_ids``, as
``generate`` makes them) selects in each row exactly what the row alone would: the query positions come
from ``position_ids`` when the model passes them (else the cache slots), the keys of the call's own
queries have the queries' positions, and the keys a cache returns before them are the row's contiguous
positions ending just before its first query (true for full and for sliding-window dynamic caches; a
left-padded row's pad slots get positions below 0 and are never visible). Pad queries (a row's query
that cannot see its own slot) are not logged. A pre-allocated cache (``StaticCache``), whose keys do not
end at the newest query, is refused with a ValueError.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from atlas_core.attention import attention_modules, eager_of, intervene, register, state_of
from atlas_core.sparse.blocks import BLOCK_SELECTORS, block_mask
from atlas_core.sparse.certified import certified_mask
from atlas_core.sparse.kept import SparseConfig, kept_mask
from atlas_core.sparse.pages import page_mask, selection_recall

SPARSE = "atlas_sparse"  # each attention module's state inside ``sparse_attention``: (layer, config, log, reference)

__all__ = ["SPARSE", "MassLog", "kept_attention", "query_chunks", "positions", "real_queries", "sparse_attention", "sparse_attention_forward"]


@dataclass
class MassLog:
    """Per (layer, head) sums of the full-softmax mass on the fixed part, the selected part and the rest.

    Only real queries (not padding) at positions ≥ ``min_position`` count, each row by its own positions
    (by default the budget a + W + k, where the sparse rule can discard anything). ``index_recall`` and
    ``mass_recall`` sum an approximate selector's recall of exact top-k.
    """

    min_position: int | None = None
    sums: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> name -> (head,)
    counts: dict[int, int] = field(default_factory=dict)  # layer -> queries counted (per head)
    discarded: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [(head, query)] m values
    # name -> layer -> [(query,)] per forward call: every part's per-query value, averaged over heads (for
    # block-bootstrap intervals of the fixed/selected/discarded mass and page recall)
    per_query: dict[str, dict[int, list[torch.Tensor]]] = field(default_factory=dict)
    certificates: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [(head, query)] (certified)

    def add(self, layer: int, parts: dict[str, torch.Tensor]) -> None:
        """Accumulate the counted queries of one forward call.

        Args:
            parts: name -> (head, counted query) tensor, the counted (batch row, query) pairs in row-major order.
        """
        sums = self.sums.setdefault(layer, {})
        for name, t in parts.items():
            sums[name] = sums.get(name, 0) + t.double().nansum(dim=1)
        self.counts[layer] = self.counts.get(layer, 0) + parts["fixed"].shape[1]
        self.discarded.setdefault(layer, []).append(parts["discarded"])
        if "certificate" in parts:  # beside m, query by query: the calibration of the certified selector
            self.certificates.setdefault(layer, []).append(parts["certificate"])
        for name, t in parts.items():
            self.per_query.setdefault(name, {}).setdefault(layer, []).append(t.double().mean(0))

    def means(self) -> dict[str, torch.Tensor]:
        """{name: (layer, head) mean over counted queries}, layers in logged order (sorted)."""
        layers = sorted(self.sums)
        return {name: torch.stack([self.sums[l][name] / self.counts[l] for l in layers]).float()
                for name in self.sums[layers[0]]} if layers else {}

    def discarded_values(self, layer: int) -> torch.Tensor:
        """(head, query) every counted query's discarded mass m in one layer."""
        return torch.cat(self.discarded[layer], dim=1)

    def certificate_values(self, layer: int) -> torch.Tensor:
        """(head, query) the certified selector's certificate for the same queries as ``discarded_values``."""
        return torch.cat(self.certificates[layer], dim=1)


def positions(position_ids: torch.Tensor | None, n_query: int, n_key: int, batch: int = 1):
    """Absolute positions of the queries and keys of one attention call, per batch row.

    Args:
        position_ids: (query,), (1, query) or (batch, query), or None (then the cache slots n_key − n_query ...).
        n_query, n_key: queries and keys in the call; the last n_query keys are the queries' own.
    Returns:
        (q_pos (batch, query), k_pos (batch, key)); the keys before the queries' own are the row's
        contiguous positions ending just before its first query.
    Raises:
        ValueError: position_ids of another shape (e.g. 3-D multimodal positions).
    """
    if position_ids is None:
        q_pos = torch.arange(n_key - n_query, n_key)[None]
    elif position_ids.dim() > 2 or position_ids.shape[-1] != n_query or position_ids.reshape(-1, n_query).shape[0] not in (1, batch):
        raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} do not fit {batch} row(s) of {n_query} "
                         "queries; sparse attention takes (batch, query) positions")
    else:
        q_pos = position_ids.reshape(-1, n_query)
    q_pos = q_pos.expand(batch, n_query)
    past = n_key - n_query
    before = q_pos[:, :1] - past + torch.arange(past, device=q_pos.device)  # (batch, past)
    return q_pos, torch.cat([before, q_pos], dim=1)


def _visible(attention_mask, q_pos, k_pos, dtype) -> torch.Tensor:
    """(batch, 1, query, key) bool: what the model's own mask lets each query see."""
    if attention_mask is None:
        return (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(dtype).min / 2


def real_queries(visible: torch.Tensor) -> torch.Tensor:
    """(batch, query) bool: the queries that see their own key slot (a pad query does not).

    Args:
        visible: (batch, 1 or head, query, key) bool; the queries' own keys are the last ``query`` slots.
    """
    nq, nk = visible.shape[-2:]
    own = torch.arange(nq, device=visible.device)
    return visible[..., own, nk - nq + own].any(1)


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function ``atlas_sparse``: eager attention restricted to each query's kept set.

    Args:
        query: (batch, head, query, d_head); key, value: (batch, kv_head, key, d_head).
        attention_mask: the model's additive mask (batch, 1, query, key) or None.
    Returns:
        (output (batch, query, head, d_head), probabilities): the probabilities (batch, head, query, key) as
        eager returns them on the reference path; None on the fast path, which takes the queries in chunks
        (``query_chunk``) and never holds every query's scores at once.
    """
    layer, cfg, log, reference = state_of(module, SPARSE)
    eager = eager_of(module)
    position_ids = kwargs.get("position_ids")
    q_pos, k_pos = positions(position_ids.to(query.device) if position_ids is not None else None,
                             query.shape[2], key.shape[2], query.shape[0])  # (batch, query), (batch, key)
    if layer < cfg.dense_layers or bool((q_pos < cfg.sparse_from).all()):  # a dense layer, or a dense prefill
        return eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    key_rep = repeat_kv(key, query.shape[1] // key.shape[1])  # (batch, head, key, d_head)
    visible = _visible(attention_mask, q_pos, k_pos, query.dtype)  # (batch, 1, query, key) bool
    if not real_queries(visible).any():  # keys not ending at the newest query: positions would be wrong
        raise ValueError("sparse attention needs a cache whose keys end at the newest query (DynamicCache); no query "
                         "of this call sees its own key slot (a StaticCache or other pre-allocated cache?)")
    select = lambda rows: _kept_sets(query[:, :, rows], key, key_rep, visible[:, :, rows], q_pos[:, rows], k_pos,
                                     cfg, scale, kwargs.get("softcap"))
    if reference or module.training:  # the model's own eager attention (with its dropout) under the narrowed mask
        scores, fixed, chosen, stats = select(slice(None))
        if log is not None:
            _log(log, layer, [_mass_parts(scores, visible, q_pos, k_pos, fixed, chosen, cfg, stats)], visible, q_pos, cfg)
        narrowed = torch.zeros((), dtype=query.dtype).where(fixed | chosen, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, narrowed, scaling=scaling, **kwargs)
    outputs, parts = [], []
    for rows in query_chunks(*query.shape[:3], key.shape[2]):
        scores, fixed, chosen, stats = select(rows)
        if log is not None:
            parts.append(_mass_parts(scores, visible[:, :, rows], q_pos[:, rows], k_pos, fixed, chosen, cfg, stats))
        outputs.append(kept_attention(scores, value, fixed | chosen, query.dtype)[0])
    if log is not None:
        _log(log, layer, parts, visible, q_pos, cfg)
    return torch.cat(outputs, dim=1), None


CHUNK_BYTES = 8 << 20  # one (batch, head, chunk, key) fp32 tensor stays below glibc's mmap threshold (32 MiB) and in cache


def query_chunks(batch: int, heads: int, n_query: int, n_key: int) -> list[slice]:
    """Slices of the queries such that one chunk's (batch, head, chunk, key) fp32 scores fit ``CHUNK_BYTES``.

    Every selector decides each query's kept set from that query's scores alone, so chunking changes nothing
    but memory: a 1,024-token block's full score tensor (9 heads: 38 MiB) is allocated fresh by mmap on every
    call, and the kernel zeroes its pages (a third of the CPU time, as system time, on one thread).
    """
    size = max(1, CHUNK_BYTES // (4 * batch * heads * max(n_key, 1)))
    return [slice(start, min(start + size, n_query)) for start in range(0, n_query, size)]


def _kept_sets(query, key, key_rep, visible, q_pos, k_pos, cfg: SparseConfig, scale: float, softcap):
    """Scores and kept sets of some queries.

    Args:
        query: (batch, head, query, d_head); key: (batch, kv_head, key, d_head); key_rep: its heads repeated.
        visible: (batch, 1, query, key); q_pos: (batch, query); k_pos: (batch, key).
    Returns:
        (scores, fixed, chosen, stats): scores, fixed and chosen (batch, head, query, key), fixed and chosen
        disjoint bool; stats: the certified selector's {"certificate", "pages_read", "candidate_pages"}, each
        (batch, head, query) (empty for the other selectors).
    """
    scores = query @ key_rep.transpose(-1, -2) * scale  # (batch, head, query, key)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    stats = {}
    if cfg.selector == "exact":
        fixed, chosen = kept_mask(scores, visible, q_pos, k_pos, cfg)
    elif cfg.selector == "certified":
        fixed, chosen, stats = certified_mask(query, key, scores, scale, visible, q_pos, k_pos, cfg, softcap)
    elif cfg.selector in BLOCK_SELECTORS:
        fixed, chosen = block_mask(query, key, visible, q_pos, k_pos, cfg)
    else:
        fixed, chosen = page_mask(query, key_rep, scale, visible, q_pos, k_pos, cfg)
    if cfg.sparse_from:  # queries of the dense prefill keep every visible key (as fixed: the parts stay disjoint)
        prefill = visible & (q_pos < cfg.sparse_from)[:, None, :, None]  # (batch, 1, query, key)
        fixed, chosen = fixed | prefill, chosen & ~prefill
    return scores, fixed, chosen, stats


def kept_attention(scores: torch.Tensor, value: torch.Tensor, kept: torch.Tensor, dtype: torch.dtype):
    """Softmax over each query's kept keys, from scores already computed (the fast path of ``atlas_sparse``).

    The same operations as eager attention under the narrowed additive mask (a dropped key's logit becomes
    the dtype's minimum, so a query with nothing kept, a pad row, gets finite weights as in eager, never NaN),
    without computing q·k a second time. Eval mode only: no dropout.

    Args:
        scores: (batch, head, query, key) scaled (and soft-capped) logits.
        value: (batch, kv_head, key, d_head).
        kept: (batch, head, query, key) bool, fixed | chosen.
    Returns:
        (output (batch, query, head, d_head), probabilities (batch, head, query, key)), as eager returns them.
    Source: transformers' ``eager_attention_forward`` (llama), which ``sparse_attention(..., reference=True)``
    calls instead; tests hold the two equal on every toy family.
    """
    probs = scores.masked_fill(~kept, torch.finfo(scores.dtype).min).softmax(-1, dtype=torch.float32).to(dtype)
    value_rep = repeat_kv(value, scores.shape[1] // value.shape[1])  # (batch, head, key, d_head)
    return (probs @ value_rep).transpose(1, 2).contiguous(), probs


def _mass_parts(scores, visible, q_pos, k_pos, fixed, chosen, cfg: SparseConfig, stats: dict) -> dict[str, torch.Tensor]:
    """{name: (batch, head, query)} the full softmax's mass on the fixed, selected and discarded keys (and an
    approximate selector's recall of exact top-k; the certified selector's certificate, pages read and share of
    the key bytes read)."""
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)  # (batch, head, query, key); NaN on pad rows
    parts = {"fixed": (probs * fixed).sum(-1), "selected": (probs * chosen).sum(-1)}  # (batch, head, query)
    # Summed directly, not 1 − kept: at thousands of keys 1 − kept carries ~1e-6 of float32 rounding, which would
    # swamp a certificate of that size (and a kept-everything query's m must be exactly 0).
    parts["discarded"] = (probs * (visible & ~(fixed | chosen))).sum(-1)
    parts.update(stats)
    if cfg.selector not in ("exact", "certified"):  # recall of exact top-k: the fixed-budget selectors
        _, exact = kept_mask(scores, visible, q_pos, k_pos, cfg)
        parts["index_recall"], parts["mass_recall"] = selection_recall(probs, chosen, exact)
    return parts


def _log(log: MassLog, layer, chunks: list[dict[str, torch.Tensor]], visible, q_pos, cfg: SparseConfig) -> None:
    """Log the mass split (``_mass_parts`` of consecutive query chunks) of the real queries past
    ``min_position`` (and past the dense prefill, ``cfg.sparse_from``), each row by its own positions."""
    first = max(cfg.budget if log.min_position is None else log.min_position, cfg.sparse_from)  # dense prefill: not counted
    rows = (q_pos >= first) & real_queries(visible)  # (batch, query)
    if not rows.any():
        return
    parts = {name: torch.cat([c[name] for c in chunks], dim=2) for name in chunks[0]}  # (batch, head, query)
    log.add(layer, {name: t.transpose(0, 1)[:, rows] for name, t in parts.items()})  # (head, counted)


register(SPARSE, sparse_attention_forward, owner="atlas_core.sparse.sparse_attention(model, config)")


@contextlib.contextmanager
def sparse_attention(model, cfg: SparseConfig, log: MassLog | None = None, reference: bool = False):
    """Run ``model`` with condensate attention (``cfg``) in every layer from ``cfg.dense_layers`` on.

    Args:
        model: a transformers causal LM of a supported family (see ``atlas_core.attention.LAYOUTS``).
        cfg: the sparse rule.
        log: if given, collects the mass captured per (layer, head).
        reference: attend through the model's own eager function under the narrowed mask (the plain
            reference) instead of ``kept_attention`` on the scores the selection already computed.
    """
    n_layers = len(attention_modules(model))
    if cfg.dense_layers > n_layers:
        raise ValueError(f"dense_layers={cfg.dense_layers} exceeds the model's {n_layers} layers")
    with intervene(model, SPARSE, {layer: (layer, cfg, log, reference) for layer in range(n_layers)}):
        yield log
