import json
import sys

import pytest

from atlas_core.book.cli import main


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_ppl_on_toy_model(capsys):
    assert main(["ppl", "--model", "toy-llama", "--corpus", "pydoc", "--tokens", "256", "--seq-len", "64", "--json"]) == 0
    out = _json(capsys)
    assert out["blocks"] == 4 and out["tokens"] == 256 and out["corpus"] == "pydoc"
    assert 1.0 < out["perplexity"] < 1e4  # a random byte-level model: near the vocabulary size


def test_ppl_is_deterministic(capsys):
    args = ["ppl", "--model", "toy-gpt2", "--tokens", "128", "--seq-len", "64", "--json"]
    main(args)
    first = _json(capsys)["perplexity"]
    main(args)
    assert _json(capsys)["perplexity"] == first


@pytest.mark.parametrize(
    "args, message",
    [
        (["ppl", "--model", "no-such-model"], "unknown model"),
        (["ppl", "--model", "toy-llama", "--corpus", "no-such-corpus"], "unknown corpus"),
        (["ppl", "--model", "toy-llama", "--tokens", "10", "--seq-len", "64"], "--tokens"),
        (["ppl", "--model", "toy-llama", "--corpus", "pydoc", "--tokens", "100000000"], "holds"),
        (["run", "no-such-chapter"], "no-such-chapter"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("atlas: error:") and message in err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("models", "ppl", "run", "book", "bench"):
        assert command in out


@pytest.mark.slow
def test_models_json_lists_embedded_shapes(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in _json(capsys)}
    assert (rows["smollm2-135m"]["heads"], rows["smollm2-135m"]["kv_heads"], rows["smollm2-135m"]["d_head"]) == (9, 3, 64)
    assert (rows["gemma3-270m"]["layers"], rows["gemma3-270m"]["kv_heads"], rows["gemma3-270m"]["d_head"]) == (18, 1, 256)
    assert (rows["qwen2.5-coder-0.5b"]["heads"], rows["qwen2.5-coder-0.5b"]["d_model"]) == (14, 896)
    for row in rows.values():
        assert set(row) >= {"name", "source", "family", "layers", "heads", "kv_heads", "d_head", "d_model"}


def test_sparse_on_toy_model(capsys):
    args = ["sparse", "--model", "toy-llama", "--prompt-tokens", "64", "--gen-tokens", "12", "--eval-tokens", "128",
            "--seq-len", "64", "--window", "8", "--topk", "4", "--json"]
    assert main(args) == 0
    out = _json(capsys)
    assert out["window"] == 8 and out["prompt_tokens"] == 64 and out["gen_tokens"] == 12
    assert 0 <= out["step_agreement"] <= 1 and out["tf_positions"] == 2 * (63 - 13) and out["tf_blocks"] == 2
    for name in ("kl", "top1_agree", "ppl_change", "discarded"):  # every figure with its 95% interval
        assert out[f"{name}_lo"] <= out[name] <= out[f"{name}_hi"]
    assert main(args) == 0
    again = _json(capsys)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in out.items() if k != "seconds"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["sparse", "--window", "0"], "window"),
        (["sparse", "--selector", "magic"], "invalid choice"),
        (["sparse", "--prompt-tokens", "50"], "budget"),
        (["sparse", "--gen-tokens", "0"], "--gen-tokens"),
        (["sparse", "--eval-tokens", "1500"], "multiple of --seq-len"),
        (["bench", "sparse-decode", "--context", "64"], "budget"),
        (["bench", "sparse-decode", "--heads", "5"], "divisible"),
    ],
)
def test_sparse_bad_input_exits_2(args, message, capsys):
    if message == "invalid choice":  # argparse's own check
        with pytest.raises(SystemExit):
            main(args)
    else:
        assert main(args) == 2
    assert message in capsys.readouterr().err


def test_bench_sparse_decode_json(capsys):
    assert main(["bench", "sparse-decode", "--context", "1024", "--heads", "4", "--kv-heads", "2", "--d-head", "16",
                 "--rounds", "1", "--steps", "1", "--json"]) == 0
    row = _json(capsys)["rows"][0]
    assert row["n"] == 1024 and row["speedup_pages"] > 0


