"""AWQ (Lin et al. 2024): protect salient input channels by scaling them up before quantization.

Per input channel j, s_j = mean|x_j|^α (normalised so that max(s)·min(s) = 1); the layer stores
Q(W·diag(s)) and computes with Q(W·diag(s))·diag(s)⁻¹, which equals W before rounding. α is searched on
a grid to minimise the layer's output error ‖(W − Ŵ) X‖² on calibration inputs; α = 0 is plain RTN.
"""

from __future__ import annotations

import torch

from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn

__all__ = ["awq", "awq_scales"]

GRID = tuple(i / 20 for i in range(21))  # α = 0, 0.05, …, 1


def awq_scales(x_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel scales (in,) from mean |x| (in,) and exponent α."""
    s = x_abs_mean.float().clamp_min(1e-8) ** alpha
    return s / (s.max() * s.min()).sqrt()


def awq(w: torch.Tensor, x: torch.Tensor, spec: WQuantSpec, grid=GRID) -> tuple[torch.Tensor, float]:
    """AWQ with the exponent searched on ``grid``.

    Args:
        w: (out, in) weight; x: (n, in) calibration inputs of the layer.
    Returns:
        (dequantized (out, in) weight, the chosen α)
    """
    x = x.float()
    mean_abs = x.abs().mean(0)
    ref = x @ w.float().T  # (n, out)
    best = None
    for alpha in grid:
        s = awq_scales(mean_abs, alpha)
        w_hat = quantize_rtn(w.float() * s, spec) / s
        err = (x @ w_hat.T - ref).pow(2).sum().item()
        if best is None or err < best[0]:
            best = (err, w_hat, alpha)
    return best[1], best[2]
