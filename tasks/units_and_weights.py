from alignment_core import pipeline
from tasks import parse, stage_task


@stage_task("units-and-weights")
def units_and_weights(
    config_json: str, policy_uri: str, iteration: int, examples_uri: str | None = None,
    generations_uri: str | None = None, annotations_uri: str | None = None,
) -> dict[str, str]:
    """Training units of the round (from examples or annotated generations) and their per-sample weights."""
    cfg = parse(config_json)
    units = pipeline.build_units(cfg, iteration, examples_uri=examples_uri, generations_uri=generations_uri,
                                 annotations_uri=annotations_uri)
    return {"units": units, "weights": pipeline.reweight(cfg, units, policy_uri, iteration)}
