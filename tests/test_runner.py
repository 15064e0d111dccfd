"""Runner: jupytext → parameters cell, validation before execution, atomic outputs (no model needed)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from atlas_core.book import runner
from atlas_core.book.runner import ChapterError, ParameterError

PARAMS = '''model = "smollm2-135m"
results_dir = "results"
n_points: int = 5  # annotated assignments count too
scale = 1.5
show = True
layers = [1, 2]
label = "x"
'''


def write_chapter(folder, body, params=PARAMS, name="toy"):
    """Write a jupytext percent-format chapter ``<folder>/<name>.py`` and return its path."""
    path = folder / f"{name}.py"
    path.write_text(
        "# %% [markdown]\n# # A toy chapter\n\n"
        '# %% tags=["parameters"]\n' + params + "\n"
        "# %%\n" + body + "\n"
    )
    return path


def forbid_execution(monkeypatch):
    import papermill

    def boom(*args, **kwargs):
        raise AssertionError("executed although the parameters were invalid")

    monkeypatch.setattr(papermill, "execute_notebook", boom)


def test_jupytext_conversion_finds_parameters_cell(tmp_path):
    nb = runner.read_notebook(write_chapter(tmp_path, "x = 1"))
    assert nb.cells[1].metadata["tags"] == ["parameters"]
    assert runner.notebook_parameters(nb) == {
        "model": "smollm2-135m", "results_dir": "results", "n_points": 5, "scale": 1.5,
        "show": True, "layers": [1, 2], "label": "x",
    }


def test_missing_parameters_cell_is_an_error(tmp_path):
    path = tmp_path / "bare.py"
    path.write_text("# %%\nx = 1\n")
    with pytest.raises(ParameterError, match="no cell tagged 'parameters'"):
        runner.notebook_parameters(runner.read_notebook(path))


@pytest.mark.parametrize("name,value,expected", [
    ("n_points", "12", 12), ("scale", "2", 2.0), ("scale", 3, 3.0), ("show", "false", False),
    ("show", "yes", True), ("layers", "[3, 4]", [3, 4]), ("layers", (5,), [5]), ("label", "7", "7"),
])
def test_values_are_coerced_to_the_default_type(name, value, expected):
    defaults = {"model": "m", "results_dir": ".", "n_points": 5, "scale": 1.5, "show": True,
                "layers": [1, 2], "label": "x"}
    out = runner.validate_parameters(defaults, {name: value})
    assert out == {name: expected} and type(out[name]) is type(expected)


@pytest.mark.parametrize("params,message", [
    ({"n_point": "3"}, r"unknown parameter 'n_point'; valid names: label, layers, n_points, scale, show"),
    ({"n_points": "three"}, r"'n_points': 'three' is not a valid int"),
    ({"n_points": "2.5"}, r"not a valid int"),
    ({"n_points": True}, r"not a valid int"),
    ({"show": "maybe"}, r"not a valid bool"),
    ({"layers": "[1, 2"}, r"not a valid list"),
    ({"layers": '{"a": 1}'}, r"not a valid list"),
    ({"label": 3}, r"not a valid str"),
    ({"model": "gpt2"}, r"set by the runner"),
    ({"results_dir": "/tmp"}, r"set by the runner"),
])
def test_bad_parameters_fail_before_execution(tmp_path, monkeypatch, params, message):
    forbid_execution(monkeypatch)
    source = write_chapter(tmp_path, "raise SystemExit('must not run')")
    with pytest.raises(ParameterError, match=message):
        runner.run_chapter("toy", "m", params, out_dir=tmp_path / "out", source=source)
    assert not (tmp_path / "out").exists()


def test_parameters_cell_must_define_model_and_results_dir(tmp_path, monkeypatch):
    forbid_execution(monkeypatch)
    source = write_chapter(tmp_path, "pass", params="n = 1\n")
    with pytest.raises(ParameterError, match="must define model, results_dir"):
        runner.run_chapter("toy", "m", {}, out_dir=tmp_path / "out", source=source)


def test_cli_reports_parameter_errors_with_exit_code_2(tmp_path, monkeypatch, capsys):
    from atlas_core.book import cli

    forbid_execution(monkeypatch)
    source = write_chapter(tmp_path, "pass")
    code = cli.main(["run", "toy", "--model", "m", "-p", "bogus", "1",
                     "--out", str(tmp_path / "out"), "--source", str(source)])
    assert code == 2
    assert "unknown parameter 'bogus'" in capsys.readouterr().err
    # NAME=VALUE is read as NAME VALUE, so the error names the parameter, not argparse's "expected 2 arguments"
    code = cli.main(["run", "toy", "--model", "m", "-p", "bogus=1", "--out", str(tmp_path / "out"), "--source", str(source)])
    assert code == 2 and "unknown parameter 'bogus'" in capsys.readouterr().err


def test_param_pairs_split_only_a_name_before_its_first_equals_sign():
    from atlas_core.book.cli import _param_pairs

    assert _param_pairs(["-p", "seeds=[0, 1]", "--param", "x=a=b"]) == ["-p", "seeds", "[0, 1]", "--param", "x", "a=b"]
    assert _param_pairs(["-p", "label", "k=3"]) == ["-p", "label", "k=3"]  # a value is left whole
    assert _param_pairs(["--out", "a=b"]) == ["--out", "a=b"]


def test_atlas_is_the_only_command_line():
    """One front door: the runner has no argument parser of its own, and the workflow's jobs are `atlas run`."""
    assert not hasattr(runner, "main")
    snakefile = (runner.ROOT / "workflow" / "Snakefile").read_text()
    assert '} run {{wildcards.chapter}}' in snakefile and "-m atlas_core" not in snakefile
    assert 'exec "$VENV/bin/atlas" book' in (runner.ROOT / "atlas.sh").read_text()


