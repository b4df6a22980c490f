"""Per-iteration Prefect artifacts: a markdown summary, sample generations with their annotations, links."""

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from alignment_core import pipeline
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
    summary: dict = {"iteration": iteration}
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

    lines = [f"# {run}: iteration {iteration}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "## Stages", ""] + [f"- `{name}`: {uri}" for name, uri in stages.items()]
    create_markdown_artifact("\n".join(lines), key=artifact_key(run, "summary"),
                             description=f"{run} iteration {iteration}")
    for name, uri in stages.items():
        create_link_artifact(_link(uri), link_text=f"{name} (iteration {iteration})",
                             key=artifact_key(run, "iter", iteration, name))
    if "generations" in stages and "annotations" in stages:
        create_table_artifact(sample_table(store, stages["generations"], stages["annotations"]),
                              key=artifact_key(run, "samples"),
                              description=f"sample generations, iteration {iteration}")
    return summary


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
