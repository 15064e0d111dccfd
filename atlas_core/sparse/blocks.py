"""Block selection of the revised Condensate paper: anchor + window + r blocks of P keys, by q · mean key.

The revision of the Condensate paper (Ruiz Williams 2026, "Attention-Mass Condensation for Sparse
Decoding: Margin Stability, Query-Dependent Retrieval, and Operating Limits", arXiv 2602.06317 revised;
code: JorgeLRW/condensate-theorem, ``condensate/selector.py``) keeps, for each query,

- the anchor (position 0) and the last W = 64 positions (our ``fixed_mask``), and
- r blocks of P = 16 candidate keys, the blocks with the highest q · μ_b, μ_b the mean key of block b.

Its nominal support is S = a + W + P·r; S ∈ {97, 193, 385, 769} gives r = 2, 8, 20, 44. Here a rule is
``SparseConfig(selector="blocks-mean" or "blocks-mean-kv", topk=P·r, page_size=P)``: r = ⌈k / P⌉ blocks.

Blocks tile the candidates from the first position after the anchors: key position p lies in block
(p − a) // P, as the source's ``block_ranges`` does (blocks [1, 17), [17, 33), … for a = 1). A token
therefore stays in the same block whatever the cache holds (as pages do, see ``pages.page_summaries``),
and in a full-attention layer the candidates [a, i − W] fill ⌈(i − W − a + 1) / P⌉ blocks exactly. A
block's mean runs over its candidate keys only: the block that reaches the window is cut at the window
edge, as the source cuts its last range at ``window_start``; in a sliding-window layer a block is cut
where the model's own mask hides keys.

Two ways to share the choice between heads:

- ``"blocks-mean"``: every query head chooses its own blocks (the paper's "per_head" variant);
- ``"blocks-mean-kv"``: one choice per KV head, by the mean query of the heads that share it, as the
  source's ``select_blocks_kv_group`` (the "kv_group" variant, the one its survival sweep evaluates).
  Since q · μ_b is linear in q, the group's mean query scores each block by the mean of its heads'
  scores; the vectorised code uses that, the reference the mean query itself.

Budget boundary: a query with no more candidate keys than k sees all of them (it would anyway in a full
layer; in a sliding-window layer the visible candidates can straddle one block more than r).

Axis names: (batch, head, query, key); positions are absolute token positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from atlas_core.sparse.kept import SparseConfig, all_candidates_fit, fixed_mask

BLOCK_SELECTORS = ("blocks-mean", "blocks-mean-kv")

__all__ = ["BLOCK_SELECTORS", "block_ids", "block_mask", "block_mask_reference", "block_rule"]


def block_rule(support: int, anchors: int = 1, window: int = 64, block: int = 16, selector: str = "blocks-mean-kv",
               **fields) -> SparseConfig:
    """The rule of nominal support S = a + W + P·r, written as a ``SparseConfig``.

    Args:
        support: S, keys kept per query head once the context is longer than S.
        anchors, window, block: a, W and the block size P.
        selector: one of ``BLOCK_SELECTORS``.
        fields: further ``SparseConfig`` fields (``dense_layers``, ...).
    Raises:
        ValueError: S − a − W is not a positive multiple of P, or the selector is not a block selector.

    Source: ``block_count`` of condensate/selector.py: r = (S − 1 − W) // 16.
    """
    r, extra = divmod(support - anchors - window, block)
    if r < 1 or extra:
        raise ValueError(f"support {support} must be a + W + P·r with r ≥ 1 (a={anchors}, W={window}, P={block})")
    if selector not in BLOCK_SELECTORS:
        raise ValueError(f"selector must be one of {BLOCK_SELECTORS}, got {selector!r}")
    return SparseConfig(anchors=anchors, window=window, topk=block * r, selector=selector, page_size=block, **fields)


def block_ids(k_pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Block of every key: (p − a) // P, counted from the earliest block present in the call.

    Args:
        k_pos: (key,) or (batch, key) absolute positions.
    Returns:
        same shape, int64, ≥ 0 (anchor keys share block 0 with the first candidates; they are never
        candidates, so they never enter a block's mean).
    """
    blk = torch.div((k_pos - cfg.anchors).clamp_min(0), cfg.page_size, rounding_mode="floor")
    return blk - blk.amin(dim=-1, keepdim=True)


def _block_scores(scores: torch.Tensor, rest: torch.Tensor, blk: torch.Tensor) -> torch.Tensor:
    """Mean score of each block's candidates, −inf for a block without candidates.

    Args:
        scores: (batch, head, query, key) q · k; rest: same shape, bool, the candidates.
        blk: (key,) or (batch, key) block ids.
    Returns:
        (batch, head, query, block)
    """
    onehot = F.one_hot(blk, int(blk.max()) + 1).to(scores.dtype)  # (key, block) or (batch, key, block)
    if onehot.dim() == 3:
        onehot = onehot[:, None]  # (batch, 1, key, block)
    sums = torch.where(rest, scores, 0) @ onehot
    counts = rest.to(scores.dtype) @ onehot
    return (sums / counts.clamp_min(1)).masked_fill(counts == 0, float("-inf"))


