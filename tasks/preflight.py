from prefect import task
from prefect.cache_policies import NO_CACHE

from alignment_core import preflight as checks
from tasks import parse


@task(name="preflight", cache_policy=NO_CACHE, persist_result=False)
def preflight(config_json: str) -> None:
    """Every model, data source, template, endpoint and the store named by the config, before any work."""
    checks.preflight(parse(config_json))
