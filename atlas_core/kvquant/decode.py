"""Decode-style perplexity: every scored token attends to the past through the (quantized) cache.

Protocol, per batch of blocks (batch, token):
1. prefill the first ``prefill`` tokens in one forward pass (they attend to each other in full
   precision; the cache then stores them, quantized, as it would after any prompt);
2. feed the rest ``chunk`` tokens at a time (teacher forcing), each step attending to the stored past
   through the cache (plus, within a chunk, to the chunk itself in full precision);
3. score only the tokens predicted by step 2's logits: tokens prefill+1 … T−1 (the prefill's own
   logits are never quantization-affected and are left out).

The same protocol with ``kv=None`` (a plain ``DynamicCache``) gives the fp reference, so the two differ
only by what the cache returns.
"""

from __future__ import annotations

import math

import torch
from atlas_core.progress import tqdm  # names the running chapter
from transformers import DynamicCache

from atlas_core.eval import token_nll
from atlas_core.kvquant.cache import KVQuantConfig, QuantizedKVCache, held_bits_per_element
from atlas_core.kvquant.headq import SideCode
from atlas_core.kvquant.rope import rotary_tables


def make_cache(model, kv: KVQuantConfig | None, side: SideCode | None = None):
    """A fresh cache: ``DynamicCache`` for kv=None, else ``QuantizedKVCache`` (RoPE tables if pre-RoPE)."""
    if kv is None:
        return DynamicCache(config=model.config)
    rotary = rotary_tables(model) if kv.pre_rope and kv.key is not None else None
    return QuantizedKVCache(model.config, kv, side, rotary)


@torch.no_grad()
def decode_nll(
    model,
    blocks: torch.Tensor,
    kv: KVQuantConfig | None,
    side: SideCode | None = None,
    prefill: int = 128,
    chunk: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """NLL of the decoded tokens, (batch, token − prefill − 1), and the bits per key/value element the cache held.

    Args:
        blocks: (batch, token) token ids; all decoded together as one batch.
        kv: quantization settings, or None for the fp ``DynamicCache``.
        prefill: tokens fed in the first forward pass (≥ 1).
        chunk: tokens per decode step.
        progress: show a progress bar over decode steps.
    """
    if not 1 <= prefill < blocks.shape[1] - 1:
        raise ValueError(f"prefill must be in 1..{blocks.shape[1] - 2}, got {prefill}")
    cache = make_cache(model, kv, side)
    model(blocks[:, :prefill], past_key_values=cache, use_cache=True)
    nll = []
    steps = range(prefill, blocks.shape[1] - 1, chunk)
    for start in tqdm(steps, desc="decode", leave=False, disable=not progress):
        stop = min(start + chunk, blocks.shape[1] - 1)
        logits = model(blocks[:, start:stop], past_key_values=cache, use_cache=True).logits  # (batch, step, vocab)
        target = blocks[:, start + 1 : stop + 1]  # (batch, step)
        nll.append(token_nll(logits, target))  # (batch, step)
    bits = held_bits_per_element(cache)  # measured from the bytes held, the fp cache's too
    return torch.cat(nll, dim=1), bits


def decode_perplexity(model, blocks, kv, side=None, prefill: int = 128, chunk: int = 1) -> float:
    """exp of the mean NLL of ``decode_nll``."""
    nll, _ = decode_nll(model, blocks, kv, side, prefill, chunk)
    return math.exp(nll.double().mean().item())
