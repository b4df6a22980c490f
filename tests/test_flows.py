"""End-to-end: the iterative-dpo flow in ephemeral Prefect, as a user runs it (`python -m flows.iterative_dpo`).

Each flow runs in a subprocess with its own PREFECT_HOME, exactly like the README's command.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from alignment_core.records import SCHEMAS
from alignment_core.store import ArtifactStore
from tests.helpers import REPO, SMALL, prefect_env, run_flow, write_config  # noqa: F401  (REPO, SMALL: re-exported)

pytestmark = pytest.mark.slow

STAGE_SCHEMAS = {"prompts": "prompts", "generations": "generations", "annotations": "annotations",
                 "units": "units", "weights": "weights", "metrics": "metrics", "eval_generations": "generations",
                 "evaluation": "metrics"}


def test_two_iterations_write_every_stage_with_lineage(tmp_path):
    root = tmp_path / "store"
    result = run_flow(write_config(tmp_path, str(root)), prefect_env(tmp_path))
    assert "run e2e finished" in result.stdout
    # One ephemeral server (started early, while preflight ran, and handed to Prefect), stopped at exit.
    ports = re.findall(r"Starting temporary server on http://127.0.0.1:(\d+)", result.stdout + result.stderr)
    assert len(ports) == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Stopping temporary server" in result.stdout + result.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex(("127.0.0.1", int(ports[0]))) != 0  # nothing listens there any more

    store = ArtifactStore(str(root))
    assert store.list_iterations("e2e") == [0, 1, 2]
    for k in (1, 2):
        for stage, schema in STAGE_SCHEMAS.items():
            frame = pd.read_parquet(store.stage_uri("e2e", k, stage))  # the folder, as a user opens it
            assert list(frame.columns) == SCHEMAS[schema].names, stage
            assert len(frame) > 0, (k, stage)
        assert store.checkpoint_complete(store.checkpoint_uri("e2e", k))
    first = pd.read_parquet(store.stage_uri("e2e", 1, "generations"))
    second = pd.read_parquet(store.stage_uri("e2e", 2, "generations"))
    assert set(first["policy_uri"]) == {"tiny://llama"}
    assert set(second["policy_uri"]) == {store.checkpoint_uri("e2e", 1)}  # iteration 2 sampled from iteration 1
    assert second["policy_digest"].iloc[0] != first["policy_digest"].iloc[0]
    assert len(first) == 8 * 2 and first["generation_id"].is_unique
    evaluation = store.read_manifest(store.stage_uri("e2e", 2, "evaluation"))["extra"]["summary"]
    assert 0.0 <= evaluation["win_rate_vs_previous"] <= 1.0
    assert evaluation["win_rate_vs_previous_low"] <= evaluation["win_rate_vs_previous"]

    # Re-running the finished run does no model work: every stage is found complete.
    def finished_at() -> dict:
        stages = {(k, s): store.read_manifest(store.stage_uri("e2e", k, s))["created_at"]
                  for k in (1, 2) for s in STAGE_SCHEMAS}
        checkpoints = {k: store.read_json(store.checkpoint_uri("e2e", k) + "/_complete.json")["saved_at"]
                       for k in (1, 2)}
        return {**stages, **checkpoints}

    before = finished_at()
    rerun = run_flow(write_config(tmp_path, str(root)), prefect_env(tmp_path))
    assert finished_at() == before
    assert "train dpo" not in rerun.stderr  # the trainer's progress bar never appeared

    # A scheduled run continues the run: one more iteration, sampling from the last checkpoint.
    run_flow(write_config(tmp_path, str(root), evaluation={"enabled": False}), prefect_env(tmp_path),
             "--more-iterations", "1")
    assert finished_at() == before
    third = pd.read_parquet(store.stage_uri("e2e", 3, "generations"))
    assert set(third["policy_uri"]) == {store.checkpoint_uri("e2e", 2)}
    assert store.checkpoint_complete(store.checkpoint_uri("e2e", 3))
    assert store.read_manifest(store.stage_uri("e2e", 3, "evaluation")) is None  # evaluation.enabled: false

    inspect = subprocess.run([sys.executable, "-m", "alignment_core.inspect", str(root / "e2e"),
                              "--plot", str(tmp_path / "plot.png")], cwd=REPO, capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert "iter-002" in inspect.stdout and "win_rate_vs_previous" in inspect.stdout
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.fault("SIGKILL mid-generation (flow)")
def test_sigkill_during_generation_resumes_to_the_same_shards(tmp_path):
    reference_root, killed_root = tmp_path / "uninterrupted", tmp_path / "killed"
    env = prefect_env(tmp_path)
    small = {"iterations": 1, "evaluation": {"enabled": False}}
    run_flow(write_config(tmp_path, str(reference_root), **small), env)

    generations = killed_root / "e2e" / "iter-001" / "generations"
    process = subprocess.Popen([sys.executable, "-m", "flows.iterative_dpo", "--config",
                                str(write_config(tmp_path, str(killed_root), **small))],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 600
    while not (generations / "part-00001.parquet").exists():
        assert process.poll() is None, "the flow ended before it could be killed"
        assert time.time() < deadline, "generation never reached its second shard"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (generations / "_manifest.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in generations.glob("part-*.parquet")}
    prompts_manifest = (killed_root / "e2e" / "iter-001" / "prompts" / "_manifest.json").read_text()

    run_flow(write_config(tmp_path, str(killed_root), **small), env)
    # finished work was not redone: the prompts stage and the shards written before the kill are untouched
    assert (killed_root / "e2e" / "iter-001" / "prompts" / "_manifest.json").read_text() == prompts_manifest
    for name, mtime in written.items():
        assert (generations / name).stat().st_mtime_ns == mtime
    resumed = pd.read_parquet(generations).sort_values("generation_id").reset_index(drop=True)
    uninterrupted = pd.read_parquet(reference_root / "e2e" / "iter-001" / "generations")
    uninterrupted = uninterrupted.sort_values("generation_id").reset_index(drop=True)
    assert resumed["generation_id"].is_unique and len(resumed) == 8 * 2
    assert resumed["generation_id"].tolist() == uninterrupted["generation_id"].tolist()
    assert resumed["response"].tolist() == uninterrupted["response"].tolist()


def server_children(pid: int) -> list[int]:
    """Processes started by `pid` that run Prefect's API server (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and b"prefect.server.api.server:create_app" in cmdline:
            children.append(int(stat.parent.name))
    return children


