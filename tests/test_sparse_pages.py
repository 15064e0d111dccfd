import torch

import pytest

from atlas_core.sparse.kept import SparseConfig, kept_mask
from atlas_core.sparse.pages import (page_index, page_mask, page_mask_reference, page_summaries, score_bound,
                                     score_bound_reference, selection_recall)


def test_page_summaries_known_answer():
    keys = torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]])  # (key, d_head), pages of 2: {0, 1}, {2}
    kmin, kmax = page_summaries(keys, 2)
    assert kmin.tolist() == [[1.0, -2.0], [-1.0, 5.0]]
    assert kmax.tolist() == [[3.0, 0.0], [-1.0, 5.0]]


def test_bound_equals_reference_and_bounds_every_key():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 16, generator=gen)  # (head, query, d_head)
    keys = torch.randn(3, 37, 16, generator=gen)  # (head, key, d_head)
    kmin, kmax = page_summaries(keys, 8)
    bound = score_bound(q, kmin, kmax, 0.25)
    torch.testing.assert_close(bound, score_bound_reference(q, kmin, kmax, 0.25))
    scores = q @ keys.transpose(-1, -2) * 0.25  # (head, query, key)
    page_of = torch.arange(37) // 8
    assert torch.all(scores <= bound[..., page_of] + 1e-5)


