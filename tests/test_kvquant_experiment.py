"""KVMethod settings, baselines, and the compare protocol on a toy model."""

import math

import numpy as np
import pytest
import torch

from atlas_core.book.cli import main
from atlas_core import interval
from atlas_core.claims import removal_verdict
from atlas_core.kvquant.experiment import EvalSetup, KVMethod, Runs, compare, evaluate, side_code
from atlas_core.models import load_model

DECODE = EvalSetup(engine="decode", prefill=8, batch=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"method": "nope"}, "method"), ({"method": "kivi", "control": "wrong-sign"}, "headq only"),
     ({"kbits": 0}, "kbits"), ({"vbits": 12}, "vbits"), ({"method": "headq", "rank": 0}, "rank"),
     ({"kbits": 2.5}, "kbits must be an integer"), ({"kbits": True}, "kbits"), ({"vbits": 16}, "vbits"),  # 16 no longer means dense
     ({"side_bits": 9}, "side_bits"), ({"group": 0}, "group"), ({"group": 8.0}, "group"), ({"seed": -1}, "seed"),
     ({"method": "headq", "base": "fp"}, "base"), ({"method": "kivi", "residual": 40}, "multiple of --group")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVMethod(**kwargs)


def test_settings_are_keyword_only():
    with pytest.raises(TypeError):
        KVMethod("per-token", 2)  # noqa: the positional form is gone: eleven fields were easy to misplace


def test_the_head_width_rules():
    KVMethod(method="headq", rank=64, group=32).check_head(64)  # a per-token group wider than the head takes the head
    KVMethod(method="per-token", group=128).check_head(64)
    with pytest.raises(ValueError, match="rank .65. must be at most d_head .64."):
        KVMethod(method="headq", rank=65).check_head(64)
    with pytest.raises(ValueError, match="does not divide d_head=64"):
        KVMethod(method="per-token", group=48).check_head(64)
    with pytest.raises(ValueError, match="does not divide d_head=64"):
        KVMethod(method="kivi", vbits=2, group=48).check_head(64)  # KIVI's values are per token
    KVMethod(method="kivi", group=48).check_head(64)  # KIVI's keys group tokens, not channels
    KVMethod(method="fp").check_head(64)


def test_configs_baselines_and_canonical_keys():
    assert KVMethod(method="fp").kv_config() is None and KVMethod(method="fp").baseline() is None
    kivi = KVMethod(method="kivi", kbits=2, vbits=2, group=16).kv_config()
    assert kivi.key.axis == "channel" and kivi.value.axis == "token" and kivi.key.group == 16
    assert KVMethod(method="per-token", kbits=3).kv_config().value is None  # vbits None: dense values, as in KVQuantConfig
    hq = KVMethod(method="headq", kbits=2, rank=4, control="key-pca")
    assert hq.baseline() == KVMethod(method="per-token", kbits=2) and hq.baseline().kv_config() == hq.kv_config()
    assert KVMethod(method="per-token", kbits=2, rank=3).canonical() == KVMethod(method="per-token", kbits=2)
    assert KVMethod(method="headq", kbits=2, seed=5).canonical() == KVMethod(method="headq", kbits=2)
    assert KVMethod(method="headq", kbits=2, control="random-basis", seed=5).canonical().seed == 5
    assert hq.label() == "headq K2 dense V g32 r4b4 (key-pca)"
    on_kivi = KVMethod(method="headq", kbits=2, base="kivi")
    assert on_kivi.kv_config().key.axis == "channel" and on_kivi.baseline() == KVMethod(method="kivi", kbits=2)
    assert on_kivi.label().endswith("on kivi") and KVMethod(method="kivi", kbits=2, base="kivi").canonical() == KVMethod(method="kivi", kbits=2)