def test_wquant_on_toy_model(capsys):
    args = ["wquant", "--model", "toy-qwen2", "--method", "gptq", "--bits", "3", "--group", "16",
            "--calib-corpus", "britannica", "--calib-tokens", "256", "--calib-seq-len", "64", "--tokens", "256",
            "--seq-len", "64", "--json"]
    assert main(args) == 0
    out = _json(capsys)
    assert out["method"] == "gptq" and out["bits"] == 3 and out["tokens"] == 256
    assert out["calib_corpus"] == "britannica" and out["calib_tokens"] == 256 and out["calib_seq_len"] == 64
    assert (out["damp"], out["act_order"], out["sequential"]) == (0.01, False, True)  # the settings read back
    assert 0 < out["ppl"]["lo"] <= out["ppl"]["value"] <= out["ppl"]["hi"] and out["ppl"]["units"] == 4
    assert out["ppl_ratio"]["lo"] <= out["ppl_ratio"]["value"] <= out["ppl_ratio"]["hi"]  # paired with fp
    assert 0 < out["weight_error"] < 1 and out["output_error"] > 0


@pytest.mark.parametrize("args, message", [(["wquant", "--bits", "1"], "bits"),
                                           (["wquant", "--group", "0"], "group"),
                                           (["wquant", "--tokens", "10"], "--seq-len"),
                                           (["wquant", "--tokens", "1000"], "at least 2 blocks"),  # one block: no interval
                                           (["wquant", "--calib-tokens", "10"], "seq_len"),
                                           (["wquant", "--damp", "2"], "damp"),
                                           (["wquant", "--damp", "0"], "damp"),  # was a Cholesky traceback
                                           (["wquant", "--calib-seq-len", "0"], "seq_len"),  # was ZeroDivisionError
                                           (["wquant", "--method", "rtn", "--damp", "0.1"], "no use"),  # was ignored
                                           (["wquant", "--method", "awq", "--act-order"], "no use")])
def test_wquant_bad_input_exits_2(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_compare_exit_status_says_whether_numbers_match(tmp_path, capsys):
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    a.write_text('{"ppl": 23.76, "seconds": 10}')
    b.write_text('{"ppl": 23.76, "seconds": 12}')
    c.write_text('{"ppl": 23.77, "seconds": 10}')
    assert main(["compare", str(a), str(b)]) == 0
    assert "identical numbers" in capsys.readouterr().out
    assert main(["compare", str(a), str(c)]) == 1
    assert "/ppl: 23.76 vs 23.77" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["kvquant", "--model", "toy-llama", "--tokens", "128", "--seq-len", "128", "--prefill", "20"], "at least 2 blocks"),
    (["kvquant", "--model", "toy-llama", "--tokens", "500", "--seq-len", "128", "--prefill", "20"], "multiple of --seq-len"),
    (["kvquant", "--model", "toy-llama", "--tokens", "512", "--seq-len", "128"], "--prefill (128) must be in 1..126 for --seq-len 128"),
    (["kvquant", "--model", "toy-llama", "--method", "headq", "--calib-tokens", "0", "--tokens", "256",
      "--seq-len", "128", "--prefill", "20"], "--calib-tokens (0)"),
    (["kvquant", "--model", "toy-gpt2", "--tokens", "4096", "--seq-len", "2048", "--prefill", "20"], "positions"),
    (["sparse", "--model", "toy-llama", "--eval-tokens", "1024", "--seq-len", "1024"], "at least 2 blocks"),
    (["sparse", "--model", "toy-llama", "--dense-layers", "2", "--eval-tokens", "2048"], "every one of the 2 layers"),
    (["wquant", "--model", "toy-llama", "--tokens", "1500", "--seq-len", "512"], "multiple of --seq-len"),
    (["ppl", "--model", "toy-gpt2", "--tokens", "4096", "--seq-len", "2048"], "positions")])
