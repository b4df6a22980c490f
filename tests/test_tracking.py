"""Experiment trackers: MLflow (a local sqlite store), TensorBoard event files and W&B offline files read back.

The ledger logic runs without Prefect on a store holding hand-written stages; the end-to-end test runs the
real iterative-dpo flow, reruns it, continues it by one iteration and turns W&B on at the end.
"""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from alignment_core.config import ConfigError, PipelineConfig, parse_config
from alignment_core.preflight import PreflightError, preflight, preflight_problems
from alignment_core.records import METRICS, from_rows
from alignment_core.store import ArtifactStore
from alignment_core.tracking import log_iteration, read_ledger, tracking_problems

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

RUN = "unit"
REPO = Path(__file__).resolve().parent.parent
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "WANDB_PROJECT",
               "WANDB_DIR", "WANDB_ENTITY", "WANDB_MODE", "TRACKIO_SPACE_ID")


@pytest.fixture(autouse=True)
def clean_tracker_env(monkeypatch):
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)


# ---- reading the trackers back ---------------------------------------------------------------------------
def mlflow_runs(tracking_uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]


def mlflow_history(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def wandb_history(folder: Path) -> tuple[set[str], list[tuple[int, dict]]]:
    """Run ids and (step, values) of every history record in W&B offline run files (LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2

    run_ids, history = set(), []
    for path in sorted(glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, pending = Path(path).read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last fragment of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "run":
                    run_ids.add(record.run.run_id)
                elif record.WhichOneof("record_type") == "history":
                    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item}
                    history.append((record.history.step.num, {k: v for k, v in items.items() if k[0] != "_"}))
    return run_ids, history


def same_points(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """Same steps, same values up to TensorBoard's float32."""
    return [s for s, _ in a] == [s for s, _ in b] and [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6)


def assert_no_duplicate_steps(history: dict[str, list[tuple[int, float]]]) -> None:
    for key, points in history.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), (key, Counter(steps).most_common(3))


# ---- a run written by hand: the ledger and the step arithmetic without Prefect or models -------------------
def write_iteration(store: ArtifactStore, k: int, steps: int) -> None:
    """The stages an iteration leaves behind; `steps` 0 is a round that carried the policy over."""
    fp = {"test": k}
    rows = [{"step": s, "split": "train", "metric": m, "value": 10 * k + s + offset}
            for s in range(1, steps + 1) for m, offset in (("loss", 0.0), ("tokens_per_s", 0.5))]
    extra = {"steps": steps} if steps else {"note": "no training units: policy unchanged"}
    store.write_stage(store.stage_uri(RUN, k, "metrics"), "metrics", fp, [from_rows(rows, METRICS)] if rows else [],
                      extra=extra)
    summary = {"win_rate_vs_initial": 0.5 + k / 10, "reward_mean": float(k), "win_rate_vs_previous": float("nan")}
    store.write_stage(store.stage_uri(RUN, k, "evaluation"), "metrics", fp, [], extra={"summary": summary})
    store.write_stage(store.stage_uri(RUN, k, "annotations"), "annotations", fp, [], extra={
        "rows": 8, "counts": {"ok": 6, "unparseable": 2}, "failures": 2, "failure_fraction": 0.25,
        "reward_mean": None, "annotators": ["rule"]})
    store.write_stage(store.stage_uri(RUN, k, "generations"), "generations", fp, [], extra={
        "tokens_per_s": 100.0 * k, "generated_tokens": 64, "finish_reasons": {"stop": 3, "length": 5}})


def unit_config(root: Path, *trackers: str) -> PipelineConfig:
    return parse_config({"store": {"root": str(root), "run_name": RUN},
                         "tracking": {"report_to": list(trackers), "project": "unit-tests"}})


