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
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from atlas_core.progress import tqdm  # names the running chapter
from transformers.pytorch_utils import Conv1D

from atlas_core.attention import decoder_layers
from atlas_core.models import LoadedModel
from atlas_core.wquant.rotations import eigh_descending

__all__ = ["BlockInputs", "CalibConfig", "LayerStats", "add_inputs", "block_inputs", "calibration_stats",
           "calibration_stats_reference", "group_stats",
           "linear_groups", "linear_layers", "participation_ratio", "run_block"]


@dataclass
class LayerStats:
    """Sums over calibration tokens of one linear layer; ``h``, ``mean_abs``, ``fisher`` give the means."""

    xx: torch.Tensor  # (in, in) Σ x xᵀ
    x_abs: torch.Tensor  # (in,) Σ |x|
    gg: torch.Tensor | None  # (in, in) Σ g gᵀ, or None without the Fisher
    n: int = 0
    energies: dict = field(default_factory=dict, repr=False, compare=False)  # output_energy's memo

    def output_energy(self, name: str, w: torch.Tensor) -> float:
        """E‖W x‖² = tr(W H Wᵀ) of layer ``name``'s weight w (out, in) on these inputs (fp64).

        The denominator of every relative output error; the same for every run that judges on these
        statistics, so it is computed once per (layer, weight): the key holds the weight's sum and sum of
        squares, so a changed weight is recomputed.
        """
        wd = w.detach().double()
        key = (name, wd.sum().item(), wd.square().sum().item())
        if key not in self.energies:
            self.energies[key] = ((wd.to(self.xx.dtype) @ self.h) * wd).sum().item()
        return self.energies[key]

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

    x xᵀ and g gᵀ are summed in fp32 within a batch and in fp64 across batches (``add_inputs``, GPTQ's
    reference's precision), and the layers that read one input tensor (q/k/v, gate/up) share one x xᵀ
    of it: ``calibration_stats_reference`` does every product in fp64 per layer, and a test holds the two
    equal to fp32 rounding.

    Args:
        blocks: (block, token) calibration token ids.
        fisher: also run a backward pass per batch for F.
    Returns:
        {layer name: LayerStats}
    """
    return _calibration_stats(lm, blocks, fisher, batch_size, progress, _FastHooks)


def calibration_stats_reference(lm: LoadedModel, blocks: torch.Tensor, fisher: bool = True, batch_size: int = 2,
                                progress: bool = False) -> dict[str, LayerStats]:
    """``calibration_stats`` plainly: every layer's x xᵀ and g gᵀ in fp64 on its own."""
    return _calibration_stats(lm, blocks, fisher, batch_size, progress, _PlainHooks)


def _calibration_stats(lm, blocks, fisher, batch_size, progress, hooks) -> dict[str, LayerStats]:
    layers = linear_layers(lm.model)
    stats = {name: None for name in layers}
    with hooks(layers, stats, fisher), torch.set_grad_enabled(fisher):
        for start in tqdm(range(0, len(blocks), batch_size), desc="calibration", disable=not progress):
            batch = blocks[start : start + batch_size]
            # Weights stay frozen; gradients flow to the activations through embeddings that require them.
            embeds = lm.model.get_input_embeddings()(batch).detach().requires_grad_(fisher)
            logits = lm.model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
            if fisher:
                F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="sum").backward()
    return stats


def _new_stats(d: int, fisher: bool) -> LayerStats:
    return LayerStats(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                      torch.zeros(d, d, dtype=torch.float64) if fisher else None)


