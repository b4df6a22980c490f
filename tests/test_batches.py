"""BatchFactory: units from examples and annotations, batch keys, masks, truncation, grouping."""

import logging

import pandas as pd
import pytest
import torch

from alignment_core.batches import (
    BatchFactory,
    prompt_groups,
    response_mask,
    units_from_examples,
    units_from_online,
)
from alignment_core.config import PipelineConfig
from alignment_core.models import load_tokenizer
from alignment_core.records import ANNOTATIONS, EXAMPLES, GENERATIONS, from_rows
from alignment_core.rendering import render_prompt_ids, render_prompt_text, response_ids
from alignment_core.setups import SETUPS

SINGLE = ("prompt_id", "prompt", "prompt_token_ids", "prompt_attention_mask") + tuple(
    f"generation1{suffix}"
    for suffix in ("", "_response_only", "_token_ids", "_attention_mask", "_reward", "_weight")
)
DOUBLE = SINGLE + tuple(key.replace("generation1", "generation2") for key in SINGLE if "generation1" in key)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def user(text):
    return [{"role": "user", "content": text}]


def make_examples():
    rows = [
        dict(
            example_id="e1",
            prompt_id="p1",
            prompt="Hi there",
            prompt_messages=user("Hi there"),
            chosen="a good day",
            rejected="bad",
            completion="hello friend",
            label=1.0,
            source_row=0,
        ),
        dict(
            example_id="e2",
            prompt_id="p2",
            prompt="Why is the sky blue?",
            prompt_messages=user("Why is the sky blue?"),
            chosen="light",
            rejected="a long bad answer here",
            completion="it was cold",
            label=0.0,
            source_row=1,
        ),
    ]
    return from_rows(rows, EXAMPLES).to_pandas()


def make_generations(prompts=("p1", "p2"), samples=2):
    rows = []
    for p in prompts:
        for k in range(samples):
            rows.append(
                dict(
                    generation_id=f"{p}-g{k}",
                    prompt_id=p,
                    prompt=f"question {p}",
                    prompt_messages=user(f"question {p}"),
                    sample_index=k,
                    response=f"answer {k} of {p}",
                    response_token_ids=[1],
                    finish_reason="stop",
                    policy_uri="tiny://llama",
                    policy_digest="d",
                    sampling_params="{}",
                    seed=0,
                    backend="transformers",
                )
            )
    return from_rows(rows, GENERATIONS).to_pandas()


def annotation(annotation_id, prompt_id, g1, g2=None, r1=1.0, r2=None, status="ok", kind=None):
    return dict(
        annotation_id=annotation_id,
        prompt_id=prompt_id,
        annotator="test",
        kind=kind or ("pairwise" if g2 else "pointwise"),
        generation1_id=g1,
        generation2_id=g2,
        generation1_reward=r1,
        generation2_reward=r2,
        status=status,
        raw="{}",
    )


def online_annotations(setup):
    if setup == "online_pairwise":
        rows = [
            annotation("a1", "p1", "p1-g0", "p1-g1", 1.0, 0.0),
            annotation("a2", "p2", "p2-g0", "p2-g1", 0.0, 1.0),
        ]
    elif setup == "online_pointwise":
        rows = [annotation("a1", "p1", "p1-g0", r1=1.0), annotation("a2", "p2", "p2-g1", r1=0.0)]
    else:  # rl: scalar rewards
        rows = [annotation("a1", "p1", "p1-g0", r1=0.25), annotation("a2", "p2", "p2-g1", r1=-1.5)]
    return from_rows(rows, ANNOTATIONS).to_pandas()


def units_for(setup):
    if setup.startswith(("online", "rl")):
        return units_from_online(make_generations(), online_annotations(setup), setup)
    return units_from_examples(make_examples(), setup)


