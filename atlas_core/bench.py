"""Benchmarks that print measured ratios (never assertions): extraction overhead over a forward pass."""

from __future__ import annotations

import statistics
import time

import torch

from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.eval import block_nll
from atlas_core.extract import extract
from atlas_core.models import DEFAULT_MODEL, load_model


def bench_extract(
    model: str = DEFAULT_MODEL,
    layer: int = -1,
    n_blocks: int = 12,
    seq_len: int = 256,
    batch_size: int = 4,
    repeats: int = 3,
) -> dict:
    """Time every-head extraction of one layer against a plain eager forward over the same blocks.

    The two are interleaved ``repeats`` times after one warm-up each; the ratio uses the medians.

    Returns:
        dict with both medians (seconds), all samples and ``ratio`` = extract / forward.
    """
    lm = load_model(model, attn_implementation="eager")
    blocks = token_blocks(lm, BlockSpec(seq_len=seq_len, n_blocks=n_blocks))
    forward = lambda: block_nll(lm.model, blocks, batch_size=batch_size, progress=False)  # noqa: E731
    capture = lambda: extract(lm, blocks, [layer], batch_size=batch_size, progress=False)  # noqa: E731
    samples = {"forward": [], "extract": []}
    forward(), capture()  # warm-up: allocator, kernels
    for _ in range(repeats):
        for name, fn in (("forward", forward), ("extract", capture)):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    med = {name: statistics.median(s) for name, s in samples.items()}
    return {
        "model": model,
        "layer": layer % lm.spec.n_layers,
        "blocks": n_blocks,
        "seq_len": seq_len,
        "torch_threads": torch.get_num_threads(),
        "forward_s": med["forward"],
        "extract_s": med["extract"],
        "samples": samples,
        "ratio": med["extract"] / med["forward"],
    }
