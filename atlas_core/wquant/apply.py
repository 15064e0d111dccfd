"""Quantize every linear layer of a model with one method, layer by layer, with progress (SPEC §8).

Statistics come from the full-precision model (one calibration pass, ``calib.calibration_stats``); each
layer's weight is replaced by its dequantized quantization, in place. Per layer we record the relative
weight error ‖W − Ŵ‖_F / ‖W‖_F and the relative output error tr(E H Eᵀ) / tr(W H Wᵀ), E = W − Ŵ.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from atlas_core.wquant.awq import awq, output_error
from atlas_core.wquant.calib import LayerStats, linear_layers, weight_of
from atlas_core.wquant.gptq import gptq
from atlas_core.wquant.rotations import haar, lambda_scaled_quantize, randomized_hadamard, rotate_quantize
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn

METHODS = ("rtn", "gptq", "awq", "rot-fisher", "rot-haar", "rot-hadamard", "nqp-scaled")

__all__ = ["METHODS", "quantize_layer", "quantize_model"]


def quantize_layer(w: torch.Tensor, method: str, spec: WQuantSpec, stats: LayerStats | None, seed: int = 0) -> torch.Tensor:
    """One layer's dequantized weight (out, in) under ``method``."""
    if method == "rtn":
        return quantize_rtn(w, spec)
    if method == "gptq":
        return gptq(w, stats.h, spec)
    if method == "awq":
        return awq(w, stats.h, stats.mean_abs, spec)[0]
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
                   progress: bool = True, judge: dict[str, LayerStats] | None = None) -> list[dict]:
    """Replace every decoder linear layer's weight by its quantization, in place.

    Args:
        stats: calibration statistics (needed by every method but rtn, rot-haar and rot-hadamard).
        judge: statistics of held-out inputs for the output error (default: ``stats``; GPTQ and AWQ
            minimise the error on their calibration inputs, so only held-out inputs judge them fairly).
    Returns:
        per layer {"layer", "weight_error", "output_error"} (relative; output error needs stats).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if stats is None and method in ("gptq", "awq", "rot-fisher", "nqp-scaled"):
        raise ValueError(f"method {method!r} needs calibration statistics (calib.calibration_stats)")
    rows = []
    for name, module in tqdm(linear_layers(model).items(), desc=method, disable=not progress):
        w = weight_of(module).float()
        st = stats.get(name) if stats else None
        w_hat = quantize_layer(w, method, spec, st, seed)
        row = {"layer": name, "weight_error": ((w_hat - w).norm() / w.norm()).item()}
        ref = (judge or stats or {}).get(name)
        if ref is not None:
            row["output_error"] = output_error(w, w_hat, ref.h) / output_error(w, torch.zeros_like(w), ref.h)
        rows.append(row)
        module.weight.copy_(w_hat.T if isinstance(module, Conv1D) else w_hat)
    return rows
