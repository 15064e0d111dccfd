"""What produced a chapter's figures: the run's commit, versions, hardware and date (``run_info``), the
chapter's opening box (``run_box``), and the provenance line under every figure and table
(``provenance_line``). The glue helpers (``atlas_core.glue.Glue.figure`` / ``table`` / ``finish``) call
these; the book's build check (``atlas_core.book.glue_check``) relies on the data-file layout named here.

Layout: a chapter writes the data of a figure or table glued as ``<key>`` to
``<results_dir>/data/<chapter>/<key>.csv`` (``data_path``); the runner moves it to
``results/<model>/data/<chapter>/`` and, for the book's model, copies that folder to
``book/chapters/data/<chapter>/``, beside the chapter page ``book/chapters/<chapter>.ipynb``, so the line's
relative ``{download}`` link resolves and Sphinx copies the file into the HTML.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = "data"  # under results_dir, and under book/chapters/
PACKAGES = ("atlas-core", "torch", "transformers", "numpy")


def data_path(chapter: str, key: str) -> Path:
    """Where a glued figure's or table's data lives, relative to the chapter's results folder and to the
    chapter page's folder alike: ``data/<chapter>/<key>.csv``."""
    return Path(DATA_DIR, chapter, f"{key}.csv")


def results_path(chapter: str) -> Path:
    """Where the book keeps a chapter's results JSON, relative to the chapter page's folder (the runner
    copies ``results/<model>/<chapter>.json`` there): ``data/<chapter>/<chapter>.json``."""
    return Path(DATA_DIR, chapter, f"{chapter}.json")


def code_label(chapter: str) -> str:
    """The label of a chapter's appendix page (its executed notebook with the code)."""
    return f"code-{chapter}"


def params_label(chapter: str) -> str:
    """The label of a chapter's parameters table (on its appendix page)."""
    return f"params-{chapter}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunInfo:
    """Where and with what a run happened.

    Attributes:
        commit: full git commit of the repository, "unknown" outside a git checkout.
        dirty: True when tracked files differ from that commit (the run used uncommitted code).
        versions: package name → version (``PACKAGES``; "not installed" when absent).
        python: Python version.
        cpu: CPU model name.
        cores: logical cores of the machine.
        threads: torch's intra-op threads (the OMP_NUM_THREADS setting when torch is not loaded yet).
        gpu: GPU name, or None when the run used none.
        date: UTC date and time of the run, ISO 8601 to the minute.
    """

    commit: str
    dirty: bool
    versions: dict
    python: str
    cpu: str
    cores: int
    threads: int | None
    gpu: str | None
    date: str

    @property
    def short_commit(self) -> str:
        """The first 10 hex digits of the commit, "+dirty" appended when the tree differed from it."""
        return self.commit[:10] + ("+dirty" if self.dirty else "")

    def hardware(self) -> str:
        """One phrase: "Intel Xeon … (2 cores, 1 torch thread)" plus ", GPU …" when one was used."""
        threads = "" if self.threads is None else f", {self.threads} torch thread{'s' if self.threads != 1 else ''}"
        cores = f"{self.cores} core{'s' if self.cores != 1 else ''}"
        return f"{self.cpu} ({cores}{threads})" + (f", GPU {self.gpu}" if self.gpu else "")


def _git(*args: str) -> str | None:
    """Output of a git command in the repository, None when git or the repository is missing."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform``)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or platform.machine() or "unknown CPU"


def _torch_threads_and_gpu() -> tuple[int | None, str | None]:
    """torch's thread count and GPU name, asked only when torch is already imported (a run that uses it);
    otherwise the OMP_NUM_THREADS setting and no GPU."""
    torch = sys.modules.get("torch")
    if torch is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        return (int(env) if env.isdigit() else None), None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return torch.get_num_threads(), gpu


def run_info() -> RunInfo:
    """The commit (and whether the tree was dirty), package versions, hardware and date of this process.

    Returns:
        A ``RunInfo``. Nothing raises: what cannot be found reads "unknown" / "not installed".
    """
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    threads, gpu = _torch_threads_and_gpu()
    return RunInfo(
        commit=commit, dirty=bool(status), versions={p: _version(p) for p in PACKAGES},
        python=platform.python_version(), cpu=_cpu_model(), cores=os.cpu_count() or 1, threads=threads,
        gpu=gpu, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def duration(seconds: float) -> str:
    """A wall time in words: "42 s", "5.3 min", "1 h 12 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min"


def run_box(info: RunInfo, *, chapter: str, model: str, wall_s: float) -> str:
    """The chapter's opening box, MyST markdown (an admonition): model, commit, versions, hardware, run date,
    wall time, and links to the chapter's parameters and code (its appendix page)."""
    versions = ", ".join(f"{name} {v}" for name, v in info.versions.items())
    return "\n".join([
        ":::{admonition} This run",
        ":class: note atlas-run",
        f"- **Model:** `{model}`",
        f"- **Commit:** `{info.short_commit}`",
        f"- **Versions:** {versions}; Python {info.python}",
        f"- **Hardware:** {info.hardware()}",
        f"- **Run:** {info.date}; wall time {duration(wall_s)}",
        f"- **Parameters, code and numbers:** {{ref}}`parameters <{params_label(chapter)}>`, "
        f"{{ref}}`executed notebook <{code_label(chapter)}>`, "
        f"{{download}}`{chapter}.json <{results_path(chapter).as_posix()}>` (every number of the run)",
        ":::",
    ])


def provenance_line(info: RunInfo, *, chapter: str, key: str, model: str, corpus: str, sample: str) -> str:
    """The line under a figure's or table's caption, MyST markdown: chapter, model, corpus, sample size,
    links to the parameters table, the data file and the executed notebook, and the commit.

    Args:
        info: the run's ``RunInfo`` (its commit).
        chapter: chapter name (the data folder and the appendix labels).
        key: the full glue key of the figure or table (its data file is ``data_path(chapter, key)``).
        model, corpus: what the numbers were measured on.
        sample: the sample size in words ("8 windows of 512 tokens per corpus").
    """
    measured_on = corpus if corpus.startswith("no corpus") else f"corpus {corpus}"  # e.g. timing on random keys
    return (f"Source: chapter *{chapter}*, model `{model}`, {measured_on}, {sample}; "
            f"{{ref}}`parameters <{params_label(chapter)}>`; data {{download}}`{key}.csv <{data_path(chapter, key).as_posix()}>`; "
            f"{{ref}}`code <{code_label(chapter)}>`; commit `{info.short_commit}`.")
