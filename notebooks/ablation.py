# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Trained from scratch: what sets $O_h$
#
# ```{glue:md} ab_run_box
# :format: myst
# ```
#
# The source work {cite:p}`chancay2026atlas` asks which architectural component sets $O_h$, the mean
# overlap of the top-$k$ principal frames of attention heads' residual clouds, and proposes a
# matched-scale ablation over $d_\text{head}$, the number of KV heads (MHA, GQA, MQA), the position scheme
# (RoPE or learned absolute positions) and the norm (RMSNorm or LayerNorm), with the plateau intrinsic
# dimension as a possible mediator. It also reports models trained from scratch with $d_\text{head}$ =
# {glue:text}`ab_src_d_heads:s` at $O_h$ = {glue:text}`ab_src_o_h:s`, and $O_h$ =
# {glue:text}`ab_src_d64_10:s` at 10% of training against {glue:text}`ab_src_d64_end:s` at the end
# (the $d_\text{head}$ is not stated beside these two; 64 by their value). {doc}`The previous chapter <crossarch>` found every published value within
# a few hundredths of the overlap of random frames of the same size, a null that does not depend on
# training at all. This chapter turns that reading into a measurement: it trains small models from
# scratch, one per variant, and measures $O_h$ at initialisation, at 10% and 50% of training and at the
# end. If $O_h$ sits on its null at every checkpoint of every variant, $d_\text{head}$ and $k$ set $O_h$
# and training does not; a variant that moves off the null would be the first architectural effect.
#
# The models are Llama-style decoders (`atlas_core.train`): {glue:text}`ab_n_layers:d` layers,
# $d_\text{model}$ = {glue:text}`ab_d_model:d`, {glue:text}`ab_n_heads:d` query heads, a byte-level BPE
# vocabulary of {glue:text}`ab_vocab_size:,d` tokens fitted on the training text, tied embeddings. Each
# variant changes one axis of the base model and the MLP width absorbs what the change adds to or takes
# from attention, so the variants hold the same number of parameters to within one MLP column per layer
# ({glue:text}`ab_n_params:s`). Every run of one seed sees the same {glue:text}`ab_tokens:s` training
# tokens of the *plays* corpus in the same order, from the part of the text after its evaluation split; the clouds and the held-out perplexity come
# from that evaluation split, which training never touches. The chapter trains its own models: the run's
# `model` parameter (the book's default model) is not used, except to name the run.

# %% tags=["parameters"]
model = "smollm2-135m"  # not used: the chapter trains its own models (named in the run box only)
variants = ["base", "dhead64", "dhead128", "dhead256", "gqa2", "mqa", "learned", "layernorm"]
seeds = [0]  # initialisation and data-order seeds; every variant is trained once per seed
d_heads = [32, 64, 128, 256]  # the d_head axis; the first is the base model's
d_model = 128
n_layers = 4
n_heads = 4
vocab_size = 4096
tokens = 150000  # training tokens per run (8 matched variants of 3.4M parameters: about 10 minutes on 2 idle cores)
batch_size = 16
train_seq_len = 128
lr = 0.003
eval_blocks = 16  # held-out blocks of train_seq_len tokens for the perplexity
device = "cpu"  # cpu, cuda or auto
corpus = "plays"
k = 7
n_points = 1200
n_blocks = 12
seq_len = 128
n_boot = 2000
null_draws = 500
intra_null_draws = 100
results_dir = "results"

# %%
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from atlas_core.progress import tqdm  # names the running chapter

from atlas_core import claims
from atlas_core.ablation import (NULL_NAMES, checkpoint_title, measure_checkpoint, null_verdict, on_null,
                                 partial_correlation, unigram_perplexity, variant_title)
from atlas_core.cache import cache_dir, cache_key, file_sha256, jsonable, write_json
from atlas_core.figures import PALETTE, figsize
from atlas_core.geometry import haar_null
from atlas_core.glue import chapter_glue, estimate_text, glue_key as key, listing, number, plural, with_ci
from atlas_core.interval import SIG3, Bootstrap
from atlas_core.intrinsic import PLATEAU_DEPTH
from atlas_core.protocol import Protocol
from atlas_core.train.config import ArchConfig, TrainConfig, variants as make_variants
from atlas_core.train.loop import train
from atlas_core.train.data import train_tokens
from atlas_core.train.loop import held_out_blocks
from atlas_core.train.model import load_checkpoint
from atlas_core.train.tokenizer import load_tokenizer

g = chapter_glue("ab", chapter="ablation", model=f"{model} (it only names this run: the models are trained here from scratch)", corpus=corpus,
                 results_dir=results_dir)
base = ArchConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, d_head=d_heads[0],
                  vocab_size=vocab_size, max_positions=max(256, train_seq_len, seq_len))
table = make_variants(base, tuple(d_heads))
archs = {name: table[name] for name in variants}
run_cfg = TrainConfig(corpus=corpus, tokens=tokens, batch_size=batch_size, seq_len=train_seq_len, lr=lr, min_lr=lr / 10,
                      eval_blocks=eval_blocks, device=device)
