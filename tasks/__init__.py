"""Prefect tasks: one module per stage, each a thin wrapper over `alignment_core.pipeline`.

Tasks take plain values (the config as JSON, URIs, numbers) and return their output URI. Caching is left to
the store: every stage checks its manifest first and returns at once when it is complete, so a retried or
re-run flow redoes no finished work even when Prefect's database is gone. Prefect's own result cache is
off on purpose: a cached URI could point at a store that was cleaned since.
"""

import functools
import inspect
import logging
import re
import time
from collections.abc import Callable
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.utilities.timeout import timeout

from alignment_core.config import PipelineConfig
from alignment_core.preflight import is_transient
from alignment_core.redact import install_log_redaction


def _route_library_logs_to_prefect() -> None:
    """The library logs through `logging.getLogger("alignment_core...")`; send those records to the run's log in
    the UI too (as PREFECT_LOGGING_EXTRA_LOGGERS would), so stage lines ("already complete, skipped", load
    reports, warnings) show in every run. Outside a run (a notebook, a test, a helper thread) there is no run
    log to send to: those records only reach the console."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class InARun(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return FlowRunContext.get() is not None or TaskRunContext.get() is not None

    library = logging.getLogger("alignment_core")
    if not any(isinstance(handler, APILogHandler) for handler in library.handlers):
        handler = APILogHandler()
        handler.addFilter(InARun())
        library.addHandler(handler)
    library.setLevel(logging.INFO)


_route_library_logs_to_prefect()
install_log_redaction()  # every log line of a flow or stage run, wherever it goes, with its secrets masked


class StageDeadlineExceeded(RuntimeError):
    """A stage task still running at `scale_out.stage_deadline_s`. Not transient: a retry would get a whole new
    deadline. The shards the stage finished are kept, so a rerun continues from them."""


class _DeadlinePassed(TimeoutError):
    """Raised into the stage body by Prefect's timeout scope (which takes only TimeoutErrors) at the deadline;
    its own class, so a TimeoutError of the body itself (a network timeout) stays transient."""


def stage_task(name: str, retries: int = 2):
    """A stage task: named `{stage}-iter-{k}` in the UI, retried with backoff on transient failures only, and
    held to `scale_out.stage_deadline_s` when the config sets one.

    A deterministic failure (a missing file, a bad config, a schema mismatch) fails the same way on every
    try, so it fails at once instead of three times with three tracebacks.
    """
    def decorate(body: Callable) -> Callable:
        @functools.wraps(body)
        def within_deadline(*args, **kwargs):
            arguments = inspect.signature(body).bind(*args, **kwargs).arguments
            config_json = arguments.get("config_json")  # (a stage task without a config has no deadline)
            deadline = parse(config_json).scale_out.stage_deadline_s if config_json is not None else None
            try:
                with timeout(deadline, timeout_exc_type=_DeadlinePassed):
                    return body(*args, **kwargs)
            except _DeadlinePassed:
                raise StageDeadlineExceeded(
                    f"stage {name} (iteration {arguments.get('iteration')}) did not finish within its deadline of "
                    f"{deadline:g} s (scale_out.stage_deadline_s); the shards it finished are kept: re-run to "
                    "continue from them, or raise the deadline") from None

        return task(
            name=name,
            task_run_name=name + "-iter-{iteration}",
            cache_policy=NO_CACHE,
            retries=retries,
            retry_delay_seconds=[5, 30],
            retry_condition_fn=retry_if_transient,
            persist_result=False,
        )(within_deadline)

    return decorate


def retry_if_transient(task, task_run, state) -> bool:
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


def parse(config_json: str) -> PipelineConfig:
    return PipelineConfig.model_validate_json(config_json)


def artifact_key(*parts) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


def dispatch_stage(deployment: str, timeout_s: float, iteration: int, parameters: dict, output: str,
                   complete: Callable[[], bool], *, max_redispatches: int, workers: int = 1) -> str:
    """Run a stage as flow runs of its deployment (e.g. on a GPU work pool) and wait until all have completed.

    `workers` > 1 fans the stage out: that many flow runs, started together, worker i with
    `shard_subset=[i, workers]` (it writes shards i, i+workers, ...; alignment_core/fanout.py); the last one to
    finish writes the manifest. A flow run that fails is retried by Prefect (the stage flows have flow retries),
    but one whose process or machine died is left Crashed (the process that would retry it is gone): such a
    worker is started again here, at most `max_redispatches` times (scale_out.max_redispatches: every caller
    passes it, no default to fall back on silently), and redoes only its missing shards. Any
    other end (Failed after its retries, Cancelled) fails the stage. When every worker completed but
    `complete()` says the stage is not (a shard missing), one more flow run without a subset finishes it.
    Returns `output` (the stage's URI) once `complete()`; raises if it never is.

    The idempotency keys name this flow run, its attempt, the worker and its dispatch, so a retry of the
    calling task dispatches afresh while a duplicate submission of the same dispatch does not; the stage flows
    themselves skip finished shards. Outputs are found where the store layout puts them, not through
    Prefect's result storage.
    """
    logger = get_run_logger()
    key = f"{flow_run.get_id()}-{flow_run.get_run_count()}-{deployment}-{iteration}"
    stage = deployment.split("/", 1)[0].removesuffix("-stage")
    deadline = time.monotonic() + timeout_s

    def start(worker: int | None, dispatch: int) -> FlowRun:
        extra, label = {}, ""
        if worker is not None:
            extra, label = {"shard_subset": [worker, workers]}, f"-worker-{worker}-of-{workers}"
        return run_deployment(
            deployment, parameters={**parameters, **extra}, timeout=0, as_subflow=True,
            flow_run_name=f"{stage}-iter-{iteration}{label}" + (f"-again-{dispatch}" if dispatch else ""),
            idempotency_key=f"{key}{label}-{dispatch}",
        )

    def wait(runs: dict) -> None:
        """Poll the runs (worker -> [flow run, dispatches]) until each completed; restart crashed ones."""
        with get_client(sync_client=True) as client:
            while runs:
                for worker, (run, dispatches) in list(runs.items()):
                    state = client.read_flow_run(run.id).state
                    if state is None or not state.is_final():
                        continue
                    if state.is_completed():
                        del runs[worker]
                    elif state.is_crashed() and dispatches < max_redispatches:
                        logger.warning("%s (flow run %s) crashed: %s; starting it again (%d of at most %d)",
                                       run.name, run.id, state.message, dispatches + 1, max_redispatches)
                        runs[worker] = [start(worker, dispatches + 1), dispatches + 1]
                    else:
                        raise RuntimeError(f"stage deployment {deployment!r}: flow run {run.name} ({run.id}) ended "
                                           f"{state.name}: {state.message}")
                if runs and time.monotonic() > deadline:
                    raise RuntimeError(f"stage deployment {deployment!r}: flow runs "
                                       f"{', '.join(r.name for r, _ in runs.values())} not finished after "
                                       f"{timeout_s:.0f} s (scale_out.timeout_s)")
                if runs:
                    time.sleep(POLL_S)

    subsets = [None] if workers <= 1 else list(range(workers))
    runs = {worker: [start(worker, 0), 0] for worker in subsets}
    logger.info("started %s on %s", ", ".join(run.name for run, _ in runs.values()), deployment)
    wait(runs)
    done = complete()
    if workers > 1 and not done:
        logger.warning("every %s worker completed, yet the stage is not complete: one more flow run finishes it",
                       stage)
        wait({None: [start(None, 1), max_redispatches]})
        done = complete()
    if not done:
        raise RuntimeError(f"stage deployment {deployment!r} completed but {output} is not complete")
    return output


# How often the orchestrating task asks the Prefect API for the state of the flow runs it dispatched.
POLL_S = 2.0


def uses_gpu(cfg: PipelineConfig, stage: str) -> bool:
    """Whether a stage's body runs a model here (what a GPU concurrency slot is for)."""
    if stage != "annotate":
        return True
    annotation = cfg.annotation
    return "reward_model" in annotation.kinds or bool(annotation.judge_kind and annotation.judge.backend != "http")


@contextmanager
def gpu_slot(cfg: PipelineConfig, stage: str):
    """Hold a slot of the Prefect global concurrency limit `scale_out.concurrency_limit` around a GPU stage body.

    Two pipelines (or two fan-out workers) that share GPUs then queue for them instead of oversubscribing them.
    The limit must exist (`prefect gcl create gpu --limit 1`): a missing one fails the stage, it does not
    silently run unlimited. Only where the body runs: a task that dispatches the stage to a deployment holds
    no slot (its flow runs take theirs).
    """
    name = cfg.scale_out.concurrency_limit
    if not name or not uses_gpu(cfg, stage):
        yield
        return
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    logger.info("waiting for a slot of the global concurrency limit %r", name)
    try:
        with concurrency(name, occupy=1, strict=True):
            logger.info("holding a slot of %r", name)
            yield
    except ConcurrencySlotAcquisitionError as error:
        raise RuntimeError(f"scale_out.concurrency_limit {name!r}: {error}. Create the limit first: "
                           f"prefect gcl create {name} --limit <GPUs>") from error
