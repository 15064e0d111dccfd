"""The equal-storage study: Pareto front, storage fits measured from the bytes held, KIVI's excess removed."""

import math

import pytest
import torch

from atlas_core import interval
from atlas_core.kvquant import storage
from atlas_core.kvquant.experiment import EvalSetup, KVMethod, Runs
from atlas_core.models import load_model

SETUP = EvalSetup(prefill=8, batch=2)


def test_pareto_front_keeps_only_undominated_points():
    pts = [("a", 3.0, 30.0), ("b", 4.0, 25.0), ("c", 4.0, 28.0), ("d", 5.0, 26.0), ("e", 2.0, 40.0), ("f", 6.0, 20.0)]
    assert storage.pareto_front(pts) == ["e", "a", "b", "f"]  # c: same bits, higher ppl; d: more bits, higher ppl
    assert storage.pareto_front([]) == []
    assert storage.pareto_front([("x", 1.0, 5.0), ("y", 1.0, 5.0)]) == ["x"]  # a tie is not an improvement


def test_families_name_the_curve_not_the_bits():
    assert storage.family(KVMethod(method="query-tc", kbits=2)) == storage.family(KVMethod(method="query-tc", kbits=3))
    assert storage.family(KVMethod(method="kivi", grid="lloyd-max")) == "kivi lloyd-max"
    assert storage.family(KVMethod(method="headq", basis="whitened")) == "headq (whitened)"
    assert storage.family(KVMethod(method="kivi", pre_rope=True)) == "kivi pre-RoPE"
    methods = storage.pareto_methods(kbits=(2,), values=True)
    assert methods[0].method == "fp" and all(m.vbits == 2 for m in methods[1:])
    assert len({m.canonical() for m in methods}) == len(methods)  # no method twice


@pytest.fixture(scope="module")
def toy_runs():
    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(0)
    ids, calib = torch.randint(4, 260, (4, 40), generator=gen), torch.randint(4, 260, (2, 40), generator=gen)
    return Runs(lm, ids, calib, SETUP)


def test_equal_storage_picks_the_lowest_fitting_code_and_pairs_its_figures(toy_runs):
    group = 8
    cands = [KVMethod(method=m, kbits=2, group=group) for m in ("query-tc", "hadamard", "random-rotation")]
    cands.append(KVMethod(method="kivi", kbits=3, group=group))  # more storage than KIVI-2: never fits
    entry = storage.equal_storage(toy_runs, cands, kbits=2, group=group)
    kivi = toy_runs(KVMethod(method="kivi", kbits=2, group=group))
    fitting = [m for m in cands if toy_runs(m)["bits_key"] <= kivi["bits_key"] + storage.TOLERANCE]
    assert entry["fits"] == [toy_runs(m)["label"] for m in fitting] and "kivi K3" not in " ".join(entry["fits"])
    best = min(fitting, key=lambda m: toy_runs(m)["ppl"].value)
    assert entry["best"] == toy_runs(best)["label"] and entry["bits_key"] == toy_runs(best)["bits_key"]
    assert entry["kivi"]["bits_key"] == kivi["bits_key"]
    fp = toy_runs(KVMethod(method="fp"))
    expected = interval.excess_removed(kivi["nll"], toy_runs(best)["nll"], fp["nll"], SETUP.boot)
    assert entry["excess_removed"].as_dict() == pytest.approx(expected.as_dict(), nan_ok=True)
    diff = entry["difference"]
    assert diff.value == pytest.approx(toy_runs(best)["ppl"].value - kivi["ppl"].value)
    assert entry["best"] in entry["verdict"]
    plain = storage.as_json(entry)
    assert "best_method" not in plain and set(plain["ppl"]) == {"value", "lo", "hi", "units"}
    assert math.isfinite(plain["kivi"]["ppl"]["value"])


def test_equal_storage_refuses_when_nothing_fits(toy_runs):
    with pytest.raises(ValueError, match="no candidate holds at most KIVI-2"):
        storage.equal_storage(toy_runs, [KVMethod(method="kivi", kbits=4, group=8)], kbits=2, group=8)


def test_study_methods_keep_the_references_and_drop_only_what_the_model_cannot_run():
    every = storage.study_methods(kbits=(2, 3), group=16, rank=4)
    assert {storage.family(m) for m in every[1:]} == set(storage.FAMILIES) and len(every) == 1 + 2 * len(storage.FAMILIES)
    some = storage.study_methods(kbits=(2,), group=16, families=("query-tc", "hadamard"))
    assert [m.label() for m in some] == ["fp", "per-token K2 dense V g16", "kivi K2 dense V g16 R16",
                                         "hadamard K2 dense V g16 R16", "query-tc K2 dense V g16 R16"]
    assert [storage.family(m) for m in storage.study_methods(kbits=(3,), families=("hadamard",))] == ["fp", "kivi", "hadamard"]
    no_rope = storage.study_methods(kbits=(2,), pre_rope=False)
    assert not any(m.pre_rope for m in no_rope) and len(no_rope) == len(storage.study_methods(kbits=(2,))) - 2
    odd = storage.study_methods(kbits=(2,), d_head=48, group=16)  # 48 wide: no Walsh–Hadamard matrix
    assert "hadamard" not in {m.method for m in odd} and "random-rotation" in {m.method for m in odd}
    with pytest.raises(ValueError, match="cannot run on this model"):
        storage.study_methods(kbits=(2,), families=("query-tc pre-RoPE",), pre_rope=False)
    with pytest.raises(ValueError, match="power of two"):
        storage.study_methods(kbits=(2,), families=("hadamard",), d_head=48)
    with pytest.raises(ValueError, match="key bits .--bits. must name one or more distinct widths"):
        storage.study_methods(kbits=(2, 2))
    with pytest.raises(ValueError, match=r"key bits \(--bits\) must be an integer in 1..8"):
        storage.study_methods(kbits=(9,))
    with pytest.raises(ValueError, match="families must be among"):
        storage.study_methods(kbits=(2,), families=("kivi-3",))
    with pytest.raises(ValueError, match="rank"):
        storage.study_methods(kbits=(2,), rank=17, d_head=16)  # HeadQ's rank above the head width


