"""One rendering rule for a (prompt, response) pair: a reward model scores what it was trained on, and responses
end with the chat template's end-of-turn token, across tokenizer shapes."""

import shutil

import pandas as pd
import pytest
import torch

from alignment_core import logprobs
from alignment_core.annotation.base import ScoreRules
from alignment_core.annotation.scorers import RewardModelAnnotator
from alignment_core.batches import BatchFactory
from alignment_core.generation.common import stop_token_ids
from alignment_core.models import load_reward_model, load_tokenizer
from alignment_core.rendering import end_of_turn_id, pair_ids, render_prompt_ids, response_ids
from alignment_core.tiny import END_OF_TURN

# Every turn closed by <|end|>, the assistant's too: a template whose end-of-turn is not the tokenizer's EOS
# (as Gemma's <end_of_turn> or Phi-3's <|end|>).
END_OF_TURN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _pad_is_eos(tokenizer, model_config):
    tokenizer.pad_token = tokenizer.eos_token
    model_config.pad_token_id = tokenizer.eos_token_id


def _no_template(tokenizer, model_config):
    tokenizer.chat_template = None


def _end_of_turn_not_eos(tokenizer, model_config):
    tokenizer.chat_template = END_OF_TURN_TEMPLATE


TOKENIZER_SHAPES = {
    "pad_differs_from_eos": lambda tokenizer, model_config: None,  # the tiny tokenizer as built
    "pad_is_eos": _pad_is_eos,  # GPT-2, Mistral, Phi-3
    "no_template": _no_template,  # base models: plain Human/Assistant prompts
    "end_of_turn_not_eos": _end_of_turn_not_eos,  # Gemma, Phi-3, Qwen-style chat templates
}


@pytest.fixture(params=list(TOKENIZER_SHAPES))
def shaped_reward_model(request, tiny_reward_model_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path / request.param
    shutil.copytree(tiny_reward_model_dir, folder)
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    TOKENIZER_SHAPES[request.param](tokenizer, config)
    tokenizer.save_pretrained(folder)
    config.save_pretrained(folder)
    return request.param, str(folder)


def _pairs():
    prompts = [[{"role": "user", "content": "Tell me about the river."}],
               [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]]
    return pd.DataFrame({
        "unit_id": ["u0", "u1"], "prompt_id": ["p0", "p1"], "prompt": ["river", "hi"], "prompt_messages": prompts,
        "generation1_response": ["a good and happy river", "hello friend"],
        "generation2_response": ["a bad cold river", "go away"],
    })


@torch.no_grad()
def test_reward_model_scores_at_annotation_what_it_was_trained_on(shaped_reward_model):
    shape, folder = shaped_reward_model
    tokenizer = load_tokenizer(folder)
    units = _pairs()

    # Training's path: the reward-modelling batch and the Trainer's forward inputs.
    factory = BatchFactory(tokenizer, "reward_modelling", max_length=256, max_prompt_length=128)
    batch = factory.collate(factory.encode(units))
    token_ids, attention, _ = logprobs.concatenated_inputs(batch, factory.generations, tokenizer.pad_token_id)
    model = load_reward_model(folder, tokenizer=tokenizer).eval()
    trained_scores = model(input_ids=token_ids, attention_mask=attention).logits.squeeze(-1).tolist()

    annotator = RewardModelAnnotator(folder, ScoreRules(mode="rewards"))
    prompts = list(units["prompt_messages"]) * 2
    responses = list(units["generation1_response"]) + list(units["generation2_response"])
    assert annotator.score(prompts, responses) == pytest.approx(trained_scores, abs=1e-5)

    last_tokens = {ids[-1] for ids in annotator.sequences(prompts, responses)}
    expected_end = tokenizer.convert_tokens_to_ids(END_OF_TURN) if shape == "end_of_turn_not_eos" \
        else tokenizer.eos_token_id
    assert last_tokens == {expected_end}


def test_end_of_turn_is_what_the_template_writes_after_a_reply(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id  # the tiny template closes replies with EOS
    response = response_ids(tokenizer, "a good day")
    assert response[-1] == tokenizer.eos_token_id

    tokenizer.chat_template = END_OF_TURN_TEMPLATE
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end != tokenizer.eos_token_id and end_of_turn_id(tokenizer) == end
    assert response_ids(tokenizer, "a good day") == response[:-1] + [end]
    # Sampling stops where training ends a response.
    assert end in stop_token_ids(tokenizer, None)
    # The pair is the prompt (generation prompt included) followed by the response.
    messages = [{"role": "user", "content": "Hi"}]
    assert pair_ids(tokenizer, messages, "a good day") == render_prompt_ids(tokenizer, messages) + response[:-1] + [end]

    tokenizer.chat_template = None  # a base model: the plain prompt format, EOS ends a reply
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id
