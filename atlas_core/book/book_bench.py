"""``atlas bench book``: each of the book's time targets (README) as a measured figure beside its target.

Not a timed test: it prints measured/target ratios. Wherever the runner already recorded a time (each
chapter's ``results/<model>/<chapter>.timing.json``, the last build's ``results/book.timing.json``) it is
read, not re-measured. What no record holds is measured only when asked (``--run``):

- ``fresh``: the book from a fresh clone (``git clone`` of this repository's commit into a temporary
  folder, then ``bash atlas.sh book`` there), reusing this checkout's venv and the converted models but no
  other cached intermediate (a cache folder holding only the models);
- ``rebuild``: ``bash atlas.sh book`` here, on a checkout whose book is built and unchanged: Snakemake
  runs no chapter, and only the HTML step and its checks are left;
- ``cli``: the two commands of the targets, ``atlas kvquant ... --tokens 16384 --json`` and
  ``atlas sparse ... --eval-tokens 16384 --json``, each timed and its JSON checked for an interval;
- ``qwen``: ``atlas run kvquant --model qwen2.5-coder-0.5b`` (long).

Times on a shared machine are noisy; each line says where its figure came from.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from atlas_core.book.runner import BOOK_TIMING, CHAPTERS, ROOT, model_slug
from atlas_core.zoo import DEFAULT_MODEL

CHAPTER_TARGET_S = 300  # every chapter on the default model, one BLAS thread
LONG_CHAPTER_TARGET_S = {"nqp": 600}
KVQUANT_CLI = ("kvquant", "--model", DEFAULT_MODEL, "--method", "kivi", "--kbits", "2", "--tokens", "16384", "--json")
SPARSE_CLI = ("sparse", "--model", DEFAULT_MODEL, "--eval-tokens", "16384", "--json")
RUNS = ("fresh", "rebuild", "cli", "qwen")


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One target: what was measured, the limit, where the number came from."""

    name: str
    target_s: float
    measured_s: float | None
    source: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.measured_s is None else self.measured_s / self.target_s

    def line(self, width: int = 58) -> str:
        """One row of ``report``: the name padded to ``width``, then measured, target, ratio and verdict columns."""
        measured = "—" if self.measured_s is None else f"{self.measured_s:.1f}"
        ratio = "—" if self.ratio is None else f"{self.ratio:.2f}"
        verdict = "" if self.ratio is None else ("ok" if self.ratio <= 1 else "OVER")
        note = f"  ({self.note})" if self.note else ""
        return (f"{self.name:<{width}} {measured:>{COLUMN}} {self.target_s:>{COLUMN}.0f} {ratio:>{COLUMN}} {verdict:<4}"
                f"  [{self.source}]{note}")


COLUMN = 10  # width of the measured, target and ratio columns (the header "measured s" is the widest)


def _seconds(info: dict | None, key: str) -> float | None:
    """A recorded duration, or None when the record or the field is missing or not a number."""
    try:
        return None if info is None else float(info[key])
    except (KeyError, TypeError, ValueError):
        return None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def chapter_figures(results: Path, model: str = DEFAULT_MODEL) -> list[Figure]:
    """Each chapter's recorded wall time on ``model`` (default parameters and one BLAS thread, or says not)."""
    out = []
    for chapter in CHAPTERS:
        path = results / model_slug(model) / f"{chapter}.timing.json"
        info = _read(path)
        target = LONG_CHAPTER_TARGET_S.get(chapter, CHAPTER_TARGET_S)
        name = f"atlas run {chapter} --model {model}"
        if info is None:
            out.append(Figure(name=name, target_s=target, measured_s=None, source=f"no {path}"))
            continue
        notes = []
        source = info.get("source")
        if source and Path(source).resolve() != (ROOT / "notebooks" / f"{chapter}.py").resolve():
            notes.append(f"ran {source}, not the book's chapter")
        if info.get("params"):
            notes.append(f"non-default params {info['params']}")
        threads = info.get("blas_threads")
        if threads not in ("1", None):
            notes.append(f"{threads} BLAS threads")
        elif threads is None:
            notes.append("BLAS threads not recorded")
        if _seconds(info, "wall_s") is None:
            notes.append("the record has no wall_s")
        out.append(Figure(name=name, target_s=target, measured_s=_seconds(info, "wall_s"),
                          source=f"{path} {info.get('finished', '')}", note="; ".join(notes)))
    return out


