"""``atlas book --models``: the "Per-model runs" appendix (``atlas_core.book.model_runs``).

Fast: which models ``all`` means, how a chapter's copy renames its labels and rewrites its links, the pages
``prepare_runs`` writes and removes, the duplicate-label check, the command line. Built (about 10 s): two small
chapters run by the runner on two toy models, prepared and built by Jupyter Book with -W: each model's copy renders
with its own figures and numbers, no label is defined twice, every reference in a copy resolves inside it.
"""

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from atlas_core.book import model_runs, runner
from atlas_core.book.model_runs import (
    RUNS_DIR, SECTION_PAGE, book_models, copy_text, defined_labels, label_problems, prepare_runs,
    referenced_labels, renamed,
)
from atlas_core.zoo import DEFAULT_MODEL, EMBEDDED
from test_book_provenance import book_scaffold, build_html  # the tiny book's real config and its -W build
from tinybook import needs_chromium  # skipped where no Chromium is installed

ROOT = Path(__file__).resolve().parents[1]
BOOK_MODEL, OTHER = "toy-llama", "toy-qwen2"
CHAPTERS = ("alpha", "beta")

# Two chapters in the book's habits: an opening box, a figure and a table glued with their data and
# provenance lines, labels referred to from the prose, a reference to the Methods' rule (a label outside
# the chapter), a link to the other chapter and a value glued from it.
ALPHA = '''# %% [markdown]
# # Alpha chapter
#
# ```{glue:md} al_run_box
# :format: myst
# ```
#
# {numref}`fig-alpha` shows {glue:text}`al_points` points measured on {glue:text}`al_model`, judged by
# {ref}`the rule <sec-rule>`; {ref}`sec-alpha-more` says more.
#
# ```{glue:figure} al_fig
# :name: fig-alpha
#
# A line of {glue:text}`al_points` points.
#
# {glue:md}`al_fig_prov:myst`
# ```
#
# (sec-alpha-more)=
# ## More
#
# {numref}`Table %s <tbl-alpha>` lists them.
#
# ```{glue:figure} al_table
# :name: tbl-alpha
#
# The points.
#
# {glue:md}`al_table_prov:myst`
# ```

# %% tags=["parameters"]
model = "none"
results_dir = "results"

# %%
import json, pathlib
import matplotlib.pyplot as plt
import pandas as pd
from atlas_core.figures import figsize, style
from atlas_core.glue import chapter_glue

g = chapter_glue("al", chapter="alpha", model=model, corpus="britannica", results_dir=results_dir)
points = 2 + len(model) % 3 + (model == "toy-qwen2")  # differs between the two toy models
line = pd.DataFrame({"x": range(points), "y": range(points)})
fig, ax = plt.subplots(figsize=figsize())
ax.plot(line.x, line.y, label="kivi", **style("kivi"))
ax.legend()
g.figure("fig", fig, data=line, sample=f"{points} points")
g.table("table", line, sample=f"{points} points")
g("points", points)
g("model", model)
pathlib.Path(results_dir, "alpha.json").write_text(json.dumps({"points": points}))
g.finish()
'''

BETA = '''# %% [markdown]
# # Beta chapter
#
# ```{glue:md} be_run_box
# :format: myst
# ```
#
# After {doc}`the alpha chapter <alpha>` ({glue:text}`alpha.ipynb::al_points:d` points there),
# {numref}`fig-beta` doubles them; see also {doc}`/book/chapters/alpha` and the {ref}`sec-rule`.
#
# ```{glue:figure} be_fig
# :name: fig-beta
#
# Doubled.
#
# {glue:md}`be_fig_prov:myst`
# ```

# %% tags=["parameters"]
model = "none"
factor = 2
results_dir = "results"

# %%
import json, pathlib
import matplotlib.pyplot as plt
import pandas as pd
from atlas_core.figures import figsize, style
from atlas_core.glue import chapter_glue

g = chapter_glue("be", chapter="beta", model=model, corpus="britannica", results_dir=results_dir)
line = pd.DataFrame({"x": range(3), "y": [factor * i for i in range(3)]})
fig, ax = plt.subplots(figsize=figsize())
ax.plot(line.x, line.y, label="kivi", **style("kivi"))
ax.legend()
g.figure("fig", fig, data=line, sample="3 points")
pathlib.Path(results_dir, "beta.json").write_text(json.dumps({"factor": factor}))
g.finish()
'''


