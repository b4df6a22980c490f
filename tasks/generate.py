from alignment_core import pipeline
from tasks import artifact_key, parse, stage_task
from tasks.dispatch import dispatch_stage, gpu_slot
from tasks.report import ui_progress


@stage_task("generate")
def generate(config_json: str, prompts_uri: str, policy_uri: str, iteration: int,
             stage: str = "generations", policy_iteration: int | None = None) -> str:
    """Sample the policy's responses to the prompts: the iteration's `generations`, or the held-out
    `eval_generations` an evaluation judges. `policy_iteration`: the iteration whose checkpoint the policy is
    (0: the initial policy), recorded on each generation row with its staleness."""
    cfg = parse(config_json)
    scale_out = cfg.scale_out
    if scale_out.generate_deployment:
        store = pipeline.open_store(cfg)
        out = store.stage_uri(cfg.store.run_name, iteration, stage)
        return dispatch_stage(scale_out.generate_deployment, scale_out.timeout_s, iteration, {
            "config_json": config_json, "prompts_uri": prompts_uri, "policy_uri": policy_uri, "iteration": iteration,
            "stage": stage, "policy_iteration": policy_iteration,
        }, out, complete=lambda: store.read_manifest(out) is not None, workers=scale_out.generate_workers,
            max_redispatches=scale_out.max_redispatches)
    progress = ui_progress(artifact_key(cfg.store.run_name, "generate-progress"),
                           f"{stage.replace('_', ' ')}, iteration {iteration}")
    with gpu_slot(cfg, stage):
        return pipeline.generate(cfg, prompts_uri, policy_uri, iteration, stage=stage, progress=progress,
                                 policy_iteration=policy_iteration)
