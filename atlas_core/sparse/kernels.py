"""One layer's decode step over a long KV cache: dense, exact top-k and page-selected (torch, any device).

The query is the newest token, at position n − 1 of a cache of n keys; with anchors a and window W the
fixed part is keys [0, a) ∪ [n − W, n) and the candidates are the middle keys [a, n − W).

- ``dense_decode``: torch SDPA over every key (reads all keys and values).
- ``topk_decode``: scores every middle key exactly (reads all keys), keeps the top k, reads their values.
- ``page_decode``: reads the page summaries of the middle (2·d numbers per page of P keys), keeps the
  ⌈k/P⌉ pages with the highest score bound, reads only their keys and values.
- ``reference_decode``: plain masked softmax over an explicit kept set; the tests hold both sparse
  kernels to it, with the kept sets of ``kept.kept_mask`` and ``pages.page_mask``.

Shapes: q (head, d_head); keys, values (kv_head, key, d_head); GQA groups g = head / kv_head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atlas_core.sparse.kept import SparseConfig
from atlas_core.sparse.pages import page_summaries, score_bound

__all__ = ["PagedCache", "bytes_read", "dense_decode", "page_decode", "paged_cache", "reference_decode", "topk_decode"]


@dataclass(frozen=True)
class PagedCache:
    """Keys and values of one layer with per-page elementwise min/max of the keys."""

    keys: torch.Tensor  # (kv_head, key, d_head)
    values: torch.Tensor  # (kv_head, key, d_head)
    kmin: torch.Tensor  # (kv_head, page, d_head)
    kmax: torch.Tensor  # (kv_head, page, d_head)
    page_size: int


def paged_cache(keys: torch.Tensor, values: torch.Tensor, page_size: int = 16) -> PagedCache:
    """Summarise a cache into pages (a real cache updates the last page's min/max per new token)."""
    return PagedCache(keys, values, *page_summaries(keys, page_size), page_size)


def dense_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Full attention of one query per head over the whole cache, by torch SDPA (scale: default d_head^-0.5).

    Returns (head, d_head)."""
    out = F.scaled_dot_product_attention(q[None, :, None], keys[None], values[None], enable_gqa=True, scale=scale)
    return out[0, :, 0]


def reference_decode(q, keys, values, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the kept keys only, written plainly.

    Args:
        keep: (head, key) bool, each head's kept set.
    Returns:
        (head, d_head)
    """
    groups = q.shape[0] // keys.shape[0]
    k_rep, v_rep = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)  # (head, key, d_head)
    scores = torch.einsum("hd,hnd->hn", q, k_rep) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return torch.einsum("hn,hnd->hd", probs, v_rep)


def _fixed_index(n: int, cfg: SparseConfig, device=None) -> tuple[torch.Tensor, int, int]:
    """Indices of the fixed part, and the middle range [lo, hi)."""
    lo = min(cfg.anchors, n)
    hi = max(n - cfg.window, lo)
    return torch.cat([torch.arange(lo, device=device), torch.arange(hi, n, device=device)]), lo, hi


def _attend(qg, keys, values, fixed, sel_scores, sel_values, scale):
    """Softmax over the fixed keys and the selected keys together.

    qg (kv_head, group, d_head); sel_scores (kv_head, group, s), already scaled, -inf where empty;
    sel_values (kv_head, group, s, d_head). Returns (head, d_head).
    """
    fixed_scores = qg @ keys[:, fixed].transpose(-1, -2) * scale  # (kv_head, group, fixed)
    probs = torch.cat([fixed_scores, sel_scores], -1).softmax(-1)
    nf = fixed.numel()
    out = probs[..., :nf] @ values[:, fixed] + (probs[..., nf:, None] * sel_values).sum(-2)  # (kv_head, group, d_head)
    return out.reshape(-1, out.shape[-1])


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (kv_head, key, d_head), idx (kv_head, group, s) -> (kv_head, group, s, d_head)."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None, None], idx]


