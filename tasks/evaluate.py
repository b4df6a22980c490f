from alignment_core import pipeline
from tasks import parse, stage_task


@stage_task("evaluate")
def evaluate(config_json: str, eval_prompts_uri: str, policy_uri: str, previous_policy_uri: str,
             initial_policy_uri: str, iteration: int) -> str:
    return pipeline.evaluate(parse(config_json), eval_prompts_uri, policy_uri, previous_policy_uri,
                             initial_policy_uri, iteration)


@stage_task("evaluate-reward-model")
def evaluate_reward_model(config_json: str, examples_uri: str, checkpoint_uri: str, iteration: int) -> str:
    cfg = parse(config_json)
    heldout = pipeline.heldout_examples_uri(pipeline.open_store(cfg), examples_uri)
    return pipeline.evaluate_reward_model(cfg, heldout, checkpoint_uri, iteration)
