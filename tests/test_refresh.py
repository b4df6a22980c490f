"""The reward models learn online: the cascade's escalated labels fine-tune each ensemble member (the
`reward_models` stage), and the next iteration labels with the fine-tuned members. Also bootstrap members:
reward models trained on bootstrap resamples of the same preference data."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from alignment_core import pipeline
from alignment_core.annotation.stage import make_annotator
from alignment_core.config import ConfigError, parse_config
from alignment_core.models import model_digest
from alignment_core.pipeline import refresh_reward_models
from alignment_core.records import GENERATIONS, from_rows
from alignment_core.store import ArtifactStore
from alignment_core.tiny import build_tiny
from alignment_core.training import bootstrap_sample
from tests.test_annotation import make_generations

SAMPLES = ["a good happy day", "bad cold rain", "a kind and wonderful friend", "the worst sad night",
           "ok", "a great bright morning", "sad", "glad and calm"]
RUN = "refresh"


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny reward models of different seeds (two layers: fine-tuning them takes a second)."""
    folder = tmp_path_factory.mktemp("members")
    return [str(build_tiny(folder / f"rm-{seed}", kind="reward_model", seed=seed, num_layers=2)) for seed in (0, 1)]


def refresh_config(root, members, **refresh):
    return parse_config({
        "setup": "online_pairwise",
        "generation": {"prompts_per_iteration": 6, "shard_size": 3, "n_samples": 4},
        "annotation": {"annotator": "cascade", "reward_model": members, "cascade": {
            "first": "reward_model", "escalate_to": "programmatic", "budget": 0.5,
            "refresh": {"enabled": True, **refresh}}},
        "store": {"root": str(root), "run_name": RUN},
    })


def annotated_iteration(cfg, iteration: int, reward_models_uri: str | None = None) -> str:
    """Iteration k's generations (4 samples of 6 prompts, ids of their own) and its cascade annotations."""
    store = pipeline.open_store(cfg)
    responses = {f"i{iteration}p{i}": [SAMPLES[(i + iteration + k) % len(SAMPLES)] for k in range(4)]
                 for i in range(6)}
    generations = store.stage_uri(RUN, iteration, "generations")
    store.write_stage(generations, "generations", {"test": iteration},
                      [from_rows(make_generations(responses).to_dict("records"), GENERATIONS)])
    return pipeline.annotate(cfg, generations, iteration, reward_models_uri=reward_models_uri)


def escalated(annotations):
    """The rows the cascade sent to the oracle, by their raw record (and by who labelled them)."""
    up = annotations[[json.loads(raw)["cascade"]["escalated"] for raw in annotations["raw"]]]
    assert set(up["annotator"]) <= {"programmatic:alignment_core.rewards:positive_words"}
    return up


def weights(folder: str) -> dict:
    return load_file(os.path.join(folder, "model.safetensors"))


def test_refresh_trains_each_member_on_exactly_the_escalated_rows(tmp_path, members):
    cfg = refresh_config(tmp_path, members)
    store = pipeline.open_store(cfg)
    annotations = store.read_pandas(annotated_iteration(cfg, 1))
    up = escalated(annotations)
    assert len(up) == 3 and len(annotations) == 6  # half of the 6 prompts went to the oracle
    out = refresh_reward_models(cfg, 2)
    manifest = store.read_manifest(out)
    trained_on = store.read_pandas(out)
    labelled = up[up["status"] == "ok"]  # the oracle's ties teach no preference
    assert sorted(trained_on["unit_id"]) == sorted(labelled["annotation_id"])
    assert manifest["extra"]["labels"] == len(labelled) and manifest["extra"]["labels_by_iteration"] == {
        "1": len(labelled)}
    # each row the oracle's verdict: its preferred response first
    by_id = labelled.set_index("annotation_id")
    for row in trained_on.itertuples():
        label = by_id.loc[row.unit_id]
        preferred = label.generation1_id if label.generation1_reward > label.generation2_reward else \
            label.generation2_id
        assert row.generation1_id == preferred
    refreshed = manifest["extra"]["members"]
    assert refreshed == [f"{out}/member-{i}" for i in range(2)] and manifest["extra"]["originals"] == members
    for index, (member, original) in enumerate(zip(refreshed, members, strict=True)):
        lineage = store.read_json(f"{member}/lineage.json")
        assert lineage["label_ids"] == sorted(labelled["annotation_id"])
        assert lineage["base"]["digest"] == model_digest(original) and lineage["seed"] == index
        assert lineage["bootstrap_seed"] == index  # each member its own bootstrap sample
        assert store.checkpoint_complete(member) and model_digest(member) != model_digest(original)


