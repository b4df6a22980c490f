from alignment_core import pipeline
from tasks import parse, stage_task
from tasks.dispatch import gpu_slot


@stage_task("refresh-reward-models", retries=1)
def refresh_reward_models(config_json: str, iteration: int) -> str:
    """Fine-tune the cascade's reward models on the escalated labels before `iteration` (in-process: a train
    deployment is not used for it)."""
    cfg = parse(config_json)
    with gpu_slot(cfg, "reward_models"):
        return pipeline.refresh_reward_models(cfg, iteration)
