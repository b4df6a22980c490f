"""The annotate stage: generations in, annotation shards out, resumable, with a failure guard."""

import hashlib
import json
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from alignment_core import fanout, gpu
from alignment_core.annotation.base import (
    FAILURE_STATUSES,
    LABEL_STATUSES,
    AnnotationFailureError,
    Annotator,
    ScoreRules,
    is_transient_failure,
    output_mode,
    prompt_groups,
)
from alignment_core.annotation.cache import CachedJudgeBackend, JudgeCache, judge_identity
from alignment_core.annotation.cascade import CascadeAnnotator
from alignment_core.annotation.human import Ask, HumanAnnotator, HumanAnswerStore
from alignment_core.annotation.judge import PairwiseJudgeAnnotator
from alignment_core.annotators import ANNOTATORS
from alignment_core.config import PipelineConfig
from alignment_core.records import ANNOTATIONS, from_rows
from alignment_core.store import ArtifactStore, shard_name

log = logging.getLogger(__name__)



def make_annotator(cfg: PipelineConfig, ask: Ask | None = None) -> Annotator:
    """The annotator `cfg.annotation.annotator` names, producing the rows `cfg.setup` needs; `ask` is how a
    `human` annotator reaches its person (annotation/human.py)."""
    annotation = cfg.annotation
    rules = ScoreRules(
        mode=output_mode(cfg.setup),
        pair_selection=annotation.pair_selection,
        min_margin=annotation.min_margin,
        pointwise_threshold=annotation.pointwise_threshold,
        seed=cfg.generation.seed,
    )
    if annotation.annotator == "cascade":
        cascade = annotation.cascade
        return CascadeAnnotator(_annotator(cascade.first, cfg, rules, ask),
                                _annotator(cascade.escalate_to, cfg, rules, ask), cascade.budget,
                                cfg.generation.prompts_per_iteration, cascade.escalate, cfg.generation.seed)
    return _annotator(annotation.annotator, cfg, rules, ask)


def _annotator(kind: str, cfg: PipelineConfig, rules: ScoreRules, ask: Ask | None) -> Annotator:
    return ANNOTATORS[kind].build(cfg, rules, ask)


def stage_annotator(cfg: PipelineConfig, store: ArtifactStore, ask: Ask | None = None) -> Annotator:
    """`make_annotator(cfg, ask)`, a judge's answers cached by content in `store` (annotation/cache.py), a
    person's answers stored there as they come (annotation/human.py)."""
    annotator = make_annotator(cfg, ask)
    members = (annotator.first, annotator.escalate_to) if isinstance(annotator, CascadeAnnotator) else (annotator,)
    for judge in members:
        if isinstance(judge, HumanAnnotator):
            judge.answers = HumanAnswerStore(store)
        template = getattr(judge, "template", None)
        if template is not None and hasattr(judge, "backend"):
            kind = "pairwise" if isinstance(judge, PairwiseJudgeAnnotator) else f"pointwise_{judge.scale}"
            identity = judge_identity(cfg, judge.backend, template.name, kind)
            judge.backend = CachedJudgeBackend(judge.backend, JudgeCache(store, identity))
    return annotator


def shards_by_prompt(generations: pd.DataFrame, prompts_per_shard: int) -> list[pd.DataFrame]:
    """Consecutive prompts' samples per shard: all samples of a prompt land in the same shard."""
    groups = prompt_groups(generations)
    return [
        pd.concat(groups[start : start + prompts_per_shard], ignore_index=True)
        for start in range(0, len(groups), prompts_per_shard)
    ]


