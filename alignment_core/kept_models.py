"""Models kept loaded between the stages one process runs (`scale_out.keep_models_loaded`).

A colocated iteration loads the same weights several times: the reward model for annotation and again for
evaluation, the reference in every round, the policy a round starts from for sampling and again for training,
and the new checkpoint for evaluation and again for the next iteration's sampling. Here a model is loaded once
per process and reused while it is kept:

- `shared(...)`: a model to run, never to change (sampling, scoring, the reference): the kept one, or loaded and
  kept. Its users may set its mode, `requires_grad` and `generation_config`, nothing else.
- `taken(...)`: a model to train: the kept one, no longer kept (restored to how `from_pretrained` left it), or a
  fresh load. A trained model is never kept: the next stage loads its checkpoint, the weights of record.
- `park()`: as each stage ends on a GPU, kept models move to host memory and their device memory goes back to
  the device, so that the next stage has it; `shared` moves nothing back, its caller puts the model where it
  runs it.

A model is known by its kind, its identity (`model_digest`: its hub commit or the bytes of its weights) and the
options it was loaded with, so a checkpoint rewritten in place is loaded again. Kept models are bounded by a
quarter of the machine's memory, the least recently used dropped first. The stage boundaries, manifests and
resume are unchanged: a stage's outputs are the same whether its model came from here or from disk
(tests/test_kept_models.py).

Off (the default outside the pipeline, whose stages configure it per config), every call loads and nothing is
kept; so too under an async schedule, whose in-process stages (sampling, evaluation) run beside each other and
would move a model another one is running. Importing this module does not import torch (the flows import it
through the stage runner, and start Prefect's server while torch loads: flows/fast_start.py).
"""

import copy
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from alignment_core.inputs import model_digest

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Kept models may hold at most this share of the machine's memory (their weights' bytes).
MEMORY_SHARE = 0.25

_lock = threading.Lock()
_kept: "OrderedDict[tuple, Kept]" = OrderedDict()  # least recently used first
_enabled = False


class Kept:
    """A kept model and how `from_pretrained` left it (what `taken` restores)."""

    def __init__(self, model):
        self.model = model
        self.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
        self.nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def configure(enabled: bool) -> None:
    """Keep models from now on, or not (and drop those kept): each pipeline stage applies its config's
    `scale_out.keep_models_loaded`."""
    global _enabled
    with _lock:
        _enabled = enabled
        if not enabled:
            _kept.clear()


def _key(kind: str, path: str, options: dict) -> tuple:
    return kind, model_digest(path), tuple(sorted(options.items()))


def shared(kind: str, path: str, load: Callable[[], "torch.nn.Module"], **options) -> "torch.nn.Module":
    """The model `load()` returns, for running only: kept and reused when keeping is on. `kind` and `options`
    (dtype, attention kernel, ...) are what besides the weights at `path` makes `load()`'s result what it is."""
    if not _enabled:
        return load()
    key = _key(kind, path, options)
    with _lock:
        if key in _kept:
            _kept.move_to_end(key)
            logger.info("%s %s: the model kept loaded in this process", kind, path)
            return _kept[key].model
    model = load()
    logger.info("%s %s: loaded, and kept for the stages after this one", kind, path)
    with _lock:
        _kept[key] = Kept(model)
        _within_budget()
    return model


def taken(kind: str, path: str, load: Callable[[], "torch.nn.Module"], **options) -> "torch.nn.Module":
    """The model `load()` returns, to train: the kept one, which is then no longer kept, or `load()`'s."""
    with _lock:
        kept = _kept.pop(_key(kind, path, options), None) if _enabled else None
    if kept is None:
        return load()
    logger.info("%s %s: training the model kept loaded in this process", kind, path)
    model = kept.model.to("cpu")  # where `from_pretrained` puts it
    model.requires_grad_(True)  # a reference's users froze it
    model.eval()
    if kept.generation_config is not None:
        model.generation_config = kept.generation_config  # a sampler's users set their own
    return model


def park() -> None:
    """Move kept models to host memory (a stage ends: the next one may need the GPU's memory)."""
    if not _kept:
        return
    import torch

    if not torch.cuda.is_available():
        return
    with _lock:
        for kept in _kept.values():
            kept.model.to("cpu")
    torch.cuda.empty_cache()


def _within_budget() -> None:
    budget = MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    while _kept and sum(kept.nbytes for kept in _kept.values()) > budget:
        (kind, digest, _), _ = _kept.popitem(last=False)
        logger.info("%s %s: no longer kept loaded (kept models are bounded by %d%% of memory)",
                    kind, digest, MEMORY_SHARE * 100)
