"""Value rules of every chapter: the shipped defaults pass, impossible values fail with their name."""

import pytest

from atlas_core.book import runner
from atlas_core.book.chapter_params import RULES, ParameterValueError, check_values
from atlas_core.zoo import ModelError


def defaults(chapter):
    return runner.notebook_parameters(runner.read_notebook(runner.notebook_source(chapter)))


def test_every_chapter_has_rules():
    assert set(RULES) == set(runner.CHAPTERS)


@pytest.mark.parametrize("chapter", runner.CHAPTERS)
def test_shipped_defaults_pass(chapter):
    check_values(chapter, defaults(chapter))


@pytest.mark.parametrize("chapter, name, value, message", [
    ("nqp", "bits", [4, 1], "2..16"),
    ("nqp", "methods", ["rtn", "magic"], "unknown ['magic']"),
    ("nqp", "calib_blocks", 0, "must be > 0"),
    ("nqp", "eval_blocks", 1, "the intervals resample these blocks"),  # one block: a point, not an interval
    ("nqp", "bits", [4, 3], "add [8]"),
    ("nqp", "methods", ["rtn", "gptq"], "add ['awq'"),
    ("nqp", "grouped_methods", ["rtn"], "add ['gptq', 'awq', 'rot-fisher']"),
    ("atlas", "k_sweep", [5, 6], "must contain the headline k"),
    ("atlas", "n_points", 10**6, "positions"),
    ("atlas", "metric", "cosine", "'source' or 'projection'"),
    ("crossarch", "mid_depth", 1.5, "[0, 1]"),
    ("crossarch", "seeds", [], "at least one seed"),
    ("kvquant", "prefill", 511, "at most seq_len − 2"),  # passed before, then failed inside the kernel
    ("kvquant", "eval_blocks", 1, "must be ≥ 2"),  # one block: a zero-width interval and a verdict
    ("sparse", "eval_blocks", 1, "must be ≥ 2"),
    ("kvquant", "ranks", [8, -1], "must be > 0"),
    ("kvquant", "engine", "fast", "must be one of onepass, decode"),
    ("kvquant", "a2_budget", 2, "must be in 3..8"),
    ("kvquant", "eval_blocks", 0, "must be > 0"),
    ("kvquant", "bits", [2, 4], "compares [2, 3]"),
    ("kvquant", "kv_bits", [3, 9], "each must be in 2..8"),
    ("sparse", "window", 0, "must be > 0"),
    ("sparse", "sweep_gen_tokens", 5000, "exceeds gen_tokens"),
    ("sparse", "sweep_blocks", 17, "exceeds eval_blocks"),
    ("sparse", "sweep_blocks", 0, "must be > 0"),
    ("sparse", "seq_len", 64, "longer than anchors + window + topk"),
    ("sparse", "seq_len", 256, "of every rule run (385)"),  # the sweep's W = 256, k = 128 (passed before)
    ("sparse", "supports", [97, 100], "anchors + window + page_size·r"),
    ("sparse", "survival_gen_tokens", 1, "must be ≥ 2"),
    ("models", "ppl_tokens", 1000, "multiple of ppl_seq_len"),
    ("models", "corpora", ["britannica", "no-such-corpus"], "not a corpus"),
])
def test_impossible_values_are_named(chapter, name, value, message):
    with pytest.raises(ParameterValueError, match=rf"parameter '{name}'.*{__import__('re').escape(message)}"):
        check_values(chapter, {**defaults(chapter), name: value})


def test_sparse_survival_needs_a_support_that_drops_keys():
    with pytest.raises(ParameterValueError, match="parameter 'survival_prompt_tokens'.*every support keeps every key"):
        check_values("sparse", {**defaults("sparse"), "survival_prompt_tokens": 64, "survival_gen_tokens": 8})


def test_unknown_models_fail_before_loading(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="unknown model"):
        check_values("atlas", {**defaults("atlas"), "model": "no such model!"})
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        check_values("models", {**defaults("models"), "models": ["someone/not-cached-anywhere"]})


def test_the_runner_rejects_impossible_values_before_executing(tmp_path, monkeypatch):
    import papermill

    def boom(*args, **kwargs):
        raise AssertionError("executed although a value was impossible")

    monkeypatch.setattr(papermill, "execute_notebook", boom)
    with pytest.raises(runner.ParameterError, match="parameter 'window' = 0"):
        runner.run_chapter("sparse", "smollm2-135m", {"window": "0"}, tmp_path)
    assert list(tmp_path.iterdir()) == []
