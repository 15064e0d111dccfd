"""Quantize every linear layer of a model with one method, layer by layer, with progress (SPEC §8).

Two pipelines, each replacing every layer's weight by its dequantized quantization, in place:

- ``quantize_model``: statistics from the full-precision model (one calibration pass,
  ``calib.calibration_stats``), every layer quantized from them.
- ``quantize_model_sequential``: IST-DASLab/gptq's ``*_sequential``: decoder block by decoder block, and
  within a block group by group (layers sharing an input: q/k/v, o, gate/up, down), each group's inputs
  re-collected through everything already quantized. The cached hidden states between blocks make it
  about one model forward per block group; ``quantize_model_sequential_reference`` re-runs the whole model
  for every group instead, and the tests hold the two equal.

Per layer we record the relative weight error ‖W − Ŵ‖_F / ‖W‖_F and the relative output error
tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Ŵ.
"""

from __future__ import annotations

import torch
from atlas_core.attention import decoder_layers
from atlas_core.progress import tqdm  # names the running chapter
from transformers.pytorch_utils import Conv1D

from atlas_core.wquant.awq import AWQConfig, AWQLayer, awq_quantize, awq_search, output_error
from atlas_core.wquant.calib import (LayerStats, add_inputs, block_inputs, group_by_input, group_stats,
                                     linear_groups, linear_layers, run_block, weight_of)
from atlas_core.wquant.gptq import GPTQConfig, gptq
from atlas_core.wquant.rotations import haar, lambda_scaled_quantize, randomized_hadamard, rotate_quantize
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn

METHODS = ("rtn", "gptq", "awq", "rot-fisher", "rot-haar", "rot-hadamard", "nqp-scaled")

SEQUENTIAL_METHODS = ("rtn", "gptq")  # those that need only H and E|x|, no backward pass
# (AWQ searches on full-precision block inputs, as llm-awq does: quantize_model with ``blocks``.)

__all__ = ["METHODS", "SEQUENTIAL_METHODS", "quantize_layer", "quantize_model", "quantize_model_sequential",
           "quantize_model_sequential_reference"]


def quantize_layer(w: torch.Tensor, method: str, spec: WQuantSpec, stats: LayerStats | None, seed: int = 0,
                   gptq_config: GPTQConfig = GPTQConfig(), awq_layer: AWQLayer | None = None) -> torch.Tensor:
    """One layer's dequantized weight (out, in) under ``method`` (AWQ: from its block search, ``awq_layer``)."""
    if method == "rtn":
        return quantize_rtn(w, spec)
    if method == "gptq":
        return gptq(w, stats.h, spec, damp=gptq_config.damp, act_order=gptq_config.act_order, block=gptq_config.block)
    if method == "awq":
        if awq_layer is None:
            raise ValueError("AWQ searches its scales per decoder block: run awq.awq_search (or quantize_model with blocks)")
        return awq_quantize(w, awq_layer, spec)
    if method == "rot-fisher":
        return rotate_quantize(w, stats.fisher_eigh[1], spec)
    if method == "rot-haar":
        return rotate_quantize(w, haar(w.shape[1], seed), spec)
    if method == "rot-hadamard":
        return rotate_quantize(w, randomized_hadamard(w.shape[1], seed), spec)
    if method == "nqp-scaled":
        return lambda_scaled_quantize(w, stats.fisher, spec, eigh=stats.fisher_eigh)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


