"""A training round run other than by the in-process Trainer: under `accelerate launch` (several processes,
DeepSpeed, FSDP; `launch_distributed_round` starts it, `main` is each launched process), or carried over
unchanged when the round has nothing to train on. `pipeline.train` decides which."""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile

from alignment_core.adapters import add_adapter, is_adapter
from alignment_core.config import PipelineConfig, TrainingConfig, dump_config, load_config
from alignment_core.models import load_causal_lm, load_tokenizer
from alignment_core.store import ArtifactStore
from alignment_core.training.trainer import Trainer

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


def main(argv: list[str] | None = None) -> None:
    """accelerate launch --config_file deployments/accelerate/<config>.yaml -m alignment_core.training
    --config C --units U [--weights W] --checkpoint URI --metrics URI

    On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2 -m alignment_core.training ...`
    (or the cpu_ddp_2proc.yaml config) runs two CPU processes over gloo; accelerate's `--cpu` flag would
    start a single process unless MPI is installed.
    """
    parser = argparse.ArgumentParser(description="Run one training round (under `accelerate launch`).")
    parser.add_argument("--config", required=True, help="pipeline config YAML")
    parser.add_argument("--units", required=True, help="units stage URI")
    parser.add_argument("--weights", help="weights stage URI (default: every weight 1)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint URI to write")
    parser.add_argument("--metrics", required=True, help="metrics stage URI to write")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    parser.add_argument("--policy-name", help="the policy as the config names it (a new adapter records it as "
                        "its base; default: the config's model.policy)")
    parser.add_argument("--fingerprint", help="the round's identity (default: derived from the config, the "
                        "models and the examples); a checkpoint of another round is not resumed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config)
    store = ArtifactStore.from_config(cfg.store)
    trainer = Trainer(cfg, policy_path=cfg.model.policy, tokenizer_path=cfg.model.tokenizer, store=store,
                      reference_path=cfg.model.reference, policy_name=args.policy_name)
    weights = store.read_pandas(args.weights) if args.weights else None
    encoded = trainer.batch_factory.encode(store.read_pandas(args.units), weights)
    result = trainer.train(encoded, args.checkpoint, args.metrics, resume=not args.no_resume,
                           fingerprint=args.fingerprint)
    if trainer.accelerator.is_main_process:
        print(json.dumps({"checkpoint_uri": result.checkpoint_uri, "steps": result.steps,
                          "tokens_per_s": result.tokens_per_s, "metrics": result.metrics}))
