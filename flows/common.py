"""What every flow entry point shares: config overrides from flat parameters and the command line, the run lease,
and sampling ahead of training (scale_out.schedule async)."""

import argparse
import contextvars
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from alignment_core.config import PipelineConfig, load_config, yaml_load_unique
from alignment_core.verdict import significance_line
from flows.fast_start import hand_to_prefect, start_ephemeral_server_early


def with_overrides(config: PipelineConfig, iterations: int | None = None, run_name: str | None = None,
                   store_root: str | None = None, force: bool | None = None) -> PipelineConfig:
    """Flat flow parameters win over the config object (what users change most, without resending it)."""
    data = config.model_dump()
    if iterations is not None:
        data["iterations"] = iterations
    data["store"].update({k: v for k, v in (("run_name", run_name), ("root", store_root)) if v is not None})
    if force:
        data["store"]["force_rerun"] = True
    return PipelineConfig.model_validate(data)


def parse_cli(description: str, argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, prog=prog)
    parser.add_argument("--config", required=True,
                        help="YAML config (see configs/; configs/tiny.yaml is the built-in tiny demo)")
    parser.add_argument("--store-root", help="where artifacts go: a folder or s3://bucket/prefix")
    parser.add_argument("--run-name", help="run folder under the store root")
    parser.add_argument("--iterations", type=int, help="online iterations to run")
    parser.add_argument("--more-iterations", type=int,
                        help="run this many iterations after the run's last finished one (continue a run)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set training.beta=0.2 (YAML value)")
    parser.add_argument("--force", action="store_true",
                        help="redo finished iterations whose config, data or code changed (replaces their "
                             "checkpoints; without it such a rerun is refused)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only when stderr is a terminal, never in a log file)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                        help="the run's log level, on the console and in the UI (WARNING: quiet)")
    return parser.parse_args(argv)


def config_from_cli(args: argparse.Namespace) -> PipelineConfig:
    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = yaml_load_unique(value)  # as in a config file: --set training.learning_rate=1e-4 is a float
    config = load_config(args.config, overrides)
    return with_overrides(config, args.iterations, args.run_name, args.store_root, args.force)


# Mistakes a user fixes in the config, the data or the run's folder: a command line ends on their message alone.
def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to fix: a traceback adds nothing for the user. A permanent failure (a
    judge refusing the key mid-run, a full disk) and a stage past its deadline are among them."""
    from alignment_core.config import ConfigError
    from alignment_core.errors import PermanentError
    from alignment_core.lease import LeaseHeld
    from alignment_core.pipeline import FinishedIterationChangedError
    from alignment_core.preflight import PreflightError
    from tasks import StageDeadlineExceeded

    return (ConfigError, PreflightError, FinishedIterationChangedError, LeaseHeld, FileNotFoundError, PermanentError,
            StageDeadlineExceeded)


@contextmanager
def user_errors_end_the_command() -> Iterator[None]:
    """A user's mistake raised inside ends the program with `error: <message>` (exit 1) and no traceback, on
    the console: Prefect's own log records of it lose their traceback there too (the UI keeps it)."""
    import sys

    errors = _user_errors()
    without_traceback = _DropTraceback(errors)
    console = [handler for name in ("", "prefect") for handler in logging.getLogger(name).handlers  # Prefect's
               if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
    for handler in console:
        handler.addFilter(without_traceback)
    try:
        yield
    except errors as error:
        sys.exit(f"error: {error}")
    finally:
        for handler in console:
            handler.removeFilter(without_traceback)


class _DropTraceback(logging.Filter):
    def __init__(self, errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.errors = errors

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.errors):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def cli_run(args: argparse.Namespace) -> Iterator[PipelineConfig]:
    """A command-line flow run: yields the preflighted config, with Prefect's ephemeral API already up, for the
    flow to run inside the block, where a user's mistake ends the command (`user_errors_end_the_command`).

    In this order, so that a mistake is answered in seconds and nothing started before it delays it:
    1. the config parses and `preflight.quick_problems` finds nothing (the data files and their format, the
       model names, the judge endpoint, the store: nothing imports torch; about 1 s);
    2. Prefect's ephemeral API server (a uvicorn subprocess, ~3 s) starts, and boots while this process runs
       the rest of the preflight (importing torch and transformers, building a missing tiny model): Prefect
       would otherwise start it only when the flow first asks for a client, one after the other. This
       process's Prefect is then pointed at it by URL (`fast_start.hand_to_prefect`: Prefect's uvicorn command,
       environment and port range; stopped at exit, and it also dies with this process). Nothing changes when
       `PREFECT_API_URL` names a server, and Prefect starts its own as before if the early one does not come up.
       Importing the flow modules must therefore not import torch (tests/test_fast_start.py).

    Then `gc.freeze()`: the objects the imports made (~700k, torch, transformers, Prefect) are never garbage,
    and every full collection (the stages' `gc.collect()` between models, Python's own) would walk them all:
    0.4 s each on a quiet 2-core machine, 2-3 s on a loaded one, and a flow run makes several.

    Inside the block, on the server this process started, flow runs send no heartbeats: they tell a server
    that a flow run's process died, and this server dies with it. Each flow run's end otherwise waits up to 1 s
    for its heartbeat thread to wake (Prefect's sleeps in 1 s steps).
    """
    import gc

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from alignment_core.preflight import PreflightError, preflight, quick_problems

    with user_errors_end_the_command():
        config = config_from_cli(args)
        problems = quick_problems(config)
        if problems:
            raise PreflightError(problems)
    early = start_ephemeral_server_early()
    try:
        with user_errors_end_the_command():
            preflight(config, quick_checked=True)
        own_server = hand_to_prefect(early)
    except BaseException:
        if early:
            early[0].kill()
            early[0].wait()
        raise
    gc.freeze()
    no_heartbeats = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None} if own_server else {}
    with temporary_settings(updates=no_heartbeats), user_errors_end_the_command():
        yield config


@contextmanager
def run_lease(cfg: PipelineConfig) -> Iterator[PipelineConfig]:
    """Hold the run's lease around a flow body; yields the config that carries the lease token.

    A config that already carries a token (a stage flow dispatched by the orchestrating flow) must name the
    run's live lease: it is verified, not taken, and stays the orchestrator's to renew and release. Otherwise
    the lease is taken (another live holder: LeaseHeld, before anything is written), renewed in the
    background, and released when the body ends, failed or not.
    """
    from prefect.runtime import flow_run

    from alignment_core.lease import RunLease, check_lease
    from alignment_core.store import ArtifactStore

    store = ArtifactStore.from_config(cfg.store)
    if cfg.store.lease_token:
        check_lease(store, cfg.store.run_name, cfg.store.lease_token)
        yield cfg
        return
    holder = {"flow_run_id": flow_run.get_id(), "flow_run_name": flow_run.get_name(),
              "flow": flow_run.get_flow_name()}
    with RunLease(store, cfg.store.run_name, holder={k: v for k, v in holder.items() if v},
                  timeout_s=cfg.store.lease_timeout_s) as lease:
        yield cfg.model_copy(update={"store": cfg.store.model_copy(update={"lease_token": lease.token})})


# The per-iteration table printed at the end of a command-line run.
HEADLINE = ("train_loss", "train_reward_accuracy", "annotation_score_mean", "annotator_score_mean",
            "oracle_reward_mean", "win_rate_vs_initial", "oracle_win_rate_vs_initial", "generation_tokens_per_s",
            "train_tokens_per_s")


@contextmanager
def ahead_of_training(sample_and_label: Callable[[int], dict], lead: int,
                      iterations: int) -> Iterator[Callable[[int], dict]]:
    """Yields `labelled(k)`: iteration k's labelled samples, `sample_and_label(k)`.

    lead 0 (sync): computed when asked for, here. lead > 0 (async): asking for k also starts k+1..k+lead (up to
    `iterations`) on one thread of this flow run, in order, so they sample and label while k trains; each reads
    a checkpoint that is already written (the iteration's sampler is `lead` checkpoints behind). Leaving the
    block waits for a started iteration to finish and drops the ones not started: no stage of this run is left
    writing after the flow run (and its lease) ends.
    """
    if lead == 0:
        yield sample_and_label
        return
    started: dict[int, Future] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample-ahead") as thread:
        def labelled(k: int) -> dict:
            for ahead in range(k, min(k + lead, iterations) + 1):
                if ahead not in started:  # the thread's tasks are this flow run's: its context goes with them
                    started[ahead] = thread.submit(contextvars.copy_context().run, sample_and_label, ahead)
            return started.pop(k).result()

        try:
            yield labelled
        finally:
            for future in started.values():
                future.cancel()


def print_summary(cfg: PipelineConfig, summaries: list[dict]) -> None:
    from alignment_core.pipeline import open_store
    from alignment_core.redact import redact

    run_uri = redact(open_store(cfg).run_uri(cfg.store.run_name))  # a URI may carry user:password@
    print(f"\nrun {cfg.store.run_name} finished: {run_uri}")
    if summaries and "checkpoint" in summaries[-1]:
        print(f"last checkpoint: {summaries[-1]['checkpoint']}")
    columns = [c for c in HEADLINE if any(c in s for s in summaries)]
    print("iteration  " + "  ".join(f"{c:>{max(len(c), 8)}}" for c in columns))
    for s in summaries:
        cells = [f"{s[c]:>{max(len(c), 8)}.4g}" if isinstance(s.get(c), float) else f"{'-':>{max(len(c), 8)}}"
                 for c in columns]
        print(f"{s['iteration']:>9}  " + "  ".join(cells))
    if summaries:
        print(significance_line(summaries[-1]))
    print(f"inspect it: python -m alignment_core.inspect {run_uri}")
