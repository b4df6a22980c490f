"""Models kept loaded between the stages of one process (alignment_core/kept_models.py,
scale_out.keep_models_loaded): reused where the same weights are loaded again, never where they changed, and a
run's outputs are the same with and without them."""

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

from alignment_core import kept_models, pipeline
from alignment_core.config import parse_config
from alignment_core.models import load_causal_lm


@pytest.fixture(autouse=True)
def keeping():
    kept_models.configure(True)
    yield
    kept_models.configure(False)


def test_a_model_is_loaded_once_and_shared_while_kept(tiny_model_dir):
    loads = []

    def load():
        loads.append(1)
        return load_causal_lm(str(tiny_model_dir))

    first = kept_models.shared("causal_lm", str(tiny_model_dir), load, dtype="float32")
    assert kept_models.shared("causal_lm", str(tiny_model_dir), load, dtype="float32") is first
    assert len(loads) == 1
    # Other load options are another model
    assert kept_models.shared("causal_lm", str(tiny_model_dir), load, dtype="bfloat16") is not first
    assert len(loads) == 2
    kept_models.configure(False)  # off: nothing kept, every call loads
    assert kept_models.shared("causal_lm", str(tiny_model_dir), load, dtype="float32") is not first
    assert kept_models.shared("causal_lm", str(tiny_model_dir), load, dtype="float32") is not first
    assert len(loads) == 4


def test_weights_rewritten_in_place_are_loaded_again(tiny_model_dir, tmp_path):
    folder = tmp_path / "policy"
    load_causal_lm(str(tiny_model_dir)).save_pretrained(folder)
    first = kept_models.shared("causal_lm", str(folder), lambda: load_causal_lm(str(folder)))
    changed = load_causal_lm(str(folder))
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    changed.save_pretrained(folder)
    again = kept_models.shared("causal_lm", str(folder), lambda: load_causal_lm(str(folder)))
    assert again is not first
    assert torch.equal(next(again.parameters()), next(changed.parameters()))


def test_a_taken_model_trains_as_a_fresh_load_would_and_is_no_longer_kept(tiny_model_dir):
    path = str(tiny_model_dir)
    fresh = load_causal_lm(path)
    shared = kept_models.shared("causal_lm", path, lambda: load_causal_lm(path))
    shared.requires_grad_(False).train()  # what a reference's and a sampler's users may do
    shared.generation_config.eos_token_id = [1, 2, 3]
    taken = kept_models.taken("causal_lm", path, lambda: load_causal_lm(path))
    assert taken is shared
    assert all(p.requires_grad for p in taken.parameters())
    assert not taken.training
    assert taken.generation_config.to_dict() == fresh.generation_config.to_dict()
    # Training changes it: the next user loads the weights from disk
    assert kept_models.shared("causal_lm", path, lambda: load_causal_lm(path)) is not taken


def test_kept_models_stay_within_their_share_of_memory(tiny_model_dir, monkeypatch, caplog):
    path = str(tiny_model_dir)
    monkeypatch.setattr(kept_models, "MEMORY_SHARE", 1e-9)
    with caplog.at_level(logging.INFO, logger="alignment_core.kept_models"):
        first = kept_models.shared("causal_lm", path, lambda: load_causal_lm(path))
    assert "no longer kept loaded" in caplog.text
    assert kept_models.shared("causal_lm", path, lambda: load_causal_lm(path)) is not first


def test_each_stage_applies_its_configs_setting_and_an_async_schedule_keeps_nothing(tmp_path, tiny_model_dir):
    path = str(tiny_model_dir)

    def twice() -> bool:
        """Whether a second load of the model is the first one."""
        return (kept_models.shared("causal_lm", path, lambda: load_causal_lm(path))
                is kept_models.shared("causal_lm", path, lambda: load_causal_lm(path)))

    def config(**scale_out):
        return parse_config({"data": {"source": "bundled:prompts"}, "scale_out": scale_out,
                             "store": {"root": str(tmp_path / "store"), "run_name": "r"}})

    for scale_out, kept in (({"schedule": "async", "train_deployment": "train-stage/gpu"}, False),
                            ({"keep_models_loaded": False}, False), ({}, True)):
        pipeline.load_prompts(config(**scale_out), 1)  # any stage: it applies its config's setting
        assert twice() is kept, scale_out


