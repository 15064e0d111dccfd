"""ATLAS: geometry of attention heads in pretrained causal language models, and its uses."""

__version__ = "0.1.0"

# Bumped whenever a change alters what a cached intermediate would contain.
CACHE_VERSION = "1"
