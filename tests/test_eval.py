"""Log-probabilities and perplexity: exact to fp32 rounding against a float64 reference, at the real
vocabulary sizes (SmolLM2 49,152; Qwen2.5 151,936; Gemma 3 262,144)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from atlas_core import eval as E

VOCABS = (49152, 151936, 262144)
# Exact to fp32 rounding: NLLs of 0-40 nats have an ulp of at most 3.8e-6, so the largest error may be a
# few ulps while the mean error (the bias that moves a perplexity) stays near 0. The old reduction,
# F.cross_entropy(logits.transpose(1, 2)), is biased by -2.8e-5 to -1.3e-4 nats on these logits.
MAX_ERR = 1e-5
MAX_BIAS = 1e-6


def _logits(vocab: int, tokens: int = 64, seed: int = 0) -> torch.Tensor:
    """(2, token, vocab) fp32 logits at a language model's scale: std 3-10 per row, 20 boosted outliers."""
    g = torch.Generator().manual_seed(seed)
    std = 3 + 7 * torch.rand(2, tokens, 1, generator=g)
    z = torch.randn(2, tokens, vocab, generator=g) * std
    hot = torch.randint(0, vocab, (2, tokens, 20), generator=g)
    return z.scatter_add(-1, hot, 15 * torch.rand(2, tokens, 20, generator=g))


def _targets(logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)


def _reference_nll(logits, targets) -> torch.Tensor:
    z = logits.double()
    return torch.logsumexp(z, -1) - z.gather(-1, targets[..., None])[..., 0]


def _errors(nll, ref) -> tuple[float, float]:
    err = nll.double() - ref
    return err.abs().max().item(), err.mean().item()


@pytest.mark.parametrize("vocab", VOCABS)
def test_token_nll_is_exact_to_fp32_rounding(vocab):
    logits = _logits(vocab)
    targets = _targets(logits)
    ref = _reference_nll(logits, targets)
    max_err, bias = _errors(E.token_nll(logits, targets), ref)
    assert max_err < MAX_ERR and abs(bias) < MAX_BIAS
    # The old reduction fails the same check by its bias (the test can fail): cross_entropy with the
    # vocabulary as dimension 1 is biased low by 2.8e-5 (49K) to 1.3e-4 (262K) nats per token.
    old = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    _, old_bias = _errors(old, ref)
    assert old_bias < -10 * MAX_BIAS


@pytest.mark.parametrize("vocab", VOCABS)
def test_token_logprobs_are_exact_to_fp32_rounding(vocab):
    logits = _logits(vocab, tokens=32, seed=2)
    ref = torch.log_softmax(logits.double(), -1)
    lp = E.token_logprobs(logits)
    assert lp.dtype == torch.float32 and lp.shape == logits.shape
    # Each row's normaliser is the fp32 rounding of the exact one (within an ulp of logsumexp, <= 3.8e-6),
    # and unbiased over rows.
    row_err = (lp.double() - ref).mean(-1)  # (2, token)
    assert row_err.abs().max().item() < MAX_ERR and abs(row_err.mean().item()) < MAX_BIAS
    # log_softmax's own fp32 normaliser is biased low, so its log p are high (by 2e-6 to 9e-6 here).
    old_err = (logits.log_softmax(-1).double() - ref).mean(-1)
    assert old_err.mean().item() > MAX_BIAS
    targets = _targets(logits)
    nll = -lp.gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(nll, E.token_nll(logits, targets), rtol=0, atol=MAX_ERR)


def test_token_nll_layouts_and_dtypes():
    logits = _logits(4096, tokens=16)
    targets = _targets(logits)
    ref = _reference_nll(logits, targets)
    # A non-contiguous view (vocabulary not innermost in memory) is as exact.
    strided = logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert _errors(E.token_nll(strided, targets), ref)[0] < MAX_ERR
    # bf16 logits are reduced in fp32; fp64 stays fp64.
    bf = logits.bfloat16()
    assert E.token_nll(bf, targets).dtype == torch.float32
    torch.testing.assert_close(E.token_nll(bf, targets).double(), _reference_nll(bf.float(), targets), rtol=0, atol=MAX_ERR)
    assert E.token_nll(logits.double(), targets).dtype == torch.float64
    torch.testing.assert_close(E.token_nll(logits.double(), targets), ref, rtol=0, atol=1e-12)


