"""`atlas bench book`: reads the runner's timing records and prints measured/target ratios (no timing here)."""

import json

from atlas_core.book import book_bench
from atlas_core.book.runner import CHAPTERS


def test_chapter_figures_read_the_runner_records(tmp_path):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "models.timing.json").write_text(json.dumps(
        {"chapter": "models", "model": "smollm2-135m", "params": {}, "wall_s": 150.0, "blas_threads": "1"}))
    (folder / "nqp.timing.json").write_text(json.dumps(
        {"chapter": "nqp", "model": "smollm2-135m", "params": {"group": 128}, "wall_s": 900.0, "blas_threads": "2"}))
    figures = {f.name.split()[2]: f for f in book_bench.chapter_figures(tmp_path)}
    assert set(figures) == set(CHAPTERS)
    assert figures["models"].ratio == 0.5 and figures["models"].note == ""
    assert figures["nqp"].ratio == 1.5 and "non-default params" in figures["nqp"].note and "2 BLAS" in figures["nqp"].note
    assert "OVER" in figures["nqp"].line() and " ok" in figures["models"].line()
    (folder / "atlas.timing.json").write_text(json.dumps(
        {"chapter": "atlas", "params": {}, "wall_s": 3.0, "blas_threads": "1", "source": "/tmp/standin/atlas.py"}))
    figures = {f.name.split()[2]: f for f in book_bench.chapter_figures(tmp_path)}
    assert "not the book's chapter" in figures["atlas"].note
    missing = [f for n, f in figures.items() if n not in ("models", "nqp", "atlas")]
    assert all(f.measured_s is None and f.ratio is None for f in missing)


def test_a_record_without_wall_s_is_reported_not_a_key_error(tmp_path):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "models.timing.json").write_text(json.dumps({"chapter": "models", "blas_threads": "1"}))
    (tmp_path / "book.timing.json").write_text(json.dumps({"chapters_ran": []}))
    models = next(f for f in book_bench.chapter_figures(tmp_path) if " models " in f.name)
    assert models.measured_s is None and "no wall_s" in models.note
    assert book_bench.recorded_book(tmp_path).measured_s is None


def test_report_columns_line_up_for_long_commands():
    figures = [book_bench.Figure(name="atlas " + " ".join(book_bench.KVQUANT_CLI), target_s=180, measured_s=190.25, source="s"),
               book_bench.Figure(name="short", target_s=300, measured_s=None, source="t"),
               book_bench.Figure(name="bash atlas.sh book", target_s=1200, measured_s=5930.0, source="u")]
    lines = book_bench.report(figures).splitlines()
    starts = {line.index("[") for line in (lines[0], *lines[2:])}
    assert len(starts) == 1  # every [source] starts in the same column
    assert "1.06" in lines[2] and "OVER" in lines[2] and "4.94" in lines[4]


def test_recorded_book_is_a_fresh_figure_only_when_every_chapter_ran(tmp_path):
    record = {"total_s": 20.0, "workflow_s": 5.0, "html_s": 10.0, "chapters_ran": []}
    (tmp_path / "book.timing.json").write_text(json.dumps(record))
    assert book_bench.recorded_book(tmp_path).target_s == 30
    (tmp_path / "book.timing.json").write_text(json.dumps({**record, "chapters_ran": list(CHAPTERS)}))
    assert book_bench.recorded_book(tmp_path).target_s == 1200


def test_has_interval_finds_lo_hi_anywhere():
    assert book_bench.has_interval({"a": [{"ppl": {"value": 1, "lo": 0.9, "hi": 1.1}}]})
    assert book_bench.has_interval({"kl_ci": [0.1, 0.2]})
    assert book_bench.has_interval({"kl": 0.04, "kl_lo": 0.03, "kl_hi": 0.05})  # atlas sparse --json (flat keys)
    assert not book_bench.has_interval({"ppl": 21.3, "seconds": 4})


def test_unknown_run_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown --run"):
        book_bench.main(["everything"], tmp_path)
