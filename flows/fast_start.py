"""The fast command-line start and exit, the one place that reaches into Prefect's internals.

`start_ephemeral_server_early` starts the API server Prefect would start on a flow's first client while the
rest of the preflight runs; `hand_to_prefect` points this process's Prefect at it by URL; `exit_now` ends a
finished run without the interpreter's teardown; `send_run_logs_and_events` drains Prefect's log and event
workers. Each uses Prefect names that are not public API (`PREFECT_INTERNALS`, checked by
tests/test_fast_start.py against the installed Prefect): where one is missing (another Prefect version), the
fast path steps aside and Prefect starts and stops its server as it always does.
"""

import importlib

# (module, attribute path) of every Prefect internal used here and in flows/serve.py
PREFECT_INTERNALS = (
    ("prefect.server.api.server", "create_app"),  # the app factory the early server's uvicorn runs
    ("prefect.context", "refresh_global_settings_context"),
    ("prefect.settings", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"),
    ("prefect.settings", "PREFECT_SERVER_EPHEMERAL_ENABLED"),
    ("prefect.logging.handlers", "APILogWorker.drain_all"),
    ("prefect.events.worker", "EventsWorker.drain_all"),
    ("prefect.runner", "Runner._pause_schedules"),
)


def missing_prefect_internals() -> list[str]:
    """The internals of `PREFECT_INTERNALS` this Prefect lacks, by name."""
    missing = []
    for module_name, path in PREFECT_INTERNALS:
        try:
            value = importlib.import_module(module_name)
            for part in path.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{path}")
    return missing


def start_ephemeral_server_early():
    """(process, port) of the API server Prefect would start on the flow's first client, started now; or None
    when the flow will not need one (a server is configured)."""
    import os
    import random
    import socket
    import subprocess
    import sys

    import prefect
    import prefect.context
    from prefect.logging import get_logger
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None  # a server to talk to, or none that Prefect would start (it fails naming PREFECT_API_URL)
    if not hasattr(prefect.context, "refresh_global_settings_context"):  # another Prefect: leave the start to it
        return None
    for _ in range(10):  # as Prefect's SubprocessASGIServer.find_available_port
        port = random.choice(range(8000, 9000))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    else:
        return None
    get_logger().info("Starting temporary server on http://127.0.0.1:%d", port)
    # SubprocessASGIServer._run_uvicorn_command, behind a start that ties the server's life to this process
    command = [sys.executable, "-c", _DIES_WITH_PARENT.format(parent=os.getpid()), "--app-dir",
               str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app", "--host",
               "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    return subprocess.Popen(command, env=env), port


# `python -m uvicorn`, but the server is sent SIGTERM when the process that started it dies (Linux's parent-death
# signal): a run stopped by a signal (SIGTERM, for which Prefect marks the flow run crashed and exits without the
# atexit stop, or SIGKILL) leaves no server behind. Where prctl is missing (not Linux) it is plain uvicorn.
_DIES_WITH_PARENT = """
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != {parent}:  # the parent died before the line above
    sys.exit(0)
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def hand_to_prefect(early) -> bool:
    """Wait for the early server to answer, then point this process's Prefect at it for the rest of the
    process, as `PREFECT_API_URL` would, and stop it at exit (True). If it does not come up (its port taken
    meanwhile, an exit), stop it and leave the start to Prefect (False).

    By URL rather than as Prefect's own ephemeral `SubprocessASGIServer`: that class's module imports the
    server's whole stack (FastAPI, SQLAlchemy, its models: 1.4 s of a 1-prompt run's 8.7 s), which a client of a
    running server never needs. It serves no UI, so Prefect's "View at" links are turned off with it
    (`PREFECT_UI_URL` empty)."""
    if early is None:
        return False
    import atexit
    import os
    import subprocess
    import time

    import httpx
    import prefect.context
    from prefect.logging import get_logger
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    process, port = early
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    healthy = False
    with httpx.Client() as client:
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if client.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    healthy = True
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    if not healthy:
        process.kill()
        process.wait()
        return False
    os.environ.update(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_UI_URL="")
    # Threads that Prefect starts without this context (its log and event workers) read the process-wide
    # settings, which are read from the environment once, at import: read them again.
    prefect.context.refresh_global_settings_context()

    def stop() -> None:
        get_logger().info("Stopping temporary server on http://127.0.0.1:%d", port)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    atexit.register(stop)
    return True


def exit_now(code: int = 0) -> None:
    """End a finished command-line run without the interpreter's teardown of every module and object (~3 s
    after a flow run: torch, transformers, Prefect): what teardown would still do that matters runs first
    (non-daemon threads end, atexit handlers: Prefect's log and event flushes, its server's stop), then the
    streams are flushed and the process exits with `code`. Under a profiler (`python -m cProfile`), which
    writes its report after the program returns, it returns instead."""
    import atexit
    import os
    import sys
    import threading

    if sys.getprofile() is not None:
        return
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    send_run_logs_and_events()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def send_run_logs_and_events() -> None:
    """Send what Prefect's log and event workers still hold while the ephemeral server is up. At exit the server
    stops first (its stop was registered last), and the logging module's final flush then waits the log
    worker's full 5 s timeout on a server that is gone."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception:  # best effort: the atexit handlers that follow try again
            pass
