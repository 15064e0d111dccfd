"""Fused low-bit decode attention on the CPU: one query token per batch row, read from the packed codes.

One decode step of attention over what ``QuantizedKVCache`` holds — packed codes with fp16 scales and zeros
(keys per channel or per token, values per token or per channel, 1–8 bits, 3-bit codes as a bitstream across
bytes, ``quant.pack``'s msb-first order), optional HeadQ side codes, and the fp windows — without building a
dequantized copy of the history. The algebra is the one KIVI's own CUDA kernel uses (Liu et al. 2024, "KIVI",
``quant/csrc/gemv_cuda.cu``): for a per-channel key group G with scale s_{G,c} and zero z_{G,c},

    q·k̂_j = Σ_c (q_c s_{G,c}) · code_{j,c} + Σ_c q_c z_{G,c}      (j ∈ G: the second sum once per group),

for a per-token key (groups of channels γ) q·k̂_j = Σ_γ s_{j,γ} Σ_{c∈γ} q_c code_{j,c} + z_{j,γ} Σ_{c∈γ} q_c,
and HeadQ's score-space correction (``headq``: k̃_j = k̂_j + sign·U_r ĉ_j) adds, inside the same loop,

    sign · (U_rᵀq)·ĉ_j = sign · (s′_j Σ_i (U_rᵀq)_i code′_{j,i} + z′_j Σ_i (U_rᵀq)_i).

Per-channel values fold the scale out of the token sum: Σ_{j∈G} p_j v̂_{j,c} = s_{G,c} Σ_{j∈G} p_j code_{j,c}
+ z_{G,c} Σ_{j∈G} p_j. Per-token values (KIVI's) are scaled once per token into a (d_head,) scratch,
v̂_j = s_{j,γ} code_j + z_{j,γ}, which every query head of the group adds with its weight p_j: one token's
scratch, never a copy of the history (folding p_j·s_{j,γ} per head instead costs a multiply per head and
group and measured slower here). GQA: each KV head's codes are unpacked once per token for all query heads
of its group. A packed row is unpacked per byte unit into contiguous runs (``_order``: code k of every byte
in run k), with the query and the value accumulator permuted once per call to match, so the unpacking is a
vector shift-and-mask. Scores and the softmax are fp32 with max
subtraction; the history is split into chunks (a multiple of every per-channel group) processed in parallel,
each with its own max and sum, and the chunks are merged exactly as flash-decoding does (Dao et al. 2023,
"Flash-Decoding for long-context inference"): out = Σ_c e^{m_c−M} acc_c / Σ_c e^{m_c−M} l_c.

Compiled with numba (``@njit(cache=True, fastmath={reassoc, contract, arcp, nsz}, parallel=True)``): these fast-math
flags (not nnan/ninf, so the −inf tests of masked chunks keep their meaning) let LLVM reassociate the
fp32 dot products and sums into SIMD lanes (the order of additions changes, so results differ from the
reference by fp32 rounding only, ~1e-6 relative; no inf/nan arithmetic is relied on: a fully masked chunk
is detected by comparison before any exp); ``parallel`` runs the (batch, KV head, chunk) items over the
machine's threads (numba's own pool, ``numba.set_num_threads``). Softcap (tanh) and an additive mask row
are applied as eager attention does; sliding-window layers, pre-RoPE keys, transform-coded keys (query-tc,
hadamard, random-rotation and the learned grids of ``transform.py``) and stats not held in fp16 are not fused
(``unsupported`` says why; the cache then takes its plain path). Threads: numba's "workqueue" layer (the "omp"
layer would reset torch's OpenMP thread count), sized at every call to torch's thread count.

``decode_reference`` is the plain torch path beside it (unpack + dequantize + side correction, then
matmul–softmax–matmul in fp32); tests hold the two equal (``tests/test_kvquant_fused.py``).

The attention function ``FUSED`` ("atlas_fused") is registered with transformers: a ``QuantizedKVCache`` with
``KVQuantConfig(fused=True)`` whose model runs this implementation (``decoding(model)``) hands each one-token
decode step's packed state to it instead of a dequantized history; any other step (a prefill chunk, or a
layer the kernel cannot take) arrives as ordinary tensors and runs SDPA (eager when a softcap is set).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from atlas_core.attention import eager_of, register
from atlas_core.kvquant import quant
from atlas_core.kvquant.headq import apply_side
from atlas_core.kvquant.quant import QTensor, QuantSpec

# numba's default "omp" threading layer shares the OpenMP runtime with torch and resets its thread count to the
# core count on first use (an OMP_NUM_THREADS=1 run would then run torch on every core); the "workqueue" layer
# is numba's own pool and leaves torch's threads alone. Its size starts at torch's thread count, and ``decode``
# follows torch's setting on every call, so the kernel and SDPA always run on the same number of threads.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
os.environ.setdefault("NUMBA_NUM_THREADS", str(max(torch.get_num_threads(), 1)))
try:
    import numba
    from numba import njit, prange
except ImportError:  # the cache falls back to its plain path
    numba = None

FUSED = "atlas_fused"  # the attention implementation's name in transformers' registry
CHUNK = 2048  # tokens per parallel work item (rounded up to a multiple of every per-channel group)
_STATE = "_atlas_fused"  # attribute of the key tensor a fused cache step returns: the step's DecodeKV

__all__ = ["FUSED", "DecodeKV", "available", "decode", "decode_reference", "decoding", "unsupported"]


@dataclass(frozen=True, kw_only=True)
class DecodeKV:
    """One layer's cache as one decode step sees it: quantized history, then the fp windows.

    Token j of the T = n_key + key_window = n_value + value_window visible tokens is quantized (key) iff
    j < n_key, where n_key is the number of tokens in ``key`` (likewise values).

    key/value: packed codes (batch, kv_head, n, ⌈d_head·bits/8⌉) uint8 with fp16 scale/zero as
        ``quant.pack_qtensor`` holds them, or None (nothing quantized); key_spec/value_spec their specs.
    key_window/value_window: fp tokens (batch, kv_head, w, d_head), any float dtype.
    side: HeadQ side codes, packed (batch, kv_head, n_key, ⌈r·b′/8⌉) with per-token fp16 scale/zero
        (batch, kv_head, n_key, 1), or None; side_spec its spec (group r, axis token); basis (kv_head, d_head, r);
        sign ±1 (``SideCode.sign``).
    """

    key: QTensor | None
    key_spec: QuantSpec | None
    key_window: torch.Tensor
    value: QTensor | None
    value_spec: QuantSpec | None
    value_window: torch.Tensor
    side: QTensor | None = None
    side_spec: QuantSpec | None = None
    basis: torch.Tensor | None = None
    sign: float = 1.0

    def n_key(self) -> int:
        return 0 if self.key is None else self.key.codes.shape[-2]

    def n_value(self) -> int:
        return 0 if self.value is None else self.value.codes.shape[-2]

    def length(self) -> int:
        """Visible tokens T (keys and values agree)."""
        return self.n_key() + self.key_window.shape[-2]


def available() -> bool:
    """Whether numba imports (the kernel's compiler)."""
    return numba is not None


def unsupported(kv: DecodeKV) -> str | None:
    """Why the kernel cannot take ``kv`` (a sentence), or None when it can.

    Needs numba, CPU tensors, fp16 scales and zeros (the cache's storage), and equal visible lengths of keys
    and values.
    """
    if numba is None:
        return "numba is not installed"
    parts = [t for t in (kv.key_window, kv.value_window) if t is not None]
    for q in (kv.key, kv.value, kv.side):
        if q is not None:
            parts += list(q)
            if q.scale.dtype != torch.float16 or q.zero.dtype != torch.float16:
                return f"scales held in {q.scale.dtype}, the kernel reads fp16"
    if any(t.device.type != "cpu" for t in parts):
        return "tensors are not on the CPU"
    if kv.n_value() + kv.value_window.shape[-2] != kv.length():
        return "keys and values cover different token counts"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The kernel (numba).

# LLVM fast-math flags without nnan/ninf: reassociation and contraction vectorise the fp32 sums, while
# comparisons with -inf (a masked chunk) keep their meaning
_FAST = {"reassoc", "contract", "arcp", "nsz"}
_HALF = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)  # fp16 bits -> fp32


