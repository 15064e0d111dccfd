"""Did a change move the book's numbers? Run every chapter on a toy model at two git revisions and compare.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/toy_compare.py f681997 HEAD [--model toy-llama] [--keep /tmp/tc]

Each revision is checked out into its own folder (``git worktree``-free: a plain clone of this repository),
every chapter runs there through that revision's own ``atlas run`` with the test suite's small parameters
(``tests/test_chapters.py``'s SMALL, read from the NEWER revision), and ``atlas compare`` (timings skipped)
prints what differs in each chapter's results JSON. The chapters' kernels import the revision's own
``atlas_core`` (PYTHONPATH), not the installed one. Minutes, not hours: it checks code changes on a toy
model; the real book needs a full build.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ("models", "crossarch", "atlas", "nqp", "kvquant", "sparse")


def checkout(rev: str, where: Path) -> Path:
    """A clone of this repository at ``rev`` in ``where``."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    subprocess.run(["git", "-C", str(where), "checkout", "-q", rev], check=True)
    return where


def small_params(tree: Path) -> dict:
    """The SMALL dict of ``tests/test_chapters.py`` (a literal), read without importing the tests."""
    source = (tree / "tests" / "test_chapters.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SMALL":
            return ast.literal_eval(node.value)
    raise SystemExit(f"no SMALL dict in {tree}/tests/test_chapters.py; pass a newer revision second")


def cli_module(tree: Path) -> str:
    return "atlas_core.book.cli" if (tree / "atlas_core" / "book" / "cli.py").exists() else "atlas_core.cli"


def run_chapters(tree: Path, out: Path, model: str, params: dict) -> dict[str, int]:
    """Exit status of each chapter run at ``tree`` into ``out`` (logs beside it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(tree))
    status = {}
    for chapter in CHAPTERS:
        args = [sys.executable, "-c", f"import sys; from {cli_module(tree)} import main; sys.exit(main())",
                "run", chapter, "--model", model, "--out", str(out)]
        for name, value in params.get(chapter, {}).items():
            args += ["-p", name, value]
        with open(f"{out}.{chapter}.log", "w") as log:
            status[chapter] = subprocess.run(args, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{tree.name}: {chapter} exit {status[chapter]}", flush=True)
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--model", default="toy-llama")
    p.add_argument("--keep", type=Path, default=None, help="folder for the clones and results (default: a temporary one)")
    args = p.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="atlas-toy-compare-"))
    base.mkdir(parents=True, exist_ok=True)
    trees = [checkout(rev, base / f"rev{i}") for i, rev in enumerate((args.before, args.after))]
    params = small_params(trees[1])
    outs = [base / f"results{i}" for i in range(2)]
    status = [run_chapters(tree, out, args.model, params) for tree, out in zip(trees, outs)]
    env = dict(os.environ, PYTHONPATH=str(trees[1]))
    for chapter in CHAPTERS:
        print(f"== {chapter}")
        if status[0][chapter] or status[1][chapter]:
            print(f"not compared: exit {status[0][chapter]} before, {status[1][chapter]} after (logs in {base})")
            continue
        subprocess.run([sys.executable, "-c", f"import sys; from {cli_module(trees[1])} import main; sys.exit(main())",
                        "compare", str(outs[0] / f"{chapter}.json"), str(outs[1] / f"{chapter}.json")], env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
