"""S3 errors during writes: a fault proxy (tests/faults/s3proxy.py) in front of the loopback S3 server answers
some PUTs with 503 SlowDown and drops the connection halfway through others. A stage write and a checkpoint save
through it end whole, with exactly what a clean write gives, and a reader watching the bucket directly (another
thread, polling throughout) never sees a manifest over missing or partial shards, nor a checkpoint that is not
whole. Which layer completed the work is recorded in the fault matrix's note: the S3 client's own retries, or
(when an error surfaces from the write) a rerun of the write.
"""

import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from alignment_core.models import load_causal_lm, load_tokenizer
from alignment_core.records import METRICS, from_rows
from alignment_core.store import CHECKPOINT_POINTER, MANIFEST, ArtifactStore
from tests.conftest import fault_note
from tests.faults.s3proxy import FaultProxy

# Every other PUT fails, alternately 503 and dropped: each write fails once, its retry gets through.
SCHEDULE = {n: ("503" if n % 4 == 1 else "drop") for n in range(1, 40, 2)}


def metrics_table(start: int, n: int) -> pa.Table:
    return from_rows([{"step": s, "split": "train", "metric": "loss", "value": s / 7} for s in range(start, start + n)],
                     METRICS)


class Watcher:
    """Polls the bucket directly (not through the proxy) from another thread until stopped; `check()` returns
    what it saw wrong, or None."""

    def __init__(self, check):
        self.check, self.violations, self.polls = check, [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                problem = self.check()
            except Exception as error:  # noqa: BLE001 - anything a reader trips over is a finding
                problem = f"{type(error).__name__}: {error}"
            if problem:
                self.violations.append(problem)
            self.polls += 1

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def write_through(proxy: FaultProxy, write) -> str:
    """Run `write`; if an error surfaces from it, run it again (what the stage task's retry or a rerun does).
    Returns which of the two completed it."""
    try:
        write()
        return "the S3 client's retries (no error surfaced)"
    except Exception as error:  # noqa: BLE001
        write()
        return f"a rerun after {type(error).__name__} surfaced"


def summary(proxy: FaultProxy) -> str:
    counts = Counter(fault for _, fault in proxy.injected)
    return f"{counts['503']}x503 + {counts['drop']}x dropped of {len(proxy.puts)} PUTs"


@pytest.mark.fault("S3 fault proxy: stage write")
def test_a_stage_written_through_faults_is_whole_and_never_half_visible(request, s3_server, tmp_path):
    tables = [metrics_table(50 * i, 50) for i in range(6)]
    bucket = f"s3://artifacts/proxy-stage-{tmp_path.name}"
    direct = ArtifactStore(bucket, endpoint_url=s3_server)
    clean_uri, uri = direct.stage_uri("clean", 1, "metrics"), direct.stage_uri("faulty", 1, "metrics")
    clean = direct.write_stage(clean_uri, "metrics", {"v": 1}, tables)

    def check():
        manifest = direct.read_manifest(uri)
        direct.fs.invalidate_cache()
        visible = [p for p in direct.fs.find(direct._path(uri)) if p.endswith(".parquet")]
        for path in visible:  # a shard is never visible half written
            pq.read_table(pa.BufferReader(direct.fs.cat_file(path)))
        if manifest is not None:
            problems = direct.verify_stage(uri, manifest)
            return f"manifest over a damaged stage: {problems}" if problems else None
        return None

    proxy = FaultProxy(s3_server, schedule=SCHEDULE)
    watcher = Watcher(check)
    try:
        faulty = ArtifactStore(bucket, endpoint_url=proxy.url)
        completed_by = write_through(proxy, lambda: faulty.write_stage(uri, "metrics", {"v": 1}, tables))
    finally:
        watcher.finish()
        proxy.close()
    assert watcher.violations == [] and watcher.polls > 0
    assert len(proxy.injected) >= 8  # the plan, shards and manifest were each hit
    assert {path.rsplit("/", 1)[-1] for path, _ in proxy.injected} >= {"_stage.json", MANIFEST, "part-00000.parquet"}
    manifest = direct.read_manifest(uri)
    assert manifest["shards"] == clean["shards"] and manifest["rows"] == 300
    assert direct.read_pandas(uri).equals(direct.read_pandas(clean_uri))
    fault_note(request, f"{summary(proxy)}; completed by {completed_by}; watcher polled {watcher.polls}x, 0 half-"
                        "visible")


@pytest.mark.fault("S3 fault proxy: checkpoint save")
def test_a_checkpoint_saved_through_faults_is_whole_and_the_old_one_stays_live(request, s3_server, tmp_path,
                                                                                tiny_model_dir):
    bucket = f"s3://artifacts/proxy-checkpoint-{tmp_path.name}"
    direct = ArtifactStore(bucket, endpoint_url=s3_server, cache_dir=str(tmp_path / "cache"))
    uri = direct.checkpoint_uri("r", 1)
    tokenizer, old = load_tokenizer(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    direct.save_checkpoint(old, tokenizer, uri)
    new = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.mul_(0.5)

    def check():
        direct.fs.invalidate_cache()
        if not direct.checkpoint_complete(uri):
            return "no finished checkpoint live"
        folder = direct._checkpoint_dir(uri)
        marker = direct.read_json(f"{folder}/_complete.json")
        missing = [name for name in marker["files"] if not direct.fs.exists(direct._path(f"{folder}/{name}"))]
        if missing and direct._checkpoint_dir(uri) == folder:  # (not: replaced and deleted while we looked)
            return f"live checkpoint {folder} misses {missing}"
        return None

    proxy = FaultProxy(s3_server, schedule=SCHEDULE)
    watcher = Watcher(check)
    try:
        faulty = ArtifactStore(bucket, endpoint_url=proxy.url, cache_dir=str(tmp_path / "cache-faulty"))
        completed_by = write_through(proxy, lambda: faulty.save_checkpoint(new, tokenizer, uri))
    finally:
        watcher.finish()
        proxy.close()
    assert watcher.violations == [] and watcher.polls > 0
    assert any(path.endswith(".safetensors") for path, _ in proxy.injected)
    assert any(path.endswith(CHECKPOINT_POINTER) for path, _ in proxy.injected)
    saved = load_causal_lm(direct.local_checkpoint(uri)).state_dict()
    assert all(torch.equal(saved[name], value) for name, value in new.state_dict().items())
    direct.fs.invalidate_cache()
    live = direct.read_json(f"{uri}/{CHECKPOINT_POINTER}")["version"]
    names = sorted(p.rsplit("/", 1)[-1] for p in direct.fs.ls(direct._path(uri), detail=False))
    assert names == sorted([CHECKPOINT_POINTER, live])  # the old version went after the switch
    fault_note(request, f"{summary(proxy)}; completed by {completed_by}; watcher polled {watcher.polls}x, old "
                        "checkpoint live until the switch")
