from alignment_core import pipeline
from tasks import artifact_key, parse, stage_task
from tasks.dispatch import dispatch_stage, gpu_slot
from tasks.report import ui_progress


@stage_task("train", retries=1)
def train(config_json: str, units_uri: str, weights_uri: str, policy_uri: str, reference_uri: str,
          iteration: int) -> str:
    cfg = parse(config_json)
    if cfg.scale_out.train_deployment:
        store = pipeline.open_store(cfg)
        checkpoint = store.checkpoint_uri(cfg.store.run_name, iteration)
        return dispatch_stage(cfg.scale_out.train_deployment, cfg.scale_out.timeout_s, iteration, {
            "config_json": config_json, "units_uri": units_uri, "weights_uri": weights_uri,
            "policy_uri": policy_uri, "reference_uri": reference_uri, "iteration": iteration,
        }, checkpoint, complete=lambda: store.checkpoint_complete(checkpoint),
            max_redispatches=cfg.scale_out.max_redispatches)
    progress = ui_progress(artifact_key(cfg.store.run_name, "train-progress"), f"training, iteration {iteration}")
    with gpu_slot(cfg, "checkpoint"):
        return pipeline.train(cfg, units_uri, weights_uri, policy_uri, reference_uri, iteration,
                              progress=lambda step, total, metrics: progress(step, total))
