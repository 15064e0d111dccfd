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
# # The atlas: head overlap against its null
#
# ```{glue:md} atlas_run_box
# :format: myst
# ```
#
# The ATLAS work {cite:p}`chancay2026atlas` makes two claims about the attention heads of a trained
# language model. First, the residual of every head lies on its own low-dimensional manifold: the source
# reports a mean TwoNN dimension of 7.1 for both GPT-2 {cite:p}`radford2019gpt2` and Qwen2.5-0.5B
# {cite:p}`qwen2025qwen25`. Second, the manifolds of different heads are "mutually non-aligned", with an
# overlap $O_h \ll 1$: the source gives $O_h$ = 0.284 [0.276, 0.292] for the first 8 heads of GPT-2 and
# 0.291 [0.285, 0.298] for Qwen2.5-0.5B, both with $d_\text{head} = 64$ and $k = 7$. It adds an
# intervention: hard top-1 attention in GPT-2's deepest layer costs 7.7 points of perplexity, and a rank-7
# reconstruction of the residual recovers 55.9% of the damage done in the three deepest layers.
#
# This chapter asks whether these numbers describe trained heads, or whether unrelated directions would
# give the same values. It runs the source's protocol on one model and sets each number beside a chance
# level: Haar-random frames in the same dimension, and Gaussian clouds with the same covariance.
#
# The protocol, as the source's code runs it: in the deepest layer, each head's residual
# $\varepsilon_h[t] = z_h[t] - v_{g(h)}[\arg\max_j p_h[t, j]]$ (its output $z_h$ before the output projection
# minus the value of its most attended key; the source's preprint writes the residual in two other ways,
# not used here), sampled at $N$ positions; the frame $B_h \in \mathbb{R}^{d \times k}$ of each head's
# cloud (its top-$k$ principal directions); the overlap of two frames
#
# $$O(i, j) = \frac{1}{k} \sum_{m=1}^{k} \cos\theta_m(B_i, B_j),$$
#
# the mean cosine of their principal angles; and $O_h$, the mean of $O$ over head pairs. Under grouped-query
# attention the headline uses only pairs of heads that read different KV heads, as the source does.

# %% tags=["parameters"]
model = "smollm2-135m"
corpus = "britannica"
seq_len = 256  # tokens per block of the point clouds
n_blocks = 12  # the first 12 blocks of the evaluation split
n_points = 1200  # points per head
k = 7  # headline frame rank
k_sweep = [4, 5, 6, 7, 8, 9, 10, 11]
metric = "source"  # mean principal cosine, the source's overlap
n_boot = 2000  # bootstrap resamples over pairs
null_draws = 500  # Monte Carlo draws of the Haar null
intra_null_draws = 200  # Monte Carlo draws of the shared-value null of intra-group pairs (~26 s on SmolLM2)
seed = 0
blas_threads = 1  # numpy's BLAS threads (see below)
top1_seq_len = 512  # hard top-1 experiment: evaluation windows ...
top1_eval_blocks = 8  # ... from the evaluation split (the bootstrap resamples these windows)
top1_calib_seq_len = 256  # calibration windows (ε frames of the reconstruction) ...
top1_calib_blocks = 4  # ... from the calibration split, which never overlaps the evaluation split
results_dir = "results"

# %%
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from atlas_core import claims, interval
from atlas_core.cache import write_json
from atlas_core.clouds import CloudSpec, head_clouds, kv_groups, out_proj, point_indices
from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.geometry import frame_rank, gaussian_null_clouds, layer_overlap, overlap_sweep
from atlas_core.intrinsic import layer_profile, per_head_dropped
from atlas_core.models import load_model
from atlas_core.zoo import model_title
from atlas_core.eval import block_nll
from atlas_core.figures import color, figsize
from atlas_core.glue import chapter_glue, estimate_text, number, plural, times_text, with_ci
from atlas_core.interval import Estimate, format_estimate
from atlas_core.intra_null import IntraNullSpec, intra_group_null, layer_group_attention
from atlas_core.top1 import fit_reconstruction, top1_experiment

# g(key, value) glues atlas_<key>; g.figure / g.table also write the data and the provenance line
g = chapter_glue("atlas", chapter="atlas", model=model, corpus=corpus, results_dir=results_dir)
Z_CRIT = claims.OVERLAP_RULE.z_crit  # the decision rule's two-sided critical z (1.96 at α = 0.05)
RESIDUAL = {"eps": "residual ε", "z": "output z"}  # the clouds as the legends name them (and colour them)
INTRA = "intra-group pairs (ε)"  # pairs of heads that read one KV head

# The geometry runs many small LAPACK calls; a multi-threaded BLAS slows them down by an order of magnitude
# when the cores are shared with torch or another job, so numpy's BLAS runs single-threaded here.
threadpool_limits(blas_threads, user_api="blas")

lm = load_model(model)
s = lm.spec
layer = s.n_layers - 1  # the deepest layer
groups = kv_groups(lm)  # (head,) KV head of each query head
cloud_spec = CloudSpec(corpus=corpus, seq_len=seq_len, n_blocks=n_blocks, n_points=n_points, seed=seed)
ks = sorted(set(k_sweep) | {k})

eps_by_layer = head_clouds(lm, list(range(s.n_layers)), "eps", cloud_spec, progress=False)  # one pass
eps = eps_by_layer[layer]  # (head, point, d_head)
z_cloud = head_clouds(lm, [layer], "z", cloud_spec, progress=False)[layer]  # (head, point, d_head)
c_cloud = head_clouds(lm, [layer], "c", cloud_spec, progress=False)[layer]  # (head, point, d_model)

g("model", model_title(model))  # prose name; the run box keeps the id
g("corpus", corpus)
for name in ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model"):
    g(name, getattr(s, name))
g("layer", layer)
g("n_points", n_points)
g("n_blocks", n_blocks)
g("blocks_text", plural(n_blocks, "block"))
g("seq_len", seq_len)
g("k", k)
g("k_min", min(ks))
g("k_max", max(ks))
g("n_boot", n_boot)
g("null_draws", null_draws)
g("z_crit", Z_CRIT)
cloud_sample = f"{plural(n_points, 'point')} per head from {plural(n_blocks, 'block')} of {seq_len} tokens"

# %% [markdown]
# The model is {glue:text}`atlas_model:s` (the book's default is SmolLM2-135M {cite:p}`allal2025smollm2`;
# see {doc}`models`). It has {glue:text}`atlas_n_layers:d` layers of
# {glue:text}`atlas_n_heads:d` query heads reading {glue:text}`atlas_n_kv_heads:d` KV heads,
# $d_\text{head}$ = {glue:text}`atlas_d_head:d` and $d_\text{model}$ = {glue:text}`atlas_d_model:d`. The
# clouds hold $N$ = {glue:text}`atlas_n_points:,d` points per head, drawn (seeded) from the first
# {glue:text}`atlas_blocks_text:s` of {glue:text}`atlas_seq_len:d` tokens of the
# {glue:text}`atlas_corpus:s` evaluation split, leaving out position 0 of each block, where
# $\varepsilon = 0$. The deepest layer is layer {glue:text}`atlas_layer:d` (counted from 0).
#
# ## Overlap against the random-frame null
#
# For two frames drawn uniformly (Haar) at random in $\mathbb{R}^d$, $\sqrt{d}\,B_i^\top B_j$ is close to
# a $k \times k$ Gaussian matrix, and the mean principal cosine is close to
#
# $$\mathbb{E}\,O \approx \frac{8}{3\pi}\sqrt{\frac{k}{d}}.$$
#
# So $O \ll 1$ is what unrelated frames give whenever $k \ll d$. At the source's $d = 64$ and $k = 7$ this
# approximation is 0.281, next to the source's 0.284 and 0.291. The Monte Carlo null, at each
# $k$ = {glue:text}`atlas_k_min:d`…{glue:text}`atlas_k_max:d`, averages $O$ over as many independent
# random pairs as the real $O_h$ averages, {glue:text}`atlas_null_draws:,d` times; its spread is the one
# expected of an $O_h$ from that many pairs. The interval on $O_h$ is a percentile bootstrap over pairs
# ({glue:text}`atlas_n_boot:,d` resamples); pairs that share a head are not independent, so it describes
# the spread over the pair set rather than over heads. {numref}`fig-atlas-sweep` plots $O_h$ against $k$
# beside this null, and {numref}`tbl-atlas-sweep` lists the numbers.

