"""One home for running our own attention inside a transformers model: layouts, eager lookup, registration.

Extraction (``extract``), hard top-1 (``top1``), condensate attention (``sparse.attention``) and the one-pass
quantized-KV engine (``kvquant.onepass``) each register an attention function with transformers'
``AttentionInterface`` and switch a model to it for the span of a ``with`` block; what they share lives here:

- ``LAYOUTS``/``layout_of``: where each family keeps its decoder layers, attention module, output projection
  and pre-RoPE q/k (declared per family, as transformers does); ``decoder_layers`` and ``attention_modules``
  read it (calibration's layer list too).
- ``eager_of``: the model's own ``eager_attention_forward``, the plain reference each function calls or mirrors.
- ``register``: registers an attention function with the additive masks eager attention gets.
- ``intervene``: sets a per-module state in the chosen layers, switches the attention implementation, and
  undoes both on exit (also on error); the function reads its state with ``state_of``.
- ``kv_group``/``top1_values``: the KV head each query head reads (GQA/MQA), and the value of each query's
  argmax key.

Source: transformers' attention interface (``AttentionInterface``, ``ALL_MASK_ATTENTION_FUNCTIONS``,
``PreTrainedModel.set_attn_implementation``) and its per-model ``eager_attention_forward``.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

__all__ = ["LAYOUTS", "PRE_SHAPES", "Layout", "attention_modules", "decoder_layers", "eager_of", "intervene",
           "kv_group", "layout_of", "register", "state_of", "top1_values"]

_STATE = "_atlas_attention"  # attribute on an attention module inside ``intervene``: (name, state)
_OWNERS: dict[str, str] = {}  # registered name -> the context manager that sets it (for error messages)

# How a family's pre-RoPE module emits q or k (see ``Layout.pre_shape``); the target is (batch, head, token, d_head).
PRE_SHAPES = {
    "flat": "(batch, token, head * d_head)",  # a projection's output (Llama's q_proj)
    "token_major": "(batch, token, head, d_head)",  # normed before the transpose (Qwen3's q_norm)
    "head_major": "(batch, head, token, d_head)",  # normed after the transpose (Gemma 3's q_norm)
}


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where one architecture keeps its attention pieces, declared per family (as transformers does).

    The declared ``pre_shape`` is checked against the tensor's shape on every extraction pass.
    """

    layers: str  # dotted path to the list of decoder layers
    attn: str  # attention module inside a decoder layer
    out_proj: str  # output projection inside the attention module
    q_pre: str | None  # module whose output is the pre-RoPE query (None: the model has no RoPE)
    k_pre: str | None
    pre_shape: str = "flat"  # one of PRE_SHAPES: how the q_pre and k_pre modules lay out their output
    fused_qkv: bool = False  # q_pre/k_pre emit q, k, v concatenated on the last axis (Phi-3's qkv_proj)
    conv1d: bool = False  # GPT-2's Conv1D keeps its weight as (in, out)

    def __post_init__(self):
        if self.pre_shape not in PRE_SHAPES:
            raise ValueError(f"pre_shape must be one of {sorted(PRE_SHAPES)}, got {self.pre_shape!r}")


_ROPE = Layout(layers="model.layers", attn="self_attn", out_proj="o_proj", q_pre="q_proj", k_pre="k_proj")
LAYOUTS = {
    "gpt2": Layout(layers="transformer.h", attn="attn", out_proj="c_proj", q_pre=None, k_pre=None, conv1d=True),
    "llama": _ROPE,
    "mistral": _ROPE,
    "qwen2": _ROPE,
    # q_norm/k_norm precede RoPE: Qwen3 norms (batch, token, head, d_head), Gemma 3 after the transpose
    "qwen3": replace(_ROPE, q_pre="q_norm", k_pre="k_norm", pre_shape="token_major"),
    "gemma3_text": replace(_ROPE, q_pre="q_norm", k_pre="k_norm", pre_shape="head_major"),
    "phi3": replace(_ROPE, q_pre="qkv_proj", k_pre="qkv_proj", fused_qkv=True),
}