def test_steps_continue_across_iterations_and_nothing_is_logged_twice(tmp_path):
    store = ArtifactStore(str(tmp_path))
    cfg = unit_config(tmp_path, "tensorboard", "mlflow")
    write_iteration(store, 1, steps=3)
    write_iteration(store, 2, steps=0)  # carried over: still one step of its own
    assert log_iteration(cfg, 1) == {"tensorboard": "logged iterations [1] at steps 1-3",
                                     "mlflow": "logged iterations [1] at steps 1-3"}
    assert log_iteration(cfg, 2)["mlflow"] == "logged iterations [2] at steps 4-4"
    assert log_iteration(cfg, 2)["mlflow"] == "iteration 2 already logged"  # a rerun logs nothing
    write_iteration(store, 3, steps=2)
    assert log_iteration(cfg, 3)["tensorboard"] == "logged iterations [3] at steps 5-6"

    ledger = read_ledger(store, RUN)
    assert ledger["steps"] == {"1": [1, 3], "2": [4, 4], "3": [5, 6]}
    assert ledger["trackers"]["mlflow"]["iterations"] == [1, 2, 3]
    tracking_uri = f"sqlite:///{tmp_path}/{RUN}/tracking/mlflow.db"  # the default: inside the run's folder
    runs = mlflow_runs(tracking_uri)
    assert [r.info.run_id for r in runs] == [ledger["trackers"]["mlflow"]["run_id"]]  # one run, three processes' worth
    history = mlflow_history(tracking_uri, runs[0].info.run_id)
    assert_no_duplicate_steps(history)
    # iteration 3's local step 1 is global step 5, with iteration 3's value
    assert history["train/loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (5, 31.0), (6, 32.0)]
    assert history["train/tokens_per_s"][-1] == (6, 32.5)
    assert history["eval/win_rate_vs_initial"] == [(3, 0.6), (4, pytest.approx(0.7)), (6, 0.8)]
    assert history["iteration"] == [(3, 1.0), (4, 2.0), (6, 3.0)]
    assert history["annotation/failures"] == [(3, 2.0), (4, 2.0), (6, 2.0)]
    assert history["annotation/counts_unparseable"][0] == (3, 2.0)
    assert history["generation/tokens_per_s"] == [(3, 100.0), (4, 200.0), (6, 300.0)]
    assert "eval/win_rate_vs_previous" not in history and "annotation/reward_mean" not in history  # NaN, None
    params, tags = runs[0].data.params, runs[0].data.tags
    assert params["training.beta"] == "0.1" and params["tracking.report_to"] == '["tensorboard", "mlflow"]'
    assert params["store_uri"] == tags["alignment_core.store_uri"] == store.run_uri(RUN)
    assert runs[0].info.experiment_id and runs[0].info.run_name == RUN

    scalars = tensorboard_scalars(tmp_path / RUN / "tracking" / "tensorboard" / RUN)
    assert set(scalars) == set(history)
    assert all(same_points(scalars[key], history[key]) for key in history)
    assert_no_duplicate_steps(scalars)


def test_a_tracker_outage_warns_and_catches_up_in_order(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path))
    cfg = unit_config(tmp_path, "tensorboard", "mlflow")
    write_iteration(store, 1, steps=2)
    blocked = tmp_path / RUN / "tracking" / "tensorboard"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")  # TensorBoard cannot write: an outage, not a misconfiguration
    report = log_iteration(cfg, 1)
    assert report["tensorboard"].startswith("failed:") and report["mlflow"].startswith("logged iterations [1]")
    assert "tracker tensorboard could not log iteration 1" in caplog.text
    assert read_ledger(store, RUN)["trackers"]["tensorboard"]["iterations"] == []

    blocked.unlink()
    write_iteration(store, 2, steps=2)
    report = log_iteration(cfg, 2)
    assert report["tensorboard"] == "logged iterations [1, 2] at steps 1-4"  # caught up, in order
    assert report["mlflow"] == "logged iterations [2] at steps 3-4"
    assert same_points(tensorboard_scalars(blocked / RUN)["train/loss"], [(1, 11), (2, 12), (3, 21), (4, 22)])


