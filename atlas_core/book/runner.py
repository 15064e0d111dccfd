"""Run chapters (jupytext → checked parameters → papermill → atomic output) and build the book.

A chapter is a jupytext percent-format file ``notebooks/<chapter>.py`` whose first ``parameters``-tagged
cell defines every parameter with a literal default, including ``model`` and ``results_dir`` (the runner
sets both; the chapter writes ``<results_dir>/<chapter>.json``). The chapters, in book order, are the
``book/chapters/<chapter>`` entries of ``_toc.yml``: adding a chapter is one line there.
"""

from __future__ import annotations

import ast
import base64
import functools
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from atlas_core.cache import atomic_path, cache_dir, check_path, check_problem, seal, write_json
from atlas_core.progress import CHAPTER_ENV, chapter_label
from atlas_core.provenance import DATA_DIR, code_label, duration, params_label
from atlas_core.zoo import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = ROOT / "workflow" / "params.yaml"
RESERVED = ("model", "results_dir")  # set by the runner, never by the user
KERNEL_NAME = "atlas"
NOTEBOOKS_ENV = "ATLAS_NOTEBOOKS_DIR"
# Chapters that take longest on the default model (13-23 min each on one core): the workflow gives them
# priority, so that with two cores the short chapters fill in beside them and both cores finish close
# together. Only an ordering hint; any chapter list works without it.
LONGEST_FIRST = ("sparse", "kvquant", "nqp")
BOOK_TIMING = Path("results") / "book.timing.json"  # the last `atlas book`: workflow, HTML, total seconds
MATHJAX_HINT = "pip install django-static-mathjax==3.2.2.1 (MathJax 3, served locally)"


class ParameterError(ValueError):
    """A parameter is unknown, reserved, or has a value that does not fit its default's type."""


class SourceError(ValueError):
    """A chapter source is missing, not a file, or not a jupytext percent-format notebook."""


class RunnerError(RuntimeError):
    """A chapter run or the book build failed (the message says where and why)."""


class ChapterError(RunnerError):
    """A chapter notebook failed while executing (the message summarises the failing cell)."""


class BuildError(RunnerError):
    """The workflow or the HTML build failed (their own output above says why)."""


def _toc_chapters(toc: Path) -> tuple[str, ...]:
    """Chapter names in book order: the ``book/chapters/<name>`` files listed in ``toc``."""
    if not toc.exists():
        return ()
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            file = str(node.get("file", ""))
            if file.startswith("book/chapters/") and file.count("/") == 2:  # not the appendix pages below it
                found.append(Path(file).stem)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc.read_text()))
    return tuple(found)


CHAPTERS: tuple[str, ...] = _toc_chapters(ROOT / "_toc.yml")


def model_slug(model: str) -> str:
    """Directory-safe name of a model (hub ids ``org/name`` become ``org--name``)."""
    return model.strip("/").replace("/", "--")


def notebook_source(chapter: str) -> Path:
    """Path of a chapter's jupytext source (``$ATLAS_NOTEBOOKS_DIR`` overrides ``notebooks/``)."""
    return Path(os.environ.get(NOTEBOOKS_ENV) or ROOT / "notebooks") / f"{chapter}.py"


@functools.cache
def params_table(path: Path = PARAMS_FILE) -> dict:
    """The per-model chapter parameters of ``workflow/params.yaml`` (model → chapter → {name: value}),
    read once per process: the one place the file is read (the workflow and ``atlas run`` both ask here).

    Raises:
        ParameterError: the file is not a mapping of models to mappings of chapters to mappings.
    """
    table = yaml.safe_load(path.read_text()) if path.exists() else None
    table = {} if table is None else table
    shape = isinstance(table, dict) and all(
        isinstance(chapters or {}, dict) and all(isinstance(v or {}, dict) for v in (chapters or {}).values())
        for chapters in table.values())
    if not shape:
        raise ParameterError(f"{path}: must map model -> chapter -> {{name: value}}")
    return table


def workflow_params(model: str, chapter: str) -> dict:
    """Parameters for (model, chapter) from ``workflow/params.yaml`` (a copy; empty when not listed)."""
    return dict((params_table().get(model) or {}).get(chapter) or {})


# What only orchestrates: the book package (run notebooks, parse the command line, check parameters, the
# rendered HTML, the timings) and the progress bars' labels. Editing them changes no number, so it reruns
# no chapter.
BOOK_PACKAGE = Path(__file__).resolve().parent
ORCHESTRATION = (Path("atlas_core", "book"), Path("atlas_core", "progress.py"))  # relative to ROOT


