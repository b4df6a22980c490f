"""A training round run other than by the in-process Trainer: under `accelerate launch` (several processes,
DeepSpeed, FSDP), or carried over unchanged when the round has nothing to train on. `pipeline.train` decides
which; `python -m alignment_core.training` is the launched side."""

import logging
import os
import subprocess
import sys
import tempfile

from alignment_core.adapters import add_adapter, is_adapter
from alignment_core.config import PipelineConfig, TrainingConfig, dump_config
from alignment_core.models import load_causal_lm, load_tokenizer
from alignment_core.store import ArtifactStore

log = logging.getLogger(__name__)


def carry_over(cfg: PipelineConfig, store: ArtifactStore, policy_path: str, checkpoint: str, metrics: str,
               fingerprint: dict, policy_uri: str | None = None) -> None:
    """No training data this round: the iteration's checkpoint is the policy it started from.

    With `model.adapter` the checkpoint stays an adapter (the policy's own, or a new one that changes nothing
    on a base policy), so that every checkpoint of a LoRA run is an adapter on the same base.
    """
    log.warning("%s: no training units, saving the unchanged policy", checkpoint)
    if cfg.model.adapter is not None and is_adapter(policy_path):
        model = load_causal_lm(policy_path, dtype=cfg.model.dtype, adapter_mode="frozen")
    elif cfg.model.adapter is not None:
        model = add_adapter(load_causal_lm(policy_path, dtype=cfg.model.dtype), cfg.model.adapter, "causal_lm",
                            base_name=policy_uri or policy_path)
    else:
        model = load_causal_lm(policy_path, dtype=cfg.model.dtype)
    store.save_checkpoint(model, load_tokenizer(cfg.model.tokenizer or policy_path), checkpoint)
    store.write_stage(metrics, "metrics", fingerprint, [], extra={"note": "no training units: policy unchanged"})


def launch_distributed_round(cfg, units_uri, weights_uri, policy_path, reference_path, checkpoint, metrics,
                             policy_uri=None, fingerprint=None):
    """Run the round under `accelerate launch` (DDP/DeepSpeed/FSDP per the accelerate config)."""
    with tempfile.TemporaryDirectory() as tmp:
        round_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"policy": policy_path, "reference": reference_path})})
        config_path = os.path.join(tmp, "config.yaml")
        with open(config_path, "w") as f:
            f.write(dump_config(round_cfg))
        command = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_launch_options(cfg.training),
                   "-m", "alignment_core.training", "--config", config_path, "--units", units_uri,
                   "--weights", weights_uri, "--checkpoint", checkpoint, "--metrics", metrics,
                   "--policy-name", policy_uri or policy_path]
        if fingerprint:
            command += ["--fingerprint", fingerprint]
        subprocess.run(command, check=True)


def accelerate_launch_options(training: TrainingConfig) -> list[str]:
    """`accelerate launch`'s options for a round: the config file when one is named, and the process count when
    `training.num_processes` is set (it overrides the file's; unset, the file's count holds)."""
    options = [] if training.num_processes is None else ["--num_processes", str(training.num_processes)]
    if training.accelerate_config:
        return [*options, "--config_file", training.accelerate_config]
    return [*options, "--multi_gpu"]  # torchrun-style launch; without CUDA the Trainer asks for the CPU (gloo)
