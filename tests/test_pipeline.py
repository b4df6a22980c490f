"""The seven learning setups through the pipeline's stages (plain functions, no Prefect)."""

import json
import math

import pytest

from alignment_core import pipeline
from alignment_core.config import parse_config
from alignment_core.store import fingerprint_digest
from alignment_core.training.rounds import accelerate_launch_options
from tests.test_training import ACCELERATE_CPU_CONFIG

pytestmark = pytest.mark.slow


def small(tmp_path, **sections) -> "pipeline.PipelineConfig":
    base = {
        "iterations": 1,
        "data": {"source": "bundled:prompts", "eval_prompts": 4},
        "model": {"policy": "tiny://llama"},
        "generation": {"backend": "transformers", "prompts_per_iteration": 6, "n_samples": 2, "max_new_tokens": 8},
        "annotation": {"annotator": "programmatic"},
        "training": {"batch_size": 4, "learning_rate": 1e-4},
        "evaluation": {"enabled": False, "max_new_tokens": 8, "oracle": "alignment_core.rewards:positive_words"},
        "store": {"root": str(tmp_path / "store"), "run_name": "setups", "cache_dir": str(tmp_path / "cache")},
    }
    for name, value in sections.items():
        base[name] = {**base[name], **value} if isinstance(value, dict) and name in base else value
    return parse_config(base)


def online_iteration(cfg) -> dict:
    policy = cfg.model.policy
    prompts = pipeline.load_prompts(cfg, 1)
    generations = pipeline.generate(cfg, prompts, policy, 1)
    annotations = pipeline.annotate(cfg, generations, 1)
    units = pipeline.build_units(cfg, 1, generations_uri=generations, annotations_uri=annotations)
    weights = pipeline.reweight(cfg, units, policy, 1)
    checkpoint = pipeline.train(cfg, units, weights, policy, policy, 1)
    return {"generations": generations, "annotations": annotations, "units": units, "weights": weights,
            "checkpoint": checkpoint}


def offline_round(cfg) -> dict:
    examples = pipeline.load_examples(cfg)
    units = pipeline.build_units(cfg, 1, examples_uri=examples)
    weights = pipeline.reweight(cfg, units, cfg.model.policy, 1)
    checkpoint = pipeline.train(cfg, units, weights, cfg.model.policy, cfg.model.policy, 1)
    assert_one_fingerprint(pipeline.open_store(cfg), checkpoint)
    return {"examples": examples, "units": units, "weights": weights, "checkpoint": checkpoint}


def assert_one_fingerprint(store, checkpoint: str) -> None:
    """The round the Trainer records (trainer_state.json, what it resumes) is the one the lineage records."""
    folder = store.local_checkpoint(checkpoint)
    with open(f"{folder}/lineage.json") as lineage, open(f"{folder}/trainer_state.json") as state:
        assert json.load(state)["fingerprint"] == fingerprint_digest(json.load(lineage)["fingerprint"])


def final_loss(cfg) -> float:
    store = pipeline.open_store(cfg)
    return pipeline.training_summary(store, store.stage_uri(cfg.store.run_name, 1, "metrics"))["loss"]


def test_online_pairwise_with_a_local_llm_judge(tmp_path):
    cfg = small(tmp_path, setup="online_pairwise",
                # one order only: the random tiny judge's two orders rarely agree, and ties do not train
                annotation={"annotator": "judge_pairwise", "judge": {"model": "tiny://llama", "both_orders": False}},
                reweight={"strategy": "judge_confidence"}, training={"loss": "dpo"})
    uris = online_iteration(cfg)
    store = pipeline.open_store(cfg)
    annotations = store.read_pandas(uris["annotations"])
    assert (annotations["kind"] == "pairwise").all() and len(annotations) == 6
    assert annotations["annotator"].str.startswith("judge:").all()
    assert (annotations["status"] == "ok").sum() > 0
    assert store.checkpoint_complete(uris["checkpoint"])


def test_online_pointwise_labels_train_kto(tmp_path):
    cfg = small(tmp_path, setup="online_pointwise", generation={"n_samples": 4},
                annotation={"pointwise_threshold": 0.5}, training={"loss": "kto"})
    uris = online_iteration(cfg)
    store = pipeline.open_store(cfg)
    units = store.read_pandas(uris["units"])
    assert len(units) == 6 * 4 and units["generation2_response"].isna().all()
    assert set(units["generation1_reward"]) <= {0.0, 1.0}
    assert math.isfinite(final_loss(cfg))


