"""Where a stage's body runs: dispatched to its deployment's flow runs (fan-out, crashed workers started again),
or here, holding a slot of the GPU concurrency limit."""

import time
from collections.abc import Callable
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from alignment_core.config import PipelineConfig
from alignment_core.stages import STAGES


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
    # One deployment writes more than one stage (generate-stage: the generations and the held-out samples): the
    # output's folder is part of the key, and of the name where it is not the deployment's own stage.
    folder = output.rstrip("/").rsplit("/", 1)[-1]
    key = f"{flow_run.get_id()}-{flow_run.get_run_count()}-{deployment}-{iteration}-{folder}"
    stage = deployment.split("/", 1)[0].removesuffix("-stage")
    if folder not in OWN_OUTPUT.get(stage, ()):
        stage = f"{stage}-{folder.replace('_', '-')}"
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
# The stage each stage flow writes by default (its flow runs are named after the flow alone).
OWN_OUTPUT = {"generate": ("generations",), "annotate": ("annotations",), "train": ("checkpoint",)}


def uses_gpu(cfg: PipelineConfig, stage: str) -> bool:
    """Whether a stage's body runs a model here (what a GPU concurrency slot is for): its row of the stage
    table (alignment_core/stages.py)."""
    return STAGES[stage].runs_model(cfg)


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
