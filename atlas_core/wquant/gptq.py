"""GPTQ (Frantar et al. 2023): quantize columns in order, feeding each column's error forward.

With H = E[x xᵀ] (in, in) of the layer's inputs, quantizing column i to q_i leaves the error
e = (w_i − q_i) / [H⁻¹]_ii, and the remaining columns absorb it: W[:, j] −= e · [H⁻¹]_ij for j > i, where
H⁻¹ is represented by the upper Cholesky factor of the inverse (Frantar et al.'s formulation). H is
dampened by λ·mean(diag H); inputs that never fire (diag 0) are dropped. Group parameters are set from
the error-updated weights when a group starts. ``act_order`` visits columns by decreasing diag H.

``gptq_reference`` updates every remaining column after each column; ``gptq`` does the same arithmetic in
blocks of columns with one lazy update per block. The tests hold them equal. ``GPTQConfig`` holds the
settings of IST-DASLab/gptq's ``*_sequential`` pipeline (run by ``apply.quantize_model_sequential``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atlas_core.wquant.rtn import WQuantSpec, group_params, quantize_with

__all__ = ["GPTQConfig", "gptq", "gptq_reference", "inverse_cholesky"]


@dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    """How GPTQ runs; the defaults are those of IST-DASLab/gptq (``opt.py``/``llama.py``).

    Attributes:
        damp: λ as a fraction of mean(diag H) (the reference's ``--percdamp .01``).
        act_order: visit columns by decreasing diag H (the reference's ``--act-order``, off by default).
        sequential: quantize decoder block by block, each block's inputs re-collected through the blocks
            already quantized (the reference's ``*_sequential``); False: every layer from one pass of the
            full-precision model.
        true_sequential: within a block, quantize the groups of layers that share an input in order
            (q/k/v, o, gate/up, down), each group's inputs re-collected after the ones before it
            (``--true-sequential``); False: the whole block from one pass.
        block: columns per lazy update (speed only; the result does not depend on it).
    """

    damp: float = 0.01
    act_order: bool = False
    sequential: bool = True
    true_sequential: bool = True
    block: int = 128

    def __post_init__(self):
        if not 0 < self.damp < 1:  # 0 leaves a singular H singular: Cholesky fails on unused inputs
            raise ValueError(f"damp must be in (0, 1) (a fraction of mean diag H; the reference's 0.01), got {self.damp!r}")
        if self.block < 1:
            raise ValueError(f"block must be a positive number of columns, got {self.block!r}")


def inverse_cholesky(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, and the mask of dead inputs.

    Args:
        h: (in, in) symmetric positive semi-definite.
    Returns:
        (u (in, in) upper triangular with uᵀu = H_damped⁻¹, dead (in,) bool)
    """
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True), dead


def _prepare(w, h, act_order: bool, damp: float):
    w = w.double().clone()
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    u, dead = inverse_cholesky(h[order][:, order], damp)
    w = w[:, order]
    w[:, dead] = 0
    return w, u, order


def gptq_reference(w: torch.Tensor, h: torch.Tensor, spec: WQuantSpec, damp: float = 0.01,
                   act_order: bool = False) -> torch.Tensor:
    """GPTQ one column at a time. w: (out, in); h: (in, in). Returns the dequantized (out, in) fp32."""
    g = spec.group_size(w.shape[1])
    w, u, order = _prepare(w, h, act_order, damp)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % g == 0:
            scale, zero = group_params(w[:, i : i + g], spec)
        q[:, i] = quantize_with(w[:, i : i + 1], scale, zero, spec)[:, 0]
        err = (w[:, i] - q[:, i]) / u[i, i]
        w[:, i + 1 :] -= err[:, None] * u[i, i + 1 :][None, :]
    return q[:, torch.argsort(order)].float()


def gptq(w: torch.Tensor, h: torch.Tensor, spec: WQuantSpec, damp: float = 0.01, act_order: bool = False,
         block: int = 128) -> torch.Tensor:
    """GPTQ with lazy block updates (same result as ``gptq_reference``). Shapes as there."""
    g = spec.group_size(w.shape[1])
    w, u, order = _prepare(w, h, act_order, damp)
    n = w.shape[1]
    if g < n:  # a group that starts inside a block must end inside it (its parameters see the lazy updates)
        block = (block // g) * g if g < block else (g if g % block else block)
    q = torch.zeros_like(w)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb, errs = w[:, b0:b1].clone(), torch.zeros(w.shape[0], b1 - b0, dtype=w.dtype)
        for j in range(b1 - b0):
            i = b0 + j
            if i % g == 0:  # a group may start inside a block: its parameters see the updated columns
                scale, zero = group_params(torch.cat([wb[:, j:], w[:, b1:]], 1)[:, :g], spec)
            q[:, i] = quantize_with(wb[:, j : j + 1], scale, zero, spec)[:, 0]
            errs[:, j] = (wb[:, j] - q[:, i]) / u[i, i]
            wb[:, j + 1 :] -= errs[:, j : j + 1] * u[i, i + 1 : b1][None, :]
        w[:, b1:] -= errs @ u[b0:b1, b1:]  # the whole block's error reaches the later columns at once
    return q[:, torch.argsort(order)].float()