# %%
# every k from one SVD per head (equal to layer_overlap at each k: tested)
sweep = {res: overlap_sweep(cloud, groups, ks, metric, n_boot, seed, null_draws)
         for res, cloud in (("eps", eps), ("z", z_cloud))}
head = sweep["eps"][k]  # the headline: ε at k
mqa = head.pairs == "intra-only"
show_intra = head.intra is not None and not mqa  # intra-group pairs beside an inter-group headline

# Intra-group pairs read the same keys and values, so their chance level is not the Haar null but heads with
# independent query weights over the same keys and values (atlas_core.intra_null): every query head's
# queries rotated by its own Haar rotation, the clouds and the intra-group O recomputed per draw.
if head.intra is not None:
    intra_null = intra_group_null(layer_group_attention(lm, layer, cloud_spec), point_indices(cloud_spec),
                                  IntraNullSpec(k=k, n_draws=intra_null_draws, seed=seed, metric=metric))
    intra_null["z"] = (head.intra - intra_null["mean"]) / intra_null["std"]
    # the intra-group O_h's excess over this null, its interval counting both spreads (the decision rule)
    intra_null["excess"] = claims.null_excess(Estimate(head.intra, *head.intra_ci, head.n_intra),
                                              intra_null["mean"], intra_null["std"])
    intra_verdict = claims.null_side(intra_null["excess"]).text
else:  # MHA: no two heads share a KV head
    intra_null = {"mean": math.nan, "std": math.nan, "z": math.nan, "n_pairs": 0, "draws": np.array([]),
                  "observed": math.nan, "excess": Estimate(math.nan, math.nan, math.nan, 0)}
    intra_verdict = "is undefined (no two heads share a KV head), so it is not set against"

sweep_data = pd.DataFrame({  # the numbers behind the figure and the table (unformatted)
    "k": ks,
    **{f"o_h_{res}": [sweep[res][kk].o_h for kk in ks] for res in ("eps", "z")},
    **{f"o_h_{res}_lo": [sweep[res][kk].ci[0] for kk in ks] for res in ("eps", "z")},
    **{f"o_h_{res}_hi": [sweep[res][kk].ci[1] for kk in ks] for res in ("eps", "z")},
    "intra_eps": [sweep["eps"][kk].intra for kk in ks],
    "null_mean": [sweep["eps"][kk].null_mean for kk in ks],
    "null_std": [sweep["eps"][kk].null_std for kk in ks],
    "null_analytic": [sweep["eps"][kk].null_analytic for kk in ks],
    "delta_eps": [sweep["eps"][kk].delta for kk in ks],
    "delta_eps_lo": [claims.summary_excess(sweep["eps"][kk]).lo for kk in ks],  # both spreads (the rule)
    "delta_eps_hi": [claims.summary_excess(sweep["eps"][kk]).hi for kk in ks],
    "z_eps": [sweep["eps"][kk].z for kk in ks],
    "z_z": [sweep["z"][kk].z for kk in ks],
    "intra_null_mean": [intra_null["mean"] if kk == k else math.nan for kk in ks],  # measured at k only
    "intra_null_std": [intra_null["std"] if kk == k else math.nan for kk in ks],
}).set_index("k")
sweep_table = pd.DataFrame({
    "Oₕ, ε": sweep_data["o_h_eps"],
    "95% interval, ε": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(sweep_data["o_h_eps_lo"], sweep_data["o_h_eps_hi"])],
    "Oₕ, z": sweep_data["o_h_z"],
    "Haar null mean": sweep_data["null_mean"],
    "Haar null s.d.": sweep_data["null_std"],
    "analytic null": sweep_data["null_analytic"],
    "Oₕ − null, ε [95% interval]": [estimate_text(d, lo, hi, "+.3f") for d, lo, hi in
                                    zip(sweep_data["delta_eps"], sweep_data["delta_eps_lo"], sweep_data["delta_eps_hi"])],
    "against the null, by the rule": [claims.null_side(claims.summary_excess(sweep["eps"][kk])).text for kk in ks],
    "z-score, ε": sweep_data["z_eps"],
    "z-score, z": sweep_data["z_z"],
}).rename_axis("frame rank k")
if show_intra:
    sweep_table.insert(2, "intra-group Oₕ, ε", sweep_data["intra_eps"])
text_columns = ("95% interval, ε", "Oₕ − null, ε [95% interval]", "against the null, by the rule")
fmt = {c: "{:.3f}" for c in sweep_table.columns if c not in text_columns}
fmt.update({"Haar null s.d.": "{:.4f}", "z-score, ε": "{:+.1f}", "z-score, z": "{:+.1f}"})
g.table("sweep_table", sweep_table.style.format(fmt, na_rep="—"), data=sweep_data, sample=cloud_sample)

fig, ax = plt.subplots(figsize=figsize(panel_aspect=0.5), layout="constrained")
null_mean, null_std = sweep_data["null_mean"].to_numpy(), sweep_data["null_std"].to_numpy()
ax.fill_between(ks, null_mean - Z_CRIT * null_std, null_mean + Z_CRIT * null_std, color="0.85",
                label=f"Haar null, mean ± {Z_CRIT:.2f} sd")
ax.plot(ks, null_mean, color="0.45", lw=1)
ax.plot(ks, sweep_data["null_analytic"], color="0.3", ls="--", lw=1, label="(8/3π)√(k/d)")
for res, marker, dx in (("eps", "o", -0.08), ("z", "s", 0.08)):
    o = sweep_data[f"o_h_{res}"].to_numpy()
    lo, hi = sweep_data[f"o_h_{res}_lo"].to_numpy(), sweep_data[f"o_h_{res}_hi"].to_numpy()
    ax.errorbar(np.array(ks) + dx, o, yerr=[o - lo, hi - o], fmt=marker, color=color(RESIDUAL[res]),
                label=f"$O_h$, {RESIDUAL[res]} ({head.pairs} pairs)")
if show_intra:
    ax.plot(ks, sweep_data["intra_eps"], "^", mfc="none", color=color(INTRA), label=INTRA)
if head.intra is not None:  # the chance level of intra-group pairs, at the headline k
    ax.errorbar([k + 0.2], [intra_null["mean"]], yerr=[Z_CRIT * intra_null["std"]], fmt="D", mfc="none", color="0.3",
                label=f"null of intra-group pairs, ± {Z_CRIT:.2f} sd")
ax.set_xlabel("frame rank k")
ax.set_ylabel("mean principal cosine")
ax.set_title(f"{model}, layer {layer}, N = {n_points:,}")
fig.legend(loc="outside lower center", ncols=2)
g.figure("fig_sweep", fig, data=sweep_data, sample=cloud_sample)

g("oh", head.o_h)
g("oh_lo", head.ci[0])
g("oh_hi", head.ci[1])
g("null_mean", head.null_mean)
g("null_std", head.null_std)
g("null_analytic", head.null_analytic)
g("delta", head.delta)
g("z", head.z)
g("n_pairs", head.n_pairs)
g("n_inter", head.n_inter)
g("n_intra", head.n_intra)
g("pair_label", "head pairs (every head reads the single KV head)" if mqa else
  "inter-group pairs (heads that read different KV heads)" if head.n_intra else "head pairs")
head_excess = claims.summary_excess(head)  # O_h − null with both spreads: what the verdict reads
g("verdict", claims.null_side(head_excess).text)
g.estimate("excess", head_excess, "+.3f")
# Glued in every case (an empty glue reads as a missing value; the book's glue check refuses it).
g("mqa_note", " Here every head reads the single KV head, so every pair is an intra-group pair: the comparison with "
  "random frames only restates that the heads average the same value vectors, and their fair chance level is "
  "the shared-value null of the KV-groups paragraph below." if mqa else
  " Pairs of heads that read the same KV head are left out here: they average the same value vectors, and the "
  "KV-groups paragraph below judges them against their own, shared-value null." if head.n_intra else
  " Every head reads its own KV head, so random frames are the fair chance level for every pair.")
lo_k, hi_k = min(ks), max(ks)  # the sweep's ends with their intervals (the claims page's "rises with k" row)
g("sweep_ends", " to ".join(f"{with_ci(sweep['eps'][kk].o_h, sweep['eps'][kk].ci)} at k = {kk}" for kk in (lo_k, hi_k)))
g("sweep_ends_null", " to ".join(f"{sweep['eps'][kk].null_mean:.3f}" for kk in (lo_k, hi_k)))
sweep_excess = {kk: claims.summary_excess(sweep["eps"][kk]) for kk in ks}
g("sweep_verdict", claims.sweep_clause(sweep_excess).text)
# The claims page's verdicts on the headline and on the sweep, whichever way the z-scores fall; with no
# inter-group pairs (MQA) the headline is judged against the shared-value null, its fair chance level.
g("claim_verdict", claims.o_h_claim(intra_null["excess"] if mqa else head_excess,
                                    null="shared-value" if mqa else "haar").text)
