"""Offline flows on the same stages and trainer: the responses and labels come from a fixed dataset.

    load_examples → units and weights → train → evaluate

- `sft`: supervised fine-tuning on prompt/completion data.
- `reward-model`: Bradley-Terry reward model from preference pairs (loads later as an annotator).
- `offline-preference`: dpo / ipo / cdpo / slic / simpo on pairs, or kto on pointwise labels.

    python -m flows.offline sft --config configs/sft.yaml
"""

import sys

from prefect import flow

from alignment_core.config import PipelineConfig
from alignment_core.pipeline import open_store
from alignment_core.setups import setups_of_flow
from flows import logs
from flows.common import (
    cli_run,
    parse_cli,
    print_summary,
    run_lease,
    with_overrides,
)
from flows.fast_start import exit_now
from tasks.evaluate import evaluate_policy, evaluate_reward_model
from tasks.load_prompts import load_eval_prompts, load_examples
from tasks.preflight import preflight
from tasks.report import report_iteration
from tasks.track import track_iteration
from tasks.train import train
from tasks.units_and_weights import units_and_weights


def offline_round(cfg: PipelineConfig) -> dict:
    """One training round on the dataset, evaluated on prompts it did not train on: a policy by its win-rates,
    a reward model by its accuracy on the held-out preference pairs."""
    with run_lease(cfg) as cfg:  # one writer per run: a second flow run on it fails here
        config_json = cfg.model_dump_json()
        logs.log_config(cfg)
        preflight(config_json)
        policy = cfg.model.policy
        examples = load_examples(config_json, 0)
        round_data = units_and_weights(config_json, policy, 1, examples_uri=examples)
        checkpoint = train(config_json, round_data["units"], round_data["weights"], policy,
                           cfg.model.reference or policy, 1)
        stages = {"examples": examples, **round_data, "checkpoint": checkpoint,
                  "metrics": open_store(cfg).stage_uri(cfg.store.run_name, 1, "metrics")}
        if cfg.evaluation.enabled and cfg.setup == "reward_modelling":
            stages["evaluation"] = evaluate_reward_model(config_json, examples, checkpoint, 1)
        elif cfg.evaluation.enabled:
            eval_prompts = load_eval_prompts(config_json, 0)
            stages["evaluation"] = evaluate_policy(config_json, eval_prompts, checkpoint, policy, policy, 1)
        summary = report_iteration(config_json, 1, stages)
        if cfg.tracking.report_to:
            track_iteration(config_json, 1)
        logs.log_iteration(cfg, [summary])
        return summary


def _checked(config: PipelineConfig, flow_name: str, run_name: str | None, store_root: str | None) -> PipelineConfig:
    cfg = with_overrides(config, None, run_name, store_root)
    if cfg.setup not in setups_of_flow(flow_name):
        raise ValueError(f"flow {flow_name!r} runs setups {setups_of_flow(flow_name)}, config has {cfg.setup!r}")
    return cfg


@flow(name="sft", log_prints=True)
def sft(config: PipelineConfig, run_name: str | None = None, store_root: str | None = None) -> dict:
    """Supervised fine-tuning on prompt/completion data.

    Args:
        config: The whole typed pipeline config (every field is described in the form).
        run_name: When set, wins over `config.store.run_name`.
        store_root: When set, wins over `config.store.root`.
    """
    return offline_round(_checked(config, "sft", run_name, store_root))


@flow(name="reward-model", log_prints=True)
def reward_model(config: PipelineConfig, run_name: str | None = None, store_root: str | None = None) -> dict:
    """A Bradley-Terry reward model from preference pairs.

    Args:
        config: The whole typed pipeline config (every field is described in the form).
        run_name: When set, wins over `config.store.run_name`.
        store_root: When set, wins over `config.store.root`.
    """
    return offline_round(_checked(config, "reward-model", run_name, store_root))


@flow(name="offline-preference", log_prints=True)
def offline_preference(config: PipelineConfig, run_name: str | None = None, store_root: str | None = None) -> dict:
    """dpo / ipo / cdpo / slic / simpo on pairs, or kto on pointwise labels.

    Args:
        config: The whole typed pipeline config (every field is described in the form).
        run_name: When set, wins over `config.store.run_name`.
        store_root: When set, wins over `config.store.root`.
    """
    return offline_round(_checked(config, "offline-preference", run_name, store_root))


FLOWS = {"sft": sft, "reward-model": reward_model, "offline-preference": offline_preference}

def main(argv: list[str] | None = None, prog: str = "python -m flows.offline") -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in FLOWS:
        sys.exit(f"usage: {prog} {{{','.join(FLOWS)}}} --config CONFIG.yaml  (--help after the flow name)")
    name = argv[0]
    args = parse_cli(f"Run the offline {name} flow in ephemeral Prefect.", argv[1:], f"{prog} {name}")
    logs.configure(args.log_level, args.progress)
    with cli_run(args) as config:
        summary = FLOWS[name](config=config)
    print_summary(config, [summary])


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's seconds-long teardown
