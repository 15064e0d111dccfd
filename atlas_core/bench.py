"""Benchmarks that print measured ratios (never assertions): extraction overhead over a forward pass."""

from __future__ import annotations

import statistics
import time

import torch

from atlas_core.corpus import BlockSpec, check_blocks, token_blocks
from atlas_core.eval import block_nll
from atlas_core.extract import extract
from atlas_core.models import DEFAULT_MODEL, check_layer, check_positions, describe, load_model, load_tokenizer


def check_extract(model: str, layer: int, n_blocks: int, seq_len: int, batch_size: int, repeats: int) -> None:
    """Refuse, from the model's config alone, a benchmark ``bench_extract`` cannot run or summarise.

    Raises:
        ModelError: not a model; ValueError: the layer is not one of the model's, a size is below 1 (a
            median needs at least one repeat; a block at least 2 tokens), or a block exceeds the positions.
    """
    spec = describe(model)
    for name, value, low in (("--blocks", n_blocks, 1), ("--seq-len", seq_len, 2), ("batch_size", batch_size, 1),
                             ("--repeats", repeats, 1)):  # named as `atlas bench extract` calls them
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    check_layer(spec, layer)
    check_positions(model, seq_len, "--seq-len")
    try:  # the corpus holds the blocks asked for (its tokenizer only: no weights)
        check_blocks(load_tokenizer(model), BlockSpec(seq_len=seq_len, n_blocks=n_blocks))
    except ValueError as err:
        raise ValueError(f"--blocks: {err}") from None


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
    Raises:
        ValueError: see ``check_extract`` (before the model loads).
    """
    check_extract(model, layer, n_blocks, seq_len, batch_size, repeats)
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
