"""Page selection (Quest-style): choose top-k candidates by pages, without reading every key.

Keys are grouped in pages of P consecutive cache slots. A page keeps the elementwise min and max of its
keys, and for any key k in the page q·k ≤ Σ_d max(q_d·min_d, q_d·max_d) = q⁺·max + q⁻·min (q⁺, q⁻ the
positive and negative parts of q). The selector keeps the ⌈k/P⌉ pages with the highest bound among
those holding a candidate key (visible, outside anchor and window), so it reads 2·d numbers per page
instead of P·d, then the chosen pages' keys and values.

A query with no more candidates than k has nothing to drop and keeps them all, however many pages they
straddle (without this rule, k candidates starting mid-page span ⌈k/P⌉ + 1 pages and one page is lost).

Pages are aligned to absolute positions (page = position // P, per batch row when positions are per
row), so a token stays in the same page whatever the cache holds. A page's summary covers the keys of
the page present in the attention call, those some query of the call can see (a padded row's pad slots
are left out, so each row selects as it would alone): in a sliding-window layer, once the cache has evicted the oldest keys, the page at the eviction edge is
summarised over fewer keys than in a full forward pass (both are valid bounds; the selections can differ).

Axis names: (batch, head, query, key).
"""

from __future__ import annotations

import torch

from atlas_core.sparse.kept import SparseConfig, all_candidates_fit, fixed_mask, top_k_mask

__all__ = ["page_index", "page_mask", "page_mask_reference", "page_summaries", "score_bound", "score_bound_reference", "selection_recall"]


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


def page_index(k_pos: torch.Tensor, page_size: int) -> tuple[torch.Tensor, int]:
    """Page of every key, by absolute position: position // P, counted from the row's first page.

    Args:
        k_pos: (key,) or (batch, key) absolute positions (per row for a padded batch).
    Returns:
        (page (1 or batch, key) int64 in [0, n_pages), n_pages).
    """
    page = torch.div(k_pos.reshape(-1, k_pos.shape[-1]), page_size, rounding_mode="floor")
    page = page - page.amin(-1, keepdim=True)
    return page, int(page.max()) + 1


def _row_summaries(key: torch.Tensor, present: torch.Tensor, page: torch.Tensor, n_pages: int):
    """Elementwise min and max over each page's present keys, pages numbered per row (``page_index``).

    key (batch, head, key, d_head); present (batch, key) bool; page (1 or batch, key).
    Returns (kmin, kmax), each (batch, head, page, d_head); ±inf where a page has no present key.
    """
    b, h, n, d = key.shape
    idx = page.expand(b, n)[:, None, :, None].expand(b, h, n, d)
    hidden = ~present[:, None, :, None]
    lo = key.new_full((b, h, n_pages, d), float("inf")).scatter_reduce(2, idx, key.masked_fill(hidden, float("inf")), "amin")
    hi = key.new_full((b, h, n_pages, d), float("-inf")).scatter_reduce(2, idx, key.masked_fill(hidden, float("-inf")), "amax")
    return lo, hi


def page_mask(query, key, scaling: float, visible, q_pos, k_pos, cfg: SparseConfig):
    """Fixed part and page-selected part of every query's kept set.

    Pages are numbered per row by absolute position (``page_index``) and summarised over the row's
    present keys, those some query of the call can see: a padded row's pad slots join no page, so every
    row selects as it would alone. A query with at most k candidates keeps them all
    (``kept.all_candidates_fit``), even when they straddle more than ⌈k/P⌉ pages.

    Args:
        query: (batch, head, query, d_head); key: (batch, head, key, d_head) (KV heads repeated).
        visible: (batch, 1 or head, query, key) bool; q_pos (query,) or (batch, query), k_pos (key,) or
            (batch, key) absolute positions.
    Returns:
        (fixed, chosen), each (batch, head, query, key) bool and disjoint: ``chosen`` is every candidate
        key in the ⌈k/P⌉ pages with the highest bound (ties: the earliest page), or every candidate where
        there are at most k.
    """
    b, h, nq, n = *query.shape[:3], key.shape[2]
    fixed = (visible & fixed_mask(q_pos, k_pos, cfg)).expand(b, h, nq, n)
    rest = visible & ~fixed  # (batch, head, query, key)
    if cfg.topk == 0:
        return fixed, torch.zeros_like(fixed)
    page, n_pages = page_index(k_pos, cfg.page_size)  # (1 or batch, key)
    present = visible.expand(b, -1, -1, -1).any(1).any(1)  # (batch, key)
    one_hot = torch.nn.functional.one_hot(page.expand(b, n), n_pages).to(query.dtype)[:, None]  # (batch, 1, key, page)
    has_candidate = (rest.to(query.dtype) @ one_hot) > 0  # (batch, head, query, page)
    bound = score_bound(query, *_row_summaries(key, present, page, n_pages), scaling)  # (batch, head, query, page)
    if cfg.head_average:
        bound = bound.mean(dim=1, keepdim=True).expand_as(bound)
    pages = top_k_mask(bound, has_candidate, cfg.n_pages)  # (batch, head, query, page)
    chosen = ((pages.to(query.dtype) @ one_hot.transpose(-1, -2)) > 0) & rest  # (batch, head, query, key)
    return fixed, chosen | (rest & all_candidates_fit(rest, cfg))


def page_mask_reference(query, key, scaling: float, visible, q_pos, k_pos, cfg: SparseConfig) -> torch.Tensor:
    """The page selector written as loops over batch, head and query (the reference for ``page_mask``).

    Returns:
        (batch, head, query, key) bool, fixed | chosen.
    """
    b, h, nq, n = *query.shape[:3], key.shape[2]
    visible = visible.expand(b, h, nq, n)
    keep = torch.zeros(b, h, nq, n, dtype=torch.bool)
    for bi in range(b):
        qp, kp = (t[bi] if t.dim() == 2 else t for t in (q_pos, k_pos))  # this row's positions
        present = [j for j in range(n) if visible[bi, :, :, j].any()]
        page_of = {j: int(kp[j]) // cfg.page_size for j in range(n)}
        for qi in range(nq):
            i = int(qp[qi])

            def bound(hi, pg):  # the page's score bound for this query in head hi
                members = [j for j in present if page_of[j] == pg]
                lo, up = key[bi, hi, members].amin(0), key[bi, hi, members].amax(0)
                return float(score_bound_reference(query[bi, hi, qi][None], lo[None], up[None], scaling)[0, 0])

            for hi in range(h):
                seen = [j for j in range(n) if visible[bi, hi, qi, j]]
                fixed = [j for j in seen if int(kp[j]) < cfg.anchors or i - cfg.window < int(kp[j]) <= i]
                rest = [j for j in seen if j not in fixed]
                if len(rest) > cfg.topk:
                    heads = range(h) if cfg.head_average else [hi]
                    ranked = sorted(sorted({page_of[j] for j in rest}), key=lambda pg: -sum(bound(x, pg) for x in heads))  # ties: earliest
                    rest = [j for j in rest if page_of[j] in ranked[: cfg.n_pages]]
                for j in fixed + rest:
                    keep[bi, hi, qi, j] = True
    return keep


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