CHECKPOINTS = run_cfg.checkpoints  # (0.0, 0.1, 0.5, 1.0): initialisation, 10%, 50%, the end
protocol = Protocol(corpora=(corpus,), k=k, k_range=(k,), n_points=n_points, n_blocks=n_blocks, seq_len=seq_len,
                    seeds=(0,), n_deep=1, n_boot=n_boot, null_draws=null_draws, intra_null_draws=intra_null_draws)
RULE = claims.OVERLAP_RULE
runs_root = cache_dir("train-runs")  # checkpoints: a folder per (variant, seed, configs), reused by any rerun
SAMPLE = f"{n_points:,} points per head from {plural(n_blocks, 'block')} of {seq_len} tokens, deepest layer"


def when(fraction: float) -> str:
    """A checkpoint's name: "init", "10%", "50%", "end"."""
    return "init" if fraction == 0 else "end" if fraction == 1 else f"{fraction:.0%}"


g("n_layers", n_layers)
g("d_model", d_model)
g("n_heads", n_heads)
g("vocab_size", vocab_size)
n_params = [archs[n].n_parameters() for n in variants]
g("n_params", f"{min(n_params):,}" if min(n_params) == max(n_params) else f"{min(n_params):,}–{max(n_params):,}")
src_scratch = claims.source("oh_scratch")
g("src_d_heads", listing([str(d) for d, _ in src_scratch]))
g("src_o_h", listing([f"{o:.{max(2, len(repr(o).split('.')[1]))}f}" for _, o in src_scratch]))  # as published: 0.40
g("src_d64_10", f"{claims.source('oh_scratch_d64_10'):g}")
g("src_d64_end", f"{claims.source('oh_scratch_d64_end'):g}")
g("plateau_depth", f"{PLATEAU_DEPTH:g}")
g("tokens", f"{tokens:,}")
g("n_variants", len(variants))
g("variants", listing(variants))
g("seeds", listing(seeds))
g("n_steps", run_cfg.n_steps)
g("device", device)
g("z_crit", RULE.z_crit)
g("margin", f"{RULE.margin:g}")

# %% [markdown]
# ## The variants and their training
#
# {numref}`tbl-ab-variants` lists the variants: {glue:text}`ab_variants:s`, each trained with seed(s)
# {glue:text}`ab_seeds:s` for {glue:text}`ab_n_steps:d` AdamW steps (warm-up, then cosine decay; batches
# of {glue:text}`ab_batch:s`). A run's folder (in the library's cache, named by the variant, the seed and
# a hash of both configurations) keeps its checkpoints, so a rerun with the same settings reads them
# instead of training again. Checkpoints are written after 0 steps (the initialisation), at 10%
# and 50% of the steps and at the end; each is loaded like any model of the book and measured by the
# source's protocol (`atlas_core.ablation.measure_checkpoint`): the $\varepsilon$ clouds,
# {glue:text}`ab_sample:s`, frames of rank $k$ = {glue:text}`ab_k:d`, the mean principal cosine over
# inter-KV-group pairs, a bootstrap CI over pairs, and the Haar null (random $k$-frames in
# $\mathbb{R}^{d_\text{head}}$ over the same number of pairs). Under multi-query attention every pair
# shares the one KV head; that headline is judged against the shared-value null instead (heads reading the
# same keys and values with independent queries, `atlas_core.intra_null`), as in {doc}`crossarch`. The
# TwoNN dimension of every head is measured in every layer; its mean over heads against relative depth
# gives the plateau (relative depth {glue:text}`ab_plateau_depth:s`) and the peak, as {doc}`atlas` reads them.

# %%
g("batch", f"{batch_size} × {train_seq_len} tokens")
g("k", k)
g("sample", SAMPLE)
start = time.perf_counter()
runs, results = {}, {}
for name in tqdm(variants, desc="variants"):
    for seed in seeds:
        arch, cfg = archs[name], run_cfg.replace(seed=seed)
        tag = cache_key(arch=arch.as_dict(), train={f: v for f, v in cfg.as_dict().items() if f != "device"})[:10]
        runs[name, seed] = train(arch, cfg, runs_root / f"{name}-s{seed}-{tag}")
train_s = time.perf_counter() - start
tokenizers = {}  # one object per tokenizer file: the corpus is tokenized once, not once per checkpoint
for (name, seed), run in tqdm(runs.items(), desc="checkpoints"):
    for fraction, folder in run.checkpoints.items():
        lm = load_checkpoint(folder, name=f"ablation-{name}-s{seed}-{folder.name}")
        lm = lm._replace(tokenizer=tokenizers.setdefault(file_sha256(folder / "tokenizer.json"), lm.tokenizer))
        results[name, seed, fraction] = measure_checkpoint(lm, protocol)
        del lm
measure_s = time.perf_counter() - start - train_s
g("train_minutes", f"{train_s / 60:.1f}")
g("measure_minutes", f"{measure_s / 60:.1f}")


