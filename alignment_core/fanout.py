"""Fan-out of a stage over several workers: each writes a subset of the stage's shards, the last one finishes it.

A stage's shards are numbered 0..n-1 as when one worker writes them all; worker i of N writes the shards
i, i+N, i+2N, ... that are missing (`shard_subset=(i, N)` on `run_generation` / `run_annotation`). Seeds derive
from (run, iteration, shard), never from the worker, so N workers write exactly the rows one worker does, and a
worker that died and is started again redoes only its missing shards.

No worker writes the manifest while another one's shards are missing: after its own shards, a worker records
what it did (`_worker-{i}-of-{N}.json`, for the manifest's statistics) and lists the stage; the one that finds
every shard present (whoever wrote the last one: listings are consistent on local disks and S3) re-reads the
stage and writes the manifest, so the stage is complete only when every shard is in. Two workers finishing at
the same moment may both write it: the same shards, the same fingerprint, one atomic write after the other.

Every worker of a stage computes the same fingerprint, so they agree on which shards to keep. This module is
plain library code; the orchestrating flow that starts the workers lives in `tasks/`.
"""

import json
import logging
import os
import re

from alignment_core.store import ArtifactStore, StageWriter, shard_name

log = logging.getLogger(__name__)

_REPORT = re.compile(r"^_worker-(\d+)-of-(\d+)\.json$")


def check_subset(shard_subset) -> tuple[int, int] | None:
    """None (every shard) or (i, N) with 0 <= i < N, from a tuple or a JSON list (a flow parameter)."""
    if shard_subset is None:
        return None
    try:
        index, count = (int(v) for v in shard_subset)
    except (TypeError, ValueError):
        raise ValueError(f"shard_subset must be [worker, workers], got {shard_subset!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard_subset [{index}, {count}]: the worker index must be in 0..{count - 1}")
    return index, count


def in_subset(index: int, shard_subset: tuple[int, int] | None) -> bool:
    """Whether shard `index` is this worker's: every shard without a subset."""
    return shard_subset is None or index % shard_subset[1] == shard_subset[0]


def write_worker_report(store: ArtifactStore, stage_uri: str, shard_subset: tuple[int, int], report: dict) -> None:
    """What this worker did (its last attempt), for the statistics of the manifest the last worker writes."""
    index, count = shard_subset
    store.check_lease(stage_uri)
    store.write_json(f"{stage_uri}/_worker-{index}-of-{count}.json", report)


def worker_reports(store: ArtifactStore, stage_uri: str) -> list[dict]:
    """Every worker's report in the stage (written under the stage's current fingerprint: a stale stage is
    cleared, reports included, before a worker writes)."""
    store.fs.invalidate_cache()
    reports = []
    for path in sorted(store.fs.ls(store._path(stage_uri), detail=False)):
        if _REPORT.match(os.path.basename(path)):
            with store.fs.open(path, "rb") as f:
                reports.append(json.loads(f.read()))
    return reports


def writer_if_complete(store: ArtifactStore, stage_uri: str, schema_name: str, fingerprint: dict,
                       n_shards: int) -> StageWriter | None:
    """A writer over the stage as every worker left it, when all `n_shards` shards are in; else None.

    The stage is listed first (cheap); only when nothing is missing is it re-opened, which reads and checks
    every shard, as a resumed writer does.
    """
    store.fs.invalidate_cache()
    present = {os.path.basename(p) for p in store.fs.ls(store._path(stage_uri), detail=False)}
    missing = [i for i in range(n_shards) if shard_name(i) not in present]
    if missing:
        log.info("%s: %d of %d shards still missing (other workers'); the last worker writes the manifest",
                 stage_uri, len(missing), n_shards)
        return None
    writer = store.stage_writer(stage_uri, schema_name, fingerprint)
    return writer if writer.done_shards >= set(range(n_shards)) else None
