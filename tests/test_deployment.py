"""A real `prefect server start` on loopback, the deployments served, a run started by name from the CLI."""

import asyncio
import os
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import free_port
from tests.helpers import REPO, prefect_env

pytestmark = pytest.mark.slow


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "prefect server exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


@contextmanager
def running_prefect_server(tmp_path, ui: bool = False):
    """`prefect server start` on a free loopback port (with its UI where `ui`); yields the API URL and an env."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(tmp_path, PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="1")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--analytics-off", *([] if ui else ["--no-ui"])], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        try:
            wait_healthy(api, server)
        except (AssertionError, TimeoutError) as error:
            raise AssertionError(f"{error}: {(tmp_path / 'server.log').read_text()[-3000:]}") from error
        yield api, env
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def prefect_server(tmp_path):
    with running_prefect_server(tmp_path) as (api, env):
        yield api, env


@contextmanager
def serving_deployments(tmp_path, env: dict, *args: str, deployment: str = "tiny-local"):
    """`python -m flows.serve [args]` (the README's command) until `deployment` is registered; yields the
    process."""
    serve_log = open(tmp_path / "serve.log", "w")
    served = subprocess.Popen([sys.executable, "-m", "flows.serve", *args], cwd=REPO, env=env, stdout=serve_log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            listed = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], env=env,
                                    capture_output=True, text=True)
            if deployment in listed.stdout:
                break
            assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "deployments never registered"
            time.sleep(1)
        yield served
    finally:
        if served.poll() is None:
            os.killpg(served.pid, 15)
        served.wait(timeout=30)
        serve_log.close()


def test_served_deployment_runs_by_name_and_publishes_artifacts(prefect_server, tmp_path):
    api, env = prefect_server
    with serving_deployments(tmp_path, env):
        store_root = tmp_path / "store"
        run = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "iterative-dpo/tiny-local", "--watch",
             "--param", "iterations=1", "--param", f"store_root={store_root}", "--param", "run_name=served"],
            env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + (tmp_path / "serve.log").read_text()[-5000:]
        assert "Completed" in run.stdout
        assert (store_root / "served" / "iter-001" / "checkpoint" / "_complete.json").exists()

        artifacts = asyncio.run(read_artifact_keys(api))
        # One artifact per kind under a stable key (tasks/report.py, flows/logs.py), none per stage or iteration.
        assert artifacts == {"served-config", "served-summary", "served-evaluation", "served-evaluation-table",
                             "served-metrics", "served-samples", "served-generate-progress", "served-train-progress"}


async def read_artifact_keys(api: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            artifacts = await client.read_artifacts()
    return {a.key for a in artifacts if a.key}


def test_scale_out_runs_gpu_stages_as_flows_on_their_own_work_pool(prefect_server, tmp_path):
    """deployments/prefect.yaml deployed, two process work pools: generate and train run on the `gpu` pool."""
    api, env = prefect_server
    env = {**env, "ALIGNMENT_CORE_HOME": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "1"}

    def prefect(*args, timeout=300):
        result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    prefect("work-pool", "create", "local", "--type", "process")
    prefect("work-pool", "create", "gpu", "--type", "process")
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    workers, logs = [], []
    for pool in ("local", "gpu"):
        logs.append(open(tmp_path / f"worker-{pool}.log", "w"))
        workers.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
                                        cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                        start_new_session=True))
    try:
        store_root = tmp_path / "store"
        run = prefect("deployment", "run", "iterative-dpo/tiny-scale-out", "--watch", "--param", "iterations=1",
                      "--param", f"store_root={store_root}", "--param", "run_name=scaled", timeout=900)
        assert "Completed" in run.stdout
        assert (store_root / "scaled" / "iter-001" / "checkpoint" / "_complete.json").exists()
        runs = asyncio.run(read_flow_runs(api))
        by_flow = {}
        for flow_name, pool, state in runs:
            by_flow.setdefault(flow_name, []).append((pool, state))
        # the iteration's samples, then the evaluation's of the new policy and of the initial one (iteration 0)
        assert by_flow["generate-stage"] == [("gpu", "COMPLETED")] * 3
        assert by_flow["train-stage"] == [("gpu", "COMPLETED")]
        assert by_flow["iterative-dpo"] == [("local", "COMPLETED")]
    finally:
        for worker in workers:
            os.killpg(worker.pid, 15)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a Prefect worker can outwait SIGTERM (seen once in a full run)
                os.killpg(worker.pid, 9)
                worker.wait(timeout=30)
        for log in logs:
            log.close()


async def read_flow_runs(api: str) -> list[tuple[str, str, str]]:
    """(flow name, work pool, state type) of every flow run on the server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            runs = await client.read_flow_runs()
            names = {f.id: f.name for f in await client.read_flows()}
    return [(names[r.flow_id], r.work_pool_name, r.state_type.value) for r in runs]
