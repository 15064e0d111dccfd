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
# # Models and data
#
# Every measurement in this book runs on real pretrained networks that need no network access. Three
# models ship as GGUF files inside PyPI packages: SmolLM2-135M {cite:p}`allal2025smollm2` (the default),
# Gemma 3 270M {cite:p}`gemmateam2025gemma3` and Qwen2.5-Coder-0.5B {cite:p}`hui2024qwen25coder`, a
# code model of the Qwen2.5 family {cite:p}`qwen2025qwen25`. Transformers' GGUF loader dequantizes them
# to fp32, and we cache the result as safetensors.
#
# All three GGUF files were quantized to 4 bits. Their fp32 weights are therefore *dequantized 4-bit
# weights*, not the original release weights. For the geometry of attention heads this only means that
# we study the networks as they are shipped. For weight quantization it matters a great deal: {doc}`nqp`
# shows that a 4-bit grid matching the files' own blocks recovers these weights almost exactly. Any Hugging Face causal language model (a hub
# id or a local folder) runs through the same code when it is available.
#
# This chapter is the groundwork for the rest of the book. It lists the models and the corpora, checks
# that the per-head extraction reproduces each model's own attention output, and measures each model's
# perplexity on each offline corpus, to confirm that the dequantized networks still model text well.

# %% tags=["parameters"]
model = "smollm2-135m"
models = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
corpora = ["britannica", "pydoc", "plays"]
ppl_tokens = 4096
ppl_seq_len = 512
invariant_blocks = 2
invariant_seq_len = 256
results_dir = "results"

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from myst_nb import glue
from atlas_core.progress import tqdm  # names the running chapter

from atlas_core.cache import write_json
from atlas_core.corpus import BlockSpec, corpus_stats, token_blocks
from atlas_core.eval import corpus_perplexity
from atlas_core.extract import invariant_errors
from atlas_core.glue import glue_key as key
from atlas_core.models import load_model

names = list(dict.fromkeys([model, *models]))  # the run's model first, no repeats

# %% [markdown]
# ## The models
#
# {numref}`tbl-models` gives the shape of each model's attention, read from its config. The three
# models cover the attention layouts the later chapters need. SmolLM2 is a Llama-style model with
# grouped-query attention (several query heads share one key–value head). Gemma 3 has a single KV head
# per layer (multi-query attention), wider heads, and mostly sliding-window layers. Qwen2.5-Coder is a
# Qwen2 model with grouped-query attention and the same head width as SmolLM2. SmolLM2 and Qwen2.5-Coder
# are instruction-tuned; Gemma 3 270M is a base model.

# %%
spec_rows, invariant_rows, ppl_rows = [], [], []
for name in tqdm(names, desc="models"):  # one model in memory at a time
    lm = load_model(name)
    s = lm.spec
    spec_rows.append({"model": name, "family": s.family, "layers": s.n_layers, "heads": s.n_heads,
                      "kv heads": s.n_kv_heads, "d_head": s.d_head, "d_model": s.d_model,
                      "sliding layers": s.layer_types.count("sliding_attention"),
                      "window": max((w for w in s.windows if w), default=None), "BOS": s.add_bos,
                      "parameters (M)": round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 1)})
    # Σ_h c_h + b_O against the attention output, and attention rows against 1: first, middle and last layer
    inv = invariant_errors(lm, token_blocks(lm, BlockSpec(corpus="britannica", seq_len=invariant_seq_len,
                                                          n_blocks=invariant_blocks, split="eval")))
    invariant_rows.append({"model": s.name, "layers checked": str(inv["layers"]), "max |Σc + b − out|": inv["sum_abs"],
                           "relative": inv["sum_rel"], "max |Σp − 1|": inv["rows"]})
    for corpus in corpora:  # perplexity on each evaluation split, with its 95% block-bootstrap interval
        start = time.perf_counter()
        est = corpus_perplexity(lm, BlockSpec(corpus=corpus, seq_len=ppl_seq_len, n_blocks=ppl_tokens // ppl_seq_len,
                                              split="eval"))
        ppl_rows.append({"model": s.name, "corpus": corpus, "perplexity": est.value, "lo": est.lo, "hi": est.hi,
                         "blocks": est.units, "seconds": time.perf_counter() - start})
    if name == model:
        tokenizer = lm.tokenizer
    del lm
spec_table = pd.DataFrame(spec_rows).set_index("model")
glue("models_table", spec_table, display=False)
glue("n_models", len(names), display=False)