def test_the_next_iteration_labels_with_the_refreshed_members(tmp_path, members):
    cfg = refresh_config(tmp_path, members)
    store = pipeline.open_store(cfg)
    annotated_iteration(cfg, 1)
    out = refresh_reward_models(cfg, 2)
    refreshed = store.read_manifest(out)["extra"]["members"]
    annotations_uri = annotated_iteration(cfg, 2, reward_models_uri=out)
    fingerprint = store.read_manifest(annotations_uri)["fingerprint"]
    # the refresh stage's lineage, and the refreshed members' weights, are what the labels were computed from
    assert fingerprint["inputs"]["reward_models"] == pipeline.stage_digest(store, out)
    assert [fingerprint["inputs"][f"reward_model[{i}]"] for i in range(2)] == [
        pipeline.model_input_digest(store, m) for m in refreshed]
    rows = store.read_pandas(annotations_uri)
    cheap = rows[[not e for e in rows.index.isin(escalated(rows).index)]]
    expected = "reward_ensemble:" + ",".join(model_digest(m) for m in refreshed)
    assert len(cheap) == 3 and set(cheap["annotator"]) == {expected}
    # the members' own scores in the raw rows are the refreshed models' (not the originals')
    generations = store.read_pandas(store.stage_uri(RUN, 2, "generations")).set_index("generation_id")
    row = cheap.iloc[0]
    sample = generations.loc[[row["generation1_id"]]].reset_index()
    scored = [make_annotator(cfg.model_copy(update={"annotation": cfg.annotation.model_copy(
        update={"reward_model": models, "annotator": "reward_model"})})).member_scores(sample)[:, 0].tolist()
        for models in (refreshed, members)]
    recorded = json.loads(row["raw"])["members"][row["generation1_id"]]
    assert np.allclose(recorded, scored[0], atol=1e-5) and not np.allclose(recorded, scored[1], atol=1e-3)


def test_rerun_skips_and_resume_redoes_only_the_missing_member(tmp_path, members, caplog):
    cfg = refresh_config(tmp_path, members)
    store = pipeline.open_store(cfg)
    annotated_iteration(cfg, 1)
    out = refresh_reward_models(cfg, 2)
    first = [store.read_json(f"{out}/member-{i}/lineage.json") for i in range(2)]
    digests = [model_digest(f"{out}/member-{i}") for i in range(2)]
    stamps = [os.stat(f"{out}/member-{i}/model.safetensors").st_mtime_ns for i in range(2)]
    manifest = store.read_manifest(out)

    with caplog.at_level(logging.INFO, logger="alignment_core"):
        assert refresh_reward_models(cfg, 2) == out
    assert "already complete" in caplog.text and "resuming" not in caplog.text
    assert store.read_manifest(out)["created_at"] == manifest["created_at"]  # nothing rewritten
    assert [os.stat(f"{out}/member-{i}/model.safetensors").st_mtime_ns for i in range(2)] == stamps

    # killed after member 0: member 1 and the manifest are missing; only member 1 is trained again
    shutil.rmtree(f"{out}/member-1")
    os.remove(f"{out}/_manifest.json")
    kept = os.stat(f"{out}/member-0/lineage.json").st_mtime_ns
    refresh_reward_models(cfg, 2)
    assert os.stat(f"{out}/member-0/model.safetensors").st_mtime_ns == stamps[0]
    assert os.stat(f"{out}/member-0/lineage.json").st_mtime_ns == kept  # member 0 not even opened again
    assert os.stat(f"{out}/member-1/model.safetensors").st_mtime_ns != stamps[1]
    assert [model_digest(f"{out}/member-{i}") for i in range(2)] == digests  # the same training, the same weights
    assert store.read_manifest(out)["fingerprint_digest"] == manifest["fingerprint_digest"]

    # the whole stage removed: redone, the same members
    shutil.rmtree(out)
    refresh_reward_models(cfg, 2)
    assert [model_digest(f"{out}/member-{i}") for i in range(2)] == digests
    assert [store.read_json(f"{out}/member-{i}/lineage.json") for i in range(2)] == first



