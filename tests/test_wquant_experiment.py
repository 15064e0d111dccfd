"""run_wquant's per-block NLL and intervals, the model left as it was, and the paired verdicts between runs."""

import copy
import math

import pytest
import torch

from atlas_core.attention import decoder_layers
from atlas_core import interval
from atlas_core.eval import block_nll
from atlas_core.models import load_model
from atlas_core.wquant.apply import quantize_model
from atlas_core.toy import FAMILIES
from atlas_core.wquant.calib import calibration_stats
from atlas_core.claims import TIE, gate
from atlas_core.wquant.experiment import best_method, compare, restored_weights, run_wquant
from atlas_core.wquant.rtn import WQuantSpec


def _nll(seed, blocks=16, tokens=64, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(blocks, tokens, generator=g) * 4 + shift


def _noisy(base):
    """base shifted by ±0.3 nats per block (as many up as down, shuffled) and 0.001 on average: a tiny
    difference under a large paired spread."""
    signs = torch.tensor([1.0, -1.0] * (len(base) // 2))[torch.randperm(len(base), generator=torch.Generator().manual_seed(1))]
    return base + 0.3 * signs[:, None] + 0.001


def test_compare_says_lower_higher_or_not_distinguishable():
    base = _nll(0)
    worse = base + 0.05  # every block 5% higher in nats: a paired shift the interval sees at once
    assert compare(worse, base, "q", "fp").verdict == "higher"
    assert compare(base, worse).verdict == "lower"
    # Noise far larger than the shift, in both directions: the interval of the ratio contains 1.
    noisy = _noisy(base)
    c = compare(noisy, base, "q", "fp")
    assert c.ratio.lo < 1 < c.ratio.hi and c.verdict == TIE
    assert TIE in c.sentence() and "q and fp" in c.sentence()
    assert compare(worse, base, "q", "fp").sentence().startswith("q is higher than fp (perplexity ratio 1.05")


def test_compare_refuses_unpaired_runs():
    with pytest.raises(ValueError, match="same units"):
        compare(_nll(0, blocks=8), _nll(1, blocks=9))


def test_gate_neither_passes_nor_fails_on_a_tie():
    base = _nll(0)
    assert gate(compare(base - 0.05, base).ratio, "lower") == "pass"
    assert gate(compare(base + 0.05, base).ratio, "lower") == "fail"
    assert gate(compare(base + 0.05, base).ratio, "higher") == "pass"
    assert gate(compare(_noisy(base), base).ratio, "lower") == TIE
    with pytest.raises(ValueError, match="lower"):
        gate(compare(base, base).ratio, "better")


def test_best_method_names_the_runs_it_cannot_tell_apart():
    base = _nll(0)
    runs = {"a": base + 0.2, "b": base, "c": _noisy(base), "d": base + 0.05}
    best, ties = best_method(runs)
    assert best == "b" and ties == ["c"]
    assert best_method({"only": base}) == ("only", [])


def test_run_wquant_returns_per_block_nll_with_intervals_and_leaves_the_model_unchanged():
    lm = load_model("toy-llama")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    calib, held_out = (torch.randint(4, 200, (n, 32), generator=gen) for n in (4, 6))
    stats = calibration_stats(lm, calib, progress=False)
    for method in ("rtn", "awq", "rot-fisher"):
        r = run_wquant(lm, method, WQuantSpec(bits=3), calib, held_out, stats)
        assert r["nll"].shape == r["nll_fp"].shape == (6, 31)
        assert r["ppl"]["value"] == pytest.approx(math.exp(r["nll"].double().mean().item()), rel=1e-9)
        assert r["ppl"]["lo"] < r["ppl"]["value"] < r["ppl"]["hi"] and r["ppl"]["units"] == 6
        assert r["ppl_ratio"] == interval.ppl_ratio(r["nll"], r["nll_fp"]).as_dict()
        for n, p in lm.model.named_parameters():  # quantized in place, then put back bit for bit
            assert torch.equal(p, before[n]), (method, n)
    # The in-place run equals the plain one on a deep copy.
    model = copy.deepcopy(lm.model)
    quantize_model(model, "rtn", WQuantSpec(bits=3), stats, progress=False)
    r = run_wquant(lm, "rtn", WQuantSpec(bits=3), calib, held_out, stats)
    torch.testing.assert_close(r["nll"], block_nll(model, held_out, progress=False), rtol=0, atol=1e-5)


def test_a_stored_run_is_reused_only_for_the_same_inputs(tmp_path, monkeypatch):
    """run_wquant(store=True) keeps a run on disk: the same call reads it back (equal numbers, no quantization),
    and a change of bits, seed, tokens, weights or code makes a new run."""
    import atlas_core.wquant.experiment as experiment

    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(0)
    calib, held_out = (torch.randint(4, 200, (n, 32), generator=gen) for n in (4, 3))
    stats = calibration_stats(lm, calib, progress=False)
    calls = []
    real = experiment.quantize_model
    monkeypatch.setattr(experiment, "quantize_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run_wquant(lm, "rot-fisher", WQuantSpec(bits=3), calib, held_out, stats, store=True)
    again = run_wquant(lm, "rot-fisher", WQuantSpec(bits=3), calib, held_out, stats, store=True)
    assert calls == [1] and len(list(tmp_path.rglob("run-*.pt"))) == 1
    assert torch.equal(first["nll"], again["nll"]) and first["ppl_ratio"] == again["ppl_ratio"]
    assert first["layers"] == again["layers"] and first["seconds"] == again["seconds"]
    plain = run_wquant(lm, "rot-fisher", WQuantSpec(bits=3), calib, held_out, stats)  # not stored: runs again
    assert torch.equal(plain["nll"], first["nll"]) and calls == [1, 1]
    run_wquant(lm, "rot-fisher", WQuantSpec(bits=4), calib, held_out, stats, store=True)
    run_wquant(lm, "rot-fisher", WQuantSpec(bits=3), calib, held_out, stats, seed=1, store=True)
    run_wquant(lm, "rot-fisher", WQuantSpec(bits=3), calib, held_out[:2], stats, store=True)
    monkeypatch.setattr(experiment, "code_version", lambda: "edited")
    run_wquant(lm, "rot-fisher", WQuantSpec(bits=3), calib, held_out, stats, store=True)
    monkeypatch.undo()
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(experiment, "quantize_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        next(decoder_layers(lm.model).parameters()).mul_(1.01)  # other weights: another run
    run_wquant(lm, "rot-fisher", WQuantSpec(bits=3), calib, held_out, stats, store=True)
    assert len(calls) == 7 and len(list(tmp_path.rglob("run-*.pt"))) == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_restored_weights_restores_every_decoder_parameter_after_an_error(family):
    lm = load_model(f"toy-{family}")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with pytest.raises(RuntimeError), restored_weights(lm.model):
        with torch.no_grad():
            for p in decoder_layers(lm.model).parameters():
                p.zero_()
        raise RuntimeError("mid-run")
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_methods_that_need_no_statistics_do_not_compute_them(monkeypatch):
    """AWQ, the random rotations and RTN quantize without H or F: run_wquant computed a full calibration pass for
    them only to report a calibration output error."""
    import atlas_core.wquant.experiment as experiment

    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(0)
    calib, held_out = (torch.randint(4, 200, (n, 32), generator=gen) for n in (4, 2))
    calls = []
    real = experiment.calibration_stats
    monkeypatch.setattr(experiment, "calibration_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    for method in ("rtn", "awq", "rot-haar", "rot-hadamard"):
        run_wquant(lm, method, WQuantSpec(bits=3), calib, held_out)
    assert calls == []
    run_wquant(lm, "rot-fisher", WQuantSpec(bits=3), calib, held_out)
    assert calls == [1]


def test_runset_finds_each_run_by_method_bits_and_group():
    from atlas_core.wquant.experiment import RunSet

    runs = [{"method": m, "bits": b, "group": g, "nll": torch.full((2, 3), float(i)), "ppl": {"value": float(i)}}
            for i, (m, b, g) in enumerate([("rtn", 4, None), ("rtn", 4, 32), ("gptq", 4, None), ("rtn", 3, None)])]
    swept = RunSet(tuple(runs))
    assert swept.get("rtn", 4, 32) is runs[1] and swept.ppl("gptq", 4) == 2.0 and swept.nll("rtn", 3)[0, 0] == 3.0
    with pytest.raises(ValueError, match="no run of awq at 4 bits"):
        swept.get("awq", 4)
    with pytest.raises(ValueError, match="measured twice"):
        RunSet(tuple(runs + [runs[0]]))


def test_best_across_names_each_outcome_once():
    # before: "the best method is awq at 4 bits and awq at 3 bits"
    from atlas_core.wquant.experiment import best_across, label

    assert best_across({4: ("awq", []), 3: ("awq", [])}) == "AWQ at both 3 and 4 bits"
    assert best_across({4: ("awq", []), 3: ("gptq", [])}) == "AWQ at 4 bits and GPTQ at 3 bits"
    assert best_across({3: ("rot-fisher", [])}) == "Fisher rotation at 3 bits"
    three = best_across({8: ("rtn", ["awq"]), 4: ("rtn", ["awq"]), 3: ("rtn", ["awq"])})
    assert three == f"RTN (AWQ {TIE} from it) at 3, 4 and 8 bits"
    # the same best with different ties is a different outcome, named apart
    assert best_across({4: ("awq", ["gptq"]), 3: ("awq", [])}) == f"AWQ (GPTQ {TIE} from it) at 4 bits and AWQ at 3 bits"
    assert label("nqp-scaled") == "NQP λ-scaled" and label("mystery") == "mystery"
    with pytest.raises(ValueError, match="at least one"):
        best_across({})
