"""Perplexity on non-overlapping windows of tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def block_nll(model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Next-token negative log-likelihood of every predicted token.

    Each block is an independent window: its first token is context only (the BOS when one is
    prepended), every later token is predicted from the tokens before it in the same block.

    Args:
        model: a causal LM returning ``.logits``.
        blocks: (block, token) token ids.
    Returns:
        (block, token - 1) NLL in nats, fp32.
    """
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (block, token) with at least 2 tokens per block, got {tuple(blocks.shape)}")
    out = []
    for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
        batch = blocks[start : start + batch_size]
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # (batch, token - 1, vocab)
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        if not torch.isfinite(nll).all():
            raise FloatingPointError("the model produced non-finite logits; check its weights and dtype")
        out.append(nll)
    return torch.cat(out)


def perplexity(model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp of the mean next-token NLL over non-overlapping windows.

    Args:
        model: a causal LM.
        blocks: (block, token) token ids, e.g. from ``corpus.token_blocks``.
    Returns:
        perplexity (float).
    """
    return math.exp(block_nll(model, blocks, batch_size, progress).double().mean().item())
