import pytest
import torch

from atlas_core.attention import attention_modules, intervene
from atlas_core.models import load_model
from atlas_core.sparse.attention import SPARSE, MassLog, positions, sparse_attention, sparse_attention_forward
from atlas_core.sparse.kept import SELECTORS, SparseConfig, kept_mask_reference

WIDE = SparseConfig(anchors=1, window=10_000, topk=0)  # keeps every visible key
NARROW = SparseConfig(anchors=1, window=3, topk=2)


def _tokens(n=40, seed=0):
    return torch.randint(4, 200, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_budget_is_bit_identical_to_eager(toy_lm):
    x = _tokens()
    toy_lm.model(x)  # warm-up: a backend may pick another matmul kernel on its first call
    ref = toy_lm.model(x).logits
    with sparse_attention(toy_lm.model, WIDE):
        assert torch.equal(toy_lm.model(x).logits, ref)
    with sparse_attention(toy_lm.model, SparseConfig(anchors=1, window=3, topk=2, dense_layers=toy_lm.spec.n_layers)):
        assert torch.equal(toy_lm.model(x).logits, ref)  # every layer dense
    with sparse_attention(toy_lm.model, NARROW):
        assert not torch.allclose(toy_lm.model(x).logits, ref, atol=1e-4)
    assert toy_lm.model.config._attn_implementation == "eager"  # restored


@torch.no_grad()
@pytest.mark.parametrize("selector", SELECTORS)
def test_decoding_through_the_cache_equals_the_full_forward(toy_lm, selector):
    """Sliding-window caches (gemma3, mistral) and GQA included: same kept sets one token at a time
    (the block selectors' means run over visible candidates only, so they hold under eviction too)."""
    if selector == "pages" and any(toy_lm.spec.windows):
        pytest.skip("a sliding cache evicts keys from the edge page, whose summary then differs (pages.py)")
    cfg = SparseConfig(anchors=1, window=3, topk=4, selector=selector, page_size=2)
    x = _tokens(30)[:1]
    with sparse_attention(toy_lm.model, cfg):
        full = toy_lm.model(x).logits[0]
        step = toy_lm.model(x[:, :12], use_cache=True)
        steps = [step.logits[0]]
        for t in range(12, 30):
            step = toy_lm.model(x[:, t : t + 1], past_key_values=step.past_key_values, use_cache=True)
            steps.append(step.logits[0])
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_generate_runs_with_sparse_attention(toy_lm):
    x = _tokens(20)[:1]
    with sparse_attention(toy_lm.model, NARROW):
        out = toy_lm.model.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, 28)


@torch.no_grad()
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "eager"])
def test_layer_output_equals_the_reference_kept_set(reference):
    lm = load_model("toy-llama")  # 4 query heads share 2 KV heads
    module = attention_modules(lm.model)[1]
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 15, 16, generator=gen), torch.randn(1, 2, 15, 16, generator=gen), torch.randn(1, 2, 15, 16, generator=gen)
    pos = torch.arange(15)
    visible = (pos[None, :] <= pos[:, None])[None, None]
    mask = torch.zeros(1, 1, 15, 15).masked_fill(~visible, torch.finfo(torch.float32).min)
    with intervene(lm.model, SPARSE, {1: (1, NARROW, None, reference)}):
        out, _ = sparse_attention_forward(module, q, k, v, mask, scaling=0.25)
    k_rep, v_rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ k_rep.transpose(-1, -2) * 0.25
    keep = kept_mask_reference(scores, visible, pos, pos, NARROW)
    expected = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v_rep  # (batch, head, query, d_head)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_mass_log_counts_only_queries_past_the_budget():
    lm = load_model("toy-qwen2")
    log = MassLog()
    with sparse_attention(lm.model, NARROW, log):
        lm.model(_tokens(30))
    means = log.means()
    assert means["fixed"].shape == (lm.spec.n_layers, lm.spec.n_heads)
    assert log.counts[0] == 2 * (30 - NARROW.budget)
    total = means["fixed"] + means["selected"] + means["discarded"]
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    assert log.discarded_values(0).shape == (lm.spec.n_heads, 2 * (30 - NARROW.budget))


def test_errors_are_clear():
    lm = load_model("toy-llama")
    with pytest.raises(ValueError, match="dense_layers"):
        with sparse_attention(lm.model, SparseConfig(dense_layers=5)):
            pass
    module = attention_modules(lm.model)[0]
    with pytest.raises(RuntimeError, match="sparse_attention"):
        sparse_attention_forward(module, torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 16), None)


