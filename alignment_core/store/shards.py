"""A stage's files: Parquet shards (`part-{i:05d}.parquet`), the plan written first (`_stage.json`) and the
manifest written last (`_manifest.json`), with each shard's rows, size and sha256; `StageWriter` writes one
stage shard by shard and resumes at its first missing shard."""

import hashlib
import io
import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from alignment_core import __version__
from alignment_core.records import SCHEMA_VERSION, SCHEMAS, conform

if TYPE_CHECKING:
    from alignment_core.store.artifact_store import ArtifactStore

__all__ = [  # what the package re-exports
    "CHECKPOINT_MARKER",
    "CHECKPOINT_POINTER",
    "CHECKPOINT_VERSION_PREFIX",
    "DamagedStageError",
    "MANIFEST",
    "RESUME_MARKER",
    "STAGE_PLAN",
    "StageWriter",
    "_SHARD",
    "_shard_problems",
    "fingerprint_digest",
    "shard_name",
    "shard_record",
]

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
STAGE_PLAN = "_stage.json"
CHECKPOINT_MARKER = "_complete.json"
RESUME_MARKER = "_resume.json"  # a mid-round save: a point to resume training from, not a finished checkpoint
CHECKPOINT_POINTER = "_live.json"  # object storage: names the checkpoint's live version folder (written last)
CHECKPOINT_VERSION_PREFIX = ".v-"
_SHARD = re.compile(r"^part-(\d{5})\.parquet$")


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short stable digest of a stage's fingerprint (config hash + input digests)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class DamagedStageError(RuntimeError):
    """A finished stage whose shards no longer match its manifest (truncated, rewritten, deleted)."""

    def __init__(self, stage_uri: str, problems: list[str]):
        self.stage_uri, self.problems = stage_uri, problems
        super().__init__(f"stage {stage_uri} is damaged: " + "; ".join(problems)
                         + ". Re-run the pipeline to redo it from its inputs")


def shard_record(name: str, data: bytes) -> dict:
    """What a manifest records of one shard: rows (from its Parquet footer), byte size and sha256."""
    return {"name": name, "rows": pq.ParquetFile(io.BytesIO(data)).metadata.num_rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _shard_problems(record: dict, data: bytes) -> list[str]:
    """How a shard's bytes differ from its manifest record: [] or one line naming the shard and each difference
    (size, footer rows, and the sha256 when the record has one)."""
    size = len(data)
    try:
        rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        rows = error
    differs = []
    if "bytes" in record and size != record["bytes"]:
        differs.append(f"{size} bytes (the manifest records {record['bytes']})")
    if isinstance(rows, Exception):
        differs.append(f"no readable Parquet footer ({rows})")
    elif rows != record["rows"]:
        differs.append(f"{rows} rows (the manifest records {record['rows']})")
    if not differs and "sha256" in record:
        digest = hashlib.sha256(data).hexdigest()
        if digest != record["sha256"]:
            differs.append(f"sha256 {digest[:12]}... (the manifest records {record['sha256'][:12]}...)")
    return [f"{record['name']} has " + ", ".join(differs)] if differs else []


class StageWriter:
    """Writes one stage shard by shard; resumes at the first missing shard of the same fingerprint."""

    def __init__(self, store: "ArtifactStore", stage_uri: str, schema_name: str, fingerprint: dict[str, Any]):
        if schema_name not in SCHEMAS:
            raise ValueError(f"unknown schema {schema_name!r}; known: {sorted(SCHEMAS)}")
        self.store, self.stage_uri, self.schema_name = store, stage_uri, schema_name
        self.schema = SCHEMAS[schema_name]
        self.fingerprint = fingerprint
        self.digest = fingerprint_digest(fingerprint)
        self.rows: dict[int, int] = {}
        self.records: dict[int, dict] = {}  # per shard: rows, bytes, sha256 (what the manifest records)
        self._prepare()

    def _prepare(self) -> None:
        """Keep shards written under the same fingerprint; clear a stage computed from something else.

        Only under the run's lease: check_lease raises when another writer holds a live lease on the run, so
        a stage that writer started (its token is in `_stage.json`) is never cleared from under it.
        """
        store, plan_uri = self.store, f"{self.stage_uri}/{STAGE_PLAN}"
        store.check_lease(self.stage_uri)
        plan = store.read_json(plan_uri) if store.exists(plan_uri) else None
        new_plan = {"fingerprint_digest": self.digest, "fingerprint": self.fingerprint,
                    "lease_token": store.lease_token}
        if plan is None or plan["fingerprint_digest"] != self.digest:
            if store.exists(self.stage_uri):
                store.fs.rm(store._path(self.stage_uri), recursive=True)
            store.write_json(plan_uri, new_plan)
            return
        if plan.get("lease_token") != store.lease_token:
            store.write_json(plan_uri, new_plan)  # the stage resumes under this lease
        # A finished stage being redone is damaged: its shards that differ from the old manifest are dropped
        # (and redone), and the old manifest goes, so the stage is complete again only when it is finished.
        old = store.read_manifest(self.stage_uri)
        recorded = {r["name"]: r for r in old["shards"]} if old and old["fingerprint_digest"] == self.digest else {}
        for path in store.fs.ls(store._path(self.stage_uri), detail=False):
            name = os.path.basename(path)
            match = _SHARD.match(name)
            if not match:
                continue
            data = store.fs.cat_file(path)
            try:
                record = shard_record(name, data)
            except (pa.ArrowException, OSError):
                record = None
            if record is None or (name in recorded and _shard_problems(recorded[name], data)):
                log.warning("stage %s: shard %s is damaged; writing it again", self.stage_uri, name)
                store.fs.rm_file(path)
                continue
            self.records[int(match.group(1))] = record
            self.rows[int(match.group(1))] = record["rows"]
        kept = {record["name"] for record in self.records.values()}
        if old is not None and not set(recorded) <= kept:
            store.fs.rm_file(store._path(f"{self.stage_uri}/{MANIFEST}"))

    @property
    def done_shards(self) -> set[int]:
        return set(self.rows)

    def write_shard(self, index: int, table: pa.Table) -> None:
        table = conform(table, self.schema, f"{self.schema_name} shard {index}")
        self.store.check_lease(self.stage_uri)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        self.store.write_bytes(f"{self.stage_uri}/{shard_name(index)}", data)
        self.rows[index] = table.num_rows
        self.records[index] = shard_record(shard_name(index), data)

    def finish(self, extra: dict | None = None) -> dict:
        """Write the manifest (last): the shards 0..n-1 must all be present."""
        indices = sorted(self.rows)
        if indices != list(range(len(indices))):
            missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
            raise RuntimeError(f"stage {self.stage_uri}: shards {missing} are missing; cannot finish")
        self.store.check_lease(self.stage_uri)
        manifest = {
            "stage": self.stage_uri.rsplit("/", 1)[-1],
            "schema": self.schema_name,
            "schema_version": SCHEMA_VERSION,
            "package_version": __version__,
            "fingerprint": self.fingerprint,
            "fingerprint_digest": self.digest,
            "shards": [self.records[i] for i in indices],
            "rows": sum(self.rows.values()),
            "created_at": time.time(),
            "extra": extra or {},
        }
        self.store.write_json(f"{self.stage_uri}/{MANIFEST}", manifest)
        return manifest
