"""Benchmark: one layer's decode step at long contexts, dense SDPA vs exact top-k vs page-selected.

All three kernels run in the same process on the same cache, interleaved over rounds; the medians are
compared as ratios. The cache is synthetic (standard normal keys, values and query, seeded): timings do
not depend on the values, but the page selector's recall does, so the recall printed here describes
this synthetic cache only (the sparse chapter measures recall on real keys inside the models).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from atlas_core.sparse.kept import SparseConfig, kept_mask
from atlas_core.sparse.kernels import bytes_read, dense_decode, page_decode, paged_cache, topk_decode
from atlas_core.sparse.pages import page_mask, selection_recall

KERNELS = ("dense", "topk", "pages")

__all__ = ["KERNELS", "bench_sparse_decode", "page_recall"]


def page_recall(q, keys, cfg: SparseConfig) -> dict:
    """Index and mass recall of the exact top-k by the page selector, averaged over heads (one query each)."""
    n_kv, n, d = keys.shape
    groups = q.shape[0] // n_kv
    query = q[None, :, None]  # (1, head, 1, d_head)
    key = keys.repeat_interleave(groups, 0)[None]  # (1, head, key, d_head)
    scores = query @ key.transpose(-1, -2) * d**-0.5  # (1, head, 1, key)
    q_pos, k_pos, visible = torch.tensor([n - 1]), torch.arange(n), torch.ones(1, 1, 1, n, dtype=torch.bool)
    _, exact = kept_mask(scores, visible, q_pos, k_pos, cfg)
    _, chosen = page_mask(query, key, d**-0.5, visible, q_pos, k_pos, cfg)
    index, mass = selection_recall(scores.softmax(-1), chosen, exact)
    return {"index_recall": index.mean().item(), "mass_recall": mass.mean().item()}


def _once(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def check_device(device: str) -> torch.device:
    """The torch device named ``device``, refused unless this machine has it (cpu, or a cuda device torch sees).

    Raises:
        ValueError: not a device name, a kind other than cpu/cuda, or a GPU torch does not see here.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device name; use cpu, or cuda where a GPU exists") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no GPU here; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} GPU(s) here (cuda:0 ..)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: the benchmark runs on cpu or cuda")
    return dev


def free_bytes(dev: torch.device) -> int:
    """Memory free on ``dev`` now: the GPU's free memory, or the host's available physical memory."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_decode(contexts, heads: int, kv_heads: int, d_head: int, cfg: SparseConfig, rounds: int, steps: int,
                 device: str) -> None:
    """Refuse, before any tensor is made, a layer shape, timing or device ``bench_sparse_decode`` cannot run.

    Raises:
        ValueError: a size below 1, heads not divisible by kv_heads, a context the rule keeps whole
            (``SparseConfig.check_context``) or shorter than a page, a device this machine lacks, or a cache whose keys and values
            alone (2 · kv_heads · n · d_head fp32 numbers) exceed the memory free on the device.
    """
    for name, value in (("--heads", heads), ("--kv-heads", kv_heads), ("--d-head", d_head), ("--rounds", rounds),
                        ("--steps", steps), *(("--context", n) for n in contexts)):  # as `atlas bench sparse-decode` names them
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    cfg.check_context(min(contexts), "every context")
    if cfg.page_size > min(contexts):
        raise ValueError(f"page_size ({cfg.page_size}) must be at most the shortest context ({min(contexts)}): "
                         "one page would hold the whole cache")
    dev = check_device(device)
    need = (heads + 2 * kv_heads * max(contexts)) * d_head * 4  # the query and the cache, fp32
    if need > free_bytes(dev):
        raise ValueError(f"keys and values of context {max(contexts)} x kv_heads {kv_heads} x d_head {d_head} need "
                         f"{need / 2**30:.1f} GiB; {device} has {free_bytes(dev) / 2**30:.1f} GiB free: lower one of them")


def bench_sparse_decode(contexts=(131072,), heads: int = 9, kv_heads: int = 3, d_head: int = 64,
                        cfg: SparseConfig = SparseConfig(), rounds: int = 5, steps: int = 5, seed: int = 0,
                        device: str = "cpu") -> dict:
    """Time one decode step of each kernel at each context length.

    Args:
        contexts: cached tokens n for each measurement.
        heads, kv_heads, d_head: the layer's shape (default: smollm2-135m).
        cfg: the sparse rule (anchors, window, top-k, page size); the page selector keeps ⌈k/P⌉ pages,
            the same key budget as exact top-k.
        rounds: interleaved rounds over the kernels (median reported); steps: calls timed per round.
    Returns:
        {"shape", "config", "rows": [{n, <kernel>_s, <kernel>_bytes, speedup_topk, speedup_pages,
        bytes_ratio_topk, bytes_ratio_pages, index_recall, mass_recall}]}
    """
    check_decode(contexts, heads, kv_heads, d_head, cfg, rounds, steps, device)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in contexts:
        q = torch.randn(heads, d_head, generator=gen).to(device)
        keys, values = (torch.randn(kv_heads, n, d_head, generator=gen).to(device) for _ in range(2))
        cache = paged_cache(keys, values, cfg.page_size)
        fns = {"dense": lambda: dense_decode(q, keys, values), "topk": lambda: topk_decode(q, keys, values, cfg),
               "pages": lambda: page_decode(q, cache, cfg)}
        for fn in fns.values():  # warm-up
            fn()
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(_once(_synced(fn, device), steps))
        row = {"n": n}
        for name in fns:
            row[f"{name}_s"] = statistics.median(times[name])
            row[f"{name}_bytes"] = bytes_read(name, n, heads, kv_heads, d_head, cfg, keys.element_size())
        for name in ("topk", "pages"):
            row[f"speedup_{name}"] = row["dense_s"] / row[f"{name}_s"]
            row[f"bytes_ratio_{name}"] = row["dense_bytes"] / row[f"{name}_bytes"]
        row.update(page_recall(q.cpu(), keys.cpu(), cfg))
        rows.append(row)
        del keys, values, cache
    return {"shape": {"heads": heads, "kv_heads": kv_heads, "d_head": d_head, "dtype": "float32", "device": device,
                      "threads": torch.get_num_threads()},
            "config": {"anchors": cfg.anchors, "window": cfg.window, "topk": cfg.topk, "page_size": cfg.page_size},
            "rounds": rounds, "steps": steps, "rows": rows}


def _synced(fn, device: str):
    if not device.startswith("cuda"):
        return fn
    def run():
        fn()
        torch.cuda.synchronize()
    return run