def test_refresh_settings_at_non_default_values(tmp_path, members):
    cfg = refresh_config(tmp_path, members, epochs=3, batch_size=2, learning_rate=3e-4, seed=5, bootstrap=False)
    store = pipeline.open_store(cfg)
    annotated_iteration(cfg, 1)
    out = refresh_reward_models(cfg, 2)
    labels = store.read_manifest(out)["extra"]["labels"]
    assert labels >= 2
    for index in range(2):
        lineage = store.read_json(f"{out}/member-{index}/lineage.json")
        assert lineage["seed"] == 5 + index and lineage["bootstrap_seed"] is None
        metrics = store.read_pandas(f"{out}/member-{index}-metrics")
        steps = metrics["step"].max()
        assert steps == 3 * -(-labels // 2)  # 3 epochs of batches of 2
        assert metrics.loc[metrics["metric"] == "learning_rate", "value"].max() == pytest.approx(3e-4, rel=1e-6)
    # without bootstrap, both members saw the same label set in the same order but for their seeds
    state = [json.loads(open(f"{out}/member-{i}/trainer_state.json").read()) for i in range(2)]
    assert state[0]["total_steps"] == state[1]["total_steps"] == 3 * -(-labels // 2)


def test_config_refuses_a_refresh_without_a_reward_model_cascade(members):
    with pytest.raises(ConfigError, match="cascade.first must be 'reward_model'"):
        parse_config({"annotation": {"annotator": "cascade", "reward_model": members, "cascade": {
            "first": "programmatic", "escalate_to": "reward_model", "refresh": {"enabled": True}}}})
    with pytest.raises(ConfigError, match="set annotation.annotator to 'cascade'"):
        parse_config({"annotation": {"annotator": "reward_model", "reward_model": members,
                                     "cascade": {"refresh": {"enabled": True}}}})


# ---- bootstrap members ---------------------------------------------------------------------------------------
def test_bootstrap_samples_are_deterministic_per_seed_and_differ_between_seeds():
    sample = bootstrap_sample(40, seed=3)
    assert sample == bootstrap_sample(40, seed=3) and len(sample) == 40
    assert len(set(sample)) < 40  # drawn with replacement: some units twice, some never
    assert sample != bootstrap_sample(40, seed=4)


def test_members_trained_on_different_bootstrap_samples_differ(tmp_path, members):
    """The reward-model flow's stages with training.bootstrap_seed: the same training seed, another sample."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say something {i}.", "chosen": SAMPLES[(2 * i) % 8],
                                         "rejected": SAMPLES[(2 * i + 1) % 8]}) + "\n" for i in range(16)))

    def train(run: str, bootstrap_seed):
        cfg = parse_config({
            "setup": "reward_modelling", "data": {"source": str(pairs), "eval_prompts": 0},
            "model": {"policy": members[0]},
            "training": {"loss": "reward", "learning_rate": 1e-3, "batch_size": 4, "seed": 7,
                         "bootstrap_seed": bootstrap_seed},
            "store": {"root": str(tmp_path), "run_name": run},
        })
        units = pipeline.build_units(cfg, 1, examples_uri=pipeline.load_examples(cfg))
        checkpoint = pipeline.train(cfg, units, pipeline.reweight(cfg, units, members[0], 1), members[0],
                                    members[0], 1)
        return weights(checkpoint), ArtifactStore(str(tmp_path)).read_json(f"{checkpoint}/lineage.json")

    (a, lineage_a), (b, _), (again, _) = train("m1", 1), train("m2", 2), train("m1-again", 1)
    assert lineage_a["bootstrap_seed"] == 1 and lineage_a["seed"] == 7
    assert all(np.array_equal(a[name], again[name]) for name in a)  # the same sample, the same member
    assert any(not np.allclose(a[name], b[name]) for name in a)  # another sample, another member


# ---- the online flow -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_flow_refreshes_before_each_later_iteration_and_a_rerun_skips_it(tmp_path, members):
    import pandas as pd

    from tests.helpers import prefect_env, run_flow, write_config

    root = tmp_path / "store"
    annotation = {"annotator": "cascade", "reward_model": members,
                  "programmatic": "alignment_core.rewards:positive_words",
                  "cascade": {"first": "reward_model", "escalate_to": "programmatic", "budget": 0.5,
                              "refresh": {"enabled": True, "epochs": 1}}}
    config = write_config(tmp_path, str(root), model={"policy": "tiny://llama-sft"}, annotation=annotation,
                          evaluation={"enabled": False})
    run_flow(config, prefect_env(tmp_path))
    store = ArtifactStore(str(root))
    assert "reward_models" not in store.list_stages("e2e", 1)  # nothing to learn from before iteration 1
    refreshed = store.stage_uri("e2e", 2, "reward_models")
    manifest = store.read_manifest(refreshed)
    first_labels = escalated(pd.read_parquet(store.stage_uri("e2e", 1, "annotations")))
    assert manifest["extra"]["labels_by_iteration"] == {"1": int((first_labels["status"] == "ok").sum())}
    fingerprint = store.read_manifest(store.stage_uri("e2e", 2, "annotations"))["fingerprint"]
    assert fingerprint["inputs"]["reward_models"] == pipeline.stage_digest(store, refreshed)
    assert fingerprint["inputs"]["reward_model[0]"] == pipeline.model_input_digest(store, f"{refreshed}/member-0")

    saved = [store.read_json(f"{refreshed}/member-{i}/_complete.json") for i in range(2)]
    rerun = run_flow(config, prefect_env(tmp_path))
    assert store.read_manifest(refreshed)["created_at"] == manifest["created_at"]
    assert [store.read_json(f"{refreshed}/member-{i}/_complete.json") for i in range(2)] == saved
    assert "train reward" not in rerun.stderr  # no member's progress bar: no model work
