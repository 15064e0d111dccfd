"""Round-to-nearest weight quantization (SPEC §8): per output channel or per group of input columns.

A weight W is (out, in), as ``nn.Linear`` keeps it. A group is g consecutive input columns of one output
row (g = in: one scale per output channel). Symmetric: levels −(2^(b−1)−1) … 2^(b−1)−1 times a scale
max|w| / (2^(b−1)−1). Asymmetric: levels 0 … 2^b−1, scale (max−min)/(2^b−1) and a zero point, either an
integer with the range [min, max] first stretched to hold 0 (``zero="integer"``: GPTQ's convention, IST-DASLab
``Quantizer.find_params`` takes min(x.min, 0) and max(x.max, 0)) or the group's minimum itself (GGUF Q4_1's
scale-and-min blocks, ``zero="float"``).
AWQ's quantizer (llm-awq ``pseudo_quantize_tensor``) does not stretch the range: its scale is (max−min)/(2^b−1)
of the group as it is, and its integer zero round(−min/scale) is clamped to 0 … 2^b−1, so a group of one sign
loses its far end to the clamp instead. For a group that holds both signs the two grids are the same (ours
floors the scale at 1e-12, AWQ's at 1e-5); every group of smollm2-135m's linear weights, per channel and in
groups of 32, 48 or 64, holds both signs. This library rounds every method (AWQ included) on ``zero="integer"``.
Every function returns the dequantized weight (what the model computes with) in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WQuantSpec", "group_params", "quantize_rtn", "quantize_rtn_reference", "quantize_with"]


@dataclass(frozen=True, kw_only=True)
class WQuantSpec:
    """Bits, group size (None: one group per output channel) and symmetry of a weight quantizer."""

    bits: int = 4
    group: int | None = None
    symmetric: bool = False
    zero: str = "integer"  # asymmetric only: "integer" (range holds 0) or "float" (w = min + q·scale)

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in 2..16, got {self.bits!r}")
        if self.group is not None and (isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1):
            raise ValueError(f"group must be a positive integer or None, got {self.group!r}")
        if self.zero not in ("integer", "float"):
            raise ValueError(f"zero must be 'integer' or 'float', got {self.zero!r}")

    def group_size(self, n_in: int) -> int:
        """Columns per group for a layer with ``n_in`` inputs (a clear error if they do not divide)."""
        g = self.group or n_in
        if n_in % g:
            raise ValueError(f"group {g} does not divide the layer's {n_in} input columns; pick a divisor")
        return g


def group_params(w: torch.Tensor, spec: WQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` (out, g): both (out, 1); zero is 0 when symmetric."""
    if spec.symmetric:
        top = 2 ** (spec.bits - 1) - 1
        scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
        return scale, torch.zeros_like(scale)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    if spec.zero == "float":
        scale = (hi - lo).clamp_min(1e-12) / (2**spec.bits - 1)
        return scale, -lo / scale
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # zero is representable
    scale = (hi - lo).clamp_min(1e-12) / (2**spec.bits - 1)
    return scale, torch.round(-lo / scale)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: WQuantSpec) -> torch.Tensor:
    """Round ``w`` to the grid (scale, zero) and dequantize; broadcasting shapes."""
    if spec.symmetric:
        top = 2 ** (spec.bits - 1) - 1
        return torch.clamp(torch.round(w / scale), -top, top) * scale
    q = torch.clamp(torch.round(w / scale + zero), 0, 2**spec.bits - 1)  # = round(w/scale) + zero for integer zero
    return (q - zero) * scale


def quantize_rtn(w: torch.Tensor, spec: WQuantSpec) -> torch.Tensor:
    """Round-to-nearest, group by group. w: (out, in) -> (out, in) dequantized."""
    out, n_in = w.shape
    g = spec.group_size(n_in)
    groups = w.float().reshape(out, n_in // g, g)  # (out, group, g)
    scale, zero = group_params(groups, spec)
    return quantize_with(groups, scale, zero, spec).reshape(out, n_in)


def quantize_rtn_reference(w: torch.Tensor, spec: WQuantSpec) -> torch.Tensor:
    """The same, one group at a time with Python loops (the reference for ``quantize_rtn``)."""
    out, n_in = w.shape
    g = spec.group_size(n_in)
    res = torch.empty(out, n_in)
    for r in range(out):
        for start in range(0, n_in, g):
            part = w[r, start : start + g].float()[None]
            scale, zero = group_params(part, spec)
            res[r, start : start + g] = quantize_with(part, scale, zero, spec)[0]
    return res
