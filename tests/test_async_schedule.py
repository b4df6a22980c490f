"""scale_out.schedule async: the next iterations sample and label while one trains, from a checkpoint at most
`max_staleness` behind; every generation row says which checkpoint sampled it.

The order and the staleness bound are checked on `flows.common.ahead_of_training` with stand-in stages (fast);
the production path is a real `prefect server start` with two process workers, the stage deployments of
deployments/prefect.yaml, and the `iterative-dpo` CLI orchestrating against the server; one run SIGKILLs a
worker's flow-run process of each kind (a trainer and a sampler) while they overlap, and ends with the rows of a
run that was not killed.
"""

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from alignment_core import pipeline
from alignment_core.config import ConfigError, parse_config
from alignment_core.store import ArtifactStore
from flows.common import ahead_of_training


# ---- the schedule, with stand-in stages -------------------------------------------------------------------------
class Pipeline:
    """Stand-in stages that record when each iteration's sampling ran and which checkpoints existed then."""

    def __init__(self, lead: int, seconds: float = 0.02):
        self.lead, self.seconds, self.trained = lead, seconds, [0]  # checkpoint 0: the initial policy
        self.events: list[tuple] = []
        self.running = 0
        self.lock = threading.Lock()

    def sample_and_label(self, k: int) -> dict:
        with self.lock:
            self.running += 1
            self.events.append(("sample-start", k, max(self.trained), self.running, threading.current_thread().name))
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
            self.events.append(("sample-end", k))
        return {"generations": f"iter-{k}/generations", "sampler": max(0, k - 1 - self.lead)}

    def run(self, iterations: int) -> list[dict]:
        with ahead_of_training(self.sample_and_label, self.lead, iterations) as labelled:
            samples = []
            for k in range(1, iterations + 1):
                samples.append(labelled(k))
                self.events.append(("train-start", k))
                time.sleep(self.seconds)
                self.trained.append(k)
                self.events.append(("train-end", k))
            return samples

    def index(self, *event) -> int:
        return next(i for i, e in enumerate(self.events) if e[:len(event)] == event)


def test_sync_samples_each_iteration_here_after_the_last_one_trained():
    run = Pipeline(lead=0)
    assert [s["generations"] for s in run.run(3)] == ["iter-1/generations", "iter-2/generations",
                                                       "iter-3/generations"]
    starts = [e for e in run.events if e[0] == "sample-start"]
    assert [(k, newest) for _, k, newest, _, _ in starts] == [(1, 0), (2, 1), (3, 2)]  # each after k-1 trained
    assert {thread for *_, thread in starts} == {threading.current_thread().name}


@pytest.mark.parametrize("lead", [1, 2])
def test_async_samples_ahead_in_order_never_from_a_checkpoint_not_yet_written(lead):
    iterations = 6
    run = Pipeline(lead)
    samples = run.run(iterations)
    assert [s["generations"] for s in samples] == [f"iter-{k}/generations" for k in range(1, iterations + 1)]
    starts = [e for e in run.events if e[0] == "sample-start"]
    assert [k for _, k, *_ in starts] == list(range(1, iterations + 1))  # in order, each once
    assert max(running for *_, running, _ in starts) == 1  # one after another, on one thread
    assert {thread for *_, thread in starts} != {threading.current_thread().name}
    for _, k, newest, _, _ in starts:
        sampler = max(0, k - 1 - lead)
        assert sampler <= newest  # its checkpoint was written when it started
        assert k - 1 - sampler <= lead  # staleness bound
        assert k <= newest + 1 + lead  # never more than `lead` iterations ahead of the last trained one
    # the overlap: iteration 2 sampled while iteration 1 trained
    assert run.index("sample-start", 2) < run.index("train-end", 1)


def test_a_failed_sampling_fails_the_iteration_that_needs_it():
    def sample_and_label(k: int) -> dict:
        if k == 2:
            raise ValueError("judge output unparseable")
        return {"k": k}

    with ahead_of_training(sample_and_label, 1, 3) as labelled:
        assert labelled(1) == {"k": 1}
        with pytest.raises(ValueError, match="unparseable"):
            labelled(2)


def test_leaving_early_waits_for_the_started_sampling_and_drops_the_rest():
    run = Pipeline(lead=3, seconds=0.2)
    with pytest.raises(RuntimeError, match="training failed"):
        with ahead_of_training(run.sample_and_label, 3, 8) as labelled:
            labelled(1)  # starts 1..4; 1 done, 2 running
            raise RuntimeError("training failed")
    ended = [e[1] for e in run.events if e[0] == "sample-end"]
    time.sleep(0.5)  # nothing runs after the block: no stage writes once the flow run (and its lease) ended
    assert [e[1] for e in run.events if e[0] == "sample-end"] == ended == [1, 2]
    assert run.running == 0


# ---- the config ---------------------------------------------------------------------------------------------------
def online(**scale_out) -> dict:
    return {"setup": "online_pairwise", "annotation": {"annotator": "programmatic"}, "scale_out": scale_out}


