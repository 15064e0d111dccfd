"""Equal-bytes baselines of the certified rule and its calibration (atlas_core.sparse.certified_eval)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from atlas_core.models import load_model
from atlas_core.sparse.attention import MassLog
from atlas_core.sparse.certified_eval import (EQUAL_BYTES, calibration, candidate_pages, equal_bytes_is_dense,
                                               equal_bytes_rules,
                                              key_bytes_estimate, key_bytes_read)
from atlas_core.sparse.fidelity import teacher_forced_rules
from atlas_core.sparse.kept import SparseConfig

CERT = SparseConfig(selector="certified", anchors=1, window=64, topk=0, page_size=16, eps=1e-3, bound="minmax")


def test_equal_bytes_arithmetic_at_a_quarter_of_4k():
    """s = 1/4 of n = 4096 keys: K = 1024 keys' worth of bytes per query."""
    rules = equal_bytes_rules(CERT, 0.25, 4096, 64)
    assert tuple(rules) == EQUAL_BYTES
    window, source, quest = rules.values()
    assert (window.selector, window.anchors, window.window, window.topk) == ("exact", 1, 1023, 0)
    assert (source.selector, source.window, source.topk, source.budget) == ("exact", 64, 959, 1024)
    # Quest: C = ⌈(4096 − 64) / 16⌉ = 252 candidate pages, 2 keys' worth of summary each; the rest in pages of 16
    assert candidate_pages(quest, 4096) == 252
    assert (quest.selector, quest.window, quest.page_size) == ("pages", 64, 16)
    assert quest.topk == (1024 - 65 - 2 * 252) // 16 * 16 == 448
    assert key_bytes_read(window, 4096, 64) == 0.25
    assert 0.25 - 16 / 4096 < key_bytes_read(quest, 4096, 64) <= 0.25  # within one page of the share
    assert key_bytes_read(source, 4096, 64) == 1.0  # exact top-k ranks every key: equal kept keys, not bytes
    other = dataclasses.replace(CERT, eps=1e-4, bound="lowrank", dense_layers=2, sparse_from=7)
    for cfg, again in zip(rules.values(), equal_bytes_rules(other, 0.25, 4096, 64).values()):
        assert (again.dense_layers, again.sparse_from) == (2, 7)  # carried over; eps and bound are not
        assert again == dataclasses.replace(cfg, dense_layers=2, sparse_from=7)
    assert equal_bytes_rules(dataclasses.replace(CERT, eps=1e-2), 0.25, 4096, 64) == rules  # one set per share


@pytest.mark.parametrize("share", [1e-4, 0.02, 0.5, 0.97, 1.0, 1.3])
@pytest.mark.parametrize("n", [9, 70, 160, 4096])
def test_equal_bytes_rules_are_valid_and_never_read_more(share, n):
    rules = equal_bytes_rules(CERT, share, n, 16)
    for name, cfg in rules.items():
        cfg.check_block(n, name)  # a block of n tokens still scores a position where the rule drops a key
        assert cfg.window >= 1 and cfg.topk >= 0 and cfg.budget <= n - 2
    # the window-only rule reads exactly its budget unless clamped; the page rule never more than the share
    # unless its summaries alone exceed it (then it reads only the fixed keys and summaries: k = 0)
    k = math.floor(min(share, 1.0) * n)
    if 2 <= k <= n - 2:
        assert rules["window only"].budget == k
    quest = rules["Quest pages"]
    if quest.topk:
        assert key_bytes_read(quest, n, 16) <= min(share, 1.0) + 1e-12


def test_a_share_at_or_above_the_context_leaves_no_equal_bytes_comparison():
    """The default model's certified rule reads 112% of the key bytes at 4,096 tokens: a fixed rule at those bytes
    is W = 4,093 (dense but for the last positions), so the comparison is empty; at 95% it is not."""
    assert equal_bytes_is_dense(1.117, 4096) and equal_bytes_is_dense(1.0, 4096)
    assert equal_bytes_is_dense(4094 / 4096, 4096) and not equal_bytes_is_dense(4093 / 4096, 4096)
    assert not equal_bytes_is_dense(0.95, 4096) and not equal_bytes_is_dense(0.25, 4096)
    assert equal_bytes_rules(CERT, 1.117, 4096, 64)["window only"].window == 4093  # what the empty case would run


def test_key_bytes_read_of_pages_counts_summaries():
    cfg = SparseConfig(selector="pages", anchors=1, window=4, topk=8, page_size=4)
    # n = 30: fixed 5 keys; candidates 1 … 25 in pages 0 … 6 (C = 7, 14 keys' worth of summaries); 2 pages read
    assert candidate_pages(cfg, 30) == 7
    assert key_bytes_read(cfg, 30, 8) == pytest.approx((5 + 14 + 8) / 30)
    assert key_bytes_read(SparseConfig(anchors=1, window=4, topk=0), 30, 8) == pytest.approx(5 / 30)
    assert key_bytes_read(SparseConfig(anchors=1, window=4, topk=40), 30, 8) == 1.0  # keeps every key
    with pytest.raises(ValueError, match="measured"):
        key_bytes_read(CERT, 4096, 64)


