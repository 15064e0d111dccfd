"""Undo and redo RoPE on cached keys, so a cache that receives post-RoPE keys can quantize them pre-RoPE.

RoPE rotates each channel pair (i, i + d/2) of a key at position p by the angle p·θ_i:
k_post = k_pre·cos + rotate_half(k_pre)·sin (transformers' convention for Llama, Mistral, Qwen2/3 and
Gemma3). The rotation is orthogonal up to the rope scaling factor s (cos² + sin² = s²), so
k_pre = (k_post·cos − rotate_half(k_post)·sin)/s², exactly. The tables come from the model's own
rotary module (per layer type for Gemma3's local and global layers). Partial RoPE (Phi-3 with
``partial_rotary_factor`` < 1) rotates only the first ``rotary dim`` channels of each head and passes
the rest through, as transformers' ``phi3.apply_rotary_pos_emb`` does; the tables' width says which.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from transformers.models.llama.modeling_llama import rotate_half

CosSin = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # positions (n,) -> cos, sin (n, rotary dim)


def rotary_tables(model) -> list[CosSin]:
    """One ``positions -> (cos, sin)`` function per layer, from the model's rotary embedding.

    Raises:
        ValueError: the model has no rotary embedding (e.g. GPT-2), so there is no pre-RoPE key.
    """
    rotary = getattr(model.get_decoder(), "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no rotary embedding: pre-RoPE key quantization needs RoPE; use post-RoPE keys")
    config = model.config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    by_type = "layer_type" in inspect.signature(rotary.forward).parameters

    def table(layer_type: str) -> CosSin:
        def cos_sin(positions: torch.Tensor):
            probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
            args = (probe, positions[None]) + ((layer_type,) if by_type else ())
            cos, sin = rotary(*args)  # (1, n, rotary dim)
            return cos[0], sin[0]

        return cos_sin

    return [table(t) for t in types]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to (..., n, d_head) with tables (n, rotary dim ≤ d_head); channels past it pass through."""
    rot, rest = _split(x, cos)
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rotate``."""
    rot, rest = _split(x, cos)
    return torch.cat([(rot * cos - rotate_half(rot) * sin) / (cos * cos + sin * sin), rest], dim=-1)


def _split(x: torch.Tensor, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated channels (..., n, rotary dim), passed-through channels (..., n, d_head − rotary dim))."""
    dim = cos.shape[-1]
    if dim > x.shape[-1] or dim % 2:
        raise ValueError(f"RoPE tables of width {dim} do not fit heads of width {x.shape[-1]}")
    return x[..., :dim], x[..., dim:]
