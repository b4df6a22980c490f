"""Check everything a config names before any model work: fail once, in seconds, listing every problem.

    problems = preflight_problems(cfg)      # [] when the run can start
    preflight(cfg)                          # raises PreflightError listing them all; logs each warning

What is checked: every model the run will load (policy, reference, tokenizer, reward model, judge, behaviour
model; a hub id resolves to its snapshot in the local hub cache, downloading it if the hub is reachable), the
data sources, the judge template and endpoint (reachable, model served), reward functions, the accelerate
config, the experiment trackers, and that the store is writable. Before all of these: that every secret, file and
host the config names is one the worker's allow-lists let a config reach (`reach_problems`, docs/trust-model.md);
a config that names one outside is refused before any of it is read or called. A hub *dataset* is left to the
prompts stage, which runs first and before any model is loaded.

`is_transient(error)` (from alignment_core.errors, one table for the stage and judge retries) says whether a
failed stage is worth retrying: a network hiccup or a killed worker is; a wrong path, a refused key, a full disk, a
bad config or a schema mismatch fails the same way every time and is not.

Each check imports inside it what only it needs (the store, the data loader, the annotation package and its
torch): the orchestrating flow runs preflight first, and a config mistake is answered in seconds, before those
imports are paid.
"""

import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

from alignment_core.adapters import target_module_problems
from alignment_core.annotators import models_loaded_here
from alignment_core.config import PipelineConfig
from alignment_core.errors import PermanentError, http_status_failure
from alignment_core.errors import is_transient as is_transient  # the table lives in errors.py; tasks import it here
from alignment_core.redact import ALLOWED_SECRETS_ENV, redact, remember_secret_env, remember_secrets_in
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
    if cfg.online:
        models.update(models_loaded_here(cfg.annotation))
    if cfg.reweight.strategy == "importance" and cfg.reweight.behaviour_model and not cfg.reweight.uses_sampler:
        models["reweight.behaviour_model"] = cfg.reweight.behaviour_model
    return models


def preflight_problems(cfg: PipelineConfig) -> list[str]:
    return reach_problems(cfg) or quick_problems(cfg) + library_problems(cfg)


