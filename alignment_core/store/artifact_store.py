"""The artifact store: every stage's output as Parquet shards under an fsspec URI.

Layout:
    {root}/{run}/iter-{k:03d}/{stage}/part-{i:05d}.parquet
    {root}/{run}/iter-{k:03d}/{stage}/_manifest.json      written last: the stage is complete
    {root}/{run}/iter-{k:03d}/checkpoint/                 save_pretrained output + _complete.json

Why it is safe to kill a run at any moment:
- A shard is never visible half-written: locally it is written to a hidden temporary name and renamed into
  place; on object storage a single PUT is atomic.
- A stage first records the fingerprint of what it is computing (`_stage.json`); shards found under a
  different fingerprint are stale and removed, shards under the same one are reused, so a resumed stage
  continues at its first missing shard.
- The manifest, written last, is the only proof a stage is complete. It records each shard's rows, byte size
  and sha256; a stage whose shards no longer match (truncated, rewritten, deleted, even rewritten to the same
  size) is not complete, so a rerun redoes those shards, and reading it raises DamagedStageError naming the shard.
  Each shard's bytes are hashed once per process per file version (size, mtime and inode locally, the ETag on
  S3), so the completeness checks of a rerun stay cheap.
"""

import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from alignment_core.config import DEFAULT_CACHE_DIR, check_segment
from alignment_core.lease import check_lease
from alignment_core.records import SCHEMAS, conform
from alignment_core.store.checkpoints import CheckpointFiles
from alignment_core.store.documents import CompareAndSwapDocuments
from alignment_core.store.shards import (
    MANIFEST,
    DamagedStageError,
    StageWriter,
    _shard_problems,
    fingerprint_digest,
)

__all__ = [  # what the package re-exports
    "ArtifactStore",
]

log = logging.getLogger(__name__)

# The sha256 of shard files this process has read and found to match their manifest, by file version (see
# ArtifactStore._file_version): the completeness checks of a rerun hash each shard once, not at every check.
_VERIFIED_DIGESTS: dict[tuple, str] = {}


