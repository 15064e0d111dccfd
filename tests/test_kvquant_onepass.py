"""One-pass exact evaluation of a quantized KV cache vs the step-by-step decode through ``QuantizedKVCache``.

The flash-attention pattern: ``decode.decode_nll`` is the reference, ``onepass.onepass_nll`` the fast path;
every method and control the CLI offers (``KVMethod``) is held equal on a toy model of every family (GQA,
MQA, sliding windows, GPT-2 without RoPE, partial RoPE), and the measured bits are the same bytes.
"""

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv

from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.eval import token_nll
from atlas_core.attention import attention_modules, intervene, register, state_of
from atlas_core.kvquant.cache import KVQuantConfig
from atlas_core.kvquant.decode import decode_nll, make_cache
from atlas_core.kvquant.experiment import KVMethod, side_code
from atlas_core.kvquant.onepass import onepass_nll, prefill_caches, schedule
from atlas_core.kvquant.policy import ValuePolicy, causal_a2_choice
from atlas_core.kvquant.quant import QuantSpec, dequantize, quantize
from atlas_core.models import load_model
from atlas_core.toy import FAMILIES

TOL = 1e-4  # nats, fp32 toys
PREFILL, TOKENS = 16, 48
NO_PRE_ROPE = {"gpt2": "no RoPE", "phi3": "partial RoPE"}  # refused by both paths

# every method and control of the CLI (KVMethod), small enough for toy heads (d_head 16) and 48 tokens
METHODS = {
    "per-token K2 (K-only, R0)": (KVMethod(method="per-token", kbits=2, group=8), 1),
    "per-token K2 V2 R0": (KVMethod(method="per-token", kbits=2, vbits=2, group=8), 1),
    "per-token K3 V2 R5": (KVMethod(method="per-token", kbits=3, vbits=2, group=8, residual=5), 1),
    "per-token K2 V2 R2 chunk 3": (KVMethod(method="per-token", kbits=2, vbits=2, group=8, residual=2), 3),
    "per-channel K2 V2 R4": (KVMethod(method="per-channel", kbits=2, vbits=2, group=8, residual=4), 1),
    "per-channel K2 V3 chunk 5": (KVMethod(method="per-channel", kbits=2, vbits=3, group=8), 5),
    "kivi K2 V2 R8": (KVMethod(method="kivi", kbits=2, vbits=2, group=8), 1),
    "kivi K2 V2 R16 chunk 4": (KVMethod(method="kivi", kbits=2, vbits=2, group=8, residual=16), 4),
    "kivi K2 (K-only)": (KVMethod(method="kivi", kbits=2, group=8), 1),
    "pre-RoPE per-token K2 V2": (KVMethod(method="per-token", kbits=2, vbits=2, group=8, pre_rope=True), 1),
    "pre-RoPE kivi K2 V2": (KVMethod(method="kivi", kbits=2, vbits=2, group=8, pre_rope=True), 1),
    "headq K2 r4": (KVMethod(method="headq", kbits=2, group=8, rank=4), 1),
    "headq wrong-sign": (KVMethod(method="headq", kbits=2, group=8, rank=4, control="wrong-sign"), 1),
    "headq random-basis": (KVMethod(method="headq", kbits=2, group=8, rank=4, control="random-basis"), 1),
    "headq key-pca": (KVMethod(method="headq", kbits=2, group=8, rank=4, control="key-pca"), 1),
    "headq on kivi V2 chunk 2": (KVMethod(method="headq", kbits=2, vbits=2, group=8, rank=4, base="kivi"), 2),
    "headq pre-RoPE on per-channel": (KVMethod(method="headq", kbits=2, group=8, rank=4, base="per-channel", pre_rope=True), 1),
}


