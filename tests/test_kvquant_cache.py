"""QuantizedKVCache: exact passthrough, chunked prefill, generate, sliding windows, bit accounting."""

import pytest
import torch
from transformers import DynamicCache

from atlas_core.kvquant import headq, quant, rope
from atlas_core.kvquant.cache import KVQuantConfig, QuantizedKVCache, expected_bits
from atlas_core.kvquant.headq import SideCode
from atlas_core.kvquant.quant import QuantSpec, dequantize, quantize
from atlas_core.extract import extract
from atlas_core.models import load_model

PER_TOKEN4 = KVQuantConfig(key=QuantSpec(bits=4, group=16, axis="token"), value=QuantSpec(bits=4, group=16, axis="token"))
KIVI2 = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=QuantSpec(bits=2, group=16, axis="token"), residual=3)


def _ids(n=20, batch=2, seed=0):
    return torch.randint(4, 260, (batch, n), generator=torch.Generator().manual_seed(seed))


def _decode(model, ids, cache):
    """Step-by-step logits (batch, token, vocab)."""
    return torch.cat([model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(ids.shape[1])], 1)


def _chunked(model, ids, cache, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(model(ids[:, start : start + n], past_key_values=cache, use_cache=True).logits)
        start += n
    return torch.cat(out, 1)


def _bases(lm, r=2, seed=0):
    return {l: headq.random_basis(lm.spec.n_kv_heads, lm.spec.d_head, r, seed + l) for l in range(lm.spec.n_layers)}


def test_passthrough_equals_dynamic_cache_exactly(toy_lm):
    model, ids = toy_lm.model, _ids()
    ref = _decode(model, ids, DynamicCache(config=model.config))
    assert torch.equal(_decode(model, ids, QuantizedKVCache(model.config, KVQuantConfig())), ref)


def test_four_bits_close_two_bits_farther(toy_lm):
    model, ids = toy_lm.model, _ids()
    ref = _decode(model, ids, DynamicCache(config=model.config))
    err4 = (_decode(model, ids, QuantizedKVCache(model.config, PER_TOKEN4)) - ref).abs().max()
    kv2 = KVQuantConfig(key=QuantSpec(bits=2, group=16, axis="token"), value=QuantSpec(bits=2, group=16, axis="token"))
    err2 = (_decode(model, ids, QuantizedKVCache(model.config, kv2)) - ref).abs().max()
    assert 0 < err4 < 0.2 and err4 < err2


def test_chunked_prefill_passthrough(toy_lm):
    model, ids = toy_lm.model, _ids()
    whole = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
    dyn = _chunked(model, ids, DynamicCache(config=model.config), [5, 7, 8])
    ours = _chunked(model, ids, QuantizedKVCache(model.config, KVQuantConfig()), [5, 7, 8])
    assert torch.equal(ours, dyn)
    assert torch.allclose(ours, whole, atol=1e-5)


def test_chunked_prefill_sees_the_quantized_past():
    """Chunk 2 logits = a DynamicCache whose past keys/values were quantized and dequantized."""
    lm = load_model("toy-llama")
    model, ids = lm.model, _ids()
    cache = QuantizedKVCache(model.config, PER_TOKEN4)
    _chunked(model, ids[:, :12], cache, [12])
    ours = model(ids[:, 12:], past_key_values=cache, use_cache=True).logits
    dyn = DynamicCache(config=model.config)
    model(ids[:, :12], past_key_values=dyn, use_cache=True)
    spec = PER_TOKEN4.key
    fake = [(dequantize(quantize(l.keys, spec), spec), dequantize(quantize(l.values, spec), spec)) for l in dyn.layers]
    ref = model(ids[:, 12:], past_key_values=DynamicCache(fake), use_cache=True).logits
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("kv", [PER_TOKEN4, KIVI2, KVQuantConfig(key=QuantSpec(bits=2, group=16, axis="token"))], ids=["per-token", "kivi", "k-only"])
def test_generate_runs(toy_lm, kv):
    model, ids = toy_lm.model, _ids(6)
    side = SideCode(bases=_bases(toy_lm), bits=4) if kv.key is not None else None
    out = model.generate(ids, past_key_values=QuantizedKVCache(model.config, kv, side), max_new_tokens=12, do_sample=False)
    assert out.shape == (2, 18)


def test_memo_matches_codes_and_values_untouched_by_side_codes():
    lm = load_model("toy-llama")
    model, ids = lm.model, _ids(24)
    kv = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=None, residual=2, memo=True)
    cache = QuantizedKVCache(model.config, kv, SideCode(bases=_bases(lm), bits=4))
    _decode(model, ids, cache)
    dyn = DynamicCache(config=model.config)
    _decode(model, ids, dyn)
    for ours, ref in zip(cache.layers, dyn.layers):
        keys, values = ours.dequantized_from_codes()
        assert torch.allclose(keys, torch.cat([ours.key_store.memo, ours.keys], -2), atol=1e-6)
        assert keys.shape == ref.keys.shape and ours.key_store.side_codes is not None
        assert ours.value_store.codes is None and ours.value_store.side_codes is None
    # layer 0's values do not depend on earlier attention: K-only keeps them exact
    assert torch.equal(cache.layers[0].dequantized_from_codes()[1], dyn.layers[0].values)


