"""Fan-out: a stage's shards split across N workers give exactly the rows of one worker.

The library part (shard subsets, the last worker writes the manifest) runs in-process. The slow test is the
production path: a real `prefect server start`, a process work pool with two `prefect worker start` processes,
the stage deployments of deployments/prefect.yaml deployed, and an orchestrating flow whose generate and
annotate tasks fan out over them; then one worker's flow-run process is SIGKILLed after its first shard.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from alignment_core import pipeline
from alignment_core.config import ConfigError, parse_config
from alignment_core.store import ArtifactStore

REPO = Path(__file__).resolve().parent.parent
SORT = {"generations": ["prompt_id", "sample_index"], "annotations": ["prompt_id", "generation1_id"]}


def config(root, models: dict, run_name: str = "fan", **scale_out) -> dict:
    """8 prompts x 2 samples in shards of 1 prompt (8 shards), labelled by the tiny reward model."""
    return {
        "setup": "online_pairwise",
        "iterations": 1,
        "data": {"source": "bundled:prompts", "eval_prompts": 4},
        "model": {"policy": str(models["policy"])},
        "generation": {"backend": "transformers", "prompts_per_iteration": 8, "n_samples": 2, "max_new_tokens": 16,
                       "shard_size": 1, "batch_size": 8},
        "annotation": {"annotator": "reward_model", "reward_model": str(models["reward"]), "batch_size": 8},
        "evaluation": {"enabled": False},
        "store": {"root": str(root), "run_name": run_name, "cache_dir": str(Path(root).parent / "cache")},
        "scale_out": scale_out,
    }


def rows(store: ArtifactStore, uri: str, stage: str) -> pd.DataFrame:
    frame = store.read_pandas(uri)
    return frame.sort_values(SORT[stage]).reset_index(drop=True)


@pytest.fixture(scope="module")
def one_worker(tiny_model_dir, tiny_reward_model_dir, tmp_path_factory):
    """The reference of a run name (seeds derive from it): both stages written by one in-process call each."""
    models, references = {"policy": tiny_model_dir, "reward": tiny_reward_model_dir}, {}

    def reference(run_name: str) -> dict[str, pd.DataFrame]:
        if run_name not in references:
            cfg = parse_config(config(tmp_path_factory.mktemp("one-worker") / "store", models, run_name))
            generations = pipeline.generate(cfg, pipeline.load_prompts(cfg, 1), cfg.model.policy, 1)
            annotations = pipeline.annotate(cfg, generations, 1)
            store = pipeline.open_store(cfg)
            references[run_name] = {"generations": rows(store, generations, "generations"),
                                    "annotations": rows(store, annotations, "annotations")}
        return references[run_name]

    return models, reference


def test_workers_of_a_stage_write_its_rows_and_the_last_one_finishes_it(one_worker, tmp_path):
    models, reference = one_worker
    expected = reference("fan")
    cfg = parse_config(config(tmp_path / "store", models))
    store = pipeline.open_store(cfg)
    prompts = pipeline.load_prompts(cfg, 1)
    out = store.stage_uri("fan", 1, "generations")

    pipeline.generate(cfg, prompts, cfg.model.policy, 1, shard_subset=(1, 3))
    assert store.read_manifest(out) is None  # shards of workers 0 and 2 are missing: not complete
    written = sorted(p.name for p in Path(out).glob("part-*.parquet"))
    assert written == ["part-00001.parquet", "part-00004.parquet", "part-00007.parquet"]  # 1, 1+3, 1+6
    pipeline.generate(cfg, prompts, cfg.model.policy, 1, shard_subset=(0, 3))
    assert store.read_manifest(out) is None
    pipeline.generate(cfg, prompts, cfg.model.policy, 1, shard_subset=(2, 3))  # the last one writes the manifest
    manifest = store.read_manifest(out)
    assert manifest is not None and len(manifest["shards"]) == 8
    assert manifest["extra"]["workers"] == 3 and manifest["extra"]["generated_shards"] == 8
    assert manifest["extra"]["generated_rows"] == manifest["rows"] == 16
    pd.testing.assert_frame_equal(rows(store, out, "generations"), expected["generations"])

    annotations = store.stage_uri("fan", 1, "annotations")
    pipeline.annotate(cfg, out, 1, shard_subset=(0, 2))
    assert store.read_manifest(annotations) is None
    pipeline.annotate(cfg, out, 1, shard_subset=(1, 2))
    assert store.read_manifest(annotations)["extra"]["rows"] == len(expected["annotations"])
    pd.testing.assert_frame_equal(rows(store, annotations, "annotations"), expected["annotations"])


def test_a_worker_started_again_redoes_only_its_missing_shards(one_worker, tmp_path):
    models, reference = one_worker
    expected = reference("fan")
    cfg = parse_config(config(tmp_path / "store", models))
    store = pipeline.open_store(cfg)
    prompts = pipeline.load_prompts(cfg, 1)
    out = store.stage_uri("fan", 1, "generations")
    pipeline.generate(cfg, prompts, cfg.model.policy, 1, shard_subset=(0, 2))
    pipeline.generate(cfg, prompts, cfg.model.policy, 1, shard_subset=(1, 2))
    for index in (3, 5):  # worker 1 died after its first shard: its later ones are missing
        os.unlink(Path(out) / f"part-{index:05d}.parquet")
    os.unlink(Path(out) / "_manifest.json")
    kept = {p.name: p.stat().st_mtime_ns for p in Path(out).glob("part-*.parquet")}
    pipeline.generate(cfg, prompts, cfg.model.policy, 1, shard_subset=(1, 2))
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).glob("part-*.parquet") if p.name in kept} == kept
    manifest = store.read_manifest(out)
    assert manifest["extra"]["resumed_shards"] == 2  # the reports: worker 0's 4 shards, worker 1's last try 2
    pd.testing.assert_frame_equal(rows(store, out, "generations"), expected["generations"])


@pytest.mark.parametrize("changes, message", [
    ({"scale_out": {"generate_workers": 2}}, "generate_workers > 1 fans the generate stage out"),
    ({"scale_out": {"annotate_workers": 4, "generate_deployment": "generate-stage/gpu"}},
     r"set it \(e.g. annotate-stage"),
    ({"scale_out": {"generate_workers": 0, "generate_deployment": "generate-stage/gpu"}},
     r"generate_workers must be > 0"),
    ({"generation": {"backend": "transformers", "data_parallel_size": 2}}, "data_parallel_size > 1 runs vLLM"),
])
def test_scale_out_config_is_checked_at_load(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(changes)


def test_the_stage_subset_must_name_a_worker():
    from alignment_core.fanout import check_subset

    assert check_subset([1, 4]) == (1, 4) and check_subset(None) is None
    for bad in ([4, 4], [-1, 2], [0], "ab"):
        with pytest.raises(ValueError, match="shard_subset"):
            check_subset(bad)


# ---- the production path: a Prefect server, a process work pool, two workers --------------------------------
def snapshot_repo(tmp_path: Path, models: dict) -> Path:
    """A copy of the code for the workers to run, whose deployments may read the tiny models' folders.

    A snapshot: stage fingerprints include a digest of the library code, so workers started at different moments
    of a checkout being edited would disagree on the stage (and clear each other's shards)."""
    home = tmp_path / "repo"
    for name in ("alignment_core", "flows", "tasks", "deployments", "tests"):
        shutil.copytree(REPO / name, home / name, ignore=shutil.ignore_patterns("__pycache__"))
    # The tiny models live in pytest's temporary folders: the stage deployments must let a config read them.
    deployments_file = home / "deployments" / "prefect.yaml"
    folders = ",".join(str(Path(path).parent) for path in models.values())
    deployments_file.write_text(deployments_file.read_text().replace(
        'ALIGNMENT_CORE_ALLOWED_PATHS: "data,runs"', f'ALIGNMENT_CORE_ALLOWED_PATHS: "data,runs,{folders}"'))
    return home


@contextmanager
def process_workers(tmp_path, env: dict, count: int, home: Path):
    """`prefect worker start --pool gpu --limit 1` x count (one stage flow run each at a time, like one worker per
    GPU machine), each in its own process group; yields their Popen objects."""
    workers, logs = [], []
    try:
        for index in range(count):
            logs.append(open(tmp_path / f"worker-{index}.log", "w"))
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--limit", "1",
                 "--name", f"gpu-{index}"], cwd=home, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                start_new_session=True))
        yield workers
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        for log in logs:
            log.close()