def _blocks(seed: int, n: int = 2, tokens: int = TOKENS) -> torch.Tensor:
    return torch.randint(4, 260, (n, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def toys():
    return {family: load_model(f"toy-{family}") for family in FAMILIES}


def _both(lm, method: KVMethod, chunk: int, side=None, ids=None):
    ids = _blocks(0) if ids is None else ids
    ref = decode_nll(lm.model, ids, method.kv_config(), side, PREFILL, chunk)
    fast = onepass_nll(lm.model, ids, method.kv_config(), side, PREFILL, chunk)
    return ref, fast


@pytest.mark.parametrize("name", list(METHODS))
def test_onepass_equals_decode_for_every_method_and_family(toys, name):
    method, chunk = METHODS[name]
    gaps, costs = {}, {}
    for family, lm in toys.items():
        if method.pre_rope and family in NO_PRE_ROPE:
            with pytest.raises(ValueError, match="RoPE"):
                onepass_nll(lm.model, _blocks(0), method.kv_config(), prefill=PREFILL, chunk=chunk)
            continue
        side = side_code(lm, method, _blocks(1, 2, 32))
        (ref, ref_bits), (fast, fast_bits) = _both(lm, method, chunk, side)
        fp, _ = decode_nll(lm.model, _blocks(0), None, prefill=PREFILL)
        assert fast.shape == ref.shape == (2, TOKENS - PREFILL - 1)
        assert fast_bits == ref_bits, f"{name} on {family}: bits {fast_bits} != {ref_bits}"
        gaps[family], costs[family] = (fast - ref).abs().max().item(), (ref - fp).abs().max().item()
    worst = max(gaps.values())
    assert worst < TOL, f"{name}: max |ΔNLL| one-pass vs decode = {worst:.2e} nats (per family {gaps})"
    assert max(costs.values()) > 100 * TOL, f"{name}: quantization changes nothing, the equality would be empty"
    print(f"{name}: max |ΔNLL| = {worst:.2e} nats")


def test_fp_and_passthrough_match_decode(toys):
    lm = toys["gemma3"]
    for kv in (None, KVQuantConfig()):
        (ref, ref_bits) = decode_nll(lm.model, _blocks(0), kv, prefill=PREFILL)
        (fast, fast_bits) = onepass_nll(lm.model, _blocks(0), kv, prefill=PREFILL)
        assert (fast - ref).abs().max() < TOL and fast_bits == ref_bits == {"key": 32.0, "value": 32.0}


def test_batches_are_independent(toys):
    lm, method = toys["llama"], KVMethod(method="kivi", kbits=2, vbits=2, group=8)
    ids = _blocks(3, n=3)
    whole, _ = onepass_nll(lm.model, ids, method.kv_config(), prefill=PREFILL)
    split, _ = onepass_nll(lm.model, ids, method.kv_config(), prefill=PREFILL, batch_size=2)
    assert torch.allclose(whole, split, atol=1e-5)


SHARED = ["kivi K2 V2 R16 chunk 4", "per-channel K2 V3 chunk 5", "pre-RoPE per-token K2 V2", "headq on kivi V2 chunk 2"]


def test_shared_prefill_equals_full_pass_and_is_not_mutated(toys):
    """The tail on top of a held fp prefill gives the whole block's one-pass NLL and bits (every family,
    sliding windows shorter than the block included); a configuration run after others on the same held
    prefill gives its NLL alone, and the held keys/values are unchanged."""
    ids = _blocks(4, n=3)
    for family, lm in toys.items():
        held = prefill_caches(lm.model, ids, PREFILL, batch_size=2)
        before = [[(k.clone(), v.clone()) for k, v, *_ in cache] for cache in held]
        for name in SHARED:
            method, chunk = METHODS[name]
            if method.pre_rope and family in NO_PRE_ROPE:
                continue
            side = side_code(lm, method, _blocks(1, 2, 32))
            args = (lm.model, ids, method.kv_config(), side, PREFILL, chunk)
            full, full_bits = onepass_nll(*args, batch_size=2, share_prefill=False)
            shared, shared_bits = onepass_nll(*args, batch_size=2, prefill_kv=held)
            alone, _ = onepass_nll(*args, batch_size=2)  # its own prefill, nothing run before on it
            gap = (shared - full).abs().max().item()
            assert gap < 1e-6 and shared_bits == full_bits, f"{name} on {family}: shared vs full prefill {gap:.2e}"
            assert torch.equal(shared, alone), f"{name} on {family}: a config run after others moved"
        for cache, kept in zip(held, before):
            assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v, *_), (k0, v0) in zip(cache, kept))


