"""KIVI's cache rule written plainly, step by step, after KIVI's own code: the reference that
``QuantizedKVCache`` with ``residual_rule="kivi"`` is held to.

Source: jy-yuan/KIVI, ``models/llama_kivi.py`` at commit 876b4d2, ``LlamaAttention_KIVI.forward``: the
prefill branch (lines 193–217) and the decode branch (keys lines 121–136, values lines 165–187). The
state is KIVI's: quantized keys, fp keys, quantized values, fp values (held here dequantized, as attention
sees them). KIVI's quantizer (``triton_quantize_and_pack_along_last_dim``) is ``quant.quantize`` with keys
per channel in groups of ``group`` tokens and values per token in groups of ``group`` channels.
"""

from __future__ import annotations

import torch

from atlas_core.kvquant import quant
from atlas_core.kvquant.quant import QuantSpec


class KIVIReference:
    """One layer's KIVI cache: ``update`` returns what attention sees, as (batch, kv_head, key, d_head).

    Args:
        key, value: the key (per-channel) and value (per-token) quantizers.
        residual: KIVI's ``residual_length`` R, a multiple of the key group.
    """

    def __init__(self, key: QuantSpec, value: QuantSpec, residual: int):
        if residual < 1 or residual % key.token_unit():
            raise ValueError(f"KIVI's residual must be a positive multiple of the key group, got {residual}")
        self.key, self.value, self.residual = key, value, residual
        self.key_quant = self.key_full = self.value_quant = self.value_full = None

    def fp_tokens(self) -> tuple[int, int]:
        """fp keys and values held now."""
        return _len(self.key_full), _len(self.value_full)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first call is KIVI's prefill (any length); later calls are its decode step (one token)."""
        if self.value_full is None:
            return self._prefill(k, v)
        if k.shape[-2] != 1:
            raise ValueError("KIVI's decode step takes one token at a time")
        return self._decode(k, v)

    def _prefill(self, k, v):
        r, n = self.residual, k.shape[-2]
        n_quant = n - n % r  # lines 193–203: all but the last n mod R keys
        self.key_quant = self._fake(k[..., :n_quant, :], self.key) if n_quant else None
        self.key_full = k[..., n_quant:, :] if n % r else None
        n_quant = max(n - r, 0)  # lines 210–217: all but the last R values
        self.value_quant = self._fake(v[..., :n_quant, :], self.value) if n_quant else None
        self.value_full = v[..., n_quant:, :]
        return k, v  # the prefill attends in full precision

    def _decode(self, k, v):
        self.key_full = k if self.key_full is None else torch.cat([self.key_full, k], dim=-2)  # lines 121–124
        keys = _cat(self.key_quant, self.key_full)
        if self.key_full.shape[-2] == self.residual:  # lines 131–136: quantize the R fp keys at once
            self.key_quant = _cat(self.key_quant, self._fake(self.key_full, self.key))
            self.key_full = None
        self.value_full = torch.cat([self.value_full, v], dim=-2)  # line 165
        values = _cat(self.value_quant, self.value_full)
        if self.value_full.shape[-2] > self.residual:  # lines 174–187: quantize the oldest fp value
            self.value_quant = _cat(self.value_quant, self._fake(self.value_full[..., :1, :], self.value))
            self.value_full = self.value_full[..., 1:, :]
        return keys, values

    @staticmethod
    def _fake(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return quant.dequantize(quant.quantize(x, spec), spec, x.dtype)


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


def _len(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.shape[-2]
