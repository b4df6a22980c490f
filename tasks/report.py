"""A run's Prefect artifacts: a handful per flow run, each under a stable key and updated every iteration.

    {run}-summary           markdown: the verdict first, then the latest iteration's numbers by stage, its outputs
    {run}-evaluation        markdown: the learning plot, embedded (a data: URI PNG, which the UI's markdown renders)
    {run}-evaluation-table  table: the evaluation's numbers, one column per iteration
    {run}-metrics           table: every iteration's summary numbers, one column per iteration (flows/logs.py)
    {run}-samples           table: sample generations of the latest iteration with their annotations
    {run}-config            markdown: the run's config as YAML (flows/logs.py)
    {run}-generate-progress, {run}-train-progress: the running stage's progress (tasks/generate.py, train.py)

The figure is embedded rather than linked: a `file://` link is blocked by browsers and names a file on the
worker, wherever that is; a data URI travels with the artifact to any UI.
"""

import base64
import math
import time
from collections.abc import Callable
from uuid import UUID

from prefect import task
from prefect.artifacts import Artifact, MarkdownArtifact, ProgressArtifact, TableArtifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.runtime import flow_run

from alignment_core import pipeline
from alignment_core.inspect import plot_run
from alignment_core.redact import redact
from alignment_core.verdict import significance_line
from tasks import artifact_key, parse

SAMPLE_ROWS = 8
# A progress bar moves at most this often: each move is a round trip to the server on the stage's own thread (a
# training round of 128 steps moved it every step, about 1 s of a 40 s iteration on 2 cores).
PROGRESS_INTERVAL_S = 2.0


def publish(artifact: Artifact) -> UUID:
    """Create `artifact` for this flow run, or update the one this flow run already has under its key: one
    artifact per key and flow run, holding the latest content (a new version per iteration would list every
    iteration's copy on the run's page). Returns its id."""
    run_id = flow_run.get_id()
    if run_id is not None:
        with get_client(sync_client=True) as client:
            mine = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact.key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])),
                limit=1)
            if mine:
                client.update_artifact(mine[0].id, ArtifactUpdate(data=artifact.format(),
                                                                  description=artifact.description))
                return mine[0].id
    return artifact.create().id


def ui_progress(key: str, description: str) -> Callable[[int, int], None]:
    """A stage's live progress bar in the UI: this flow run's one under `key`, back at 0% for the new iteration.
    Returns `update(done, total)`, which moves it (`throttled`)."""
    artifact = publish(ProgressArtifact(key=key, progress=0.0, description=description))
    return throttled(lambda percent: update_progress_artifact(artifact, percent))


def throttled(send: Callable[[float], None], interval_s: float = PROGRESS_INTERVAL_S) -> Callable[[int, int], None]:
    """`update(done, total)` that sends the percentage done at most every `interval_s`, and always at 100%."""
    last_sent = -math.inf

    def update(done: int, total: int) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if done < total and now - last_sent < interval_s:
            return
        last_sent = now
        send(100.0 * done / max(total, 1))

    return update


def by_iteration(columns: dict[int, dict]) -> list[dict]:
    """{iteration: {metric: value}} as table rows: one per metric, one column per iteration (few iterations,
    many metrics: the table stays narrow)."""
    metrics = list(dict.fromkeys(metric for values in columns.values() for metric in values))
    return [{"metric": metric, **{f"iteration {k}": _shown(values.get(metric))
                                  for k, values in sorted(columns.items())}}
            for metric in metrics]


def _shown(value):
    """Floats to 4 significant digits (a table cell, not a record: the store keeps the exact numbers)."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


@task(name="report", task_run_name="report-iter-{iteration}")
def report_iteration(config_json: str, iteration: int, stages: dict[str, str]) -> dict:
    """Publish the iteration's artifacts and return its summary (the numbers shown in the markdown)."""
    cfg = parse(config_json)
    store = pipeline.open_store(cfg)
    run = cfg.store.run_name
    summary: dict = {"iteration": iteration, **({"checkpoint": stages["checkpoint"]} if "checkpoint" in stages else {})}
    for name in ("prompts", "examples"):
        if name in stages:
            extra = pipeline.stage_summary(store, stages[name])
            load = extra.get("report", {})
            summary.update({"data_format": load.get("format"), "data_rows_kept": load.get("rows_kept"),
                            "data_rows_skipped": load.get("rows_skipped"),
                            "data_prompts_reused": extra.get("reused_prompts", 0)})
    if "metrics" in stages:
        summary.update({f"train_{k}": v for k, v in pipeline.training_summary(store, stages["metrics"]).items()})
    if "evaluation" in stages:
        summary.update(pipeline.evaluation_summary(store, stages["evaluation"]))
    if "annotations" in stages:
        summary.update({f"annotation_{k}": v for k, v in pipeline.stage_summary(store, stages["annotations"]).items()
                        if isinstance(v, int | float)})
        if cfg.annotation.annotator == "cascade":  # the budget spent: this iteration's (above) and the run's
            summary["annotation_escalated_total"] = pipeline.expensive_labels_spent(store, run, iteration)
    if "generations" in stages:
        generation = pipeline.stage_summary(store, stages["generations"])
        summary["generation_rows"] = generation.get("rows")
        summary["generation_tokens_per_s"] = generation.get("tokens_per_s")
        if generation.get("staleness"):  # scale_out.schedule async: sampled this many checkpoints behind
            summary["generation_staleness"] = generation["staleness"]

    outputs = {name: (store.read_manifest(uri) or {}).get("rows") if name != "checkpoint" else None
               for name, uri in stages.items()}
    publish(MarkdownArtifact(key=artifact_key(run, "summary"), markdown=summary_markdown(run, summary, stages, outputs),
                             description=f"{run}: the verdict and iteration {iteration}'s numbers"))
    if "evaluation" in stages:
        publish_evaluation(store, run, iteration)
    if "generations" in stages and "annotations" in stages:
        publish(TableArtifact(key=artifact_key(run, "samples"),
                              table=sample_table(store, stages["generations"], stages["annotations"]),
                              description=f"{run}: sample generations of iteration {iteration}"))
    return summary