def test_kivi_is_kivis_rule_and_per_channel_is_ours():
    kivi, ours = KVMethod(method="kivi", kbits=2, vbits=2), KVMethod(method="per-channel", kbits=2, vbits=2)
    assert kivi.residual == 32 and kivi == KVMethod(method="kivi", kbits=2, vbits=2, residual=32) and ours.residual == 0  # R defaults to g
    assert kivi.kv_config().residual_rule == "kivi" and ours.kv_config().residual_rule == "recent"
    assert kivi.kv_config().key == ours.kv_config().key and kivi.kv_config().key.axis == "channel"
    assert kivi.label() == "kivi K2 V2 g32 R32" and KVMethod(method="kivi", kbits=2, group=16).residual == 16
    assert kivi.baseline() == KVMethod(method="per-token", kbits=2, vbits=2, residual=32) and ours.baseline() == KVMethod(method="per-token", kbits=2, vbits=2)
    on = KVMethod(method="headq", kbits=2, base="per-channel")
    assert on.kv_config().residual_rule == "recent" and on.baseline() == KVMethod(method="per-channel", kbits=2)
    assert KVMethod(method="headq", kbits=2, base="kivi").kv_config().residual_rule == "kivi"


def test_compare_reports_fp_baseline_and_fraction_with_intervals():
    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(0)
    ids, calib = torch.randint(4, 260, (3, 40), generator=gen), torch.randint(4, 260, (2, 40), generator=gen)
    r = compare(lm, ids, KVMethod(method="headq", kbits=2, group=16, rank=4), calib, DECODE)
    assert r["baseline"]["label"].startswith("per-token K2")
    assert r["method"]["nll"].shape == (3, 40 - 8 - 1)  # per block, per scored token
    f = r["figures"]
    base, fp, hq = f["ppl_baseline"].value, f["ppl_fp"].value, f["ppl"].value
    expected = (base - hq) / (base - fp) if base > fp else math.nan  # a base below fp has no excess to remove
    assert f["excess_removed"].value == pytest.approx(expected, nan_ok=True)
    assert f["difference_baseline"].value == pytest.approx(hq - base) and f["ratio_fp"].value == pytest.approx(hq / fp)
    assert hq == pytest.approx(math.exp(r["method"]["nll"].mean().item()))
    assert all(e.units == 3 for e in f.values())
    assert all(e.lo <= e.value <= e.hi for name, e in f.items() if name != "excess_removed")  # the toy's base may beat fp
    paired = interval.excess_removed(r["baseline"]["nll"], r["method"]["nll"], r["fp"]["nll"])  # same blocks, one draw
    np.testing.assert_equal(f["excess_removed"].as_dict(), paired.as_dict())  # NaN bounds compare equal here
    assert r["verdict"] == removal_verdict(f["excess_removed"], f["difference_baseline"]).text
    assert r["method"]["bits_key"] > r["baseline"]["bits_key"] and r["fp"]["bits_key"] == 32.0  # measured: fp32 held
    plain = compare(lm, ids, KVMethod(method="per-token", kbits=2, group=16), setup=DECODE)
    assert plain["verdict"] is None and "excess_removed" not in plain["figures"]
    with pytest.raises(ValueError, match="calibration"):
        compare(lm, ids, KVMethod(method="headq"), None, DECODE)


def test_batched_blocks_score_like_one_batch():
    lm = load_model("toy-qwen2")
    ids = torch.randint(4, 260, (3, 30), generator=torch.Generator().manual_seed(2))
    m = KVMethod(method="kivi", kbits=2, vbits=2, group=8)
    whole = evaluate(lm, ids, m, setup=EvalSetup(engine="decode", prefill=8, batch=3))
    split = evaluate(lm, ids, m, setup=EvalSetup(engine="decode", prefill=8, batch=2))
    torch.testing.assert_close(whole["nll"], split["nll"], atol=1e-5, rtol=1e-5)
    assert whole["bits_key"] == split["bits_key"] and whole["bits_value"] == split["bits_value"]


def test_runs_reuse_fp_and_calibration_and_match_fresh_side_codes(monkeypatch):
    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(3)
    ids, calib = torch.randint(4, 260, (2, 32), generator=gen), torch.randint(4, 260, (2, 32), generator=gen)
    runs = Runs(lm, ids, calib, DECODE)
    calls = []
    import atlas_core.kvquant.experiment as ex
    real = ex.query_covariances
    monkeypatch.setattr(ex, "query_covariances", lambda *a: calls.append(1) or real(*a))
    for r in (2, 4):
        m = KVMethod(method="headq", kbits=2, group=16, rank=r)
        runs.compare(m)
        fresh = evaluate(lm, ids, m, side_code(lm, m, calib), DECODE)  # calibrated at this rank alone
        torch.testing.assert_close(runs.nll(m), fresh["nll"])
    runs.compare(KVMethod(method="headq", kbits=2, group=16, rank=4, control="wrong-sign"))
    assert len(calls) == 1  # Σ_q once for every rank and the wrong-sign control
    assert KVMethod(method="fp") in runs.done and len(runs.done) == 5  # fp, per-token baseline, three HeadQ runs