def _imported_modules(source: str) -> set[str]:
    """Dotted names of every ``atlas_core`` module a Python source imports, anywhere (lazy imports too);
    ``from atlas_core.x import y`` yields both ``atlas_core.x`` and ``atlas_core.x.y`` (y may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "atlas_core"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "atlas_core":
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _module_file(name: str) -> Path | None:
    """The file of a dotted ``atlas_core`` module (package ``__init__.py`` or ``.py``), None if not one."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def chapter_code(chapter: str, source: Path | None = None) -> list[str]:
    """The library files a chapter's numbers depend on: the ``atlas_core`` modules its source imports,
    followed through their own imports (and their packages' ``__init__``), minus ``ORCHESTRATION``.

    The workflow reruns a chapter when one of these changes, and only then: an edit to the KV-cache code
    reruns the chapters that import it, not the models chapter.

    Returns:
        Sorted absolute paths.
    """
    source = Path(source or notebook_source(chapter))
    todo = sorted(_imported_modules(source.read_text(encoding="utf-8")) | {"atlas_core"})
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parent = ".".join(parts[:i])
            if parent in seen:
                continue
            path = _module_file(parent)
            if path is None:
                continue
            seen[parent] = path
            todo.extend(_imported_modules(path.read_text(encoding="utf-8")))
    return sorted(str(p) for p in seen.values() if not _orchestration(p))


def _orchestration(path: Path) -> bool:
    """True for a file of ``ORCHESTRATION`` (the file itself, or one inside a listed folder)."""
    return any(path == ROOT / entry or ROOT / entry in path.parents for entry in ORCHESTRATION)


# --- parameters -----------------------------------------------------------------------------------

def read_notebook(source: Path):
    """Read a jupytext percent-format file into an nbformat notebook.

    Raises:
        SourceError: the file is missing, a folder, unreadable, not UTF-8 text or not a percent-format
            notebook; the message names the file.
    """
    import jupytext

    source = Path(source)
    what = f"chapter source {source}"
    if not source.exists():
        raise SourceError(f"{what}: no such file; give a jupytext percent-format .py file (like notebooks/*.py)")
    if not source.is_file():
        raise SourceError(f"{what}: not a file; give a jupytext percent-format .py file (like notebooks/*.py)")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"{what}: cannot be read as UTF-8 text ({err.__class__.__name__}); "
                          "give a jupytext percent-format .py file") from None
    try:  # the format is fixed whatever the suffix: a .ipynb or .md file is not what the runner executes
        return jupytext.reads(text, fmt="py:percent")
    except Exception as err:  # noqa: BLE001 (jupytext raises many kinds on malformed input)
        raise SourceError(f"{what}: not a jupytext percent-format notebook ({err}); "
                          "compare notebooks/*.py") from None


def notebook_parameters(nb) -> dict:
    """Names and literal default values of the notebook's first ``parameters``-tagged cell.

    Raises:
        ParameterError: no such cell, or a default that is not a Python literal.
    """
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ParameterError("the notebook has no cell tagged 'parameters' (a `# %% tags=[\"parameters\"]` cell, "
                             "as in notebooks/*.py)")
    try:
        body = ast.parse(cell.source).body
    except SyntaxError as err:
        raise ParameterError(f"the 'parameters' cell is not valid Python (line {err.lineno} of the cell: {err.msg})") from None
    defaults = {}
    for node in body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        try:
            defaults[target.id] = ast.literal_eval(value)
        except ValueError:
            raise ParameterError(f"parameter {target.id!r}: default is not a literal") from None
    return defaults


def coerce(name: str, value, default):
    """Convert ``value`` (a CLI string or a YAML/Python value) to the type of ``default``.

    Raises:
        ParameterError: the value cannot represent the default's type.
    """
    kind = type(default)
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in ("true", "1", "yes", "on"):
                return True
            if word in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, (int, float)):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                return kind(value.strip())
            if isinstance(default, int) and isinstance(value, float):
                raise ValueError
            return kind(value)
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError
            return value
        if isinstance(default, (list, tuple, dict)):
            parsed = json.loads(value) if isinstance(value, str) else value
            want = dict if isinstance(default, dict) else (list, tuple)
            if not isinstance(parsed, want):
                raise ValueError
            return list(parsed) if isinstance(parsed, tuple) else parsed
        if default is None and isinstance(value, str):  # None default: JSON if it parses, else text
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    except (ValueError, TypeError, json.JSONDecodeError):
        want = "list or JSON list" if isinstance(default, (list, tuple)) else kind.__name__
        raise ParameterError(
            f"parameter {name!r}: {value!r} is not a valid {want} (default {default!r})"
        ) from None


