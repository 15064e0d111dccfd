"""Real keys for the decode benchmark (``atlas_core.sparse.realkeys``): chunked capture against plain passes."""

import pytest
import torch

from atlas_core.attention import attention_modules, kv_group
from atlas_core.corpus import BlockSpec, CorpusError, token_blocks
from atlas_core.models import describe, load_model
from atlas_core.sparse.realkeys import capture, global_layer, real_keys

# GQA; query_pre_attn_scalar, q/k norms and sliding layers; head_dim × heads ≠ d_model; partial RoPE
FAMILIES = ("llama", "gemma3", "qwen3", "phi3")


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 260, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _plain_pass(lm, prompt: torch.Tensor, layer: int):
    """One unchunked eager forward: the layer's cache (keys, values (kv_head, n, d_head)) and its attention
    output before the output projection (n, head * d_head)."""
    seen = {}
    o_proj = attention_modules(lm.model)[layer].o_proj

    def keep(mod, args, out):  # returns None: the output is left as it is
        seen["o"] = args[0][0]

    hook = o_proj.register_forward_hook(keep)
    try:
        out = lm.model(prompt[None], use_cache=True)
    finally:
        hook.remove()
    held = out.past_key_values.layers[layer]
    return held.keys[0], held.values[0], seen["o"]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_capture_matches_an_unchunked_forward(family):
    lm = load_model(f"toy-{family}")
    layer = global_layer(lm.spec)
    prompt = _prompt(100)
    keys, values, _ = _plain_pass(lm, prompt, layer)
    got = capture(lm.model, prompt, layer, (0, 15, 16, 99), chunk=16)  # 15/16 straddle a chunk boundary
    torch.testing.assert_close(got["keys"], keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["values"], values, atol=1e-5, rtol=0)
    assert sorted(got["queries"]) == [0, 15, 16, 99]
    assert got["scaling"] == attention_modules(lm.model)[layer].scaling
    assert lm.model.config._attn_implementation == "eager"  # restored after the capture


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_queries_reproduce_the_layers_attention_output(family):
    """softmax(q Kᵀ · scaling) V from the captured q, K, V equals the layer's output in a plain eager pass."""
    lm = load_model(f"toy-{family}")
    layer = global_layer(lm.spec)
    prompt = _prompt(90, seed=1)
    _, _, attn_out = _plain_pass(lm, prompt, layer)
    wanted = (0, 31, 32, 89)
    got = capture(lm.model, prompt, layer, wanted, chunk=32)
    group = kv_group(lm.spec.n_heads, lm.spec.n_kv_heads)
    for p in wanted:
        q = got["queries"][p]  # (head, d_head)
        scores = torch.einsum("hd,hnd->hn", q, got["keys"][group, : p + 1]) * got["scaling"]  # (head, p + 1)
        out = torch.einsum("hn,hnd->hd", scores.softmax(-1), got["values"][group, : p + 1])  # (head, d_head)
        torch.testing.assert_close(out.flatten(), attn_out[p], atol=1e-5, rtol=0)


def test_real_keys_returns_each_contexts_last_queries_and_caches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    corpus = tmp_path / "text.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)  # 1,800 bytes: 7 blocks of 256
    rk = real_keys("toy-gemma3", (64, 256, 100), corpus=str(corpus), n_query=4)
    lm = load_model("toy-gemma3")
    prompt = token_blocks(lm, BlockSpec(corpus=str(corpus), seq_len=256, n_blocks=1))[0]  # the text's first block
    assert lm.tokenizer.decode(prompt, skip_special_tokens=True).startswith("The quick brown fox")
    keys, values, _ = _plain_pass(lm, prompt, rk.layer)
    assert (rk.model, rk.layer, rk.corpus, rk.softcap) == ("toy-gemma3", 1, str(corpus), None)
    torch.testing.assert_close(rk.keys, keys, atol=1e-5, rtol=0)
    assert sorted(rk.queries) == [64, 100, 256] and all(q.shape == (4, 4, 16) for q in rk.queries.values())
    plain = capture(lm.model, prompt, rk.layer, (60, 99, 255))
    torch.testing.assert_close(rk.queries[64][0], plain["queries"][60], atol=1e-5, rtol=0)
    torch.testing.assert_close(rk.queries[100][-1], plain["queries"][99], atol=1e-5, rtol=0)
    torch.testing.assert_close(rk.queries[256][-1], plain["queries"][255], atol=1e-5, rtol=0)

    def no_load(*args, **kwargs):
        raise AssertionError("the cached result should have been read")

    monkeypatch.setattr("atlas_core.sparse.realkeys.load_model", no_load)
    again = real_keys("toy-gemma3", (256, 64, 100), corpus=str(corpus), n_query=4)  # same set, another order
    assert torch.equal(again.keys, rk.keys) and all(torch.equal(again.queries[c], rk.queries[c]) for c in rk.queries)