def test_reward_model_flow_then_rl_with_that_reward_model(tmp_path):
    rm_cfg = small(tmp_path, setup="reward_modelling", data={"source": "bundled:preferences", "max_rows": 48},
                   model={"policy": "tiny://reward"}, training={"loss": "reward", "learning_rate": 5e-4})
    rm_cfg = rm_cfg.model_copy(update={"store": rm_cfg.store.model_copy(update={"run_name": "rm"})})
    reward_model = offline_round(rm_cfg)["checkpoint"]

    cfg = small(tmp_path, setup="rl", generation={"n_samples": 4},
                annotation={"annotator": "reward_model", "reward_model": reward_model}, training={"loss": "rl"})
    uris = online_iteration(cfg)
    store = pipeline.open_store(cfg)
    annotations = store.read_pandas(uris["annotations"])
    assert annotations["annotator"].str.startswith("reward_model:").all()
    assert annotations["generation1_reward"].notna().all() and annotations["generation1_reward"].nunique() > 1
    assert math.isfinite(final_loss(cfg))


def test_offline_sft_then_dpo_with_importance_weights(tmp_path):
    sft_cfg = small(tmp_path, setup="sft", data={"source": "bundled:sft", "max_rows": 32},
                    training={"loss": "sft", "learning_rate": 1e-3})
    sft = offline_round(sft_cfg)
    store = pipeline.open_store(sft_cfg)
    assert len(store.read_pandas(sft["units"])) == 32 - 4  # the 4 held-out prompts' examples never train

    cfg = small(tmp_path, setup="offline_pairwise", data={"source": "bundled:preferences", "max_rows": 24},
                model={"policy": sft["checkpoint"]}, reweight={"strategy": "importance", "behaviour_model": "tiny://llama"},
                training={"loss": "dpo"}, evaluation={"enabled": True})
    cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"run_name": "dpo"})})
    uris = offline_round(cfg)
    weights = store.read_pandas(uris["weights"])
    assert len(weights) == 24 - 4 and weights["generation1_weight"].mean() == pytest.approx(1.0)
    log_ratios = [i["log_ratio"] for i in weights["inputs"].map(json.loads)]
    # The SFT policy finds the dataset's word-like responses far likelier than the random tiny model that
    # stands in for the behaviour model (every ratio > clip), yet self-normalised weights still tell pairs apart.
    assert min(log_ratios) > math.log(cfg.reweight.clip)
    assert weights["generation1_weight"].std() > 0.1
    evaluation = pipeline.evaluate(cfg, pipeline.load_eval_prompts(cfg), uris["checkpoint"], sft["checkpoint"],
                                   sft["checkpoint"], 1)
    summary = pipeline.evaluation_summary(store, evaluation)
    assert summary["judged_vs_initial"] == 4 and 0 <= summary["win_rate_vs_initial"] <= 1


def test_offline_pointwise_kto(tmp_path):
    cfg = small(tmp_path, setup="offline_pointwise", data={"source": "bundled:pointwise", "max_rows": 24},
                training={"loss": "kto"})
    uris = offline_round(cfg)
    units = pipeline.open_store(cfg).read_pandas(uris["units"])
    assert set(units["generation1_reward"]) == {0.0, 1.0}
    assert math.isfinite(final_loss(cfg))


