"""``python -m atlas_core.train``: bad values exit 2 with one line naming them, before any training starts."""

import json

import pytest

from atlas_core.train import cli, loop

TINY = {"arch": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_head": 8, "d_ff": 64,
                 "vocab_size": 512, "max_positions": 64},
        "train": {"corpus": "britannica", "tokens": 10 * 8 * 32, "batch_size": 8, "seq_len": 32, "eval_every": 5,
                  "eval_blocks": 4}}


class Tripwire(BaseException):
    """Training started although the values should have been refused."""


@pytest.fixture
def tripwire(monkeypatch):
    def refuse(*args, **kwargs):
        raise Tripwire
    monkeypatch.setattr(loop, "train", refuse)


def write(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("argv, word", [
    (["dhead99"], "unknown variant 'dhead99'"),
    (["base", "--tokens", "0"], "tokens"),
    (["base", "--tokens", "-1"], "tokens"),
    (["base", "--seed", "-1"], "seed"),
    (["{bad_field}"], "ArchConfig has no field 'heads'"),
    (["{bad_value}"], "n_kv_heads must divide n_heads"),
    (["{not_json}"], "is not JSON"),
    (["{no_file}"], "cannot be read"),
    (["{bad_corpus}"], "unknown corpus"),
    (["base", "--out", "{a_file}"], "is a file"),
    (["base", "--out", "{a_file}/sub"], "is a file, not a folder"),  # was a NotADirectoryError traceback
    (["base", "--out", ""], "--out is empty"),  # trained into the current folder
])
def test_bad_values_exit_2_with_one_line(argv, word, tripwire, tmp_path, capsys):
    files = {"bad_field": write(tmp_path / "f.json", {"arch": {"heads": 4}}),
             "bad_value": write(tmp_path / "v.json", {"arch": {"n_kv_heads": 3}}),
             "not_json": write(tmp_path / "n.json", "{arch:"),
             "no_file": str(tmp_path / "missing.json"),
             "bad_corpus": write(tmp_path / "c.json", {"train": {"corpus": "no-such-corpus"}}),
             "a_file": write(tmp_path / "file.txt", "x")}
    argv = [a.format(**files) for a in argv]
    if "--out" not in argv:  # (an empty --out is refused, so nothing is made in the current folder)
        argv += ["--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert word in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["base", "--tokens", "x"], ["base", "--device", "tpu"], ["base"]])
def test_argparse_refusals(argv, tripwire, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)  # a non-number, a device outside the choices, or no --out
    assert stop.value.code == 2


def test_json_run_trains_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    argv = [write(tmp_path / "tiny.json", TINY), "--out", str(tmp_path / "run"), "--no-progress", "--seed", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "10 steps" in out and "step-000010" in out
    assert loop.read_configs(tmp_path / "run")[1].seed == 3
    assert cli.main(argv) == 0  # finished: returns from the last checkpoint
    assert cli.main(argv[:-2] + ["--seed", "4"]) == 2  # another run in the same folder is refused
