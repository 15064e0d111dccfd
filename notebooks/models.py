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
# ```{glue:md} models_run_box
# :format: myst
# ```
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
from atlas_core.progress import tqdm  # names the running chapter

from atlas_core.cache import write_json
from atlas_core.corpus import BlockSpec, corpus_stats, token_blocks
from atlas_core.eval import corpus_perplexity
from atlas_core.extract import invariant_errors
from atlas_core.figures import color, figsize
from atlas_core.glue import chapter_glue, estimate_text, glue_key as key, listing, plural
from atlas_core.interval import SIG3
from atlas_core.models import load_model, parameter_count

g = chapter_glue("models", chapter="models", model=model, corpus=listing(corpora), results_dir=results_dir)
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
    window = max((w for w in s.windows if w), default=None)
    spec_rows.append({"model": name, "family": s.family, "layers": s.n_layers, "query heads": s.n_heads,
                      "KV heads": s.n_kv_heads, "head width": s.d_head, "residual width": s.d_model,
                      "sliding layers": s.layer_types.count("sliding_attention"),
                      "window (tokens)": "none" if window is None else f"{window:,}",
                      "BOS": "yes" if s.add_bos else "no",
                      "parameters (M)": round(parameter_count(lm) / 1e6, 1)})
    # Σ_h c_h + b_O against the attention output, and attention rows against 1: first, middle and last layer
    inv = invariant_errors(lm, token_blocks(lm, BlockSpec(corpus="britannica", seq_len=invariant_seq_len,
                                                          n_blocks=invariant_blocks, split="eval")))
    invariant_rows.append({"model": s.name, "layers checked": ", ".join(map(str, inv["layers"])),
                           "max |Σc + b − out|": inv["sum_abs"], "relative": inv["sum_rel"], "max |Σp − 1|": inv["rows"]})
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
g.table("table", spec_table, sample=f"{plural(len(names), 'model')} (read from their configs)", corpus="none")
g("n_models", len(names))

# %% [markdown]
# ```{glue:figure} models_table
# :name: tbl-models
#
# The models of this run and their attention layout, one row per model: architecture family, number of
# layers, query heads and key–value (KV) heads per layer (fewer KV heads than query heads means grouped-
# or multi-query attention), head width $d_\text{head}$, residual width $d_\text{model}$, number of
# sliding-window layers and their window in tokens, whether each text window starts with
# the beginning-of-sequence token (BOS), and the parameter count in millions.
#
# {glue:md}`models_table_prov:myst`
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
# Under the run's tokenizer the Britannica article is {glue:text}`models_tokens_britannica:s` tokens
# ({glue:text}`models_words_britannica:s` words), the language reference {glue:text}`models_tokens_pydoc:s`
# tokens and the plays {glue:text}`models_tokens_plays:s` tokens.
#
# Each text becomes one deterministic token stream, cut into contiguous non-overlapping blocks. The
# first 75% of the blocks form the evaluation split and the rest the calibration split, so the two never
# share a token.

# %%
corpus_rows = [corpus_stats(tokenizer, c) for c in corpora]
corpus_table = pd.DataFrame(corpus_rows).set_index("corpus")
g.table("corpora", corpus_table.style.format("{:,}"), data=corpus_table,
        sample=f"whole texts, tokenized by {model}")
for row in corpus_rows:
    g(key("tokens", row["corpus"]), f"{row['tokens']:,}")
    g(key("words", row["corpus"]), f"{row['words']:,}")

# %% [markdown]
# ```{glue:figure} models_corpora
# :name: tbl-corpora
#
# Offline corpora: number of characters, whitespace-separated words and tokens of the whole text, with
# the tokenizer of the run's model. Both splits are cut from these token streams.
#
# {glue:md}`models_corpora_prov:myst`
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
# from the module's output is {glue:text}`models_inv_abs_smollm2_135m:s` for SmolLM2,
# {glue:text}`models_inv_abs_gemma3_270m:s` for Gemma 3 and {glue:text}`models_inv_abs_qwen2_5_coder_0_5b:s` for
# Qwen2.5-Coder. Relative to the size of the output, and for the row sums, the deviations are of the
# order of fp32 rounding. The extraction is exact up to floating-point error: the heads it reports are
# the heads the model computes.

# %%
for row in invariant_rows:
    g(key("inv_abs", row["model"]), f"{row['max |Σc + b − out|']:.1e}")
invariant_table = pd.DataFrame(invariant_rows).set_index("model")
g.table("invariant", invariant_table.style.format("{:.1e}", subset=invariant_table.columns[1:]),
        corpus="britannica", sample=f"{plural(invariant_blocks, 'block')} of {invariant_seq_len} tokens per model")
worst = max(r["max |Σc + b − out|"] for r in invariant_rows)
g("inv_worst", f"{worst:.1e}")

# %% [markdown]
# ```{glue:figure} models_invariant
# :name: tbl-invariant
#
# Extraction invariants in fp32, one row per model, over the layers listed. "max |Σc + b − out|": the
# largest absolute difference between the summed head contributions (plus output bias) and the attention
# module's output; "relative": the same divided by the largest output entry; "max |Σp − 1|": the largest
# deviation of an attention row's sum from one. Smaller is better; the worst absolute deviation over all
# models is {glue:text}`models_inv_worst:s`.
#
# {glue:md}`models_invariant_prov:myst`
# ```
#
# ## Perplexity
#
# Perplexity is measured on the evaluation split of each corpus, over non-overlapping windows, with the
# fp32 (dequantized) weights. It is a sanity check, not a benchmark: a model whose weights or
# tokenization had gone wrong would show far higher perplexities on ordinary prose.

