from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from alignment_core import pipeline
from tasks import artifact_key, parse, stage_task


@stage_task("generate")
def generate(config_json: str, prompts_uri: str, policy_uri: str, iteration: int) -> str:
    cfg = parse(config_json)
    if cfg.scale_out.generate_deployment:
        return dispatch_stage(cfg.scale_out.generate_deployment, cfg.scale_out.timeout_s, iteration, {
            "config_json": config_json, "prompts_uri": prompts_uri, "policy_uri": policy_uri, "iteration": iteration,
        })
    progress = create_progress_artifact(0.0, key=artifact_key(cfg.store.run_name, "generate-progress"),
                                        description=f"generation, iteration {iteration}")
    return pipeline.generate(cfg, prompts_uri, policy_uri, iteration,
                             progress=lambda done, total: update_progress_artifact(progress, 100.0 * done / total))


def dispatch_stage(deployment: str, timeout_s: float, iteration: int, parameters: dict) -> str:
    """Run a stage as its own deployed flow (e.g. on a GPU work pool) and return its output URI.

    The idempotency key names this flow run and its attempt, so a retry dispatches afresh while a
    duplicate submission of the same attempt does not; the stage flow itself skips finished shards.
    """
    run = run_deployment(
        deployment, parameters=parameters, timeout=timeout_s, as_subflow=True,
        idempotency_key=f"{flow_run.get_id()}-{flow_run.get_run_count()}-{deployment}-{iteration}",
    )
    if not run.state.is_completed():
        raise RuntimeError(f"stage deployment {deployment!r} ended {run.state.name}: {run.state.message}")
    return run.state.result(raise_on_failure=True)
