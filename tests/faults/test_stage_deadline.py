"""A stage past `scale_out.stage_deadline_s` fails with an error naming the stage and the deadline, and is not
retried (a retry would get a whole new deadline)."""

import subprocess
import sys
import time

import pytest
from prefect.logging import disable_run_logger

from alignment_core.config import parse_config
from alignment_core.preflight import is_transient
from tasks import StageDeadlineExceeded, stage_task
from tests.conftest import fault_note
from tests.helpers import REPO, prefect_env


@stage_task("nap")
def nap(config_json: str, seconds: float, tries_log: str, iteration: int) -> str:
    """A tiny stage: notes each try, then works `seconds` in short steps, as a stage's Python loop does. (Off the
    main thread, or where an alarm handler is already set, as pytest-timeout's, Prefect's deadline is an
    exception sent to the thread, raised between bytecodes: it cannot cut one long C call short.)"""
    with open(tries_log, "a") as log:
        log.write("try\n")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    return "done"


def config_json(deadline: float | None) -> str:
    return parse_config({"setup": "offline_pairwise", "scale_out": {"stage_deadline_s": deadline}}).model_dump_json()


@pytest.mark.fault("stage past its deadline")
def test_a_stage_past_its_deadline_fails_naming_it_and_is_not_retried(request, tmp_path):
    tries = str(tmp_path / "tries")
    with disable_run_logger():
        started = time.monotonic()
        with pytest.raises(StageDeadlineExceeded) as failure:
            nap.fn(config_json(0.5), 30, tries, iteration=3)
        elapsed = time.monotonic() - started
        assert nap.fn(config_json(5), 0.01, tries, iteration=3) == "done"  # within its deadline
        assert nap.fn(config_json(None), 0.01, tries, iteration=3) == "done"  # no deadline
    assert elapsed < 5, elapsed  # stopped at the deadline, not after the 30 s sleep
    assert str(failure.value).startswith("stage nap (iteration 3) did not finish within its deadline of 0.5 s "
                                         "(scale_out.stage_deadline_s)")
    assert not is_transient(failure.value)
    fault_note(request, f"a 0.5 s deadline stopped a 30 s stage after {elapsed:.2f} s")


@pytest.mark.slow
@pytest.mark.fault("stage past its deadline (flow run)")
def test_in_a_flow_run_a_stage_past_its_deadline_fails_the_run_after_one_try(request, tmp_path):
    """Real Prefect (ephemeral, as `python -m flows...` runs), the task with its retries: one try, the run fails."""
    tries = tmp_path / "tries"
    code = ("from prefect import flow\nfrom tests.faults.test_stage_deadline import nap\n"
            f"flow(name='deadline')(lambda: nap({config_json(1)!r}, 30, {str(tries)!r}, iteration=3))()")
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=prefect_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0
    assert "StageDeadlineExceeded: stage nap (iteration 3) did not finish within its deadline of 1 s" in run.stderr
    assert tries.read_text() == "try\n"  # not retried
    fault_note(request, f"1 try, the flow run failed naming the stage ({time.monotonic() - started:.0f} s with "
                        "Prefect's start)")
