"""The certified selector: fast against reference, the certificate above the true discarded mass, the kernel."""

import math

import pytest
import torch

from atlas_core.sparse.certified import (certified_cache, certified_decode, certified_mask, certified_mask_reference,
                                         key_basis, page_bounds, page_bounds_reference, page_sketch)
from atlas_core.sparse.kept import BOUNDS, SparseConfig, output_split
from atlas_core.sparse.kernels import reference_decode
from atlas_core.sparse.pages import page_index


def _case(seed=0, b=2, h=4, kvh=2, nq=5, n=70, d=16, lead=0, window=None, spread=4.0):
    """Queries and keys with a few pages aligned to the queries (so some pages are worth reading and others not)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g) * spread
    k = torch.randn(b, kvh, n, d, generator=g) * 0.3
    k[:, :, n // 3:n // 3 + 6] += q[:, ::h // kvh, :1].mean(2, keepdim=True) * 0.5
    kpos = torch.arange(lead, lead + n)[None].expand(b, -1)
    qpos = kpos[:, -nq:]
    vis = kpos[:, None, None, :] <= qpos[:, None, :, None]
    if window:  # a sliding-window layer: its own mask hides keys older than the window
        vis = vis & (kpos[:, None, None, :] > qpos[:, None, :, None] - window)
    scores = q @ k.repeat_interleave(h // kvh, 1).transpose(-1, -2) * d**-0.5
    return q, k, scores, vis, qpos, kpos


def _discarded(scores, vis, keep):
    return (scores.masked_fill(~vis, -math.inf).softmax(-1) * ~keep).sum(-1)


CASES = [dict(), dict(kvh=1), dict(kvh=4), dict(lead=3, n=67), dict(window=30), dict(b=1, nq=1, n=129, spread=6.0)]


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("eps", [1e-1, 1e-3])
def test_fast_equals_reference_and_certificate_holds(bound, case, eps):
    q, k, scores, vis, qpos, kpos = _case(seed=case, **CASES[case])
    cfg = SparseConfig(anchors=1, window=8, page_size=4, eps=eps, bound=bound, rank=4)
    fixed, chosen, st = certified_mask(q, k, scores, q.shape[-1] ** -0.5, vis, qpos, kpos, cfg)
    keep, cert = certified_mask_reference(q, k, scores, q.shape[-1] ** -0.5, vis, qpos, kpos, cfg)
    assert torch.equal(fixed | chosen, keep)
    assert not (fixed & chosen).any()
    torch.testing.assert_close(st["certificate"].double(), cert, rtol=1e-5, atol=1e-9)
    m = _discarded(scores, vis, keep)
    assert (m <= st["certificate"] * (1 + 1e-5) + 1e-9).all()
    assert (st["certificate"] <= eps).all()  # no cap: every query certified


def test_budget_cap_stops_reading_and_still_bounds():
    q, k, scores, vis, qpos, kpos = _case(seed=7, spread=1.0)
    cfg = SparseConfig(anchors=1, window=8, page_size=4, eps=1e-4, bound="minmax", max_pages=2)
    fixed, chosen, st = certified_mask(q, k, scores, 0.25, vis, qpos, kpos, cfg)
    keep, cert = certified_mask_reference(q, k, scores, 0.25, vis, qpos, kpos, cfg)
    assert torch.equal(fixed | chosen, keep) and st["pages_read"].max() == 2
    assert (st["certificate"] > cfg.eps).any()  # the cap binds: the certificate says so
    assert (_discarded(scores, vis, keep) <= st["certificate"] * (1 + 1e-5)).all()


def test_softcap_bound_is_capped_too():
    q, k, scores, vis, qpos, kpos = _case(seed=3, spread=8.0)
    capped = torch.tanh(scores / 5.0) * 5.0
    cfg = SparseConfig(anchors=1, window=8, page_size=4, eps=1e-2, bound="centroid")
    fixed, chosen, st = certified_mask(q, k, capped, 0.25, vis, qpos, kpos, cfg, softcap=5.0)
    keep, cert = certified_mask_reference(q, k, capped, 0.25, vis, qpos, kpos, cfg, softcap=5.0)
    assert torch.equal(fixed | chosen, keep)
    assert (_discarded(capped, vis, keep) <= st["certificate"] * (1 + 1e-5) + 1e-9).all()


@pytest.mark.parametrize("bound", BOUNDS)
def test_page_bounds_match_plain_formula_and_bound_every_score(bound):
    g = torch.Generator().manual_seed(1)
    key = torch.randn(1, 2, 40, 8, generator=g)
    q = torch.randn(1, 2, 3, 8, generator=g)
    page, n_pages = page_index(torch.arange(40), 8)
    present = torch.ones(1, 40, dtype=torch.bool)
    cfg = SparseConfig(bound=bound, rank=3, page_size=8)
    sk = page_sketch(key, present, page, n_pages, cfg)
    u = page_bounds(q, sk, 1.0)  # (1, 2, 3, page)
    scores = q @ key.transpose(-1, -2)  # (1, 2, 3, 40)
    assert (u >= scores.view(1, 2, 3, n_pages, 8).amax(-1)).all()
    basis = key_basis(key, present, 3)
    for h in range(2):
        for i in range(3):
            for p in range(n_pages):
                plain = page_bounds_reference(q[0, h, i], key[0, h, 8 * p:8 * p + 8], basis[0, h], bound, 1.0)
                assert u[0, h, i, p] >= plain - 1e-5 and u[0, h, i, p] - plain < 1e-3  # plain + rounding margin


def test_rank_must_leave_a_residual():
    with pytest.raises(ValueError, match="rank .* below d_head"):
        key_basis(torch.randn(1, 1, 5, 4), torch.ones(1, 5, dtype=torch.bool), 4)


@pytest.mark.parametrize("bad", [dict(eps=0), dict(eps=1.0), dict(eps=float("nan")), dict(bound="quest"), dict(rank=0),
                                 dict(max_pages=-1), dict(eps=True)])
def test_config_refuses(bad):
    with pytest.raises(ValueError):
        SparseConfig(**bad)


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("n,groups", [(131, 3), (64, 1), (20, 2)])
@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])  # contiguous pass at once, after gathered rounds, never
def test_decode_kernel_equals_mask_and_reference(bound, n, groups, share):
    g = torch.Generator().manual_seed(n)
    kvh, d = 2, 16
    q = torch.randn(kvh * groups, d, generator=g) * 5
    keys, values = torch.randn(kvh, n, d, generator=g) * 0.3, torch.randn(kvh, n, d, generator=g)
    keys[:, 50:54] += q.view(kvh, groups, d)[:, :1] * 0.4
    cfg = SparseConfig(anchors=2, window=8, page_size=4, eps=1e-3, bound=bound, rank=4)
    out, info = certified_decode(q, certified_cache(keys, values, cfg), rounds=2, gather_share=share)
    scores = q[None, :, None] @ keys.repeat_interleave(groups, 0)[None].transpose(-1, -2) * d**-0.5  # (1, head, 1, n)
    pos = torch.arange(n)[None]
    vis = torch.ones(1, 1, 1, n, dtype=torch.bool)
    fixed, chosen, st = certified_mask(q[None, :, None], keys[None], scores, d**-0.5, vis, pos[:, -1:], pos, cfg)
    keep = (fixed | chosen)[0, :, 0]  # (head, key)
    assert info["pages_read"].tolist() == st["pages_read"][0, :, 0].long().tolist()
    torch.testing.assert_close(info["certificate"], st["certificate"][0, :, 0].double(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out, reference_decode(q, keys, values, keep), rtol=1e-4, atol=1e-5)
    probs = scores.softmax(-1)
    m, o_full, o_kept, _ = output_split(probs, values.repeat_interleave(groups, 0)[None], keep[None, :, None])
    assert (m[0, :, 0] <= info["certificate"] * (1 + 1e-5) + 1e-9).all()
    err = (o_full - o_kept)[0, :, 0].norm(dim=-1)
    assert (err <= info["error_bound"] * (1 + 1e-4) + 1e-6).all()  # 1e-6: fp32 rounding of the two outputs


@pytest.mark.parametrize("family", ["toy-llama", "toy-qwen2", "toy-gemma3"])
@pytest.mark.parametrize("eps", [1e-2, 0.3])
def test_in_model_logs_certificate_above_true_mass_and_fast_equals_reference(family, eps):
    from atlas_core.models import load_model
    from atlas_core.sparse.attention import MassLog, sparse_attention

    lm = load_model(family)
    ids = torch.randint(0, lm.model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    cfg = SparseConfig(anchors=1, window=8, page_size=4, eps=eps, selector="certified", bound="min", rank=4)
    logs = {}
    outs = {}
    for reference in (False, True):
        logs[reference] = MassLog(min_position=0)
        with torch.no_grad(), sparse_attention(lm.model, cfg, logs[reference], reference=reference):
            outs[reference] = lm.model(ids).logits
    torch.testing.assert_close(outs[False], outs[True], rtol=1e-4, atol=1e-4)
    log = logs[False]
    for layer in log.sums:  # query by query, head by head
        m, c = log.discarded_values(layer), log.certificate_values(layer)  # (head, query)
        assert m.shape == c.shape and (m <= c * (1 + 1e-4) + 1e-6).all()
    means = log.means()
    assert (means["certificate"] >= means["discarded"] - 1e-7).all()
    assert (means["certificate"] <= cfg.eps).all()
    assert ((means["key_bytes"] > 0) & (means["pages_read"] <= means["candidate_pages"])).all()
    if eps > 0.1:  # a loose target leaves pages unread (random toy weights spread attention evenly)
        assert (means["pages_read"] < means["candidate_pages"]).any() and (means["discarded"] > 0).any()


def test_bound_slack_is_never_negative_and_min_is_tightest():
    from atlas_core.sparse.certified import bound_slack

    g = torch.Generator().manual_seed(5)
    keys, q = torch.randn(2, 300, 16, generator=g), torch.randn(4, 16, generator=g) * 3
    out = bound_slack(q, keys, SparseConfig(window=16, page_size=8, rank=4), 0.25)
    assert set(out) == set(BOUNDS)
    assert all(v[1] >= 0 for v in out.values())  # 10th percentile: every page's bound is above its max
    assert out["min"][0] <= min(out[b][0] for b in ("minmax", "centroid", "lowrank")) + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("eps", [1e-3, 0.3])
def test_real_model_certificate_holds_and_fast_equals_reference(smollm2, eps):
    """Real keys (smollm2-135m, 512 held-out tokens): every query's and head's true m below its certificate, the
    fast path equal to the model's own eager attention under the narrowed mask, decoding through the cache equal."""
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.sparse.attention import MassLog, sparse_attention

    x = token_blocks(smollm2, BlockSpec(corpus="britannica", seq_len=512, n_blocks=1, split="eval"))
    cfg = SparseConfig(anchors=1, window=64, page_size=16, eps=eps, selector="certified", bound="min")
    logs, outs = {}, {}
    for reference in (False, True):
        logs[reference] = MassLog()
        with torch.no_grad(), sparse_attention(smollm2.model, cfg, logs[reference], reference=reference):
            outs[reference] = smollm2.model(x).logits
    torch.testing.assert_close(outs[False], outs[True], rtol=1e-4, atol=1e-4)
    log = logs[False]
    for layer in log.sums:
        m, c = log.discarded_values(layer), log.certificate_values(layer)
        assert (m <= c * (1 + 1e-4) + 1e-6).all() and (c <= eps).all()
    with torch.no_grad(), sparse_attention(smollm2.model, cfg):
        step = smollm2.model(x[:, :480], use_cache=True)
        steps = [step.logits[0, -1:]]
        for t in range(480, 511):
            step = smollm2.model(x[:, t:t + 1], past_key_values=step.past_key_values, use_cache=True)
            steps.append(step.logits[0])
    torch.testing.assert_close(torch.cat(steps), outs[False][0, 479:511], rtol=1e-3, atol=1e-3)


