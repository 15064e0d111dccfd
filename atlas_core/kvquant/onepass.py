"""Decode-time NLL of a quantized KV cache in one teacher-forced forward pass: the attention function
``atlas_kvquant``.

Under teacher forcing, ``decode.decode_nll`` feeds a block to ``QuantizedKVCache`` as update 0 (the
prefill, tokens 0 … P − 1) and then updates of ``chunk`` tokens. Within an update, attention sees every
token flushed by an earlier update through its codes and the rest in full precision; a token's codes never
change once flushed. So the whole decode is fixed by two numbers per token, taken from the cache's own
flush rule (``KVQuantConfig.flush_counts``, simulated on window lengths alone, keys and values apart since
KIVI's rule treats them differently): the update f_j at which token j is flushed and the update u_t that
processes query t. Query t sees key j quantized iff f_j^key < u_t, and value j quantized iff
f_j^value < u_t.

In one pass each layer's keys/values go through the cache's own store (``cache._Store``: the same
quantizer, per-channel groups aligned from position 0 as the flushes make them, pre-RoPE un- and
re-rotation at absolute positions, HeadQ side codes), and

    scores = where(M_k, q·k̂, q·k)·scale (+ softcap) + the model's mask,  p = softmax in fp32,
    output = (p·M_v) @ V̂ + (p·¬M_v) @ V,

with GQA by transformers' ``repeat_kv`` and sliding windows by the model's own mask (the cache only drops
tokens no later query can see). The step-by-step decode through the cache stays the reference; tests hold
the two equal for every method (``tests/test_kvquant_onepass.py``).

Exact means: the same computation up to fp32 rounding order. On 2-layer toys the two agree to ~1e-5 nats;
on smollm2-135m (30 layers) rounding noise flips a few quantization codes (round() and min/max are
discontinuous) and single tokens move by up to ~1 nat (4-bit) or ~5 nats (2-bit, no residual); the
step-by-step decode differs from itself as much when a block is decoded alone instead of in a batch of 2,
and the mean NLL agrees to ~1e-3 nats (``tests/test_kvquant_onepass.py``, slow test).

Update 0 attends in full precision, so the first ``prefill`` tokens' keys/values in every layer are the
fp model's, the same for every configuration: ``prefill_caches`` computes them once per batch of blocks and
``onepass_nll`` feeds only the rest of each block on top of a fresh cache holding them (the held one is
never written), so a sweep pays for the prefill once. The whole block in one pass (``share_prefill=False``)
stays as the plain reference; tests hold the two equal.

The bits per key/value element are measured, not computed: one row's captured keys/values are fed through
a real ``QuantizedKVCache`` in the same update schedule (no model forward), and its held bytes are read.

With a ``ValuePolicy`` (``policy.py``), values flushed into storage get per-token bits chosen causally from
the attention weights of the queries processed up to their flush (``policy.causal_a2_choice``); the
probabilities do not depend on the values, so they are computed first, then the bits, then the output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv

from atlas_core.eval import token_nll
from atlas_core.attention import attention_modules, intervene, register, state_of
from atlas_core.kvquant.cache import KVQuantConfig, _Store, held_bits_per_element
from atlas_core.kvquant.decode import make_cache
from atlas_core.kvquant.headq import SideCode
from atlas_core.kvquant.policy import ValuePolicy, causal_a2_choice, mixed_values
from atlas_core.kvquant.rope import rotary_tables

ONEPASS = "atlas_kvquant"  # each attention module's state inside ``kvquant_attention``: (layer, Plan)

__all__ = ["ONEPASS", "Schedule", "schedule", "onepass_nll", "prefill_caches", "kvquant_attention"]


@dataclass(frozen=True)
class Schedule:
    """The cache's update schedule for one block of fed tokens.

    ``update[t]`` is the update that processes token t; ``key_flush[j]``/``value_flush[j]`` the update
    after which token j's key/value is stored quantized (``never`` if it stays in the fp window).
    ``bounds`` are the updates' (start, stop) token ranges.
    """

    update: torch.Tensor  # (token,) long
    key_flush: torch.Tensor  # (token,) long
    value_flush: torch.Tensor  # (token,) long
    bounds: list[tuple[int, int]]

    @property
    def never(self) -> int:
        return len(self.bounds)

    def seen_quantized(self, flush: torch.Tensor) -> torch.Tensor:
        """(query, key) bool: query t sees token j through its codes (f_j < u_t)."""
        return flush[None, :] < self.update[:, None]

    def flushes(self, flush: torch.Tensor) -> list[tuple[int, int]]:
        """[(lo, hi)] token ranges flushed by successive updates (oldest first), empty flushes left out."""
        counts = torch.bincount(flush[flush < self.never], minlength=self.never).tolist()
        ends = torch.tensor(counts).cumsum(0).tolist()
        return [(end - n, end) for n, end in zip(counts, ends) if n]


def schedule(kv: KVQuantConfig, n_tokens: int, prefill: int, chunk: int) -> Schedule:
    """Simulate the cache's windows over ``n_tokens`` fed tokens: prefill, then ``chunk`` at a time.

    The flush rule is ``kv.flush_counts`` (the cache's own); this only tracks window lengths.
    """
    if not 1 <= prefill <= n_tokens or chunk < 1:
        raise ValueError(f"need 1 ≤ prefill ≤ {n_tokens} fed tokens and chunk ≥ 1, got prefill={prefill}, chunk={chunk}")
    bounds = [(0, prefill)] + [(s, min(s + chunk, n_tokens)) for s in range(prefill, n_tokens, chunk)]
    update = torch.empty(n_tokens, dtype=torch.long)
    key_flush = torch.full((n_tokens,), len(bounds), dtype=torch.long)
    value_flush = key_flush.clone()
    next_key = next_value = 0  # oldest token still in each fp window
    for u, (start, stop) in enumerate(bounds):
        update[start:stop] = u
        n_key, n_value = kv.flush_counts(stop - next_key, stop - next_value)
        key_flush[next_key : next_key + n_key] = u
        value_flush[next_value : next_value + n_value] = u
        next_key, next_value = next_key + n_key, next_value + n_value
    return Schedule(update, key_flush, value_flush, bounds)


@dataclass
class Plan:
    """What the attention function needs in every layer, and what it leaves behind."""

    kv: KVQuantConfig
    side: SideCode | None
    sched: Schedule
    rotary: list | None  # per-layer RoPE tables when keys are quantized pre-RoPE
    value_policy: ValuePolicy | None = None
    captured: dict = field(default_factory=dict)  # layer -> (keys, values) of batch row 0, (kv_head, token, d_head)
    high: dict = field(default_factory=dict)  # layer -> (batch, kv_head, token) bool, values given high bits

    def stored_keys(self, layer: int, key: torch.Tensor) -> torch.Tensor:
        """Keys (batch, kv_head, token, d_head) as the cache's store returns them once flushed."""
        rotary = self.rotary[layer] if self.rotary is not None else None
        side = self.side if self.kv.key is not None else None
        basis, decoder = (side.bases[layer], side.decoder(layer)) if side is not None else (None, None)
        code = self.kv.key_transform.layers[layer] if self.kv.key_transform is not None else None
        store = _Store(self.kv.key, side, basis, rotary, memo=True, code=code, decoder=decoder)
        return _through_store(store, key, self.sched.key_flush, self.sched.never)


def _through_store(store: _Store, x: torch.Tensor, flush: torch.Tensor, never: int) -> torch.Tensor:
    """x (batch, kv_head, token, d_head) with its flushed prefix replaced by what ``store`` returns for it.

    Flushes are whole groups from position 0, so storing the flushed prefix at once gives the same codes
    as the flushes one by one (per-token groups do not span tokens; per-channel groups are aligned).
    """
    n = int((flush < never).sum())
    if n == 0 or store.spec is None:
        return x
    store.append(x[..., :n, :])
    return torch.cat([store.seen(), x[..., n:, :]], dim=-2)


def kvquant_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function ``atlas_kvquant``: eager attention as a quantized cache's decode would see it.

    The queries may be the block's tail only (a shared fp prefill in the past cache, ``prefill_caches``):
    the first key − query keys/values then come from that cache, and the schedule's (query, key) masks are
    cut to the queries' rows.

    Args:
        query: (batch, head, query, d_head), the block's last ``query`` tokens; key, value: (batch, kv_head,
            token, d_head), the whole block.
        attention_mask: the model's additive mask (batch, 1, query, token) or None.
    Returns:
        (output (batch, query, head, d_head), probabilities (batch, head, query, token)), as eager does.
    Raises:
        RuntimeError: called outside ``kvquant_attention``; ValueError: the keys are not the planned block, or
        a value policy without every query (its bits need the prefill's attention weights too).
    """
    layer, plan = state_of(module, ONEPASS)
    sched = plan.sched
    if key.shape[-2] != len(sched.update) or query.shape[-2] > key.shape[-2]:
        raise ValueError(f"one-pass attention needs the keys of the whole block of {len(sched.update)} tokens "
                         f"(a past cache may hold its start), got {query.shape[-2]} queries and {key.shape[-2]} keys")
    past = key.shape[-2] - query.shape[-2]  # keys/values of the shared fp prefill, from the past cache
    if past and plan.value_policy is not None:
        raise ValueError("the A² value policy needs every query's attention weights: run it without a shared prefill")
    plan.captured[layer] = (key[0].detach(), value[0].detach())
    groups = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ repeat_kv(key, groups).transpose(-1, -2)  # (batch, head, query, key)
    if plan.kv.key is not None:  # else every key is seen as it is
        k_hat = plan.stored_keys(layer, key)
        seen = sched.seen_quantized(sched.key_flush)[past:]  # (query, key)
        scores = torch.where(seen.to(query.device), query @ repeat_kv(k_hat, groups).transpose(-1, -2), scores)
    scores = scores * scale
    if kwargs.get("softcap"):
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    else:  # a model that skipped its mask relies on causality
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1 + past), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (batch, head, query, key)
    if plan.kv.value is None:
        return (probs @ repeat_kv(value, groups)).transpose(1, 2).contiguous(), probs
    v_hat = _stored_values(plan, layer, value, probs)
    quantized = sched.seen_quantized(sched.value_flush)[past:].to(query.device)  # (query, key)
    out = (probs * quantized) @ repeat_kv(v_hat, groups) + (probs * ~quantized) @ repeat_kv(value, groups)
    return out.transpose(1, 2).contiguous(), probs


def _stored_values(plan: Plan, layer: int, value: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Values (batch, kv_head, token, d_head) as stored once flushed: the cache's quantizer, or the A² policy."""
    sched = plan.sched
    if plan.value_policy is None:
        return _through_store(_Store(plan.kv.value, memo=True), value, sched.value_flush, sched.never)
    b, n_kv, n, _ = value.shape
    a2 = probs.float().pow(2).view(b, n_kv, -1, n, n).sum(2).cumsum(2)  # (batch, kv_head, query, key): Σ_{i ≤ t} a_ij²
    last_query = torch.tensor([stop - 1 for _, stop in sched.bounds] + [n - 1], device=value.device)
    seen_by = last_query[sched.value_flush.to(value.device)]  # (key,) last query processed when j is flushed
    w = a2.gather(2, seen_by.view(1, 1, 1, n).expand(b, n_kv, 1, n)).squeeze(2)  # (batch, kv_head, key)
    n_seen = seen_by - torch.arange(n, device=value.device) + 1  # (key,) queries from j on, up to its flush
    high = causal_a2_choice(w, n_seen, sched.flushes(sched.value_flush), plan.value_policy, plan.kv.value.bits)
    plan.high[layer] = high
    return mixed_values(value, high, plan.kv.value, plan.value_policy)


register(ONEPASS, kvquant_attention_forward, owner="atlas_core.kvquant.onepass.kvquant_attention(model, plan)")


@contextlib.contextmanager
def kvquant_attention(model, plan: Plan):
    """Run ``model`` with ``atlas_kvquant`` attention in every layer, following ``plan``."""
    with intervene(model, ONEPASS, {layer: (layer, plan) for layer in range(len(attention_modules(model)))}):
        yield plan


def measured_bits(model, plan: Plan, side: SideCode | None) -> dict[str, float]:
    """Bits per key/value element a real ``QuantizedKVCache`` holds after the schedule, fed the captured
    keys/values of one row update by update (no model forward)."""
    cache = make_cache(model, replace(plan.kv, memo=True), side)  # memo: faster, and not counted in the bits
    for layer, (k, v) in sorted(plan.captured.items()):
        for start, stop in plan.sched.bounds:
            cache.layers[layer].update(k[None, :, start:stop], v[None, :, start:stop])
    return cache.bits_per_element()


@torch.no_grad()
def onepass_nll(
    model,
    blocks: torch.Tensor,
    kv: KVQuantConfig | None,
    side: SideCode | None = None,
    prefill: int = 128,
    chunk: int = 1,
    progress: bool = False,
    value_policy: ValuePolicy | None = None,
    batch_size: int = 8,
    prefill_kv: list[DynamicCache] | None = None,
    share_prefill: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``decode.decode_nll`` in one forward pass per batch of blocks: the same NLL and measured bits.

    Args:
        blocks: (batch, token) token ids.
        kv: quantization settings, or None for the fp cache (a plain forward pass).
        side: HeadQ side codes for the keys, or None.
        prefill: tokens of update 0 (1 … token − 2); chunk: tokens per later update.
        progress: a progress bar over batches.
        value_policy: the causal A² value bits (needs per-token quantized values; their bits are the budget).
        batch_size: blocks per forward pass (memory: a few (batch, head, token, token) tensors per layer).
        prefill_kv: the fp prefill of each batch (``prefill_caches(model, blocks, prefill, batch_size)``),
            computed once and shared by every configuration on these blocks; None: computed here. Not
            mutated. Unused by the fp path and under a value policy (both run the whole block).
        share_prefill: feed only tokens prefill … token − 2 on top of the fp prefill (update 0 attends in
            full precision, so its keys/values are the fp model's); False: the whole block in one pass, the
            plain reference that ``tests/test_kvquant_onepass.py`` holds the shared path equal to.
    Returns:
        (NLL (batch, token − prefill − 1) in nats of tokens prefill + 1 … token − 1, bits per key/value
        element held, measured from a real cache's bytes). With a value policy, ``value`` is still what
        the uniform quantizer's cache holds (no cache holds mixed bits), and ``value_payload`` is the
        policy's mean payload bits per stored value element (all layers, rows and KV heads; ≤ b).
    Raises:
        ValueError: prefill out of range, a value policy without per-token quantized values, or ``prefill_kv``
            not the prefill of these blocks in batches of ``batch_size``.
    Source: the decode protocol of ``decode.decode_nll``; the flush rule of ``KVQuantConfig.flush_counts``.
    """
    n_fed = blocks.shape[1] - 1
    if not 1 <= prefill < n_fed:
        raise ValueError(f"prefill must be in 1..{blocks.shape[1] - 2}, got {prefill}")
    if kv is None:
        if value_policy is not None:
            raise ValueError("a value policy needs quantized values: pass a KVQuantConfig with a per-token value quantizer")
        return _fp_nll(model, blocks, prefill, batch_size)
    if value_policy is not None:
        value_policy.check(kv.value)
    rotary = rotary_tables(model) if kv.pre_rope and kv.key is not None else None
    sched = schedule(kv, n_fed, prefill, chunk)
    batches = blocks.split(batch_size)
    share = share_prefill and value_policy is None  # the A² policy needs the prefill queries' attention weights
    if share and prefill_kv is None:
        prefill_kv = prefill_caches(model, blocks, prefill, batch_size)
    if share:
        _check_prefill(prefill_kv, batches, prefill)
    nll, highs = [], []
    for i, rows in enumerate(tqdm(batches, desc="one-pass", leave=False, disable=not progress)):
        plan = Plan(kv, side, sched, rotary, value_policy)
        with kvquant_attention(model, plan):
            if share:  # a fresh cache on the held prefill: the forward's keys are appended there, not to it
                past = DynamicCache(ddp_cache_data=[(k, v) for k, v, *_ in prefill_kv[i]])
                logits = model(rows[:, prefill:n_fed], past_key_values=past, use_cache=True).logits
            else:
                logits = model(rows[:, :n_fed], use_cache=False, logits_to_keep=n_fed - prefill).logits
        nll.append(token_nll(logits, rows[:, prefill + 1 :]))  # logits: (batch, scored, vocab)
        highs += list(plan.high.values())
    bits = measured_bits(model, plan, side)
    if value_policy is not None:
        bits["value_payload"] = _payload(highs, sched, value_policy, kv.value.bits)
    return torch.cat(nll), bits


@torch.no_grad()
def prefill_caches(model, blocks: torch.Tensor, prefill: int, batch_size: int = 8) -> list[DynamicCache]:
    """The fp keys/values of every block's first ``prefill`` tokens, one ``DynamicCache`` per batch.

    Update 0 of the decode attends in full precision, so these are the same for every cache configuration:
    ``onepass_nll`` computes the rest of the block on top of them. Full (not sliding-window) layers: a
    sliding layer would drop keys the schedule's store still needs; the model's mask applies the window.

    Args:
        blocks: (block, token) token ids; prefill: tokens per block; batch_size: blocks per cache.
    Returns:
        [DynamicCache] per batch of ``batch_size`` blocks, each layer's keys/values (batch, kv_head,
        prefill, d_head). Memory: 2 · layers · kv_heads · d_head · prefill floats per block (smollm2-135m,
        prefill 128, fp32: 5.9 MB).
    """
    caches = []
    for rows in blocks.split(batch_size):
        cache = DynamicCache()  # no config: every layer full
        model(rows[:, :prefill], past_key_values=cache, use_cache=True, logits_to_keep=1)
        caches.append(cache)
    return caches


def _check_prefill(caches: list[DynamicCache], batches: tuple[torch.Tensor, ...], prefill: int) -> None:
    """Raise ValueError unless ``caches`` hold ``prefill`` tokens of every row of every batch, in every layer."""
    if len(caches) != len(batches):
        raise ValueError(f"prefill_kv holds {len(caches)} batches, the blocks make {len(batches)}: build it with "
                         "prefill_caches(model, blocks, prefill, batch_size) on the same blocks and batch size")
    for cache, rows in zip(caches, batches):
        for k, v, *_ in cache:
            if k is None or k.shape[0] != len(rows) or k.shape[-2] != prefill or v.shape[-2] != prefill:
                got = None if k is None else tuple(k.shape)
                raise ValueError(f"a prefill_kv layer holds keys of shape {got}, expected {len(rows)} rows × {prefill} "
                                 "tokens: build it with prefill_caches on the same blocks, prefill and batch size "
                                 "(a sliding-window cache drops the keys the schedule needs)")


def _payload(highs: list[torch.Tensor], sched: Schedule, policy: ValuePolicy, budget: int) -> float:
    """Mean payload bits per stored value element under the policy's choices (``budget`` if none is stored)."""
    stored = int((sched.value_flush < sched.never).sum())
    if not highs or stored == 0:
        return float(budget)
    n_high = sum(int(h[..., :stored].sum()) for h in highs)
    n_all = sum(h[..., :stored].numel() for h in highs)
    return (policy.high * n_high + policy.low * (n_all - n_high)) / n_all


def _fp_nll(model, blocks: torch.Tensor, prefill: int, batch_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The fp reference: one plain forward pass (the model's own attention) and the bits of its ``DynamicCache``."""
    n_fed = blocks.shape[1] - 1
    nll = []
    for rows in blocks.split(batch_size):
        cache = DynamicCache(config=model.config)
        logits = model(rows[:, :n_fed], past_key_values=cache, use_cache=True, logits_to_keep=n_fed - prefill).logits
        nll.append(token_nll(logits, rows[:, prefill + 1 :]))
    return torch.cat(nll), held_bits_per_element(cache)
