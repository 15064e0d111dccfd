"""Decode speed and memory of the quantized KV cache against the fp cache (benchmarks: they print ratios).

``bench_kvquant``: the whole decode step of a model.

For each cache (fp ``DynamicCache``, per-token, KIVI and HeadQ, keys and values at the same bits) the
same context of ``n_ctx`` tokens is prefilled in chunks, then single-token decode steps are timed. The
caches are rebuilt and timed in turn, ``rounds`` times interleaved; a cache's step time is the median
over its rounds of the median step of a round. Memory is what the cache's tensors hold after the
prefill: bytes held, and bits per key/value element measured from them (codes, scales, zeros, side codes,
fp windows; the memo, a derived copy, is reported apart). Each quantized cache is timed twice: on its plain
path (every step dequantizes the history) and, where numba imports, fused (``KVQuantConfig(fused=True)``
under ``fused.decoding``: decode steps read the packed codes in the kernel; the prefill is the same SDPA).

``bench_kv_decode``: one layer's decode attention for one token at each context, the fused low-bit kernel
(``fused.decode``, KIVI's layout: keys per channel and values per token in groups of 32, a 32-token fp window)
against fp32 SDPA decode on the same keys/values and against the plain path (dequantize, then SDPA); all
three interleaved over rounds (medians, and speed-ups with a paired bootstrap interval over rounds), with the bytes each reads (codes + fp16 scales/zeros + fp window,
against fp32 keys and values).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import replace

import torch
from transformers import DynamicCache

from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.kvquant import fused, quant
from atlas_core.kvquant.cache import QuantizedKVCache, held_bits_per_element
from atlas_core.kvquant.experiment import KVMethod
from atlas_core.kvquant.headq import SideCode, calibrate
from atlas_core.kvquant.quant import QuantSpec
from atlas_core.models import DEFAULT_MODEL, LoadedModel, check_positions, describe, load_model
from atlas_core.sparse.bench import _rounds, speedup_estimate
from atlas_core.sparse.kernels import dense_decode


def _caches(lm: LoadedModel, bits: int, group: int, rank: int, side_bits: int, calib: torch.Tensor, memo: bool,
            with_fused: bool) -> dict:
    """name -> (a function building a fresh cache, whether its steps run fused); "<name>-fused" beside each."""
    config = lm.model.config
    kv = {m: replace(KVMethod(method=m, kbits=bits, vbits=bits, group=group).kv_config(), memo=memo) for m in ("per-token", "kivi")}
    side = SideCode(bases=calibrate(lm, calib, rank, "query"), bits=side_bits)
    out = {"fp": (lambda: DynamicCache(config=config), False)}
    for f in (False, True) if with_fused else (False,):
        k = {m: replace(c, fused=f) for m, c in kv.items()}
        tag = "-fused" if f else ""
        out |= {
            f"per-token{tag}": (lambda k=k: QuantizedKVCache(config, k["per-token"]), f),
            f"kivi{tag}": (lambda k=k: QuantizedKVCache(config, k["kivi"]), f),
            f"headq{tag}": (lambda k=k: QuantizedKVCache(config, k["per-token"], side), f),
        }
    return out


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
    fused_steps: bool = True,
) -> dict:
    """Decode step time and memory of quantized caches relative to the fp cache at ``n_ctx`` cached tokens.

    Args:
        fused_steps: also time each quantized cache fused ("<name>-fused"; skipped when numba is missing).
    Returns:
        dict with per-cache ``step_s`` (median), ``ratio_vs_fp`` (median step / median fp step, with ``_lo`` and
        ``_hi``: 95% paired bootstrap over the interleaved rounds, ``sparse.bench.speedup_estimate``), memory, ``headq_vs_per_token`` (HeadQ's step
        over its base quantizer's), and with fused steps ``headq_vs_per_token_fused`` and ``fused_vs_plain``
        (each cache's fused step over its plain one); ``fused`` says whether they ran.
    Raises:
        ValueError: see ``check_bench`` (before the model loads).
    """
    check_bench(model, n_ctx, steps, rounds, bits, group, rank, side_bits)
    lm = load_model(model, attn_implementation="sdpa")
    ctx = token_blocks(lm, BlockSpec(seq_len=n_ctx, n_blocks=1))
    calib = token_blocks(lm, BlockSpec(seq_len=512, n_blocks=4, split="calib"))
    with_fused = fused_steps and fused.available()
    builders = _caches(lm, bits, group, rank, side_bits, calib, memo, with_fused)
    samples: dict[str, list[float]] = {name: [] for name in builders}
    memory = {}
    for _ in range(rounds):
        for name, (build, is_fused) in builders.items():
            with fused.decoding(lm.model) if is_fused else contextlib.nullcontext():
                step, cache = _time_steps(lm, ctx, build(), steps, chunk)
            samples[name].append(step)
            memory[name] = _memory(cache)
    step = {name: statistics.median(s) for name, s in samples.items()}
    # each cache's step over the fp step, paired over the interleaved rounds (round r of both: one machine state)
    vs_fp = {name: speedup_estimate(s, samples["fp"]) for name, s in samples.items()}
    ratios = {"headq_vs_per_token": step["headq"] / step["per-token"]}
    if with_fused:
        ratios |= {"headq_vs_per_token_fused": step["headq-fused"] / step["per-token-fused"],
                   "fused_vs_plain": {m: step[f"{m}-fused"] / step[m] for m in ("per-token", "kivi", "headq")}}
    return {
        "model": model,
        "n_ctx": n_ctx,
        "bits": bits,
        "group": group,
        "rank": rank,
        "side_bits": side_bits,
        "memo": memo,
        "torch_threads": torch.get_num_threads(),
        "fused": with_fused,
        "numba_threads": fused.numba.get_num_threads() if with_fused else None,
        "caches": {name: {"step_s": step[name], "ratio_vs_fp": vs_fp[name].value, "ratio_vs_fp_lo": vs_fp[name].lo,
                          "ratio_vs_fp_hi": vs_fp[name].hi, "samples": samples[name], **memory[name]}
                   for name in builders},
        **ratios,
    }


# ----------------------------------------------------------------------------------------------------------------
# One layer's decode attention: fused low-bit vs fp32 SDPA.

KV_DECODE_GROUP = 32  # KIVI's groups: keys per channel over 32 tokens, values per token over 32 channels
KV_DECODE_WINDOW = 32  # fp tokens (the newest) beside the quantized history


def check_kv_decode(contexts, bits: int, heads: int, kv_heads: int, d_head: int, rounds: int, steps: int) -> None:
    """Refuse settings ``bench_kv_decode`` cannot run, before any tensor is made.

    Raises:
        ValueError: a size below its minimum, heads not a multiple of kv_heads, d_head not a multiple of the
            value group (32, or the whole head when smaller), a context too short to quantize one key group
            beside the 32-token window, bits outside 1..8, numba missing, or more memory than is free.
    """
    for name, value, low in (("--heads", heads, 1), ("--kv-heads", kv_heads, 1), ("--d-head", d_head, 1),
                             ("--rounds", rounds, 1), ("--steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    quant.check_bits(bits, "--bits")
    if heads % kv_heads:
        raise ValueError(f"--kv-heads {kv_heads} must divide --heads {heads}")
    QuantSpec(bits=bits, group=KV_DECODE_GROUP).channel_group(d_head)  # raises when the value group does not divide it
    low = KV_DECODE_GROUP + KV_DECODE_WINDOW
    if not contexts or any(isinstance(n, bool) or not isinstance(n, int) or n < low for n in contexts):
        raise ValueError(f"--context must be integers ≥ {low} (one key group of {KV_DECODE_GROUP} beside the "
                         f"{KV_DECODE_WINDOW}-token fp window), got {list(contexts)}")
    if not fused.available():
        raise ValueError("the fused kernel needs numba: pip install numba")
    need = max(contexts) * kv_heads * d_head * 4 * 6 + heads * d_head * 4  # fp32 K/V, their dequantized copy, codes
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise ValueError(f"--context {max(contexts)} with {kv_heads} KV heads of d_head {d_head} needs ~{need / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB are free")


def synthetic_layer(n: int, heads: int, kv_heads: int, d_head: int, seed: int = 0):
    """Random keys with outlier channels (a few channels ×10 larger, per-channel offsets, as real keys show),
    Gaussian values and queries: (q (head, d_head), keys, values (kv_head, n, d_head)), fp32."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(kv_heads, n, d_head, generator=gen)
    keys += 2 * torch.randn(kv_heads, 1, d_head, generator=gen)  # per-channel offsets
    outliers = torch.randperm(d_head, generator=gen)[: max(1, d_head // 16)]
    keys[..., outliers] *= 10
    values = torch.randn(kv_heads, n, d_head, generator=gen)
    q = torch.randn(heads, d_head, generator=gen)
    return q, keys, values


def kivi_state(keys: torch.Tensor, values: torch.Tensor, bits: int) -> fused.DecodeKV:
    """KIVI's layout of (kv_head, n, d_head) keys/values for batch 1: all but the newest ``KV_DECODE_WINDOW``
    tokens (a whole number of key groups) quantized and packed, the rest in an fp32 window."""
    n = keys.shape[-2]
    n_q = (n - KV_DECODE_WINDOW) // KV_DECODE_GROUP * KV_DECODE_GROUP
    key_spec = QuantSpec(bits=bits, group=KV_DECODE_GROUP, axis="channel")
    value_spec = QuantSpec(bits=bits, group=KV_DECODE_GROUP, axis="token")
    packed = lambda x, spec: quant.pack_qtensor(quant.quantize(x[None, :, :n_q], spec), bits)  # noqa: E731
    return fused.DecodeKV(key=packed(keys, key_spec), key_spec=key_spec, key_window=keys[None, :, n_q:],
                          value=packed(values, value_spec), value_spec=value_spec, value_window=values[None, :, n_q:])


def decode_bytes(kv: fused.DecodeKV) -> int:
    """Bytes the fused kernel reads: packed codes, fp16 scales and zeros, and the fp windows."""
    parts = [q for q in (kv.key, kv.value, kv.side) if q is not None]
    return sum(quant.held_bytes(q) for q in parts) + sum(t.numel() * t.element_size() for t in (kv.key_window, kv.value_window))


@torch.inference_mode()
def bench_kv_decode(contexts=(32768, 131072), bits: int = 2, heads: int = 9, kv_heads: int = 3, d_head: int = 64,
                    rounds: int = 5, steps: int = 5) -> dict:
    """One layer's decode attention at each context: fused low-bit kernel vs fp32 SDPA vs dequantize + SDPA.

    Returns:
        dict with the shape, threads (torch and numba) and per context: median seconds of ``fused``,
        ``sdpa_fp32`` and ``dequant_sdpa``, ``speedup_vs_sdpa`` (median sdpa / median fused) and
        ``speedup_vs_dequant``, each with ``_lo`` / ``_hi`` (95% paired bootstrap over the interleaved rounds,
        ``sparse.bench.speedup_estimate``), bytes read
        by each (fused: codes + scales + window; fp32: keys and values; dequant: codes + the fp32 copy it
        writes and reads), and ``max_abs_diff`` of the fused output from the plain reference.
    Raises:
        ValueError: see ``check_kv_decode``.
    """
    check_kv_decode(contexts, bits, heads, kv_heads, d_head, rounds, steps)
    scale = d_head**-0.5
    rows = []
    for n in contexts:
        q, keys, values = synthetic_layer(n, heads, kv_heads, d_head)
        kv = kivi_state(keys, values, bits)
        qb = q[None]  # (1, head, d_head)

        def dequant_sdpa():
            k, v = fused.dequantized(kv)
            return dense_decode(q, k[0], v[0], scale)

        fns = {"fused": lambda: fused.decode(qb, kv, scale), "sdpa_fp32": lambda: dense_decode(q, keys, values, scale),
               "dequant_sdpa": dequant_sdpa}
        times = _rounds(fns, rounds, steps, "cpu")  # {name: (round,) seconds per call}
        medians = {name: statistics.median(t) for name, t in times.items()}
        vs_sdpa, vs_dequant = (speedup_estimate(times[name], times["fused"]) for name in ("sdpa_fp32", "dequant_sdpa"))
        diff = (fns["fused"]()[0] - fused.decode_reference(qb, kv, scale)[0]).abs().max().item()
        fp32 = 2 * n * kv_heads * d_head * 4
        low = decode_bytes(kv)
        rows.append({"n": n, **{f"{k}_s": v for k, v in medians.items()},
                     "speedup_vs_sdpa": vs_sdpa.value, "speedup_vs_sdpa_lo": vs_sdpa.lo, "speedup_vs_sdpa_hi": vs_sdpa.hi,
                     "speedup_vs_dequant": vs_dequant.value, "speedup_vs_dequant_lo": vs_dequant.lo,
                     "speedup_vs_dequant_hi": vs_dequant.hi,
                     "bytes_fused": low, "bytes_sdpa_fp32": fp32, "bytes_dequant_sdpa": low + 2 * fp32,
                     "bytes_ratio": fp32 / low, "max_abs_diff": diff})
    return {"shape": {"heads": heads, "kv_heads": kv_heads, "d_head": d_head}, "bits": bits,
            "layout": f"keys per channel, values per token, groups of {KV_DECODE_GROUP}, {KV_DECODE_WINDOW}-token fp window",
            "torch_threads": torch.get_num_threads(), "numba_threads": fused.numba.get_num_threads(),
            "rounds": rounds, "steps": steps, "rows": rows}
