"""A user's ordinary mistakes end in one line naming the thing and what to do (exit 2), never a traceback."""

import pytest

from atlas_core.book.cli import main
from atlas_core.cache import CacheError, cache_dir
from atlas_core.corpus import CorpusError, load_text
from atlas_core.models import ModelError, load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A complete local checkpoint folder (a toy model saved with its tokenizer)."""
    folder = tmp_path_factory.mktemp("ckpt") / "good"
    lm = load_model("toy-llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _copy(src, dst, drop=()):
    dst.mkdir()
    for f in src.iterdir():
        if not any(f.match(p) for p in drop):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _one_line_exit_2(args, capsys, *words):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("atlas: error: ")
    for w in words:
        assert w in err
    return err


def test_a_complete_local_folder_loads(checkpoint):
    assert load_model(str(checkpoint)).spec.n_layers > 0


@pytest.mark.parametrize("drop, missing", [(("tokenizer*",), "no tokenizer"), (("*.safetensors",), "no weights"),
                                           (("config.json",), "no config.json")])
def test_a_folder_missing_a_part_names_it(checkpoint, tmp_path, capsys, drop, missing):
    folder = _copy(checkpoint, tmp_path / "partial", drop)
    with pytest.raises(ModelError, match=missing):
        load_model(str(folder))
    _one_line_exit_2(["ppl", "--model", str(folder), "--corpus", "pydoc", "--tokens", "128", "--seq-len", "64"],
                     capsys, str(folder), missing)


def test_truncated_weights_are_named_not_a_safetensors_traceback(checkpoint, tmp_path, capsys):
    folder = _copy(checkpoint, tmp_path / "trunc")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="damaged or truncated"):
        load_model(str(folder))
    broken_tokenizer = _copy(checkpoint, tmp_path / "tok")
    (broken_tokenizer / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ModelError, match="damaged or truncated"):
        load_model(str(broken_tokenizer))
    _one_line_exit_2(["ppl", "--model", str(folder), "--corpus", "pydoc", "--tokens", "128", "--seq-len", "64"],
                     capsys, "cannot be read")


def test_weights_that_do_not_fill_the_model_are_refused(checkpoint, tmp_path, capsys):
    """A missing weight (or a config of another architecture) made transformers draw weights at random:
    perplexity 252.407, then 252.345 on the next run, exit 0."""
    from safetensors.torch import load_file, save_file

    folder = _copy(checkpoint, tmp_path / "missing")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.q_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="1 missing .*q_proj"):
        load_model(str(folder))
    _one_line_exit_2(["ppl", "--model", str(folder), "--corpus", "pydoc", "--tokens", "128", "--seq-len", "64"],
                     capsys, "do not fill")


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_is_refused(name, capsys):
    with pytest.raises(ModelError, match="empty"):
        load_model(name)
    _one_line_exit_2(["ppl", "--model", name], capsys, "empty")


def test_a_non_utf8_corpus_file_is_named(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café olé\n\nmore text\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_text(str(path))
    _one_line_exit_2(["ppl", "--model", "toy-llama", "--corpus", str(path), "--tokens", "128", "--seq-len", "64"],
                     capsys, str(path), "iconv")


def test_an_unusable_cache_folder_is_named(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(CacheError, match="ATLAS_CACHE_DIR"):
        cache_dir("clouds")
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "ro"))
    monkeypatch.setattr("os.access", lambda path, mode: False)  # root ignores permissions: the check itself
    with pytest.raises(CacheError, match="not writable"):
        cache_dir("clouds")
