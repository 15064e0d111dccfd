"""The fused low-bit decode kernel equals its plain torch reference, and a fused cache decodes as the plain one."""

import pytest
import torch

from atlas_core.kvquant import fused, quant
from atlas_core.kvquant.headq import encode_side
from atlas_core.kvquant.quant import QuantSpec

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")


def _state(batch, kv_heads, d, n_key, key_window, value_window, bits, side=False, key_axis="channel",
           value_axis="token", group=8, seed=0):
    """A DecodeKV over T = n_key + key_window tokens: random keys (two outlier channels) and values."""
    gen = torch.Generator().manual_seed(seed)
    T = n_key + key_window
    k = torch.randn(batch, kv_heads, T, d, generator=gen)
    k[..., :2] *= 8  # outlier channels, as real keys have
    v = torch.randn(batch, kv_heads, T, d, generator=gen)
    n_value = T - value_window
    key_spec, value_spec = QuantSpec(bits=bits, group=group, axis=key_axis), QuantSpec(bits=bits, group=group, axis=value_axis)
    kq = quant.quantize(k[..., :n_key, :], key_spec)
    vq = quant.quantize(v[..., :n_value, :], value_spec)
    side_codes = basis = side_spec = None
    if side and n_key:
        basis = torch.linalg.qr(torch.randn(kv_heads, d, 4, generator=gen))[0]
        side_spec = QuantSpec(bits=3, group=4, axis="token")  # 3-bit side codes: a bitstream too
        side_codes = quant.pack_qtensor(encode_side(k[..., :n_key, :], quant.dequantize(kq, key_spec), basis, side_spec), 3)
    return fused.DecodeKV(
        key=quant.pack_qtensor(kq, bits) if n_key else None, key_spec=key_spec, key_window=k[..., n_key:, :],
        value=quant.pack_qtensor(vq, bits) if n_value else None, value_spec=value_spec, value_window=v[..., n_value:, :],
        side=side_codes, side_spec=side_spec, basis=basis, sign=-1.0 if side == "minus" else 1.0)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("side", [False, True, "minus"])
@pytest.mark.parametrize("batch", [1, 2])
def test_kernel_equals_reference_over_partial_key_groups(bits, side, batch):
    """Every fp window length 0..g (the partial key group), values with KIVI's longer window."""
    for window in range(0, 9):
        kv = _state(batch, 2, 16, 32, window, window + 8 if window < 8 else 0, bits, side, seed=window)
        q = torch.randn(batch, 2 * 3, 16)  # GQA 3:1
        _close(fused.decode(q, kv, 0.25, chunk=16), fused.decode_reference(q, kv, 0.25))


@pytest.mark.parametrize("groups", [1, 3, 7])
def test_kernel_equals_reference_over_gqa(groups):
    kv = _state(2, 2, 16, 64, 5, 13, 2, side=True)
    q = torch.randn(2, 2 * groups, 16)
    _close(fused.decode(q, kv, 0.25), fused.decode_reference(q, kv, 0.25))
    _close(fused.decode(q, kv, 0.25, chunk=8), fused.decode_reference(q, kv, 0.25))  # many chunks merged


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_per_token_keys_per_channel_values_and_every_width(bits):
    """The other layouts (keys per token, values per channel) and widths outside 2/3/4 (bitstream path)."""
    for key_axis, value_axis in (("token", "token"), ("token", "channel"), ("channel", "channel")):
        kv = _state(2, 1, 16, 48, 3, 3 if value_axis == "token" else 11, bits, True, key_axis, value_axis)
        q = torch.randn(2, 3, 16)
        _close(fused.decode(q, kv, 0.25, chunk=16), fused.decode_reference(q, kv, 0.25))


def test_softcap_mask_and_fp_only():
    kv = _state(2, 2, 16, 40, 4, 12, 2, side=True)
    q = torch.randn(2, 4, 16) * 4
    mask = torch.zeros(2, 44)
    mask[0, :20] = float("-inf")  # a padded row: whole chunks masked out
    _close(fused.decode(q, kv, 0.25, softcap=5.0, mask=mask, chunk=8), fused.decode_reference(q, kv, 0.25, 5.0, mask))
    fp = _state(1, 2, 16, 0, 7, 7, 2)  # nothing quantized yet
    q = torch.randn(1, 2, 16)
    _close(fused.decode(q, fp, 0.25), fused.decode_reference(q, fp, 0.25))


def test_refuses_what_it_cannot_read():
    kv = _state(1, 1, 16, 16, 0, 0, 2)
    exact = fused.DecodeKV(**{**kv.__dict__, "key": kv.key._replace(scale=kv.key.scale.float())})
    assert "fp16" in fused.unsupported(exact)
    with pytest.raises(ValueError, match="fp16"):
        fused.decode(torch.randn(1, 1, 16), exact, 0.25)
    with pytest.raises(ValueError, match="KV heads"):
        fused.decode(torch.randn(1, 1, 8), kv, 0.25)


