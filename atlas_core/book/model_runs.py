"""The book's "Per-model runs" appendix: every chapter executed on each model other than the book's own,
shown with its prose, figures and tables, one section per model (``atlas book --models all``).

Layout (``RUNS_DIR``, listed by the ``_toc.yml`` glob ``book/chapters/runs/*/*``, which keeps each model's
pages together in book order)::

    book/chapters/runs/<slug>/00-model.md           # the model's section page (every model, the book's too)
    book/chapters/runs/<slug>/NN-<chapter>.ipynb    # the chapter run on that model (other models only)
    book/chapters/runs/<slug>/data/NN-<chapter>/    # its figures' and tables' data and its results JSON

A copy is the model's executed notebook (``results/<slug>/<chapter>.ipynb``) with what would clash or point
elsewhere rewritten (``copy_text``): every label it defines (``(x)=``, ``:name:``, ``:label:``, ``$$ (x)``)
and every ``{numref}``/``{ref}``/``{eq}`` to one of them takes the model's suffix
(``fig-atlas-sweep--qwen2-5-coder-0-5b``, ``label_suffix``), so no label is defined twice in the book; its
parameters label names the copy's own parameters table; ``{doc}`` links and cross-document glue
(``x.ipynb::key``) to a chapter point at the same model's copy; data links point at the copy's data folder.
References to labels outside the copy (``sec-rule``, the appendix's ``code-<chapter>``) are left alone.
"""

from __future__ import annotations

import copy
import posixpath
import re
from pathlib import Path

from atlas_core.book.runner import (
    ROOT, BuildError, ParameterError, _write_if_changed, appendix_name, model_slug, notebook_parameters, notebook_source,
    parameters_markdown, raise_problems, read_notebook,
)
from atlas_core.provenance import DATA_DIR, code_label, params_label
from atlas_core.zoo import DEFAULT_MODEL, EMBEDDED

ALL = "all"  # ``--models all``: every embedded model
RUNS_DIR = Path("book", "chapters", "runs")
SECTION_PAGE = "00-model"  # each model's section page; sorts before its chapters (01-…)
CHAPTERS_DIR = "book/chapters"  # where the book's chapter pages live (docnames, posix)

# Label definitions (group 2 is the label) and references (a role's content: "label" or "text <label>").
LABEL_DEFINITIONS = (
    re.compile(r"^()\(([^()\s]+)\)=[ \t]*$", re.M),  # (label)=
    re.compile(r"^([ \t]*:(?:name|label):[ \t]+)(\S+)[ \t]*$", re.M),  # :name: label / :label: label
    re.compile(r"(\$\$[ \t]*)\(([^()\s]+)\)[ \t]*$", re.M),  # $$ (label) after display math
)
LABEL_ROLE = re.compile(r"\{(numref|ref|eq)\}`([^`]*)`")
DOC_ROLE = re.compile(r"\{doc\}`([^`]*)`")
DOWNLOAD_ROLE = re.compile(r"\{download\}`([^`]*)`")
GLUE_PATH = re.compile(r"([\w./-]+\.ipynb)::")  # a glue reference to another document's value
TITLED = re.compile(r"^(.*?)<([^<>]+)>$", re.S)  # a role's "text <target>" form


def book_models(names) -> list[str]:
    """The models an ``atlas book`` run covers, in order, the first being the book's own.

    ``"all"`` stands for every embedded model (``zoo.EMBEDDED``, the default model first); repeats are
    dropped; an empty list means the default model alone.

    Args:
        names: model names as given to ``--models`` (``"all"`` among them or not).

    Returns:
        The models, without repeats.
    """
    every = [DEFAULT_MODEL, *(m for m in EMBEDDED if m != DEFAULT_MODEL)]
    out: list[str] = []
    for name in list(names) or [DEFAULT_MODEL]:
        for model in every if name == ALL else [name]:
            if model not in out:
                out.append(model)
    return out


