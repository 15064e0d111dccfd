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
# # KV-cache quantization: model-visible error and HeadQ
#
# ```{glue:md} kv_run_box
# :format: myst
# ```
#
# **The question.** When the cached keys of a language model are quantized to 2 bits, which measure of
# the key error tells us what the model will notice? And can a small, query-aware correction win back the
# perplexity that the quantization loses, at a fair price in stored bits?
#
# **The source's claims.** HeadQ {cite:p}`ruizwilliams2026headq` judges the error of a quantized key
# cache where the model sees it: in the attention scores, not in the keys. Its abstract makes four
# claims, over six models:
#
# 1. Error in score space (a Fisher form) predicts attention KL "far better" than raw key MSE.
# 2. With 2-bit keys and dense values, decoding WikiText-103, a low-rank side code stored in a
#    calibration-learned *query* basis removes about 84–94% of the excess perplexity on the strongest rows.
# 3. With keys and values both at 2 bits, HeadQ plus an "A²" value policy improves all six models.
# 4. The effect survives named controls: same-budget counterexamples, null-space interventions,
#    query-PCA controls and a wrong-sign HeadQ.
#
# ```{important}
# Only the abstract of the HeadQ paper is public: no method section, no code, no tables. **What this
# chapter calls HeadQ is our reconstruction from that abstract, not the authors' method.** The form of the
# side code, its rank and bit width, the base quantizer it corrects and the A² value policy are our
# choices, made to match the abstract's words. Where our numbers fall short of the paper's, the fault may
# lie in the reconstruction rather than in the idea.
# ```
#
# **Related work.** KIVI {cite:p}`liu2024kivi` quantizes keys per channel and values per token, because
# the outliers of keys sit in a few fixed channels. KVQuant {cite:p}`hooper2024kvquant` also quantizes keys
# per channel, and does so *before* RoPE, where those channels have not yet been mixed by position. QJL
# {cite:p}`zandieh2024qjl` stores a 1-bit random sketch of each key that gives an unbiased estimate of the
# score $q\cdot k$: like HeadQ, it targets the inner product with the query rather than the key itself.
#
# **What we run.**
#
# - **Baselines.** Asymmetric min–max quantization of the cached (post-RoPE) keys, per token (groups of
#   $g$ channels) or per channel (KIVI: groups of $g$ tokens), at 2, 3 and 4 bits; values per token.
#   KIVI runs with its own residual rule, as its code does, at $R = g$: keys are quantized $R$ at a time
#   once $R$ full-precision keys have accumulated, and the $R$ most recent values stay in full precision.
# - **Visible error.** For a query $q$ the logit error of key $j$ is $e_j = q\cdot(\hat k_j - k_j)/\sqrt d$.
#   Softmax ignores a constant shift, so the error the model sees is the Fisher form
#   $\tfrac12 \sum_j a_j (e_j - \bar e)^2$ with $\bar e = \sum_j a_j e_j$, equal to $\mathrm{KL}(a\,\|\,\hat a)$
#   to second order.
# - **HeadQ (reconstructed).** Per KV head, the calibration queries of its query heads give
#   $\Sigma_q = E[qq^\top]$ and its top-$r$ eigenvectors $U_r$. Each cached key also stores a side code
#   $c_j = Q_{b'}(U_r^\top (k_j - \hat k_j))$, and the logit becomes
#   $(q\cdot \hat k_j + (U_r^\top q)\cdot c_j)/\sqrt d$. The side code is paid for: a key element costs
#   $b + 32/g + (r b' + 32)/d$ bits (codes, fp16 scale and zero, side code with its own scale and zero).
#
# Every perplexity here is a decode perplexity through a quantized cache: a transformers `Cache` that
# stores bit-packed codes, scales and side codes, and hands attention only what it can rebuild from them.
# The first tokens of each block are prefilled; every later token is fed one at a time and attends to its
# past through the cache. Under teacher forcing the cache's own flush rule fixes, for every query and key,
# whether the key is seen through its codes or in full precision, so the same NLL is computed here
# {glue:text}`kv_engine:s` (the one-pass engine, `atlas_core.kvquant.onepass`); the token-by-token decode
# through the cache stays as the reference, and tests hold the two equal for every method. This is not
# fake quantization of a finished forward pass: each query sees exactly what the cache would return. The
# bits per element in every table are counted from the tensors a real cache held at the end, not from a
# formula. Every perplexity, ratio and excess-removed fraction carries a 95% interval from a paired block
# bootstrap (the methods compared are scored on the same blocks and resampled together), and a comparison
# whose interval contains no difference is called "not distinguishable at this sample size".

# %% tags=["parameters"]
model = "smollm2-135m"
corpus = "britannica"
seq_len = 512  # tokens per evaluation block
eval_blocks = 32  # blocks of the evaluation split scored per configuration (the bootstrap's units)
prefill = 128  # tokens of each block prefilled before decoding
engine = "onepass"  # "onepass": one forward per batch of blocks; "decode": token by token through the cache (the reference)
calib_blocks = 8  # blocks of the calibration split (never overlapping evaluation) for Σ_q
group = 32  # quantization group (channels per token, or tokens per channel for KIVI)
bits = [2, 3, 4]  # key bits of the K-only runs
kv_bits = [2, 3]  # bits of the full-KV runs (keys and values); each run costs ~1 min on one thread
ranks = [1, 8, 16, 32]  # HeadQ rank sweep at 2 bits
rank = 8  # HeadQ rank of the headline, the controls and the bit sweep
side_bits = 4  # b′
metric_layers = "first,middle,last"  # layers of the offline error study: names or indices
metric_blocks = 2  # evaluation blocks of the offline error study
a2_budget = 3  # A² value policy: mean payload bits per value element (offline, and in decode as --vbits)
code_bits = [2, 3]  # key bits of the equal-storage study of key codes (K-only), each compared with KIVI at those bits
code_kv_bits = [2]  # bits of the full-KV equal-storage study (values per token at the key bits)
code_families = ""  # comma list of kvquant.storage.FAMILIES for the K-only study; empty: every one the model can run
code_kv_families = "hadamard,query-tc,query-tc static"  # the full-KV study's (fp and KIVI always run)
speed_contexts = [8192, 32768]  # cached tokens of the one-layer decode-attention benchmark (fused low-bit vs fp32 SDPA)
step_ctx = 2048  # cached tokens of the whole-step decode benchmark (fp, quantized, fused caches); 0 to skip
seed = 0
results_dir = "results"

# %%
import math
import re
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import NullFormatter
from scipy.stats import spearmanr
from atlas_core.progress import tqdm  # names the running chapter

from atlas_core import interval
from atlas_core.cache import write_json
from atlas_core.figures import color, figsize, style
from atlas_core.glue import chapter_glue, estimate_text, listing, number, plural, row_interval, times_text
from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.attention import attention_modules
from atlas_core.extract import extract
from atlas_core.kvquant import metrics, policy
from atlas_core import claims
from atlas_core.kvquant.experiment import EvalSetup, KVMethod, Runs
from atlas_core.kvquant.study import error_rows, key_variants, split_blocks, study_layers
from atlas_core.kvquant.verdicts import RankResult, headq_ranks
from atlas_core.models import load_model
from atlas_core.zoo import model_title


g = chapter_glue("kv", chapter="kvquant", model=model, corpus=corpus, results_dir=results_dir)  # g(key, value) glues kv_<key>
# One format per quantity in every table and sentence of this chapter: perplexity 3 decimals, ratios 2,
# stored bits 3, shares of the excess as percentages with 1 decimal; "—" where a figure does not apply.
PPL, RATIO, BITS, SHARE = interval.SIG3, ".2f", ".3f", ".1%"  # a perplexity to three significant figures, as in every chapter


def ci(est, spec: str) -> str:
    """An estimate as "value [lo, hi]" in ``spec``; "—" for a figure that is undefined (NaN) in this run."""
    return "—" if est.value != est.value else estimate_text(est.value, est.lo, est.hi, spec)


def glue_ci(key: str, est, spec: str) -> None:
    """Glue an estimate as ``kv_<key>``, ``_lo``, ``_hi`` (numbers, for other pages) and ``kv_<key>_ci``, the text
    the chapter's prose shows (``ci``)."""
    g.estimate(key, est)
    g(f"{key}_ci", ci(est, spec))


NOT_MEASURED = interval.Estimate(math.nan, math.nan, math.nan, 0)


torch.manual_seed(seed)
lm = load_model(model, attn_implementation="sdpa")  # perplexity needs no attention weights; extract sets its own
s = lm.spec
eval_ids = token_blocks(lm, BlockSpec(corpus=corpus, seq_len=seq_len, n_blocks=eval_blocks, split="eval"))
calib_ids = token_blocks(lm, BlockSpec(corpus=corpus, seq_len=seq_len, n_blocks=calib_blocks, split="calib"))
layers = study_layers(metric_layers, s.n_layers)

g("model", model_title(model))  # prose name; the run box keeps the id
g("corpus", corpus)
g("seq_len", seq_len)
g("eval_blocks", eval_blocks)
g("metric_blocks", metric_blocks)
g("eval_blocks_text", plural(eval_blocks, "block"))
g("metric_blocks_text", plural(metric_blocks, "block"))
g("eval_tokens_text", f"{(seq_len - prefill - 1) * eval_blocks:,}")
decode_sample = f"{plural(eval_blocks, 'block')} of {seq_len} tokens ({prefill} prefilled), scored together"
metric_sample = f"{plural(metric_blocks, 'block')} of {seq_len} tokens, layers {listing(layers)}"
g("eval_tokens", (seq_len - prefill - 1) * eval_blocks)
g("engine", {"onepass": "in one forward pass per block", "decode": "token by token"}[engine])
g("prefill", prefill)
g("calib_tokens", calib_blocks * seq_len)
g("group", group)
g("rank", rank)
g("side_bits", side_bits)
g("d_head", s.d_head)
g("n_kv_heads", s.n_kv_heads)
g("n_heads", s.n_heads)

# %% [markdown]
# **Setting.** The model is {glue:text}`kv_model:s`, with {glue:text}`kv_n_heads:d` query heads sharing
# {glue:text}`kv_n_kv_heads:d` KV heads per layer and $d_\text{head}$ = {glue:text}`kv_d_head:d`. It decodes
# {glue:text}`kv_eval_blocks_text:s` of {glue:text}`kv_seq_len:d` tokens of the {glue:text}`kv_corpus:s`
# evaluation split. The first {glue:text}`kv_prefill:d` tokens of each block are prefilled, and the
# {glue:text}`kv_eval_tokens_text:s` tokens that follow are scored, each predicted from a past that the cache
# holds quantized. HeadQ's query bases come from {glue:text}`kv_calib_tokens:d` tokens of the calibration
# split, which never overlaps the evaluation split. The paper used six models and WikiText-103; this
# chapter uses one small model and other prose, so what can be compared is the direction and rough size of
# each effect, not the exact figures.
#
# ## Which error predicts attention KL
#
# **Protocol.** Offline, we take the model's own queries, keys and attention in layers
# {glue:text}`kv_metric_layers:s`. Each KV head's keys are quantized in {glue:text}`kv_n_configs:d` ways,
# and for every query head we measure the key MSE, the logit MSE, the Fisher form and the attention KL.
# The configurations span per-token and per-channel quantization at 2–4 bits, HeadQ and two other bases,
# and a *null-space perturbation*. That perturbation is noise with the same key MSE as 2-bit per-token
# quantization, placed along the {glue:text}`kv_null_dirs:d` eigendirections of $\Sigma_q$ with the
# smallest eigenvalues, where the queries look least. It tests the abstract's "null-space interventions".

# %%
runs = Runs(lm, eval_ids, calib_ids, EvalSetup(engine=engine, prefill=prefill), store=True)  # each method once; fp, Σ_q on disk

FAMILY = {"per-token": "per-token", "per-channel": "per-channel", "kivi": "KIVI", "headq": "HeadQ", "query-tc": "query-aware transform",
          "hadamard": "Hadamard-rotated", "random-rotation": "randomly rotated"}
