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

import numpy as np
import torch

from atlas_core import interval
from atlas_core.interval import Bootstrap, Estimate

from atlas_core.sparse.kept import SparseConfig, kept_mask
from atlas_core.sparse.certified import _capped, bound_slack, certified_cache, certified_decode, certified_mask, certify, summary_floats
from atlas_core.sparse.kernels import _fixed_index, bytes_read, dense_decode, page_decode, paged_cache, topk_decode
from atlas_core.sparse.pages import page_mask, selection_recall

KERNELS = ("dense", "topk", "pages")

__all__ = ["KERNELS", "bench_certified_decode", "bench_sparse_decode", "certified_bytes", "page_recall",
           "speedup_estimate"]


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


def _rounds(fns: dict, rounds: int, steps: int, device: str) -> dict[str, list[float]]:
    """{name: seconds per call in each round}: one warm-up call each, then ``rounds`` rounds that time every
    function in turn over ``steps`` calls (interleaved, so a slow spell of the machine hits them all, and round r of
    two kernels is a pair)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_once(_synced(fn, device), steps))
    return times


def _median_ratio(x: np.ndarray, axis=None) -> np.ndarray:
    """median(a) / median(b) of interleaved (a, b) values (..., 2·round): ``interval.median``'s statistic."""
    return np.median(x[..., 0::2], -1) / np.median(x[..., 1::2], -1)