def held_out(run, fraction: float) -> float:
    """The run's held-out perplexity at a checkpoint: exp of the mean next-token NLL (``eval.block_nll``)."""
    step = round(fraction * run_cfg.n_steps)
    return math.exp(next(h["held_out_loss"] for h in run.history if h["step"] == step))


variant_rows, variant_data = [], []
for name in variants:
    a = archs[name]
    variant_data.append({"variant": name, "d_head": a.d_head, "n_kv_heads": a.n_kv_heads, "position": a.position,
                         "norm": a.norm, "d_ff": a.d_ff, "n_parameters": a.n_parameters(),
                         **{f"held_out_ppl_{when(f)}_seed{s}": held_out(runs[name, s], f) for s in seeds
                            for f in CHECKPOINTS}})
    variant_rows.append({"variant": name, "d_head": a.d_head, "KV heads": a.n_kv_heads, "positions": a.position,
                         "norm": a.norm, "MLP width d_ff": a.d_ff, "parameters": f"{a.n_parameters():,}",
                         **{f"held-out perplexity, {when(f)} (seed {seeds[0]})": number(held_out(runs[name, seeds[0]], f), SIG3)
                            for f in (0.0, 1.0)}})
variant_table = pd.DataFrame(variant_rows).set_index("variant")
g.table("variants_table", variant_table, data=pd.DataFrame(variant_data).set_index("variant"), sample=f"{tokens:,} training tokens per run; perplexity on "
        f"{plural(eval_blocks, 'held-out block')} of {train_seq_len} tokens")
ppl_init = [held_out(runs[n, seeds[0]], 0.0) for n in variants]
ppl_end = [held_out(runs[n, seeds[0]], 1.0) for n in variants]
g("ppl_init", f"{number(min(ppl_init), SIG3)} and {number(max(ppl_init), SIG3)}")  # the lowest and highest run
g("ppl_end", f"{number(min(ppl_end), SIG3)} and {number(max(ppl_end), SIG3)}")
bpe = load_tokenizer(corpus, vocab_size)
stream = train_tokens(bpe, corpus)  # (token,) the training text, as every run reads it
ppl_unigram = unigram_perplexity(stream.numpy(), held_out_blocks(bpe, run_cfg)[:, 1:].numpy(), len(bpe))
g("ppl_unigram", number(ppl_unigram, SIG3))
g("base_d_ff", archs[variants[0]].d_ff)
g("base_ff_ratio", f"{archs[variants[0]].d_ff / d_model:.1f}")
g("ppl_end_vs_unigram", f"{min(ppl_end) / ppl_unigram:.2f} to {max(ppl_end) / ppl_unigram:.2f}")
g("beyond_unigram", "every model ends below it, so each learned more than token frequencies"
  if max(ppl_end) < ppl_unigram else "no model ends below it yet, so none has caught up with token frequencies"
  if min(ppl_end) >= ppl_unigram else "some models end below it and some do not, so not every one has caught up with "
  "token frequencies")
tokens_trained = run_cfg.n_steps * batch_size * train_seq_len  # whole batches: the budget rounded down
g("tokens_trained", f"{tokens_trained:,}")
g("tokens_per_param", f"{tokens_trained / max(n_params):.3f}")
g("epochs", f"{tokens_trained / len(stream):.2f}")

# %% [markdown]
# ```{glue:figure} ab_variants_table
# :name: tbl-ab-variants
#
# The variants at matched parameter count: each changes one axis of the base model, and the MLP width
# absorbs the change. Held-out perplexity on the evaluation split of the corpus, at initialisation and at
# the end of training.
#
# {glue:md}`ab_variants_table_prov:myst`
# ```
#
# Matching parameters through the MLP has two consequences a reader should keep in mind. The MLPs are wide:
# the base model's $d_\text{ff}$ is {glue:text}`ab_base_d_ff:d`, {glue:text}`ab_base_ff_ratio:s` ×
# $d_\text{model}$, where Llama's SwiGLU uses 8/3 ≈ 2.7 ×, because every variant is widened to the
# parameter count of the one with the widest attention. And the $d_\text{head}$ axis keeps the number of
# heads, so the attention width $n_\text{heads} d_\text{head}$ grows with $d_\text{head}$ instead of staying
# at $d_\text{model}$; the geometry measured here is that of each head's own $d_\text{head}$-dimensional
# space, which is what the null is drawn in.
#
# Held-out perplexity falls from between {glue:text}`ab_ppl_init:s` at initialisation (the lowest and highest
# run; about the vocabulary size, as it must for a random model) to between {glue:text}`ab_ppl_end:s` at the end. The unigram model of the training
# text (token frequencies alone, add-one smoothed: `atlas_core.ablation.unigram_perplexity`) reads
# {glue:text}`ab_ppl_unigram:s` on the same blocks; the trained models end at
# {glue:text}`ab_ppl_end_vs_unigram:s` times its perplexity (the lowest and highest of the runs; each is one run's
# held-out perplexity, a point value), and {glue:text}`ab_beyond_unigram:s`. Training is short:
# {glue:text}`ab_tokens_trained:s` tokens ({glue:text}`ab_n_steps:d` whole batches of the budget of
# {glue:text}`ab_tokens:s`) are {glue:text}`ab_tokens_per_param:s` tokens per parameter ({glue:text}`ab_epochs:s` of an epoch of the training text), where compute-optimal
# training takes about 20 {cite:p}`hoffmann2022chinchilla`. Every statement below about training is
# about this early stretch of it; the end of the chapter gives the command for longer, larger runs (not run
# for this book: they need a GPU or days of CPU). Training
# took {glue:text}`ab_train_minutes:s` minutes in this run (0 when the checkpoints were already there) and
# the measurements {glue:text}`ab_measure_minutes:s`.
#
# ## $O_h$ at every checkpoint
#
# {numref}`tbl-ab-main` gives, for every variant and checkpoint, $O_h$ with its bootstrap CI over pairs of
# heads, its null and $z$-score, $O_h$ − null with the 95% interval the book's decision rule reads
# ({ref}`sec-rule`), and the reading: distinguishable from its null when that interval excludes zero,
# equivalent to it when the interval lies within ±{glue:text}`ab_margin:s`. The interval counts both the CI
# over pairs and {glue:text}`ab_z_crit:.2f` null standard deviations, added in quadrature. A model here has
# only {glue:text}`ab_pairs_range:s` pairs of heads, and a bootstrap over so few units understates the
# spread (resampling four pairs draws from only four values), so a CI over pairs that excludes the null is
# not by itself evidence against it; the null's term keeps the interval honest. Beside it: the
# intra-group overlap of heads that share a KV head against the shared-value null (GQA, MQA), the plateau
# and peak of the mean TwoNN dimension over depth, and the held-out perplexity.

