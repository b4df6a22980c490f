"""Experiment trackers (TensorBoard, MLflow, W&B, trackio): one tracker run per pipeline run.

The Trainer is not hooked. A round already writes every step's metrics to its `metrics` stage and every
stage keeps its statistics in its manifest, so once an iteration is finished (and reported) it is read back
from the store and sent to the trackers named by `tracking.report_to`, through accelerate's tracker classes
used on their own (`accelerate.tracking`). The same code serves a run in one process, a resumed run and the
next scheduled iteration of a run (a new process).

Steps. Training steps are numbered across the whole run: local step s of iteration k is logged at

    global step = sum over the earlier iterations j of max(steps_j, 1)  +  s

and the iteration's summary (evaluation win-rates and rewards, annotation counts and failures, generation
and training tokens/s, weight statistics, `iteration` itself) is logged at the global step of the round's
last training step. A round that trained nothing (the policy carried over) still takes one step, so no two
iterations share a step.

Ledger: `{run}/tracking.json` in the store, beside the iterations:

    {"store_uri": "...", "steps": {"1": [1, 12], "2": [13, 24]},
     "trackers": {"mlflow": {"destination": {...}, "run_id": "…", "config_logged": true, "iterations": [1, 2]}}}

It holds each tracker's run id (MLflow's run id; the W&B id resumed with resume="allow"; TensorBoard writes
to the same folder), the iterations each tracker has received, and each iteration's global steps. An
iteration is recorded right after it was logged, so a resumed run never logs it again. A tracker whose
destination changed (another MLflow server or experiment, W&B project, TensorBoard folder) gets a new
tracker run and every finished iteration.

Failures: a tracker that fails (a server down, a full disk) is reported with its reason and does not fail
the finished iteration; it catches up, in order, at the next iteration. A misconfiguration (a package not
installed, nowhere to write) fails in the run's preflight (`tracking_problems`).
"""

import importlib.util
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass

from alignment_core.config import TRACKERS, PipelineConfig
from alignment_core.redact import redact
from alignment_core.store import ArtifactStore

log = logging.getLogger(__name__)

LEDGER = "tracking.json"
# The module each tracker imports (TensorBoard through torch.utils.tensorboard, which needs `tensorboard`).
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


@dataclass(frozen=True)
class Settings:
    """Where each tracker writes, resolved from the config, the store and the environment."""

    project: str
    run_name: str
    store_uri: str  # the run's folder in the store: where the Parquet shards are
    logging_dir: str | None  # a local folder, or None (remote store and no tracking.logging_dir)
    mlflow_tracking_uri: str | None
    mlflow_artifact_location: str | None


def settings(cfg: PipelineConfig, store: ArtifactStore | None = None) -> Settings:
    store = store or ArtifactStore.from_config(cfg.store)
    tc, run = cfg.tracking, cfg.store.run_name
    store_uri = store.run_uri(run)
    if tc.logging_dir:
        logging_dir = os.path.abspath(os.path.expanduser(tc.logging_dir.removeprefix("file://")))
    elif store.protocol in ("file", "local"):
        logging_dir = f"{store_uri}/tracking"
    else:
        logging_dir = None
    mlflow_uri = tc.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = None
    if not mlflow_uri and logging_dir:  # MLflow's own default is a database in the working directory
        mlflow_uri, artifacts = f"sqlite:///{logging_dir}/mlflow.db", f"{logging_dir}/mlartifacts"
    return Settings(project=tc.project or run, run_name=tc.run_name or run, store_uri=store_uri,
                    logging_dir=logging_dir, mlflow_tracking_uri=mlflow_uri, mlflow_artifact_location=artifacts)


def tracking_problems(cfg: PipelineConfig) -> list[str]:
    """What stops the configured trackers from working, one line each ([] when they can start)."""
    problems = []
    for name in cfg.tracking.report_to:
        if importlib.util.find_spec(MODULES[name]) is None:
            problems.append(f"tracking.report_to names {name!r} but its package is not installed: "
                            f"pip install {TRACKERS[name]}  (or pip install 'alignment-core[tracking]')")
    if cfg.tracking.report_to:
        s = settings(cfg)
        if "mlflow" in cfg.tracking.report_to and not s.mlflow_tracking_uri:
            problems.append("tracking: mlflow has nowhere to write with a remote store; set "
                            "tracking.mlflow_tracking_uri, MLFLOW_TRACKING_URI or tracking.logging_dir")
        if "tensorboard" in cfg.tracking.report_to and not s.logging_dir:
            problems.append("tracking.logging_dir must name a local folder for tensorboard with a remote store")
    return problems


# ---- the ledger ------------------------------------------------------------------------------------------
def ledger_uri(store: ArtifactStore, run: str) -> str:
    return f"{store.run_uri(run)}/{LEDGER}"


