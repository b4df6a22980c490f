"""The run lease: one writer per run, on a local folder and on S3 (moto), between real processes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from alignment_core.config import parse_config
from alignment_core.lease import LeaseHeld, LeaseLost, RunLease, check_lease, read_lease
from alignment_core.records import PROMPTS, from_rows
from alignment_core.store import ArtifactStore
from tests.helpers import metrics_table

REPO = Path(__file__).resolve().parent.parent

HOLDER = textwrap.dedent("""
    import sys, time
    from alignment_core.lease import RunLease
    from alignment_core.store import ArtifactStore
    store = ArtifactStore(sys.argv[1], endpoint_url=sys.argv[2] or None)
    lease = RunLease(store, "r", holder={"flow_run_id": "run-of-the-holder"}, timeout_s=float(sys.argv[3])).acquire()
    print("held", lease.token, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    lease.release()
    print("released", flush=True)
""")

RACER = textwrap.dedent("""
    import os, sys, time
    from alignment_core.lease import LeaseHeld, RunLease
    from alignment_core.store import ArtifactStore
    store = ArtifactStore(sys.argv[1], endpoint_url=sys.argv[2] or None)
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.001)
    try:
        lease = RunLease(store, "r", timeout_s=600).acquire()
        print("won", lease.token, flush=True)
    except LeaseHeld:
        print("held", flush=True)
    while not os.path.exists(sys.argv[4]):  # the winner stays alive (a dead owner's lease is free) until all ran
        time.sleep(0.01)
    os._exit(0)  # the winner's lease stays in the store: the test reads who won
""")


def race(root: str, endpoint: str, tmp_path: Path, name: str, n: int) -> list[list[str]]:
    """n processes acquire the lease at the same instant; each one's output, once all have tried."""
    go, done = tmp_path / f"go-{name}", tmp_path / f"done-{name}"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, root, endpoint, str(go), str(done)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True) for _ in range(n)]
    time.sleep(4)  # imports done: all wait on the start file
    go.touch()
    outputs = [racer.stdout.readline().split() for racer in racers]
    done.touch()
    for racer in racers:
        racer.wait(timeout=60)
    return outputs



def start_holder(root: str, endpoint: str = "", timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, root, endpoint, str(timeout_s)], cwd=REPO,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().split()
    assert line[:1] == ["held"], line
    return process, line[1]


# ---- one writer at a time --------------------------------------------------------------------------------
def test_a_second_owner_gets_the_holder_named_and_writes_nothing(tmp_path):
    root = str(tmp_path / "store")
    holder, token = start_holder(root)
    try:
        store = ArtifactStore(root)
        with pytest.raises(LeaseHeld) as error:
            RunLease(store, "r", holder={"flow_run_id": "second"}).acquire()
        message = str(error.value)
        assert "flow_run_id run-of-the-holder" in message and f"pid {holder.pid}" in message
        assert f"host {os.uname().nodename}" in message and " since " in message and "expires" in message
        assert read_lease(store, "r")[0]["token"] == token  # untouched
        # A writer that holds no lease (a notebook) may not write into a leased run either.
        with pytest.raises(LeaseHeld):
            store.stage_writer(store.stage_uri("r", 1, "metrics"), "metrics", {"v": 1})
        assert not (tmp_path / "store" / "r" / "iter-001").exists()
    finally:
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "released"
        holder.wait(timeout=30)
    assert read_lease(store, "r") is None
    with RunLease(store, "r") as lease:  # released: the run is free
        assert read_lease(store, "r")[0]["token"] == lease.token
    assert read_lease(store, "r") is None


def test_racing_processes_one_wins(tmp_path):
    """Eight processes start to acquire at the same instant, on a free run and on an expired lease."""
    root = str(tmp_path / "store")
    store = ArtifactStore(root)
    for expired in (False, True):
        if expired:
            store.write_json(store.uri("r", "_lease.json"), {"token": "old", "expires_at": time.time() - 1,
                                                             "holder": {"host": "elsewhere", "pid": 1}})
        outputs = race(root, "", tmp_path, str(expired), 8)
        winners = [out[1] for out in outputs if out[:1] == ["won"]]
        assert len(winners) == 1, outputs
        assert sum(out == ["held"] for out in outputs) == 7
        assert read_lease(store, "r")[0]["token"] == winners[0]
        os.unlink(tmp_path / "store" / "r" / "_lease.json")


