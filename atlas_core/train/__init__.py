"""Train small causal LMs from scratch for the ablation chapter: configs, tokenizer, data order, model, loop.

``config`` (ArchConfig, TrainConfig, the matched-parameter variants), ``tokenizer`` (byte-level BPE fitted
offline on the training text), ``data`` (the training stream and its (seed, step) batch order), ``model``
(a transformers Llama with the LayerNorm and learned-position swaps, and the checkpoint loader) and ``loop``
(``train``: AdamW, warm-up and cosine decay, held-out loss, atomic checkpoints, resume).
"""