# %%
SHORT = {claims.TIE: "not distinguishable", claims.EQUIVALENT: "equivalent", claims.HIGHER: "above",
         claims.LOWER: "below"}  # the rule's decision in a table cell; the prose uses the full wording
ONE_LINE = ["Oₕ [95% CI over pairs]", "Haar null (mean ± s.d.)", "shared-value null (z-score)",
            "Oₕ − its null [95% CI, both spreads]"]  # numbers never broken
main_rows, main_data = [], []
decisions = {}
for (name, seed, fraction), r in results.items():
    m, prof = r["main"], r["profile"]
    side = on_null(m)
    decisions[name, seed, fraction] = side
    ppl = held_out(runs[name, seed], fraction)
    main_rows.append({
        "variant": name, "seed": seed, "checkpoint": when(fraction), "held-out perplexity": number(ppl, SIG3),
        "Oₕ [95% CI over pairs]": with_ci(m["o_h"], m["ci"]), "pairs (count)": f"{m['pairs']} ({m['n_pairs']})",
        "Haar null (mean ± s.d.)": f"{m['null_mean']:.3f} ± {m['null_std']:.4f}", "z-score": f"{m['z']:+.1f}",
        "intra-group Oₕ": number(m["intra"]),
        "shared-value null (z-score)": ("—" if m["intra_null_mean"] is None else
                                        f"{m['intra_null_mean']:.3f} ({number(m['intra_null_z'], '+.1f')})"),
        "Oₕ − its null [95% CI, both spreads]": estimate_text(side.figures["excess"].value, side.figures["excess"].lo,
                                                             side.figures["excess"].hi, "+.3f"),
        "against its null, by the rule": f"{SHORT[side.figures['decision']]} ({NULL_NAMES[side.figures['null']].removeprefix('the ')})",
        "TwoNN plateau": number(prof["plateau"], ".2f"), "TwoNN peak": f"{prof['peak']:.2f}",
    })
    main_data.append({"variant": name, "seed": seed, "fraction": fraction, "held_out_ppl": ppl, "d_head": r["d_head"],
                      **{f: m[f] for f in ("o_h", "pairs", "n_pairs", "null_mean", "null_std", "delta", "z", "inter",
                                           "intra", "intra_null_mean", "intra_null_std", "intra_null_z")},
                      "ci_lo": m["ci"][0], "ci_hi": m["ci"][1], "null_used": side.figures["null"],
                      "excess": side.figures["excess"].value, "excess_lo": side.figures["excess"].lo,
                      "excess_hi": side.figures["excess"].hi,
                      "decision": side.figures["decision"], "twonn_plateau": prof["plateau"], "twonn_peak": prof["peak"]})
main_table = pd.DataFrame(main_rows).set_index(["variant", "seed", "checkpoint"])
main_frame = pd.DataFrame(main_data)
g.table("main_table", main_table.style.set_properties(subset=ONE_LINE, **{"white-space": "nowrap"}), data=main_frame.set_index(["variant", "seed", "fraction"]), sample=SAMPLE)