# --- which models ---------------------------------------------------------------------------------

def test_all_means_every_embedded_model_with_the_default_first():
    every = book_models(["all"])
    assert every[0] == DEFAULT_MODEL and sorted(every) == sorted(EMBEDDED)
    assert book_models([]) == book_models([DEFAULT_MODEL]) == [DEFAULT_MODEL]  # the default: the book's model only
    assert book_models(["toy-llama", "toy-gpt2"]) == ["toy-llama", "toy-gpt2"]  # an explicit list, in order
    other = every[-1]
    assert book_models([other, "all", other]) == [other, *(m for m in every if m != other)]  # no repeats


def test_atlas_book_models_all_is_passed_on_and_a_bad_name_exits_2_before_any_run(monkeypatch, capsys):
    from atlas_core.book import cli

    calls = []
    monkeypatch.setattr(runner, "build_book", lambda cores, models: calls.append(models))
    assert cli.main(["book", "--models", "all"]) == 0 and calls == [["all"]]
    monkeypatch.undo()

    def boom(*args, **kwargs):
        raise AssertionError("the workflow started although a model name is bad")

    monkeypatch.setattr(runner.subprocess, "run", boom)
    assert cli.main(["book", "--cores", "1", "--models", "all", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-model" in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("models", [["toy-llama"], ["qwen2.5-coder-0.5b", "smollm2-135m"]])
def test_a_book_led_by_another_model_is_refused_before_any_run(monkeypatch, capsys, models):
    """The pages quote the default model's numbers by name: led by another, the glue check would fail only
    after every chapter had run (found by a fresh user with --models toy-llama)."""
    from atlas_core.book import cli

    def boom(*args, **kwargs):
        raise AssertionError("the workflow started although the book's model is not the default")

    monkeypatch.setattr(runner.subprocess, "run", boom)
    assert cli.main(["book", "--cores", "1", "--models", *models]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"--models {DEFAULT_MODEL} " in err and models[0] in err


# --- a copy's text --------------------------------------------------------------------------------

def test_a_copy_renames_its_own_labels_and_points_its_links_at_the_same_models_pages():
    text = ("(sec-a)=\n## A\n\n```{glue:figure} x_fig\n:name: fig-a\n\nCap {numref}`Figure %s <fig-a>`.\n```\n\n"
            "$$x$$ (eq-a)\n\n{numref}`fig-a`, {ref}`sec-a`, {eq}`eq-a`, {ref}`the rule <sec-rule>`, {numref}`fig-b`.\n"
            "{doc}`beta`, {doc}`the beta chapter <beta>`, {doc}`/book/chapters/alpha`, {doc}`../methods`, {doc}`x/y`\n"
            "{glue:text}`beta.ipynb::be_n:.2f` and {glue:text}`other.ipynb::k`\n"
            "{download}`a.csv <data/alpha/al_fig.csv>`, {download}`b.csv <data/beta/be.csv>`, {download}`/abs.txt`\n"
            "{ref}`parameters <params-alpha>`; {ref}`code <code-alpha>`\n")
    model = "qwen2.5-coder-0.5b"
    labels = {label: renamed(label, model) for label in [*defined_labels(text), "params-alpha"]}
    assert set(labels) == {"sec-a", "fig-a", "eq-a", "params-alpha"}
    out = copy_text(text, chapter="alpha", model=model, chapters=CHAPTERS, labels=labels)
    suffix = "--qwen2-5-coder-0-5b"
    assert defined_labels(out) == [f"sec-a{suffix}", f"fig-a{suffix}", f"eq-a{suffix}"]
    assert referenced_labels(out) == [f"fig-a{suffix}", f"fig-a{suffix}", f"sec-a{suffix}", f"eq-a{suffix}",
                                      "sec-rule", "fig-b", f"params-alpha{suffix}", "code-alpha"]
    assert "{numref}`Figure %s <fig-a--qwen2-5-coder-0-5b>`" in out and "{ref}`the rule <sec-rule>`" in out
    # links to a chapter go to this model's copy (a sibling, numbered in book order); other pages stay put
    assert ("{doc}`02-beta`, {doc}`the beta chapter <02-beta>`, {doc}`01-alpha`, {doc}`/book/methods`, "
            "{doc}`/book/chapters/x/y`") in out
    assert "{glue:text}`02-beta.ipynb::be_n:.2f`" in out and "{glue:text}`../../other.ipynb::k`" in out
    assert ("{download}`a.csv <data/01-alpha/al_fig.csv>`, {download}`b.csv <../../data/beta/be.csv>`, "
            "{download}`/abs.txt`") in out


# --- the pages ------------------------------------------------------------------------------------

def _executed(chapter: str, model: str) -> nbformat.NotebookNode:
    """A stand-in for a chapter executed on ``model``: a title cell, a figure with a label, a glued
    provenance line (Markdown output) and papermill's record of the parameters."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# Chapter {chapter}\n\n{{numref}}`fig-{chapter}` and {{ref}}`sec-rule`.\n\n"
                                      f"```{{glue:figure}} {chapter}_fig\n:name: fig-{chapter}\n\nCap.\n```"),
        nbformat.v4.new_code_cell("g.finish()", outputs=[nbformat.v4.new_output(
            "display_data", data={"application/papermill.record/text/markdown":
                                  f"{{ref}}`parameters <params-{chapter}>`; data {{download}}`f.csv <data/{chapter}/f.csv>`"},
            metadata={"scrapbook": {"name": f"{chapter}_fig_prov"}})]),
    ]
    nb.metadata["papermill"] = {"parameters": {"model": model, "factor": 3}}
    return nb


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with two chapter sources and stand-in runs of both chapters on two models."""
    sources = tmp_path / "notebooks"
    sources.mkdir()
    for chapter in CHAPTERS:
        (sources / f"{chapter}.py").write_text('# %% tags=["parameters"]\nmodel = "m"\nfactor = 2\nresults_dir = "r"\n')
    monkeypatch.setenv(runner.NOTEBOOKS_ENV, str(sources))
    for model in (BOOK_MODEL, OTHER):
        results = tmp_path / "results" / runner.model_slug(model)
        for chapter in CHAPTERS:
            (results / "data" / chapter).mkdir(parents=True)
            (results / "data" / chapter / "f.csv").write_text(f"x\n{model}\n")
            (results / f"{chapter}.json").write_text(json.dumps({"model": model}))
            nbformat.write(_executed(chapter, model), results / f"{chapter}.ipynb")
    return tmp_path


def test_prepare_runs_writes_each_models_section_and_copies_and_removes_what_is_no_longer_asked(project):
    runs = project / RUNS_DIR
    prepare_runs([BOOK_MODEL, OTHER], root=project, chapters=CHAPTERS)
    other = runs / runner.model_slug(OTHER)
    assert sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*") if p.is_file()) == [
        f"{BOOK_MODEL}/{SECTION_PAGE}.md", f"{OTHER}/{SECTION_PAGE}.md", f"{OTHER}/01-alpha.ipynb",
        f"{OTHER}/02-beta.ipynb", f"{OTHER}/data/01-alpha/alpha.json", f"{OTHER}/data/01-alpha/f.csv",
        f"{OTHER}/data/02-beta/beta.json", f"{OTHER}/data/02-beta/f.csv"]
    assert (other / "data" / "01-alpha" / "f.csv").read_text() == f"x\n{OTHER}\n"  # this model's data
    copy = nbformat.read(other / "01-alpha.ipynb", as_version=4)
    text = "\n".join(c.source for c in copy.cells if c.cell_type == "markdown")
    assert text.startswith(f"# Chapter alpha ({OTHER})") and "{doc}`/book/chapters/alpha`" in text
    assert "`factor` | `3` | `2`" in text  # the run's own parameters, beside the defaults
    prov = copy.cells[1].outputs[0].data["application/papermill.record/text/markdown"]
    assert prov == ("{ref}`parameters <params-alpha--toy-qwen2>`; data {download}`f.csv <data/01-alpha/f.csv>`")
    assert "(params-alpha--toy-qwen2)=" in text and "fig-alpha--toy-qwen2" in text
    assert not label_problems(project / "book")
    assert prepare_runs([BOOK_MODEL, OTHER], root=project, chapters=CHAPTERS) == []  # up to date: nothing written

    prepare_runs([BOOK_MODEL], root=project, chapters=CHAPTERS)  # a default build after a --models build
    assert [p.relative_to(runs).as_posix() for p in runs.rglob("*")] == [BOOK_MODEL, f"{BOOK_MODEL}/{SECTION_PAGE}.md"]
    page = (runs / BOOK_MODEL / f"{SECTION_PAGE}.md").read_text()
    assert "`atlas book --models all`" in page and "{doc}`/book/chapters/beta`" in page


def test_a_model_without_its_chapter_runs_is_refused_before_anything_is_written(project):
    (project / "results" / OTHER / "beta.ipynb").unlink()
    with pytest.raises(runner.BuildError, match=f"results/{OTHER}/beta.ipynb is missing"):
        prepare_runs([BOOK_MODEL, OTHER], root=project, chapters=CHAPTERS)
    assert not (project / RUNS_DIR).exists()


def test_a_label_defined_twice_in_the_book_is_a_problem(tmp_path):
    book = tmp_path / "book"
    (book / "chapters").mkdir(parents=True)
    (book / "methods.md").write_text("(sec-rule)=\n# Methods\n")
    nb = _executed("alpha", BOOK_MODEL)
    nb.cells[0].source += "\n\n(sec-rule)=\n## Again\n"
    nbformat.write(nb, book / "chapters" / "alpha.ipynb")
    assert label_problems(book) == ["book/methods.md: label 'sec-rule' is already defined in book/chapters/alpha.ipynb"]
    with pytest.raises(runner.BuildError, match="sec-rule"):
        model_runs.check_labels(book)


def test_the_toc_lists_each_models_pages_together_in_book_order(project):
    from atlas_core.book.pdf import toc_entries

    prepare_runs([BOOK_MODEL, OTHER], root=project, chapters=CHAPTERS)
    part = _runs_part()
    (project / "_toc.yml").write_text(yaml.safe_dump({"root": "book/intro", "parts": [part]}))
    files = [e.file for e in toc_entries(project / "_toc.yml") if e.part == part["caption"]]
    assert files == [f"{RUNS_DIR.as_posix()}/{m}" for m in (f"{BOOK_MODEL}/{SECTION_PAGE}", f"{OTHER}/{SECTION_PAGE}",
                                                             f"{OTHER}/01-alpha", f"{OTHER}/02-beta")]


def _runs_part() -> dict:
    """The real _toc.yml's "Per-model runs" part."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return next(p for p in toc["parts"] if p.get("caption") == "Per-model runs")


# --- a built book ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A book with the real _config.yml and static files: two chapters run by the runner on two toy models,
    prepared (the book's model's pages and the per-model runs) and built with -W -n."""
    folder = tmp_path_factory.mktemp("modelsbook")
    book_scaffold(folder)
    (folder / "book" / "intro.md").write_text("# A test book\n\nSee {doc}`chapters/alpha`.\n")
    (folder / "book" / "methods.md").write_text("(sec-rule)=\n# Methods\n\nThe one rule.\n")
    sources = folder / "notebooks"
    sources.mkdir()
    (sources / "alpha.py").write_text(ALPHA)
    (sources / "beta.py").write_text(BETA)
    mp = pytest.MonkeyPatch()
    mp.setenv(runner.NOTEBOOKS_ENV, str(sources))
    try:
        for model in (BOOK_MODEL, OTHER):
            for chapter in CHAPTERS:
                executed = runner.run_chapter(chapter, model, {}, folder / "results" / runner.model_slug(model),
                                              sources / f"{chapter}.py")
                if model == BOOK_MODEL:  # what the workflow's book_chapter rule does
                    shutil.copy(executed, folder / "book" / "chapters" / f"{chapter}.ipynb")
        # a stale page of an earlier --models build, for a model this build does not ask for
        stale = folder / RUNS_DIR / "toy-gpt2" / "01-alpha.ipynb"
        stale.parent.mkdir(parents=True)
        shutil.copy(folder / "book" / "chapters" / "alpha.ipynb", stale)
        runner.prepare_book(BOOK_MODEL, root=folder, chapters=CHAPTERS)
        prepare_runs([BOOK_MODEL, OTHER], root=folder, chapters=CHAPTERS)
    finally:
        mp.undo()
    assert not stale.parent.exists()
    runner.check_glue(folder / "book")
    model_runs.check_labels(folder / "book")
    toc = {"format": "jb-book", "root": "book/intro",
           "parts": [{"caption": "Set-up", "chapters": [{"file": "book/methods"}]},
                     {"caption": "Chapters", "chapters": [{"file": f"book/chapters/{c}"} for c in CHAPTERS]
                      + [{"file": "book/references"}]},
                     {"caption": "Appendix", "chapters": [{"glob": f"{runner.APPENDIX_DIR.as_posix()}/*"}]},
                     _runs_part()]}
    (folder / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    build_html(folder)
    return folder


def _html(folder: Path, page: str) -> str:
    return (folder / "_build" / "html" / f"{page}.html").read_text()


def _words(html: str) -> str:
    """The page's text: tags dropped, white space collapsed."""
    return " ".join(re.sub(r"<[^>]+>", "", html).split())


def test_each_model_other_than_the_books_has_every_chapter_with_its_own_figures_and_numbers(built):
    runs = RUNS_DIR.as_posix()
    main, copy = _html(built, "book/chapters/alpha"), _html(built, f"{runs}/{OTHER}/01-alpha")
    assert f"Alpha chapter ({OTHER})" in copy and "<figure" in copy and "<table" in copy  # prose, figure, table
    for html, model in ((main, BOOK_MODEL), (copy, OTHER)):
        points = 2 + len(model) % 3 + (model == OTHER)
        assert f"{points} points measured on {model}" in _words(html) and f"Model: {model}" in _words(html)
    beta = _html(built, f"{runs}/{OTHER}/02-beta")
    assert f"({2 + len(OTHER) % 3 + 1} points there)" in _words(beta)  # the cross-document value is this model's
    assert 'href="01-alpha.html"' in beta and 'href="../../../methods.html#sec-rule"' in beta
    assert not (built / "_build" / "html" / runs / "toy-gpt2").exists()  # the stale page is gone
    for page in (f"{runs}/{BOOK_MODEL}/{SECTION_PAGE}", f"{runs}/{OTHER}/{SECTION_PAGE}"):
        assert (built / "_build" / "html" / f"{page}.html").exists()


def test_no_label_twice_and_every_reference_of_a_copy_resolves_inside_it(built):
    book = built / "book"
    labels = [label for page in sorted(book.rglob("*")) if page.suffix in (".md", ".ipynb")
              and "_build" not in page.parts for label in model_runs.page_labels(page)]
    assert len(labels) == len(set(labels)) and "fig-alpha" in labels and f"fig-alpha--{OTHER}" in labels
    outside = {"sec-rule", "code-alpha", "code-beta", f"runs-{OTHER}"}
    for name in ("01-alpha", "02-beta"):
        page = book / "chapters" / "runs" / OTHER / f"{name}.ipynb"
        nb = nbformat.read(page, as_version=4)
        texts = [c.source for c in nb.cells if c.cell_type == "markdown"] + [
            "".join(v) for c in nb.cells if c.cell_type == "code" for o in c.outputs
            for m, v in o.get("data", {}).items() if m.endswith("text/markdown")]
        own = set(model_runs.page_labels(page))
        for ref in (r for t in texts for r in referenced_labels(t)):
            assert ref in own or ref in outside, (name, ref)
        assert own and all(label.endswith(f"--{OTHER}") for label in own)
        html = _html(built, f"book/chapters/runs/{OTHER}/{name}")
        for label in own:  # each label's anchor on the copy's page (docutils ids collapse "--" to "-")
            assert f'id="{re.sub("-+", "-", label)}"' in html, label
        # every numbered reference resolved (Sphinx writes "Fig. N" links; an unresolved one would have warned)
        assert not re.search(r"\{(numref|ref|doc|download)\}", html)
        data = sorted(p.name for p in (built / "_build" / "html" / "_downloads").rglob("*.csv"))
        assert data.count("al_fig.csv") == 2  # the book's model's and this model's, both in the HTML


@needs_chromium
def test_the_copies_pass_the_browser_check(built):
    """Provenance lines, data links and anchors of the copies resolve in the built HTML, as atlas book checks."""
    from atlas_core.book.browser import check_book

    reports = check_book(built / "_build" / "html")
    assert not [p for r in reports for p in r.problems]
    assert any(f"runs/{OTHER}/01-alpha" in str(r.page) for r in reports)


@pytest.mark.slow
def test_the_books_own_chapters_copied_for_a_second_model_build_with_warnings_as_errors(tmp_path):
    """Every real chapter, run on two toy models with test_chapters' small parameters: the copies of the
    second model's runs pass the glue and label checks and Jupyter Book's -W build under the real _toc.yml
    (minus the closing pages, which glue the embedded models' keys), with every label of a copy renamed and
    every reference of a copy resolving inside it or to the Methods' rule."""
    from atlas_core.book.glue_check import GLUE_ROLE
    from test_chapters import SMALL, TOY, on_toy

    assert TOY == BOOK_MODEL  # SMALL's model lists name it; both runs keep them (the models chapter lists models)
    book_scaffold(tmp_path)
    (tmp_path / "book" / "intro.md").write_text("# The book\n")
    (tmp_path / "book" / "methods.md").write_text("(sec-rule)=\n# Methods\n\nThe one rule.\n")
    sources = tmp_path / "notebooks"  # the chapters, their per-model glue keys named for the toy (on_toy)
    sources.mkdir()
    for chapter in runner.CHAPTERS:
        text = runner.notebook_source(chapter).read_text(encoding="utf-8")
        (sources / f"{chapter}.py").write_text(GLUE_ROLE.sub(lambda m: on_toy(m.group(0)), text), encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setenv(runner.NOTEBOOKS_ENV, str(sources))
    try:
        for model in (BOOK_MODEL, OTHER):
            for chapter in runner.CHAPTERS:
                executed = runner.run_chapter(chapter, model, SMALL[chapter],
                                              tmp_path / "results" / runner.model_slug(model))
                if model == BOOK_MODEL:
                    shutil.copy(executed, tmp_path / "book" / "chapters" / f"{chapter}.ipynb")
        runner.prepare_book(BOOK_MODEL, root=tmp_path)
        prepare_runs([BOOK_MODEL, OTHER], root=tmp_path)
    finally:
        mp.undo()
    runner.check_glue(tmp_path / "book")
    model_runs.check_labels(tmp_path / "book")
    for chapter in runner.CHAPTERS:
        page = tmp_path / RUNS_DIR / OTHER / f"{runner.appendix_name(chapter)}.ipynb"
        nb = nbformat.read(page, as_version=4)
        own = set(model_runs.page_labels(page))
        assert own and all(label.endswith(f"--{OTHER}") for label in own), chapter
        texts = [c.source for c in nb.cells if c.cell_type == "markdown"]
        outside = {"sec-rule", f"code-{chapter}", f"runs-{OTHER}"}  # the Methods' rule, the code, the section
        assert {r for t in texts for r in referenced_labels(t)} <= own | outside, chapter

    def present(node):
        if isinstance(node, list):
            return [present(n) for n in node if not (isinstance(n, dict) and "file" in n)
                    or any((tmp_path / f"{n['file']}{s}").exists() for s in ("", ".md", ".ipynb"))]
        return {k: present(v) if isinstance(v, (list, dict)) else v for k, v in node.items()}

    toc = present(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    html = build_html(tmp_path)
    for chapter in runner.CHAPTERS:
        assert f"Model: {OTHER}" in _words(_html(tmp_path, f"{RUNS_DIR.as_posix()}/{OTHER}/{runner.appendix_name(chapter)}"))
    assert (html / RUNS_DIR / BOOK_MODEL / f"{SECTION_PAGE}.html").exists()


def test_an_unknown_model_first_is_named_not_put_into_a_suggested_command(monkeypatch, capsys):
    """`--models nonsense` once answered with the order rule and "use --models smollm2-135m nonsense"."""
    from atlas_core.book import cli

    monkeypatch.setattr(runner.subprocess, "run", lambda *a, **k: pytest.fail("the workflow started"))
    assert cli.main(["book", "--cores", "1", "--models", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown model 'nonsense'" in err and "--models smollm2-135m" not in err
