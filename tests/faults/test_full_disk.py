"""A full disk mid-write: the write fails with ENOSPC (raised where a file system reports it, at fsync), and
no hidden temporary (`.part-*.tmp`) is left in the stage folder; once there is room the stage is written."""

import errno
import os
from pathlib import Path

import pytest

from alignment_core.store import ArtifactStore
from tests.conftest import fault_note
from tests.test_verified_shards import TABLES


@pytest.mark.fault("full disk mid-write (ENOSPC)")
def test_a_write_failing_on_a_full_disk_leaves_no_temporary(request, tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    uri = store.stage_uri("r", 1, "metrics")
    real_fsync, synced = os.fsync, []

    def fsync_until_full(fd: int) -> None:
        if len(synced) == 2:  # the stage plan and shard 0 fit; shard 1 does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(OSError) as failure:
        store.write_stage(uri, "metrics", {"v": 1}, TABLES)
    assert failure.value.errno == errno.ENOSPC
    assert sorted(p.name for p in Path(uri).iterdir()) == ["_stage.json", "part-00000.parquet"]

    monkeypatch.setattr(os, "fsync", real_fsync)  # room again: the stage resumes at shard 1
    manifest = store.write_stage(uri, "metrics", {"v": 1}, TABLES)
    assert manifest["rows"] == 12 and store.read_pandas(uri)["step"].tolist() == list(range(12))
    assert not [p.name for p in Path(uri).iterdir() if p.name.endswith(".tmp")]
    fault_note(request, "ENOSPC at shard 1's fsync; no .part-*.tmp left; resumed at shard 1")
