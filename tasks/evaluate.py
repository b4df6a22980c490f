from alignment_core import pipeline
from tasks import parse, stage_task


@stage_task("evaluate")
def evaluate(config_json: str, eval_prompts_uri: str, policy_uri: str, previous_policy_uri: str,
             initial_policy_uri: str, iteration: int) -> str:
    return pipeline.evaluate(parse(config_json), eval_prompts_uri, policy_uri, previous_policy_uri,
                             initial_policy_uri, iteration)