def test_default_layer_is_the_last_global_layer_and_sliding_layers_are_refused():
    spec = describe("toy-gemma3")  # layers: sliding, full
    assert spec.windows[global_layer(spec)] is None and global_layer(spec) == 1
    assert global_layer(spec, -1) == 1
    with pytest.raises(ValueError, match="layer 0 of toy-gemma3 is a sliding-window layer"):
        real_keys("toy-gemma3", (64,), layer=0)
    with pytest.raises(ValueError, match="no full-attention layer"):
        real_keys("toy-mistral", (64,))  # every layer slides
    with pytest.raises(ValueError, match="layer 5 out of range"):
        real_keys("toy-llama", (64,), layer=5)


@pytest.mark.parametrize("contexts, n_query, message", [
    ((64, 513), 8, "longer than the 512 positions"),
    ((4,), 8, "context 4 is shorter than n_query=8"),
    ((64.0,), 8, "context 64.0 is not an integer"),
    ((True,), 1, "context True is not an integer"),
    ((), 8, "non-empty sequence"),
    (64, 8, "non-empty sequence"),
    ((64,), 0, "n_query must be a positive integer"),
])
def test_bad_requests_are_refused_before_any_model_loads(contexts, n_query, message, monkeypatch):
    monkeypatch.setattr("atlas_core.sparse.realkeys.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=message):
        real_keys("toy-llama", contexts, n_query=n_query)


def test_a_corpus_too_short_for_the_prompt_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("atlas_core.sparse.realkeys.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    short = tmp_path / "short.txt"
    short.write_text("Too short for a 400-token prompt. " * 5)
    with pytest.raises(CorpusError, match="short.txt"):
        real_keys("toy-llama", (400,), corpus=str(short))
    with pytest.raises(CorpusError, match="unknown corpus 'nonesuch'"):
        real_keys("toy-llama", (64,), corpus="nonesuch")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])  # the benchmark's two models
def test_chunked_capture_matches_a_plain_pass_on_real_models_at_fp32_tolerance(name):
    """A real model (Gemma 3 with sliding layers, Qwen2.5 with GQA and biases): 2,048 held-out tokens in chunks
    of 512 against one eager pass."""
    lm = load_model(name)
    layer = global_layer(lm.spec)
    prompt = token_blocks(lm, BlockSpec(seq_len=2048, n_blocks=1))[0]
    keys, values, attn_out = _plain_pass(lm, prompt, layer)
    got = capture(lm.model, prompt, layer, (511, 512, 2047), chunk=512)
    torch.testing.assert_close(got["keys"], keys, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got["values"], values, atol=1e-3, rtol=1e-4)
    group = kv_group(lm.spec.n_heads, lm.spec.n_kv_heads)
    for p in (511, 512, 2047):
        scores = torch.einsum("hd,hnd->hn", got["queries"][p], got["keys"][group, : p + 1]) * got["scaling"]
        out = torch.einsum("hn,hnd->hd", scores.softmax(-1), got["values"][group, : p + 1])  # (head, d_head)
        torch.testing.assert_close(out.flatten(), attn_out[p], atol=1e-3, rtol=1e-4)
