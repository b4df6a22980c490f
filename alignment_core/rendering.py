"""One rendering rule for a (prompt, response) pair, used by training, annotation, evaluation and generation.

    prompt_ids = render_prompt_ids(tokenizer, prompt_messages)    # what generation feeds the model
    ids = prompt_ids + response_ids(tokenizer, response)          # what training learns and a reward model scores

A prompt goes through the tokenizer's chat template with the generation prompt (the model's turn starts). A
response ends with the template's **end-of-turn** token (`end_of_turn_id`): the token a chat model writes when
its turn is over and stops at when it samples (`<|im_end|>`, `<end_of_turn>`, `<|end|>`, `<|eot_id|>`), which is
the tokenizer's EOS only in some families. Offline responses ending with EOS where the template ends turns
otherwise would teach an ending that sampling and chat use never produce; and a reward model scored on
prompt + response without the end-of-turn reads its score from another token than the one it was trained on
(its head reads the last token that is not padding).
"""

import weakref

# Role names of the plain-text prompt format used when a tokenizer has no chat template (Anthropic HH style).
PLAIN_ROLE_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}

# A response text no template alters, to find what a template writes after an assistant turn's content.
_RESPONSE_MARKER = "RESPONSEMARKERXQZ"


def chat_turns(prompt_messages) -> list[dict[str, str]]:
    """Chat turns as plain dicts (Arrow gives a numpy array of dicts)."""
    return [{"role": turn["role"], "content": turn["content"]} for turn in prompt_messages]


def render_prompt_text(tokenizer, prompt_messages) -> str:
    """The prompt as the model sees it, ending where the assistant's response starts.

    With a chat template: the template with `add_generation_prompt=True`. Without one: the turns as
    "\\n\\nHuman: ...\\n\\nAssistant: ..." followed by "\\n\\nAssistant:".
    """
    messages = chat_turns(prompt_messages)
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for turn in messages:
        if turn["role"] not in PLAIN_ROLE_NAMES:
            raise ValueError(f"unknown chat role {turn['role']!r}; expected one of {list(PLAIN_ROLE_NAMES)}")
    turns = "".join(f"\n\n{PLAIN_ROLE_NAMES[turn['role']]}: {turn['content']}" for turn in messages)
    return turns + "\n\nAssistant:"


def prompt_text_to_ids(tokenizer, text: str) -> list[int]:
    # A chat template writes its own special tokens (BOS included); a plain prompt gets the tokenizer's own.
    return tokenizer(text, add_special_tokens=tokenizer.chat_template is None).input_ids


def render_prompt_ids(tokenizer, prompt_messages) -> list[int]:
    """Token ids of `render_prompt_text`: what generation feeds the model and what training conditions on."""
    return prompt_text_to_ids(tokenizer, render_prompt_text(tokenizer, prompt_messages))


# Per tokenizer (weakly: a worker loads many), with what the answer depends on.
_END_OF_TURN = weakref.WeakKeyDictionary()


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: the first special (added) token the chat template writes after an
    assistant message's content; the tokenizer's EOS where there is no template or the template writes none."""
    key = (tokenizer.chat_template, tokenizer.eos_token_id)
    cached = _END_OF_TURN.get(tokenizer)
    if cached is None or cached[0] != key:
        cached = _END_OF_TURN[tokenizer] = (key, _find_end_of_turn_id(tokenizer, *key))
    return cached[1]


def _find_end_of_turn_id(tokenizer, chat_template: str | None, eos_token_id: int | None) -> int:
    if eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token (models.load_tokenizer sets one where it can)")
    if chat_template is None:
        return eos_token_id
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _RESPONSE_MARKER}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # a template that cannot render a finished assistant turn (generation-only templates)
        return eos_token_id
    if _RESPONSE_MARKER not in text:
        return eos_token_id
    after = text.split(_RESPONSE_MARKER, 1)[1]
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    for token in tokenizer(after, add_special_tokens=False).input_ids:
        if token in special:
            return token
    return eos_token_id


def response_ids(tokenizer, response: str) -> list[int]:
    """A response's token ids with the end-of-turn token appended: the model learns to stop where it stopped."""
    return tokenizer(response, add_special_tokens=False).input_ids + [end_of_turn_id(tokenizer)]


def pair_ids(tokenizer, prompt_messages, response: str) -> list[int]:
    """prompt + response as one sequence: what a reward model is trained on and scores."""
    return render_prompt_ids(tokenizer, prompt_messages) + response_ids(tokenizer, response)
