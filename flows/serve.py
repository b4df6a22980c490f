"""Serve the deployments from this process (no work pool needed):

    prefect server start            # in another terminal; then export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve           # serves iterative-dpo/tiny-local (+ the offline flows)
    prefect deployment run 'iterative-dpo/tiny-local' --watch

Set ALIGNMENT_SCHEDULE (a cron string, e.g. "0 3 * * *") to schedule the online flow.

The served flow runs import only code under `alignment_core.` that their config names (reward functions,
oracles): ALIGNMENT_CORE_ALLOWED_CODE defaults to that here; set it before starting to widen it (README: Trust
model).
"""

import os
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from alignment_core.annotation.scorers import ALLOWED_CODE_ENV
from alignment_core.config import load_config
from flows.iterative_dpo import iterative_dpo
from flows.offline import offline_preference, reward_model, sft

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def deployments():
    schedule = os.environ.get("ALIGNMENT_SCHEDULE")
    online = load_config(CONFIGS / "tiny.yaml")
    return [
        # On a schedule, each flow run continues the run by one online iteration.
        # One flow run at a time (the next queues): a scheduled run overlapping a slow one waits for it. The
        # store's run lease is what guarantees one writer; this keeps the second from failing on it.
        iterative_dpo.to_deployment(name="tiny-local", cron=schedule, tags=["tiny"], parameters={
            "config": online.model_dump(mode="json"), **({"more_iterations": 1} if schedule else {})},
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)),
        sft.to_deployment(name="tiny-local", parameters={"config": load_config(CONFIGS / "sft.yaml")
                                                          .model_dump(mode="json")}),
        reward_model.to_deployment(name="tiny-local", parameters={"config": load_config(CONFIGS / "reward_model.yaml")
                                                                  .model_dump(mode="json")}),
        offline_preference.to_deployment(name="tiny-local", parameters={
            "config": load_config(CONFIGS / "offline_dpo.yaml").model_dump(mode="json")}),
    ]


def main(argv: list[str] | None = None, prog: str = "python -m flows.serve") -> None:
    import argparse

    argparse.ArgumentParser(prog=prog, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    # Anyone who can start a served deployment sets its config: it may name only the library's own code.
    os.environ.setdefault(ALLOWED_CODE_ENV, "alignment_core.")
    serve(*deployments())


if __name__ == "__main__":
    main()
