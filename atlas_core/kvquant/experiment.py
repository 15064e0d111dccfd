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
- ``headq`` (+ a control): side codes on top of a base key quantizer (``base``).

``evaluate`` runs decode-style perplexity through the cache; ``compare`` adds the fp reference and the
method's same-bits baseline and reports the fraction of excess perplexity removed.

Baselines: HeadQ's baseline is its own base quantizer without the side code (per-token keys by default,
or ``base="per-channel"``/``"kivi"``, at the same bits, group and residual); KIVI's and per-channel's is
per-token at the same bits and residual (so the fraction says how much of per-token's excess they remove);
per-token and fp have none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from atlas_core.kvquant.cache import KVQuantConfig
from atlas_core.kvquant.decode import decode_nll, excess_removed
from atlas_core.kvquant.headq import SideCode, calibrate
from atlas_core.kvquant.quant import QuantSpec
from atlas_core.models import LoadedModel

METHODS = ("fp", "per-token", "per-channel", "kivi", "headq")
BASES = ("per-token", "per-channel", "kivi")  # HeadQ's base key quantizers
CONTROLS = ("none", "wrong-sign", "random-basis", "key-pca")
DENSE = 16  # vbits=16: values kept in full precision (K-only)


@dataclass(frozen=True)
class KVMethod:
    """A KV-cache quantization method and its settings."""

    method: str = "per-token"
    kbits: int = 2
    vbits: int = DENSE  # 16: dense values (K-only)
    group: int = 32  # channels per group (per-token) or tokens per group (KIVI keys)
    residual: int | None = None  # fp tokens (see the module docstring); None: 0, or ``group`` under KIVI's rule
    rank: int = 8  # HeadQ side-code rank r
    side_bits: int = 4  # HeadQ side-code bits b′
    control: str = "none"  # HeadQ controls: wrong-sign, random-basis, key-pca
    pre_rope: bool = False
    seed: int = 0  # the random-basis control
    base: str = "per-token"  # HeadQ's base key quantizer: one of BASES

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
        if not (1 <= self.kbits <= 8 and (1 <= self.vbits <= 8 or self.vbits == DENSE)):
            raise ValueError(f"kbits must be 1..8 and vbits 1..8 or 16 (dense), got {self.kbits}, {self.vbits}")
        if self.rank < 1 or not 1 <= self.side_bits <= 8 or self.residual < 0:
            raise ValueError("rank must be ≥ 1, side bits 1..8 and residual ≥ 0")
        if self.key_base() == "kivi" and (self.residual < 1 or self.residual % self.group):
            raise ValueError(f"KIVI's residual must be a positive multiple of --group ({self.group}), got {self.residual} "
                             "(KIVI's code asserts residual_length % group_size == 0)")

    def key_base(self) -> str:
        """The key quantizer and window rule: per-token, per-channel or kivi (HeadQ's base, or the method)."""
        return self.base if self.method == "headq" else self.method

    def label(self) -> str:
        if self.method == "fp":
            return "fp"
        values = "dense V" if self.vbits == DENSE else f"V{self.vbits}"
        text = f"{self.method} K{self.kbits} {values} g{self.group}"
        if self.residual:
            text += f" R{self.residual}"
        if self.method == "headq":
            text += f" r{self.rank}b{self.side_bits}" + ("" if self.control == "none" else f" ({self.control})")
            text += "" if self.base == "per-token" else f" on {self.base}"
        return text + (" pre-RoPE" if self.pre_rope else "")

    def kv_config(self) -> KVQuantConfig | None:
        """Cache settings (memoised history for speed; the stored codes are the same), None for fp."""
        if self.method == "fp":
            return None
        base = self.key_base()
        key = QuantSpec(self.kbits, self.group, "token" if base == "per-token" else "channel")
        value = None if self.vbits == DENSE else QuantSpec(self.vbits, self.group, "token")
        rule = "kivi" if base == "kivi" else "recent"
        return KVQuantConfig(key, value, self.residual, pre_rope=self.pre_rope, memo=True, residual_rule=rule)

    def canonical(self) -> KVMethod:
        """The same method with the settings it ignores reset to their defaults (a key for memoising runs)."""
        default = KVMethod()
        if self.method == "fp":
            return KVMethod("fp")
        if self.method != "headq":
            return replace(self, rank=default.rank, side_bits=default.side_bits, seed=default.seed, base=default.base)
        return self if self.control == "random-basis" else replace(self, seed=default.seed)

    def baseline(self) -> KVMethod | None:
        """The same-bits method this one is measured against (None for fp and per-token)."""
        if self.method in ("headq", "per-channel", "kivi"):
            base = self.base if self.method == "headq" else "per-token"
            return replace(self, method=base, control="none").canonical()
        return None


def side_code(lm: LoadedModel, method: KVMethod, calib: torch.Tensor, bases: dict | None = None) -> SideCode | None:
    """HeadQ side-code settings with bases calibrated on ``calib`` (block, token), or given ``bases``.

    ``bases`` may hold more columns than the rank (the top eigenvectors first); they are cut to the rank.
    """
    if method.method != "headq":
        return None
    if bases is None:
        kind = {"random-basis": "random", "key-pca": "key-pca"}.get(method.control, "query")
        bases = calibrate(lm, calib, method.rank, kind, method.kv_config().key, method.seed)
    cut = {layer: b[..., : method.rank] for layer, b in bases.items()}
    if next(iter(cut.values())).shape[-1] < method.rank:
        raise ValueError(f"the bases have fewer than rank {method.rank} columns")
    return SideCode(cut, method.side_bits, -1.0 if method.control == "wrong-sign" else 1.0)


def evaluate(lm: LoadedModel, blocks: torch.Tensor, method: KVMethod, side: SideCode | None = None, prefill: int = 128, progress: bool = False) -> dict:
    """Decode perplexity of ``method`` on eval blocks (block, token) and the bits per key and value element
    its cache held at the end (measured from the bytes: codes, scales, zeros, side codes, fp windows in the
    model's dtype; the fp cache's too)."""
    if method.pre_rope and lm.spec.family == "gpt2":
        raise ValueError("GPT-2 has no RoPE: --pre-rope does not apply")
    nll, bits = decode_nll(lm.model, blocks, method.kv_config(), side, prefill, progress=progress)  # bits measured, fp too
    return {"label": method.label(), "ppl": math.exp(nll.double().mean().item()), "bits_key": bits["key"], "bits_value": bits["value"]}


def compare(lm: LoadedModel, eval_blocks: torch.Tensor, method: KVMethod, calib: torch.Tensor | None = None, prefill: int = 128, progress: bool = False) -> dict:
    """``evaluate`` for the method, fp and the method's baseline; the excess perplexity removed."""
    if method.method == "headq" and calib is None:
        raise ValueError("HeadQ needs calibration blocks (the calib split)")
    fp = evaluate(lm, eval_blocks, KVMethod("fp"), prefill=prefill, progress=progress)
    run = evaluate(lm, eval_blocks, method, side_code(lm, method, calib), prefill, progress)
    out = {"method": run, "fp": fp, "baseline": None, "excess_removed": None}
    if method.baseline() is not None:
        base = evaluate(lm, eval_blocks, method.baseline(), prefill=prefill, progress=progress)
        out["baseline"] = base
        out["excess_removed"] = excess_removed(base["ppl"], run["ppl"], fp["ppl"])
    return out