def start_orchestrator(tmp_path, env: dict, cfg: dict, stages: str, home: Path) -> subprocess.Popen:
    """This module's `orchestrate` flow in its own process against the server (it holds the run lease)."""
    path = tmp_path / f"{cfg['store']['run_name']}.json"
    path.write_text(json.dumps(cfg))
    log = open(tmp_path / f"orchestrator-{cfg['store']['run_name']}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "tests.test_fanout", str(path), stages], cwd=home, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, tmp_path, name: str, timeout: float = 240) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    logs = "".join((tmp_path / f).read_text()[-3000:] for f in (f"orchestrator-{name}.log", "worker-0.log",
                                                                 "worker-1.log"))
    assert process.returncode == 0, logs


def flow_runs(api: str, prefix: str) -> list:
    """Flow runs whose name starts with `prefix`, in creation order."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    return sorted((r for r in runs if r.name.startswith(prefix)), key=lambda r: r.created)


def killed_runs(api: str) -> list:
    """The flow runs of worker 1 of the "killed" run's generate stage."""
    return [r for r in flow_runs(api, "generate-iter-1-worker-1-of-2") if '"killed"' in r.parameters["config_json"]]


def shards_by_worker(stage_dir: Path, workers: int) -> list[list[float]]:
    return [[p.stat().st_mtime for p in sorted(stage_dir.glob("part-*.parquet")) if int(p.stem[5:]) % workers == w]
            for w in range(workers)]


