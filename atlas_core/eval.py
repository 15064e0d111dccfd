"""Perplexity on non-overlapping windows of tokens, and the log-probabilities every NLL is built from.

``token_logprobs`` and ``token_nll`` are the one place the library turns logits into log-probabilities.
They subtract ``torch.logsumexp`` over the vocabulary (the last dimension), which on this CPU build is
exact to fp32 rounding (mean error below 1e-7 nats against float64). ``F.cross_entropy`` and
``log_softmax`` are not: their fp32 normaliser is biased low. On 3 blocks of 128 tokens of the default
corpus, with the vocabulary as dimension 1 (``cross_entropy(logits.transpose(1, 2))``, as this module
did) the mean NLL is low by 1.2e-4 (smollm2-135m, vocabulary 49,152), 5.2e-4 (qwen2.5-coder-0.5b,
151,936) and 1.6e-4 nats (gemma3-270m, 262,144), with the vocabulary last by 8e-6 to 3e-5: perplexity
21.4385 / 21.4410 / 21.4412 (transposed / vocabulary last / exact) on smollm2-135m, 32.8131 / 32.8292 /
32.8302 on qwen2.5-coder-0.5b.
"""

from __future__ import annotations

import math

import torch
from atlas_core import interval
from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.models import LoadedModel, scoring_attention
from atlas_core.progress import tqdm  # names the running chapter


def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary, exact to fp32 rounding.

    Args:
        logits: (..., vocab) scores, any float dtype; computed in at least fp32.
    Returns:
        (..., vocab) log-probabilities, fp32 (fp64 for fp64 input).
    Source: log p = z - logsumexp(z); ``torch.logsumexp`` rather than ``log_softmax``, whose fp32
    normaliser is biased (module docstring; ``tests/test_eval.py`` holds both to a float64 reference).
    """
    logits = _as_float(logits)
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token, exact to fp32 rounding.

    Args:
        logits: (..., vocab) scores, any float dtype; computed in at least fp32.
        targets: (...) token ids in [0, vocab).
    Returns:
        (...) NLL in nats, fp32 (fp64 for fp64 input). Average many of them in float64.
    Raises:
        ValueError: the shapes do not match or a target lies outside the vocabulary.
    Source: -log p(t) = logsumexp(z) - z_t, the loss of ``F.cross_entropy`` without its fp32 bias.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits (..., vocab) {tuple(logits.shape)} and targets {tuple(targets.shape)} must share their leading shape")
    vocab = logits.shape[-1]
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < vocab):
        raise ValueError(f"targets must lie in [0, {vocab}), got [{int(targets.min())}, {int(targets.max())}]")
    logits = _as_float(logits)
    picked = logits.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)  # (...)
    return torch.logsumexp(logits, dim=-1) - picked


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits go to fp32; fp32 and fp64 stay as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


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
    with scoring_attention(model):  # SDPA where the model runs plain eager attention (same NLL, faster)
        for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
            batch = blocks[start : start + batch_size]
            logits = model(batch, use_cache=False).logits[:, :-1]  # (batch, token - 1, vocab)
            nll = token_nll(logits, batch[:, 1:])  # (batch, token - 1)
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
        perplexity (float); the mean NLL is taken in float64.
    """
    return math.exp(block_nll(model, blocks, batch_size, progress).double().mean().item())


def corpus_perplexity(lm: LoadedModel, spec: BlockSpec) -> interval.Estimate:
    """Perplexity of a loaded model on the token blocks ``spec`` names, with its 95% block-bootstrap interval.

    Args:
        lm: a ``models.LoadedModel`` (its BOS policy applies unless ``spec.add_bos`` overrides it)
        spec: a ``corpus.BlockSpec``: corpus, seq_len, n_blocks, split
    Returns:
        ``interval.Estimate``: exp(Σ NLL / Σ tokens) over the blocks, its interval and the block count
    Raises:
        CorpusError: more blocks than the split holds
    """
    return interval.perplexity(block_nll(lm.model, token_blocks(lm, spec), progress=False))  # nll: (block, token - 1)