# %% [markdown]
# ```{glue:figure} models_table
# :name: tbl-models
#
# The models of this run and their attention layout, one row per model: architecture family, number of
# layers, query heads and key–value (KV) heads per layer (fewer KV heads than query heads means grouped-
# or multi-query attention), head width $d_\text{head}$, residual width $d_\text{model}$, number of
# sliding-window layers and their window in tokens (NaN: none), whether each text window starts with
# the beginning-of-sequence token (BOS), and the parameter count in millions.
# ```
#
# "BOS" says whether every window of text starts with the beginning-of-sequence token. Gemma 3 needs
# it; the tokenizers of the other two models do not add one.
#
# ## The corpora
#
# No corpus of the source works (WikiText-103, C4) can be downloaded here. Three offline texts stand in
# ({numref}`tbl-corpora`): the 1911 Encyclopaedia Britannica article on Shakespeare ("britannica",
# ordinary English prose, the default), Python's language reference as shipped with Python ("pydoc",
# technical English prose), and Shakespeare's plays ("plays", Early Modern English verse and prose).
# Under the run's tokenizer the Britannica article is {glue:text}`tokens_britannica:s` tokens
# ({glue:text}`words_britannica:s` words), the language reference {glue:text}`tokens_pydoc:s` tokens and
# the plays {glue:text}`tokens_plays:s` tokens.
#
# Each text becomes one deterministic token stream, cut into contiguous non-overlapping blocks. The
# first 75% of the blocks form the evaluation split and the rest the calibration split, so the two never
# share a token.

# %%
corpus_rows = [corpus_stats(tokenizer, c) for c in corpora]
corpus_table = pd.DataFrame(corpus_rows).set_index("corpus")
glue("corpora_table", corpus_table, display=False)
for row in corpus_rows:
    glue(key("tokens", row["corpus"]), f"{row['tokens']:,}", display=False)
    glue(key("words", row["corpus"]), f"{row['words']:,}", display=False)

# %% [markdown]
# ```{glue:figure} corpora_table
# :name: tbl-corpora
#
# Offline corpora: number of characters, whitespace-separated words and tokens of the whole text, with
# the tokenizer of the run's model. Both splits are cut from these token streams.
# ```
#
# ## Extraction checks against the model itself
#
# Later chapters read each head's output $z_h$ and its contribution to the residual stream,
# $c_h = W_O^{(h)} z_h$, from our own extraction rather than from the model. Two identities check that
# extraction on every model. Summed over heads (plus the output bias), the $c_h$ must equal the attention
# module's own output; and every row of attention probabilities must sum to one. We test both on the
# first, middle and last layers, over a few blocks of the Britannica evaluation split.
#
# {numref}`tbl-invariant` gives the worst deviations. The largest absolute deviation of $\sum_h c_h$
# from the module's output is {glue:text}`inv_abs_smollm2_135m:s` for SmolLM2,
# {glue:text}`inv_abs_gemma3_270m:s` for Gemma 3 and {glue:text}`inv_abs_qwen2_5_coder_0_5b:s` for
# Qwen2.5-Coder. Relative to the size of the output, and for the row sums, the deviations are of the
# order of fp32 rounding. The extraction is exact up to floating-point error: the heads it reports are
# the heads the model computes.

# %%
for row in invariant_rows:
    glue(key("inv_abs", row["model"]), f"{row['max |Σc + b − out|']:.1e}", display=False)
invariant_table = pd.DataFrame(invariant_rows).set_index("model")
glue("invariant_table", invariant_table.style.format("{:.1e}", subset=invariant_table.columns[1:]), display=False)
worst = max(r["max |Σc + b − out|"] for r in invariant_rows)
glue("inv_worst", f"{worst:.1e}", display=False)

# %% [markdown]
# ```{glue:figure} invariant_table
# :name: tbl-invariant
#
# Extraction invariants in fp32, one row per model, over the layers listed. "max |Σc + b − out|": the
# largest absolute difference between the summed head contributions (plus output bias) and the attention
# module's output; "relative": the same divided by the largest output entry; "max |Σp − 1|": the largest
# deviation of an attention row's sum from one. Smaller is better; the worst absolute deviation over all
# models is {glue:text}`inv_worst:s`.
# ```
#
# ## Perplexity
#
# Perplexity is measured on the evaluation split of each corpus, over non-overlapping windows, with the
# fp32 (dequantized) weights. It is a sanity check, not a benchmark: a model whose weights or
# tokenization had gone wrong would show far higher perplexities on ordinary prose.

# %%
for row in ppl_rows:  # every quoted perplexity with its interval: value, lo, hi
    for part, field in (("", "perplexity"), ("_lo", "lo"), ("_hi", "hi")):
        glue(key("ppl", row["model"], row["corpus"]) + part, f"{row[field]:.2f}", display=False)
