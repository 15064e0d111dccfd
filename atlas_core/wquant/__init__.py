"""Weight quantization (SPEC §8): RTN, rotations, GPTQ and AWQ, each returning dequantized weights.

- ``rtn``: round-to-nearest per output channel or per group, symmetric or asymmetric (+ reference).
- ``rotations``: Q(W U) Uᵀ with U = I, an eigenbasis, Haar random or randomized Hadamard.
- ``gptq``: error feedback through the Cholesky factor of H⁻¹ (+ a column-by-column reference).
- ``awq``: activation-aware scales shared by the layers that read one input (foldable), then a clipping search.
- ``calib``: H = E[x xᵀ], E|x| and the activation Fisher of every linear layer; participation ratios;
  ``CalibConfig`` (which calibration tokens) and the per-decoder-block inputs of a sequential pipeline.
- ``apply``: one method over every linear layer of a model, in place, with per-layer errors: from one
  full-precision pass, or block by block through the already-quantized blocks (GPTQ's reference pipeline).
"""

from atlas_core.wquant.awq import awq_search
from atlas_core.wquant.gptq import gptq, gptq_reference
from atlas_core.wquant.rotations import eigenbasis, haar, randomized_hadamard, rotate_quantize
from atlas_core.wquant.rtn import WQuantSpec, quantize_rtn, quantize_rtn_reference

__all__ = ["WQuantSpec", "awq_search", "eigenbasis", "gptq", "gptq_reference", "haar", "quantize_rtn",
           "quantize_rtn_reference", "randomized_hadamard", "rotate_quantize"]