@pytest.mark.parametrize("changes, message", [
    (online(schedule="async"), "set generate_deployment or train_deployment"),
    ({**online(schedule="async", train_deployment="train-stage/gpu"), "setup": "offline_pairwise"},
     "samples nothing"),
    ({**online(schedule="async", generate_deployment="generate-stage/gpu"),
      "annotation": {"annotator": "human"}, "evaluation": {"enabled": False}}, "pauses the flow run"),
    (online(schedule="async", train_deployment="train-stage/gpu", max_staleness=0), "max_staleness must be >= 1"),
])
def test_async_is_refused_where_it_cannot_overlap(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(changes)


def test_the_lead_is_the_staleness_when_async_and_zero_when_sync():
    assert parse_config(online()).scale_out.lead == 0
    assert parse_config(online(schedule="sync", max_staleness=3)).scale_out.lead == 0
    assert parse_config(online(schedule="async", max_staleness=3, train_deployment="t/gpu")).scale_out.lead == 3


# ---- the rows say which checkpoint sampled them ---------------------------------------------------------------------
def generation_config(root, policy) -> dict:
    return {"setup": "online_pairwise", "model": {"policy": str(policy)},
            "data": {"source": "bundled:prompts", "eval_prompts": 2},
            "generation": {"backend": "transformers", "prompts_per_iteration": 4, "n_samples": 2,
                           "max_new_tokens": 8},
            "annotation": {"annotator": "programmatic"},
            "store": {"root": str(root), "run_name": "lineage", "cache_dir": str(root.parent / "cache")}}


def test_generation_rows_record_their_policys_iteration_and_staleness(tiny_model_dir, tmp_path):
    cfg = parse_config(generation_config(tmp_path / "store", tiny_model_dir))
    store = ArtifactStore(cfg.store.root)
    prompts = pipeline.load_prompts(cfg, 3)
    fresh = pipeline.generate(cfg, prompts, cfg.model.policy, 3, policy_iteration=2)
    fresh_manifest = store.read_manifest(fresh)
    rows = store.read_pandas(fresh)
    assert (rows["policy_iteration"] == 2).all() and (rows["staleness"] == 0).all() and len(rows) == 8
    assert fresh_manifest["extra"]["staleness"] == 0

    # the same stage sampled one checkpoint behind: a different stage (redone), each row saying so
    stale = pipeline.generate(cfg, prompts, cfg.model.policy, 3, policy_iteration=1)
    rows = store.read_pandas(stale)
    assert (rows["policy_iteration"] == 1).all() and (rows["staleness"] == 1).all()
    assert store.read_manifest(stale)["fingerprint"] != fresh_manifest["fingerprint"]
    # sampled fresh again: the first fingerprint, the same rows
    assert pipeline.generate(cfg, prompts, cfg.model.policy, 3, policy_iteration=2) == fresh
    assert store.read_manifest(fresh)["fingerprint"] == fresh_manifest["fingerprint"]
    pd.testing.assert_frame_equal(store.read_pandas(fresh), rows.assign(policy_iteration=2, staleness=0),
                                  check_dtype=False)
    # a fresh sample's fingerprint is the one it had before rows carried their lineage: a sync run's stages stay
    # complete across this change
    started = time.time()
    assert pipeline.generate(cfg, prompts, cfg.model.policy, 3) == fresh
    assert store.read_manifest(fresh)["created_at"] < started


# ---- the production path: a Prefect server, two process workers --------------------------------------------------
def async_config(root, models: dict, run_name: str) -> dict:
    """3 iterations of 4 prompts x 2 samples, one checkpoint stale: iterations 1 and 2 sample from the initial
    policy, iteration 3 from iteration 1's checkpoint."""
    return {
        "setup": "online_pairwise",
        "iterations": 3,
        "model": {"policy": str(models["policy"])},
        "data": {"source": "bundled:prompts", "eval_prompts": 4},
        "generation": {"backend": "transformers", "prompts_per_iteration": 4, "n_samples": 2, "max_new_tokens": 12,
                       "shard_size": 2},
        "annotation": {"annotator": "reward_model", "reward_model": str(models["reward"])},
        "training": {"epochs": 1, "batch_size": 4, "learning_rate": 5e-3},
        "evaluation": {"enabled": False},
        "store": {"root": str(root), "run_name": run_name, "cache_dir": str(root.parent / "cache")},
        "scale_out": {"generate_deployment": "generate-stage/gpu", "annotate_deployment": "annotate-stage/gpu",
                      "train_deployment": "train-stage/gpu", "schedule": "async", "max_staleness": 1},
    }


def stage_rows(store: ArtifactStore) -> dict[str, pd.DataFrame]:
    order = {"generations": ["prompt_id", "sample_index"], "annotations": ["prompt_id", "generation1_id"]}
    return {f"{stage}-{k}": store.read_pandas(store.stage_uri("async", k, stage)).sort_values(by)
            .reset_index(drop=True) for k in (1, 2, 3) for stage, by in order.items()}


def runs_of(api: str, root: Path) -> dict[str, list]:
    """The flow runs of the run stored under `root`, by name (a crashed run's replacement takes its name), in
    creation order."""
    from tests.test_fanout import flow_runs

    runs: dict[str, list] = {}
    for run in flow_runs(api, ""):
        if str(root) in run.parameters.get("config_json", ""):
            runs.setdefault(run.name, []).append(run)
    return runs


def kill_each_once_it_runs(api: str, root: Path, names: list[str], deadline: float) -> list[str]:
    """SIGKILL the process of each flow run named in `names` (of the run under `root`) once it is running,
    whichever comes first; returns their ids."""
    killed = {}
    while len(killed) < len(names):
        assert time.time() < deadline, f"never saw {set(names) - set(killed)} running"
        for name, (run, *_) in runs_of(api, root).items():
            if name in names and name not in killed and run.state_type.value == "RUNNING" and run.infrastructure_pid:
                os.kill(int(run.infrastructure_pid), signal.SIGKILL)
                killed[name] = str(run.id)
        time.sleep(0.05)
    return list(killed.values())


@pytest.mark.slow
@pytest.mark.fault("SIGKILL of a sampling or a training worker while they overlap (async schedule)")
def test_async_iterations_on_two_workers_overlap_and_resume_exactly_once(tiny_model_dir, tiny_reward_model_dir,
                                                                         tmp_path):
    import subprocess
    import sys

    from tests.test_deployment import running_prefect_server
    from tests.test_fanout import process_workers, snapshot_repo

    models = {"policy": tiny_model_dir, "reward": tiny_reward_model_dir}
    home = snapshot_repo(tmp_path, models)
    calm_root, killed_root = tmp_path / "calm", tmp_path / "killed"
    with running_prefect_server(tmp_path) as (api, env):
        env = {**env, "ALIGNMENT_CORE_HOME": str(home), "PYTHONPATH": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
        for args in (("work-pool", "create", "gpu", "--type", "process"),
                     ("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name",
                      "generate-stage/gpu", "--name", "annotate-stage/gpu", "--name", "train-stage/gpu")):
            result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=home, env=env, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        def orchestrate(root: Path) -> subprocess.Popen:
            path = tmp_path / f"{root.name}.yaml"
            path.write_text(yaml.safe_dump(async_config(root, models, "async")))
            log = open(tmp_path / f"orchestrator-{root.name}.log", "w")
            return subprocess.Popen([sys.executable, "-m", "flows.iterative_dpo", "--config", str(path)], cwd=home,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def finish(process: subprocess.Popen, root: Path) -> None:
            try:
                process.wait(timeout=600)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            logs = "".join((tmp_path / f).read_text()[-4000:] for f in
                           (f"orchestrator-{root.name}.log", "worker-0.log", "worker-1.log"))
            assert process.returncode == 0, logs

        with process_workers(tmp_path, env, 2, home):
            finish(orchestrate(calm_root), calm_root)
            # Killed while they overlap: iteration 1's trainer and iteration 2's sampler (which runs beside
            # iteration 1's training). Each Crashed flow run is started again, and the run ends with the same rows.
            orchestrator = orchestrate(killed_root)
            killed = kill_each_once_it_runs(api, killed_root, ["train-iter-1", "generate-iter-2"], time.time() + 300)
            finish(orchestrator, killed_root)
        calm_runs, killed_runs = runs_of(api, calm_root), runs_of(api, killed_root)

    # ordering, as dispatched: iteration 2's sampling started while iteration 1 trained, iteration 3's only once
    # checkpoint 1 was written, and iteration 2 trained on its own labels. (When each body ran is up to the
    # workers: on a loaded machine a flow-run process may spend longer starting than the stage beside it runs.)
    calm_runs = {name: only for name, (only,) in calm_runs.items()}
    assert calm_runs["generate-iter-2"].created < calm_runs["train-iter-1"].end_time
    assert calm_runs["generate-iter-3"].created >= calm_runs["train-iter-1"].end_time
    assert calm_runs["train-iter-2"].created >= calm_runs["annotate-iter-2"].end_time
    for name in ("train-iter-1", "generate-iter-2"):  # each killed once, started again once
        assert [run.state_type.value for run in killed_runs[name]] == ["CRASHED", "COMPLETED"]
        assert str(killed_runs[name][0].id) in killed
    assert all(len(runs) == 1 for name, runs in killed_runs.items() if name not in ("train-iter-1", "generate-iter-2"))

    calm, after_kills = stage_rows(ArtifactStore(str(calm_root))), stage_rows(ArtifactStore(str(killed_root)))
    for name, rows in calm.items():  # the same rows, each once (checkpoints are named by their store root)
        pd.testing.assert_frame_equal(rows.drop(columns="policy_uri", errors="ignore"),
                                      after_kills[name].drop(columns="policy_uri", errors="ignore"))
    for k, sampler in ((1, 0), (2, 0), (3, 1)):
        rows = calm[f"generations-{k}"]
        assert len(rows) == 8 and rows["generation_id"].is_unique
        assert (rows["policy_iteration"] == sampler).all() and (rows["staleness"] == k - 1 - sampler).all()
        expected = str(models["policy"]) if sampler == 0 else ArtifactStore(str(calm_root)).checkpoint_uri("async", 1)
        assert set(rows["policy_uri"]) == {expected}