def test_misconfigured_trackers_fail_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'mlfow' in report_to; known: tensorboard, mlflow, wandb"):
        parse_config({"tracking": {"report_to": ["mlfow"]}})
    with pytest.raises(ConfigError, match="tracking.logging_dir must name a local folder for tensorboard"):
        parse_config({"store": {"root": "s3://bucket/runs"}, "tracking": {"report_to": ["tensorboard"]}})
    assert parse_config({"tracking": {"report_to": "none"}}).tracking.report_to == []
    assert parse_config({"tracking": {"report_to": "mlflow"}}).tracking.report_to == ["mlflow"]

    remote = parse_config({"store": {"root": "s3://bucket/runs"}, "tracking": {"report_to": ["mlflow"]}})
    assert any("MLFLOW_TRACKING_URI" in p for p in tracking_problems(remote))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # credentials would come from the env too
    assert tracking_problems(remote) == []
    assert preflight_problems(unit_config(tmp_path, "tensorboard", "mlflow")) == []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "trackio" else real_find_spec(name, *args))
    with pytest.raises(PreflightError, match="'trackio' but its package is not installed: pip install trackio"):
        preflight(unit_config(tmp_path, "trackio"))


TRACKIO_READBACK = """
import json, sys
from pathlib import Path
from tests.test_tracking import RUN, unit_config, write_iteration
from alignment_core.store import ArtifactStore
from alignment_core.tracking import log_iteration
from trackio.sqlite_storage import SQLiteStorage

root = Path(sys.argv[1])
store, cfg = ArtifactStore(str(root)), unit_config(root, "trackio")
write_iteration(store, 1, steps=3)
write_iteration(store, 2, steps=0)
reports = [log_iteration(cfg, 1), log_iteration(cfg, 2), log_iteration(cfg, 2)]
print(json.dumps({"reports": reports, "runs": SQLiteStorage.get_runs("unit-tests"),
                  "logs": SQLiteStorage.get_logs("unit-tests", RUN)}, default=str))
"""


def test_trackio_gets_every_step_once_in_one_run(tmp_path):
    """trackio (its local SQLite store, TRACKIO_DIR): the same steps as the other trackers, one run resumed by each
    iteration, nothing logged twice. A process of its own: trackio reads TRACKIO_DIR when it is imported."""
    pytest.importorskip("trackio")
    environment = {k: v for k, v in os.environ.items() if k not in TRACKER_ENV}
    done = subprocess.run([sys.executable, "-c", TRACKIO_READBACK, str(tmp_path / "store")], cwd=REPO,
                          env={**environment, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))  # trackio prints too
    assert result["reports"] == [{"trackio": "logged iterations [1] at steps 1-3"},
                                 {"trackio": "logged iterations [2] at steps 4-4"},
                                 {"trackio": "iteration 2 already logged"}]
    assert result["runs"] == [RUN]
    logs = result["logs"]
    assert [log["step"] for log in logs] == [1, 2, 3, 4]
    assert [log.get("train/loss") for log in logs] == [11.0, 12.0, 13.0, None]
    assert [log.get("iteration") for log in logs] == [None, None, 1.0, 2.0]
    assert logs[2]["eval/win_rate_vs_initial"] == 0.6 and logs[2]["generation/tokens_per_s"] == 100.0


# ---- the real flow: two iterations, a rerun, one more iteration, then W&B turned on -------------------------
SMALL = {
    "setup": "online_pairwise",
    "iterations": 2,
    "data": {"source": "bundled:prompts", "eval_prompts": 2},
    "generation": {"backend": "transformers", "prompts_per_iteration": 8, "n_samples": 2, "max_new_tokens": 8,
                   "shard_size": 8, "batch_size": 8},
    "annotation": {"annotator": "programmatic", "programmatic": "alignment_core.rewards:response_length"},
    "reweight": {"strategy": "margin"},
    "training": {"loss": "dpo", "batch_size": 2, "learning_rate": 1e-4},
    "evaluation": {"max_new_tokens": 8},
    "store": {"run_name": "tracked"},
}


