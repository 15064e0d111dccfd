"""Provenance: run information, the opening box, the line under each figure, the data beside it, and the
book's glue checks (a key no chapter produced, a figure without its data file)."""

import json
import subprocess
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from atlas_core import provenance
from atlas_core.book import runner
from atlas_core.book.glue_check import glue_problems, references
from atlas_core.glue import chapter_glue


def test_run_info_names_commit_versions_and_hardware():
    info = provenance.run_info()
    head = subprocess.run(["git", "-C", str(provenance.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert info.commit == head.stdout.strip()
    assert set(info.versions) == set(provenance.PACKAGES) and info.versions["numpy"][0].isdigit()
    assert info.cores >= 1 and info.cpu and info.date.endswith("UTC")
    assert info.short_commit.startswith(info.commit[:10])


def test_hardware_and_durations_read_as_words():
    info = provenance.RunInfo(commit="a" * 40, dirty=True, versions={}, python="3.11", cpu="X", cores=1,
                              threads=1, gpu=None, date="d")
    assert info.hardware() == "X (1 core, 1 torch thread)" and info.short_commit == "a" * 10 + "+dirty"
    many = provenance.RunInfo(commit="b" * 40, dirty=False, versions={}, python="3.11", cpu="Y", cores=16,
                              threads=4, gpu="H200", date="d")
    assert many.hardware() == "Y (16 cores, 4 torch threads), GPU H200"
    assert [provenance.duration(s) for s in (42, 318, 4320)] == ["42 s", "5.3 min", "1 h 12 min"]


def recorder():
    seen = {}
    return seen, lambda key, value, display: seen.__setitem__(key, value)


def test_figures_and_tables_are_glued_with_their_data_and_provenance(tmp_path):
    import matplotlib.pyplot as plt

    seen, glue = recorder()
    g = chapter_glue("demo", chapter="demo", model="toy-llama", corpus="britannica", results_dir=tmp_path, glue=glue)
    df = pd.DataFrame({"bits": [2, 3], "ppl": [30.1, 25.2]})
    fig, ax = plt.subplots()
    ax.plot(df.bits, df.ppl)
    g.figure("fig_ppl", fig, data=df, sample="4 windows of 128 tokens")
    assert not plt.fignum_exists(fig.number)  # closed after gluing
    g.table("tab", df.set_index("bits").style.format("{:.1f}"), sample="2 rows", corpus="pydoc")
    assert pd.read_csv(tmp_path / "data" / "demo" / "demo_fig_ppl.csv").equals(df)
    assert list(pd.read_csv(tmp_path / "data" / "demo" / "demo_tab.csv").columns) == ["bits", "ppl"]  # named index kept
    line = seen["demo_fig_ppl_prov"].data
    for part in ("chapter *demo*", "`toy-llama`", "britannica", "4 windows of 128 tokens", "<params-demo>",
                 "{download}`demo_fig_ppl.csv <data/demo/demo_fig_ppl.csv>`", "<code-demo>",
                 provenance.run_info().commit[:10]):
        assert part in line, part
    assert "pydoc" in seen["demo_tab_prov"].data
    g.finish()
    box = seen["demo_run_box"].data
    assert box.startswith(":::{admonition}") and "toy-llama" in box and "wall time" in box and "numpy" in box
    assert "{download}`demo.json <data/demo/demo.json>`" in box
    assert isinstance(seen["demo_wall_s"], float)


def test_figure_data_must_be_a_table_and_a_plain_glue_cannot_glue_figures(tmp_path):
    from atlas_core.glue import Glue

    _, glue = recorder()
    g = chapter_glue("demo", chapter="demo", model="m", corpus="c", results_dir=tmp_path, glue=glue)
    with pytest.raises(TypeError, match="DataFrame"):
        g.table("t", pd.DataFrame({"a": [1]}), data=[1, 2], sample="s")
    import matplotlib.pyplot as plt

    from atlas_core.figures import FigureStyleError

    fig, _ = plt.subplots(figsize=(11, 3))
    with pytest.raises(FigureStyleError, match="wider than"):
        g.figure("wide", fig, data=pd.DataFrame({"a": [1]}), sample="s")
    assert not (tmp_path / "data" / "demo" / "demo_wide.csv").exists()  # refused before anything is written
    plt.close(fig)
    with pytest.raises(RuntimeError, match="chapter_glue"):
        Glue("demo", glue=glue).table("t", pd.DataFrame({"a": [1]}), sample="s")


def executed_notebook(path: Path, glued: dict[str, dict], markdown: str, params=None) -> Path:
    """A stand-in executed chapter: one markdown cell and one code cell whose outputs glue ``glued``."""
    outputs = [nbformat.v4.new_output("display_data", data={f"application/papermill.record/{m}": v for m, v in b.items()},
                                      metadata={"scrapbook": {"name": k, "mime_prefix": "application/papermill.record/"}})
               for k, b in glued.items()]
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell(markdown),
        nbformat.v4.new_code_cell("x = 1", outputs=outputs)])
    nb.metadata["papermill"] = {"parameters": params or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


FIG = {"image/svg+xml": "<svg/>", "text/plain": "<Figure>"}
TABLE = {"text/html": "<table><tr><td>1</td></tr></table>", "text/plain": "df"}
NUMBER = {"text/plain": "3"}


def small_book(tmp_path: Path, page: str = "", data=("demo_fig",)) -> Path:
    book = tmp_path / "book"
    executed_notebook(book / "chapters" / "demo.ipynb",
                      {"demo_fig": FIG, "demo_tab": TABLE, "demo_n": NUMBER},
                      "# Demo\n\n```{glue:figure} demo_fig\n:name: fig-demo\n\nCaption.\n```\n\n{glue:text}`demo_n:d`\n")
    for key in data:
        path = book / "chapters" / provenance.data_path("demo", key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a\n1\n")
    (book / "intro.md").write_text(page or "# Intro\n\n{glue:text}`chapters/demo.ipynb::demo_n:d`\n")
    return book


def test_a_consistent_book_passes_the_glue_checks(tmp_path):
    assert glue_problems(small_book(tmp_path)) == []
    assert references("{glue:md}`a_prov:myst` and ```{glue:md} b\n") == [(None, "a_prov"), (None, "b")]


def test_a_key_no_chapter_produced_fails_the_build_in_one_line(tmp_path):
    book = small_book(tmp_path, page="# Intro\n\n{glue:text}`chapters/demo.ipynb::demo_gone:d`\n"
                                      "{glue:text}`chapters/nope.ipynb::x`\n")
    problems = glue_problems(book)
    assert problems == ["book/intro.md: glues 'demo_gone', which chapter 'demo' did not produce",
                        "book/intro.md: glues 'x' from chapters/nope.ipynb, which no chapter produced (no such notebook)"]
    with pytest.raises(runner.BuildError) as err:
        runner.check_glue(book)
    assert "\n" not in str(err.value) and "(and 1 more)" in str(err.value)


def test_a_glued_figure_without_its_data_file_fails_the_build(tmp_path):
    book = small_book(tmp_path, data=())
    assert glue_problems(book) == [
        "book/chapters/demo.ipynb: glued figure or table 'demo_fig' has no data file "
        "(book/chapters/data/demo/demo_fig.csv; glue it with g.figure / g.table)"]
    book = small_book(tmp_path / "t", page="# Intro\n\n```{glue:figure} chapters/demo.ipynb::demo_tab\n```\n")
    assert [p.split(":")[0] for p in glue_problems(book)] == ["book/intro.md"]  # a table shown on another page


def test_prepare_book_copies_data_and_writes_the_appendix_page(tmp_path, monkeypatch):
    root = tmp_path
    chapter_src = root / "notebooks" / "demo.py"
    chapter_src.parent.mkdir()
    chapter_src.write_text('# %% [markdown]\n# # Demo chapter\n\n# %% tags=["parameters"]\nmodel = "m"\nn = 3\n'
                           'results_dir = "results"\n\n# %%\nx = n\n')
    monkeypatch.setenv(runner.NOTEBOOKS_ENV, str(chapter_src.parent))
    executed_notebook(root / "book" / "chapters" / "demo.ipynb", {}, "# Demo chapter\n\n```{glue:figure} k\n:name: fig-k\n```",
                      params={"model": "toy", "n": 5, "results_dir": "."})
    (root / "results" / "toy").mkdir(parents=True)
    (root / "results" / "toy" / "demo.json").write_text('{"ppl": 1}')
    (root / "results" / "toy" / "demo.timing.json").write_text(json.dumps(
        {"model": "toy", "wall_s": 318.0, "finished": "2026-12-01T05:00:00+0000"}))
    data = root / "results" / "toy" / "data" / "demo"
    data.mkdir(parents=True)
    (data / "demo_fig.csv").write_text("a\n1\n")
    stale = root / "book" / "chapters" / "data" / "demo" / "old.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("x")
    runner.prepare_book("toy", root=root, chapters=("demo",))
    copied = root / "book" / "chapters" / "data" / "demo"
    assert (copied / "demo_fig.csv").read_text() == "a\n1\n" and not stale.exists()
    assert (copied / "demo.json").read_text() == '{"ppl": 1}'  # the run's numbers, linked from the opening box
    page = nbformat.read(root / runner.APPENDIX_DIR / "01-demo.ipynb", as_version=4)
    head = page.cells[0].source
    assert "(code-demo)=" in head and "(params-demo)=" in head and "# Demo chapter: code and parameters" in head
    assert "| `n` | `5` | `3` |" in head and "results_dir" not in head and "`toy` in 5.3 min" in head
    assert [c.cell_type for c in page.cells[1:]] == ["code"]  # the prose (and its labels) left out
    assert page.metadata["mystnb"] == {"remove_code_source": False}
    mtime = (root / runner.APPENDIX_DIR / "01-demo.ipynb").stat().st_mtime_ns
    runner.prepare_book("toy", root=root, chapters=("demo",))  # unchanged: files untouched (no rebuild)
    assert (root / runner.APPENDIX_DIR / "01-demo.ipynb").stat().st_mtime_ns == mtime
    (root / "book" / "chapters" / "demo.ipynb").unlink()
    with pytest.raises(runner.BuildError, match="missing"):
        runner.prepare_book("toy", root=root, chapters=("demo",))


def test_appendix_pages_are_numbered_in_book_order_and_not_chapters():
    assert runner.appendix_name("nqp", ("models", "nqp")) == "02-nqp"
    assert all("/" not in c for c in runner.CHAPTERS)
    toc = (runner.ROOT / "_toc.yml").read_text()
    assert f"glob: {runner.APPENDIX_DIR.as_posix()}/*" in toc


def test_a_rerun_replaces_the_chapter_data_folder(tmp_path):
    old = tmp_path / "out" / "data" / "demo"
    old.mkdir(parents=True)
    (old / "gone.csv").write_text("x")
    new = tmp_path / "stage" / "data" / "demo"
    new.mkdir(parents=True)
    (new / "fig.csv").write_text("y")
    runner._replace_chapter_data(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["fig.csv"]


@pytest.mark.parametrize("plain", ["''", '""', "'  '"])
def test_a_glued_empty_text_fails_the_build(tmp_path, plain):
    """A conditional sentence glued as "" in one case (found on the real atlas page: the MQA note on a GQA
    model) reads on the page as a missing value; the build names the page and key before Jupyter Book runs."""
    book = tmp_path / "book"
    executed_notebook(book / "chapters" / "demo.ipynb", {"demo_note": {"text/plain": plain}, "demo_n": NUMBER},
                      "# Demo\n\nA sentence.{glue:text}`demo_note:s` {glue:text}`demo_n:d`\n")
    (book / "intro.md").write_text("# Intro\n")
    assert glue_problems(book) == [
        f"book/chapters/demo.ipynb: glues 'demo_note', which chapter 'demo' produced as {plain!r}: an empty text "
        "shows as nothing on the page (glue a sentence, or \"—\", in every case)"]


@pytest.mark.parametrize("bundle", [{"text/plain": "'—'"}, {"text/plain": "0"}, {"text/plain": "'nan is a word here'"},
                                    {"text/plain": "nan"},  # a toy run's NaN: the browser check's to judge on the page
                                    {"text/plain": "''", "text/markdown": "**shown**"}])
def test_glued_values_that_show_something_pass(tmp_path, bundle):
    book = tmp_path / "book"
    executed_notebook(book / "chapters" / "demo.ipynb", {"demo_note": bundle}, "# Demo\n\n{glue:text}`demo_note`\n")
    (book / "intro.md").write_text("# Intro\n")
    assert glue_problems(book) == []