verdict = null_verdict({f"{variant_title(n)} (seed {s}) {checkpoint_title(f)}": d for (n, s, f), d in decisions.items()})
g("verdict", verdict.text)
g("n_checkpoints", len(decisions))
g("n_at_null", verdict.figures["n_at_null"])
g("multiplicity", claims.multiplicity(len(decisions), len(verdict.figures["off"])).text)  # many decisions, some by chance
narrowest = main_frame["null_std"][main_frame["null_used"] == "haar"].min()
spread = f"±{RULE.z_crit:.2f} s.d. = ±{RULE.half_width(narrowest):.3f} at the narrowest"
g("equivalence_reach", (f"the null's spread ({spread}) fits inside the ±{RULE.margin:g} margin, so a checkpoint close "
                        "enough to its null, with a narrow enough interval over pairs, can be shown equivalent to it") if RULE.can_show_equivalence(narrowest) else
  (f"the null's own spread ({spread}) is wider than the ±{RULE.margin:g} margin, so no checkpoint can be shown "
   "equivalent to its null at this size; " + ("what the runs show is that none departs from it detectably"
   if not verdict.figures["off"] else "what the runs show of the others is only that they do not depart from it "
   "detectably")))
pair_counts = main_frame["n_pairs"][main_frame["null_used"] == "haar"]
g("pairs_range", f"{pair_counts.min()}" if pair_counts.min() == pair_counts.max() else
                 f"{pair_counts.min()}–{pair_counts.max()}")
g("z_span", f"{main_frame['z'][main_frame['null_used'] == 'haar'].min():+.1f} to "
            f"{main_frame['z'][main_frame['null_used'] == 'haar'].max():+.1f}")
g("delta_absmax", f"{main_frame['delta'][main_frame['null_used'] == 'haar'].abs().max():.3f}")
for (name, seed, fraction), r in results.items():  # per variant, first seed: the closing note and the claims page
    if seed == seeds[0] and fraction in (0.0, 0.1, 1.0):
        m = r["main"]
        g(key(name, when(fraction), "o_h"), f"{m['o_h']:.3f}")
        own = m["pairs"] == "inter"  # the null the side below is read against: Haar, or shared-value under MQA
        g(key(name, when(fraction), "null"), f"{m['null_mean'] if own else m['intra_null_mean']:.3f}")
        g(key(name, when(fraction), "z"), f"{m['z'] if own else m['intra_null_z']:+.1f}")
        g(key(name, when(fraction), "side"), decisions[name, seed, fraction].text)

# %% [markdown]
# ```{glue:figure} ab_main_table
# :name: tbl-ab-main
#
# The source protocol (deepest layer, $k$ = {glue:text}`ab_k:d`, mean principal cosine) on every
# checkpoint of every variant, beside its null. Inter-group headlines (MHA, GQA) are read against the Haar
# null, the multi-query headline against the shared-value null; "—": not measured (no intra-group pair
# under MHA; no layer at relative depth 0.9).
#
# {glue:md}`ab_main_table_prov:myst`
# ```
#
# Over the {glue:text}`ab_n_checkpoints:d` checkpoints, by the rule: {glue:text}`ab_verdict:s`. These are
# many decisions, each at the 5% level: {glue:text}`ab_multiplicity:s`. "Not
# distinguishable" is not "equal": with {glue:text}`ab_pairs_range:s` inter-group pairs per headline,
# {glue:text}`ab_equivalence_reach:s`. The $z$-scores of the inter-group headlines against the Haar null
# run from {glue:text}`ab_z_span:s`, and no inter-group $O_h$ is further than {glue:text}`ab_delta_absmax:s` from the
# overlap of random frames of the same size.
#
# ## Overlap against frame size
#
# If heads were random $k$-frames in $\mathbb{R}^{d_\text{head}}$, $O_h$ would be a function of
# $\sqrt{k/d_\text{head}}$ alone, close to $(8/(3\pi))\sqrt{k/d_\text{head}}$. {numref}`fig-ab-sqrt` puts
# every variant at every checkpoint on that axis, with the null, and the source's from-scratch values.

# %%
CKPT_MARKERS = dict(zip(CHECKPOINTS, ("o", "s", "^", "D")))
dims = sorted({r["d_head"] for r in results.values()} | {d for d, _ in claims.source("oh_scratch")})
pair_null = {d: haar_null(d, k, n_pairs=100, n_draws=null_draws, seed=0)["pair_mean"] for d in dims}
fig, (ax, bx) = plt.subplots(1, 2, figsize=figsize(1, 2, panel_aspect=0.95), layout="constrained")
x_line = np.linspace(0.9 * math.sqrt(k / max(dims)), 1.05 * math.sqrt(k / min(dims)), 50)
ax.plot(x_line, 8 / (3 * np.pi) * x_line, ":", color="0.35", lw=1.2, label="analytic null (8/(3π))√(k/d)")
ax.plot([math.sqrt(k / d) for d in dims], [pair_null[d] for d in dims], "--", color="0.6", lw=1,
        label="Haar null (Monte Carlo)")
sqrt_rows = [{"series": "Haar null (Monte Carlo)", "d_head": d, "sqrt_k_over_d": math.sqrt(k / d),
              "null_mean": pair_null[d]} for d in dims]