def test_sizes_that_cannot_carry_an_interval_or_fit_the_model_exit_2(args, message, capsys):
    """Found by a fresh-user test: one block gave a zero-width 'interval' and a verdict, a non-multiple was
    silently cut, all-dense layers and too-long sequences gave tracebacks."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_json_writes_undefined_figures_as_null():
    from atlas_core.book.cli import _json as dumps

    assert json.loads(dumps({"excess_removed": {"value": float("nan"), "lo": float("inf")}})) == \
        {"excess_removed": {"value": None, "lo": None}}


def test_choices_and_defaults_come_from_the_library():
    """Every option with choices lists a library constant (one home), and the default model is zoo's."""
    import argparse

    from atlas_core.book.cli import _parser
    from atlas_core.clouds import RESIDUALS
    from atlas_core.kvquant.experiment import BASES, CONTROLS, ENGINES, METHODS
    from atlas_core.sparse.kept import SELECTORS
    from atlas_core.wquant.apply import METHODS as WQUANT_METHODS
    from atlas_core.zoo import DEFAULT_MODEL

    subs = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    options = {(name, o): a for name, sub in subs.items() for a in sub._actions for o in a.option_strings}
    expected = {("kvquant", "--method"): METHODS, ("kvquant", "--control"): CONTROLS, ("kvquant", "--base"): BASES,
                ("kvquant", "--engine"): ENGINES, ("sparse", "--selector"): SELECTORS, ("wquant", "--method"): WQUANT_METHODS,
                ("overlap", "--residual"): RESIDUALS}
    for key, values in expected.items():
        assert tuple(options[key].choices) == tuple(values), key
    assert all(a.default == DEFAULT_MODEL for (name, o), a in options.items() if o == "--model")


