"""Shared fixtures: the tiny model and reward model (built once per session), an S3 server on loopback."""

import os

# Keep every test offline: set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from alignment_core.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-reward", kind="reward_model")


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