def validate_parameters(defaults: dict, params: dict) -> dict:
    """Check ``params`` against the notebook's ``defaults`` and coerce each value to its type.

    Returns:
        The coerced parameters (only those given).

    Raises:
        ParameterError: a name is unknown or reserved, or a value has the wrong type.
    """
    missing = [name for name in RESERVED if name not in defaults]
    if missing:
        raise ParameterError(f"the parameters cell must define {', '.join(missing)}")
    valid = sorted(n for n in defaults if n not in RESERVED)
    out = {}
    for name, value in params.items():
        if name in RESERVED:
            raise ParameterError(f"parameter {name!r} is set by the runner, not by -p")
        if name not in defaults:
            raise ParameterError(
                f"unknown parameter {name!r}; valid names: {', '.join(valid) or '(none)'}"
            )
        out[name] = coerce(name, value, defaults[name])
    return out


def check_chapter_values(chapter: str, values: dict) -> None:
    """Value rules of :mod:`atlas_core.book.chapter_params` (impossible values, unknown models/corpora).

    Raises:
        ParameterError: with the rule's message.
    """
    from atlas_core.book.chapter_params import check_values  # light: a rule imports torch only when it needs the model
    from atlas_core.zoo import ModelError

    try:
        check_values(chapter, values)
    except (ValueError, ModelError) as err:
        raise ParameterError(str(err)) from None


# --- execution ------------------------------------------------------------------------------------

KERNEL_LOG_LEVEL = "--IPKernelApp.log_level=CRITICAL"


def kernel_name() -> str:
    """Name of a kernelspec for this interpreter, installed inside ``sys.prefix`` (never globally)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"ATLAS ({Path(sys.prefix).name})",
        "language": "python",
        "metadata": {"debugger": False},
    }
    path = Path(sys.prefix, "share", "jupyter", "kernels", KERNEL_NAME, "kernel.json")
    if not path.exists() or json.loads(path.read_text()) != spec:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(spec, indent=1))
    found = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    if found.argv[0] != sys.executable:
        raise RunnerError(f"kernelspec {KERNEL_NAME!r} at {found.resource_dir} shadows this venv's")
    return KERNEL_NAME


def _summarise(err) -> str:
    """One readable paragraph from a papermill execution error."""
    strip = re.compile(r"\x1b\[[0-9;]*m")
    tail = [strip.sub("", line) for line in (err.traceback or [])][-4:]
    return f"cell [{err.exec_count}] raised {err.ename}: {err.evalue}\n" + "\n".join(tail)


def _remove_stale_stages(out_dir: Path, chapter: str) -> None:
    """Delete staging folders ``.<chapter>.<pid>.*`` left by runs that were killed (pid not alive)."""
    for stage in out_dir.glob(f".{chapter}.*.*"):
        pid = stage.name.split(".")[2]
        if not pid.isdigit():
            continue
        if not _alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs; a zombie (killed, not yet reaped by an init that reaps late) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    try:  # Linux: the state letter follows the parenthesised command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _environment(name: str, value: str):
    """Set one environment variable for the block (child processes inherit it); restore it after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


OUTPUT_FREE_BYTES = 256 * 2**20  # a chapter's notebook (figures inline), results and stages: tens of MiB at most


def check_output_dir(path: Path | str, need_bytes: int = OUTPUT_FREE_BYTES) -> None:
    """Refuse, before any work and without creating anything, a folder that cannot take a chapter's outputs.

    The nearest existing folder on the way to ``path`` must be a folder, accept a new file (a probe file is
    made and removed: a read-only file system refuses even root) and have ``need_bytes`` free.

    Raises:
        ParameterError: a file in the way, a folder that refuses writes, or too little free space (the
            message names the folder and what to do).
    """
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ParameterError(f"output folder {path}: {existing} is a file, not a folder; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ParameterError(f"output folder {path} is not writable ({err.strerror}); choose another --out") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ParameterError(f"output folder {path} has {free / 2**20:.0f} MiB free, under the {need_bytes / 2**20:.0f} MiB "
                             "a chapter's outputs may take; free some space or choose another --out")


@contextlib.contextmanager
def _new_folder(path: Path):
    """Make ``path`` (and its missing parents); if the block raises, remove those of them still empty."""
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for p in made:
            try:
                p.rmdir()  # only when empty: anything the run or the user put there stays
            except OSError:
                break
        raise


