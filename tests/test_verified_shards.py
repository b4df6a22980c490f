"""Verified shards: manifests record each shard's rows, bytes and sha256; a damaged stage is not complete,
reading it names what differs, and the pipeline redoes it."""

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from alignment_core.store import ArtifactStore, DamagedStageError
from tests.helpers import metrics_table

REPO = Path(__file__).resolve().parent.parent



TABLES = [metrics_table(0, 4), metrics_table(4, 4), metrics_table(8, 4)]


def truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "bytes \\(the manifest records"


def fewer_rows(path: Path) -> str:
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)
    return "rows \\(the manifest records"


def delete(path: Path) -> str:
    path.unlink()
    return "is missing"


@pytest.fixture
def finished(tmp_path):
    store = ArtifactStore(str(tmp_path))
    uri = store.stage_uri("r", 1, "metrics")
    manifest = store.write_stage(uri, "metrics", {"v": 1}, TABLES)
    return store, uri, manifest


def test_the_manifest_records_rows_bytes_and_sha256_of_each_shard(finished):
    store, uri, manifest = finished
    for record, table in zip(manifest["shards"], TABLES, strict=True):
        data = Path(uri, record["name"]).read_bytes()
        assert record["rows"] == table.num_rows == pq.read_table(io.BytesIO(data)).num_rows
        assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert store.verify_stage(uri) == []
    assert store.is_complete(uri, {"v": 1})
    # A writer opened on an intact finished stage (a late fan-out worker, say) leaves it complete.
    assert store.stage_writer(uri, "metrics", {"v": 1}).done_shards == {0, 1, 2}
    assert store.is_complete(uri, {"v": 1})


@pytest.mark.parametrize("damage", [truncate, fewer_rows, delete])
@pytest.mark.fault("shard damaged (local)")
def test_a_damaged_stage_is_not_complete_names_the_shard_and_is_redone(finished, damage):
    store, uri, manifest = finished
    original = store.read_pandas(uri)
    differs = damage(Path(uri, "part-00001.parquet"))
    with pytest.raises(DamagedStageError, match=f"stage {uri} is damaged: part-00001.parquet .*{differs}"):
        store.read_pandas(uri)
    assert not store.is_complete(uri, {"v": 1})
    untouched = {name: Path(uri, name).stat().st_mtime_ns for name in ("part-00000.parquet", "part-00002.parquet")}

    writer = store.stage_writer(uri, "metrics", {"v": 1})
    assert writer.done_shards == {0, 2}  # the damaged shard is redone, the others are kept
    assert store.read_manifest(uri) is None  # not complete until it is finished again
    store.write_stage(uri, "metrics", {"v": 1}, TABLES)
    pd.testing.assert_frame_equal(store.read_pandas(uri), original)
    assert {name: Path(uri, name).stat().st_mtime_ns for name in untouched} == untouched
    assert store.read_manifest(uri)["shards"] == manifest["shards"]
    assert store.verify_stage(uri) == []


def rewrite_same_size(path: Path) -> None:
    """Other bytes, same size, still a readable Parquet file with the same rows: only the sha256 tells."""
    data = path.read_bytes()
    assert b"parquet-cpp-arrow" in data  # the footer's created_by
    path.write_bytes(data.replace(b"parquet-cpp-arrow", b"parquet-cpp-arrOw"))


def test_a_same_size_rewrite_is_caught_by_the_checksum(finished):
    store, uri, _ = finished
    rewrite_same_size(Path(uri, "part-00000.parquet"))
    assert len(pq.read_table(Path(uri, "part-00000.parquet"))) == 4  # sizes and rows still match
    [problem] = store.verify_stage(uri)
    assert problem.startswith("part-00000.parquet has sha256 ")
    assert not store.is_complete(uri, {"v": 1})
    with pytest.raises(DamagedStageError, match="part-00000.parquet has sha256"):
        store.read_pandas(uri)


def test_a_shard_is_hashed_once_per_process_until_its_file_changes(finished):
    store, uri, _ = finished
    reads = []
    real_cat_file = store.fs.cat_file
    store.fs.cat_file = lambda path, *a, **k: reads.append(os.path.basename(path)) or real_cat_file(path, *a, **k)
    assert store.is_complete(uri, {"v": 1}) and store.is_complete(uri, {"v": 1})
    assert ArtifactStore(str(Path(uri).parents[2])).is_complete(uri, {"v": 1})  # another store, same process
    assert sorted(reads) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    reads.clear()
    rewrite_same_size(Path(uri, "part-00001.parquet"))
    assert not store.is_complete(uri, {"v": 1})
    assert reads == ["part-00001.parquet"]  # only the changed file is read again


