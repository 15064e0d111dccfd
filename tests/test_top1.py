import math

import pytest
import torch

from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.attention import attention_modules, state_of
from atlas_core.extract import extract
from atlas_core.models import load_model
from atlas_core.top1 import (
    TOP1,
    Reconstruction,
    fit_reconstruction,
    hard_top1,
    random_reconstruction,
    top1_experiment,
    top1_output,
)


def _blocks(n=4, t=24, seed=0):
    return torch.randint(4, 260, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(lm, blocks):
    with torch.no_grad():
        return lm.model(blocks, use_cache=False).logits


def _no_marks(lm):
    return not any(state_of(m, TOP1, required=False) is not None for m in attention_modules(lm.model))


def test_full_rank_reconstruction_is_the_identity(toy_lm):
    """k = d_head: v_top + μ + B Bᵀ (ε − μ) = z, so the model is unchanged."""
    s = toy_lm.spec
    layers = list(range(s.n_layers))
    rec = fit_reconstruction(toy_lm, _blocks(seed=1), layers, k=s.d_head)
    blocks = _blocks(n=3, seed=2)
    reference = _logits(toy_lm, blocks)
    with hard_top1(toy_lm, layers, rec):
        rebuilt = _logits(toy_lm, blocks)
    with hard_top1(toy_lm, layers):
        top1 = _logits(toy_lm, blocks)
    torch.testing.assert_close(rebuilt, reference, atol=1e-4, rtol=0)
    assert (top1 - reference).abs().max() > 1e-3  # the bare top-1 does change the model


def test_unmarked_layers_run_sdpa_and_leave_the_model_unchanged(toy_lm, monkeypatch):
    """Only the last layer marked (identity reconstruction): the other layers run SDPA, not eager, and the
    logits equal the unmodified model's (GQA, MQA, sliding windows)."""
    import atlas_core.top1 as T

    s = toy_lm.spec
    rec = fit_reconstruction(toy_lm, _blocks(seed=1), [s.n_layers - 1], k=s.d_head)
    blocks = _blocks(n=2, seed=2)
    reference = _logits(toy_lm, blocks)
    calls = []
    sdpa = T.sdpa_attention_forward
    monkeypatch.setattr(T, "sdpa_attention_forward", lambda m, *a, **k: calls.append(m) or sdpa(m, *a, **k))
    with hard_top1(toy_lm, [s.n_layers - 1], rec):
        torch.testing.assert_close(_logits(toy_lm, blocks), reference, atol=1e-4, rtol=0)
    assert len(calls) == s.n_layers - 1 and attention_modules(toy_lm.model)[-1] not in calls


def test_random_full_rank_frame_is_also_the_identity():
    lm = load_model("toy-llama")
    rec = random_reconstruction(fit_reconstruction(lm, _blocks(seed=1), [1], k=lm.spec.d_head), seed=3)
    blocks = _blocks(n=2, seed=2)
    reference = _logits(lm, blocks)
    with hard_top1(lm, [1], rec):
        torch.testing.assert_close(_logits(lm, blocks), reference, atol=1e-4, rtol=0)


def test_top1_output_matches_manual_computation(toy_lm):
    """The deepest layer's output under top-1 is v[g, argmax p] for every head and point."""
    s = toy_lm.spec
    blocks = _blocks(n=2, t=20)
    n_tok = blocks.shape[1]
    seen = {}
    last = attention_modules(toy_lm.model)[-1]
    handle = last.register_forward_hook(lambda m, i, o: seen.update(out=o[0]))
    try:
        with hard_top1(toy_lm, [-1]):
            _logits(toy_lm, blocks)
    finally:
        handle.remove()
    # the deepest layer's inputs are unchanged by top-1 in that same layer, so extract's v and probs apply
    a = extract(toy_lm, blocks, [-1], fields=("v", "probs"), progress=False)[s.n_layers - 1]
    top = a.probs.argmax(-1)  # (block, head, query)
    manual = torch.empty(2, n_tok, s.n_heads, s.d_head)
    for b in range(2):
        for h in range(s.n_heads):
            g = h // (s.n_heads // s.n_kv_heads)
            for t in range(n_tok):
                manual[b, t, h] = a.v[g, b * n_tok + top[b, h, t]]
    from atlas_core.extract import head_out_proj

    w_o, bias = head_out_proj(toy_lm.model, s.n_layers - 1)  # (head, d_head, d_model)
    expected = torch.einsum("bthd,hdm->btm", manual, w_o) + (0 if bias is None else bias)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=0)