@pytest.mark.parametrize("bad", [dict(key_bytes_share=0.0), dict(key_bytes_share=-0.1), dict(key_bytes_share=math.nan),
                                 dict(key_bytes_share=True), dict(n_tokens=3), dict(d_head=0)])
def test_equal_bytes_rules_refuse_bad_input(bad):
    args = {"cfg_certified": CERT, "key_bytes_share": 0.5, "n_tokens": 100, "d_head": 16, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        equal_bytes_rules(**args)


def _log_with(cert, m):
    log = MassLog()
    log.add(0, {"fixed": torch.zeros(1, len(m)), "selected": torch.zeros(1, len(m)),
                "discarded": torch.tensor([m]), "certificate": torch.tensor([cert])})
    return log


def test_calibration_counts_a_violation_beyond_rounding():
    c = calibration(_log_with([1e-3, 1e-3, 0.0, 0.5, 0.0, 1e-7], [1e-3, 2e-3, 1.8e-7, 0.1, 3e-6, 5e-6]), eps=1e-3)
    # where the certificate is 0 the true m is 0: the logged 3e-6 is rounding and sets the tolerance, so
    # 2e-3 over 1e-3 and 5e-6 over 1e-7 are violations, 1.8e-7 and 3e-6 over 0 are not
    assert c["pairs"] == 6 and c["violations"] == 2
    assert c["rounding_floor"] == pytest.approx(3e-6) and c["tolerance"] == pytest.approx(3e-6)
    assert c["certified_share"] == pytest.approx(5 / 6) and c["max_ratio"] == pytest.approx(2.0)
    assert c["all_read"] == pytest.approx(2 / 6)
    np.testing.assert_array_equal(c["layer"], [0] * 6)
    small = calibration(_log_with([1e-8, 0.0], [1.5e-6, 0.0]), eps=1e-3)  # no rounding seen: the tolerance is 1e-6
    assert small["tolerance"] == 1e-6 and small["violations"] == 1 and math.isnan(small["max_ratio"])
    with pytest.raises(ValueError, match="certified"):
        calibration(MassLog(), eps=1e-3)


@pytest.fixture(scope="module")
def certified_run():
    lm = load_model("toy-llama")
    blocks = torch.randint(4, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    cfgs = [SparseConfig(selector="certified", anchors=1, window=4, topk=0, page_size=4, eps=eps, bound=bound, rank=4)
            for eps, bound in ((1e-1, "minmax"), (1e-3, "min"))]
    return lm, blocks, cfgs, teacher_forced_rules(lm, blocks, cfgs)


def test_calibration_of_a_model_run_has_no_violation(certified_run):
    lm, blocks, cfgs, results = certified_run
    for cfg, r in zip(cfgs, results):
        c = calibration(r["log"], cfg.eps)
        queries = blocks.shape[0] * (blocks.shape[1] - cfg.budget)  # positions ≥ a + W + k, every block
        assert c["pairs"] == lm.spec.n_layers * lm.spec.n_heads * queries
        assert c["violations"] == 0 and c["certified_share"] == 1.0  # no page cap: every query certified
        assert (c["certificate"] <= cfg.eps).all() and (c["discarded"] >= 0).all()
        assert c["max_ratio"] <= 1 + 1e-5 or math.isnan(c["max_ratio"])
        assert 0 < c["all_read"] <= 1 and c["rounding_floor"] < 1e-6 and c["tolerance"] == 1e-6  # toy: little rounding
    assert calibration(results[0]["log"], cfgs[0].eps)["all_read"] < 1  # at eps = 0.1 some queries leave pages unread


def test_key_bytes_estimate_is_the_logs_mean_with_an_interval(certified_run):
    _, _, _, results = certified_run
    for r in results:
        est = key_bytes_estimate(r["log"])
        assert est.value == pytest.approx(float(r["mass"]["key_bytes"].double().mean()), rel=1e-5)
        assert est.lo <= est.value <= est.hi and est.units == 2
    with pytest.raises(ValueError, match="certified"):
        key_bytes_estimate(MassLog())


def test_equal_bytes_rules_run_in_the_model(certified_run):
    """The baselines at a measured share are rules the model runs on the same blocks."""
    lm, blocks, cfgs, results = certified_run
    share = key_bytes_estimate(results[0]["log"]).value
    rules = equal_bytes_rules(cfgs[0], share, blocks.shape[1], lm.spec.d_head)
    out = teacher_forced_rules(lm, blocks, list(rules.values()))
    for r in out:
        assert r["blocks"] == 2 and r["kl"] >= 0 and r["kl_lo"] <= r["kl"] <= r["kl_hi"]


def test_pages_read_share_pools_layers_and_heads():
    from atlas_core.sparse.attention import MassLog
    from atlas_core.sparse.certified_eval import pages_read_share

    log = MassLog()
    one = torch.ones(2, 3)  # (head, query)
    log.add(0, {"fixed": one, "selected": one, "discarded": 0 * one, "certificate": 0 * one,
                "pages_read": torch.tensor([[1.0, 2, 3], [0, 0, 0]]), "candidate_pages": torch.full((2, 3), 4.0)})
    assert pages_read_share(log) == pytest.approx(6 / 24)
    with pytest.raises(ValueError, match="certified run"):
        empty = MassLog()
        empty.add(0, {"fixed": one, "selected": one, "discarded": 0 * one})
        pages_read_share(empty)