def annotation_summary(annotations: pd.DataFrame) -> dict:
    """Counts per status, failure fraction, and the statistics of the labelled rows."""
    counts = {str(k): int(v) for k, v in annotations["status"].value_counts().sort_index().items()}
    failures = sum(counts.get(status, 0) for status in FAILURE_STATUSES)
    transient = int(transient_mask(annotations).sum())
    labelled = annotations[annotations["status"].isin(LABEL_STATUSES)]
    scores = pd.concat([labelled["score1"], labelled["score2"]]).dropna()
    rewards = labelled["generation1_reward"].dropna()

    def stat(series: pd.Series, how: str) -> float | None:
        return float(getattr(series, how)(ddof=0) if how == "std" else series.mean()) if len(series) else None

    return {
        "rows": len(annotations),
        "counts": counts,
        "failures": failures,
        # failed for a reason that may pass (judge outage, timeout): a rerun asks again for exactly these
        "transient_failures": transient,
        "failure_fraction": failures / len(annotations) if len(annotations) else 0.0,
        # generation1's label: a preference (pairwise: 1 won, 0.5 tie, 0 lost) or a reward (rl, pointwise)
        "label_mean": stat(rewards, "mean"),
        "label_std": stat(rewards, "std"),
        "score_mean": stat(scores, "mean"),
        "score_std": stat(scores, "std"),
        # who labelled the rows: with a cascade, the first annotator or the expensive one it escalated to
        "rows_by_annotator": {str(k): int(v) for k, v in annotations["annotator"].value_counts().sort_index().items()},
        "escalated": sum(bool(json.loads(raw).get("cascade", {}).get("escalated")) for raw in annotations["raw"]),
        # pairs put to a person who did not answer (the form timed out, or left blank): not trained on
        "unanswered": counts.get("unanswered", 0),
    }


def transient_mask(annotations: pd.DataFrame) -> pd.Series:
    """Rows that failed for a transient reason (see base.is_transient_failure)."""
    if len(annotations) == 0:
        return pd.Series([], dtype=bool)
    return pd.Series([is_transient_failure(status, raw) for status, raw in
                      zip(annotations["status"], annotations["raw"], strict=True)], index=annotations.index)


def labels_digest(annotations: pd.DataFrame) -> str:
    """A digest of the labels (ids, statuses, rewards, scores): what the training units are built from."""
    columns = ["annotation_id", "status", "generation1_id", "generation2_id", "generation1_reward",
               "generation2_reward", "score1", "score2", "confidence"]
    frame = annotations[columns].sort_values("annotation_id", kind="stable")
    rows = frame.astype(object).where(frame.notna(), None).values.tolist()
    return hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:16]


def _retry_transient(annotator: Annotator, shard: pd.DataFrame, done: pa.Table, index: int) -> pa.Table:
    """The shard's rows with its prompts that failed for a transient reason annotated again, the others kept.

    A prompt is redone whole (its pair or labels depend on all its samples' answers); the judge cache answers
    what was answered before, so only the failed requests go out again.
    """
    frame = done.select(["prompt_id", "status", "raw"]).to_pandas()
    retry = set(frame.loc[transient_mask(frame), "prompt_id"])
    redone = from_rows(annotator.annotate(shard[shard["prompt_id"].isin(retry)]), ANNOTATIONS,
                       f"annotations shard {index}")
    kept = done.filter(pa.array([pid not in retry for pid in frame["prompt_id"]], pa.bool_()))
    merged = pa.concat_tables([kept.cast(redone.schema), redone])
    position = {pid: i for i, pid in enumerate(dict.fromkeys(shard["prompt_id"]))}
    order = np.argsort([position[pid] for pid in merged.column("prompt_id").to_pylist()], kind="stable")
    log.info("annotations shard %d: asked again for %d prompts that failed for a transient reason", index, len(retry))
    return merged.take(pa.array(order))


def check_failures(summary: dict, max_failure_fraction: float, where: str) -> None:
    if summary["failure_fraction"] > max_failure_fraction:
        detail = ", ".join(f"{s} {summary['counts'].get(s, 0)}" for s in FAILURE_STATUSES)
        transient = summary.get("transient_failures", 0)
        if transient:
            detail += (f"; {transient} failed for a transient reason (judge outage, timeout): run the stage again "
                       "to ask again for those only")
        raise AnnotationFailureError(
            f"{where}: {summary['failures']} of {summary['rows']} annotations failed "
            f"({summary['failure_fraction']:.1%} > annotation.max_failure_fraction "
            f"{max_failure_fraction:.1%}; {detail}); the failed rows and the annotator's raw output "
            "are in the "
            "stage's shards"
        )


