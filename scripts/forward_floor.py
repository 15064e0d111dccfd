"""The least time a chapter can take on this machine: full-precision forwards of the tokens it must score.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python scripts/forward_floor.py \\
        --work kvquant=37x16384:300 sparse=2x16384:300 nqp=30x8192:600

Measures one thread's throughput of the model's plain forward (SDPA attention, logits included, no
quantization or selection at all) on ``--blocks`` × ``--seq-len`` tokens, then prints, for each
``NAME=RUNSxTOKENS[:TARGET_S]``, the floor RUNS × TOKENS / throughput and its ratio to the target. Any method
that changes every layer's keys, values or weights (a quantized cache, a sparse rule, a quantized model)
needs at least one such forward per configuration, so no engine can run a chapter below its floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from atlas_core import models  # noqa: E402
from atlas_core.zoo import DEFAULT_MODEL  # noqa: E402


def throughput(name: str, blocks: int, seq_len: int, repeats: int) -> float:
    """Tokens per second of the fp forward (best of ``repeats``), one block batch of (blocks, seq_len)."""
    lm = models.load_model(name, attn_implementation="sdpa")
    ids = torch.randint(0, lm.tokenizer.vocab_size, (blocks, seq_len), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.no_grad():
        lm.model(ids[:1, :32])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            lm.model(ids)
            best = min(best, time.perf_counter() - start)
    return blocks * seq_len / best


def parse_work(item: str) -> tuple[str, int, int, float | None]:
    """'kvquant=37x16384:300' -> ('kvquant', 37, 16384, 300.0)."""
    try:
        name, rest = item.split("=")
        rest, _, target = rest.partition(":")
        runs, tokens = rest.split("x")
        return name, int(runs), int(tokens), float(target) if target else None
    except ValueError:
        raise SystemExit(f"--work item {item!r} is not NAME=RUNSxTOKENS[:TARGET_S], e.g. kvquant=37x16384:300") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", nargs="*", default=[])
    args = p.parse_args(argv)
    work = [parse_work(w) for w in args.work]
    rate = throughput(args.model, args.blocks, args.seq_len, args.repeats)
    print(f"{args.model}: fp forward {rate:,.0f} tokens/s on {torch.get_num_threads()} thread(s) "
          f"({args.blocks} × {args.seq_len} tokens, best of {args.repeats})")
    for name, runs, tokens, target in work:
        floor = runs * tokens / rate
        versus = f"; target {target:.0f} s: floor/target = {floor / target:.2f}" if target else ""
        print(f"{name}: {runs} forwards × {tokens:,} tokens -> floor {floor:,.0f} s{versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