GRID = {"lloyd-max": "Lloyd–Max grid", "lloyd-max-pinned": "pinned Lloyd–Max grid", "static": "static scales"}


def prose(m: KVMethod) -> str:
    """A method's name in sentences ("2-bit HeadQ keys (rank 8, 4-bit side code)"); tables keep its compact label."""
    if m.method == "fp":
        return "the fp cache"
    name = f"the {m.kbits}-bit {FAMILY.get(m.method, m.method)} key code" + ("" if m.vbits is None else f" with {m.vbits}-bit values")
    notes = [f"rank {m.rank}, {m.side_bits}-bit side code"] if m.method == "headq" else []
    notes += [f"on {FAMILY[m.base]} keys"] if m.method == "headq" and m.base != "per-token" else []
    notes += [f"{m.control} control"] if m.control != "none" else []
    notes += [f"{m.basis} basis"] if m.method == "headq" and m.basis != "query" else []
    notes += [f"groups of {m.group}"] if m.group != 32 else []
    notes += [GRID.get(m.grid, m.grid)] if m.grid != "uniform" else []
    notes += ["A² values"] if m.a2_low is not None else []
    notes += [f"budget {m.budget:g} bits"] if m.budget is not None else []
    notes += [f"seed {m.seed}"] if m.method in ("hadamard", "random-rotation") and m.seed else []
    notes += ["pre-RoPE"] if m.pre_rope else []
    return name + (f" ({', '.join(notes)})" if notes else "")


def plain(text: str) -> str:
    """A verdict with every method's compact label (``KVMethod.label``) replaced by its ``prose`` name: whole
    labels only (not "fp" inside "fp32"), the longest first (a label can begin another)."""
    for label, name in sorted(((r["label"], prose(m)) for m, r in runs.done.items()), key=lambda x: -len(x[0])):
        text = re.sub(rf"(?<![\w-]){re.escape(label)}(?![\w-])", lambda _: name, text)
    return text

sigma_q = runs.sigma_q()  # {layer: (kv_head, d, d)}, one calibration pass shared with the decode runs
query_bases = runs.bases(KVMethod(method="headq"))  # {layer: (kv_head, d, d)}: every eigenvector, largest first
metric_ids = eval_ids[:metric_blocks]
acts = extract(lm, metric_ids, layers, fields=("q", "k", "v", "probs"), progress=False)
modules = attention_modules(lm.model)


null_dirs = s.d_head // 4  # the weakest quarter of Σ_q's eigendirections
g("null_dirs", null_dirs)
rows = []
for layer in tqdm(layers, desc="error study"):
    a = acts[layer]
    q, k, v = (split_blocks(t, metric_blocks) for t in (a.q, a.k, a.v))  # (head | kv_head, block, token, d)
    variants = key_variants(k, bits=bits, group=group, query_basis=query_bases[layer], sigma_q=sigma_q[layer], rank=rank,
                            side_bits=side_bits, null_dirs=null_dirs, seed=seed + layer)
    mask = metrics.causal_mask(seq_len, window=s.windows[layer])  # (query, key)
    rows += [{"layer": layer, **r} for r in error_rows(q, k, v, a.kv_group, variants, mask, modules[layer].scaling)]
errors = pd.DataFrame(rows)
errors["family"] = errors["config"].str.replace(r" \d+b$", "", regex=True)
predictors = {"key_mse": "key MSE", "logit_mse": "logit MSE", "fisher": "Fisher form"}
by_head = [grp.sort_values("config") for _, grp in errors.groupby(["layer", "head"])]  # units: (layer, head)
per_head = {name: np.stack([grp[name].to_numpy() for grp in by_head]) for name in (*predictors, "kl")}  # (unit, config)
rho_est = {name: interval.spearman(per_head[name], per_head["kl"]) for name in predictors}  # heads resampled
rho = {name: est.value for name, est in rho_est.items()}
within = {name: float(np.median([spearmanr(grp[name], grp["kl"]).statistic
                                 for _, grp in errors.groupby(["layer", "head"])]))
          for name in predictors}
for name in predictors:
    g.estimate(f"rho_{name}", rho_est[name])
    g(f"rho_within_{name}", within[name])
g("n_error_rows", len(errors))
g("n_configs", errors["config"].nunique())
g("metric_layers", ", ".join(map(str, layers)))
by_config = errors.groupby("config")[["key_mse", "logit_mse", "fisher", "kl"]].mean()


by_head = errors.pivot_table(index=["layer", "head"], columns="config", values=["kl", "key_mse"])
for name in ("kl", "key_mse"):  # null-space against 2-bit per-token, the (layer, head) pairs resampled together
    g.estimate(f"null_{name.replace('key_', '')}_ratio", interval.ratio_of_means(by_head[name]["null-space"], by_head[name]["per-token 2b"]))
kl_per_fisher = (errors.assign(r=errors["kl"] / errors["fisher"])
                 .pivot_table(index=["layer", "head"], columns="config", values="r").to_numpy())  # (layer·head, config)
g.estimate("fisher_kl_ratio", interval.median(kl_per_fisher))  # the median over rows; a (layer, head) brings all its configs
g("n_metric_heads", len(by_head))

# %%
fig, axes = plt.subplots(1, 3, figsize=figsize(1, 3, panel_aspect=1.0), sharey=True)
families = sorted(errors["family"].unique())
# the error study's configuration families drawn as the book's methods: HeadQ's bases are HeadQ and its controls
as_method = {"HeadQ": "headq", "KIVI": "kivi", "random basis": "random-rotation", "key-PCA basis": "headq (key-PCA basis)"}
for ax, (name, label) in zip(axes, predictors.items()):
    for fam in families:  # the errors span decades: log axes, named as such
        sub, look = errors[errors["family"] == fam], style(as_method.get(fam, fam))
        ax.scatter(sub[name], sub["kl"], s=10, alpha=0.6, color=look["color"], marker=look["marker"], label=fam)
    ax.set(xscale="log", yscale="log", xlabel=f"{label} (log scale)", title=f"Spearman ρ = {rho[name]:.2f}")
    for axis in (ax.xaxis, ax.yaxis):  # labels at the decades only: minor labels would overlap
        axis.set_minor_formatter(NullFormatter())
axes[0].set_ylabel("attention KL(a‖â) (log scale)")
fig.tight_layout()
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=min(4, len(labels)), markerscale=2)
g.figure("fig_metrics", fig, data=errors[["layer", "head", "config", "family", "key_mse", "logit_mse", "fisher", "kl"]],
         sample=metric_sample)

# %% [markdown]
# ```{glue:figure} kv_fig_metrics
# :name: fig-kv-metrics
#
# Attention KL (vertical, log scale) against three measures of key error (horizontal, log scale): key
# MSE, logit MSE and the Fisher form. One point per (layer, query head, configuration):
# {glue:text}`kv_n_error_rows:d` points from layers {glue:text}`kv_metric_layers:s` and
# {glue:text}`kv_n_configs:d` configurations, coloured by configuration family (legend below the panels). ρ in
# each title is the Spearman rank correlation over all points. A measure that predicts KL puts the points on
# one thin, rising band; a measure that does not leaves a wide cloud, with families side by side.
#
# {glue:md}`kv_fig_metrics_prov:myst`
# ```
#
# **Result.** {numref}`fig-kv-metrics` shows the three measures against attention KL. Across heads and
# configurations, attention KL has a rank correlation of {glue:text}`kv_rho_key_mse_ci:s` with key MSE,
# {glue:text}`kv_rho_logit_mse_ci:s` with logit MSE and {glue:text}`kv_rho_fisher_ci:s` with the Fisher form
# (95% intervals, (layer, head) units resampled with all their configurations).
# Within one head, across configurations (median over heads), the three read
# {glue:text}`kv_rho_within_key_mse:.2f`, {glue:text}`kv_rho_within_logit_mse:.2f` and
# {glue:text}`kv_rho_within_fisher:.2f`. The Fisher form is close to the KL itself: the median ratio
# KL/Fisher is {glue:text}`kv_fisher_kl_ratio_ci:s`, near 1, as the second-order expansion says. (Intervals in this
# section are 95% bootstrap intervals over the {glue:text}`kv_n_metric_heads:d` (layer, query head) pairs,
# each drawn with all its configurations: the error study reads {glue:text}`kv_metric_blocks_text:s`, too
# few to resample blocks.)
#
# The null-space perturbation separates the two kinds of error. It has {glue:text}`kv_null_mse_ratio_ci:s` the key MSE of 2-bit per-token
# quantization but only {glue:text}`kv_null_kl_ratio_ci:s` its attention
# KL, because it sits in the {glue:text}`kv_null_dirs:d` directions that the queries use least. It is not
# invisible (those directions still carry some query energy), but key MSE alone cannot tell it from
# quantization error that costs the model several times more.
#
# **For the source's claim.** The first claim, that score-space error predicts attention KL far better
# than key MSE, {glue:text}`kv_fisher_verdict:s` on this model. This is what the Fisher form must do by
# construction, since it is the second-order expansion of the KL; the measurement confirms that the
# expansion is accurate at these error sizes.
#
# ## Perplexity against stored bits
#
# **Protocol.** Each method runs at 2, 3 and 4 bits, first with keys quantized and values dense
# (K-only), then with values quantized per token at the same bits (full KV). HeadQ uses rank
# {glue:text}`kv_rank:d` and {glue:text}`kv_side_bits:d`-bit side codes on top of per-token keys.

# %%
def K(method: str, b: int, **kw) -> KVMethod:
    return KVMethod(method=method, kbits=b, group=kw.pop("group", group), rank=kw.pop("rank", rank), side_bits=side_bits, seed=seed, **kw)