# ----------------------------------------------------------------------------------------------------------------
# In the cache: KVQuantConfig(fused=True) under the FUSED attention.

from dataclasses import replace  # noqa: E402

from atlas_core.kvquant import headq  # noqa: E402
from atlas_core.kvquant.cache import KVQuantConfig, QuantizedKVCache  # noqa: E402
from atlas_core.kvquant.headq import SideCode  # noqa: E402
from atlas_core.models import load_model  # noqa: E402

KIVI2 = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=QuantSpec(bits=2, group=16, axis="token"),
                      residual=4, residual_rule="kivi")
TOKEN3 = KVQuantConfig(key=QuantSpec(bits=3, group=16, axis="token"), value=QuantSpec(bits=3, group=16, axis="token"), residual=2)
K_ONLY = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), residual=3)


def _side(lm):
    bases = {l: headq.random_basis(lm.spec.n_kv_heads, lm.spec.d_head, 2, l) for l in range(lm.spec.n_layers)}
    return SideCode(bases=bases, bits=4)


class _Counting:
    """Counts the kernel's calls and the histories the cache dequantizes (``_Store.from_codes``)."""

    def __init__(self, monkeypatch):
        from atlas_core.kvquant import cache as cache_mod
        self.kernel = self.dequantized = 0
        decode, from_codes = fused.decode, cache_mod._Store.from_codes

        def counted_decode(*a, **k):
            self.kernel += 1
            return decode(*a, **k)

        def counted_from_codes(store):
            self.dequantized += 1
            return from_codes(store)
        monkeypatch.setattr(fused, "decode", counted_decode)
        monkeypatch.setattr(cache_mod._Store, "from_codes", counted_from_codes)


@pytest.mark.parametrize("kv,side", [(KIVI2, False), (TOKEN3, True), (K_ONLY, False)], ids=["kivi2", "headq-token3", "k-only"])
def test_greedy_generation_identical_and_logits_close(kv, side, monkeypatch):
    lm = load_model("toy-llama")
    model = lm.model
    sc = _side(lm) if side else None
    ids = torch.randint(4, 260, (2, 10), generator=torch.Generator().manual_seed(1))
    plain = model.generate(ids, past_key_values=QuantizedKVCache(model.config, kv, sc), max_new_tokens=32, do_sample=False)
    counts = _Counting(monkeypatch)
    with fused.decoding(model):
        out = model.generate(ids, past_key_values=QuantizedKVCache(model.config, replace(kv, fused=True), sc),
                             max_new_tokens=32, do_sample=False)
    assert torch.equal(out, plain)
    assert counts.kernel == 31 * lm.spec.n_layers  # every decode step after the prefill, every layer
    assert counts.dequantized == 0  # ... and no history was dequantized
    assert model.config._attn_implementation != fused.FUSED  # restored

    # one real decode step's logits over a history of quantized codes
    caches = [QuantizedKVCache(model.config, replace(kv, fused=f), sc) for f in (False, True)]
    for cache in caches:
        model(out[:, :-1], past_key_values=cache, use_cache=True)
    ref = model(out[:, -1:], past_key_values=caches[0], use_cache=True).logits
    with fused.decoding(model):
        got = model(out[:, -1:], past_key_values=caches[1], use_cache=True).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert len(caches[1].layers[0].key_store) > 0


def test_falls_back_without_the_fused_attention_or_on_a_sliding_layer(monkeypatch):
    counts = _Counting(monkeypatch)
    lm = load_model("toy-llama")
    ids = torch.randint(4, 260, (1, 12), generator=torch.Generator().manual_seed(2))
    lm.model.generate(ids, past_key_values=QuantizedKVCache(lm.model.config, replace(KIVI2, fused=True)), max_new_tokens=4,
                      do_sample=False)  # the model's own attention: the plain path
    assert counts.kernel == 0 and counts.dequantized > 0
    gemma = load_model("toy-gemma3")  # layer 0 slides: plain path there, kernel on the global layer
    model = gemma.model
    ids = torch.randint(4, 260, (1, 20), generator=torch.Generator().manual_seed(3))
    plain = model.generate(ids, past_key_values=QuantizedKVCache(model.config, KIVI2), max_new_tokens=8, do_sample=False)
    counts.kernel = 0
    with fused.decoding(model):
        out = model.generate(ids, past_key_values=QuantizedKVCache(model.config, replace(KIVI2, fused=True)),
                             max_new_tokens=8, do_sample=False)
    assert torch.equal(out, plain) and counts.kernel == 7
