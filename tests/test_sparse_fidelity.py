import math

import pytest
import torch

from atlas_core.models import load_model
import dataclasses

from atlas_core import interval
from atlas_core.sparse.attention import MassLog, sparse_attention
from atlas_core.sparse.blocks import block_rule
from atlas_core.sparse.fidelity import (MODEL_FIGURES, agreement, common_positions, compare_rules, dense_continuation,
                                        fidelity_report, fidelity_texts, greedy, greedy_survival, greedy_survival_reference,
                                        identical_count, model_rows, survival_summary, teacher_forced,
                                        teacher_forced_rules, token_kl, trajectory_agreement)
from atlas_core.sparse.kept import SparseConfig


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Cached dense continuations go to a fresh directory per test."""
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))


def test_agreement_known_answers():
    a = torch.tensor([1, 2, 3, 4])
    same, other = agreement(a, a), agreement(a, torch.tensor([1, 2, 9, 4]))
    assert same.pop("matches").tolist() == [True] * 4 and other.pop("matches").tolist() == [True, True, False, True]
    assert same == {"agree": 1.0, "first_divergence": None, "identical_prefix": 4}
    assert other == {"agree": 0.75, "first_divergence": 2, "identical_prefix": 2}
    with pytest.raises(ValueError, match="length"):
        agreement(a, a[:3])


@pytest.fixture(scope="module")
def qwen_toy():
    return load_model("toy-qwen2")


def _prompt(n, seed=0):
    return torch.randint(4, 200, (n,), generator=torch.Generator().manual_seed(seed))


def test_teacher_forced_dense_perplexity_is_the_models_own(qwen_toy):
    from atlas_core.eval import perplexity

    blocks = torch.stack([_prompt(40, 1), _prompt(40, 2)])
    r = teacher_forced(qwen_toy, blocks, SparseConfig(anchors=1, window=8, topk=20))
    assert r["ppl_dense"] == pytest.approx(perplexity(qwen_toy.model, blocks, progress=False), rel=1e-6)
    assert r["ppl_sparse"] != r["ppl_dense"]


def test_teacher_forced_counts_positions_past_the_budget(qwen_toy):
    cfg = SparseConfig(anchors=1, window=3, topk=2)
    r = teacher_forced(qwen_toy, torch.stack([_prompt(40, 1)]), cfg)
    assert r["positions"] == 39 - cfg.budget
    assert r["kl"] > 0 and r["mass"]["discarded"].mean() > 0
    with pytest.raises(ValueError, match="too short"):
        teacher_forced(qwen_toy, torch.stack([_prompt(6)]), cfg)


def test_trajectory_check_finds_greedy_first_divergence(qwen_toy):
    prompt = _prompt(30)
    dense = greedy(qwen_toy, prompt, 25)
    for cfg in (SparseConfig(anchors=1, window=3, topk=2), SparseConfig(anchors=1, window=6, topk=4), SparseConfig(anchors=1, window=2, topk=0)):
        sparse = greedy(qwen_toy, prompt, 25, cfg)
        assert trajectory_agreement(qwen_toy, prompt, dense, cfg)["first_divergence"] == agreement(dense, sparse)["first_divergence"]


def test_greedy_is_deterministic_and_matches_across_backends(qwen_toy):
    prompt = _prompt(20)
    first = greedy(qwen_toy, prompt, 10)
    assert torch.equal(first, greedy(qwen_toy, prompt, 10))
    assert first.shape == (10,)
    with pytest.raises(ValueError, match="n_new"):
        greedy(qwen_toy, prompt, 0)


def test_fidelity_report_fields(qwen_toy):
    r = fidelity_report(qwen_toy, SparseConfig(anchors=1, window=3, topk=2), _prompt(20), 5, torch.stack([_prompt(30, 3), _prompt(30, 4)]))
    assert set(r) >= {"step_agreement", "first_divergence", "top1_agree", "kl", "ppl_change", "discarded",
                      "kl_lo", "kl_hi", "ppl_change_lo", "top1_agree_hi", "discarded_lo", "tf_blocks"}
    assert 0 <= r["step_agreement"] <= 1 and 0 < r["discarded"] < 1
    for name in ("kl", "top1_agree", "ppl_change", "discarded"):
        assert r[f"{name}_lo"] <= r[name] <= r[f"{name}_hi"]


# --- one pass against free-running decoding ------------------------------------------------------------


def _narrow_rules():
    return {"dense": None, "exact": SparseConfig(anchors=1, window=4, topk=4), "exact, head-averaged": SparseConfig(anchors=1, window=4, topk=2, head_average=True),
            "pages": SparseConfig(anchors=1, window=4, topk=4, selector="pages", page_size=2),
            "blocks": SparseConfig(anchors=1, window=4, topk=4, selector="blocks-mean-kv", page_size=2)}


@torch.no_grad()
def test_one_pass_survival_equals_free_running_decoding(toy_lm):
    """Every family (GQA, MQA, sliding windows): the one-pass first divergence is the free-running one.

    Float ties: the one pass adds in another order than step-by-step decoding, so a step whose two best
    logits differ by rounding could go either way. The models run in float64 here, where rounding
    (~1e-16) is far below any logit gap of a random model, so the two must agree exactly.
    """
    toy_lm.model.double()
    prompts = torch.stack([_prompt(30, s) for s in (11, 12, 13)])
    fast = greedy_survival(toy_lm, prompts, _narrow_rules(), n_new=24)
    slow = greedy_survival_reference(toy_lm, prompts, _narrow_rules(), n_new=24)
    assert fast == slow
    assert fast["dense"] == [None] * 3
    if toy_lm.spec.family != "gpt2":  # the toy GPT-2 keeps its greedy tokens under every rule here
        assert any(d is not None and d > 1 for name in fast for d in fast[name])  # divergences past the first step


@torch.no_grad()
def test_dense_prefill_rule_is_dense_before_sparse_from_and_matches_greedy(qwen_toy):
    """``sparse_from``: queries before it are eager attention bit for bit; the one-pass trajectory with a
    dense prefill finds the first divergence of free-running decoding after a dense prefill."""
    model = qwen_toy.model.double()
    x = _prompt(40, 5)[None]
    ref = model(x).logits
    cfg = SparseConfig(anchors=1, window=2, topk=2, sparse_from=25)
    log = MassLog()
    with sparse_attention(model, cfg, log):
        out = model(x).logits
    assert torch.equal(out[:, :25], ref[:, :25])
    assert not torch.allclose(out[:, 25:], ref[:, 25:], atol=1e-6)
    assert log.counts[0] == 40 - 25  # only the sparse queries are logged
    prompt = _prompt(30, 6)
    dense = greedy(qwen_toy, prompt, 20)
    for rule in (SparseConfig(anchors=1, window=2, topk=2), SparseConfig(anchors=1, window=3, topk=1), SparseConfig(anchors=1, window=2, topk=4, selector="blocks-mean", page_size=2)):
        free = greedy(qwen_toy, prompt, 20, dataclasses.replace(rule, sparse_from=len(prompt)))
        assert (trajectory_agreement(qwen_toy, prompt, dense, rule, dense_prefill=True)["first_divergence"]
                == agreement(dense, free)["first_divergence"])
    with pytest.raises(ValueError, match="sparse_from"):
        SparseConfig(sparse_from=-1)


def test_dense_continuation_is_cached_on_disk(qwen_toy, tmp_path, monkeypatch):
    import atlas_core.sparse.fidelity as fid
    from atlas_core.cache import cache_dir

    prompt = _prompt(20, 7)
    first = dense_continuation(qwen_toy, prompt, 6)
    assert torch.equal(first, greedy(qwen_toy, prompt, 6))
    files = list(cache_dir("sparse", "continuations").glob("*.pt"))
    assert len(files) == 1
    calls = []
    real = fid.greedy
    monkeypatch.setattr(fid, "greedy", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert torch.equal(dense_continuation(qwen_toy, prompt, 6), first) and calls == []  # read back, not recomputed
    dense_continuation(qwen_toy, prompt, 7)
    assert calls == [7]  # n_new in the key (a damaged file is rebuilt: tests/test_cache.py)


# --- teacher forcing with intervals --------------------------------------------------------------------


def test_teacher_forced_rules_share_the_dense_pass_and_give_per_block_values(qwen_toy, monkeypatch):
    import atlas_core.sparse.fidelity as fid

    blocks = torch.stack([_prompt(40, s) for s in range(5)])
    cfgs = [SparseConfig(anchors=1, window=3, topk=2), SparseConfig(anchors=1, window=8, topk=8), SparseConfig(anchors=1, window=3, topk=2, selector="pages", page_size=2)]
    dense_calls = []
    real = fid._block_logprobs

    def counting(lm, block):
        if lm.model.config._attn_implementation != "atlas_sparse":
            dense_calls.append(1)
        return real(lm, block)

    monkeypatch.setattr(fid, "_block_logprobs", counting)
    together = teacher_forced_rules(qwen_toy, blocks, cfgs)
    assert len(dense_calls) == len(blocks)  # one dense pass per block, whatever the number of rules
    for cfg, r in zip(cfgs, together):
        alone = teacher_forced(qwen_toy, blocks, cfg)
        for name in ("kl", "top1_agree", "nll_sparse", "discarded"):
            for a, b in zip(r["per_block"][name], alone["per_block"][name]):
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        assert r["blocks"] == 5 and r["positions"] == 5 * (39 - cfg.budget)
        assert torch.isnan(r["per_block"]["kl"][0][:cfg.budget]).all()
        for name in ("kl", "top1_agree", "ppl_dense", "ppl_sparse", "ppl_change", "discarded"):
            assert r[f"{name}_lo"] <= r[name] <= r[f"{name}_hi"], name
        assert r["kl"] == pytest.approx(interval.mean(r["per_block"]["kl"]).value)
        assert r["ppl_change"] == pytest.approx(r["ppl_sparse"] / r["ppl_dense"] - 1)
        assert r["discarded"] == pytest.approx(r["mass"]["discarded"].mean().item(), rel=1e-5)
        parts = ("fixed", "selected", "discarded") + (("index_recall", "mass_recall") if cfg.selector == "pages" else ())
        for name in parts:  # every mass figure carries its block-bootstrap interval
            assert r[f"{name}_lo"] <= r[name] <= r[f"{name}_hi"], name
            assert r[name] == pytest.approx(r["mass"][name].mean().item(), rel=1e-5), name  # equal heads per layer
        assert r["fixed"] + r["selected"] + r["discarded"] == pytest.approx(1, abs=1e-6)
        from atlas_core.sparse.fidelity import block_discarded

        m = block_discarded(r["log"])  # (block, layer · head · query)
        assert m.shape[0] == 5 and m.mean() == pytest.approx(r["discarded"], rel=1e-6)


def _same_result(a: dict, b: dict) -> None:
    """Two ``teacher_forced_rules`` results hold the same numbers (figures, per-block values, the mass log)."""
    for name in ("kl", "top1_agree", "ppl_change", "discarded", "fixed", "selected"):
        for suffix in ("", "_lo", "_hi"):
            assert a[name + suffix] == pytest.approx(b[name + suffix], rel=1e-12, abs=1e-15), name + suffix
    for name in ("kl", "top1_agree", "nll_sparse", "nll_dense", "discarded"):
        for x, y in zip(a["per_block"][name], b["per_block"][name], strict=True):
            assert torch.equal(x.isnan(), y.isnan()) and torch.allclose(x.nan_to_num(), y.nan_to_num(), rtol=1e-12, atol=0)
    for name in a["mass"]:
        assert torch.allclose(a["mass"][name], b["mass"][name], rtol=1e-6)
    for layer in a["log"].discarded:
        assert torch.equal(a["log"].discarded_values(layer), b["log"].discarded_values(layer))
    assert a["blocks"] == b["blocks"] and a["positions"] == b["positions"]


def test_stored_passes_give_the_same_numbers_and_skip_the_model(qwen_toy, monkeypatch):
    """teacher_forced_rules(store=True): the first run stores every (rule, block) pass and each block's dense NLL;
    a rerun (or a run resumed after an interruption) reads them, runs no forward pass, and gives the numbers of an
    unstored run; another rule, other tokens or other code run afresh."""
    import atlas_core.sparse.fidelity as fid

    blocks = torch.stack([_prompt(40, s) for s in range(3)])
    cfgs = [SparseConfig(anchors=1, window=3, topk=2), SparseConfig(anchors=1, window=3, topk=2, selector="pages", page_size=2),
            SparseConfig(anchors=1, window=8, topk=0, selector="certified", eps=1e-2, bound="minmax", page_size=4)]
    plain = teacher_forced_rules(qwen_toy, blocks, cfgs, n_blocks=[3, 2, 3])
    calls = []
    real = fid._block_logprobs
    monkeypatch.setattr(fid, "_block_logprobs", lambda lm, block: calls.append(1) or real(lm, block))
    first = teacher_forced_rules(qwen_toy, blocks[:2], cfgs, n_blocks=[2, 2, 2], store=True)  # interrupted after 2 blocks
    assert len(calls) == 2 + 6  # a dense pass per block, one pass per (rule, block)
    calls.clear()
    resumed = teacher_forced_rules(qwen_toy, blocks, cfgs, n_blocks=[3, 2, 3], store=True)
    assert len(calls) == 1 + 2  # only the third block: its dense pass and the two rules scored on it
    calls.clear()
    again = teacher_forced_rules(qwen_toy, blocks, cfgs, n_blocks=[3, 2, 3], store=True)
    assert calls == []  # nothing left to run
    for a, b, c in zip(plain, resumed, again):
        _same_result(a, b), _same_result(a, c)
    assert first[2]["log"].certificate_values(0).shape[1] > 0
    monkeypatch.setattr(fid, "code_version", lambda: "edited")
    teacher_forced_rules(qwen_toy, blocks[:1], cfgs[:1], store=True)
    assert len(calls) == 2  # other code: the dense pass and the rule run again


def test_stored_survival_and_trajectories_equal_the_unstored(toy_lm, monkeypatch):
    import atlas_core.sparse.fidelity as fid

    monkeypatch.setattr(fid, "code_version", lambda: "v")  # fixed, so that the patch below does not change the key
    prompts = torch.stack([_prompt(24, s) for s in range(2)])
    rules = _narrow_rules()
    plain = greedy_survival(toy_lm, prompts, rules, n_new=12)
    assert greedy_survival(toy_lm, prompts, rules, n_new=12, store=True) == plain
    monkeypatch.setattr(fid, "_survival_block", lambda *a, **k: pytest.fail("a stored survival run was recomputed"))
    assert greedy_survival(toy_lm, prompts, rules, n_new=12, store=True) == plain
    dense = dense_continuation(toy_lm, prompts[0], 10)
    cfg = next(c for c in rules.values() if c is not None)
    a = fid._trajectory(toy_lm, prompts[0], dense, cfg, fid._store_for(toy_lm))
    b = fid._trajectory(toy_lm, prompts[0], dense, cfg, fid._store_for(toy_lm))
    c = trajectory_agreement(toy_lm, prompts[0], dense, cfg)
    assert a["agree"] == b["agree"] == c["agree"] and (a["matches"] == c["matches"]).all() and (b["matches"] == c["matches"]).all()


def test_a_stored_call_fingerprints_the_weights_and_reads_the_code_once(qwen_toy, count_calls):
    """Every (rule, block) lookup shares one key base: not a pass over the parameters per lookup."""
    import atlas_core.sparse.fidelity as fid
    from atlas_core import clouds

    weights, code = count_calls(clouds, "weights_fingerprint"), count_calls(fid, "code_version")
    blocks = torch.stack([_prompt(40, s) for s in range(3)])
    cfgs = [SparseConfig(anchors=1, window=3, topk=2), SparseConfig(anchors=1, window=8, topk=8)]
    teacher_forced_rules(qwen_toy, blocks, cfgs, store=True)  # 3 dense + 6 rule lookups
    assert (weights["calls"], code["calls"]) == (1, 1)


def test_a_rule_on_fewer_blocks_is_the_rule_run_on_those_blocks(qwen_toy):
    blocks = torch.stack([_prompt(40, s) for s in range(4)])
    cfgs = [SparseConfig(anchors=1, window=3, topk=2), SparseConfig(anchors=1, window=8, topk=8)]
    short, full = teacher_forced_rules(qwen_toy, blocks, cfgs, n_blocks=[2, 4])
    alone = teacher_forced(qwen_toy, blocks[:2], cfgs[0])
    assert short["blocks"] == 2 and full["blocks"] == 4
    assert (short["kl"], short["ppl_dense"], short["kl_lo"]) == (alone["kl"], alone["ppl_dense"], alone["kl_lo"])
    with pytest.raises(ValueError, match="n_blocks"):
        teacher_forced_rules(qwen_toy, blocks, cfgs, n_blocks=[5, 1])


def test_compare_rules_says_when_the_difference_is_not_distinguishable():
    def result(kl_per_block):
        kl = [torch.tensor(v, dtype=torch.float64) for v in kl_per_block]
        return {"per_block": {"kl": kl, "nll_sparse": kl}}

    base = [[0.1, 0.2], [0.3, 0.1], [0.2, 0.2], [0.4, 0.3]]
    shifted = [[v + 0.5 for v in row] for row in base]
    noisy = [[0.1, 0.3], [0.2, 0.1], [0.3, 0.2], [0.3, 0.4]]  # +0.1, −0.1, ... around base
    lower = compare_rules(result(base), result(shifted), "kl", ("exact", "pages"))
    assert lower["distinguishable"] and lower["verdict"].startswith("exact has lower KL than pages (difference -0.5, 4 blocks)")  # no spread: the value alone
    same = compare_rules(result(base), result(noisy), "kl", ("a", "b"))
    assert not same["distinguishable"]
    assert same["verdict"].startswith("a and b are not distinguishable at this sample size in KL")
    ratio = compare_rules(result(shifted), result(base), "ppl", ("a", "b"))
    assert ratio["distinguishable"] and ratio["difference"].value == pytest.approx(math.exp(0.5))
    one = compare_rules(result(base[:1]), result(shifted[:1]), "kl", ("a", "b"))  # zero-width interval
    assert not one["distinguishable"] and "cannot be compared on one block" in one["verdict"]
    with pytest.raises(ValueError, match="measure"):
        compare_rules(result(base), result(base), "ppx")


def test_survival_summary_takes_its_intervals_from_the_interval_module():
    runs = [[None, 3], [5, 7], [None, None], [2, 9], [11, None]]
    s = survival_summary(runs, 16, seed=3)
    boot = interval.Bootstrap(seed=3)
    steps = [[16 if d is None else d for d in r] for r in runs]
    assert s["median_ci"] == (interval.median(steps, boot).lo, interval.median(steps, boot).hi)
    flags = [[d is None for d in r] for r in runs]
    assert s["identical_est"] == interval.share(flags, boot)


@pytest.mark.slow
@torch.no_grad()
def test_real_model_one_pass_survival_equals_free_running(smollm2):
    """smollm2-135m in fp32: the one-pass first divergence against free-running decoding.

    Float ties: in fp32 a step whose two best logits differ by less than the rounding of the two
    summation orders (~1e-5) could go either way. Such a step must be the one where the two disagree,
    and its top-2 gap must be that small; otherwise they must agree exactly.
    """
    from atlas_core.corpus import BlockSpec, token_blocks

    prompts = token_blocks(smollm2, BlockSpec(corpus="britannica", seq_len=256, n_blocks=4, split="eval"))
    rules = {"dense": None, "exact": SparseConfig(anchors=1, window=64, topk=32), "blocks": block_rule(97)}
    fast = greedy_survival(smollm2, prompts, rules, n_new=32)
    slow = greedy_survival_reference(smollm2, prompts, rules, n_new=32)
    for name, cfg in rules.items():
        for i, (a, b) in enumerate(zip(fast[name], slow[name])):
            if a == b:
                continue
            step = min(d for d in (a, b) if d is not None)  # the earlier one: a tie there, or a fault
            dense = dense_continuation(smollm2, prompts[i], 32)
            with sparse_attention(smollm2.model, dataclasses.replace(cfg, sparse_from=256)) if cfg else torch.no_grad():
                logits = smollm2.model(torch.cat([prompts[i], dense[:-1]])[None]).logits[0, 255 + step]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] < 1e-4, f"{name}, prompt {i}: one pass {a}, free-running {b}, not a tie"
    assert any(d is not None for d in fast["exact"] + fast["blocks"])


def test_common_positions_keep_what_both_rules_count():
    nan = math.nan
    a = [torch.tensor([nan, 1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([nan, 4.0, 5.0, 6.0], dtype=torch.float64)]
    b = [torch.tensor([nan, nan, 7.0, 8.0], dtype=torch.float64)]  # a larger budget, on the first block only
    ca, cb = common_positions(a, b)
    assert len(ca) == len(cb) == 1
    assert torch.equal(ca[0].isnan(), torch.tensor([True, True, False, False]))
    assert ca[0][2:].tolist() == [2.0, 3.0] and cb[0][2:].tolist() == [7.0, 8.0]
    # discarded mass is logged for counted queries only: suffixes of different lengths, aligned at the end
    ca, cb = common_positions([torch.tensor([1.0, 2.0, 3.0])], [torch.tensor([9.0, 8.0])])
    assert ca[0].tolist() == [2.0, 3.0] and cb[0].tolist() == [9.0, 8.0]


def test_compare_rules_pairs_rules_of_different_budgets_on_the_positions_both_count():
    # before: the page selector at 4k (budget a + W + 4k) against the source defaults (a + W + k) raised
    # "paired figures need the same tokens in every unit for every method (counts differ)" in the sparse chapter
    gen = torch.Generator().manual_seed(0)
    small = [torch.rand(12, generator=gen, dtype=torch.float64) for _ in range(4)]
    big = [torch.rand(12, generator=gen, dtype=torch.float64) + 1 for _ in range(3)]  # three blocks, from position 5
    for x in small:
        x[:2] = math.nan
    for x in big:
        x[:5] = math.nan
    res = compare_rules({"per_block": {"kl": big}}, {"per_block": {"kl": small}}, "kl", ("big", "small"))
    by_hand = interval.mean_difference(big, [x.clone().masked_fill(torch.arange(12) < 5, math.nan) for x in small[:3]])
    assert res["difference"] == by_hand and res["difference"].units == 3
    assert res["verdict"].startswith("big has higher KL than small")


def test_identical_count_reads_none_and_the_revisions_horizon():
    assert identical_count([None, 3, 128, 200, 127], horizon=128) == 3


def test_model_rows_label_each_rule_and_carry_its_figures(qwen_toy):
    blocks = torch.stack([_prompt(40, s) for s in range(2)])
    prompt = _prompt(24, 5)
    dense = dense_continuation(qwen_toy, prompt, 4)
    cfgs = [SparseConfig(anchors=1, window=3, topk=2), SparseConfig(anchors=1, window=3, topk=2, dense_layers=1)]
    rows = model_rows("toy", qwen_toy, cfgs, blocks, prompt, dense)
    assert [(r["model"], r["rule"], r["blocks"]) for r in rows] == [("toy", "every layer", 2), ("toy", "first 1 dense", 2)]
    alone = teacher_forced(qwen_toy, blocks, cfgs[1])
    assert set(rows[1]) == {"model", "rule", "blocks", *MODEL_FIGURES, "step_agree", "step_matches", "first_divergence"}
    assert rows[1]["step_matches"].shape == (4,) and rows[1]["step_matches"].mean() == rows[1]["step_agree"]
    assert (rows[1]["kl"], rows[1]["kl_lo"], rows[1]["discarded"]) == (alone["kl"], alone["kl_lo"], alone["discarded"])


def test_fidelity_texts_are_the_held_out_blocks_a_calibration_prompt_and_its_dense_continuation(qwen_toy):
    from atlas_core.corpus import BlockSpec, token_blocks

    blocks, prompt, dense = fidelity_texts(qwen_toy, corpus="britannica", seq_len=32, n_blocks=2, prompt_tokens=24,
                                           gen_tokens=5)
    bos = qwen_toy.spec.add_bos
    assert torch.equal(blocks, token_blocks(qwen_toy.tokenizer, BlockSpec(corpus="britannica", seq_len=32, n_blocks=2,
                                                                          split="eval", add_bos=bos)))
    calib = token_blocks(qwen_toy.tokenizer, BlockSpec(corpus="britannica", seq_len=24, n_blocks=1, split="calib", add_bos=bos))
    assert torch.equal(prompt, calib[0]) and torch.equal(dense, greedy(qwen_toy, prompt, 5))


@pytest.mark.parametrize("bins", [50, 4000])
def test_discarded_statistics_intervals_hold_their_exact_quantiles(bins):
    """Many similar blocks give a narrow interval; the binned quantiles of the draws must not miss the exact
    value by the binning's error (a toy run's 99th percentile fell outside its interval)."""
    import numpy as np

    from atlas_core.sparse.fidelity import discarded_statistics

    rng = np.random.default_rng(3)
    m = 10 ** rng.normal(-4.3, 0.2, size=(40, 2000))  # (block, value): every block alike, values inside a few bins
    st = discarded_statistics(m, 1e-7, interval.Bootstrap(n_resamples=300, seed=2), bins=bins)
    for name in ("median", "p99"):
        e = st[name]
        assert e.lo <= e.value <= e.hi, (name, e)
        assert e.hi / e.lo < 1.1  # still narrow: the scale moves the interval, it does not widen it


def test_discarded_statistics_values_are_exact_and_intervals_follow_the_drawn_blocks():
    import numpy as np

    from atlas_core.sparse.fidelity import discarded_statistics

    rng = np.random.default_rng(0)
    m = 10 ** rng.uniform(-10, -0.5, size=(6, 500))  # (block, value), spread over many decades
    m[0, :50] = 1e-9  # block 0 holds most of the negligible values
    boot = interval.Bootstrap(n_resamples=300, seed=1)
    st = discarded_statistics(m, 1e-7, boot)
    assert st["median"].value == np.quantile(m, 0.5) and st["p99"].value == np.quantile(m, 0.99)
    assert st["max"].value == m.max() and st["share_below"].value == (m < 1e-7).mean()
    idx = boot.draws(6)
    exact_median = np.array([np.quantile(m[i].ravel(), 0.5) for i in idx])  # the slow, plain way
    lo, hi = boot.interval(exact_median)
    assert st["median"].lo == pytest.approx(lo, rel=0.004) and st["median"].hi == pytest.approx(hi, rel=0.004)
    exact_p99 = np.array([np.quantile(m[i].ravel(), 0.99) for i in idx])
    # in the sparse tail (30 values above p99 per draw here) np.quantile interpolates between order statistics,
    # the histogram within a bin: the two agree to the gap between neighbouring values (millions in the chapter)
    assert (st["p99"].lo, st["p99"].hi) == pytest.approx(boot.interval(exact_p99), rel=0.02)
    exact_share = np.array([(m[i] < 1e-7).mean() for i in idx])
    assert (st["share_below"].lo, st["share_below"].hi) == pytest.approx(boot.interval(exact_share))
    assert st["max"].hi == m.max() and all(e.units == 6 for e in st.values())
    with pytest.raises(ValueError, match="at least"):
        discarded_statistics(m[:1], 1e-7)


def test_token_kl_is_never_negative_and_matches_the_definition():
    """KL(p ‖ q) = Σ p (log p − log q) ≥ 0; a sum that rounds below 0 where p = q to float precision reads 0."""
    gen = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(64, 50, generator=gen), -1)
    q = torch.log_softmax(torch.randn(64, 50, generator=gen), -1)
    want = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(token_kl(p, q), want, atol=1e-6)
    # The same distribution in two roundings: the raw sum goes below 0 at some positions, the KL does not.
    q_near = torch.log_softmax(p.double() + 1e-7 * torch.randn(64, 50, generator=gen, dtype=torch.float64), -1).float()
    raw = torch.nn.functional.kl_div(q_near, p, log_target=True, reduction="none").sum(-1)
    assert (raw < 0).any()
    kl = token_kl(p, q_near)
    assert (kl >= 0).all() and torch.equal(kl, raw.clamp_min(0))