def test_bad_prefill_cache_is_refused(toys):
    lm, kv = toys["gemma3"], KVMethod(method="kivi", kbits=2, vbits=2, group=8).kv_config()
    ids = _blocks(0, n=3)
    with pytest.raises(ValueError, match="batches"):  # built with another batch size
        onepass_nll(lm.model, ids, kv, prefill=PREFILL, batch_size=2, prefill_kv=prefill_caches(lm.model, ids, PREFILL, 3))
    sliding = DynamicCache(config=lm.model.config)  # window 8 < prefill: the sliding layer drops keys
    lm.model(ids[:, :PREFILL], past_key_values=sliding, use_cache=True)
    with pytest.raises(ValueError, match="sliding-window"):
        onepass_nll(lm.model, ids, kv, prefill=PREFILL, prefill_kv=[sliding])


@pytest.mark.parametrize("kv", [KVQuantConfig(key=QuantSpec(bits=2, group=8, axis="token"), residual=3),
                                KVQuantConfig(key=QuantSpec(bits=2, group=8, axis="channel"), value=QuantSpec(bits=2, group=8, axis="token"), residual=2),
                                KVQuantConfig(key=QuantSpec(bits=2, group=4, axis="channel"), value=QuantSpec(bits=2, group=8, axis="token"), residual=8, residual_rule="kivi")])
@pytest.mark.parametrize("chunk", [1, 3])
def test_schedule_is_the_caches_own_windows(toys, kv, chunk):
    """After every update, the tokens the schedule says are still unflushed are the cache's fp windows."""
    lm = toys["llama"]
    sched = schedule(kv, 30, 7, chunk)
    cache = make_cache(lm.model, kv)
    k = torch.randn(1, 2, 30, 16)
    for u, (start, stop) in enumerate(sched.bounds):
        cache.layers[0].update(k[..., start:stop, :], k[..., start:stop, :])
        fp_keys = int(((sched.key_flush >= u + 1)[:stop]).sum())
        fp_values = int(((sched.value_flush >= u + 1)[:stop]).sum())
        assert cache.layers[0].fp_tokens() == (fp_keys, fp_values)


def test_bad_input_is_refused(toys):
    lm = toys["llama"]
    with pytest.raises(ValueError, match="prefill"):
        onepass_nll(lm.model, _blocks(0), KVMethod(method="kivi", kbits=2, group=8).kv_config(), prefill=TOKENS - 1)
    with pytest.raises(ValueError, match="per-token quantized values"):
        onepass_nll(lm.model, _blocks(0), KVMethod(method="per-token", kbits=2, group=8).kv_config(), prefill=PREFILL, value_policy=ValuePolicy(low=1))
    with pytest.raises(ValueError, match="low < high"):
        ValuePolicy(low=3, high=3)


# ----------------------------------------------------------------------------------------------------------------
# The A² value policy inside decoding: the one-pass engine vs a plain step-by-step reference.

REF = "atlas_a2_reference"