a2_vbits = int(a2_budget)
plan = [KVMethod(method="fp")]
plan += [K(m, b) for b in bits for m in ("per-token", "kivi", "headq")]
plan += [K(m, b, vbits=b) for b in kv_bits for m in ("per-token", "kivi", "headq")]
plan += [K("headq", 2, rank=r) for r in ranks]
plan += [K("headq", 2, control=c) for c in ("wrong-sign", "random-basis", "key-pca")]
plan += [K(m, 2, group=group // 2) for m in ("per-token", "kivi")]  # same budget as HeadQ 2b + side code
plan += [K("headq", 2, base="kivi")]  # the side code on top of KIVI's keys
plan += [K(m, 2, pre_rope=True) for m in ("per-token", "kivi")] if s.family != "gpt2" else []
if engine == "onepass":  # the A² value policy needs the attention weights that only the one-pass engine sees
    plan += [K("headq", 2, vbits=a2_vbits), K("headq", 2, vbits=a2_vbits, a2_low=2)]
for m in tqdm(plan, desc="decode runs"):
    runs(m)
g("n_runs", len(runs.done))

fp_ppl = runs(KVMethod(method="fp"))["ppl"]
glue_ci("fp_ppl", fp_ppl, PPL)


def versus(f: dict) -> str:
    """The paired difference to the baseline in one word (or that the sample cannot tell)."""
    if "difference_baseline" not in f:
        return "—"
    d = claims.direction(f["difference_baseline"], 0.0)
    return "n.d." if d == claims.TIE else d


KEY_BITS, VALUE_BITS, KV_BITS = "key bits per element", "value bits per element", "mean K/V bits per element"
BITS_COLUMNS = (KEY_BITS, VALUE_BITS, KV_BITS, "payload bits per value element", "KIVI key bits per element")


def row(m: KVMethod) -> dict:
    """One method's row as the page shows it: measured bits, and every figure "value [lo, hi]" (95%, paired)."""
    r, f = runs(m), runs.figures(m)
    return {"method": r["label"], KEY_BITS: r["bits_key"], VALUE_BITS: r["bits_value"],
            KV_BITS: (r["bits_key"] + r["bits_value"]) / 2, "perplexity": ci(f["ppl"], PPL),
            "perplexity ÷ fp": ci(f["ratio_fp"], RATIO),
            "excess removed": ci(f["excess_removed"], SHARE) if "excess_removed" in f else "—", "vs baseline": versus(f)}


def raw_row(m: KVMethod) -> dict:
    """The numbers behind ``row``: measured bits and every figure of ``runs.figures`` with its interval."""
    r = runs(m)
    out = {"method": r["label"], "bits_key": r["bits_key"], "bits_value": r["bits_value"], "value_payload": r["value_payload"]}
    for name, est in runs.figures(m).items():
        out |= {name: est.value, f"{name}_lo": est.lo, f"{name}_hi": est.hi}
    return out


def table(methods) -> pd.DataFrame:
    return pd.DataFrame([row(m) for m in methods]).set_index("method")


def shown(df: pd.DataFrame):
    """``df`` with the chapter's number format for bits (3 decimals) and "—" for what was not measured."""
    bits_cols = [c for c in BITS_COLUMNS if c in df.columns]
    return df.style.format(na_rep="—").format(lambda x: number(x, BITS), subset=bits_cols)


def glue_table(key: str, methods, extra: dict | None = None) -> pd.DataFrame:
    """Glue the table of ``methods`` (and ``extra`` columns) with its raw numbers and provenance; return it."""
    df = table(methods).assign(**(extra or {}))
    data = pd.DataFrame([raw_row(m) for m in methods]).set_index("method")
    g.table(key, shown(df), data=data, sample=decode_sample)
    return df


bits_table = glue_table("bits_table", [KVMethod(method="fp")] + [K(m, b) for m in ("per-token", "kivi", "headq") for b in bits]
                        + [K(m, b, vbits=b) for m in ("per-token", "kivi", "headq") for b in kv_bits])


def errorbars(ax, xs, ms, **kw) -> None:
    """Perplexity of ``ms`` at ``xs`` with their 95% intervals as error bars."""
    est = [runs(m)["ppl"] for m in ms]
    y = np.array([e.value for e in est])
    err = np.array([[e.value - e.lo for e in est], [e.hi - e.value for e in est]])
    ax.errorbar(xs, y, yerr=err, **kw)


def ppl_scale(ax, values) -> str:
    """A log perplexity axis only where the plotted perplexities span more than a factor of 3 (a linear one
    would flatten all but the worst point); returns the axis label, which says so."""
    values = np.asarray([v for v in values if np.isfinite(v) and v > 0])
    if values.size and values.max() / values.min() > 3:
        ax.set_yscale("log")
        return "decode perplexity (log scale)"
    return "decode perplexity"


fig_bits, axes = plt.subplots(1, 2, figsize=figsize(1, 2, panel_aspect=0.8), sharey=True)
bits_points = []  # the plotted numbers, one row per point
for ax, (title, vb, xkey) in zip(axes, (("K-only (dense values)", None, "bits_key"), ("full KV", True, None))):
    for name in ("per-token", "kivi", "headq"):
        ms = [K(name, b, vbits=b) if vb else K(name, b) for b in (kv_bits if vb else bits)]
        xs = [runs(m)[xkey] if xkey else (runs(m)["bits_key"] + runs(m)["bits_value"]) / 2 for m in ms]
        errorbars(ax, xs, ms, label=name, **style(name))
        for x, m in zip(xs, ms):
            ax.annotate(f"{m.kbits}b", (x, runs(m)["ppl"].value), fontsize=9, textcoords="offset points", xytext=(3, 3))
            e = runs(m)["ppl"]
            bits_points.append({"panel": title, "method": runs(m)["label"], "family": name, "key_bits": m.kbits,
                                "x_bits": x, "ppl": e.value, "ppl_lo": e.lo, "ppl_hi": e.hi})
    ax.axhline(fp_ppl.value, color=color("fp"), lw=0.8, ls="--", label="fp")
    ax.axhspan(fp_ppl.lo, fp_ppl.hi, color=color("fp"), alpha=0.08, lw=0)
    ax.set(title=title, xlabel="stored bits per key element" if xkey else "stored bits per K/V element (mean)")
    ax.margins(x=0.15, y=0.1)  # room for the labels beside the points
bits_points = pd.DataFrame(bits_points)
axes[0].set_ylabel(ppl_scale(axes[0], [*bits_points["ppl_hi"], fp_ppl.lo]))
fig_bits.tight_layout()
handles, labels = axes[0].get_legend_handles_labels()
fig_bits.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=len(labels))
g.figure("fig_bits", fig_bits, data=bits_points, sample=decode_sample)

for tag, m in (("pt2", K("per-token", 2)), ("kivi2", K("kivi", 2)), ("hq2", K("headq", 2)), ("pt3", K("per-token", 3)),
               ("kivi3", K("kivi", 3)), ("pt2_kv", K("per-token", 2, vbits=2)), ("kivi2_kv", K("kivi", 2, vbits=2)),
               ("hq2_kv", K("headq", 2, vbits=2))):
    glue_ci(f"ppl_{tag}", runs(m)["ppl"], PPL)
    g(f"bits_{tag}", runs(m)["bits_key"])
glue_ci("removed_hq2", runs.figures(K("headq", 2))["excess_removed"], SHARE)
glue_ci("removed_kivi2", runs.figures(K("kivi", 2))["excess_removed"], SHARE)
glue_ci("removed_hq2_kv", runs.figures(K("headq", 2, vbits=2))["excess_removed"], SHARE)
g("hq_vs_kivi", claims.lower_verdict(runs(K("headq", 2))["nll"], runs(K("kivi", 2))["nll"], "HeadQ", "KIVI",
                                     runs.setup.boot).text)
best_base = min((K("per-token", 2), K("kivi", 2)), key=lambda m: runs(m)["ppl"].value)
g("best_base", prose(best_base))
glue_ci("ppl_best_base", runs(best_base)["ppl"], PPL)

# %% [markdown]
# ```{glue:figure} kv_fig_bits
# :name: fig-kv-bits
#
# Decode perplexity (lower is better; the axis is logarithmic, and says so, only where the perplexities span
# more than a factor of 3) against the bits per element the cache stored, for per-token, KIVI (per-channel
# keys) and HeadQ at 2, 3 and 4 bits; each point is labelled with its nominal key bits. Left: keys only,
# values dense. Right: keys and values at the same bits (the x axis is the mean over keys and values). The
# dashed line in each panel is the fp cache, its band the 95% interval. Error bars: 95% block-bootstrap
# intervals over the {glue:text}`kv_eval_blocks_text:s`. A method is better than another when its curve lies
# lower at the same horizontal position, that is, at the same storage; the paired comparisons in
# {numref}`tbl-kv-bits` are tighter than these bars, because every method is scored on the same blocks.
#
# {glue:md}`kv_fig_bits_prov:myst`
# ```
#
# ```{glue:figure} kv_bits_table
# :name: tbl-kv-bits
#
# Every configuration of {numref}`fig-kv-bits`. A row name gives the key quantizer and its bits (K2 =
# 2-bit keys), the values (dense V = not quantized, held in the model's fp32: 32 bits; V2 = 2-bit values),
# the group size g, KIVI's residual R and, for HeadQ, the side-code rank r and bits b. Bits per key and
# value element are measured from the bytes the cache held at the end (codes, scales, zeros, side codes and
# full-precision tokens; "mean K/V" is their mean). Every figure is "value [lo, hi]", its 95% interval from a
# paired block bootstrap over the {glue:text}`kv_eval_blocks_text:s` of the evaluation split (every method on
# the same blocks, resampled together). "Perplexity ÷ fp" is the ratio to the fp cache. "Excess removed" is
# $(\mathrm{PPL}_\text{per-token} - \mathrm{PPL})/(\mathrm{PPL}_\text{per-token} - \mathrm{PPL}_\text{fp})$
# against per-token quantization at the same nominal bits; it is 100% for a method that recovers the fp
# perplexity and negative for one that makes things worse ("—": the row is its own baseline). "vs baseline"
# is the paired difference of perplexity to that baseline: lower, higher, or n.d. (not distinguishable at
# this sample size: its interval contains 0).
#
# {glue:md}`kv_bits_table_prov:myst`
# ```
#
# **Result.** {numref}`fig-kv-bits` and {numref}`tbl-kv-bits` give every configuration, each scored on
# {glue:text}`kv_eval_tokens_text:s` tokens. With the fp cache at {glue:text}`kv_fp_ppl_ci:s`, 2-bit per-token keys give
# {glue:text}`kv_ppl_pt2_ci:s`, 2-bit
# KIVI keys {glue:text}`kv_ppl_kivi2_ci:s`
# and HeadQ at 2 bits {glue:text}`kv_ppl_hq2_ci:s`.
# HeadQ removes {glue:text}`kv_removed_hq2_ci:s` of per-token's excess perplexity; KIVI removes
# {glue:text}`kv_removed_kivi2_ci:s`.
# Against KIVI, paired on the same blocks: {glue:text}`kv_hq_vs_kivi:s`.
#
# HeadQ's side code is not free. At 2 bits HeadQ stores {glue:text}`kv_bits_hq2:.3f` bits per key element,
# against {glue:text}`kv_bits_pt2:.3f` for per-token and {glue:text}`kv_bits_kivi2:.3f` for KIVI. So the
# fair comparison is at equal storage, made below. With values quantized too (full KV), HeadQ reads
# {glue:text}`kv_ppl_hq2_kv_ci:s` and
# removes {glue:text}`kv_removed_hq2_kv_ci:s` of per-token's excess (per-token {glue:text}`kv_ppl_pt2_kv_ci:s`, KIVI {glue:text}`kv_ppl_kivi2_kv_ci:s`).
#
# **For the source's claim.** The paper reports 84–94% of the excess removed on its strongest 2-bit
# rows. Our reconstruction, at rank {glue:text}`kv_rank:d` on per-token keys ({glue:text}`kv_bits_hq2:.3f` bits
# per key element), removes {glue:text}`kv_removed_hq2_ci:s`. Judged against the paper's range by the book's decision rule at every rank
# of the sweep below, each beside the bits per key element it stores: {glue:text}`kv_verdict:s`. Whether the
# reconstruction reaches the paper's range thus depends on how many bits its side code is given
# ({numref}`fig-kv-rank`). The share removed also depends on the baseline. Per-token keys are the
# weakest baseline here, and other means remove a large share of their excess too (KIVI's per-channel keys
# remove {glue:text}`kv_removed_kivi2_ci:s`). The abstract does not say which baseline its rows use.
#
# ## HeadQ rank sweep at 2 bits
#
# **Protocol.** The rank $r$ of the side code sets both how much of the query space it corrects and how
# many bits it costs ($r b'/d$ per key element, plus its scale and zero). The sweep keeps 2-bit per-token
# keys and {glue:text}`kv_side_bits:d`-bit side codes and varies $r$ alone.

# %%
rank_methods = [K("headq", 2, rank=r) for r in ranks]
rank_table = glue_table("rank_table", [K("per-token", 2)] + rank_methods)
rank_results = [RankResult(rank=m.rank, bits_key=runs(m)["bits_key"], excess=runs.figures(m)["excess_removed"],
                           difference=runs.figures(m)["difference_baseline"]) for m in rank_methods]
paper_low, paper_high = claims.source("headq_removed")
pt2 = runs(K("per-token", 2))["ppl"]
rank_points = pd.DataFrame([{"rank": r.rank, "bits_key": r.bits_key, "ppl": runs(m)["ppl"].value, "ppl_lo": runs(m)["ppl"].lo,
                             "ppl_hi": runs(m)["ppl"].hi, "excess_removed": r.excess.value, "excess_removed_lo": r.excess.lo,
                             "excess_removed_hi": r.excess.hi} for r, m in zip(rank_results, rank_methods)])
fig, (ax, ax_share) = plt.subplots(1, 2, figsize=figsize(1, 2, panel_aspect=0.8))
errorbars(ax, ranks, rank_methods, label="headq 2b", **style("headq"))
ax.axhline(pt2.value, color=color("per-token"), ls=":", label="per-token 2b (r = 0)")
ax.axhspan(pt2.lo, pt2.hi, color=color("per-token"), alpha=0.1, lw=0)
ax.axhline(fp_ppl.value, color=color("fp"), ls="--", lw=0.8, label="fp")
ax.axhspan(fp_ppl.lo, fp_ppl.hi, color=color("fp"), alpha=0.08, lw=0)
ax.set_xscale("log", base=2)  # the swept ranks double
ax.set(xlabel="side-code rank r (log scale)", ylabel=ppl_scale(ax, [*rank_points["ppl_hi"], pt2.hi, fp_ppl.lo]),
       title="perplexity")
ax.set_xticks(ranks, [str(r) for r in ranks])
ax.tick_params(axis="x", which="minor", labelbottom=False)  # only the swept ranks are labelled
ax.margins(x=0.1)
share = rank_points[["excess_removed", "excess_removed_lo", "excess_removed_hi"]].to_numpy() * 100
ax_share.errorbar(rank_points["bits_key"], share[:, 0], yerr=[share[:, 0] - share[:, 1], share[:, 2] - share[:, 0]],
                  **style("headq"))
for r in rank_results:
    ax_share.annotate(f"r = {r.rank}", (r.bits_key, 100 * r.excess.value), fontsize=9, textcoords="offset points",
                      xytext=(4, -12))
ax_share.axhspan(100 * paper_low, 100 * paper_high, color=color("fp"), alpha=0.12, lw=0,
                 label=f"paper: {paper_low:.0%}–{paper_high:.0%}".replace("%–", "–"))
ax_share.axhline(0, color=color("per-token"), ls=":", lw=0.8)
ax_share.axhline(100, color=color("fp"), ls="--", lw=0.8)
ax_share.set(xlabel="stored bits per key element", ylabel="excess removed (%)", title="share of the excess removed")
ax_share.set_xlim(rank_points["bits_key"].min() - 0.5, rank_points["bits_key"].max() + 0.5)  # room for the labels
ax_share.margins(y=0.1)
fig.tight_layout()
handles, labels = [sum(pair, []) for pair in zip(ax.get_legend_handles_labels(), ax_share.get_legend_handles_labels())]
fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=len(labels))
g.figure("fig_rank", fig, data=rank_points, sample=decode_sample)
best_rank = min(rank_methods, key=lambda m: runs(m)["ppl"].value)
g("best_rank", best_rank.rank)
glue_ci("best_rank_removed", runs.figures(best_rank)["excess_removed"], SHARE)
g("best_rank_bits", runs(best_rank)["bits_key"])
g("rank_min", rank_methods[0].rank)
glue_ci("rank1_removed", runs.figures(rank_methods[0])["excess_removed"], SHARE)
g("rank1_verdict", claims.side_code_clause(runs.figures(rank_methods[0])["difference_baseline"], "no side code",
                                           "already", ", though it").text)
