"""The GPU stages as flows of their own, for deployment on a GPU work pool (scale-out).

The orchestrating flow calls them through `run_deployment` when `scale_out.generate_deployment` /
`scale_out.annotate_deployment` / `scale_out.train_deployment` name them (see tasks/generate.py): a Kubernetes or
multi-machine setup changes config and deployments, not code. Each returns its output URI, like the in-process
task. With `scale_out.generate_workers` / `annotate_workers` N > 1 the orchestrator starts N flow runs of the
stage at once, each with `shard_subset=[i, N]` (tasks/dispatch.py: dispatch_stage, alignment_core/fanout.py).
GPU bodies hold a slot of `scale_out.concurrency_limit` (a Prefect global concurrency limit) while they run.
The orchestrating flow's config carries its run lease token: a stage flow writes under that lease (it checks
the lease is still live) instead of taking one, so it never collides with the flow that dispatched it.
"""

from prefect import flow
from prefect.runtime import flow_run

from alignment_core import pipeline
from alignment_core.config import PipelineConfig
from alignment_core.fanout import check_subset
from alignment_core.preflight import PreflightError, reach_problems
from flows.common import run_lease
from tasks.dispatch import gpu_slot
from tasks.human import form_in_the_ui


def _local(config_json: str) -> PipelineConfig:
    """The stage runs here: it must not dispatch itself again. Its deployment can be started on its own, with
    any config: what that config reaches is bounded here too (alignment_core.preflight.reach_problems)."""
    cfg = PipelineConfig.model_validate_json(config_json)
    refused = reach_problems(cfg)
    if refused:
        raise PreflightError(refused)
    return cfg.model_copy(update={"scale_out": cfg.scale_out.model_copy(update={
        "generate_deployment": None, "train_deployment": None, "annotate_deployment": None,
        "generate_workers": 1, "annotate_workers": 1})})


def _run_name(stage: str):
    def name() -> str:
        parameters = flow_run.parameters
        subset = parameters.get("shard_subset")
        return f"{stage}-iter-{parameters['iteration']}" + (f"-worker-{subset[0]}-of-{subset[1]}" if subset else "")
    return name


# A stage flow that raises is retried once by Prefect (a transient error: a network blip, a lost GPU); the retry
# redoes only the missing shards. A flow run whose process died is left Crashed instead: the orchestrating task
# (tasks/dispatch.py: dispatch_stage) starts it again.
@flow(name="generate-stage", flow_run_name=_run_name("generate"), retries=1, retry_delay_seconds=10)
def generate_stage(config_json: str, prompts_uri: str, policy_uri: str, iteration: int,
                   shard_subset: list[int] | None = None, stage: str = "generations",
                   policy_iteration: int | None = None) -> str:
    """Sample the iteration's generations (or, `stage` eval_generations, its held-out samples); `shard_subset`
    [i, N]: only fan-out worker i of N's shards; `policy_iteration`: the iteration whose checkpoint the policy is."""
    with run_lease(_local(config_json)) as cfg, gpu_slot(cfg, stage):
        return pipeline.generate(cfg, prompts_uri, policy_uri, iteration, stage=stage,
                                 shard_subset=check_subset(shard_subset), policy_iteration=policy_iteration)


@flow(name="annotate-stage", flow_run_name=_run_name("annotate"), retries=1, retry_delay_seconds=10)
def annotate_stage(config_json: str, generations_uri: str, iteration: int,
                   shard_subset: list[int] | None = None, reward_models_uri: str | None = None) -> str:
    """Label the iteration's generations; `shard_subset` [i, N]: only fan-out worker i of N's shards;
    `reward_models_uri`: the iteration's refreshed reward models (annotation.cascade.refresh)."""
    with run_lease(_local(config_json)) as cfg, gpu_slot(cfg, "annotations"):
        # a human annotator pauses this flow run with its form (tasks/human.py)
        return pipeline.annotate(cfg, generations_uri, iteration, shard_subset=check_subset(shard_subset),
                                 ask=form_in_the_ui(cfg), reward_models_uri=reward_models_uri)


@flow(name="train-stage", flow_run_name="train-iter-{iteration}")
def train_stage(config_json: str, units_uri: str, weights_uri: str, policy_uri: str, reference_uri: str,
                iteration: int) -> str:
    with run_lease(_local(config_json)) as cfg, gpu_slot(cfg, "checkpoint"):  # the orchestrator's lease, verified
        return pipeline.train(cfg, units_uri, weights_uri, policy_uri, reference_uri, iteration)