def run_annotation(
    store: ArtifactStore, generations_uri: str, out_uri: str, cfg: PipelineConfig, fingerprint: dict,
    shard_subset: tuple[int, int] | None = None, ask: Ask | None = None,
) -> dict | None:
    """Annotate the generations stage into `out_uri`; returns the stage manifest.

    Shards are groups of `generation.shard_size` prompts; shards already written under the same fingerprint
    are kept (resume), except their prompts whose annotations failed for a transient reason (judge outage,
    timeout): those are annotated again, in a complete stage too. A judge's answers are cached by content in
    the store (annotation/cache.py), so nothing already answered is asked twice. The annotator (which may
    load a model) is only built when there is something to annotate. The failure guard runs over the whole
    stage before the manifest is written, so a stage with too many failures never counts as complete.

    `shard_subset=(i, N)`: this call is worker i of N (alignment_core/fanout.py): it annotates only its missing
    shards i, i+N, ...; the worker that finds every shard in runs the failure guard and writes the manifest
    (returned); the others return None. `ask` reaches the person of a `human` annotator (annotation/human.py).
    """
    shards = shards_by_prompt(store.read_pandas(generations_uri), cfg.generation.shard_size)
    writer = store.stage_writer(out_uri, "annotations", fingerprint)
    annotator = None
    tables = []
    gpu.reset_peak_memory()
    for index, shard in enumerate(shards):
        if index in writer.done_shards:
            with store.fs.open(f"{out_uri}/{shard_name(index)}", "rb") as f:
                done = pq.read_table(f)
            retry = fanout.in_subset(index, shard_subset) and transient_mask(
                done.select(["status", "raw"]).to_pandas()).any()
            if retry:  # the prompts whose judge did not answer are asked again; the other rows are kept
                annotator = annotator or stage_annotator(cfg, store, ask)
                done = _retry_transient(annotator, shard, done, index)
                writer.write_shard(index, done)
            tables.append(done.to_pandas())
            continue
        if not fanout.in_subset(index, shard_subset):  # another fan-out worker's shard
            continue
        annotator = annotator or stage_annotator(cfg, store, ask)
        if isinstance(annotator, CascadeAnnotator):  # spends its label budget by the shard's place
            rows = annotator.annotate(shard, prompts_before=index * cfg.generation.shard_size)
        else:
            rows = annotator.annotate(shard)
        table = from_rows(rows, ANNOTATIONS, f"annotations shard {index}")
        writer.write_shard(index, table)
        tables.append(table.to_pandas())
        log.info(
            "annotated shard %d/%d: %d generations -> %d rows", index + 1, len(shards), len(shard), len(table)
        )
    peak_gpu_memory = gpu.peak_memory_gib() if annotator is not None else None  # before an engine shuts down
    backend = getattr(annotator, "backend", None)
    if hasattr(backend, "close"):  # an HTTP client or a vLLM engine process: not left behind in a worker
        backend.close()
    annotator = backend = None
    gpu.release_memory()
    if shard_subset is not None:  # a fan-out worker: whoever finds every shard in finishes the stage
        writer = fanout.writer_if_complete(store, out_uri, "annotations", fingerprint, len(shards))
        if writer is None:
            return None
        tables = [store._read_shard(f"{out_uri}/{shard_name(index)}").to_pandas() for index in range(len(shards))]
    annotations = pd.concat(tables, ignore_index=True) if tables else ANNOTATIONS.empty_table().to_pandas()
    summary = annotation_summary(annotations)
    check_failures(summary, cfg.annotation.max_failure_fraction, f"annotation stage {out_uri}")
    names = sorted(set(annotations["annotator"]))
    return writer.finish({**summary, "annotators": names, "labels_digest": labels_digest(annotations),
                          "peak_gpu_memory_gib": peak_gpu_memory, "torch_threads": torch.get_num_threads()})