def block_mask(query: torch.Tensor, key: torch.Tensor, visible, q_pos, k_pos, cfg: SparseConfig):
    """Fixed part and block-selected part of every query's kept set (vectorised).

    Args:
        query: (batch, head, query, d_head); key: (batch, kv_head, key, d_head), post-RoPE, KV heads not
            repeated (GQA groups are head / kv_head consecutive query heads, as ``repeat_kv``).
        visible: (batch, 1 or head, query, key) bool, the keys the model's own mask lets each query see.
        q_pos: (query,) or (batch, query); k_pos: (key,) or (batch, key), absolute positions.
        cfg: the rule; ``cfg.selector`` one of ``BLOCK_SELECTORS``, ⌈topk / page_size⌉ blocks kept.
    Returns:
        (fixed, chosen), each (batch, head, query, key) bool and disjoint: ``chosen`` is every candidate
        key in the chosen blocks, or every candidate where there are no more than ``topk`` of them.

    Source: condensate/selector.py, ``select_blocks_kv_group`` (s_b = q̄ · μ_b / √d, top r per KV head).
    """
    if cfg.selector not in BLOCK_SELECTORS:
        raise ValueError(f"block_mask needs a block selector {BLOCK_SELECTORS}, got {cfg.selector!r}")
    b, h, nq, n = *query.shape[:3], key.shape[2]
    fixed = (visible & fixed_mask(q_pos, k_pos, cfg)).expand(b, h, nq, n)
    rest = visible & ~fixed  # (batch, head, query, key) candidates
    if cfg.topk == 0:
        return fixed, torch.zeros_like(fixed)
    scores = query @ repeat_kv(key, h // key.shape[1]).transpose(-1, -2)  # (batch, head, query, key), scale-free
    blk = block_ids(k_pos, cfg)
    bscore = _block_scores(scores, rest, blk)  # (batch, head, query, block)
    if cfg.head_average:  # one choice per layer, as the source's first code did for top-k
        bscore = bscore.mean(dim=1, keepdim=True).expand_as(bscore)
    elif cfg.selector == "blocks-mean-kv":  # one choice per KV head: the group's mean query
        kv, g = key.shape[1], h // key.shape[1]
        shared = bscore.view(b, kv, g, nq, -1).mean(dim=2, keepdim=True)  # (batch, kv_head, 1, query, block)
        bscore = shared.expand(-1, -1, g, -1, -1).reshape(bscore.shape)
    take = min(cfg.n_pages, bscore.shape[-1])
    vals, idx = bscore.topk(take, dim=-1)  # (batch, head, query, take)
    blocks = torch.zeros_like(bscore, dtype=torch.bool).scatter_(-1, idx, torch.isfinite(vals))
    per_key = blk.expand(b, n) if blk.dim() == 1 else blk  # (batch, key)
    chosen = blocks.gather(-1, per_key[:, None, None, :].expand(b, h, nq, n)) & rest
    return fixed, torch.where(all_candidates_fit(rest, cfg), rest, chosen)  # budget boundary: nothing to drop


def block_mask_reference(query, key, visible, q_pos, k_pos, cfg: SparseConfig) -> torch.Tensor:
    """The kept set written as loops over batch, head and query (the reference for ``block_mask``).

    Block means are computed from the keys themselves, and the KV-group variant scores them with the
    group's mean query, as the source does. Shapes as ``block_mask`` (positions per row or shared).

    Returns:
        (batch, head, query, key) bool, fixed | chosen.
    """
    b, h, nq, _ = query.shape
    kv, n = key.shape[1], key.shape[2]
    group = h // kv
    visible = visible.expand(b, h, nq, n)
    take = cfg.n_pages
    keep = torch.zeros(b, h, nq, n, dtype=torch.bool)
    for bi in range(b):
        qp, kp = (t[bi] if t.dim() == 2 else t for t in (q_pos, k_pos))  # this row's positions
        for hi in range(h):
            for qi in range(nq):
                i = int(qp[qi])
                seen = [j for j in range(n) if visible[bi, hi, qi, j]]
                fixed = [j for j in seen if int(kp[j]) < cfg.anchors or i - cfg.window < int(kp[j]) <= i]
                rest = [j for j in seen if j not in fixed]
                for j in fixed:
                    keep[bi, hi, qi, j] = True
                if cfg.topk == 0:
                    continue
                if len(rest) <= cfg.topk:
                    chosen = rest
                else:
                    members: dict[int, list[int]] = {}
                    for j in rest:
                        members.setdefault((int(kp[j]) - cfg.anchors) // cfg.page_size, []).append(j)
                    if cfg.head_average:  # mean over every head of its own q · μ_b
                        score = {blk: sum(float(query[bi, g, qi] @ key[bi, g // group, js].mean(0)) for g in range(h)) / h
                                 for blk, js in members.items()}
                    else:
                        if cfg.selector == "blocks-mean-kv":  # the group's mean query, as the source
                            q = query[bi, (hi // group) * group : (hi // group + 1) * group, qi].mean(0)
                        else:
                            q = query[bi, hi, qi]
                        score = {blk: float(q @ key[bi, hi // group, js].mean(0)) for blk, js in members.items()}
                    best = sorted(score, key=lambda blk: -score[blk])[:take]
                    chosen = [j for blk in best for j in members[blk]]
                for j in chosen:
                    keep[bi, hi, qi, j] = True
    return keep
