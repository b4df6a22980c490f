from alignment_core import pipeline
from tasks import parse, stage_task
from tasks.dispatch import dispatch_stage, gpu_slot
from tasks.human import form_in_the_ui


@stage_task("annotate")
def annotate(config_json: str, generations_uri: str, iteration: int, reward_models_uri: str | None = None) -> str:
    cfg = parse(config_json)
    scale_out = cfg.scale_out
    if scale_out.annotate_deployment:
        store = pipeline.open_store(cfg)
        out = store.stage_uri(cfg.store.run_name, iteration, "annotations")
        return dispatch_stage(scale_out.annotate_deployment, scale_out.timeout_s, iteration, {
            "config_json": config_json, "generations_uri": generations_uri, "iteration": iteration,
            "reward_models_uri": reward_models_uri,
        }, out, complete=lambda: store.read_manifest(out) is not None, workers=scale_out.annotate_workers,
            max_redispatches=scale_out.max_redispatches)
    with gpu_slot(cfg, "annotations"):
        # a human annotator pauses the flow run from here with its form (tasks/human.py)
        return pipeline.annotate(cfg, generations_uri, iteration, ask=form_in_the_ui(cfg),
                                 reward_models_uri=reward_models_uri)
