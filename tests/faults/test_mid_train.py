"""SIGKILL mid-train: a training round in its own process, killed after its first mid-round save, is finished
by the next run from that resume point, to the weights and metrics of a round that was never interrupted."""

import json

import pytest

from alignment_core.config import parse_config
from alignment_core.models import load_causal_lm
from alignment_core.store import RESUME_MARKER, ArtifactStore
from alignment_core.training import Trainer
from tests.conftest import fault_note
from tests.faults.helpers import kill_when_ready, run_worker, start_worker
from tests.test_training import make_units, step_metrics


def round_config():
    return parse_config({"setup": "offline_pairwise", "training": {
        "loss": "dpo", "batch_size": 4, "epochs": 1, "learning_rate": 1e-3, "scheduler": "cosine",
        "warmup_ratio": 0.25, "save_every_steps": 1}})


def round_units() -> int:
    return 16  # 4 optimizer steps of 4 pairs


@pytest.mark.slow
@pytest.mark.fault("SIGKILL mid-train (S3 store)")
def test_a_round_killed_after_its_first_save_resumes_to_the_same_weights(request, tmp_path, tiny_model_dir, s3_server):
    # The uninterrupted round, in this process, on a local store.
    reference = ArtifactStore(str(tmp_path / "reference"))
    trainer = Trainer(round_config(), policy_path=str(tiny_model_dir), tokenizer_path=None, store=reference)
    uninterrupted = trainer.train(trainer.batch_factory.encode(make_units(round_units())),
                                  reference.checkpoint_uri("round", 1), reference.stage_uri("round", 1, "metrics"))
    assert uninterrupted.steps == 4

    root, env = f"s3://artifacts/mid-train-{tmp_path.name}", {"AWS_ENDPOINT_URL": s3_server}
    store = ArtifactStore(root, endpoint_url=s3_server, cache_dir=str(tmp_path / "cache"))
    checkpoint, metrics = store.checkpoint_uri("round", 1), store.stage_uri("round", 1, "metrics")
    ready, cache = tmp_path / "ready", str(tmp_path / "worker-cache")
    kill_when_ready(start_worker("round", root, str(tiny_model_dir), "--stall-at-step", "1", "--ready", str(ready),
                                 "--cache", cache, env=env), ready)
    assert store.checkpoint_marker(checkpoint) == RESUME_MARKER and not store.checkpoint_complete(checkpoint)
    assert store.read_manifest(metrics) is None

    rerun = json.loads(run_worker("round", root, str(tiny_model_dir), "--cache", cache, env=env).splitlines()[-1])
    assert rerun == {"steps": 4, "trained": [2, 3, 4]}  # resumed after step 1, not started over
    assert store.checkpoint_complete(checkpoint)

    expected = load_causal_lm(reference.local_checkpoint(uninterrupted.checkpoint_uri)).state_dict()
    resumed = load_causal_lm(store.local_checkpoint(checkpoint)).state_dict()
    worst = max((expected[name] - value).abs().max().item() for name, value in resumed.items())
    assert worst <= 1e-6, worst
    losses = step_metrics(store, metrics)["loss"]
    assert list(losses.index) == [1, 2, 3, 4]
    assert losses.tolist() == pytest.approx(step_metrics(reference, reference.stage_uri("round", 1, "metrics"))[
        "loss"].tolist(), abs=1e-6)
    fault_note(request, f"killed after step 1 of 4; rerun trained steps 2-4; max |weight diff| {worst:.1e}")
