"""Per-iteration Prefect artifacts: a markdown summary, sample generations with their annotations, links."""

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from alignment_core import pipeline
from alignment_core.inspect import plot_run
from tasks import artifact_key, parse

SAMPLE_ROWS = 8


def _link(uri: str) -> str:
    return uri if "://" in uri else f"file://{uri}"


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
    if "generations" in stages:
        generation = pipeline.stage_summary(store, stages["generations"])
        summary["generation_rows"] = generation.get("rows")
        summary["generation_tokens_per_s"] = generation.get("tokens_per_s")

    create_markdown_artifact(summary_markdown(run, iteration, summary), key=artifact_key(run, "summary"),
                             description=f"{run} iteration {iteration}: what each stage did")
    for name, uri in stages.items():
        rows = (store.read_manifest(uri) or {}).get("rows") if name != "checkpoint" else None
        what = f"{name}: {rows} rows" if rows is not None else name
        create_link_artifact(_link(uri), link_text=f"{what} (iteration {iteration})",
                             key=artifact_key(run, "iter", iteration, name),
                             description=STAGE_DESCRIPTIONS.get(name, name))
    plot = plot_run(store, run) if "evaluation" in stages else None
    if plot:
        create_link_artifact(_link(plot), link_text="learning plot (rewards from iteration 0, win-rates)",
                             key=artifact_key(run, "plot"), description="evaluation.png in the run folder")
    if "generations" in stages and "annotations" in stages:
        create_table_artifact(sample_table(store, stages["generations"], stages["annotations"]),
                              key=artifact_key(run, "samples"),
                              description=f"sample generations, iteration {iteration}")
    return summary


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
# Summary keys by prefix -> section of the markdown summary; units by suffix.
SECTIONS = (("data_", "Data"), ("generation_", "Generation"), ("annotation_", "Annotation"), ("train_", "Training"),
            ("", "Evaluation"))
UNITS = (("tokens_per_s", "tokens/s"), ("_rows", "rows"), ("words_mean", "words"), ("learning_rate", "lr"))


def summary_markdown(run: str, iteration: int, summary: dict) -> str:
    """The iteration summary grouped by stage, one table per stage, with units where a number has one."""
    lines = [f"# {run}: iteration {iteration}"]
    remaining = {k: v for k, v in summary.items() if k not in ("iteration", "checkpoint")}
    for prefix, title in SECTIONS:
        section = {k: v for k, v in remaining.items() if k.startswith(prefix)}
        if not section:
            continue
        lines += ["", f"## {title}", "", "| metric | value | unit |", "|---|---|---|"]
        for key, value in section.items():
            unit = next((u for suffix, u in UNITS if key.endswith(suffix)), "")
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key.removeprefix(prefix) or key} | {shown} | {unit} |")
            del remaining[key]
    if "checkpoint" in summary:
        lines += ["", f"Checkpoint: `{summary['checkpoint']}`"]
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