rank_verdict = headq_ranks(rank_results, headline=rank) if rank in ranks else None
g("rank_verdict", rank_verdict.text if rank_verdict else f"not measured (the headline rank {rank} is not among the ranks swept)")
g("rank_list", listing(ranks))
# every rank's excess removed and storage, so that a verdict naming ranks (the findings row) shows their values
g("rank_removed_list", listing(f"rank {r.rank}: {ci(r.excess, SHARE)} at {r.bits_key:.3f} bits per key element"
                               for r in rank_results))
g("rank_reach", {"reached": "the paper's range is thus reached by spending more bits on the side code",
                 "below": "no rank swept reaches the paper's range",
                 claims.TIE: "the sweep cannot place the side code against the paper's range at this sample size",
                 "undefined": "the sweep cannot place the side code against the paper's range"}[rank_verdict.label]
  if rank_verdict else "the headline rank was not swept")

# %% [markdown]
# ```{glue:figure} kv_fig_rank
# :name: fig-kv-rank
#
# HeadQ with 2-bit per-token keys, {glue:text}`kv_side_bits:d`-bit side codes and dense values, at side-code
# ranks $r$ = {glue:text}`kv_rank_list:s`. Left: decode perplexity (lower is better) against the rank (a log
# axis: the ranks double); the dotted line is 2-bit per-token keys with no side code ($r = 0$), the dashed
# line the fp cache. Right: the share of per-token's excess perplexity removed against the bits per key
# element each rank stores, measured from the cache's bytes; the shaded band is the paper's 84–94%, the
# dashed line 100% (the fp perplexity), the dotted line 0% (no side code). Error bars and bands are 95%
# block-bootstrap intervals. {numref}`tbl-kv-rank` gives every value with its paired comparison.
#
# {glue:md}`kv_fig_rank_prov:myst`
# ```
#
# ```{glue:figure} kv_rank_table
# :name: tbl-kv-rank
#
# The rank sweep of {numref}`fig-kv-rank`: for 2-bit per-token keys and HeadQ at each rank, the stored
# bits per key and value element, decode perplexity, its ratio to fp and the share of per-token's excess
# perplexity removed, each "value [lo, hi]" (95%, paired over the same blocks; "—": not applicable).
#
# {glue:md}`kv_rank_table_prov:myst`
# ```
#
# **Result.** {numref}`fig-kv-rank` and {numref}`tbl-kv-rank` show that a rank-{glue:text}`kv_rank_min:d` side code
# {glue:text}`kv_rank1_verdict:s` removes {glue:text}`kv_rank1_removed_ci:s` of the excess, and more rank removes more. The best rank swept,
# $r$ = {glue:text}`kv_best_rank:d`, removes {glue:text}`kv_best_rank_removed_ci:s`, but it stores
# {glue:text}`kv_best_rank_bits:.3f` bits per key element. Against the paper's 84–94%, rank by rank and
# each beside its storage: {glue:text}`kv_rank_verdict:s`; {glue:text}`kv_rank_reach:s`. At fewer bits than
# the largest ranks store, 3-bit KIVI keys
# ({glue:text}`kv_bits_kivi3:.3f` bits per key element) already read {glue:text}`kv_ppl_kivi3_ci:s`, against {glue:text}`kv_fp_ppl_ci:s`
# for the fp cache. Whether the side code is a good use of bits is the question
# of the equal-storage comparison below.
#
# ## Controls
#
# **Protocol.** Three controls run at the headline rank, each with the same storage as HeadQ: the same
# correction with the wrong sign; a random orthonormal basis of the same rank; and the key-PCA basis,
# the top eigenvectors of the calibration key *error* covariance. The key-PCA basis is the best rank-$r$
# basis in storage space, but it is blind to the queries. The abstract also names "query-PCA controls"
# without describing them. Our HeadQ basis is itself the (uncentred) query PCA, so here the controls are
# bases that ignore the queries.

# %%
control_methods = [K("headq", 2)] + [K("headq", 2, control=c) for c in ("wrong-sign", "random-basis", "key-pca")]
control_table = glue_table("control_table", [K("per-token", 2)] + control_methods)
for c, m in zip(("query", "wrong", "random", "keypca"), control_methods):
    glue_ci(f"ctl_{c}_ppl", runs(m)["ppl"], PPL)
    glue_ci(f"ctl_{c}_removed", runs.figures(m)["excess_removed"], SHARE)
control_names = {"the query basis": K("headq", 2), "the wrong sign": K("headq", 2, control="wrong-sign"),
                 "a random basis": K("headq", 2, control="random-basis"), "the key-PCA basis": K("headq", 2, control="key-pca")}
g("control_verdict", claims.lowest_verdict({n: runs(m)["nll"] for n, m in control_names.items()}, "the query basis",
                                           runs.setup.boot).text)
g("keypca_vs_query", claims.lower_verdict(runs(K("headq", 2, control="key-pca"))["nll"], runs(K("headq", 2))["nll"],
                                          "the key-PCA basis", "the query basis", runs.setup.boot).text)

# %% [markdown]
# ```{glue:figure} kv_control_table
# :name: tbl-kv-controls
#
# HeadQ at 2 bits, rank {glue:text}`kv_rank:d`, in the query basis and under the three controls (in
# brackets), beside 2-bit per-token keys with no side code. All HeadQ rows have the same storage. A
# negative "excess removed" means the correction makes perplexity worse than no correction at all.
# Figures are "value [lo, hi]" (95%, paired block bootstrap).
#
# {glue:md}`kv_control_table_prov:myst`
# ```
#
# **Result.** In {numref}`tbl-kv-controls` the query basis removes {glue:text}`kv_ctl_query_removed_ci:s` of the excess. The
# wrong sign *adds* error: perplexity {glue:text}`kv_ctl_wrong_ppl_ci:s`, "removed" {glue:text}`kv_ctl_wrong_removed_ci:s`. A random basis of the
# same rank removes {glue:text}`kv_ctl_random_removed_ci:s` (perplexity {glue:text}`kv_ctl_random_ppl_ci:s`), and the key-PCA basis
# {glue:text}`kv_ctl_keypca_removed_ci:s` (perplexity {glue:text}`kv_ctl_keypca_ppl_ci:s`). The gap between the query
# basis and the key-PCA basis is the part of the gain that comes from knowing where the queries look,
# rather than where the key error is largest; paired on the same blocks, {glue:text}`kv_keypca_vs_query:s`.
#
# **For the source's claim.** On the controls (paired, every one against every other):
# {glue:text}`kv_control_verdict:s`. Where the query basis gives a lower perplexity than every control, the side code
# works for the reason the paper gives: it corrects the key error in the directions that queries read.
#
# ## Equal storage
#
# The side code costs bits. At the same number of stored bits per key element, does HeadQ beat spending
# those bits on the base quantizer: one more bit per code, or a finer group? This is our reading of the
# abstract's "same-budget counterexamples".

