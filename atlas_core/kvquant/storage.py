"""Key codes compared at equal storage: the Pareto set of perplexity against measured bits, and the
equal-storage verdict against KIVI (issue 19).

Storage is what a real cache held at the end of a run (``experiment.evaluate``'s ``bits_key``/``bits_value``:
codes, fp16 scales and zeros, side codes and the fp windows, counted from the tensors), never a formula. Two
methods are "at equal storage" when their measured bits per key element differ by at most ``TOLERANCE``
bits; a method "fits" a storage when it holds no more than that plus ``TOLERANCE``. Every perplexity
carries its 95% paired block-bootstrap interval (``atlas_core.interval``), and the equal-storage verdict
rests on the paired difference to KIVI: a difference whose interval contains 0 is "not distinguishable".
"""

from __future__ import annotations

import math
from dataclasses import replace

from atlas_core import interval
from atlas_core.claims import direction, lower_verdict
from atlas_core.interval import Estimate
from atlas_core.kvquant.experiment import KVMethod, Runs

__all__ = ["NEW_CODES", "TOLERANCE", "as_json", "at_storage", "budget_methods", "equal_storage", "family", "pareto_front",
           "pareto_methods", "pareto_rows", "versus"]

NEW_CODES = ("query-tc", "hadamard", "random-rotation")  # the key codes of issue 19 (``KVMethod.method``)
TOLERANCE = 1e-3  # bits per key element: measured storages closer than this are equal


def pareto_methods(kbits=(2, 3), group: int = 32, values: bool = False, rank: int = 8) -> list[KVMethod]:
    """Every method of the Pareto figure at the given key bits: baselines, HeadQ and the new key codes.

    Args:
        kbits: key bits of each family (the transform code's budget is kbits + 32/group bits per key element,
            the per-channel quantizer's own storage).
        group: quantization group (channels per token, or tokens per channel).
        values: False: K-only (values dense); True: values per token at the key bits (full KV).
        rank: HeadQ's side-code rank.
    Returns:
        fp first, then per family and bits: per-token, KIVI, KIVI with Lloyd-Max grids, KIVI pre-RoPE,
        HeadQ (query basis), HeadQ (whitened basis), Hadamard, random rotation, query-aware transform coding
        (uniform and Lloyd-Max grids, post- and pre-RoPE).
    """
    out = [KVMethod(method="fp")]
    for b in kbits:
        v = b if values else None
        common = dict(kbits=b, vbits=v, group=group)
        out += [KVMethod(method="per-token", **common), KVMethod(method="kivi", **common),
                KVMethod(method="kivi", grid="lloyd-max", **common), KVMethod(method="kivi", pre_rope=True, **common),
                KVMethod(method="headq", rank=rank, **common), KVMethod(method="headq", rank=rank, basis="whitened", **common),
                KVMethod(method="hadamard", **common), KVMethod(method="random-rotation", **common),
                KVMethod(method="query-tc", **common), KVMethod(method="query-tc", grid="lloyd-max", **common),
                KVMethod(method="query-tc", pre_rope=True, **common)]
    return out


def family(method: KVMethod) -> str:
    """The curve a method belongs to on the Pareto figure: its name, grid, basis and RoPE side, not its bits."""
    name = method.method
    if getattr(method, "basis", "query") == "whitened":
        name += " (whitened)"
    if getattr(method, "grid", "uniform") != "uniform":
        name += f" {method.grid}"
    return name + (" pre-RoPE" if method.pre_rope else "")


def pareto_rows(runs: Runs, methods: list[KVMethod]) -> list[dict]:
    """One row per method: label, family, measured bits per key and value element, perplexity with interval.

    Args:
        runs: the evaluations (each method run once, on the same blocks).
        methods: what to show (``pareto_methods``).
    Returns:
        [{"label", "family", "method" (``KVMethod``), "bits_key", "bits_value", "ppl" (``Estimate``),
        "on_front" (bool, ``pareto_front``)}], in the order given.
    """
    rows = [{"label": runs(m)["label"], "family": family(m), "method": m, "bits_key": runs(m)["bits_key"],
             "bits_value": runs(m)["bits_value"], "ppl": runs(m)["ppl"]} for m in methods]
    front = set(pareto_front([(r["label"], r["bits_key"] + r["bits_value"], r["ppl"].value) for r in rows]))
    return [r | {"on_front": r["label"] in front} for r in rows]


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the points no other point dominates (no more bits and lower perplexity, or fewer bits and no
    higher perplexity), sorted by bits.

    Args:
        points: [(label, bits, perplexity)].
    """
    front = []
    for label, bits, ppl in sorted(points, key=lambda p: (p[1], p[2])):
        if not front or ppl < front[-1][2]:
            front.append((label, bits, ppl))
    return [label for label, _, _ in front]


def at_storage(runs: Runs, reference: KVMethod, candidates: list[KVMethod]) -> list[KVMethod]:
    """The candidates whose measured bits per key element and per value element fit the reference's."""
    ref = runs(reference)
    fits = lambda r: all(r[k] <= ref[k] + TOLERANCE for k in ("bits_key", "bits_value"))  # noqa: E731
    return [m for m in candidates if fits(runs(m))]