def run_chapter(
    chapter: str,
    model: str = DEFAULT_MODEL,
    params: dict | None = None,
    out_dir: Path | None = None,
    source: Path | None = None,
) -> Path:
    """Execute one chapter for one model; write ``<out_dir>/<chapter>.ipynb`` and its results.

    Args:
        chapter: chapter name (its source is ``notebooks/<chapter>.py`` unless ``source`` is given).
        model: model name passed to the notebook as ``model``.
        params: parameter overrides (strings are coerced); merged over ``workflow/params.yaml``.
        out_dir: output folder; default ``results/<model>/``.
        source: jupytext source to run instead of the chapter's own.

    Returns:
        Path of the executed notebook. Beside it: ``<chapter>.json`` (written by the chapter through
        ``results_dir``) and ``<chapter>.timing.json`` (wall time).

    Raises:
        ParameterError: before any execution, for an unknown name or a bad value.
        SourceError: before any execution, a source that is missing or not a percent-format notebook.
        CacheError: before any execution, a cache root (``$ATLAS_CACHE_DIR``) that cannot be made or written.
        ChapterError: a cell failed, or the chapter wrote no ``<chapter>.json``; nothing is left under
            the output names.
    """
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = Path(source or notebook_source(chapter))
    nb = read_notebook(source)
    cache_dir()  # a cache root ($ATLAS_CACHE_DIR) that is a file or read-only: its own error, before the value
    # checks (which read tokenizers through the cache and would blame a parameter) and before any kernel
    given = {**workflow_params(model, chapter), **(params or {})}
    try:
        defaults = notebook_parameters(nb)
    except ParameterError as err:  # the message names the file: it may be a --source of the user's own
        raise ParameterError(f"chapter source {source}: {err}") from None
    values = validate_parameters(defaults, given)
    if source.resolve() == (ROOT / "notebooks" / f"{chapter}.py").resolve():  # the book's own chapter
        check_chapter_values(chapter, {**defaults, **values, "model": model})
    out_dir = Path(out_dir or Path("results") / model_slug(model))
    check_output_dir(out_dir)  # before the kernel starts: a full or read-only folder would fail only at the end
    with _new_folder(out_dir):  # a run that fails leaves no empty folder it made itself
        target = out_dir / f"{chapter}.ipynb"

        start = time.perf_counter()
        _remove_stale_stages(out_dir, chapter)
        with tempfile.TemporaryDirectory(prefix=f".{chapter}.{os.getpid()}.", dir=out_dir) as stage:
            stage = Path(stage)
            work = stage / "results"
            work.mkdir()
            src_ipynb, executed = stage / f"{chapter}.src.ipynb", stage / target.name
            nbformat.write(nb, src_ipynb)
            name = chapter_label(chapter, model)
            try:
                with _environment(CHAPTER_ENV, name):  # the kernel inherits it: its bars name the chapter
                    papermill.execute_notebook(
                        str(src_ipynb), str(executed),
                        parameters={"model": model, **values, "results_dir": "."},
                        kernel_name=kernel_name(), language="python", cwd=str(work),
                        progress_bar={"desc": f"{name}: cells"},
                        # the kernel's own log: cell errors reach the notebook, not this log, and what it
                        # prints otherwise is noise (a TCP warning; on Ctrl-C a ZMQError traceback from a
                        # reply to the client that has gone)
                        extra_arguments=[KERNEL_LOG_LEVEL],
                    )
            except PapermillExecutionError as err:
                raise ChapterError(f"chapter {chapter!r} ({model}) failed: {_summarise(err)}") from None
            if not (work / f"{chapter}.json").exists():
                raise ChapterError(f"chapter {chapter!r} ran but wrote no <results_dir>/{chapter}.json")
            done = nbformat.read(executed, as_version=4)  # record the real paths, not the staging ones
            done.metadata.papermill.update(input_path=str(source), output_path=str(target))
            nbformat.write(done, executed)
            for produced in sorted(work.iterdir()):  # the chapter's JSON, its data folder and any other files
                if produced.name == DATA_DIR:
                    _replace_chapter_data(produced / chapter, out_dir / DATA_DIR / chapter)
                else:
                    os.replace(produced, out_dir / produced.name)
            wall = time.perf_counter() - start
            write_json(out_dir / f"{chapter}.timing.json", {
                "chapter": chapter, "model": model, "params": values, "wall_s": round(wall, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "blas_threads": os.environ.get("OMP_NUM_THREADS"),  # the workflow runs each chapter on one
                "source": str(source),
            })
            for path in (out_dir / f"{chapter}.json", out_dir / f"{chapter}.timing.json", executed):
                seal(path)  # checksums first: a sealed notebook means "done and whole"
            os.replace(check_path(executed), check_path(target))
            os.replace(executed, target)  # the notebook last: its presence means "done"
    return target


def _replace_chapter_data(new: Path, old: Path) -> None:
    """Put a run's data folder (``data/<chapter>/``: the CSV beside each glued figure and table) in place of
    the previous run's, so that no file of a figure the chapter no longer draws stays behind."""
    if old.exists():
        shutil.rmtree(old)
    if new.is_dir():
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, old)


def chapter_outputs(out_dir: Path, chapter: str) -> list[Path]:
    """The files a chapter run leaves in ``out_dir``: its notebook, results JSON and timing record."""
    return [out_dir / f"{chapter}.ipynb", out_dir / f"{chapter}.json", out_dir / f"{chapter}.timing.json"]