g("sweep_claim_verdict", claims.sweep_claim(sweep_excess).text)
g("split", claims.intra_split(o_h_ci=head.ci, intra=head.intra, intra_ci=head.intra_ci, n_intra=head.n_intra,
                              n_inter=head.n_inter, all_pairs=head.all_pairs, mqa=mqa).text)

g("intra_null_mean", number(intra_null["mean"], ".3f"))
g("intra_null_std", number(intra_null["std"], ".4f"))
g("intra_null_z", number(intra_null["z"], "+.1f"))
g("intra_null_verdict", intra_verdict)
g("intra_null_excess", estimate_text(intra_null["excess"].value, intra_null["excess"].lo, intra_null["excess"].hi, "+.3f"))
g("intra_null_draws", intra_null_draws)

# %% [markdown]
# ```{glue:figure} atlas_fig_sweep
# :name: fig-atlas-sweep
#
# $O_h$ of the residual $\varepsilon$ (circles) and of the head output $z$ (squares) against the frame
# rank $k$, with 95% bootstrap intervals over pairs. The grey band is the Haar null, its mean ±
# {glue:text}`atlas_z_crit:.2f` sd of the Monte Carlo draws, and the dashed line its analytic
# approximation. The band is the null's spread alone: by the book's decision rule ({ref}`sec-rule`) a
# point is distinguishable from chance when its excess over the null, with an interval that counts both
# its own 95% interval and the null's spread, excludes zero ({numref}`tbl-atlas-sweep`). Open triangles, where shown, are pairs of heads that share a KV head; the
# band is not their chance level (they read the same value vectors). Their own null, heads that read the
# same keys and values with independent query weights, is the open diamond at $k$ =
# {glue:text}`atlas_k:d` (mean ± {glue:text}`atlas_z_crit:.2f` sd; see the text).
#
# {glue:md}`atlas_fig_sweep_prov:myst`
# ```
#
# ```{glue:figure} atlas_sweep_table
# :name: tbl-atlas-sweep
#
# The numbers behind {numref}`fig-atlas-sweep`, one row per $k$: $O_h$ over
# {glue:text}`atlas_pair_label:s` with its 95% interval, the Haar null for the same number of pairs
# (Monte Carlo mean and sd, and the analytic approximation $(8/3\pi)\sqrt{k/d}$), the difference to the
# null with its 95% interval, which counts both the interval over pairs and the null's spread, and what
# the decision rule ({ref}`sec-rule`) reads from that interval. The z-scores give the difference in units
# of the null's sd; no verdict reads them.
#
# {glue:md}`atlas_sweep_table_prov:myst`
# ```
#
# At $k$ = {glue:text}`atlas_k:d`, over the {glue:text}`atlas_n_pairs:d` {glue:text}`atlas_pair_label:s`,
# $O_h$ = {glue:text}`atlas_oh_ci:s`.
# Haar-random frames in $\mathbb{R}^{d_\text{head}}$ give {glue:text}`atlas_null_mean:.3f`
# ± {glue:text}`atlas_null_std:.4f` (analytic approximation {glue:text}`atlas_null_analytic:.3f`): the
# difference is {glue:text}`atlas_excess_ci:s`, its 95% interval counting both the spread over pairs and
# the null's ({ref}`sec-rule`); that is a z-score of {glue:text}`atlas_z:+.1f` in the null's units. The measured $O_h$ {glue:text}`atlas_verdict:s` the overlap of
# random frames, and {glue:text}`atlas_sweep_verdict:s`. The "$\ll 1$" of the source is the value random
# frames take in this dimension; by itself it says nothing about how the heads are arranged.{glue:text}`atlas_mqa_note:s` The command
# `atlas overlap --model M --json` prints the same headline numbers for any model M.
#
# KV groups: {glue:text}`atlas_split:s`. Two heads of one group both write convex combinations of
# the same value vectors, so their clouds share coordinates and align by construction; random frames are
# therefore not their chance level. Their null keeps the layer's keys and values and gives each query head
# query weights of its own, rotated by an independent Haar rotation ({glue:text}`atlas_intra_null_draws:,d`
# draws, the same points and pairs): against heads that read the same keys and values with independent
# query weights, {glue:text}`atlas_intra_null_mean:s` ± {glue:text}`atlas_intra_null_std:s`,
# z = {glue:text}`atlas_intra_null_z:s`, the intra-group $O_h$ {glue:text}`atlas_intra_null_verdict:s`
# that null, by {glue:text}`atlas_intra_null_excess:s` (both spreads counted). Heads of different groups are compared across unrelated coordinates (see the section on
# coordinates below).
#
# ## The overlap matrix
#
# $O_h$ is a mean over pairs. {numref}`fig-atlas-matrix` shows the overlap of every pair of heads, so that
# pairs within a KV group (the blocks on the diagonal) can be told apart from pairs across groups.

# %%
mat = head.matrix.copy()
np.fill_diagonal(mat, np.nan)
fig, ax = plt.subplots(figsize=figsize(width=0.8, panel_aspect=0.85), layout="constrained")
im = ax.imshow(mat, cmap="viridis")
ax.grid(False)
labels = [f"{h} (g{groups[h]})" for h in range(s.n_heads)]
ax.set_xticks(range(s.n_heads), labels, rotation=90)
ax.set_yticks(range(s.n_heads), labels)
for b in np.flatnonzero(np.diff(groups)) + 0.5:  # KV-group boundaries
    ax.axhline(b, color="w", lw=1.5)
    ax.axvline(b, color="w", lw=1.5)
if s.n_heads <= 10:  # values in the cells while they fit at 9 pt
    middle = np.nanmean([np.nanmin(mat), np.nanmax(mat)])
    for i in range(s.n_heads):
        for j in range(s.n_heads):
            if i != j:
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", color="w" if mat[i, j] < middle else "0.1")
fig.colorbar(im, ax=ax, label=f"O (k = {k})")
ax.set_xlabel("head (KV group)")
ax.set_ylabel("head (KV group)")
ax.set_title(f"{model}, layer {layer}, ε")
matrix_data = pd.DataFrame(head.matrix, index=pd.Index(labels, name="head (KV group)"), columns=labels)
g.figure("fig_matrix", fig, data=matrix_data, sample=cloud_sample)
g("matrix_min", np.nanmin(mat))
g("matrix_max", np.nanmax(mat))

# %% [markdown]
# ```{glue:figure} atlas_fig_matrix
# :name: fig-atlas-matrix
#
# Overlap $O(i, j)$ of the $\varepsilon$ frames of every two heads at $k$ = {glue:text}`atlas_k:d`, in
# layer {glue:text}`atlas_layer:d`. Heads are labelled by index and KV group (g); white lines separate the
# groups, so the blocks on the diagonal are intra-group pairs. Compare each cell across groups with the
# Haar null mean, {glue:text}`atlas_null_mean:.3f`, and the cells inside a group with the shared-value null
# of intra-group pairs, {glue:text}`atlas_intra_null_mean:s` (see the text).
#
# {glue:md}`atlas_fig_matrix_prov:myst`
# ```
#
# Off the diagonal, $O(i, j)$ ranges from {glue:text}`atlas_matrix_min:.3f` to
# {glue:text}`atlas_matrix_max:.3f` ({numref}`fig-atlas-matrix`).
#
# ## Intrinsic dimension of each head
#
# The source reports a mean dimension of 7.1 for GPT-2 and Qwen2.5-0.5B, 10.8 for Llama-3.1-8B and 9.3 for
# Mistral-7B, all with its own TwoNN variant. Three estimators are run here on the same clouds. TwoNN
# {cite:p}`facco2017twonn` is the line fit of $-\log(1 - F(\mu))$ against $\log\mu$, with
# $\mu = r_2/r_1$ and the largest 10% of $\mu$ left out; it is unbiased on known manifolds. The
# **source's variant**, $\hat d = n_\text{kept} / \sum \log\mu$ after dropping the largest 10% of
# $\log\mu$, ignores the truncation and so overestimates (by a factor of 1.34 when the ratios are exactly
# Pareto distributed); it is reported only to reproduce the source's numbers. The third is the
# Levina–Bickel maximum-likelihood estimator {cite:p}`levina2004mle` over 20 neighbours. {numref}`fig-atlas-id` shows the three
# estimates for each head, and {numref}`tbl-atlas-id` lists them.

