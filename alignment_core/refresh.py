"""The reward models learn online (`annotation.cascade.refresh`): the `reward_models` stage.

A cascade sends the pairs its reward models are least sure of to an expensive annotator. With refresh on, from
the second iteration on, each member of the reward-model ensemble (or the one reward model) is fine-tuned on
those expensive labels, all of them gathered in the iterations before, and that iteration labels with the
fine-tuned members: expensive labels go where the cheap annotator is unsure, and then make it sure.

    iter-k/reward_models/                  the stage: its rows are the labelled pairs the members trained on
      part-00000.parquet, _manifest.json   (UNITS records, the escalated rows of iterations 1..k-1)
      member-0/ ... member-{K-1}/          each member's checkpoint (safetensors) + lineage.json
      member-0-metrics/ ...                each member's training metrics

Every refresh starts from the original members (`annotation.reward_model`), not from the last refresh: the
labels so far are all there is to learn, and an iteration's members then depend on its labels alone, not on
the order they came in. Member i trains on its own bootstrap sample of the labels (`refresh.bootstrap`, seeded
by `refresh.seed + i`), so members that saw the same labels still disagree where the labels do not pin them
down. A member whose checkpoint is complete under the same fingerprint is kept: a killed refresh redoes only
the members it had not finished (and the Trainer resumes a member's round from its last save).
"""

import json
import logging

import pandas as pd

from alignment_core.config import ModelConfig, PipelineConfig
from alignment_core.inputs import InputRef
from alignment_core.records import UNITS
from alignment_core.store import ArtifactStore, fingerprint_digest

log = logging.getLogger(__name__)

STAGE = "reward_models"


def refreshes(cfg: PipelineConfig, iteration: int) -> bool:
    """Whether iteration `iteration` labels with refreshed reward models (there are labels before it)."""
    return cfg.annotation.annotator == "cascade" and cfg.annotation.cascade.refresh.enabled and iteration > 1


def escalated(annotations: pd.DataFrame) -> pd.DataFrame:
    """The rows the cascade's expensive annotator labelled (raw JSON `cascade.escalated`)."""
    mask = [bool(json.loads(raw).get("cascade", {}).get("escalated")) for raw in annotations["raw"]]
    return annotations[pd.Series(mask, index=annotations.index, dtype=bool)]


def escalated_units(store: ArtifactStore, run: str, iterations: range) -> tuple[pd.DataFrame, dict[str, int]]:
    """The escalated pairs of these iterations as reward-modelling units (the preferred response first, ties and
    failed rows left out), and how many came from each iteration. Text only: the reward model reads it through
    its own tokenizer, as when it scores (the policy's sampled token ids mean nothing to another vocabulary)."""
    from alignment_core.batches import units_from_online  # torch: pipeline imports this module to dispatch

    frames, counts = [], {}
    for k in iterations:
        labelled = escalated(store.read_pandas(store.stage_uri(run, k, "annotations")))
        units = UNITS.empty_table().to_pandas()
        if len(labelled):
            units = units_from_online(store.read_pandas(store.stage_uri(run, k, "generations")), labelled,
                                      "online_pairwise")
        frames.append(units)
        counts[str(k)] = len(units)
    units = pd.concat(frames, ignore_index=True) if frames else UNITS.empty_table().to_pandas()
    return units.assign(generation1_token_ids=None, generation2_token_ids=None), counts


def member_config(cfg: PipelineConfig, index: int) -> PipelineConfig:
    """Member `index`'s fine-tuning round: the reward loss at the refresh's settings, on the reward model alone
    (no adapter, its own tokenizer), with the run's sequence lengths (the annotator scores within them)."""
    refresh = cfg.annotation.cascade.refresh
    seed = refresh.seed + index
    training = cfg.training.model_copy(update={
        "loss": "reward", "learning_rate": refresh.learning_rate, "epochs": refresh.epochs,
        "batch_size": refresh.batch_size, "gradient_accumulation_steps": 1, "seed": seed,
        "bootstrap_seed": seed if refresh.bootstrap else None, "reward_margin": 0.0, "save_every_steps": 0,
        "num_processes": 1, "accelerate_config": None,
    })
    model = ModelConfig(dtype=cfg.annotation.dtype or cfg.model.dtype,
                        attn_implementation=cfg.model.attn_implementation)
    return cfg.model_copy(update={"setup": "reward_modelling", "training": training, "model": model})


def refresh_member(cfg: PipelineConfig, store: ArtifactStore, out: str, index: int, original: str,
                    units: pd.DataFrame, stage_fingerprint: dict) -> str:
    """Member `index` fine-tuned from `original` into `{out}/member-{index}`; kept when already complete."""
    from alignment_core.training import Trainer  # torch, likewise

    checkpoint, metrics = f"{out}/member-{index}", f"{out}/member-{index}-metrics"
    fingerprint = {"stage": fingerprint_digest(stage_fingerprint), "member": index}
    lineage_uri = f"{checkpoint}/lineage.json"
    if store.checkpoint_complete(checkpoint) and store.exists(lineage_uri) \
            and store.read_json(lineage_uri)["fingerprint"] == fingerprint:
        log.info("%s: already complete, skipped", checkpoint)
        return checkpoint
    member_cfg = member_config(cfg, index)
    model = InputRef.model(original)
    path = model.resolve(store)
    trainer = Trainer(member_cfg, policy_path=path, tokenizer_path=None, store=store, policy_name=original)
    try:
        encoded = trainer.batch_factory.encode(units)
        trainer.train(encoded, checkpoint, metrics, fingerprint=fingerprint_digest(fingerprint))
    finally:
        trainer.release()
    training = member_cfg.training
    store.write_json(lineage_uri, {
        "fingerprint": fingerprint, "stage_fingerprint": stage_fingerprint, "base": model.lineage(store, path),
        "labels": len(units), "label_ids": sorted(units["unit_id"]), "seed": training.seed,
        "bootstrap_seed": training.bootstrap_seed,
    })
    return checkpoint
