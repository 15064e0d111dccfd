"""The revised Condensate selector (anchor + window + r blocks by q · mean key): rule, reference, model."""

import pytest
import torch

from atlas_core.attention import attention_modules, intervene
from atlas_core.sparse.attention import SPARSE
from atlas_core.models import load_model
from atlas_core.sparse.attention import sparse_attention, sparse_attention_forward
from atlas_core.sparse.blocks import BLOCK_SELECTORS, block_ids, block_mask, block_mask_reference, block_rule
from atlas_core.sparse.fidelity import (agreement, clopper_pearson, greedy_survival, survival_agreement,
                                       survival_summary)
from atlas_core.sparse.kept import SparseConfig


def _setup(n=70, h=4, kv=2, d=8, nq=None, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    nq = nq or n
    query = torch.randn(batch, h, nq, d, generator=gen)  # (batch, head, query, d_head)
    key = torch.randn(batch, kv, n, d, generator=gen)  # (batch, kv_head, key, d_head)
    k_pos = torch.arange(n)
    q_pos = k_pos[n - nq:]
    visible = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, query, key)
    return query, key, visible, q_pos, k_pos


def _kept(query, key, visible, q_pos, k_pos, cfg):
    fixed, chosen = block_mask(query, key, visible, q_pos, k_pos, cfg)
    assert not (fixed & chosen).any() and not (chosen & ~visible).any()
    return fixed | chosen


@pytest.mark.parametrize("support, r", [(97, 2), (193, 8), (385, 20), (769, 44)])
def test_the_revision_supports_map_to_its_block_counts(support, r):
    cfg = block_rule(support)
    assert (cfg.topk, cfg.page_size, cfg.n_pages, cfg.budget) == (16 * r, 16, r, support)
    assert cfg.selector == "blocks-mean-kv" and block_rule(support, selector="blocks-mean").selector == "blocks-mean"


def test_blocks_tile_the_candidates_from_the_first_position_after_the_anchors():
    cfg = block_rule(97)
    pos = torch.arange(0, 60)
    blk = block_ids(pos, cfg)
    assert blk[1:17].eq(0).all() and blk[17:33].eq(1).all() and blk[33:49].eq(2).all()
    shifted = block_ids(pos + 40, cfg)  # a cache that starts later: same partition of positions
    assert torch.equal(shifted[:-1] == shifted[1:], block_ids(torch.arange(40, 100), cfg)[:-1] == block_ids(torch.arange(40, 100), cfg)[1:])
    assert torch.equal(block_ids(torch.stack([pos, pos + 40]), cfg)[1], shifted)


CONFIGS = [
    SparseConfig(anchors=1, window=8, topk=12, selector="blocks-mean", page_size=4),
    SparseConfig(anchors=1, window=8, topk=12, selector="blocks-mean-kv", page_size=4),
    SparseConfig(anchors=2, window=5, topk=9, selector="blocks-mean", page_size=3),  # ⌈9/3⌉ = 3 blocks
    SparseConfig(anchors=0, window=3, topk=10, selector="blocks-mean-kv", page_size=4),  # ⌈10/4⌉ = 3 blocks
    SparseConfig(anchors=1, window=4, topk=8, selector="blocks-mean", page_size=4, head_average=True),
    SparseConfig(anchors=1, window=4, topk=0, selector="blocks-mean"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.selector}-a{c.anchors}W{c.window}k{c.topk}P{c.page_size}{'-avg' if c.head_average else ''}")
def test_vectorised_equals_the_reference(cfg):
    query, key, visible, q_pos, k_pos = _setup(batch=2)
    assert torch.equal(_kept(query, key, visible, q_pos, k_pos, cfg), block_mask_reference(query, key, visible, q_pos, k_pos, cfg))


@pytest.mark.parametrize("selector", BLOCK_SELECTORS)
def test_vectorised_equals_the_reference_for_sliding_windows_and_caches(selector):
    cfg = SparseConfig(anchors=1, window=6, topk=10, selector=selector, page_size=4)
    query, key, _, _, _ = _setup(n=50, nq=7, seed=1, batch=2)
    k_pos = torch.arange(50) + 33  # a cache that no longer holds the first 33 positions
    q_pos = k_pos[-7:]
    sliding = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - 29)  # a 29-key sliding window
    assert torch.equal(_kept(query, key, sliding[None, None], q_pos, k_pos, cfg),
                       block_mask_reference(query, key, sliding[None, None], q_pos, k_pos, cfg))


