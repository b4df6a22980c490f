"""Checkpoints in the store: saved whole or not at all (a directory swap locally, a versioned folder and a
pointer written last on object storage), marked complete or as a resume point, and copied to a local folder to
load."""

import glob
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

from alignment_core import __version__
from alignment_core.config import check_segment
from alignment_core.store.shards import (
    CHECKPOINT_MARKER,
    CHECKPOINT_POINTER,
    CHECKPOINT_VERSION_PREFIX,
    RESUME_MARKER,
)

log = logging.getLogger(__name__)


class CheckpointFiles:
    """ArtifactStore's checkpoints (a mixin: it uses the store's file system, paths and lease checks)."""

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
