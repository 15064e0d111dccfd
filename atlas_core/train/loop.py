"""``train``: AdamW with warm-up and cosine decay, held-out loss, checkpoints at fractions of training, resume.

A run lives in one folder::

    <out_dir>/run.json          the ArchConfig and TrainConfig (a later call must ask for the same run)
    <out_dir>/step-NNNNNN/      one checkpoint after NNNNNN optimizer steps (step-000000: the initialisation)
        arch.json, model.safetensors, tokenizer.json, tokenizer_config.json
        optimizer.pt            AdamW's state (moments and step counts)
        rng.pt                  torch's RNG states (nothing draws from them after initialisation; kept so a
                                resumed run starts from exactly the state an uninterrupted one had)
        state.json              step, tokens, the fractions it stands for, the history so far
        manifest.json           SHA-256 of every other file, written last
    <out_dir>/history.json      the finished run's history and checkpoints

Each checkpoint folder is written under a temporary name and renamed into place (``cache.atomic_path``), so
an interrupted write leaves no ``step-*`` folder. ``train`` on a folder that holds checkpoints of the same run
resumes from the latest intact one; the batches are a pure function of (seed, step) (``data``), the learning
rate a pure function of the step, and nothing else carries state, so on the CPU a run killed and restarted
ends bit-identical to one never interrupted (tested), provided it runs with the same number of threads (a
matrix product's rounding depends on how the work is split). On CUDA it is as deterministic as its kernels.

Source: the loop and its defaults follow nanoGPT (Karpathy, ``train.py``): AdamW (Loshchilov & Hutter 2019)
with betas (0.9, 0.95), weight decay on matrices and embeddings only, gradient clipping at norm 1, linear
warm-up then cosine decay to min_lr = lr/10 (Chinchilla, Hoffmann et al. 2022).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors

from atlas_core.cache import atomic_path, file_sha256, write_json
from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.eval import block_nll, token_nll
from atlas_core.progress import tqdm
from atlas_core.train import data
from atlas_core.train.config import ArchConfig, TrainConfig, check_pair, from_dict
from atlas_core.train.model import WEIGHTS_FILE, build_model, save_weights
from atlas_core.train.tokenizer import load_tokenizer

RUN_FILE = "run.json"
HISTORY_FILE = "history.json"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
EVAL_BATCH = 8  # held-out blocks per forward pass


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a run produced.

    history: one entry per evaluation, {"step", "tokens", "lr", "train_loss" (mean over the steps since the
        previous entry, None at step 0), "held_out_loss"} (losses in nats per token)
    checkpoints: {fraction: checkpoint folder}
    """

    out_dir: Path
    history: list[dict]
    checkpoints: dict[float, Path]


