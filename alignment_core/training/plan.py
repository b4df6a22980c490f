"""The step plan of a round: every optimizer step's micro-batches, fixed up front by the data and the config, so
that a resumed round and a round on another number of processes see the same global batches."""

import logging

import numpy as np

__all__ = [  # what the package re-exports
    "bootstrap_sample",
    "plan_steps",
]

logger = logging.getLogger(__name__)


def plan_steps(
    units: list[list[int]], examples_per_step: int, micro_batches: int, epochs: int, seed: int
) -> list[list[list[int]]]:
    """Every optimizer step as `micro_batches` lists of example indices.

    A unit is what must stay in one micro-batch: one example, or (rl) every sample of one prompt. Each
    epoch shuffles the units with its own seed and cuts them into steps of about `examples_per_step`
    examples; a step's units are split evenly into the micro-batches. A last step too small to give every
    micro-batch a unit is dropped (and logged).
    """
    mean_unit = sum(len(u) for u in units) / max(len(units), 1)
    units_per_step = max(micro_batches, round(examples_per_step / mean_unit))
    steps, dropped = [], 0
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        for start in range(0, len(order), units_per_step):
            chunk = order[start : start + units_per_step]
            if len(chunk) < micro_batches:
                dropped += sum(len(units[u]) for u in chunk)
                continue
            steps.append([[i for u in part for i in units[u]] for part in np.array_split(chunk, micro_batches)])
    if dropped:
        logger.warning("dropped %d examples that could not fill a last step of %d micro-batches", dropped,
                       micro_batches)
    if not steps:
        raise ValueError(
            f"{sum(len(u) for u in units)} examples in {len(units)} units cannot fill one optimizer step of "
            f"{micro_batches} micro-batches; lower training.batch_size/gradient_accumulation_steps or add data"
        )
    return steps


def bootstrap_sample(count: int, seed: int) -> list[int]:
    """A bootstrap resample of `count` units: `count` indices drawn with replacement, the same for the same seed."""
    return np.random.default_rng([seed, count]).integers(0, count, size=count).tolist()
