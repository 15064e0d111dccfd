import pytest
import torch

from atlas_core.sparse.kept import (SparseConfig, all_candidates_fit, fixed_mask, kept_mask, kept_mask_reference,
                                   output_split)


def _problem(b=2, h=4, nq=12, nk=20, window=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, nq, nk, generator=gen)
    q_pos = torch.arange(nk - nq, nk)
    k_pos = torch.arange(nk)
    visible = k_pos[None, :] <= q_pos[:, None]
    if window is not None:  # a sliding-window layer's own mask
        visible &= k_pos[None, :] > q_pos[:, None] - window
    return scores, visible[None, None].expand(b, 1, nq, nk), q_pos, k_pos


@pytest.mark.parametrize("cfg", [SparseConfig(anchors=1, window=3, topk=4), SparseConfig(anchors=2, window=1, topk=0), SparseConfig(anchors=0, window=5, topk=30),
                                 SparseConfig(anchors=1, window=2, topk=3, head_average=True), SparseConfig(anchors=3, window=4, topk=2)])
@pytest.mark.parametrize("window", [None, 9])
def test_fast_kept_set_equals_reference(cfg, window):
    scores, visible, q_pos, k_pos = _problem(window=window)
    fixed, chosen = kept_mask(scores, visible, q_pos, k_pos, cfg)
    assert not (fixed & chosen).any()
    assert torch.equal(fixed | chosen, kept_mask_reference(scores, visible, q_pos, k_pos, cfg))


def test_kept_set_size_is_the_budget_or_everything_visible():
    cfg = SparseConfig(anchors=1, window=3, topk=4)
    scores, visible, q_pos, k_pos = _problem()
    fixed, chosen = kept_mask(scores, visible, q_pos, k_pos, cfg)
    n_visible = visible.sum(-1).expand(scores.shape[:3])
    assert torch.equal((fixed | chosen).sum(-1), n_visible.clamp(max=cfg.budget))
    assert not ((fixed | chosen) & ~visible).any()  # never a masked key


def test_fixed_part_known_answer():
    cfg = SparseConfig(anchors=2, window=3, topk=0)
    mask = fixed_mask(torch.tensor([6]), torch.arange(8), cfg)
    assert mask[0].tolist() == [True, True, False, False, True, True, True, False]


def test_head_average_keeps_one_set_per_layer():
    scores, visible, q_pos, k_pos = _problem()
    fixed, chosen = kept_mask(scores, visible, q_pos, k_pos, SparseConfig(anchors=1, window=2, topk=3, head_average=True))
    assert torch.equal(chosen, chosen[:, :1].expand_as(chosen))


def test_output_error_identity():
    gen = torch.Generator().manual_seed(1)
    scores, visible, q_pos, k_pos = _problem(h=3)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    value = torch.randn(2, 3, 20, 8, generator=gen)
    fixed, chosen = kept_mask(scores, visible, q_pos, k_pos, SparseConfig(anchors=1, window=2, topk=3))
    m, o_full, o_kept, o_rest = output_split(probs, value, fixed | chosen)
    assert (m > 0).any()
    torch.testing.assert_close(o_full - o_kept, m[..., None] * (o_rest - o_kept), atol=1e-5, rtol=1e-4)
    m, o_full, o_kept, _ = output_split(probs, value, visible.expand_as(probs))  # keep all: m = 0, no error
    assert torch.all(m.abs() < 1e-7)
    torch.testing.assert_close(o_full, o_kept)


@pytest.mark.parametrize("kwargs, message", [({"window": 0}, "window"), ({"topk": -1}, "topk"),
                                             ({"selector": "magic"}, "selector"), ({"page_size": 0}, "page_size"),
                                             ({"anchors": 1.5}, "anchors")])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseConfig(**kwargs)


def test_budget_and_pages():
    cfg = SparseConfig(anchors=1, window=64, topk=32, page_size=16)
    assert cfg.budget == 97 and cfg.n_pages == 2
    assert SparseConfig(topk=20, page_size=16).n_pages == 2


def _left_padded(pads=(6, 0, 3), h=2, n=20, seed=4):
    """Scores of a left-padded batch with per-row positions (pads at position 0, as generate() writes them)."""
    scores = torch.randn(len(pads), h, n, n, generator=torch.Generator().manual_seed(seed))
    real = torch.arange(n)[None, :] >= torch.tensor(pads)[:, None]  # (batch, key)
    pos = (real.long().cumsum(-1) - 1).clamp_min(0)
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    return scores, (causal[None] & real[:, None, :] & real[:, :, None])[:, None], pos, real


@pytest.mark.parametrize("cfg", [SparseConfig(anchors=1, window=3, topk=4), SparseConfig(anchors=2, window=2, topk=3, head_average=True), SparseConfig(anchors=0, window=4, topk=1)])
def test_kept_set_per_row_equals_reference_and_each_row_alone(cfg):
    scores, visible, pos, real = _left_padded()
    fixed, chosen = kept_mask(scores, visible, pos, pos, cfg)
    assert torch.equal(fixed | chosen, kept_mask_reference(scores, visible, pos, pos, cfg))
    for b in range(scores.shape[0]):
        r = real[b]
        solo = kept_mask_reference(scores[b : b + 1][..., r, :][..., r], visible[b : b + 1][..., r, :][..., r],
                                   pos[b, r], pos[b, r], cfg)
        assert torch.equal((fixed | chosen)[b][:, r][..., r], solo[0])  # anchors = the row's first real tokens