ppl = pd.DataFrame(ppl_rows)
ppl["cell"] = [f"{r.perplexity:.2f} [{r.lo:.2f}, {r.hi:.2f}]" for r in ppl.itertuples()]
ppl_table = ppl.pivot(index="model", columns="corpus", values="perplexity").loc[names, corpora]
ppl_lo, ppl_hi = (ppl.pivot(index="model", columns="corpus", values=v).loc[names, corpora] for v in ("lo", "hi"))
glue("ppl_table", ppl.pivot(index="model", columns="corpus", values="cell").loc[names, corpora], display=False)
glue("ppl_blocks", ppl_tokens // ppl_seq_len, display=False)

fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.8 / len(names)
for i, name in enumerate(names):
    err = np.stack([ppl_table.loc[name] - ppl_lo.loc[name], ppl_hi.loc[name] - ppl_table.loc[name]])
    ax.bar(np.arange(len(corpora)) + i * width, ppl_table.loc[name], width, yerr=err, capsize=2, label=name)
ax.set_xticks(np.arange(len(corpora)) + width * (len(names) - 1) / 2, corpora)
ax.set_yscale("log")
ax.set_ylabel("perplexity (log scale)")
ax.set_title(f"{ppl_tokens:,} tokens per corpus, {ppl_seq_len}-token windows")
ax.legend(frameon=False)
fig.tight_layout()
glue("fig_ppl", fig, display=False)
plt.close(fig)
for part, table in (("", ppl_table), ("_lo", ppl_lo), ("_hi", ppl_hi)):
    glue("ppl_model_britannica" + part, f"{table.loc[model, 'britannica']:.2f}" if "britannica" in corpora else "n/a",
         display=False)

# %% [markdown]
# ```{glue:figure} fig_ppl
# :name: fig-models-ppl
#
# Perplexity of every model (bars) on every offline corpus (groups), on the evaluation split, with fp32
# weights dequantized from 4-bit GGUF files; log scale, lower is better. Error bars: 95% intervals of a
# block bootstrap over the {glue:text}`ppl_blocks:d` windows (2,000 resamples). The title gives the number
# of tokens per corpus and the window length.
# ```
#
# ```{glue:figure} ppl_table
# :name: tbl-ppl
#
# The numbers behind {numref}`fig-models-ppl`: perplexity per model (rows) and corpus (columns), as
# "value [lo, hi]" with the 95% block-bootstrap interval.
# ```
#
# {numref}`fig-models-ppl` and {numref}`tbl-ppl` show the result; brackets give 95% intervals, with the
# windows of text resampled. On the Britannica prose, SmolLM2 reaches
# {glue:text}`ppl_smollm2_135m_britannica:s` [{glue:text}`ppl_smollm2_135m_britannica_lo:s`,
# {glue:text}`ppl_smollm2_135m_britannica_hi:s`], Gemma 3 {glue:text}`ppl_gemma3_270m_britannica:s`
# [{glue:text}`ppl_gemma3_270m_britannica_lo:s`, {glue:text}`ppl_gemma3_270m_britannica_hi:s`] and
# Qwen2.5-Coder {glue:text}`ppl_qwen2_5_coder_0_5b_britannica:s`
# [{glue:text}`ppl_qwen2_5_coder_0_5b_britannica_lo:s`, {glue:text}`ppl_qwen2_5_coder_0_5b_britannica_hi:s`].
# These are plausible values for small models on prose. The pattern across corpora fits what each model was
# trained on. The code model is best on the language reference ({glue:text}`ppl_qwen2_5_coder_0_5b_pydoc:s`
# [{glue:text}`ppl_qwen2_5_coder_0_5b_pydoc_lo:s`, {glue:text}`ppl_qwen2_5_coder_0_5b_pydoc_hi:s`], against
# {glue:text}`ppl_smollm2_135m_pydoc:s` [{glue:text}`ppl_smollm2_135m_pydoc_lo:s`,
# {glue:text}`ppl_smollm2_135m_pydoc_hi:s`] for SmolLM2 and {glue:text}`ppl_gemma3_270m_pydoc:s`
# [{glue:text}`ppl_gemma3_270m_pydoc_lo:s`, {glue:text}`ppl_gemma3_270m_pydoc_hi:s`] for Gemma 3) and worst on
# the plays ({glue:text}`ppl_qwen2_5_coder_0_5b_plays:s` [{glue:text}`ppl_qwen2_5_coder_0_5b_plays_lo:s`,
# {glue:text}`ppl_qwen2_5_coder_0_5b_plays_hi:s`]). All three find the
# Early Modern English of the plays harder than modern prose.
#
# ## Summary
#
# - The book runs on {glue:text}`n_models:d` real pretrained models; the default is
#   {glue:text}`run_model:s`. Their fp32 weights are dequantized 4-bit GGUF weights.
# - The per-head extraction reproduces each model's attention output: the worst absolute deviation is
#   {glue:text}`inv_worst:s` ({numref}`tbl-invariant`).
# - The dequantized models still model text well: {glue:text}`run_model:s` reaches a perplexity of
#   {glue:text}`ppl_model_britannica:s` [{glue:text}`ppl_model_britannica_lo:s`,
#   {glue:text}`ppl_model_britannica_hi:s`] on the Britannica prose; the code model is best on the Python
#   language reference and worst on the plays ({numref}`tbl-ppl`).
# - The source works used WikiText-103 and C4, which are not available offline; the Britannica article,
#   the Python language reference and the plays stand in for them ({numref}`tbl-corpora`).

# %%
glue("run_model", model, display=False)
out = Path(results_dir)
out.mkdir(parents=True, exist_ok=True)
write_json(
    out / "models.json",
    {"model": model, "models": spec_rows, "corpora": corpus_rows, "invariants": invariant_rows,
     "perplexity": [{k: v for k, v in r.items() if k != "seconds"} for r in ppl_rows],  # value, lo, hi, blocks
     "params": {"ppl_tokens": ppl_tokens, "ppl_seq_len": ppl_seq_len}},
)