def discard_damaged_results(results: Path, chapters=CHAPTERS) -> list[str]:
    """Remove every chapter run whose notebook, results or timing record fails its checksum, so the workflow
    reruns it; a one-line notice each on stderr.

    A run the workflow considers done (its notebook exists) is kept only if all three files match the
    ``.sha256`` written beside them when it finished (``run_chapter``); an unchecked or damaged run is never
    glued into the book.

    Returns:
        "<model>/<chapter>" of each run removed.
    """
    removed = []
    for out_dir in sorted(p for p in Path(results).iterdir() if p.is_dir()) if Path(results).is_dir() else []:
        for chapter in chapters:
            files = chapter_outputs(out_dir, chapter)
            if not files[0].exists():
                continue  # not run (or interrupted): the workflow runs it anyway
            problems = [(f, check_problem(f)) for f in files]
            bad = [(f, p) for f, p in problems if p]
            if not bad:
                continue
            f, problem = bad[0]
            print(f"[atlas] {f} {problem}; removing the {chapter} run of {out_dir.name} so that it runs again",
                  file=sys.stderr)
            for path in files:
                path.unlink(missing_ok=True)
                check_path(path).unlink(missing_ok=True)
            removed.append(f"{out_dir.name}/{chapter}")
    return removed


def release_finished_runs(results: Path, root: Path = ROOT, chapters=CHAPTERS) -> list[Path]:
    """Clear Snakemake's "incomplete" mark from every chapter run that finished, so the workflow keeps it.

    A build killed mid-chapter leaves Snakemake's mark on that chapter's outputs, and ``--rerun-incomplete``
    then forces the chapter again and deletes its outputs first, even when ``atlas run`` has since finished
    it. A run's outputs appear only when it has finished (staged, then moved) and are sealed by checksums,
    so a run that passes them (call :func:`discard_damaged_results` first) is complete whatever the mark
    says. Snakemake keeps a mark as a file in ``.snakemake/incomplete/`` named by the URL-safe base64 of the
    output's path (``snakemake/persistence/file.py``); its ``--cleanup-metadata`` would clear it too, but
    fails on an output that has a mark and no metadata record, which is exactly this case.

    Args:
        results: the results folder (one sub-folder per model).
        root: the workflow's working directory, which holds ``.snakemake/``.
        chapters: chapter names to look for.

    Returns:
        The finished outputs whose mark was removed (paths relative to ``root``); their metadata records,
        which Snakemake reads for its rerun triggers, are kept.
    """
    marks = Path(root) / ".snakemake" / "incomplete"
    if not Path(results).is_dir() or not marks.is_dir():
        return []
    marked = {}
    for mark in marks.iterdir():
        try:
            marked[base64.urlsafe_b64decode(mark.name).decode()] = mark
        except (ValueError, UnicodeDecodeError):
            continue  # not the mark of one short path: left to Snakemake
    released = []
    for out_dir in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        for chapter in chapters:
            files = chapter_outputs(out_dir, chapter)
            rels = [str(f.resolve().relative_to(Path(root).resolve())) for f in files]
            if not any(r in marked for r in rels) or any(check_problem(f) for f in files):
                continue  # unmarked (no checksums read), or not run or damaged: the workflow runs it
            for rel in filter(marked.__contains__, rels):
                marked[rel].unlink(missing_ok=True)
                released.append(Path(rel))
    return released


# --- the book -------------------------------------------------------------------------------------

def install_mathjax(dest: Path = ROOT / "book" / "_static" / "mathjax") -> Path:
    """Copy MathJax 3 (es5 build, from the ``django-static-mathjax`` wheel) to ``dest`` unless current.

    Returns:
        ``dest``, which the book's ``mathjax_path`` (``mathjax/tex-chtml.js`` in ``_static``) points into.
    """
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    roots = list(spec.submodule_search_locations or []) if spec else []
    es5 = next((Path(r, "static", "mathjax", "es5") for r in roots
                if Path(r, "static", "mathjax", "es5", "tex-chtml.js").exists()), None)
    if es5 is None:
        raise BuildError(f"no local MathJax found; {MATHJAX_HINT}")
    version = importlib.metadata.version("django-static-mathjax")
    stamp = dest / ".version"  # a dotfile: Sphinx does not copy it into the HTML
    if not stamp.exists() or stamp.read_text() != version:
        with atomic_path(dest) as tmp:
            shutil.copytree(es5, tmp)
            (tmp / ".version").write_text(version)
    return dest


