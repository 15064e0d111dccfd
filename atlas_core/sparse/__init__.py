"""Sparse attention (SPEC §10): anchor + window + top-k kept sets, run inside models, and decode kernels.

- ``kept``: the sparse rule (``SparseConfig``), kept sets (fast and reference), the output-error split.
- ``pages``: page summaries, the Quest-style score bound and the page selector, recall of exact top-k.
- ``blocks``: the revised source's selector, r blocks of P keys by q · mean key (per query or KV head).
- ``attention``: the registered attention function ``atlas_sparse`` and the ``sparse_attention`` context.
- ``fidelity``: teacher-forced KL / top-1 / perplexity, greedy-generation agreement and greedy survival
  over many prompts, dense vs sparse.
- ``certified``: certified page selection: pages read in bound order until the discarded mass is provably ≤ ε
  (selector ``"certified"``; minmax, centroid, low-rank and min bounds; decode kernel; bound slack).
- ``certified_eval``: the certified rule judged: fixed-budget rules at its measured key bytes, its calibration.
- ``kernels``: one layer's decode step over a long cache: dense, exact top-k, page-selected.
- ``realkeys``: a real long prompt's post-RoPE keys, values and queries of one full-attention layer.
- ``bench``: decode-step time and bytes read against context length (synthetic or real keys).
"""

from atlas_core.sparse.attention import MassLog, sparse_attention
from atlas_core.sparse.kept import SparseConfig, kept_mask, kept_mask_reference, output_split
from atlas_core.sparse.pages import page_mask, page_summaries, score_bound

__all__ = [
    "MassLog",
    "SparseConfig",
    "kept_mask",
    "kept_mask_reference",
    "output_split",
    "page_mask",
    "page_summaries",
    "score_bound",
    "sparse_attention",
]
