"""Certified sparse attention: read pages in descending score-bound order until the discarded mass is provably ≤ ε.

A query's fixed keys F (anchors + window) are always read. The other visible keys (candidates) lie in pages
of P consecutive positions, and a page summary gives an upper bound u_p on every score in page p. After
reading the pages R exactly,

    Z_kept = Σ_{j ∈ F ∪ R} e^{s_j},    U = Σ_{p ∉ R} n_p · e^{u_p}  ≥  Σ_{j unread} e^{s_j}

(n_p the page's candidates), so the discarded mass m = Z_rest / (Z_kept + Z_rest) is at most
c = U / (Z_kept + U), since x / (a + x) grows with x. Reading pages in descending u_p until c ≤ ε is the
certified rule; c is its certificate. Because Z_kept only grows and U only shrinks, c falls with every page,
so the first page count t with c(t) ≤ ε (computed from all pages' exact sums at once, ``certified_mask``)
is the count the sequential reader stops at (``certified_mask_reference``, ``certified_decode``). The output
error is exactly m · ‖o_rest − o_kept‖ (``kept.output_split``) ≤ c · (max_{unread} ‖v_j‖ + ‖o_kept‖), with
the per-page maximum value norm as a summary.

Page bounds (``BOUNDS``; floats per page in ``summary_floats``):

- ``minmax`` (Quest): elementwise min and max of the page's keys, u = q⁺·max + q⁻·min; 2·d floats.
- ``centroid``: the page's mean key c and radius r = max ‖k − c‖, u = q·c + ‖q‖·r (Cauchy–Schwarz); d + 1.
- ``lowrank``: an orthonormal basis B (d, r) of the KV head's keys (top-r eigenvectors of Kᵀ K), the page's
  min and max of the coordinates z = Bᵀk, and the largest residual ‖k − Bz‖; u = q̃⁺·max + q̃⁻·min +
  ‖q − Bq̃‖·max ‖k − Bz‖ with q̃ = Bᵀq (the residual is orthogonal to B); 2·r + 1 floats, and d·r per head.
- ``min``: the smallest of the three (each is an upper bound); the sum of their floats.

Each bound gets a margin for float rounding of both the scores and the bound (8·d·u_fp32 · scale · ‖q‖ ·
‖max_j |k_j|‖, Higham's dot-product error bound), so the certificate also holds for scores as computed.

Pages are aligned to absolute positions (``pages.page_index``) and summarised over the keys present in the
call, as the Quest selector's are. Sources: Quest (Tang et al. 2024, arXiv 2406.10774) for page summaries;
the certificate is ours (issue 18).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from atlas_core.sparse.kept import BOUNDS, SparseConfig, fixed_mask
from atlas_core.sparse.kernels import _fixed_index
from atlas_core.sparse.pages import _row_summaries, page_index, score_bound

__all__ = ["BOUNDS", "CertifiedCache", "certified_cache", "certified_decode", "certified_mask", "certified_mask_reference",
           "bound_slack", "certificate", "certify", "key_basis", "key_bytes_share", "page_logsumexp", "page_bounds", "page_bounds_reference", "page_sketch", "summary_floats"]

ROUNDING = 8 * 2.0**-24  # per d_head term: Higham's γ_d ≈ d·u for the score and again for the bound, doubled


def _capped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The logit soft-cap tanh(x / c) · c (identity without one), as the model applies it."""
    return torch.tanh(x / softcap) * softcap if softcap else x


def summary_floats(bound: str, d_head: int, rank: int) -> tuple[int, int]:
    """Floats one page's key summary takes, and floats per KV head shared by every page (the low-rank basis).

    Args:
        bound: one of ``BOUNDS``; d_head: floats per key; rank: the low-rank sketch's r.
    Returns:
        (per page, per head); the per-page maximum value norm (for the output-error bound) is not included.
    """
    per = {"minmax": (2 * d_head, 0), "centroid": (d_head + 1, 0), "lowrank": (2 * rank + 1, d_head * rank)}
    if bound == "min":
        return tuple(sum(v[i] for v in per.values()) for i in (0, 1))
    return per[bound]