def topk_decode(q, keys, values, cfg: SparseConfig) -> torch.Tensor:
    """Anchor + window + exact top-k of the middle keys. Returns (head, d_head)."""
    n_kv, n, d = keys.shape
    qg = q.view(n_kv, -1, d)  # (kv_head, group, d_head)
    scale = d**-0.5
    fixed, lo, hi = _fixed_index(n, cfg, keys.device)
    scores = qg @ keys[:, lo:hi].transpose(-1, -2) * scale  # (kv_head, group, middle)
    vals, idx = scores.topk(min(cfg.topk, hi - lo), dim=-1)  # (kv_head, group, k)
    return _attend(qg, keys, values, fixed, vals, _gather(values, idx + lo), scale)


def _top_pages(qg, cache: PagedCache, lo: int, hi: int, cfg: SparseConfig) -> torch.Tensor:
    """Slots of the ⌈k/P⌉ pages holding middle keys [lo, hi) with the highest bound: (kv_head, group, take * P)."""
    size = cache.page_size
    p_lo, p_hi = lo // size, -(-hi // size)  # pages holding a middle key
    bound = score_bound(qg, cache.kmin[:, p_lo:p_hi], cache.kmax[:, p_lo:p_hi])  # (kv_head, group, page)
    _, pages = bound.topk(min(cfg.n_pages, p_hi - p_lo), dim=-1)  # (kv_head, group, take)
    return ((pages + p_lo)[..., None] * size + torch.arange(size, device=qg.device)).flatten(-2)


def page_decode(q, cache: PagedCache, cfg: SparseConfig) -> torch.Tensor:
    """Anchor + window + the ⌈k/P⌉ middle pages with the highest score bound. Returns (head, d_head).

    With at most k middle keys (``SparseConfig.keeps_all``) it reads them all, as exact top-k does.
    """
    keys = cache.keys
    n_kv, n, d = keys.shape
    qg = q.view(n_kv, -1, d)
    scale = d**-0.5
    fixed, lo, hi = _fixed_index(n, cfg, keys.device)
    if cfg.keeps_all(hi - lo):  # nothing to drop: every middle key, however many pages it straddles
        idx = torch.arange(lo, hi, device=keys.device).expand(n_kv, qg.shape[1], -1)  # (kv_head, group, middle)
    else:
        idx = _top_pages(qg, cache, lo, hi, cfg)  # (kv_head, group, take * P)
    inside = (idx >= lo) & (idx < hi)
    idx = idx.clamp(max=n - 1)
    sel_keys = _gather(keys, idx)  # (kv_head, group, s, d_head)
    sel_scores = (sel_keys @ qg[..., None])[..., 0] * scale  # (kv_head, group, s)
    return _attend(qg, keys, cache.values, fixed, sel_scores.masked_fill(~inside, float("-inf")), _gather(cache.values, idx), scale)


def bytes_read(kind: str, n: int, n_heads: int, n_kv: int, d_head: int, cfg: SparseConfig, itemsize: int = 4) -> int:
    """Bytes of keys, values and summaries one decode step must read (selected rows counted per query head).

    Args:
        kind: "dense", "topk" or "pages".
    """
    row = d_head * itemsize
    _, lo, hi = _fixed_index(n, cfg)
    n_fixed, middle = n - (hi - lo), hi - lo
    if kind == "dense":
        return 2 * n_kv * n * row
    if kind == "topk":  # every key, the fixed values, the chosen values
        return n_kv * n * row + n_kv * n_fixed * row + n_heads * min(cfg.topk, middle) * row
    if kind == "pages" and cfg.keeps_all(middle):  # no selection: fixed and every middle key and value
        return 2 * n_kv * n_fixed * row + 2 * n_heads * middle * row
    if kind == "pages":  # summaries of the middle pages, fixed keys and values, chosen pages' keys and values
        pages = -(-hi // cfg.page_size) - lo // cfg.page_size
        chosen = min(cfg.n_pages, pages) * cfg.page_size
        return 2 * n_kv * pages * row + 2 * n_kv * n_fixed * row + 2 * n_heads * chosen * row
    raise ValueError(f"kind must be dense, topk or pages, got {kind!r}")
