"""Calibration statistics of every linear layer of the decoder (SPEC §8).

For each linear layer, over the tokens of calibration blocks:
- H = E[x xᵀ] (in, in), the second moment of its inputs (GPTQ's proxy for the loss curvature);
- E|x| (in,), what AWQ's scales are made of;
- F = E[g gᵀ] (in, in), the empirical Fisher of the loss with respect to the layer's input activations,
  g = ∂L/∂x per token (one backward pass per batch, L the summed next-token loss).
``participation_ratio`` gives (Σλ)²/Σλ² of either (the source's "rank ≈ 2" claim).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from atlas_core.models import LoadedModel
from atlas_core.wquant.rotations import eigh_descending

__all__ = ["LayerStats", "calibration_stats", "linear_layers", "participation_ratio"]


@dataclass
class LayerStats:
    """Sums over calibration tokens of one linear layer; ``h``, ``mean_abs``, ``fisher`` give the means."""

    xx: torch.Tensor  # (in, in) Σ x xᵀ
    x_abs: torch.Tensor  # (in,) Σ |x|
    gg: torch.Tensor | None  # (in, in) Σ g gᵀ, or None without the Fisher
    n: int = 0

    @property
    def h(self) -> torch.Tensor:
        return self.xx / self.n

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.x_abs / self.n

    @property
    def fisher(self) -> torch.Tensor:
        return self.gg / self.n

    @cached_property
    def fisher_eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues (in,), eigenvectors (in, in) as columns) of F, by decreasing eigenvalue; computed once."""
        return eigh_descending(self.fisher)


def linear_layers(model) -> dict[str, torch.nn.Module]:
    """Every ``nn.Linear`` (or GPT-2 ``Conv1D``) inside the decoder blocks, by qualified name (no lm_head)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and "lm_head" not in name and (".layers." in name or ".h." in name)}


def weight_of(module) -> torch.Tensor:
    """The layer's weight as (out, in), whichever layout it keeps (Conv1D keeps (in, out))."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def participation_ratio(cov: torch.Tensor) -> float:
    """(Σλ)² / Σλ² of a symmetric positive semi-definite matrix: 1 for rank one, n for isotropic."""
    vals = torch.linalg.eigvalsh(cov.double()).clamp_min(0)
    return (vals.sum() ** 2 / (vals**2).sum()).item()


def calibration_stats(lm: LoadedModel, blocks: torch.Tensor, fisher: bool = True, batch_size: int = 2,
                      progress: bool = True) -> dict[str, LayerStats]:
    """Accumulate H, E|x| and (optionally) the activation Fisher of every linear layer.

    Args:
        blocks: (block, token) calibration token ids.
        fisher: also run a backward pass per batch for F.
    Returns:
        {layer name: LayerStats}
    """
    layers = linear_layers(lm.model)
    stats = {name: None for name in layers}
    with _hooks(layers, stats, fisher), torch.set_grad_enabled(fisher):
        for start in tqdm(range(0, len(blocks), batch_size), desc="calibration", disable=not progress):
            batch = blocks[start : start + batch_size]
            # Weights stay frozen; gradients flow to the activations through embeddings that require them.
            embeds = lm.model.get_input_embeddings()(batch).detach().requires_grad_(fisher)
            logits = lm.model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
            if fisher:
                F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="sum").backward()
    return stats


@contextlib.contextmanager
def _hooks(layers: dict, stats: dict, fisher: bool):
    def forward(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (token, in)
            s = stats[name]
            if s is None:
                d = x.shape[1]
                s = stats[name] = LayerStats(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                                             torch.zeros(d, d, dtype=torch.float64) if fisher else None)
            s.xx += x.T @ x
            s.x_abs += x.abs().sum(0)
            s.n += len(x)
        return hook

    def backward(name):
        def hook(module, grad_input, grad_output):
            g = grad_input[0].detach().reshape(-1, grad_input[0].shape[-1]).double()  # (token, in)
            stats[name].gg += g.T @ g
        return hook

    handles = [m.register_forward_hook(forward(n)) for n, m in layers.items()]
    if fisher:
        handles += [m.register_full_backward_hook(backward(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
