"""Checked artifacts: every file the library writes and later trusts is verified on read and rebuilt when damaged."""

import json
import os
import time

import numpy as np
import pytest
import torch

from atlas_core import cache
from atlas_core.cache import cached, check_path, read_checked, write_checked

DAMAGE = ["bit-flip", "truncated", "empty", "no-checksum", "bad-checksum"]


def damage(path, kind: str) -> None:
    """Damage an artifact the way disks and killed processes do."""
    data = bytearray(path.read_bytes())
    if kind == "bit-flip":  # same size, one byte in the middle changed
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif kind == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "no-checksum":
        check_path(path).unlink()
    elif kind == "bad-checksum":
        check_path(path).write_text("0" * 64 + "\n")


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_artifact_is_removed_with_a_notice_and_rebuilt(tmp_path, kind, capsys):
    path = tmp_path / "a.npy"
    value = np.arange(1000, dtype=np.float32)
    write_checked(path, lambda tmp: np.save(open(tmp, "wb"), value))
    assert np.array_equal(read_checked(path, np.load, "array"), value) and capsys.readouterr().err == ""
    damage(path, kind)
    assert read_checked(path, np.load, "array") is None
    err = capsys.readouterr().err
    assert str(path) in err and "rebuilding" in err and len(err.strip().splitlines()) == 1
    assert not path.exists() and not check_path(path).exists()
    built = []
    again = cached(path, lambda: built.append(1) or value, lambda v, tmp: np.save(open(tmp, "wb"), v), np.load, "array")
    assert built == [1] and np.array_equal(again, value)
    assert np.array_equal(cached(path, lambda: pytest.fail("rebuilt an intact file"), None, np.load, "array"), value)


def test_a_missing_artifact_is_built_silently_and_a_stray_checksum_removed(tmp_path, capsys):
    path = tmp_path / "x.pt"
    check_path(path).write_text("abc\n")
    assert read_checked(path, torch.load, "x") is None and not check_path(path).exists()
    assert capsys.readouterr().err == ""


def test_an_interrupted_write_leaves_nothing_and_stale_temporaries_are_cleaned(tmp_path):
    path = tmp_path / "b.pt"

    def dies(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checked(path, dies)
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".b.pt.abc.tmp"  # what a killed process (no finally) leaves
    stale.mkdir()
    (stale / "b.pt").write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    write_checked(path, lambda tmp: torch.save(torch.ones(3), tmp))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt", "b.pt.sha256"]


# --- each kind of artifact the library trusts ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bit-flip", "truncated", "empty"])
def test_damaged_clouds_are_rebuilt_and_give_the_same_overlap(tmp_path, monkeypatch, kind, capsys):
    from atlas_core import clouds
    from atlas_core.clouds import CloudSpec, head_clouds
    from atlas_core.models import load_model

    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    lm, spec = load_model("toy-qwen2"), CloudSpec(seq_len=32, n_blocks=4, n_points=100)
    first = head_clouds(lm, [1], "eps", spec, progress=False)[1]
    (path,) = (tmp_path / "clouds").glob("*.npy")
    damage(path, kind)
    calls = []
    real = clouds.extract
    monkeypatch.setattr(clouds, "extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = head_clouds(lm, [1], "eps", spec, progress=False)[1]
    assert calls == [1] and np.array_equal(again, first) and "cloud" in capsys.readouterr().err
    head_clouds(lm, [1], "eps", spec, progress=False)
    assert calls == [1]  # the rebuilt file is trusted again


@pytest.mark.parametrize("kind", ["bit-flip", "truncated", "empty"])
def test_damaged_dense_continuations_are_regenerated(tmp_path, monkeypatch, kind):
    from atlas_core.models import load_model
    from atlas_core.sparse.fidelity import dense_continuation, greedy

    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    lm = load_model("toy-qwen2")
    prompt = torch.randint(4, 200, (20,), generator=torch.Generator().manual_seed(7))
    first = dense_continuation(lm, prompt, 6)
    (path,) = (tmp_path / "sparse" / "continuations").glob("*.pt")
    damage(path, kind)
    assert torch.equal(dense_continuation(lm, prompt, 6), first) and torch.equal(first, greedy(lm, prompt, 6))


@pytest.mark.parametrize("kind", ["bit-flip", "truncated", "empty"])
def test_damaged_kvquant_references_are_recomputed(tmp_path, monkeypatch, kind, capsys):
    from atlas_core.book.cli import main

    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    args = ["kvquant", "--model", "toy-llama", "--corpus", "pydoc", "--method", "headq", "--tokens", "128",
            "--seq-len", "64", "--prefill", "16", "--group", "16", "--rank", "4", "--calib-tokens", "128", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    stored = sorted(p.name.split("-")[0] for p in (tmp_path / "kvquant").glob("*.pt"))
    assert stored == ["eval", "eval", "fp", "sigma"]  # HeadQ's and its baseline's runs, the fp NLL and Σ_q
    for path in (tmp_path / "kvquant").glob("*.pt"):
        damage(path, kind)
    assert main(args) == 0
    out, err = capsys.readouterr()
    again = json.loads(out)
    assert again["ppl_fp"] == first["ppl_fp"] and again["ppl"] == first["ppl"]  # identical numbers after the rebuild
    assert "kvquant fp-nll" in err and "kvquant sigma-q" in err and "kvquant eval" in err


def test_the_assembled_qwen_gguf_is_checked_not_only_sized(tmp_path, monkeypatch):
    from atlas_core import zoo

    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    parts = []
    for i in range(1, 7):
        part = tmp_path / "pkg" / f"part{i:02d}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(bytes([i]) * 1000)
        parts.append(part)
    target = tmp_path / "gguf" / "out.gguf"
    write_checked(target, lambda tmp: zoo._concatenate(parts, tmp))
    whole = target.read_bytes()
    damage(target, "bit-flip")  # same size: a size check would have trusted it
    assert read_checked(target, lambda p: p, "assembled GGUF") is None
    write_checked(target, lambda tmp: zoo._concatenate(parts, tmp))
    assert target.read_bytes() == whole


def test_jsonable_makes_numpy_tuples_and_keys_writable(tmp_path):
    import json

    import numpy as np

    from atlas_core.cache import jsonable, write_json

    obj = {7: (np.float64(0.5), np.int64(3)), "a": {"b": np.arange(3), (1, 2): [np.bool_(True)]}, "s": "x"}
    out = jsonable(obj)
    assert out == {"7": [0.5, 3], "a": {"b": [0, 1, 2], "(1, 2)": [True]}, "s": "x"}
    assert type(out["7"][0]) is float and type(out["7"][1]) is int and type(out["a"]["(1, 2)"][0]) is bool
    write_json(tmp_path / "r.json", out)
    assert json.loads((tmp_path / "r.json").read_text()) == out


def test_tokens_hash_follows_ids_and_shape():
    import torch

    from atlas_core.cache import tokens_hash

    a = torch.arange(12).view(3, 4)
    assert tokens_hash(None) is None
    assert tokens_hash(a) == tokens_hash(a.to(torch.int32))  # the ids, not their dtype
    assert tokens_hash(a) != tokens_hash(a.view(4, 3))  # same ids, other blocks
    b = a.clone()
    b[2, 3] = 0
    assert tokens_hash(a) != tokens_hash(b)
    # the digest the kvquant, wquant and sparse stores keyed their files by before it moved here
    assert tokens_hash(a) == "c9ddc5109d64846d953184281b78d868267462fe4a99e76dc8a5e36f4d5eb3c3"
