"""GPU memory between stages: on one GPU, generation (a vLLM engine), annotation and training take turns, so
each stage gives its memory back when it ends and records how much it took (its manifest's
`peak_gpu_memory_gib`). Without CUDA these are no-ops and the figure is None."""

import gc

import torch


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """The larger of this process's peak allocation since `reset_peak_memory` and the device memory in use
    now (a vLLM engine allocates in its own process, and keeps its KV cache until it is shut down)."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round(max(torch.cuda.max_memory_allocated(), total - free) / 2**30, 3)


def release_memory() -> None:
    """Collect what the finished stage dropped and hand cached blocks back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