# %%
counted = {est: per_head_dropped(eps, est) for est in ("twonn", "twonn-source", "mle")}  # (d_int, dropped) per head
ids = {est: v for est, (v, _) in counted.items()}
dropped_last = sum(int(n.sum()) for _, n in counted.values())  # over all heads and estimators

ESTIMATOR = {"twonn": "TwoNN", "twonn-source": "TwoNN, source variant", "mle": "MLE, 20 neighbours"}
id_data = pd.DataFrame({"kv_group": groups, **{est: v for est, v in ids.items()}},
                       index=pd.Index(range(s.n_heads), name="head"))
id_table = id_data.rename(columns={"kv_group": "KV group", **ESTIMATOR})
id_table.loc["mean"] = [np.nan, *(v.mean() for v in ids.values())]
g.table("id_table", id_table.style.format("{:.2f}", subset=id_table.columns[1:])
        .format("{:.0f}", subset=["KV group"], na_rep="—"), data=id_data, sample=cloud_sample)

fig, ax = plt.subplots(figsize=figsize(panel_aspect=0.45), layout="constrained")
width = 0.27
for i, (est, label) in enumerate(ESTIMATOR.items()):
    ax.bar(np.arange(s.n_heads) + (i - 1) * width, ids[est], width, color=color(label),
           label=f"{label} (mean {ids[est].mean():.2f})")
ax.set_xticks(range(s.n_heads), labels, rotation=90 if s.n_heads > 6 else 0)
ax.set_xlabel("head (KV group)")
ax.set_ylabel("intrinsic dimension")
ax.set_title(f"{model}, layer {layer}, ε, N = {n_points:,}")
fig.legend(loc="outside lower center", ncols=2)
g.figure("fig_id", fig, data=id_data, sample=cloud_sample)

g("id_twonn", ids["twonn"].mean())
g("id_twonn_sd", ids["twonn"].std(ddof=1))
id_source = ids["twonn-source"].mean()
id_ratio = id_source / ids["twonn"].mean()
g("id_source", id_source)
g("id_mle", ids["mle"].mean())
g("id_source_ratio", id_ratio)
# The unbiased estimate against the source's ~7, by the decision rule with the claims module's tolerance as
# the margin; heads are the resampled units of its interval.
twonn_mean = interval.mean(ids["twonn"][:, None])
id_unbiased = f"on this model ({model_title(model)}) {claims.twonn_unbiased(twonn_mean).text}"
g("id_twonn_lo", twonn_mean.lo)
g("id_twonn_hi", twonn_mean.hi)
g("id_unbiased_verdict", id_unbiased)
# the variant with its interval over heads, and its ratio to the line fit over the same heads
variant = claims.twonn_source_over_heads(ids["twonn-source"], ids["twonn"])
source_mean, source_ratio = variant.figures["variant"], variant.figures["ratio"]
g("id_source_ci", estimate_text(source_mean.value, source_mean.lo, source_mean.hi, ".1f"))
g("id_source_ratio_ci", times_text(source_ratio.value, source_ratio.lo, source_ratio.hi, ".2f"))
g("id_twonn_ci", estimate_text(twonn_mean.value, twonn_mean.lo, twonn_mean.hi, ".2f"))
g("id_variant_verdict", variant.text)
g("id_verdict", f"{variant.text}; {id_unbiased}")
g("dropped_last", dropped_last)
g("dropped_last_text", plural(dropped_last, "point"))


per_model = {}
for est in ("twonn", "twonn-source"):
    kk = frame_rank(ids[est].mean(), s.d_head)  # the source's per-model k; from the sweep when measured there
    r = sweep["eps"][kk] if kk in sweep["eps"] else layer_overlap(eps, groups, kk, metric, n_boot, seed, null_draws)
    per_model[est] = r
    tag = "twonn" if est == "twonn" else "source"
    g(f"k_{tag}", r.k)
    g(f"oh_k_{tag}", r.o_h)
    g(f"null_k_{tag}", r.null_mean)
    g(f"z_k_{tag}", r.z)

# %% [markdown]
# ```{glue:figure} atlas_fig_id
# :name: fig-atlas-id
#
# Intrinsic dimension of each head's $\varepsilon$ cloud in layer {glue:text}`atlas_layer:d`, from three
# estimators (one group of bars per head; the legend gives each estimator's mean over heads). On the same
# points, the gap between the source variant and TwoNN is the variant's upward bias.
#
# {glue:md}`atlas_fig_id_prov:myst`
# ```
#
# ```{glue:figure} atlas_id_table
# :name: tbl-atlas-id
#
# The numbers behind {numref}`fig-atlas-id`: each head's KV group and its three estimates (dimensions,
# no unit), with the mean over heads in the last row.
#
# {glue:md}`atlas_id_table_prov:myst`
# ```
#
# Averaged over heads ({numref}`tbl-atlas-id`), TwoNN gives {glue:text}`atlas_id_twonn_ci:s` (sd over heads
# {glue:text}`atlas_id_twonn_sd:.2f`), the source variant {glue:text}`atlas_id_source_ci:s` and the MLE
# {glue:text}`atlas_id_mle:.2f`. The source's 7.1 is a value of the variant: whether that number
# replicates is read off the variant, and by the rule (heads resampled) {glue:text}`atlas_id_variant_verdict:s`.
# Of that ratio, 1.34× is the variant's own bias (what it reads on exactly Pareto-distributed ratios) and
# the rest, whichever way it falls, is how far these clouds depart from that law.
# The claim itself, that each head lives on a ~7-dimensional manifold, is about the manifold, and the
# variant reads high, so the claim is judged by the unbiased fit. By the decision rule ({ref}`sec-rule`),
# with heads as the resampled units and the claims module's ±1 tolerance on a dimension as the margin,
# {glue:text}`atlas_id_unbiased_verdict:s`.
# That is a statement about this model only; on the source's own architecture, Qwen2.5, the unbiased
# estimate reads lower ({doc}`crossarch` gives it). Points at zero distance from their nearest neighbour cannot enter a
# distance ratio; {glue:text}`atlas_dropped_last_text:s` were dropped in this layer over all heads and
# estimators.
#
# The source sets a "per-model $k$" to the rounded mean dimension of its own estimator. Here that is
# $k$ = {glue:text}`atlas_k_source:d`, where $O_h$ = {glue:text}`atlas_oh_k_source:.3f` against a null of
# {glue:text}`atlas_null_k_source:.3f` (z = {glue:text}`atlas_z_k_source:+.1f`); the unbiased TwoNN mean
# rounds to $k$ = {glue:text}`atlas_k_twonn:d`, where $O_h$ = {glue:text}`atlas_oh_k_twonn:.3f` against
# {glue:text}`atlas_null_k_twonn:.3f` (z = {glue:text}`atlas_z_k_twonn:+.1f`). $O_h$ and its null both
# grow with $k$ (the null as $\sqrt{k}$), so a per-model $k$ moves $O_h$ and leaves the comparison with
# chance to be made at that $k$.
#
# ## Coordinates: $\varepsilon$ and $z$ against $c$ after $W_O$
#
# $z_h$ and $\varepsilon_h$ are written in the coordinates of the head's value vectors, and those are
# defined only up to an orthogonal change of basis: replacing $W_V^{(g)}$ by $W_V^{(g)} R$ and each
# $W_O^{(h)}$ of the group by $R^\top W_O^{(h)}$ leaves the model's function unchanged while rotating every
# $z_h$ and $\varepsilon_h$ of KV group $g$ by $R$. Comparing the frames of two heads of different groups
# in $\mathbb{R}^{d_\text{head}}$ therefore compares two arbitrary coordinate systems: were the per-group
# rotations random, the expected $O$ of any two such frames would be exactly the Haar null. Pairs within a
# group share their value coordinates, so for them the comparison is meaningful.
#
# The head's contribution to the residual stream, $c_h = W_O^{(h)} z_h \in \mathbb{R}^{d_\text{model}}$,
# is unchanged by that rotation: frames of $c$ are comparable across heads. Its chance level needs care.
# Each $c_h$ lies in the $d_\text{head}$-dimensional column space of $W_O^{(h)}$, so its frame can only
# lie there. The Haar null in $\mathbb{R}^{d_\text{model}}$ is the right reference only if those column
# spaces were themselves randomly placed; the fair chance level keeps the model's column spaces as they
# are and draws, for each head, a random $k$-frame inside its own column space. The distance between the
# two nulls measures how much the column spaces of $W_O$ already align; the distance from the second null
# to the measured $O_h$ is what the data's choice of directions inside them adds. The source measured
# only in value coordinates. {numref}`tbl-atlas-coords` compares the three clouds.

