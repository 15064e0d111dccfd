"""The whole transformers ``Cache`` API on ``QuantizedKVCache`` (issue 14, case 3).

Every public method of transformers' ``Cache`` and cache-layer classes either acts on the whole state
(fp windows, codes, scales, zeros, side codes, dense storage, memo) or raises a clear error. Each batch
operation is walked on ``DynamicCache`` and on quantized caches alike, then decoding goes on: every row
must equal the solo run of the row it now holds (the same cache kind, batch 1, same steps).
"""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from atlas_core.kvquant import headq, rope
from atlas_core.kvquant.cache import KVQuantConfig, QuantizedKVCache, QuantizedKVLayer
from atlas_core.kvquant.headq import SideCode
from atlas_core.kvquant.quant import QTensor, QuantSpec
from atlas_core.models import load_model

# How each public name of transformers' Cache / cache-layer API is held to account here. A name added by a
# new transformers release fails test_every_public_name_is_accounted_for until someone decides.
# Called on QuantizedKVCache by the walks below; each walk's spy checks that its names were called.
BATCH = {"update", "reorder_cache", "batch_select_indices", "batch_repeat_interleave"}
LIFECYCLE = {"reset", "early_initialization", "lazy_initialization", "crop", "activate_past_recording", "is_recording_past"}
DEVICE = {"offload", "prefetch"}
SIZES = {"get_seq_length", "get_query_offset", "get_max_length", "get_mask_sizes"}
WALKED = BATCH | LIFECYCLE | DEVICE | SIZES
ATTRIBUTES = {  # compared with DynamicCache's (or fixed) in test_attributes_match_dynamic_cache
    "batch_size", "is_compileable", "is_croppable", "is_initialized", "is_sliding", "is_linear", "is_dummy",
    "supports_early_init",
}
LINEAR_ONLY = {  # linear-attention / indexer state: transformers itself raises ValueError on attention layers
    "has_previous_state", "get_conv_state", "update_conv_state", "get_recurrent_state", "update_recurrent_state",
    "update_indexer",
}


def test_every_public_name_is_accounted_for():
    classes = (Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer)
    public = {name for cls in classes for name in dir(cls) if not name.startswith("_")}
    listed = WALKED | ATTRIBUTES | LINEAR_ONLY
    assert public - listed == set(), "new transformers Cache API: make QuantizedKVCache act on its whole state or raise"
    assert listed - public == set(), "stale names in this test's tables"


def _ids(n=24, batch=2, seed=0):
    return torch.randint(4, 260, (batch, n), generator=torch.Generator().manual_seed(seed))


def _bases(lm, r=2):
    return {l: headq.random_basis(lm.spec.n_kv_heads, lm.spec.d_head, r, l) for l in range(lm.spec.n_layers)}


def _caches(lm) -> dict:
    """name -> a function building a fresh cache: fp, and quantized caches covering every kind of state."""
    model = lm.model
    kivi = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=QuantSpec(bits=2, group=8, axis="token"), residual=4, residual_rule="kivi")
    recent = KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=QuantSpec(bits=3, group=8, axis="token"), residual=3, memo=True)
    pre = KVQuantConfig(key=QuantSpec(bits=3, group=8, axis="token"), value=None, residual=2, pre_rope=True)
    side = SideCode(bases=_bases(lm), bits=4)
    return {
        "dynamic": lambda: DynamicCache(config=model.config),
        "kivi": lambda: QuantizedKVCache(model.config, kivi),
        "recent+side+memo": lambda: QuantizedKVCache(model.config, recent, side),
        "pre-rope, dense V": lambda: QuantizedKVCache(model.config, pre, rotary=rope.rotary_tables(model)),
    }


def _run(model, cache, ids, start, stop):
    """Feed ids[:, start:stop] one token at a time (the first call prefills ``start`` tokens); logits (batch, step, vocab)."""
    if start:
        model(ids[:, :start], past_key_values=cache, use_cache=True)
    return torch.cat([model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(start, stop)], 1)


