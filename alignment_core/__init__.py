"""alignment_core: a plain library for aligning causal LMs with online feedback (no Prefect import)."""

__version__ = "0.1.0"