def quick_problems(cfg: PipelineConfig) -> list[str]:
    """The checks that need neither torch nor transformers (a second or two): data files and their format,
    model names other than the tiny builds, the judge endpoint, the accelerate config, the store. A command
    line runs them before it starts anything else, so these mistakes are answered in seconds."""
    from alignment_core.store import ArtifactStore

    refused = reach_problems(cfg)
    if refused:
        return refused  # not even checked: checking a judge endpoint sends it the key
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
    problems += target_module_problems(cfg, store)
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
    rule that nobody named; a person asked through a UI that nobody can open."""
    from alignment_core.evaluation import demo_judge_warning

    return [warning for warning in (demo_judge_warning(cfg), unreachable_person_warning(cfg)) if warning]


def unreachable_person_warning(cfg: PipelineConfig) -> str | None:
    """A `human` annotator's form is shown on the paused flow run in a Prefect server's UI; without a server
    (PREFECT_API_URL unset: the command line's temporary one, which serves no UI) nobody can answer it, and
    every form waits its `annotation.human.timeout_s`, its pairs then unanswered."""
    if not cfg.online or "human" not in cfg.annotation.kinds or os.environ.get("PREFECT_API_URL"):
        return None
    return (f"annotation: a person labels pairs in a form on the paused flow run, but no Prefect server is set "
            f"(PREFECT_API_URL): the temporary server has no UI, so each form waits "
            f"{cfg.annotation.human.timeout_s} s and its pairs stay unanswered. Start `prefect server start` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api first (docs/setups-and-annotators.md)")


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
    except (OSError, ValueError, ImportError, PermanentError) as error:
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
    """The judge template loads and renders a sample pair within its bounds (a render bomb fails here)."""
    from alignment_core.annotation.judge import load_template, render_sample

    judge = cfg.annotation.judge
    pointwise = cfg.annotation.judge_kind == "judge_pointwise"
    render_sample(load_template(judge.template, suffix=f"_{judge.pointwise_scale}" if pointwise else ""), pointwise)


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
        failure = http_status_failure(response.status_code)
        error = ConnectionError if failure.transient else PermanentError
        raise error(f"judge endpoint {url} answered HTTP {response.status_code}: {failure.meaning}")
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


# ---- what a config may reach on this machine (docs/trust-model.md) -----------------------------------------
# Whoever sets a deployment's parameters writes the config. Beside the code it may import
# (ALIGNMENT_CORE_ALLOWED_CODE), these bound the secrets, files and hosts it may name: comma-separated, "*" for
# any; unset (the command line), anything. Deployments set them all (deployments/prefect.yaml, flows/serve.py).
ALLOWED_PATHS_ENV = "ALIGNMENT_CORE_ALLOWED_PATHS"  # folders (relative ones: to the working directory)
ALLOWED_HOSTS_ENV = "ALIGNMENT_CORE_ALLOWED_HOSTS"  # host or host:port


def reach_problems(cfg: PipelineConfig) -> list[str]:
    """What the config names outside the allow-lists of this machine's environment, one line each naming the
    setting to widen; from now on, the secrets it names are masked in text (alignment_core.redact)."""
    remember_secret_env(cfg.annotation.judge.api_key_env)
    remember_secrets_in(cfg.model_dump_json())
    problems = []
    if cfg.annotation.judge_kind and cfg.annotation.judge.backend == "http":  # offline runs evaluate with it
        problems += _problem("annotation.judge.api_key_env", check_allowed_secret, cfg.annotation.judge.api_key_env)
    for field, url in named_hosts(cfg).items():
        problems += _problem(field, check_allowed_host, url)
    for field, path in named_paths(cfg).items():
        problems += _problem(field, check_allowed_path, path)
    if cfg.model.trust_remote_code:
        problems += _problem("model.trust_remote_code", check_remote_code_allowed)
    return problems


def named_hosts(cfg: PipelineConfig) -> dict[str, str]:
    """The URLs the run calls with the worker's credentials (a judge's key, the store's or MLflow's), by field."""
    hosts = {}
    if cfg.annotation.judge_kind and cfg.annotation.judge.backend == "http":
        hosts["annotation.judge.base_url"] = cfg.annotation.judge.base_url
    if cfg.store.endpoint_url:
        hosts["store.endpoint_url"] = cfg.store.endpoint_url
    if "mlflow" in cfg.tracking.report_to and "://" in (cfg.tracking.mlflow_tracking_uri or ""):
        hosts["tracking.mlflow_tracking_uri"] = cfg.tracking.mlflow_tracking_uri
    return hosts


def named_paths(cfg: PipelineConfig) -> dict[str, str]:
    """The local files and folders the run reads, by field: data, a judge template file, local model folders,
    the accelerate config."""
    from alignment_core.config import DATA_FILE_SUFFIXES
    from alignment_core.inputs import InputRef

    # The annotator's models as an online run loads them: offline runs evaluate with the annotator too.
    models = named_models(cfg.model_copy(update={"setup": "online_pairwise"}))
    paths = {field: name for field, name in models.items() if InputRef.model(name).kind == "local"}
    for field, source in (("data.source", cfg.data.source), ("data.eval_source", cfg.data.eval_source)):
        if source and not source.startswith("bundled:") and "://" not in source and (
                source.lower().endswith(DATA_FILE_SUFFIXES) or Path(source).expanduser().exists()):
            paths[field] = source
    template = cfg.annotation.judge.template
    if template.endswith(".jinja") or Path(template).expanduser().is_file():  # as load_template tells a path
        paths["annotation.judge.template"] = template
    if cfg.training.accelerate_config:
        paths["training.accelerate_config"] = cfg.training.accelerate_config
    return paths


def _allowed(setting: str) -> list[str] | None:
    """The entries of an allow-list setting; None when it is unset (anything allowed)."""
    value = os.environ.get(setting)
    return None if value is None else [entry.strip() for entry in value.split(",") if entry.strip()]


def check_allowed_secret(name: str) -> None:
    allowed = _allowed(ALLOWED_SECRETS_ENV)
    if allowed is not None and "*" not in allowed and name not in allowed:
        raise ValueError(f"the environment variable {name!r} is not one a config may name as a secret here: "
                         f"{ALLOWED_SECRETS_ENV} allows {allowed or 'none'}; widen it on the worker to use it")


def check_remote_code_allowed() -> None:
    """A model's own Python (trust_remote_code) is code the code allow-list cannot vet: only "*" allows it."""
    from alignment_core.annotation.scorers import ALLOWED_CODE_ENV

    allowed = _allowed(ALLOWED_CODE_ENV)
    if allowed is not None and "*" not in allowed:
        raise ValueError(f"runs the model repository's own Python, which {ALLOWED_CODE_ENV} ({allowed}) cannot vet; "
                         f"only {ALLOWED_CODE_ENV}=* on the worker allows it")


def check_allowed_host(url: str) -> None:
    """`url`'s host must be an entry ("host", any port) or its host:port one ("host:port")."""
    allowed = _allowed(ALLOWED_HOSTS_ENV)
    if allowed is None or "*" in allowed:
        return
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    host = (parts.hostname or "").lower()
    if host and (host in allowed or f"{host}:{port}" in allowed):
        return
    raise ValueError(f"host {host}:{port} ({redact(url)}) is not one a config may call here: {ALLOWED_HOSTS_ENV} "
                     f"allows {allowed or 'none'}; widen it on the worker to call it")


def check_allowed_path(path: str) -> None:
    """`path`, with symlinks and `..` resolved, must be an allowed folder or lie inside one."""
    allowed = _allowed(ALLOWED_PATHS_ENV)
    if allowed is None or "*" in allowed:
        return
    target = Path(path).expanduser().resolve()
    folders = [Path(entry).expanduser().resolve() for entry in allowed]
    if any(target == folder or folder in target.parents for folder in folders):
        return
    raise ValueError(f"{path!r} (resolved: {target}) is outside the folders a config may read here: "
                     f"{ALLOWED_PATHS_ENV} allows {[str(folder) for folder in folders] or 'none'}; widen it on "
                     "the worker to read it")
