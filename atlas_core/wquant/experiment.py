"""One weight-quantization run: calibrate, quantize a copy of the model, measure held-out perplexity."""

from __future__ import annotations

import copy
import time

import torch

from atlas_core.eval import perplexity
from atlas_core.models import LoadedModel
from atlas_core.wquant.apply import quantize_model, quantize_model_sequential
from atlas_core.wquant.calib import CalibConfig, LayerStats, calibration_stats
from atlas_core.wquant.gptq import GPTQConfig
from atlas_core.wquant.rtn import WQuantSpec

__all__ = ["run_wquant"]


def run_wquant(lm: LoadedModel, method: str, spec: WQuantSpec, calib: torch.Tensor, eval_blocks: torch.Tensor,
               stats: dict[str, LayerStats] | None = None, ppl_fp: float | None = None, seed: int = 0,
               progress: bool = False, judge: dict[str, LayerStats] | None = None,
               gptq_config: GPTQConfig = GPTQConfig(), calib_config: CalibConfig = CalibConfig()) -> dict:
    """Quantize a deep copy of ``lm.model`` with ``method`` and measure it (the original is untouched).

    GPTQ with ``gptq_config.sequential`` (the default) runs its reference's pipeline
    (``apply.quantize_model_sequential``) on the blocks of ``calib_config``; every other method, and
    one-pass GPTQ, uses ``stats`` or statistics of ``calib``.

    Args:
        calib: (block, token) calibration blocks (used when ``stats`` is None and the method needs them).
        eval_blocks: (block, token) held-out blocks for perplexity.
        stats, ppl_fp: reuse across runs of a sweep.
        judge: held-out input statistics for the layer output error (default: the calibration ones).
    Returns:
        {"method", "bits", "group", "symmetric", "ppl", "ppl_fp", "weight_error", "output_error" (means over
        layers), "layers" (per-layer rows), "seconds", "calib_corpus" and "calib_tokens" (sequential GPTQ)}
    """
    start = time.perf_counter()
    sequential = method == "gptq" and gptq_config.sequential
    if stats is None and method != "rtn" and not sequential:
        stats = calibration_stats(lm, calib, fisher=method in ("rot-fisher", "nqp-scaled"), progress=progress)
    if ppl_fp is None:
        ppl_fp = perplexity(lm.model, eval_blocks, progress=progress)
    model = copy.deepcopy(lm.model)
    if sequential:
        rows = quantize_model_sequential(model, method, spec, calib_config.blocks(lm), batch_size=calib_config.batch_size,
                                         gptq_config=gptq_config, progress=progress, judge=judge)
    else:
        rows = quantize_model(model, method, spec, stats, seed, progress=progress, judge=judge, blocks=calib,  # AWQ searches on calib
                              gptq_config=gptq_config)
    ppl = perplexity(model, eval_blocks, progress=progress)
    out_err = [r["output_error"] for r in rows if "output_error" in r]
    return {"method": method, "bits": spec.bits, "group": spec.group, "symmetric": spec.symmetric, "ppl": ppl,
            "ppl_fp": ppl_fp, "weight_error": sum(r["weight_error"] for r in rows) / len(rows),
            "output_error": sum(out_err) / len(out_err) if out_err else None, "layers": rows,
            "seconds": time.perf_counter() - start,
            **({"calib_corpus": calib_config.corpus, "calib_tokens": calib_config.tokens // calib_config.seq_len
                * calib_config.seq_len} if sequential else {})}
