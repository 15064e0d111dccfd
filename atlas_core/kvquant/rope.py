"""Undo and redo RoPE on cached keys, so a cache that receives post-RoPE keys can quantize them pre-RoPE.

RoPE rotates each channel pair (i, i + d/2) of a key at position p by the angle p·θ_i:
k_post = k_pre·cos + rotate_half(k_pre)·sin (transformers' convention for Llama, Mistral, Qwen2/3 and
Gemma3). The rotation is orthogonal up to the rope scaling factor s (cos² + sin² = s²), so
k_pre = (k_post·cos − rotate_half(k_post)·sin)/s², exactly. The tables come from the model's own
rotary module (per layer type for Gemma3's local and global layers). Partial RoPE (Phi-3 with
``partial_rotary_factor`` < 1) rotates only the first ``rotary dim`` channels of each head and passes
the rest through, as transformers' ``phi3.apply_rotary_pos_emb`` does; the tables' width says which.

RoPE-averaged query covariance (for keys coded before RoPE). With q_t = R_t q′_t and k_j = R_j k′_j
(pre-RoPE primes, R_p the rotation at position p, s the scaling factor: R_pᵀR_p = s²I), the logit is
q_t·k_j = s² q′_tᵀ ρ_{j−t} k′_j = (M_Δᵀ q′_t)·k′_j with Δ = t − j ≥ 0 and M_Δ = s·(the tables' rotation at
Δ), i.e. row vectors q′ @ M_Δ = s·rotate(q′, cos_Δ, sin_Δ). So a pre-RoPE key error δ′_j costs
E[((q′ @ M_Δ)·δ′)²] = δ′ᵀ M_Δᵀ Σ′_q M_Δ δ′, and the covariance that weights it is

    Σ̄ = E_Δ[M_Δᵀ Σ′_q M_Δ],   Σ′_q = E[q′ q′ᵀ] (pre-RoPE queries),

averaged over the offsets the cache will see. Our default: Δ uniform in 0 … T − 1 (T the block length),
every offset a query of a T-token block can have to an earlier key, weighted alike (a causal block has
T − Δ pairs at offset Δ; the uniform weight counts far offsets more than a block does, as a long
generation would). Trace is preserved when s = 1; a pair (i, i + d/2) whose frequency θ_i turns many full
times over the offsets averages to a multiple of the 2×2 identity (its cross terms vanish).
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


def pre_rope_queries(q: torch.Tensor, cos_sin: CosSin, seq_len: int) -> torch.Tensor:
    """Pre-RoPE queries from post-RoPE ones, (head, point, d_head) in block-major (block, token) order
    (``extract``'s points), each un-rotated at its own position (token index in its block of ``seq_len``).

    Raises:
        ValueError: the points are not a whole number of blocks, or tables that do not fit the heads.
    """
    n = q.shape[-2]
    if seq_len < 1 or n % seq_len:
        raise ValueError(f"{n} points are not a whole number of blocks of {seq_len} tokens")
    cos, sin = cos_sin(torch.arange(seq_len, device=q.device))  # (token, rotary dim)
    blocks = q.reshape(*q.shape[:-2], n // seq_len, seq_len, q.shape[-1])  # (head, block, token, d_head)
    return unrotate(blocks, cos.to(q), sin.to(q)).reshape(q.shape)


def offset_rotations(cos_sin: CosSin, offsets: torch.Tensor, d_head: int) -> torch.Tensor:
    """M_Δ for each offset, (offset, d_head, d_head) float64: q′ @ M_Δ is the query a pre-RoPE key at offset Δ
    meets (module docstring), s·rotate(q′, cos_Δ, sin_Δ)."""
    cos, sin = (t.double() for t in cos_sin(offsets))  # (offset, rotary dim)
    eye = torch.eye(d_head, dtype=torch.float64).expand(len(offsets), d_head, d_head)
    m = rotate(eye, cos[:, None], sin[:, None])  # rows: rotate(e_i), (offset, d_head, d_head)
    scale = torch.cat([(cos * cos + sin * sin).sqrt(), torch.ones(len(offsets), d_head - cos.shape[-1], dtype=torch.float64)], -1)
    return m * scale[:, None, :]  # s per output channel (1 past the rotary dim)


def rotation_average(sigma: torch.Tensor, cos_sin: CosSin, offsets: torch.Tensor) -> torch.Tensor:
    """Σ̄ = mean over ``offsets`` of M_Δᵀ Σ M_Δ, for pre-RoPE query covariances Σ (..., d_head, d_head) -> same, float64.

    Raises:
        ValueError: no offsets, or a negative one (a query never reads a later key).
    """
    offsets = torch.as_tensor(offsets)
    if offsets.dim() != 1 or len(offsets) == 0 or (offsets < 0).any():
        raise ValueError(f"offsets must be a non-empty 1-D tensor of offsets ≥ 0, got {offsets.tolist()}")
    m = offset_rotations(cos_sin, offsets, sigma.shape[-1])  # (offset, d, d)
    sigma = sigma.double()[..., None, :, :]  # (..., 1, d, d)
    return (m.transpose(-1, -2) @ sigma @ m).mean(-3)


def averaged_query_covariance(q_pre: torch.Tensor, kv_group: torch.Tensor, n_kv: int, cos_sin: CosSin,
                              offsets: torch.Tensor) -> torch.Tensor:
    """The RoPE-averaged query covariance per KV head, Σ̄ = E_Δ[M_Δᵀ Σ′_q M_Δ] (module docstring), (kv_head, d_head,
    d_head) float64.

    Args:
        q_pre: (head, point, d_head) pre-RoPE queries (``pre_rope_queries``, or ``extract``'s "q_pre").
        kv_group: (head,) the KV head each query head reads; n_kv: KV heads.
        cos_sin: the layer's RoPE tables (``rotary_tables(model)[layer]``).
        offsets: (offset,) query-minus-key offsets Δ ≥ 0 averaged uniformly; ``torch.arange(T)`` for blocks of T.
    Raises:
        ValueError: as ``rotation_average``.
    """
    from atlas_core.kvquant.headq import query_covariance  # Σ′_q per KV head over its group's query heads

    return rotation_average(query_covariance(q_pre, kv_group, n_kv), cos_sin, offsets)


@torch.no_grad()
def averaged_query_covariances(lm, blocks: torch.Tensor, offsets: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Σ̄ of every layer, {layer: (kv_head, d_head, d_head)} float64, from calibration blocks (block, token).

    Queries are un-rotated at their own positions (``pre_rope_queries``); ``offsets`` default to
    ``torch.arange(T)``, T = blocks.shape[1] (uniform over a block's offsets; a sliding-window layer sees
    only offsets below its window: pass them).

    Raises:
        ValueError: the model has no RoPE (``rotary_tables``), or as ``rotation_average``.
    """
    from atlas_core.extract import extract

    tables = rotary_tables(lm.model)
    seq_len = blocks.shape[1]
    offsets = torch.arange(seq_len) if offsets is None else offsets
    acts = extract(lm, blocks, list(range(lm.spec.n_layers)), fields=("q",), progress=False)
    return {l: averaged_query_covariance(pre_rope_queries(a.q, tables[l], seq_len), a.kv_group, lm.spec.n_kv_heads,
                                         tables[l], offsets) for l, a in acts.items()}