def publish_evaluation(store, run: str, iteration: int) -> None:
    """The learning plot (every iteration so far, from the store) embedded in markdown, and its numbers."""
    evaluations = {k: pipeline.evaluation_summary(store, store.stage_uri(run, k, "evaluation"))
                   for k in store.list_iterations(run) if "evaluation" in store.list_stages(run, k)}
    publish(TableArtifact(key=artifact_key(run, "evaluation-table"), table=by_iteration(evaluations),
                          description=f"{run}: held-out evaluation, iterations 1-{iteration}"))
    plot = plot_run(store, run)  # None for a reward model: its held-out accuracy is in the table
    if plot is None:
        return
    png, _ = store.read_versioned(plot)
    image = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    markdown = "\n".join([
        f"# {run}: evaluation after iteration {iteration}", "", f"**{significance_line(evaluations[iteration])}**",
        "", f"![learning plot: rewards from iteration 0, win-rates with 95% intervals]({image})", "",
        f"The plot is in the run folder too (`{plot}`); its numbers are the artifact "
        f"`{artifact_key(run, 'evaluation-table')}`."])
    publish(MarkdownArtifact(key=artifact_key(run, "evaluation"), markdown=markdown,
                             description=f"{run}: learning plot, iterations 1-{iteration}"))


# Summary keys by prefix -> section of the markdown summary, in the order shown (evaluation, the answer, first);
# keys of no other section are the evaluation's. A metric's unit, by the suffix of its key.
SECTIONS = (("", "Evaluation"), ("data_", "Data"), ("generation_", "Generation"), ("annotation_", "Annotation"),
            ("train_", "Training"))
METRIC_UNITS = (("tokens_per_s", "tokens/s"), ("_rows", "rows"), ("words_mean", "words"), ("learning_rate", "lr"))
STAGE_DESCRIPTIONS = {
    "prompts": "this iteration's training prompts",
    "examples": "the offline dataset, normalised",
    "generations": "sampled responses with per-token log-probs",
    "annotations": "labels or rewards of the responses, with the annotator's raw output",
    "units": "training units (pairs or single responses) built from the annotations",
    "weights": "per-unit training weights",
    "checkpoint": "the trained policy (safetensors) with its lineage",
    "metrics": "training metrics per optimizer step (long format)",
    "evaluation": "held-out win-rates and rewards",
}


def section_of(key: str) -> str:
    return next((title for prefix, title in SECTIONS if prefix and key.startswith(prefix)), "Evaluation")


def summary_markdown(run: str, summary: dict, stages: dict[str, str], rows: dict[str, int | None]) -> str:
    """The verdict, then the iteration's numbers grouped by stage (one table each, with units), then what each
    stage wrote."""
    lines = [f"# {run}: iteration {summary['iteration']}", "", f"**{significance_line(summary)}**"]
    numbers = {k: v for k, v in summary.items() if k not in ("iteration", "checkpoint")}
    for prefix, title in SECTIONS:
        section = {k: v for k, v in numbers.items() if section_of(k) == title}
        if not section:
            continue
        lines += ["", f"## {title}", "", "| metric | value | unit |", "|---|---|---|"]
        for key, value in section.items():
            unit = next((u for suffix, u in METRIC_UNITS if key.endswith(suffix)), "")
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key.removeprefix(prefix) or key} | {shown} | {unit} |")
    lines += ["", "## Outputs", "", "| stage | rows | where | what |", "|---|---|---|---|"]
    for name, uri in stages.items():
        count = "" if rows.get(name) is None else rows[name]
        lines.append(f"| {name} | {count} | `{redact(uri)}` | {STAGE_DESCRIPTIONS.get(name, '')} |")
    return "\n".join(lines)


def sample_table(store, generations_uri: str, annotations_uri: str) -> list[dict]:
    generations = store.read_pandas(generations_uri).set_index("generation_id")
    rows = []
    for ann in store.read_pandas(annotations_uri).head(SAMPLE_ROWS).itertuples():
        first = generations.loc[ann.generation1_id]
        row = {"prompt": first.prompt[:200], "generation1": first.response[:300],
               "generation1_reward": ann.generation1_reward, "status": ann.status, "annotator": ann.annotator}
        if isinstance(ann.generation2_id, str):
            row["generation2"] = generations.loc[ann.generation2_id].response[:300]
            row["generation2_reward"] = ann.generation2_reward
        rows.append(row)
    return rows
