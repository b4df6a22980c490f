"""A user's own YAML served as a deployment (`python -m flows.serve --config my.yaml --name nightly --cron ...`) and
started by name with `prefect deployment run`, against a real `prefect server start`; the `prefect deploy`
template (deployments/my-config.yaml) registers the same; the flat parameters lead the flow's form."""

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from alignment_core.config import PipelineConfig
from flows.iterative_dpo import iterative_dpo
from flows.serve import PAUSE_AT_SHUTDOWN_S, _BoundedShutdownRunner
from tests.conftest import free_port
from tests.helpers import REPO, prefect_env
from tests.test_deployment import prefect_server, serving_deployments, wait_healthy  # noqa: F401  (a fixture)

# Partial on purpose: every field left out takes the shipped default.
MY_CONFIG = {
    "setup": "online_pairwise",
    "iterations": 1,
    "data": {"source": "bundled:prompts", "eval_prompts": 4},
    "generation": {"backend": "transformers", "prompts_per_iteration": 8, "n_samples": 2, "max_new_tokens": 12},
    "annotation": {"annotator": "programmatic", "programmatic": "alignment_core.rewards:positive_words"},
    "training": {"batch_size": 4},
    "evaluation": {"enabled": False},
}


def test_the_flat_parameters_lead_the_form():
    from prefect.utilities.callables import parameter_schema

    positions = {name: spec["position"] for name, spec in parameter_schema(iterative_dpo.fn).properties.items()}
    assert sorted(positions, key=positions.get)[:4] == ["iterations", "run_name", "store_root", "force"]


@pytest.mark.slow
def test_a_users_config_is_served_and_started_by_name(prefect_server, tmp_path):  # noqa: F811
    api, env = prefect_server
    store_root = tmp_path / "store"
    my_config = tmp_path / "my.yaml"
    my_config.write_text(yaml.safe_dump({**MY_CONFIG, "store": {"root": str(store_root), "run_name": "mine"}}))
    with serving_deployments(tmp_path, env, "--config", str(my_config), "--name", "nightly", "--cron", "0 3 * * *",
                             deployment="nightly"):
        deployment = asyncio.run(read_deployment(api, "iterative-dpo/nightly"))
        assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 3 * * *"]
        served = deployment.parameters
        assert served["more_iterations"] == 1  # scheduled: each flow run is the next iteration
        shipped = PipelineConfig()
        assert served["config"]["training"]["beta"] == shipped.training.beta  # left out: the shipped default
        assert served["config"]["model"]["policy"] == shipped.model.policy
        assert served["config"]["generation"]["prompts_per_iteration"] == 8  # given: the user's value

        run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "iterative-dpo/nightly",
                              "--watch"], env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + (tmp_path / "serve.log").read_text()[-5000:]
        assert "Completed" in run.stdout
        assert (store_root / "mine" / "iter-001" / "checkpoint" / "_complete.json").exists()

    # The same through `prefect deploy` and the template in deployments/ (registered; a worker would run it).
    env = {**env, "ALIGNMENT_CORE_HOME": str(REPO)}
    for args in (["work-pool", "create", "local", "--type", "process"],
                 ["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/my-config.yaml"]):
        done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployed = asyncio.run(read_deployment(api, "iterative-dpo/nightly"))
    assert deployed.work_pool_name == "local" and deployed.parameters["more_iterations"] == 1
    assert PipelineConfig.model_validate(deployed.parameters["config"]).store.run_name == "nightly"


@pytest.mark.slow
@pytest.mark.fault("serve-after-server-gone")
def test_serve_stops_on_sigterm_when_its_server_is_gone(tmp_path):
    """The Prefect server dies under a running serve; a SIGTERM still ends it (it used to retry pausing its
    deployments on the missing server for minutes, until a SIGKILL)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(tmp_path, PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="1")
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port), "--analytics-off", "--no-ui"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(api, server)
        my_config = tmp_path / "my.yaml"
        my_config.write_text(yaml.safe_dump(MY_CONFIG))
        with serving_deployments(tmp_path, env, "--config", str(my_config), deployment="my") as served:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            stopped = time.monotonic()
            served.send_signal(signal.SIGTERM)
            assert served.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() - stopped < 30
        # Which of the two ways the pause gives up depends on whether the runner polled before the kill.
        assert "the served deployments were not paused" in (tmp_path / "serve.log").read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_a_stop_does_not_fail_on_a_server_it_never_reached(caplog):
    """A client that never reached its server raises on a refused connection instead of retrying: the
    shutdown pause logs it and stops (a serve whose server died before its first poll exited 1 on SIGTERM)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runner = _BoundedShutdownRunner()
    runner._deployment_registry.register_deployment(uuid.uuid4(), "gone")

    async def stop():
        async with get_client() as client:
            runner._client = client
            await runner._pause_schedules()

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        started = time.monotonic()
        asyncio.run(stop())
    assert time.monotonic() - started < PAUSE_AT_SHUTDOWN_S
    assert "were not paused (ConnectError: is the Prefect server gone?)" in caplog.text


async def read_deployment(api: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            return await client.read_deployment_by_name(name)