@functools.lru_cache(maxsize=64)
def _order(bits: int, n: int, group: int | None = None) -> tuple[int, int, np.ndarray]:
    """How a packed row of n codes is unpacked: (per, units, channel of each unpacked position).

    A row is read in units of whole bytes (bits dividing 8: one byte holds per = 8 // bits codes; 3 bits:
    three bytes hold 8). The kernel unpacks code k of every unit into one contiguous run, position
    p = k·units + i for the code of channel i·per + k, so each run is a vector shift-and-mask; the query
    (and the value accumulator) is permuted to match once per call. ``group``: a per-token channel group
    that must stay whole within runs (group % per == 0); otherwise, and for other widths, per = 1 (channel
    order, read bit by bit).
    """
    per = 8 // bits if 8 % bits == 0 else (8 if bits == 3 else 1)
    if n % per or (group is not None and group % per):
        per = 1
    units = n // per
    pos = np.arange(n)
    return per, units, ((pos % units) * per + pos // units).astype(np.int64)


def _chunk_size(kv: DecodeKV, chunk: int) -> int:
    unit = math.lcm(*(s.group for s in (kv.key_spec, kv.value_spec) if s is not None and s.axis == "channel"), 1)
    return -(-chunk // unit) * unit


if numba is not None:

    @njit(cache=True, fastmath=_FAST, inline="always")
    def _unpack(row, bits, per, units_in, out):
        """Codes of one packed row (bytes,) uint8 into out (fp32) in ``_order``'s positions: run k holds
        code k of every unit (msb-first, ``quant.pack``); per = 1 reads channel order bit by bit.

        Written for the vectoriser: int32 lanes (an int64 shift makes the float conversion scalar), plain
        offsets rather than slices (a slice per run costs ~6x here), and ``units`` known positive so numba's
        negative-index wraparound folds away.
        """
        units = max(units_in, 1)
        if per == 4:  # 2 bits
            for i in range(units):
                b = np.int32(row[i])
                out[i] = (b >> np.int32(6)) & np.int32(3)
                out[units + i] = (b >> np.int32(4)) & np.int32(3)
                out[2 * units + i] = (b >> np.int32(2)) & np.int32(3)
                out[3 * units + i] = b & np.int32(3)
        elif per == 2:  # 4 bits
            for i in range(units):
                b = np.int32(row[i])
                out[i] = b >> np.int32(4)
                out[units + i] = b & np.int32(15)
        elif per == 1:
            if bits == 8:
                for i in range(units):
                    out[i] = row[i]
            else:  # a bitstream across bytes, any width
                mask = (1 << bits) - 1
                nbytes = row.shape[0]
                for i in range(units):
                    off = i * bits
                    bi = off >> 3
                    word = np.int32(row[bi]) << 8
                    if bi + 1 < nbytes:
                        word |= np.int32(row[bi + 1])
                    out[i] = (word >> (16 - (off & 7) - bits)) & mask
        elif bits == 3:  # 8 codes in each 24-bit word
            for i in range(units):
                word = (np.int32(row[3 * i]) << 16) | (np.int32(row[3 * i + 1]) << 8) | np.int32(row[3 * i + 2])
                for k in range(8):
                    out[k * units + i] = (word >> np.int32(21 - 3 * k)) & np.int32(7)
        else:  # 1 bit: 8 codes a byte
            for i in range(units):
                b = np.int32(row[i])
                for k in range(8):
                    out[k * units + i] = (b >> np.int32(7 - k)) & np.int32(1)

    @njit(cache=True, fastmath=_FAST, parallel=True)
    def _partials(q, uq, scaling, softcap, mask, has_mask,
                  kp, ks, kz, kbits, kgroup, kchan, kper, kcperm, kwin,
                  sp, ss, sz, sbits, sper, sign, has_side,
                  vp, vs, vz, vbits, vgroup, vchan, vper, vcperm, vwin,
                  chunk, m_out, l_out, acc_out, half):
        """Per (batch, KV head, chunk): max m, sum l and unnormalised value sum acc of every query head.

        q (B, H, D) fp32; uq (B, H, r) = U_rᵀq in the side codes' ``_order``; mask (B, T) additive; k*/s*/v*
        packed codes, fp16-bit stats (uint16), ``_order``'s per and channel map; kwin/vwin fp32 windows;
        outputs m_out/l_out (B, H, C), acc_out (B, H, C, D).
        """
        B, H, D = q.shape
        KV = kwin.shape[1]
        G = H // KV
        Nk, Nv = kp.shape[2], vp.shape[2]
        T = Nk + kwin.shape[2]
        C = m_out.shape[2]
        R = uq.shape[2]
        k_units, v_units, s_units = max(D // kper, 1), max(D // vper, 1), max(max(R, 1) // sper, 1)
        for item in prange(B * KV * C):
            b = item // (KV * C)
            h = (item // C) % KV
            c = item % C
            t0 = c * chunk
            t1 = min(T, t0 + chunk)
            n = t1 - t0
            h0 = h * G
            u = np.empty(D, np.float32)  # one token's codes, in ``_order``'s positions
            vhat = np.empty(D, np.float32)
            su = np.empty(max(R, 1), np.float32)
            qp = np.empty((G, D), np.float32)  # the queries in the key codes' order
            qs = np.empty((G, D), np.float32)  # ... folded with a key group's scales
            bias = np.empty(G, np.float32)
            score = np.empty((G, n), np.float32)
            acc = np.zeros((G, D), np.float32)  # in the value codes' order
            for a in range(G):
                for p in range(D):
                    qp[a, p] = q[b, h0 + a, kcperm[p]]
            # --- scores: quantized keys [t0, min(t1, Nk)) ---
            kq1 = min(t1, Nk)
            if kchan:
                for g0 in range(t0, kq1, kgroup):
                    gi = g0 // kgroup
                    for a in range(G):
                        s_b = np.float32(0.0)
                        for d in range(D):
                            s_b += q[b, h0 + a, d] * half[kz[b, h, gi, d]]
                        bias[a] = s_b
                        for p in range(D):
                            qs[a, p] = qp[a, p] * half[ks[b, h, gi, kcperm[p]]]
                    for j in range(g0, min(g0 + kgroup, kq1)):
                        _unpack(kp[b, h, j], kbits, kper, k_units, u)
                        for a in range(G):
                            s = bias[a]
                            qa = qs[a]
                            for p in range(D):
                                s += qa[p] * u[p]
                            score[a, j - t0] = s
            else:
                ng = D // kgroup
                run = max(kgroup // kper, 1)  # a group's positions: one run of this length in each of the per runs
                qsum = np.zeros((G, ng), np.float32)
                for a in range(G):
                    for d in range(D):
                        qsum[a, d // kgroup] += q[b, h0 + a, d]
                for j in range(t0, kq1):
                    _unpack(kp[b, h, j], kbits, kper, k_units, u)
                    for a in range(G):
                        s = np.float32(0.0)
                        for gi in range(ng):
                            part = np.float32(0.0)
                            for k in range(kper):
                                lo = k * k_units + gi * run
                                for i in range(run):
                                    part += qp[a, lo + i] * u[lo + i]
                            s += half[ks[b, h, j, gi]] * part + half[kz[b, h, j, gi]] * qsum[a, gi]
                        score[a, j - t0] = s
            if has_side:
                for j in range(t0, kq1):
                    _unpack(sp[b, h, j], sbits, sper, s_units, su)
                    s_s, s_z = half[ss[b, h, j, 0]], half[sz[b, h, j, 0]]
                    for a in range(G):
                        part = np.float32(0.0)
                        usum = np.float32(0.0)
                        for i in range(R):
                            part += uq[b, h0 + a, i] * su[i]
                            usum += uq[b, h0 + a, i]
                        score[a, j - t0] += sign * (s_s * part + s_z * usum)
            # --- scores: fp keys [max(t0, Nk), t1) ---
            for j in range(max(t0, Nk), t1):
                for a in range(G):
                    s = np.float32(0.0)
                    for d in range(D):
                        s += q[b, h0 + a, d] * kwin[b, h, j - Nk, d]
                    score[a, j - t0] = s
            # --- softmax pieces (fp32, max subtracted; separate loops so each vectorises) ---
            for a in range(G):
                row = score[a]
                for i in range(n):
                    row[i] *= scaling
                if softcap > 0:
                    for i in range(n):
                        row[i] = softcap * np.tanh(row[i] / softcap)
                if has_mask:
                    for i in range(n):
                        row[i] += mask[b, t0 + i]
                mx = np.float32(-np.inf)
                for i in range(n):
                    mx = max(mx, row[i])
                total = np.float32(0.0)
                if mx == -np.inf:  # every key of the chunk masked out
                    row[:] = 0.0
                else:
                    for i in range(n):
                        e = np.exp(row[i] - mx)
                        row[i] = e
                        total += e
                m_out[b, h0 + a, c] = mx
                l_out[b, h0 + a, c] = total
            # --- values: quantized [t0, min(t1, Nv)) ---
            vq1 = min(t1, Nv)
            if vchan:
                tmp = np.empty((G, D), np.float32)
                psum = np.empty(G, np.float32)
                for g0 in range(t0, vq1, vgroup):
                    gi = g0 // vgroup
                    tmp[:] = 0.0
                    psum[:] = 0.0
                    for j in range(g0, min(g0 + vgroup, vq1)):
                        _unpack(vp[b, h, j], vbits, vper, v_units, u)
                        for a in range(G):
                            pr = score[a, j - t0]
                            psum[a] += pr
                            for p in range(D):
                                tmp[a, p] += pr * u[p]
                    for a in range(G):
                        for p in range(D):
                            acc[a, p] += half[vs[b, h, gi, vcperm[p]]] * tmp[a, p] + half[vz[b, h, gi, vcperm[p]]] * psum[a]
            else:
                run = max(vgroup // vper, 1)
                for j in range(t0, vq1):
                    _unpack(vp[b, h, j], vbits, vper, v_units, u)
                    for gi in range(D // vgroup):  # this token's values, dequantized in a (d_head,) scratch
                        s_v, z_v = half[vs[b, h, j, gi]], half[vz[b, h, j, gi]]
                        for k in range(vper):
                            lo = k * v_units + gi * run
                            va, ua = vhat[lo:lo + run], u[lo:lo + run]
                            for i in range(run):
                                va[i] = s_v * ua[i] + z_v
                    for a in range(G):
                        pr = score[a, j - t0]
                        ar = acc[a]  # a row view: the vectoriser then sees one store stream
                        for p in range(D):
                            ar[p] += pr * vhat[p]
            # --- values: fp [max(t0, Nv), t1) ---
            for j in range(max(t0, Nv), t1):
                for a in range(G):
                    pr = score[a, j - t0]
                    for p in range(D):
                        acc[a, p] += pr * vwin[b, h, j - Nv, vcperm[p]]
            for a in range(G):
                for p in range(D):
                    acc_out[b, h0 + a, c, vcperm[p]] = acc[a, p]

    @njit(cache=True, fastmath=_FAST)
    def _merge(m, l, acc, out):
        """Merge the chunks' partials: out (B, H, D) = Σ_c e^{m_c−M} acc_c / Σ_c e^{m_c−M} l_c."""
        B, H, C, D = acc.shape
        for b in range(B):
            for h in range(H):
                mx = -np.inf
                for c in range(C):
                    mx = max(mx, m[b, h, c])
                total = np.float32(0.0)
                for d in range(D):
                    out[b, h, d] = 0.0
                if mx == -np.inf:
                    continue  # every key masked: zeros (eager would give nan)
                for c in range(C):
                    if m[b, h, c] == -np.inf:
                        continue
                    w = np.exp(m[b, h, c] - mx)
                    total += w * l[b, h, c]
                    for d in range(D):
                        out[b, h, d] += w * acc[b, h, c, d]
                for d in range(D):
                    out[b, h, d] /= total


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _bits16(t: torch.Tensor) -> np.ndarray:
    """fp16 tensor -> its bits as uint16 (no copy when contiguous)."""
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def _operands(qt: QTensor | None, spec: QuantSpec | None, batch: int, kv: int, d: int):
    """(packed, scale bits, zero bits, bits, group, per-channel) of one tensor kind; empty when not quantized."""
    if qt is None:
        none = np.zeros((batch, kv, 0, 1), np.uint8)
        stat = np.zeros((batch, kv, 0, 1), np.uint16)
        return none, stat, stat, 8, 1, False
    group = spec.group if spec.axis == "channel" else spec.channel_group(d)
    return _np(qt.codes), _bits16(qt.scale), _bits16(qt.zero), spec.bits, group, spec.axis == "channel"


def decode(q: torch.Tensor, kv: DecodeKV, scaling: float, softcap: float | None = None,
           mask: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """Fused decode attention of one query token per row over a packed cache (the kernel).

    Args:
        q: (batch, head, d_head) queries (post-RoPE), any float dtype; head a multiple of kv_head.
        kv: the layer's packed state (``DecodeKV``).
        scaling: the logit scale (1/√d_head usually); softcap: logits → cap·tanh(logit/cap) before the mask.
        mask: (batch, T) additive mask over the T visible tokens (0 or −inf), or None.
        chunk: tokens per parallel work item (rounded up to a multiple of every per-channel group).
    Returns:
        (batch, head, d_head) attention output in q's dtype (computed in fp32).
    Raises:
        ValueError: ``unsupported(kv)`` gives a reason, or the shapes disagree.
    """
    reason = unsupported(kv)
    if reason is not None:
        raise ValueError(f"the fused kernel cannot run this step: {reason}")
    B, H, D = q.shape
    KV, T = kv.key_window.shape[1], kv.length()
    if H % KV or kv.key_window.shape[-1] != D:
        raise ValueError(f"queries (batch, head, d_head)={tuple(q.shape)} do not fit KV heads {KV} of d_head {kv.key_window.shape[-1]}")
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must be (batch, T)=({B}, {T}), got {tuple(mask.shape)}")
    chunk = _chunk_size(kv, chunk)
    C = max(1, -(-T // chunk))
    q32 = q.detach().float().contiguous()
    if kv.side is not None:
        uq = torch.einsum("bhd,hdr->bhr", q32, kv.basis.float().repeat_interleave(H // KV, 0))  # (B, H, r)
        sp, ss, sz = _np(kv.side.codes), _bits16(kv.side.scale), _bits16(kv.side.zero)
        sbits = kv.side_spec.bits
    else:
        uq = torch.zeros(B, H, 0)
        sp, ss, sz = np.zeros((B, KV, 0, 1), np.uint8), np.zeros((B, KV, 0, 1), np.uint16), np.zeros((B, KV, 0, 1), np.uint16)
        sbits = 8
    kp, ks, kz, kbits, kgroup, kchan = _operands(kv.key, kv.key_spec, B, KV, D)
    vp, vs, vz, vbits, vgroup, vchan = _operands(kv.value, kv.value_spec, B, KV, D)
    kper, _, kcperm = _order(kbits, D, None if kchan else kgroup)
    vper, _, vcperm = _order(vbits, D, None if vchan else vgroup)
    sper, _, scperm = _order(sbits, max(uq.shape[-1], 1))
    uq = uq[..., scperm[: uq.shape[-1]]]  # U_rᵀq in the side codes' order
    mask_np = np.zeros((B, 0), np.float32) if mask is None else _np(mask.float())
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # SDPA's thread count
    m = np.empty((B, H, C), np.float32)
    l = np.empty((B, H, C), np.float32)
    acc = np.empty((B, H, C, D), np.float32)
    _partials(q32.numpy(), _np(uq.float()), np.float32(scaling), np.float32(softcap or 0.0), mask_np, mask is not None,
              kp, ks, kz, kbits, kgroup, kchan, kper, kcperm, _np(kv.key_window.float()),
              sp, ss, sz, sbits, sper, np.float32(kv.sign), kv.side is not None,
              vp, vs, vz, vbits, vgroup, vchan, vper, vcperm, _np(kv.value_window.float()),
              chunk, m, l, acc, _HALF)
    out = np.empty((B, H, D), np.float32)
    _merge(m, l, acc, out)
    return torch.from_numpy(out).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Plain reference.


def dequantized(kv: DecodeKV) -> tuple[torch.Tensor, torch.Tensor]:
    """All visible keys and values (batch, kv_head, T, d_head) in fp32, dequantized from the codes."""
    d = kv.key_window.shape[-1]
    keys, values = [kv.key_window.float()], [kv.value_window.float()]
    if kv.key is not None:
        k_hat = quant.dequantize(quant.unpack_qtensor(kv.key, kv.key_spec.bits, d), kv.key_spec)
        if kv.side is not None:
            side = quant.unpack_qtensor(kv.side, kv.side_spec.bits, kv.side_spec.group)
            k_hat = apply_side(k_hat.contiguous(), side, kv.basis.float(), kv.side_spec, kv.sign)
        keys.insert(0, k_hat)
    if kv.value is not None:
        values.insert(0, quant.dequantize(quant.unpack_qtensor(kv.value, kv.value_spec.bits, d), kv.value_spec))
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def decode_reference(q: torch.Tensor, kv: DecodeKV, scaling: float, softcap: float | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """The plain path ``decode`` must equal: dequantize, then matmul–softmax–matmul in fp32.

    Args/returns as ``decode``.
    """
    keys, values = dequantized(kv)  # (B, KV, T, D)
    groups = q.shape[1] // keys.shape[1]
    keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)  # (B, H, T, D)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), keys) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores + mask.float()[:, None, :]
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bht,bhtd->bhd", p, values).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The attention function and its switch.


def mark(key: torch.Tensor, kv: DecodeKV) -> torch.Tensor:
    """A tensor object standing for the step's keys that carries ``kv`` to ``fused_attention``."""
    handle = key.detach().view_as(key)
    setattr(handle, _STATE, kv)
    return handle


def fused_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    softcap: float | None = None, **kwargs):
    """Attention implementation ``FUSED``: the kernel for a fused cache step, SDPA (eager under a softcap) otherwise.

    Args:
        query: (batch, head, q_len, d_head); key: a ``mark``-ed tensor, or (batch, kv_head, T, d_head) keys;
        attention_mask: transformers' additive mask (batch, 1, q_len, T) or None.
    Returns:
        ((batch, q_len, head, d_head) output, None), as transformers' attention functions do.
    """
    kv = getattr(key, _STATE, None)
    if kv is None:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return eager_of(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    T = kv.length()
    mask = None if attention_mask is None else attention_mask[:, 0, 0, -T:]  # (batch, T)
    out = decode(query[:, :, 0], kv, scaling, softcap, mask)  # (batch, head, d_head)
    return out[:, None], None


register(FUSED, fused_attention, "atlas_core.kvquant.fused.decoding")


@contextlib.contextmanager
def decoding(model):
    """Run ``model`` with the ``FUSED`` attention inside the block (restored on exit, also on error).

    A ``QuantizedKVCache`` built with ``KVQuantConfig(fused=True)`` and this model's config then sends its
    one-token decode steps through the kernel; every other step runs SDPA as before.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(FUSED)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def is_active(config) -> bool:
    """Whether a model with this (text) config runs the ``FUSED`` attention now."""
    return getattr(config, "_attn_implementation", None) == FUSED