class _A2Decode:
    """One layer of the plain per-step reference: keys come quantized from the cache (values held dense
    there); this keeps the values as stored, accumulates w_j = Σ a_ij² (over the group's heads) query by
    query, and decides each flush's bits with the rule written as loops over rows, heads and tokens."""

    def __init__(self, kv: KVQuantConfig, policy: ValuePolicy, batch: int, n_kv: int, n_tokens: int, d: int):
        self.kv, self.policy = kv, policy
        self.w = torch.zeros(batch, n_kv, n_tokens, dtype=torch.float64)
        self.seen = torch.zeros(batch, n_kv, n_tokens, d)  # the values attention sees, by position
        self.high = torch.zeros(batch, n_kv, n_tokens, dtype=torch.bool)
        self.r = torch.zeros(batch, n_kv, n_tokens, dtype=torch.float64)  # mean a² per query, as known at the flush
        self.fed = self.next_key = self.next_value = 0

    def step(self, query, key, value, attention_mask, scaling):
        n_q, n_vis = query.shape[2], key.shape[2]
        end = self.fed + n_q
        pos = torch.arange(end - n_vis, end)  # the visible keys' absolute positions
        self.seen[:, :, self.fed : end] = value[:, :, -n_q:]  # new values: full precision until flushed
        groups = query.shape[1] // key.shape[1]
        scores = query @ repeat_kv(key, groups).transpose(-1, -2) * scaling + attention_mask[..., :n_vis]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (batch, head, query, key)
        b, n_kv = key.shape[:2]
        self.w[:, :, pos] += probs.pow(2).view(b, n_kv, groups, n_q, n_vis).sum((2, 3)).double()
        out = probs @ repeat_kv(self.seen[:, :, pos], groups)
        self.fed = end
        n_key, n_value = self.kv.flush_counts(end - self.next_key, end - self.next_value)
        self.next_key += n_key
        if n_value:
            self._flush(self.next_value, self.next_value + n_value)
            self.next_value += n_value
        return out.transpose(1, 2).contiguous(), probs

    def _flush(self, lo: int, hi: int) -> None:
        p, budget = self.policy, self.kv.value.bits
        for row in range(self.w.shape[0]):
            for head in range(self.w.shape[1]):
                for j in range(lo, hi):  # r_j = w_j / n_j, frozen at j's flush
                    self.r[row, head, j] = self.w[row, head, j] / (self.fed - j)
                w = self.r[row, head]
                tau = torch.quantile(w[:hi], 1 - p.share(budget))
                room = p.allowance(budget, hi) - int(self.high[row, head, :lo].sum())
                ranked = sorted((j for j in range(lo, hi) if w[j] >= tau), key=lambda j: (-w[j].item(), j))
                for j in range(lo, hi):
                    bits = p.high if j in ranked[: max(room, 0)] else p.low
                    self.high[row, head, j] = bits == p.high
                    if bits < 16:
                        spec = QuantSpec(bits=bits, group=self.kv.value.group, axis="token", scale_dtype=self.kv.value.scale_dtype)
                        x = self.seen[row, head, j : j + 1]
                        self.seen[row, head, j : j + 1] = dequantize(quantize(x, spec), spec, x.dtype)


def _reference_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    return state_of(module, REF).step(query, key, value, attention_mask, scaling)


register(REF, _reference_forward, owner="a2_decode_reference")


def a2_decode_reference(lm, ids: torch.Tensor, kv: KVQuantConfig, policy: ValuePolicy, chunk: int = 1):
    """Per-step decode with the A² value policy: NLL (batch, token − prefill − 1) and the high-bit choices."""
    model, spec = lm.model, lm.spec
    cache = make_cache(model, KVQuantConfig(key=kv.key, value=None, residual=kv.residual, pre_rope=kv.pre_rope, residual_rule=kv.residual_rule))
    modules = attention_modules(model)
    states = [_A2Decode(kv, policy, ids.shape[0], spec.n_kv_heads, ids.shape[1], spec.d_head) for _ in modules]
    with intervene(model, REF, dict(enumerate(states))):
        model(ids[:, :PREFILL], past_key_values=cache, use_cache=True)
        nll = []
        for start in range(PREFILL, ids.shape[1] - 1, chunk):
            stop = min(start + chunk, ids.shape[1] - 1)
            logits = model(ids[:, start:stop], past_key_values=cache, use_cache=True).logits
            nll.append(token_nll(logits, ids[:, start + 1 : stop + 1]))
    return torch.cat(nll, dim=1), [s.high for s in states]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("method, chunk, policy", [
    (KVMethod(method="per-token", kbits=2, vbits=2, group=8), 1, ValuePolicy(low=1)),
    (KVMethod(method="per-token", kbits=2, vbits=3, group=8, residual=4), 3, ValuePolicy(low=2, high=8)),
    (KVMethod(method="kivi", kbits=2, vbits=2, group=8), 1, ValuePolicy(low=1, high=4)),
])
def test_a2_policy_onepass_equals_per_step_reference(toys, family, method, chunk, policy):
    lm, kv = toys[family], method.kv_config()
    ids = _blocks(5)
    ref, ref_high = a2_decode_reference(lm, ids, kv, policy, chunk)
    fast, bits = onepass_nll(lm.model, ids, kv, prefill=PREFILL, chunk=chunk, value_policy=policy)
    uniform, _ = onepass_nll(lm.model, ids, kv, prefill=PREFILL, chunk=chunk)
    gap = (fast - ref).abs().max().item()
    assert gap < TOL, f"A² policy {family} {method.label()}: max |ΔNLL| one-pass vs per-step = {gap:.2e}"
    assert (fast - uniform).abs().max() > 10 * TOL  # the policy changes what attention sees
    assert bits["value_payload"] <= kv.value.bits  # never above the uniform quantizer's payload
    stored = sum(int(h.sum()) for h in ref_high)
    assert stored > 0  # the reference chose some high-precision values


