"""Decode-style perplexity through the cache."""

import math

import pytest
import torch

from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.kvquant.cache import KVQuantConfig
from atlas_core.kvquant.decode import decode_nll, decode_perplexity
from atlas_core.kvquant.quant import QuantSpec
from atlas_core.models import load_model


def test_passthrough_decode_equals_fp_and_quantization_costs():
    lm = load_model("toy-qwen2")
    ids = torch.randint(4, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    fp, _ = decode_nll(lm.model, ids, None, prefill=8)
    same, bits = decode_nll(lm.model, ids, KVQuantConfig(), prefill=8)
    assert fp.shape == (2, 15) and torch.equal(fp, same) and bits == {"key": 32.0, "value": 32.0}  # fp32, as held
    chunked, _ = decode_nll(lm.model, ids, None, prefill=8, chunk=4)
    assert torch.allclose(chunked, fp, atol=1e-4)
    q1, bits = decode_nll(lm.model, ids, KVQuantConfig(key=QuantSpec(bits=1, group=16, axis="token")), prefill=8)
    assert not torch.equal(q1, fp) and bits["key"] < 16


def test_bad_prefill_is_refused():
    with pytest.raises(ValueError):
        decode_perplexity(load_model("toy-gpt2").model, torch.zeros(1, 4, dtype=torch.long), None, prefill=3)


@pytest.mark.slow
def test_smollm2_two_bit_keys_cost_perplexity(smollm2):
    ids = token_blocks(smollm2, BlockSpec(corpus="britannica", seq_len=160, n_blocks=1, split="eval"))
    fp = decode_perplexity(smollm2.model, ids, None, prefill=64)
    q2 = decode_perplexity(smollm2.model, ids, KVQuantConfig(key=QuantSpec(bits=2, group=32, axis="token")), prefill=64)
    assert math.isfinite(fp) and q2 > fp