def read_ledger(store: ArtifactStore, run: str) -> dict:
    uri = ledger_uri(store, run)
    ledger = store.read_json(uri) if store.exists(uri) else {}
    ledger.setdefault("store_uri", store.run_uri(run))
    ledger.setdefault("steps", {})
    ledger.setdefault("trackers", {})
    return ledger


def write_ledger(store: ArtifactStore, run: str, ledger: dict) -> None:
    store.write_json(ledger_uri(store, run), ledger)


def round_steps(store: ArtifactStore, run: str, iteration: int) -> int | None:
    """Training steps of an iteration's round (0 when the policy was carried over); None if not trained."""
    manifest = store.read_manifest(store.stage_uri(run, iteration, "metrics"))
    if manifest is None:
        return None
    steps = manifest.get("extra", {}).get("steps")
    if steps is None and manifest["rows"]:
        steps = int(store.read_pandas(store.stage_uri(run, iteration, "metrics"))["step"].max())
    return int(steps or 0)


def step_span(store: ArtifactStore, run: str, ledger: dict, iteration: int) -> tuple[int, int]:
    """(first, last) global step of an iteration; fixed in the ledger the first time it is computed."""
    known = ledger["steps"].get(str(iteration))
    if known is not None:
        return int(known[0]), int(known[1])
    offset = sum(max(round_steps(store, run, j) or 0, 1) for j in range(1, iteration))
    earlier = [int(last) for k, (_, last) in ledger["steps"].items() if int(k) < iteration]
    offset = max([offset, *earlier])  # never behind a step already given out
    span = (offset + 1, offset + max(round_steps(store, run, iteration) or 0, 1))
    ledger["steps"][str(iteration)] = list(span)
    return span


# ---- what an iteration logs ------------------------------------------------------------------------------
def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _numbers(prefix: str, values: dict) -> dict[str, float]:
    """Numeric entries of a manifest's statistics under `prefix/`, one level of nesting flattened."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({f"{prefix}/{key}_{k}": n for k, v in value.items() if (n := _number(v)) is not None})
        elif (n := _number(value)) is not None:
            out[f"{prefix}/{key}"] = n
    return out


def iteration_summary(store: ArtifactStore, run: str, iteration: int) -> dict[str, float]:
    """The iteration's summary metrics, read from the stages' manifests (`eval/`, `annotation/`, ...)."""
    def extra(stage: str) -> dict | None:
        manifest = store.read_manifest(store.stage_uri(run, iteration, stage))
        return None if manifest is None else {"rows": manifest["rows"], **manifest.get("extra", {})}

    summary = {"iteration": float(iteration)}
    if (generations := extra("generations")) is not None:
        summary.update(_numbers("generation", {k: generations.get(k) for k in (
            "rows", "tokens_per_s", "generated_tokens", "skipped_prompts", "finish_reasons")}))
    if (annotations := extra("annotations")) is not None:
        summary.update(_numbers("annotation", annotations))
    if (weights := extra("weights")) is not None:
        summary.update(_numbers("reweight", weights))
    if (units := extra("units")) is not None:
        summary["train/units"] = float(units["rows"])
    if (evaluation := extra("evaluation")) is not None:
        summary.update(_numbers("eval", evaluation.get("summary", {})))
    return summary


def iteration_records(store: ArtifactStore, run: str, iteration: int, span: tuple[int, int]) -> list[tuple[int, dict]]:
    """(global step, metrics) in step order: every training step of the round, the summary at the last one."""
    first, last = span
    by_step: dict[int, dict[str, float]] = {}
    metrics_uri = store.stage_uri(run, iteration, "metrics")
    if store.read_manifest(metrics_uri) is not None:
        for row in store.read_pandas(metrics_uri).itertuples():
            if (value := _number(row.value)) is not None:
                by_step.setdefault(first - 1 + int(row.step), {})[f"{row.split}/{row.metric}"] = value
    by_step.setdefault(last, {}).update(iteration_summary(store, run, iteration))
    return sorted(by_step.items())


def config_params(cfg: PipelineConfig, store_uri: str) -> dict[str, str | int | float | bool]:
    """The whole config as flat dotted keys (the form every tracker takes), plus the run's store URI; secrets in
    them (a URL's password) masked."""
    params: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        elif prefix.endswith("token"):  # a lease token changes every flow run and is nobody's business
            return
        elif value is None or isinstance(value, list):
            params[prefix] = redact(json.dumps(value))
        else:
            params[prefix] = redact(value) if isinstance(value, str) else value

    walk("", cfg.model_dump(mode="json"))
    params["store_uri"] = redact(store_uri)
    return params


# ---- trackers --------------------------------------------------------------------------------------------
def destination(name: str, s: Settings) -> dict:
    """What identifies a tracker run's home: a change starts a new tracker run."""
    if name == "tensorboard":
        return {"logging_dir": f"{s.logging_dir}/tensorboard", "run_name": s.run_name}
    if name == "mlflow":
        return {"tracking_uri": s.mlflow_tracking_uri,
                "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME", s.project)}
    if name == "wandb":
        return {"project": os.environ.get("WANDB_PROJECT", s.project), "entity": os.environ.get("WANDB_ENTITY")}
    return {"project": s.project, "space_id": os.environ.get("TRACKIO_SPACE_ID")}  # trackio