def run_flow(tmp_path: Path, config: dict, *args: str, **env) -> subprocess.CompletedProcess:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    environment = {k: v for k, v in os.environ.items() if k not in TRACKER_ENV and k != "PREFECT_API_URL"}
    environment.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                       PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", HF_HUB_OFFLINE="1",
                       TOKENIZERS_PARALLELISM="false", **env)
    result = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", str(path), *args], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_flow_logs_one_tracker_run_per_pipeline_run(tmp_path, tiny_model_dir):
    root, mlflow_uri = tmp_path / "store", f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    (tmp_path / "mlflow").mkdir()
    tracking = {"report_to": ["tensorboard", "mlflow"], "mlflow_tracking_uri": mlflow_uri, "project": "e2e"}
    config = {**SMALL, "model": {"policy": str(tiny_model_dir)}, "store": {**SMALL["store"], "root": str(root)},
              "tracking": tracking}
    run_flow(tmp_path, config)
    store = ArtifactStore(str(root))
    ledger = read_ledger(store, "tracked")
    (run,) = mlflow_runs(mlflow_uri)
    assert run.info.run_id == ledger["trackers"]["mlflow"]["run_id"]
    first = mlflow_history(mlflow_uri, run.info.run_id)
    assert_no_duplicate_steps(first)
    (one_first, one_last), (two_first, two_last) = ledger["steps"]["1"], ledger["steps"]["2"]
    assert one_first == 1 and two_first == one_last + 1 and two_last > two_first  # steps continue across rounds
    assert [s for s, _ in first["train/loss"]] == list(range(1, two_last + 1))
    for key in ("eval/win_rate_vs_initial", "annotation/failure_fraction", "annotation/counts_tie",
                "generation/tokens_per_s", "train/tokens_per_s", "reweight/weight_max", "iteration"):
        assert key in first, key
    evaluation = store.read_manifest(store.stage_uri("tracked", 2, "evaluation"))["extra"]["summary"]
    for key, value in evaluation.items():  # every finite number of the evaluation summary, at the round's end
        if isinstance(value, float) and value == value:
            assert first[f"eval/{key}"][-1] == (two_last, pytest.approx(value)), key
    assert [s for s, _ in first["eval/win_rate_vs_initial"]] == [one_last, two_last]
    metrics = store.read_pandas(store.stage_uri("tracked", 2, "metrics"))
    assert first["train/loss"][-1][1] == pytest.approx(metrics[metrics["metric"] == "loss"]["value"].iloc[-1])
    assert run.data.params["generation.n_samples"] == "2" and run.data.tags["alignment_core.store_uri"] == str(
        root / "tracked")
    tensorboard = tmp_path / "store" / "tracked" / "tracking" / "tensorboard" / "tracked"
    assert same_points(tensorboard_scalars(tensorboard)["train/loss"], first["train/loss"])

    # The same flow again: every stage is found complete and nothing reaches the trackers twice.
    ledger_before = (root / "tracked" / "tracking.json").read_text()
    run_flow(tmp_path, config)
    assert (root / "tracked" / "tracking.json").read_text() == ledger_before
    assert mlflow_history(mlflow_uri, run.info.run_id) == first

    # One more iteration (a scheduled run: a new process), with W&B (offline) turned on for it: the same MLflow
    # run gets iteration 3 only; the new W&B run gets all three; no stage is redone because of tracking.
    manifests = {p: p.stat().st_mtime_ns for p in root.glob("tracked/iter-00[12]/*/_manifest.json")}
    config["tracking"] = {**tracking, "report_to": ["tensorboard", "mlflow", "wandb"]}
    run_flow(tmp_path, config, "--more-iterations", "1", WANDB_MODE="offline", WANDB_SILENT="true")
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests
    ledger = read_ledger(store, "tracked")
    assert [r.info.run_id for r in mlflow_runs(mlflow_uri)] == [run.info.run_id]
    after = mlflow_history(mlflow_uri, run.info.run_id)
    assert_no_duplicate_steps(after)
    three_first, three_last = ledger["steps"]["3"]
    assert three_first == two_last + 1
    for key, points in after.items():
        assert points[:len(first.get(key, []))] == first.get(key, []), key  # iterations 1-2 untouched
        assert all(step >= three_first for step, _ in points[len(first.get(key, [])):]), key
    assert after["iteration"] == [(one_last, 1.0), (two_last, 2.0), (three_last, 3.0)]
    assert same_points(tensorboard_scalars(tensorboard)["train/loss"], after["train/loss"])

    run_ids, history = wandb_history(root / "tracked" / "tracking")
    assert run_ids == {ledger["trackers"]["wandb"]["run_id"]}
    steps = [step for step, _ in history]
    assert steps == sorted(set(steps)) and steps[-1] == three_last
    assert [(s, v["iteration"]) for s, v in history if "iteration" in v] == after["iteration"]
    assert same_points([(s, v["train/loss"]) for s, v in history if "train/loss" in v], after["train/loss"])