# %%
budget_methods = [K("headq", 2), K("per-token", 3), K("kivi", 3), K("per-token", 2, group=group // 2),
                  K("kivi", 2, group=group // 2), K("headq", 2, rank=4), K("kivi", 2), K("headq", 2, base="kivi")]
budget_methods.sort(key=lambda m: (runs(m)["bits_key"], runs(m)["ppl"].value))
budget_table = glue_table("budget_table", budget_methods)
glue_ci("ppl_hq2_kivi", runs(K("headq", 2, base="kivi"))["ppl"], PPL)
g("bits_hq2_kivi", runs(K("headq", 2, base="kivi"))["bits_key"])
glue_ci("removed_hq2_kivi", runs.figures(K("headq", 2, base="kivi"))["excess_removed"], SHARE)
g("hq2_kivi_verdict", claims.side_code_clause(runs.figures(K("headq", 2, base="kivi"))["difference_baseline"], "KIVI alone",
                                              "removes", "; it removes").text)
hq_bits = runs(K("headq", 2))["bits_key"]
same = [m for m, r in runs.done.items() if m.vbits is None and m.method != "fp" and abs(r["bits_key"] - hq_bits) < 1e-6]
hq_label = runs(K("headq", 2))["label"]
budget = claims.lowest_verdict({runs(m)["label"]: runs(m)["nll"] for m in same}, hq_label, runs.setup.boot)
best_label = budget.label
g("budget_bits", hq_bits)
g("budget_best", plain(best_label))
glue_ci("budget_best_ppl", next(runs(m)["ppl"] for m in same if runs(m)["label"] == best_label), PPL)
g("budget_hq_rank", sorted(runs(m)["ppl"].value for m in same).index(runs(K("headq", 2))["ppl"].value) + 1)
g("budget_n", len(same))
g("budget_verdict", plain(budget.text))
g("kivi2_vs_hq2", claims.lower_verdict(runs(K("kivi", 2))["nll"], runs(K("headq", 2))["nll"], "2-bit KIVI", "HeadQ",
                                       runs.setup.boot).text)

# %% [markdown]
# ```{glue:figure} kv_budget_table
# :name: tbl-kv-budget
#
# K-only configurations (values dense) around HeadQ's storage, sorted by stored bits per key element and
# then by perplexity. Rows with equal bits per key cost the same memory, so within such a group the lower
# perplexity wins, if the paired comparison can tell them apart. "Excess removed" is measured against the
# same settings with per-token keys; for HeadQ on KIVI it is measured against 2-bit KIVI. Figures are
# "value [lo, hi]" (95%, paired block bootstrap).
#
# {glue:md}`kv_budget_table_prov:myst`
# ```
#
# **Result.** {numref}`tbl-kv-budget` sets HeadQ beside the other ways of spending its bits. At
# {glue:text}`kv_budget_bits:.3f` bits per key element, the best of the {glue:text}`kv_budget_n:d` K-only
# configurations with exactly that storage is {glue:text}`kv_budget_best:s`, at perplexity
# {glue:text}`kv_budget_best_ppl_ci:s`. HeadQ ranks {glue:text}`kv_budget_hq_rank:d` of them by the point
# value (the group includes HeadQ's own three controls, which share its storage). HeadQ reads
# {glue:text}`kv_ppl_hq2_ci:s`. 2-bit KIVI
# keys read {glue:text}`kv_ppl_kivi2_ci:s` at {glue:text}`kv_bits_kivi2:.3f` bits per key element (HeadQ:
# {glue:text}`kv_budget_bits:.3f`); paired on the
# same blocks, {glue:text}`kv_kivi2_vs_hq2:s`. (KIVI's measured bits include the up to $R - 1$
# most recent keys, $R$ = {glue:text}`kv_group:d`, that wait in full precision until KIVI quantizes them
# $R$ at a time, held in fp32 here.)
#
# The side code can also sit on top of KIVI's per-channel keys. HeadQ on KIVI reads
# {glue:text}`kv_ppl_hq2_kivi_ci:s`
# at {glue:text}`kv_bits_hq2_kivi:.3f` bits per key element and {glue:text}`kv_hq2_kivi_verdict:s`
# {glue:text}`kv_removed_hq2_kivi_ci:s` of KIVI's own excess. At that same storage, 3-bit KIVI keys read
# {glue:text}`kv_ppl_kivi3_ci:s`
# ({glue:text}`kv_bits_kivi3:.3f` bits per key element).
#
# **For the source's claim.** At equal storage (paired, HeadQ against every configuration of its
# storage): {glue:text}`kv_budget_verdict:s`. Where a base quantizer is lower at HeadQ's storage, the bits of
# the side code buy less than the same bits spent on the base quantizer: HeadQ's gain over 2-bit
# per-token keys is then not a gain at a fixed memory budget.
#
# ## Pre-RoPE keys
#
# Caches hold keys after RoPE, which rotates channel pairs by position-dependent angles and so mixes the
# per-channel outliers that KIVI relies on. KVQuant {cite:p}`hooper2024kvquant` quantizes keys before
# RoPE for this reason. Our cache can do the same: it undoes the rotation, quantizes, and re-applies the
# rotation when it hands keys to attention. The storage is unchanged.

# %%
if s.family != "gpt2":
    rope_table = glue_table("rope_table", [K("per-token", 2), K("per-token", 2, pre_rope=True), K("kivi", 2),
                                           K("kivi", 2, pre_rope=True)])
    glue_ci("rope_kivi_post", runs(K("kivi", 2))["ppl"], PPL)
    glue_ci("rope_kivi_pre", runs(K("kivi", 2, pre_rope=True))["ppl"], PPL)
    glue_ci("rope_pt_post", runs(K("per-token", 2))["ppl"], PPL)
    glue_ci("rope_pt_pre", runs(K("per-token", 2, pre_rope=True))["ppl"], PPL)
    for tag, m in (("kivi", K("kivi", 2)), ("pt", K("per-token", 2))):
        g(f"rope_{tag}_verdict", claims.lower_verdict(runs(replace(m, pre_rope=True))["nll"], runs(m)["nll"], "pre-RoPE",
                                                      "post-RoPE", runs.setup.boot).text)
else:
    rope_table = pd.DataFrame({"note": ["not measured: GPT-2 has no RoPE"]})
    g.table("rope_table", rope_table, sample="none (not measured)")
    for key in ("kivi_post", "kivi_pre", "pt_post", "pt_pre"):
        glue_ci(f"rope_{key}", NOT_MEASURED, PPL)
    for tag in ("kivi", "pt"):
        g(f"rope_{tag}_verdict", "not measured (GPT-2 has no RoPE)")

# %% [markdown]
# ```{glue:figure} kv_rope_table
# :name: tbl-kv-rope
#
# Decode perplexity of 2-bit per-token and KIVI keys (values dense), quantized after RoPE (as caches hold
# them) and before it (marked pre-RoPE). Each pair has the same storage, so only the perplexity changes.
# "Excess removed" compares KIVI with per-token keys quantized in the same coordinates. Figures are
# "value [lo, hi]" (95%, paired block bootstrap).
#
# {glue:md}`kv_rope_table_prov:myst`
# ```
#
# **Result.** In {numref}`tbl-kv-rope`, 2-bit KIVI reads {glue:text}`kv_rope_kivi_post_ci:s` post-RoPE and
# {glue:text}`kv_rope_kivi_pre_ci:s`
# pre-RoPE; per-token reads {glue:text}`kv_rope_pt_post_ci:s` and {glue:text}`kv_rope_pt_pre_ci:s`. Paired on the same blocks, for KIVI {glue:text}`kv_rope_kivi_verdict:s`;
# for per-token keys {glue:text}`kv_rope_pt_verdict:s`. KVQuant's reasoning predicts that pre-RoPE
# quantization helps a per-channel quantizer and hurts a per-token one: before RoPE the outliers stay in
# fixed channels, which suits a per-channel scale but widens the range of every per-token group that holds
# an outlier channel. Either way the effect on KIVI is small beside the gap between the two quantizers.
#
# ## A key code that wins at equal storage
#
# HeadQ spends its bits *after* quantization, to patch an error. Score-space thinking can instead decide
# where the bits go in the first place. For a query $q$ and a key error $\delta = \hat k - k$, the logit
# error is $q\cdot\delta$, and its mean square over queries is
# $E[(q\cdot\delta)^2] = \operatorname{tr}(\Sigma_q \Sigma_\delta)$. In the eigenbasis of $\Sigma_q$, with
# eigenvalues $\lambda_c$ (the query energy along direction $c$), this is $\sum_c \lambda_c E[\delta_c^2]$
# exactly: only the diagonal of the error covariance counts. So we rotate each KV head's keys into that
# basis and give coordinate $c$ its own bit width $b_c$, chosen to minimise $\sum_c \lambda_c D_c(b_c)$ at a
# fixed number of stored bits, where $D_c(b)$ is the measured mean squared error of coordinate $c$ at $b$ bits
# on the calibration keys. This is reverse water-filling {cite:p}`cover2006elements` in its operational,
# integer form {cite:p}`shoham1988efficient` (transform coding, {cite:t}`goyal2001transform`): directions
# that queries never read get no bits at all (they are rebuilt as their calibration mean), and the strongest
# directions get more than the nominal width. We call it **query-aware transform coding** (query-tc). Each
# coordinate is quantized per channel over groups of {glue:text}`kv_group:d` tokens with an fp16 scale and
# zero, as KIVI does, under KIVI's residual rule, and its budget is KIVI's own storage, $b + 32/g$ bits per
# key element: the two hold the same bytes. A variant, **query-tc static**, drops the per-group scales and
# zeros: each coordinate is rounded to $2^{b_c}$ levels learned once by Lloyd–Max on the calibration keys'
# raw values (KVQuant also calibrates its key quantizer offline), so every stored bit of the same budget is a
# code bit.
#
# Beside it stand the strongest baselines we could build at the same storage, each a named idea from the
# field: a normalised Hadamard rotation with random signs before per-channel quantization (QuaRot-style
# {cite:p}`ashkboos2024quarot`), a random orthogonal rotation (TurboQuant-style {cite:p}`zandieh2025turboquant`),
# non-uniform grids learned by Lloyd–Max on the calibration keys (the idea of KVQuant's non-uniform
# datatype {cite:p}`hooper2024kvquant`), pre-RoPE keys (for query-tc with the RoPE-averaged query covariance
# $E_\Delta[R_\Delta^\top \Sigma_q R_\Delta]$ over the offsets $\Delta$ a block holds), and HeadQ with a
# *whitened* basis: the top eigenvectors of $\Sigma_q^{1/2}\Sigma_\delta\Sigma_q^{1/2}$, the best rank-$r$
# correction in the score-space metric (encoded with $\Sigma_q^{1/2}V_r$, decoded with $\Sigma_q^{-1/2}V_r$).
# Every method's storage is measured from the bytes its cache held (codes, scales, zeros, side codes and the
# fp window), and every comparison is paired on the same blocks.

# %%
from atlas_core.kvquant import storage
from atlas_core.kvquant.bench import bench_kv_decode, bench_kvquant
from atlas_core.sparse.bench import speedup_estimate


def chosen(text: str):
    """A comma list of family names, or None (every family) when empty."""
    return tuple(f.strip() for f in text.split(",") if f.strip()) or None


studies = {"K-only": storage.study(runs, kbits=code_bits, group=group, values=False, families=chosen(code_families),
                                   rank=rank, progress=lambda ms: tqdm(ms, desc="key codes, K-only"))}
if code_kv_bits:
    studies["full KV"] = storage.study(runs, kbits=code_kv_bits, group=group, values=True,
                                       families=chosen(code_kv_families), rank=rank,
                                       progress=lambda ms: tqdm(ms, desc="key codes, full KV"))
fig_pareto, axes = plt.subplots(1, len(studies), figsize=figsize(1, len(studies), panel_aspect=0.9), squeeze=False,
                                sharey=True)
top = 1.6 * fp_ppl.value  # per-token codes sit far above; they are drawn at the top edge (triangles), values in the table
pareto_points, legend = [], {}
for ax, (setting, st) in zip(axes[0], studies.items()):
    for fam in dict.fromkeys(r["family"] for r in st["rows"] if r["family"] != "fp"):
        rows = sorted((r for r in st["rows"] if r["family"] == fam), key=lambda r: r["bits_key"])
        xs = [r["bits_key"] if setting == "K-only" else (r["bits_key"] + r["bits_value"]) / 2 for r in rows]
        ys = np.array([min(r["ppl"].value, top) for r in rows])
        err = np.array([[r["ppl"].value - r["ppl"].lo for r in rows], [r["ppl"].hi - r["ppl"].value for r in rows]])
        err[:, ys >= top] = 0
        err = np.minimum(err, np.stack([ys - 0.96 * fp_ppl.lo, top - ys]).clip(min=0))  # bars stop at the frame
        legend[fam] = ax.errorbar(xs, ys, yerr=err, label=fam, **style(fam))
        edge = ys >= top
        if edge.any():
            ax.plot(np.asarray(xs)[edge], ys[edge], "^", ms=7, color=color(fam), clip_on=False)
        for x, y, r in zip(xs, ys, rows):
            if r["on_front"]:
                ax.plot(x, y, "o", ms=10, mfc="none", mec=color("fp"), lw=0.8)
            pareto_points.append({"panel": setting, "method": r["label"], "family": fam, "x_bits": x, "bits_key": r["bits_key"],
                                  "bits_value": r["bits_value"], "ppl": r["ppl"].value, "ppl_lo": r["ppl"].lo,
                                  "ppl_hi": r["ppl"].hi, "on_front": r["on_front"], "drawn_at_top_edge": bool(y >= top)})
    legend["fp"] = ax.axhline(fp_ppl.value, color=color("fp"), lw=0.8, ls="--", label="fp")  # in every panel
    ax.axhspan(fp_ppl.lo, fp_ppl.hi, color=color("fp"), alpha=0.08, lw=0)
    ax.set(ylim=(0.96 * fp_ppl.lo, 1.04 * top), title=setting,
           xlabel="stored bits per key element" if setting == "K-only" else "stored bits per K/V element (mean)")
    ax.margins(x=0.06)
axes[0, 0].set_ylabel("decode perplexity")
fig_pareto.tight_layout()
fig_pareto.legend(list(legend.values()), list(legend), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=3)
g.figure("fig_pareto", fig_pareto, data=pd.DataFrame(pareto_points), sample=decode_sample)


def storage_row(setting: str, b: int, e: dict | None) -> dict:
    """One row of the equal-storage table: KIVI-b against the best new key code that fits its storage ("—" where
    none fits)."""
    if e is None:
        return {"setting": setting, "KIVI key bits (nominal)": b, "best new code": "none fits"}
    return {"setting": setting, "KIVI key bits (nominal)": b, "KIVI key bits per element": e["kivi"]["bits_key"],
            "KIVI perplexity": ci(e["kivi"]["ppl"], PPL), "best new code": e["best"], KEY_BITS: e["bits_key"],
            VALUE_BITS: e["bits_value"], "perplexity": ci(e["ppl"], PPL), "perplexity − KIVI": ci(e["difference"], "+" + PPL),
            "KIVI's excess removed": ci(e["excess_removed"], SHARE)}


def storage_raw(setting: str, b: int, e: dict | None) -> dict:
    """The numbers behind ``storage_row``, each figure with its interval."""
    out = {"setting": setting, "kivi_bits": b, "best": e["best"] if e else None}
    if e is not None:
        out |= {"kivi_bits_key": e["kivi"]["bits_key"], "bits_key": e["bits_key"], "bits_value": e["bits_value"]}
        for name, est in (("kivi_ppl", e["kivi"]["ppl"]), ("ppl", e["ppl"]), ("difference", e["difference"]),
                          ("excess_removed", e["excess_removed"])):
            out |= {name: est.value, f"{name}_lo": est.lo, f"{name}_hi": est.hi}
    return out


entries = [(setting, b, e) for setting, st in studies.items() for b, e in st["equal_storage"].items()]
storage_table = pd.DataFrame([storage_row(*x) for x in entries]).set_index(["setting", "KIVI key bits (nominal)"])
g.table("storage_table", shown(storage_table), data=pd.DataFrame([storage_raw(*x) for x in entries]), sample=decode_sample)
pareto_table = pd.DataFrame([{"setting": setting, "method": r["label"], KEY_BITS: r["bits_key"], VALUE_BITS: r["bits_value"],
                              "perplexity": ci(r["ppl"], PPL), "on the Pareto front": "yes" if r["on_front"] else "no"}
                             for setting, st in studies.items() for r in st["rows"]]).set_index(["setting", "method"])
g.table("pareto_table", shown(pareto_table), data=pd.DataFrame(pareto_points), sample=decode_sample)


def glue_entry(tag: str, e: dict | None) -> None:
    """Glue one equal-storage entry's figures under kv_<tag>_* (NaN and "none" when no new code fits)."""
    if e is None:
        g(f"{tag}_best", "none")
        for key in ("ppl", "removed", "diff", "kivi_ppl"):
            glue_ci(f"{tag}_{key}", NOT_MEASURED, PPL)
        g(f"{tag}_bits", math.nan)
        g(f"{tag}_kivi_bits", math.nan)
        g(f"{tag}_verdict", "no new key code fits KIVI's storage")
        return
    g(f"{tag}_best", plain(e["best"]))
    g(f"{tag}_bits", e["bits_key"])
    g(f"{tag}_kivi_bits", e["kivi"]["bits_key"])
    glue_ci(f"{tag}_ppl", e["ppl"], PPL)
    glue_ci(f"{tag}_kivi_ppl", e["kivi"]["ppl"], PPL)
    glue_ci(f"{tag}_removed", e["excess_removed"], SHARE)
    glue_ci(f"{tag}_diff", e["difference"], "+" + PPL)
    g(f"{tag}_verdict", plain(e["verdict"]))


k_only = studies["K-only"]
glue_entry("es", k_only["equal_storage"].get(code_bits[0]))
glue_entry("es_hi", k_only["equal_storage"].get(code_bits[-1]))
glue_entry("es_kv", studies["full KV"]["equal_storage"].get(code_kv_bits[0]) if code_kv_bits else None)
g("es_bits_low", code_bits[0])
g("es_bits_high", code_bits[-1])
g("es_kv_bits_low", code_kv_bits[0] if code_kv_bits else 0)
hi_versus = k_only["versus"].get(code_bits[-1], {})
g("tc_hi_versus", plain("; ".join(hi_versus.values())) if hi_versus else "query-tc was not run")


def paired(a: KVMethod, b: KVMethod, name_a: str, name_b: str) -> str:
    """lower_verdict of two methods run in the study, or why it could not be said."""
    ran = {m.canonical() for st in studies.values() for m in st["methods"]}
    if a.canonical() not in ran or b.canonical() not in ran:
        return "not measured (one of the two was not run)"
    return claims.lower_verdict(runs(a)["nll"], runs(b)["nll"], name_a, name_b, runs.setup.boot).text


b0 = code_bits[0]
g("whitened_vs_query", paired(K("headq", b0, basis="whitened"), K("headq", b0), "the whitened basis", "the query basis"))
g("tc_pre_vs_post", paired(K("query-tc", b0, pre_rope=True), K("query-tc", b0), "pre-RoPE query-tc", "post-RoPE query-tc"))
g("tc_lloyd_vs_uniform", paired(K("query-tc", b0, grid="lloyd-max"), K("query-tc", b0), "Lloyd–Max grids", "uniform grids"))
g("hadamard_vs_kivi", paired(K("hadamard", b0), K("kivi", b0), "the Hadamard rotation", "KIVI"))

# %% [markdown]
# ```{glue:figure} kv_fig_pareto
# :name: fig-kv-pareto
#
# Decode perplexity against the bits per element each cache held (measured from its bytes), for every key
# code of this section at {glue:text}`kv_es_bits_low:d` … {glue:text}`kv_es_bits_high:d` nominal key bits:
# one colour per method, a line through its bit widths. Left: keys only, values dense. Right: keys and values
# quantized (the x axis is the mean over keys and values). Ringed points lie on the Pareto front (no other
# point has no more bits and a lower perplexity). The dashed line is the fp cache with its 95% band; error
# bars are 95% block-bootstrap intervals. Points above the top edge (per-token codes) are drawn at the edge as
# triangles; {numref}`tbl-kv-pareto` gives every value. The legend below the panels names every method.
#
# {glue:md}`kv_fig_pareto_prov:myst`
# ```
#
# ```{glue:figure} kv_pareto_table
# :name: tbl-kv-pareto
#
# Every configuration of {numref}`fig-kv-pareto`: bits per key and value element measured from the bytes
# held (dense values: 32, the model's fp32), perplexity "value [lo, hi]" (95% block bootstrap), and whether
# the point lies on the Pareto front of its panel.
#
# {glue:md}`kv_pareto_table_prov:myst`
# ```
#
# ```{glue:figure} kv_storage_table
# :name: tbl-kv-storage
#
# At the storage KIVI holds (its measured bits per key element, K-only, or per key and value element, full
# KV), the best new key code that holds no more. "Perplexity − KIVI" is the paired difference of perplexity (95%
# interval; an interval containing 0 is not distinguishable); "KIVI's excess removed" is
# $(\mathrm{PPL}_\text{KIVI} - \mathrm{PPL})/(\mathrm{PPL}_\text{KIVI} - \mathrm{PPL}_\text{fp})$ with its
# 95% paired-bootstrap interval. "—": no new code fits KIVI's storage.
#
# {glue:md}`kv_storage_table_prov:myst`
# ```
#
# **Result.** At the {glue:text}`kv_es_kivi_bits:.3f` bits per key element that {glue:text}`kv_es_bits_low:d`-bit
# KIVI holds, the best new key code is {glue:text}`kv_es_best:s` ({glue:text}`kv_es_bits:.3f` bits), at
# perplexity {glue:text}`kv_es_ppl_ci:s` against
# KIVI's {glue:text}`kv_es_kivi_ppl_ci:s`
# and the fp cache's {glue:text}`kv_fp_ppl_ci:s`. By perplexity, {glue:text}`kv_es_verdict:s` (paired difference
# {glue:text}`kv_es_diff_ci:s`). At
# {glue:text}`kv_es_bits_high:d` bits, {glue:text}`kv_es_hi_verdict:s`; the post-RoPE query-tc code (the default
# form, named without a suffix below) against the other codes of the same nominal bits:
# {glue:text}`kv_tc_hi_versus:s`. With values quantized too, at
# {glue:text}`kv_es_kv_bits_low:d` bits: {glue:text}`kv_es_kv_verdict:s`.
#
# Which ingredient does the work, paired on the same blocks at {glue:text}`kv_es_bits_low:d` bits: for
# query-tc, {glue:text}`kv_tc_lloyd_vs_uniform:s`, and {glue:text}`kv_tc_pre_vs_post:s`; a data-blind
# rotation alone: {glue:text}`kv_hadamard_vs_kivi:s`; for HeadQ's side code, {glue:text}`kv_whitened_vs_query:s`.
# Our own target for a new key code was to remove at least 90% of KIVI's excess perplexity at KIVI's
# storage; the figures above say how far the best code goes.
#
# ## Decoding faster than fp from a low-bit cache
#
# Every quantized cache above decodes *slower* than the fp cache on this CPU when it rebuilds the dequantized
# history at every step, as transformers' own quantized cache does. A fused kernel (`atlas_core.kvquant.fused`,
# compiled with numba; the plain dequantize-then-attend path is its reference, and tests hold the two equal)
# reads the packed 2-bit codes directly: per key group it folds the scale into the query and adds
# $\sum_c q_c z_c$ once, per value token it folds $p_j s_j$ into the code sum, and HeadQ's side-code
# correction $(U_r^\top q)\cdot \hat c_j$ is added inside the same loop (the algebra of KIVI's own kernel
# {cite:p}`liu2024kivi`; on GPUs, BitDecoding {cite:p}`du2024bitdecoding`). Each KV head's codes are read once
# for all the query heads of its group.

# %%
# timing repeats: medians, and speed-ups with a paired bootstrap interval over the interleaved rounds (a whole-step
# round prefills the context once per cache, 7 caches: about 80 s a round on one thread here, hence fewer rounds)
SPEED_REPEATS, STEP_REPEATS = {"rounds": 10, "steps": 3}, {"rounds": 5, "steps": 8}
if fused_available := __import__("atlas_core.kvquant.fused", fromlist=["available"]).available():
    speed = bench_kv_decode(contexts=speed_contexts, bits=2, heads=s.n_heads, kv_heads=s.n_kv_heads, d_head=s.d_head,
                            rounds=SPEED_REPEATS["rounds"], steps=SPEED_REPEATS["steps"])
    speed_table = pd.DataFrame([{"cached tokens": r["n"], "fused 2-bit (ms)": 1e3 * r["fused_s"],
                                 "fp32 SDPA (ms)": 1e3 * r["sdpa_fp32_s"], "dequantize + SDPA (ms)": 1e3 * r["dequant_sdpa_s"],
                                 "speed-up over fp32 SDPA (×)": row_interval(r, "speedup_vs_sdpa", ".2f"),
                                 "bytes read, fp32 ÷ fused (×)": r["bytes_ratio"]}
                                for r in speed["rows"]]).set_index("cached tokens")
    speed_sample = (f"one layer, {plural(len(speed['rows']), 'context')}, medians over "
                    f"{plural(SPEED_REPEATS['rounds'], 'interleaved round')} of {plural(SPEED_REPEATS['steps'], 'step')}, "
                    "speed-ups with a 95% paired bootstrap interval over rounds")
    ms = {c: "{:.2f}" for c in speed_table.columns if c != "speed-up over fp32 SDPA (×)"}
    g.table("speed_table", speed_table.style.format(ms).format_index("{:,}"),
            data=pd.DataFrame([{k: v for k, v in r.items() if np.isscalar(v)} for r in speed["rows"]]),
            sample=speed_sample, corpus="no corpus (synthetic keys and values)")
    g("speed_max_n", speed["rows"][-1]["n"])
    g("speed_ratio", speed["rows"][-1]["speedup_vs_sdpa"])
    g("speed_ratio_ci", times_text(*(speed["rows"][-1][f"speedup_vs_sdpa{x}"] for x in ("", "_lo", "_hi"))))
    g("speed_ratio_min", min(r["speedup_vs_sdpa"] for r in speed["rows"]))
    slowest = min(speed["rows"], key=lambda r: r["speedup_vs_sdpa"])
    g("speed_ratio_min_ci", times_text(*(slowest[f"speedup_vs_sdpa{x}"] for x in ("", "_lo", "_hi"))))
    g("speed_bytes_ratio", speed["rows"][-1]["bytes_ratio"])
    g("speed_threads", speed["torch_threads"])
    g("speed_threads_text", plural(speed["torch_threads"], "thread"))
else:
    speed = None
    speed_table = pd.DataFrame({"note": ["not measured: numba is not installed, the fused kernel is unavailable"]})
    g.table("speed_table", speed_table, sample="none (not measured)", corpus="none")
    for key in ("speed_max_n", "speed_ratio", "speed_ratio_min", "speed_bytes_ratio", "speed_threads"):
        g(key, math.nan)
    g("speed_ratio_ci", "—")
    g("speed_ratio_min_ci", "—")
    g("speed_threads_text", "—")
step = (bench_kvquant(model, n_ctx=step_ctx, steps=STEP_REPEATS["steps"], rounds=STEP_REPEATS["rounds"], bits=2, group=group,
                      rank=rank) if step_ctx else None)
if step is not None:
    caches = step["caches"]
    step_table = pd.DataFrame([{"cache": name, "step (ms)": 1e3 * c["step_s"],
                                "step ÷ fp step (×)": row_interval(c, "ratio_vs_fp", ".2f"),
                                "memory held (bytes)": c["held_bytes"], "bits per element held": c["held_bits_per_element"]}
                               for name, c in caches.items()]).set_index("cache")
    g.table("step_table", step_table.style.format({"step (ms)": "{:.2f}",
                                                   "memory held (bytes)": "{:,.0f}", "bits per element held": "{:.3f}"}),
            data=pd.DataFrame([{"cache": name} | {k: v for k, v in c.items() if np.isscalar(v)} for name, c in caches.items()]),
            sample=f"whole decode step at {step_ctx:,} cached tokens, medians over "
                   f"{plural(STEP_REPEATS['rounds'], 'interleaved round')} of {plural(STEP_REPEATS['steps'], 'step')}, "
                   "ratios with a 95% paired bootstrap interval over rounds")
    g("step_ctx", step_ctx)
    g("step_kivi_fused", caches["kivi-fused"]["ratio_vs_fp"] if "kivi-fused" in caches else math.nan)
    g("step_kivi_plain", caches["kivi"]["ratio_vs_fp"])
    for name, key in (("kivi-fused", "step_kivi_fused_ci"), ("kivi", "step_kivi_plain_ci")):
        g(key, times_text(*(caches[name][f"ratio_vs_fp{x}"] for x in ("", "_lo", "_hi"))) if name in caches else "—")
    # HeadQ's fused step over per-token's fused step, paired over the same interleaved rounds
    if "headq-fused" in caches:
        est = speedup_estimate(caches["headq-fused"]["samples"], caches["per-token-fused"]["samples"])
        g("step_headq_fused_ci", claims.side_code_cost(est).text)
    else:
        g("step_headq_fused_ci", "is not measured (—)")
    g("step_headq_fused", step.get("headq_vs_per_token_fused", math.nan))
else:
    step_table = pd.DataFrame({"note": ["not measured (step_ctx = 0)"]})
    g.table("step_table", step_table, sample="none (not measured)")
    for key in ("step_ctx", "step_kivi_fused", "step_kivi_plain", "step_headq_fused"):
        g(key, math.nan)
    for key in ("step_kivi_fused_ci", "step_kivi_plain_ci"):
        g(key, "—")
    g("step_headq_fused_ci", "is not measured (—)")
def ratio_estimate(row: dict, name: str) -> interval.Estimate:
    """A benchmark row's ratio with its interval over rounds (the bench's ``_lo`` / ``_hi``)."""
    return interval.Estimate(row[name], row[f"{name}_lo"], row[f"{name}_hi"], len(row.get("samples", [])) or SPEED_REPEATS["rounds"])


step_fused = (ratio_estimate(caches["kivi-fused"], "ratio_vs_fp") if step is not None and "kivi-fused" in caches
              else None)
g("speed_verdict", claims.fused_decode({r["n"]: ratio_estimate(r, "speedup_vs_sdpa") for r in speed["rows"]}, step_fused).text
  if speed is not None else "not measured (numba is not installed)")

# %% [markdown]
# ```{glue:figure} kv_speed_table
# :name: tbl-kv-speed
#
# One layer's decode attention for one token ({glue:text}`kv_n_heads:d` query heads, {glue:text}`kv_n_kv_heads:d`
# KV heads, $d$ = {glue:text}`kv_d_head:d`, synthetic keys with outlier channels), median milliseconds on this
# machine ({glue:text}`kv_speed_threads_text:s`): the fused kernel on 2-bit KIVI-layout codes (keys per channel,
# values per token, groups of 32, a 32-token fp window), fp32 SDPA on the same keys and values, and the plain path
# (dequantize, then SDPA). The last two columns are ratios: fp32 SDPA's time over the fused kernel's, and the
# bytes each reads.
#
# {glue:md}`kv_speed_table_prov:myst`
# ```
#
# ```{glue:figure} kv_step_table
# :name: tbl-kv-step
#
# The model's whole decode step at {glue:text}`kv_step_ctx:d` cached tokens (median over steps and rounds), for the
# fp cache and 2-bit caches on their plain path and fused ("-fused"), with the memory each held (bytes, and bits
# per cached key or value element).
#
# {glue:md}`kv_step_table_prov:myst`
# ```
#
# **Result.** At {glue:text}`kv_speed_max_n:,` cached tokens the fused 2-bit kernel runs at
# {glue:text}`kv_speed_ratio_ci:s` the speed of fp32 SDPA ({numref}`tbl-kv-speed`; the smallest speed-up over
# the contexts is {glue:text}`kv_speed_ratio_min_ci:s`), reading {glue:text}`kv_speed_bytes_ratio:.2f`× fewer
# bytes. In the whole model at {glue:text}`kv_step_ctx:d` tokens ({numref}`tbl-kv-step`), the KIVI cache's step
# takes {glue:text}`kv_step_kivi_plain_ci:s` the fp cache's on the plain path and
# {glue:text}`kv_step_kivi_fused_ci:s` fused; with HeadQ's side code the fused step
# {glue:text}`kv_step_headq_fused_ci:s`.
#
# **Verdict.** On this CPU a low-bit cache decodes {glue:text}`kv_speed_verdict:s`. These are timings of one
# machine: medians over interleaved rounds (so that drift hits every variant alike), with a paired bootstrap
# interval over the rounds, which says how steady this machine was, not how another machine would do; the
# benchmark commands `atlas bench kv-decode` and `atlas bench kvquant` print the same ratios for a reader's own
# machine and contexts.
#

# %% [markdown]
# ## The A² value policy
#
# With attention fixed, query $i$'s output is $\sum_j a_{ij} v_j$, so a value error $\delta_j$ reaches the
# outputs with weight $w_j = \sum_i a_{ij}^2$ (summed here over the query heads sharing the KV head). Our
# reconstruction of the abstract's "A² value policy" keeps the values with the largest $w_j$ in full
# precision and quantizes the rest at 2 bits, at the same mean payload bits as a uniform quantizer. The
# tokens it protects are those that receive much attention, close in spirit to the "heavy hitters" that
# H2O {cite:p}`zhang2023h2o` keeps in its cache.
#
# **Protocol.** This part is offline, on the error-study layers. The weights $w_j$ come either from the
# attention of the whole block (an oracle) or, as a causal variant, from the block's first half of
# queries. Every policy is judged on the second half of the queries, by the norm of the error it causes
# in the attention output. A control keeps the same number of *randomly* chosen tokens in full precision.

# %%
value_blocks = {l: policy.value_policy_errors(acts[l].probs, split_blocks(acts[l].v, metric_blocks).transpose(0, 1),
                                              acts[l].kv_group, a2_budget, group, seed + l, per_block=True)
                for l in layers}  # {layer: {policy: (block,)}}, from (block, head, query, key) weights and values
value_table = pd.DataFrame({f"layer {l}": {name: e.mean() for name, e in errs.items()} for l, errs in value_blocks.items()})
value_table["mean"] = value_table.mean(axis=1)
value_table.index.name = "value policy"
g.table("value_table", value_table.style.format("{:.4f}"),
        data=pd.DataFrame([{"layer": l, "block": i, "policy": name, "error": float(e[i])} for l, errs in value_blocks.items()
                           for name, e in errs.items() for i in range(len(e))]), sample=metric_sample)
g("a2_budget", a2_budget)
units = {name: np.concatenate([value_blocks[l][name] for l in layers]) for name in value_table.index}  # (layer·block,)
for key, name in (("oracle", "A² (oracle)"), ("causal", "A² (causal)"), ("random", "random tokens fp")):
    g.estimate(f"a2_{key}_ratio", interval.ratio_of_means(units[name], units[f"uniform {a2_budget:g}b"]))  # paired units

# %% [markdown]
# ```{glue:figure} kv_value_table
# :name: tbl-kv-values
#
# Mean norm of the attention-output error caused by quantized values, with attention held at its true
# weights, per error-study layer and averaged (lower is better). Rows: every value at 2 bits; every value
# at {glue:text}`kv_a2_budget:g` bits (uniform); the A² policy with oracle or causal weights; and the same
# number of random tokens kept in full precision. All rows except "uniform 2b" spend
# {glue:text}`kv_a2_budget:g` payload bits per value element on average. Errors are judged on the second
# half of each block's queries.
#
# {glue:md}`kv_value_table_prov:myst`
# ```
#
# **Result.** {numref}`tbl-kv-values` compares the policies. At {glue:text}`kv_a2_budget:g` payload bits
# per value element, the A² policy's output error is {glue:text}`kv_a2_oracle_ratio_ci:s` that of uniform
# quantization with the oracle weights, and {glue:text}`kv_a2_causal_ratio_ci:s` with weights from the
# earlier queries only (95% intervals, (layer, block) units resampled). Keeping the same number of randomly
# chosen tokens in full precision gives {glue:text}`kv_a2_random_ratio_ci:s`. So $w_j$ does find the tokens that matter (A² beats the random
# choice), but here the bits do more good spread evenly over all tokens than concentrated on a few. With
# causal weights, the A² error {glue:text}`kv_a2_verdict:s` that of uniform quantization.
#
# **In decode.** The one-pass engine sees the attention weights that the policy needs, causally: when a
# value is flushed into storage its bits are chosen from $w_j$ summed over the queries processed so far
# (never later ones), at a running budget that keeps the mean payload at or below
# {glue:text}`kv_a2_budget:g` bits. We decode with HeadQ's 2-bit keys and values that are either uniformly
# {glue:text}`kv_a2_budget:g`-bit or, under the policy, 2-bit with the most attended ones in full
# precision, spending at most the same payload bits per value element (a running budget: what the policy
# leaves unspent is not given back, so it may spend less; {numref}`tbl-kv-a2` gives what it spent).

# %%
if engine == "onepass":
    uniform_v, a2_v = K("headq", 2, vbits=a2_vbits), K("headq", 2, vbits=a2_vbits, a2_low=2)
    a2_figs = runs.figures(a2_v)
    glue_ci("a2_decode_ppl", a2_figs["ppl"], PPL)
    glue_ci("a2_uniform_ppl", a2_figs["ppl_baseline"], PPL)
    glue_ci("a2_decode_diff", a2_figs["difference_baseline"], "+" + PPL)
    g("a2_decode_payload", runs(a2_v)["value_payload"])
    a2_decode = claims.lower_verdict(runs(a2_v)["nll"], runs(uniform_v)["nll"], "the A² policy",
                                     f"uniform {a2_vbits}-bit values", runs.setup.boot)
    g("a2_decode_verdict", a2_decode.text)
    a2_table = glue_table("a2_table", [uniform_v, a2_v], {"payload bits per value element": [runs(uniform_v)["value_payload"],
                                                                                             runs(a2_v)["value_payload"]]})
else:
    for key in ("a2_decode_ppl", "a2_uniform_ppl", "a2_decode_diff"):
        glue_ci(key, NOT_MEASURED, PPL)
    g("a2_decode_payload", float("nan"))
    a2_decode = None
    g("a2_decode_verdict", "not measured (the decode engine does not see attention weights)")
    g.table("a2_table", pd.DataFrame({"note": ["not measured: the A² policy runs in the one-pass engine only"]}),
            sample="none (not measured)")

# %% [markdown]
# ```{glue:figure} kv_a2_table
# :name: tbl-kv-a2
#
# Decode perplexity of HeadQ (2-bit keys, rank {glue:text}`kv_rank:d`) with values quantized uniformly at
# {glue:text}`kv_a2_budget:g` bits and under the causal A² policy at no more mean payload ("payload
# bits per value element": bits per stored value element, scales and the fp window not counted, as spent by the
# policy). "Value bits per element" is the cache's uniform layout. Figures are "value [lo, hi]" (95%, paired
# block bootstrap); "excess removed" and "vs baseline" compare the policy with uniform values.
#
# {glue:md}`kv_a2_table_prov:myst`
# ```
#
# **Result.** {numref}`tbl-kv-a2`: with the policy, decode perplexity is {glue:text}`kv_a2_decode_ppl_ci:s` at
# {glue:text}`kv_a2_decode_payload:.3f` payload bits per value element, against
# {glue:text}`kv_a2_uniform_ppl_ci:s`
# with uniform values (difference {glue:text}`kv_a2_decode_diff_ci:s`): {glue:text}`kv_a2_decode_verdict:s`.
#
# **For the source's claim.** The paper's full-KV claim is that HeadQ plus the A² policy improves every
# model. Offline, the causal policy's output error {glue:text}`kv_a2_verdict:s` uniform's; in
# decode, at no more payload bits ({glue:text}`kv_a2_decode_payload:.3f` against {glue:text}`kv_a2_budget:g`),
# {glue:text}`kv_a2_decode_verdict:s`. This tests the policy in the form we
# reconstructed (full precision for the most attended values, 2 bits for the rest), not the authors'.

# %%
hq_figs = runs.figures(K("headq", 2))
# the headline verdict, worded by the decision rule at the headline rank and, beside their storage, at every rank swept
g("verdict", rank_verdict.text if rank_verdict else claims.headq_range(hq_figs["excess_removed"],
                                                                        hq_figs["difference_baseline"]).text)

# The same verdicts on the first `previous_blocks` of these blocks: the sample of the chapter's earlier
# version (2 blocks of 512, 766 scored tokens), so the prose can say which verdicts the larger sample changed.
previous_blocks = min(2, eval_blocks)


def verdicts(n: int) -> dict[str, str]:
    """The chapter's headline verdicts (``claims.kv_headline``) from the first ``n`` evaluation blocks, as text."""
    nll = lambda m: runs(m)["nll"][:n]  # noqa: E731
    headline = claims.kv_headline(
        {"per-token 2b": nll(K("per-token", 2)), "headq 2b": nll(K("headq", 2)), "fp": nll(KVMethod(method="fp")),
         "kivi 2b": nll(K("kivi", 2))}, {runs(m)["label"]: nll(m) for m in same}, hq_label,
        {c: nll(m) for c, m in control_names.items()},
        (nll(a2_v), nll(uniform_v), a2_vbits) if engine == "onepass" else None, runs.setup.boot)
    return {name: plain(v.text) for name, v in headline.items()}


now, before = verdicts(eval_blocks), verdicts(previous_blocks)
changed = [name for name in now if now[name].split(" (")[0] != before[name].split(" (")[0]]
sample_table = pd.DataFrame({f"all {plural(eval_blocks, 'block')}": now, f"first {plural(previous_blocks, 'block')}": before})
sample_table.index.name = "claim"
g.table("sample_table", sample_table.style.set_properties(**{"text-align": "left", "white-space": "normal"}),
        sample=f"{decode_sample}; the first {plural(previous_blocks, 'block')} again")
g("previous_blocks", previous_blocks)
g("previous_tokens", previous_blocks * (seq_len - prefill - 1))
g("previous_tokens_text", f"{previous_blocks * (seq_len - prefill - 1):,}")
g("previous_blocks_text", plural(previous_blocks, "block"))
g("n_changed", len(changed))
g("changed", ", ".join(changed) if changed else "no verdict changes")
g("fisher_verdict", claims.fisher_predicts(interval.spearman_difference(per_head["fisher"], per_head["key_mse"],
                                                                         per_head["kl"])).text)
a2_off = claims.a2_offline(interval.ratio_of_means(units["A² (causal)"], units[f"uniform {a2_budget:g}b"]))
g("a2_verdict", a2_off.text)
g("a2_claim", claims.a2_claim(a2_decode, a2_off).text)  # the source's "improves every model", on this one

out = Path(results_dir)
out.mkdir(parents=True, exist_ok=True)
write_json(out / "kvquant.json", {
    "model": model,
    "spec": s.as_dict(),
    "params": {"corpus": corpus, "seq_len": seq_len, "eval_blocks": eval_blocks, "prefill": prefill, "engine": engine,
               "calib_blocks": calib_blocks, "group": group, "bits": bits, "kv_bits": kv_bits, "ranks": ranks, "rank": rank,
               "side_bits": side_bits, "metric_layers": layers, "metric_blocks": metric_blocks,
               "a2_budget": a2_budget, "code_bits": code_bits, "code_kv_bits": code_kv_bits, "code_families": code_families,
               "code_kv_families": code_kv_families, "speed_contexts": speed_contexts, "step_ctx": step_ctx, "seed": seed},
    "fp_ppl": fp_ppl.as_dict(),
    "runs": [{"label": r["label"], "bits_key": r["bits_key"], "bits_value": r["bits_value"], "value_payload": r["value_payload"],
              "settings": vars(m)} | {name: est.as_dict() for name, est in runs.figures(m).items()} for m, r in list(runs.done.items())],
    "error_study": {"spearman": rho, "spearman_within_head": within,
                    "by_config": by_config.reset_index().to_dict(orient="records")},
    "value_policy": value_table.reset_index().to_dict(orient="records"),
    # the best new key code at the storage KIVI-b holds (K-only, b = code_bits[0]): name, bits, perplexity with its
    # interval, KIVI's bits and perplexity, fp's, and KIVI's excess removed with its interval
    "equal_storage": storage.as_json(k_only["equal_storage"].get(code_bits[0])),
    "key_codes": {setting: storage.as_json({k: v for k, v in st.items() if k != "methods"}) for setting, st in studies.items()},
    "decode_speed": {"one_layer": speed, "whole_step": step},
})
g.intervals({"fisher_kl_ratio": ".2f", "rho_fisher": ".2f", "rho_key_mse": ".2f", "rho_logit_mse": ".2f"},
            ratios={"a2_causal_ratio": ".2f", "a2_oracle_ratio": ".2f", "a2_random_ratio": ".2f", "null_kl_ratio": ".3f",
                    "null_mse_ratio": ".2f"})
g.finish()  # the opening box: run information and this chapter's wall time

# %% [markdown]
# ## Sample size
#
# ```{glue:figure} kv_sample_table
# :name: tbl-kv-sample
#
# The chapter's headline verdicts from all {glue:text}`kv_eval_blocks_text:s` of the evaluation split and from the
# first {glue:text}`kv_previous_blocks_text:s` of them ({glue:text}`kv_previous_tokens_text:s` scored tokens, the
# sample of this chapter's earlier version). Each verdict is computed by the same library function from the
# same runs; only the blocks differ.
#
# {glue:md}`kv_sample_table_prov:myst`
# ```
#
# An earlier version of this chapter scored {glue:text}`kv_previous_tokens_text:s` tokens per configuration, and
# no figure carried an interval. {numref}`tbl-kv-sample` reads the headline verdicts on that sample and on
# this one: {glue:text}`kv_n_changed:d` of them change with the larger sample ({glue:text}`kv_changed:s`).
# The verdicts in this chapter rest on all {glue:text}`kv_eval_blocks_text:s`.

# %% [markdown]
# ## Summary
#
# All HeadQ results here are for our reconstruction from the paper's abstract, on
# {glue:text}`kv_model:s` and {glue:text}`kv_corpus:s` text, not for the authors' code.
#
# - **Score-space error predicts attention KL: {glue:text}`kv_fisher_verdict:s`.** The Fisher form ranks
#   attention KL with Spearman ρ = {glue:text}`kv_rho_fisher_ci:s`, key MSE with ρ =
#   {glue:text}`kv_rho_key_mse_ci:s` ({numref}`fig-kv-metrics`). Null-space noise with
#   {glue:text}`kv_null_mse_ratio_ci:s`
#   the key MSE of 2-bit quantization has only {glue:text}`kv_null_kl_ratio_ci:s` its attention KL.
# - **HeadQ at 2 bits, keys only, against the paper's 84–94%.** At rank {glue:text}`kv_rank:d`
#   ({glue:text}`kv_bits_hq2:.3f` bits per key element) it removes {glue:text}`kv_removed_hq2_ci:s` of the excess perplexity of 2-bit
#   per-token keys, on {glue:text}`kv_eval_tokens_text:s` scored tokens. Rank by rank, with its storage:
#   {glue:text}`kv_verdict:s`. Rank {glue:text}`kv_best_rank:d` removes {glue:text}`kv_best_rank_removed_ci:s`, at
#   {glue:text}`kv_best_rank_bits:.3f` bits per key element ({numref}`tbl-kv-rank`, {numref}`fig-kv-rank`).
# - **Equal storage: {glue:text}`kv_budget_verdict:s`.** At {glue:text}`kv_budget_bits:.3f` bits per key
#   element, {glue:text}`kv_budget_best:s` reads {glue:text}`kv_budget_best_ppl_ci:s` against HeadQ's
#   {glue:text}`kv_ppl_hq2_ci:s`; 2-bit KIVI keys
#   read {glue:text}`kv_ppl_kivi2_ci:s` at
#   {glue:text}`kv_bits_kivi2:.3f` bits ({numref}`tbl-kv-budget`).
# - **Controls: {glue:text}`kv_control_verdict:s`.** The query basis removes
#   {glue:text}`kv_ctl_query_removed_ci:s` of the excess, a random basis {glue:text}`kv_ctl_random_removed_ci:s`, the key-PCA basis
#   {glue:text}`kv_ctl_keypca_removed_ci:s`; the wrong sign reads {glue:text}`kv_ctl_wrong_ppl_ci:s` ({numref}`tbl-kv-controls`).
# - **Full KV and the A² value policy: "improves every model" {glue:text}`kv_a2_claim:s`.** Full-KV HeadQ removes {glue:text}`kv_removed_hq2_kv_ci:s` of per-token's excess.
#   In decode at no more payload bits, {glue:text}`kv_a2_decode_verdict:s` ({numref}`tbl-kv-a2`); offline,
#   the causal policy's output error is {glue:text}`kv_a2_causal_ratio_ci:s` that of uniform quantization
#   ({numref}`tbl-kv-values`).
# - **Pre-RoPE keys** ({numref}`tbl-kv-rope`): 2-bit KIVI reads {glue:text}`kv_rope_kivi_pre_ci:s` pre-RoPE against
#   {glue:text}`kv_rope_kivi_post_ci:s` post-RoPE: {glue:text}`kv_rope_kivi_verdict:s`.
# - **A key code at equal storage** ({numref}`fig-kv-pareto`, {numref}`tbl-kv-storage`): at the storage of {glue:text}`kv_es_bits_low:d`-bit KIVI,
#   {glue:text}`kv_es_kivi_bits:.3f` bits per key element, by perplexity {glue:text}`kv_es_verdict:s`.
# - **Decoding faster than fp** ({numref}`tbl-kv-speed`, {numref}`tbl-kv-step`): {glue:text}`kv_speed_verdict:s`.
# - **Not tested here:** the paper's six models, WikiText-103, and its anomaly in small Pythia models at a
#   low-entropy route-flip boundary. None of these models or corpora is available offline.