class ArtifactStore(CompareAndSwapDocuments, CheckpointFiles):
    """Reads and writes stages and checkpoints under `root` (a local folder or an fsspec URI).

    Credentials for object storage come from the environment (AWS_ACCESS_KEY_ID, ...), never from here.
    """

    def __init__(self, root: str, endpoint_url: str | None = None, cache_dir: str = DEFAULT_CACHE_DIR,
                 lease_token: str | None = None):
        # The run lease this store writes under (alignment_core/lease.py): stage writers check that it is
        # still the run's live lease; without one they check that nobody else holds a live lease on the run.
        self.lease_token = lease_token
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        protocol = fsspec.utils.get_protocol(root)
        self.storage_options: dict[str, Any] = {}
        if protocol in ("s3", "s3a") and self.endpoint_url:
            self.storage_options = {"client_kwargs": {"endpoint_url": self.endpoint_url}}
        self.fs, path = fsspec.core.url_to_fs(root, **self.storage_options)
        self.protocol = protocol
        self.root = self._unstrip(path.rstrip("/"))
        self.cache_dir = Path(cache_dir).expanduser()

    @classmethod
    def from_config(cls, store_cfg) -> "ArtifactStore":
        return cls(store_cfg.root, endpoint_url=store_cfg.endpoint_url, cache_dir=store_cfg.cache_dir,
                   lease_token=getattr(store_cfg, "lease_token", None))

    # ---- URIs -------------------------------------------------------------------------------------
    def _unstrip(self, path: str) -> str:
        """fsspec strips the protocol; URIs handed out keep it so they are usable anywhere."""
        if self.protocol in ("file", "local"):
            return os.path.abspath(path)
        return f"{self.protocol}://{path}"

    def _path(self, uri: str) -> str:
        return self.fs._strip_protocol(uri)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *(check_segment(part) for part in parts)])

    def run_uri(self, run: str) -> str:
        return self.uri(run)

    def stage_uri(self, run: str, iteration: int, stage: str) -> str:
        return self.uri(run, f"iter-{iteration:03d}", stage)

    def checkpoint_uri(self, run: str, iteration: int) -> str:
        return self.stage_uri(run, iteration, "checkpoint")

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self._path(uri))

    def run_of(self, uri: str) -> str | None:
        """The run a URI under this store belongs to (its first path segment below the root)."""
        prefix = self.root.rstrip("/") + "/"
        return uri[len(prefix):].split("/", 1)[0] if uri.startswith(prefix) else None

    def check_lease(self, uri: str) -> dict | None:
        """Raise unless this store may write `uri`'s run (see alignment_core.lease.check_lease)."""
        run = self.run_of(uri)
        return check_lease(self, run, self.lease_token) if run else None

    # ---- small JSON documents -----------------------------------------------------------------------
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomically write a file: rename into place locally, a single PUT on object storage."""
        path = self._path(uri)
        if self.protocol in ("file", "local"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(self._local_temp(path, data), path)
        else:
            self.fs.pipe_file(path, data)

    def delete(self, uri: str) -> None:
        self.fs.rm(self._path(uri))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, uri: str) -> Any:
        with self.fs.open(self._path(uri), "rb") as f:
            return json.loads(f.read())

    # ---- stages -------------------------------------------------------------------------------------
    def read_manifest(self, stage_uri: str) -> dict | None:
        uri = f"{stage_uri}/{MANIFEST}"
        self.fs.invalidate_cache()
        return self.read_json(uri) if self.exists(uri) else None

    def is_complete(self, stage_uri: str, fingerprint: dict[str, Any], manifest: dict | None = None) -> bool:
        """A manifest of this fingerprint whose shards are all there, of the recorded size, rows and sha256
        (`manifest`: the stage's, when the caller has read it already).

        A damaged stage is not complete: the stage function redoes its missing or damaged shards.
        """
        manifest = manifest or self.read_manifest(stage_uri)
        if manifest is None or manifest["fingerprint_digest"] != fingerprint_digest(fingerprint):
            return False
        problems = self.verify_stage(stage_uri, manifest)
        if problems:
            log.warning("stage %s is damaged, redoing it: %s", stage_uri, "; ".join(problems))
        return not problems

    def verify_stage(self, stage_uri: str, manifest: dict | None = None) -> list[str]:
        """What differs between a finished stage's shards and its manifest ([] when nothing does): each shard's
        size, rows (from its Parquet footer) and sha256. A shard already found intact by this process, and not
        changed since, is not read again."""
        manifest = manifest or self.read_manifest(stage_uri)
        if manifest is None:
            return [f"no {MANIFEST}"]
        return [problem for record in manifest["shards"] for problem in self._stored_shard_problems(stage_uri, record)]

    def stage_writer(self, stage_uri: str, schema_name: str, fingerprint: dict[str, Any]) -> "StageWriter":
        return StageWriter(self, stage_uri, schema_name, fingerprint)

    def write_stage(
        self, stage_uri: str, schema_name: str, fingerprint: dict[str, Any], tables: list[pa.Table],
        extra: dict | None = None,
    ) -> dict:
        """Write a whole stage at once (small stages); shards already written are kept."""
        writer = self.stage_writer(stage_uri, schema_name, fingerprint)
        for index, table in enumerate(tables):
            if index not in writer.done_shards:
                writer.write_shard(index, table)
        return writer.finish(extra)

    def read_table(self, stage_uri: str) -> pa.Table:
        """The stage's rows, in shard order, read from the shards its manifest lists."""
        manifest = self.read_manifest(stage_uri)
        if manifest is None:
            raise FileNotFoundError(f"stage {stage_uri} is not complete (no {MANIFEST})")
        schema = SCHEMAS[manifest["schema"]]
        tables = [self._read_verified_shard(stage_uri, record) for record in manifest["shards"]]
        return pa.concat_tables([conform(t, schema, manifest["schema"]) for t in tables]) if tables else (
            schema.empty_table()
        )

    def read_pandas(self, stage_uri: str) -> pd.DataFrame:
        return self.read_table(stage_uri).to_pandas()

    def _read_shard(self, uri: str) -> pa.Table:
        with self.fs.open(self._path(uri), "rb") as f:
            return pq.read_table(f)

    def _read_verified_shard(self, stage_uri: str, record: dict) -> pa.Table:
        """One shard, checked against its manifest record (size, rows, sha256)."""
        try:
            data = self.fs.cat_file(self._path(f"{stage_uri}/{record['name']}"))
        except FileNotFoundError:
            raise DamagedStageError(stage_uri, [f"{record['name']} is missing"]) from None
        problems = _shard_problems(record, data)
        if problems:
            raise DamagedStageError(stage_uri, problems)
        return pq.read_table(io.BytesIO(data))

    def _stored_shard_problems(self, stage_uri: str, record: dict) -> list[str]:
        """How a shard's file differs from its manifest record ([] or one line); a version of the file this
        process has already found intact is not read again."""
        path, sha256 = self._path(f"{stage_uri}/{record['name']}"), record.get("sha256")
        try:
            version = self._file_version(path)  # taken before reading: a change after it is another version
            if sha256 is not None and version is not None and _VERIFIED_DIGESTS.get(version) == sha256:
                return []
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return [f"{record['name']} is missing"]
        problems = _shard_problems(record, data)
        if not problems and sha256 is not None and version is not None:
            _VERIFIED_DIGESTS[version] = sha256
        return problems

    def _file_version(self, path: str) -> tuple | None:
        """What changes whenever the file's bytes do: size, mtime (ns) and inode locally, the ETag on S3 (else
        the modification time the file system reports); None when the file system reports neither."""
        if self._local:
            stat = os.stat(path)
            return path, stat.st_size, stat.st_mtime_ns, stat.st_ino
        self.fs.invalidate_cache(path)  # the version now, not a listing's from before a rewrite
        info = self.fs.info(path)
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        return (self.protocol, path, info["size"], str(version)) if version else None

    # ---- listing ------------------------------------------------------------------------------------
    def _children(self, uri: str) -> list[str]:
        self.fs.invalidate_cache()
        if not self.exists(uri):
            return []
        return sorted(
            os.path.basename(p.rstrip("/")) for p in self.fs.ls(self._path(uri), detail=False)
            if self.fs.isdir(p)
        )

    def list_runs(self) -> list[str]:
        return [name for name in self._children(self.root) if not name.startswith((".", "_"))]

    def list_iterations(self, run: str) -> list[int]:
        return [int(name[5:]) for name in self._children(self.run_uri(run)) if re.fullmatch(r"iter-\d+", name)]

    def list_stages(self, run: str, iteration: int) -> list[str]:
        """The iteration's stage folders; hidden ones (a local checkpoint swap's `.checkpoint.*.tmp` left by a
        crash) are never stages."""
        return [name for name in self._children(self.uri(run, f"iter-{iteration:03d}"))
                if not name.startswith((".", "_"))]