def test_top1_output_gqa_groups():
    """Heads 0-1 read KV head 0, heads 2-3 KV head 1; the output picks each head's argmax key."""
    value = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(1, 2, 3, 1)  # (batch, kv_head, key, d_head)
    probs = torch.zeros(1, 4, 1, 3)  # (batch, head, query, key)
    for h, j in enumerate([2, 0, 1, 2]):
        probs[0, h, 0, j] = 1.0
    out = top1_output(value, probs)  # (batch, query, head, d_head)
    assert out.flatten().tolist() == [2.0, 0.0, 4.0, 5.0]


def test_context_manager_restores_and_cleans_up():
    lm = load_model("toy-qwen2", attn_implementation="sdpa")
    with hard_top1(lm, [0, -1]):
        assert lm.model.config._attn_implementation == TOP1
        assert all(state_of(m, TOP1, required=False) is not None for m in attention_modules(lm.model))
    assert lm.model.config._attn_implementation == "sdpa" and _no_marks(lm)
    with pytest.raises(RuntimeError, match="boom"), hard_top1(lm, [1]):
        raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == "sdpa" and _no_marks(lm)


def test_argument_validation():
    lm = load_model("toy-gpt2")
    with pytest.raises(ValueError, match="layers"), hard_top1(lm, [2]):
        pass
    with pytest.raises(ValueError, match="layers"), hard_top1(lm, []):
        pass
    for k in (0, lm.spec.d_head + 1, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            fit_reconstruction(lm, _blocks(), [0], k=k)
    rec = fit_reconstruction(lm, _blocks(), [0], k=2)
    with pytest.raises(ValueError, match="no entry"), hard_top1(lm, [0, 1], rec):
        pass
    with pytest.raises(ValueError, match="basis"):
        Reconstruction(mean=torch.zeros(4, 16), basis=torch.zeros(4, 8, 2))
    with pytest.raises(ValueError, match="mean"):
        Reconstruction(mean=torch.zeros(16), basis=torch.zeros(4, 16, 2))
    assert lm.model.config._attn_implementation == "eager" and _no_marks(lm)


def test_fit_reconstruction_shapes_and_orthonormality():
    lm = load_model("toy-gemma3")  # MQA: 4 heads, 1 KV head
    s = lm.spec
    rec = fit_reconstruction(lm, _blocks(), [-1, 0], k=5)
    assert sorted(rec) == [0, 1]
    for r in list(rec.values()) + list(random_reconstruction(rec).values()):
        assert r.mean.shape == (s.n_heads, s.d_head) and r.basis.shape == (s.n_heads, s.d_head, 5)
        assert r.basis.dtype == torch.float32 and r.k == 5
        gram = r.basis.transpose(1, 2) @ r.basis
        torch.testing.assert_close(gram, torch.eye(5).expand_as(gram), atol=1e-5, rtol=0)
    torch.testing.assert_close(random_reconstruction(rec, 1)[0].basis, random_reconstruction(rec, 1)[0].basis)


def test_top1_experiment_on_calibration_split():
    lm = load_model("toy-llama")
    tok = lm.tokenizer
    eval_blocks = token_blocks(tok, BlockSpec(seq_len=32, n_blocks=3, split="eval"))
    calib_blocks = token_blocks(tok, BlockSpec(seq_len=32, n_blocks=3, split="calib"))
    r = top1_experiment(lm, eval_blocks, calib_blocks, layers=[-1], k=lm.spec.d_head)
    assert r["layers"] == [1] and r["k"] == lm.spec.d_head
    assert r["delta_top1"] == pytest.approx(r["ppl_top1"] - r["ppl_full"])
    assert r["ppl_recon"] == pytest.approx(r["ppl_full"], rel=1e-4)  # full rank: nothing lost
    assert r["ppl_random"] == pytest.approx(r["ppl_full"], rel=1e-4)
    assert r["delta_top1"] > 0 and r["recovered"] == pytest.approx(1.0, abs=1e-3)
    r3 = top1_experiment(lm, eval_blocks, calib_blocks, layers=[0, 1], k=3, random_basis=False)
    assert "ppl_random" not in r3 and r3["layers"] == [0, 1]
    assert lm.model.config._attn_implementation == "eager" and _no_marks(lm)


def test_top1_figures_carry_paired_intervals_and_reuse_a_full_pass():
    """Every figure has its block-bootstrap interval; a full-attention NLL passed in is used, not re-run."""
    from atlas_core import interval
    from atlas_core.eval import block_nll

    lm = load_model("toy-llama")
    eval_blocks = token_blocks(lm.tokenizer, BlockSpec(seq_len=32, n_blocks=6, split="eval"))
    calib_blocks = token_blocks(lm.tokenizer, BlockSpec(seq_len=32, n_blocks=3, split="calib"))
    full = block_nll(lm.model, eval_blocks, progress=False)
    r = top1_experiment(lm, eval_blocks, calib_blocks, layers=[-1], k=3, full_nll=full)
    ci = r["intervals"]
    for name in ("ppl_full", "ppl_top1", "ppl_recon", "ppl_random", "delta_top1", "rel_top1", "recovered",
                 "recovered_random", "gain"):
        assert ci[name]["lo"] <= r[name] <= ci[name]["hi"] and ci[name]["units"] == 6, name
    assert r["ppl_full"] == pytest.approx(interval.perplexity(full).value)
    assert r["rel_top1"] == pytest.approx(r["ppl_top1"] / r["ppl_full"] - 1)
    assert r["gain"] == pytest.approx(r["recovered"] - r["recovered_random"])
    shifted = top1_experiment(lm, eval_blocks, calib_blocks, layers=[-1], k=3, full_nll=full + 0.1,
                              random_basis=False)
    assert shifted["ppl_full"] == pytest.approx(r["ppl_full"] * math.exp(0.1))  # the given pass, not a new one
    with pytest.raises(ValueError, match="full_nll must be"):
        top1_experiment(lm, eval_blocks, calib_blocks, layers=[-1], k=3, full_nll=full[:, 1:])
    fitted = fit_reconstruction(lm, calib_blocks, [0, 1], k=3)  # both layers: the last layer's fit is the same
    shared = top1_experiment(lm, eval_blocks, calib_blocks, layers=[-1], k=3, full_nll=full, reconstruction=fitted)
    assert shared["intervals"] == r["intervals"]
    with pytest.raises(ValueError, match="reconstruction must hold rank-3 fits of layers"):
        top1_experiment(lm, eval_blocks, calib_blocks, layers=[0], k=3, reconstruction={1: fitted[1]})


@pytest.mark.slow
def test_smollm2_deepest_layer_top1_hurts(smollm2):
    eval_blocks = token_blocks(smollm2, BlockSpec(seq_len=256, n_blocks=4, split="eval"))
    calib_blocks = token_blocks(smollm2, BlockSpec(seq_len=256, n_blocks=4, split="calib"))
    r = top1_experiment(smollm2, eval_blocks, calib_blocks, layers=[-1], k=7, random_basis=False)
    print(r)
    assert r["ppl_top1"] > r["ppl_full"]


@pytest.mark.parametrize("rank", [None, 3])
def test_top1_on_a_left_padded_batch_equals_each_row_alone(toy_lm, left_padded, rank):
    """Hard top-1 (bare, and with a rank-3 reconstruction) on issue 14's padded batch: each row's real
    positions get the logits and greedy tokens of the row run alone (argmax never picks a masked key)."""
    layers = list(range(toy_lm.spec.n_layers))
    rec = None if rank is None else fit_reconstruction(toy_lm, _blocks(seed=1), layers, k=rank)
    with hard_top1(toy_lm, layers, rec):
        gap = left_padded.logit_gap(toy_lm.model)
        agrees = left_padded.greedy_agrees(toy_lm.model)
    assert gap < 1e-5
    assert agrees


def test_top1_ignores_masked_keys_even_when_they_would_win():
    """A masked key never wins the argmax, however large its score would have been."""
    value = torch.arange(4, dtype=torch.float32).reshape(1, 1, 4, 1)  # (batch, kv_head, key, d_head)
    scores = torch.tensor([[[[9.0, 1.0, 2.0, 0.5]]]])  # (batch, head, query, key): key 0 would win
    mask = torch.tensor([0.0, 0.0, 0.0, 0.0])
    mask[0] = torch.finfo(torch.float32).min  # key 0 is padding
    probs = (scores + mask).softmax(-1)
    assert top1_output(value, probs).item() == 2.0
