"""One weight-quantization run: calibrate, quantize a copy of the model, measure held-out perplexity."""

from __future__ import annotations

import copy
import time

import torch

from atlas_core.eval import perplexity
from atlas_core.models import LoadedModel
from atlas_core.wquant.apply import quantize_model
from atlas_core.wquant.calib import LayerStats, calibration_stats
from atlas_core.wquant.rtn import WQuantSpec

__all__ = ["run_wquant"]


def run_wquant(lm: LoadedModel, method: str, spec: WQuantSpec, calib: torch.Tensor, eval_blocks: torch.Tensor,
               stats: dict[str, LayerStats] | None = None, ppl_fp: float | None = None, seed: int = 0,
               progress: bool = False, judge: dict[str, LayerStats] | None = None) -> dict:
    """Quantize a deep copy of ``lm.model`` with ``method`` and measure it (the original is untouched).

    Args:
        calib: (block, token) calibration blocks (used when ``stats`` is None and the method needs them).
        eval_blocks: (block, token) held-out blocks for perplexity.
        stats, ppl_fp: reuse across runs of a sweep.
        judge: held-out input statistics for the layer output error (default: the calibration ones).
    Returns:
        {"method", "bits", "group", "symmetric", "ppl", "ppl_fp", "weight_error", "output_error" (means over
        layers), "layers" (per-layer rows), "seconds"}
    """
    start = time.perf_counter()
    if stats is None and method != "rtn":
        stats = calibration_stats(lm, calib, fisher=method in ("rot-fisher", "nqp-scaled"), progress=progress)
    if ppl_fp is None:
        ppl_fp = perplexity(lm.model, eval_blocks, progress=progress)
    model = copy.deepcopy(lm.model)
    rows = quantize_model(model, method, spec, stats, seed, progress=progress, judge=judge, blocks=calib)  # AWQ searches on calib
    ppl = perplexity(model, eval_blocks, progress=progress)
    out_err = [r["output_error"] for r in rows if "output_error" in r]
    return {"method": method, "bits": spec.bits, "group": spec.group, "symmetric": spec.symmetric, "ppl": ppl,
            "ppl_fp": ppl_fp, "weight_error": sum(r["weight_error"] for r in rows) / len(rows),
            "output_error": sum(out_err) / len(out_err) if out_err else None, "layers": rows,
            "seconds": time.perf_counter() - start}
