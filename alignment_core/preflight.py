"""Check everything a config names before any model work: fail once, in seconds, listing every problem.

    problems = preflight_problems(cfg)      # [] when the run can start
    preflight(cfg)                          # raises PreflightError listing them all; logs each warning

What is checked: every model the run will load (policy, reference, tokenizer, reward model, judge, behaviour
model; a hub id resolves to its snapshot in the local hub cache, downloading it if the hub is reachable), the
data sources, the judge template and endpoint (reachable, model served), reward functions, the accelerate
config, the experiment trackers, and that the store is writable. A hub *dataset* is left to the prompts stage,
which runs first and before any model is loaded.

`is_transient(error)` says whether a failed stage is worth retrying: a network hiccup or a killed worker is;
a wrong path, a bad config or a schema mismatch fails the same way every time and is not.
"""

import logging
import subprocess
from pathlib import Path

from alignment_core.config import PipelineConfig
from alignment_core.tracking import tracking_problems

log = logging.getLogger(__name__)


class PreflightError(ValueError):
    """A config that names things that do not exist or cannot be reached; one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the run cannot start:\n" + "\n".join(f"- {p}" for p in problems))


def named_models(cfg: PipelineConfig) -> dict[str, str]:
    """The models the run loads, by the config field that names them."""
    models = {"model.policy": cfg.model.policy}
    if cfg.model.reference:
        models["model.reference"] = cfg.model.reference
    if cfg.model.tokenizer:
        models["model.tokenizer"] = cfg.model.tokenizer
    annotation = cfg.annotation
    if cfg.online and "reward_model" in annotation.kinds:
        members = annotation.reward_models
        for index, name in enumerate(members):
            models["annotation.reward_model" + (f"[{index}]" if len(members) > 1 else "")] = name
    if cfg.online and annotation.judge_kind and annotation.judge.backend != "http":
        models["annotation.judge.model"] = annotation.judge.model
    if cfg.reweight.strategy == "importance" and cfg.reweight.behaviour_model:
        models["reweight.behaviour_model"] = cfg.reweight.behaviour_model
    return models


def preflight_problems(cfg: PipelineConfig) -> list[str]:
    return quick_problems(cfg) + library_problems(cfg)


def quick_problems(cfg: PipelineConfig) -> list[str]:
    """The checks that need neither torch nor transformers (a second or two): data files and their format,
    model names other than the tiny builds, the judge endpoint, the accelerate config, the store. A command
    line runs them before it starts anything else, so these mistakes are answered in seconds."""
    from alignment_core.store import ArtifactStore

    store = ArtifactStore.from_config(cfg.store)
    problems = []
    for field, name in _models(cfg, tiny=False).items():
        problems += _problem(field, _check_model, store, name)
    problems += _problem("data.source", _check_data, cfg, cfg.data.source)
    if cfg.data.eval_source:
        problems += _problem("data.eval_source", _check_data, cfg, cfg.data.eval_source)
    if cfg.online and cfg.annotation.judge_kind and cfg.annotation.judge.backend == "http":
        problems += _problem("annotation.judge.base_url", _check_endpoint, cfg.annotation.judge)
    if cfg.training.accelerate_config and not Path(cfg.training.accelerate_config).is_file():
        problems.append(f"training.accelerate_config: no such file {cfg.training.accelerate_config!r}")
    problems += _problem("store.root", _check_writable, store)
    return problems


def library_problems(cfg: PipelineConfig) -> list[str]:
    """The checks that import the model libraries (seconds): the tiny builds (built here when missing), reward
    functions, the judge template, the experiment trackers."""
    from alignment_core.store import ArtifactStore

    store = ArtifactStore.from_config(cfg.store)
    problems = []
    for field, name in _models(cfg, tiny=True).items():
        problems += _problem(field, _check_model, store, name)
    annotation = cfg.annotation
    if cfg.online and "programmatic" in annotation.kinds:
        problems += _problem("annotation.programmatic", _check_callable, annotation.programmatic)
    if cfg.online and annotation.judge_kind:
        problems += _problem("annotation.judge.template", _check_template, cfg)
    if cfg.evaluation.oracle:
        problems += _problem("evaluation.oracle", _check_callable, cfg.evaluation.oracle)
    return problems + tracking_problems(cfg)


def preflight_warnings(cfg: PipelineConfig) -> list[str]:
    """What does not stop a run but makes its results mean less than they seem: a win-rate judged by a demo
    rule that nobody named."""
    from alignment_core.evaluation import demo_judge_warning

    return [warning for warning in (demo_judge_warning(cfg),) if warning]


def preflight(cfg: PipelineConfig, quick_checked: bool = False) -> None:
    """Raise PreflightError listing every problem; `quick_checked`: `quick_problems` found none just before."""
    problems = library_problems(cfg) if quick_checked else preflight_problems(cfg)
    if problems:
        raise PreflightError(problems)
    for warning in preflight_warnings(cfg):
        log.warning(warning)


def _problem(field: str, check, *args) -> list[str]:
    try:
        check(*args)
    except (OSError, ValueError, ImportError) as error:
        return [f"{field}: {error}"]
    return []


def _models(cfg: PipelineConfig, tiny: bool) -> dict[str, str]:
    """`named_models`, the tiny builds alone (`tiny`) or all the others."""
    from alignment_core.inputs import InputRef

    return {field: name for field, name in named_models(cfg).items() if (InputRef.model(name).kind == "tiny") == tiny}


def _check_model(store, name: str) -> None:
    from alignment_core.inputs import InputRef, is_store_uri
    from alignment_core.store import ArtifactStore

    if is_store_uri(name):
        # A checkpoint in a store: that it is complete is enough; copying it is the stage's work.
        owner = ArtifactStore(name.rstrip("/").rsplit("/", 1)[0], endpoint_url=store.endpoint_url)
        if not owner.checkpoint_complete(name):
            raise FileNotFoundError(f"checkpoint {name!r} is missing or incomplete")
        return
    InputRef.model(name).resolve(store=store, cache_dir=str(store.cache_dir))


def _check_data(cfg: PipelineConfig, source: str) -> None:
    from alignment_core.data import check_data

    check_data(cfg.data, source)


def _check_callable(path: str) -> None:
    from alignment_core.annotation.scorers import import_callable

    import_callable(path)


def _check_template(cfg: PipelineConfig) -> None:
    from alignment_core.annotation.judge import load_template

    judge = cfg.annotation.judge
    suffix = f"_{judge.pointwise_scale}" if cfg.annotation.judge_kind == "judge_pointwise" else ""
    load_template(judge.template, suffix=suffix)


def _check_endpoint(judge) -> None:
    """The OpenAI-compatible server answers `GET /models` and serves the configured model."""
    import os

    import httpx

    headers = {}
    if os.environ.get(judge.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[judge.api_key_env]}"
    url = judge.base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, headers=headers, timeout=min(judge.timeout_s, 10.0))
    except httpx.HTTPError as error:
        raise ConnectionError(f"judge endpoint {url} is not reachable ({type(error).__name__}: {error})") from None
    if response.status_code != 200:
        raise ConnectionError(f"judge endpoint {url} answered HTTP {response.status_code}")
    served = [model.get("id") for model in response.json().get("data", [])]
    if judge.model not in served:
        raise ValueError(f"judge endpoint {judge.base_url} does not serve {judge.model!r}; it serves {served}")


def _check_writable(store) -> None:
    """Write and delete a probe file beside the runs (not in the run's folder: that one belongs to the run's
    lease holder, and a preflight runs before the lease is taken; nor in a folder of its own, which a local
    store would keep)."""
    import uuid

    probe = store.uri(f".preflight-{uuid.uuid4().hex}.json")
    store.write_bytes(probe, b"{}")
    store.delete(probe)


# ---- which failures are worth a retry --------------------------------------------------------------------
_DETERMINISTIC_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException) -> bool:
    """True for failures that may pass on a second try: network, timeouts, a killed worker process."""
    import httpx

    if isinstance(error, (httpx.TransportError, TimeoutError, ConnectionError, subprocess.CalledProcessError)):
        return True
    return isinstance(error, OSError) and not isinstance(error, _DETERMINISTIC_OS_ERRORS)