def check_book_model(models: list[str]) -> None:
    """Refuse, before any chapter runs, a book whose own model is not the default one.

    The book's pages are written for the default model: they quote its numbers by glue keys that name it
    (``models_ppl_smollm2_135m_britannica`` in Methods and in the models chapter), so a book led by another
    model would fail its glue check only after every chapter had run (hours). Other models go after it,
    into the "Per-model runs" appendix; ``atlas run`` runs any chapter on any model alone.

    Raises:
        ParameterError: the first model is not ``DEFAULT_MODEL``; the message gives the command to use.
    """
    if models and models[0] != DEFAULT_MODEL:
        rest = " ".join(m for m in models if m != DEFAULT_MODEL)
        raise ParameterError(
            f"--models: the book's pages are written for {DEFAULT_MODEL}, so it comes first "
            f"(use --models {DEFAULT_MODEL} {rest}; or run one chapter with `atlas run CHAPTER --model {models[0]}`)")


def label_suffix(model: str) -> str:
    """The suffix a copy's labels take: the model name in lower-case letters, digits and single dashes
    (``qwen2.5-coder-0.5b`` -> ``qwen2-5-coder-0-5b``)."""
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def renamed(label: str, model: str) -> str:
    """A label of a copy of a page: ``<label>--<label_suffix(model)>``."""
    return f"{label}--{label_suffix(model)}"


def _role_target(content: str) -> tuple[str, str]:
    """(text part with its trailing "<", target) of a role's content; text "" when the content is the target."""
    titled = TITLED.match(content)
    return (titled.group(1) + "<", titled.group(2)) if titled else ("", content)


def defined_labels(text: str) -> list[str]:
    """Every label a MyST text defines (``(x)=``, ``:name: x``, ``:label: x``, ``$$ (x)``), in order."""
    return [m.group(2) for pattern in LABEL_DEFINITIONS for m in pattern.finditer(text)]


def referenced_labels(text: str) -> list[str]:
    """Every label a MyST text refers to through ``{numref}``, ``{ref}`` or ``{eq}``, in order."""
    return [_role_target(m.group(2))[1] for m in LABEL_ROLE.finditer(text)]


def rename_labels(text: str, names: dict[str, str]) -> str:
    """``text`` with each label of ``names`` (old -> new) renamed where defined and where referred to."""
    def definition(m: re.Match) -> str:
        whole, start = m.group(0), m.start(0)
        return whole[:m.start(2) - start] + names.get(m.group(2), m.group(2)) + whole[m.end(2) - start:]

    def reference(m: re.Match) -> str:
        head, target = _role_target(m.group(2))
        return f"{{{m.group(1)}}}`{head}{names.get(target, target)}{'>' if head else ''}`"

    for pattern in LABEL_DEFINITIONS:
        text = pattern.sub(definition, text)
    return LABEL_ROLE.sub(reference, text)


# --- links of a copy ------------------------------------------------------------------------------

def _from_chapters(target: str) -> str:
    """A link target as written on a chapter page (``book/chapters/``), as a posix path from the book root."""
    if target.startswith("/"):
        return posixpath.normpath(target[1:])
    return posixpath.normpath(posixpath.join(CHAPTERS_DIR, target))


def _chapter_page(path: str, chapters) -> str | None:
    """The chapter whose page ``path`` (from the book root, suffix dropped) is; None for any other page."""
    folder, _, name = path.rpartition("/")
    return name if folder == CHAPTERS_DIR and name in chapters else None


def _copy_dir(model: str) -> str:
    """The folder of a model's pages, posix, from the book root."""
    return (RUNS_DIR / model_slug(model)).as_posix()


def copy_doc_target(target: str, *, chapters) -> str:
    """A ``{doc}`` target of a chapter page as its copy must write it: a chapter becomes the same model's
    copy (``02-nqp``, in the copy's folder); any other page an absolute docname (``/book/methods``)."""
    path = _from_chapters(target)
    chapter = _chapter_page(path, chapters)
    return appendix_name(chapter, chapters) if chapter else "/" + path


