"""Experiments built from the pipeline's own stages and flows (see experiments/RESULTS.md)."""