# %%
c_res = layer_overlap(c_cloud, groups, k, metric, n_boot, seed, null_draws, w_o=out_proj(lm, layer))
coord_data = pd.DataFrame([  # the numbers behind the table (unformatted; NaN: not measured for that cloud)
    {"cloud": name, "space": space, "d": r.d, "o_h": r.o_h, "o_h_lo": r.ci[0], "o_h_hi": r.ci[1],
     "intra": r.intra, "haar_null_mean": r.null_mean, "haar_null_std": r.null_std, "z_haar": r.z,
     "colspace_null_mean": r.colspace_null_mean, "colspace_null_std": r.colspace_null_std, "z_colspace": r.colspace_z}
    for name, r, space in (("ε", sweep["eps"][k], "d_head"), ("z", sweep["z"][k], "d_head"), ("c", c_res, "d_model"))
]).set_index("cloud").astype({c: float for c in ("intra", "colspace_null_mean", "colspace_null_std", "z_colspace")})
coord_table = pd.DataFrame({  # intra-group pairs are left out: the Haar null is not their chance level
    "dimension": [f"{d} ({space})" for d, space in zip(coord_data["d"], coord_data["space"])],
    "Oₕ": coord_data["o_h"],
    "95% interval": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(coord_data["o_h_lo"], coord_data["o_h_hi"])],
    "Haar null": coord_data["haar_null_mean"], "z vs Haar": coord_data["z_haar"],
    "column-space null": coord_data["colspace_null_mean"], "z vs column space": coord_data["z_colspace"],
}, index=coord_data.index)
cfmt = {"Oₕ": "{:.3f}", "Haar null": "{:.3f}", "column-space null": "{:.3f}", "z vs Haar": "{:+.1f}",
        "z vs column space": "{:+.1f}"}
g.table("coord_table", coord_table.style.format(cfmt, na_rep="—"), data=coord_data, sample=cloud_sample)

g("z_oh", sweep["z"][k].o_h)
g("z_null", sweep["z"][k].null_mean)
g("z_z", sweep["z"][k].z)
g("c_oh", c_res.o_h)
g("c_lo", c_res.ci[0])
g("c_hi", c_res.ci[1])
g("c_oh_ci", with_ci(c_res.o_h, c_res.ci))
g("c_null", c_res.null_mean)
g("c_null_std", c_res.null_std)
g("c_z", c_res.z)
g("c_col_null", c_res.colspace_null_mean)
g("c_col_std", c_res.colspace_null_std)
g("c_col_z", c_res.colspace_z)
# The verdict reads the excess's interval, which counts the pairs' spread and the null's (the decision rule).
c_side = claims.null_side(claims.summary_excess(c_res, "colspace"))
g("c_verdict", c_side.text)
g.estimate("c_excess", c_side.figures["excess"])

# %% [markdown]
# ```{glue:figure} atlas_coord_table
# :name: tbl-atlas-coords
#
# $O_h$ at $k$ = {glue:text}`atlas_k:d` of the residual $\varepsilon$ and the head output $z$ (both in the
# head's value coordinates, $d_\text{head}$) and of the contribution $c$ after $W_O$ ($d_\text{model}$),
# with its 95% bootstrap interval, the Haar null in the cloud's own dimension and its z-score; for $c$ also
# the null inside each head's $W_O$ column space ("—": not defined for that cloud). Pairs of heads in one KV
# group are left out: random frames are not their chance level (see the KV groups above). The z-scores
# give each excess in units of the null's sd; whether the heads are more aligned than chance after $W_O$ is
# judged by the excess over the column-space null with an interval that counts both the spread over pairs
# and the null's ({ref}`sec-rule`; the text below).
#
# {glue:md}`atlas_coord_table_prov:myst`
# ```
#
# On the head output $z$ ({numref}`tbl-atlas-coords`), $O_h$ = {glue:text}`atlas_z_oh:.3f` against the
# same null {glue:text}`atlas_z_null:.3f` (z = {glue:text}`atlas_z_z:+.1f`). After $W_O$, $O_h$ =
# {glue:text}`atlas_c_oh_ci:s` (95% interval); Haar
# frames in $\mathbb{R}^{d_\text{model}}$ give {glue:text}`atlas_c_null:.3f` ± {glue:text}`atlas_c_null_std:.4f`
# (z = {glue:text}`atlas_c_z:+.1f`), random frames inside the heads' own column spaces give
# {glue:text}`atlas_c_col_null:.3f` ± {glue:text}`atlas_c_col_std:.4f`, and the measured value
# {glue:text}`atlas_c_verdict:s` that fair chance level, by {glue:text}`atlas_c_excess_ci:s`. The verdict reads this interval,
# which counts both how much the excess would change on other pairs of heads and the null's own spread. The
# z-score, {glue:text}`atlas_c_col_z:+.1f`, counts only the null's spread, so it overstates the evidence: the
# interval's lower end lies close to the null. This is the
# only one of the three comparisons that does not depend on each head's arbitrary value basis.
#
# ## A second null: Gaussian clouds of the same covariance
#
# A frame depends on a cloud's covariance only. Replacing each head's cloud by a Gaussian with the same
# mean and covariance therefore keeps the frames, up to sampling noise, and removes everything beyond second
# moments. If $O_h$ is unchanged, the overlap is a property of the covariance spectra. The intrinsic
# dimension behaves differently: a Gaussian fills its whole ellipsoid, and TwoNN on it counts every
# direction whose spread is not negligible at the scale of nearest-neighbour distances. The participation
# ratio $(\sum_i \lambda_i)^2 / \sum_i \lambda_i^2$ of the covariance eigenvalues is a coarser summary of
# the same spectrum, weighted towards its largest directions, and is shown for scale. A real cloud whose
# TwoNN dimension is far below that of its Gaussian twin is concentrated near a lower-dimensional set than
# its covariance alone implies: that is structure beyond second moments. {numref}`tbl-atlas-gauss` sets
# each head's real cloud beside its twin.

# %%
gauss = gaussian_null_clouds(eps, seed)  # (head, point, d_head)
gauss_res = layer_overlap(gauss, groups, k, metric, n_boot, seed, null_draws)
gauss_id, _ = per_head_dropped(gauss, "twonn")  # its duplicate count is not reported
lam = np.linalg.svd(eps - eps.mean(1, keepdims=True), compute_uv=False) ** 2  # (head, d_head) ∝ eigenvalues
participation = lam.sum(1) ** 2 / (lam**2).sum(1)

gauss_data = pd.DataFrame({"twonn_real": ids["twonn"], "twonn_gaussian": gauss_id, "participation_ratio": participation},
                          index=pd.Index(range(s.n_heads), name="head"))
gauss_table = gauss_data.rename(columns={"twonn_real": "real ε", "twonn_gaussian": "Gaussian twin",
                                         "participation_ratio": "participation ratio"})
gauss_table.columns = pd.MultiIndex.from_tuples([("TwoNN dimension", "real ε"), ("TwoNN dimension", "Gaussian twin"),
                                                 ("covariance", "participation ratio")])
gauss_table.loc["mean", :] = gauss_table.mean().to_numpy()
g.table("gauss_table", gauss_table.style.format("{:.2f}"), data=gauss_data, sample=cloud_sample)
g("gauss_oh", gauss_res.o_h)
g("gauss_lo", gauss_res.ci[0])
g("gauss_hi", gauss_res.ci[1])
g("gauss_z", gauss_res.z)
g("gauss_id", gauss_id.mean())
g("participation", participation.mean())
g("gauss_id_ratio", gauss_id.mean() / ids["twonn"].mean())
n_below = int((ids["twonn"] < gauss_id).sum())
g("gauss_sentence", f"The real cloud has the lower TwoNN dimension in {n_below} of {s.n_heads} heads: the "
  "frames, and so Oₕ, are a second-moment property, while the low intrinsic dimension is not one."
  if n_below == s.n_heads else f"The real cloud has the lower TwoNN dimension in {n_below} of {s.n_heads} heads.")