def copy_glue_path(path: str, *, model: str, chapters) -> str:
    """The notebook of a cross-document glue reference (``x.ipynb`` of ``x.ipynb::key``) as a copy must
    write it: a chapter becomes the same model's copy; another notebook keeps pointing at itself."""
    resolved = _from_chapters(path)
    chapter = _chapter_page(resolved.removesuffix(".ipynb"), chapters)
    if chapter:
        return f"{appendix_name(chapter, chapters)}.ipynb"
    return posixpath.relpath(resolved, _copy_dir(model))


def copy_download_target(target: str, *, chapter: str, model: str, chapters) -> str:
    """A ``{download}`` target of a chapter page as its copy must write it: the chapter's data
    (``data/<chapter>/…``) becomes the copy's data folder (``data/NN-<chapter>/…``, holding this model's
    files); another file keeps pointing at itself."""
    if target.startswith("/"):
        return target
    resolved = _from_chapters(target)
    data = f"{CHAPTERS_DIR}/{DATA_DIR}/{chapter}/"
    if resolved.startswith(data):
        return f"{DATA_DIR}/{appendix_name(chapter, chapters)}/{resolved.removeprefix(data)}"
    return posixpath.relpath(resolved, _copy_dir(model))


def copy_text(text: str, *, chapter: str, model: str, chapters, labels: dict[str, str]) -> str:
    """A chapter's MyST text (a Markdown cell, or a glued Markdown output) as its copy on ``model`` shows it.

    Args:
        text: the text.
        chapter: the chapter it belongs to.
        model: the model the copy ran on.
        chapters: the book's chapters in order (the copies' names).
        labels: old -> new for every label the copy defines (``rename_labels``).

    Returns:
        The text with labels renamed and ``{doc}``, cross-document glue and ``{download}`` targets rewritten.
    """
    def role(pattern: re.Pattern, name: str, rewrite):
        def sub(m: re.Match) -> str:
            head, target = _role_target(m.group(1))
            return f"{{{name}}}`{head}{rewrite(target)}{'>' if head else ''}`"
        return lambda s: pattern.sub(sub, s)

    text = rename_labels(text, labels)
    text = role(DOC_ROLE, "doc", lambda t: copy_doc_target(t, chapters=chapters))(text)
    text = role(DOWNLOAD_ROLE, "download",
                lambda t: copy_download_target(t, chapter=chapter, model=model, chapters=chapters))(text)
    return GLUE_PATH.sub(lambda m: copy_glue_path(m.group(1), model=model, chapters=chapters) + "::", text)


# --- the pages ------------------------------------------------------------------------------------