# (generation1_reward, generation2_reward) of the two units units_for(setup) builds.
EXPECTED_REWARDS = {
    "sft": (None, None),
    "reward_modelling": (None, None),
    "rl": ([0.25, -1.5], None),
    "offline_pointwise": ([1.0, 0.0], None),
    "online_pointwise": ([1.0, 0.0], None),
    "offline_pairwise": ([1.0, 1.0], [0.0, 0.0]),
    "online_pairwise": ([1.0, 1.0], [0.0, 0.0]),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_batch_keys_rewards_and_weights_follow_seed(tokenizer, setup):
    factory = BatchFactory(tokenizer, setup, max_length=64, max_prompt_length=32)
    batch = factory.collate(factory.encode(units_for(setup)))
    two = setup in ("reward_modelling", "offline_pairwise", "online_pairwise")
    assert set(batch) == set(DOUBLE if two else SINGLE)
    expected1, expected2 = EXPECTED_REWARDS[setup]
    for side, expected in (("generation1", expected1), ("generation2", expected2)):
        if side == "generation2" and not two:
            continue
        reward = batch[f"{side}_reward"]
        assert (reward is None) if expected is None else reward.tolist() == expected
        assert batch[f"{side}_weight"].tolist() == [1.0, 1.0]
        assert batch[f"{side}_token_ids"].dtype == torch.long
    if two:
        assert batch["generation1_token_ids"].shape == batch["generation2_token_ids"].shape


def test_offline_units_take_the_right_responses():
    examples = make_examples()
    assert units_from_examples(examples, "sft")["generation1_response"].tolist() == [
        "hello friend",
        "it was cold",
    ]
    no_completion = examples.assign(completion=None)
    assert units_from_examples(no_completion, "sft")["generation1_response"].tolist() == [
        "a good day",
        "light",
    ]
    pairs = units_from_examples(examples, "offline_pairwise")
    assert pairs["unit_id"].tolist() == ["e1", "e2"]
    assert pairs["generation2_response"].tolist() == ["bad", "a long bad answer here"]
    with pytest.raises(ValueError, match=r"'offline_pairwise' needs 'rejected'.*example_id='e2'"):
        units_from_examples(examples.assign(rejected=["x", None]), "offline_pairwise")
    with pytest.raises(ValueError, match="'sft' needs 'completion' or 'chosen'"):
        units_from_examples(examples.assign(completion=None, chosen=None), "sft")
    with pytest.raises(ValueError, match="labels 1.0"):
        units_from_examples(examples.assign(label=[1.0, 0.5]), "offline_pointwise")
    with pytest.raises(ValueError, match="not 'rl'"):
        units_from_examples(examples, "rl")


def test_online_units_train_on_the_sampled_tokens_not_the_retokenised_text(tokenizer):
    """A sampled byte-level token decodes alone to U+FFFD: tokenising the decoded text gives other tokens, so
    training learns the sampled ids (stop token included, none added to a sample cut at its length); units
    without sampled ids (offline) tokenise their text and append EOS."""
    eos = tokenizer.eos_token_id
    byte_token = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd")
    sampled = {"p1-g0": [byte_token, 40, 41], "p1-g1": [42, 43, eos]}
    generations = make_generations(prompts=("p1",))
    generations["response"] = [tokenizer.decode(sampled[g], skip_special_tokens=True)
                               for g in generations["generation_id"]]
    generations["response_token_ids"] = [sampled[g] for g in generations["generation_id"]]
    generations["finish_reason"] = ["length", "stop"]
    retokenised = tokenizer(generations["response"][0], add_special_tokens=False).input_ids
    assert retokenised[:1] != [byte_token]  # the premise: the decoded text does not give the sampled tokens back
    # generation2 (p1-g1) preferred: the pair is swapped, its sampled tokens with it
    annotations = from_rows([annotation("a1", "p1", "p1-g0", "p1-g1", 0.0, 1.0)], ANNOTATIONS).to_pandas()
    units = units_from_online(generations, annotations, "online_pairwise")
    factory = BatchFactory(tokenizer, "online_pairwise", max_length=64, max_prompt_length=32)
    [encoded] = factory.encode(units)
    assert encoded["generation1_response_ids"] == [42, 43, eos]
    assert encoded["generation2_response_ids"] == [byte_token, 40, 41]  # cut at its length: no EOS added

    [offline] = BatchFactory(tokenizer, "offline_pairwise", max_length=64, max_prompt_length=32).encode(
        units_from_examples(make_examples(), "offline_pairwise").head(1))
    chosen = make_examples()["chosen"].iloc[0]
    assert offline["generation1_response_ids"] == tokenizer(chosen, add_special_tokens=False).input_ids + [eos]


def test_prompt_uses_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = render_prompt_text(tokenizer, messages)
    assert text == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = render_prompt_ids(tokenizer, messages)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-2] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_prompt_fallback_without_chat_template(tiny_model_dir):
    plain = load_tokenizer(str(tiny_model_dir))
    plain.chat_template = None
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = render_prompt_text(plain, messages)
    assert text == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"
    assert render_prompt_ids(plain, messages) == plain(text).input_ids
    with pytest.raises(ValueError, match="unknown chat role"):
        render_prompt_text(plain, [{"role": "tool", "content": "x"}])