# one colour per variant, all different (the library's colour by name hashes unknown names, and two of these
# eight fell on the same blue): the palette's colours in the variants' order
VARIANT_COLOR = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(variants)}
for j, name in enumerate(variants):
    for (n, seed, fraction), r in results.items():
        if n != name:
            continue
        m = r["main"]
        x = math.sqrt(k / r["d_head"]) * (1 + 0.012 * (j - len(variants) / 2))  # spread the variants sideways
        inter = m["pairs"] == "inter"
        if not inter:  # the multi-query headline's own chance level: heads reading the same keys and values
            ax.plot([x], [m["intra_null_mean"]], "_", color="0.2", ms=9, mew=1.5)
        ax.errorbar([x], [m["o_h"]], yerr=[[m["o_h"] - m["ci"][0]], [m["ci"][1] - m["o_h"]]], fmt=CKPT_MARKERS[fraction],
                    color=VARIANT_COLOR[name], mfc=None if inter else "white", ms=4)
        if inter:  # the excess the rule reads, with its interval (both spreads)
            e = decisions[n, seed, fraction].figures["excess"]
            bx.errorbar([fraction + 0.006 * (j - len(variants) / 2)], [e.value], yerr=[[e.value - e.lo], [e.hi - e.value]],
                        fmt=CKPT_MARKERS[fraction], color=VARIANT_COLOR[name], ms=4)
        sqrt_rows.append({"series": name, "seed": seed, "fraction": fraction, "d_head": r["d_head"],
                          "sqrt_k_over_d": math.sqrt(k / r["d_head"]), "o_h": m["o_h"], "ci_lo": m["ci"][0],
                          "ci_hi": m["ci"][1], "null_mean": m["null_mean"], "null_std": m["null_std"], "z": m["z"],
                          "pairs": m["pairs"], "shared_value_null_mean": m["intra_null_mean"],
                          "shared_value_null_std": m["intra_null_std"]})
    ax.plot([], [], "o", color=VARIANT_COLOR[name], label=name + ("" if archs[name].n_kv_heads > 1 else " (MQA, open)"))
for fraction, marker in CKPT_MARKERS.items():
    ax.plot([], [], marker, color="0.4", mfc="none", label=f"checkpoint: {when(fraction)}")
if any(archs[n].n_kv_heads == 1 for n in variants):
    ax.plot([], [], "_", color="0.2", ms=9, mew=1.5, label="shared-value null (MQA's chance level)")
src = claims.source("oh_scratch")
ax.plot([math.sqrt(k / d) for d, _ in src], [o for _, o in src], "*", mfc="none", mec="0.2", ms=9,
        label="source: from scratch (published)")
sqrt_rows += [{"series": "source: from scratch", "d_head": d, "sqrt_k_over_d": math.sqrt(k / d), "o_h": o,
               "null_mean": pair_null[d]} for d, o in src]
for ref in (-RULE.margin, RULE.margin):
    bx.axhline(ref, color="0.35", lw=0.8, ls=":")