def equal_storage(runs: Runs, candidates: list[KVMethod], kbits: int = 2, group: int = 32, values: bool = False) -> dict:
    """The best candidate key code within the storage KIVI-``kbits`` actually holds, against KIVI and fp.

    The reference is ``KVMethod(method="kivi", kbits, group, vbits)`` with its measured bits; the best
    candidate is the one of lowest perplexity among those that fit that storage (``at_storage``). Its
    excess removed is (PPL_KIVI − PPL_best)/(PPL_KIVI − PPL_fp), and the verdict rests on the paired
    difference PPL_best − PPL_KIVI.

    Args:
        runs: the evaluations on one set of blocks.
        candidates: the new key codes (``KVMethod``) to choose from.
        kbits, group: KIVI's key bits and group; values: full KV (values at ``kbits``) or K-only.
    Returns:
        {"best": label, "best_method": ``KVMethod``, "bits_key", "bits_value", "ppl" (``Estimate``),
        "kivi": {"label", "bits_key", "bits_value", "ppl"}, "ppl_fp" (``Estimate``), "excess_removed"
        (``Estimate``), "difference" (``Estimate``, PPL_best − PPL_KIVI), "verdict" (a sentence),
        "fits": labels of every candidate that fit}.
    Raises:
        ValueError: no candidate fits KIVI's storage.
    """
    kivi = KVMethod(method="kivi", kbits=kbits, group=group, vbits=kbits if values else None)
    fitting = at_storage(runs, kivi, candidates)
    if not fitting:
        raise ValueError(f"no candidate holds at most KIVI-{kbits}'s {runs(kivi)['bits_key']:.3f} bits per key element")
    best = min(fitting, key=lambda m: runs(m)["ppl"].value)
    fp, boot = KVMethod(method="fp"), runs.setup.boot
    nll_best, nll_kivi, nll_fp = runs.nll(best), runs.nll(kivi), runs.nll(fp)
    removed = interval.excess_removed(nll_kivi, nll_best, nll_fp, boot)
    diff = interval.ppl_difference(nll_best, nll_kivi, boot)
    return {"best": runs(best)["label"], "best_method": best, "bits_key": runs(best)["bits_key"],
            "bits_value": runs(best)["bits_value"], "ppl": runs(best)["ppl"],
            "kivi": {"label": runs(kivi)["label"], "bits_key": runs(kivi)["bits_key"],
                     "bits_value": runs(kivi)["bits_value"], "ppl": runs(kivi)["ppl"]},
            "ppl_fp": runs(fp)["ppl"], "excess_removed": removed, "difference": diff,
            "verdict": _verdict(runs(best)["label"], removed, diff),
            "fits": [runs(m)["label"] for m in fitting]}


def _verdict(label: str, removed: Estimate, diff: Estimate) -> str:
    found = direction(diff, 0.0)
    share = f"{removed.value:.1%} [{removed.lo:.1%}, {removed.hi:.1%}]" if not math.isnan(removed.value) else "an undefined share"
    if found == "lower":
        return f"{label} is lower than KIVI at the same storage: it removes {share} of KIVI's excess over fp"
    if found == "higher":
        return f"{label} is higher than KIVI at the same storage (removes {share} of KIVI's excess)"
    return f"{label} and KIVI are not distinguishable at this sample size (removes {share} of KIVI's excess)"


def versus(runs: Runs, method: KVMethod, others: list[KVMethod]) -> dict[str, str]:
    """``claims.lower_verdict`` of ``method`` against each of ``others`` (paired, the same blocks): {label: text}."""
    boot = runs.setup.boot
    return {runs(o)["label"]: lower_verdict(runs.nll(method), runs.nll(o), runs(method)["label"], runs(o)["label"], boot).text
            for o in others}


def as_json(entry: dict) -> dict:
    """``equal_storage``'s entry with every ``Estimate`` as {value, lo, hi, units} and no ``KVMethod``."""
    def plain(x):
        if isinstance(x, Estimate):
            return x.as_dict()
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items() if not isinstance(v, KVMethod)}
        return x
    return plain(entry)


def budget_methods(method: KVMethod, budgets) -> list[KVMethod]:
    """``method`` at each budget (bits per key element, codes + scales + zeros): a query-tc curve."""
    return [replace(method, budget=float(b)) for b in budgets]
