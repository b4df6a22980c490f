"""Only a round's final save is a finished checkpoint; `save_every_steps` saves are resume points."""

import json

import pytest

from alignment_core import losses, pipeline
from alignment_core.config import parse_config
from alignment_core.models import load_causal_lm, load_tokenizer
from alignment_core.store import CHECKPOINT_MARKER, RESUME_MARKER, ArtifactStore
from alignment_core.training import (
    OPTIMIZER_SCALARS,
    OPTIMIZER_TENSORS,
    SCHEDULER_STATE,
    NonFiniteLossError,
    Trainer,
)
from tests.test_training import make_units


def saves(store: ArtifactStore, uri: str, tiny_model_dir) -> None:
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    store.save_checkpoint(model, tokenizer, uri, extra_files={"trainer_state.json": b'{"step": 1}'}, final=False)
    assert store.checkpoint_marker(uri) == RESUME_MARKER and not store.checkpoint_complete(uri)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        store.local_checkpoint(uri)  # nothing loads it as a policy
    resumable = store.local_checkpoint(uri, resume_point=True)
    assert json.loads(open(f"{resumable}/trainer_state.json").read()) == {"step": 1}
    store.save_checkpoint(model, tokenizer, uri, extra_files={"trainer_state.json": b'{"step": 2}'})
    assert store.checkpoint_marker(uri) == CHECKPOINT_MARKER and store.checkpoint_complete(uri)
    assert not store.exists(f"{uri}/{RESUME_MARKER}")  # the final save replaced the resume point
    assert json.loads(open(f"{store.local_checkpoint(uri)}/trainer_state.json").read()) == {"step": 2}


def test_a_resume_point_is_not_a_finished_checkpoint(tmp_path, tiny_model_dir):
    store = ArtifactStore(str(tmp_path))
    saves(store, store.checkpoint_uri("r", 1), tiny_model_dir)


def test_a_resume_point_on_s3(s3_server, tmp_path, tiny_model_dir):
    store = ArtifactStore("s3://artifacts/final", endpoint_url=s3_server, cache_dir=str(tmp_path / "cache"))
    saves(store, store.checkpoint_uri("r", 1), tiny_model_dir)


@pytest.mark.fault("NaN loss aborts the round")
def test_an_aborted_round_is_not_a_finished_iteration_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    cfg = parse_config({
        "setup": "offline_pairwise", "model": {"policy": str(tiny_model_dir)},
        "training": {"loss": "dpo", "batch_size": 4, "epochs": 1, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                     "scheduler": "constant", "save_every_steps": 1},
        "store": {"root": str(tmp_path), "run_name": "r"}})
    store = pipeline.open_store(cfg)
    checkpoint, metrics = store.checkpoint_uri("r", 1), store.stage_uri("r", 1, "metrics")
    real_dpo, calls = losses.dpo, []

    def dpo_with_nan_at_step_3(*args, **kwargs):
        calls.append(1)
        out = real_dpo(*args, **kwargs)
        if len(calls) == 3:
            out.losses = out.losses * float("nan")
        return out

    trainer = Trainer(cfg, policy_path=str(tiny_model_dir), tokenizer_path=None, store=store)
    encoded = trainer.batch_factory.encode(make_units(16))  # 4 steps of 4 pairs
    with monkeypatch.context() as patch:
        patch.setattr(losses, "dpo", dpo_with_nan_at_step_3)
        with pytest.raises(NonFiniteLossError, match="step 3"):
            trainer.train(encoded, checkpoint, metrics)
    assert not store.checkpoint_complete(checkpoint) and store.checkpoint_marker(checkpoint) == RESUME_MARKER
    resume_files = set(store.read_json(f"{checkpoint}/{RESUME_MARKER}")["files"])
    assert {OPTIMIZER_TENSORS, OPTIMIZER_SCALARS, SCHEDULER_STATE} <= resume_files
    assert pipeline.finished_iterations(cfg) == 0  # the NaN-aborted round is not a finished iteration

    resumed = Trainer(cfg, policy_path=str(tiny_model_dir), tokenizer_path=None, store=store)
    steps = []
    result = resumed.train(encoded, checkpoint, metrics, progress_callback=lambda step, total, m: steps.append(step))
    assert steps == [3, 4] and result.steps == 4  # resumed from the step-2 resume point
    assert store.checkpoint_complete(checkpoint) and pipeline.finished_iterations(cfg) == 1
    state = json.loads(open(f"{store.local_checkpoint(checkpoint)}/trainer_state.json").read())
    assert state["step"] == state["total_steps"] == 4
    # A finished round is never resumed: its checkpoint is the weights, without the optimizer's moments.
    final_files = set(store.read_json(f"{checkpoint}/{CHECKPOINT_MARKER}")["files"])
    assert "trainer_state.json" in final_files and not {OPTIMIZER_TENSORS, SCHEDULER_STATE} & final_files