def make_tracker(name: str, s: Settings, entry: dict):
    """An accelerate tracker continuing `entry`'s tracker run (a new one when it has no id yet)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker(s.run_name, f"{s.logging_dir}/tensorboard")
    if name == "mlflow":
        import mlflow

        mlflow.set_tracking_uri(s.mlflow_tracking_uri)
        return MLflowTracker(experiment_name=s.project, logging_dir=s.mlflow_artifact_location,
                             run_id=entry.get("run_id"), run_name=s.run_name,
                             tags={"alignment_core.store_uri": s.store_uri, "alignment_core.run": s.run_name})
    if name == "wandb":
        kwargs = {"dir": s.logging_dir} if s.logging_dir and not os.environ.get("WANDB_DIR") else {}
        if kwargs:
            os.makedirs(s.logging_dir, exist_ok=True)
        return WandBTracker(os.environ.get("WANDB_PROJECT", s.project), name=s.run_name, id=entry["run_id"],
                            resume="allow", notes=f"store: {s.store_uri}", **kwargs)
    return TrackioTracker(s.project, name=entry["run_id"], resume="allow")


def _tracker_run_id(name: str, tracker) -> str | None:
    if name == "mlflow":
        return tracker.tracker.info.run_id
    return None


def pending_iterations(store: ArtifactStore, run: str, entry: dict, iteration: int) -> list[int]:
    """Finished iterations up to `iteration` this tracker has not received, in order."""
    done = set(entry["iterations"])
    return [k for k in range(1, iteration + 1) if k not in done and round_steps(store, run, k) is not None]


def log_iteration(cfg: PipelineConfig, iteration: int) -> dict[str, str]:
    """Log iteration `iteration` (and any finished earlier one a tracker missed) to every configured tracker.

    Returns one line per tracker: what it logged, or why it failed (a failure is logged as a warning and
    does not raise: the iteration is finished and stays so; the tracker catches up next time).
    """
    if not cfg.tracking.report_to:
        return {}
    from accelerate import PartialState

    PartialState()  # accelerate's trackers log through accelerate's logger, which needs its state
    store = ArtifactStore.from_config(cfg.store)
    run, s = cfg.store.run_name, settings(cfg, store)
    ledger = read_ledger(store, run)
    report = {}
    for name in cfg.tracking.report_to:
        try:
            report[name] = _log_to(name, cfg, store, run, s, ledger, iteration)
        except Exception as error:  # an outage must not fail a finished iteration
            report[name] = f"failed: {type(error).__name__}: {error}"
            log.warning("tracker %s could not log iteration %d of %s (it catches up next time): %s",
                        name, iteration, run, report[name])
    return report


def _log_to(name: str, cfg: PipelineConfig, store: ArtifactStore, run: str, s: Settings, ledger: dict,
            iteration: int) -> str:
    where = destination(name, s)
    entry = ledger["trackers"].get(name)
    if entry is None or entry["destination"] != where:
        if entry is not None:
            log.warning("tracker %s: destination changed from %s to %s; starting a new tracker run",
                        name, entry["destination"], where)
        own_id = uuid.uuid4().hex[:12] if name == "wandb" else (s.run_name if name == "trackio" else None)
        entry = {"destination": where, "run_id": own_id, "config_logged": False, "iterations": []}
        ledger["trackers"][name] = entry
    pending = pending_iterations(store, run, entry, iteration)
    if not pending:
        return f"iteration {iteration} already logged"
    spans = {k: step_span(store, run, ledger, k) for k in pending}
    tracker = make_tracker(name, s, entry)
    tracker.start()
    try:
        entry["run_id"] = _tracker_run_id(name, tracker) or entry["run_id"]
        write_ledger(store, run, ledger)  # the run id first: a failure below continues this tracker run
        if not entry["config_logged"]:
            tracker.store_init_configuration(config_params(cfg, s.store_uri))
            entry["config_logged"] = True
            write_ledger(store, run, ledger)
        for k in pending:
            for step, values in iteration_records(store, run, k, spans[k]):
                tracker.log(values, step=step)
            entry["iterations"] = sorted({*entry["iterations"], k})
            write_ledger(store, run, ledger)
    finally:
        tracker.finish()
    return f"logged iterations {pending} at steps {spans[pending[0]][0]}-{spans[pending[-1]][1]}"