@pytest.mark.parametrize("args, message", [
    (["sparse", "--model", "toy-llama", "--prompt-tokens", "97"], "--prompt-tokens (97 tokens) must exceed the budget"),
    (["sparse", "--model", "toy-llama", "--seq-len", "98", "--eval-tokens", "196"], "--seq-len (98 tokens) is too short"),
    (["kvquant", "--model", "toy-llama", "--method", "headq", "--rank", "17"], "rank (17) must be at most d_head (16)"),
    (["kvquant", "--model", "toy-llama", "--method", "per-token", "--kbits", "9"], "kbits must be an integer in 1..8"),
    (["kvquant", "--model", "toy-llama", "--method", "per-token", "--vbits", "16"], "vbits must be an integer in 1..8"),
])
def test_the_cli_calls_the_configs_rules(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("atlas: error:") and message in err and err.count("\n") == 1, err


def test_book_pdf_without_chromium_is_one_line_before_any_chapter_runs(monkeypatch, capsys):
    from atlas_core.book import runner

    monkeypatch.setenv("ATLAS_CHROMIUM", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(runner, "build_book", lambda **kw: pytest.fail("the book was built"))
    assert main(["book", "--pdf", "--cores", "1", "--models", "toy-llama"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("atlas: error: --pdf: no Chromium found") and "apt-get install chromium" in err


def test_book_pdf_prints_the_built_book(monkeypatch, capsys, tmp_path):
    from atlas_core.book import pdf, runner

    html = tmp_path / "_build" / "html" / "index.html"
    monkeypatch.setenv("ATLAS_CHROMIUM", sys.executable)  # any executable: found, never started here
    monkeypatch.setattr(runner, "build_book", lambda **kw: html)
    monkeypatch.setattr(pdf, "book_pdf", lambda html_dir: f"PDF of {html_dir}")
    assert main(["book", "--pdf", "--cores", "1", "--models", "toy-llama"]) == 0
    assert capsys.readouterr().out.strip() == f"PDF of {html.parent}"


def test_sigterm_unwinds_like_ctrl_c_so_temporary_folders_are_removed(tmp_path):
    """A killed `atlas check-book` left Chromium's profile folder behind; with the handler every ``finally``
    runs (the profile folder, staging folders) and the exit status is 128 + 15."""
    import signal
    import subprocess
    import sys

    code = ("from atlas_core.book.cli import exit_on_sigterm; exit_on_sigterm()\n"
            "import shutil, tempfile, time\n"
            f"d = tempfile.mkdtemp(dir={str(tmp_path)!r})\n"
            "try:\n    print(d, flush=True)\n    time.sleep(60)\nfinally:\n    shutil.rmtree(d)\n")  # signalled inside
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    made = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert made and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["run", "atlas", "--model", "toy-llama", "--out", ""], ["run", "atlas", "--source", " "],
                                  ["check-book", "--html", ""], ["bench", "book", "--results", ""]])
def test_an_empty_path_option_is_refused_not_taken_for_the_default(argv, capsys, tmp_path, monkeypatch):
    """`--out ""` once wrote into results/<model>/ as if the option were absent (found by a fresh user)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {argv[-2]}: an empty path" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


# --- atlas run -p NAME VALUE ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    (["-p", "k"], "-p k has no value: write -p NAME VALUE or -p NAME=VALUE"),
    (["--param", "k"], "--param k has no value: write -p NAME VALUE or -p NAME=VALUE"),
    (["-p", "k", "--out", "elsewhere"], "-p k has no value"),  # an option is not a value
    (["-p", "k", "-p", "seed", "1"], "-p k has no value"),
    (["-p"], "-p has no NAME and VALUE: write -p NAME VALUE or -p NAME=VALUE"),
    (["-p", "--out", "elsewhere"], "-p has no NAME and VALUE"),
    (["-p", "=3"], "-p =3 has no name: write -p NAME VALUE or -p NAME=VALUE"),
    (["-p", "", "3"], "-p '' has no name"),
    (["--param=k"], "--param k has no value"),
    (["--param="], "--param '' has no name"),
])
def test_a_param_without_its_name_or_value_is_named_in_one_line(params, message, capsys):
    """argparse answered `-p k` with "expected 2 arguments"; the line names the -p and says how to write one."""
    with pytest.raises(SystemExit) as exit_:
        main(["run", "atlas", "--model", "smollm2-135m", *params])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"atlas run: error: {message}") and err.count("\n") == 1, err
    assert "expected 2 arguments" not in err and "Traceback" not in err


@pytest.mark.parametrize("params, message", [
    (["-p", "k", "-3"], "parameter 'k' = -3: must be ≥ 1"),
    (["-p", "k=-3"], "parameter 'k' = -3: must be ≥ 1"),
    (["-p", "mid_depth", "-inf"], "parameter 'mid_depth' = -inf: must be a finite number"),  # "expected 2 arguments"
    (["-p", "mid_depth=-inf"], "parameter 'mid_depth' = -inf: must be a finite number"),
    (["-p", "1k=3"], "unknown parameter '1k'"),  # a name that is not an identifier still splits at its "="
    (["--param=k=-3"], "parameter 'k' = -3: must be ≥ 1"),
    (["--param=mid_depth", "-inf"], "parameter 'mid_depth' = -inf: must be a finite number"),
])
def test_a_value_that_begins_with_a_dash_reaches_the_value_rules(params, message, tmp_path, monkeypatch, capsys):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert main(["run", "crossarch", "--model", "smollm2-135m", "--out", str(tmp_path), *params]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atlas: error:") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_run_params_are_taken_out_in_order_and_other_commands_are_left_whole():
    from atlas_core.book.cli import _command_parser, _parser, _run_params

    run = _command_parser(_parser(), "run")
    argv = ["run", "atlas", "-p", "k", "-3", "--out", "o", "--param", "metric_layers", "-1", "-p", "seed", "2"]
    assert _run_params(argv, run) == (["run", "atlas", "--out", "o"], [["k", "-3"], ["metric_layers", "-1"], ["seed", "2"]])
    assert _run_params(["run", "atlas", "--", "-p"], run) == (["run", "atlas", "--", "-p"], [])
    assert _run_params(["ppl", "-p", "k"], run) == (["ppl", "-p", "k"], [])  # reported by ppl's parser, as before