def running(pid: int) -> bool:
    """Whether `pid` is alive (an exited process not yet reaped, a zombie, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the server's parent-death signal is Linux's")
def test_sigterm_ends_a_command_line_run_and_its_ephemeral_server(tmp_path):
    """Prefect marks the flow run crashed on SIGTERM and exits without its atexit handlers; the ephemeral server
    the run started goes with it instead of living on as an orphan."""
    root = tmp_path / "store"
    # 32 shards of generation: the signal lands mid-stage, however loaded the machine
    long_generation = {**SMALL["generation"], "prompts_per_iteration": 64, "max_new_tokens": 64}
    config = write_config(tmp_path, str(root), iterations=1, evaluation={"enabled": False}, generation=long_generation)
    process = subprocess.Popen([sys.executable, "-m", "flows.iterative_dpo", "--config", str(config)], cwd=REPO,
                               env=prefect_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (root / "e2e" / "iter-001" / "generations" / "part-00001.parquet").exists():
            assert process.poll() is None and time.time() < deadline, "the flow ended or never reached generation"
            time.sleep(0.05)
        assert not (root / "e2e" / "iter-001" / "generations" / "_manifest.json").exists()
        servers = server_children(process.pid)
        assert len(servers) == 1
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        assert process.returncode != 0 and "Crashed" in output
        deadline = time.time() + 10
        while running(servers[0]) and time.time() < deadline:
            time.sleep(0.1)
        assert not running(servers[0]), "the ephemeral server outlived its run"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_flow_runs_unchanged_against_s3(tmp_path, s3_server):
    root = "s3://artifacts/runs"
    config = write_config(tmp_path, root, iterations=1, evaluation={"enabled": False})
    # Credentials come from the environment, never from the config file.
    assert "testing" not in config.read_text()
    result = run_flow(config, prefect_env(tmp_path, AWS_ENDPOINT_URL=s3_server))
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
    options = {"client_kwargs": {"endpoint_url": s3_server}}
    for stage in ("prompts", "generations", "annotations", "weights", "metrics"):
        frame = pd.read_parquet(f"{root}/e2e/iter-001/{stage}/", storage_options=options)
        assert len(frame) > 0, stage
    store = ArtifactStore(root, endpoint_url=s3_server)
    assert store.checkpoint_complete(f"{root}/e2e/iter-001/checkpoint")
    assert store.list_iterations("e2e") == [0, 1]  # iterations: 1, one iteration and no more
    assert store.read_manifest(store.stage_uri("e2e", 1, "evaluation")) is None  # evaluation.enabled: false