# %%
for row in ppl_rows:  # every quoted perplexity with its interval: "value [lo, hi]"
    g(key("ppl", row["model"], row["corpus"]) + "_ci", estimate_text(row["perplexity"], row["lo"], row["hi"], SIG3))
ppl = pd.DataFrame(ppl_rows).drop(columns="seconds")  # the numbers behind the figure and the table
ppl["cell"] = [estimate_text(r.perplexity, r.lo, r.hi, SIG3) for r in ppl.itertuples()]
ppl_table = ppl.pivot(index="model", columns="corpus", values="perplexity").loc[names, corpora]
ppl_lo, ppl_hi = (ppl.pivot(index="model", columns="corpus", values=v).loc[names, corpora] for v in ("lo", "hi"))
n_windows = ppl_tokens // ppl_seq_len
ppl_sample = f"{plural(n_windows, 'window')} of {ppl_seq_len} tokens per model and corpus"
g.table("ppl_table", ppl.pivot(index="model", columns="corpus", values="cell").loc[names, corpora],
        data=ppl.drop(columns="cell"), sample=ppl_sample)
g("ppl_blocks", n_windows)

fig, ax = plt.subplots(figsize=figsize(panel_aspect=0.45))
width = 0.8 / len(names)
for i, name in enumerate(names):  # linear scale: bar heights compare as the perplexities do
    err = np.stack([ppl_table.loc[name] - ppl_lo.loc[name], ppl_hi.loc[name] - ppl_table.loc[name]])
    ax.bar(np.arange(len(corpora)) + i * width, ppl_table.loc[name], width, yerr=err, color=color(name), label=name)
ax.set_xticks(np.arange(len(corpora)) + width * (len(names) - 1) / 2, corpora)
ax.set_ylabel("perplexity")
ax.set_title(f"{ppl_tokens:,} tokens per corpus, {ppl_seq_len}-token windows")
ax.legend(loc="upper left", ncols=len(names))
ax.set_ylim(0, ppl_hi.to_numpy().max() * 1.25)  # room for the legend above the bars
fig.tight_layout()
g.figure("fig_ppl", fig, data=ppl.drop(columns="cell"), sample=ppl_sample)
g("ppl_model_britannica_ci", estimate_text(*(t.loc[model, "britannica"] for t in (ppl_table, ppl_lo, ppl_hi)), SIG3)
  if "britannica" in corpora else "n/a")

# %% [markdown]
# ```{glue:figure} models_fig_ppl
# :name: fig-models-ppl
#
# Perplexity of every model (bars) on every offline corpus (groups), on the evaluation split, with fp32
# weights dequantized from 4-bit GGUF files; lower is better. Error bars: 95% intervals of a
# block bootstrap over the {glue:text}`models_ppl_blocks:d` windows (2,000 resamples). The title gives the
# number of tokens per corpus and the window length.
#
# {glue:md}`models_fig_ppl_prov:myst`
# ```
#
# ```{glue:figure} models_ppl_table
# :name: tbl-ppl
#
# The numbers behind {numref}`fig-models-ppl`: perplexity per model (rows) and corpus (columns), as
# "value [lo, hi]" with the 95% block-bootstrap interval.
#
# {glue:md}`models_ppl_table_prov:myst`
# ```
#
# {numref}`fig-models-ppl` and {numref}`tbl-ppl` show the result; brackets give 95% intervals, with the
# windows of text resampled. On the Britannica prose, SmolLM2 reaches
# {glue:text}`models_ppl_smollm2_135m_britannica_ci:s`, Gemma 3 {glue:text}`models_ppl_gemma3_270m_britannica_ci:s` and
# Qwen2.5-Coder {glue:text}`models_ppl_qwen2_5_coder_0_5b_britannica_ci:s`.
# These are plausible values for small models on prose. The pattern across corpora fits what each model was
# trained on. The code model is best on the language reference ({glue:text}`models_ppl_qwen2_5_coder_0_5b_pydoc_ci:s`, against
# {glue:text}`models_ppl_smollm2_135m_pydoc_ci:s` for SmolLM2 and {glue:text}`models_ppl_gemma3_270m_pydoc_ci:s` for Gemma 3) and worst on
# the plays ({glue:text}`models_ppl_qwen2_5_coder_0_5b_plays_ci:s`). All three find the
# Early Modern English of the plays harder than modern prose.
#
# ## Summary
#
# - The book runs on {glue:text}`models_n_models:d` real pretrained models; the default is
#   {glue:text}`models_run_model:s`. Their fp32 weights are dequantized 4-bit GGUF weights.
# - The per-head extraction reproduces each model's attention output: the worst absolute deviation is
#   {glue:text}`models_inv_worst:s` ({numref}`tbl-invariant`).
# - The dequantized models still model text well: {glue:text}`models_run_model:s` reaches a perplexity of
#   {glue:text}`models_ppl_model_britannica_ci:s` on the Britannica prose; the code model is best on the Python
#   language reference and worst on the plays ({numref}`tbl-ppl`).
# - The source works used WikiText-103 and C4, which are not available offline; the Britannica article,
#   the Python language reference and the plays stand in for them ({numref}`tbl-corpora`).

# %%
g("run_model", model)
out = Path(results_dir)
out.mkdir(parents=True, exist_ok=True)
write_json(
    out / "models.json",
    {"model": model, "models": spec_rows, "corpora": corpus_rows, "invariants": invariant_rows,
     "perplexity": [{k: v for k, v in r.items() if k != "seconds"} for r in ppl_rows],  # value, lo, hi, blocks
     "params": {"ppl_tokens": ppl_tokens, "ppl_seq_len": ppl_seq_len}},
)
g.finish()  # the opening box: run information and this chapter's wall time