def layout_of(model) -> Layout:
    """Return the layout of a supported architecture.

    Raises:
        ValueError: the model's family has no declared layout (extraction, top-1, sparse attention and the
            one-pass KV engine support only the families in ``LAYOUTS``, each tested on a toy model in
            ``atlas_core.toy``).
    """
    family = model.config.model_type  # the loaded class's own type: a multimodal Gemma 3 ("gemma3") nests its layers
    if family not in LAYOUTS:
        raise ValueError(f"model_type '{family}' is not supported: extraction, top-1 and sparse attention "
                         f"work only on the families {sorted(LAYOUTS)}; use a model of one of them")
    return LAYOUTS[family]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's list of layers, from the family's layout.

    Raises:
        ValueError: the family has no declared layout (see ``layout_of``).
    """
    return model.get_submodule(layout_of(model).layers)


def attention_modules(model) -> list[torch.nn.Module]:
    """The attention module of every decoder layer, in order."""
    attn = layout_of(model).attn
    return [layer.get_submodule(attn) for layer in decoder_layers(model)]


def eager_of(module: torch.nn.Module):
    """The ``eager_attention_forward`` of the transformers model file that defines ``module``'s class."""
    return sys.modules[type(module).__module__].eager_attention_forward


def register(name: str, forward, owner: str) -> None:
    """Register ``forward`` as attention implementation ``name``, given the additive masks eager attention gets.

    Args:
        owner: the context manager users enter to run it (named in ``state_of``'s error).
    """
    _OWNERS[name] = owner
    AttentionInterface.register(name, forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)


def state_of(module: torch.nn.Module, name: str, required: bool = True):
    """The state ``intervene(model, name, ...)`` set on ``module``, or None for a layer it left unset.

    Raises:
        RuntimeError: ``required`` and the module is not inside ``intervene`` for ``name`` (the attention
            function was selected by hand, e.g. ``attn_implementation=name`` at load time).
    """
    held = getattr(module, _STATE, None)
    if held is not None and held[0] == name:
        return held[1]
    if required:
        raise RuntimeError(f"the '{name}' attention runs only inside {_OWNERS.get(name, 'atlas_core.attention.intervene')}")
    return None


@contextlib.contextmanager
def intervene(model, name: str, states: dict[int, object]):
    """Run ``model`` with attention implementation ``name``, module ``layer`` holding ``states[layer]``.

    Args:
        model: a transformers model of a family in ``LAYOUTS``.
        name: a registered attention implementation (``register``).
        states: {layer index: state} for the layers the function must treat (others read None).
    Raises:
        ValueError: a layer index outside the model, or the model is already inside ``intervene``
            (one attention implementation at a time).
    Restores the previous implementation and clears the states on exit, also on error.
    """
    modules = attention_modules(model)
    bad = [layer for layer in states if not 0 <= layer < len(modules)]
    if bad:
        raise ValueError(f"layers {bad} do not exist; the model has layers 0..{len(modules) - 1}")
    if any(hasattr(m, _STATE) for m in modules):
        held = next(getattr(m, _STATE)[0] for m in modules if hasattr(m, _STATE))
        raise ValueError(f"the model already runs the '{held}' attention; leave that block before entering '{name}'")
    previous = model.config._attn_implementation
    try:
        for layer, state in states.items():
            setattr(modules[layer], _STATE, (name, state))
        model.set_attn_implementation(name)
        yield
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            if hasattr(module, _STATE):
                delattr(module, _STATE)


def kv_group(n_heads: int, n_kv: int, device=None) -> torch.Tensor:
    """(head,) the KV head each query head reads: h // (n_heads / n_kv) (transformers' ``repeat_kv`` order).

    Raises:
        ValueError: ``n_kv`` is not a positive divisor of ``n_heads`` (no GQA grouping has that shape).
    """
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"{n_kv} KV heads cannot serve {n_heads} query heads: the count must divide it")
    return torch.arange(n_heads, device=device) // (n_heads // n_kv)


def top1_values(value: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The value of each query's most attended key, v[g(h), argmax_j p[h, t, j]].

    Args:
        value: (batch, kv_head, key, d_head); probs: (batch, head, query, key).
    Returns:
        (batch, head, query, d_head)
    """
    top = probs.argmax(dim=-1)  # (batch, head, query)
    v_head = value[:, kv_group(probs.shape[1], value.shape[1], value.device)]  # (batch, head, key, d_head)
    return torch.gather(v_head, 2, top[..., None].expand(-1, -1, -1, value.shape[-1]))
