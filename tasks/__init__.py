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
from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
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