bx.plot([], [], ":", color="0.35", lw=0.8, label=f"(b) ±{RULE.margin:g}: equivalence margin")
bx.axhline(0, color="0.35", lw=0.8)
ax.set_xlabel("√(k / d_head)")
ax.set_ylabel("$O_h$ (mean principal cosine)")
ax.set_title(f"(a) $O_h$ against frame size, k = {k}")
bx.set_xlabel("fraction of training")
bx.set_ylabel("$O_h$ − Haar null mean")
bx.set_title("(b) inter-group headlines during training")
ax.margins(x=0.05, y=0.08)
bx.margins(x=0.05, y=0.08)
handles, labels = [sum(x, []) for x in zip(ax.get_legend_handles_labels(), bx.get_legend_handles_labels())]
fig.legend(handles, labels, loc="outside lower center", ncols=2)
fig.set_size_inches(fig.get_size_inches() + [0, 0.2 * -(-len(labels) // 2)])
g.figure("fig_sqrt", fig, data=pd.DataFrame(sqrt_rows), sample=f"{SAMPLE}, k = {k}")
src_dev = {d: o - pair_null[d] for d, o in src}
g("src_dev_max", f"{max(abs(v) for v in src_dev.values()):.3f}")

# %% [markdown]
# ```{glue:figure} ab_fig_sqrt
# :name: fig-ab-sqrt
#
# (a) $O_h$ of every variant at every checkpoint (marker: checkpoint; colour: variant; open: the
# multi-query headline, intra-group pairs only, with its own chance level, the shared-value null, as a
# black dash beside it) against $\sqrt{k/d_\text{head}}$, with the Haar null and the source's published
# from-scratch values (open stars). (b) Each inter-group headline minus the Haar null over training, with
# the 95% interval the decision rule reads ({ref}`sec-rule`: it counts both the CI over pairs and the null's
# spread, so a bar that crosses zero is not distinguishable from the null), and the equivalence margin
# ±{glue:text}`ab_margin:s` (dotted).
#
# {glue:md}`ab_fig_sqrt_prov:myst`
# ```
#
# The source's four from-scratch values lie within {glue:text}`ab_src_dev_max:s` of the Haar null at
# their own $d_\text{head}$; ours, measured, are in {numref}`tbl-ab-main`.
#
# ## Does intrinsic dimension explain $O_h$ beyond $d_\text{head}$?
#
# The source proposes the plateau intrinsic dimension as the mediator between architecture and $O_h$. Per
# head the question has a sharp form: among heads of the same $d_\text{head}$, does a head's TwoNN
# dimension predict its mean overlap with the heads of other KV groups? The statistic is the partial
# correlation of per-head overlap with per-head $d_\text{int}$, $d_\text{head}$ held fixed (both centred
# within each $d_\text{head}$; `atlas_core.ablation.partial_correlation`), over every head of every layer
# of every variant with inter-group pairs (the multi-query variant has none), with a 95% bootstrap interval
# that resamples heads within each $d_\text{head}$. Beside it, the same statistic with $d_\text{head}$ not
# held fixed (one stratum: Pearson's $r$ over the same heads), which mixes the two. Heads are not
# independent units (a head's mean overlap averages pairs it shares with other heads), so these intervals
# are, if anything, too narrow.

# %%
mediation, med_rows, med_data = {}, [], []
boot = Bootstrap(n_resamples=n_boot)
for fraction in CHECKPOINTS:
    pooled = [(r["heads"], r["d_head"]) for (n, s, f), r in results.items()
              if f == fraction and r["main"]["pairs"] == "inter"]
    y = np.concatenate([h["overlap"] for h, _ in pooled])
    x = np.concatenate([h["d_int"] for h, _ in pooled])
    strata = np.concatenate([[d] * len(h["overlap"]) for h, d in pooled])
    est = partial_correlation(y, x, strata, boot)
    raw = partial_correlation(y, x, np.zeros(len(y)), boot)  # one stratum: Pearson's r, d_head not held fixed
    mediation[fraction] = {"partial": est, "pearson": raw, "n_heads": len(y), "n_strata": len(set(strata.tolist())),
                           "decision": claims.decide(est, 0.0, claims.RULE)}
    med_rows.append({"checkpoint": when(fraction), "heads": len(y), "d_head strata": len(set(strata.tolist())),
                     "partial r, d_head fixed [95% CI]": with_ci(est.value, (est.lo, est.hi)),
                     "by the rule": mediation[fraction]["decision"].text,
                     "Pearson r, d_head not fixed [95% CI]": with_ci(raw.value, (raw.lo, raw.hi))})
    med_data.append({"fraction": fraction, "heads": len(y), "strata": len(set(strata.tolist())),
                     "partial_r": est.value, "partial_r_lo": est.lo, "partial_r_hi": est.hi,
                     "decision": mediation[fraction]["decision"].label,
                     "pearson_r": raw.value, "pearson_r_lo": raw.lo, "pearson_r_hi": raw.hi})
med_table = pd.DataFrame(med_rows).set_index("checkpoint")
g.table("mediation_table", med_table, data=pd.DataFrame(med_data).set_index("fraction"), sample=f"every head of every layer of the variants with inter-group pairs, {SAMPLE.split(', deepest')[0]}")
end = mediation[1.0]
g.estimate("partial_end", end["partial"], ".3f")
g("partial_end_verdict", end["decision"].text)
g("n_heads_end", end["n_heads"])
g("strata_note", "with a single d_head in this run the two coincide" if end["n_strata"] == 1 else
  "the two differ only by the d_head strata, so whatever part of it the partial correlation does not keep comes from "
  "d_head, which moves both the null of the overlap and the room the clouds have")
g("pearson_end_ci", with_ci(end["pearson"].value, (end["pearson"].lo, end["pearson"].hi)))
g("partial_init_ci", with_ci(mediation[0.0]["partial"].value, (mediation[0.0]["partial"].lo, mediation[0.0]["partial"].hi)))

# %% [markdown]
# ```{glue:figure} ab_mediation_table
# :name: tbl-ab-mediation
#
# Per-head overlap against per-head TwoNN dimension at each checkpoint: the partial correlation with
# $d_\text{head}$ held fixed (the number the verdict rests on) and, for contrast, the same correlation
# with $d_\text{head}$ not held fixed (Pearson's $r$). "distinguishable" means the 95% interval excludes 0.
#
# {glue:md}`ab_mediation_table_prov:myst`
# ```
#
# At the end of training, over {glue:text}`ab_n_heads_end:d` heads, the partial correlation is
# {glue:text}`ab_partial_end_ci:s`: {glue:text}`ab_partial_end_verdict:s` (at initialisation:
# {glue:text}`ab_partial_init_ci:s`). Without holding $d_\text{head}$ fixed, Pearson's $r$ is
# {glue:text}`ab_pearson_end_ci:s`: {glue:text}`ab_strata_note:s`.
#
# ## Larger runs
#
# This run trained {glue:text}`ab_n_variants:d` variants with seed(s) {glue:text}`ab_seeds:s`,
# {glue:text}`ab_tokens:s` tokens each; the chapter's default parameters are sized for about ten minutes on
# two CPU cores. The source's full ablation, more tokens, a larger base and three seeds, is one parameter
# set, commented out in `workflow/params.yaml` for the workflow and its cluster profile, or by hand on a GPU
# (the `device` parameter places training on the GPU; measurement is on the CPU):
#
# ```
# atlas run ablation -p seeds '[0, 1, 2]' -p tokens 20000000 -p d_model 256 -p n_layers 6 -p n_heads 8 \
#     -p variants '["base", "dhead64", "dhead128", "dhead256", "gqa4", "gqa2", "mqa", "learned", "layernorm"]' \
#     -p device auto
# ```
#
# ## Closing note
#
# $O_h$, Haar null and $z$-score (first seed) at initialisation and at the end, for every variant (the
# multi-query variant also against its shared-value null, the one its verdict uses):
# {glue:text}`ab_closing:s`. By the rule, of the {glue:text}`ab_n_checkpoints:d` checkpoints:
# {glue:text}`ab_verdict:s` ({glue:text}`ab_multiplicity:s`). Per head, $d_\text{int}$ beyond $d_\text{head}$: partial correlation
# {glue:text}`ab_partial_end_ci:s`, {glue:text}`ab_partial_end_verdict:s`. The commands: `atlas run
# ablation` (this chapter, default parameters) and `atlas train <variant> --out <folder>` (one run).

# %%
closing = []
for name in variants:
    r0, r1 = results[name, seeds[0], 0.0]["main"], results[name, seeds[0], 1.0]["main"]
    shared = ("" if r0["pairs"] == "inter" else  # MQA: judged against the shared-value null (table)
              f" (shared-value null {r0['intra_null_mean']:.3f} and {r1['intra_null_mean']:.3f}, "
              f"z {number(r0['intra_null_z'], '+.1f')} and {number(r1['intra_null_z'], '+.1f')})")
    closing.append(f"{name}: {r0['o_h']:.3f} vs {r0['null_mean']:.3f} (z {r0['z']:+.1f}) at init, "
                   f"{r1['o_h']:.3f} vs {r1['null_mean']:.3f} (z {r1['z']:+.1f}) at the end{shared}")
g("closing", "; ".join(closing))
scratch = [n for n in variants if archs[n].n_kv_heads == n_heads and archs[n].position == "rope"
           and archs[n].norm == "rmsnorm"]  # the d_head axis: base and the dhead<d> variants
by_dhead = sorted(((archs[n].d_head, n) for n in scratch))
g("scratch_d_heads", " / ".join(str(d) for d, _ in by_dhead))
g("scratch_o_h", " / ".join(f"{results[n, seeds[0], 1.0]['main']['o_h']:.3f}" for _, n in by_dhead))
g("scratch_null", " / ".join(f"{results[n, seeds[0], 1.0]['main']['null_mean']:.3f}" for _, n in by_dhead))
d64 = next((n for d, n in by_dhead if d == 64), None)
for tag, frac in (("10", 0.1), ("end", 1.0)):  # O_h with its interval over pairs, as every O_h of the book
    g(f"scratch_d64_{tag}", "not run" if d64 is None else with_ci(results[d64, seeds[0], frac]["main"]["o_h"],
                                                                  results[d64, seeds[0], frac]["main"]["ci"]))
scratch_verdict = null_verdict({f"d_head {archs[n].d_head} {checkpoint_title(f)}": decisions[n, s, f]
                                for (n, s, f) in decisions if n in scratch})
g("scratch_verdict", f"{scratch_verdict.text} ("
  f"{claims.multiplicity(scratch_verdict.figures['n'], len(scratch_verdict.figures['off'])).text})")

out = Path(results_dir)
out.mkdir(parents=True, exist_ok=True)
write_json(out / "ablation.json", jsonable({
    "model": model, "variants": {n: archs[n].as_dict() for n in variants}, "train": run_cfg.as_dict(),
    "runs": {f"{n}-s{s}": {"folder": str(r.out_dir), "history": r.history} for (n, s), r in runs.items()},
    "checkpoints": [{"variant": n, "seed": s, "fraction": f, **r, "decision": decisions[n, s, f].figures}
                    for (n, s, f), r in results.items()],
    "mediation": {str(f): {"partial": v["partial"].as_dict(), "pearson": v["pearson"].as_dict(),
                           "n_heads": v["n_heads"], "decision": v["decision"].label} for f, v in mediation.items()},
    "verdict": verdict.text, "seconds": {"train": train_s, "measure": measure_s},
    "params": {"variants": variants, "seeds": seeds, "d_heads": d_heads, "tokens": tokens, "k": k, "n_points": n_points,
               "n_blocks": n_blocks, "seq_len": seq_len, "n_boot": n_boot, "null_draws": null_draws,
               "intra_null_draws": intra_null_draws, "device": device},
}))
g.finish()  # the opening box: run information and this chapter's wall time