def _timing_table(out_dirs: dict[str, Path], since: float) -> str:
    """Per-chapter wall times recorded by ``run_chapter`` ("ran" if it finished after ``since``)."""
    lines = [f"{'chapter':<12} {'model':<22} {'wall s':>8}  status"]
    for chapter, folder in out_dirs.items():
        timing = folder / f"{chapter}.timing.json"
        if not timing.exists():
            lines.append(f"{chapter:<12} {'?':<22} {'?':>8}  missing")
            continue
        info = json.loads(timing.read_text())
        status = "ran" if timing.stat().st_mtime >= since else "up to date"
        lines.append(f"{chapter:<12} {info['model']:<22} {info['wall_s']:>8.1f}  {status}")
    return "\n".join(lines)


APPENDIX_DIR = Path("book", "chapters", "code")  # _toc.yml's appendix part globs it; names keep book order


def appendix_name(chapter: str, chapters=CHAPTERS) -> str:
    """The appendix page of a chapter, numbered in book order so that the toc's glob lists them in order:
    ``02-nqp`` for the second chapter."""
    return f"{list(chapters).index(chapter) + 1:02d}-{chapter}"


def parameters_markdown(defaults: dict, used: dict) -> str:
    """The rendered parameters table of a chapter run (MyST): name, value used, default, one row per
    parameter of the notebook's ``parameters`` cell (``results_dir`` left out: a folder of the machine)."""
    def cell(value) -> str:
        return "`" + json.dumps(value, ensure_ascii=False).replace("|", "\\|") + "`"

    rows = ["| parameter | value used | default |", "|---|---|---|"]
    for name, default in defaults.items():
        if name != "results_dir":
            rows.append(f"| `{name}` | {cell(used.get(name, default))} | {cell(default)} |")
    return "\n".join(rows)


def appendix_notebook(executed, chapter: str, defaults: dict, timing: dict | None = None):
    """The appendix page of a chapter: its executed notebook with the code shown, the chapter's prose left
    out (its figure and table labels would be defined twice), headed by the parameters table.

    Args:
        executed: the executed chapter (an nbformat notebook); not modified.
        chapter: its name (labels ``code-<chapter>`` and ``params-<chapter>``).
        defaults: the defaults of its ``parameters`` cell (``notebook_parameters``).
        timing: its ``<chapter>.timing.json`` (wall time, date), when there is one.

    Returns:
        A new notebook whose metadata asks myst-nb to show the code (``remove_code_source: false``).
    """
    import copy

    import nbformat

    nb = copy.deepcopy(executed)
    used = dict(nb.metadata.get("papermill", {}).get("parameters", {}))
    first = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    title = next((line[2:].strip() for line in first.splitlines() if line.startswith("# ")), chapter)
    ran = "" if not timing else (f" It ran on model `{timing['model']}` in {duration(timing['wall_s'])}, finished "
                                 f"{timing['finished']}.")
    head = (f"({code_label(chapter)})=\n# {title}: code and parameters\n\n"
            f"The executed notebook of {{doc}}`/book/chapters/{chapter}`, with its code and the parameters it ran "
            f"with; the chapter's prose, figures and tables are on the chapter's own page.{ran} The download "
            f"button above gives the notebook itself (`.ipynb`).\n\n"
            f"({params_label(chapter)})=\n## Parameters\n\n{parameters_markdown(defaults, used)}\n\n## Code")
    header = nbformat.v4.new_markdown_cell(head)
    header["id"] = f"appendix-{chapter}"  # not a random id: an unchanged chapter writes identical bytes
    nb.cells = [header] + [c for c in nb.cells if c.cell_type == "code"]
    nb.metadata["mystnb"] = {"remove_code_source": False}
    return nb


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds it (an unchanged book keeps its mtimes, so
    ``book_inputs_digest`` stays equal and no rebuild happens). Returns True when written."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def prepare_book(model: str = DEFAULT_MODEL, root: Path = ROOT, chapters=CHAPTERS) -> None:
    """Put beside the book's chapters what their pages link to: each chapter's data folder
    (``results/<model>/data/<chapter>/`` → ``book/chapters/data/<chapter>/``, with the run's
    ``<chapter>.json``, linked from the opening box) and its appendix page
    (``book/chapters/code/NN-<chapter>.ipynb``, ``appendix_notebook``). Files already up to date are left
    untouched; data files no longer produced are removed.

    Raises:
        BuildError: a chapter of the book has not been run for ``model`` (no executed notebook).
    """
    import nbformat

    results = root / "results" / model_slug(model)
    for chapter in chapters:
        executed = root / "book" / "chapters" / f"{chapter}.ipynb"
        if not executed.exists():
            raise BuildError(f"{executed.relative_to(root)} is missing: run the chapter first (atlas book)")
        src, dest = results / DATA_DIR / chapter, root / "book" / "chapters" / DATA_DIR / chapter
        wanted = {p.relative_to(src): p for p in src.rglob("*") if p.is_file()} if src.is_dir() else {}
        numbers = results / f"{chapter}.json"  # every number of the run, linked from the opening box
        if numbers.exists():
            wanted[Path(numbers.name)] = numbers
        for rel, path in sorted(wanted.items()):
            _write_if_changed(dest / rel, path.read_bytes())
        for stale in (p for p in dest.rglob("*") if p.is_file() and p.relative_to(dest) not in wanted) if dest.is_dir() else []:
            stale.unlink()
        timing = results / f"{chapter}.timing.json"
        page = appendix_notebook(nbformat.read(executed, as_version=4), chapter,
                                 notebook_parameters(read_notebook(notebook_source(chapter))),
                                 json.loads(timing.read_text()) if timing.exists() else None)
        _write_if_changed(root / APPENDIX_DIR / f"{appendix_name(chapter, chapters)}.ipynb",
                          nbformat.writes(page).encode())
    known = {f"{appendix_name(c, chapters)}.ipynb" for c in chapters}
    for old in (root / APPENDIX_DIR).glob("*.ipynb") if (root / APPENDIX_DIR).is_dir() else []:
        if old.name not in known:  # a chapter removed from the toc
            old.unlink()