def test_headq_needs_its_side_code_and_others_refuse_one():
    lm = load_model("toy-llama")
    ids = torch.randint(4, 260, (1, 24), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="side code"):
        evaluate(lm, ids, KVMethod(method="headq", kbits=2, group=16), None, DECODE)
    with pytest.raises(ValueError, match="engine"):
        EvalSetup(engine="fast")
    with pytest.raises(ValueError, match="batch"):
        EvalSetup(batch=0)
    assert EvalSetup().engine == "onepass"  # the default everywhere; decode is the reference


def test_pre_rope_runs_on_rope_models_and_is_refused_on_gpt2():
    ids = torch.randint(4, 260, (1, 24), generator=torch.Generator().manual_seed(1))
    r = evaluate(load_model("toy-qwen2"), ids, KVMethod(method="kivi", kbits=2, group=8, pre_rope=True), setup=DECODE)
    assert math.isfinite(r["ppl"].value) and r["label"].endswith("pre-RoPE")
    with pytest.raises(ValueError, match="no RoPE"):
        evaluate(load_model("toy-gpt2"), ids, KVMethod(method="kivi", kbits=2, group=8, pre_rope=True), setup=DECODE)


def test_cli_kvquant_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))  # the fp reference and Σ_q are kept on disk
    args = ["kvquant", "--model", "toy-llama", "--corpus", "pydoc", "--method", "headq", "--tokens", "128",
            "--seq-len", "64", "--prefill", "16", "--group", "16", "--rank", "4", "--calib-tokens", "128",
            "--engine", "decode", "--json"]
    assert main(args) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["tokens"] == 128 and out["blocks"] == 2 and out["scored_tokens"] == 2 * (64 - 16 - 1)
    assert out["baseline"].startswith("per-token") and 0 < out["bits_key"] < 16 and out["engine"] == "decode"
    for name in ("ppl", "ppl_fp", "ratio_fp", "ppl_baseline", "difference_baseline", "excess_removed"):
        assert set(out[name]) == {"value", "lo", "hi", "units"} and out[name]["units"] == 2
        assert name == "excess_removed" or out[name]["lo"] <= out[name]["value"] <= out[name]["hi"]  # toy: base ≈ fp
    assert out["ppl_fp"]["value"] > 0 and isinstance(out["verdict"], str)
    kept = sorted(p.name.split("-")[0] for p in (tmp_path / "kvquant").glob("*.pt"))
    assert kept == ["eval", "eval", "fp", "sigma"]  # HeadQ's and its baseline's evaluations, fp's NLL, Σ_q
    again = main(args) == 0 and __import__("json").loads(capsys.readouterr().out)
    assert again["ppl_fp"] == out["ppl_fp"] and again["ppl"] == out["ppl"]  # read back


