"""Every chapter runs end to end (jupytext → checked parameters → papermill → results JSON) on a toy model
with small parameters, and every glue key that a page of the book or a chapter's own prose uses is glued
by the chapter it names.

The toy runs check that the chapters' code runs and glues what the prose reads, not their numbers (a
random toy model has no geometry to find). The parameters below are the smallest that every rule of
``atlas_core.book.chapter_params`` accepts and every cell can compute with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from atlas_core.book import runner
from atlas_core.book.glue_check import references
from atlas_core.zoo import EMBEDDED

TOY = "toy-llama"
SMALL = {  # chapter -> -p overrides (strings, as on the command line)
    "models": {"models": '["toy-llama"]', "ppl_tokens": "512", "ppl_seq_len": "128", "invariant_seq_len": "64"},
    "crossarch": {"models": '["toy-llama"]', "n_points": "200", "n_blocks": "4", "seq_len": "64", "n_deep": "2",
                  "n_boot": "200", "null_draws": "50", "n_perm": "200", "spearman_null_draws": "20",
                  "intra_null_draws": "5"},
    "ablation": {"variants": '["base", "dhead16", "gqa2", "mqa"]', "d_heads": "[8, 16]",
                 "d_model": "32", "n_layers": "2", "vocab_size": "512", "tokens": "1280", "batch_size": "4",
                 "train_seq_len": "32", "eval_blocks": "2", "k": "3", "n_points": "100", "n_blocks": "4",
                 "seq_len": "32", "n_boot": "100", "null_draws": "20", "intra_null_draws": "3"},
    "atlas": {"n_points": "200", "n_blocks": "4", "seq_len": "64", "n_boot": "200", "null_draws": "50",
              "top1_seq_len": "64", "top1_eval_blocks": "2", "top1_calib_seq_len": "64", "top1_calib_blocks": "2"},
    "nqp": {"eval_blocks": "2", "calib_blocks": "2", "seq_len": "64", "group": "32"},
    "kvquant": {"eval_blocks": "2", "calib_blocks": "2", "seq_len": "160", "prefill": "32", "ranks": "[1, 8]",
                "code_kv_families": "query-tc", "speed_contexts": "[256, 512]", "step_ctx": "64"},
    "sparse": {"other_models": "", "seq_len": "128", "prompt_tokens": "96", "gen_tokens": "40",
               "sweep_gen_tokens": "20", "window": "8", "topk": "4", "windows": "[4, 8]", "topks": "[0, 4]",
               "page_size": "4", "contexts": "[256, 512]", "bench_rounds": "1", "survival_prompts": "4",
               "survival_prompt_tokens": "64", "survival_gen_tokens": "16", "supports": "[13, 17, 25, 41, 89]",
               "certified_prompt_tokens": "160", "certified_blocks": "2", "certified_survival_prompts": "2"},
}
SLOW: frozenset[str] = frozenset()  # chapters whose toy run takes over a minute (none at present)

def glue_references(text: str) -> set[tuple[str | None, str]]:
    """(notebook, key) for every glue reference in MyST text (``{glue:text}`key:fmt```,
    ``{glue:}`chapters/x.ipynb::key```, the ```{glue:figure} key directive): the book's own parser
    (``glue_check.references``, which the build check uses); notebook is None for the page's own notebook."""
    return set(references(text))


def slug(model: str) -> str:
    """A model's name as the chapters write it inside glue keys (``key()``: non-word runs → ``_``)."""
    return re.sub(r"\W+", "_", model).strip("_")


def on_toy(key: str) -> str:
    """The key a toy run glues for ``key``: per-model keys (``ppl_smollm2_135m_pydoc``) name the embedded
    models the book runs on; the toy runs glue the same keys under the toy model's name."""
    for name in EMBEDDED:
        key = key.replace(slug(name), slug(TOY))
    return key


def glued_keys(notebook: Path) -> set[str]:
    """The keys an executed notebook glued (myst-nb records each in its output's ``scrapbook`` metadata)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    return {out["metadata"]["scrapbook"]["name"] for cell in nb["cells"] for out in cell.get("outputs", [])
            if "scrapbook" in out.get("metadata", {})}


def glue_prefixes(source: str) -> set[str]:
    """The key prefixes a chapter's source glues under: ``prefixed_glue("kv")`` or ``chapter_glue("kv", …)``
    → kv, ``glue(key("xa", …))`` → xa, ``glue("models_table", …)`` → models."""
    found = re.findall(r"""(?:prefixed|chapter)_glue\(["'](\w+)["']|glue\(key\(["'](\w+)["']|glue\(["']([A-Za-z0-9]+)_""", source)
    return {next(part for part in groups if part) for groups in found}


def test_glue_references_are_parsed():
    text = ("# a {glue:text}`kv_ppl:.2f` b {glue:}`chapters/nqp.ipynb::nqp_gate:s` {glue}`plain`\n"
            "# ```{glue:figure} atlas_fig_sweep\n:::{glue:figure} sp_fig\n")
    assert glue_references(text) == {(None, "kv_ppl"), ("chapters/nqp.ipynb", "nqp_gate"), (None, "plain"),
                                     (None, "atlas_fig_sweep"), (None, "sp_fig")}
    assert on_toy("ppl_qwen2_5_coder_0_5b_plays_lo") == on_toy("ppl_smollm2_135m_plays_lo") == "ppl_toy_llama_plays_lo"


def test_every_chapter_has_small_parameters_the_checks_accept():
    """Fast, no kernel: SMALL covers every chapter, and its values pass the runner's name/type checks and
    the chapter's value rules (a renamed or newly checked parameter shows here first)."""
    assert set(SMALL) == set(runner.CHAPTERS)
    for chapter, params in SMALL.items():
        defaults = runner.notebook_parameters(runner.read_notebook(runner.notebook_source(chapter)))
        values = runner.validate_parameters(defaults, params)
        runner.check_chapter_values(chapter, {**defaults, **values, "model": TOY})


def test_every_cross_document_glue_names_a_chapter_and_its_prefix():
    """Fast and static: a page's ``{glue}`chapters/x.ipynb::key``` names a chapter of the book, and the key
    carries one of the prefixes that chapter's source glues under (prefixed_glue("kv") → kv_…)."""
    prefixes = {c: glue_prefixes(runner.notebook_source(c).read_text(encoding="utf-8")) for c in runner.CHAPTERS}
    pages = sorted((runner.ROOT / "book").glob("*.md"))
    refs = [(page, nb, key) for page in pages for nb, key in glue_references(page.read_text(encoding="utf-8"))]
    assert refs, "the book's pages glue nothing: the pattern no longer matches"
    for page, notebook, key in refs:
        assert notebook is not None, f"{page.name}: {{glue}} {key!r} names no chapter notebook"
        chapter = Path(notebook).stem
        assert notebook == f"chapters/{chapter}.ipynb" and chapter in runner.CHAPTERS, (page.name, notebook)
        assert any(key.startswith(f"{p}_") for p in prefixes[chapter]), (page.name, key, prefixes[chapter])


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """chapter -> its executed toy notebook; each chapter runs at most once per test session."""
    out = tmp_path_factory.mktemp("chapters")
    done: dict[str, Path | Exception] = {}

    def run(chapter: str) -> Path:
        if chapter not in done:
            try:
                done[chapter] = runner.run_chapter(chapter, TOY, SMALL[chapter], out_dir=out)
            except runner.RunnerError as err:  # a failed chapter fails every test that needs it, once
                done[chapter] = err
        if isinstance(done[chapter], Exception):
            raise done[chapter]
        return done[chapter]

    return run


def _marks(chapter: str):
    return [pytest.mark.slow] if chapter in SLOW else []


@pytest.mark.parametrize("chapter", [pytest.param(c, marks=_marks(c)) for c in runner.CHAPTERS])
def test_chapter_runs_end_to_end_on_a_toy_model(chapter, executed):
    """The chapter executes every cell, writes its results JSON and timing, and glues every key its own
    prose reads."""
    notebook = executed(chapter)
    results = json.loads((notebook.parent / f"{chapter}.json").read_text())
    assert results, f"{chapter}.json is empty"
    timing = json.loads((notebook.parent / f"{chapter}.timing.json").read_text())
    assert timing["model"] == TOY and timing["chapter"] == chapter
    own = {on_toy(key) for nb, key in glue_references(runner.notebook_source(chapter).read_text(encoding="utf-8"))
           if nb is None}
    assert own, f"{chapter}'s prose glues nothing: the pattern no longer matches"
    missing = sorted(own - glued_keys(notebook))
    assert not missing, f"{chapter} reads glue keys it never glues: {missing}"


@pytest.mark.skipif(bool(SLOW), reason=f"needs every chapter's toy run; slow ones: {sorted(SLOW)}")
def test_every_glue_key_of_the_book_pages_is_glued_by_its_chapter(executed):
    """The claims, discussion and methods pages read values glued in the chapters: each key must be glued
    by the chapter it names (on the toy runs; the same cells glue on every model)."""
    glued = {chapter: glued_keys(executed(chapter)) for chapter in runner.CHAPTERS}
    missing = []
    for page in sorted((runner.ROOT / "book").glob("*.md")):
        for notebook, key in glue_references(page.read_text(encoding="utf-8")):
            chapter = Path(notebook or "").stem
            if on_toy(key) not in glued.get(chapter, ()):
                missing.append(f"{page.name}: {notebook}::{key}")
    assert not missing, "glue keys no chapter glues:\n" + "\n".join(sorted(missing))


def test_every_chapters_default_model_is_the_librarys():
    """One DEFAULT_MODEL: a chapter's parameter cell (papermill needs literals there) names zoo's default, and
    the model lists name only embedded models."""
    from atlas_core.zoo import DEFAULT_MODEL

    for chapter in runner.CHAPTERS:
        params = runner.notebook_parameters(runner.read_notebook(runner.notebook_source(chapter)))
        assert params["model"] == DEFAULT_MODEL, chapter
        for name in params.get("models", []):
            assert name in EMBEDDED, (chapter, name)