def test_causal_a2_choice_keeps_the_running_budget():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(3, 40, generator=gen)
    w[:, 5] += 10  # a heavy token
    policy, budget = ValuePolicy(low=2, high=16), 4  # share 2/14 = 1/7
    flushes = [(0, 10)] + [(j, j + 1) for j in range(10, 40)]
    n_seen = torch.full((40,), 4)
    high = causal_a2_choice(w, n_seen, flushes, policy, budget)
    assert high[:, 5].all()
    for _, hi in flushes:  # after every flush, the high share never exceeds the budget's
        assert (high[:, :hi].sum(-1) <= policy.allowance(budget, hi)).all()
    assert (high.sum(-1) >= 3).all()  # and most of it is spent (⌊40/7⌋ = 5)
    future = w.clone()
    future[:, 30:] = 100.0  # later weights cannot change earlier choices
    assert torch.equal(causal_a2_choice(future, n_seen, flushes, policy, budget)[:, :30], high[:, :30])


@pytest.mark.slow
def test_smollm2_onepass_equals_decode_to_its_own_noise(smollm2):
    """On a 30-layer model, rounding noise (a batch of 2 vs a row alone changes the last bits of the
    hidden states) flips a few quantization codes (round() and min/max are discontinuous), and a flipped
    code moves a token's NLL by up to ~1 nat: the step-by-step decode does not reproduce itself to 1e-4.
    So the fp path is held to 1e-4 and the quantized paths to the decode's own noise (batch vs alone): mean
    ΔNLL within max(0.01, 3× the decode's own), max |ΔNLL| within 3× the decode's own max."""
    ids = token_blocks(smollm2, BlockSpec(corpus="britannica", seq_len=256, n_blocks=2, split="eval"))
    fp, _ = decode_nll(smollm2.model, ids, None, prefill=64)
    fast_fp, _ = onepass_nll(smollm2.model, ids, None, prefill=64)
    assert (fast_fp - fp).abs().max() < 1e-4
    report = {}
    for method in (KVMethod(method="kivi", kbits=2, vbits=2), KVMethod(method="per-token", kbits=4, vbits=4), KVMethod(method="headq", kbits=2, control="random-basis")):
        side = side_code(smollm2, method, None) if method.method == "headq" else None
        ref, ref_bits = decode_nll(smollm2.model, ids, method.kv_config(), side, prefill=64)
        alone = torch.cat([decode_nll(smollm2.model, row[None], method.kv_config(), side, prefill=64)[0] for row in ids])
        fast, fast_bits = onepass_nll(smollm2.model, ids, method.kv_config(), side, prefill=64)
        noise, gap = (alone - ref).abs().max().item(), (fast - ref).abs().max().item()
        mean_gap, mean_noise = (fast - ref).double().mean().item(), (alone - ref).double().mean().item()
        report[method.label()] = (f"max |ΔNLL| {gap:.2e} (decode vs itself {noise:.2e}), "
                                  f"mean ΔNLL {mean_gap:+.2e} (decode vs itself {mean_noise:+.2e})")
        assert fast_bits == ref_bits
        ok = abs(mean_gap) <= max(0.01, 3 * abs(mean_noise)) and gap <= 3 * max(noise, 1e-4)
        assert ok, f"one-pass vs decode on smollm2-135m: {report}"
    print(report)
