"""The GPU stages as flows of their own, for deployment on a GPU work pool (scale-out).

The orchestrating flow calls them through `run_deployment` when `scale_out.generate_deployment` /
`scale_out.train_deployment` name them (see tasks/generate.py): a Kubernetes or multi-machine setup
changes config and deployments, not code. Each returns its output URI, like the in-process task.
The orchestrating flow's config carries its run lease token: a stage flow writes under that lease (it checks
the lease is still live) instead of taking one, so it never collides with the flow that dispatched it.
"""

from prefect import flow

from alignment_core import pipeline
from alignment_core.config import PipelineConfig
from flows.common import run_lease


def _local(config_json: str) -> PipelineConfig:
    """The stage runs here: it must not dispatch itself again."""
    cfg = PipelineConfig.model_validate_json(config_json)
    return cfg.model_copy(update={"scale_out": cfg.scale_out.model_copy(
        update={"generate_deployment": None, "train_deployment": None})})


@flow(name="generate-stage", flow_run_name="generate-iter-{iteration}")
def generate_stage(config_json: str, prompts_uri: str, policy_uri: str, iteration: int) -> str:
    with run_lease(_local(config_json)) as cfg:  # the orchestrator's lease, verified; or one of its own
        return pipeline.generate(cfg, prompts_uri, policy_uri, iteration)


@flow(name="train-stage", flow_run_name="train-iter-{iteration}")
def train_stage(config_json: str, units_uri: str, weights_uri: str, policy_uri: str, reference_uri: str,
                iteration: int) -> str:
    with run_lease(_local(config_json)) as cfg:  # the orchestrator's lease, verified; or one of its own
        return pipeline.train(cfg, units_uri, weights_uri, policy_uri, reference_uri, iteration)
