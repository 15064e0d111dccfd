"""KV-cache quantization (SPEC §9): quantizers, model-visible error metrics, HeadQ, a quantized cache.

- ``quant``: asymmetric min–max quantizers (per-token, per-channel), references, bit accounting.
- ``metrics``: key MSE, logit MSE, shift-invariant Fisher error, attention KL, output error.
- ``headq``: query-basis calibration, side codes, controls (wrong sign, random, key-PCA, null space).
- ``cache``: ``QuantizedKVCache``, a transformers ``Cache`` storing codes, scales and side codes.
- ``policy``: the A² value policy.
- ``decode``: decode-style perplexity through the cache, token by token (the reference).
- ``onepass``: the same decode NLL in one forward pass per block (attention function ``atlas_kvquant``).
- ``transform``: transform codes of keys: query-aware transform coding (Σ_q eigenbasis, bits by reverse
  water-filling on the query energy), Hadamard and random rotations, Lloyd–Max and static grids.
- ``rope``: RoPE tables, un-/re-rotation for pre-RoPE keys, the RoPE-averaged query covariance.
- ``storage``: every key code at the storage KIVI actually holds (Pareto rows, equal-storage verdicts).
- ``fused``: a numba decode-attention kernel that reads the packed codes (``KVQuantConfig(fused=True)``
  under ``fused.decoding(model)``), with its plain torch reference.
- ``bench``: decode step time and memory (``atlas bench kvquant``, ``atlas bench kv-decode``).

Intervals and the excess-removed fraction come from ``atlas_core.interval``.
"""

from atlas_core.kvquant.cache import KVQuantConfig, QuantizedKVCache, expected_bits
from atlas_core.kvquant.decode import decode_nll, decode_perplexity
from atlas_core.kvquant.headq import SideCode, calibrate
from atlas_core.kvquant.quant import QuantSpec, bits_per_element, dequantize, quantize

__all__ = [
    "KVQuantConfig",
    "QuantSpec",
    "QuantizedKVCache",
    "SideCode",
    "bits_per_element",
    "calibrate",
    "decode_nll",
    "decode_perplexity",
    "dequantize",
    "expected_bits",
    "quantize",
]
