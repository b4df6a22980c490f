"""Shared fixtures: the tiny model and reward model (built once per session), an S3 server on loopback."""

import os

# Keep every test offline: set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from alignment_core import kept_models  # noqa: E402
from alignment_core.tiny import build_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def no_models_kept_between_tests():
    """Each test loads its own models: the models a pipeline keeps loaded (alignment_core/kept_models.py) would
    otherwise live as long as the test process."""
    yield
    kept_models.configure(False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-reward", kind="reward_model")


@pytest.fixture(scope="session")
def stopping_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with EOS made likely, so that samples end both ways (tests/test_generation.py)."""
    from tests.test_generation import build_stopping_model

    return build_stopping_model(str(tiny_model_dir), tmp_path_factory.mktemp("stopping") / "llama")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-API server (moto) on a loopback port with a bucket `artifacts`; yields its endpoint URL.

    Credentials reach s3fs as they would in production: through the AWS_* environment variables.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="artifacts")
        yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory):
    """Keep vLLM's compile cache inside the test session and its CPU KV cache small (GiB)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        yield


def add_to_hub_cache(hf_home, repo_id: str, model_dir, revision: str) -> Path:
    """Put a model folder into a Hugging Face hub cache as `hf download` leaves it, with refs/main -> revision.

    `models--ORG--NAME/snapshots/<revision>/` holds the files and `refs/main` names the revision: with
    HF_HUB_OFFLINE=1, `snapshot_download(repo_id)` and `from_pretrained(repo_id)` load it from there.
    """
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / revision, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


POLICY_REVISION, REWARD_REVISION = "1" * 40, "2" * 40


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory, tiny_model_dir, tiny_reward_model_dir):
    """An HF_HOME whose hub cache holds the tiny model as `acme/tiny-chat` and its reward model as
    `acme/tiny-reward`: hub ids that load offline, as a user's downloaded models do."""
    home = tmp_path_factory.mktemp("hf-home")
    add_to_hub_cache(home, "acme/tiny-chat", tiny_model_dir, POLICY_REVISION)
    add_to_hub_cache(home, "acme/tiny-reward", tiny_reward_model_dir, REWARD_REVISION)
    return home


# ---- the fault matrix ------------------------------------------------------------------------------------
# Every test marked `@pytest.mark.fault("<scenario>")` is a row of the matrix printed at the end of the run:
# scenario (with the parameter id of a parametrized test), outcome, seconds (setup + call + teardown) and the
# note the test left with `fault_note(request, "...")`.
_FAULT_ROWS: dict[str, dict] = {}


def fault_note(request, note: str) -> None:
    """A line for the test's row of the fault matrix (what was injected, what completed the work)."""
    request.node.user_properties.append(("fault_note", note))


def _fault_row(item) -> dict | None:
    marker = item.get_closest_marker("fault")
    if marker is None:
        return None
    name = marker.args[0] if marker.args else item.name
    callspec = getattr(item, "callspec", None)
    return {"scenario": f"{name} [{callspec.id}]" if callspec else name, "test": item.nodeid,
            "outcome": "not run", "seconds": 0.0, "note": ""}


def pytest_collection_modifyitems(config, items):
    for item in items:
        row = _fault_row(item)
        if row is not None:
            _FAULT_ROWS[item.nodeid] = row


def pytest_deselected(items):
    for item in items:
        if item.nodeid in _FAULT_ROWS:
            _FAULT_ROWS[item.nodeid]["outcome"] = "deselected"


def pytest_runtest_logreport(report):
    row = _FAULT_ROWS.get(report.nodeid)
    if row is None:
        return
    row["seconds"] += report.duration
    if report.failed:
        row["outcome"] = "failed" if report.when == "call" else f"error ({report.when})"
    elif report.skipped and row["outcome"] in ("not run", "passed"):
        row["outcome"] = "skipped"
    elif report.when == "call" and report.passed:
        row["outcome"] = "passed"
    notes = [value for key, value in report.user_properties if key == "fault_note"]
    if notes:
        row["note"] = "; ".join(notes)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = [row for row in _FAULT_ROWS.values() if row["outcome"] != "deselected"]
    if not rows:
        return
    width = max(len(row["scenario"]) for row in rows)
    terminalreporter.section("fault matrix")
    terminalreporter.write_line(f"{'scenario':<{width}}  {'outcome':<9} {'seconds':>7}  note")
    for row in sorted(rows, key=lambda r: r["scenario"]):
        terminalreporter.write_line(f"{row['scenario']:<{width}}  {row['outcome']:<9} {row['seconds']:>7.1f}  "
                                    f"{row['note']}")
    deselected = sum(row["outcome"] == "deselected" for row in _FAULT_ROWS.values())
    if deselected:
        terminalreporter.write_line(f"({deselected} fault scenarios deselected)")
