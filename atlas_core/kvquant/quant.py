"""Asymmetric min–max quantizers for cached keys and values, with plain reference implementations.

Two groupings, both over tensors shaped (..., key, d_head):
- ``axis="token"``: each token's vector is cut into groups of ``group`` consecutive channels along d_head
  (per-token quantization; KIVI uses it for values).
- ``axis="channel"``: each channel is quantized over a group of ``group`` consecutive tokens (per-channel
  quantization; KIVI uses it for keys). The number of tokens must be a multiple of ``group``.

A group x is stored as codes c = round((x − zero) / scale) ∈ {0 … 2^b − 1} (uint8, one code a byte; the
bit count below is the logical payload b per code), with zero = min x and scale = (max x − min x)/(2^b − 1),
both held in ``scale_dtype`` (fp16 by default, 16 bits each). Codes are computed from the stored
(rounded) scale and zero, so dequantization reproduces exactly what was encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

AXES = ("token", "channel")
OVERHEAD_BITS = 16  # bits of one stored scale or zero (fp16)


BITS = range(1, 9)  # payload bits a code may carry: one byte at most (codes are uint8)


def check_bits(bits, name: str = "bits") -> None:
    """Raise ValueError unless ``bits`` is an integer in 1..8 (``BITS``): the one rule for KV-cache code widths.

    Args:
        bits: the value to check; name: what the caller calls it (kbits, vbits, side_bits, a flag).
    Raises:
        ValueError: a bool, a non-integer (2.5) or a width outside 1..8, naming ``name``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{name} must be an integer in {BITS.start}..{BITS.stop - 1}, got {bits!r}")


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one kind of cached tensor is quantized."""

    bits: int = 2  # payload bits per element, 1..8 (``BITS``)
    group: int = 32  # group length: channels (axis="token") or tokens (axis="channel")
    axis: str = "token"  # "token" (groups along d_head) or "channel" (groups along key)
    scale_dtype: torch.dtype = torch.float16  # storage of scale and zero; float32 for exact tests

    def __post_init__(self):
        check_bits(self.bits)
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group must be positive, got {self.group}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")

    @property
    def levels(self) -> int:
        return 2**self.bits

    def token_unit(self) -> int:
        """Tokens that must be quantized together (a whole group for per-channel)."""
        return self.group if self.axis == "channel" else 1

    def check_tokens(self, n_key: int) -> None:
        """Refuse a key count a per-channel quantizer cannot group (it quantizes ``group`` tokens together).

        Raises:
            ValueError: axis "channel" and ``n_key`` not a multiple of ``group``.
        """
        if self.axis == "channel" and n_key % self.group:
            raise ValueError(f"per-channel quantization needs a multiple of {self.group} tokens, got {n_key}")

    def channel_group(self, d_head: int) -> int:
        """Effective per-token group length (the whole head when ``group`` exceeds it)."""
        g = min(self.group, d_head)
        if d_head % g:
            raise ValueError(f"per-token group {g} does not divide d_head={d_head}")
        return g


class QTensor(NamedTuple):
    """Quantized storage of a (..., key, d_head) tensor."""

    codes: torch.Tensor  # uint8, (..., key, d_head)
    scale: torch.Tensor  # (..., key, d_head / g) for axis="token"; (..., key / g, d_head) for "channel"
    zero: torch.Tensor  # same shape as scale


def quantize(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Quantize (..., key, d_head) group-wise, asymmetric min–max (vectorised)."""
    grouped = _grouped(x, spec)  # (..., n_groups, g) with the group on the last axis
    lo, hi = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale, zero = _scale_zero(lo, hi, spec)
    codes = torch.round((grouped - zero.float()) / scale.float()).clamp_(0, spec.levels - 1).to(torch.uint8)
    # stats (..., n_groups, 1) -> (..., key, d_head/g) or (..., key/g, d_head)
    return QTensor(_ungrouped(codes, x.shape, spec), scale.squeeze(-1), zero.squeeze(-1))


