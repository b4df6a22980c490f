from alignment_core import pipeline
from tasks import parse, stage_task


@stage_task("annotate")
def annotate(config_json: str, generations_uri: str, iteration: int) -> str:
    return pipeline.annotate(parse(config_json), generations_uri, iteration)