# %% [markdown]
# ```{glue:figure} atlas_gauss_table
# :name: tbl-atlas-gauss
#
# TwoNN dimension of each head's real $\varepsilon$ cloud and of its Gaussian twin (same mean, covariance
# and number of points), beside the participation ratio of the covariance spectrum; the last row is the
# mean over heads. A real value well below its twin's marks structure beyond the covariance. Dimensions and
# ratios have no unit.
#
# {glue:md}`atlas_gauss_table_prov:myst`
# ```
#
# The Gaussian twins give $O_h$ = {glue:text}`atlas_gauss_oh:.3f` ([{glue:text}`atlas_gauss_lo:.3f`,
# {glue:text}`atlas_gauss_hi:.3f`], z = {glue:text}`atlas_gauss_z:+.1f` against the Haar null), beside
# {glue:text}`atlas_oh_ci:s` for the real clouds. Their TwoNN dimension averages
# {glue:text}`atlas_gauss_id:.2f`, {glue:text}`atlas_gauss_id_ratio:.2f` times that of the real clouds
# ({glue:text}`atlas_id_twonn_ci:s`; {numref}`tbl-atlas-gauss`); the mean participation ratio is
# {glue:text}`atlas_participation:.2f`. {glue:text}`atlas_gauss_sentence:s`
#
# ## Depth profile
#
# The source reports, for GPT-2 small, $O_h$ = 0.278 at relative depth 0.9, a plateau dimension of 7.91
# and a peak of 9.08. Here every layer's $\varepsilon$ clouds come from the same single pass over the
# blocks. The mean TwoNN dimension over heads is read at relative depth $\ell / (L - 1)$, with its peak and
# its value at relative depth 0.9, the "plateau" of {cite:t}`valeriani2023geometry`. $O_h$ is measured
# at $k$ = {glue:text}`atlas_k:d` in every layer against the same Haar null. {numref}`fig-atlas-depth`
# shows both profiles.

# %%
depth_counted = {est: {l: per_head_dropped(eps_by_layer[l], est) for l in range(s.n_layers)}
                 for est in ("twonn", "twonn-source")}  # {est: {layer: (d_int, dropped) per head}}
depth_ids = {est: {l: v for l, (v, _) in by.items()} for est, by in depth_counted.items()}
dropped_all = sum(int(n.sum()) for by in depth_counted.values() for _, n in by.values())
profiles = {est: layer_profile({l: v.mean() for l, v in by.items()}, s.n_layers) for est, by in depth_ids.items()}
# O_h at k in every layer (the Haar null depends only on d, k, the pair count and the seed: the same in all)
depth_oh = {l: layer_overlap(eps_by_layer[l], groups, k, metric, n_boot, seed, null_draws) for l in range(s.n_layers)}
depth = np.array(profiles["twonn"]["depth"])

depth_data = pd.DataFrame({  # the numbers behind the figure, one row per layer
    "relative_depth": depth,
    "twonn_mean": profiles["twonn"]["values"], "twonn_source_mean": profiles["twonn-source"]["values"],
    "o_h": [depth_oh[l].o_h for l in range(s.n_layers)],
    "o_h_lo": [depth_oh[l].ci[0] for l in range(s.n_layers)], "o_h_hi": [depth_oh[l].ci[1] for l in range(s.n_layers)],
    "intra": [depth_oh[l].intra for l in range(s.n_layers)],
    "haar_null_mean": [depth_oh[l].null_mean for l in range(s.n_layers)],
    "haar_null_std": [depth_oh[l].null_std for l in range(s.n_layers)],
    "excess_lo": [claims.summary_excess(depth_oh[l]).lo for l in range(s.n_layers)],  # O_h − null, both spreads
    "excess_hi": [claims.summary_excess(depth_oh[l]).hi for l in range(s.n_layers)],
    "z": [depth_oh[l].z for l in range(s.n_layers)],
    "layer_type": list(s.layer_types),
}, index=pd.Index(range(s.n_layers), name="layer")).astype({"intra": float})

fig, (ax1, ax2) = plt.subplots(2, 1, figsize=figsize(2, 1, panel_aspect=0.42), sharex=True, layout="constrained")
for est, column, dash in (("TwoNN", "twonn_mean", "-"), ("TwoNN, source variant", "twonn_source_mean", "--")):
    p = profiles["twonn" if column == "twonn_mean" else "twonn-source"]
    ax1.plot(depth, depth_data[column], marker="o", ls=dash, ms=4, color=color(est), label=est)
    ax1.plot(p["peak_depth"], p["peak"], "*", ms=13, color=color(est), mec="0.2", mew=0.6)
    if not math.isnan(p["plateau"]):
        ax1.plot(p["plateau_depth"], p["plateau"], "D", ms=7, color=color(est), mec="0.2", mew=0.6)
ax1.plot([], [], "*", ms=11, color="0.6", mec="0.2", mew=0.6, label="peak")
ax1.plot([], [], "D", ms=6, color="0.6", mec="0.2", mew=0.6, label="value at relative depth 0.9")
ax1.set_ylabel("mean intrinsic\ndimension over heads")
ax1.legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncols=2, borderaxespad=0)
o = depth_data["o_h"].to_numpy()
lo, hi = depth_data["o_h_lo"].to_numpy(), depth_data["o_h_hi"].to_numpy()
band_lo = depth_data["haar_null_mean"] - Z_CRIT * depth_data["haar_null_std"]
band_hi = depth_data["haar_null_mean"] + Z_CRIT * depth_data["haar_null_std"]
ax2.fill_between(depth, band_lo, band_hi, color="0.85", label=f"Haar null, mean ± {Z_CRIT:.2f} sd")
ax2.plot(depth, depth_data["haar_null_mean"], color="0.45", lw=1)
# filled: the layer's O_h is distinguishable from the null by the rule (its excess's interval, which counts
# both its own interval and the null's spread, excludes 0); open: it is not
depth_sides = [claims.null_side(claims.summary_excess(depth_oh[l])).figures["decision"] for l in range(s.n_layers)]
off = np.isin(depth_sides, [claims.HIGHER, claims.LOWER])
ax2.errorbar(depth, o, yerr=[o - lo, hi - o], fmt="none", color=color(RESIDUAL["eps"]))
ax2.plot(depth[off], o[off], "o", ms=4, color=color(RESIDUAL["eps"]),
         label=f"$O_h$, {head.pairs} pairs, k = {k}: off the null by the rule")
ax2.plot(depth[~off], o[~off], "o", ms=4, mfc="white", color=color(RESIDUAL["eps"]), label="not off the null")
if show_intra:
    ax2.plot(depth, depth_data["intra"], "^", mfc="none", ms=5, color=color(INTRA), label=INTRA)
if head.intra is not None:  # the chance level of intra-group pairs, measured in the deepest layer
    ax2.errorbar([1.02], [intra_null["mean"]], yerr=[Z_CRIT * intra_null["std"]], fmt="D", mfc="none", color="0.3",
                 label=f"null of intra-group pairs, ± {Z_CRIT:.2f} sd")
global_layers = [l for l, t in enumerate(s.layer_types) if t == "full_attention"]
sliding = len(global_layers) < s.n_layers
if sliding:  # mark the global-attention layers of a sliding-window model, in both panels
    for ax in (ax1, ax2):
        for l in global_layers:
            ax.axvline(l / (s.n_layers - 1), color="0.6", lw=0.8, ls=":")
ax2.set_xlabel("relative depth ℓ / (L − 1)" + (" (dotted: global-attention layers)" if sliding else ""))
ax2.set_ylabel("mean principal\ncosine (ε)")
ax2.legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncols=2, borderaxespad=0)
ax2.set_xlim(-0.05, 1.05)  # no point cut by the frame
fig.suptitle(f"{model}, every layer, N = {n_points:,} per head")
g.figure("fig_depth", fig, data=depth_data, sample=f"{cloud_sample}, in each of the {s.n_layers} layers")

for est, tag in (("twonn", "twonn"), ("twonn-source", "source")):
    p = profiles[est]
    g(f"peak_{tag}", p["peak"])
    g(f"peak_layer_{tag}", p["peak_layer"])
    g(f"peak_depth_{tag}", p["peak_depth"])
    g(f"plateau_{tag}", number(p["plateau"], ".2f"))  # "—" where no layer sits at relative depth 0.9
z_by_layer = depth_data["z"].to_numpy()
g("depth_oh_min", o.min())
g("depth_oh_max", o.max())
g("depth_z_min", z_by_layer.min())
g("depth_z_max", z_by_layer.max())
g("depth_n_above", depth_sides.count(claims.HIGHER))
g("depth_n_below", depth_sides.count(claims.LOWER))
g("depth_multiplicity", claims.multiplicity(s.n_layers, depth_sides.count(claims.HIGHER)
                                            + depth_sides.count(claims.LOWER)).text)  # one decision per layer
