"""cProfile summary of one chapter, run in-process (not through papermill) with the runner's parameters.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python scripts/profile_chapter.py models \\
        --model smollm2-135m --out /tmp/prof_models [-p NAME VALUE ...] [--top 25]

The chapter's parameters are checked exactly as ``atlas run`` checks them (workflow/params.yaml, then -p),
its code cells run in order in one namespace with a non-interactive matplotlib, and the cumulative and
own-time tables of the top entries are printed and written to ``<out>/<chapter>.profile.txt`` (the raw
stats to ``<out>/<chapter>.prof`` for snakeviz or pstats). Use it to find where a chapter's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from atlas_core.book import runner  # noqa: E402


def chapter_code(chapter: str, model: str, params: dict, out: Path) -> str:
    """The chapter's code cells as one script, its parameters cell followed by the checked overrides."""
    source = runner.notebook_source(chapter)
    nb = runner.read_notebook(source)
    values = runner.validate_parameters(runner.notebook_parameters(nb),
                                        {**runner.workflow_params(model, chapter), **params})
    runner.check_chapter_values(chapter, {**runner.notebook_parameters(nb), **values, "model": model})
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cells.append(cell.source)
        if "parameters" in cell.metadata.get("tags", []):
            injected = {"model": model, **values, "results_dir": str(out)}
            cells.append("\n".join(f"{k} = {v!r}" for k, v in injected.items()))
    return "\n\n".join(cells)


def summary(profile: cProfile.Profile, top: int) -> str:
    """The ``top`` entries by cumulative time and by own time."""
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chapter", choices=runner.CHAPTERS)
    parser.add_argument("--model", default=runner.DEFAULT_MODEL)
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        code = compile(chapter_code(args.chapter, args.model, dict(args.p), args.out), args.chapter, "exec")
    except runner.ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    namespace = {"__name__": "__chapter__"}
    cwd = os.getcwd()
    os.chdir(args.out)  # relative paths of the chapter land in --out, as under the runner
    profile = cProfile.Profile()
    start = time.perf_counter()
    try:
        profile.runctx(code, namespace, namespace)
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - start
    text = f"{args.chapter} on {args.model}, params {dict(args.p)}: {wall:.1f} s wall\n" + summary(profile, args.top)
    profile.dump_stats(args.out / f"{args.chapter}.prof")
    (args.out / f"{args.chapter}.profile.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
