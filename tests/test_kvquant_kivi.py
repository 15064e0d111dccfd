"""KIVI's residual window (issue 14, case 9): the cache under ``residual_rule="kivi"`` against a plain
step-by-step reference written after KIVI's code, and the fp tokens it keeps at every decode step.

KIVI's rule (jy-yuan/KIVI, models/llama_kivi.py at 876b4d2): a decode step appends the new key to the fp
keys and quantizes them all once R have accumulated (lines 121–136), so attention sees 1 … R fp keys;
it appends the new value and quantizes the oldest fp value once there are more than R (lines 165–187),
so attention sees R + 1 fp values. The prefill keeps the last T mod R keys and the last R values in fp
(lines 193–217).
"""

import statistics

import pytest
import torch

from atlas_core.kvquant.cache import KVQuantConfig, QuantizedKVCache, QuantizedKVLayer
from atlas_core.kvquant.experiment import KVMethod
from atlas_core.kvquant.kivi import KIVIReference
from atlas_core.kvquant.quant import QuantSpec
from atlas_core.models import load_model


@pytest.mark.parametrize("residual, group, prefill", [(8, 4, 5), (8, 4, 16), (8, 4, 21), (32, 32, 45), (32, 32, 64)])
@pytest.mark.parametrize("memo", [False, True])
def test_cache_equals_the_plain_kivi_reference_at_every_step(residual, group, prefill, memo):
    key, value = QuantSpec(bits=2, group=group, axis="channel"), QuantSpec(bits=2, group=8, axis="token")
    layer = QuantizedKVLayer(KVQuantConfig(key=key, value=value, residual=residual, memo=memo, residual_rule="kivi"))
    ref = KIVIReference(key, value, residual)
    gen = torch.Generator().manual_seed(residual + prefill)
    k, v = torch.randn(2, 2, prefill + 70, 16, generator=gen), torch.randn(2, 2, prefill + 70, 16, generator=gen)
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, prefill + 70)]
    for start, stop in steps:
        ours = layer.update(k[..., start:stop, :], v[..., start:stop, :])
        theirs = ref.update(k[..., start:stop, :], v[..., start:stop, :])
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), (start, stop)
        assert layer.fp_tokens() == ref.fp_tokens(), (start, stop)


def _fp_seen_per_step(kv: KVQuantConfig, n: int = 320, prefill: int = 128) -> tuple[list[int], list[int], list[int], list[int]]:
    """fp keys and values attention sees at each decode step (window before the step + the new token) and
    holds after it, in layer 0 of a toy model decoding one token at a time."""
    lm = load_model("toy-llama")
    ids = torch.randint(4, 260, (1, n), generator=torch.Generator().manual_seed(0))
    cache = QuantizedKVCache(lm.model.config, kv)
    lm.model(ids[:, :prefill], past_key_values=cache, use_cache=True)
    layer, seen_k, seen_v, held_k, held_v = cache.layers[0], [], [], [], []
    for t in range(prefill, n):
        k, v = layer.fp_tokens()
        lm.model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        seen_k.append(k + 1), seen_v.append(v + 1)
        held_k.append(layer.fp_tokens()[0]), held_v.append(layer.fp_tokens()[1])
    return seen_k, seen_v, held_k, held_v


def test_kivi_keeps_one_to_r_keys_and_r_plus_one_values_per_step():
    kv = KVMethod(method="kivi", kbits=2, vbits=2, group=32, residual=32).kv_config()
    seen_k, seen_v, held_k, held_v = _fp_seen_per_step(kv)
    assert seen_k == [(128 + i) % 32 + 1 for i in range(len(seen_k))]  # 1, 2, …, 32, 1, …
    assert (min(seen_k), max(seen_k), statistics.mean(seen_k[:192])) == (1, 32, 16.5)
    assert held_k == [s % 32 for s in seen_k]
    assert set(seen_v) == {33} and set(held_v) == {32}


def test_per_channel_keeps_its_recent_window():
    """Ours, kept as ``per-channel``: one shared window of R … R + g − 1 tokens after a step."""
    kv = KVMethod(method="per-channel", kbits=2, vbits=2, group=32, residual=32).kv_config()
    seen_k, seen_v, held_k, _ = _fp_seen_per_step(kv)
    assert seen_k == seen_v and (min(seen_k), max(seen_k), statistics.mean(seen_k[:192])) == (33, 64, 48.5)


def test_kivi_settings_are_checked():
    with pytest.raises(ValueError, match="multiple of the key group"):
        KVQuantConfig(key=QuantSpec(bits=2, group=32, axis="channel"), value=None, residual=48, residual_rule="kivi")
    with pytest.raises(ValueError, match="residual_rule"):
        KVQuantConfig(residual_rule="sliding")
    with pytest.raises(ValueError, match="multiple of --group"):
        KVMethod(method="kivi", kbits=2, residual=0)
    with pytest.raises(ValueError, match="one token at a time"):
        ref = KIVIReference(QuantSpec(bits=2, group=4, axis="channel"), QuantSpec(bits=2, group=8, axis="token"), 8)
        x = torch.zeros(1, 1, 3, 16)
        ref.update(x, x)
        ref.update(x, x)