g("depth_n_layers_text", plural(s.n_layers, "layer"))
g("dropped_all", dropped_all)
g("dropped_all_text", plural(dropped_all, "duplicate point"))

# %% [markdown]
# ```{glue:figure} atlas_fig_depth
# :name: fig-atlas-depth
#
# Top: mean intrinsic dimension of the heads' $\varepsilon$ clouds in every layer against relative depth,
# TwoNN and the source variant, with each profile's peak (star) and its value at relative depth 0.9
# (diamond), each in its profile's colour. Bottom: $O_h$ at $k$ = {glue:text}`atlas_k:d` in every layer
# with its 95% bootstrap interval; the grey band is the Haar null, its mean ±
# {glue:text}`atlas_z_crit:.2f` sd. A filled circle is a layer whose frames are distinguishable from
# independent random frames by the decision rule ({ref}`sec-rule`: the excess over the null, with an
# interval that counts both the layer's interval and the null's spread, excludes zero); an open circle is
# one that is not. Open triangles, where shown, are the
# intra-group pairs, whose chance level is not the band but the open diamond (mean ±
# {glue:text}`atlas_z_crit:.2f` sd of heads that read the same keys and values with independent query
# weights, measured in the deepest layer; see the KV groups above). Dotted lines, where
# present, mark the global-attention layers of a sliding-window model, in both panels.
#
# {glue:md}`atlas_fig_depth_prov:myst`
# ```
#
# The TwoNN profile ({numref}`fig-atlas-depth`, top) peaks at {glue:text}`atlas_peak_twonn:.2f` in layer
# {glue:text}`atlas_peak_layer_twonn:d` (relative depth {glue:text}`atlas_peak_depth_twonn:.2f`) and
# reads {glue:text}`atlas_plateau_twonn:s` at relative depth 0.9; the source variant peaks at
# {glue:text}`atlas_peak_source:.2f` (layer {glue:text}`atlas_peak_layer_source:d`) with a plateau of
# {glue:text}`atlas_plateau_source:s`. Across layers (bottom panel) $O_h$ runs from
# {glue:text}`atlas_depth_oh_min:.3f` to {glue:text}`atlas_depth_oh_max:.3f`, z-scores from
# {glue:text}`atlas_depth_z_min:+.1f` to {glue:text}`atlas_depth_z_max:+.1f` against the Haar null. By
# the decision rule ({ref}`sec-rule`: each layer's excess over the null with an interval that counts both
# its own spread and the null's), of the
# {glue:text}`atlas_depth_n_layers_text:s`, {glue:text}`atlas_depth_n_above:d` lie distinguishably above
# the null and {glue:text}`atlas_depth_n_below:d` distinguishably below it ({glue:text}`atlas_depth_multiplicity:s`;
# neighbouring layers are not independent, so the count is a rough guide). The null's spread is that of
# independent random frames; deviations of either sign say that a layer's frames are not distributed as
# independent random frames, and only the positive ones would mean more alignment than chance. Over all
# layers, {glue:text}`atlas_dropped_all_text:s` were left out of the distance ratios.
#
# ## Hard top-1 attention
#
# The source's intervention: in the chosen layers every head's output $z_h$ is replaced by the value of
# its most attended key, $v_{g(h)}[\arg\max_j p_h[t, j]]$, which removes exactly $\varepsilon_h$. A rank-$k$
# reconstruction then puts back the projection of $\varepsilon_h$ on a per-head affine subspace, its mean
# and top-$k$ principal frame fitted on the calibration split of the unmodified model; the recovered fraction
# is $(\mathrm{PPL}_\text{top-1} - \mathrm{PPL}_\text{recon}) / (\mathrm{PPL}_\text{top-1} -
# \mathrm{PPL}_\text{full})$. The control replaces each frame by a Haar-random one of the same rank with
# the same mean. Perplexity is measured on {glue:text}`atlas_top1_eval_text:s` of
# {glue:text}`atlas_top1_seq_len:d` tokens of the evaluation split; the frames are fitted on
# {glue:text}`atlas_top1_calib_text:s` of {glue:text}`atlas_top1_calib_seq_len:d` tokens of the
# calibration split. {numref}`tbl-atlas-top1` gives the perplexities.

# %%
eval_blocks = token_blocks(lm, BlockSpec(corpus=corpus, seq_len=top1_seq_len, n_blocks=top1_eval_blocks, split="eval"))
calib_blocks = token_blocks(lm, BlockSpec(corpus=corpus, seq_len=top1_calib_seq_len, n_blocks=top1_calib_blocks, split="calib"))
full_nll = block_nll(lm.model, eval_blocks, progress=False)  # (block, token - 1): one full pass for both settings
top1_layers = {"deepest": [layer], "three deepest": list(range(max(0, layer - 2), layer + 1))}
top1_fit = fit_reconstruction(lm, calib_blocks, top1_layers["three deepest"], k)  # one calibration pass for both
top1 = {name: top1_experiment(lm, eval_blocks, calib_blocks, layers, k=k, seed=seed, full_nll=full_nll,
                              reconstruction=top1_fit)
        for name, layers in top1_layers.items()}


def cell(r: dict, name: str, spec: str) -> str:
    """ "value [lo, hi]" of one top-1 figure."""
    return format_estimate(Estimate(**r["intervals"][name]), spec)


top1_table = pd.DataFrame([{"layers": ", ".join(map(str, r["layers"])),
                            "perplexity, full": cell(r, "ppl_full", interval.SIG3),
                            "perplexity, top-1": cell(r, "ppl_top1", interval.SIG3),
                            "change by top-1": cell(r, "delta_top1", "+.2f"),
                            f"perplexity, top-1 + rank-{k}": cell(r, "ppl_recon", interval.SIG3),
                            "damage recovered": cell(r, "recovered", ".1%"),
                            f"perplexity, top-1 + random rank-{k}": cell(r, "ppl_random", interval.SIG3),
                            "damage recovered, random": cell(r, "recovered_random", ".1%")} for r in top1.values()],
                          index=pd.Index(list(top1), name="hard top-1 in"))
top1_data = pd.DataFrame([{"setting": name, "layers": " ".join(map(str, r["layers"])), "figure": field,
                           **{part: r["intervals"][field][part] for part in ("value", "lo", "hi")}}
                          for name, r in top1.items() for field in r["intervals"]]).set_index(["setting", "figure"])
top1_sample = (f"{plural(top1_eval_blocks, 'window')} of {top1_seq_len} tokens; frames fitted on "
               f"{plural(top1_calib_blocks, 'calibration block')} of {top1_calib_seq_len} tokens")
g.table("top1_table", top1_table, data=top1_data, sample=top1_sample)
g("top1_eval_blocks", top1_eval_blocks)
g("top1_eval_text", plural(top1_eval_blocks, "window"))
g("top1_calib_text", plural(top1_calib_blocks, "block"))
g("top1_seq_len", top1_seq_len)
g("top1_calib_blocks", top1_calib_blocks)
g("top1_calib_seq_len", top1_calib_seq_len)
FIGURES = {"full": "ppl_full", "ppl": "ppl_top1", "delta": "delta_top1", "rel": "rel_top1", "recon": "ppl_recon",
           "rec": "recovered", "rand": "ppl_random", "rec_rand": "recovered_random", "gain": "gain"}
for name, tag in (("deepest", "1"), ("three deepest", "3")):
    for short, field in FIGURES.items():  # every quoted figure: value, lo, hi
        figure = top1[name]["intervals"][field]
        for part in ("", "_lo", "_hi"):
            g(f"top1_{short}_{tag}{part}", figure[part.strip("_") or "value"])
three = top1["three deepest"]["intervals"]
g("top1_verdict", claims.top1_recovery(Estimate(**three["gain"]), Estimate(**three["recovered"])).text)