@pytest.mark.slow
@pytest.mark.fault("SIGKILL of a fan-out worker")
def test_fanned_out_stages_on_process_workers_write_the_rows_of_one_worker(one_worker, tmp_path):
    from tests.test_deployment import running_prefect_server

    models, reference = one_worker
    home = snapshot_repo(tmp_path, models)
    with running_prefect_server(tmp_path) as (api, env):
        env = {**env, "ALIGNMENT_CORE_HOME": str(home), "PYTHONPATH": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_WORKER_PREFETCH_SECONDS": "1"}

        def prefect(*args):
            result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=home, env=env, capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        prefect("work-pool", "create", "gpu", "--type", "process")
        prefect("gcl", "create", "gpu", "--limit", "1")  # one GPU: the two workers must take turns
        prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name",
                "generate-stage/gpu", "--name", "annotate-stage/gpu")
        scale_out = {"generate_deployment": "generate-stage/gpu", "generate_workers": 2,
                     "annotate_deployment": "annotate-stage/gpu", "annotate_workers": 2, "concurrency_limit": "gpu"}
        with process_workers(tmp_path, env, 2, home):
            # 1. Both stages fanned out over two flow runs each: the same rows as one worker.
            cfg = config(tmp_path / "store", models, run_name="fanned", **scale_out)
            finish(start_orchestrator(tmp_path, env, cfg, "generate,annotate", home), tmp_path, "fanned")
            store = ArtifactStore(str(tmp_path / "store"))
            for stage in ("generations", "annotations"):
                pd.testing.assert_frame_equal(rows(store, store.stage_uri("fanned", 1, stage), stage),
                                              reference("fanned")[stage])
            for stage in ("generate", "annotate"):
                runs = flow_runs(api, f"{stage}-iter-1")  # the two workers, no third run to finish the stage
                assert sorted((r.name, r.work_pool_name, r.state_type.value) for r in runs) == [
                    (f"{stage}-iter-1-worker-{i}-of-2", "gpu", "COMPLETED") for i in range(2)]
            # The global concurrency limit of 1 slot: one worker's shards were all written before the other's.
            first, second = sorted(shards_by_worker(tmp_path / "store" / "fanned" / "iter-001" / "generations", 2))
            assert len(first) == len(second) == 4 and max(first) < min(second)

            # 2. A worker's process SIGKILLed after its first shard: its run is Crashed, started again, and the
            # stage completes with the same rows. No concurrency limit here: a killed run's slot stays taken until
            # its lease (300 s by default) expires.
            cfg = config(tmp_path / "store", models, run_name="killed",
                         **{**scale_out, "concurrency_limit": None})
            orchestrator = start_orchestrator(tmp_path, env, cfg, "generate", home)
            stage_dir = tmp_path / "store" / "killed" / "iter-001" / "generations"
            deadline, pid = time.time() + 180, None
            while not (stage_dir / "part-00001.parquet").exists():  # worker 1 writes shards 1, 3, 5, 7
                assert time.time() < deadline and orchestrator.poll() is None, "worker 1 wrote no shard"
                if pid is None:
                    run = next(iter(killed_runs(api)), None)
                    pid = int(run.infrastructure_pid) if run and run.infrastructure_pid else None
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            left = sorted(p.name for p in stage_dir.glob("part-*.parquet"))
            finish(orchestrator, tmp_path, "killed")
            assert [r.state_type.value for r in killed_runs(api)] == ["CRASHED", "COMPLETED"], left
            pd.testing.assert_frame_equal(rows(store, store.stage_uri("killed", 1, "generations"), "generations"),
                                          reference("killed")["generations"])


def orchestrate(config_path: str, stages: str) -> None:
    """The orchestrating side as iterative-dpo runs it: the run lease held, the stage tasks dispatching."""
    from prefect import flow

    from alignment_core.config import load_config
    from flows.common import run_lease
    from tasks.annotate import annotate
    from tasks.generate import generate
    from tasks.load_prompts import load_prompts

    @flow(name="fan-out-check")
    def fan_out_check(config_json: str, stages: list[str]) -> None:
        cfg = parse_config(json.loads(config_json))
        with run_lease(cfg) as cfg:
            config_json = cfg.model_dump_json()
            generations = generate(config_json, load_prompts(config_json, 1), cfg.model.policy, 1)
            if "annotate" in stages:
                annotate(config_json, generations, 1)

    fan_out_check(load_config(config_path).model_dump_json(), stages.split(","))


if __name__ == "__main__":
    orchestrate(*sys.argv[1:])
