"""Log a finished iteration to the experiment trackers of `tracking.report_to` (see alignment_core.tracking)."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment_core import tracking
from tasks import parse


@task(name="track", task_run_name="track-iter-{iteration}", cache_policy=NO_CACHE, persist_result=False)
def track_iteration(config_json: str, iteration: int) -> dict[str, str]:
    """One line per tracker: what it logged, or why it could not (a warning: the iteration stays finished)."""
    report = tracking.log_iteration(parse(config_json), iteration)
    logger = get_run_logger()
    for name, outcome in report.items():
        if outcome.startswith("failed"):
            logger.warning("tracker %s, iteration %d: %s; it catches up at the next iteration", name, iteration,
                           outcome)
        else:
            logger.info("tracker %s: %s", name, outcome)
    return report