def test_kept_everything_logs_exactly_zero_discarded_mass():
    """m is summed over the dropped keys, not 1 − kept: a query that keeps every key has m = 0 exactly, so a
    certificate of 0 is never 'violated' by float32 rounding (1 − kept rounded to ~1e-6 at 4K keys)."""
    from atlas_core.models import load_model
    from atlas_core.sparse.attention import MassLog, sparse_attention

    lm = load_model("toy-llama")
    ids = torch.randint(0, lm.model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    log = MassLog(min_position=0)
    cfg = SparseConfig(anchors=1, window=8, page_size=4, eps=1e-9, selector="certified", bound="minmax")
    with torch.no_grad(), sparse_attention(lm.model, cfg, log):
        lm.model(ids)
    for layer in log.sums:
        m, c = log.discarded_values(layer), log.certificate_values(layer)
        assert (m[c == 0] == 0).all()


@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("spread", [8.0, 30.0, 100.0])
def test_scores_far_apart_give_a_valid_certificate_not_a_false_zero(bound, spread):
    """Before the sums were kept as logs, bounds ~745 logits above every score underflowed Z_kept and U to 0 and
    0/0 was read as a certificate of 0 (m = 1 beside c = 0 at spread 30); the kernel's fp32 sums gave NaN at 8."""
    g = torch.Generator().manual_seed(int(spread))
    q = torch.randn(1, 4, 3, 16, generator=g) * spread
    k = torch.randn(1, 2, 64, 16, generator=g) * spread
    pos = torch.arange(64)[None]
    vis = pos[:, None, None, :] <= pos[:, -3:, None][:, None]
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    cfg = SparseConfig(anchors=1, window=4, page_size=4, eps=1e-2, bound=bound, rank=4)
    fixed, chosen, st = certified_mask(q, k, scores, 0.25, vis, pos[:, -3:], pos, cfg)
    keep, cert = certified_mask_reference(q, k, scores, 0.25, vis, pos[:, -3:], pos, cfg)
    assert torch.equal(fixed | chosen, keep)
    c = st["certificate"]
    assert torch.isfinite(c).all() and (c <= 1).all()
    assert (_discarded(scores, vis, keep) <= c * (1 + 1e-5) + 1e-7).all()
    values = torch.randn(2, 64, 16, generator=g)
    out, info = certified_decode(q[0, :, -1], certified_cache(k[0], values, cfg), scale=0.25)
    assert torch.isfinite(info["certificate"]).all() and torch.isfinite(out).all()
    assert info["pages_read"].tolist() == st["pages_read"][0, :, -1].long().tolist()
    assert (info["keys_read"] <= 64).all()


def test_decode_kernel_applies_the_softcap():
    g = torch.Generator().manual_seed(2)
    q, keys, values = torch.randn(4, 16, generator=g) * 6, torch.randn(2, 80, 16, generator=g), torch.randn(2, 80, 16, generator=g)
    cfg = SparseConfig(anchors=1, window=8, page_size=4, eps=1e-2, bound="minmax")
    out, info = certified_decode(q, certified_cache(keys, values, cfg), scale=0.25, softcap=3.0)
    scores = torch.tanh(q[None, :, None] @ keys.repeat_interleave(2, 0)[None].transpose(-1, -2) * 0.25 / 3.0) * 3.0
    pos = torch.arange(80)[None]
    fixed, chosen, st = certified_mask(q[None, :, None], keys[None], scores, 0.25, torch.ones(1, 1, 1, 80, dtype=torch.bool),
                                       pos[:, -1:], pos, cfg, softcap=3.0)
    assert info["pages_read"].tolist() == st["pages_read"][0, :, 0].long().tolist()
    probs = scores.masked_fill(~(fixed | chosen), -math.inf).softmax(-1)
    torch.testing.assert_close(out, (probs @ values.repeat_interleave(2, 0)[None])[0, :, 0], rtol=1e-4, atol=1e-5)