@pytest.mark.parametrize("selector", BLOCK_SELECTORS)
def test_vectorised_equals_the_reference_for_per_row_positions(selector):
    cfg = SparseConfig(anchors=1, window=6, topk=10, selector=selector, page_size=4)
    query, key, _, _, _ = _setup(n=50, nq=7, seed=1, batch=2)
    k_pos = torch.arange(50) + 33
    q_pos = k_pos[-7:]
    rows_q = torch.stack([q_pos, q_pos - 5])  # (batch, query): row 1 is 5 positions behind (left padding)
    rows_k = torch.stack([k_pos, k_pos - 5])
    visible = (rows_k[:, None, :] <= rows_q[:, :, None])[:, None]  # (batch, 1, query, key)
    assert torch.equal(_kept(query, key, visible, rows_q, rows_k, cfg),
                       block_mask_reference(query, key, visible, rows_q, rows_k, cfg))


def test_kv_variant_shares_each_choice_across_its_query_group():
    query, key, visible, q_pos, k_pos = _setup(n=90, h=6, kv=2)
    kv = _kept(query, key, visible, q_pos, k_pos, SparseConfig(anchors=1, window=8, topk=16, selector="blocks-mean-kv", page_size=4))
    own = _kept(query, key, visible, q_pos, k_pos, SparseConfig(anchors=1, window=8, topk=16, selector="blocks-mean", page_size=4))
    assert torch.equal(kv[:, 0], kv[:, 2]) and torch.equal(kv[:, 3], kv[:, 5])
    assert not torch.equal(kv[:, 0], kv[:, 3])
    assert not torch.equal(own[:, 0], own[:, 1])  # per query head, heads of one group choose differently


def test_a_planted_block_is_chosen_and_kept_whole():
    query, key, visible, q_pos, k_pos = _setup(n=200, h=2, kv=1, nq=1, seed=3)  # candidates 1..135
    key = 0.01 * key
    key[0, 0, 33:49] = 3 * query[0, :, 0].mean(0) / query[0, :, 0].mean(0).norm()  # block 2 of (p − 1) // 16
    for selector in BLOCK_SELECTORS:
        fixed, chosen = block_mask(query, key, visible, q_pos, k_pos, block_rule(97, selector=selector))
        assert chosen[0, :, 0, 33:49].all()
        assert chosen.sum(-1).max() <= 32


@pytest.mark.parametrize("selector", BLOCK_SELECTORS)
def test_budget_boundary_keeps_every_visible_key(selector):
    """Candidates that straddle one block more than the budget holds are all kept when they fit in k."""
    cfg = SparseConfig(anchors=1, window=4, topk=16, selector=selector, page_size=8)  # 2 blocks of 8
    query, key, _, _, _ = _setup(n=60, nq=1, seed=4)
    k_pos = torch.arange(60)
    q_pos = k_pos[-1:]
    visible = (k_pos >= 40)[None, None, None]  # 20 keys: 4 in the window, 16 candidates at 40..55
    assert block_ids(k_pos, cfg)[[40, 41, 55]].unique().numel() == 3  # they straddle 3 blocks of (p − 1) // 8
    assert torch.equal(_kept(query, key, visible, q_pos, k_pos, cfg), visible.expand(1, 4, 1, 60))
    one_more = (k_pos >= 39)[None, None, None]  # 17 candidates: the rule drops some
    assert _kept(query, key, one_more, q_pos, k_pos, cfg).sum(-1).max() < 21


def _layer_output(model, cfg, q, k, v, visible):
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    with intervene(model, SPARSE, {1: (1, cfg, None, False)}):
        return sparse_attention_forward(attention_modules(model)[1], q, k, v, mask, scaling=0.25)[0]