def test_atlas_book_passes_cores_and_models_to_the_build(monkeypatch):
    from atlas_core.book import cli

    calls = []
    monkeypatch.setattr(runner, "build_book", lambda cores, models: calls.append((cores, models)))
    assert cli.main(["book", "--cores", "3", "--models", "toy-llama", "toy-gpt2"]) == 0
    assert cli.main(["book", "--cores", "1"]) == 0
    assert calls == [(3, ["toy-llama", "toy-gpt2"]), (1, [runner.DEFAULT_MODEL])]
    from atlas_core.zoo import DEFAULT_MODEL
    assert runner.DEFAULT_MODEL is DEFAULT_MODEL  # one default model


def test_successful_run_writes_notebook_results_and_timing(tmp_path):
    body = (
        "import json, pathlib\n"
        "pathlib.Path(results_dir, 'toy.json').write_text(json.dumps("
        "{'model': model, 'n': n_points * 2, 'layers': layers}))"
    )
    source = write_chapter(tmp_path, body)
    out = tmp_path / "out"
    path = runner.run_chapter("toy", "tiny", {"n_points": "21", "layers": "[7]"}, out, source)
    assert path == out / "toy.ipynb"
    assert json.loads((out / "toy.json").read_text()) == {"model": "tiny", "n": 42, "layers": [7]}
    timing = json.loads((out / "toy.timing.json").read_text())
    assert timing["chapter"] == "toy" and timing["wall_s"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["toy.ipynb", "toy.ipynb.sha256", "toy.json", "toy.json.sha256",
                                                     "toy.timing.json", "toy.timing.json.sha256"]  # sealed
    injected = [c for c in json.loads(path.read_text())["cells"]
                if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "n_points = 21" in "".join(injected[0]["source"])


@pytest.mark.parametrize("damage", ["bit-flip", "truncated", "empty", "no-checksum"])
def test_a_damaged_chapter_run_is_removed_so_the_workflow_reruns_it(tmp_path, damage, capsys):
    source = write_chapter(tmp_path, "import json, pathlib\npathlib.Path(results_dir, 'toy.json').write_text(json.dumps({'x': [1.5] * 50}))")
    out = tmp_path / "results" / "tiny"
    runner.run_chapter("toy", "tiny", {}, out, source)
    (tmp_path / "o").mkdir()
    runner.run_chapter("other", "tiny", {}, out, write_chapter(tmp_path / "o", "import json, pathlib\n"
                       "pathlib.Path(results_dir, 'other.json').write_text('{}')", name="other"))
    assert runner.discard_damaged_results(tmp_path / "results", ("toy", "other")) == []  # intact: kept
    results = out / "toy.json"
    from test_cache import damage as damage_file  # the ways disks and killed processes damage a file

    damage_file(results, damage)
    from atlas_core.book.compare import compare_files

    if damage != "no-checksum":  # `atlas compare` refuses a sealed file that changed
        with pytest.raises(ValueError, match="rerun the chapter"):
            compare_files(results, results)
    assert runner.discard_damaged_results(tmp_path / "results", ("toy", "other")) == ["tiny/toy"]
    assert "toy.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("toy")) == []  # the whole run goes
    assert (out / "other.ipynb").exists()  # the intact chapter stays


def test_failing_notebook_leaves_nothing(tmp_path):
    body = (
        "import json, pathlib\n"
        "pathlib.Path(results_dir, 'toy.json').write_text('{}')\n"
        "raise ValueError('deliberate failure')"
    )
    source = write_chapter(tmp_path, body)
    out = tmp_path / "new" / "out"  # made by the run, parent too: a failed run removes both
    with pytest.raises(ChapterError, match="ValueError: deliberate failure"):
        runner.run_chapter("toy", "tiny", {}, out, source)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"  # the user's own folder stays, empty as it was
    kept.mkdir()
    with pytest.raises(ChapterError, match="ValueError: deliberate failure"):
        runner.run_chapter("toy", "tiny", {}, kept, source)
    assert list(kept.iterdir()) == []  # no notebook, no half-results, no staging folder


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing.py", "no such file"),
    (lambda p: p, "not a file"),
    (lambda p: (p / "binary.py").write_bytes(b"\xff\xfe\x00") and p / "binary.py", "cannot be read as UTF-8"),
    (lambda p: (p / "plain.py").write_text("x = (\n") and p / "plain.py", "no cell tagged 'parameters'"),
    (lambda p: (p / "syntax.py").write_text('# %% tags=["parameters"]\nmodel = (\n') and p / "syntax.py",
     "not valid Python"),
])
def test_a_bad_source_is_one_line_naming_it_with_exit_2(tmp_path, capsys, make, message):
    from atlas_core.book.cli import main

    source = make(tmp_path)
    out = tmp_path / "out"
    assert main(["run", "toy", "--source", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(source) in err and "Traceback" not in err
    assert not out.exists()


def test_chapters_come_from_the_toc_in_order(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(yaml.safe_dump({"format": "jb-book", "root": "book/intro", "parts": [
        {"caption": "Chapters", "chapters": [{"file": "book/chapters/b"}, {"file": "book/chapters/a"}]},
        {"caption": "Back", "chapters": [{"file": "book/references"}]},
    ]}))
    assert runner._toc_chapters(toc) == ("b", "a")
    assert runner.CHAPTERS[0] == "models"


def test_params_file_names_known_chapters():
    table = runner.params_table()
    assert table == yaml.safe_load(runner.PARAMS_FILE.read_text())
    for model, chapters in table.items():
        assert set(chapters or {}) <= set(runner.CHAPTERS), model


def test_params_file_is_read_once_and_its_shape_checked(tmp_path, monkeypatch):
    good = tmp_path / "params.yaml"
    good.write_text("toy-llama:\n  atlas: {k: 4}\n")
    reads = []
    real = type(good).read_text
    monkeypatch.setattr(type(good), "read_text", lambda self, *a, **k: reads.append(self) or real(self, *a, **k))
    assert runner.params_table(good) == {"toy-llama": {"atlas": {"k": 4}}}
    assert runner.params_table(good) == {"toy-llama": {"atlas": {"k": 4}}}
    assert reads.count(good) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("toy-llama: [atlas]\n")
    with pytest.raises(ParameterError, match="must map model -> chapter"):
        runner.params_table(bad)


def test_model_slug_is_a_single_path_component():
    assert runner.model_slug("Qwen/Qwen2.5-0.5B") == "Qwen--Qwen2.5-0.5B"
    assert runner.model_slug("smollm2-135m") == "smollm2-135m"


def test_a_chapter_must_write_its_results_json(tmp_path):
    source = write_chapter(tmp_path, "x = 1")
    with pytest.raises(ChapterError, match="wrote no <results_dir>/toy.json"):
        runner.run_chapter("toy", "tiny", {}, tmp_path / "out", source)
    assert not (tmp_path / "out").exists()  # the folder the run made is gone with the failed run


def test_pages_with_cross_document_glue_are_touched(tmp_path):
    (tmp_path / "claims.md").write_text("{glue:text}`chapters/a.ipynb::x:.2f`\n", encoding="utf-8")
    (tmp_path / "plain.md").write_text("no glue here\n", encoding="utf-8")
    for p in tmp_path.iterdir():
        os.utime(p, (0, 0))
    touched = runner.touch_cross_document_glue(tmp_path)
    assert touched == [tmp_path / "claims.md"]
    assert (tmp_path / "claims.md").stat().st_mtime > 0 and (tmp_path / "plain.md").stat().st_mtime == 0


def test_every_progress_bar_of_a_run_names_its_chapter(tmp_path, capfd):
    """Two chapters at once: papermill's bar (the runner's terminal) and the library's bars (inside the
    kernel) both carry "<chapter> [<model>]"; outside a run the environment is left as it was."""
    body = (
        "import json, pathlib\n"
        "from atlas_core.progress import tqdm\n"
        "for _ in tqdm(range(3), desc='perplexity'):\n"
        "    pass\n"
        "pathlib.Path(results_dir, 'toy.json').write_text('{}')"
    )
    source = write_chapter(tmp_path, body)
    before = os.environ.get("ATLAS_CHAPTER")
    path = runner.run_chapter("toy", "tiny", {}, tmp_path / "out", source)
    terminal = capfd.readouterr().err
    assert "toy [tiny]: cells" in terminal
    streams = "".join("".join(o.get("text", "")) for c in json.loads(path.read_text())["cells"]
                      for o in c.get("outputs", []) if o.get("name") == "stderr")
    assert "toy [tiny]: perplexity" in streams
    assert os.environ.get("ATLAS_CHAPTER") == before


def test_glue_pages_are_touched_only_when_a_glued_notebook_is_newer_than_their_html(tmp_path):
    """A rebuild with nothing changed touches nothing (Sphinx then has nothing to rebuild)."""
    book, html = tmp_path / "book", tmp_path / "_build" / "html"
    (book / "chapters").mkdir(parents=True)
    (html / "book").mkdir(parents=True)
    page = book / "claims.md"
    page.write_text("{glue:text}`chapters/a.ipynb::x:.2f`\n", encoding="utf-8")
    (book / "chapters" / "a.ipynb").write_text("{}")
    assert runner.touch_cross_document_glue(book, html) == [page]  # never built: touched
    built = html / "book" / "claims.html"
    built.write_text("<html/>")
    os.utime(book / "chapters" / "a.ipynb", (100, 100))
    os.utime(built, (200, 200))
    os.utime(page, (50, 50))
    assert runner.touch_cross_document_glue(book, html) == []
    assert page.stat().st_mtime == 50
    os.utime(book / "chapters" / "a.ipynb", (300, 300))  # the chapter ran again
    assert runner.touch_cross_document_glue(book, html) == [page]


def test_browser_check_is_not_rerun_on_an_unchanged_book(tmp_path, monkeypatch):
    from atlas_core.book import browser

    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text("<html>a</html>")
    calls = []
    monkeypatch.setattr(browser, "find_chromium", lambda: "chromium")
    monkeypatch.setattr(browser, "check_book", lambda d: calls.append(d) or [])
    assert runner.browser_check(html).startswith("browser check ") and len(calls) == 1
    assert "unchanged" in runner.browser_check(html) and len(calls) == 1
    (html / "index.html").write_text("<html>b</html>")
    runner.browser_check(html)
    assert len(calls) == 2


def test_a_chapter_depends_on_the_library_code_it_imports_only(tmp_path):
    """The workflow reruns a chapter when code it imports changes: lazy imports and package __init__ count,
    orchestration modules and unrelated subpackages do not."""
    lib = runner.ROOT / "atlas_core"
    models = set(runner.chapter_code("models"))
    assert {str(lib / "eval.py"), str(lib / "models.py"), str(lib / "zoo.py"), str(lib / "__init__.py")} <= models
    assert not any("/kvquant/" in p or "/sparse/" in p or "/wquant/" in p for p in models)
    assert not any("/atlas_core/book/" in p or p.endswith("progress.py") for p in models)
    kv = set(runner.chapter_code("kvquant"))
    assert str(lib / "kvquant" / "__init__.py") in kv and str(lib / "kvquant" / "decode.py") in kv
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from atlas_core.top1 import hard_top1\n    import atlas_core.book.runner\n")
    lazy = set(runner.chapter_code("lazy", source))
    assert str(lib / "top1.py") in lazy and str(lib / "eval.py") in lazy  # top1 imports eval
    assert not any("/atlas_core/book/" in p for p in lazy)


def _code_digests() -> dict[str, str]:
    """Per chapter, a sha256 over the names and bytes of its rerun inputs (runner.chapter_code)."""
    import hashlib

    out = {}
    for chapter in runner.CHAPTERS:
        digest = hashlib.sha256()
        for path in runner.chapter_code(chapter):
            digest.update(path.encode() + b"\0" + Path(path).read_bytes())
        out[chapter] = digest.hexdigest()
    return out


def test_rerun_inputs_are_each_notebooks_import_closure():
    """sparse/kernels.py is an input of sparse and kvquant (their benchmarks' dense decode) and of no other chapter; nqp's closure holds
    no sparse or KV-cache module; no chapter has a book-machinery file (CLI, runner, checks) among its inputs."""
    lib = runner.ROOT / "atlas_core"
    code = {chapter: set(runner.chapter_code(chapter)) for chapter in runner.CHAPTERS}
    kernels = str(lib / "sparse" / "kernels.py")
    assert [c for c in runner.CHAPTERS if kernels in code[c]] == ["kvquant", "sparse"]  # kvquant's bench: dense_decode
    assert not any("/sparse/" in p or "/kvquant/" in p for p in code["nqp"])
    assert str(lib / "wquant" / "gptq.py") in code["nqp"]
    machinery = {str(p) for p in (lib / "book").glob("*.py")} | {str(lib / "progress.py")}
    assert {str(lib / "book" / f"{n}.py") for n in ("cli", "runner", "chapter_params", "browser", "compare",
                                                      "book_bench")} <= machinery
    assert all(not machinery & files for files in code.values())


def test_editing_book_machinery_reruns_no_chapter_and_a_kernel_edit_reruns_its_chapter(tmp_path, monkeypatch):
    """On a copy of the library and notebooks: edits to every book-package module (even ones that add science
    imports: no chapter imports the book) and to progress.py leave every chapter's code hash unchanged; an
    edit to sparse/kernels.py changes the hashes of sparse and kvquant (whose benchmark uses its dense decode) only. (An import added to progress.py is followed: the
    chapters that load progress would load that module too.)"""
    shutil.copytree(runner.ROOT / "atlas_core", tmp_path / "atlas_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(runner.ROOT / "notebooks", tmp_path / "notebooks")
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    monkeypatch.delenv(runner.NOTEBOOKS_ENV, raising=False)
    before = _code_digests()
    for path in (tmp_path / "atlas_core" / "book").glob("*.py"):
        path.write_text(path.read_text() + "\nimport atlas_core.sparse.kernels  # an edit\n")
    progress = tmp_path / "atlas_core" / "progress.py"
    progress.write_text(progress.read_text().replace("tqdm", "tqdm  # an edit", 1))
    assert _code_digests() == before
    kernels = tmp_path / "atlas_core" / "sparse" / "kernels.py"
    kernels.write_text(kernels.read_text() + "\n# an edit\n")
    after = _code_digests()
    assert [c for c in runner.CHAPTERS if after[c] != before[c]] == ["kvquant", "sparse"]  # both import it


def test_book_inputs_digest_changes_with_any_book_source(tmp_path):
    (tmp_path / "book" / "chapters").mkdir(parents=True)
    (tmp_path / "book" / "_static" / "mathjax").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml", "book/intro.md", "book/chapters/a.ipynb", "book/_static/mathjax/x.js"):
        (tmp_path / name).write_text("x")
    first = runner.book_inputs_digest(tmp_path)
    assert runner.book_inputs_digest(tmp_path) == first
    (tmp_path / "book" / "_static" / "mathjax" / "x.js").write_text("changed")  # a copied asset, not a source
    assert runner.book_inputs_digest(tmp_path) == first
    os.utime(tmp_path / "book" / "chapters" / "a.ipynb", (10**9, 10**9))  # a chapter re-ran
    assert runner.book_inputs_digest(tmp_path) != first


def test_atlas_book_imports_neither_torch_nor_transformers():
    """`atlas book` only orchestrates (its chapters run in other processes): its start-up stays cheap."""
    import subprocess
    import sys

    code = ("import sys; from atlas_core.book import cli, runner; runner.build_book = lambda cores, models: None; "
            "rc = cli.main(['book']); print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "False", "False"]


@pytest.mark.parametrize("command", [["run", "toy"], ["run", "models", "--model", "toy-llama"], ["book"]])
def test_a_cache_root_that_is_a_file_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, command):
    """Its own message, not a parameter's: the book's chapters check their values through tokenizers that the
    cache holds, and those checks used to report the cache as "parameter 'ppl_seq_len' = 512: …"."""
    from atlas_core.book.cli import main

    forbid_execution(monkeypatch)
    monkeypatch.setattr(runner.subprocess, "run", lambda *a, **k: pytest.fail("the workflow started"))
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(blocker))
    source = ["--source", str(write_chapter(tmp_path, "x = 1"))] if command[1:] == ["toy"] else []
    out = ["--out", str(tmp_path / "out")] if command[0] == "run" else []
    assert main([*command, *source, *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker) in err and "ATLAS_CACHE_DIR" in err and "parameter" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("group", [False, True], ids=["atlas-only", "process-group"])
def test_ctrl_c_during_a_chapter_is_one_line_without_the_kernels_traceback(tmp_path, group):
    """SIGINT mid-cell (to atlas, or to its whole process group as a terminal sends it): `atlas run` says what it keeps and exits 130; the kernel, shut down with a reply still
    owed, no longer prints its ZMQError traceback (its log is silenced: runner.KERNEL_LOG_LEVEL)."""
    import signal
    import subprocess
    import sys
    import time

    source = write_chapter(tmp_path, "import pathlib, time\npathlib.Path('running').touch()\ntime.sleep(120)",
                           params='model = "x"\nresults_dir = "."\n')
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "atlas_core.book.cli", "run", "toy", "--source", str(source),
                             "--model", "tiny", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".toy.*/results/running")):  # in the sleeping cell
        time.sleep(0.2)
    if group:  # a terminal's Ctrl-C: every process of the foreground group, the kernel too
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "ZMQError" not in err, err
    assert "atlas: interrupted" in err
    assert not out.exists()  # the staging folder and the folder the run made are gone