def check_glue(book: Path = ROOT / "book") -> None:
    """Fail before the HTML build when a page glues a key no chapter produced, or shows a glued figure or
    table without its data file (``glue_check.glue_problems``).

    Raises:
        BuildError: one line: the first problem, and how many more there are.
    """
    from atlas_core.book.glue_check import glue_problems

    raise_problems(glue_problems(book))


def raise_problems(problems: list[str]) -> None:
    """A build check's verdict: nothing when ``problems`` is empty, else one line, the first problem and how
    many more there are.

    Raises:
        BuildError: there is a problem.
    """
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BuildError(problems[0] + more)


def touch_cross_document_glue(book: Path = ROOT / "book", html: Path | None = None) -> list[Path]:
    """Mark pages that glue values from other documents (``{glue:…}`x.ipynb::key```) as changed.

    Sphinx rebuilds a page only when its own source changes, so without this the claims page would keep
    the numbers of the previous chapter runs after an incremental build. A page is touched only when a
    notebook it glues from is newer than the page's built HTML under ``html`` (or that HTML is missing), so
    a rebuild with nothing changed leaves Sphinx nothing to do; ``html=None`` touches every such page.
    """
    pattern = re.compile(r"([\w./-]+\.ipynb)::")
    touched = []
    for page in sorted(book.rglob("*.md")):
        sources = {page.parent / name for name in pattern.findall(page.read_text(encoding="utf-8"))}
        if not sources:
            continue
        built = None if html is None else html / page.relative_to(book.parent).with_suffix(".html")
        if built is not None and built.exists():
            newest = max((src.stat().st_mtime for src in sources if src.exists()), default=0.0)
            if newest <= built.stat().st_mtime:
                continue
        page.touch()
        touched.append(page)
    return touched


