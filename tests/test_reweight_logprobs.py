"""reweight.sequence_logprobs, built on batches' encode / collate and logprobs.sequence_logps, gives the numbers of
the routine it replaced: an independent teacher-forced forward here (its own tokenisation, padding and
log-softmax), for prompts and responses of different lengths, any batch size, with and without a chat template."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment_core.reweight import sequence_logprobs

MESSAGES = [
    [{"role": "user", "content": "Say something nice."}],
    [{"role": "user", "content": "Hi?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, then explain why."}],
    [{"role": "user", "content": "Hi?"}],
    [{"role": "user", "content": "Say something nice."}],
]
RESPONSES = ["a good day", "hello there, my friend", "x", "a great and happy day to you all", ""]


def reference_logprobs(model, tokenizer, messages_list, responses) -> list[float]:
    """The replaced routine's computation, written independently: right-padded batch, log-softmax over the
    full logits, summed over the response tokens and the EOS."""
    sequences, starts = [], []
    for messages, response in zip(messages_list, responses, strict=True):
        if tokenizer.chat_template is not None:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt = tokenizer(text, add_special_tokens=False).input_ids
        else:
            names = {"system": "System", "user": "Human", "assistant": "Assistant"}
            text = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"
            prompt = tokenizer(text).input_ids
        answer = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        sequences.append(prompt + answer)
        starts.append(len(prompt))
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), tokenizer.eos_token_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        ids[i, : len(sequence)], mask[i, : len(sequence)] = torch.tensor(sequence), 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return [float(token_logps[i, start - 1 : len(s) - 1].sum()) for i, (s, start) in
            enumerate(zip(sequences, starts, strict=True))]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_log_probs_equal_the_replaced_routine(model_and_tokenizer, batch_size):
    model, tokenizer = model_and_tokenizer
    expected = reference_logprobs(model, tokenizer, MESSAGES, RESPONSES)
    assert len(set(expected)) == len(expected)  # distinct values: a row mixed up would show
    assert sequence_logprobs(model, tokenizer, MESSAGES, RESPONSES, batch_size) == pytest.approx(expected, abs=1e-4)


def test_without_a_chat_template_the_plain_prompt_format(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    expected = reference_logprobs(model, plain, MESSAGES, RESPONSES)
    assert expected != pytest.approx(reference_logprobs(model, tokenizer, MESSAGES, RESPONSES), abs=1e-3)
    assert sequence_logprobs(model, plain, MESSAGES, RESPONSES, batch_size=3) == pytest.approx(expected, abs=1e-4)


def test_long_texts_are_not_truncated_and_bad_input_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long = " ".join(["word"] * 600)  # beyond training's default max_length: the whole text still counts
    expected = reference_logprobs(model, tokenizer, MESSAGES[:2], [long, "short"])
    assert sequence_logprobs(model, tokenizer, MESSAGES[:2], [long, "short"]) == pytest.approx(expected, abs=1e-3)
    assert sequence_logprobs(model, tokenizer, [], []) == []
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        sequence_logprobs(model, tokenizer, MESSAGES[:2], ["x"])
