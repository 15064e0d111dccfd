"""A transformers ``Cache`` that stores quantized keys/values (codes, scales, zeros, HeadQ side codes).

Per layer, the most recent keys and values sit in full-precision windows; older tokens are flushed into
quantized storage. ``update`` follows transformers' contract: it receives the new (batch, kv_head, new,
d_head) keys/values and returns everything attention may see, dequantized. Order of work in one update:

1. append the new tokens to the fp windows;
2. return dequantized(stored) ++ fp window (so the new tokens see themselves and the fp window in full
   precision, and every older token through its codes);
3. flush the windows into quantized storage by the config's ``residual_rule``:

   - ``"recent"`` (ours): keys and values share one window; while it holds more than ``residual`` tokens,
     its oldest tokens are quantized, a whole number of ``group`` tokens when keys or values are
     per-channel. After a step the window holds ``residual`` … ``residual + group − 1`` tokens.
   - ``"kivi"`` (KIVI's own cache code: jy-yuan/KIVI ``models/llama_kivi.py`` at commit 876b4d2, lines
     121–136 (keys) and 165–187 (values) of a decode step, 193–217 of the prefill; plain reference in
     ``kivi.py``): keys are quantized R = ``residual`` at a time, as soon as R of them have accumulated
     (R a multiple of the key group), so 0 … R − 1 fp keys are held after a step and attention sees
     1 … R; values keep exactly the R most recent in full precision and quantize the older ones one
     token at a time, so attention sees R + 1 fp values. (KIVI's code takes single-token decode steps
     only; a chunk of several tokens follows its prefill's rule, which is the same rule.)
4. sliding-window layers drop stored tokens that no future query can see.

With ``residual=0`` and per-token keys, decoding one token at a time means every past token is seen
through its codes.

Storage is real: codes are bit-packed (a token's d_head codes of b bits in ⌈d_head·b/8⌉ bytes), scales
and zeros are fp16, side codes are packed the same way; fp windows (and unquantized tensors) are held in
the model's dtype. ``bits_per_element`` is measured from those bytes (codes, scales, zeros, side codes,
fp windows), so it is what the cache holds; ``expected_bits`` is the formula a test holds it to. By
default every update dequantizes the history from the codes (as transformers' own ``QuantizedCache``
does); ``memo=True`` also keeps the dequantized history (the codes never change once flushed), which
makes long experiments faster but saves no memory; it is reported apart, in ``held_bytes()["memo"]``.

The whole transformers ``Cache`` API acts on the whole state: ``reorder_cache`` (beam search),
``batch_select_indices``, ``batch_repeat_interleave``, ``reset``, ``offload``/``prefetch`` and
``early_initialization`` apply to the windows, codes, scales, zeros, side codes, dense storage and memo
alike (quantization groups never span batch rows, so a reordered cache is the cache of the reordered
batch); ``crop`` of any token raises, because flushed codes cannot be turned back into the fp window a
shorter run would hold.

With ``pre_rope=True`` keys are quantized in pre-RoPE coordinates: the cache undoes the rotation of the
keys it receives (exact, orthogonal), quantizes, and rotates the dequantized keys back.

With ``key_transform`` (``transform.TransformCode``) keys are stored by a transform code instead of the
key ``QuantSpec``'s quantizer (an orthogonal rotation, a width per coordinate, per-channel groups of
``key.group`` tokens; ``transform.encode``/``decode``); the key spec still sets the flush unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from atlas_core.kvquant import quant, rope, transform
from atlas_core.kvquant.headq import SideCode, apply_side, encode_side
from atlas_core.kvquant.quant import QTensor, QuantSpec


RESIDUAL_RULES = ("recent", "kivi")


@dataclass(frozen=True, kw_only=True)
class KVQuantConfig:
    """What the cache quantizes. ``None`` keeps that tensor in full precision.

    ``residual_rule`` says which tokens stay in the fp windows (see the module docstring): ``"recent"``
    (ours) or ``"kivi"`` (KIVI's cache code). Raises ValueError for an unknown rule, a negative residual,
    or a KIVI residual that is not a positive multiple of the key group (KIVI asserts the same).
    """

    key: QuantSpec | None = None
    value: QuantSpec | None = None
    residual: int = 0  # "recent": ≥ R most recent tokens in fp; "kivi": R, the key flush size and value window
    pre_rope: bool = False  # quantize keys before RoPE (the cache undoes and redoes the rotation)
    memo: bool = False  # also hold the dequantized history: faster decode, no memory saved
    residual_rule: str = "recent"
    key_transform: transform.TransformCode | None = None  # keys stored by a transform code (per layer)
    fused: bool = False  # one-token decode steps hand the packed codes to the fused kernel (kvquant.fused)

    def __post_init__(self):
        if self.key_transform is not None and (self.key is None or self.key.axis != "channel"
                                               or self.key.group != self.key_transform.spec.group):
            raise ValueError("a key transform code needs per-channel keys (axis 'channel') with the transform's group")
        if self.residual_rule not in RESIDUAL_RULES:
            raise ValueError(f"residual_rule must be one of {RESIDUAL_RULES}, got {self.residual_rule!r}")
        if self.residual < 0:
            raise ValueError(f"residual must be ≥ 0, got {self.residual}")
        unit = _unit(self.key)
        if self.residual_rule == "kivi" and (self.residual < 1 or self.residual % unit):
            raise ValueError(f"KIVI's residual must be a positive multiple of the key group ({unit} tokens), got {self.residual}")

    def token_unit(self) -> int:
        """Tokens the shared ("recent") window flushes together: a whole group of any per-channel tensor."""
        return math.lcm(_unit(self.key), _unit(self.value))

    def flush_counts(self, n_key_window: int, n_value_window: int) -> tuple[int, int]:
        """How many of the oldest fp keys and values to quantize, given the windows' lengths (tokens)."""
        r = self.residual
        if self.residual_rule == "kivi":
            n_value = max(n_value_window - r, 0) // _unit(self.value) * _unit(self.value)
            return n_key_window // r * r, n_value  # keys: R at a time once R accumulate; values: all but R
        n = max(n_key_window - r, 0) // self.token_unit() * self.token_unit()
        return n, n


def _unit(spec: QuantSpec | None) -> int:
    return 1 if spec is None else spec.token_unit()


class _Store:
    """Flushed tokens of one tensor kind: packed codes (or dense fp), optional side codes, optional memo.

    ``start`` is the absolute position of the oldest held token (positions are needed to undo RoPE).
    """

    def __init__(self, spec: QuantSpec | None, side: SideCode | None = None, basis: torch.Tensor | None = None, rotary=None,
                 memo: bool = False, code: transform.LayerCode | None = None, decoder: torch.Tensor | None = None):
        if code is not None and (spec is None or side is not None):
            raise ValueError("a transform code stores quantized keys without a side code")
        self.spec, self.side, self.basis, self.rotary, self.keep_memo = spec, side, basis, rotary, memo
        self.decoder = basis if decoder is None else decoder  # HeadQ: encodes with basis, decodes with decoder
        self.code = code  # transform code of the keys (``transform.LayerCode``), or None: the spec's quantizer
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
        if self.code is not None:  # packed by the transform code itself
            q = transform.encode(self._to_storage(x, pos), self.code)
            seen = self._from_storage(transform.decode(q, self.code, x.dtype), pos)
            self.codes = _cat_q(self.codes, q)
        else:
            q = quant.quantize(self._to_storage(x, pos), self.spec)
            seen = self._from_storage(quant.dequantize(q, self.spec, x.dtype), pos)
            self.codes = _cat_q(self.codes, quant.pack_qtensor(q, self.spec.bits))
        if self.side is not None:
            basis = self.basis.to(x)
            s = encode_side(x, seen, basis, self.side.spec())
            self.side_codes = _cat_q(self.side_codes, quant.pack_qtensor(s, self.side.bits))
            if self.keep_memo:  # otherwise the corrected keys are rebuilt from the codes when needed
                seen = apply_side(seen.contiguous(), s, self.decoder.to(x), self.side.spec(), self.side.sign, inplace=True)
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
        if self.code is not None:
            return self._from_storage(transform.decode(self.codes, self.code, self.dtype), pos)
        codes = quant.unpack_qtensor(self.codes, self.spec.bits, self.d)
        seen = self._from_storage(quant.dequantize(codes, self.spec, self.dtype), pos)
        if self.side_codes is not None:
            side = quant.unpack_qtensor(self.side_codes, self.side.bits, self.side.rank)
            seen = apply_side(seen.contiguous(), side, self.decoder, self.side.spec(), self.side.sign, inplace=True)  # seen is ours
        return seen

    def held_bytes(self) -> dict[str, int]:
        """Bytes actually held: the storage (codes, stats, side codes or dense) and the memo."""
        parts = [t for t in (self.codes, self.side_codes) if t is not None]
        storage = sum(quant.held_bytes(q) for q in parts) + _nbytes(self.dense)
        return {"storage": storage, "memo": _nbytes(self.memo)}

    def map_tensors(self, fn) -> None:
        """Apply ``fn`` to every held tensor (codes, scales, zeros, side codes, dense, memo), e.g. a batch op."""
        self.dense = None if self.dense is None else fn(self.dense)
        self.memo = None if self.memo is None else fn(self.memo)
        self.codes = None if self.codes is None else QTensor(*map(fn, self.codes))
        self.side_codes = None if self.side_codes is None else QTensor(*map(fn, self.side_codes))


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


def _cat_q(a: QTensor | None, b: QTensor) -> QTensor:
    return b if a is None else quant.cat([a, b])


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _fused():
    """``kvquant.fused``, imported when first needed (it imports numba and registers its attention)."""
    from atlas_core.kvquant import fused
    return fused


class QuantizedKVLayer(DynamicLayer):
    """One layer's quantized cache; a sliding layer keeps only what its window can still see.

    ``keys``/``values`` (transformers' names) are the fp windows, (batch, kv_head, window, d_head); under
    KIVI's rule the two windows have different lengths.
    """

    is_croppable = False  # flushed codes cannot become the fp window again

    def __init__(self, kv: KVQuantConfig, side: SideCode | None = None, layer: int = 0, sliding_window: int | None = None, rotary=None):
        super().__init__()
        self.kv, self.sliding_window = kv, sliding_window
        self.is_sliding = sliding_window is not None
        self.side, self.basis, self.rotary = side, (side.bases[layer] if side is not None else None), rotary
        self.decoder = side.decoder(layer) if side is not None else None
        self.code = kv.key_transform.layers[layer] if kv.key_transform is not None else None
        self.cumulative_length = 0
        self._new_stores()

    def _new_stores(self) -> None:
        side = self.side if self.kv.key is not None else None
        self.key_store = _Store(self.kv.key, side, self.basis, self.rotary, self.kv.memo, self.code, decoder=self.decoder)
        self.value_store = _Store(self.kv.value, memo=self.kv.memo)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]  # empty fp windows
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store (batch, kv_head, new, d_head) keys/values; return all visible keys/values, dequantized.

        Raises:
            ValueError: the batch differs from the one the cache holds.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(f"QuantizedKVCache holds a batch of {self.keys.shape[0]} rows, got {key_states.shape[0]}: "
                             "resize it first (batch_select_indices, batch_repeat_interleave)")
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # fp windows, (batch, kv_head, key, d_head)
        self.values = torch.cat([self.values, value_states], dim=-2)
        step = self._fused_step(key_states.shape[-2])
        if step is not None:  # the kernel reads the codes as they stand now: no dequantized history
            self._flush()
            return _fused().mark(key_states, step), value_states
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

    attn_config = None  # the model's (text) config, set by QuantizedKVCache: its attention implementation decides fusing

    def _fused_step(self, n_new: int):
        """This step's packed state (``fused.DecodeKV``) when the fused kernel takes it, else None.

        It does when ``kv.fused``, the model runs ``fused.FUSED`` attention, the step is one token, the layer
        is full attention, keys are quantized post-RoPE by the spec's quantizer (no transform code), and
        the kernel can read the tensors (``fused.unsupported``: numba, CPU, fp16 stats).
        """
        if not (self.kv.fused and n_new == 1 and not self.is_sliding and self.rotary is None and self.code is None):
            return None
        fused = _fused()
        if not fused.is_active(self.attn_config):
            return None
        k, v = self.key_store, self.value_store
        has_side = k.side_codes is not None
        step = fused.DecodeKV(
            key=k.codes, key_spec=k.spec, value=v.codes, value_spec=v.spec,
            key_window=self.keys if k.dense is None else torch.cat([k.dense, self.keys], dim=-2),
            value_window=self.values if v.dense is None else torch.cat([v.dense, self.values], dim=-2),
            side=k.side_codes, side_spec=k.side.spec() if has_side else None,
            basis=k.decoder if has_side else None, sign=k.side.sign if has_side else 1.0)
        return step if fused.unsupported(step) is None else None

    def _flush(self) -> None:
        n_key, n_value = self.kv.flush_counts(self.keys.shape[-2], self.values.shape[-2])
        if n_key:
            self.key_store.append(self.keys[..., :n_key, :])
            self.keys = self.keys[..., n_key:, :]
        if n_value:
            self.value_store.append(self.values[..., :n_value, :])
            self.values = self.values[..., n_value:, :]

    def _trim(self) -> None:
        """Drop stored tokens older than the last ``sliding_window − 1`` (whole groups only)."""
        unit = self.kv.token_unit()
        for store, window in ((self.key_store, self.keys), (self.value_store, self.values)):
            need = max(0, self.sliding_window - 1 - window.shape[-2])
            store.drop_front((len(store) - need) // unit * unit if len(store) > need else 0)

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
        """``crop(0)`` keeps everything (sliding layers are always trimmed); any other crop raises.

        Raises:
            RuntimeError: tokens would have to be removed (quantized codes cannot be un-flushed).
        """
        if tokens_to_remove != 0:
            raise RuntimeError("QuantizedKVCache cannot be cropped: quantized codes cannot be un-flushed into the fp window a "
                               "shorter run would hold; use greedy, sampled or beam decoding, not assisted decoding")

    def _map_state(self, fn) -> None:
        """Apply ``fn`` to every tensor of the state: fp windows and both stores (codes, stats, side codes, memo)."""
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.key_store.map_tensors(fn)
        self.value_store.map_tensors(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows of the whole state (beam search)."""
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices) -> None:
        """Keep the batch rows ``indices`` (a list or tensor of indices, or a boolean mask) of the whole state."""
        indices = torch.as_tensor(indices)
        self._map_state(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row of the whole state ``repeats`` times, in place (row i -> rows i·repeats …)."""
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        """Move the whole state to the CPU."""
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        """Move the whole state back to the layer's device."""
        if self.is_initialized and self.keys.device != self.device:
            self._map_state(lambda t: t.to(self.device, non_blocking=True))

    def dequantized_from_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held keys/values (stored ++ fp window) recomputed from the codes, (batch, kv_head, key, d_head)."""
        return self._visible_codes(self.key_store, self.keys), self._visible_codes(self.value_store, self.values)

    @staticmethod
    def _visible_codes(store: _Store, window: torch.Tensor) -> torch.Tensor:
        return window if len(store) == 0 else torch.cat([store.from_codes(), window], dim=-2)

    def held(self) -> dict[str, int]:
        """Bytes held for keys and for values (storage + fp window, no memo) and the elements each covers."""
        if not self.is_initialized:
            return {"key_bytes": 0, "value_bytes": 0, "key_elements": 0, "value_elements": 0}
        batch, heads, _, d = self.keys.shape
        count = lambda store, window: (len(store) + window.shape[-2]) * batch * heads * d  # noqa: E731
        return {
            "key_bytes": self.key_store.held_bytes()["storage"] + _nbytes(self.keys),
            "value_bytes": self.value_store.held_bytes()["storage"] + _nbytes(self.values),
            "key_elements": count(self.key_store, self.keys),
            "value_elements": count(self.value_store, self.values),
        }

    def fp_tokens(self) -> tuple[int, int]:
        """Tokens held in full precision now: (keys, values)."""
        return (self.keys.shape[-2], self.values.shape[-2]) if self.is_initialized else (0, 0)

    def held_bytes(self) -> dict[str, int]:
        """Bytes actually held: quantized storage (packed codes, stats, side codes), fp windows, memo."""
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
        for layer in self.layers:
            layer.attn_config = config.get_text_config(decoder=True)

    def bits_per_element(self) -> dict[str, float]:
        """Bits per held key and value element over all layers, measured from the bytes held.

        Counts the packed codes, fp16 scales and zeros, side codes, unquantized storage and the fp windows
        (in the dtype they are held in); not the memo, which is a derived copy (``held_bytes``).
        """
        parts = [layer.held() for layer in self.layers if layer.is_initialized]
        if not parts:
            raise ValueError("the cache is empty: run the model through it before measuring its bits")
        return {kind: 8 * sum(p[f"{kind}_bytes"] for p in parts) / sum(p[f"{kind}_elements"] for p in parts) for kind in ("key", "value")}

    def held_bytes(self) -> dict[str, int]:
        """Bytes actually held over all layers: storage, fp windows and memo (see the layer's)."""
        parts = [layer.held_bytes() for layer in self.layers]
        return {key: sum(p[key] for p in parts) for key in ("storage", "window", "memo")}

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Move layer ``layer_idx``'s whole state back to its device (synchronously: this cache has no
        offloading stream; ``offload(layer_idx)`` moves it to the CPU)."""
        if not (only_non_sliding and self.is_sliding[layer_idx]):
            self.layers[layer_idx].prefetch()


def held_bits_per_element(cache: Cache) -> dict[str, float]:
    """Bits per held key and value element of a ``QuantizedKVCache`` or a plain ``DynamicCache`` (its fp
    tensors as held, e.g. 32 for fp32), measured from the bytes held."""
    if isinstance(cache, QuantizedKVCache):
        return cache.bits_per_element()
    layers = [layer for layer in cache.layers if layer.is_initialized]
    return {
        "key": 8 * sum(_nbytes(l.keys) for l in layers) / sum(l.keys.numel() for l in layers),
        "value": 8 * sum(_nbytes(l.values) for l in layers) / sum(l.values.numel() for l in layers),
    }


def expected_bits(
    kv: KVQuantConfig, side: SideCode | None, d_head: int, key_tokens: tuple[int, int], value_tokens: tuple[int, int], fp_bits: int
) -> dict[str, float]:
    """The formula ``bits_per_element`` must match when packed rows are whole bytes (per head).

    Args:
        key_tokens, value_tokens: (quantized, fp window) tokens held.
        fp_bits: bits of one element held in full precision (16 for fp16, 32 for fp32).
    """
    key = quant.bits_per_element(kv.key, d_head) if kv.key is not None else fp_bits
    if side is not None and kv.key is not None:
        key += side.bits_per_element(d_head)
    value = quant.bits_per_element(kv.value, d_head) if kv.value is not None else fp_bits
    mix = lambda b, n: (b * n[0] + fp_bits * n[1]) / (n[0] + n[1])  # noqa: E731
    return {"key": mix(key, key_tokens), "value": mix(value, value_tokens)}
