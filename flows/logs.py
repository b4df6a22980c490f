"""How every flow logs, online and offline alike: short lines that point at artifacts.

- At the start, the config goes into the `{run}-config` artifact and the log gets one line naming it (not the
  ~120 lines of YAML it used to be).
- After each iteration, every summary number goes into the `{run}-metrics` table (one column per iteration) and
  the log gets one line of headline numbers and one line with the verdict (alignment_core/verdict.py).
- On the command line, `--log-level` sets the level of Prefect's loggers and the library's (console and UI), and
  `--progress/--no-progress` the progress bars (alignment_core/progress.py: by default on a terminal only).
"""

import logging

from prefect import get_run_logger
from prefect.artifacts import MarkdownArtifact, TableArtifact
from prefect.runtime import flow_run

from alignment_core import progress
from alignment_core.config import PipelineConfig, dump_config
from alignment_core.redact import redact
from alignment_core.verdict import significance_line
from flows.common import HEADLINE
from tasks import artifact_key
from tasks.report import by_iteration, publish

# The loggers whose level Prefect's logging.yml sets from PREFECT_LOGGING_LEVEL (flow and task run loggers are
# children of "prefect"), and the library's.
LOGGERS = ("prefect", "prefect.extra", "prefect.client", "prefect.infrastructure", "alignment_core")


def configure(level: str, show_progress: bool | None) -> None:
    """The command line's `--log-level` and `--progress/--no-progress`, applied before anything logs."""
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)
    progress.set_enabled(show_progress)


def log_config(cfg: PipelineConfig) -> None:
    """The config as an artifact, and one line naming it."""
    run, flow_name = cfg.store.run_name, flow_run.get_flow_name()
    key = artifact_key(run, "config")
    publish(MarkdownArtifact(key=key, markdown=f"# {run}: config\n\n```yaml\n{redact(dump_config(cfg))}```",
                             description=f"{run}: the config this flow run runs (secrets masked)"))
    rounds = f"{cfg.iterations} iterations" if flow_name == "iterative-dpo" else "one round"
    get_run_logger().info("%s run %s under %s: setup %s, loss %s, %s; config in artifact %s", flow_name, run,
                          redact(cfg.store.root), cfg.setup, cfg.training.loss, rounds, key)


def log_iteration(cfg: PipelineConfig, summaries: list[dict]) -> None:
    """The summaries so far as the metrics table artifact; the latest one's headline numbers and verdict as two
    lines."""
    run, latest = cfg.store.run_name, summaries[-1]
    key = artifact_key(run, "metrics")
    numbers = {s["iteration"]: {k: v for k, v in s.items() if isinstance(v, int | float) and k != "iteration"}
               for s in summaries}
    publish(TableArtifact(key=key, table=by_iteration(numbers),
                          description=f"{run}: every iteration's numbers (the summary's, by stage prefix)"))
    headline = ", ".join(f"{name} {latest[name]:.4g}" for name in HEADLINE if isinstance(latest.get(name), float))
    logger = get_run_logger()
    logger.info("iteration %d: %s; every number in artifact %s", latest["iteration"], headline or "no numbers", key)
    logger.info("iteration %d: %s", latest["iteration"], significance_line(latest))
