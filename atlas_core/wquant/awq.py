"""AWQ (Lin et al. 2024): protect salient input channels by scaling them up before quantization.

Per input channel j, s_j = mean|x_j|^α (normalised so that max(s)·min(s) = 1); the layer stores
Q(W·diag(s)) and computes with Q(W·diag(s))·diag(s)⁻¹, which equals W before rounding. α is searched on
a grid to minimise the layer's mean output error E‖(W − Ŵ) x‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ), H = E[x xᵀ] of
the calibration inputs (so only H and mean|x| are needed); α = 0 is plain RTN.
"""

from __future__ import annotations

import torch

from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn

__all__ = ["awq", "awq_scales", "output_error"]

GRID = tuple(i / 20 for i in range(21))  # α = 0, 0.05, …, 1


def awq_scales(x_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel scales (in,) from mean |x| (in,) and exponent α."""
    s = x_abs_mean.float().clamp_min(1e-8) ** alpha
    return s / (s.max() * s.min()).sqrt()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """E‖(W − Ŵ) x‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ) for inputs with second moment H (in, in), in H's dtype."""
    e = (w - w_hat).to(h.dtype)
    return ((e @ h) * e).sum().item()


def awq(w: torch.Tensor, h: torch.Tensor, mean_abs: torch.Tensor, spec: WQuantSpec, grid=GRID) -> tuple[torch.Tensor, float]:
    """AWQ with the exponent searched on ``grid``.

    Args:
        w: (out, in) weight; h: (in, in) E[x xᵀ]; mean_abs: (in,) E|x| of the layer's calibration inputs.
    Returns:
        (dequantized (out, in) weight, the chosen α)
    """
    best, h = None, h.float()  # fp32 is enough to rank the exponents, and twice as fast
    for alpha in grid:
        s = awq_scales(mean_abs, alpha)
        w_hat = quantize_rtn(w.float() * s, spec) / s
        err = output_error(w, w_hat, h)
        if best is None or err < best[0]:
            best = (err, w_hat, alpha)
    return best[1], best[2]