def timed(command: list[str], cwd: Path, env: dict | None = None, log: Path | None = None) -> tuple[float, int, str]:
    """Run ``command``; (wall seconds, exit status, stdout). stderr goes to ``log`` (or is shown)."""
    start = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as err:
        proc = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True,
                              stderr=err if log else None)
    return time.perf_counter() - start, proc.returncode, proc.stdout


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}
    return env


def book_figure(root: Path, name: str, target_s: float, seconds: float, rc: int, how: str) -> Figure:
    """A book build's figure, with the breakdown the runner recorded in ``results/book.timing.json``."""
    info = _read(root / BOOK_TIMING) or {}
    note = ""
    if info:
        note = (f"workflow {info.get('workflow_s')} s, HTML {info.get('html_s')} s, {info.get('browser')}, "
                f"chapters run: {', '.join(info.get('chapters_ran', [])) or 'none'}")
    if rc:
        note = f"exit {rc}; " + note
    return Figure(name=name, target_s=target_s, measured_s=seconds, source=how, note=note)


def fresh_clone_build(root: Path = ROOT, keep: Path | None = None) -> Figure:
    """``bash atlas.sh book`` in a fresh clone of ``root`` (this venv, the converted model cache)."""
    folder = keep or Path(tempfile.mkdtemp(prefix="atlas-fresh-"))
    subprocess.run(["git", "clone", "--quiet", str(root), str(folder / "atlas")], check=True)
    clone = folder / "atlas"
    venv = Path(sys.executable).parents[1]
    # A cache holding only the converted models: clouds, calibration statistics and dense references are
    # computed as on a fresh machine.
    from atlas_core.cache import cache_dir

    cache = folder / "cache"
    cache.mkdir(exist_ok=True)
    (cache / "models").symlink_to(cache_dir("models"), target_is_directory=True)
    # The venv's editable install points at this checkout; PYTHONPATH puts the clone's package first.
    env = _env(ATLAS_VENV=str(venv), PYTHONPATH=str(clone), ATLAS_CACHE_DIR=str(cache))
    seconds, rc, _ = timed(["bash", "atlas.sh", "book"], clone, env, log=folder / "book.log")
    return book_figure(clone, "bash atlas.sh book, fresh clone (aim 900 s)", 1200, seconds, rc,
                       f"ran in {clone}, log {folder / 'book.log'}")


def rebuild(root: Path = ROOT) -> Figure:
    """``bash atlas.sh book`` on a checkout whose book is already built: nothing should run."""
    seconds, rc, _ = timed(["bash", "atlas.sh", "book"], root, _env(), log=Path(tempfile.gettempdir()) / "atlas-rebuild.log")
    return book_figure(root, "bash atlas.sh book, nothing changed", 30, seconds, rc, f"ran in {root}")


def recorded_book(results: Path) -> Figure:
    """The last recorded build (``<results>/book.timing.json``): a fresh-build figure only if every chapter
    ran in it, else a rebuild figure."""
    path = results / BOOK_TIMING.name
    info = _read(path)
    name = "bash atlas.sh book, last recorded build"
    if info is None:
        return Figure(name=name, target_s=1200, measured_s=None, source=f"no {path}")
    everything = set(info.get("chapters_ran", [])) == set(CHAPTERS)
    return Figure(name=name + (" (every chapter ran)" if everything else " (a rebuild)"),
                  target_s=1200 if everything else 30, measured_s=_seconds(info, "total_s"),
                  source=f"{path} {info.get('finished', '')}",
                  note=f"chapters run: {', '.join(info.get('chapters_ran', [])) or 'none'}; "
                       f"workflow {info.get('workflow_s')} s, HTML {info.get('html_s')} s")


