"""Page selection (Quest-style): choose top-k candidates by pages, without reading every key.

Keys are grouped in pages of P consecutive cache slots. A page keeps the elementwise min and max of its
keys, and for any key k in the page q·k ≤ Σ_d max(q_d·min_d, q_d·max_d) = q⁺·max + q⁻·min (q⁺, q⁻ the
positive and negative parts of q). The selector keeps the ⌈k/P⌉ pages with the highest bound among
those holding a candidate key (visible, outside anchor and window), so it reads 2·d numbers per page
instead of P·d, then the chosen pages' keys and values.

Pages are aligned to absolute positions (page = position // P), so a token stays in the same page
whatever the cache holds. A page's summary covers the keys of the page present in the attention call: in
a sliding-window layer, once the cache has evicted the oldest keys, the page at the eviction edge is
summarised over fewer keys than in a full forward pass (both are valid bounds; the selections can differ).

Axis names: (batch, head, query, key).
"""

from __future__ import annotations

import torch

from atlas_core.sparse.kept import SparseConfig, fixed_mask

__all__ = ["page_mask", "page_summaries", "score_bound", "score_bound_reference", "selection_recall"]


def page_summaries(key: torch.Tensor, page_size: int, lead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of the keys of every page (partial pages use the keys they have).

    Args:
        key: (..., key, d_head)
        lead: slots of the first page before the first key (its position mod P).
    Returns:
        (kmin, kmax), each (..., page, d_head) with page = ⌈(lead + key) / P⌉.
    """
    n, d = key.shape[-2:]
    n_pages = -(-(lead + n) // page_size)
    pad = (0, 0, lead, n_pages * page_size - n - lead)
    shape = (*key.shape[:-2], n_pages, page_size, d)
    lo = torch.nn.functional.pad(key, pad, value=float("inf")).view(shape)
    hi = torch.nn.functional.pad(key, pad, value=float("-inf")).view(shape)
    return lo.amin(dim=-2), hi.amax(dim=-2)


def score_bound(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Upper bound of scaling·q·k over each page: two matmuls, q⁺·max + q⁻·min.

    Args:
        query: (..., query, d_head); kmin, kmax: (..., page, d_head), broadcastable leading axes.
    Returns:
        (..., query, page)
    """
    pos, neg = query.clamp(min=0), query.clamp(max=0)
    return (pos @ kmax.transpose(-1, -2) + neg @ kmin.transpose(-1, -2)) * scaling


def score_bound_reference(query, kmin, kmax, scaling: float = 1.0) -> torch.Tensor:
    """The bound as written in Quest: Σ_d max(q_d·min_d, q_d·max_d) (reference for ``score_bound``)."""
    q = query[..., :, None, :]  # (..., query, 1, d_head)
    return torch.maximum(q * kmin[..., None, :, :], q * kmax[..., None, :, :]).sum(-1) * scaling


def page_mask(query, key, scaling: float, visible, q_pos, k_pos, cfg: SparseConfig):
    """Fixed part and page-selected part of every query's kept set.

    Args:
        query: (batch, head, query, d_head); key: (batch, head, key, d_head) (KV heads repeated).
        visible: (batch, 1 or head, query, key) bool; q_pos (query,), k_pos (key,) absolute positions.
    Returns:
        (fixed, chosen), each (batch, head, query, key) bool and disjoint: ``chosen`` is every candidate
        key in the ⌈k/P⌉ pages with the highest bound.
    """
    b, h, nq, n = *query.shape[:3], key.shape[2]
    fixed = (visible & fixed_mask(q_pos, k_pos, cfg)).expand(b, h, nq, n)
    rest = visible & ~fixed
    if cfg.topk == 0:
        return fixed, torch.zeros_like(fixed)
    size = cfg.page_size
    lead = int(k_pos[0]) % size
    n_pages = -(-(lead + n) // size)
    rest_pages = torch.nn.functional.pad(rest, (lead, n_pages * size - n - lead)).view(b, h, nq, n_pages, size)
    has_candidate = rest_pages.any(-1)  # (batch, head, query, page)
    bound = score_bound(query, *page_summaries(key, size, lead), scaling)  # (batch, head, query, page)
    if cfg.head_average:
        bound = bound.mean(dim=1, keepdim=True).expand_as(bound)
    take = min(cfg.n_pages, n_pages)
    vals, idx = bound.masked_fill(~has_candidate, float("-inf")).topk(take, dim=-1)
    pages = torch.zeros_like(has_candidate).scatter_(-1, idx, torch.isfinite(vals))  # (batch, head, query, page)
    chosen = pages[..., None].expand(-1, -1, -1, -1, size).reshape(b, h, nq, -1)[..., lead : lead + n] & rest
    return fixed, chosen


def selection_recall(probs: torch.Tensor, chosen: torch.Tensor, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of the exact top-k a selector finds.

    Args:
        probs: (batch, head, query, key) full softmax; chosen, exact: same shape, bool (top-k parts only).
    Returns:
        (index recall |chosen ∩ exact| / |exact|, mass recall p(chosen) / p(exact)), each
        (batch, head, query); NaN where the exact set is empty.
    """
    n_exact = exact.sum(-1).double()
    index = (chosen & exact).sum(-1) / n_exact
    mass = (probs * chosen).sum(-1).double() / (probs * exact).sum(-1).double()
    return index.float(), mass.float()