def test_fixed_mask_per_row_known_answer():
    cfg = SparseConfig(anchors=1, window=2, topk=0)
    q_pos, k_pos = torch.tensor([[3], [1]]), torch.tensor([[-2, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    mask = fixed_mask(q_pos, k_pos, cfg)
    assert mask.shape == (2, 1, 1, 6)
    assert mask[0, 0, 0].tolist() == [True, True, True, False, True, True]  # the negative (pad) slots pass; the mask hides them
    assert mask[1, 0, 0].tolist() == [True, True, False, False, False, False]


def test_keeps_all_is_the_budget_boundary():
    cfg = SparseConfig(anchors=1, window=4, topk=16)
    assert cfg.keeps_all(16) and not cfg.keeps_all(17)
    rest = torch.arange(20)[None, :] < torch.tensor([[15], [16], [17]])  # 15, 16, 17 candidates
    assert all_candidates_fit(rest, cfg)[:, 0].tolist() == [True, True, False]


def test_top_k_mask_breaks_ties_toward_the_earliest_entry():
    from atlas_core.sparse.kept import top_k_mask

    valid = torch.tensor([[False, True, True, True, True, True]])
    assert top_k_mask(torch.zeros(1, 6), valid, 3).tolist() == [[False, True, True, True, False, False]]
    assert top_k_mask(torch.tensor([[9.0, 1, 2, 2, 2, 0]]), valid, 3).tolist() == [[False, False, True, True, True, False]]
    assert top_k_mask(torch.tensor([[9.0, 1, 2, 2, 2, 0]]), valid, 2).tolist() == [[False, False, True, True, False, False]]
    assert top_k_mask(torch.zeros(1, 6), valid, 9).tolist() == valid.tolist()  # fewer valid entries than k: all
    values = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # no ties: the same set as topk
    expected = torch.zeros(3, 50, dtype=torch.bool).scatter_(-1, values.topk(7).indices, True)
    assert torch.equal(top_k_mask(values, torch.ones(1, 50, dtype=torch.bool), 7), expected)


def test_budget_rule_for_contexts_and_blocks():
    """One rule: a query drops a key once it sees more than a + W + k keys; a teacher-forced block needs a
    scored position there (max(a + W + k, sparse_from) + 2 tokens)."""
    cfg = SparseConfig(anchors=1, window=64, topk=32)
    assert cfg.keeps_every_key(97) and not cfg.keeps_every_key(98)
    assert cfg.keeps_all(97 - 1 - 64) and not cfg.keeps_all(98 - 1 - 64)  # the same rule on the candidates
    cfg.check_context(98, "prompt_tokens")
    with pytest.raises(ValueError, match=r"prompt_tokens \(97 tokens\) must exceed the budget a \+ W \+ k = 97"):
        cfg.check_context(97, "prompt_tokens")
    assert cfg.min_block_tokens() == 99
    cfg.check_block(99, "seq_len")
    with pytest.raises(ValueError, match=r"seq_len \(98 tokens\) is too short.*at least 99"):
        cfg.check_block(98, "seq_len")  # passed the chapter's pre-check before, then failed in the kernel
    assert SparseConfig(anchors=1, window=64, topk=32, sparse_from=200).min_block_tokens() == 202


def test_dense_layers_rule():
    SparseConfig(dense_layers=29).check_layers(30)
    with pytest.raises(ValueError, match="dense_layers .30. keeps every one of the 30 layers"):
        SparseConfig(dense_layers=30).check_layers(30)


def test_settings_are_keyword_only():
    with pytest.raises(TypeError):
        SparseConfig(1, 64, 32)  # noqa: the positional form is gone


def test_sparse_experiment_rules_and_lengths():
    from atlas_core.sparse.experiment import SparseExperiment

    exp = SparseExperiment(rule=SparseConfig(anchors=1, window=64, topk=32), windows=(16, 64), topks=(0, 32))
    rules = exp.rules()
    assert rules[0] == exp.rule and len(rules) == 1 + 3 + 4  # the defaults, the 3 other grid rules, 4 variants
    assert rules[-1] == SparseConfig(anchors=1, window=64, topk=128, selector="pages")
    exp.check_block(1 + 64 + 128 + 2, "seq_len")  # the page variant at 4k is the most demanding
    with pytest.raises(ValueError, match=r"seq_len \(194 tokens\).*at least 195"):
        exp.check_block(194, "seq_len")
    with pytest.raises(ValueError, match="prompt_tokens .193 tokens. must exceed the budget a . W . k = 193"):
        exp.check_prompt(193, "prompt_tokens")
    with pytest.raises(ValueError, match="windows needs at least one value"):
        SparseExperiment(rule=SparseConfig(), windows=(), topks=(1,))
    with pytest.raises(ValueError, match="window must be an integer"):
        SparseExperiment(rule=SparseConfig(), windows=(0,), topks=(1,))