@pytest.mark.parametrize(
    "args, message",
    [(["--method", "kivi", "--control", "wrong-sign"], "headq only"), (["--kbits", "9"], "kbits"),
     (["--tokens", "10"], "--tokens"), (["--prefill", "600"], "--prefill"), (["--batch", "0"], "batch"),
     (["--a2-low", "2"], "A² value policy"), (["--vbits", "3", "--a2-low", "2", "--engine", "decode"], "onepass")],
)
def test_cli_kvquant_bad_input_exits_2(args, message, capsys):
    assert main(["kvquant", "--model", "toy-llama", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_headq_beats_its_base_and_wrong_sign_hurts(smollm2):
    from atlas_core.corpus import BlockSpec, token_blocks

    spec = smollm2.spec
    ids = token_blocks(smollm2, BlockSpec(corpus="britannica", seq_len=192, n_blocks=1, split="eval"))
    calib = token_blocks(smollm2, BlockSpec(corpus="britannica", seq_len=256, n_blocks=2, split="calib"))
    runs = Runs(smollm2, ids, calib, EvalSetup(prefill=64))
    r = runs.compare(KVMethod(method="headq", kbits=2))
    wrong = runs.compare(KVMethod(method="headq", kbits=2, control="wrong-sign"))
    assert r["fp"]["ppl"].value < r["method"]["ppl"].value < r["baseline"]["ppl"].value < wrong["method"]["ppl"].value
    assert r["method"]["bits_key"] == pytest.approx(4.0)  # 2 + 32/32 + (8·4 + 32)/64


def test_onepass_engine_equals_the_decode_reference_through_runs():
    lm = load_model("toy-qwen2")
    gen = torch.Generator().manual_seed(6)
    ids, calib = torch.randint(4, 260, (3, 40), generator=gen), torch.randint(4, 260, (2, 40), generator=gen)
    one, ref = Runs(lm, ids, calib, EvalSetup(engine="onepass", prefill=8, batch=2)), Runs(lm, ids, calib, DECODE)
    for m in (KVMethod(method="fp"), KVMethod(method="kivi", kbits=2, vbits=2, group=8), KVMethod(method="headq", kbits=2, vbits=3, group=8, rank=4)):
        torch.testing.assert_close(one.nll(m), ref.nll(m), atol=2e-4, rtol=0)
        assert one(m)["bits_key"] == ref(m)["bits_key"] and one(m)["bits_value"] == ref(m)["bits_value"]


def test_runs_computes_the_fp_prefill_once_and_shares_it(monkeypatch):
    """``Runs`` (one-pass) builds the blocks' fp prefill once for all its methods, and each method's NLL is
    what ``evaluate`` gives alone (the whole block in one pass, no shared prefill)."""
    import atlas_core.kvquant.experiment as experiment
    from atlas_core.kvquant import onepass

    lm = load_model("toy-gemma3")  # sliding window 8 < the 40-token blocks
    ids = torch.randint(4, 260, (3, 40), generator=torch.Generator().manual_seed(8))
    setup = EvalSetup(engine="onepass", prefill=8, batch=2)
    built = []
    monkeypatch.setattr(experiment, "prefill_caches", lambda *a: built.append(a[2:]) or onepass.prefill_caches(*a))
    runs = Runs(lm, ids, None, setup)
    for m in (KVMethod(method="kivi", kbits=2, vbits=2, group=8), KVMethod(method="per-token", kbits=3, vbits=2, group=8, residual=4), KVMethod(method="per-channel", kbits=2, vbits=2, group=8)):
        alone = evaluate(lm, ids, m, setup=setup)  # its own prefill: built inside onepass_nll, not counted
        torch.testing.assert_close(runs.nll(m), alone["nll"], atol=1e-6, rtol=0)
        assert runs(m)["bits_key"] == alone["bits_key"]
    assert built == [(8, 2)]


def test_a2_value_policy_is_measured_at_equal_payload_bits():
    m = KVMethod(method="per-token", kbits=2, vbits=3, group=8, a2_low=2)
    assert m.baseline() == KVMethod(method="per-token", kbits=2, vbits=3, group=8) and m.label().endswith("A²(2b/fp)")
    assert m.value_policy().low == 2 and KVMethod(method="kivi", kbits=2, vbits=3).value_policy() is None
    for bad in ({"vbits": None}, {"a2_low": 3}, {"method": "fp"}):
        with pytest.raises(ValueError, match="A² value policy"):
            KVMethod(**({"method": "per-token", "kbits": 2, "vbits": 3, "a2_low": 2} | bad))
    lm = load_model("toy-llama")
    ids = torch.randint(4, 260, (2, 40), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="onepass"):
        evaluate(lm, ids, m, setup=DECODE)
    runs = Runs(lm, ids, None, EvalSetup(engine="onepass", prefill=8))
    r = runs.compare(m)
    assert r["baseline"]["label"] == KVMethod(method="per-token", kbits=2, vbits=3, group=8).label()
    assert r["method"]["value_payload"] <= 3 and r["baseline"]["value_payload"] == 3  # never above the uniform budget
    assert r["method"]["bits_value"] == r["baseline"]["bits_value"]  # the cache's bytes: the same layout


def test_store_keeps_fp_and_sigma_q_on_disk_keyed_by_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(8)
    ids, calib = torch.randint(4, 260, (2, 32), generator=gen), torch.randint(4, 260, (2, 32), generator=gen)
    first = Runs(lm, ids, calib, DECODE, store=True)
    fp, sigma = first.nll(KVMethod(method="fp")), first.sigma_q()
    assert len(list((tmp_path / "kvquant").glob("*.pt"))) == 2
    import atlas_core.kvquant.experiment as ex
    monkeypatch.setattr(ex, "query_covariances", lambda *a: pytest.fail("Σ_q recomputed"))
    monkeypatch.setattr(ex, "evaluate", lambda *a, **k: pytest.fail("fp recomputed"))
    again = Runs(lm, ids, calib, DECODE, store=True)
    torch.testing.assert_close(again.nll(KVMethod(method="fp")), fp)
    torch.testing.assert_close(again.sigma_q()[0], sigma[0])
    assert again(KVMethod(method="fp"))["bits_key"] == first(KVMethod(method="fp"))["bits_key"]
    with torch.no_grad():  # other weights, other key: computed afresh
        next(lm.model.parameters()).add_(1.0)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        Runs(lm, ids, calib, DECODE, store=True).nll(KVMethod(method="fp"))


def test_store_keeps_each_evaluation_keyed_by_method_calibration_and_code(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(9)
    ids, calib = torch.randint(4, 260, (2, 32), generator=gen), torch.randint(4, 260, (2, 32), generator=gen)
    kivi, tc = KVMethod(method="kivi", kbits=2, group=8), KVMethod(method="query-tc", kbits=2, group=8)
    first = Runs(lm, ids, calib, DECODE, store=True)
    kept = {m: first(m) for m in (kivi, tc)}
    import atlas_core.kvquant.experiment as ex
    real_evaluate = ex.evaluate
    monkeypatch.setattr(ex, "evaluate", lambda *a, **k: pytest.fail("recomputed"))
    again = Runs(lm, ids, calib, DECODE, store=True)
    for m, r in kept.items():  # the same numbers, read back
        torch.testing.assert_close(again.nll(m), r["nll"])
        assert again(m)["bits_key"] == r["bits_key"] and again(m)["ppl"].as_dict() == r["ppl"].as_dict()
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # another method: computed afresh
        again(KVMethod(method="kivi", kbits=3, group=8))
    other_calib = torch.randint(4, 260, (2, 32), generator=gen)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # another calibration: computed afresh
        Runs(lm, ids, other_calib, DECODE, store=True)(tc)
    monkeypatch.setattr(ex, "code_version", lambda: "another version of the code")
    with pytest.raises(pytest.fail.Exception, match="recomputed"):  # other kvquant code: computed afresh
        Runs(lm, ids, calib, DECODE, store=True)(kivi)
    monkeypatch.setattr(ex, "evaluate", real_evaluate)


def test_a_stored_sweep_fingerprints_the_weights_and_reads_the_code_once(tmp_path, monkeypatch, count_calls):
    """A sweep's lookups (fp, Σ_q, each method) share one weights fingerprint and one code version."""
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    import atlas_core.kvquant.experiment as ex
    from atlas_core import clouds

    weights, code = count_calls(clouds, "weights_fingerprint"), count_calls(ex, "code_version")
    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(10)
    ids, calib = torch.randint(4, 260, (2, 32), generator=gen), torch.randint(4, 260, (2, 32), generator=gen)
    runs = Runs(lm, ids, calib, DECODE, store=True)
    for m in (KVMethod(method="fp"), KVMethod(method="kivi", kbits=2, group=8), KVMethod(method="kivi", kbits=3, group=8)):
        runs(m)
    assert (weights["calls"], code["calls"]) == (1, 1)


def test_cli_kvquant_a2_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    args = ["kvquant", "--model", "toy-llama", "--corpus", "pydoc", "--method", "per-token", "--kbits", "2", "--vbits", "3",
            "--a2-low", "2", "--tokens", "128", "--seq-len", "64", "--prefill", "16", "--group", "16", "--json"]
    assert main(args) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["method"].endswith("A²(2b/fp)") and out["baseline"] == "per-token K2 V3 g16"
    assert 2 <= out["value_payload"] <= 3 and out["engine"] == "onepass"


def test_the_prefill_rule_lives_on_evalsetup():
    """One rule for the CLI and the chapter's pre-check: a block scores tokens prefill + 1 … T − 1."""
    EvalSetup(prefill=126).check_block(128)
    with pytest.raises(ValueError, match=r"--prefill \(127\) must be in 1..126 for --seq-len 128"):
        EvalSetup(prefill=127).check_block(128, ("--prefill", "--seq-len"))