def _markdown_texts(nb):
    """(holder, key) of every Markdown text of a notebook: its Markdown cells' sources and each output's
    Markdown (a glued ``text/markdown`` value, shown where a page glues it)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            yield cell, "source"
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            for mime in out.get("data", {}):
                if mime.endswith("text/markdown"):
                    yield out["data"], mime


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def copy_labels(nb, *, chapter: str, model: str) -> dict[str, str]:
    """old -> new for every label a chapter's copy on ``model`` defines: the notebook's own and its
    parameters table's (``params-<chapter>``, which the copy shows itself: this model's parameters)."""
    found = [label for holder, key in _markdown_texts(nb) for label in defined_labels(_text(holder[key]))]
    return {label: renamed(label, model) for label in [*found, params_label(chapter)]}


def model_run_notebook(executed, *, chapter: str, model: str, book_model: str, chapters, defaults: dict):
    """A chapter executed on ``model``, as its page in the per-model runs: prose, figures and tables, labels
    renamed and links rewritten (``copy_text``), the title naming the model, a note on what the page is, and
    the parameters of the run at the end.

    Args:
        executed: the executed chapter (an nbformat notebook, ``results/<slug>/<chapter>.ipynb``); not modified.
        chapter: its name.
        model: the model it ran on.
        book_model: the book's own model (whose run the chapter's page shows).
        chapters: the book's chapters in order.
        defaults: the defaults of the chapter's ``parameters`` cell (``runner.notebook_parameters``).

    Returns:
        A new notebook (code hidden, as on the chapter pages).
    """
    import nbformat

    nb = copy.deepcopy(executed)
    labels = copy_labels(nb, chapter=chapter, model=model)
    for holder, key in _markdown_texts(nb):
        holder[key] = copy_text(_text(holder[key]), chapter=chapter, model=model, chapters=chapters, labels=labels)
    note = (f":::{{note}}\nThis is chapter {{doc}}`/{CHAPTERS_DIR}/{chapter}` executed on `{model}` instead of "
            f"the book's model, `{book_model}` ({{ref}}`runs-{label_suffix(model)}`). Its figures, tables and "
            f"glued numbers are this run's, each with its data file, and so are its "
            f"{{ref}}`parameters <{labels[params_label(chapter)]}>`; the code is the chapter's "
            f"({{ref}}`code-{chapter}`). The prose is the chapter's own text, written for the book's model: a "
            f"sentence that names a model or quotes a number that is not glued describes that run, not this one.\n:::")
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first is None:
        first = nbformat.v4.new_markdown_cell(f"# {chapter}")
        nb.cells.insert(0, first)
    lines = first.source.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if at is None:
        lines, at = [f"# {chapter}", "", *lines], 0
    lines[at:at + 1] = [f"{lines[at]} ({model})", "", note]
    first.source = "\n".join(lines)
    used = dict(nb.metadata.get("papermill", {}).get("parameters", {}))
    tail = nbformat.v4.new_markdown_cell(f"({labels[params_label(chapter)]})=\n## Parameters of this run\n\n"
                                         f"{parameters_markdown(defaults, used)}")
    tail["id"] = f"run-parameters-{chapter}"  # not a random id: an unchanged run writes identical bytes
    nb.cells.append(tail)
    return nb


def section_page(model: str, *, models, chapters) -> str:
    """The section page of ``model`` in the per-model runs (MyST): the model, and its chapters' pages (the
    book's own chapters for the book's model, ``models[0]``; the copies for any other).

    Args:
        model: one of ``models``.
        models: the build's models, the book's own first.
        chapters: the book's chapters in order.
    """
    book_model, others = models[0], list(models[1:])
    embedded = EMBEDDED.get(model)
    about = f"{embedded.description}. " if embedded else ""
    title = f"Runs on {model}" + (" (the book's model)" if model == book_model else "")
    head = f"(runs-{label_suffix(model)})=\n# {title}\n\n{about}"
    if model != book_model:
        pages = ", ".join(f"{{doc}}`{appendix_name(c, chapters)}`" for c in chapters)
        return (f"{head}Every chapter of the book executed on `{model}` by the same notebooks as the book's "
                f"model, `{book_model}`, with this model's parameters: {pages}. Each page has the chapter's "
                "prose with this run's figures, tables and glued numbers, their data files and the run's "
                "parameters.\n")
    pages = ", ".join(f"{{doc}}`/{CHAPTERS_DIR}/{c}`" for c in chapters)
    codes = ", ".join(f"{{ref}}`{code_label(c)}`" for c in chapters)
    if others:
        rest = ("The sections after this one show every chapter executed on each other model of this build: "
                + ", ".join(f"{{ref}}`{m} <runs-{label_suffix(m)}>`" for m in others) + ".")
    else:
        rest = (f"This build ran the chapters on `{model}` only. `atlas book --models all` also runs every "
                f"chapter on each other embedded model ({', '.join(f'`{m}`' for m in book_models([ALL]) if m != model)}) "
                "and shows those runs here, one section per model.")
    return f"{head}The book's chapters ran on this model: {pages}; their code and parameters: {codes}. {rest}\n"


def _model_files(model: str, *, models, root: Path, chapters) -> dict[Path, bytes]:
    """Path (relative to ``root``) -> bytes of every file of ``model``'s section: its section page and, for a
    model other than the book's, each chapter's copy with its data folder and results JSON.

    Raises:
        BuildError: a chapter has not been run on the model (no executed notebook).
    """
    import nbformat

    folder, results = RUNS_DIR / model_slug(model), root / "results" / model_slug(model)
    files = {folder / f"{SECTION_PAGE}.md": section_page(model, models=models, chapters=chapters).encode()}
    if model == models[0]:
        return files
    for chapter in chapters:
        executed = results / f"{chapter}.ipynb"
        if not executed.exists():
            raise BuildError(f"{executed.relative_to(root)} is missing: run the chapter on {model} first (atlas book)")
        page = model_run_notebook(nbformat.read(executed, as_version=4), chapter=chapter, model=model,
                                  book_model=models[0], chapters=chapters,
                                  defaults=notebook_parameters(read_notebook(notebook_source(chapter))))
        name = appendix_name(chapter, chapters)
        files[folder / f"{name}.ipynb"] = nbformat.writes(page).encode()
        data = results / DATA_DIR / chapter
        for path in sorted(data.rglob("*")) if data.is_dir() else []:
            if path.is_file():
                files[folder / DATA_DIR / name / path.relative_to(data)] = path.read_bytes()
        numbers = results / f"{chapter}.json"  # every number of the run, linked from the opening box
        if numbers.exists():
            files[folder / DATA_DIR / name / numbers.name] = numbers.read_bytes()
    return files


def prepare_runs(models, root: Path = ROOT, chapters=None) -> list[Path]:
    """Write the per-model runs appendix (``RUNS_DIR``): a section page for every model of the build and, for
    each model but the book's own (``models[0]``), every chapter's copy with its data (``model_run_notebook``).
    Files already up to date are left untouched; every other file under ``RUNS_DIR`` (a model or chapter no
    longer requested, a data file no longer produced) is removed, so a default build shows no stale page.

    Args:
        models: the build's models (``book_models``), the book's own first.
        root: the project folder (``results/``, ``book/``).
        chapters: the book's chapters in order (default ``runner.CHAPTERS``).

    Returns:
        The files written (absolute paths).

    Raises:
        BuildError: a chapter has not been run on one of the models; nothing is written then.
    """
    from atlas_core.book.runner import CHAPTERS

    chapters = CHAPTERS if chapters is None else tuple(chapters)
    wanted: dict[Path, bytes] = {}
    for model in models:
        wanted.update(_model_files(model, models=list(models), root=root, chapters=chapters))
    written = [root / rel for rel, data in sorted(wanted.items()) if _write_if_changed(root / rel, data)]
    runs = root / RUNS_DIR
    for path in sorted(runs.rglob("*"), reverse=True) if runs.is_dir() else []:  # files before their folders
        if path.is_file() and path.relative_to(root) not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return written


# --- the label check ------------------------------------------------------------------------------

def page_labels(page: Path) -> list[str]:
    """The labels a book page defines: a Markdown page's text, or a notebook's Markdown cells and glued
    Markdown outputs."""
    import nbformat

    if page.suffix != ".ipynb":
        return defined_labels(page.read_text(encoding="utf-8"))
    nb = nbformat.read(page, as_version=4)
    return [label for holder, key in _markdown_texts(nb) for label in defined_labels(_text(holder[key]))]


def label_problems(book: Path) -> list[str]:
    """One line per label defined twice among the book's pages (``book/``'s Markdown pages and notebooks):
    Sphinx would warn, and the build treats warnings as errors."""
    book = Path(book)
    first: dict[str, Path] = {}
    problems = []
    for page in sorted(p for p in book.rglob("*") if p.suffix in (".md", ".ipynb") and p.is_file()
                       and not {"_build", "_static", ".ipynb_checkpoints"} & set(p.relative_to(book).parts)):
        for label in page_labels(page):
            where = page.relative_to(book.parent)
            if label in first:
                problems.append(f"{where}: label {label!r} is already defined in {first[label]}")
            else:
                first[label] = where
    return problems


def check_labels(book: Path = ROOT / "book") -> None:
    """Fail before the HTML build when a label is defined twice (``label_problems``).

    Raises:
        BuildError: one line: the first problem, and how many more there are.
    """
    raise_problems(label_problems(book))