def _state_tensors(layer) -> list[torch.Tensor]:
    """Every tensor the layer holds for its batch (found by walking its attributes, not by the code under test)."""
    found = []
    for obj in (layer, getattr(layer, "key_store", None), getattr(layer, "value_store", None)):
        for name, value in (vars(obj) if obj is not None else {}).items():
            if name in ("basis", "decoder", "rotary", "side", "_sliding_window_tensor"):
                continue  # per-layer settings, not batch state
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, QTensor):
                found.extend(value)
    return found


@pytest.fixture
def spy(monkeypatch):
    """Record which QuantizedKVCache / QuantizedKVLayer methods are called."""
    called = set()
    for cls in (QuantizedKVCache, QuantizedKVLayer):
        for name in WALKED:
            method = getattr(cls, name, None)
            if callable(method):
                def wrapped(*args, _m=method, _n=name, **kwargs):
                    called.add(_n)
                    return _m(*args, **kwargs)
                monkeypatch.setattr(cls, name, wrapped)
    return called


# (operation, the original row each row of the batch holds afterwards)
BATCH_OPS = [
    ("select [1, 0]", lambda c: c.batch_select_indices([1, 0]), [1, 0]),
    ("select tensor [1]", lambda c: c.batch_select_indices(torch.tensor([1])), [1]),
    ("select mask", lambda c: c.batch_select_indices(torch.tensor([False, True])), [1]),
    ("reorder [1, 1]", lambda c: c.reorder_cache(torch.tensor([1, 1])), [1, 1]),
    ("reorder [1, 0] twice", lambda c: (c.reorder_cache(torch.tensor([1, 0])), c.reorder_cache(torch.tensor([1, 0]))), [0, 1]),
    ("repeat_interleave 2", lambda c: c.batch_repeat_interleave(2), [0, 0, 1, 1]),
    ("repeat 2 then select [3, 0]", lambda c: (c.batch_repeat_interleave(2), c.batch_select_indices([3, 0])), [1, 0]),
]


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: a sliding layer (window 8) and a global one
def test_batch_ops_act_on_the_whole_state(family, spy):
    lm = load_model(f"toy-{family}")
    model, ids = lm.model, _ids()
    before, after = 14, 24  # prefill 11 + 3 steps before the op; 10 steps after (windows flush and slide)
    for cache_name, make in _caches(lm).items():
        solo = [_run(model, make(), ids[r : r + 1], 11, after) for r in range(2)]  # (1, step, vocab) each
        for op_name, op, rows in BATCH_OPS:
            cache = make()
            _run(model, cache, ids, 11, before)
            op(cache)
            for layer in cache.layers:
                assert all(t.shape[0] == len(rows) for t in _state_tensors(layer)), (cache_name, op_name)
            out = torch.cat([model(ids[rows, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(before, after)], 1)
            ref = torch.cat([solo[r][:, before - 11 :] for r in rows])
            err = (out - ref).abs().max().item()
            assert err < 1e-4, f"{cache_name}, {op_name}: {err:.3g} off the solo runs"
    assert BATCH <= spy


def test_reset_early_initialization_and_crop(spy):
    lm = load_model("toy-gemma3")
    model, ids, s = lm.model, _ids(), lm.spec
    for cache_name, make in _caches(lm).items():
        fresh = _run(model, make(), ids, 9, 16)
        cache = make()
        _run(model, cache, ids.flip(1), 9, 12)  # other tokens first, then reset
        cache.reset()
        assert cache.get_seq_length() == 0 and not cache.is_initialized
        assert not any(_state_tensors(layer) for layer in cache.layers)
        assert torch.equal(_run(model, cache, ids, 9, 16), fresh), cache_name
        early = make()
        early.early_initialization(2, s.n_kv_heads, s.d_head, torch.float32, torch.device("cpu"))
        assert early.is_initialized and early.get_seq_length() == 0
        assert torch.equal(_run(model, early, ids, 9, 16), fresh), cache_name
        if cache_name == "dynamic":
            continue
        assert not cache.is_croppable and not any(layer.is_croppable for layer in cache.layers)
        cache.crop(0)  # nothing to remove: a no-op
        cache.activate_past_recording()  # no layer records past states: crop still refuses
        assert not any(cache.is_recording_past(i) for i in range(len(cache)))
        with pytest.raises(RuntimeError, match="cannot be cropped"):
            cache.crop(-1)
        with pytest.raises(ValueError, match="batch of 2 rows, got 1"):
            model(ids[:1, 16:17], past_key_values=cache, use_cache=True)
    assert LIFECYCLE <= spy


def test_offload_and_prefetch_move_the_whole_state(spy, monkeypatch):
    lm = load_model("toy-llama")
    model, ids = lm.model, _ids()
    moved = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: (moved.append((t, str(a[0] if a else k.get("device")))), to(t, *a, **k))[1])
    for cache_name, make in list(_caches(lm).items())[1:]:
        ref = _run(model, make(), ids, 11, 20)
        cache = make()
        _run(model, cache, ids, 11, 16)
        for i, layer in enumerate(cache.layers):
            state, moved[:] = _state_tensors(layer), []
            cache.offload(i)  # on this CPU-only machine a move to the CPU keeps the tensors: check each was moved
            assert all(any(t is m and dev == "cpu" for m, dev in moved) for t in state), cache_name
            cache.prefetch(i)  # already on its device: nothing to do
        assert torch.equal(torch.cat([model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(16, 20)], 1), ref[:, 5:])
        for i, layer in enumerate(cache.layers):
            layer.device = torch.device("meta")  # a second device for prefetch to move to
            cache.prefetch(i)
            assert {t.device.type for t in _state_tensors(layer)} == {"meta"}, cache_name
    assert DEVICE <= spy


def test_sizes_and_attributes_match_dynamic_cache(spy):
    for family in ("llama", "gemma3"):
        lm = load_model(f"toy-{family}")
        model, ids = lm.model, _ids()
        caches = {name: make() for name, make in _caches(lm).items()}
        for name, cache in caches.items():
            assert cache.batch_size == -1 and not cache.is_compileable, name  # as DynamicCache: no layer reports a batch
            assert cache.is_sliding == caches["dynamic"].is_sliding and not any(cache.is_linear) and not any(cache.is_dummy)
            assert all(layer.supports_early_init for layer in cache.layers)
        for start, stop in ((0, 11), (11, 12), (12, 20)):  # a prefill, then steps past the sliding window
            for cache in caches.values():
                if start == 0:
                    model(ids[:, :stop], past_key_values=cache, use_cache=True)
                else:
                    [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True) for t in range(start, stop)]
            ref = caches["dynamic"]
            for name, cache in caches.items():
                assert cache.get_seq_length() == ref.get_seq_length() == stop and cache.get_query_offset() == stop, name
                assert cache.get_max_length() == ref.get_max_length() and len(cache) == len(ref)
                for i in range(len(cache)):
                    assert cache.get_max_length(i) == ref.get_max_length(i)
                    for q in (1, 3):
                        assert cache.get_mask_sizes(q, i) == ref.get_mask_sizes(q, i), (name, stop, i, q)
                for call in (lambda: cache.has_previous_state(0), lambda: cache.get_conv_state(0), lambda: cache.get_recurrent_state(0),
                             lambda: cache.update_conv_state(torch.zeros(1), 0), lambda: cache.update_recurrent_state(torch.zeros(1), 0),
                             lambda: cache.update_indexer(torch.zeros(1), 0)):
                    with pytest.raises(ValueError):
                        call()
    assert SIZES <= spy


def test_generate_with_beams_and_several_sequences():
    lm = load_model("toy-llama")
    model, ids = lm.model, _ids(6)
    caches = _caches(lm)
    passthrough = lambda: QuantizedKVCache(model.config, KVQuantConfig())  # noqa: E731
    for kw in (dict(num_beams=2, do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False),
               dict(do_sample=True, num_return_sequences=2)):
        torch.manual_seed(0)
        ref = model.generate(ids, past_key_values=caches["dynamic"](), max_new_tokens=8, **kw)
        torch.manual_seed(0)
        assert torch.equal(model.generate(ids, past_key_values=passthrough(), max_new_tokens=8, **kw), ref), kw
        for name in ("kivi", "recent+side+memo"):
            torch.manual_seed(0)
            out = model.generate(ids, past_key_values=caches[name](), max_new_tokens=8, **kw)
            assert out.shape == ref.shape, (name, kw)