@pytest.mark.slow
@torch.no_grad()
def test_real_model_full_budget_is_exact_and_sparse_differs(smollm2):
    from atlas_core.corpus import BlockSpec, token_blocks

    x = token_blocks(smollm2, BlockSpec(corpus="britannica", seq_len=256, n_blocks=1, split="eval"))
    smollm2.model(x)  # warm-up, as above
    ref = smollm2.model(x).logits
    with sparse_attention(smollm2.model, WIDE):
        assert torch.equal(smollm2.model(x).logits, ref)
    log = MassLog()
    with sparse_attention(smollm2.model, SparseConfig(anchors=1, window=16, topk=8), log):
        sparse = smollm2.model(x).logits
    assert (sparse - ref).abs().max() > 1e-3
    assert 0 < log.means()["discarded"].mean() < 0.5


PAD = 3  # the toy tokenizer's <pad>
# every selector, and the head-averaged variants: each must treat every row of a batch by its own positions
RULES = [SparseConfig(anchors=1, window=4, topk=4, selector=s, page_size=4) for s in SELECTORS] + [
    SparseConfig(anchors=1, window=4, topk=4, head_average=True), SparseConfig(anchors=1, window=4, topk=4, selector="pages", page_size=4, head_average=True)]


def _left_padded_batch():
    """Row 0: 6 pads then 14 tokens; row 1: 20 tokens; the mask and per-row positions generate() would make."""
    x = _tokens(20, seed=1)
    mask = torch.ones_like(x)
    mask[0, :6], x[0, :6] = 0, PAD
    return x, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _rule_id(cfg):
    return cfg.selector + ("-head_average" if cfg.head_average else "")


@torch.no_grad()
@pytest.mark.parametrize("cfg", RULES, ids=_rule_id)
def test_left_padded_batch_equals_each_row_alone(toy_lm, cfg):
    """Teacher forced and greedy through the KV cache: kept sets per row (the row's anchors and windows)."""
    model, (x, mask, pos) = toy_lm.model, _left_padded_batch()
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=PAD)
    with sparse_attention(model, cfg):
        both = model(x, attention_mask=mask, position_ids=pos).logits
        gen_both = model.generate(x, attention_mask=mask, **greedy)[:, 20:]
        for row, real in ((0, slice(6, None)), (1, slice(None))):
            alone = x[row : row + 1, real]
            torch.testing.assert_close(both[row, real], model(alone).logits[0], atol=1e-5, rtol=0)
            assert torch.equal(gen_both[row], model.generate(alone, **greedy)[0, alone.shape[1]:])


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
def test_mass_log_counts_each_row_by_its_positions_and_skips_pads(padding):
    lm = load_model("toy-qwen2")
    x, mask, pos = _left_padded_batch()
    if padding == "right":  # row 0's 14 tokens first, then 6 pads at positions 14..19 (position_ids left to the model)
        x[0], mask[0] = x[0].roll(-6), mask[0].roll(-6)
        pos = None
    batch, solo = MassLog(), MassLog()
    with sparse_attention(lm.model, NARROW, batch):
        lm.model(x, attention_mask=mask, position_ids=pos)
    with sparse_attention(lm.model, NARROW, solo):
        lm.model(x[:1, mask[0].bool()])
        lm.model(x[1:])
    assert batch.counts[0] == (14 - NARROW.budget) + (20 - NARROW.budget)
    for layer in solo.sums:
        assert batch.counts[layer] == solo.counts[layer]
        for name, total in solo.sums[layer].items():
            torch.testing.assert_close(batch.sums[layer][name], total, atol=1e-6, rtol=1e-6)


def test_positions_are_per_row():
    q_pos, k_pos = positions(torch.tensor([[14], [20]]), 1, 21, 2)  # a decode step, row 0 left-padded by 6
    assert q_pos.tolist() == [[14], [20]]
    assert k_pos[0].tolist() == list(range(-6, 15)) and k_pos[1].tolist() == list(range(21))
    q_pos, k_pos = positions(None, 3, 5, 2)
    assert q_pos.tolist() == [[2, 3, 4]] * 2 and k_pos.tolist() == [list(range(5))] * 2
    with pytest.raises(ValueError, match="position_ids"):
        positions(torch.zeros(3, 2, 4, dtype=torch.long), 4, 4, 2)  # 3-D (multimodal) positions


