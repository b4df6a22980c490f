"""scale_out.timeout_s and scale_out.max_redispatches where the stage tasks pass them to `tasks/dispatch.py`.

A real `prefect server start`; the three stage deployments registered on a process work pool that no worker
serves, so each flow run they get stays Scheduled until the test, standing in for a machine that dies, sets it
Crashed through the API, or until the stage's timeout ends the wait. The stage tasks (tasks/generate.py,
tasks/annotate.py, tasks/train.py) run from a flow as the pipeline's flows call them, with the config as JSON.
"""

import threading
import time
from contextlib import contextmanager

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed

from alignment_core.config import parse_config
from flows.fast_start import send_run_logs_and_events
from tasks.annotate import annotate
from tasks.generate import generate
from tasks.train import train
from tests.test_deployment import running_prefect_server

pytestmark = pytest.mark.slow

POOL = "no-worker"
STAGE_TASKS = {"generate": generate, "annotate": annotate, "train": train}
# What each stage task takes besides the config and the iteration; no flow run reads them (none ever starts).
STAGE_INPUTS = {
    "generate": {"prompts_uri": "unused", "policy_uri": "unused"},
    "annotate": {"generations_uri": "unused"},
    "train": {"units_uri": "unused", "weights_uri": "unused", "policy_uri": "unused", "reference_uri": "unused"},
}
MACHINE_DIED = "the worker's machine died (set by the test)"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A Prefect server with the deployments `<stage>-stage/held` (flows/stages.py) on a work pool without workers."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect")) as (api, _), \
            temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        for stage in STAGE_TASKS:
            client.create_deployment(client.create_flow_from_name(f"{stage}-stage"), "held", work_pool_name=POOL,
                                     entrypoint=f"flows/stages.py:{stage}_stage")
        yield api
        send_run_logs_and_events()  # while the server is up: at exit the log worker would retry a stopped one


@flow(name="dispatch-check")
def dispatch_check(stage: str, config_json: str) -> str:
    return STAGE_TASKS[stage](config_json, iteration=1, **STAGE_INPUTS[stage])


def dispatched_stage(tmp_path, api: str, stage: str, **scale_out) -> tuple[str, float]:
    """Run `stage` through its task with `scale_out` set and its deployment named; it must fail (no flow run it
    starts can complete): returns the error's message and the seconds the stage took."""
    cfg = parse_config({
        "setup": "online_pairwise", "model": {"policy": "tiny://llama"}, "evaluation": {"enabled": False},
        "store": {"root": str(tmp_path / "store"), "run_name": "dispatch"},
        "scale_out": {f"{stage}_deployment": f"{stage}-stage/held", **scale_out},
    })
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: api}), pytest.raises(RuntimeError) as failure:
        dispatch_check(stage, cfg.model_dump_json())
    return str(failure.value), time.monotonic() - started


@contextmanager
def crashing(api: str, stage: str, after_s: float = 0.0):
    """Sets every new flow run of `stage` Crashed (as Prefect marks a run whose machine died) once it has waited
    `after_s` seconds; yields the names of the runs crashed, in order."""
    crashed: list[str] = []
    stop = threading.Event()
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        before = {run.id for run in client.read_flow_runs()}
        first_seen: dict = {}

        def crash_new_runs():
            with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
                while not stop.wait(0.3):
                    for run in client.read_flow_runs():
                        if run.id in before or not run.name.startswith(f"{stage}-iter-") or run.state.is_final():
                            continue
                        if time.monotonic() - first_seen.setdefault(run.id, time.monotonic()) >= after_s:
                            client.set_flow_run_state(run.id, Crashed(message=MACHINE_DIED), force=True)
                            crashed.append(run.name)

        thread = threading.Thread(target=crash_new_runs, daemon=True)
        thread.start()
        try:
            yield crashed
        finally:
            stop.set()
            thread.join(timeout=30)


@pytest.mark.parametrize("stage", list(STAGE_TASKS))
def test_a_dispatched_stage_fails_after_scale_out_timeout_s(prefect_api, tmp_path, stage):
    # A run that never starts (no worker) is not final: only timeout_s ends the wait. Were it ignored (the default
    # is 6 hours), the run would be crashed at 40 s and the stage fail naming that instead.
    with crashing(prefect_api, stage, after_s=40) as crashed:
        message, seconds = dispatched_stage(tmp_path, prefect_api, stage, timeout_s=3, max_redispatches=0)
    assert f"{stage}-iter-1 not finished after 3 s (scale_out.timeout_s)" in message, message
    assert crashed == []
    assert 3 <= seconds < 3 + 15, seconds  # the deadline, a poll (POLL_S) and the flow


@pytest.mark.parametrize("stage, max_redispatches", [("generate", 0), ("annotate", 1), ("train", 1)])
def test_a_crashed_flow_run_is_started_again_at_most_max_redispatches_times(prefect_api, tmp_path, stage,
                                                                             max_redispatches):
    # Every run crashes as soon as it is scheduled: the stage starts it again max_redispatches times, then fails
    # naming the last crash. timeout_s only guards the test against a wait without end.
    with crashing(prefect_api, stage) as crashed:
        message, seconds = dispatched_stage(tmp_path, prefect_api, stage, timeout_s=60,
                                            max_redispatches=max_redispatches)
    expected = [f"{stage}-iter-1"] + [f"{stage}-iter-1-again-{k}" for k in range(1, max_redispatches + 1)]
    assert crashed == expected
    assert f"flow run {expected[-1]} (" in message and f"ended Crashed: {MACHINE_DIED}" in message, message
    assert seconds < 60, seconds
