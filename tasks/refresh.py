from alignment_core import refresh
from tasks import gpu_slot, parse, stage_task


@stage_task("refresh-reward-models", retries=1)
def refresh_reward_models(config_json: str, iteration: int) -> str:
    """Fine-tune the cascade's reward models on the escalated labels before `iteration` (in-process: a train
    deployment is not used for it)."""
    cfg = parse(config_json)
    with gpu_slot(cfg, "train"):
        return refresh.refresh_reward_models(cfg, iteration)