def dequantize(q: QTensor, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize``: codes · scale + zero, as (..., key, d_head)."""
    shape = q.codes.shape
    grouped = _grouped(q.codes, spec).to(dtype)  # (..., n_groups, g)
    scale = q.scale.unsqueeze(-1).to(dtype)  # (..., n_groups, 1)
    zero = q.zero.unsqueeze(-1).to(dtype)
    return _ungrouped(grouped * scale + zero, shape, spec)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored scale and zero of each group; a constant group gets scale 1 (its codes are all 0)."""
    zero = lo.to(spec.scale_dtype)
    scale = ((hi - zero.float()) / (spec.levels - 1)).to(spec.scale_dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(..., key, d_head) -> (..., n_groups, g), each group on the last axis."""
    *lead, n_key, d = x.shape
    if spec.axis == "token":
        g = spec.channel_group(d)
        return x.reshape(*lead, n_key, d // g, g)  # (..., key, d_head/g, g)
    spec.check_tokens(n_key)
    blocks = x.reshape(*lead, n_key // spec.group, spec.group, d)  # (..., key/g, g, d_head)
    return blocks.transpose(-1, -2)  # (..., key/g, d_head, g)


def _ungrouped(grouped: torch.Tensor, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    if spec.axis == "token":
        return grouped.reshape(shape)
    return grouped.transpose(-1, -2).reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# Reference: one group at a time, in plain loops (slow; for tests).


def quantize_ref(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Loop-over-groups reference of ``quantize`` for a 2-D (key, d_head) tensor."""
    n_key, d = x.shape
    g_c = spec.channel_group(d) if spec.axis == "token" else None
    codes = torch.zeros(n_key, d, dtype=torch.uint8)
    if spec.axis == "token":
        scale = torch.zeros(n_key, d // g_c, dtype=spec.scale_dtype)
        groups = [((t, slice(i * g_c, (i + 1) * g_c)), (t, i)) for t in range(n_key) for i in range(d // g_c)]
    else:
        scale = torch.zeros(n_key // spec.group, d, dtype=spec.scale_dtype)
        groups = [((slice(i * spec.group, (i + 1) * spec.group), c), (i, c)) for i in range(n_key // spec.group) for c in range(d)]
    zero = torch.zeros_like(scale)
    for where, at in groups:
        values = x[where]
        z = values.min().to(spec.scale_dtype)
        s = ((values.max() - z.float()) / (spec.levels - 1)).to(spec.scale_dtype)
        s = s if s > 0 else torch.ones((), dtype=spec.scale_dtype)
        codes[where] = torch.round((values - z.float()) / s.float()).clamp(0, spec.levels - 1).to(torch.uint8)
        scale[at], zero[at] = s, z
    return QTensor(codes, scale, zero)


def dequantize_ref(q: QTensor, spec: QuantSpec) -> torch.Tensor:
    """Loop reference of ``dequantize`` for a 2-D (key, d_head) tensor."""
    n_key, d = q.codes.shape
    out = torch.zeros(n_key, d)
    for t in range(n_key):
        for c in range(d):
            i, j = (t, c // spec.channel_group(d)) if spec.axis == "token" else (t // spec.group, c)
            out[t, c] = q.codes[t, c].float() * q.scale[i, j].float() + q.zero[i, j].float()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Bit packing: a token's d_head codes of b bits each held in ceil(d_head·b/8) bytes.


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (..., n) of ``bits`` bits each into (..., ceil(n·bits/8)) bytes, big-endian bit order."""
    n = codes.shape[-1]
    if 8 % bits == 0:  # whole codes per byte: shift and or, in uint8
        per = 8 // bits
        padded = F.pad(codes, (0, -n % per)).unflatten(-1, (-1, per))  # (..., bytes, per)
        shifts = torch.arange(per - 1, -1, -1, dtype=torch.uint8, device=codes.device) * bits
        return (padded << shifts).sum(-1, dtype=torch.uint8)
    planes = (codes.unsqueeze(-1) >> _msb_first(bits, codes.device)) & 1  # (..., n, bits)
    flat = F.pad(planes.flatten(-2), (0, -(n * bits) % 8)).unflatten(-1, (-1, 8))  # (..., bytes, 8)
    return (flat << _msb_first(8, codes.device)).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: (..., bytes) -> uint8 codes (..., n)."""
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per - 1, -1, -1, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., bytes, per)
        return codes.flatten(-2)[..., :n]
    planes = (packed.unsqueeze(-1) >> _msb_first(8, packed.device)) & 1  # (..., bytes, 8)
    planes = planes.flatten(-2)[..., : n * bits].unflatten(-1, (n, bits))  # (..., n, bits)
    return (planes << _msb_first(bits, packed.device)).sum(-1, dtype=torch.uint8)


def _msb_first(bits: int, device) -> torch.Tensor:
    return torch.arange(bits - 1, -1, -1, dtype=torch.uint8, device=device)


def pack_qtensor(q: QTensor, bits: int) -> QTensor:
    """The same ``QTensor`` with its codes bit-packed along d_head."""
    return QTensor(pack(q.codes, bits), q.scale, q.zero)


def unpack_qtensor(q: QTensor, bits: int, d_head: int) -> QTensor:
    """Inverse of ``pack_qtensor``."""
    return QTensor(unpack(q.codes, bits, d_head), q.scale, q.zero)


# ----------------------------------------------------------------------------------------------------------------
# Storage accounting.


def bits_per_element(spec: QuantSpec | None, d_head: int) -> float:
    """Stored bits per element of a quantized tensor: payload + fp16 scale and zero per group.

    ``None`` (full precision) counts 16 bits (an fp16 cache).
    """
    if spec is None:
        return float(OVERHEAD_BITS)
    g = spec.channel_group(d_head) if spec.axis == "token" else spec.group
    return spec.bits + 2 * OVERHEAD_BITS / g


def stored_bits(q: QTensor, spec: QuantSpec) -> int:
    """Bits held by one ``QTensor``, counted from its tensors' element counts."""
    return q.codes.numel() * spec.bits + (q.scale.numel() + q.zero.numel()) * OVERHEAD_BITS


def drop_front(q: QTensor, n: int, spec: QuantSpec) -> QTensor:
    """Drop the ``n`` oldest tokens (a multiple of ``spec.token_unit()``)."""
    if n % spec.token_unit():
        raise ValueError(f"can only drop whole groups of {spec.token_unit()} tokens, got {n}")
    n_stat = n // spec.group if spec.axis == "channel" else n
    return QTensor(q.codes[..., n:, :], q.scale[..., n_stat:, :], q.zero[..., n_stat:, :])


def held_bytes(q: QTensor) -> int:
    """Bytes actually held by a ``QTensor`` (its codes as stored, packed or not, plus scales and zeros)."""
    return sum(t.numel() * t.element_size() for t in q)


def cat(parts: list[QTensor]) -> QTensor:
    """Concatenate quantized chunks along the key axis (both layouts keep key on axis -2)."""
    return QTensor(*(torch.cat(list(t), dim=-2) for t in zip(*parts)))