def _setup(n=40, h=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query, key = torch.randn(1, h, n, d, generator=gen), torch.randn(1, h, n, d, generator=gen)
    pos = torch.arange(n)
    visible = (pos[None, :] <= pos[:, None])[None, None]
    return query, key, visible, pos


def test_pages_of_one_key_select_the_exact_top_k():
    query, key, visible, pos = _setup()
    cfg = SparseConfig(anchors=1, window=4, topk=5, selector="pages", page_size=1)
    scores = query @ key.transpose(-1, -2) * 0.5
    fixed_p, chosen_p = page_mask(query, key, 0.5, visible, pos, pos, cfg)
    fixed_e, chosen_e = kept_mask(scores, visible, pos, pos, cfg)
    assert torch.equal(fixed_p, fixed_e) and torch.equal(chosen_p, chosen_e)


def test_page_selection_stays_within_budget_and_candidates():
    query, key, visible, pos = _setup()
    cfg = SparseConfig(anchors=1, window=4, topk=8, selector="pages", page_size=4)
    fixed, chosen = page_mask(query, key, 0.5, visible, pos, pos, cfg)
    assert not (fixed & chosen).any() and not (chosen & ~visible).any()
    rest = visible & ~fixed
    fits = rest.sum(-1) <= cfg.topk  # (batch, head, query): nothing to drop, every candidate kept
    assert torch.equal(chosen[fits], rest[fits])
    assert chosen[~fits].sum(-1).max() <= cfg.n_pages * cfg.page_size
    pages_touched = chosen.view(*chosen.shape[:3], -1, 4).any(-1).sum(-1)
    assert pages_touched[~fits].max() <= cfg.n_pages


def test_selection_recall_known_answer():
    probs = torch.tensor([[[[0.1, 0.2, 0.3, 0.4]]]])
    exact = torch.tensor([[[[False, False, True, True]]]])
    chosen = torch.tensor([[[[False, True, False, True]]]])
    index, mass = selection_recall(probs, chosen, exact)
    assert index.item() == 0.5
    assert abs(mass.item() - 0.6 / 0.7) < 1e-6


def test_pages_follow_absolute_positions():
    """Keys seen from a trimmed cache (first key at position 6) are paged by position // P."""
    query, key, visible, pos = _setup(n=40)
    cfg = SparseConfig(anchors=0, window=2, topk=8, selector="pages", page_size=4)
    _, chosen = page_mask(query[:, :, -1:], key[:, :, 6:], 0.5, visible[..., -1:, 6:], pos[-1:], pos[6:], cfg)
    candidates = pos[6:-2]
    for head in range(2):
        picked = pos[6:][chosen[0, head, 0]]
        pages = set((picked // 4).tolist())
        assert len(pages) == cfg.n_pages
        assert set(picked.tolist()) == {p for p in candidates.tolist() if p // 4 in pages}
    lead_min, _ = page_summaries(key[0, 0, 6:], 4, lead=2)
    assert torch.equal(lead_min[0], key[0, 0, 6:8].amin(0))


def _padded(n=24, h=3, d=8, pads=(5, 0), seed=2):
    """A left-padded batch: row b holds pads[b] pad slots, then n − pads[b] tokens at positions 0, 1, …"""
    gen = torch.Generator().manual_seed(seed)
    query, key = torch.randn(len(pads), h, n, d, generator=gen), torch.randn(len(pads), h, n, d, generator=gen)
    real = torch.arange(n)[None, :] >= torch.tensor(pads)[:, None]  # (batch, key)
    pos = (real.long().cumsum(-1) - 1).clamp_min(0)  # pads at 0, as generate() writes them
    visible = (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None] & real[:, None, :] & real[:, :, None]
    return query, key, visible[:, None], pos, real


@pytest.mark.parametrize("cfg", [SparseConfig(anchors=1, window=3, topk=4, selector="pages", page_size=4),
                                 SparseConfig(anchors=2, window=2, topk=5, selector="pages", page_size=3),
                                 SparseConfig(anchors=1, window=4, topk=6, selector="pages", page_size=4, head_average=True),
                                 SparseConfig(anchors=0, window=1, topk=0, selector="pages", page_size=2)])
def test_page_mask_equals_reference_on_a_padded_batch(cfg):
    query, key, visible, pos, _ = _padded()
    fixed, chosen = page_mask(query, key, 0.5, visible, pos, pos, cfg)
    assert not (fixed & chosen).any()
    assert torch.equal(fixed | chosen, page_mask_reference(query, key, 0.5, visible, pos, pos, cfg))


def test_each_padded_row_selects_as_it_would_alone():
    """Pad slots join no page summary, and pages follow each row's own positions."""
    cfg = SparseConfig(anchors=1, window=3, topk=4, selector="pages", page_size=4)
    query, key, visible, pos, real = _padded()
    fixed, chosen = page_mask(query, key, 0.5, visible, pos, pos, cfg)
    for b in range(2):
        r = real[b]
        solo_f, solo_c = page_mask(query[b : b + 1, :, r], key[b : b + 1, :, r], 0.5, visible[b : b + 1][..., r, :][..., r],
                                   pos[b, r], pos[b, r], cfg)
        assert torch.equal(fixed[b][:, r][..., r], solo_f[0]) and torch.equal(chosen[b][:, r][..., r], solo_c[0])


def test_page_index_per_row():
    page, n_pages = page_index(torch.tensor([[-3, -2, -1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]), 4)
    assert n_pages == 3
    assert page.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("extra", [-1, 0, 1])  # visible keys = budget − 1, budget, budget + 1
@pytest.mark.parametrize("first", [0, 3, 7, 15])  # position of the first key: pages straddled differently
@pytest.mark.parametrize("head_average", [False, True])
def test_a_query_with_no_more_candidates_than_k_keeps_every_key(extra, first, head_average):
    """The budget boundary (anchors 1, window 4, top-k 16, pages of 16): 21 visible keys drop nothing."""
    cfg = SparseConfig(anchors=1, window=4, topk=16, selector="pages", page_size=16, head_average=head_average)
    n = cfg.budget + extra
    gen = torch.Generator().manual_seed(first)
    query, key = torch.randn(1, 2, 1, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)
    k_pos = torch.arange(first, first + n)
    k_pos[0] = 0  # the anchor, then a cache whose next keys start mid-page
    visible = torch.ones(1, 1, 1, n, dtype=torch.bool)
    fixed, chosen = page_mask(query, key, 0.5, visible, k_pos[-1:], k_pos, cfg)
    kept = (fixed | chosen).sum(-1)
    if extra <= 0:
        assert torch.all(kept == n)
    else:
        assert torch.all(kept <= cfg.budget)  # now something is dropped; at most ⌈k/P⌉ pages of candidates
    assert torch.equal(fixed | chosen, page_mask_reference(query, key, 0.5, visible, k_pos[-1:], k_pos, cfg))
