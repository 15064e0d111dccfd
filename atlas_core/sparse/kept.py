"""Kept sets of condensate attention (SPEC §10): anchors + recent window + top-k of the rest.

For a query at position i the kept set is {j < a} ∪ {i−W < j ≤ i} ∪ top-k of the remaining visible keys
by exact score; attention is the softmax renormalised over the kept set. The per-query discarded mass
m = Σ_{j ∉ kept} p_j of the full softmax gives the output error exactly:

    o_full − o_kept = m · (o_rest − o_kept),

o_rest the softmax-weighted mean of the discarded values, so the error is zero only when m = 0.

Axis names: scores (batch, head, query, key); positions are absolute token positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SELECTORS = ("exact", "pages", "blocks-mean", "blocks-mean-kv", "certified")  # blocks: sparse/blocks.py; certified: sparse/certified.py
BOUNDS = ("minmax", "centroid", "lowrank", "min")  # page score bounds of the certified selector (sparse/certified.py)

__all__ = ["BOUNDS", "SELECTORS", "SparseConfig", "all_candidates_fit", "fixed_mask", "kept_mask", "kept_mask_reference", "output_split", "top_k_mask"]


@dataclass(frozen=True, kw_only=True)
class SparseConfig:
    """The sparse rule: anchors a, window W, top-k, dense first layers, selector, page size, head averaging,
    and the first query position it applies to (``sparse_from``: every earlier query is a dense prefill)."""

    anchors: int = 1
    window: int = 64
    topk: int = 32
    dense_layers: int = 0  # the first n layers keep full attention
    selector: str = "exact"  # "exact": top-k by exact score; "pages": top ⌈k/P⌉ pages by a score bound;
    # "blocks-mean"/"-kv": top ⌈k/P⌉ blocks by q · mean key, per query head / per KV head (the revised source)
    page_size: int = 16
    head_average: bool = False  # the source code's variant: one kept set per layer from head-averaged scores
    sparse_from: int = 0  # queries at positions < sparse_from attend densely: a dense prefill of that many
    # tokens, as in decoding after a dense prefill (set it to the prompt length to score decode steps in one pass)
    # The certified selector (sparse/certified.py) ignores topk: it reads pages in descending score-bound order
    # until its certificate of the discarded mass is at most eps (or max_pages are read, when max_pages > 0).
    eps: float = 1e-3
    bound: str = "minmax"  # one of BOUNDS: the page summary that bounds every score in a page (minmax: the tightest
    # measured on real keys; lowrank/min take their basis from every key of the attention call, so in a one-pass
    # teacher-forced block a query's basis has seen later keys: valid, but not what decoding would compute)
    rank: int = 8  # the low-rank bound's sketch rank r (per KV head), r < d_head
    max_pages: int = 0  # a cap on the pages the certified selector reads (0: none; the certificate may then exceed eps)

    def __post_init__(self):
        for name in ("anchors", "topk", "dense_layers", "sparse_from"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer ≥ 1 (it holds the query's own token), got {self.window!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {self.page_size!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ValueError(f"eps must be a number in (0, 1), the discarded mass the certificate allows, got {self.eps!r}")
        if self.bound not in BOUNDS:
            raise ValueError(f"bound must be one of {BOUNDS}, got {self.bound!r}")
        if self.selector == "certified" and self.head_average:
            raise ValueError("head_average does not apply to the certified selector (each query head certifies its own "
                             "kept set); leave it out")
        for name in ("rank", "max_pages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "rank"):
                raise ValueError(f"{name} must be an integer ≥ {int(name == 'rank')}, got {value!r}")

    @property
    def budget(self) -> int:
        """Keys kept per query once the context is longer than a + W + k (the certified selector: a + W, beyond
        which it may drop keys; it has no k)."""
        return self.anchors + self.window + (0 if self.selector == "certified" else self.topk)

    def keeps_all(self, n_candidates):
        """Whether a query with this many candidates (keys outside anchor and window) keeps them all.

        The rule every selector obeys (exact top-k, pages, the kernels): with no more candidates than
        k there is nothing to drop, so the kept set is the whole visible set.

        Args:
            n_candidates: an int or an integer tensor of counts.
        Returns:
            bool, or a bool tensor of the same shape.
        """
        return n_candidates <= self.topk

    def keeps_every_key(self, n_keys):
        """Whether a query that sees ``n_keys`` keys keeps them all: n ≤ a + W + k (nothing to drop).

        Args:
            n_keys: an int or an integer tensor of counts of visible keys.
        Returns:
            bool, or a bool tensor of the same shape.
        """
        return n_keys <= self.budget  # ``keeps_all`` of its n − a − W candidates (none when n ≤ a + W)

    def check_context(self, n_tokens: int, name: str = "the context") -> None:
        """Raise ValueError unless a query that sees ``n_tokens`` keys can drop one (n > a + W + k).

        Used for a generation prompt (every later step sees more keys) and a decode benchmark's cache.

        Args:
            n_tokens: keys the query sees; name: what the caller calls that length (a flag, a parameter).
        Raises:
            ValueError: naming ``name``: the rule keeps every key, so sparse equals dense by construction.
        """
        if self.keeps_every_key(n_tokens):
            raise ValueError(f"{name} ({n_tokens} tokens) must exceed the budget a + W + k = {self.budget} "
                             f"(a={self.anchors}, W={self.window}, k={self.topk}): otherwise nothing is dropped")

    def min_block_tokens(self) -> int:
        """Shortest teacher-forced block with a scored position where the rule can drop a key.

        Positions i ≥ max(a + W + k, sparse_from) are scored (their query sees i + 1 > a + W + k keys), and
        position i is scored on token i + 1, so the block needs max(a + W + k, sparse_from) + 2 tokens.
        """
        return max(self.budget, self.sparse_from) + 2

    def check_block(self, n_tokens: int, name: str = "blocks") -> None:
        """Raise ValueError unless blocks of ``n_tokens`` tokens hold a position the rule is scored at.

        Args:
            n_tokens: tokens per block; name: what the caller calls that length (a flag, a parameter).
        Raises:
            ValueError: naming ``name`` and the shortest length that works (``min_block_tokens``).
        """
        if n_tokens < self.min_block_tokens():
            raise ValueError(f"{name} ({n_tokens} tokens) is too short for the rule a + W + k = {self.budget}"
                             + (f" from position {self.sparse_from}" if self.sparse_from > self.budget else "")
                             + f": nothing would be dropped and scored; use at least {self.min_block_tokens()}")

    def check_layers(self, n_layers: int, name: str = "dense_layers") -> None:
        """Raise ValueError if the dense first layers are every layer of an ``n_layers``-layer model."""
        if self.dense_layers >= n_layers:
            raise ValueError(f"{name} ({self.dense_layers}) keeps every one of the {n_layers} layers dense: nothing is "
                             f"sparse; use at most {n_layers - 1}")

    def check_head(self, d_head: int, name: str = "rank") -> None:
        """Raise ValueError if the certified selector's low-rank sketch leaves no residual: rank ≥ d_head."""
        if self.selector == "certified" and self.bound in ("lowrank", "min") and self.rank >= d_head:
            raise ValueError(f"{name} ({self.rank}) must be below d_head ({d_head}) for the {self.bound} bound; "
                             "lower it or use --bound minmax")

    @property
    def n_pages(self) -> int:
        """Pages the page selector keeps: ⌈k / P⌉, the same key budget as exact top-k."""
        return -(-self.topk // self.page_size)


def fixed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Anchor ∪ window membership, by absolute position (per batch row when positions are per row).

    Args:
        q_pos: (query,) or (batch, query) absolute positions of the queries.
        k_pos: (key,) or (batch, key) absolute positions of the keys.
    Returns:
        (query, key) bool for 1-D positions; (batch, 1, query, key) when either is per row, so that it
        broadcasts against (batch, head, query, key) either way.
    """
    q, k = q_pos[..., :, None], k_pos[..., None, :]  # (..., query, 1), (..., 1, key)
    mask = (k < cfg.anchors) | ((k > q - cfg.window) & (k <= q))
    return mask[:, None] if mask.dim() == 3 else mask


def all_candidates_fit(rest: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Queries whose candidates (visible keys outside anchor and window) number at most k.

    Such a query has nothing to drop: every selector keeps all its candidates (its kept set is its
    visible set), whatever pages or blocks those candidates straddle.

    Args:
        rest: (..., query, key) bool, the candidates.
    Returns:
        (..., query, 1) bool.
    """
    return cfg.keeps_all(rest.sum(-1, keepdim=True))


def kept_mask(scores: torch.Tensor, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              cfg: SparseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed part and exact top-k part of every query's kept set (vectorised).

    Args:
        scores: (batch, head, query, key) attention logits.
        visible: (batch, 1 or head, query, key) bool, the keys the model's own mask lets the query see.
        q_pos: (query,) or (batch, query), k_pos: (key,) or (batch, key) absolute positions (per row
            for a padded batch).
    Returns:
        (fixed, chosen), each (batch, head, query, key) bool and disjoint; kept = fixed | chosen. A query
        with at most k candidates keeps them all (``all_candidates_fit``; top-k of them is all of them).
    """
    fixed = (visible & fixed_mask(q_pos, k_pos, cfg)).expand_as(scores)
    rest = visible & ~fixed  # (batch, head, query, key)
    ranked = scores.mean(dim=1, keepdim=True).expand_as(scores) if cfg.head_average else scores
    return fixed, top_k_mask(ranked, rest, cfg.topk)


def top_k_mask(values: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest valid entries along the last axis; ties go to the earliest entries.

    ``torch.topk`` breaks ties by an order of its own, which can change with what precedes a row's
    keys (a padded row, a longer cache); taking the earliest position makes every selector's choice the
    same in a batch as alone (a zero query, e.g. a zero pad embedding, ties every key).

    Args:
        values: (..., n) scores; valid: (..., n) bool, broadcastable to values.
    Returns:
        (..., n) bool, min(k, valid count) entries per row.
    """
    valid = valid.expand_as(values)
    if k == 0:
        return torch.zeros_like(valid)
    if k >= values.shape[-1]:  # no more entries than k: every valid one
        return valid.clone()
    masked = values.masked_fill(~valid, float("-inf"))
    top = masked.topk(k + 1, dim=-1).values  # (..., k + 1) the largest
    kth = top[..., k - 1:k]  # (..., 1) the k-th largest
    chosen = valid & (masked >= kth)
    # A tie at the k-th value shows as a (k+1)-th value equal to it; checking that costs (..., 1), not a
    # count over every key (the usual case has no tie and returns here).
    if not ((top[..., k:] == kth) & (kth > float("-inf"))).any():
        return chosen
    above = valid & (masked > kth)
    tied = chosen & ~above
    return above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))