def test_missing_model_path_fails_before_any_work(tmp_path):
    cfg = small(tmp_path, setup="online_pairwise", model={"policy": str(tmp_path / "no-such-model")})
    prompts = pipeline.load_prompts(cfg, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.generate(cfg, prompts, cfg.model.policy, 1)
    assert not pipeline.open_store(cfg).exists(pipeline.open_store(cfg).stage_uri("setups", 1, "generations"))


def test_two_process_round_through_accelerate_launch(tmp_path):
    """training.num_processes: 2 runs the round under `accelerate launch` (DDP over gloo on CPU)."""
    cfg = small(tmp_path, setup="offline_pairwise", data={"source": "bundled:preferences", "max_rows": 16},
                training={"loss": "dpo", "num_processes": 2, "batch_size": 4})
    uris = offline_round(cfg)
    store = pipeline.open_store(cfg)
    assert store.checkpoint_complete(uris["checkpoint"])
    metrics = store.read_pandas(store.stage_uri("setups", 1, "metrics"))
    # 12 pairs (4 of the 16 held out), 2 processes x 4 pairs per step: 2 optimizer steps (one process takes 3)
    assert metrics["step"].max() == 2


def test_an_accelerate_config_file_alone_sets_the_rounds_processes(tmp_path):
    """training.accelerate_config without training.num_processes: the round runs under `accelerate launch` on the
    file's processes (cpu_ddp_2proc.yaml: 2, DDP over gloo on CPU)."""
    two_processes = tmp_path / "accelerate.yaml"
    two_processes.write_text(ACCELERATE_CPU_CONFIG.read_text())
    cfg = small(tmp_path, setup="offline_pairwise", data={"source": "bundled:preferences", "max_rows": 16},
                training={"loss": "dpo", "batch_size": 4, "accelerate_config": str(two_processes)})
    assert cfg.training.num_processes is None
    uris = offline_round(cfg)
    store = pipeline.open_store(cfg)
    metrics = store.read_pandas(store.stage_uri("setups", 1, "metrics"))
    # 12 pairs (4 of the 16 held out), 2 processes x 4 pairs per step: 2 optimizer steps; without the file's
    # processes (one process, the launch without --config_file or with --num_processes 1) 3, as measured.
    assert metrics["step"].max() == 2
    # Set, training.num_processes overrides the file's count (accelerate's --num_processes over --config_file).
    one = cfg.training.model_copy(update={"num_processes": 1})
    assert accelerate_launch_options(one) == ["--num_processes", "1", "--config_file", str(two_processes)]
    # The file is part of the round's fingerprint: the same config with the file edited is another round, which
    # the finished iteration refuses to become (not one skipped as "already complete").
    two_processes.write_text(ACCELERATE_CPU_CONFIG.read_text().replace("num_processes: 2", "num_processes: 1"))
    with pytest.raises(pipeline.FinishedIterationChangedError, match=r"its inputs \(accelerate_config\)"):
        pipeline.train(cfg, uris["units"], uris["weights"], cfg.model.policy, cfg.model.policy, 1)


def constant_reward(prompt: str, response: str) -> float:
    return 1.0


def test_online_iteration_without_usable_pairs_carries_the_policy_over(tmp_path):
    """Every pair a tie: no training data, so the iteration's checkpoint is the unchanged policy."""
    import torch

    from alignment_core.models import load_causal_lm

    cfg = small(tmp_path, setup="online_pairwise", annotation={"programmatic": f"{__name__}:constant_reward"})
    uris = online_iteration(cfg)
    store = pipeline.open_store(cfg)
    assert (store.read_pandas(uris["annotations"])["status"] == "tie").all()
    assert store.read_manifest(uris["units"])["rows"] == 0 and store.read_manifest(uris["weights"])["rows"] == 0
    assert "policy unchanged" in store.read_manifest(store.stage_uri("setups", 1, "metrics"))["extra"]["note"]
    before = load_causal_lm(pipeline.resolve_model(store, cfg.model.policy)).state_dict()
    after = load_causal_lm(store.local_checkpoint(uris["checkpoint"])).state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert pipeline.finished_iterations(cfg) == 1


def test_reward_model_reports_accuracy_on_pairs_it_did_not_train_on(tmp_path):
    cfg = small(tmp_path, setup="reward_modelling", data={"source": "bundled:preferences", "max_rows": 96,
                                                         "eval_prompts": 24},
                model={"policy": "tiny://reward"}, training={"loss": "reward", "learning_rate": 5e-4, "epochs": 2})
    uris = offline_round(cfg)
    store = pipeline.open_store(cfg)
    heldout = pipeline.heldout_examples_uri(store, uris["examples"])
    assert set(store.read_pandas(heldout)["example_id"]).isdisjoint(store.read_pandas(uris["units"])["unit_id"])
    summary = pipeline.evaluation_summary(store, pipeline.evaluate_reward_model(cfg, heldout, uris["checkpoint"], 1))
    assert summary["heldout_pairs"] == 24
    # The bundled pairs are separable (the chosen answer is the positive one): a trained model generalises.
    assert summary["heldout_accuracy"] >= 0.75 and summary["heldout_margin_mean"] > 0, summary
    assert summary["heldout_accuracy_low"] < summary["heldout_accuracy"] <= summary["heldout_accuracy_high"]
    # The untrained reward model, scored the same way, is near chance: the number measures the training.
    untrained = pipeline.evaluate_reward_model(cfg, heldout, "tiny://reward", 2)
    assert pipeline.evaluation_summary(store, untrained)["heldout_accuracy"] < summary["heldout_accuracy"]
