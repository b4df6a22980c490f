"""SampleReweighter strategies on hand-built units with hand-computed weights, and the weights stage."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from alignment_core.config import PipelineConfig, ReweightConfig
from alignment_core.reweight import (
    SampleReweighter,
    add_importance_inputs,
    run_reweighting,
    sequence_logprobs,
    weights_summary,
)
from alignment_core.store import ArtifactStore

SIGMOID_2 = 0.8807970779778823  # sigmoid(2)


def make_units(n: int, pairs: bool = True, **columns) -> pd.DataFrame:
    units = pd.DataFrame(
        {
            "unit_id": [f"u{i}" for i in range(n)],
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": ["Say something nice."] * n,
            "prompt_messages": [[{"role": "user", "content": "Say something nice."}]] * n,
            "generation1_response": ["a good day"] * n,
            "generation2_response": ["a bad day"] * n if pairs else [None] * n,
            "generation1_reward": [1.0] * n,
            "generation2_reward": [0.0] * n if pairs else [None] * n,
            "confidence": [None] * n,
            "agreement": [None] * n,
        }
    )
    for name, values in columns.items():
        units[name] = values
    return units


def weigh(strategy: str, units: pd.DataFrame, **cfg) -> pd.DataFrame:
    weights = SampleReweighter(ReweightConfig(strategy=strategy, **cfg)).weigh(units)
    w = weights["generation1_weight"].to_numpy()
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and w.mean() == pytest.approx(1.0)
    assert list(weights["unit_id"]) == list(units["unit_id"]) and set(weights["strategy"]) == {strategy}
    return weights


def test_uniform():
    weights = weigh("uniform", make_units(3, pairs=False))
    assert list(weights["generation1_weight"]) == [1.0, 1.0, 1.0]
    assert weights["generation2_weight"].isna().all()  # single-generation units
    assert list(weigh("uniform", make_units(2))["generation2_weight"]) == [1.0, 1.0]


def test_margin_uses_scores_then_rewards():
    units = make_units(3, score1=[2.0, 0.5, None], score2=[0.0, 0.5, None])
    units.loc[2, ["generation1_reward", "generation2_reward"]] = [3.0, 1.0]  # no scores: rewards, margin 2
    weights = weigh("margin", units)
    raw = np.array([SIGMOID_2, 0.5, SIGMOID_2])
    assert list(weights["generation1_weight"]) == pytest.approx(raw / raw.mean())
    assert list(weights["generation2_weight"]) == list(weights["generation1_weight"])
    assert json.loads(weights["inputs"][0]) == {
        "score1": 2.0,
        "score2": 0.0,
        "margin": 2.0,
        "raw_weight": SIGMOID_2,
    }
    hot = weigh("margin", units, temperature=2.0)  # sigmoid(2 / 2) for the clear pairs
    raw = np.array([1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(-1))])
    assert list(hot["generation1_weight"]) == pytest.approx(raw / raw.mean())
    with pytest.raises(ValueError, match="weighs pairs, but 2 units have one generation"):
        weigh("margin", make_units(2, pairs=False))


def test_judge_confidence_from_gap_agreement_or_stage_mean():
    units = make_units(3, pairs=False, confidence=[2.0, None, None], agreement=[True, False, None])
    weights = weigh("judge_confidence", units)
    fill = (SIGMOID_2 + 0.5) / 2
    raw = np.array([SIGMOID_2, 0.5, fill])  # gap 2 -> sigmoid(2); disagreed -> 0.5; unknown -> mean of known
    assert list(weights["generation1_weight"]) == pytest.approx(raw / raw.mean())
    assert weights["generation1_weight"][2] == pytest.approx(1.0)  # the mean-filled unit is neutral
    assert json.loads(weights["inputs"][1]) == {"agreement": False, "raw_weight": 0.5}
    with pytest.raises(ValueError, match="needs a `confidence` or `agreement`"):
        weigh("judge_confidence", make_units(2))


def test_importance_self_normalised_and_clipped():
    units = make_units(
        4,
        generation1_policy_logp=[-1.0, -5.0, -3.0, -1.0],
        generation1_behaviour_logp=[-2.0, -2.0, -3.0, -1.0],
        generation2_policy_logp=[-2.0, -2.0, -4.0, 3.0],
        generation2_behaviour_logp=[-2.0, -2.0, -4.0, -1.0],
    )
    # log ratios (sum over the pair): 1, -3, 0, 4. Self-normalised: exp(s - log mean exp s) with
    # log mean exp s = log((e + e^-3 + 1 + e^4) / 4) = 2.680, i.e. 0.186, 0.0034, 0.069, 3.742; clip 5 lifts
    # the first three to 1/5.
    weights = weigh("importance", units, clip=5.0)
    raw = np.array([0.2, 0.2, 0.2, math.exp(4 - math.log((math.e + math.exp(-3) + 1 + math.exp(4)) / 4))])
    assert raw[3] == pytest.approx(3.742, abs=1e-3)
    assert list(weights["generation1_weight"]) == pytest.approx(raw / raw.mean())
    inputs = [json.loads(i) for i in weights["inputs"]]
    assert [i["log_ratio"] for i in inputs] == [1.0, -3.0, 0.0, 4.0]
    assert [i["clipped"] for i in inputs] == [True, True, True, False]
    # A policy far from the behaviour model (every ratio tiny) still gets weights that differ, unlike clipping
    # the raw ratios, which would make them all 1/c and so uniform.
    drifted = units.assign(generation1_policy_logp=units["generation1_policy_logp"] - 30)
    assert list(weigh("importance", drifted, clip=5.0)["generation1_weight"]) == pytest.approx(raw / raw.mean())
    single = make_units(
        2, pairs=False, generation1_policy_logp=[-1.0, -2.0], generation1_behaviour_logp=[-1.0, -1.0]
    )
    raw = np.array([1.0, math.exp(-1)])
    assert list(weigh("importance", single)["generation1_weight"]) == pytest.approx(raw / raw.mean())
    # a temperature of 2 halves every log ratio: 0.5, -1.5, 0, 2 -> exp(s - 0.942): 0.643, 0.087, 0.390, 2.881
    tempered = weigh("importance", units, clip=5.0, temperature=2.0)
    s = np.array([0.5, -1.5, 0.0, 2.0])
    raw = np.clip(np.exp(s - np.log(np.exp(s).mean())), 0.2, 5.0)
    assert raw.tolist() == pytest.approx([0.643, 0.2, 0.390, 2.881], abs=1e-3)
    assert list(tempered["generation1_weight"]) == pytest.approx(raw / raw.mean())
    assert [json.loads(i)["clipped"] for i in tempered["inputs"]] == [False, True, False, False]
    with pytest.raises(ValueError, match="lacks generation1_policy_logp"):
        weigh("importance", make_units(2))
    with pytest.raises(ValueError, match="clip must be >= 1"):
        SampleReweighter(ReweightConfig(strategy="importance", clip=0.5))


def test_importance_pair_mean_halves_the_joint_log_ratio():
    units = make_units(
        3,
        generation1_policy_logp=[-1.0, -5.0, -3.0], generation1_behaviour_logp=[-2.0, -2.0, -3.0],
        generation2_policy_logp=[-2.0, -2.0, 1.0], generation2_behaviour_logp=[-2.0, -2.0, -3.0],
    )
    # joint log ratios 1, -3, 4; their mean per response 0.5, -1.5, 2
    weights = weigh("importance", units, clip=100.0, importance_pair="mean")
    s = np.array([0.5, -1.5, 2.0])
    raw = np.exp(s - np.log(np.exp(s).mean()))
    assert list(weights["generation1_weight"]) == pytest.approx(raw / raw.mean())
    assert [json.loads(i)["log_ratio"] for i in weights["inputs"]] == [0.5, -1.5, 2.0]
    joint = weigh("importance", units, clip=100.0)
    assert [json.loads(i)["log_ratio"] for i in joint["inputs"]] == [1.0, -3.0, 4.0]
    # single responses: the mean of one is itself
    single = make_units(2, pairs=False, generation1_policy_logp=[-1.0, -2.0], generation1_behaviour_logp=[-1.0, -1.0])
    assert [json.loads(i)["log_ratio"] for i in weigh("importance", single, importance_pair="mean")["inputs"]] == [
        0.0, -1.0]


def test_weights_below_the_effective_sample_floor_fall_back_to_uniform(caplog):
    units = make_units(4, generation1_policy_logp=[0.0, 0.0, 0.0, 6.0], generation1_behaviour_logp=[0.0] * 4,
                       generation2_policy_logp=[0.0] * 4, generation2_behaviour_logp=[0.0] * 4)
    skewed = weigh("importance", units, clip=100.0)
    w = skewed["generation1_weight"].to_numpy()
    effective = w.sum() ** 2 / (w**2).sum() / len(w)
    assert effective == pytest.approx(weights_summary(skewed)["effective_sample_fraction"])
    assert 0.25 < effective < 0.3  # one unit carries nearly all the weight
    kept = weigh("importance", units, clip=100.0, min_effective_sample_fraction=effective - 1e-3)
    assert list(kept["generation1_weight"]) == pytest.approx(list(w))  # at the floor: kept
    assert "uniform weights instead" not in caplog.text
    guarded = weigh("importance", units, clip=100.0, min_effective_sample_fraction=effective + 1e-3)
    assert list(guarded["generation1_weight"]) == [1.0] * 4
    assert f"effective sample fraction {effective:.3f} < reweight.min_effective_sample_fraction" in caplog.text
    inputs = [json.loads(i) for i in guarded["inputs"]]
    assert all(i["fallback_uniform"] and i["effective_sample_fraction"] == pytest.approx(effective) for i in inputs)
    assert weights_summary(guarded)["fallback_uniform"] and not weights_summary(kept)["fallback_uniform"]
    assert inputs[3]["log_ratio"] == 6.0  # what the weight would have come from is still recorded


def test_length_debias():
    units = make_units(4)
    units["generation1_response"] = ["w " * 5, "w " * 7, "w " * 20, "w " * 1]
    units["generation2_response"] = ["w " * 5, "w " * 5, "w " * 10, "w " * 5]
    units.loc[3, ["generation1_reward", "generation2_reward"]] = [0.5, 0.5]  # a tie: gap 0
    # chosen - rejected words: 0, 2, 10, 0 -> typical (median |gap|) = 1; excess 0, 1, 9, 0
    weights = weigh("length_debias", units, clip=5.0)
    raw = np.array([1.0, math.exp(-1), 1 / 5, 1.0])  # exp(-9) is floored at 1/clip
    assert list(weights["generation1_weight"]) == pytest.approx(raw / raw.mean())
    assert json.loads(weights["inputs"][2])["typical_gap"] == 1.0
    swapped = units.copy()  # generation2 preferred: the gap is measured from the chosen response
    swapped.loc[1, ["generation1_reward", "generation2_reward"]] = [0.0, 1.0]
    assert json.loads(weigh("length_debias", swapped)["inputs"][1])["chosen_minus_rejected_words"] == -2


def test_empty_stage():
    assert len(SampleReweighter(ReweightConfig()).weigh(make_units(0))) == 0


# ---- sequence log-probs and the stage --------------------------------------------------------------------
def test_sequence_logprobs_match_a_manual_forward_pass(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    messages = [
        [{"role": "user", "content": "Say something nice."}],
        [{"role": "user", "content": "Hi?"}],
    ] * 2
    responses = ["a good day", "hello there, my friend", "x", "a great and happy day"]
    batched = sequence_logprobs(model, tokenizer, messages, responses, batch_size=3)
    for m, r, value in zip(messages, responses, batched, strict=True):
        prompt = tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"]
        answer = tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0], dim=-1)
        expected = sum(logp[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer))
        assert value == pytest.approx(expected, abs=1e-3)


def test_run_reweighting_importance_against_itself_is_uniform(tiny_model_dir, tmp_path):
    store = ArtifactStore(str(tmp_path))
    units = make_units(3)
    units.loc[2, "generation2_response"] = None
    units.loc[2, "generation2_reward"] = None
    cfg = PipelineConfig.model_validate(
        {"reweight": {"strategy": "importance", "behaviour_model": str(tiny_model_dir)}}
    )
    out = store.stage_uri("run", 0, "weights")
    manifest = run_reweighting(store, units, out, cfg, {"fp": 1}, policy_path=str(tiny_model_dir))
    weights = store.read_pandas(out)
    assert list(weights["generation1_weight"]) == pytest.approx([1.0, 1.0, 1.0])  # same model: ratio 1
    assert weights["generation2_weight"].isna().tolist() == [False, False, True]
    assert manifest["extra"]["strategy"] == "importance"
    assert manifest["extra"]["effective_sample_fraction"] == pytest.approx(1.0)

    with_inputs = add_importance_inputs(units, str(tiny_model_dir), str(tiny_model_dir))
    assert with_inputs["generation2_policy_logp"].isna().tolist() == [False, False, True]
    assert with_inputs["generation1_policy_logp"].tolist() == pytest.approx(
        with_inputs["generation1_behaviour_logp"]
    )
    with pytest.raises(ValueError, match="needs the current policy"):
        run_reweighting(store, units, store.stage_uri("run", 1, "weights"), cfg, {"fp": 1})


def test_importance_upper_clip_binds():
    # one pair far more likely under the policy: its self-normalised weight (about 4) is cut to the clip, 2
    units = make_units(4, generation1_policy_logp=[0.0, 0.0, 0.0, 5.0], generation1_behaviour_logp=[0.0] * 4,
                       generation2_policy_logp=[0.0] * 4, generation2_behaviour_logp=[0.0] * 4)
    weights = weigh("importance", units, clip=2.0)
    inputs = [json.loads(i) for i in weights["inputs"]]
    assert [i["raw_weight"] for i in inputs][3] == pytest.approx(2.0)
    assert [i["clipped"] for i in inputs] == [True, True, True, True]  # the others at 1/2, the outlier at 2


# ---- importance against the checkpoint that sampled (reweight.behaviour_model: sampler) -------------------------
@pytest.fixture(scope="module")
def sampled_units(tiny_model_dir, tmp_path_factory):
    """Online units of the tiny model's own samples (temperature 0.7, top-p 0.9: the recorded log-probs are raw),
    labelled by a rule."""
    from alignment_core import pipeline
    from alignment_core.config import parse_config

    root = tmp_path_factory.mktemp("sampled")
    cfg = parse_config({
        "setup": "online_pairwise", "model": {"policy": str(tiny_model_dir)},
        "data": {"source": "bundled:prompts", "eval_prompts": 2},
        "generation": {"backend": "transformers", "prompts_per_iteration": 6, "n_samples": 2, "max_new_tokens": 12,
                       "temperature": 0.7, "top_p": 0.9},
        "annotation": {"annotator": "programmatic", "programmatic": "alignment_core.rewards:response_length"},
        "store": {"root": str(root / "store"), "run_name": "sampled", "cache_dir": str(root / "cache")}})
    generations = pipeline.generate(cfg, pipeline.load_prompts(cfg, 1), cfg.model.policy, 1)
    units_uri = pipeline.build_units(cfg, 1, generations_uri=generations,
                                     annotations_uri=pipeline.annotate(cfg, generations, 1))
    return ArtifactStore(cfg.store.root).read_pandas(units_uri)


def sampler_config() -> PipelineConfig:
    return PipelineConfig.model_validate({"reweight": {"strategy": "importance", "behaviour_model": "sampler"}})


def test_against_its_own_sampler_the_policy_gets_the_recorded_logprobs_and_uniform_weights(sampled_units,
                                                                                       tiny_model_dir, tmp_path):
    from alignment_core.reweight import add_sampler_importance_inputs

    assert len(sampled_units) >= 4
    with_inputs = add_sampler_importance_inputs(sampled_units, str(tiny_model_dir))
    for g in (1, 2):
        # the behaviour's log-prob is the one recorded at sampling; the policy's, over the very tokens it sampled,
        # agrees with it to float32 rounding (a re-tokenised text would not: other tokens, other numbers)
        assert with_inputs[f"generation{g}_behaviour_logp"].tolist() == sampled_units[f"generation{g}_sampler_logp"]\
            .tolist()
        assert with_inputs[f"generation{g}_policy_logp"].astype(float).tolist() == pytest.approx(
            sampled_units[f"generation{g}_sampler_logp"].tolist(), abs=2e-3)
    store = ArtifactStore(str(tmp_path))
    run_reweighting(store, sampled_units, store.stage_uri("run", 1, "weights"), sampler_config(), {"fp": 1},
                    policy_path=str(tiny_model_dir))
    weights = store.read_pandas(store.stage_uri("run", 1, "weights"))
    assert weights["generation1_weight"].tolist() == pytest.approx([1.0] * len(sampled_units), abs=1e-3)


def test_against_an_older_sampler_the_weights_are_the_policys_ratios(sampled_units, stopping_model_dir,  # noqa: F811
                                                                     tmp_path):
    """A policy that moved (the stopping model: the tiny model with its EOS row changed) against the checkpoint
    that sampled: the weights are the self-normalised, clipped ratios of its log-probs to the recorded ones."""
    store = ArtifactStore(str(tmp_path))
    run_reweighting(store, sampled_units, store.stage_uri("run", 1, "weights"), sampler_config(), {"fp": 1},
                    policy_path=stopping_model_dir)
    weights = store.read_pandas(store.stage_uri("run", 1, "weights")).set_index("unit_id")
    inputs = weights["inputs"].map(json.loads)
    log_ratio = np.array([sum(i[f"generation{g}_policy_logp"] - i[f"generation{g}_behaviour_logp"] for g in (1, 2))
                          for i in inputs])
    assert np.abs(log_ratio).max() > 0.1  # the policy moved
    expected = np.clip(np.exp(log_ratio - np.log(np.mean(np.exp(log_ratio)))), 1 / 5, 5)
    expected = expected / expected.mean()  # the stage is normalised to mean 1
    assert weights["generation1_weight"].tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    recorded = sampled_units.set_index("unit_id").loc[weights.index]
    assert [i["generation1_behaviour_logp"] for i in inputs] == pytest.approx(recorded["generation1_sampler_logp"])


def test_the_sampler_is_refused_where_no_sample_recorded_it(tmp_path):
    from alignment_core.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="samples nothing"):
        parse_config({"setup": "offline_pairwise",
                      "reweight": {"strategy": "importance", "behaviour_model": "sampler"}})
    units = make_units(2)  # offline units: no sampled tokens, no recorded log-probs
    with pytest.raises(ValueError, match="unit 'u0' has no sampled tokens or no sampler log-prob"):
        run_reweighting(ArtifactStore(str(tmp_path)), units, "x", sampler_config(), {"fp": 1}, policy_path="unused")
