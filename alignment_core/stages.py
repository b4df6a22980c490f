"""The stage table: one row per kind of stage a run writes, as `losses.LOSSES` is for losses.

A row says what the stage's fingerprint reads of the config, where its code starts (the code digest covers
what those entries reach through the project's imports: alignment_core/digests.py), whether it runs a model
in this process (and so takes a GPU slot: tasks/dispatch.py), and how a finished copy is recognised and
treated. `runner.run_stage` reads it for every stage: store → fingerprint → skip / keep finished / redo →
compute → verified write.

Add a stage: a compute function in `pipeline.py` that calls `run_stage(cfg, STAGES["name"], ...)`, and one
row here (tests/test_stages.py runs every row).

This module imports no model library: the orchestrating flow reads it to decide GPU slots.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from alignment_core.annotators import models_loaded_here
from alignment_core.config import PipelineConfig


def _never(cfg: PipelineConfig) -> bool:
    return False


def _always(cfg: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    name: str  # the fingerprint's "stage", and the stage's folder under iter-k/ unless `folder` says otherwise
    sections: tuple[str, ...]  # the config sections its fingerprint reads (`PipelineConfig.stage_hash`)
    code: tuple[str, ...]  # where its code starts: `module:function`, or a bare module for all of it
    runs_model: Callable[[PipelineConfig], bool] = _never  # loads a model here: a GPU slot
    # A finished iteration's copy (its checkpoint is complete) is history: kept when only the library code changed,
    # refused when anything else did (`runner.keep_finished`). Off for what no checkpoint is trained from.
    keeps_finished: bool = True
    # Where a complete copy records its fingerprint: the stage's manifest, or a checkpoint's lineage.json.
    record: Literal["manifest", "lineage"] = "manifest"
    also: tuple[str, ...] = ()  # sibling stages written with the same fingerprint, complete only together
    # A complete copy is computed again in the rows that failed for a transient reason (a judge outage), unless
    # its iteration is finished.
    retries_transient: bool = False
    folder: str | None = None  # the folder under iter-k/ when it is not `name`

    @property
    def path(self) -> str:
        return self.folder or self.name


PIPELINE = "alignment_core.pipeline"
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("prompts", ("data",), (f"{PIPELINE}:load_prompts",)),
    StageSpec("eval_prompts", ("data",), (f"{PIPELINE}:load_eval_prompts",), keeps_finished=False),
    StageSpec("examples", ("data",), (f"{PIPELINE}:load_examples",), also=("heldout_examples",)),
    # generations of any other name (eval_generations, an experiment's own) run the same code, and feed no
    # checkpoint: they are redone like any stage
    StageSpec("generations", ("generation",), (f"{PIPELINE}:generate",), runs_model=_always),
    StageSpec("eval_generations", ("generation", "evaluation"), (f"{PIPELINE}:generate",), runs_model=_always,
              keeps_finished=False),
    # the reward-model refresh (annotation.cascade.refresh): escalated labels fine-tune each member
    StageSpec("reward_models", ("annotation",), (f"{PIPELINE}:refresh_reward_models",), runs_model=_always),
    StageSpec("annotations", ("annotation",), (f"{PIPELINE}:annotate",),
              runs_model=lambda cfg: bool(models_loaded_here(cfg.annotation)), retries_transient=True),
    StageSpec("units", (), (f"{PIPELINE}:build_units",)),
    StageSpec("weights", ("reweight",), (f"{PIPELINE}:reweight",),
              runs_model=lambda cfg: cfg.reweight.strategy == "importance"),
    StageSpec("checkpoint", ("training", "model"), (f"{PIPELINE}:train",), runs_model=_always, record="lineage"),
    StageSpec("evaluation", ("annotation", "evaluation"), (f"{PIPELINE}:evaluate_generations",),
              runs_model=lambda cfg: bool(models_loaded_here(cfg.annotation)), keeps_finished=False),
    # a reward model's held-out accuracy (the reward-model flow's `evaluation`)
    StageSpec("reward_model_evaluation", ("evaluation",), (f"{PIPELINE}:evaluate_reward_model",),
              runs_model=_always, keeps_finished=False, folder="evaluation"),
)}