# %% [markdown]
# ```{glue:figure} atlas_top1_table
# :name: tbl-atlas-top1
#
# Perplexity on the evaluation windows with full attention, with hard top-1 attention in the deepest
# layer or in the three deepest, and with top-1 plus a rank-{glue:text}`atlas_k:d` reconstruction of
# $\varepsilon$ from PCA frames or from random frames (the control). "Recovered" is the fraction of the
# top-1 damage that the reconstruction removes. Every entry is "value [lo, hi]", the 95% interval of a
# block bootstrap over the evaluation windows (2,000 resamples, all settings resampled together).
#
# {glue:md}`atlas_top1_table_prov:myst`
# ```
#
# Brackets give the same 95% intervals. Keeping only the argmax key in the deepest layer ({numref}`tbl-atlas-top1`) moves perplexity from
# {glue:text}`atlas_top1_full_1_ci:s` to {glue:text}`atlas_top1_ppl_1_ci:s`
# ({glue:text}`atlas_top1_delta_1_ci:s`, a relative change of {glue:text}`atlas_top1_rel_1_ci:s`); in the
# three deepest layers the change is {glue:text}`atlas_top1_delta_3_ci:s`
# ({glue:text}`atlas_top1_rel_3_ci:s`). The source reports +7.7 for GPT-2's deepest layer; the models
# differ, so only the sign and rough size are comparable. The rank-{glue:text}`atlas_k:d` reconstruction
# recovers {glue:text}`atlas_top1_rec_1_ci:s` of the one-layer damage and {glue:text}`atlas_top1_rec_3_ci:s`
# of the three-layer damage; random frames of the same rank, with the same fitted mean, recover
# {glue:text}`atlas_top1_rec_rand_1_ci:s` and {glue:text}`atlas_top1_rec_rand_3_ci:s`. The source reports
# 55.9% for three layers of GPT-2 (and 55.8% for a per-head autoencoder). Both reconstructions put back
# the fitted mean $\mu_h$; the random control measures how much of the recovery needs no particular
# subspace, and the PCA frames add {glue:text}`atlas_top1_gain_1_ci:s` (one layer) and
# {glue:text}`atlas_top1_gain_3_ci:s` (three layers) of the damage beyond it. A recovered fraction is
# therefore to be read against the random control, not against zero.
#
# ## Summary
#
# On {glue:text}`atlas_model:s`, deepest layer, $k$ = {glue:text}`atlas_k:d`:
#
# - **Overlap.** $O_h$ = {glue:text}`atlas_oh_ci:s` over {glue:text}`atlas_n_pairs:d` {glue:text}`atlas_pair_label:s`;
#   Haar-random frames give {glue:text}`atlas_null_mean:.3f` ± {glue:text}`atlas_null_std:.4f`
#   (z = {glue:text}`atlas_z:+.1f`). The measured overlap {glue:text}`atlas_verdict:s` that of random
#   frames, by {glue:text}`atlas_excess_ci:s` ({numref}`tbl-atlas-sweep`). The source's "$O_h \ll 1$" (0.284 on GPT-2) is the chance value at
#   $d_\text{head} = 64$, $k = 7$, and does not show that heads are arranged apart.
# - **Frame rank.** $O_h$ against $k$ = {glue:text}`atlas_k_min:d`…{glue:text}`atlas_k_max:d`
#   ({numref}`fig-atlas-sweep`): {glue:text}`atlas_sweep_verdict:s`.
# - **KV groups.** In the deepest layer, {glue:text}`atlas_split:s` ({numref}`fig-atlas-matrix`).
#   Against heads that read the same keys and values with independent query weights,
#   {glue:text}`atlas_intra_null_mean:s` ± {glue:text}`atlas_intra_null_std:s`
#   (z = {glue:text}`atlas_intra_null_z:s`), the intra-group $O_h$ {glue:text}`atlas_intra_null_verdict:s`
#   that null, by {glue:text}`atlas_intra_null_excess:s`.
# - **After $W_O$.** In the gauge-invariant coordinates $O_h$ = {glue:text}`atlas_c_oh_ci:s`, against
#   {glue:text}`atlas_c_col_null:.3f` for random frames inside each head's $W_O$ column space: it
#   {glue:text}`atlas_c_verdict:s` chance, by {glue:text}`atlas_c_excess_ci:s`
#   ({numref}`tbl-atlas-coords`). The source did not make this comparison.
# - **Intrinsic dimension.** Unbiased TwoNN {glue:text}`atlas_id_twonn_ci:s`, source variant
#   {glue:text}`atlas_id_source_ci:s` on the same points ({glue:text}`atlas_id_source_ratio_ci:s`; 95%
#   intervals over heads). The source's 7.1 is a value of the variant ({numref}`tbl-atlas-id`);
#   {glue:text}`atlas_id_unbiased_verdict:s`.
# - **Gaussian twins.** Same-covariance Gaussian clouds give $O_h$ = {glue:text}`atlas_gauss_oh:.3f` and
#   a TwoNN dimension of {glue:text}`atlas_gauss_id:.2f`, {glue:text}`atlas_gauss_id_ratio:.2f` times the
#   real clouds' ({numref}`tbl-atlas-gauss`). {glue:text}`atlas_gauss_sentence:s`
# - **Depth.** Across layers $O_h$ runs from {glue:text}`atlas_depth_oh_min:.3f` to
#   {glue:text}`atlas_depth_oh_max:.3f`; of the {glue:text}`atlas_depth_n_layers_text:s`,
#   {glue:text}`atlas_depth_n_above:d` lie distinguishably above chance and
#   {glue:text}`atlas_depth_n_below:d` distinguishably below it ({glue:text}`atlas_depth_multiplicity:s`;
#   {numref}`fig-atlas-depth`).
# - **Hard top-1.** It costs {glue:text}`atlas_top1_delta_1_ci:s` perplexity in the deepest layer (source:
#   +7.7 on GPT-2). A rank-{glue:text}`atlas_k:d` reconstruction recovers
#   {glue:text}`atlas_top1_rec_3_ci:s` of the three-layer damage (source: 55.9%), random frames with the
#   same mean {glue:text}`atlas_top1_rec_rand_3_ci:s` ({numref}`tbl-atlas-top1`):
#   {glue:text}`atlas_top1_verdict:s`.

# %%
out = Path(results_dir)
out.mkdir(parents=True, exist_ok=True)
write_json(out / "atlas.json", {
    "model": model,
    "spec": s.as_dict(),
    "params": {"corpus": corpus, "seq_len": seq_len, "n_blocks": n_blocks, "n_points": n_points, "k": k,
               "k_sweep": ks, "metric": metric, "n_boot": n_boot, "null_draws": null_draws,
               "intra_null_draws": intra_null_draws, "seed": seed,
               "top1_seq_len": top1_seq_len, "top1_eval_blocks": top1_eval_blocks,
               "top1_calib_seq_len": top1_calib_seq_len, "top1_calib_blocks": top1_calib_blocks},
    "layer": layer,
    "kv_groups": groups.tolist(),
    "headline": head.summary(),
    "sweep": {res: [r.summary() for r in by_k.values()] for res, by_k in sweep.items()},
    "matrix": head.matrix.tolist(),
    "intra_null": {"mean": intra_null["mean"], "std": intra_null["std"], "z": intra_null["z"],
                   "n_pairs": intra_null["n_pairs"], "observed": intra_null["observed"],
                   "draws": np.asarray(intra_null["draws"]).tolist(), "verdict": intra_verdict},
    "intrinsic_dimension": {est: {"per_head": v.tolist(), "mean": float(v.mean()), "std": float(v.std(ddof=1))}
                            for est, v in ids.items()},
    "dropped_duplicates": {"deepest_layer": dropped_last, "all_layers": dropped_all},
    "per_model_k": {est: r.summary() for est, r in per_model.items()},
    "c": c_res.summary(),
    "gaussian_null": {"overlap": gauss_res.summary(), "twonn_per_head": gauss_id.tolist(),
                      "twonn_mean": float(gauss_id.mean()), "participation_ratio": participation.tolist()},
    "depth": {"profiles": profiles,
              "twonn_per_head": {est: {l: v.tolist() for l, v in by.items()} for est, by in depth_ids.items()},
              "o_h": [float(v) for v in o], "o_h_ci": depth_data[["o_h_lo", "o_h_hi"]].to_numpy().tolist(),
              "intra": [depth_oh[l].intra for l in range(s.n_layers)],
              "z": z_by_layer.tolist()},
    "top1": top1,
})
g.intervals({"c_excess": "+.3f", "oh": ".3f", "top1_delta_1": "+.2f", "top1_delta_3": "+.2f", "top1_full_1": interval.SIG3,
             "top1_ppl_1": interval.SIG3, "top1_gain_1": ".1%", "top1_gain_3": ".1%", "top1_rec_1": ".1%", "top1_rec_3": ".1%",
             "top1_rec_rand_1": ".1%", "top1_rec_rand_3": ".1%", "top1_rel_1": "+.1%", "top1_rel_3": "+.1%"})
g.finish()
