"""Quantize every linear layer of a model with one method, layer by layer, with progress (SPEC §8).

Statistics come from the full-precision model (one calibration pass, ``calib.calibration_stats``); each
layer's weight is replaced by its dequantized quantization, in place. Per layer we record the relative
weight error ‖W − Ŵ‖_F / ‖W‖_F and the relative output error tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Ŵ.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from atlas_core.wquant.awq import AWQConfig, AWQLayer, awq_quantize, awq_search, output_error
from atlas_core.wquant.calib import LayerStats, linear_layers, weight_of
from atlas_core.wquant.gptq import gptq
from atlas_core.wquant.rotations import haar, lambda_scaled_quantize, randomized_hadamard, rotate_quantize
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn

METHODS = ("rtn", "gptq", "awq", "rot-fisher", "rot-haar", "rot-hadamard", "nqp-scaled")

__all__ = ["METHODS", "quantize_layer", "quantize_model"]


def quantize_layer(w: torch.Tensor, method: str, spec: WQuantSpec, stats: LayerStats | None, seed: int = 0,
                   awq_layer: AWQLayer | None = None) -> torch.Tensor:
    """One layer's dequantized weight (out, in) under ``method`` (AWQ: from its block search, ``awq_layer``)."""
    if method == "rtn":
        return quantize_rtn(w, spec)
    if method == "gptq":
        return gptq(w, stats.h, spec)
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
                   progress: bool = True, judge: dict[str, LayerStats] | None = None, blocks: torch.Tensor | None = None,
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
        w = weight_of(module).float()
        st = stats.get(name) if stats else None
        w_hat = quantize_layer(w, method, spec, st, seed, plan.get(name))
        row = {"layer": name, "weight_error": ((w_hat - w).norm() / w.norm()).item()}
        ref = (judge or stats or {}).get(name)
        if ref is not None:
            row["output_error"] = output_error(w, w_hat, ref.h) / output_error(w, torch.zeros_like(w), ref.h)
        rows.append(row)
        module.weight.copy_(w_hat.T if isinstance(module, Conv1D) else w_hat)
    return rows
