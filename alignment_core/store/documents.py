"""Small documents written with compare-and-swap: what the run lease (alignment_core/lease.py) is built on."""

import contextlib
import hashlib
import logging
import os
import uuid

from fsspec.asyn import sync

log = logging.getLogger(__name__)


class CompareAndSwapDocuments:
    """ArtifactStore's compare-and-swap documents (a mixin: it uses the store's file system and paths)."""

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
