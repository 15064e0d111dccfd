"""Decode speed and memory of the quantized KV cache against the fp cache (a benchmark: prints ratios).

For each cache (fp ``DynamicCache``, per-token, KIVI and HeadQ, keys and values at the same bits) the
same context of ``n_ctx`` tokens is prefilled in chunks, then single-token decode steps are timed. The
caches are rebuilt and timed in turn, ``rounds`` times interleaved; a cache's step time is the median
over its rounds of the median step of a round. Memory is what the cache's tensors hold after the
prefill: bytes held, and bits per key/value element measured from them (codes, scales, zeros, side codes,
fp windows; the memo, a derived copy, is reported apart).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
from transformers import DynamicCache

from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.kvquant.cache import QuantizedKVCache, held_bits_per_element
from atlas_core.kvquant.experiment import KVMethod
from atlas_core.kvquant.headq import SideCode, calibrate
from atlas_core.models import DEFAULT_MODEL, LoadedModel, check_positions, describe, load_model


def _caches(lm: LoadedModel, bits: int, group: int, rank: int, side_bits: int, calib: torch.Tensor, memo: bool) -> dict:
    """name -> a function building a fresh cache."""
    config = lm.model.config
    kv = {m: replace(KVMethod(method=m, kbits=bits, vbits=bits, group=group).kv_config(), memo=memo) for m in ("per-token", "kivi")}
    side = SideCode(bases=calibrate(lm, calib, rank, "query"), bits=side_bits)
    return {
        "fp": lambda: DynamicCache(config=config),
        "per-token": lambda: QuantizedKVCache(config, kv["per-token"]),
        "kivi": lambda: QuantizedKVCache(config, kv["kivi"]),
        "headq": lambda: QuantizedKVCache(config, kv["per-token"], side),
    }


@torch.no_grad()
def _time_steps(lm: LoadedModel, ctx: torch.Tensor, cache, steps: int, chunk: int) -> tuple[float, object]:
    """Prefill ``ctx`` (1, n_ctx) in chunks, then time ``steps`` single-token steps; the median step (s)."""
    for start in range(0, ctx.shape[1], chunk):
        lm.model(ctx[:, start : start + chunk], past_key_values=cache, use_cache=True)
    token = ctx[:, -1:]
    times = []
    for _ in range(steps + 2):  # the first two are warm-up
        start = time.perf_counter()
        logits = lm.model(token, past_key_values=cache, use_cache=True).logits
        times.append(time.perf_counter() - start)
        token = logits[:, -1:].argmax(-1)
    return statistics.median(times[2:]), cache


def _memory(cache) -> dict:
    """Bytes held (storage, fp windows, memo) and bits per K/V element, measured from the tensors."""
    bits = held_bits_per_element(cache)
    out = {"held_bits_per_element": (bits["key"] + bits["value"]) / 2}
    if isinstance(cache, DynamicCache):
        return out | {"held_bytes": sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)}
    held = cache.held_bytes()
    return out | {"held_bytes": held["storage"] + held["window"] + held["memo"], "storage_bytes": held["storage"],
                  "window_bytes": held["window"], "memo_bytes": held["memo"]}


def check_bench(model: str, n_ctx: int, steps: int, rounds: int, bits: int, group: int, rank: int,
                side_bits: int) -> None:
    """Refuse, from the model's config alone (no weights), settings ``bench_kvquant`` cannot run.

    The caches' own rules apply (``KVMethod``: bits in 1..8, per-token groups dividing d_head, HeadQ's
    rank at most d_head, full-precision tokens fewer than the context), and the context with its timed steps (and two warm-up steps) must fit the positions.

    Raises:
        ModelError: not a model; ValueError: a size below its minimum or a rule above.
    """
    spec = describe(model)
    for name, value, low in (("--ctx", n_ctx, 2), ("--steps", steps, 1), ("--rounds", rounds, 1)):  # the CLI's flags
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    for name in ("per-token", "kivi", "headq"):
        method = KVMethod(method=name, kbits=bits, vbits=bits, group=group, rank=rank, side_bits=side_bits)
        method.check_head(spec.d_head)
        method.check_block(n_ctx, "--ctx")  # KIVI keeps its last `group` tokens in fp: the context must be longer
    check_positions(model, n_ctx + steps + 2, "--ctx + --steps (and 2 warm-up steps)")


def bench_kvquant(
    model: str = DEFAULT_MODEL,
    n_ctx: int = 2048,
    steps: int = 16,
    rounds: int = 3,
    bits: int = 2,
    group: int = 32,
    rank: int = 8,
    side_bits: int = 4,
    chunk: int = 512,
    memo: bool = False,
) -> dict:
    """Decode step time and memory of quantized caches relative to the fp cache at ``n_ctx`` cached tokens.

    Returns:
        dict with per-cache ``step_s`` (median), ``ratio_vs_fp``, memory, and
        ``headq_vs_per_token`` (HeadQ's step over its base quantizer's).
    Raises:
        ValueError: see ``check_bench`` (before the model loads).
    """
    check_bench(model, n_ctx, steps, rounds, bits, group, rank, side_bits)
    lm = load_model(model, attn_implementation="sdpa")
    ctx = token_blocks(lm, BlockSpec(seq_len=n_ctx, n_blocks=1))
    calib = token_blocks(lm, BlockSpec(seq_len=512, n_blocks=4, split="calib"))
    builders = _caches(lm, bits, group, rank, side_bits, calib, memo)
    samples: dict[str, list[float]] = {name: [] for name in builders}
    memory = {}
    for _ in range(rounds):
        for name, build in builders.items():
            step, cache = _time_steps(lm, ctx, build(), steps, chunk)
            samples[name].append(step)
            memory[name] = _memory(cache)
    step = {name: statistics.median(s) for name, s in samples.items()}
    return {
        "model": model,
        "n_ctx": n_ctx,
        "bits": bits,
        "group": group,
        "rank": rank,
        "side_bits": side_bits,
        "memo": memo,
        "torch_threads": torch.get_num_threads(),
        "caches": {name: {"step_s": step[name], "ratio_vs_fp": step[name] / step["fp"], "samples": samples[name], **memory[name]}
                   for name in builders},
        "headq_vs_per_token": step["headq"] / step["per-token"],
    }
