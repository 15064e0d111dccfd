"""One KV-cache quantization method, end to end: its cache settings, its calibration, its perplexity.

``KVMethod`` names a method the way the CLI and the chapter do:

- ``fp``: the full-precision cache;
- ``per-token``: keys and values per token (groups of ``group`` channels), the ``residual`` most recent
  tokens in full precision (our "recent" window rule);
- ``per-channel``: KIVI's quantizers (keys per channel in groups of ``group`` tokens, values per token)
  under our "recent" window rule (the ``residual`` most recent tokens plus fewer than ``group`` waiting for
  a whole key group);
- ``kivi``: KIVI exactly as its code runs it: KIVI's quantizers and KIVI's residual rule (keys flushed
  ``residual`` at a time, the ``residual`` most recent values in fp; ``residual`` defaults to ``group``,
  the smallest that KIVI's code accepts; KIVI's own examples use 128);
- ``headq`` (+ a control): side codes on top of a base key quantizer (``base``);
- ``query-tc``: query-aware transform coding of keys (``transform.py``): keys rotated into the eigenbasis
  of the calibration query covariance, integer bits per coordinate by reverse water-filling on the query
  energy at ``budget`` bits per key element (default ``kbits + 32/group``, per-channel ``kbits``' storage),
  KIVI's groups and residual rule;
- ``hadamard``: a seeded random-sign Walsh–Hadamard rotation before KIVI's per-channel ``kbits``-bit keys
  (QuaRot/SpinQuant-style baseline); ``random-rotation``: a seeded Haar rotation (TurboQuant-style).

``grid`` ("uniform" | "lloyd-max" | "lloyd-max-pinned") picks the per-channel grid of kivi, per-channel and the
three transform methods: "lloyd-max" rounds each min–max normalised group to levels learned per
layer-coordinate on the calibration keys (KVQuant's non-uniform datatype), at the same storage;
"lloyd-max-pinned" keeps the end levels at each group's min and max (``transform.py``).

``evaluate`` measures decode-time NLL through the cache, block by block; ``Runs`` memoises evaluations
on one set of evaluation blocks (the fp reference and HeadQ's calibration computed once, reused by every
method); ``compare`` adds the fp reference and the method's same-bits baseline. Every figure carries its
95% interval from ``atlas_core.interval`` (blocks resampled, the methods of a comparison paired on the
same blocks), and ``atlas_core.claims.removal_verdict`` states what the intervals allow one to say.

Engines (``EvalSetup.engine``): "onepass" (``atlas_core.kvquant.onepass``: one forward per batch of
blocks, each query seeing every key as the cache would hand it back) is the default; "decode"
(``decode.decode_nll``: prefill, then one token at a time through ``QuantizedKVCache``) is the reference
the one-pass engine is tested against.

Baselines: HeadQ's baseline is its own base quantizer without the side code (per-token keys by default,
or ``base="per-channel"``/``"kivi"``, at the same bits, group and residual); KIVI's and per-channel's is
per-token at the same bits and residual (so the fraction says how much of per-token's excess they remove);
per-token and fp have none; query-tc's, hadamard's and random-rotation's is kivi at the same bits, group and
residual; a lloyd-max grid's is the same method on the uniform grid. A method with the A² value policy (``a2_low``: values at ``a2_low`` bits, the
most attended ones in full precision, chosen causally at the mean payload bits ``vbits``; one-pass engine
only) is measured against the same method with uniform ``vbits``-bit values: at most the same payload bits
(the policy's running budget may leave some unspent; ``value_payload`` reports what it spent).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from atlas_core import interval
from atlas_core.cache import cache_dir, cache_key, cached, tokens_hash
from atlas_core.claims import removal_verdict
from atlas_core.interval import Bootstrap, Estimate
from atlas_core.kvquant.cache import KVQuantConfig
from atlas_core.kvquant.decode import decode_nll
from atlas_core.kvquant.headq import (SideCode, calibrate, calibrate_side, key_error_covariances, query_covariances,
                                      top_eigenvectors, whitened_bases)
from atlas_core.kvquant.onepass import onepass_nll, prefill_caches
from atlas_core.kvquant.policy import ValuePolicy
from atlas_core.kvquant.quant import QuantSpec, check_bits
from atlas_core.kvquant.transform import GRIDS, TransformCode, TransformSpec, check_budget
from atlas_core.kvquant.transform import calibrate as calibrate_transform
from atlas_core.models import LoadedModel

METHODS = ("fp", "per-token", "per-channel", "kivi", "headq", "query-tc", "hadamard", "random-rotation")
TRANSFORMS = {"query-tc": ("query", "waterfill"), "hadamard": ("hadamard", "uniform"), "random-rotation": ("random", "uniform")}
GRID_METHODS = ("kivi", "per-channel", *TRANSFORMS)  # methods whose per-channel keys may take a lloyd-max grid
BASES = ("per-token", "per-channel", "kivi")  # HeadQ's base key quantizers
CONTROLS = ("none", "wrong-sign", "random-basis", "key-pca")
SIDE_BASES = ("query", "whitened")  # HeadQ's side-code basis: top eigenvectors of Σ_q, or headq.whitened_bases
ENGINES = ("onepass", "decode")


@dataclass(frozen=True, kw_only=True)
class KVMethod:
    """A KV-cache quantization method and its settings.

    Values are not quantized when ``vbits`` is None (K-only), as ``KVQuantConfig.value`` None says.
    """

    method: str = "per-token"
    kbits: int = 2
    vbits: int | None = None  # None: values in full precision (K-only)
    group: int = 32  # channels per group (per-token) or tokens per group (KIVI keys)
    residual: int | None = None  # fp tokens (see the module docstring); None: 0, or ``group`` under KIVI's rule
    rank: int = 8  # HeadQ side-code rank r
    side_bits: int = 4  # HeadQ side-code bits b′
    control: str = "none"  # HeadQ controls: wrong-sign, random-basis, key-pca
    pre_rope: bool = False
    seed: int = 0  # the random-basis control; the hadamard signs and the random rotation
    base: str = "per-token"  # HeadQ's base key quantizer: one of BASES
    basis: str = "query"  # HeadQ's side-code basis: one of SIDE_BASES ("whitened": headq.whitened_bases)
    a2_low: int | None = None  # A² value policy: most values at a2_low bits, the most attended in fp, mean payload vbits
    grid: str = "uniform"  # per-channel key grid: one of transform.GRIDS (not "uniform": GRID_METHODS only)
    budget: float | None = None  # query-tc: bits per key element; None: kbits + 32/group (per-channel kbits' storage)

    def __post_init__(self):
        if self.residual is None:  # frozen: resolved once here, so equal settings compare equal
            object.__setattr__(self, "residual", self.group if self.key_base() == "kivi" else 0)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {self.control!r}")
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")
        if self.control != "none" and self.method != "headq":
            raise ValueError(f"--control {self.control} applies to --method headq only")
        if self.basis not in SIDE_BASES:
            raise ValueError(f"basis must be one of {SIDE_BASES}, got {self.basis!r}")
        if self.basis != "query" and (self.method != "headq" or self.control != "none"):
            raise ValueError(f"--basis {self.basis} is a HeadQ variant: it applies to --method headq with --control none only")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid != "uniform" and self.method not in GRID_METHODS:
            raise ValueError(f"--grid {self.grid} applies to --method {', '.join(GRID_METHODS)} (per-channel keys) only")
        if self.budget is not None:
            if self.method != "query-tc":
                raise ValueError("--budget applies to --method query-tc only")
            check_budget(self.budget)
            self.transform_spec()  # the budget's ceiling depends on the grid and group (TransformSpec's rule)
        check_bits(self.kbits, "kbits")
        if self.vbits is not None:
            check_bits(self.vbits, "vbits")
        check_bits(self.side_bits, "side_bits")
        for name in ("group", "rank", "seed", "residual"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in ("seed", "residual") else 1):
                raise ValueError(f"{name} must be an integer ≥ {0 if name in ('seed', 'residual') else 1}, got {value!r}")
        if self.a2_low is not None:
            check_bits(self.a2_low, "a2_low")
            if self.method == "fp" or self.vbits is None or not self.a2_low < self.vbits:
                raise ValueError(f"the A² value policy needs quantized values (--vbits 1..8) and 1 ≤ low bits < --vbits, "
                                 f"got low {self.a2_low}, vbits {self.vbits}")
        if self.key_base() == "kivi" and (self.residual < 1 or self.residual % self.group):
            raise ValueError(f"KIVI's residual must be a positive multiple of --group ({self.group}), got {self.residual} "
                             "(KIVI's code asserts residual_length % group_size == 0)")

    def key_base(self) -> str:
        """The key quantizer and window rule: per-token, per-channel or kivi (HeadQ's base, or the method)."""
        if self.method in TRANSFORMS:
            return "kivi"
        return self.base if self.method == "headq" else self.method

    def label(self) -> str:
        if self.method == "fp":
            return "fp"
        values = "dense V" if self.vbits is None else f"V{self.vbits}"
        text = f"{self.method} K{self.kbits} {values} g{self.group}"
        if self.residual:
            text += f" R{self.residual}"
        if self.method == "headq":
            text += f" r{self.rank}b{self.side_bits}" + ("" if self.control == "none" else f" ({self.control})")
            text += "" if self.basis == "query" else f" {self.basis}"
            text += "" if self.base == "per-token" else f" on {self.base}"
        text += "" if self.a2_low is None else f" A²({self.a2_low}b/fp)"
        text += "" if self.budget is None else f" budget {self.budget:g}"
        text += "" if self.grid == "uniform" else f" {self.grid}"
        text += f" seed {self.seed}" if self.method in ("hadamard", "random-rotation") and self.seed else ""
        return text + (" pre-RoPE" if self.pre_rope else "")

    def kv_config(self, transform: TransformCode | None = None) -> KVQuantConfig | None:
        """Cache settings (memoised history for speed; the stored codes are the same), None for fp.

        ``transform``: the calibrated key transform code (``transform_code``) of a method that has one.
        """
        if self.method == "fp":
            return None
        base = self.key_base()
        key = QuantSpec(bits=self.kbits, group=self.group, axis="token" if base == "per-token" else "channel")
        value = None if self.vbits is None else QuantSpec(bits=self.vbits, group=self.group, axis="token")
        rule = "kivi" if base == "kivi" else "recent"
        return KVQuantConfig(key=key, value=value, residual=self.residual, pre_rope=self.pre_rope, memo=True,
                             residual_rule=rule, key_transform=transform)

    def transform_spec(self) -> TransformSpec | None:
        """The key transform code this method stores keys with (``transform.py``), None for the plain quantizers.

        query-tc: query basis, water-filled bits; hadamard / random-rotation: that rotation, ``kbits`` everywhere;
        kivi / per-channel with a lloyd-max grid: no rotation, ``kbits`` everywhere, the learned grid.
        """
        rotation, allocation = TRANSFORMS.get(self.method, ("identity", "uniform"))
        if self.method not in TRANSFORMS and self.grid == "uniform":
            return None
        if self.method not in GRID_METHODS:
            return None
        return TransformSpec(rotation=rotation, allocation=allocation, grid=self.grid, bits=self.kbits, group=self.group,
                             budget=self.budget, seed=self.seed)

    def needs_calibration(self) -> bool:
        """Whether the method needs calibration blocks (HeadQ's bases; a query basis, water-filling or a learned grid)."""
        spec = self.transform_spec()
        return self.method == "headq" or (spec is not None and spec.needs_calibration())

    def check_head(self, d_head: int) -> None:
        """Raise ValueError if this method cannot run on heads ``d_head`` wide.

        Per-token groups must divide d_head (a group wider than the head is the whole head), and HeadQ's
        side-code rank is at most d_head (a frame of r orthonormal directions in d_head dimensions).
        """
        cfg = self.kv_config()
        for spec in (None,) if cfg is None else (cfg.key, cfg.value):
            if spec is not None and spec.axis == "token":
                spec.channel_group(d_head)
        if self.method == "headq" and self.rank > d_head:
            raise ValueError(f"rank ({self.rank}) must be at most d_head ({d_head})")
        if self.method == "hadamard" and d_head & (d_head - 1):
            raise ValueError(f"--method hadamard needs d_head a power of two, got {d_head}")

    def check_block(self, seq_len: int, name: str = "seq_len") -> None:
        """Raise ValueError if blocks of ``seq_len`` tokens leave nothing quantized: with ``residual`` ≥ T the
        most recent R tokens are every token, and the method would measure the fp cache under its name.

        Args:
            seq_len: tokens per block (or cached tokens) T; name: what the caller calls T.
        """
        if self.method != "fp" and self.residual >= seq_len:
            why = " (KIVI's residual is its group unless given)" if self.key_base() == "kivi" else ""
            raise ValueError(f"residual ({self.residual}){why} must be below {name} ({seq_len}): with R ≥ T every token "
                             "stays in full precision")

    def value_policy(self) -> ValuePolicy | None:
        """The causal A² value policy for the one-pass engine, or None for uniform values."""
        return None if self.a2_low is None else ValuePolicy(low=self.a2_low)

    def canonical(self) -> KVMethod:
        """The same method with the settings it ignores reset to their defaults (a key for memoising runs)."""
        default = KVMethod()
        if self.method == "fp":
            return KVMethod(method="fp")
        if self.method in ("hadamard", "random-rotation"):  # their rotation is drawn from the seed
            return replace(self, rank=default.rank, side_bits=default.side_bits, base=default.base)
        if self.method != "headq":
            return replace(self, rank=default.rank, side_bits=default.side_bits, seed=default.seed, base=default.base)
        return self if self.control == "random-basis" else replace(self, seed=default.seed)

    def baseline(self) -> KVMethod | None:
        """The same-bits method this one is measured against (None for fp and per-token); with the A² value
        policy, the same method with uniform values at no fewer payload bits."""
        if self.a2_low is not None:
            return replace(self, a2_low=None).canonical()
        if self.method in TRANSFORMS:
            return replace(self, method="kivi", grid="uniform", budget=None).canonical()
        if self.grid != "uniform":
            return replace(self, grid="uniform").canonical()
        if self.method in ("headq", "per-channel", "kivi"):
            base = self.base if self.method == "headq" else "per-token"
            return replace(self, method=base, control="none", basis="query").canonical()
        return None


@dataclass(frozen=True, kw_only=True)
class EvalSetup:
    """How decode perplexity is measured: the engine, the prefill, blocks per forward and the bootstrap.

    ``engine``: "onepass" (one forward per batch of blocks; ``atlas_core.kvquant.onepass``) or "decode"
    (token by token through ``QuantizedKVCache``; ``decode.decode_nll``), the reference that tests hold the
    one-pass engine equal to. Both score the same tokens (prefill + 1 … T − 1 of each block).
    """

    engine: str = "onepass"
    prefill: int = 128  # tokens of each block prefilled (attending in full precision) before scoring starts
    batch: int = 4  # blocks per forward (speed and memory only: every block is scored alike)
    boot: Bootstrap = field(default_factory=Bootstrap)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.prefill < 1 or self.batch < 1:
            raise ValueError(f"prefill and batch must be ≥ 1, got {self.prefill} and {self.batch}")

    def check_block(self, seq_len: int, names: tuple[str, str] = ("prefill", "seq_len")) -> None:
        """Raise ValueError unless blocks of ``seq_len`` tokens leave a token to decode and score after the prefill.

        Both engines score tokens prefill + 1 … T − 1 of a block, so the prefill is at most T − 2.

        Args:
            seq_len: tokens per block T; names: what the caller calls the prefill and T (flags, parameters).
        """
        if self.prefill > seq_len - 2:
            raise ValueError(f"{names[0]} ({self.prefill}) must be in 1..{seq_len - 2} for {names[1]} {seq_len}: at least "
                             "one token is decoded and scored after it")

    def check(self, method: KVMethod) -> None:
        """Raise ValueError if this setup cannot measure ``method`` (the A² policy needs the one-pass engine)."""
        if method.a2_low is not None and self.engine != "onepass":
            raise ValueError(f"{method.label()}: the A² value policy needs attention weights: only the onepass engine runs it")

    def nll_function(self):
        """The engine's ``(model, blocks, kv, side, prefill) -> (nll (batch, T − prefill − 1), bits)``."""
        if self.engine == "decode":
            return decode_nll
        return onepass_nll


def side_code(lm: LoadedModel, method: KVMethod, calib: torch.Tensor, bases: dict | None = None,
              decoders: dict | None = None) -> SideCode | None:
    """HeadQ side-code settings with bases calibrated on ``calib`` (block, token), or given ``bases``.

    ``bases`` (and ``decoders``, the whitened basis's) may hold more columns than the rank (the top
    eigenvectors first); they are cut to the rank. ``decoders`` None: each basis decodes itself.

    Raises:
        ValueError: bases with fewer columns than the rank; the whitened basis given without its decoders.
    """
    if method.method != "headq":
        return None
    if bases is None:
        kind = {"random-basis": "random", "key-pca": "key-pca"}.get(method.control, method.basis)
        bases, decoders = calibrate_side(lm, calib, method.rank, kind, method.kv_config().key, method.seed, method.pre_rope)
    if (method.basis == "whitened") != (decoders is not None):
        raise ValueError("the whitened basis, and only it, decodes with decoders apart from its encoders")
    cut = {layer: b[..., : method.rank] for layer, b in bases.items()}
    if next(iter(cut.values())).shape[-1] < method.rank:
        raise ValueError(f"the bases have fewer than rank {method.rank} columns")
    decoders = None if decoders is None else {layer: d[..., : method.rank] for layer, d in decoders.items()}
    return SideCode(bases=cut, bits=method.side_bits, sign=-1.0 if method.control == "wrong-sign" else 1.0,
                    decoders=decoders)


def transform_code(lm: LoadedModel, method: KVMethod, calib: torch.Tensor | None,
                   sigma_q: dict | None = None) -> TransformCode | None:
    """The method's key transform code calibrated on ``calib`` (block, token), or None for a plain quantizer.

    Args:
        sigma_q: {layer: (kv_head, d_head, d_head)} from ``calib``, if at hand: Σ_q (``headq.query_covariances``)
            post-RoPE, the RoPE-averaged Σ̄ (``rope.averaged_query_covariances``) pre-RoPE.
    Raises:
        ValueError: calibration blocks are needed and missing.
    """
    spec = method.transform_spec()
    if spec is None:
        return None
    return calibrate_transform(lm, calib, spec, sigma_q, method.pre_rope)


def evaluate(lm: LoadedModel, blocks: torch.Tensor, method: KVMethod, side: SideCode | None = None,
             setup: EvalSetup = EvalSetup(), progress: bool = False, prefill_kv: list | None = None,
             transform: TransformCode | None = None) -> dict:
    """Decode-time NLL of ``method`` on evaluation blocks, and the bits its cache held.

    Args:
        blocks: (block, token) token ids of the evaluation split, fed ``setup.batch`` blocks at a time.
        side: HeadQ's side code (``side_code``); None for every other method.
        prefill_kv: the one-pass engine's fp prefill of ``blocks`` (``onepass.prefill_caches`` with
            ``setup.prefill`` and ``setup.batch``), shared by every method; None: computed per call.
        transform: the key transform code (``transform_code``) of a method that has one, else None.
    Returns:
        {"label", "nll": (block, token − prefill − 1) NLL in nats (float64), "ppl": ``Estimate`` (95%
        block-bootstrap interval), "bits_key", "bits_value": bits per key / value element measured from the
        bytes the cache held at the end (codes, scales, zeros, side codes, fp windows in the model's dtype;
        the fp cache's too), "value_payload": mean payload bits per value element (the A² policy's as spent, over
        all blocks; otherwise ``vbits``)}
    Raises:
        ValueError: pre-RoPE on GPT-2; HeadQ without its side code; a transform method without its code (or
            a code for another method); the A² policy under the decode engine; a prefill that leaves nothing to score.
    """
    if method.pre_rope and lm.spec.family == "gpt2":
        raise ValueError("GPT-2 has no RoPE: --pre-rope does not apply")
    if (method.method == "headq") != (side is not None):
        raise ValueError(f"{method.label()}: a side code is needed by HeadQ and by no other method (see side_code)")
    if (method.transform_spec() is not None) != (transform is not None):
        raise ValueError(f"{method.label()}: a key transform code is needed by query-tc, hadamard, random-rotation and "
                         "the lloyd-max grid, and by no other method (see transform_code)")
    setup.check(method)
    nll_of, extra = setup.nll_function(), {}
    if method.a2_low is not None:
        extra["value_policy"] = method.value_policy()
    if setup.engine == "onepass":
        extra["batch_size"] = setup.batch  # one call: the bits are measured once, not per batch
        extra["prefill_kv"] = prefill_kv
    step = len(blocks) if setup.engine == "onepass" else setup.batch  # decode: batch by batch through the cache
    parts, bits, payload = [], None, []
    for start in range(0, len(blocks), step):
        nll, held = nll_of(lm.model, blocks[start : start + step], method.kv_config(transform), side, setup.prefill,
                           progress=progress, **extra)  # (batch, token − prefill − 1)
        parts.append(nll.double())
        bits = bits or held  # blocks of one length: every batch's cache holds the same bits per element
        payload.append(held.get("value_payload", method.vbits or math.nan) * len(nll))
    nll = torch.cat(parts)
    spent = sum(payload) / len(nll)  # mean payload bits per value (A²: as spent; else vbits; None: fp values)
    return {"label": method.label(), "nll": nll, "ppl": interval.perplexity(nll, setup.boot),
            "bits_key": bits["key"], "bits_value": bits["value"],
            "value_payload": None if method.vbits is None else spent}


def code_version() -> str:
    """SHA-256 of the kvquant package's source files: a stored evaluation is reused only by the code that made it."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


class Runs:
    """Evaluations of many methods on the same evaluation blocks, each computed once.

    The fp reference is evaluated once, and HeadQ's calibration (Σ_q and its eigenvectors; the key-PCA
    bases per base quantizer) once from the calibration blocks, cut to each method's rank; so a sweep
    (a chapter, or ``compare``'s method, fp and baseline) pays for each once. Methods are memoised by
    ``KVMethod.canonical``. With ``store``, the fp reference's NLL, Σ_q and every method's evaluation are also
    kept on disk, keyed by the model's weights, the tokens and the settings (SPEC §12; a method's evaluation also
    by the calibration tokens and ``code_version``, the hash of the kvquant source), so a later run on the same
    text skips them.
    Under the one-pass engine, the blocks' fp prefill (update 0's keys/values, the same for every method)
    is computed once and held (``onepass.prefill_caches``; smollm2-135m, 32 blocks × prefill 128, fp32:
    2 · 30 layers · 3 KV heads · 64 · 128 · 4 B ≈ 5.9 MB a block, 189 MB in all), so each method runs only
    the rest of its blocks.
    """

    def __init__(self, lm: LoadedModel, eval_blocks: torch.Tensor, calib: torch.Tensor | None = None,
                 setup: EvalSetup = EvalSetup(), progress: bool = False, store: bool = False):
        self.lm, self.eval_blocks, self.calib, self.setup, self.progress = lm, eval_blocks, calib, setup, progress
        self.store = store  # keep the fp reference, Σ_q and each evaluation on disk (SPEC §12), for later runs
        self.done: dict[KVMethod, dict] = {}
        self._sigma_q: dict | None = None
        self._bases: dict[tuple, dict] = {}
        self._decoders: dict[tuple, dict] = {}  # the whitened basis's decoders, keyed as ``_bases``
        self._transforms: dict[tuple, TransformCode] = {}
        self._prefill_kv: list | None = None
        self._keyed: dict | None = None  # the store's weights fingerprint and code version, computed once

    def prefill_kv(self) -> list | None:
        """The evaluation blocks' fp prefill, one ``DynamicCache`` per batch (once; None under the decode engine)."""
        if self.setup.engine != "onepass":
            return None
        if self._prefill_kv is None:
            self._prefill_kv = prefill_caches(self.lm.model, self.eval_blocks, self.setup.prefill, self.setup.batch)
        return self._prefill_kv

    def _stored(self, kind: str, blocks: torch.Tensor, compute, **fields):
        """``compute()``, or its value from the disk cache when ``store`` is set.

        Key (SPEC §12): ``kind``, the model's name and weights fingerprint, the tokens, ``fields`` and the
        library cache version (``cache.cache_key``); written atomically with its SHA-256 and verified on read
        (``cache.cached``), so a half-written or damaged file is rebuilt, never used.
        """
        if not self.store:
            return compute()
        key = cache_key(kind=kind, model=self.lm.spec.name, weights=self._key_parts()["weights"],
                        tokens=tokens_hash(blocks), **fields)
        path = cache_dir("kvquant") / f"{kind}-{key}.pt"
        return cached(path, compute, torch.save, lambda p: torch.load(p, weights_only=True), f"kvquant {kind}")

    def _key_parts(self) -> dict:
        """{"weights": the model's fingerprint, "code": ``code_version()``}, computed once per ``Runs`` (each is a
        pass over every parameter or every source file; a sweep looks up dozens of stored evaluations)."""
        if self._keyed is None:
            from atlas_core.clouds import weights_fingerprint

            self._keyed = {"weights": weights_fingerprint(self.lm.model), "code": code_version()}
        return self._keyed

    def sigma_q(self) -> dict[int, torch.Tensor]:
        """Σ_q of every layer, {layer: (kv_head, d_head, d_head)}, from the calibration blocks (once)."""
        if self._sigma_q is None:
            if self.calib is None:
                raise ValueError("HeadQ needs calibration blocks (the calib split)")
            self._sigma_q = self._stored("sigma-q", self.calib, lambda: query_covariances(self.lm, self.calib))
        return self._sigma_q

    def bases(self, method: KVMethod) -> dict[int, torch.Tensor]:
        """HeadQ's (or a control's) bases {layer: (kv_head, d_head, r ≥ rank)}, computed once per kind."""
        d_head = self.lm.spec.d_head
        if method.basis == "whitened":
            key = ("whitened", method.kv_config().key, method.pre_rope)
        elif method.control in ("none", "wrong-sign"):
            key = ("query",)
        elif method.control == "key-pca":
            key = ("key-pca", method.kv_config().key, method.pre_rope)
        else:
            key = ("random", method.rank, method.seed)
        if key not in self._bases:
            if key[0] == "query":
                self._bases[key] = {l: top_eigenvectors(s, d_head) for l, s in self.sigma_q().items()}
            elif key[0] == "whitened":  # Σ_q shared with the query basis; Σ_δ under this base quantizer
                errors = key_error_covariances(self.lm, self.calib, key[1], method.pre_rope)
                pairs = {l: whitened_bases(s, errors[l], d_head) for l, s in self.sigma_q().items()}
                self._bases[key] = {l: e for l, (e, _) in pairs.items()}
                self._decoders[key] = {l: d for l, (_, d) in pairs.items()}
            else:
                if self.calib is None:
                    raise ValueError("HeadQ needs calibration blocks (the calib split)")
                rank = method.rank if key[0] == "random" else d_head
                kind = "random" if key[0] == "random" else "key-pca"
                self._bases[key] = calibrate(self.lm, self.calib, rank, kind, method.kv_config().key, method.seed,
                                             method.pre_rope)
        return self._bases[key]

    def decoders(self, method: KVMethod) -> dict[int, torch.Tensor] | None:
        """The whitened basis's decoders {layer: (kv_head, d_head, d_head)} (computed with ``bases``); None for
        the orthonormal bases, which decode themselves."""
        if method.basis != "whitened":
            return None
        self.bases(method)
        return self._decoders[("whitened", method.kv_config().key, method.pre_rope)]

    def transform(self, method: KVMethod) -> TransformCode | None:
        """The method's key transform code, calibrated once per (transform spec, pre-RoPE); Σ_q shared with HeadQ."""
        spec = method.transform_spec()
        if spec is None:
            return None
        key = (spec, method.pre_rope)
        if key not in self._transforms:
            uses_sigma = spec.rotation == "query" or spec.allocation == "waterfill"
            sigma = None  # pre-RoPE: the RoPE-averaged covariance, computed by the calibration
            if uses_sigma and not method.pre_rope:
                sigma = self.sigma_q()
            self._transforms[key] = transform_code(self.lm, method, self.calib, sigma)
        return self._transforms[key]

    def __call__(self, method: KVMethod) -> dict:
        """``evaluate``'s result for ``method`` (memoised), with "method" (the canonical ``KVMethod``) added."""
        m = method.canonical()
        if m not in self.done:
            if m.method == "fp":  # the reference every comparison reads: kept on disk when ``store`` is set
                fp = lambda: evaluate(self.lm, self.eval_blocks, m, None, self.setup, self.progress)  # noqa: E731
                kept = self._stored("fp-nll", self.eval_blocks, lambda: {k: v for k, v in fp().items() if k != "ppl"},
                                    prefill=self.setup.prefill, engine=self.setup.engine)
                self.done[m] = kept | {"ppl": interval.perplexity(kept["nll"], self.setup.boot), "method": m}
            else:
                def run() -> dict:
                    side = side_code(self.lm, m, self.calib, self.bases(m), self.decoders(m)) if m.method == "headq" else None
                    done = evaluate(self.lm, self.eval_blocks, m, side, self.setup, self.progress, self.prefill_kv(),
                                    self.transform(m))
                    return {k: v for k, v in done.items() if k != "ppl"}

                # kept on disk too (``store``): keyed by the method, the calibration tokens and the kvquant code that
                # made it, so a sweep resumed or rerun later (a chapter, ``atlas kv-storage``) reuses only its own runs
                kept = self._stored("eval", self.eval_blocks, run, method=repr(m), calib=tokens_hash(self.calib),
                                    prefill=self.setup.prefill, engine=self.setup.engine,
                                    code=self._key_parts()["code"])
                self.done[m] = kept | {"ppl": interval.perplexity(kept["nll"], self.setup.boot), "method": m}
        return self.done[m]

    def nll(self, method: KVMethod) -> torch.Tensor:
        """(block, token) NLL of ``method``."""
        return self(method)["nll"]

    def figures(self, method: KVMethod, baseline: KVMethod | None = None) -> dict[str, Estimate]:
        """Every figure of ``method`` beside fp and a baseline (default: its own), paired over the same blocks.

        Returns:
            {"ppl", "ppl_fp", "ratio_fp" (PPL / PPL_fp)} and, with a baseline, {"ppl_baseline",
            "difference_baseline" (PPL − PPL_baseline), "excess_removed" ((PPL_base − PPL)/(PPL_base − PPL_fp))};
            each an ``Estimate`` with its 95% interval.
        """
        boot, fp = self.setup.boot, self.nll(KVMethod(method="fp"))
        nll = self.nll(method)
        out = {"ppl": self(method)["ppl"], "ppl_fp": self(KVMethod(method="fp"))["ppl"], "ratio_fp": interval.ppl_ratio(nll, fp, boot)}
        baseline = baseline or method.baseline()
        if baseline is not None:
            base = self.nll(baseline)
            out |= {"ppl_baseline": self(baseline)["ppl"], "difference_baseline": interval.ppl_difference(nll, base, boot),
                    "excess_removed": interval.excess_removed(base, nll, fp, boot)}
        return out

    def compare(self, method: KVMethod) -> dict:
        """``method``, fp and the method's baseline (None for fp and per-token), their figures and the verdict.

        Returns:
            {"method", "fp", "baseline": ``evaluate`` results (or None), "figures": ``figures``, "verdict": a
            sentence from ``claims.removal_verdict`` (None without a baseline)}
        """
        if method.needs_calibration() and self.calib is None:
            raise ValueError(f"{method.label()} needs calibration blocks (the calib split)")
        figures = self.figures(method)
        baseline = method.baseline()
        return {"method": self(method), "fp": self(KVMethod(method="fp")), "baseline": baseline and self(baseline),
                "figures": figures,
                "verdict": baseline and removal_verdict(figures["excess_removed"], figures["difference_baseline"]).text}


def compare(lm: LoadedModel, eval_blocks: torch.Tensor, method: KVMethod, calib: torch.Tensor | None = None,
            setup: EvalSetup = EvalSetup(), progress: bool = False, store: bool = False) -> dict:
    """``Runs.compare`` for one method: the method, fp and its baseline on the same blocks, with intervals."""
    return Runs(lm, eval_blocks, calib, setup, progress, store).compare(method)

