"""What a training run is: the architecture (``ArchConfig``), the run (``TrainConfig``) and the ablation variants.

Both configs are frozen keyword-only dataclasses that check themselves on construction; a bad field raises
``ValueError`` with one line naming the field and what to do. ``n_parameters`` counts a model from its
config alone (``tests/test_train.py`` holds it equal to the built model's count), and ``match_d_ff`` picks
the MLP width that brings a config to a target count, so every variant of ``variants`` has the same number
of parameters: the MLP absorbs what a variant adds to or takes from attention.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

POSITIONS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
DEVICES = ("cpu", "cuda", "auto")
D_HEADS = (32, 64, 128, 256)  # the d_head axis, at a fixed number of heads


def _positive_int(obj, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; set {name}= a whole number of at least 1")


def _positive_float(obj, name: str, allow_zero: bool = False) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "above 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _choice(obj, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    """A Llama-style decoder: pre-norm blocks of attention and a SwiGLU MLP, tied input/output embeddings.

    Attention has ``n_heads`` query heads of width ``d_head`` sharing ``n_kv_heads`` key/value heads
    (``n_kv_heads == n_heads``: MHA; 1: MQA; between: GQA), so its width ``n_heads * d_head`` need not equal
    ``d_model``. ``position`` "rope" rotates q and k (RoPE, base ``rope_theta``); "learned" adds a learned
    table of ``max_positions`` vectors to the token embeddings (GPT-2) and rotates nothing. ``norm`` is the
    pre-norm (and final norm) kind: RMSNorm (Llama) or LayerNorm with a bias (GPT-2).
    """

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_head: int = 32
    d_ff: int = 512  # SwiGLU hidden width (gate and up projections each d_model -> d_ff)
    vocab_size: int = 4096
    max_positions: int = 256  # longest sequence; the size of the learned table when position="learned"
    position: str = "rope"
    norm: str = "rmsnorm"
    rope_theta: float = 10000.0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse a config no model can be built from (called on construction; the CLI and chapter pre-check too).

        Raises:
            ValueError: a size that is not a positive integer, ``n_kv_heads`` not dividing ``n_heads``, an odd
                ``d_head`` under RoPE (it rotates pairs of coordinates), a vocabulary too small for a byte-level
                tokenizer (256 bytes + 1 special), an unknown ``position`` or ``norm``, or ``rope_theta`` <= 0.
        """
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_ff", "vocab_size", "max_positions"):
            _positive_int(self, name)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads must divide n_heads ({self.n_heads}), got {self.n_kv_heads}; "
                             f"use one of {[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}")
        _choice(self, "position", POSITIONS)
        _choice(self, "norm", NORMS)
        _positive_float(self, "rope_theta")
        if self.position == "rope" and self.d_head % 2:
            raise ValueError(f"d_head must be even under RoPE (it rotates pairs of coordinates), got {self.d_head}")
        if self.d_head % 2:  # learned positions are built on transformers' LlamaConfig, which checks RoPE's rule anyway
            raise ValueError(f"d_head must be even (the model is built on transformers' LlamaConfig, which requires it "
                             f"even with learned positions), got {self.d_head}")
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes and one special token), got {self.vocab_size}")

    @property
    def attn_width(self) -> int:
        """n_heads * d_head: the width of the concatenated query heads (the output projection's input)."""
        return self.n_heads * self.d_head

    def n_parameters(self) -> int:
        """The number of parameters of the model ``model.build_model`` makes from this config, counted from the
        config alone (tied embeddings once).

        Returns:
            vocab*d (tied embeddings) + [max_positions*d] + layers * (attention + MLP + 2 norms) + final norm, with
            attention = d*(n_heads + 2*n_kv_heads)*d_head + n_heads*d_head*d (no biases), MLP = 3*d*d_ff (SwiGLU)
            and a norm = d (RMSNorm) or 2d (LayerNorm: weight and bias).
        """
        d = self.d_model
        norm = d if self.norm == "rmsnorm" else 2 * d
        attention = d * (self.n_heads + 2 * self.n_kv_heads) * self.d_head + self.attn_width * d
        layer = attention + 3 * d * self.d_ff + 2 * norm
        positions = self.max_positions * d if self.position == "learned" else 0
        return self.vocab_size * d + positions + self.n_layers * layer + norm

    def replace(self, **changes) -> "ArchConfig":
        """A copy with ``changes`` applied (checked like any new config)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def match_d_ff(arch: ArchConfig, n_params: int) -> ArchConfig:
    """``arch`` with the MLP width that brings its parameter count nearest to ``n_params``.

    Each unit of d_ff holds 3 * d_model * n_layers parameters (SwiGLU's gate, up and down rows), so the match is
    exact to within half of that.

    Args:
        arch: the config to adjust (its d_ff is ignored).
        n_params: the target count.
    Returns:
        the adjusted config.
    Raises:
        ValueError: the target is below what the config holds with d_ff = 1 (attention and embeddings alone).
    """
    per_unit = 3 * arch.d_model * arch.n_layers
    fixed = arch.replace(d_ff=1).n_parameters() - per_unit
    d_ff = round((n_params - fixed) / per_unit)
    if d_ff < 1:
        raise ValueError(f"n_params {n_params} is below the {fixed + per_unit} parameters this config holds with "
                         "d_ff=1; raise the target or shrink attention or embeddings")
    return arch.replace(d_ff=d_ff)


def kv_head_choices(n_heads: int) -> tuple[int, ...]:
    """Every number of KV heads ``n_heads`` query heads can share, largest first (MHA ... MQA)."""
    return tuple(k for k in range(n_heads, 0, -1) if n_heads % k == 0)


def kv_name(n_heads: int, n_kv_heads: int) -> str:
    """"mha", "mqa" or "gqa<k>" (k KV heads)."""
    return "mha" if n_kv_heads == n_heads else "mqa" if n_kv_heads == 1 else f"gqa{n_kv_heads}"


def variants(base: ArchConfig = ArchConfig(), d_heads: tuple[int, ...] = D_HEADS) -> dict[str, ArchConfig]:
    """The ablation's variants of ``base``, each changing one axis, all at one parameter count.

    Axes: d_head over ``d_heads`` at the base's head count ("dhead<d>"); the number of KV heads over every
    divisor of n_heads ("mha", "gqa<k>", "mqa"); positions ("rope", "learned"); norm ("rmsnorm", "layernorm").
    A variant equal to the base on every axis is the base itself and appears once, as "base". The common
    count is the largest any variant holds at the base's d_ff; every variant's d_ff is then matched to it
    (``match_d_ff``), so the MLP absorbs the attention width a variant adds or removes. The whole count is
    matched, a learned position table included.

    Args:
        base: the shared architecture.
        d_heads: the d_head axis.
    Returns:
        {name: ArchConfig}, "base" first, then the axes in the order above.
    Raises:
        ValueError: a variant cannot reach the common count (see ``match_d_ff``), or a d_head is invalid.
    """
    raw = {"base": base}
    axes = ([(f"dhead{d}", {"d_head": d}) for d in d_heads]
            + [(kv_name(base.n_heads, k), {"n_kv_heads": k}) for k in kv_head_choices(base.n_heads)]
            + [(p, {"position": p}) for p in POSITIONS] + [(n, {"norm": n}) for n in NORMS])
    for name, change in axes:
        arch = base.replace(**change)
        if arch != base:
            raw[name] = arch
    target = max(a.n_parameters() for a in raw.values())
    return {name: match_d_ff(a, target) for name, a in raw.items()}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: token budget, batches, the AdamW schedule, checkpoints, held-out evaluation, device.

    Steps = tokens // (batch_size * seq_len). The learning rate warms up linearly over the first
    ``warmup_fraction`` of the steps to ``lr``, then decays along a cosine to ``min_lr`` at the last step
    (nanoGPT's schedule; min_lr = lr/10 as Chinchilla, Hoffmann et al. 2022). AdamW (Loshchilov & Hutter 2019)
    with betas (0.9, 0.95) and decoupled weight decay on matrices only, gradients clipped to norm ``grad_clip``
    (nanoGPT). Checkpoints are written after round(f * steps) updates for each f in ``checkpoints`` (0.0: the
    initialisation). The held-out loss is the mean next-token NLL on the first ``eval_blocks`` blocks of
    ``seq_len`` tokens of the eval split of ``corpus`` (``corpus.token_blocks``), every ``eval_every`` steps
    and at every checkpoint; the model trains only on that corpus's tokens after its eval split
    (``data.train_tokens``).
    """

    corpus: str = "plays"
    tokens: int = 1_000_000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoints: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)
    eval_every: int = 100
    eval_blocks: int = 16
    device: str = "cpu"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse a run that cannot be made (called on construction; the CLI and chapter pre-check too).

        Raises:
            ValueError: a non-positive size or rate, a budget of less than one step, min_lr above lr, a warm-up
                fraction outside [0, 1), betas outside [0, 1), a checkpoint fraction outside [0, 1], or an
                unknown device.
        """
        for name in ("tokens", "batch_size", "seq_len", "eval_every", "eval_blocks"):
            _positive_int(self, name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer of at least 0, got {self.seed!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (a token and its successor), got {self.seq_len}")
        if self.n_steps < 1:
            raise ValueError(f"tokens ({self.tokens}) must cover at least one step of batch_size * seq_len = "
                             f"{self.batch_size * self.seq_len} tokens; raise tokens or shrink the batch")
        for name in ("lr", "grad_clip"):
            _positive_float(self, name)
        for name in ("min_lr", "weight_decay"):
            _positive_float(self, name, allow_zero=True)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr}); lower min_lr")
        _positive_float(self, "warmup_fraction", allow_zero=True)
        if self.warmup_fraction >= 1:
            raise ValueError(f"warmup_fraction must be below 1, got {self.warmup_fraction}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.checkpoints or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1
                                           for f in self.checkpoints):
            raise ValueError(f"checkpoints must be fractions of training in [0, 1], got {self.checkpoints!r}")
        if 1.0 not in self.checkpoints:  # without it the trained weights are never saved and every rerun retrains the tail
            raise ValueError(f"checkpoints must include 1.0 (the end of training), got {self.checkpoints!r}")
        _choice(self, "device", DEVICES)
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"corpus must be a corpus name or a text file path, got {self.corpus!r}")

    @property
    def n_steps(self) -> int:
        """Optimizer steps in the run: tokens // (batch_size * seq_len)."""
        return self.tokens // (self.batch_size * self.seq_len)

    def checkpoint_steps(self) -> dict[float, int]:
        """{fraction: the step after which its checkpoint is written}, round(f * n_steps)."""
        return {f: round(f * self.n_steps) for f in self.checkpoints}

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (checked like any new config)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_pair(arch: ArchConfig, cfg: TrainConfig) -> None:
    """Refuse an architecture and a run that do not fit together.

    Raises:
        ValueError: seq_len longer than the architecture's max_positions.
    """
    if cfg.seq_len > arch.max_positions:
        raise ValueError(f"seq_len ({cfg.seq_len}) exceeds max_positions ({arch.max_positions}); "
                         "raise max_positions or shorten seq_len")


def from_dict(kind: type, fields: dict):
    """An ``ArchConfig`` or ``TrainConfig`` from a JSON object (lists become tuples).

    Raises:
        ValueError: a key the config does not have (named, with the valid ones), or a bad value (``check``).
    """
    if not isinstance(fields, dict):
        raise ValueError(f"a {kind.__name__} is a JSON object of its fields, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{kind.__name__} has no field {unknown[0]!r}; its fields are {', '.join(sorted(known))}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
