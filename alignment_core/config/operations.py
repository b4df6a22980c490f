"""The config sections of where stages run (scale-out) and where metrics go (trackers)."""

from typing import Any, Literal

from pydantic import Field, model_validator

from alignment_core.config.common import StrictModel

__all__ = [  # what the package re-exports
    "ScaleOutConfig",
    "TRACKERS",
    "TrackingConfig",
]


class ScaleOutConfig(StrictModel):
    """Run the GPU stages as their own deployed flows (e.g. on a GPU work pool); None runs them in-process."""

    generate_deployment: str | None = None
    """e.g. `generate-stage/gpu`"""
    train_deployment: str | None = None
    """e.g. `train-stage/gpu`"""
    timeout_s: float = Field(default=6 * 3600, gt=0)
    """Seconds to wait for a dispatched stage flow."""
    stage_deadline_s: float | None = Field(default=None, gt=0)
    """An overall deadline for each stage task, in seconds (None: none): a stage still running then fails with
    an error naming it and the deadline, and is not retried (a retry would get a whole new deadline); the
    shards it finished are kept, so a rerun continues from them."""
    annotate_deployment: str | None = None
    """e.g. `annotate-stage/gpu`: for annotators that run a model here (reward model, local or vLLM judge)."""
    generate_workers: int = Field(default=1, gt=0, le=1024)
    """Fan-out: the generate stage's shards split across this many flow runs of `generate_deployment`, started
    together (worker i samples shards i, i+N, ...); the rows are the same as one worker's."""
    annotate_workers: int = Field(default=1, gt=0, le=1024)
    """Fan-out of the annotate stage across flow runs of `annotate_deployment`, as for generate_workers."""
    max_redispatches: int = Field(default=2, ge=0)
    """A worker's flow run that crashed (its process or machine died; Prefect does not retry those) is started
    again, at most this many times per worker; it redoes only its missing shards."""
    concurrency_limit: str | None = None
    """A Prefect global concurrency limit (e.g. "gpu", made with `prefect gcl create gpu --limit 1`) whose slot every
    GPU stage body holds while it runs, in-process or dispatched: pipelines sharing GPUs queue instead of
    oversubscribing them."""
    schedule: Literal["sync", "async"] = "sync"
    """sync: iteration k samples from the checkpoint of iteration k-1, after it is trained. async: iteration k
    samples from the checkpoint of iteration k-1-max_staleness (the initial policy before there is one), so the
    next iterations' generate and annotate run on their workers while this one trains. Needs generate_deployment
    or train_deployment: stages colocated on one device stay synchronous."""
    max_staleness: int = Field(default=1, ge=1, le=64)
    """async: how many checkpoints behind the latest one an iteration's samples may come from (each generation
    row records its policy's iteration and its staleness)."""
    keep_models_loaded: bool = True
    """The stages this process runs itself keep the models they load for the ones after them (the reward model,
    the reference, the policy a round starts from, the new checkpoint that evaluation and the next sampling
    read), within a quarter of the machine's memory, in host memory between stages on a GPU
    (alignment_core/kept_models.py). Sync schedule only. false: each stage loads its models and frees them."""

    @model_validator(mode="after")
    def _workers_need_a_deployment(self) -> "ScaleOutConfig":
        for stage in ("generate", "annotate"):
            if getattr(self, f"{stage}_workers") > 1 and not getattr(self, f"{stage}_deployment"):
                raise ValueError(f"{stage}_workers > 1 fans the {stage} stage out over flow runs of "
                                 f"{stage}_deployment: set it (e.g. {stage}-stage/gpu)")
        if self.schedule == "async" and not (self.generate_deployment or self.train_deployment):
            raise ValueError("schedule 'async' overlaps sampling with training on other workers: set "
                             "generate_deployment or train_deployment (e.g. generate-stage/gpu); stages colocated on "
                             "one device stay synchronous (schedule: sync)")
        return self

    @property
    def lead(self) -> int:
        """How many iterations ahead of the one training the sampling may run: max_staleness when async."""
        return self.max_staleness if self.schedule == "async" else 0


# Experiment trackers (driven through accelerate's tracker classes) and the pip package each one needs.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


class TrackingConfig(StrictModel):
    """Experiment trackers: one tracker run per pipeline run, fed from the store after each iteration.

    Part of no stage's fingerprint: turning a tracker on or off redoes no work. Credentials never go here:
    they come from the environment (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY,
    HF_TOKEN), as each tracker reads them. Whether a tracker's package is installed is checked when a flow
    starts (its preflight: alignment_core.tracking.tracking_problems), not here: stage workers never track.
    """

    report_to: list[str] = []
    """any of tensorboard, mlflow, wandb, trackio; "none" or [] for no tracker"""
    project: str | None = None
    """MLflow experiment, W&B / trackio project; default: store.run_name"""
    run_name: str | None = None
    """the tracker run's name; default: store.run_name"""
    logging_dir: str | None = None
    """A local folder: TensorBoard event files, the default MLflow database, W&B's files. Default: the run's folder
    + /tracking when the store is local (required for tensorboard when the store is remote)."""
    mlflow_tracking_uri: str | None = None
    """default: MLFLOW_TRACKING_URI, else sqlite:///{logging_dir}/mlflow.db"""

    @model_validator(mode="before")
    @classmethod
    def _known_trackers(cls, data: Any) -> Any:
        if isinstance(data, dict) and "report_to" in data:
            names = data["report_to"]
            names = [] if names in (None, "none") else [names] if isinstance(names, str) else names
            if isinstance(names, list):
                unknown = [n for n in names if n not in TRACKERS]
                if unknown:
                    raise ValueError(f"unknown tracker {unknown[0]!r} in report_to; known: {', '.join(TRACKERS)}")
                data = {**data, "report_to": list(dict.fromkeys(names))}
        if isinstance(data, dict) and "://" in str(data.get("logging_dir") or "").removeprefix("file://"):
            raise ValueError(f"logging_dir must be a local folder, got {data['logging_dir']!r}")
        return data
