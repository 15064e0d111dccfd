"""Progress bars name the running chapter (the runner sets $ATLAS_CHAPTER; see test_runner for a run)."""

import io

from atlas_core import progress


def test_label_prefixes_the_running_chapter(monkeypatch):
    monkeypatch.setenv(progress.CHAPTER_ENV, progress.chapter_label("kvquant", "smollm2-135m"))
    assert progress.label("decode") == "kvquant [smollm2-135m]: decode"
    assert progress.label(None) == "kvquant [smollm2-135m]"
    out = io.StringIO()
    bar = progress.tqdm(range(2), "decode", file=out, mininterval=0)  # positional desc, as tqdm takes it
    list(bar)
    bar.close()
    assert "kvquant [smollm2-135m]: decode" in out.getvalue()


def test_outside_a_chapter_descriptions_are_unchanged(monkeypatch):
    monkeypatch.delenv(progress.CHAPTER_ENV, raising=False)
    assert progress.label("perplexity") == "perplexity"
    out = io.StringIO()
    list(progress.tqdm(range(2), desc="perplexity", file=out, mininterval=0))
    assert "perplexity" in out.getvalue() and "[" not in out.getvalue().split("perplexity")[0]