class _PlainHooks(contextlib.AbstractContextManager):
    """Forward hooks adding each layer's x xᵀ, Σ|x| (and backward hooks its g gᵀ) in fp64, layer by layer."""

    def __init__(self, layers: dict, stats: dict, fisher: bool):
        self.layers, self.stats, self.fisher = layers, stats, fisher
        self.handles = [m.register_forward_hook(self._forward(n)) for n, m in layers.items()]
        if fisher:
            self.handles += [m.register_full_backward_hook(self._backward(n)) for n, m in layers.items()]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def products(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x xᵀ (in, in), Σ|x| (in,)) of inputs x (..., in), in fp64."""
        x = x.detach().reshape(-1, x.shape[-1]).double()  # (token, in)
        return x.T @ x, x.abs().sum(0)

    def _forward(self, name):
        def hook(module, inputs, output):
            x = inputs[0]
            if self.stats[name] is None:
                self.stats[name] = _new_stats(x.shape[-1], self.fisher)
            s = self.stats[name]
            xx, x_abs = self.products(x)
            s.xx += xx
            s.x_abs += x_abs
            s.n += x.numel() // x.shape[-1]
        return hook

    def _backward(self, name):
        def hook(module, grad_input, grad_output):
            g = grad_input[0].detach().reshape(-1, grad_input[0].shape[-1])  # (token, in)
            self.stats[name].gg += self.outer(g)
        return hook

    def outer(self, g: torch.Tensor) -> torch.Tensor:
        g = g.double()
        return g.T @ g


class _FastHooks(_PlainHooks):
    """The same sums, each product in fp32 and added in fp64, one x xᵀ per input tensor (q/k/v, gate/up share)."""

    def __init__(self, layers: dict, stats: dict, fisher: bool):
        self.last: tuple = (None, None)  # (input tensor, its products): the next layer may read the same tensor
        super().__init__(layers, stats, fisher)

    def products(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last[0] is not x:
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (token, in)
            self.last = (x, ((flat.T @ flat).double(), flat.abs().sum(0).double()))
        return self.last[1]

    def outer(self, g: torch.Tensor) -> torch.Tensor:
        g = g.float()
        return (g.T @ g).double()

    def __exit__(self, *exc):
        self.last = (None, None)
        return super().__exit__(*exc)


# ----------------------------------------------------------------------------- decoder blocks, one at a time


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """Which calibration tokens a method sees: corpus, how many tokens, in blocks of what length.

    GPTQ's reference (IST-DASLab/gptq, ``--nsamples 128`` random windows of 2,048 tokens of C4) calibrates
    on 262,144 tokens. C4 is out of reach offline, and sequential GPTQ costs ~8 ms of one CPU thread per
    calibration token on smollm2-135m (~35 min for the reference's count), so the default is what was
    measured to serve as well here (issue 14, smollm2-135m at 3 bits, held-out perplexity): the largest
    offline corpus, ``plays`` (216 at 16K tokens against 290 for ``britannica``), blocks of 512 (2,048
    read 264), and 8,192 tokens (187; 16K and 32K read 216 and 179: no trend beyond the spread between
    calibration sets), which keeps the nqp chapter's four GPTQ runs near 2 min each.
    """

    corpus: str = "plays"
    tokens: int = 8_192
    seq_len: int = 512
    batch_size: int = 8  # blocks per forward; memory only, the statistics do not depend on it

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"calibration seq_len must be at least 2 tokens per block, got {self.seq_len}")
        if self.tokens < self.seq_len:
            raise ValueError(f"calibration tokens ({self.tokens}) must be at least seq_len ({self.seq_len})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def block_spec(self):
        """The ``corpus.BlockSpec`` of the calibration blocks: the first tokens // seq_len of the calib split."""
        from atlas_core.corpus import BlockSpec

        return BlockSpec(corpus=self.corpus, seq_len=self.seq_len, n_blocks=self.tokens // self.seq_len, split="calib")

    def blocks(self, lm: LoadedModel) -> torch.Tensor:
        """(block, token) calibration ids (``block_spec``)."""
        from atlas_core.corpus import token_blocks

        return token_blocks(lm, self.block_spec())


class _Stop(Exception):
    """Raised by a hook to end a forward once what it needed has been recorded."""


@dataclass
class BlockInputs:
    """What enters one decoder block for each calibration batch: the hidden states, and the other arguments
    the model passes (masks, position embeddings; GPT-2 passes some by position), recorded per block."""

    hidden: list[torch.Tensor]  # per batch (batch, token, d_model)
    rest: list[list[tuple[tuple, dict]]]  # [block][batch] (positional args after the hidden states, kwargs)

    def call(self, layer, index: int, batch: int, hidden: torch.Tensor):
        """Block ``index``'s forward on ``hidden`` with the arguments recorded for calibration batch ``batch``."""
        args, kwargs = self.rest[index][batch]
        return layer(hidden, *args, **kwargs)


@torch.no_grad()
def block_inputs(model, blocks: torch.Tensor, batch_size: int) -> BlockInputs:
    """The first decoder block's inputs on ``blocks`` (block, token), and every block's other arguments.

    The other arguments (attention masks, which differ between sliding and full layers; RoPE cos/sin)
    depend only on the batch's shape, so one forward per distinct batch size, up to the last block, records
    them; every other batch stops at block 0.
    """
    layers = decoder_layers(model)
    hidden, seen, rest = [], {}, [[] for _ in layers]
    record = {}

    def pre_hook(i):
        def hook(module, args, kw):
            record[i] = (args[1:], {k: v for k, v in kw.items() if k != "hidden_states"})
            if i == 0:
                record["hidden"] = (args[0] if args else kw["hidden_states"]).detach()
            if "stop" in record or i == len(layers) - 1:  # what is needed is known: skip the rest and the head
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            record.clear()
            if len(batch) in seen:
                record["stop"] = True  # the block kwargs of this shape are known: stop at block 0
            with contextlib.suppress(_Stop):
                model(batch, use_cache=False)
            hidden.append(record["hidden"])
            if len(batch) not in seen:
                seen[len(batch)] = [record[i] for i in range(len(layers))]
            for i in range(len(layers)):
                rest[i].append(seen[len(batch)][i])
    finally:
        for h in handles:
            h.remove()
    return BlockInputs(hidden, rest)


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # GPT-2 blocks return tuples, Llama-style ones tensors


@torch.no_grad()
def run_block(layer, index: int, inputs: BlockInputs, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Block ``index``'s outputs (per batch (batch, token, d_model)) for ``hidden`` (default: inputs.hidden)."""
    hidden = inputs.hidden if hidden is None else hidden
    return [_block_output(inputs.call(layer, index, b, h)) for b, h in enumerate(hidden)]


@torch.no_grad()
def linear_groups(layer, index: int, inputs: BlockInputs) -> list[list[str]]:
    """The block's linear layers in the order they run, those reading the same input tensor grouped.

    Llama-style blocks give [q, k, v], [o], [gate, up], [down]: the groups of GPTQ's ``--true-sequential``.
    Found by running the block on the first calibration batch, so any architecture works.
    """
    order = []  # (name, input tensor)
    names = {m: n for n, m in layer.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    hooks = [m.register_forward_hook(lambda m, args, out: order.append((names[m], args[0]))) for m in names]
    try:
        inputs.call(layer, index, 0, inputs.hidden[0])
    finally:
        for h in hooks:
            h.remove()
    return group_by_input(order)


def group_by_input(order: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Names of layers in run order, consecutive layers that read the very same input tensor grouped."""
    groups: list[list[str]] = []
    for k, (name, x) in enumerate(order):
        if k and x is order[k - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def add_inputs(found: dict[str, LayerStats], key: str, x: torch.Tensor) -> None:
    """Add a batch of inputs x (..., in) to ``found[key]``'s sums (created on first use), without a Fisher.

    x xᵀ is summed in fp32 within the batch, as GPTQ's reference does, and across batches in fp64.
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()  # (token, in)
    if key not in found:
        d = x.shape[1]
        found[key] = LayerStats(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), None)
    s = found[key]
    s.xx += (x.T @ x).double()
    s.x_abs += x.abs().sum(0).double()
    s.n += len(x)


@torch.no_grad()
def group_stats(layer, index: int, inputs: BlockInputs, groups: list[list[str]],
                hidden: list[torch.Tensor] | None = None) -> dict[str, LayerStats]:
    """H = E[x xᵀ] and E|x| of the input that each group of linear layers of one block shares.

    Runs the block as it is now (earlier groups may already be quantized) on every batch, and stops each
    forward once the last group's input has been seen. ``groups`` must be in the order the block runs them.

    Returns:
        {linear name: LayerStats}; the layers of one group share one LayerStats.
    """
    found: dict[str, LayerStats] = {}

    def hook(group, last):
        def pre(m, args):
            add_inputs(found, group[0], args[0])
            if last:
                raise _Stop
        return pre

    handles = [layer.get_submodule(g[0]).register_forward_pre_hook(hook(g, k == len(groups) - 1)) for k, g in enumerate(groups)]
    try:
        for b, h in enumerate(inputs.hidden if hidden is None else hidden):
            with contextlib.suppress(_Stop):
                inputs.call(layer, index, b, h)
    finally:
        for handle in handles:
            handle.remove()
    return {name: found[g[0]] for g in groups for name in g}