def test_study_on_a_model_without_rope_runs_every_other_family_and_pairs_its_verdicts():
    lm = load_model("toy-gpt2")
    gen = torch.Generator().manual_seed(1)
    ids, calib = torch.randint(4, 260, (4, 40), generator=gen), torch.randint(4, 260, (2, 40), generator=gen)
    runs = Runs(lm, ids, calib, SETUP)
    r = storage.study(runs, kbits=(2, 3), group=8, rank=4)
    assert not any(m.pre_rope for m in r["methods"]) and len(r["rows"]) == len(r["methods"])
    assert {row["family"] for row in r["rows"][1:]} == {f for f in storage.FAMILIES if not f.endswith("pre-RoPE")}
    for row, m in zip(r["rows"], r["methods"]):
        assert row["label"] == m.label() and row["bits_key"] == runs(m)["bits_key"] and row["ppl"] is runs(m)["ppl"]
    front = storage.pareto_front([(row["label"], row["bits_key"] + row["bits_value"], row["ppl"].value) for row in r["rows"]])
    assert [row["label"] for row in r["rows"] if row["on_front"]] == [row["label"] for row in r["rows"] if row["label"] in front]
    for b in (2, 3):
        entry = r["equal_storage"][b]
        assert entry is not None and entry["best_method"].kbits == b and entry["best_method"].method in storage.NEW_CODES
        assert entry["bits_key"] <= entry["kivi"]["bits_key"] + storage.TOLERANCE
        assert set(r["versus"][b]) == {f"per-token K{b} dense V g8", f"kivi K{b} dense V g8 R8"}
        assert all(text.startswith(f"query-tc K{b} dense V g8 R8") for text in r["versus"][b].values())
    plain = storage.as_json({k: r[k] for k in ("rows", "equal_storage", "versus")})
    assert set(plain["equal_storage"]) == {"2", "3"} and "method" not in plain["rows"][0]
    __import__("json").dumps(plain)  # plain data all through


def test_study_without_query_tc_has_no_versus_and_no_per_token(toy_runs):
    r = storage.study(toy_runs, kbits=(2,), group=8, families=("hadamard",))
    assert [row["family"] for row in r["rows"]] == ["fp", "kivi", "hadamard"] and r["versus"] == {2: {}}
    assert r["equal_storage"][2]["best"] == "hadamard K2 dense V g8 R8"


def test_cli_kv_storage_prints_every_row_and_the_equal_storage_entry(capsys, tmp_path, monkeypatch):
    import json

    from atlas_core.book.cli import main

    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    args = ["kv-storage", "--model", "toy-llama", "--corpus", "pydoc", "--bits", "2", "--families", "query-tc", "hadamard",
            "--tokens", "128", "--seq-len", "64", "--prefill", "16", "--group", "16", "--calib-tokens", "128"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["values"] == "K-only" and out["blocks"] == 2 and out["families"] == ["per-token", "kivi", "hadamard", "query-tc"]
    labels = [row["label"] for row in out["rows"]]
    assert labels == ["fp", "per-token K2 dense V g16", "kivi K2 dense V g16 R16", "hadamard K2 dense V g16 R16",
                      "query-tc K2 dense V g16 R16"]
    for row in out["rows"]:
        assert set(row["ppl"]) == {"value", "lo", "hi", "units"} and row["ppl"]["units"] == 2
        assert 0 < row["bits_key"] <= 32 and row["bits_value"] == 32.0  # K-only: the toy's fp32 values
    entry = out["equal_storage"]["2"]
    fits = [row for row in out["rows"] if row["label"] in entry["fits"]]
    assert entry["best"] == min(fits, key=lambda row: row["ppl"]["value"])["label"]
    assert entry["kivi"]["label"] == "kivi K2 dense V g16 R16" and isinstance(entry["verdict"], str)
    assert set(out["versus"]["2"]) == {"per-token K2 dense V g16", "kivi K2 dense V g16 R16"}
    assert main([*args, "--values"]) == 0  # full KV, as a table
    text = capsys.readouterr().out
    assert "full KV" in text and "query-tc K2 V2 g16 R16" in text and "K2 at equal storage:" in text
    assert "best new code" in text and text.count("query-tc K2 V2 g16 R16 ") >= 3  # its row, vs per-token, vs KIVI


def test_cli_kv_storage_refuses_before_loading(capsys):
    from atlas_core.book.cli import main

    assert main(["kv-storage", "--model", "toy-gpt2", "--families", "query-tc pre-RoPE"]) == 2
    assert capsys.readouterr().err.strip() == ("atlas: error: families: 'query-tc pre-RoPE' cannot run on this model: "
                                               "the model has no RoPE (GPT-2): pre-RoPE keys do not apply")
