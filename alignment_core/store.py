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

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.asyn import sync

from alignment_core import __version__
from alignment_core.records import SCHEMA_VERSION, SCHEMAS, conform

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


def check_segment(segment: str, what: str = "path segment") -> str:
    """One folder or file name under the store root: no separator, not `.` or `..`, not empty."""
    if not isinstance(segment, str) or segment in ("", ".", "..") or any(c in segment for c in "/\\\0"):
        raise ValueError(f"{what} must be a single folder name (no '/', '\\', '..', not empty), got {segment!r}")
    return segment


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


# The sha256 of shard files this process has read and found to match their manifest, by file version (see
# ArtifactStore._file_version): the completeness checks of a rerun hash each shard once, not at every check.
_VERIFIED_DIGESTS: dict[tuple, str] = {}


class ArtifactStore:
    """Reads and writes stages and checkpoints under `root` (a local folder or an fsspec URI).

    Credentials for object storage come from the environment (AWS_ACCESS_KEY_ID, ...), never from here.
    """

    def __init__(self, root: str, endpoint_url: str | None = None, cache_dir: str = "~/.cache/alignment_core",
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
        from alignment_core.lease import check_lease

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

    # ---- compare-and-swap documents (the run lease, alignment_core/lease.py) ------------------------------
    # A version names one write of a document: the ETag on S3, the sha256 of the bytes elsewhere. Locally,
    # creation is a hard link of a finished temporary file (fails if the name exists, like O_EXCL, and never
    # shows a half-written file); replace and delete run under an flock of the parent folder. On S3 creation
    # is a conditional PUT (`If-None-Match: *`), replace a PUT with `If-Match: <etag>`, delete a DELETE with
    # `If-Match` (AWS S3 and moto honour all three). Other filesystems get write-then-read-back: two writers
    # racing within one round trip can both believe they won, which the conditional forms rule out.
    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Write `uri` only if it does not exist; True when this call created it."""
        path = self._path(uri)
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = self._local_temp(path, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self._s3:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
        else:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
        # A server that ignores If-None-Match overwrites instead of refusing: the read-back sees a later writer.
        current = self.read_versioned(uri)
        return current is not None and current[0] == data

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        """(bytes, version) of `uri`, or None if it does not exist."""
        path = self._path(uri)
        if self._s3:
            bucket, key, _ = self.fs.split_path(path)

            async def get() -> tuple[bytes, str]:
                response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                try:
                    return await response["Body"].read(), response["ETag"]
                finally:
                    response["Body"].close()

            try:
                return sync(self.fs.loop, get)
            except FileNotFoundError:
                return None
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, uri: str, data: bytes, version: str) -> bool:
        """Overwrite `uri` only if it still holds `version`; True when this call replaced it."""
        path = self._path(uri)
        if self._local:
            with self._local_lock(path):
                if not self._holds(uri, version):
                    return False
                os.replace(self._local_temp(path, data), path)
                return True
        if self._s3:
            try:
                self.fs.pipe_file(path, data, IfMatch=version)
            except OSError:
                if not self._holds(uri, version):
                    return False  # 412 Precondition Failed: someone else wrote in between
                raise
        else:
            if not self._holds(uri, version):
                return False
            self.fs.pipe_file(path, data)
        current = self.read_versioned(uri)
        return current is not None and current[0] == data

    def delete_if(self, uri: str, version: str) -> bool:
        """Delete `uri` only if it still holds `version`; True when this call deleted it."""
        path = self._path(uri)
        if self._local:
            with self._local_lock(path):
                if not self._holds(uri, version):
                    return False
                os.unlink(path)
                return True
        if self._s3:
            bucket, key, _ = self.fs.split_path(path)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            except OSError:
                if not self._holds(uri, version):
                    return False
                raise
            self.fs.invalidate_cache(path)
            return True
        if not self._holds(uri, version):
            return False
        self.fs.rm_file(path)
        return True

    def _holds(self, uri: str, version: str) -> bool:
        """Whether `uri` exists and still holds `version`."""
        current = self.read_versioned(uri)
        return current is not None and current[1] == version

    @property
    def _local(self) -> bool:
        return self.protocol in ("file", "local")

    @property
    def _s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    @staticmethod
    def _local_temp(path: str, data: bytes) -> str:
        """`data` in a hidden temporary file beside `path`, on disk; a write that fails (a full disk) removes it."""
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    @staticmethod
    @contextlib.contextmanager
    def _local_lock(path: str):
        """An exclusive flock on the file's folder: serialises read-compare-write between processes."""
        import fcntl

        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # ---- stages -------------------------------------------------------------------------------------
    def read_manifest(self, stage_uri: str) -> dict | None:
        uri = f"{stage_uri}/{MANIFEST}"
        self.fs.invalidate_cache()
        return self.read_json(uri) if self.exists(uri) else None

    def is_complete(self, stage_uri: str, fingerprint: dict[str, Any]) -> bool:
        """A manifest of this fingerprint whose shards are all there, of the recorded size, rows and sha256.

        A damaged stage is not complete: the stage function redoes its missing or damaged shards.
        """
        manifest = self.read_manifest(stage_uri)
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

    # ---- checkpoints --------------------------------------------------------------------------------
    # Locally a save is a directory swap. On object storage, where a folder cannot be renamed, a save uploads
    # the new checkpoint beside the live one, into `{uri}/.v-<id>/`, then switches the pointer
    # `{uri}/_live.json` (one PUT, written last) to it, then deletes the old version (and whatever a crashed
    # save left). A save killed at any moment leaves the previous checkpoint live and whole. Readers follow the
    # pointer; a checkpoint without one (local, or written before versions) is the folder itself.
    def _checkpoint_dir(self, uri: str) -> str:
        """The folder holding the checkpoint's files: its live version on object storage, else `uri`."""
        if self._local:
            return uri
        try:  # one GET (no open-then-read, which fails when a save switches the pointer in between)
            pointer = json.loads(self.fs.cat_file(self._path(f"{uri}/{CHECKPOINT_POINTER}")))
        except FileNotFoundError:
            return uri
        return f"{uri}/{check_segment(pointer['version'], 'checkpoint version')}"

    def checkpoint_complete(self, uri: str) -> bool:
        """A finished checkpoint (a round's final save), not a mid-round resume point."""
        return self.checkpoint_marker(uri) == CHECKPOINT_MARKER

    def checkpoint_marker(self, uri: str) -> str | None:
        """CHECKPOINT_MARKER (finished), RESUME_MARKER (a mid-round resume point) or None (nothing usable)."""
        return self._checkpoint_state(uri)[1]

    def _checkpoint_state(self, uri: str) -> tuple[str, str | None]:
        """(the folder of the checkpoint's live version, the marker found in that same folder)."""
        self.fs.invalidate_cache()
        folder = self._checkpoint_dir(uri)
        for _ in range(3):
            found = next((m for m in (CHECKPOINT_MARKER, RESUME_MARKER) if self.exists(f"{folder}/{m}")), None)
            if found is not None or folder == (folder := self._checkpoint_dir(uri)):
                return folder, found
            # a save switched to a new version (and deleted the one read) in between: look at the new one
        return folder, None

    def save_checkpoint(self, model, tokenizer, uri: str, extra_files: dict[str, bytes] | None = None,
                        final: bool = True, state_dict: dict | None = None) -> str:
        """save_pretrained (safetensors) + tokenizer + extra files, then the completion marker last.

        The files are written next to the target and swapped in (locally) or uploaded beside the live version
        and switched to by the pointer (object storage), so a reader never loads a checkpoint that is half
        written, and a save that dies leaves the previous one in place. `final=False` is a
        mid-round save (`training.save_every_steps`): marked as a resume point, never as complete, so a
        half-trained or aborted round does not count as a finished iteration. `state_dict`: the full weights
        where the model holds only its shard of them (FSDP).
        """
        marker_name = CHECKPOINT_MARKER if final else RESUME_MARKER
        self.check_lease(uri)
        with tempfile.TemporaryDirectory() as tmp:
            # A peft model writes its adapter only; its embeddings are not adapted, so peft need not look its
            # base up (by name, possibly on the hub) to decide whether to save them.
            adapter_only = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, **adapter_only)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, data in (extra_files or {}).items():
                Path(tmp, name).parent.mkdir(parents=True, exist_ok=True)
                Path(tmp, name).write_bytes(data)
            files = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
            marker = {"files": files, "saved_at": time.time(), "package_version": __version__, "final": final}
            Path(tmp, marker_name).write_text(json.dumps(marker, indent=2))
            if self.protocol in ("file", "local"):
                self._swap_local_dir(tmp, self._path(uri))
            else:
                path, version = self._path(uri), f"{CHECKPOINT_VERSION_PREFIX}{uuid.uuid4().hex[:16]}"
                for name in [*files, marker_name]:
                    self.fs.put_file(os.path.join(tmp, name), f"{path}/{version}/{name}")
                self.check_lease(uri)  # still this run's writer: switch
                self.write_json(f"{uri}/{CHECKPOINT_POINTER}", {"version": version, "saved_at": marker["saved_at"]})
                self._drop_stale_versions(uri, keep=version)
        return uri

    def _drop_stale_versions(self, uri: str, keep: str) -> None:
        """After a switch: delete everything under an object-store checkpoint but the pointer and the live
        version (the replaced version, a crashed save's partial upload, files of the pre-version layout, the
        replaced checkpoint's lineage.json)."""
        self.fs.invalidate_cache()
        for entry in self.fs.ls(self._path(uri), detail=False):
            if os.path.basename(entry.rstrip("/")) not in (CHECKPOINT_POINTER, keep):
                self.fs.rm(entry, recursive=True)
        self.fs.invalidate_cache()

    @staticmethod
    def _swap_local_dir(src: str, dst: str) -> None:
        import shutil

        parent = os.path.dirname(dst)
        os.makedirs(parent, exist_ok=True)
        # What a save killed here before left (`.checkpoint.<id>.tmp`, `.checkpoint.<id>.tmp.old`) goes first.
        for leftover in Path(parent).glob(f".{glob.escape(os.path.basename(dst))}.*.tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = os.path.join(parent, f".{os.path.basename(dst)}.{uuid.uuid4().hex}.tmp")
        shutil.copytree(src, staging)
        if os.path.exists(dst):
            old = f"{staging}.old"
            os.replace(dst, old)
            os.replace(staging, dst)
            shutil.rmtree(old)
        else:
            os.replace(staging, dst)

    def local_checkpoint(self, uri: str, resume_point: bool = False) -> str:
        """A local folder holding the checkpoint at `uri`, for from_pretrained; remote ones are cached.

        Only finished checkpoints, unless `resume_point` (the trainer resuming a round) also accepts a
        mid-round save.
        """
        folder, marker_name = self._checkpoint_state(uri)  # one pointer read: the marker is that folder's
        if marker_name is None or (marker_name == RESUME_MARKER and not resume_point):
            raise FileNotFoundError(f"checkpoint {uri} is missing or incomplete (no {CHECKPOINT_MARKER})")
        if self.protocol in ("file", "local"):
            return self._path(uri)
        marker = self.read_json(f"{folder}/{marker_name}")
        key = hashlib.sha256(f"{folder}|{marker['saved_at']}".encode()).hexdigest()[:16]
        local = self.cache_dir / "checkpoints" / key
        if not (local / marker_name).exists():
            staging = Path(tempfile.mkdtemp(dir=self.cache_dir.mkdir(parents=True, exist_ok=True) or self.cache_dir))
            for name in marker["files"]:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(f"{self._path(folder)}/{name}", str(staging / name))
                except FileNotFoundError:  # a save switched to a newer version and deleted this one meanwhile
                    import shutil

                    shutil.rmtree(staging)
                    if folder == self._checkpoint_dir(uri):
                        raise
                    return self.local_checkpoint(uri, resume_point)
            (staging / marker_name).write_text(json.dumps(marker))
            local.parent.mkdir(parents=True, exist_ok=True)
            if local.exists():  # a concurrent download won the race; both copies are identical
                import shutil

                shutil.rmtree(staging)
            else:
                os.replace(staging, local)
        return str(local)


class StageWriter:
    """Writes one stage shard by shard; resumes at the first missing shard of the same fingerprint."""

    def __init__(self, store: ArtifactStore, stage_uri: str, schema_name: str, fingerprint: dict[str, Any]):
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
