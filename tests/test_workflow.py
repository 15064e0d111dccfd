"""The Snakemake workflow on stand-in chapters: a killed build resumes without redoing finished chapters
or reading half-written ones, and a second build with nothing changed runs no job."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from atlas_core.book import runner

ROOT = Path(__file__).resolve().parents[1]
SLOW = "sparse"  # the stand-in that takes long enough to be killed mid-run

STANDIN = '''# %% [markdown]
# # {chapter}

# %% tags=["parameters"]
model = "none"
results_dir = "results"
pause = 0.0

# %%
import json, pathlib, time
time.sleep(pause)
pathlib.Path(results_dir, "{chapter}.json").write_text(json.dumps({{"chapter": "{chapter}", "model": model}}))
'''


def snakemake(workdir: Path, notebooks: Path, **popen):
    env = {**os.environ, runner.NOTEBOOKS_ENV: str(notebooks)}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow" / "Snakefile"),
           "--directory", str(workdir), "--cores", "2", "--rerun-incomplete", "--nolock",
           "--config", "models=toy-llama"]
    return subprocess.Popen(cmd, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


@pytest.fixture
def standins(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for chapter in runner.CHAPTERS:
        (notebooks / f"{chapter}.py").write_text(STANDIN.format(chapter=chapter))
    (tmp_path / "work").mkdir()
    return tmp_path / "work", notebooks


def follow(process: subprocess.Popen) -> list[str]:
    """The lines `process` prints, collected by a background thread as they come."""
    lines: list[str] = []

    def read():
        for line in process.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def finished_chapters(log: list[str]) -> int:
    """Chapter jobs Snakemake has recorded as finished. It prints this line only after writing the job's
    metadata, so a kill after it cannot make the job look incomplete; its output files appear earlier, and
    a kill between the two rightly reruns the job."""
    return sum("(Rule: run_chapter)" in line and line.startswith("Finished jobid") for line in list(log))


def outputs(workdir: Path) -> dict[str, float]:
    found = list((workdir / "results" / "toy-llama").glob("*.ipynb"))
    return {p.stem: p.stat().st_mtime for p in found}


def kill_in_the_slow_chapter(workdir: Path, notebooks: Path) -> Path:
    """Build until every chapter but the slow one has finished, then SIGKILL the build mid-slow-chapter.

    Returns:
        the slow chapter's source (its pause set to 600 s: set it back to rerun it).
    """
    slow = notebooks / f"{SLOW}.py"
    slow.write_text(slow.read_text().replace("pause = 0.0", "pause = 600.0"))
    build = snakemake(workdir, notebooks)
    log = follow(build)
    deadline = time.time() + 240
    while finished_chapters(log) < len(runner.CHAPTERS) - 1 and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(build.pid, signal.SIGKILL)  # as hard as a lost session: no clean-up handlers run
    build.wait()
    return slow


def test_killed_build_resumes_and_a_rebuild_runs_nothing(standins):
    workdir, notebooks = standins
    slow = kill_in_the_slow_chapter(workdir, notebooks)
    done = outputs(workdir)
    assert set(done) == set(runner.CHAPTERS) - {SLOW}, done
    assert not (workdir / "results" / "toy-llama" / f"{SLOW}.json").exists()  # nothing half-written

    slow.write_text(slow.read_text().replace("pause = 600.0", "pause = 0.0"))
    resumed = snakemake(workdir, notebooks)
    log = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, log
    after = outputs(workdir)
    assert set(after) == set(runner.CHAPTERS)
    assert {c: after[c] for c in done} == done, "a finished chapter was run again"
    assert all((workdir / "book" / "chapters" / f"{c}.ipynb").exists() for c in runner.CHAPTERS)
    stages = [p for p in (workdir / "results" / "toy-llama").iterdir() if p.name.startswith(".")]
    assert stages == [], stages  # the killed run's staging folder was cleaned up

    again = snakemake(workdir, notebooks)
    log = again.communicate(timeout=120)[0]
    assert again.returncode == 0, log
    assert outputs(workdir) == after
    assert "Nothing to be done" in log, log


def test_a_chapter_finished_by_hand_after_a_killed_build_is_kept(standins):
    """A build killed mid-chapter leaves Snakemake's "incomplete" mark; the chapter then finished by
    `atlas run` must survive the next build (``--rerun-incomplete`` alone forces it and deletes it first,
    which lost a 95-minute real run)."""
    workdir, notebooks = standins
    slow = kill_in_the_slow_chapter(workdir, notebooks)
    assert list((workdir / ".snakemake" / "incomplete").iterdir()), "the killed chapter left no mark"

    out = workdir / "results" / "toy-llama"
    runner.run_chapter(SLOW, "toy-llama", {"pause": 0.0}, out, slow)  # what `atlas run` does
    finished = outputs(workdir)[SLOW]
    released = runner.release_finished_runs(workdir / "results", root=workdir)
    assert [str(p) for p in released] == [f"results/toy-llama/{f.name}" for f in runner.chapter_outputs(out, SLOW)]

    resumed = snakemake(workdir, notebooks)
    log = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, log
    assert "Forced execution" not in log and "(Rule: run_chapter)" not in log, log
    assert outputs(workdir)[SLOW] == finished, "the finished chapter was run again"
    assert runner.release_finished_runs(workdir / "results", root=workdir) == []  # nothing left marked


def test_a_killed_but_unreaped_run_counts_as_dead():
    """A zombie (exited, not yet reaped: what a SIGKILLed chapter run is under a late-reaping init) holds no
    staging folder; a running process does."""
    child = subprocess.Popen(["true"])
    deadline = time.time() + 10
    while runner._alive(child.pid) and time.time() < deadline:  # exits, stays a zombie until wait()
        time.sleep(0.05)
    assert not runner._alive(child.pid)
    child.wait()
    assert runner._alive(os.getpid())