def key_basis(key: torch.Tensor, present: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis of the top-``rank`` directions of each head's present keys (uncentred: Kᵀ K).

    Args:
        key: (batch, kv_head, key, d_head); present: (batch, key) bool.
    Returns:
        (batch, kv_head, d_head, rank), columns orthonormal (any orthonormal B keeps the bound valid; the top
        eigenvectors make the residual small).
    Raises:
        ValueError: rank ≥ d_head (the residual would be empty; use the minmax bound), or a present key that is
            not finite.
    """
    d = key.shape[-1]
    if rank >= d:
        raise ValueError(f"rank ({rank}) must be below d_head ({d}) for the low-rank bound; use bound='minmax' instead")
    if not torch.isfinite(key[present[:, None, :, None].expand_as(key)]).all():
        raise ValueError("the keys hold NaN or inf: no page bound holds; check the model's activations (or its dtype)")
    k = (key * present[:, None, :, None]).double()
    gram = k.transpose(-1, -2) @ k  # (batch, kv_head, d, d)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[..., -rank:].flip(-1).to(key.dtype)


@dataclass(frozen=True)
class PageSketch:
    """Per-page key summaries of one attention call (leading axes (batch, kv_head)); None for unused bounds."""

    bound: str
    kmin: torch.Tensor | None = None  # (batch, kv_head, page, d_head)
    kmax: torch.Tensor | None = None
    centre: torch.Tensor | None = None  # (batch, kv_head, page, d_head)
    radius: torch.Tensor | None = None  # (batch, kv_head, page)
    basis: torch.Tensor | None = None  # (batch, kv_head, d_head, rank)
    zmin: torch.Tensor | None = None  # (batch, kv_head, page, rank)
    zmax: torch.Tensor | None = None
    resid: torch.Tensor | None = None  # (batch, kv_head, page) largest residual norm
    kabs: torch.Tensor | None = None  # (batch, kv_head) ‖max_j |k_j|‖ over present keys, for the rounding margin

    def repeat(self, groups: int) -> "PageSketch":
        """The sketch with each KV head repeated for its ``groups`` query heads (as ``repeat_kv``)."""
        rep = {f: (t.repeat_interleave(groups, 1) if isinstance(t, torch.Tensor) else t) for f, t in vars(self).items()}
        return PageSketch(**rep)


def _page_max(x: torch.Tensor, present: torch.Tensor, page: torch.Tensor, n_pages: int) -> torch.Tensor:
    """(batch, head, page) max of x (batch, head, key) over each page's present keys (−inf for none)."""
    return _row_summaries(x[..., None], present, page, n_pages)[1][..., 0]


def page_sketch(key: torch.Tensor, present: torch.Tensor, page: torch.Tensor, n_pages: int, cfg: SparseConfig) -> PageSketch:
    """Summaries of every page for ``cfg.bound`` (``min``: all three).

    Args:
        key: (batch, kv_head, key, d_head); present: (batch, key) bool, the keys summarised;
        page: (1 or batch, key) page of each key (``pages.page_index``); n_pages: pages per row.
    Returns:
        a ``PageSketch``.
    """
    fields = {"bound": cfg.bound}
    kept = key.masked_fill(~present[:, None, :, None], 0.0)
    fields["kabs"] = kept.abs().amax(-2).norm(dim=-1)  # (batch, kv_head)
    if cfg.bound in ("minmax", "min"):
        fields["kmin"], fields["kmax"] = _row_summaries(key, present, page, n_pages)
    if cfg.bound in ("centroid", "min"):
        b, h, n, d = key.shape
        idx = page.expand(b, n)[:, None, :, None].expand(b, h, n, d)
        total = key.new_zeros(b, h, n_pages, d).scatter_add(2, idx, kept)
        count = present.to(key.dtype).new_zeros(b, n_pages).scatter_add(1, page.expand(b, n), present.to(key.dtype))
        centre = total / count.clamp_min(1)[:, None, :, None]  # (batch, kv_head, page, d_head)
        dist = (key - centre.gather(2, idx)).norm(dim=-1)  # (batch, kv_head, key)
        fields["centre"], fields["radius"] = centre, _page_max(dist, present, page, n_pages)
    if cfg.bound in ("lowrank", "min"):
        basis = key_basis(key, present, cfg.rank)  # (batch, kv_head, d_head, rank)
        z = key @ basis  # (batch, kv_head, key, rank)
        resid = (key - z @ basis.transpose(-1, -2)).norm(dim=-1)  # (batch, kv_head, key)
        fields["basis"] = basis
        fields["zmin"], fields["zmax"] = _row_summaries(z, present, page, n_pages)
        fields["resid"] = _page_max(resid, present, page, n_pages)
    return PageSketch(**fields)


def page_bounds(query: torch.Tensor, sk: PageSketch, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Upper bound of every (soft-capped) score scale·q·k over each page's summarised keys.

    Args:
        query: (batch, head, query, d_head); sk: a sketch whose heads match the query's (``PageSketch.repeat``).
        scale: the attention scaling; softcap: the logit soft-cap (tanh(s/c)·c, monotone) or None.
    Returns:
        (batch, head, query, page); −inf for a page with no summarised key.
    """
    d = query.shape[-1]
    qnorm = query.norm(dim=-1, keepdim=True)  # (batch, head, query, 1)
    bounds = []
    if sk.kmin is not None:
        bounds.append(score_bound(query, sk.kmin, sk.kmax))
    if sk.centre is not None:
        bounds.append(query @ sk.centre.transpose(-1, -2) + qnorm * sk.radius[:, :, None, :])
    if sk.basis is not None:
        qt = query @ sk.basis  # (batch, head, query, rank)
        q_perp = (query - qt @ sk.basis.transpose(-1, -2)).norm(dim=-1, keepdim=True)
        bounds.append(score_bound(qt, sk.zmin, sk.zmax) + q_perp * sk.resid[:, :, None, :])
    u = torch.stack(bounds).amin(0)  # each is a bound: their minimum is the tightest
    u = (u + ROUNDING * d * qnorm * sk.kabs[:, :, None, None]) * scale
    u = u.nan_to_num(nan=-math.inf)  # an empty page: (+inf) + (−inf) terms
    return _capped(u, softcap)


def certificate(log_unread: torch.Tensor, log_kept: torch.Tensor) -> torch.Tensor:
    """c = U / (Z_kept + U) from log U and log Z_kept (any shape): 0 where nothing is unread, 1 where nothing
    is kept; computed as a sigmoid of the log ratio, so neither sum can underflow to a false 0/0."""
    c = torch.sigmoid(log_unread - log_kept)
    return c.masked_fill(log_unread == -math.inf, 0.0)


def certify(log_z_fixed: torch.Tensor, log_z_page: torch.Tensor, log_bound_page: torch.Tensor, order: torch.Tensor,
            eps: float, max_pages: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages read and certificate of the certified rule, from every page's exact and bounded sums at once.

    All sums are logs (log-sum-exp), so scores thousands of logits apart neither overflow nor underflow.

    Args:
        log_z_fixed: (...,) log Σ e^s over the fixed keys (float64).
        log_z_page: (..., page) log Σ e^s over each page's candidate keys (−inf for none).
        log_bound_page: (..., page) log(n_p) + u_p, −inf for a page without candidates.
        order: (..., page) pages in reading order (descending bound; pages without candidates last).
        eps: the certificate's target; max_pages: a cap on pages read (0: none).
    Returns:
        (t (...,) int64 pages read, c (...,) float64 the certificate U / (Z_kept + U) after them).
    """
    zs, bs = log_z_page.gather(-1, order), log_bound_page.gather(-1, order)  # (..., page) in reading order
    none = torch.full_like(log_z_fixed, -math.inf)[..., None]
    log_kept = torch.logaddexp(log_z_fixed[..., None], torch.cat([none, zs.logcumsumexp(-1)], -1))  # (..., page + 1)
    log_unread = torch.cat([bs.flip(-1).logcumsumexp(-1).flip(-1), none], -1)  # (..., page + 1) pages ≥ t
    c = certificate(log_unread, log_kept)
    t = (c <= eps).to(torch.int8).argmax(-1)  # the first t with c(t) ≤ eps (c(all pages) = 0 always qualifies)
    if max_pages:
        t = t.clamp(max=max_pages)
    return t, c.gather(-1, t[..., None])[..., 0]


def page_logsumexp(s: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor, n_pages: int) -> torch.Tensor:
    """(..., page) log Σ e^{s_j} over the masked keys of each page (−inf for none).

    Args:
        s: (..., key) scores; mask: (..., key) bool; idx: (..., key) page of each key.
    """
    s = s.masked_fill(~mask, -math.inf)
    top = torch.full((*s.shape[:-1], n_pages), -math.inf, dtype=s.dtype).scatter_reduce(-1, idx, s, "amax")
    shift = top.gather(-1, idx)
    e = (s - shift).masked_fill(~mask, -math.inf).exp()  # a masked key: exp(−inf) = 0, never NaN
    total = torch.zeros_like(top).scatter_add(-1, idx, e)
    return total.log() + top.masked_fill(top == -math.inf, 0.0)


def certified_mask(query: torch.Tensor, key: torch.Tensor, scores: torch.Tensor, scale: float, visible, q_pos, k_pos,
                   cfg: SparseConfig, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fixed part, certified pages and certificate of every query's kept set (vectorised over queries).

    The pages read are those the sequential reader (``certified_mask_reference``) reads: descending bound,
    ties to the earliest page, stopping at the first count whose certificate is ≤ ε (``certify``).

    Args:
        query: (batch, head, query, d_head); key: (batch, kv_head, key, d_head) (not repeated).
        scores: (batch, head, query, key) the exact (soft-capped) logits the attention uses.
        visible: (batch, 1 or head, query, key) bool; q_pos (batch, query), k_pos (batch, key) absolute positions.
        cfg: the rule (anchors, window, page_size, eps, bound, rank, max_pages).
    Returns:
        (fixed, chosen, stats): fixed and chosen (batch, head, query, key) bool and disjoint; stats
        {"certificate", "pages_read", "candidate_pages"} each (batch, head, query).
    """
    b, h, nq, n = scores.shape
    fixed = (visible & fixed_mask(q_pos, k_pos, cfg)).expand(b, h, nq, n)
    rest = visible & ~fixed  # (batch, head, query, key)
    page, n_pages = page_index(k_pos, cfg.page_size)  # (1 or batch, key)
    present = visible.expand(b, -1, -1, -1).any(1).any(1)  # (batch, key)
    sk = page_sketch(key, present, page, n_pages, cfg).repeat(h // key.shape[1])
    u = page_bounds(query, sk, scale, softcap).double()  # (batch, head, query, page)
    idx = page.expand(b, n)[:, None, None, :].expand(b, h, nq, n)
    count = torch.zeros(b, h, nq, n_pages, dtype=torch.float64).scatter_add(-1, idx, rest.double())
    u = u.masked_fill(count == 0, -math.inf)
    s = scores.double()
    log_z_fixed = s.masked_fill(~fixed, -math.inf).logsumexp(-1)  # (batch, head, query)
    log_z_page = page_logsumexp(s, rest, idx, n_pages)  # (batch, head, query, page)
    order = u.sort(dim=-1, descending=True, stable=True).indices  # (batch, head, query, page)
    t, cert = certify(log_z_fixed, log_z_page, count.log() + u, order, cfg.eps, cfg.max_pages)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_pages).expand_as(order))  # page -> reading rank
    chosen = rest & (rank.gather(-1, idx) < t[..., None])
    cand_pages = (count > 0).sum(-1)
    stats = {"certificate": cert.float(), "pages_read": t.float(), "candidate_pages": cand_pages.float(),
             "key_bytes": key_bytes_share(cfg, query.shape[-1], fixed.sum(-1) + chosen.sum(-1), cand_pages,
                                          visible.expand(b, h, nq, n).sum(-1))}
    return fixed, chosen, stats


def key_bytes_share(cfg: SparseConfig, d_head: int, keys_read, candidate_pages, n_keys):
    """Share of a query's key bytes the certified rule reads: its keys (fixed and read pages), every candidate
    page's summary and the low-rank basis, over all its n visible keys (the value bytes are the kept keys').

    Args:
        keys_read, candidate_pages, n_keys: int tensors (or ints) of one shape.
    Returns:
        float tensor (or float) of that shape; can exceed 1 when the summaries outweigh what they save.
    """
    per_page, per_head = summary_floats(cfg.bound, d_head, cfg.rank)
    return (keys_read * d_head + candidate_pages * per_page + per_head) / (n_keys * d_head)


def page_bounds_reference(q: torch.Tensor, keys: torch.Tensor, basis: torch.Tensor | None, bound: str,
                          scale: float) -> float:
    """One page's bound for one query, written plainly from its keys (the reference for ``page_bounds``).

    Args:
        q: (d_head,); keys: (member, d_head) the page's summarised keys; basis: (d_head, rank) for lowrank/min.
    Returns:
        the bound on scale·q·k before rounding margin and soft-cap.
    """
    out = []
    if bound in ("minmax", "min"):
        lo, hi = keys.amin(0), keys.amax(0)
        out.append(sum(max(float(q[i] * lo[i]), float(q[i] * hi[i])) for i in range(len(q))))
    if bound in ("centroid", "min"):
        c = keys.mean(0)
        out.append(float(q @ c) + float(q.norm()) * max(float((k - c).norm()) for k in keys))
    if bound in ("lowrank", "min"):
        z = keys @ basis  # (member, rank)
        qt = q @ basis
        lin = sum(max(float(qt[i] * z[:, i].min()), float(qt[i] * z[:, i].max())) for i in range(len(qt)))
        resid = max(float((k - basis @ (basis.T @ k)).norm()) for k in keys)
        out.append(lin + float((q - basis @ qt).norm()) * resid)
    return min(out) * scale


def certified_mask_reference(query, key, scores, scale: float, visible, q_pos, k_pos, cfg: SparseConfig,
                             softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The certified selector written as loops, reading one page at a time (the reference for ``certified_mask``).

    Args: as ``certified_mask`` (query (batch, head, query, d_head), key (batch, kv_head, key, d_head), scores
        (batch, head, query, key), visible, positions, the rule, the soft-cap).
    Returns:
        (keep (batch, head, query, key) bool, certificate (batch, head, query) float64).
    """
    b, h, nq, n = scores.shape
    groups = h // key.shape[1]
    visible = visible.expand(b, h, nq, n)
    keep, cert = torch.zeros(b, h, nq, n, dtype=torch.bool), torch.zeros(b, h, nq, dtype=torch.float64)
    for bi in range(b):
        qp, kp = (t[bi] if t.dim() == 2 else t for t in (q_pos, k_pos))
        present = [j for j in range(n) if visible[bi, :, :, j].any()]
        pages = sorted({int(kp[j]) // cfg.page_size for j in present})
        members = {p: [j for j in present if int(kp[j]) // cfg.page_size == p] for p in pages}
        for hi in range(h):
            k_head = key[bi, hi // groups]
            basis = (key_basis(key[bi:bi + 1, hi // groups: hi // groups + 1], torch.tensor([[j in present for j in range(n)]]),
                               cfg.rank)[0, 0] if cfg.bound in ("lowrank", "min") else None)
            margin = ROUNDING * key.shape[-1] * float(k_head[present].abs().amax(0).norm())
            for qi in range(nq):
                i, q = int(qp[qi]), query[bi, hi, qi]
                seen = [j for j in range(n) if visible[bi, hi, qi, j]]
                fixed = [j for j in seen if int(kp[j]) < cfg.anchors or i - cfg.window < int(kp[j]) <= i]
                cand = {p: [j for j in members[p] if j in seen and j not in fixed] for p in pages}
                bounds = {}
                for p in pages:
                    if cand[p]:
                        u = page_bounds_reference(q, k_head[members[p]], basis, cfg.bound, 1.0)
                        u = (u + margin * float(q.norm())) * scale
                        bounds[p] = math.tanh(u / softcap) * softcap if softcap else u
                order = sorted(bounds, key=lambda p: -bounds[p])  # stable: ties to the earliest page
                s = {j: float(scores[bi, hi, qi, j]) for j in seen}
                kept = [s[j] for j in fixed]
                read, c = 0, None
                while True:
                    unread = _lse([math.log(len(cand[p])) + bounds[p] for p in order[read:]])
                    z_kept = _lse(kept)
                    c = 0.0 if unread == -math.inf else 1.0 if z_kept == -math.inf else 1 / (1 + math.exp(min(z_kept - unread, 700)))
                    if c <= cfg.eps or read == len(order) or (cfg.max_pages and read == cfg.max_pages):
                        break
                    kept += [s[j] for j in cand[order[read]]]
                    read += 1
                cert[bi, hi, qi] = c
                for j in fixed + [j for p in order[:read] for j in cand[p]]:
                    keep[bi, hi, qi, j] = True
    return keep, cert


def _lse(values: list[float]) -> float:
    """log Σ e^v, written plainly (−inf for none)."""
    top = max(values, default=-math.inf)
    return top if top == -math.inf else top + math.log(sum(math.exp(v - top) for v in values))


@dataclass(frozen=True)
class CertifiedCache:
    """One layer's keys and values with the page summaries of the certified kernel (one decode query).

    Made by ``certified_cache``; ``certified_decode`` reads it. The summaries are those of ``cfg.bound``.
    """

    keys: torch.Tensor  # (kv_head, key, d_head)
    values: torch.Tensor  # (kv_head, key, d_head)
    sketch: PageSketch  # leading axes (1, kv_head)
    vnorm: torch.Tensor  # (kv_head, page) largest value norm in each page
    cfg: SparseConfig


def certified_cache(keys: torch.Tensor, values: torch.Tensor, cfg: SparseConfig) -> CertifiedCache:
    """Summarise a cache into pages of ``cfg.page_size`` for ``certified_decode``.

    A real cache would update the newest page's summaries per token; the low-rank basis comes from the keys
    summarised.

    Args:
        keys, values: (kv_head, n, d_head); cfg: the certified rule (page size, bound, rank, eps, anchors, window).
    Returns:
        a ``CertifiedCache``: the tensors, the page sketch (leading axes (1, kv_head)) and each page's largest value norm.
    Raises:
        ValueError: rank ≥ d_head for the lowrank/min bound, or non-finite keys (``key_basis``).
    """
    n = keys.shape[1]
    page, n_pages = page_index(torch.arange(n, device=keys.device), cfg.page_size)
    present = torch.ones(1, n, dtype=torch.bool, device=keys.device)
    sk = page_sketch(keys[None], present, page, n_pages, cfg)
    vnorm = _page_max(values[None].norm(dim=-1), present, page, n_pages)[0]
    return CertifiedCache(keys, values, sk, vnorm, cfg)


def _middle_pages(n: int, cfg: SparseConfig, device) -> tuple[int, int, int, int, torch.Tensor]:
    """The candidate range [lo, hi) of a decode query at position n − 1 (``kernels._fixed_index``), its pages
    [p_lo, p_hi) and each page's candidate count (page,)."""
    _, lo, hi = _fixed_index(n, cfg, device)
    p_lo, p_hi = lo // cfg.page_size, -(-hi // cfg.page_size)
    start = torch.arange(p_lo, p_hi, device=device) * cfg.page_size
    count = ((start + cfg.page_size).clamp(max=hi) - start.clamp(min=lo)).clamp_min(0)
    return lo, hi, p_lo, p_hi, count


def certified_decode(q: torch.Tensor, cache: CertifiedCache, scale: float | None = None, softcap: float | None = None,
                     rounds: int = 8, gather_share: float = 0.25) -> tuple[torch.Tensor, dict]:
    """One decode step with certified page selection: read pages in bound order, in growing batches, until each
    query head's certificate is ≤ ε.

    Batches of pages (doubling from ``rounds`` pages, or from the count the bounds alone show is needed) are
    gathered for every query head while they cover less than ``gather_share`` of the pages; a head still
    uncertified then has to read much of the cache, and the kernel scores the remaining keys in one contiguous
    pass (cheaper than gathering most pages one head at a time). Either way each head keeps exactly the pages up
    to its first certified count, so the kept set is the sequential reader's (``certified_mask`` on the same
    cache; tests hold them equal). Sums are kept as logs (no underflow however far apart the scores are).

    Args:
        q: (head, d_head) the query at position n − 1; cache: ``certified_cache`` of n keys.
        scale: attention scaling (default d_head^-0.5); softcap: the model's logit soft-cap, or None.
        rounds: pages in the first batch; gather_share: the share of pages gathered before the contiguous pass.
    Returns:
        (output (head, d_head), info): per query head "pages_read", "certificate" (float64), "error_bound" (a
        bound on ‖o_full − o_kept‖), "keys_read" (fixed keys + candidate keys of the read pages); "pages_fetched"
        (pages the kernel read, ≥ the most any head needed; all of them after a contiguous pass).
    Raises:
        ValueError: q's heads not a multiple of the cache's KV heads.
    Source: the certificate of the module docstring; page summaries after Quest (arXiv 2406.10774).
    """
    keys, cfg = cache.keys, cache.cfg
    n_kv, n, d = keys.shape
    if q.shape[0] % n_kv:
        raise ValueError(f"the query's {q.shape[0]} heads must be a multiple of the cache's {n_kv} KV heads")
    qg = q.view(n_kv, -1, d)  # (kv_head, group, d_head)
    scale = d**-0.5 if scale is None else scale
    score = lambda x: _capped(x, softcap)  # noqa: E731
    st = _decode_setup(qg, cache, scale, softcap)
    cap = min(cfg.max_pages or st["n_pages"], st["n_pages"])
    t = torch.where(certificate(st["unread"][..., 0], st["log_z_fixed"]) <= cfg.eps, 0, -1)  # -1: not yet certified
    log_kept, start, reads = st["log_z_fixed"], 0, []
    # Every page read adds at most its bound to Z_kept, so c(t) ≥ U(t) / (Z_fixed + U(0)): pages below the first t
    # where that floor is ≤ ε are read in any case; when that alone is much of the cache, skip the gathering.
    floor = certificate(st["unread"], torch.logaddexp(st["log_z_fixed"], st["unread"][..., 0])[..., None])
    need = int((floor > cfg.eps).sum(-1).max())  # the floor falls with t: its count above ε is the first t below
    batch = max(rounds, need)
    while bool((t < 0).any()) and start < cap and start + batch <= max(gather_share * st["n_pages"], rounds):
        stop = min(start + batch, cap)
        scores, slots, z = _read_pages(qg, keys, st, start, stop, scale, score)
        t, log_kept = _first_certified(t, log_kept, z, st["unread"], start, cfg.eps)
        reads.append((scores, slots))
        start, batch = stop, batch * 2
    contiguous = bool((t < 0).any()) and start < cap
    if contiguous:  # the rest in one pass over the cache: every key's score once
        s_full = score(qg @ keys.transpose(-1, -2) * scale)  # (kv_head, group, n)
        z = _page_sums(s_full, st).gather(-1, st["order"])[..., start:cap]  # (kv_head, group, cap − start)
        t, log_kept = _first_certified(t, log_kept, z, st["unread"], start, cfg.eps)
    t = torch.where(t < 0, cap, t)  # the cap (or every page) reached
    out, log_total = (_attend_all(s_full, cache, st, t) if contiguous else _attend_read(qg, cache, st, t, reads))
    cert = certificate(st["unread"].gather(-1, t[..., None])[..., 0], log_total)
    read = torch.arange(st["n_pages"], device=keys.device) < t[..., None]
    vmax = cache.vnorm[:, st["p_lo"]:st["p_hi"]][:, None, :].expand_as(st["order"]).gather(-1, st["order"])
    vmax = vmax.masked_fill(read, 0).amax(-1) if st["n_pages"] else torch.zeros_like(cert)
    kept_keys = (st["count_sorted"] * read).sum(-1)  # candidates of the read pages (partial pages counted as such)
    info = {"pages_read": t.flatten(), "certificate": cert.flatten(), "error_bound": (cert * (vmax + out.norm(dim=-1))).flatten(),
            "keys_read": (st["fixed"].numel() + kept_keys).flatten(), "pages_fetched": st["n_pages"] if contiguous else start}
    return out.reshape(-1, d), info


def _decode_setup(qg: torch.Tensor, cache: CertifiedCache, scale: float, softcap: float | None) -> dict:
    """Fixed keys' scores, page bounds, reading order and the unread-bound suffix sums of one decode query.

    qg (kv_head, group, d_head); softcap: the logit soft-cap or None. Returns a dict: size, lo, hi, p_lo,
    p_hi, n_pages, fixed (index), f_scores (kv_head, group, fixed) float64, order (kv_head, group, page),
    count_sorted (kv_head, group, page) candidates per page in reading order, unread (kv_head, group, page + 1)
    log Σ n_p e^{u_p} over the pages of rank ≥ t, log_z_fixed (kv_head, group).
    """
    keys, cfg = cache.keys, cache.cfg
    n = keys.shape[1]
    lo, hi, p_lo, p_hi, count = _middle_pages(n, cfg, keys.device)
    fixed, _, _ = _fixed_index(n, cfg, keys.device)
    f_scores = _capped(qg @ keys[:, fixed].transpose(-1, -2) * scale, softcap).double()  # (kv_head, group, fixed)
    u = page_bounds(qg[None], _slice_pages(cache.sketch, p_lo, p_hi), scale, softcap)[0].double()  # (kv_head, group, page)
    u = u.masked_fill(count == 0, -math.inf)
    order = u.sort(dim=-1, descending=True, stable=True).indices
    bound_sorted = (count.double().log() + u).gather(-1, order)  # (kv_head, group, page) in reading order
    none = torch.full_like(bound_sorted[..., :1], -math.inf)
    unread = torch.cat([bound_sorted.flip(-1).logcumsumexp(-1).flip(-1), none], -1)
    return {"size": cfg.page_size, "lo": lo, "hi": hi, "p_lo": p_lo, "p_hi": p_hi, "n_pages": p_hi - p_lo, "fixed": fixed,
            "f_scores": f_scores, "order": order, "count_sorted": count.expand_as(u).gather(-1, order), "unread": unread,
            "log_z_fixed": f_scores.logsumexp(-1)}


def _read_pages(qg, keys, st: dict, start: int, stop: int, scale: float, score):
    """Gather and score the pages of reading ranks [start, stop) per query head.

    Returns (scores (kv_head, group, b·P) fp32, −inf outside the candidates; slots (kv_head, group, b·P);
    z (kv_head, group, b) log Σ e^s per page, float64).
    """
    n_kv, n, _ = keys.shape
    size = st["size"]
    pages = st["order"][..., start:stop] + st["p_lo"]  # (kv_head, group, b) absolute page numbers
    slots = (pages[..., None] * size + torch.arange(size, device=keys.device)).flatten(-2)  # (kv_head, group, b·P)
    inside = (slots >= st["lo"]) & (slots < st["hi"])
    slots = slots.clamp(max=n - 1)
    k_sel = keys[torch.arange(n_kv, device=keys.device)[:, None, None], slots]  # (kv_head, group, b·P, d_head)
    scores = score((k_sel @ qg[..., None])[..., 0] * scale).masked_fill(~inside, -math.inf)
    z = scores.double().view(*scores.shape[:2], -1, size).logsumexp(-1)
    return scores, slots, z


def _first_certified(t, log_kept, z, unread, start: int, eps: float):
    """Advance the heads not yet certified over pages of ranks start … start + b − 1 (their log sums z).

    t (kv_head, group), −1 where uncertified; log_kept (kv_head, group) after ``start`` pages; z (kv_head, group, b).
    Returns (t, log_kept after start + b pages).
    """
    zk = torch.logaddexp(log_kept[..., None], z.logcumsumexp(-1))  # (kv_head, group, b) after start + 1 … start + b
    ok = certificate(unread[..., start + 1:start + 1 + z.shape[-1]], zk) <= eps
    first = torch.where(ok.any(-1), ok.to(torch.int8).argmax(-1) + start + 1, -1)
    return torch.where(t < 0, first, t), zk[..., -1]


def _page_sums(s_full: torch.Tensor, st: dict) -> torch.Tensor:
    """(kv_head, group, page) log Σ e^s over every middle page's candidates, from every key's score (kv_head, group, n)."""
    size, lo, hi = st["size"], st["lo"], st["hi"]
    lead = lo - st["p_lo"] * size
    s = torch.nn.functional.pad(s_full[..., lo:hi].double(), (lead, st["n_pages"] * size - lead - (hi - lo)), value=-math.inf)
    return s.view(*s.shape[:2], st["n_pages"], size).logsumexp(-1)


def _kept_pages(st: dict, t: torch.Tensor) -> torch.Tensor:
    """(kv_head, group, page) bool: the pages of reading rank below t."""
    rank = torch.empty_like(st["order"]).scatter_(-1, st["order"], torch.arange(st["n_pages"], device=t.device).expand_as(st["order"]))
    return rank < t[..., None]


def _attend_all(s: torch.Tensor, cache: CertifiedCache, st: dict, t: torch.Tensor):
    """Softmax over the fixed keys and the first t pages, by masking every key's score s (kv_head, group, n).

    Returns (output (kv_head, group, d_head), log Z_kept (kv_head, group))."""
    values, size = cache.values, st["size"]
    n = s.shape[-1]
    kept_page = _kept_pages(st, t).repeat_interleave(size, -1)  # (kv_head, group, n_pages·P) from page p_lo
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[..., st["fixed"]] = True
    span = min(n - st["p_lo"] * size, kept_page.shape[-1])
    middle = torch.zeros_like(keep)
    middle[..., st["p_lo"] * size:st["p_lo"] * size + span] = kept_page[..., :span]
    middle[..., :st["lo"]] = False
    middle[..., st["hi"]:] = False
    s = s.masked_fill(~(keep | middle), -math.inf)
    return s.softmax(-1) @ values, s.double().logsumexp(-1)


def _attend_read(qg, cache: CertifiedCache, st: dict, t: torch.Tensor, reads: list):
    """Softmax over the fixed keys and each head's first t gathered pages.

    Returns (output (kv_head, group, d_head), log Z_kept (kv_head, group))."""
    values, size = cache.values, st["size"]
    n_kv, _, d = values.shape
    f_scores = st["f_scores"]
    if reads:
        s_all = torch.cat([r[0] for r in reads], -1).double()  # (kv_head, group, fetched·P)
        idx = torch.cat([r[1] for r in reads], -1)
        s_all = s_all.masked_fill(torch.arange(s_all.shape[-1], device=t.device) >= t[..., None] * size, -math.inf)
        v_sel = values[torch.arange(n_kv, device=t.device)[:, None, None], idx]  # (kv_head, group, fetched·P, d_head)
    else:
        s_all, v_sel = f_scores.new_zeros(*f_scores.shape[:2], 0), values.new_zeros(n_kv, qg.shape[1], 0, d)
    both = torch.cat([f_scores, s_all], -1)
    probs = both.softmax(-1).to(qg.dtype)  # (kv_head, group, fixed + fetched)
    nf = st["fixed"].numel()
    out = probs[..., :nf] @ values[:, st["fixed"]] + (probs[..., nf:, None] * v_sel).sum(-2)
    return out, both.logsumexp(-1)


def _slice_pages(sk: PageSketch, p_lo: int, p_hi: int) -> PageSketch:
    """The sketch's pages [p_lo, p_hi) (the basis and kabs are per head, kept whole)."""
    cut = {f: (t[:, :, p_lo:p_hi] if isinstance(t, torch.Tensor) and f not in ("basis", "kabs") else t)
           for f, t in vars(sk).items()}
    return PageSketch(**cut)


def bound_slack(q: torch.Tensor, keys: torch.Tensor, cfg: SparseConfig, scale: float, softcap: float | None = None) -> dict:
    """How loose each page bound is for one decode query: u_p − max_{j ∈ p} s_j over the candidate pages, in logits.

    The certificate pays e^{slack} per unread page, so a bound with a median slack of 10 logits overstates an
    unread page's mass about 22,000-fold.

    Args:
        q: (head, d_head) the query at position n − 1; keys: (kv_head, n, d_head); cfg: anchors, window, page
            size and rank (its bound is ignored: every bound in ``BOUNDS`` is measured).
    Returns:
        {bound: (median, 10th percentile, 90th percentile) of the slack over candidate pages and heads}.
    """
    n_kv, n, d = keys.shape
    groups = q.shape[0] // n_kv
    query = q[None, :, None]  # (1, head, 1, d_head)
    scores = (query @ keys.repeat_interleave(groups, 0)[None].transpose(-1, -2))[0, :, 0] * scale  # (head, key)
    scores = _capped(scores, softcap)
    lo, hi, p_lo, p_hi, count = _middle_pages(n, cfg, keys.device)
    cand = torch.full_like(scores, -math.inf)
    cand[:, lo:hi] = scores[:, lo:hi]
    n_pages = -(-n // cfg.page_size)
    padded = torch.nn.functional.pad(cand, (0, n_pages * cfg.page_size - n), value=-math.inf)
    smax = padded.view(-1, n_pages, cfg.page_size).amax(-1)[:, p_lo:p_hi]  # (head, page) candidates' max score
    page, _ = page_index(torch.arange(n), cfg.page_size)
    present = torch.ones(1, n, dtype=torch.bool)
    out = {}
    for bound in BOUNDS:
        sk = page_sketch(keys[None], present, page, n_pages, replace(cfg, bound=bound, rank=min(cfg.rank, d - 1)))
        u = page_bounds(query.view(1, n_kv, groups, d), _slice_pages(sk, p_lo, p_hi), scale, softcap)[0]
        slack = (u.reshape(-1, p_hi - p_lo) - smax)[smax > -math.inf].double()
        out[bound] = tuple(slack.quantile(torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist())
    return out
