from alignment_core import pipeline
from tasks import parse, stage_task


@stage_task("load-prompts")
def load_prompts(config_json: str, iteration: int) -> str:
    return pipeline.load_prompts(parse(config_json), iteration)


@stage_task("load-eval-prompts")
def load_eval_prompts(config_json: str, iteration: int = 0) -> str:
    return pipeline.load_eval_prompts(parse(config_json))


@stage_task("load-examples")
def load_examples(config_json: str, iteration: int = 0) -> str:
    return pipeline.load_examples(parse(config_json))