def test_sliding_layers_keep_only_the_window():
    lm = load_model("toy-gemma3")  # layer 0 slides over 8 tokens, layer 1 is global
    model, ids = lm.model, _ids(30)
    kv = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=QuantSpec(bits=2, group=16, axis="token"), residual=2)
    cache = QuantizedKVCache(model.config, kv)
    _decode(model, ids, cache)
    sliding, full = cache.layers
    held = len(sliding.key_store) + sliding.keys.shape[-2]
    assert 7 <= held < 7 + 4 and sliding.get_seq_length() == 30
    assert len(full.key_store) + full.keys.shape[-2] == 30


@pytest.mark.parametrize("rule", ["recent", "kivi"])
def test_measured_bits_match_accounting(rule):
    """Bits per element are measured from the bytes held; with whole-byte rows they equal the formula."""
    lm = load_model("toy-llama")  # d_head 16: 16·b code bits and 4·4 side-code bits are whole bytes
    model, ids = lm.model, _ids(23)
    kv = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=QuantSpec(bits=3, group=8, axis="token"), residual=4 if rule == "kivi" else 3, residual_rule=rule)
    side = SideCode(bases=_bases(lm, r=4), bits=4)
    cache = QuantizedKVCache(model.config, kv, side)
    _decode(model, ids, cache)
    layer = cache.layers[0]
    keys, values = (len(layer.key_store), layer.keys.shape[-2]), (len(layer.value_store), layer.values.shape[-2])
    assert (keys, values) == (((20, 3), (20, 3)) if rule == "recent" else ((20, 3), (19, 4)))
    expected = expected_bits(kv, side, lm.spec.d_head, keys, values, fp_bits=32)  # fp32 windows
    measured = cache.bits_per_element()
    assert measured["key"] == pytest.approx(expected["key"]) and measured["value"] == pytest.approx(expected["value"])
    # keys: 2 + 32/4 payload+stats, side (4·4 + 32)/16 = 3 bits; mixed with 3 fp32 tokens of 23
    assert expected["key"] == pytest.approx(((2 + 8 + 3) * 20 + 32 * 3) / 23)
    held = cache.held_bytes()
    batch_heads_d = 2 * lm.spec.n_kv_heads * lm.spec.d_head * lm.spec.n_layers
    assert (measured["key"] + measured["value"]) * 23 * batch_heads_d == pytest.approx(8 * (held["storage"] + held["window"]))


def test_memo_and_codes_give_identical_logits_and_packing_saves_memory(toy_lm):
    model, ids = toy_lm.model, _ids(20)
    kv = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=QuantSpec(bits=3, group=8, axis="token"), residual=2)
    side = SideCode(bases=_bases(toy_lm), bits=3)
    plain = QuantizedKVCache(model.config, kv, side)
    memo = QuantizedKVCache(model.config, KVQuantConfig(key=kv.key, value=kv.value, residual=kv.residual, memo=True), side)
    torch.testing.assert_close(_decode(model, ids, plain), _decode(model, ids, memo), atol=1e-5, rtol=0)  # einsum order only
    held, with_memo = plain.held_bytes(), memo.held_bytes()
    assert held["memo"] == 0 and with_memo["memo"] > 0 and held["storage"] == with_memo["storage"]
    dyn = DynamicCache(config=model.config)
    _decode(model, ids, dyn)
    fp_bytes = sum(l.keys.nbytes + l.values.nbytes for l in dyn.layers)  # fp32 keys and values
    stored = sum(len(l.key_store) for l in plain.layers) / sum(l.keys.shape[-2] for l in dyn.layers)
    assert held["storage"] + held["window"] < fp_bytes and held["storage"] < stored * fp_bytes / 2


@pytest.mark.parametrize("name", ["toy-llama", "toy-gemma3"])
def test_pre_rope_keys_are_quantized_before_the_rotation(name):
    """The cache's codes are the quantization of the model's own pre-RoPE keys (captured by extract)."""
    lm = load_model(name)
    ids = _ids(16, batch=1)
    kv = KVQuantConfig(key=QuantSpec(bits=4, group=8, axis="token"), value=None, pre_rope=True)
    with pytest.raises(ValueError, match="rotary"):
        QuantizedKVCache(lm.model.config, kv)
    cache = QuantizedKVCache(lm.model.config, kv, rotary=rope.rotary_tables(lm.model))
    lm.model(ids, past_key_values=cache, use_cache=True)
    acts = extract(lm, ids, layers=list(range(lm.spec.n_layers)), fields=("k_pre",), progress=False)
    for layer, a in acts.items():
        store = cache.layers[layer].key_store
        codes = quant.unpack(store.codes.codes, 4, lm.spec.d_head)[0]  # (kv_head, held token, d_head)
        expected = quantize(a.k_pre, kv.key).codes[:, -len(store) :]  # a sliding layer holds only its window
        assert (codes != expected).float().mean() < 0.01  # equal up to rare rounding-boundary flips
        keys, _ = cache.layers[layer].dequantized_from_codes()  # rotated back: close to the post-RoPE keys
        dyn = DynamicCache(config=lm.model.config)
        lm.model(ids, past_key_values=dyn, use_cache=True)
        half_step = 0.5 * (a.k_pre.amax() - a.k_pre.amin()) / 15  # rotation mixes two channels: ≤ √2 of it
        assert (keys - dyn.layers[layer].keys[..., -len(store) :, :]).abs().max() < 1.5 * half_step
