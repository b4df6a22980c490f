"""Starting a worker process (tests/faults/worker.py), waiting until it stalls where asked, and SIGKILLing it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def start_worker(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.faults.worker", *args], cwd=REPO,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_when_ready(process: subprocess.Popen, ready: Path, timeout: float = 240) -> None:
    """SIGKILL the worker (its whole process group) once it has created `ready`."""
    deadline = time.time() + timeout
    try:
        while not ready.exists():
            if process.poll() is not None:
                raise AssertionError(f"the worker ended before it could be killed:\n{process.stdout.read()[-3000:]}")
            assert time.time() < deadline, "the worker never reached the point to kill it at"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def run_worker(*args: str, env: dict | None = None, timeout: float = 300) -> str:
    process = start_worker(*args, env=env)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-5000:]
    return output
