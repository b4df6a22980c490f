"""Hub ids as a user passes them (`org/name`, `org/name@revision`), loaded offline from a hub cache on disk.

The cache (tests/conftest.py `hub_home`) holds the tiny model as `acme/tiny-chat` and the tiny reward model as
`acme/tiny-reward`, in the layout `hf download` leaves; HF_HUB_OFFLINE=1 keeps everything on this machine.
"""

import json
import subprocess
import sys
import time

import huggingface_hub.constants
import pandas as pd
import pytest
import yaml

from alignment_core import pipeline
from alignment_core.config import parse_config
from alignment_core.models import ModelNotFoundError, hub_snapshot, load_causal_lm, model_digest, resolve_model_path
from alignment_core.preflight import preflight_problems
from alignment_core.store import ArtifactStore
from alignment_core.tiny import build_tiny
from tests.conftest import POLICY_REVISION, REWARD_REVISION, add_to_hub_cache
from tests.helpers import REPO, SMALL, prefect_env


@pytest.fixture
def hub_cache(hub_home, monkeypatch):
    """Point this process's huggingface_hub at the test cache (subprocesses get HF_HOME instead)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    hub_snapshot.cache_clear()
    yield hub_home
    hub_snapshot.cache_clear()


def test_hub_id_resolves_to_its_snapshot_and_is_identified_by_its_commit(hub_cache, tiny_model_dir):
    path = resolve_model_path("acme/tiny-chat")
    assert path.endswith(f"models--acme--tiny-chat/snapshots/{POLICY_REVISION}")
    assert resolve_model_path(f"acme/tiny-chat@{POLICY_REVISION}") == path
    model = load_causal_lm("acme/tiny-chat")
    assert model.config.hidden_size == load_causal_lm(str(tiny_model_dir)).config.hidden_size

    # The same weights under another commit are another model: the digest follows the hub's revision.
    other = add_to_hub_cache(hub_cache, "acme/tiny-chat", tiny_model_dir, "3" * 40)
    assert model_digest(other) != model_digest(path)
    hub_snapshot.cache_clear()
    assert resolve_model_path("acme/tiny-chat") == str(other)  # refs/main now names the new commit
    assert resolve_model_path(f"acme/tiny-chat@{POLICY_REVISION}") == path  # a pinned revision stays
    add_to_hub_cache(hub_cache, "acme/tiny-chat", tiny_model_dir, POLICY_REVISION)  # restore refs/main


def test_missing_hub_model_names_the_model_and_the_fix(hub_cache):
    with pytest.raises(ModelNotFoundError, match=r"'acme/absent'.*hf download acme/absent"):
        resolve_model_path("acme/absent")
    with pytest.raises(ModelNotFoundError, match=r"--revision v2"):
        resolve_model_path("acme/tiny-chat@v2")


def test_preflight_lists_every_problem_before_any_work(hub_cache, tmp_path):
    cfg = parse_config({
        "setup": "online_pairwise",
        "data": {"source": str(tmp_path / "missing.jsonl")},
        "model": {"policy": "acme/absent", "reference": "acme/tiny-chat"},
        "annotation": {"annotator": "judge_pairwise",
                       "judge": {"backend": "http", "model": "judge", "base_url": "http://127.0.0.1:9/v1",
                                 "template": "no-such-template"}},
        "evaluation": {"oracle": "alignment_core.rewards:no_such_function"},
        "store": {"root": str(tmp_path / "store"), "run_name": "r"},
    })
    problems = preflight_problems(cfg)
    fields = [p.split(":")[0] for p in problems]
    assert fields == ["model.policy", "data.source", "annotation.judge.base_url", "annotation.judge.template",
                      "evaluation.oracle"], problems
    assert "acme/absent" in problems[0] and "not reachable" in problems[2]
    # Nothing was written into the store (the write probe is gone too, and left no folder).
    assert list((tmp_path / "store").iterdir()) == []


def _hub_env(tmp_path, hub_home) -> dict:
    return prefect_env(tmp_path, HF_HOME=str(hub_home))


def _run(module: list[str], config: dict, env: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", *module, "--config", str(path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_online_flow_with_hub_policy_and_hub_reward_model(tmp_path, hub_home):
    root = tmp_path / "store"
    config = {**SMALL, "model": {"policy": "acme/tiny-chat"},
              "annotation": {"annotator": "reward_model", "reward_model": f"acme/tiny-reward@{REWARD_REVISION}"},
              "store": {"root": str(root), "run_name": "hub"}}
    _run(["flows.iterative_dpo"], config, _hub_env(tmp_path, hub_home), tmp_path)

    store = ArtifactStore(str(root))
    snapshot = hub_home / "hub" / "models--acme--tiny-chat" / "snapshots" / POLICY_REVISION
    generations = store.read_pandas(store.stage_uri("hub", 1, "generations"))
    assert set(generations["policy_digest"]) == {model_digest(snapshot)}
    annotations = store.read_pandas(store.stage_uri("hub", 1, "annotations"))
    assert annotations["annotator"].str.startswith("reward_model:").all()
    lineage = json.loads((root / "hub" / "iter-001" / "checkpoint" / "lineage.json").read_text())
    assert lineage["models"]["policy"]["name"] == "acme/tiny-chat"
    assert lineage["models"]["policy"]["hub_revision"] == POLICY_REVISION
    # Iteration 2 samples from iteration 1's checkpoint, not from the hub model again.
    second = store.read_pandas(store.stage_uri("hub", 2, "generations"))
    assert set(second["policy_digest"]) == {model_digest(root / "hub" / "iter-001" / "checkpoint")}


@pytest.mark.slow
def test_a_cascade_of_hub_and_local_reward_models_trains_a_lora_adapter_on_a_hub_policy(tmp_path, hub_home):
    """The annotator cascade with a hub policy, LoRA and an ensemble of a hub reward model and a local one: every
    row records both members' scores, and a quarter of the pairs (2 of 8 prompts) per iteration go to the true
    reward, 4 in the run."""
    root = tmp_path / "store"
    members = [f"acme/tiny-reward@{REWARD_REVISION}", str(build_tiny(tmp_path / "rm-1", kind="reward_model", seed=1))]
    config = {**SMALL, "model": {"policy": "acme/tiny-chat", "adapter": {"r": 4}},
              "annotation": {"annotator": "cascade", "reward_model": members,
                             "programmatic": "alignment_core.rewards:positive_words",
                             "cascade": {"first": "reward_model", "escalate_to": "programmatic", "budget": 0.25}},
              "store": {"root": str(root), "run_name": "cascade"}}
    _run(["flows.iterative_dpo"], config, _hub_env(tmp_path, hub_home), tmp_path)

    store = ArtifactStore(str(root))
    for k in (1, 2):
        annotations = store.read_pandas(store.stage_uri("cascade", k, "annotations"))
        records = [json.loads(raw) for raw in annotations["raw"]]
        up = [r for r in records if r["cascade"]["escalated"]]
        assert len(annotations) == 8 and len(up) == 2
        assert (annotations["annotator"] == "programmatic:alignment_core.rewards:positive_words").sum() == 2
        cheap = [r for r in records if not r["cascade"]["escalated"]]
        assert all(len(scores) == 2 for r in cheap for scores in r["members"].values())
        assert (root / "cascade" / f"iter-{k:03d}" / "checkpoint" / "adapter_model.safetensors").is_file()
    assert pipeline.expensive_labels_spent(store, "cascade", 2) == 4


@pytest.mark.slow
def test_online_flow_with_a_hub_judge(tmp_path, hub_home):
    root = tmp_path / "store"
    config = {**SMALL, "iterations": 1, "model": {"policy": "acme/tiny-chat"},
              "annotation": {"annotator": "judge_pairwise", "judge": {"backend": "local", "model": "acme/tiny-chat"}},
              "reweight": {"strategy": "judge_confidence"}, "evaluation": {"enabled": False},
              "store": {"root": str(root), "run_name": "judge"}}
    _run(["flows.iterative_dpo"], config, _hub_env(tmp_path, hub_home), tmp_path)
    store = ArtifactStore(str(root))
    annotations = store.read_pandas(store.stage_uri("judge", 1, "annotations"))
    assert len(annotations) == 8 and annotations["annotator"].str.contains("judge").all()


@pytest.mark.slow
@pytest.mark.parametrize("flow, setup, loss, policy, source", [
    ("sft", "sft", "sft", "acme/tiny-chat", "bundled:sft"),
    ("offline-preference", "offline_pairwise", "dpo", "acme/tiny-chat", "bundled:preferences"),
    ("reward-model", "reward_modelling", "reward", "acme/tiny-reward", "bundled:preferences"),
])
def test_offline_flows_with_hub_models(tmp_path, hub_home, flow, setup, loss, policy, source):
    root = tmp_path / "store"
    config = {"setup": setup, "data": {"source": source, "max_rows": 32, "eval_prompts": 4},
              "model": {"policy": policy}, "training": {"loss": loss, "batch_size": 4},
              "evaluation": {"max_new_tokens": 8}, "store": {"root": str(root), "run_name": flow}}
    _run(["flows.offline", flow], config, _hub_env(tmp_path, hub_home), tmp_path)
    lineage = json.loads((root / flow / "iter-001" / "checkpoint" / "lineage.json").read_text())
    assert lineage["models"]["policy"]["name"] == policy
    assert lineage["models"]["policy"]["hub_revision"] in (POLICY_REVISION, REWARD_REVISION)
    metrics = pd.read_parquet(root / flow / "iter-001" / "metrics")
    assert len(metrics) > 0 and metrics["value"].notna().all()


def test_missing_hub_model_stops_the_command_in_seconds_without_a_traceback(tmp_path, hub_home):
    config = {**SMALL, "model": {"policy": "acme/absent"}, "store": {"root": str(tmp_path / "s"), "run_name": "x"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", str(path)], cwd=REPO,
                            env=_hub_env(tmp_path, hub_home), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "model.policy: hub model 'acme/absent'" in result.stderr and "hf download" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s" / "x" / "iter-001").exists()
    print(f"failed after {time.monotonic() - started:.1f}s")


@pytest.mark.slow
def test_stage_tasks_retry_transient_errors_only(tmp_path):
    """Under real (ephemeral) Prefect: a missing file fails once; a dropped connection is retried."""
    script = """
from prefect import flow
from tasks import stage_task
attempts = {"deterministic": 0, "transient": 0}

@stage_task("deterministic")
def deterministic(iteration: int):
    attempts["deterministic"] += 1
    raise FileNotFoundError("no such file: data.jsonl")

@stage_task("transient")
def transient(iteration: int):
    attempts["transient"] += 1
    if attempts["transient"] < 3:
        raise ConnectionError("connection reset by peer")

@flow
def both():
    transient.with_options(retry_delay_seconds=0)(1)
    deterministic.with_options(retry_delay_seconds=0)(1, return_state=True)

both()
print("ATTEMPTS", attempts)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=prefect_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert "ATTEMPTS {'deterministic': 1, 'transient': 3}" in result.stdout, result.stdout + result.stderr[-3000:]


def test_preflight_passes_the_bundled_tiny_setup(tmp_path):
    cfg = parse_config({"annotation": {"annotator": "reward_model", "reward_model": "tiny://reward"},
                        "store": {"root": str(tmp_path), "run_name": "ok"}})
    assert preflight_problems(cfg) == []