@torch.no_grad()
def quantize_model(model, method: str, spec: WQuantSpec, stats: dict[str, LayerStats] | None = None, seed: int = 0,
                   progress: bool = True, judge: dict[str, LayerStats] | None = None,
                   gptq_config: GPTQConfig = GPTQConfig(), blocks: torch.Tensor | None = None,
                   awq_config: AWQConfig = AWQConfig(), batch_size: int = 8) -> list[dict]:
    """Replace every decoder linear layer's weight by its quantization, in place.

    Args:
        stats: calibration statistics (needed by gptq, rot-fisher and nqp-scaled).
        blocks: (block, token) calibration token ids, for AWQ's per-block search (``awq.awq_search``, run
            ``batch_size`` blocks at a time with ``awq_config``).
        judge: statistics of held-out inputs for the output error (default: ``stats``; GPTQ and AWQ
            minimise the error on their calibration inputs, so only held-out inputs judge them fairly).
    Returns:
        per layer {"layer", "weight_error", "output_error"} (relative; output error needs stats).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if stats is None and method in ("gptq", "rot-fisher", "nqp-scaled"):
        raise ValueError(f"method {method!r} needs calibration statistics (calib.calibration_stats)")
    if method == "awq" and blocks is None:
        raise ValueError("method 'awq' needs calibration blocks (blocks=...) for its per-block scale and clip search")
    plan = awq_search(model, blocks, spec, awq_config, batch_size, progress) if method == "awq" else {}
    rows = []
    for name, module in tqdm(linear_layers(model).items(), desc=method, disable=not progress):
        rows.append(_replace(name, module, method, spec, stats.get(name) if stats else None, seed,
                             (judge or stats or {}).get(name), gptq_config, plan.get(name)))
    return rows


def _replace(name, module, method, spec, stats, seed, judge, gptq_config, awq_layer=None) -> dict:
    """Quantize one layer in place; its row of errors (output errors on ``judge``'s and ``stats``' inputs)."""
    w = weight_of(module).float()
    w_hat = quantize_layer(w, method, spec, stats, seed, gptq_config, awq_layer)
    row = {"layer": name, "weight_error": ((w_hat - w).norm() / w.norm()).item()}
    for key, ref in (("output_error", judge), ("calib_output_error", stats)):
        if ref is not None:
            row[key] = output_error(w, w_hat, ref.h) / ref.output_energy(name, w)
    module.weight.copy_(w_hat.T if isinstance(module, Conv1D) else w_hat)
    return row


def _check_sequential(method: str) -> None:
    if method not in SEQUENTIAL_METHODS:
        raise ValueError(f"method {method!r} cannot run sequentially (it needs the full model's backward pass); "
                         f"choose one of {SEQUENTIAL_METHODS} or use quantize_model")


@torch.no_grad()
def quantize_model_sequential(model, method: str, spec: WQuantSpec, blocks: torch.Tensor, *, batch_size: int = 8,
                              gptq_config: GPTQConfig = GPTQConfig(), seed: int = 0, progress: bool = True,
                              judge: dict[str, LayerStats] | None = None) -> list[dict]:
    """Quantize decoder block by block, each group's inputs re-collected through what is already quantized.

    Args:
        blocks: (block, token) calibration token ids.
        batch_size: blocks per forward (memory only).
        gptq_config: ``true_sequential`` splits each block into its groups of layers sharing an input;
            ``damp``, ``act_order`` and ``block`` go to GPTQ.
        judge: held-out input statistics (``calibration_stats`` of the full-precision model) for
            ``output_error``; ``calib_output_error`` is always on the re-collected calibration inputs.
    Returns:
        per layer {"layer", "weight_error", "calib_output_error"[, "output_error"]}, in quantization order.
    Source:
        IST-DASLab/gptq, ``llama_sequential`` / ``opt_sequential`` (``--true-sequential``).
    """
    _check_sequential(method)
    names = {m: n for n, m in model.named_modules()}
    inputs = block_inputs(model, blocks, batch_size)
    rows = []
    for i, layer in enumerate(tqdm(decoder_layers(model), desc=f"{method} (sequential)", disable=not progress)):
        groups = linear_groups(layer, i, inputs)
        for part in ([g] for g in groups) if gptq_config.true_sequential else [groups]:
            stats = group_stats(layer, i, inputs, part)
            for local in (n for g in part for n in g):
                name = f"{names[layer]}.{local}"
                rows.append(_replace(name, layer.get_submodule(local), method, spec, stats[local], seed,
                                     (judge or {}).get(name), gptq_config))
        inputs.hidden = run_block(layer, i, inputs)  # the next block sees this block's quantized outputs
    return rows


@torch.no_grad()
def quantize_model_sequential_reference(model, method: str, spec: WQuantSpec, blocks: torch.Tensor, *,
                                        batch_size: int = 8, gptq_config: GPTQConfig = GPTQConfig(),
                                        seed: int = 0) -> list[dict]:
    """The same, plainly: for every group, the whole model runs on every calibration batch (no cached
    hidden states, no early stop). Groups are the linear layers that read one input tensor, in run order."""
    _check_sequential(method)
    layers = linear_layers(model)
    units = _run_order_groups(model, blocks[:batch_size], layers)
    if not gptq_config.true_sequential:  # one unit per decoder block
        merged: dict[str, list[list[str]]] = {}
        for g in units:
            merged.setdefault(_block_of(g[0]), []).append(g)
        units = [sum(u, []) for u in merged.values()]
    rows = []
    for unit in units:
        found: dict[str, LayerStats] = {}
        hooks = [layers[n].register_forward_pre_hook(lambda m, args, n=n: add_inputs(found, n, args[0])) for n in unit]
        try:
            for start in range(0, len(blocks), batch_size):
                model(blocks[start : start + batch_size], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        rows += [_replace(n, layers[n], method, spec, found[n], seed, None, gptq_config) for n in unit]
    return rows


def _block_of(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'model.layers.3'."""
    parts = name.split(".")
    return ".".join(parts[: next(i for i, p in enumerate(parts) if p.isdigit()) + 1])


def _run_order_groups(model, batch: torch.Tensor, layers: dict) -> list[list[str]]:
    """Linear layers in the order one forward runs them, consecutive ones reading the same tensor grouped."""
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: order.append((n, args[0]))) for n, m in layers.items()]
    try:
        model(batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return group_by_input(order)
