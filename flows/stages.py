"""The GPU stages as flows of their own, for deployment on a GPU work pool (scale-out).

The orchestrating flow calls them through `run_deployment` when `scale_out.generate_deployment` /
`scale_out.train_deployment` name them (see tasks/generate.py): a Kubernetes or multi-machine setup
changes config and deployments, not code. Each returns its output URI, like the in-process task.
"""

from prefect import flow

from alignment_core import pipeline
from alignment_core.config import PipelineConfig


def _local(config_json: str) -> PipelineConfig:
    """The stage runs here: it must not dispatch itself again."""
    cfg = PipelineConfig.model_validate_json(config_json)
    return cfg.model_copy(update={"scale_out": cfg.scale_out.model_copy(
        update={"generate_deployment": None, "train_deployment": None})})


@flow(name="generate-stage", flow_run_name="generate-iter-{iteration}")
def generate_stage(config_json: str, prompts_uri: str, policy_uri: str, iteration: int) -> str:
    return pipeline.generate(_local(config_json), prompts_uri, policy_uri, iteration)


@flow(name="train-stage", flow_run_name="train-iter-{iteration}")
def train_stage(config_json: str, units_uri: str, weights_uri: str, policy_uri: str, reference_uri: str,
                iteration: int) -> str:
    return pipeline.train(_local(config_json), units_uri, weights_uri, policy_uri, reference_uri, iteration)