def book_inputs_digest(root: Path = ROOT) -> str:
    """sha256 over the name, size and mtime of every source of the HTML build (``_config.yml``,
    ``_toc.yml``, ``book/`` with the chapter notebooks, minus the copied MathJax): equal digests, equal book,
    so a rebuild with nothing changed skips Jupyter Book (whose start-up alone takes seconds)."""
    import hashlib

    mathjax = root / "book" / "_static" / "mathjax"
    files = [root / "_config.yml", root / "_toc.yml",
             *(p for p in (root / "book").rglob("*") if p.is_file() and mathjax not in p.parents)]
    digest = hashlib.sha256()
    for path in sorted(files):
        if path.exists():
            st = path.stat()
            digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def html_digest(html_dir: Path) -> str:
    """sha256 over the names and bytes of every file of the built book (what the browser check opens) and
    of the checker itself (``browser.py``: a changed check runs again)."""
    import hashlib

    digest = hashlib.sha256((BOOK_PACKAGE / "browser.py").read_bytes())
    for path in sorted(p for p in html_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(html_dir)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_book(cores: int, models: tuple[str, ...] | list[str] = (DEFAULT_MODEL,)) -> Path:
    """Run every chapter through the Snakemake workflow, then build the HTML book offline.

    Args:
        cores: parallel Snakemake jobs (``-j``).
        models: models to run every chapter on (``"all"``: every embedded model, ``model_runs.book_models``);
            the book's chapters show the first, and its "Per-model runs" appendix every other, chapter by
            chapter (``model_runs.prepare_runs``).

    Returns:
        Path of ``_build/html/index.html``.

    Raises:
        ParameterError: before any chapter runs, ``cores`` below 1, a name that is not a model, or a first
            model other than the default (``model_runs.check_book_model``).
        CacheError: before any chapter runs, a cache root (``$ATLAS_CACHE_DIR``) that cannot be made or written.
        BuildError: a chapter run, a build check or the HTML build failed.
    """
    from atlas_core.book.model_runs import book_models, check_book_model, check_labels, prepare_runs

    models = book_models(models)
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ParameterError(f"--cores must be an integer ≥ 1 (parallel chapter jobs), got {cores!r}")
    from atlas_core.models import check_model_name  # imports torch: only once the book is really built

    for model in models:  # an unknown name first: the order rule below would suggest a command that holds it
        check_model_name(model)
    check_book_model(models)
    check_output_dir(ROOT / "results")
    cache_dir()  # a cache root that is a file or read-only would fail every chapter, each in its first cached step
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1")}
    discard_damaged_results(ROOT / "results")  # a damaged or unchecked run is rerun, never glued
    release_finished_runs(ROOT / "results")  # a run finished since a killed build is kept, not forced again
    since = time.time()
    workflow = [
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow" / "Snakefile"),
        "--directory", str(ROOT), "--cores", str(cores), "--rerun-incomplete", "--nolock",
        "--config", f"models={','.join(models)}",
    ]
    slow = [f"results/{model_slug(m)}/{c}.ipynb" for m in models for c in LONGEST_FIRST if c in CHAPTERS]
    if slow:
        workflow += ["--prioritize", *slow]
    if subprocess.run(workflow, env=env, cwd=ROOT).returncode:
        raise BuildError("a chapter run failed (its error is above; logs in results/<model>/logs/)")
    ran = time.time() - since

    install_mathjax()
    prepare_book(models[0])
    prepare_runs(models)
    check_glue(ROOT / "book")
    check_labels(ROOT / "book")
    touch_cross_document_glue(ROOT / "book", ROOT / "_build" / "html")
    book_start = time.time()
    html = ROOT / "_build" / "html" / "index.html"
    inputs, stamp = book_inputs_digest(ROOT), ROOT / "_build" / ".atlas-html-inputs"
    if html.exists() and stamp.exists() and stamp.read_text().strip() == inputs:
        print("HTML up to date: no book source changed since the last successful build")
    else:
        jb = Path(sys.executable).with_name("jupyter-book")
        html_cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(ROOT),
                    "-W", "-n", "--keep-going"]
        stamp.unlink(missing_ok=True)
        if subprocess.run(html_cmd, env=env, cwd=ROOT).returncode:
            raise BuildError("jupyter-book build failed (warnings are errors); see its output above")
        with atomic_path(stamp) as tmp:
            tmp.write_text(book_inputs_digest(ROOT) + "\n")
    html_s = time.time() - book_start
    checked = browser_check(html.parent)
    folder = Path("results") / model_slug(models[0])
    for model in models:
        print(_timing_table({c: ROOT / "results" / model_slug(model) for c in CHAPTERS}, since))
    total = time.time() - since
    print(f"workflow {ran:.1f} s, HTML {html_s:.1f} s, {checked}, total {total:.1f} s")
    write_json(ROOT / BOOK_TIMING, {  # read by `atlas bench book`
        "models": models, "cores": cores, "workflow_s": round(ran, 2), "html_s": round(html_s, 2),
        "total_s": round(total, 2), "browser": checked, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "chapters_ran": [c for c in CHAPTERS if _ran_since(ROOT / folder / f"{c}.timing.json", since)],
    })
    print(f"book: {html}")
    return html


def _ran_since(timing: Path, since: float) -> bool:
    """True when a chapter's timing record was written after ``since`` (the chapter ran in this build)."""
    return timing.exists() and timing.stat().st_mtime >= since


def browser_check(html_dir: Path) -> str:
    """Open every built page in headless Chromium (:mod:`atlas_core.book.browser`); raise on any problem.

    A book whose files are byte for byte those of the last check that passed (``html_digest``, stamped
    beside the HTML folder) is not opened again: a rebuild with nothing changed reruns no check.

    Returns:
        A few words for the timing line ("browser check 4.1 s", or why it was skipped).
    """
    from atlas_core.book.browser import BrowserError, check_book, find_chromium, summary

    stamp = html_dir.parent / ".atlas-browser-check"
    digest = html_digest(html_dir)
    if stamp.exists() and stamp.read_text().strip() == digest:
        return "browser check skipped (pages unchanged since the last passing check)"
    try:
        find_chromium()
    except BrowserError as err:
        print(f"browser check skipped: {err}", file=sys.stderr)
        return "browser check skipped (no Chromium)"
    start = time.time()
    reports = check_book(html_dir)
    print(summary(reports))
    if any(r.problems for r in reports):
        stamp.unlink(missing_ok=True)
        raise BuildError("the rendered book failed the browser check (pages and problems above)")
    with atomic_path(stamp) as tmp:
        tmp.write_text(digest + "\n")
    return f"browser check {time.time() - start:.1f} s"
