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

Storage is real: codes are bit-packed (a token's d_head codes of b bits in ⌈d_head·b/8⌉ bytes), scales
and zeros are fp16, side codes are packed the same way. By default every update dequantizes the history
from the codes (as transformers' own ``QuantizedCache`` does); ``memo=True`` also keeps the dequantized
history (the codes never change once flushed), which makes long experiments faster but saves no memory.
A test holds the memo against the codes. Bits are accounted as b per code, 16 per scale/zero and 16 per
full-precision element (an fp16 cache); ``held_bytes`` reports what the tensors actually occupy.

With ``pre_rope=True`` keys are quantized in pre-RoPE coordinates: the cache undoes the rotation of the
keys it receives (exact, orthogonal), quantizes, and rotates the dequantized keys back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from atlas_core.kvquant import quant, rope
from atlas_core.kvquant.headq import SideCode, apply_side, encode_side
from atlas_core.kvquant.quant import OVERHEAD_BITS, QTensor, QuantSpec


@dataclass(frozen=True)
class KVQuantConfig:
    """What the cache quantizes. ``None`` keeps that tensor in full precision."""

    key: QuantSpec | None = None
    value: QuantSpec | None = None
    residual: int = 0  # the most recent R tokens stay in full precision
    pre_rope: bool = False  # quantize keys before RoPE (the cache undoes and redoes the rotation)
    memo: bool = False  # also hold the dequantized history: faster decode, no memory saved

    def token_unit(self) -> int:
        units = [s.token_unit() for s in (self.key, self.value) if s is not None]
        return math.lcm(*units) if units else 1


class _Store:
    """Flushed tokens of one tensor kind: packed codes (or dense fp), optional side codes, optional memo.

    ``start`` is the absolute position of the oldest held token (positions are needed to undo RoPE).
    """

    def __init__(self, spec: QuantSpec | None, side: SideCode | None = None, basis: torch.Tensor | None = None, rotary=None, memo: bool = False):
        self.spec, self.side, self.basis, self.rotary, self.keep_memo = spec, side, basis, rotary, memo
        self.n, self.start, self.dtype, self.d = 0, 0, None, None
        self.dense: torch.Tensor | None = None  # (batch, kv_head, key, d_head) when spec is None
        self.codes: QTensor | None = None  # packed codes (batch, kv_head, key, ⌈d_head·b/8⌉) + scale/zero
        self.side_codes: QTensor | None = None  # packed (batch, kv_head, key, ⌈r·b′/8⌉) + scale/zero
        self.memo: torch.Tensor | None = None  # (batch, kv_head, key, d_head), what attention sees

    def __len__(self) -> int:
        return self.n

    def append(self, x: torch.Tensor) -> None:
        """Store a chunk (batch, kv_head, n, d_head)."""
        self.dtype, self.d = x.dtype, x.shape[-1]
        if self.spec is None:
            self.dense = _cat(self.dense, x)
            self.n += x.shape[-2]
            return
        pos = torch.arange(self.start + self.n, self.start + self.n + x.shape[-2], device=x.device)
        q = quant.quantize(self._to_storage(x, pos), self.spec)
        seen = self._from_storage(quant.dequantize(q, self.spec, x.dtype), pos)
        self.codes = _cat_q(self.codes, quant.pack_qtensor(q, self.spec.bits))
        if self.side is not None:
            basis = self.basis.to(x)
            s = encode_side(x, seen, basis, self.side.spec())
            self.side_codes = _cat_q(self.side_codes, quant.pack_qtensor(s, self.side.bits))
            if self.keep_memo:  # otherwise the corrected keys are rebuilt from the codes when needed
                seen = apply_side(seen.contiguous(), s, basis, self.side.spec(), self.side.sign, inplace=True)
        if self.keep_memo:
            self.memo = _cat(self.memo, seen)
        self.n += x.shape[-2]

    def _to_storage(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x if self.rotary is None else rope.unrotate(x, *self._tables(pos, x))

    def _from_storage(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x if self.rotary is None else rope.rotate(x, *self._tables(pos, x)).to(x.dtype)

    def _tables(self, pos: torch.Tensor, x: torch.Tensor):
        cos, sin = self.rotary(pos)
        if cos.shape[-1] != x.shape[-1]:
            raise ValueError(f"rotary dimension {cos.shape[-1]} != d_head {x.shape[-1]}: partial RoPE is not supported pre-RoPE")
        return cos.to(x), sin.to(x)

    def seen(self) -> torch.Tensor | None:
        """What attention sees of the held tokens, (batch, kv_head, key, d_head)."""
        return self.memo if self.memo is not None else self.from_codes()

    def drop_front(self, n: int) -> None:
        if n == 0:
            return
        self.n, self.start = self.n - n, self.start + n
        if self.dense is not None:
            self.dense = self.dense[..., n:, :]
        if self.memo is not None:
            self.memo = self.memo[..., n:, :]
        if self.codes is not None:
            self.codes = quant.drop_front(self.codes, n, self.spec)
        if self.side_codes is not None:
            self.side_codes = quant.drop_front(self.side_codes, n, self.side.spec())

    def from_codes(self) -> torch.Tensor | None:
        """Recompute what attention sees from the stored codes alone."""
        if self.spec is None or self.codes is None:
            return self.dense
        pos = torch.arange(self.start, self.start + self.n, device=self.codes.codes.device)
        codes = quant.unpack_qtensor(self.codes, self.spec.bits, self.d)
        seen = self._from_storage(quant.dequantize(codes, self.spec, self.dtype), pos)
        if self.side_codes is not None:
            side = quant.unpack_qtensor(self.side_codes, self.side.bits, self.side.rank)
            seen = apply_side(seen.contiguous(), side, self.basis, self.side.spec(), self.side.sign, inplace=True)  # seen is ours
        return seen

    def bits(self) -> int:
        """Accounted bits: b per code (packing padding aside), 16 per scale/zero, 16 per fp element."""
        if self.n == 0:
            return 0
        if self.spec is None:
            return self.dense.numel() * OVERHEAD_BITS
        total = _logical_bits(self.codes, self.spec.bits, self.d)
        if self.side_codes is not None:
            total += _logical_bits(self.side_codes, self.side.bits, self.side.rank)
        return total

    def held_bytes(self) -> dict[str, int]:
        """Bytes actually held: the storage (codes, stats, side codes or dense) and the memo."""
        parts = [t for t in (self.codes, self.side_codes) if t is not None]
        storage = sum(quant.held_bytes(q) for q in parts) + _nbytes(self.dense)
        return {"storage": storage, "memo": _nbytes(self.memo)}


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


def _cat_q(a: QTensor | None, b: QTensor) -> QTensor:
    return b if a is None else quant.cat([a, b])


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _logical_bits(q: QTensor, bits: int, width: int) -> int:
    """Payload bits of the packed rows of ``width`` codes each, plus 16 per scale and zero."""
    rows = q.codes.numel() // q.codes.shape[-1]  # batch · kv_head · n_tokens
    return rows * width * bits + (q.scale.numel() + q.zero.numel()) * OVERHEAD_BITS


class QuantizedKVLayer(DynamicLayer):
    """One layer's quantized cache; a sliding layer keeps only what its window can still see."""

    def __init__(self, kv: KVQuantConfig, side: SideCode | None = None, layer: int = 0, sliding_window: int | None = None, rotary=None):
        super().__init__()
        self.kv, self.sliding_window = kv, sliding_window
        self.is_sliding = sliding_window is not None
        self.side, self.basis, self.rotary = side, (side.bases[layer] if side is not None else None), rotary
        self.cumulative_length = 0
        self._new_stores()

    def _new_stores(self) -> None:
        side = self.side if self.kv.key is not None else None
        self.key_store = _Store(self.kv.key, side, self.basis, self.rotary, self.kv.memo)
        self.value_store = _Store(self.kv.value, memo=self.kv.memo)

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
        return window if len(store) == 0 else torch.cat([store.seen(), window], dim=-2)

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
        self._new_stores()

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("QuantizedKVCache cannot be cropped: quantized codes cannot be un-flushed; use greedy or sampled decoding, not assisted decoding")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise RuntimeError("QuantizedKVCache does not support beam search (num_beams > 1); use greedy or sampled decoding")

    def dequantized_from_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held keys/values (stored ++ fp window) recomputed from the codes, (batch, kv_head, key, d_head)."""
        return self._visible_codes(self.key_store, self.keys), self._visible_codes(self.value_store, self.values)

    @staticmethod
    def _visible_codes(store: _Store, window: torch.Tensor) -> torch.Tensor:
        return window if len(store) == 0 else torch.cat([store.from_codes(), window], dim=-2)

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

    def held_bytes(self) -> dict[str, int]:
        """Bytes actually held: quantized storage (packed codes, stats, side codes), fp window, memo."""
        if not self.is_initialized:
            return {"storage": 0, "window": 0, "memo": 0}
        k, v = self.key_store.held_bytes(), self.value_store.held_bytes()
        return {"storage": k["storage"] + v["storage"], "window": _nbytes(self.keys) + _nbytes(self.values), "memo": k["memo"] + v["memo"]}


class QuantizedKVCache(Cache):
    """Quantized KV cache for any model whose layers are full or sliding-window attention.

    Token positions are counted from 0 at the first update (no left padding), as pre-RoPE needs them.

    Args:
        config: the model's config (layer types and sliding windows are read from it, as DynamicCache does).
        kv: what to quantize (``KVQuantConfig()`` = full precision passthrough).
        side: HeadQ side codes for the keys (bases for every layer), or None.
        rotary: per-layer RoPE tables (``rope.rotary_tables(model)``); required when ``kv.pre_rope``.
    """

    def __init__(self, config, kv: KVQuantConfig, side: SideCode | None = None, rotary: list | None = None):
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"QuantizedKVCache supports full and sliding attention layers, not {sorted(unknown)}")
        if kv.pre_rope and kv.key is not None and rotary is None:
            raise ValueError("pre-RoPE key quantization needs the model's RoPE tables: pass rotary=rope.rotary_tables(model)")
        rotary = rotary if kv.pre_rope and kv.key is not None else [None] * len(layer_types)
        layers = [
            QuantizedKVLayer(kv, side, i, kw.get("sliding_window") if t == "sliding_attention" else None, rotary[i])
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

    def held_bytes(self) -> dict[str, int]:
        """Bytes actually held over all layers: storage, fp window and memo (see the layer's)."""
        parts = [layer.held_bytes() for layer in self.layers]
        return {key: sum(p[key] for p in parts) for key in ("storage", "window", "memo")}


def expected_bits(kv: KVQuantConfig, side: SideCode | None, d_head: int, n_stored: int, n_window: int) -> dict[str, float]:
    """Accounted bits per element for ``n_stored`` quantized and ``n_window`` fp tokens (per head)."""
    key = quant.bits_per_element(kv.key, d_head)
    if side is not None and kv.key is not None:
        key += side.bits_per_element(d_head)
    value = quant.bits_per_element(kv.value, d_head)
    n = n_stored + n_window
    mix = lambda b: (b * n_stored + OVERHEAD_BITS * n_window) / n  # noqa: E731
    return {"key": mix(key), "value": mix(value)}
