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