def has_interval(obj) -> bool:
    """True when a JSON value holds an interval somewhere ("lo" and "hi" side by side, flat "x_lo" and "x_hi"
    beside "x", or a "ci" pair)."""
    if isinstance(obj, dict):
        if {"lo", "hi"} <= obj.keys() or any(k.endswith(("_ci", "ci")) and isinstance(v, list) and len(v) == 2
                                            for k, v in obj.items()):
            return True
        if any(f"{k}_lo" in obj and f"{k}_hi" in obj for k in obj):  # atlas sparse's flat keys
            return True
        return any(has_interval(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_interval(v) for v in obj)
    return False


def cli_figure(args: tuple[str, ...], target_s: float = 180) -> Figure:
    """Time one ``atlas`` command with one BLAS thread; check that its JSON carries an interval."""
    atlas = Path(sys.executable).with_name("atlas")
    env = _env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    seconds, rc, out = timed([str(atlas), *args], ROOT, env, log=Path(tempfile.gettempdir()) / f"atlas-bench-{args[0]}.log")
    try:
        note = "interval in JSON" if has_interval(json.loads(out)) else "NO interval in its JSON"
    except ValueError:
        note = "no JSON printed"
    if rc:
        note = f"exit {rc} (log {tempfile.gettempdir()}/atlas-bench-{args[0]}.log); {note}"
    return Figure(name="atlas " + " ".join(shlex.quote(a) for a in args), target_s=target_s,
                  measured_s=seconds, source="ran now, 1 BLAS thread", note=note)


def qwen_kvquant(out: Path) -> Figure:
    atlas = Path(sys.executable).with_name("atlas")
    env = _env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    seconds, rc, _ = timed([str(atlas), "run", "kvquant", "--model", "qwen2.5-coder-0.5b", "--out", str(out)], ROOT, env,
                           log=out.parent / "qwen-kvquant.log")
    return Figure(name="atlas run kvquant --model qwen2.5-coder-0.5b", target_s=900, measured_s=seconds,
                  source=f"ran now into {out}", note=f"exit {rc}" if rc else "")


def readme_build_time(root: Path = ROOT) -> str:
    """The README's sentence(s) about the build time, to set beside the measured one."""
    lines = (root / "README.md").read_text(encoding="utf-8").splitlines()
    said = re.compile(r"\b(minutes?|hours?|\d+(\.\d+)? min)\b", re.IGNORECASE)  # "20 minutes", "46 min", "an hour"
    hits = [l.strip() for l in lines if said.search(l) and ("book" in l.lower() or "build" in l.lower() or "min" in l)]
    return "\n".join(hits) or "(no build-time sentence found in README.md)"


def report(figures: list[Figure]) -> str:
    """The figures as a table whose columns line up however long a command is."""
    width = max([len("target"), *(len(f.name) for f in figures)])
    head = f"{'target':<{width}} {'measured s':>{COLUMN}} {'target s':>{COLUMN}} {'ratio':>{COLUMN}} {'':<4}  [source]"
    return "\n".join([head, "-" * len(head), *(f.line(width) for f in figures)])


def main(runs: list[str], results: Path | None = None, model: str = DEFAULT_MODEL) -> list[Figure]:
    """Print every target beside its measured figure; ``runs`` names what to measure now (``RUNS``)."""
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise ValueError(f"unknown --run {unknown}; choose from {', '.join(RUNS)}")
    if results is not None and not Path(results).is_dir():
        raise ValueError(f"--results {results} is not a folder; give the results folder the runner wrote (default results/)")
    results = Path(results or ROOT / "results")
    figures = []
    if "fresh" in runs:
        figures.append(fresh_clone_build())
    if "rebuild" in runs:
        figures.append(rebuild())
    if not {"fresh", "rebuild"} & set(runs):
        figures.append(recorded_book(results))
    figures += chapter_figures(results, model)
    if "qwen" in runs:
        figures.append(qwen_kvquant(Path(tempfile.mkdtemp(prefix="atlas-qwen-"))))
    else:
        path = results / model_slug("qwen2.5-coder-0.5b") / "kvquant.timing.json"
        info = _read(path)
        figures.append(Figure(name="atlas run kvquant --model qwen2.5-coder-0.5b", target_s=900,
                              measured_s=_seconds(info, "wall_s"),
                              source=str(path) if info else f"no {path} (--run qwen measures it)"))
    if "cli" in runs:
        figures += [cli_figure(KVQUANT_CLI), cli_figure(SPARSE_CLI)]
    else:
        figures += [Figure(name="atlas " + " ".join(a), target_s=180, measured_s=None, source="--run cli measures it")
                    for a in (KVQUANT_CLI, SPARSE_CLI)]
    print(report(figures))
    print("\nREADME says:", readme_build_time(), sep="\n")
    return figures