@torch.no_grad()
@pytest.mark.parametrize("selector", BLOCK_SELECTORS)
def test_layer_output_equals_the_reference_kept_set_and_dense_at_the_boundary(selector):
    lm = load_model("toy-llama")  # 4 query heads share 2 KV heads
    module = attention_modules(lm.model)[1]
    gen = torch.Generator().manual_seed(5)
    n = 40
    q, k, v = torch.randn(1, 4, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
    pos = torch.arange(n)
    visible = (pos[None, :] <= pos[:, None])[None, None]
    cfg = SparseConfig(anchors=1, window=3, topk=8, selector=selector, page_size=4)
    k_rep, v_rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ k_rep.transpose(-1, -2) * 0.25
    keep = block_mask_reference(q, k, visible, pos, pos, cfg)
    expected = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v_rep  # (batch, head, query, d_head)
    torch.testing.assert_close(_layer_output(lm.model, cfg, q, k, v, visible), expected.transpose(1, 2), atol=1e-6, rtol=1e-5)
    # At the boundary (a + W + k = 12 visible keys: every query up to position 11) the layer is dense.
    dense = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v_rep).transpose(1, 2)
    torch.testing.assert_close(_layer_output(lm.model, cfg, q, k, v, visible)[:, :12], dense[:, :12], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(_layer_output(lm.model, cfg, q, k, v, visible)[:, 12:], dense[:, 12:], atol=1e-4)


def _tokens(n=40, seed=0):
    return torch.randint(4, 200, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("selector", BLOCK_SELECTORS)
def test_budget_covering_everything_is_bit_identical_to_eager(toy_lm, selector):
    x = _tokens()
    toy_lm.model(x)  # warm-up: a backend may pick another matmul kernel on its first call
    ref = toy_lm.model(x).logits
    covering = SparseConfig(anchors=1, window=3, topk=40, selector=selector, page_size=4)  # k ≥ every candidate
    with sparse_attention(toy_lm.model, covering):
        assert torch.equal(toy_lm.model(x).logits, ref)
    with sparse_attention(toy_lm.model, SparseConfig(anchors=1, window=3, topk=4, selector=selector, page_size=2)):
        assert not torch.allclose(toy_lm.model(x).logits, ref, atol=1e-4)


# --- greedy survival (the revision's protocol) ----------------------------------------------------------


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """greedy_survival caches dense continuations: a fresh directory per test."""
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


@torch.no_grad()
def test_survival_is_one_for_dense_and_for_a_rule_that_keeps_everything(toy_lm):
    prompts = _tokens(24, seed=7)
    rules = {"dense": None, "covering": SparseConfig(anchors=1, window=3, topk=10_000, selector="blocks-mean-kv", page_size=4),
             "covering exact": SparseConfig(anchors=1, window=3, topk=10_000)}
    runs = greedy_survival(toy_lm, prompts, rules, n_new=10)
    for name in rules:
        assert runs[name] == [None, None]
        assert survival_summary(runs[name], 10)["identical"] == 1.0


@torch.no_grad()
def test_stopping_at_the_first_divergence_equals_decoding_to_the_end():
    """The early stop against plain free-running decoding of both, compared with ``agreement``."""
    import contextlib
    import copy

    lm = load_model("toy-qwen2")
    prompts = _tokens(30, seed=8)
    narrow = SparseConfig(anchors=1, window=2, topk=2, selector="blocks-mean", page_size=2)
    runs = greedy_survival(lm, prompts, {"narrow": narrow}, n_new=16)["narrow"]
    expected = []
    for prompt in prompts:
        prefill = lm.model(prompt[None], use_cache=True)
        tokens = {}
        for name, cfg in (("dense", None), ("sparse", narrow)):
            cache, out = copy.deepcopy(prefill.past_key_values), [prefill.logits[0, -1].argmax()]
            with sparse_attention(lm.model, cfg) if cfg else contextlib.nullcontext():
                for _ in range(15):
                    step = lm.model(out[-1].view(1, 1), past_key_values=cache, use_cache=True)
                    cache = step.past_key_values
                    out.append(step.logits[0, -1].argmax())
            tokens[name] = torch.stack(out)
        expected.append(agreement(tokens["dense"], tokens["sparse"])["first_divergence"])
    assert runs == expected
    assert any(d is not None for d in runs)  # the narrow rule does diverge, so the comparison means something


def test_survival_summary_known_answer():
    s = survival_summary([None, 3, 5, None, 7], n_new=128, seed=1)
    assert (s["prompts"], s["runs"], s["median"], s["identical"], s["max"]) == (5, 5, 7.0, 0.4, 128)
    assert s["median_ci"][0] <= 7 <= s["median_ci"][1] and s["identical_ci"][0] <= 0.4 <= s["identical_ci"][1]
    assert s == survival_summary([None, 3, 5, None, 7], n_new=128, seed=1)
    # a share is a count: one run per prompt gets the exact interval, never a zero-width one (0 of 2 is not [0, 0])
    assert s["identical_ci"] == pytest.approx(clopper_pearson(2, 5))
    assert survival_summary([2, 4], 128)["identical_ci"] == pytest.approx((0.0, clopper_pearson(0, 2)[1]))
    assert survival_summary([2, 4], 128)["identical_ci"][1] > 0.8
    pooled = survival_summary([[2, None], [4, 5], [None, None]], 128)  # runs share prompts: resample prompts
    assert pooled["identical"] == 0.5 and pooled["identical_ci"] != pytest.approx(clopper_pearson(3, 6))
    none = survival_summary([[2, 3], [4, 5], [6, 7]], 128)  # none identical: exact over the 3 prompts, not [0, 0]
    assert none["identical_ci"] == pytest.approx(clopper_pearson(0, 3))
    with pytest.raises(ValueError, match="at least one"):
        survival_summary([])
    with pytest.raises(ValueError, match="same number"):
        survival_summary([[1, 2], [3]])


def test_survival_summary_resamples_prompts_with_all_their_runs():
    """Two prompts, one surviving every rule and one diverging at once: a resample holds 0, 3 or 6 survivors."""
    s = survival_summary([[None, None, None], [1, 1, 1]], n_new=16, n_resamples=400)
    assert (s["prompts"], s["runs"], s["identical"], s["median"]) == (2, 6, 0.5, 8.5)
    assert s["identical_ci"] == (0.0, 1.0)  # a run-level bootstrap would rarely reach 0 or 1 with 6 runs
    flat = survival_summary([None, None, None, 1, 1, 1], n_new=16, n_resamples=400)
    assert flat["identical_ci"][0] > 0 and flat["identical_ci"][1] < 1
    with pytest.raises(ValueError, match="n_new"):
        greedy_survival(load_model("toy-llama"), _tokens(8), {"dense": None}, n_new=1)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="a \\+ W \\+ P·r"):
        block_rule(100)
    with pytest.raises(ValueError, match="selector"):
        block_rule(97, selector="pages")
    with pytest.raises(ValueError, match="block selector"):
        block_mask(*_setup(n=10)[:5], SparseConfig())
    with pytest.raises(ValueError, match="blocks-mean"):
        SparseConfig(selector="blocks")


@pytest.mark.slow
@torch.no_grad()
def test_real_model_covering_budget_is_exact_and_the_revision_rule_differs(smollm2):
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.sparse.attention import MassLog

    x = token_blocks(smollm2, BlockSpec(corpus="britannica", seq_len=256, n_blocks=1, split="eval"))
    smollm2.model(x)  # warm-up, as above
    ref = smollm2.model(x).logits
    with sparse_attention(smollm2.model, block_rule(257)):  # 1 + 64 + 192 candidates: covers the block
        assert torch.equal(smollm2.model(x).logits, ref)
    log = MassLog()
    with sparse_attention(smollm2.model, block_rule(97), log):
        sparse = smollm2.model(x).logits
    assert (sparse - ref).abs().max() > 1e-3
    assert 0 < log.means()["discarded"].mean() < 0.5
    runs = greedy_survival(smollm2, x[:, :160], {"dense": None, "covering": block_rule(257)}, n_new=8)
    assert runs == {"dense": [None], "covering": [None]}


def test_clopper_pearson_known_answers():
    from scipy.stats import binomtest

    assert clopper_pearson(0, 15) == (0.0, pytest.approx(0.2180, abs=1e-4))  # 1 − 0.025^(1/15)
    assert clopper_pearson(15, 15) == (pytest.approx(0.7820, abs=1e-4), 1.0)
    ci = binomtest(7, 20).proportion_ci(0.95, method="exact")
    assert clopper_pearson(7, 20) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    with pytest.raises(ValueError, match="0 ≤ k ≤ n"):
        clopper_pearson(3, 2)


def test_survival_agreement_names_each_statistic_whose_intervals_do_not_meet():
    theirs = [3, 6, 2, 9, 4, 6, 5, 7, 3, 6, 2, 8, 5, 4, 6]  # 0 of 15 identical, median 5
    same = survival_summary([d if d < 128 else None for d in theirs], 128)
    assert survival_agreement(same, 128, theirs, 128) == []
    late = survival_summary([None] * 12 + [40] * 8, 128)  # 60% identical, median 128
    gaps = survival_agreement(late, 128, theirs, 128)
    assert gaps == ["60% [36%, 81%] of runs stay identical through 128 tokens (the revision: 0 of 15, 0% [0%, 22%])",
                    "the median first divergence is 128 [40, 128] (the revision: 5 [3, 6])"]  # each with its interval
    later = survival_summary([40] * 20, 128)  # none identical (agrees), but every run diverges late
    assert survival_agreement(later, 128, theirs, 128) == ["the median first divergence is 40 (the revision: 5 [3, 6])"]
