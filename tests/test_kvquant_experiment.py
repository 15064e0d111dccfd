"""KVMethod settings, baselines, and the compare protocol on a toy model."""

import math

import pytest
import torch

from atlas_core.cli import main
from atlas_core.kvquant.experiment import KVMethod, compare, evaluate
from atlas_core.models import load_model


@pytest.mark.parametrize(
    "kwargs, message",
    [({"method": "nope"}, "method"), ({"method": "kivi", "control": "wrong-sign"}, "headq only"),
     ({"kbits": 0}, "kbits"), ({"vbits": 12}, "vbits"), ({"method": "headq", "rank": 0}, "rank"),
     ({"method": "headq", "base": "fp"}, "base"), ({"method": "kivi", "residual": 40}, "multiple of --group")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVMethod(**kwargs)


def test_configs_baselines_and_canonical_keys():
    assert KVMethod("fp").kv_config() is None and KVMethod("fp").baseline() is None
    kivi = KVMethod("kivi", 2, 2, group=16).kv_config()
    assert kivi.key.axis == "channel" and kivi.value.axis == "token" and kivi.key.group == 16
    assert KVMethod("per-token", 3).kv_config().value is None  # vbits 16: dense values
    hq = KVMethod("headq", 2, rank=4, control="key-pca")
    assert hq.baseline() == KVMethod("per-token", 2) and hq.baseline().kv_config() == hq.kv_config()
    assert KVMethod("per-token", 2, rank=3).canonical() == KVMethod("per-token", 2)
    assert KVMethod("headq", 2, seed=5).canonical() == KVMethod("headq", 2)
    assert KVMethod("headq", 2, control="random-basis", seed=5).canonical().seed == 5
    assert hq.label() == "headq K2 dense V g32 r4b4 (key-pca)"
    on_kivi = KVMethod("headq", 2, base="kivi")
    assert on_kivi.kv_config().key.axis == "channel" and on_kivi.baseline() == KVMethod("kivi", 2)
    assert on_kivi.label().endswith("on kivi") and KVMethod("kivi", 2, base="kivi").canonical() == KVMethod("kivi", 2)



def test_kivi_is_kivis_rule_and_per_channel_is_ours():
    kivi, ours = KVMethod("kivi", 2, 2), KVMethod("per-channel", 2, 2)
    assert kivi.residual == 32 and kivi == KVMethod("kivi", 2, 2, residual=32) and ours.residual == 0  # R defaults to g
    assert kivi.kv_config().residual_rule == "kivi" and ours.kv_config().residual_rule == "recent"
    assert kivi.kv_config().key == ours.kv_config().key and kivi.kv_config().key.axis == "channel"
    assert kivi.label() == "kivi K2 V2 g32 R32" and KVMethod("kivi", 2, group=16).residual == 16
    assert kivi.baseline() == KVMethod("per-token", 2, 2, residual=32) and ours.baseline() == KVMethod("per-token", 2, 2)
    on = KVMethod("headq", 2, base="per-channel")
    assert on.kv_config().residual_rule == "recent" and on.baseline() == KVMethod("per-channel", 2)
    assert KVMethod("headq", 2, base="kivi").kv_config().residual_rule == "kivi"


def test_compare_reports_fp_baseline_and_fraction():
    lm = load_model("toy-llama")
    gen = torch.Generator().manual_seed(0)
    ids, calib = torch.randint(4, 260, (2, 40), generator=gen), torch.randint(4, 260, (2, 40), generator=gen)
    r = compare(lm, ids, KVMethod("headq", 2, group=16, rank=4), calib, prefill=8)
    assert r["baseline"]["label"].startswith("per-token K2")
    base, fp, hq = r["baseline"]["ppl"], r["fp"]["ppl"], r["method"]["ppl"]
    assert r["excess_removed"] == pytest.approx((base - hq) / (base - fp))
    assert r["method"]["bits_key"] > r["baseline"]["bits_key"] and r["fp"]["bits_key"] == 32.0  # measured: fp32 held
    assert compare(lm, ids, KVMethod("per-token", 2, group=16), prefill=8)["excess_removed"] is None
    with pytest.raises(ValueError, match="calibration"):
        compare(lm, ids, KVMethod("headq"), None, prefill=8)


def test_pre_rope_runs_on_rope_models_and_is_refused_on_gpt2():
    ids = torch.randint(4, 260, (1, 24), generator=torch.Generator().manual_seed(1))
    r = evaluate(load_model("toy-qwen2"), ids, KVMethod("kivi", 2, group=8, pre_rope=True), prefill=8)
    assert math.isfinite(r["ppl"]) and r["label"].endswith("pre-RoPE")
    with pytest.raises(ValueError, match="no RoPE"):
        evaluate(load_model("toy-gpt2"), ids, KVMethod("kivi", 2, group=8, pre_rope=True), prefill=8)


def test_cli_kvquant_json(capsys):
    args = ["kvquant", "--model", "toy-llama", "--corpus", "pydoc", "--method", "headq", "--tokens", "128",
            "--seq-len", "64", "--prefill", "16", "--group", "16", "--rank", "4", "--calib-tokens", "128", "--json"]
    assert main(args) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["tokens"] == 128 and out["baseline"].startswith("per-token") and 0 < out["bits_key"] < 16
    assert out["ppl_fp"] > 0 and out["excess_removed"] is not None


@pytest.mark.parametrize(
    "args, message",
    [(["--method", "kivi", "--control", "wrong-sign"], "headq only"), (["--kbits", "9"], "kbits"),
     (["--tokens", "10"], "--tokens"), (["--prefill", "600"], "--prefill")],
)
def test_cli_kvquant_bad_input_exits_2(args, message, capsys):
    assert main(["kvquant", "--model", "toy-llama", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_headq_beats_its_base_and_wrong_sign_hurts(smollm2):
    from atlas_core.corpus import BlockSpec, token_blocks

    spec = smollm2.spec
    ids = token_blocks(smollm2.tokenizer, BlockSpec("britannica", 192, 1, "eval", spec.add_bos))
    calib = token_blocks(smollm2.tokenizer, BlockSpec("britannica", 256, 2, "calib", spec.add_bos))
    r = compare(smollm2, ids, KVMethod("headq", 2), calib, prefill=64)
    wrong = compare(smollm2, ids, KVMethod("headq", 2, control="wrong-sign"), calib, prefill=64)
    assert r["fp"]["ppl"] < r["method"]["ppl"] < r["baseline"]["ppl"] < wrong["method"]["ppl"]
    assert r["method"]["bits_key"] == pytest.approx(4.0)  # 2 + 32/32 + (8·4 + 32)/64
