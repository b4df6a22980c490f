"""Serve deployments from this process (no work pool needed): a config of yours, or the bundled tiny ones.

    prefect server start            # in another terminal; then export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve --config my.yaml --name nightly --cron "0 3 * * *"
    prefect deployment run 'iterative-dpo/nightly' --watch

`--config` serves that YAML as one deployment of the flow its setup belongs to (iterative-dpo for the online
setups, sft / reward-model / offline-preference for the offline ones), named `--name` (default: the file's
name without .yaml). Its `config` parameter is the whole config with every field your YAML leaves out at the
shipped defaults (alignment_core/config/, as `--config` on the command line). The same holds for a
`--param config='{...}'` given to `prefect deployment run`: it replaces the whole config, and what it leaves
out takes the shipped defaults, not the served YAML's values; change single fields with the flat parameters
(iterations, run_name, store_root, force), which come first in the form. `--cron` (or ALIGNMENT_SCHEDULE)
puts it on a schedule, each scheduled flow run of an online config being the run's next iteration.
Without `--config`: the bundled tiny configs as `tiny-local` deployments of the four flows.
deployments/my-config.yaml does the same through `prefect deploy` and a work pool.

Anyone who can start a served deployment sets its config, so what a config may reach is bounded here as in
deployments/prefect.yaml (ALLOW_LISTS): code under `alignment_core.`, the secret OPENAI_API_KEY, files under
./data and ./runs, the host api.openai.com. Set ALIGNMENT_CORE_ALLOWED_CODE, _SECRETS, _PATHS or _HOSTS before
starting to widen one (docs/trust-model.md).
"""

import os
from pathlib import Path

import anyio
import httpx
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.runner import Runner

from alignment_core.annotation.scorers import ALLOWED_CODE_ENV
from alignment_core.config import load_config
from alignment_core.preflight import ALLOWED_HOSTS_ENV, ALLOWED_PATHS_ENV
from alignment_core.redact import ALLOWED_SECRETS_ENV
from alignment_core.setups import SETUPS
from flows.common import user_errors_end_the_command
from flows.iterative_dpo import iterative_dpo
from flows.offline import FLOWS as OFFLINE_FLOWS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# What a served flow run's config may reach unless the environment says otherwise: deployments/prefect.yaml's.
ALLOW_LISTS = {ALLOWED_CODE_ENV: "alignment_core.", ALLOWED_SECRETS_ENV: "OPENAI_API_KEY",
               ALLOWED_PATHS_ENV: "data,runs", ALLOWED_HOSTS_ENV: "api.openai.com"}
FLOWS = {"iterative-dpo": iterative_dpo, **OFFLINE_FLOWS}
# The bundled configs, served as `tiny-local` without --config: one per flow.
BUNDLED = ("tiny.yaml", "sft.yaml", "reward_model.yaml", "offline_dpo.yaml")


def config_deployment(config_path: str | Path, name: str, cron: str | None = None):
    """A deployment of the flow that runs the config's setup, with the whole config as its parameter."""
    config = load_config(config_path)
    flow = FLOWS[SETUPS[config.setup].flow]
    parameters = {"config": config.model_dump(mode="json")}
    if cron and flow is iterative_dpo:
        parameters["more_iterations"] = 1  # on a schedule, each flow run continues the run by one iteration
    # One flow run at a time (the next queues): a scheduled run overlapping a slow one waits for it. The
    # store's run lease is what guarantees one writer; this keeps the second from failing on it.
    return flow.to_deployment(name=name, cron=cron, parameters=parameters, concurrency_limit=ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE))


def deployments(config_path: str | None = None, name: str | None = None, cron: str | None = None) -> list:
    """The deployment of `config_path` (named `name`, default the file's stem), or the bundled `tiny-local`
    ones (`cron` schedules the online one)."""
    if config_path:
        return [config_deployment(config_path, name or Path(config_path).stem, cron)]
    return [config_deployment(CONFIGS / bundled, "tiny-local", cron if bundled == "tiny.yaml" else None)
            for bundled in BUNDLED]


# At shutdown the served deployments' schedules are paused (no flow runs scheduled for a process that is gone),
# for at most this long: with the Prefect server gone, the client's retries kept a SIGTERMed serve running.
PAUSE_AT_SHUTDOWN_S = 10


class _BoundedShutdownRunner(Runner):
    async def _pause_schedules(self) -> None:
        # A client that has reached the server once retries a refused connection (for minutes: bounded here);
        # one that never has (the server died before the runner's first poll) raises at once.
        try:
            with anyio.move_on_after(PAUSE_AT_SHUTDOWN_S) as waited:
                await super()._pause_schedules()
        except httpx.TransportError as error:
            self._logger.warning("the served deployments were not paused (%s: is the Prefect server gone?); "
                                 "stopping without", type(error).__name__)
            return
        if waited.cancelled_caught:
            self._logger.warning("the served deployments were not paused within %d s (is the Prefect server "
                                 "gone?); stopping without", PAUSE_AT_SHUTDOWN_S)


def serve(*deployments) -> None:
    """`prefect.serve`: poll for the deployments' flow runs and run them here until SIGTERM or Ctrl-C; but a
    stop never waits on a server that is gone."""
    import asyncio

    runner = _BoundedShutdownRunner()
    for deployment in deployments:
        runner.add_deployment(deployment)
    names = ", ".join(f"{deployment.flow_name}/{deployment.name}" for deployment in deployments)
    print(f"serving {names}; start one with: prefect deployment run '{deployments[0].flow_name}/"
          f"{deployments[0].name}'", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None, prog: str = "python -m flows.serve") -> None:
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="serve this YAML config (default: the bundled tiny configs)")
    parser.add_argument("--name", help="the deployment's name (default: the config file's name without .yaml)")
    parser.add_argument("--cron", default=os.environ.get("ALIGNMENT_SCHEDULE"),
                        help='a schedule, e.g. "0 3 * * *" (default: ALIGNMENT_SCHEDULE, else none)')
    args = parser.parse_args(argv)
    if args.name and not args.config:
        parser.error("--name names the deployment of --config; without --config the bundled ones are tiny-local")
    with user_errors_end_the_command():
        served = deployments(args.config, args.name, args.cron)
    # Anyone who can start a served deployment sets its config: it reaches only what the allow-lists let it.
    for setting, value in ALLOW_LISTS.items():
        os.environ.setdefault(setting, value)
    serve(*served)


if __name__ == "__main__":
    main()