def test_masks_eos_and_padding(tokenizer):
    factory = BatchFactory(tokenizer, "offline_pairwise", max_length=64, max_prompt_length=32)
    units = units_for("offline_pairwise")
    batch = factory.collate(factory.encode(units))
    prompt_lengths = batch["prompt_attention_mask"].sum(1).tolist()
    for i, unit in enumerate(units.itertuples()):
        prompt = render_prompt_ids(tokenizer, unit.prompt_messages)
        assert prompt_lengths[i] == len(prompt)
        assert batch["prompt_token_ids"][i, : len(prompt)].tolist() == prompt
        for side, text in (
            ("generation1", unit.generation1_response),
            ("generation2", unit.generation2_response),
        ):
            ids = batch[f"{side}_token_ids"][i]
            attention = batch[f"{side}_attention_mask"][i]
            mask = response_mask(batch, side)[i]
            response = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            assert ids[: len(prompt)].tolist() == prompt  # the same prompt tokens as prompt_token_ids
            assert ids[mask].tolist() == response  # exactly the response, ending in EOS
            assert not mask[: len(prompt)].any()
            length = int(attention.sum())
            assert length == len(prompt) + len(response) and attention[:length].all()
            assert (ids[length:] == tokenizer.pad_token_id).all() and not mask[length:].any()
    # Padding of the prompt tensor is masked too, and rows of different lengths exist in this batch.
    assert len(set(prompt_lengths)) == 2
    assert (batch["prompt_token_ids"][batch["prompt_attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert batch["generation2"][1] == batch["prompt"][1] + "a long bad answer here"


@pytest.mark.parametrize(
    ("mode", "expected_prompt"),
    [("keep_end", [3, 4, 5, 6, 7, 8, 9, 10]), ("keep_start", [1, 2, 3, 4, 5, 6, 7, 8])],
)
def test_truncation_follows_the_dpo_reference(tokenizer, mode, expected_prompt):
    factory = BatchFactory(
        tokenizer, "offline_pairwise", max_length=12, max_prompt_length=8, truncation_mode=mode
    )
    prompt = list(range(1, 11))  # 10 tokens
    # Prompt + longest response (6) = 16 > 12: the prompt is cut to 8; 8 + 6 > 12: responses to 12 - 8.
    cut_prompt, cut = factory.truncate(
        prompt, {"generation1": [20, 21, 22, 23, 24, 25], "generation2": [30, 31]}
    )
    assert cut_prompt == expected_prompt
    assert cut == {"generation1": [20, 21, 22, 23], "generation2": [30, 31]}
    # Cutting the prompt alone is enough here (8 + 3 <= 12): responses stay whole.
    assert factory.truncate(prompt, {"generation1": [20, 21, 22]}) == (
        expected_prompt,
        {"generation1": [20, 21, 22]},
    )
    # Everything fits: nothing is cut, even a prompt longer than max_prompt_length.
    assert factory.truncate(prompt, {"generation1": [20]}) == (prompt, {"generation1": [20]})


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncated_prompt_is_the_same_everywhere(tokenizer, mode):
    long_question = "Why is the sky blue and the garden green when the sun is bright? " * 6
    examples = make_examples().assign(prompt_messages=[user(long_question), user("Hi")])
    factory = BatchFactory(
        tokenizer, "offline_pairwise", max_length=40, max_prompt_length=24, truncation_mode=mode
    )
    encoded = factory.encode(units_from_examples(examples, "offline_pairwise"))
    full_prompt = render_prompt_ids(tokenizer, user(long_question))
    assert len(full_prompt) > 40
    expected = full_prompt[-24:] if mode == "keep_end" else full_prompt[:24]
    assert encoded[0]["prompt_ids"] == expected
    batch = factory.collate(encoded)
    assert batch["prompt_token_ids"][0].tolist() == expected
    for side in ("generation1", "generation2"):
        assert batch[f"{side}_token_ids"][0, :24].tolist() == expected
        assert batch[f"{side}_attention_mask"].sum(1).max() <= 40
    assert batch["generation1_token_ids"][0][response_mask(batch, "generation1")[0]].tolist() == (
        response_ids(tokenizer, "a good day")
    )


def test_online_units_join_and_status_filtering(caplog):
    generations = make_generations()
    rows = [
        annotation("a1", "p1", "p1-g0", "p1-g1", 1.0, 0.0),
        annotation("a2", "p2", "p2-g0", "p2-g1", 0.0, 1.0),  # generation2 preferred: swapped
        annotation("a3", "p1", "p1-g1", "p1-g0", 0.5, 0.5, status="tie"),  # a tie: used, then dropped
        annotation("a4", "p2", "p2-g0", "p2-g1", None, None, status="unparseable"),
        annotation("a5", "p2", "p2-g0", "p2-g1", None, None, status="error"),
    ]
    with caplog.at_level(logging.WARNING, logger="alignment_core.batches"):
        units = units_from_online(generations, from_rows(rows, ANNOTATIONS).to_pandas(), "online_pairwise")
    assert "skipping 2 of 5 annotations" in caplog.text and "dropping 1 of 3 pairs" in caplog.text
    assert units["unit_id"].tolist() == ["a1", "a2"]
    assert units["generation1_id"].tolist() == ["p1-g0", "p2-g1"]
    assert units["generation1_response"].tolist() == ["answer 0 of p1", "answer 1 of p2"]
    assert units["generation2_response"].tolist() == ["answer 1 of p1", "answer 0 of p2"]
    assert units["generation1_reward"].tolist() == [1.0, 1.0] and units["generation2_reward"].tolist() == [
        0.0,
        0.0,
    ]
    assert units["prompt"].tolist() == ["question p1", "question p2"]

    # the annotator's scores travel with their generation (the margin reweighting reads them)
    scored = [annotation("s1", "p2", "p2-g0", "p2-g1", 0.0, 1.0) | {"score1": 0.2, "score2": 0.9}]
    units = units_from_online(generations, from_rows(scored, ANNOTATIONS).to_pandas(), "online_pairwise")
    assert units[["generation1_id", "score1", "score2"]].values.tolist() == [["p2-g1", 0.9, 0.2]]

    rl = units_from_online(generations, online_annotations("rl"), "rl")
    assert rl["generation1_response"].tolist() == ["answer 0 of p1", "answer 1 of p2"]
    assert rl["generation2_response"].isna().all()


def test_online_units_reject_bad_joins():
    generations = make_generations()
    unknown = from_rows([annotation("a1", "p1", "p1-g9", r1=1.0)], ANNOTATIONS).to_pandas()
    with pytest.raises(KeyError, match="p1-g9"):
        units_from_online(generations, unknown, "rl")
    other_prompt = from_rows([annotation("a1", "p1", "p2-g0", r1=1.0)], ANNOTATIONS).to_pandas()
    with pytest.raises(ValueError, match="another prompt"):
        units_from_online(generations, other_prompt, "rl")
    with pytest.raises(ValueError, match="needs pairwise annotations"):
        units_from_online(generations, online_annotations("rl"), "online_pairwise")
    with pytest.raises(ValueError, match="labels 1.0"):
        units_from_online(generations, online_annotations("rl"), "online_pointwise")


def test_weights_join_and_follow_a_swap(tokenizer, caplog):
    units = units_for("offline_pairwise")
    # A unit in non-canonical order (generation2 preferred) and a tie: encode canonicalises them as well.
    units.loc[0, ["generation1_reward", "generation2_reward"]] = [0.0, 1.0]
    tie = units.iloc[[1]].assign(unit_id="e3", generation1_reward=0.5, generation2_reward=0.5)
    units = pd.concat([units, tie], ignore_index=True)
    weights = pd.DataFrame(
        {
            "unit_id": ["e3", "e2", "e1"],
            "generation1_weight": [9.0, 0.5, 2.0],
            "generation2_weight": [9.0, 0.25, 3.0],
        }
    )
    factory = BatchFactory(tokenizer, "offline_pairwise", max_length=64, max_prompt_length=32)
    with caplog.at_level(logging.WARNING, logger="alignment_core.batches"):
        encoded = factory.encode(units, weights)
    assert "dropping 1 of 3 pairs" in caplog.text
    assert [item["unit_id"] for item in encoded] == ["e1", "e2"]
    assert encoded[0]["generation1_response_only"] == "bad"  # swapped: "bad" was generation2 but preferred
    batch = factory.collate(encoded)
    assert batch["generation1_weight"].tolist() == [3.0, 0.5] and batch["generation2_weight"].tolist() == [
        2.0,
        0.25,
    ]
    assert batch["generation1_reward"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"1 of 3 units have no generation1_weight.*'e3'"):
        factory.encode(units, weights.iloc[1:])
    with pytest.raises(ValueError, match="generation2_weight"):
        factory.encode(units, weights.assign(generation2_weight=None))


def test_rl_prompt_groups_hold_each_prompts_samples(tokenizer):
    """rl's leave-one-out baseline needs a prompt's samples in one micro-batch: the Trainer plans its steps over
    `prompt_groups` (LossSpec.grouped); training.plan_steps keeps each group whole (tests/test_training.py)."""
    prompts = [f"p{i}" for i in range(5)]
    generations = make_generations(prompts, samples=3)
    rows = [
        annotation(f"a-{g}", g.split("-")[0], g, r1=float(i))
        for i, g in enumerate(generations["generation_id"])
    ]
    units = units_from_online(generations, from_rows(rows, ANNOTATIONS).to_pandas(), "rl")
    factory = BatchFactory(tokenizer, "rl", max_length=64, max_prompt_length=32)
    encoded = factory.encode(units)
    groups = prompt_groups(encoded)
    assert [len(group) for group in groups] == [3] * 5
    seen = []
    for group in groups:
        batch = factory.collate([encoded[i] for i in group])
        assert len(set(batch["prompt"])) == 1  # one prompt, all its samples
        seen += batch["generation1_reward"].tolist()
    assert sorted(seen) == [float(i) for i in range(15)]


def test_collate_keeps_the_units_order(tokenizer):
    examples = pd.concat([make_examples()] * 3, ignore_index=True)
    examples["example_id"] = [f"e{i}" for i in range(6)]
    factory = BatchFactory(tokenizer, "sft", max_length=64, max_prompt_length=32)
    encoded = factory.encode(units_from_examples(examples, "sft"))
    batch = factory.collate(encoded[:4])
    assert len(batch["prompt"]) == 4
    assert batch["generation1_response_only"] == ["hello friend", "it was cold"] * 2


def test_from_config_and_bad_arguments(tokenizer):
    cfg = PipelineConfig.model_validate(
        {
            "setup": "rl",
            "training": {"loss": "rl", "max_length": 100, "max_prompt_length": 60, "truncation_mode": "keep_start"},
        }
    )
    factory = BatchFactory.from_config(tokenizer, cfg)
    assert (factory.setup, factory.max_length, factory.max_prompt_length, factory.truncation_mode) == (
        "rl",
        100,
        60,
        "keep_start",
    )
    with pytest.raises(ValueError, match="unknown setup"):
        BatchFactory(tokenizer, "dpo", max_length=10, max_prompt_length=5)
    with pytest.raises(ValueError, match="max_prompt_length"):
        BatchFactory(tokenizer, "sft", max_length=10, max_prompt_length=10)
    with pytest.raises(ValueError, match="truncation_mode"):
        BatchFactory(tokenizer, "sft", max_length=10, max_prompt_length=5, truncation_mode="middle")
