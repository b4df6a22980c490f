"""alignment_core: a plain library for aligning causal LMs with online feedback (no Prefect import)."""

from alignment_core.cpu import passive_openmp_wait

# Before anything imports torch: OpenMP threads that sleep instead of spinning while they wait, so that stages
# do not collapse when the cores are shared (alignment_core/cpu.py has the measurements).
passive_openmp_wait()

__version__ = "0.1.0"