def test_inspect_verify_checks_every_stage(finished, tmp_path):
    store, uri, _ = finished
    store.write_stage(store.stage_uri("r", 1, "prompts_like"), "metrics", {"v": 2}, [metrics_table(0, 2)])

    def inspect() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alignment_core.inspect", str(tmp_path / "r"), "--verify"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    ok = inspect()
    assert ok.returncode == 0, ok.stderr
    assert "verify: 2 finished stages, every shard matches its manifest" in ok.stdout
    rewrite_same_size(Path(uri, "part-00002.parquet"))
    damaged = inspect()
    assert damaged.returncode == 1
    assert "DAMAGED iter-001/metrics: part-00002.parquet has sha256" in damaged.stdout


@pytest.mark.fault("shard truncated (S3)")
def test_damage_on_s3_is_found_and_redone(s3_server):
    store = ArtifactStore("s3://artifacts/verified", endpoint_url=s3_server)
    uri = store.stage_uri("r", 1, "metrics")
    store.write_stage(uri, "metrics", {"v": 1}, TABLES)
    path = store._path(f"{uri}/part-00002.parquet")
    store.fs.pipe_file(path, store.fs.cat_file(path)[:100])
    with pytest.raises(DamagedStageError, match=r"part-00002.parquet has 100 bytes \(the manifest records"):
        store.read_pandas(uri)
    assert not store.is_complete(uri, {"v": 1})
    store.write_stage(uri, "metrics", {"v": 1}, TABLES)
    assert store.read_pandas(uri)["step"].tolist() == list(range(12))
    assert store.verify_stage(uri) == []


# ---- the pipeline redoes a damaged stage from its inputs --------------------------------------------------
@pytest.mark.slow
@pytest.mark.fault("damaged shards redone by a flow rerun")
def test_a_rerun_redoes_damaged_stages_to_the_same_rows(tmp_path, tiny_model_dir):
    from tests.helpers import prefect_env, run_flow, write_config

    root = tmp_path / "store"
    config = write_config(tmp_path, str(root), iterations=1, evaluation={"enabled": False},
                          model={"policy": str(tiny_model_dir)})
    run_flow(config, prefect_env(tmp_path))
    store = ArtifactStore(str(root))
    keys = {"generations": "generation_id", "annotations": "annotation_id", "units": "unit_id"}
    original = {stage: store.read_pandas(store.stage_uri("e2e", 1, stage)) for stage in keys}
    checkpoint_marker = Path(store.checkpoint_uri("e2e", 1), "_complete.json").read_text()

    damages = {"generations": ("part-00001.parquet", truncate), "annotations": ("part-00000.parquet", fewer_rows),
               "units": ("part-00000.parquet", delete)}
    for stage, (shard, damage) in damages.items():
        uri = store.stage_uri("e2e", 1, stage)
        differs = damage(Path(uri, shard))
        with pytest.raises(DamagedStageError, match=f"stage {uri} is damaged: {shard} .*{differs}"):
            store.read_pandas(uri)
    listed = subprocess.run([sys.executable, "-m", "alignment_core.inspect", str(root / "e2e"), "--verify"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 1 and listed.stdout.count("DAMAGED iter-001/") == 3, listed.stdout

    run_flow(config, prefect_env(tmp_path))
    for stage, key in keys.items():
        redone = store.read_pandas(store.stage_uri("e2e", 1, stage))
        pd.testing.assert_frame_equal(redone.sort_values(key).reset_index(drop=True),
                                      original[stage].sort_values(key).reset_index(drop=True), obj=stage)
        manifest = json.loads(Path(store.stage_uri("e2e", 1, stage), "_manifest.json").read_text())
        assert all(os.path.exists(Path(store.stage_uri("e2e", 1, stage), s["name"])) for s in manifest["shards"])
    # The redone stages have their old fingerprints: nothing downstream was redone.
    assert Path(store.checkpoint_uri("e2e", 1), "_complete.json").read_text() == checkpoint_marker
    verified = subprocess.run([sys.executable, "-m", "alignment_core.inspect", str(root / "e2e"), "--verify"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout


def test_a_config_that_still_sets_verify_checksums_loads_with_a_deprecation_warning():
    from alignment_core.config import parse_config

    with pytest.warns(FutureWarning, match="store.verify_checksums is deprecated and ignored"):
        cfg = parse_config({"store": {"verify_checksums": False}})
    assert cfg.store.verify_checksums is False
