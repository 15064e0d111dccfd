"""A transformers ``Cache`` that stores quantized keys/values (codes, scales, zeros, HeadQ side codes).

Per layer, the most recent tokens sit in a full-precision window; older tokens are flushed into
quantized storage. ``update`` follows transformers' contract: it receives the new (batch, kv_head, new,
d_head) keys/values and returns everything attention may see, dequantized. Order of work in one update:

1. append the new tokens to the fp window;
2. return dequantized(stored) ++ fp window (so the new tokens see themselves and the fp window in full
   precision, and every older token through its codes);
3. flush: while the fp window holds more than ``residual`` tokens, its oldest tokens are quantized
   (a whole number of ``group`` tokens when keys or values are per-channel, as in KIVI);
4. sliding-window layers drop stored groups that no future query can see.

A token is therefore attended at full precision only while it is among the last ``residual`` (+ < group)
tokens or within the chunk being processed. Decoding one token at a time with ``residual=0`` and
per-token keys means every past token is seen through its codes.

The dequantized stored part is memoised when a chunk is flushed (the codes never change afterwards), so a
decode step does not dequantize the whole history; ``dequantized_from_codes`` recomputes it from the
codes alone, and a test holds the two together. Stored bits are counted from the held tensors' element
counts (payload bits per code, 16 per scale/zero, 16 per full-precision element as in an fp16 cache);
codes are held one per uint8 byte (no bit packing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from atlas_core.kvquant import quant
from atlas_core.kvquant.headq import SideCode, apply_side, encode_side
from atlas_core.kvquant.quant import OVERHEAD_BITS, QTensor, QuantSpec


@dataclass(frozen=True)
class KVQuantConfig:
    """What the cache quantizes. ``None`` keeps that tensor in full precision."""

    key: QuantSpec | None = None
    value: QuantSpec | None = None
    residual: int = 0  # the most recent R tokens stay in full precision

    def token_unit(self) -> int:
        units = [s.token_unit() for s in (self.key, self.value) if s is not None]
        return math.lcm(*units) if units else 1


class _Store:
    """Flushed tokens of one tensor kind: codes (or dense fp), optional side codes, a dequantized memo."""

    def __init__(self, spec: QuantSpec | None, side: SideCode | None = None, basis: torch.Tensor | None = None):
        self.spec, self.side, self.basis = spec, side, basis
        self.codes: QTensor | None = None  # (batch, kv_head, key, d_head) codes + stats
        self.side_codes: QTensor | None = None  # (batch, kv_head, key, r) codes + stats
        self.memo: torch.Tensor | None = None  # (batch, kv_head, key, d_head), what attention sees

    def __len__(self) -> int:
        return 0 if self.memo is None else self.memo.shape[-2]

    def append(self, x: torch.Tensor) -> None:
        """Store a chunk (batch, kv_head, n, d_head)."""
        if self.spec is None:
            seen = x
        else:
            q = quant.quantize(x, self.spec)
            seen = quant.dequantize(q, self.spec, x.dtype)
            self.codes = q if self.codes is None else quant.cat([self.codes, q])
            if self.side is not None:
                s = encode_side(x, seen, self.basis.to(x), self.side.spec())
                seen = apply_side(seen, s, self.basis.to(x), self.side.spec(), self.side.sign).to(x.dtype)
                self.side_codes = s if self.side_codes is None else quant.cat([self.side_codes, s])
        self.memo = seen if self.memo is None else torch.cat([self.memo, seen], dim=-2)

    def drop_front(self, n: int) -> None:
        if n == 0:
            return
        self.memo = self.memo[..., n:, :]
        if self.codes is not None:
            self.codes = quant.drop_front(self.codes, n, self.spec)
        if self.side_codes is not None:
            self.side_codes = quant.drop_front(self.side_codes, n, self.side.spec())

    def from_codes(self) -> torch.Tensor | None:
        """Recompute what attention sees from the stored codes alone."""
        if self.spec is None or self.codes is None:
            return self.memo
        seen = quant.dequantize(self.codes, self.spec, self.memo.dtype)
        if self.side_codes is not None:
            seen = apply_side(seen, self.side_codes, self.basis.to(seen), self.side.spec(), self.side.sign).to(seen.dtype)
        return seen

    def bits(self) -> int:
        if self.memo is None:
            return 0
        if self.spec is None:
            return self.memo.numel() * OVERHEAD_BITS
        total = quant.stored_bits(self.codes, self.spec)
        if self.side_codes is not None:
            total += quant.stored_bits(self.side_codes, self.side.spec())
        return total


class QuantizedKVLayer(DynamicLayer):
    """One layer's quantized cache; a sliding layer keeps only what its window can still see."""

    def __init__(self, kv: KVQuantConfig, side: SideCode | None = None, layer: int = 0, sliding_window: int | None = None):
        super().__init__()
        self.kv, self.sliding_window = kv, sliding_window
        self.is_sliding = sliding_window is not None
        basis = side.bases[layer] if side is not None else None
        self.key_store = _Store(kv.key, side if kv.key is not None else None, basis)
        self.value_store = _Store(kv.value)
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # empty fp window
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store (batch, kv_head, new, d_head) keys/values; return all visible keys/values, dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # the fp window, (batch, kv_head, key, d_head)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys = self._visible(self.key_store, self.keys)
        values = self._visible(self.value_store, self.values)
        if self.is_sliding:
            keep = self.sliding_window - 1 + key_states.shape[-2]
            keys, values = keys[..., -keep:, :], values[..., -keep:, :]
        self._flush()
        if self.is_sliding:
            self._trim()
        return keys, values

    @staticmethod
    def _visible(store: _Store, window: torch.Tensor) -> torch.Tensor:
        return window if store.memo is None else torch.cat([store.memo, window], dim=-2)

    def _flush(self) -> None:
        unit = self.kv.token_unit()
        n = (self.keys.shape[-2] - self.kv.residual) // unit * unit
        if n <= 0:
            return
        self.key_store.append(self.keys[..., :n, :])
        self.value_store.append(self.values[..., :n, :])
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    def _trim(self) -> None:
        """Drop stored tokens older than the last ``sliding_window − 1`` (whole groups only)."""
        unit = self.kv.token_unit()
        need = max(0, self.sliding_window - 1 - self.keys.shape[-2])
        n = (len(self.key_store) - need) // unit * unit
        if n > 0:
            self.key_store.drop_front(n)
            self.value_store.drop_front(n)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of what ``update`` returns, as transformers' dynamic layers report it."""
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return min(self.cumulative_length, self.sliding_window - 1) + query_length, offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        """Drop everything held; the settings and the HeadQ basis stay."""
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.key_store = _Store(self.kv.key, self.key_store.side, self.key_store.basis)
        self.value_store = _Store(self.kv.value)

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("QuantizedKVCache cannot be cropped: quantized codes cannot be un-flushed; use greedy or sampled decoding, not assisted decoding")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise RuntimeError("QuantizedKVCache does not support beam search (num_beams > 1); use greedy or sampled decoding")

    def dequantized_from_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held keys/values (stored ++ fp window) recomputed from the codes, (batch, kv_head, key, d_head)."""
        return self._visible_codes(self.key_store, self.keys), self._visible_codes(self.value_store, self.values)

    @staticmethod
    def _visible_codes(store: _Store, window: torch.Tensor) -> torch.Tensor:
        seen = store.from_codes()
        return window if seen is None else torch.cat([seen, window], dim=-2)

    def stored_bits(self) -> dict[str, int]:
        """Bits held for keys and for values, counted from the tensors, and the element count of each."""
        if not self.is_initialized:
            return {"key_bits": 0, "value_bits": 0, "elements": 0}
        window = self.keys.numel() * OVERHEAD_BITS
        batch, heads, n_window, d = self.keys.shape
        return {
            "key_bits": self.key_store.bits() + window,
            "value_bits": self.value_store.bits() + window,
            "elements": (len(self.key_store) + n_window) * batch * heads * d,
        }


class QuantizedKVCache(Cache):
    """Quantized KV cache for any model whose layers are full or sliding-window attention.

    Args:
        config: the model's config (layer types and sliding windows are read from it, as DynamicCache does).
        kv: what to quantize (``KVQuantConfig()`` = full precision passthrough).
        side: HeadQ side codes for the keys (bases for every layer), or None.
    """

    def __init__(self, config, kv: KVQuantConfig, side: SideCode | None = None):
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"QuantizedKVCache supports full and sliding attention layers, not {sorted(unknown)}")
        layers = [
            QuantizedKVLayer(kv, side, i, kw.get("sliding_window") if t == "sliding_attention" else None)
            for i, (t, kw) in enumerate(zip(layer_types, layer_kwargs))
        ]
        super().__init__(layers=layers)
        self.kv, self.side = kv, side

    def bits_per_element(self) -> dict[str, float]:
        """Measured bits per stored key and value element over all layers."""
        parts = [layer.stored_bits() for layer in self.layers if layer.is_initialized]
        n = sum(p["elements"] for p in parts)
        return {
            "key": sum(p["key_bits"] for p in parts) / n,
            "value": sum(p["value_bits"] for p in parts) / n,
        }


def expected_bits(kv: KVQuantConfig, side: SideCode | None, d_head: int, n_stored: int, n_window: int) -> dict[str, float]:
    """Accounted bits per element for ``n_stored`` quantized and ``n_window`` fp tokens (per head)."""
    key = quant.bits_per_element(kv.key, d_head)
    if side is not None and kv.key is not None:
        key += side.bits_per_element(d_head)
    value = quant.bits_per_element(kv.value, d_head)
    n = n_stored + n_window
    mix = lambda b: (b * n_stored + OVERHEAD_BITS * n_window) / n  # noqa: E731
    return {"key": mix(key), "value": mix(value)}