def test_heartbeat_keeps_a_long_run_leased(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with RunLease(store, "r", timeout_s=1.0) as lease:  # renewed every 0.25 s
        first = read_lease(store, "r")[0]
        time.sleep(2.5)
        renewed = read_lease(store, "r")[0]
        assert renewed["token"] == lease.token and renewed["expires_at"] > first["expires_at"] + 1.5
        with pytest.raises(LeaseHeld):
            RunLease(store, "r").acquire()
        assert lease.lost is None


def test_an_expired_lease_is_taken_over_and_its_old_owner_stops_writing(tmp_path):
    store = ArtifactStore(str(tmp_path))
    stalled = RunLease(store, "r", holder={"flow_run_id": "stalled"}, timeout_s=0.5, heartbeat_s=3600).acquire()
    old_store = ArtifactStore(str(tmp_path), lease_token=stalled.token)
    uri = old_store.stage_uri("r", 1, "metrics")
    old_writer = old_store.stage_writer(uri, "metrics", {"v": 1})
    old_writer.write_shard(0, metrics_table(0, 2))
    with pytest.raises(LeaseHeld, match="flow_run_id stalled"):
        RunLease(store, "r").acquire()  # live (and our own process is alive): not taken
    time.sleep(0.6)

    with RunLease(store, "r", holder={"flow_run_id": "new"}) as new:
        assert read_lease(store, "r")[0]["holder"]["flow_run_id"] == "new"
        assert not stalled.renew() and "taken over" in stalled.lost and "flow_run_id new" in stalled.lost
        with pytest.raises(LeaseLost, match="is gone"):
            old_writer.write_shard(1, metrics_table(2, 2))
        with pytest.raises(LeaseLost):
            old_store.stage_writer(uri, "metrics", {"v": 2})  # would clear the stage: refused
        new_store = ArtifactStore(str(tmp_path), lease_token=new.token)
        new_store.write_stage(uri, "metrics", {"v": 2}, [metrics_table(10, 3)])
        assert json.loads((tmp_path / "r" / "iter-001" / "metrics" / "_stage.json").read_text())[
            "lease_token"] == new.token
        stalled.release()  # not its lease any more: leaves the new owner's alone
        assert read_lease(store, "r")[0]["token"] == new.token
    assert new_store.read_pandas(uri)["step"].tolist() == [10, 11, 12]


def test_a_lease_written_elsewhere_and_expired_is_taken_over(tmp_path):
    store = ArtifactStore(str(tmp_path))
    store.write_json(store.uri("r", "_lease.json"), {
        "token": "crashed", "acquired_at": time.time() - 900, "expires_at": time.time() - 300,
        "holder": {"host": "another-machine", "pid": 4242, "process": {"boot_id": "other"}}})
    with RunLease(store, "r") as lease:
        assert read_lease(store, "r")[0]["token"] == lease.token


@pytest.mark.fault("SIGKILL of the lease holder")
def test_an_owner_killed_on_this_machine_is_taken_over_at_once(tmp_path):
    root = str(tmp_path / "store")
    holder, token = start_holder(root, timeout_s=600)
    store = ArtifactStore(root)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_lease(store, "r")[0]["token"] == token  # never released, far from expiry
    with RunLease(store, "r") as lease:
        assert lease.token != token


def test_a_stage_written_under_another_live_lease_is_not_cleared(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with RunLease(store, "r") as first:
        first_store = ArtifactStore(str(tmp_path), lease_token=first.token)
        uri = first_store.stage_uri("r", 1, "metrics")
        writer = first_store.stage_writer(uri, "metrics", {"config": "first"})
        writer.write_shard(0, metrics_table(0, 2))
        plan = json.loads((tmp_path / "r" / "iter-001" / "metrics" / "_stage.json").read_text())
        assert plan["lease_token"] == first.token
        for intruder in (ArtifactStore(str(tmp_path)), ArtifactStore(str(tmp_path), lease_token="forged")):
            with pytest.raises((LeaseHeld, LeaseLost)):
                intruder.stage_writer(uri, "metrics", {"config": "second"})
        assert (tmp_path / "r" / "iter-001" / "metrics" / "part-00000.parquet").exists()
        writer.finish()
    assert ArtifactStore(str(tmp_path)).read_pandas(uri)["step"].tolist() == [0, 1]


def test_run_lease_helper_takes_verifies_and_releases(tmp_path):
    from flows.common import run_lease

    cfg = parse_config({"store": {"root": str(tmp_path), "run_name": "r", "lease_timeout_s": 30}})
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(ValueError, match="the flow failed"), run_lease(cfg) as leased:
        lease = read_lease(store, "r")[0]
        assert leased.store.lease_token == lease["token"] and lease["timeout_s"] == 30
        # A dispatched stage flow's config carries the token: verified, not taken, not released.
        with run_lease(leased) as stage_cfg:
            assert stage_cfg.store.lease_token == lease["token"]
        assert read_lease(store, "r")[0]["token"] == lease["token"]
        with pytest.raises(LeaseHeld):
            with run_lease(cfg):
                pass
        raise ValueError("the flow failed")
    assert read_lease(store, "r") is None  # released on failure too
    with pytest.raises(LeaseLost):  # a stage flow whose orchestrator's lease is gone does nothing
        with run_lease(leased):
            pass


def test_stage_flow_writes_under_the_orchestrators_lease(tmp_path, tiny_model_dir):
    from flows.stages import generate_stage

    cfg = parse_config({
        "model": {"policy": str(tiny_model_dir)},
        "generation": {"backend": "transformers", "n_samples": 2, "max_new_tokens": 4, "shard_size": 2},
        "store": {"root": str(tmp_path), "run_name": "r"}})
    store = ArtifactStore(str(tmp_path))
    prompts = [{"prompt_id": f"p{i}", "prompt": f"Say {i}", "prompt_messages": [{"role": "user",
                                                                                   "content": f"Say {i}"}]}
               for i in range(3)]
    with RunLease(store, "r") as orchestrator:
        leased = cfg.model_copy(update={"store": cfg.store.model_copy(update={"lease_token": orchestrator.token})})
        prompts_uri = store.stage_uri("r", 1, "prompts")
        ArtifactStore(str(tmp_path), lease_token=orchestrator.token).write_stage(
            prompts_uri, "prompts", {"p": 1}, [from_rows(prompts, PROMPTS)])
        with pytest.raises(LeaseHeld):  # without the token: another writer
            generate_stage.fn(cfg.model_dump_json(), prompts_uri, str(tiny_model_dir), 1)
        out = generate_stage.fn(leased.model_dump_json(), prompts_uri, str(tiny_model_dir), 1)
        assert len(pd.read_parquet(out)) == 6
        assert json.loads(Path(out, "_stage.json").read_text())["lease_token"] == orchestrator.token
        assert read_lease(store, "r")[0]["token"] == orchestrator.token  # still the orchestrator's


# ---- S3 (moto on loopback) -------------------------------------------------------------------------------
def test_lease_on_s3(s3_server, tmp_path):
    root = "s3://artifacts/lease"
    store = ArtifactStore(root, endpoint_url=s3_server)
    holder, token = start_holder(root, s3_server)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}") as error:
            RunLease(store, "r").acquire()
        assert "flow_run_id run-of-the-holder" in str(error.value)
        with pytest.raises(LeaseHeld):
            store.stage_writer(store.stage_uri("r", 1, "metrics"), "metrics", {"v": 1})
        assert not store.exists(store.stage_uri("r", 1, "metrics"))
    finally:
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "released"
        holder.wait(timeout=30)
    assert read_lease(store, "r") is None

    # The conditional forms: a second create, a replace and a delete of a stale version all refuse.
    uri = store.uri("r", "doc.json")
    assert store.create_exclusive(uri, b"one") and not store.create_exclusive(uri, b"two")
    data, version = store.read_versioned(uri)
    assert data == b"one"
    assert store.replace_if(uri, b"three", version) and not store.replace_if(uri, b"four", version)
    assert not store.delete_if(uri, version) and store.read_versioned(uri)[0] == b"three"
    assert store.delete_if(uri, store.read_versioned(uri)[1]) and store.read_versioned(uri) is None

    # Racing processes: exactly one wins.
    outputs = race(root, s3_server, tmp_path, "s3", 6)
    assert [out[0] for out in outputs].count("won") == 1, outputs
    winner = next(out[1] for out in outputs if out[0] == "won")
    # The winner's process is gone (same machine): taken over at once, then renewed and released.
    with RunLease(store, "r", timeout_s=1.0) as lease:
        assert lease.token != winner
        before = read_lease(store, "r")[0]["expires_at"]
        time.sleep(1.5)
        assert read_lease(store, "r")[0]["expires_at"] > before
        leased_store = ArtifactStore(root, endpoint_url=s3_server, lease_token=lease.token)
        leased_store.write_stage(leased_store.stage_uri("r", 1, "metrics"), "metrics", {"v": 1}, [metrics_table(0, 3)])
        assert check_lease(store, "r", lease.token)["token"] == lease.token
    assert read_lease(store, "r") is None

    # An expired lease from another machine is taken over.
    store.write_json(store.uri("r", "_lease.json"), {"token": "crashed", "expires_at": time.time() - 5,
                                                     "holder": {"host": "elsewhere", "pid": 1}})
    with RunLease(store, "r") as lease:
        assert read_lease(store, "r")[0]["token"] == lease.token


# ---- two flow runs on one run (real processes, ephemeral Prefect) ----------------------------------------
@pytest.mark.slow
@pytest.mark.fault("two concurrent flow runs on one run")
def test_a_second_flow_run_on_the_same_run_fails_fast_and_the_first_is_unharmed(tmp_path, tiny_model_dir):
    from tests.helpers import SMALL, prefect_env, run_flow, write_config

    solo_root, shared_root = tmp_path / "solo", tmp_path / "shared"
    # The first run is still at work while the second one starts (seconds: its own server and imports) and is
    # refused: each iteration's 32 samples take 10 s to label, however quick the sampling on this machine.
    longer = {**SMALL["generation"], "prompts_per_iteration": 16, "max_new_tokens": 32}
    two_rounds = {"iterations": 2, "evaluation": {"enabled": False}, "model": {"policy": str(tiny_model_dir)},
                  "generation": longer, "annotation": {**SMALL["annotation"],
                                                       "programmatic": "tests.slow_reward:positive_words_slowly"}}
    for home in ("warm", "first"):
        (tmp_path / home).mkdir()
    # The solo run is the reference, and warms the Prefect home the second run starts from.
    run_flow(write_config(tmp_path, str(solo_root), **two_rounds), prefect_env(tmp_path / "warm"))

    first = subprocess.Popen(
        [sys.executable, "-m", "flows.iterative_dpo", "--config", str(write_config(tmp_path, str(shared_root),
                                                                                  **two_rounds))],
        cwd=REPO, env=prefect_env(tmp_path / "first"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        lease_file = shared_root / "e2e" / "_lease.json"
        deadline = time.time() + 300
        while not lease_file.exists():  # the first flow run has started and holds the run
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() < deadline, "the first run never took the lease"
            time.sleep(0.1)
        first_lease = json.loads(lease_file.read_text())
        holder = first_lease["holder"]
        assert holder["pid"] == first.pid and holder["flow_run_id"]

        # The same run with another config (another sampling temperature: other generation fingerprints).
        other = write_config(tmp_path, str(shared_root), **{**two_rounds, "generation": {**longer, "temperature": 0.5}})
        assert first.poll() is None, "the first run ended before the second one started: no overlap tested"
        started = time.time()
        second = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", str(other)], cwd=REPO,
                                env=prefect_env(tmp_path / "warm"), capture_output=True, text=True, timeout=300)
        elapsed = time.time() - started
        output = second.stdout + second.stderr  # refused, naming the first run: the two overlapped
        assert second.returncode != 0
        assert f"run {shared_root / 'e2e'} is in use" in output
        assert f"flow_run_id {holder['flow_run_id']}" in output and f"pid {first.pid}" in output
        assert "generating" not in output and "train dpo" not in output  # no model work
        assert elapsed < 120, elapsed
        first_output, _ = first.communicate(timeout=900)
        assert first.returncode == 0, first_output[-5000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()

    assert not lease_file.exists()  # released at the end of the flow
    solo, shared = ArtifactStore(str(solo_root)), ArtifactStore(str(shared_root))
    keys = {"generations": "generation_id", "annotations": "annotation_id", "units": "unit_id",
            "weights": "unit_id", "prompts": "prompt_id"}
    for k in (1, 2):
        for stage, key in keys.items():
            mine, reference = (store.read_pandas(store.stage_uri("e2e", k, stage)).sort_values(key)
                               .reset_index(drop=True).drop(columns=["policy_uri"], errors="ignore")
                               for store in (shared, solo))  # policy_uri names the store root
            pd.testing.assert_frame_equal(mine, reference, obj=f"iter {k} {stage}")
            plan = json.loads(Path(shared.stage_uri("e2e", k, stage), "_stage.json").read_text())
            assert plan["lease_token"] == first_lease["token"]  # written under the first run's lease only
        assert shared.checkpoint_complete(shared.checkpoint_uri("e2e", k))


def test_the_online_deployments_queue_one_flow_run_at_a_time():
    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    online = [d for d in deployments if d["entrypoint"].endswith(":iterative_dpo")]
    assert {"tiny-local", "s3", "tiny-scale-out"} <= {d["name"] for d in online}
    for deployment in online:
        assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}, deployment["name"]