def resolve_device(device: str) -> torch.device:
    """"cpu", "cuda", or "auto" (CUDA when available).

    Raises:
        ValueError: "cuda" where torch sees no CUDA device.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device(device)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over round(warmup_fraction *
    n_steps) steps from lr/warmup to lr, then a cosine from lr down to min_lr at the last step (nanoGPT)."""
    warmup = round(cfg.warmup_fraction * cfg.n_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(cfg.n_steps - 1 - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on tensors of 2 or more dimensions (matrices, embeddings) and none on norms
    and biases (nanoGPT's ``configure_optimizers``)."""
    params = list({p.data_ptr(): p for p in model.parameters() if p.requires_grad}.values())  # tied once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)


def held_out_blocks(tokenizer, cfg: TrainConfig) -> torch.Tensor:
    """The first ``eval_blocks`` blocks of ``seq_len`` tokens of the eval split of ``cfg.corpus``, no BOS;
    (block, seq_len). These are the blocks ``corpus.token_blocks`` gives any chapter asking for that split."""
    spec = BlockSpec(corpus=cfg.corpus, seq_len=cfg.seq_len, n_blocks=cfg.eval_blocks, split="eval", add_bos=False)
    return token_blocks(tokenizer, spec)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean next-token NLL in nats over ``blocks`` (block, token) (``eval.block_nll``), in float64."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return block_nll(model, blocks.to(device), EVAL_BATCH, progress=False).double().mean().item()
    finally:
        model.train(was_training)


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    """``<out_dir>/step-NNNNNN``."""
    return Path(out_dir) / f"step-{step:06d}"


def train(arch: ArchConfig, cfg: TrainConfig, out_dir: str | Path, resume: bool = True,
          progress: bool = True) -> TrainResult:
    """Train ``arch`` from scratch on ``cfg.corpus`` as ``cfg`` says, checkpointing into ``out_dir``.

    Args:
        arch, cfg: the model and the run (checked together: ``config.check_pair``).
        out_dir: the run's folder (created); a folder that holds this run's checkpoints is resumed from its latest.
        resume: False refuses a folder that already holds checkpoints instead of resuming.
        progress: show a progress bar (``progress.tqdm``, labelled with the running chapter).
    Returns:
        ``TrainResult`` (a finished run returns at once, from its last checkpoint).
    Raises:
        ValueError: a bad pair of configs; ``out_dir`` holds a different run, or checkpoints while ``resume`` is
            False; device "cuda" without CUDA.
        CorpusError: the corpus cannot be loaded or is too short for one window or the held-out blocks.
    """
    check_pair(arch, cfg)
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.corpus, arch.vocab_size)  # a corpus that cannot load fails before the folder is made
    stream = data.train_tokens(tokenizer, cfg.corpus)  # so does one too short for the held-out blocks: nothing half-written
    blocks = held_out_blocks(tokenizer, cfg)
    _claim(out_dir, arch, cfg)
    latest = latest_checkpoint(out_dir)
    if latest is not None and not resume:
        raise ValueError(f"{out_dir} already holds checkpoints of this run ({latest.name}); pass resume=True to "
                         "continue it, or choose an empty folder")
    model = build_model(arch, cfg.seed).to(device)
    optimizer = make_optimizer(model, cfg)
    history, start = [], 0
    if latest is not None:
        start, history = _restore(latest, model, optimizer, device)
    saves = _fractions_by_step(cfg)
    pending: list[float] = []  # training losses since the last history entry
    bar = tqdm(total=cfg.n_steps, initial=start, desc="train", disable=not progress, unit="step")
    for step in range(start, cfg.n_steps + 1):
        if step > start or latest is None:  # a restored checkpoint already holds step `start`'s entry
            if step in saves or step % cfg.eval_every == 0 or step == cfg.n_steps:
                history.append(_entry(step, cfg, pending, held_out_loss(model, blocks)))
                pending = []
                bar.set_postfix(held_out=f"{history[-1]['held_out_loss']:.3f}")
            if step in saves:
                _save(checkpoint_dir(out_dir, step), model, optimizer, arch, tokenizer, step, cfg, saves[step], history)
        if step == cfg.n_steps:
            break
        pending.append(_step(model, optimizer, stream, step, cfg, device))
        bar.update(1)
    bar.close()
    result = TrainResult(out_dir=out_dir, history=history, checkpoints=_checkpoint_map(out_dir, cfg))
    write_json(out_dir / HISTORY_FILE, {"history": history,
                                        "checkpoints": {str(f): p.name for f, p in result.checkpoints.items()},
                                        "n_train_tokens": len(stream), "epochs": data.epochs(cfg.n_steps * cfg.batch_size * cfg.seq_len, len(stream))})
    return result


def _step(model, optimizer, stream, step: int, cfg: TrainConfig, device) -> float:
    """One optimizer step on batch ``step``; returns its training loss (nats per token).

    The loss is the mean of ``eval.token_nll`` (the library's one NLL, exact to fp32 rounding), so training
    and held-out losses are the same quantity."""
    inputs, targets = (t.to(device) for t in data.batch(stream, cfg.seed, step, cfg.batch_size, cfg.seq_len))
    logits = model(input_ids=inputs, use_cache=False).logits  # (batch, seq_len, vocab)
    loss = token_nll(logits, targets).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _entry(step: int, cfg: TrainConfig, pending: list[float], held_out: float) -> dict:
    return {"step": step, "tokens": step * cfg.batch_size * cfg.seq_len,
            "lr": lr_at(step, cfg) if step < cfg.n_steps else cfg.min_lr,
            "train_loss": sum(pending) / len(pending) if pending else None, "held_out_loss": held_out}


def _fractions_by_step(cfg: TrainConfig) -> dict[int, list[float]]:
    """{step: the checkpoint fractions saved after it} (two fractions may round to one step)."""
    out: dict[int, list[float]] = {}
    for fraction, step in cfg.checkpoint_steps().items():
        out.setdefault(step, []).append(float(fraction))
    return out


def _checkpoint_map(out_dir: Path, cfg: TrainConfig) -> dict[float, Path]:
    return {float(f): checkpoint_dir(out_dir, s) for f, s in cfg.checkpoint_steps().items()}


def _run_record(arch: ArchConfig, cfg: TrainConfig) -> dict:
    """What identifies a run: both configs, the device left out (a run may resume on another device)."""
    return {"arch": arch.as_dict(), "train": {k: v for k, v in cfg.as_dict().items() if k != "device"}}


def _claim(out_dir: Path, arch: ArchConfig, cfg: TrainConfig) -> None:
    """Write ``run.json`` into a new run folder, or check that an existing one records the same run.

    Raises:
        ValueError: the folder records a different run (the first differing field is named).
    """
    record = json.loads(json.dumps(_run_record(arch, cfg)))  # tuples as lists, as read back
    path = out_dir / RUN_FILE
    if path.is_file():
        held = json.loads(path.read_text())
        if held != record:
            diff = next((f"{part}.{k}" for part in ("arch", "train") for k in record[part]
                         if held.get(part, {}).get(k) != record[part][k]), "its configuration")
            raise ValueError(f"{out_dir} holds a different run ({diff} differs); choose another folder for this one")
        return
    if out_dir.is_dir() and any(out_dir.glob("step-*")):
        raise ValueError(f"{out_dir} holds checkpoints but no {RUN_FILE}; choose another folder")
    write_json(path, record)


def _save(folder: Path, model, optimizer, arch: ArchConfig, tokenizer, step: int, cfg: TrainConfig,
          fractions: list[float], history: list[dict]) -> None:
    """Write one checkpoint atomically (module docstring); its manifest last."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_weights(model, arch, tmp)
        tokenizer.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / RNG_FILE)
        state = {"step": step, "tokens": step * cfg.batch_size * cfg.seq_len, "fractions": fractions,
                 "n_steps": cfg.n_steps, "history": history}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, allow_nan=False) + "\n")
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST_FILE).write_text(json.dumps(files, indent=1) + "\n")


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted (no manifest, a file missing or not matching it), or None."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return "has no readable manifest"
    for name, digest in files.items():
        if not (folder / name).is_file() or file_sha256(folder / name) != digest:
            return f"has a missing or damaged {name}"
    return None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint with the most steps whose files match its manifest (damaged ones are named on stderr
    and skipped), or None."""
    for folder in sorted(Path(out_dir).glob("step-*"), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        print(f"[atlas] checkpoint {folder} {problem}; resuming from an earlier one", file=sys.stderr)
    return None


def _restore(folder: Path, model, optimizer, device) -> tuple[int, list[dict]]:
    """Load a checkpoint's weights, optimizer and RNG state into ``model`` and ``optimizer``; (step, history)."""
    load_safetensors(model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True))
    rng = torch.load(folder / RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((folder / STATE_FILE).read_text())
    return state["step"], state["history"]


def read_configs(out_dir: str | Path) -> tuple[ArchConfig, TrainConfig]:
    """The ``ArchConfig`` and ``TrainConfig`` a run folder records (device: "cpu").

    Raises:
        FileNotFoundError: no ``run.json`` in the folder.
    """
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} is not a training run: it has no {RUN_FILE}")
    record = json.loads(path.read_text())
    return from_dict(ArchConfig, record["arch"]), from_dict(TrainConfig, record["train"])


__all__ = ["TrainResult", "checkpoint_dir", "checkpoint_problem", "held_out_blocks", "held_out_loss",
           "latest_checkpoint", "lr_at", "make_optimizer", "read_configs", "resolve_device", "train"]