@torch.no_grad()
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("rule", [dict(anchors=1, window=4, topk=16, page_size=16),  # the case: 21 keys
                                  dict(anchors=3, window=2, topk=6, page_size=4)])  # 6 candidates over 3 pages
def test_no_key_is_dropped_up_to_the_budget(toy_lm, selector, rule):
    """Every position that sees at most a + W + k keys (budget − 1, budget) gets dense logits, in every layer."""
    cfg = SparseConfig(selector=selector, **rule)
    x = _tokens(cfg.budget + 8)[:1]
    dense = toy_lm.model(x).logits[0]
    with sparse_attention(toy_lm.model, cfg):
        sparse = toy_lm.model(x).logits[0]
    torch.testing.assert_close(sparse[: cfg.budget], dense[: cfg.budget], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("selector", SELECTORS)
def test_sliding_window_layers_never_exceed_a_budget_they_fit(selector):
    """toy-mistral's layers see 8 keys; with a + W + k = 9 no key may be dropped at any position, although
    the 6 candidates of a window start at every offset of the 4-key pages (and blocks)."""
    lm = load_model("toy-mistral")
    assert lm.model.config.sliding_window == 8
    x = _tokens(40)[:1]
    dense = lm.model(x).logits
    with sparse_attention(lm.model, SparseConfig(anchors=1, window=2, topk=6, selector=selector, page_size=4)):
        torch.testing.assert_close(lm.model(x).logits, dense, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_static_cache_is_refused():
    """A pre-allocated cache's keys do not end at the newest query: the positions would be wrong (0.19 off)."""
    from transformers import StaticCache

    lm = load_model("toy-llama")
    with sparse_attention(lm.model, NARROW), pytest.raises(ValueError, match="StaticCache"):
        lm.model(_tokens(20)[:1], past_key_values=StaticCache(config=lm.model.config, max_cache_len=64), use_cache=True)


@torch.no_grad()
@pytest.mark.parametrize("cfg", RULES + [SparseConfig(anchors=1, window=4, topk=4, sparse_from=12),
                                         SparseConfig(anchors=1, window=4, topk=4, dense_layers=1)], ids=_rule_id)
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "query-by-query"])
def test_fast_path_equals_the_eager_reference(toy_lm, cfg, chunk_bytes, monkeypatch):
    """kept_attention on the selection's own scores = the model's eager function under the narrowed mask:
    logits, mass logs (in query order), a left-padded batch (pad rows keep nothing and stay finite) and cached
    decoding, with every query in one chunk or each in its own."""
    import atlas_core.sparse.attention as sparse_attention_module

    if chunk_bytes is not None:
        monkeypatch.setattr(sparse_attention_module, "CHUNK_BYTES", chunk_bytes)
    model, (x, mask, pos) = toy_lm.model, _left_padded_batch()
    out, logs = {}, {}
    for reference in (True, False):
        logs[reference] = MassLog()
        with sparse_attention(model, cfg, logs[reference], reference=reference):
            padded = model(x, attention_mask=mask, position_ids=pos).logits
            step = model(x[1:, :12], use_cache=True)
            step = model(x[1:, 12:], past_key_values=step.past_key_values, use_cache=True)
            out[reference] = (padded, step.logits)
    for fast, ref in zip(out[False], out[True]):
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    for name, value in logs[True].means().items():
        torch.testing.assert_close(logs[False].means()[name], value, atol=1e-6, rtol=0)
    for layer in logs[True].discarded:  # per query, in the same order
        torch.testing.assert_close(logs[False].discarded_values(layer), logs[True].discarded_values(layer), atol=1e-6, rtol=0)


def test_query_chunks_cover_every_query_once_within_the_byte_budget():
    from atlas_core.sparse.attention import CHUNK_BYTES, query_chunks

    chunks = query_chunks(2, 9, 1024, 1024)
    assert [i for c in chunks for i in range(1024)[c]] == list(range(1024))
    assert all(4 * 2 * 9 * (c.stop - c.start) * 1024 <= CHUNK_BYTES for c in chunks) and len(chunks) > 1
    assert query_chunks(1, 9, 1, 100_000) == [slice(0, 1)]  # one decode query is one chunk, whatever the cache