def kept_mask_reference(scores, visible, q_pos, k_pos, cfg: SparseConfig) -> torch.Tensor:
    """The kept set written as loops over batch, head and query (the reference for ``kept_mask``).

    Args: as ``kept_mask`` (positions (query,)/(key,) or per row (batch, query)/(batch, key)).
    Returns:
        (batch, head, query, key) bool, fixed | chosen.
    """
    b, h, nq, nk = scores.shape
    visible = visible.expand(b, h, nq, nk)
    ranked = scores.mean(dim=1, keepdim=True).expand_as(scores) if cfg.head_average else scores
    keep = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for bi in range(b):
        qp, kp = (t[bi] if t.dim() == 2 else t for t in (q_pos, k_pos))  # this row's positions
        for hi in range(h):
            for qi in range(nq):
                i = int(qp[qi])
                seen = [j for j in range(nk) if visible[bi, hi, qi, j]]
                fixed = [j for j in seen if int(kp[j]) < cfg.anchors or i - cfg.window < int(kp[j]) <= i]
                rest = sorted((j for j in seen if j not in fixed), key=lambda j: -float(ranked[bi, hi, qi, j]))
                for j in fixed + rest[: cfg.topk]:
                    keep[bi, hi, qi, j] = True
    return keep


def output_split(probs: torch.Tensor, value: torch.Tensor, keep: torch.Tensor):
    """Split full attention into its kept and discarded parts.

    Args:
        probs: (batch, head, query, key) full softmax probabilities.
        value: (batch, head, key, d_head) values (KV heads already repeated).
        keep: (batch, head, query, key) bool.
    Returns:
        (m, o_full, o_kept, o_rest): m (batch, head, query); outputs (batch, head, query, d_head), where
        o_kept and o_rest are the renormalised softmax over the kept and discarded keys (o_rest is 0
        where nothing is discarded).
    """
    kept_p = probs * keep
    rest_p = probs * ~keep
    m = rest_p.sum(-1)
    o_full = probs @ value
    o_kept = (kept_p / kept_p.sum(-1, keepdim=True)) @ value
    o_rest = (rest_p / m.clamp_min(torch.finfo(probs.dtype).tiny)[..., None]) @ value
    return m, o_full, o_kept, o_rest
