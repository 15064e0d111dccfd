"""The ``atlas`` command: models, perplexity, chapter runs, the book, benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence

from atlas_core.zoo import DEFAULT_MODEL  # no torch: zoo reads only names and packages

# Offline unless the user says otherwise (HF_HUB_OFFLINE=0): a hub lookup with no network retries for ~50 s.
# Set before transformers is imported, which reads these once.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def _param_pairs(argv: list[str]) -> list[str]:
    """``-p NAME=VALUE`` as ``-p NAME VALUE``: a parameter's name is an identifier, so the first "=" after one
    can only separate it from its value (papermill's form is ``-p NAME VALUE``; both are accepted)."""
    out = []
    for i, token in enumerate(argv):
        if i and argv[i - 1] in ("-p", "--param") and re.match(r"^[A-Za-z_]\w*=", token):
            out += token.split("=", 1)
        else:
            out.append(token)
    return out


PARAM_FORMS = "write -p NAME VALUE or -p NAME=VALUE"


def _run_params(argv: list[str], run: argparse.ArgumentParser) -> tuple[list[str], list[list[str]]]:
    """``atlas run``'s ``-p NAME VALUE`` pairs (after ``_param_pairs``), taken out of ``argv`` before argparse
    reads it, and the rest of ``argv``; any other command's ``argv`` is returned whole.

    argparse answers "expected 2 arguments" both for a missing value and for a value that begins with "-"
    (``-p mid_depth -inf``); here a value is any word that is not one of ``run``'s options, and a ``-p`` without
    its name or value is named.

    Raises:
        ValueError: a ``-p`` with no name or no value (the message names it and says how to write one).
    """
    command = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if command is None or argv[command] != "run":
        return argv, []
    flags = {flag for action in run._actions for flag in action.option_strings}
    short = {flag for flag in flags if not flag.startswith("--")}  # -p, -h: "-pk" is -p too; "-3", "-inf" are values

    def word(i: int) -> str | None:  # argv[i] if it can be a name or a value, not an option
        return argv[i] if i < len(argv) and not (argv[i].startswith("--") or argv[i][:2] in short) else None

    rest, pairs, i = argv[:command + 1], [], command + 1
    while i < len(argv):
        if argv[i] == "--":  # what follows is positional
            return rest + argv[i:], pairs
        flag, inline, name = argv[i].partition("=")  # --param=NAME=VALUE or --param=NAME VALUE: the name inline
        if flag not in ("-p", "--param"):
            rest.append(argv[i])
            i += 1
            continue
        if not inline:
            i += 1
            name = word(i)
        if name is None:
            raise ValueError(f"{flag} has no NAME and VALUE: {PARAM_FORMS}")
        if "=" in name or not name:  # NAME=VALUE whose name is not an identifier (_param_pairs split those)
            if not name.split("=", 1)[0]:
                raise ValueError(f"{flag} {shlex.quote(name)} has no name: {PARAM_FORMS}")
            pairs.append(name.split("=", 1))
            i += 1
            continue
        value = word(i + 1)
        if value is None:
            raise ValueError(f"{flag} {shlex.quote(name)} has no value: {PARAM_FORMS}")
        pairs.append([name, value])
        i += 2
    return rest, pairs


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subparser of command ``name``."""
    return next(a.choices[name] for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for bad input, with a message on stderr)."""
    exit_on_sigterm()
    parser = _parser()
    run = _command_parser(parser, "run")
    try:
        argv, params = _run_params(_param_pairs(sys.argv[1:] if argv is None else list(argv)), run)
    except ValueError as err:  # a -p without its name or value: one line, exit 2
        run.error(str(err))
    args, extra = parser.parse_known_args(argv)
    if params:
        args.param = [*args.param, *params]
    if extra:  # reported by the command's own parser, which names it and its --help
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except Exception as err:  # noqa: BLE001 (sorted below; anything else propagates)
        # The error classes come from modules the command imported; importing corpus/zoo here would load
        # torch and transformers (seconds) even for `atlas book`, whose work runs in other processes.
        user = _loaded("atlas_core.corpus", "CorpusError") + _loaded("atlas_core.zoo", "ModelError")
        if isinstance(err, (*user, ValueError, FileNotFoundError)):
            print(f"atlas: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, _loaded("atlas_core.book.runner", "RunnerError")):  # a chapter or the book build failed
            print(f"atlas: error: {err}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        # A chapter's pending kernel tasks end with DeadKernelError once the kernel is shut down; asyncio would
        # print each as "Task exception was never retrieved" with its traceback when they are collected.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print(f"atlas: interrupted{getattr(args, 'interrupted', INTERRUPTED)}", file=sys.stderr)
        return 130


# What an interrupted command keeps; a command that writes nothing sets ``interrupted=""`` in its defaults.
INTERRUPTED = " (finished work is kept: chapter runs, training checkpoints; the same command resumes)"


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a killed job, a cluster's time limit) into ``SystemExit(143)``, so that ``with`` blocks and
    ``finally`` clauses run: a browser's profile folder, a staging folder, a half-written file are removed as on
    Ctrl-C, instead of being left behind by Python's default (die at once). Only where SIGTERM still has its
    default action, from the main thread."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _loaded(module: str, name: str) -> tuple[type, ...]:
    """``(module.name,)`` if that module is already imported, else ``()`` (its error cannot have been raised)."""
    found = sys.modules.get(module)
    return (getattr(found, name),) if found is not None else ()


class _Choices(Sequence):
    """A library constant ``module.NAME`` as argparse choices, imported only when argparse checks or prints
    them: the choices live once, in the library, and building the parser imports no torch."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _values(self) -> tuple:
        return tuple(getattr(importlib.import_module(self.module), self.name))

    def __getitem__(self, i):
        return self._values()[i]

    def __len__(self) -> int:
        return len(self._values())

    def __contains__(self, value) -> bool:
        return value in self._values()


def _add_choice(p: argparse.ArgumentParser, flag: str, module: str, name: str, help: str = "", **kw) -> None:
    """An option whose choices are the library constant ``module.name``, shown in the help (imported then only)."""
    metavar = flag.lstrip("-").upper().replace("-", "_")  # a metavar of its own: argparse would list the choices now
    p.add_argument(flag, choices=_Choices(module, name), metavar=metavar, help=f"{help} (%(choices)s)".lstrip(), **kw)


def _given(args, **flags) -> dict:
    """{field: args.<flag>} for the flags the user set (None: the library config's own default applies)."""
    return {field: getattr(args, flag) for field, flag in flags.items() if getattr(args, flag) is not None}


KV = "atlas_core.kvquant.experiment"  # the KV methods' constants (METHODS, CONTROLS, BASES, ENGINES)


class _OneLineParser(argparse.ArgumentParser):
    """argparse with a bad option reported in one line (what was wrong, where the options are listed), exit 2,
    instead of the usage block followed by the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="atlas", description=__doc__)
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    m = sub.add_parser("models", help="list the embedded models and their attention shapes")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=_models)

    q = sub.add_parser("ppl", help="perplexity of a model on non-overlapping windows of a corpus")
    _model_arg(q)
    q.add_argument("--corpus", default="britannica", help="britannica | pydoc | plays | wikitext-103 | c4 | a text file")
    q.add_argument("--tokens", type=int, default=4096, help="tokens to evaluate (a multiple of --seq-len)")
    q.add_argument("--seq-len", type=int, default=512, help="window length in tokens (BOS included)")
    _add_choice(q, "--split", "atlas_core.corpus", "SPLITS", default="eval")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_ppl)

    o = sub.add_parser("overlap", help="head overlap O_h of one layer beside its random null (source protocol)")
    _cloud_args(o)
    o.add_argument("--k", type=int, default=7, help="frame rank")
    _add_choice(o, "--heads", "atlas_core.measure", "HEAD_SETS", default="all")
    _add_choice(o, "--metric", "atlas_core.geometry", "METRICS", default="source")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=_overlap)

    i = sub.add_parser("id", help="per-head intrinsic dimension of one layer")
    _cloud_args(i)
    _add_choice(i, "--estimator", "atlas_core.intrinsic", "ESTIMATORS", default="twonn")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_id)

    r = sub.add_parser("run", help="execute one chapter notebook with papermill")
    r.add_argument("chapter")
    _model_arg(r)
    r.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set a parameter of the chapter's notebook (repeatable); also -p NAME=VALUE; "
                        "a VALUE may begin with '-'")
    r.add_argument("--out", default=None, type=_path, help="output folder (default results/<model>/)")
    r.add_argument("--source", default=None, type=_path, help="a jupytext file to run instead of notebooks/CHAPTER.py")
    r.set_defaults(func=_run)

    b = sub.add_parser("book", help="run every chapter on the default model, then build the HTML book",
                       description="Run every chapter (the Snakemake workflow; chapters already up to date are "
                       "kept), build the HTML book offline into _build/html and check it in headless Chromium. "
                       "A first build on two CPU cores takes several hours; an interrupted one resumes where it "
                       "stopped. Progress: one bar per running chapter, logs in results/<model>/logs/.")
    b.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="chapters run side by side, one BLAS thread each (default: the CPU count)")
    b.add_argument("--models", nargs="+", default=[DEFAULT_MODEL],
                   help="models to run every chapter on (results/<model>/), or 'all' (every embedded model, the "
                   "default first); the chapters show the first, the 'Per-model runs' appendix every other, "
                   "chapter by chapter (hours per model)")
    b.add_argument("--pdf", action="store_true", help="also print the rendered book to one checked PDF, "
                   "_build/pdf/book.pdf, through headless Chromium (up-to-date chapters and HTML are not redone)")
    b.set_defaults(func=_book)

    d = sub.add_parser("compare", help="compare the numbers of two results JSON files (timings skipped)")
    d.add_argument("first")
    d.add_argument("second")
    d.set_defaults(func=_compare)

    c = sub.add_parser("check-book", help="open every rendered page in headless Chromium and check it",
                       description="Open every page of a built book in headless Chromium and check it (pages load, "
                       "figures decode, math typesets, no glued value missing, provenance lines, tables at 1280 and "
                       "420 px, figure scale); `atlas book` runs it after every build. Reads only; exit 1 when a page "
                       "has problems.")
    c.add_argument("--html", default=None, type=_path,
                   help="the built HTML folder (default: this repository's _build/html, where `atlas book` writes it)")
    c.set_defaults(func=_check_book, interrupted="")

    k = sub.add_parser("kvquant", help="decode perplexity with a quantized KV cache, beside fp and the same-bits baseline")
    _model_arg(k)
    _add_choice(k, "--method", KV, "METHODS", default="headq",
                   help="kivi: KIVI's quantizers and residual rule, as its code runs them; per-channel: KIVI's quantizers, our window")
    k.add_argument("--kbits", type=int, help="key bits (1..8; default: KVMethod's, 2)")
    k.add_argument("--vbits", type=int, help="value bits (1..8; default: values in full precision, K-only)")
    k.add_argument("--group", type=int, help="group size: channels (per-token) or tokens (KIVI keys); default KVMethod's, 32")
    k.add_argument("--residual", type=int, default=None,
                   help="full-precision tokens: the most recent R (kivi: R values, keys flushed R at a time; "
                        "a multiple of --group); default 0, or --group for kivi")
    k.add_argument("--rank", type=int, help="HeadQ side-code rank r (default: KVMethod's, 8)")
    k.add_argument("--side-bits", type=int, help="HeadQ side-code bits b' (default: KVMethod's, 4)")
    _add_choice(k, "--control", KV, "CONTROLS", help="HeadQ's controls (default: none)")
    _add_choice(k, "--base", KV, "BASES", help="HeadQ's base key quantizer (default: per-token)")
    _add_choice(k, "--basis", KV, "SIDE_BASES", help="HeadQ's side-code basis: query (top eigenvectors of Σ_q) or whitened "
                "(the best rank-r correction in the Σ_q metric, headq.whitened_bases; --control none) (default: query)")
    k.add_argument("--pre-rope", action="store_true", help="quantize keys before RoPE")
    _add_choice(k, "--grid", KV, "GRIDS", help="per-channel key grid of kivi, per-channel, query-tc, hadamard, random-rotation: "
                "lloyd-max levels learned on the calib split, same storage; static: levels per coordinate learned on "
                "the calib split, no per-group scale or zero (default: uniform)")
    k.add_argument("--budget", type=float, default=None,
                   help="query-tc: stored bits per key element (codes + scales + zeros); default --kbits + 32/--group")
    k.add_argument("--a2-low", type=int, default=None,
                   help="A² value policy: values at this many bits, the most attended ones in fp, chosen causally at "
                        "the mean payload of --vbits (one-pass engine); measured against uniform --vbits values")
    k.add_argument("--corpus", default="britannica")
    k.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (a multiple of --seq-len)")
    k.add_argument("--seq-len", type=int, default=512)
    k.add_argument("--prefill", type=int, default=128, help="tokens of each block prefilled before decoding")
    k.add_argument("--calib-tokens", type=int, default=4096,
                   help="calibration tokens (calib split) of HeadQ, query-tc and the lloyd-max grid")
    k.add_argument("--seed", type=int, help="seed of the random-basis control, the hadamard signs and the random rotation "
                   "(default: KVMethod's, 0)")
    _add_choice(k, "--engine", KV, "ENGINES", default=None,
                   help="onepass: one forward per batch of blocks; decode: token by token through the cache (the reference); "
                        "default: kvquant.experiment.EvalSetup's")
    k.add_argument("--batch", type=int, default=None, help="blocks per forward (default: EvalSetup's)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_kvquant)

    ks = sub.add_parser("kv-storage", help="every KV key code at equal measured storage: Pareto rows, the best new code vs "
                        "KIVI, query-tc vs per-token and KIVI (one run)")
    _model_arg(ks)
    ks.add_argument("--bits", type=int, nargs="+", default=[2, 3], help="key bits of every family, each compared with KIVI "
                    "at those bits (1..8, distinct; default: 2 3)")
    ks.add_argument("--values", action="store_true", help="full KV: values per token at the key bits (default: K-only)")
    _add_choice(ks, "--families", "atlas_core.kvquant.storage", "FAMILIES", nargs="+", default=None,
                help="the curves to run (fp, KIVI, and per-token beside query-tc, always run); default: every one the "
                     "model can run")
    ks.add_argument("--group", type=int, help="group size: channels (per-token) or tokens (KIVI keys); default 32")
    ks.add_argument("--rank", type=int, help="HeadQ side-code rank r (default 8)")
    ks.add_argument("--corpus", default="britannica")
    ks.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (a multiple of --seq-len)")
    ks.add_argument("--seq-len", type=int, default=512)
    ks.add_argument("--prefill", type=int, default=128, help="tokens of each block prefilled before decoding")
    ks.add_argument("--calib-tokens", type=int, default=4096,
                    help="calibration tokens (calib split) of HeadQ, query-tc and the lloyd-max grids")
    ks.add_argument("--json", action="store_true")
    ks.set_defaults(func=_kv_storage)

    s = sub.add_parser("sparse", help="anchor + window + top-k attention vs dense: generation agreement, KL, perplexity")
    _model_arg(s)
    _sparse_rule_args(s)
    s.add_argument("--dense-layers", type=int, help="the first n layers keep full attention (default: none)")
    _add_choice(s, "--selector", "atlas_core.sparse.kept", "SELECTORS",
                   help="top-k by exact score, pages by a score bound, or ⌈k/P⌉ blocks of --page-size keys by q · mean key "
                        "(per query head, or per KV head as the revised Condensate paper: S = a + W + k, e.g. k = 128 for S = 193)")
    s.add_argument("--head-average", action="store_true", default=None, help="one kept set per layer from head-averaged scores")
    s.add_argument("--corpus", default="britannica")
    s.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length (calib split)")
    s.add_argument("--gen-tokens", type=int, default=1500,
                   help="tokens of the dense greedy continuation (cached on disk) that the sparse rule is checked along")
    s.add_argument("--eval-tokens", type=int, default=16384,
                   help="held-out tokens for teacher forcing (eval split; a multiple of --seq-len, blocks are the bootstrap unit)")
    s.add_argument("--seq-len", type=int, default=1024, help="teacher-forced block length")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_sparse)

    w = sub.add_parser("wquant", help="weight quantization (RTN, GPTQ, AWQ, rotations): held-out perplexity and layer errors")
    _model_arg(w)
    _add_choice(w, "--method", "atlas_core.wquant.apply", "METHODS", default="gptq")
    w.add_argument("--bits", type=int, help="weight bits (2..16; default: WQuantSpec's, 4)")
    w.add_argument("--group", type=int, default=None, help="input columns per group (default: one per output channel)")
    w.add_argument("--symmetric", action="store_true", default=None)
    w.add_argument("--corpus", default="britannica", help="evaluation corpus (eval split)")
    w.add_argument("--calib-corpus", help="calibration corpus (calib split; default: wquant.calib.CalibConfig's)")
    w.add_argument("--calib-tokens", type=int, help="calibration tokens (default: CalibConfig's)")
    w.add_argument("--calib-seq-len", type=int, help="calibration block length (default: CalibConfig's)")
    w.add_argument("--tokens", type=int, default=4096, help="held-out tokens (eval split)")
    w.add_argument("--seq-len", type=int, default=512, help="evaluation block length")
    w.add_argument("--damp", type=float, help="GPTQ dampening, a fraction of mean diag H (default: wquant.gptq.GPTQConfig's)")
    w.add_argument("--act-order", action="store_true", help="GPTQ visits columns by decreasing diag H")
    w.add_argument("--one-pass", action="store_true",
                   help="GPTQ from one pass of the full-precision model, not block by block through the quantized blocks")
    w.add_argument("--seed", type=int, default=0, help="seed of the random rotations")
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=_wquant)

    from atlas_core.train.cli import add_parser as add_train  # `atlas train`: its parser imports no torch
    add_train(sub)
    bench = sub.add_parser("bench", help="benchmarks that print measured ratios")
    bsub = bench.add_subparsers(title="benchmarks", metavar="NAME")
    e = bsub.add_parser("extract", help="every-head extraction of one layer vs a plain eager forward")
    _model_arg(e)
    e.add_argument("--layer", type=int, default=-1)
    e.add_argument("--blocks", type=int, default=12)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_bench_extract)
    kb = bsub.add_parser("kvquant", help="decode step time and memory of quantized KV caches vs the fp cache")
    _model_arg(kb)
    kb.add_argument("--ctx", type=int, default=2048, help="cached tokens before the timed steps")
    kb.add_argument("--steps", type=int, default=16, help="timed decode steps per round")
    kb.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the caches")
    kb.add_argument("--bits", type=int, default=2, help="key and value bits")
    kb.add_argument("--group", type=int, default=32)
    kb.add_argument("--rank", type=int, default=8, help="HeadQ side-code rank")
    kb.add_argument("--memo", action="store_true", help="also keep the dequantized history (faster, no memory saved)")
    kb.add_argument("--json", action="store_true")
    kb.set_defaults(func=_bench_kvquant)
    kd = bsub.add_parser("kv-decode", help="one layer's decode attention: fused low-bit kernel vs fp32 SDPA (ratios, bytes)")
    kd.add_argument("--context", type=int, nargs="+", default=[32768, 131072], help="cached tokens (one or more)")
    kd.add_argument("--bits", type=int, default=2, help="key and value bits (KIVI layout, groups of 32)")
    kd.add_argument("--heads", type=int, help="query heads (default 9)")
    kd.add_argument("--kv-heads", type=int, help="KV heads (default 3)")
    kd.add_argument("--d-head", type=int, help="d_head (default 64)")
    kd.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    kd.add_argument("--steps", type=int, default=5, help="calls timed per round")
    kd.add_argument("--json", action="store_true")
    kd.set_defaults(func=_bench_kv_decode)
    sb = bsub.add_parser("sparse-decode", help="one layer's decode step: dense SDPA vs exact top-k vs page-selected")
    sb.add_argument("--context", type=int, nargs="+", default=[32768, 131072], help="cached tokens (one or more)")
    sb.add_argument("--heads", type=int, help="query heads of the synthetic cache (default 9)")
    sb.add_argument("--kv-heads", type=int, help="KV heads of the synthetic cache (default 3)")
    sb.add_argument("--d-head", type=int, help="d_head of the synthetic cache (default 64)")
    _sparse_rule_args(sb)
    sb.add_argument("--selector", choices=["pages", "certified"], default="pages",
                    help="pages: dense vs exact top-k vs Quest pages; certified: also the certified kernel, its "
                         "certificate beside the true discarded mass, bytes read and recall of the exact top-k mass")
    sb.add_argument("--real-keys", metavar="MODEL", help="certified: a real long prompt's keys, values and queries from "
                    "MODEL's last full-attention layer instead of a synthetic Gaussian cache")
    sb.add_argument("--real-tokens", type=int, help="--real-keys: the longest real prompt to capture (default 32768); the "
                    "prompt is min(this, the longest --context), and longer contexts tile its keys (reported as tiled)")
    sb.add_argument("--real-corpus", help="--real-keys: the corpus of the prompt (default britannica)")
    sb.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    sb.add_argument("--steps", type=int, default=5, help="decode steps timed per round")
    sb.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU exists")
    sb.add_argument("--json", action="store_true")
    sb.set_defaults(func=_bench_sparse)
    bb = bsub.add_parser("book", help="the book's time targets (README): measured (recorded or run now) beside each target")
    _add_choice(bb, "--run", "atlas_core.book.book_bench", "RUNS", nargs="*", default=[],
                    help="measure now: fresh (book from a fresh clone), rebuild (nothing changed), cli, qwen")
    bb.add_argument("--results", default=None, type=_path, help="results folder with the runner's timing records")
    bb.set_defaults(func=_bench_book)
    _name_command_parsers(p)
    return p


def _path(value: str) -> str:
    """argparse type of a file or folder option: an empty value would silently mean the default (or ".")."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder, or leave the option out for its default")
    return value


def _name_command_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's namespace its own parser, ``command_parser``, so that an unknown option is
    reported as ``atlas book: error: …`` with ``atlas book --help``, not under ``atlas``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(command_parser=sub)
                _name_command_parsers(sub)


def _bench_book(args) -> None:
    from atlas_core.book.book_bench import main

    main(args.run, args.results)


def _sparse_rule_args(p: argparse.ArgumentParser) -> None:
    """The rule's flags; one left out takes ``SparseConfig``'s default (the source's a = 1, W = 64, k = 32, P = 16)."""
    p.add_argument("--anchors", type=int, help="anchor tokens a (positions 0..a-1; default 1)")
    p.add_argument("--window", type=int, help="recent window W (the query's own token included; default 64)")
    p.add_argument("--topk", type=int, help="top-k keys among the rest (default 32)")
    p.add_argument("--page-size", type=int, help="keys per page for the page selector (default 16)")
    p.add_argument("--eps", type=float, help="certified selector: the discarded attention mass its certificate allows (default 1e-3)")
    _add_choice(p, "--bound", "atlas_core.sparse.kept", "BOUNDS", help="certified selector: the page score bound (default minmax)")
    p.add_argument("--rank", type=int, help="certified selector: rank of the low-rank key sketch (default 8)")
    p.add_argument("--max-pages", type=int, help="certified selector: a cap on pages read (default 0: none)")


SYNTHETIC_SHAPE = {"heads": 9, "kv_heads": 3, "d_head": 64}  # the decode benchmarks' default layer: smollm2-135m's
CERTIFIED_FLAGS = {"--eps": "eps", "--bound": "bound", "--rank": "rank", "--max-pages": "max_pages"}


def _sparse_config(args, topk_used: bool = True, **flags):
    """The ``SparseConfig`` of the rule flags given (and ``flags``: field -> attribute), validated before any load.

    The certified selector's flags are refused with any other selector (they would be ignored), and --topk with
    the certified selector where nothing else uses it (``topk_used`` False: ``atlas sparse``; the benchmark's k
    is its top-k and Quest kernels').
    """
    from atlas_core.sparse.kept import SparseConfig

    certified = getattr(args, "selector", None) == "certified"
    given = [flag for flag, attr in CERTIFIED_FLAGS.items() if getattr(args, attr) is not None]
    if given and not certified:
        raise ValueError(f"{given[0]} goes with --selector certified; add it or leave {given[0]} out")
    if certified and args.topk is not None and not topk_used:
        raise ValueError("--topk does not apply to --selector certified (it reads pages until its certificate is at most "
                         "--eps); leave it out")

    return SparseConfig(**_given(args, anchors="anchors", window="window", topk="topk", page_size="page_size", eps="eps",
                                 bound="bound", rank="rank", max_pages="max_pages", **flags))


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, toy-<family>, local folder or hub id")


def _cloud_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--layer", type=int, default=-1, help="layer index; negative counts from the end")
    _add_choice(p, "--residual", "atlas_core.clouds", "RESIDUALS", default="eps", help="ε = z − v[argmax p], z, or c after W_O")
    p.add_argument("--n-points", type=int, default=1200, help="points per head")
    p.add_argument("--corpus", default="britannica")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)


def _cloud_spec(args):
    from atlas_core.clouds import CloudSpec

    return CloudSpec(corpus=args.corpus, seq_len=args.seq_len, n_blocks=args.blocks, n_points=args.n_points, seed=args.seed)


def _overlap(args) -> None:
    from atlas_core.measure import check_request, overlap_report
    from atlas_core.models import load_model

    spec = _cloud_spec(args)  # validated before the model loads, with the layer and k on the model's shape
    check_request(_model_shape(args.model, [args.corpus], [(args.seq_len, "--seq-len")], [(spec.block_spec(), "--blocks")]),
                  args.layer, args.residual, spec, args.k)
    r = overlap_report(load_model(args.model), args.layer, args.k, args.residual, args.heads, spec, args.metric)
    if args.json:
        print(_json(r))
        return
    print(f"{r['model']} layer {r['layer']} {r['residual']} k={r['k']}: O_h = {r['o_h']:.4f} "
          f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] over {r['n_pairs']} {r['pairs']} pairs; "
          f"Haar null {r['null_mean']:.4f} ± {r['null_std']:.4f} (d={r['d']}), z = {r['z']:.2f}")


def _id(args) -> None:
    from atlas_core.measure import check_request, id_report
    from atlas_core.models import load_model

    spec = _cloud_spec(args)
    check_request(_model_shape(args.model, [args.corpus], [(args.seq_len, "--seq-len")], [(spec.block_spec(), "--blocks")]),
                  args.layer, args.residual, spec)
    r = id_report(load_model(args.model), args.layer, args.estimator, args.residual, spec)
    if args.json:
        print(_json(r))
        return
    print(f"{r['model']} layer {r['layer']} {r['residual']} {r['estimator']}: mean d_int = {r['mean']:.2f} "
          f"(per head: {', '.join(f'{v:.1f}' for v in r['per_head'])})")


def _models(args) -> None:
    from atlas_core.models import describe
    from atlas_core.zoo import EMBEDDED

    rows = []
    for name, entry in EMBEDDED.items():
        s = describe(name)
        rows.append(
            {"name": name, "source": entry.description, "family": s.family, "layers": s.n_layers,
             "heads": s.n_heads, "kv_heads": s.n_kv_heads, "d_head": s.d_head, "d_model": s.d_model,
             "sliding_layers": s.layer_types.count("sliding_attention"), "add_bos": s.add_bos}
        )
    if args.json:
        print(_json(rows))
        return
    cols = ["name", "family", "layers", "heads", "kv_heads", "d_head", "d_model", "sliding_layers", "add_bos"]
    print(_table(rows, cols))


def _json(obj) -> str:
    """Strict JSON (indent 2): a non-finite number (an undefined fraction, say) is written as null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=2, allow_nan=False)


def _blocks_of(tokens: int, seq_len: int, flag: str = "--tokens", at_least: int | None = None) -> int:
    """Blocks in ``tokens``: a whole number of ``--seq-len`` blocks, at least ``at_least`` (default: the
    interval's minimum; calibration needs one block)."""
    from atlas_core.interval import MIN_UNITS

    if seq_len < 2:
        raise ValueError(f"--seq-len must be ≥ 2, got {seq_len}")
    at_least = MIN_UNITS if at_least is None else at_least
    why = " (the intervals resample blocks)" if at_least == MIN_UNITS else ""
    if tokens % seq_len or tokens < at_least * seq_len:
        raise ValueError(f"{flag} ({tokens}) must be a multiple of --seq-len ({seq_len}) holding at least {at_least} "
                         f"block{'s' if at_least > 1 else ''}{why}, e.g. {max(at_least, tokens // seq_len) * seq_len}")
    return tokens // seq_len


def _model_shape(model: str, corpora: Sequence[str] = (), lengths: Sequence[tuple[int, str]] = (),
                 blocks: Sequence[tuple[object, str]] = ()):
    """The model's ``ModelSpec`` from its config alone (no weights), once the checks that need no weights
    pass: the model exists, each corpus is a known name or a file, each (tokens, flag) fits the positions, and
    each (BlockSpec, flag) fits its corpus split (its tokenizer only; the token stream is cached for the run)."""
    from atlas_core.corpus import check_blocks, check_corpus, surely_holds
    from atlas_core.models import check_positions, describe, load_tokenizer

    for corpus in corpora:
        check_corpus(corpus)
    spec = describe(model)
    for n_tokens, flag in lengths:
        check_positions(model, n_tokens, flag)
    counted = [(b, flag) for b, flag in blocks if not surely_holds(b)]  # the text's length vouches for the rest
    text = load_tokenizer(model) if counted else None
    for block_spec, flag in counted:
        with _for(flag):
            check_blocks(text, block_spec)
    return spec


@contextlib.contextmanager
def _for(flag: str):
    """Name ``flag`` in a refusal from inside (the corpus knows how many blocks it holds, not which flag asked)."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def _ppl(args) -> None:
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.eval import perplexity
    from atlas_core.models import load_model

    if args.seq_len < 2 or args.tokens < args.seq_len:
        raise ValueError(f"--tokens ({args.tokens}) must be at least --seq-len ({args.seq_len}), which must be >= 2")
    request = BlockSpec(corpus=args.corpus, seq_len=args.seq_len, n_blocks=args.tokens // args.seq_len, split=args.split)
    _model_shape(args.model, [args.corpus], [(args.seq_len, "--seq-len")], [(request, "--tokens")])  # before the weights load
    lm = load_model(args.model, attn_implementation="sdpa")
    with _for("--tokens"):
        blocks = token_blocks(lm, request)
    start = time.perf_counter()
    ppl = perplexity(lm.model, blocks)
    result = {"model": args.model, "corpus": args.corpus, "split": args.split, "seq_len": args.seq_len,
              "blocks": len(blocks), "tokens": blocks.numel(), "add_bos": lm.spec.add_bos,
              "perplexity": ppl, "seconds": round(time.perf_counter() - start, 2)}
    print(_json(result) if args.json else f"{args.model} on {args.corpus}: perplexity {ppl:.3f}")


def _kvquant(args) -> None:
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.kvquant.experiment import EvalSetup, KVMethod, compare
    from atlas_core.models import load_model

    method = KVMethod(method=args.method, pre_rope=args.pre_rope,  # validated before the model loads
                      **_given(args, kbits="kbits", vbits="vbits", group="group", residual="residual", rank="rank",
                               side_bits="side_bits", control="control", seed="seed", base="base", basis="basis", a2_low="a2_low",
                               grid="grid", budget="budget"))
    chosen = {k: v for k, v in (("engine", args.engine), ("batch", args.batch)) if v is not None}
    setup = EvalSetup(prefill=args.prefill, **chosen)
    setup.check(method)
    n_blocks = _blocks_of(args.tokens, args.seq_len)
    setup.check_block(args.seq_len, ("--prefill", "--seq-len"))
    n_calib = _blocks_of(args.calib_tokens, args.seq_len, "--calib-tokens", at_least=1) if method.needs_calibration() else 0
    method.check_block(args.seq_len, "--seq-len")
    requests = [(BlockSpec(corpus=args.corpus, seq_len=args.seq_len, n_blocks=n_blocks, split="eval"), "--tokens")]
    if method.needs_calibration():
        requests.append((BlockSpec(corpus=args.corpus, seq_len=args.seq_len, n_blocks=n_calib, split="calib"), "--calib-tokens"))
    spec = _model_shape(args.model, [args.corpus], [(args.seq_len, "--seq-len")], requests)
    method.check_head(spec.d_head)  # per-token groups divide d_head; HeadQ's rank ≤ d_head
    lm = load_model(args.model, attn_implementation="sdpa")  # perplexity needs no attention weights
    with _for("--tokens"):
        eval_blocks = token_blocks(lm, requests[0][0])
    calib = None
    if method.needs_calibration():
        with _for("--calib-tokens"):
            calib = token_blocks(lm, requests[1][0])
    start = time.perf_counter()
    r = compare(lm, eval_blocks, method, calib, setup, progress=sys.stderr.isatty(), store=True)  # fp, Σ_q kept on disk
    result = {"model": args.model, "corpus": args.corpus, "tokens": eval_blocks.numel(), "seq_len": args.seq_len,
              "blocks": len(eval_blocks), "prefill": args.prefill, "scored_tokens": r["method"]["nll"].numel(),
              "engine": setup.engine, "method": r["method"]["label"], "baseline": r["baseline"] and r["baseline"]["label"],
              **{name: est.as_dict() for name, est in r["figures"].items()},  # value, lo, hi (95%), units (blocks)
              "verdict": r["verdict"], "bits_key": r["method"]["bits_key"], "bits_value": r["method"]["bits_value"],
              "value_payload": r["method"]["value_payload"],
              "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        print(_json(result))
        return
    f = r["figures"]
    line = f"{args.model} {result['method']}: perplexity {f['ppl']:.3f} (fp {f['ppl_fp']:.3f}"
    if result["baseline"]:
        line += f", {result['baseline']} {f['ppl_baseline']:.3f}); it {r['verdict']}"
    else:
        line += ")"
    print(line + f"; stored bits per key {result['bits_key']:.3f}, per value {result['bits_value']:.3f}; "
          f"95% intervals over {len(eval_blocks)} blocks")


def _kv_storage(args) -> None:
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.kvquant import storage
    from atlas_core.kvquant.experiment import EvalSetup, Runs
    from atlas_core.models import load_model

    chosen = dict(kbits=args.bits, values=args.values, families=args.families, **_given(args, group="group", rank="rank"))
    methods = storage.study_methods(**chosen)  # bits, group, rank, families: validated before the model loads
    setup = EvalSetup(prefill=args.prefill)
    n_blocks = _blocks_of(args.tokens, args.seq_len)
    setup.check_block(args.seq_len, ("--prefill", "--seq-len"))
    for m in methods:
        m.check_block(args.seq_len, "--seq-len")  # KIVI's residual (its group) below the block
    calibrates = any(m.needs_calibration() for m in methods)
    n_calib = _blocks_of(args.calib_tokens, args.seq_len, "--calib-tokens", at_least=1) if calibrates else 0
    requests = [(BlockSpec(corpus=args.corpus, seq_len=args.seq_len, n_blocks=n_blocks, split="eval"), "--tokens")]
    if calibrates:
        requests.append((BlockSpec(corpus=args.corpus, seq_len=args.seq_len, n_blocks=n_calib, split="calib"), "--calib-tokens"))
    spec = _model_shape(args.model, [args.corpus], [(args.seq_len, "--seq-len")], requests)
    rope = spec.family != "gpt2"
    storage.study_methods(**chosen, pre_rope=rope, d_head=spec.d_head)  # what the model can run; groups, rank on d_head
    lm = load_model(args.model, attn_implementation="sdpa")
    with _for("--tokens"):
        eval_blocks = token_blocks(lm, requests[0][0])
    calib = None
    if calibrates:
        with _for("--calib-tokens"):
            calib = token_blocks(lm, requests[1][0])
    from atlas_core.progress import tqdm

    start = time.perf_counter()
    runs = Runs(lm, eval_blocks, calib, setup, progress=sys.stderr.isatty(), store=True)  # fp, Σ_q kept on disk
    bar = lambda ms: tqdm(ms, desc="methods", disable=not sys.stderr.isatty())  # noqa: E731
    r = storage.study(runs, args.bits, values=args.values, families=args.families, progress=bar, pre_rope=rope,
                      **_given(args, group="group", rank="rank"))
    result = {"model": args.model, "corpus": args.corpus, "tokens": eval_blocks.numel(), "seq_len": args.seq_len,
              "blocks": len(eval_blocks), "prefill": args.prefill, "calib_tokens": 0 if calib is None else calib.numel(),
              "values": "full KV" if args.values else "K-only", "bits": args.bits,
              "families": list(dict.fromkeys(storage.family(m) for m in r["methods"][1:])),
              **storage.as_json({k: r[k] for k in ("rows", "equal_storage", "versus")}),
              "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        print(_json(result))
        return
    print(f"{args.model}, {result['values']}, {len(eval_blocks)} blocks of {args.seq_len} tokens ({args.corpus}); "
          "bits per element measured from the bytes held; 95% intervals over blocks")
    print(_table([{"label": row["label"], "family": row["family"], "bits/key": f"{row['bits_key']:.3f}",
                   "bits/value": f"{row['bits_value']:.3f}", "PPL [lo, hi]": f"{row['ppl']:.3f}",
                   "front": "*" if row["on_front"] else ""} for row in r["rows"]],
                 ["label", "family", "bits/key", "bits/value", "PPL [lo, hi]", "front"]))
    for b in args.bits:
        e = r["equal_storage"][b]
        print(f"\nK{b} at equal storage:")
        if e is None:
            print(f"  no new key code ({', '.join(storage.NEW_CODES)}) run here fits KIVI-{b}'s storage")
        else:
            kivi = e["kivi"]
            print(f"  {kivi['label']}: {kivi['bits_key']:.3f} bits/key, PPL {kivi['ppl']:.3f}; fp PPL {e['ppl_fp']:.3f}\n"
                  f"  best new code {e['best']}: {e['bits_key']:.3f} bits/key, PPL {e['ppl']:.3f}; difference "
                  f"{e['difference']:.3f}; excess removed "
                  f"{'undefined (KIVI is not above fp)' if math.isnan(e['excess_removed'].value) else format(e['excess_removed'], '.1%')}"
                  f"\n  {e['verdict']}")
        for text in r["versus"][b].values():
            print(f"  {text}")


def _run(args) -> None:
    from atlas_core.book.runner import CHAPTERS, run_chapter

    if args.source is None and args.chapter not in CHAPTERS:
        raise ValueError(f"no chapter {args.chapter!r}; the chapters are {', '.join(CHAPTERS)} (or give --source FILE)")
    from atlas_core.book.runner import SourceError

    try:
        path = run_chapter(args.chapter, args.model, dict(args.param), out_dir=args.out, source=args.source)
    except SourceError as err:  # name the option that gave the file
        raise SourceError(f"--source: {err}" if args.source is not None else str(err)) from None
    print(path)


def _book(args) -> None:
    from atlas_core.book.runner import build_book

    if args.pdf:  # before any chapter runs: the PDF needs Chromium
        from atlas_core.book.browser import BrowserError, find_chromium

        try:
            find_chromium()
        except BrowserError as err:
            raise ValueError(f"--pdf: {err}") from None
    html = build_book(cores=args.cores, models=args.models)
    if args.pdf:
        from atlas_core.book.pdf import book_pdf

        print(book_pdf(html.parent))


def _compare(args) -> int:
    from atlas_core.book.compare import compare_files

    found = compare_files(args.first, args.second)
    print("\n".join(found) if found else "identical numbers (timings skipped)")
    return 1 if found else 0


def _check_book(args) -> int:
    from atlas_core.book.browser import BrowserError, check_book, summary

    if args.html is None:
        from atlas_core.book.runner import ROOT

        args.html = ROOT / "_build" / "html"
    try:
        reports = check_book(args.html)
    except BrowserError as err:
        raise ValueError(str(err)) from None
    print(summary(reports))
    return 1 if any(r.problems for r in reports) else 0


def _bench_extract(args) -> None:
    from atlas_core.bench import bench_extract

    r = bench_extract(args.model, args.layer, args.blocks, args.seq_len, repeats=args.repeats)
    if args.json:
        print(_json(r))
    else:
        print(f"extract layer {r['layer']} / plain eager forward, {r['blocks']} x {r['seq_len']} tokens: "
              f"{r['extract_s']:.2f} s / {r['forward_s']:.2f} s = {r['ratio']:.3f}x")


def _bench_kvquant(args) -> None:
    from atlas_core.kvquant.bench import bench_kvquant

    r = bench_kvquant(  # checks every setting on the model's config (kvquant.bench.check_bench) before loading it
        args.model, args.ctx, args.steps, args.rounds, args.bits, args.group, args.rank, memo=args.memo)
    if args.json:
        print(_json(r))
        return
    print(f"{r['model']}, {r['n_ctx']} cached tokens, K and V at {r['bits']} bits"
          f"{' (memoised history)' if r['memo'] else ''}; decode step (median) and memory:")
    for name, c in r["caches"].items():
        print(f"  {name:10s} {c['step_s'] * 1e3:7.2f} ms  x{c['ratio_vs_fp']:.2f} vs fp   held {c['held_bytes'] / 2**20:7.2f} MiB"
              f"   {c['held_bits_per_element']:.3f} bits/element held")
    print(f"HeadQ step / per-token step = {r['headq_vs_per_token']:.3f}")
    if r["fused"]:
        print(f"fused (numba {r['numba_threads']} threads): HeadQ step / per-token step = {r['headq_vs_per_token_fused']:.3f}; "
              + ", ".join(f"{m} fused/plain = {x:.3f}" for m, x in r["fused_vs_plain"].items()))
    else:
        print("fused steps not timed: numba is not installed")


def _bench_kv_decode(args) -> None:
    from atlas_core.kvquant.bench import bench_kv_decode

    shape = {**SYNTHETIC_SHAPE, **_given(args, heads="heads", kv_heads="kv_heads", d_head="d_head")}
    r = bench_kv_decode(  # every setting checked (kvquant.bench.check_kv_decode) before any tensor is made
        tuple(args.context), args.bits, shape["heads"], shape["kv_heads"], shape["d_head"], args.rounds, args.steps)
    if args.json:
        print(_json(r))
        return
    s = r["shape"]
    print(f"one layer's decode attention, {s['heads']} heads / {s['kv_heads']} KV heads, d_head {s['d_head']}, {r['bits']}-bit "
          f"{r['layout']}; torch {r['torch_threads']} / numba {r['numba_threads']} threads; median of {r['rounds']} rounds")
    for row in r["rows"]:
        print(f"  n={row['n']:>7}: fused {row['fused_s'] * 1e3:8.3f} ms | fp32 SDPA {row['sdpa_fp32_s'] * 1e3:8.3f} ms "
              f"(fused x{row['speedup_vs_sdpa']:.2f}) | dequantize+SDPA {row['dequant_sdpa_s'] * 1e3:8.3f} ms "
              f"(fused x{row['speedup_vs_dequant']:.2f}); reads {row['bytes_fused'] / 2**20:.2f} MiB vs "
              f"{row['bytes_sdpa_fp32'] / 2**20:.2f} MiB fp32 (1/{row['bytes_ratio']:.1f}); |fused - reference| {row['max_abs_diff']:.1e}")


def _sparse(args) -> None:
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.models import load_model
    from atlas_core.sparse.fidelity import fidelity_report

    cfg = _sparse_config(args, topk_used=False, dense_layers="dense_layers", selector="selector", head_average="head_average")
    cfg.check_context(args.prompt_tokens, "--prompt-tokens")  # validated before the model loads
    cfg.check_block(args.seq_len, "--seq-len")
    n_blocks = _blocks_of(args.eval_tokens, args.seq_len, "--eval-tokens")
    if args.gen_tokens < 1:
        raise ValueError(f"--gen-tokens must be ≥ 1, got {args.gen_tokens}")
    shape = _model_shape(args.model, [args.corpus])
    cfg.check_layers(shape.n_layers, "--dense-layers")
    cfg.check_head(shape.d_head, "--rank")
    prompt_spec = BlockSpec(corpus=args.corpus, seq_len=args.prompt_tokens, n_blocks=1, split="calib")
    eval_spec = BlockSpec(corpus=args.corpus, seq_len=args.seq_len, n_blocks=n_blocks, split="eval")
    _model_shape(args.model, lengths=[(args.seq_len, "--seq-len"),
                                      (args.prompt_tokens + args.gen_tokens, "--prompt-tokens + --gen-tokens")],
                 blocks=[(prompt_spec, "--prompt-tokens"), (eval_spec, "--eval-tokens")])
    lm = load_model(args.model, attn_implementation="sdpa")  # dense references and generation; the rule runs eager
    with _for("--prompt-tokens"):
        prompt = token_blocks(lm, prompt_spec)[0]
    with _for("--eval-tokens"):
        blocks = token_blocks(lm, eval_spec)
    start = time.perf_counter()
    r = fidelity_report(lm, cfg, prompt, args.gen_tokens, blocks, progress=sys.stderr.isatty())
    result = {"model": args.model, "corpus": args.corpus, **cfg.__dict__, "prompt_tokens": len(prompt),
              "gen_tokens": args.gen_tokens, "eval_tokens": blocks.numel(), "interval": "95% block bootstrap (SPEC §11)",
              **r, "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        print(_json(result))
        return

    def ci(name, spec):
        return f"{r[name]:{spec}} [{r[name + '_lo']:{spec}}, {r[name + '_hi']:{spec}}]"

    first = "none (identical)" if r["first_divergence"] is None else r["first_divergence"]
    print(f"{args.model}, a={cfg.anchors} W={cfg.window} k={cfg.topk} ({cfg.selector}, {cfg.dense_layers} dense layers):\n"
          f"  along the dense greedy continuation ({args.gen_tokens} tokens after a {len(prompt)}-token prompt): "
          f"step agreement {r['step_agreement']:.1%}, first divergence {first}\n"
          f"  teacher forced ({r['tf_positions']} positions in {r['tf_blocks']} blocks; 95% intervals): top-1 agreement "
          f"{ci('top1_agree', '.2%')}, KL {ci('kl', '.4f')} nats\n"
          f"  perplexity {ci('ppl_dense', '.3f')} -> {ci('ppl_sparse', '.3f')} (change {ci('ppl_change', '+.2%')}); "
          f"mean discarded mass {ci('discarded', '.4f')}")
    if cfg.selector == "certified":
        print(f"  certified (eps {cfg.eps:g}, {cfg.bound} bound): reads {ci('key_bytes', '.1%')} of the key bytes, "
              f"{r['pages_read_share']:.1%} of the candidate pages; certificate mean {r['certificate_mean']:.2e} max "
              f"{r['certificate_max']:.2e}, true m mean {r['m_mean']:.2e} max {r['m_max']:.2e}; m above the certificate: "
              f"{r['violations']} of {r['calibration_pairs']} (query, head, layer) cases")


def _wquant(args) -> None:
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.interval import Estimate
    from atlas_core.models import load_model
    from atlas_core.wquant.calib import CalibConfig, calibration_stats
    from atlas_core.wquant.experiment import run_wquant
    from atlas_core.wquant.gptq import GPTQConfig
    from atlas_core.wquant.rtn import WQuantSpec

    spec = WQuantSpec(**_given(args, bits="bits", group="group", symmetric="symmetric"))  # validated before the model loads
    given = {"corpus": args.calib_corpus, "tokens": args.calib_tokens, "seq_len": args.calib_seq_len}
    cal = CalibConfig(**{k: v for k, v in given.items() if v is not None})
    gptq_config = GPTQConfig(act_order=args.act_order, sequential=not args.one_pass,
                             **({} if args.damp is None else {"damp": args.damp}))
    gptq_only = [flag for flag, set_ in (("--damp", args.damp is not None), ("--act-order", args.act_order),
                                         ("--one-pass", args.one_pass)) if set_]
    if gptq_only and args.method != "gptq":
        raise ValueError(f"{', '.join(gptq_only)} set GPTQ's settings; --method {args.method} has no use for them")
    n_blocks = _blocks_of(args.tokens, args.seq_len)  # the intervals resample blocks: one block gives a point
    eval_spec = BlockSpec(corpus=args.corpus, seq_len=args.seq_len, n_blocks=n_blocks, split="eval")
    _model_shape(args.model, [args.corpus, cal.corpus], [(max(args.seq_len, cal.seq_len), "--seq-len or --calib-seq-len")],
                 [(cal.block_spec(), "--calib-tokens"), (eval_spec, "--tokens")])
    from atlas_core.models import model_config
    from atlas_core.wquant.layers import linear_widths  # from the config on the meta device: no weights

    for width in linear_widths(model_config(args.model)):
        spec.group_size(width)  # --group divides every layer's input columns
    lm = load_model(args.model, attn_implementation="sdpa")
    with _for("--calib-tokens"):
        calib = cal.blocks(lm)
    with _for("--tokens"):
        blocks = token_blocks(lm, eval_spec)
    judge = calibration_stats(lm, blocks, fisher=False, progress=False)  # output errors on held-out inputs
    r = run_wquant(lm, args.method, spec, calib, blocks, seed=args.seed, progress=sys.stderr.isatty(), judge=judge,
                   gptq_config=gptq_config, calib_config=cal)
    result = {"model": args.model, "corpus": args.corpus, "calib_corpus": cal.corpus, "calib_tokens": calib.numel(),
              "calib_seq_len": cal.seq_len, "tokens": blocks.numel(),
              **({"damp": gptq_config.damp, "act_order": gptq_config.act_order, "sequential": gptq_config.sequential}
                 if args.method == "gptq" else {}),
              **{k: v for k, v in r.items() if k not in ("layers", "nll", "nll_fp")}}  # per-token NLL: not JSON
    if args.json:
        print(_json(result))
        return
    out = "" if r["output_error"] is None else f", output {r['output_error']:.3e}"
    ppl, fp, ratio = (Estimate(**r[k]) for k in ("ppl", "ppl_fp", "ppl_ratio"))
    print(f"{args.model} {args.method} {spec.bits}b (group {spec.group or 'channel'}): perplexity {ppl:.3f} "
          f"(fp {fp:.3f}; ratio {ratio:.3f}, 95% block-bootstrap intervals on {ppl.units} blocks); "
          f"mean relative layer error: weight {r['weight_error']:.3e}{out} (held-out inputs); "
          f"{r['seconds']:.1f} s")


def _bench_sparse(args) -> None:
    from atlas_core.sparse.bench import bench_sparse_decode

    if args.selector == "certified":
        return _bench_certified(args)
    if args.real_keys is not None:
        raise ValueError("--real-keys goes with --selector certified (the pages benchmark runs on a synthetic cache)")
    _check_real_flags(args)
    cfg = _sparse_config(args)
    shape = {**SYNTHETIC_SHAPE, **_given(args, heads="heads", kv_heads="kv_heads", d_head="d_head")}
    r = bench_sparse_decode(  # sizes, device and memory checked (sparse.bench.check_decode) before any tensor is made
        tuple(args.context), shape["heads"], shape["kv_heads"], shape["d_head"], cfg, args.rounds, args.steps, device=args.device)
    if args.json:
        print(_json(r))
        return
    s = r["shape"]
    print(f"decode step, {s['heads']} heads / {s['kv_heads']} KV heads, d_head {s['d_head']}, fp32 on {s['device']} "
          f"({s['threads']} threads); a={cfg.anchors} W={cfg.window} k={cfg.topk} P={cfg.page_size}; median of {r['rounds']} rounds")
    for row in r["rows"]:
        print(f"  n={row['n']:>7}: dense {row['dense_s'] * 1e3:8.3f} ms | top-k {row['topk_s'] * 1e3:8.3f} ms "
              f"(x{row['speedup_topk']:.2f}, reads 1/{row['bytes_ratio_topk']:.1f}) | pages {row['pages_s'] * 1e3:8.3f} ms "
              f"(x{row['speedup_pages']:.2f}, reads 1/{row['bytes_ratio_pages']:.1f}); page recall of exact top-k "
              f"(synthetic cache): index {row['index_recall']:.3f}, mass {row['mass_recall']:.3f}")


def _check_real_flags(args) -> None:
    """Refuse the --real-* settings without --real-keys (they would be ignored)."""
    if args.real_keys is None:
        for flag, value in (("--real-tokens", args.real_tokens), ("--real-corpus", args.real_corpus)):
            if value is not None:
                raise ValueError(f"{flag} goes with --real-keys MODEL (it sets the real prompt); add --real-keys or leave it out")


def _bench_certified(args) -> None:
    from atlas_core.sparse.bench import bench_certified_decode, check_decode

    _check_real_flags(args)
    cfg = _sparse_config(args, selector="selector")
    real, shape = None, dict(SYNTHETIC_SHAPE)
    given = _given(args, **{"--heads": "heads", "--kv-heads": "kv_heads", "--d-head": "d_head"})
    if args.real_keys is not None:
        from atlas_core.sparse.realkeys import real_keys

        if given:
            raise ValueError(f"{', '.join(given)}: the real keys bring their own layer shape; leave these out with --real-keys")
        tokens = 32768 if args.real_tokens is None else args.real_tokens
        if tokens < 1:
            raise ValueError(f"--real-tokens must be an integer ≥ 1, got {tokens}")
        check_decode(tuple(args.context), 1, 1, 1, cfg, args.rounds, args.steps, args.device)
        cfg.check_head(_model_shape(args.real_keys).d_head, "--rank")
        captured = sorted({min(n, tokens) for n in args.context})
        real = real_keys(args.real_keys, tuple(captured), corpus=args.real_corpus or "britannica",
                         progress=sys.stderr.isatty())
    else:
        shape.update(_given(args, heads="heads", kv_heads="kv_heads", d_head="d_head"))
    r = bench_certified_decode(tuple(args.context), cfg, real, shape["heads"], shape["kv_heads"], shape["d_head"],
                               args.rounds, args.steps, device=args.device)
    if args.json:
        print(_json(r))
        return
    s = r["shape"]
    print(f"certified decode step on {r['source']}: {s['heads']} heads / {s['kv_heads']} KV heads, d_head {s['d_head']}, "
          f"fp32 on {s['device']} ({s['threads']} threads); a={cfg.anchors} W={cfg.window} P={cfg.page_size} "
          f"eps={cfg.eps:g} bound={cfg.bound} (rank {cfg.rank}); top-k k={cfg.topk}; median of {r['rounds']} rounds")
    for row in r["rows"]:
        print(f"  n={row['n']:>7}{' (tiled)' if row['tiled'] else ''}: dense SDPA {row['dense_s'] * 1e3:.3f} ms "
              f"(matmul-softmax-matmul {row['dense_plain_s'] * 1e3:.3f} ms) | certified {row['certified_s'] * 1e3:.3f} ms "
              f"(x{row['speedup_certified']:.2f} over SDPA, x{row['speedup_certified_vs_plain']:.2f} over the plain dense) | "
              f"top-k x{row['speedup_topk']:.2f} | pages x{row['speedup_pages']:.2f}\n"
              f"      certified reads {row['key_bytes']:.1%} of the key bytes (max {row['key_bytes_max']:.1%}; an oracle "
              f"with exact page masses: {row['oracle_key_bytes']:.1%}), {row['certified_bytes'] / row['dense_bytes']:.1%} "
              f"of dense's bytes (read pages counted per query head); recall of the exact top-{cfg.topk} mass {row['topk_mass_recall']:.3f}\n"
              f"      certificate mean {row['certificate']:.2e} max {row['certificate_max']:.2e} | true m mean "
              f"{row['m']:.2e} max {row['m_max']:.2e} | m > certificate: {row['violations']} of {row['queries'] * s['heads']}\n"
              f"      bound slack u_p - max s over a page, median logits (last query): "
              + ", ".join(f"{b} {v[0]:.1f}" for b, v in row["slack"].items()))


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