def speedup_estimate(dense_rounds, kernel_rounds, boot: Bootstrap = interval.DEFAULT) -> Estimate:
    """A kernel's speed-up over dense, median(dense) / median(kernel) over the rounds, with a paired bootstrap
    interval over rounds (round r of both kernels drawn together: interleaved, they share the machine's state).

    Args:
        dense_rounds, kernel_rounds: (round,) seconds per call of each round (``_rounds``), the same rounds.
    Returns:
        ``Estimate`` of the speed-up (×); ``units`` the number of rounds.
    Raises:
        ValueError: different numbers of rounds.
    """
    a, b = np.asarray(dense_rounds, dtype=np.float64), np.asarray(kernel_rounds, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"speedup_estimate needs the same rounds of both kernels, got {a.size} and {b.size}")
    return interval.median(np.stack([a, b], axis=1), boot, statistic=_median_ratio)  # (round, 2)


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
        {"shape", "config", "rows": [{n, <kernel>_s (median over rounds), <kernel>_bytes, speedup_topk,
        speedup_pages (median ratio, with ``_lo`` and ``_hi``: the 95% interval over rounds, ``speedup_estimate``),
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
        times = _rounds(fns, rounds, steps, device)
        row = {"n": n}
        for name in fns:
            row[f"{name}_s"] = statistics.median(times[name])
            row[f"{name}_bytes"] = bytes_read(name, n, heads, kv_heads, d_head, cfg, keys.element_size())
        for name in ("topk", "pages"):
            est = speedup_estimate(times["dense"], times[name])  # its value is dense_s / <name>_s
            row[f"speedup_{name}"], row[f"speedup_{name}_lo"], row[f"speedup_{name}_hi"] = est.value, est.lo, est.hi
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


def _certified_stats(q: torch.Tensor, keys: torch.Tensor, cfg: SparseConfig, scale: float, softcap=None) -> dict:
    """The certified rule's kept set for one decode query (``certified_mask``, the kernel's set), and what it cost.

    Args:
        q: (head, d_head) the query at position n − 1; keys: (kv_head, n, d_head).
    Returns:
        per query head (head,) tensors: certificate, true discarded mass m, key-byte share, recall of the exact
        top-k mass (share of the mass of the exact top ``cfg.topk`` candidates inside the kept set), and the
        oracle's key-byte share: the fixed keys plus the fewest pages (largest true mass first) with m ≤ ε,
        the floor of any page rule at this ε whatever its summaries.
    """
    n_kv, n, d = keys.shape
    groups = q.shape[0] // n_kv
    query = q[None, :, None]  # (1, head, 1, d_head)
    scores = query @ keys.repeat_interleave(groups, 0)[None].transpose(-1, -2) * scale  # (1, head, 1, key)
    scores = _capped(scores, softcap)
    q_pos, k_pos = torch.tensor([[n - 1]]), torch.arange(n)[None]
    visible = torch.ones(1, 1, 1, n, dtype=torch.bool)
    fixed, chosen, st = certified_mask(query, keys[None], scores, scale, visible, q_pos, k_pos, cfg, softcap)
    probs = scores.double().softmax(-1)
    m = (probs * ~(fixed | chosen)).sum(-1)
    _, exact = kept_mask(scores, visible, q_pos, k_pos, cfg)
    recall = (probs * (exact & chosen)).sum(-1) / (probs * exact).sum(-1).clamp_min(1e-300)
    # The oracle: each page's true candidate mass, read largest first, with exact sums as its "bounds".
    rest = ~fixed
    page = k_pos // cfg.page_size
    n_pages = int(page.max()) + 1
    idx = page[:, None, None, :].expand_as(probs)
    z_page = torch.zeros(*probs.shape[:3], n_pages, dtype=torch.float64).scatter_add(-1, idx, probs * rest)
    order = z_page.sort(dim=-1, descending=True, stable=True).indices
    t, _ = certify((probs * fixed).sum(-1).log(), z_page.log(), z_page.log(), order, cfg.eps)  # its bounds: the exact masses
    page_keys = torch.zeros_like(z_page).scatter_add(-1, idx, rest.double()).gather(-1, order)  # candidates, reading order
    read_keys = torch.cat([torch.zeros_like(page_keys[..., :1]), page_keys.cumsum(-1)], -1).gather(-1, t[..., None])[..., 0]
    oracle_keys = fixed.sum(-1) + read_keys  # (1, head, 1) the fixed keys and the first t pages' candidates
    return {"certificate": st["certificate"][0, :, 0].double(), "m": m[0, :, 0], "key_bytes": st["key_bytes"][0, :, 0],
            "topk_mass_recall": recall[0, :, 0], "oracle_key_bytes": (oracle_keys / n)[0, :, 0],
            "pages_read": st["pages_read"][0, :, 0], "candidate_pages": st["candidate_pages"][0, :, 0]}


def certified_bytes(info: dict, cache_pages: int, n_fixed: int, n_kv: int, d_head: int, cfg: SparseConfig,
                    itemsize: int = 4) -> int:
    """Bytes one certified decode step reads: every candidate page's key summary and value-norm summary, the
    low-rank basis, the fixed keys and values, and each query head's read pages' keys and values."""
    per_page, per_head = summary_floats(cfg.bound, d_head, cfg.rank)
    summaries = n_kv * (cache_pages * (per_page + 1) + per_head)
    rows = 2 * n_kv * n_fixed + 2 * int(info["pages_read"].sum()) * cfg.page_size
    return (summaries + rows * d_head) * itemsize


def bench_certified_decode(contexts=(32768,), cfg: SparseConfig = SparseConfig(selector="certified"), real=None,
                           heads: int = 9, kv_heads: int = 3, d_head: int = 64, rounds: int = 5, steps: int = 5,
                           seed: int = 0, device: str = "cpu") -> dict:
    """Time one decode step of dense SDPA, exact top-k, Quest pages and the certified kernel, and measure the
    certified rule's certificate, true discarded mass, bytes and recall, on real keys where given.

    Args:
        contexts: cached tokens n. With ``real`` (a ``realkeys.RealKeys``) the cache is its keys[:, :n] and the
            queries its ``queries[n]`` (each at its own position, seeing the keys up to it); a context longer
            than the real prompt tiles the real keys end to end (reported as ``tiled``: a speed measurement,
            its recall describes a repeated text). Without ``real``: the synthetic Gaussian cache of
            ``bench_sparse_decode``.
        cfg: the certified rule (eps, bound, rank, page size, anchors, window; topk is exact top-k's and
            Quest's budget, and the k of the recall).
    Returns:
        {"shape", "config", "source", "rows": [{n, tiled, <kernel>_s, speedup_<kernel> (over dense SDPA),
        speedup_certified_vs_plain (over dense as matmul-softmax-matmul), each speed-up with ``_lo`` and ``_hi``
        (its 95% interval over rounds, ``speedup_estimate``), certified_bytes,
        dense_bytes, key_bytes (mean share of key bytes the certified rule reads), oracle_key_bytes, certificate
        and m (mean and max over queries and heads), topk_mass_recall, violations (m > certificate)}]}
    Raises:
        ValueError: as ``bench_sparse_decode``; a selector other than certified.
    """
    if cfg.selector != "certified":
        raise ValueError(f"bench_certified_decode needs selector='certified', got {cfg.selector!r}")
    if real is not None:
        kv_heads, d_head = real.keys.shape[0], real.keys.shape[2]
        heads = next(iter(real.queries.values())).shape[1]
    check_decode(contexts, heads, kv_heads, d_head, cfg, rounds, steps, device)
    cfg.check_head(d_head, "rank")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in contexts:
        keys, values, queries, scale, softcap, tiled = _decode_inputs(n, real, heads, kv_heads, d_head, gen)
        stats = [_certified_stats(q, keys[:, :pos + 1], cfg, scale, softcap) for pos, q in queries]
        keys, values = keys.to(device), values.to(device)
        q = queries[-1][1].to(device)
        cache, paged = certified_cache(keys, values, cfg), paged_cache(keys, values, cfg.page_size)
        fns = {"dense": lambda: dense_decode(q, keys, values, scale), "dense_plain": lambda: _dense_plain(q, keys, values, scale),
               "topk": lambda: topk_decode(q, keys, values, cfg),
               "pages": lambda: page_decode(q, paged, cfg), "certified": lambda: certified_decode(q, cache, scale, softcap)}
        times = _rounds(fns, rounds, steps, device)
        _, info = certified_decode(q, cache, scale, softcap)
        row = {"n": n, "tiled": tiled, "queries": len(queries)}
        for name in fns:
            row[f"{name}_s"] = statistics.median(times[name])
            est = speedup_estimate(times["dense"], times[name])  # its value is dense_s / <name>_s
            row[f"speedup_{name}"], row[f"speedup_{name}_lo"], row[f"speedup_{name}_hi"] = est.value, est.lo, est.hi
        est = speedup_estimate(times["dense_plain"], times["certified"])  # CPU SDPA with GQA is the slower dense
        row["speedup_certified_vs_plain"], row["speedup_certified_vs_plain_lo"], row["speedup_certified_vs_plain_hi"] = (
            est.value, est.lo, est.hi)
        _, lo, hi = _fixed_index(n, cfg)
        row["dense_bytes"] = bytes_read("dense", n, heads, kv_heads, d_head, cfg)
        row["certified_bytes"] = certified_bytes(info, -(-hi // cfg.page_size) - lo // cfg.page_size, n - (hi - lo),
                                                 kv_heads, d_head, cfg)
        for name in ("certificate", "m", "key_bytes", "oracle_key_bytes", "topk_mass_recall", "pages_read", "candidate_pages"):
            values_ = torch.cat([s[name].double() for s in stats])
            row[name] = values_.mean().item()
            row[f"{name}_max"] = values_.max().item()
        row["violations"] = int(sum(int((s["m"] > s["certificate"] * (1 + 1e-5) + 1e-9).sum()) for s in stats))
        pos, last = queries[-1]
        row["slack"] = bound_slack(last, keys[:, :pos + 1].cpu(), cfg, scale, softcap)  # bound -> (median, p10, p90) logits
        rows.append(row)
    source = "synthetic" if real is None else f"{real.model} layer {real.layer}, {real.corpus}"
    return {"shape": {"heads": heads, "kv_heads": kv_heads, "d_head": d_head, "dtype": "float32", "device": device,
                      "threads": torch.get_num_threads()},
            "config": {"anchors": cfg.anchors, "window": cfg.window, "topk": cfg.topk, "page_size": cfg.page_size,
                       "eps": cfg.eps, "bound": cfg.bound, "rank": cfg.rank, "max_pages": cfg.max_pages},
            "source": source, "rounds": rounds, "steps": steps, "rows": rows}


def _dense_plain(q, keys, values, scale):
    """Dense attention as matmul, softmax, matmul over each KV head's group (on CPU often faster than SDPA with GQA)."""
    qg = q.view(keys.shape[0], -1, q.shape[-1])  # (kv_head, group, d_head)
    return ((qg @ keys.transpose(-1, -2) * scale).softmax(-1) @ values).reshape(q.shape)


def _decode_inputs(n: int, real, heads: int, kv_heads: int, d_head: int, gen):
    """Keys, values, [(position, query (head, d_head))], scale, softcap and whether real keys were tiled."""
    if real is None:
        keys, values = (torch.randn(kv_heads, n, d_head, generator=gen) for _ in range(2))
        return keys, values, [(n - 1, torch.randn(heads, d_head, generator=gen))], d_head**-0.5, None, False
    have = real.keys.shape[1]
    if n <= have and n in real.queries:
        qs = real.queries[n]  # (n_query, head, d_head) at positions n − n_query … n − 1
        return (real.keys[:, :n], real.values[:, :n], [(n - len(qs) + i, qs[i]) for i in range(len(qs))],
                real.scaling, real.softcap, False)
    if n <= have:
        raise ValueError(f"the real keys hold no queries at context {n}; capture them with that context (have {sorted(real.queries)})")
    reps = -(-n // have)  # tile the whole prompt, keep the last n keys: the newest keys stay the real recent ones
    keys, values = (t.repeat(1, reps, 1)[:, -n:] for t in (real.keys, real.values))
    last = real.queries[have][-1]  # the query at the prompt's last position
    return keys, values, [(n - 1, last)], real.scaling, real.softcap, True
