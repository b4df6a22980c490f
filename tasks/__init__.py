"""Prefect tasks: one module per stage, each a thin wrapper over `alignment_core.pipeline`.

Tasks take plain values (the config as JSON, URIs, numbers) and return their output URI. Caching is left to
the store: every stage checks its manifest first and returns at once when it is complete, so a retried or
re-run flow redoes no finished work even when Prefect's database is gone. Prefect's own result cache is
off on purpose: a cached URI could point at a store that was cleaned since.
"""

import logging
import re

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from alignment_core.config import PipelineConfig
from alignment_core.preflight import is_transient


def _route_library_logs_to_prefect() -> None:
    """The library logs through `logging.getLogger("alignment_core...")`; give that logger the handlers
    Prefect sets up for extra loggers (console + the run's log in the UI), as PREFECT_LOGGING_EXTRA_LOGGERS
    would, so stage lines ("already complete, skipped", load reports, warnings) show in every run."""
    library = logging.getLogger("alignment_core")
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in library.handlers:
            library.addHandler(handler)
    library.setLevel(logging.INFO)


_route_library_logs_to_prefect()


def stage_task(name: str, retries: int = 2):
    """A stage task: named `{stage}-iter-{k}` in the UI, retried with backoff on transient failures only.

    A deterministic failure (a missing file, a bad config, a schema mismatch) fails the same way on every
    try, so it fails at once instead of three times with three tracebacks.
    """
    return task(
        name=name,
        task_run_name=name + "-iter-{iteration}",
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=[5, 30],
        retry_condition_fn=retry_if_transient,
        persist_result=False,
    )


def retry_if_transient(task, task_run, state) -> bool:
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


def parse(config_json: str) -> PipelineConfig:
    return PipelineConfig.model_validate_json(config_json)


def artifact_key(*parts) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


def dispatch_stage(deployment: str, timeout_s: float, iteration: int, parameters: dict) -> None:
    """Run a stage as its own deployed flow (e.g. on a GPU work pool) and wait for it to complete.

    The idempotency key names this flow run and its attempt, so a retry dispatches afresh while a
    duplicate submission of the same attempt does not; the stage flow itself skips finished shards.
    Its output is found where the store layout puts it, not through Prefect's result storage.
    """
    run = run_deployment(
        deployment, parameters=parameters, timeout=timeout_s, as_subflow=True,
        idempotency_key=f"{flow_run.get_id()}-{flow_run.get_run_count()}-{deployment}-{iteration}",
    )
    if not run.state.is_completed():
        raise RuntimeError(f"stage deployment {deployment!r} ended {run.state.name}: {run.state.message}")