def two_iterations(root: Path, keep: bool, tiny_reward_model_dir) -> dict:
    """Two online iterations through the pipeline's stages (as the flow runs them, without Prefect): a reward
    model labels and evaluates, the reference is a fixed model whose pass runs every round, and importance
    weights read the policy."""
    cfg = parse_config({
        "iterations": 2,
        "data": {"source": "bundled:prompts", "eval_prompts": 4},
        "model": {"policy": "tiny://llama", "reference": "tiny://llama"},
        "generation": {"backend": "transformers", "prompts_per_iteration": 6, "n_samples": 2, "max_new_tokens": 8},
        "annotation": {"annotator": "reward_model", "reward_model": str(tiny_reward_model_dir)},
        "reweight": {"strategy": "importance", "behaviour_model": "sampler"},
        "training": {"batch_size": 4, "learning_rate": 1e-3, "reference_from_sampler": False},
        "evaluation": {"max_new_tokens": 8},
        "scale_out": {"keep_models_loaded": keep},
        "store": {"root": str(root / "store"), "run_name": "kept", "cache_dir": str(root / "cache")},
    })
    store = pipeline.open_store(cfg)
    eval_prompts = pipeline.load_eval_prompts(cfg)
    checkpoints, uris = [cfg.model.policy], {}
    for k in (1, 2):
        policy = checkpoints[-1]
        prompts = pipeline.load_prompts(cfg, k)
        uris[k, "generations"] = pipeline.generate(cfg, prompts, policy, k)
        uris[k, "annotations"] = pipeline.annotate(cfg, uris[k, "generations"], k)
        units = pipeline.build_units(cfg, k, generations_uri=uris[k, "generations"],
                                     annotations_uri=uris[k, "annotations"])
        uris[k, "weights"] = pipeline.reweight(cfg, units, policy, k)
        checkpoints.append(pipeline.train(cfg, units, uris[k, "weights"], policy, cfg.model.reference, k))
        uris[k, "evaluation"] = pipeline.evaluate(cfg, eval_prompts, checkpoints[-1], policy, cfg.model.policy, k)
    outputs = {key: store.read_pandas(uri) for key, uri in uris.items()}
    for k in (1, 2):
        folder = Path(store.local_checkpoint(checkpoints[k]))
        outputs[k, "files"] = {f.name: f.read_bytes() for f in sorted(folder.iterdir())
                               if f.name not in ("lineage.json", "trainer_state.json", "_complete.json")}
    return outputs


@pytest.mark.slow
def test_a_run_is_the_same_with_models_kept_loaded_and_loads_them_once(tmp_path, tiny_reward_model_dir, caplog):
    root = tmp_path / "run"  # both runs at one path: their rows name the same store URIs
    with caplog.at_level(logging.INFO, logger="alignment_core.kept_models"):
        kept = two_iterations(root, True, tiny_reward_model_dir)
    reused = [r.getMessage() for r in caplog.records]
    root.rename(tmp_path / "kept")
    loaded = two_iterations(root, False, tiny_reward_model_dir)
    assert kept.keys() == loaded.keys()
    for key in kept:
        if key[1] == "files":
            assert kept[key] == loaded[key], f"iteration {key[0]}'s checkpoint differs"
        else:
            pd.testing.assert_frame_equal(kept[key], loaded[key], obj=str(key))
    # Loaded from disk: the reward model once; the initial policy twice (sampled, then trained in iteration 1;
    # the reference, kept for iteration 2 and the initial policy's evaluation samples) and each new checkpoint
    # once (evaluated, then sampled and trained in the next iteration). Loaded in every stage, they were 17
    # (11 causal LMs, 6 reward models).
    loads = [m.split(": ")[0].split(" ")[0] for m in reused if m.endswith("kept for the stages after this one")]
    assert sorted(loads) == ["causal_lm"] * 4 + ["reward_model"]
    assert sum(m.endswith("training the model kept loaded in this process") for m in reused) == 2
