"""The online pipeline: each iteration a chain of stages, the next one sampling from the last checkpoint.

    load_prompts → generate → [refresh reward models] → annotate → units and weights → train → evaluate   (× iterations)

With scale_out.schedule async, the next iterations' load_prompts → generate → annotate run while one trains,
sampling from a checkpoint at most scale_out.max_staleness behind.

Run it once, in ephemeral Prefect:   python -m flows.iterative_dpo --config configs/tiny.yaml
Deployed:                            prefect deployment run 'iterative-dpo/tiny-local'
"""

from prefect import flow

from alignment_core.config import PipelineConfig
from alignment_core.pipeline import finished_iterations, open_store
from alignment_core.refresh import refreshes
from alignment_core.setups import SETUPS
from flows import logs
from flows.common import (
    ahead_of_training,
    cli_run,
    parse_cli,
    print_summary,
    run_lease,
    with_overrides,
)
from flows.fast_start import exit_now
from tasks.annotate import annotate
from tasks.evaluate import evaluate_policy
from tasks.generate import generate
from tasks.load_prompts import load_eval_prompts, load_prompts
from tasks.preflight import preflight
from tasks.refresh import refresh_reward_models
from tasks.report import report_iteration
from tasks.track import track_iteration
from tasks.train import train
from tasks.units_and_weights import units_and_weights


@flow(name="iterative-dpo", log_prints=True)
def iterative_dpo(
    iterations: int | None = None,
    run_name: str | None = None,
    store_root: str | None = None,
    force: bool = False,
    more_iterations: int | None = None,
    config: PipelineConfig = PipelineConfig(),
) -> list[dict]:
    """Online preference learning (OAIF-style): sample, label, reweight and train, `iterations` times.

    The flat parameters come first (the form shows them above the config's many fields): what users change
    from one flow run to the next, without resending the config.

    Args:
        iterations: When set, wins over `config.iterations`.
        run_name: When set, wins over `config.store.run_name`: the run folder this flow run writes.
        store_root: When set, wins over `config.store.root`.
        force: Redo finished iterations whose config, data or code changed, replacing their checkpoints
            (without it such a flow run is refused); wins over `config.store.force_rerun` when true.
        more_iterations: Continue the run instead: this many iterations after its last finished one, which
            is what a scheduled deployment wants (each scheduled flow run is the next online iteration).
        config: The whole typed pipeline config (every field is described in the form). A config given
            whole (`--param config=...`) replaces it: the fields it leaves out take the shipped defaults.
    """
    cfg = with_overrides(config, iterations, run_name, store_root, force)
    if SETUPS[cfg.setup].flow != "iterative-dpo":
        raise ValueError(f"iterative-dpo runs the online setups; setup {cfg.setup!r} belongs to the "
                         f"{SETUPS[cfg.setup].flow!r} flow")
    with run_lease(cfg) as cfg:  # one writer per run: a second flow run on it fails here
        if more_iterations:
            cfg = with_overrides(cfg, iterations=finished_iterations(cfg) + more_iterations)
        config_json = cfg.model_dump_json()
        logs.log_config(cfg)
        preflight(config_json)

        store = open_store(cfg)
        initial_policy = cfg.model.policy
        reference = cfg.model.reference or initial_policy
        eval_prompts = load_eval_prompts(config_json, 0)
        checkpoints, summaries = [initial_policy], []  # checkpoints[j]: the policy after iteration j

        def sample_and_label(k: int) -> dict:
            """Iteration k's labelled samples, from the checkpoint `lead` iterations before the latest one."""
            sampler = max(0, k - 1 - lead)
            prompts = load_prompts(config_json, k)
            generations = generate(config_json, prompts, checkpoints[sampler], k, policy_iteration=sampler)
            # annotation.cascade.refresh: the reward models fine-tuned on the escalated labels so far label this one
            reward_models = refresh_reward_models(config_json, k) if refreshes(cfg, k) else None
            annotations = annotate(config_json, generations, k, reward_models)
            return {"prompts": prompts, "generations": generations, "annotations": annotations,
                    **({"reward_models": reward_models} if reward_models else {})}

        # scale_out.schedule async: while iteration k trains, iterations k+1..k+lead sample and label (in order, on
        # one thread of this flow run, their stages dispatched to their workers); sync: lead 0, one after another.
        lead = cfg.scale_out.lead
        with ahead_of_training(sample_and_label, lead, cfg.iterations) as labelled:
            for k in range(1, cfg.iterations + 1):
                policy = checkpoints[k - 1]
                samples = labelled(k)
                round_data = units_and_weights(config_json, policy, k, generations_uri=samples["generations"],
                                               annotations_uri=samples["annotations"])
                checkpoint = train(config_json, round_data["units"], round_data["weights"], policy, reference, k)
                checkpoints.append(checkpoint)
                stages = {**samples, **round_data, "checkpoint": checkpoint,
                          "metrics": store.stage_uri(cfg.store.run_name, k, "metrics")}
                if cfg.evaluation.enabled:
                    stages["evaluation"] = evaluate_policy(config_json, eval_prompts, checkpoint, policy,
                                                           initial_policy, k)
                summaries.append(report_iteration(config_json, k, stages))
                if cfg.tracking.report_to:
                    track_iteration(config_json, k)
                logs.log_iteration(cfg, summaries)
        return summaries


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_cli("Run the online iterative-dpo pipeline in ephemeral Prefect.", argv, prog)
    logs.configure(args.log_level, args.progress)
    with cli_run(args) as config:
        summaries = iterative_dpo(config=config, more_iterations=args.more_iterations)
    print_summary(config, summaries)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's seconds-long teardown