def test_token_nll_refuses_bad_input():
    logits = torch.zeros(2, 3, 10)
    with pytest.raises(ValueError, match="must share their leading shape"):
        E.token_nll(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        E.token_nll(logits, torch.full((2, 3), 10))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        E.token_nll(logits, torch.full((2, 3), -100))  # cross_entropy's ignore_index is not a token


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits for token t are a fixed random row: enough for block_nll's bookkeeping."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = _logits(vocab, tokens=50, seed=5)[0]  # (token id, vocab)

    def forward(self, ids, use_cache=False):
        return SimpleNamespace(logits=self.table[ids])  # (batch, token, vocab)


def test_perplexity_matches_the_float64_reference():
    vocab = 151936
    model = _FixedLogits(vocab)
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 50, (3, 20), generator=g)
    nll = E.block_nll(model, blocks, batch_size=2, progress=False)
    assert nll.shape == (3, 19)
    ref = _reference_nll(model.table[blocks[:, :-1]], blocks[:, 1:])  # (block, token - 1)
    assert _errors(nll, ref)[0] < MAX_ERR
    ppl = E.perplexity(model, blocks, batch_size=2, progress=False)
    assert ppl == pytest.approx(math.exp(ref.mean().item()), rel=2 * MAX_BIAS)
    old = F.cross_entropy(model.table[blocks[:, :-1]].transpose(1, 2), blocks[:, 1:], reduction="none")
    assert math.exp(old.double().mean().item()) / ppl - 1 < -10 * MAX_BIAS  # the old value was low


# Where the library may still call torch's own vocabulary reductions, and why.
_ALLOWED = {
    # The Fisher pass only back-propagates the loss: cross_entropy's gradient (softmax - one-hot) is off by
    # 2e-5 to 6e-5 relative at these vocabularies, far below the Fisher's sampling noise; its value is unused.
    "atlas_core/wquant/calib.py",
}


def test_every_nll_and_log_probability_goes_through_token_nll():
    from pathlib import Path
    import re

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"\bcross_entropy\(|\blog_softmax\(|\bnll_loss\(")
    offenders = []
    for path in sorted([*root.glob("atlas_core/**/*.py"), *root.glob("notebooks/*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel in _ALLOWED or rel == "atlas_core/eval.py":
            continue
        offenders += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == [], "reduce NLL / log-probabilities with eval.token_nll / token_logprobs"


# --- perplexity under SDPA (issue 15 item 6) ------------------------------------------------------------

def _eager_reference_nll(lm, blocks) -> torch.Tensor:
    """The plain reference: eager attention, one forward of all blocks, NLL of every next token."""
    assert lm.model.config._attn_implementation == "eager"
    logits = lm.model(blocks, use_cache=False).logits[:, :-1]  # (block, token - 1, vocab)
    return E.token_nll(logits, blocks[:, 1:])


def test_perplexity_runs_sdpa_and_equals_eager_on_every_toy_family(toy_lm):
    """Eager-loaded models score through SDPA (no probabilities needed) with the same NLL, and come back
    eager (extraction hooks need the probabilities); GQA, MQA and sliding-window toys alike."""
    from atlas_core.models import scoring_attention

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, 200, (3, 48), generator=g)  # longer than the toys' sliding windows
    seen = []
    hook = toy_lm.model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    try:
        nll = E.block_nll(toy_lm.model, blocks, batch_size=2, progress=False)
    finally:
        hook.remove()
    assert seen and set(seen) == {"sdpa"}
    assert toy_lm.model.config._attn_implementation == "eager"
    ref = _eager_reference_nll(toy_lm, blocks)
    assert (nll - ref).abs().max().item() < 1e-4
    assert E.perplexity(toy_lm.model, blocks, progress=False) == pytest.approx(math.exp(ref.double().mean().item()), rel=1e-5)
    with scoring_attention(toy_lm.model) as inside:
        assert inside == "sdpa"


def test_scoring_leaves_a_registered_attention_alone(toy_lm):
    """Hard top-1 (a registered attention that changes the numbers on purpose) is not replaced by SDPA."""
    from atlas_core.models import scoring_attention
    from atlas_core.top1 import TOP1, hard_top1

    with hard_top1(toy_lm, [-1]):
        with scoring_attention(toy_lm.model) as inside:
            assert inside == TOP1 == toy_lm.model.config._attn_implementation
    assert toy_lm.model.config._attn_implementation == "eager"


def test_corpus_perplexity_is_the_interval_of_the_blocks_nll():
    from atlas_core import interval
    from atlas_core.corpus import BlockSpec, token_blocks
    from atlas_core.models import load_model

    lm = load_model("toy-llama")
    spec = BlockSpec(corpus="pydoc", seq_len=32, n_blocks=4, split="eval")
    est = E.corpus_perplexity(lm, spec)
    ref = interval.perplexity(E.block_nll(lm.model, token_blocks(lm, spec), progress=False))
    assert (est.value, est.lo, est.hi, est.units) == (ref.value, ref.lo, ref.hi, ref.units) and est.units == 4
    assert est.value == pytest.approx(E.perplexity(lm.model, token_blocks(lm, spec), progress=False), rel=1e-6)
