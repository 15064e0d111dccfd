"""One weight-quantization run (calibrate, quantize, measure held-out NLL per block), and the paired verdicts
that compare runs.

Every run is measured on the same held-out blocks, and returns the NLL of every predicted token
(block, token − 1), so ``interval`` gives each perplexity its interval and each comparison between two
methods the interval of their paired perplexity ratio. ``compare`` turns that ratio into a verdict that
never rests on a difference the sample cannot show ("not distinguishable at this sample size", SPEC §11).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atlas_core.attention import decoder_layers
from atlas_core import eval as eval_module, interval
from atlas_core.cache import cache_dir, cache_key, cached, tokens_hash
from atlas_core.eval import block_nll
from atlas_core.interval import DEFAULT, Bootstrap, Estimate
from atlas_core.models import LoadedModel
from atlas_core.wquant.apply import quantize_model, quantize_model_sequential
from atlas_core.wquant.calib import CalibConfig, LayerStats, calibration_stats
from atlas_core.wquant.gptq import GPTQConfig
from atlas_core.claims import TIE, best_text, direction
from atlas_core.wquant.rtn import WQuantSpec

__all__ = ["LABELS", "Comparison", "RunSet", "best_across", "best_method", "compare", "label", "restored_weights",
           "run_wquant"]
NEEDS_STATS = ("gptq", "rot-fisher", "nqp-scaled")  # methods quantized from calibration statistics (one-pass GPTQ)
LABELS = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "rot-fisher": "Fisher rotation", "rot-haar": "Haar rotation",
          "rot-hadamard": "Hadamard rotation", "nqp-scaled": "NQP λ-scaled"}  # apply.METHODS as the book names them


def label(method: str) -> str:
    """A method's name in the book's prose, tables and legends (``LABELS``); an unknown name unchanged."""
    return LABELS.get(method, method)


@contextlib.contextmanager
def restored_weights(model):
    """Quantize ``model``'s decoder linear layers in place inside the block; every parameter of the decoder
    blocks (linear weights, and the norms AWQ could fold into) comes back bit for bit on exit. Cheaper than
    a deep copy of the whole model per run (embeddings and head are never touched)."""
    params = dict(decoder_layers(model).named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, p in saved.items():
                params[n].copy_(p)


def run_wquant(lm: LoadedModel, method: str, spec: WQuantSpec, calib: torch.Tensor, eval_blocks: torch.Tensor,
               stats: dict[str, LayerStats] | None = None, nll_fp: torch.Tensor | None = None, seed: int = 0,
               progress: bool = False, judge: dict[str, LayerStats] | None = None,
               gptq_config: GPTQConfig = GPTQConfig(), calib_config: CalibConfig = CalibConfig(),
               batch_size: int = 8, store: bool = False) -> dict:
    """Quantize ``lm.model`` with ``method``, measure it, and put its weights back (the model is left unchanged).

    GPTQ with ``gptq_config.sequential`` (the default) runs its reference's pipeline
    (``apply.quantize_model_sequential``) on the blocks of ``calib_config``; every other method, and
    one-pass GPTQ, uses ``stats`` or statistics of ``calib``.

    Args:
        calib: (block, token) calibration blocks: AWQ searches on them; the statistics of ``NEEDS_STATS`` methods
            come from them when ``stats`` is None (other methods then report no calibration output error).
        eval_blocks: (block, token) held-out blocks.
        stats, nll_fp: reuse across runs of a sweep (``nll_fp``: the unquantized model's NLL on ``eval_blocks``).
        judge: held-out input statistics for the layer output error (default: the calibration ones).
        batch_size: held-out blocks per forward (speed only).
        store: keep the run on disk and reuse it (SPEC §12), keyed by everything that sets its numbers
            (``_run_key``: the model's weights, the tokens, the statistics, the method's settings and the source of
            the quantization and evaluation code), so that a chapter rerun for its prose repeats no quantization.
            A reused run keeps the "seconds" and "cpu_seconds" measured when it was made.
    Returns:
        {"method", "bits", "group", "symmetric", "nll" (block, token − 1) NLL in nats, "nll_fp" (the same,
        unquantized), "ppl" and "ppl_fp" (Estimate dicts {"value", "lo", "hi", "units"}: 95% block-bootstrap
        intervals), "ppl_ratio" (PPL / PPL_fp, paired, an Estimate dict), "weight_error", "output_error" (means
        over layers), "layers" (per-layer rows), "seconds" (wall) and "cpu_seconds" (this process's CPU time: what
        the run costs on an idle machine with one thread), "calib_corpus" and "calib_tokens" (sequential GPTQ)}
    """
    if store:
        key = _run_key(lm, method, spec, calib, eval_blocks, stats, nll_fp, seed, judge, gptq_config, calib_config)
        run = lambda: run_wquant(lm, method, spec, calib, eval_blocks, stats, nll_fp, seed, progress, judge,  # noqa: E731
                                 gptq_config, calib_config, batch_size)
        return cached(cache_dir("wquant") / f"run-{key}.pt", run, torch.save,
                      lambda p: torch.load(p, weights_only=True), "weight-quantization run")
    start, cpu = time.perf_counter(), time.process_time()
    sequential = method == "gptq" and gptq_config.sequential
    if stats is None and method in NEEDS_STATS and not sequential:  # the others use them only for diagnostics
        stats = calibration_stats(lm, calib, fisher=method in ("rot-fisher", "nqp-scaled"), progress=progress)
    if nll_fp is None:
        nll_fp = block_nll(lm.model, eval_blocks, batch_size, progress=progress)
    with restored_weights(lm.model) as model:
        if sequential:
            rows = quantize_model_sequential(model, method, spec, calib_config.blocks(lm),
                                             batch_size=calib_config.batch_size, gptq_config=gptq_config,
                                             progress=progress, judge=judge)
        else:
            rows = quantize_model(model, method, spec, stats, seed, progress=progress, judge=judge, blocks=calib,
                                  gptq_config=gptq_config)  # AWQ searches on calib
        nll = block_nll(model, eval_blocks, batch_size, progress=progress)
    out_err = [r["output_error"] for r in rows if "output_error" in r]
    return {"method": method, "bits": spec.bits, "group": spec.group, "symmetric": spec.symmetric,
            "nll": nll, "nll_fp": nll_fp, "ppl": interval.perplexity(nll).as_dict(),
            "ppl_fp": interval.perplexity(nll_fp).as_dict(), "ppl_ratio": interval.ppl_ratio(nll, nll_fp).as_dict(),
            "weight_error": sum(r["weight_error"] for r in rows) / len(rows),
            "output_error": sum(out_err) / len(out_err) if out_err else None, "layers": rows,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            **({"calib_corpus": calib_config.corpus, "calib_tokens": calib_config.tokens // calib_config.seq_len
                * calib_config.seq_len} if sequential else {})}


def code_version() -> str:
    """SHA-256 of the source that sets a run's numbers (the wquant package and ``eval.block_nll``'s module):
    a stored run is reused only by the code that made it."""
    digest = hashlib.sha256()
    for path in [*sorted(Path(__file__).parent.glob("*.py")), Path(eval_module.__file__)]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _tensor_print(t: torch.Tensor | None) -> str | None:
    """Shape, sum and sum of squares of a tensor in fp64 (None for None): changes whenever its values do."""
    if t is None:
        return None
    d = t.detach().double()
    return f"{tuple(d.shape)}:{d.sum().item():.17g}:{d.square().sum().item():.17g}"


def _stats_print(stats: dict[str, LayerStats] | None) -> str | None:
    """A hash of calibration statistics (every layer's n, Σ x xᵀ, Σ |x| and Σ g gᵀ), None for None."""
    if stats is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(stats):
        st = stats[name]
        digest.update(f"{name}|{st.n}|{_tensor_print(st.xx)}|{_tensor_print(st.x_abs)}|{_tensor_print(st.gg)}".encode())
    return digest.hexdigest()


def _run_key(lm, method, spec, calib, eval_blocks, stats, nll_fp, seed, judge, gptq_config, calib_config) -> str:
    """The disk-cache key of one ``run_wquant`` call (``cache.cache_key``): every input its numbers depend on."""
    from atlas_core.clouds import weights_fingerprint

    sequential = method == "gptq" and gptq_config.sequential
    return cache_key(kind="wquant-run", model=lm.spec.name, weights=weights_fingerprint(lm.model), method=method,
                     spec=repr(spec), seed=seed, calib=tokens_hash(calib), eval=tokens_hash(eval_blocks),
                     stats=_stats_print(stats), judge=_stats_print(judge), nll_fp=_tensor_print(nll_fp),
                     gptq=repr(gptq_config), calib_config=repr(calib_config) if sequential else None,
                     code=code_version())


# ----------------------------------------------------------------------------- paired verdicts


@dataclass(frozen=True)
class Comparison:
    """PPL_a / PPL_b on the same blocks (paired) and what it lets one say.

    ``verdict`` is "lower" (the whole interval below 1), "higher" (above 1) or ``claims.TIE``.
    """

    a: str
    b: str
    ratio: Estimate

    @property
    def verdict(self) -> str:
        return direction(self.ratio, 1.0)

    def sentence(self, spec: str = ".3f") -> str:
        """E.g. "rot-fisher is higher than gptq (perplexity ratio 1.52 [1.41, 1.63])"."""
        how = f"{self.a} and {self.b} are {TIE}" if self.verdict == TIE else f"{self.a} is {self.verdict} than {self.b}"
        return f"{how} (perplexity ratio {self.ratio:{spec}})"


def compare(nll_a, nll_b, a: str = "a", b: str = "b", boot: Bootstrap = DEFAULT) -> Comparison:
    """Compare two runs' perplexities on the same held-out blocks.

    Args:
        nll_a, nll_b: (block, token) NLL of the two runs on the same blocks (``run_wquant``'s "nll").
        a, b: their names, for ``Comparison.sentence``.
    Returns:
        ``Comparison`` with the paired ratio PPL_a / PPL_b and its 95% interval (``interval.ppl_ratio``).
    Raises:
        ValueError: the runs were not measured on the same number of blocks.
    """
    return Comparison(a, b, interval.ppl_ratio(nll_a, nll_b, boot))


def best_method(nlls: dict[str, torch.Tensor], boot: Bootstrap = DEFAULT) -> tuple[str, list[str]]:
    """The run with the lowest perplexity, and the runs not distinguishable from it at this sample size.

    Args:
        nlls: {name: (block, token) NLL}, every run on the same blocks.
    Returns:
        (best name, [names whose paired ratio to the best has an interval containing 1], in the given order)
    """
    if not nlls:
        raise ValueError("best_method needs at least one run")
    ppl = {n: interval.unit_sums(v).mean() for n, v in nlls.items()}
    best = min(ppl, key=ppl.get)
    ties = [n for n in nlls if n != best and compare(nlls[n], nlls[best], n, best, boot).verdict == TIE]
    return best, ties


def best_across(best: dict[int, tuple[str, list[str]]]) -> str:
    """The best method at each bit width in one phrase, each outcome named once: "AWQ at both 3 and 4 bits",
    "AWQ at 4 bits and GPTQ at 3 bits", "GPTQ (AWQ not distinguishable … from it) at 3, 4 and 8 bits".

    Args:
        best: {bits: ``best_method``'s (best, ties)}, methods by their ids (named with ``label``).
    Returns:
        the phrase; bit widths with the same best and the same ties are named together, ascending.
    Raises:
        ValueError: ``best`` is empty.
    """
    if not best:
        raise ValueError("best_across needs the best method of at least one bit width")
    by_text: dict[str, list[int]] = {}
    for bits in sorted(best, reverse=True):  # the widest first, as the chapter reports them
        name, ties = best[bits]
        by_text.setdefault(best_text(label(name), [label(t) for t in ties]).text, []).append(bits)

    def widths(bits: list[int]) -> str:
        b = [str(x) for x in sorted(bits)]
        return (f"at {b[0]} bits" if len(b) == 1 else f"at both {b[0]} and {b[1]} bits" if len(b) == 2
                else f"at {', '.join(b[:-1])} and {b[-1]} bits")

    parts = [f"{text} {widths(bits)}" for text, bits in by_text.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class RunSet:
    """The runs of one sweep (``run_wquant``'s dicts), looked up by (method, bits, group).

    Raises:
        ValueError: two runs with the same (method, bits, group): a lookup would be ambiguous.
    """

    runs: tuple[dict, ...]

    def __post_init__(self):
        keys = [(r["method"], r["bits"], r["group"]) for r in self.runs]
        twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if twice:
            raise ValueError(f"runs measured twice: {twice}; a sweep runs each (method, bits, group) once")

    def get(self, method: str, bits: int, group: int | None = None) -> dict:
        """The run of ``method`` at ``bits`` (per output channel when ``group`` is None).

        Raises:
            ValueError: no such run, naming the ones there are.
        """
        for r in self.runs:
            if (r["method"], r["bits"], r["group"]) == (method, bits, group):
                return r
        have = [(r["method"], r["bits"], r["group"]) for r in self.runs]
        raise ValueError(f"no run of {method} at {bits} bits, group {group}; the sweep ran {have}")

    def nll(self, method: str, bits: int, group: int | None = None) -> torch.Tensor:
        """(block, token − 1) held-out NLL in nats of one run."""
        return self.get(method, bits, group)["nll"]

    def ppl(self, method: str, bits: int, group: int | None = None) -> float:
        """The held-out perplexity of one run (point value; ``interval.perplexity`` of ``nll`` gives its interval)."""
        return self.get(method, bits, group)["ppl"]["value"]
