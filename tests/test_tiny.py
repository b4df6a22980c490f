"""The tiny model and the model loaders: built locally, loaded like any hub model."""

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment_core.models import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    model_digest,
    resolve_model_path,
)
from alignment_core.tiny import POSITIVE_WORDS, build_tiny


def test_tiny_loads_through_from_pretrained_and_generates(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, trust_remote_code=False)
    assert len(tokenizer) == model.config.vocab_size and 1000 <= len(tokenizer) <= 1024
    assert model.config.head_dim == 64 and model.config.num_hidden_layers == 4
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3

    messages = [{"role": "user", "content": "How can I help my friend?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=True)
    assert 1 <= output.shape[1] - inputs.input_ids.shape[1] <= 8
    assert output[0, : inputs.input_ids.shape[1]].tolist() == inputs.input_ids[0].tolist()


def test_chat_template_turns_and_generation_prompt(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|system|>\nBe kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|eos|>\n"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nHi<|end|>\n<|assistant|>\n")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 1
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_positive_words_are_single_tokens_and_text_round_trips(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for word in POSITIVE_WORDS:
        assert len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1, word
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    text = "Une journée très happy: 中文 & emoji 🙂, numbers 12345."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_build_is_deterministic_and_idempotent(tmp_path, tiny_model_dir):
    again = build_tiny(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert build_tiny(again) == again  # the same build into the same folder is reused
    with pytest.raises(FileExistsError, match="not a tiny build"):
        build_tiny(again, num_layers=2)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError):
        build_tiny(tmp_path / "other")


def test_concurrent_builds_leave_one_complete_folder(tmp_path):
    target = tmp_path / "shared"
    results, errors = [], []

    def build():
        try:
            results.append(build_tiny(target, num_layers=1))
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [target, target]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no temporary folder left behind
    assert json.loads((target / "tiny_build.json").read_text())["num_layers"] == 1
    AutoModelForCausalLM.from_pretrained(target)


def test_reward_model_kind(tiny_reward_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["a good day", "a bad day that was long"], padding=True, return_tensors="pt")
    scores = model(**batch).logits
    assert scores.shape == (2, 1)
    # The score is read at the last real token, so padding does not change it.
    alone = model(**tokenizer(["a good day"], return_tensors="pt")).logits
    torch.testing.assert_close(scores[0], alone[0])


def test_resolve_tiny_uri_builds_once_into_cache(tmp_path):
    path = resolve_model_path("tiny://llama", cache_dir=str(tmp_path))
    assert path == str(tmp_path / "tiny-llama")
    mtime = (tmp_path / "tiny-llama" / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("tiny://llama", cache_dir=str(tmp_path)) == path
    assert (tmp_path / "tiny-llama" / "model.safetensors").stat().st_mtime_ns == mtime


def test_resolve_model_path_kinds(tmp_path, tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    for hub_id in ("org/some-model", "gpt2", "org/some-model@v1"):  # not in the (test) hub cache
        with pytest.raises(FileNotFoundError, match="hf download"):
            resolve_model_path(hub_id)
    for missing in (str(tmp_path / "nope"), "./nope", "~/nope-alignment-core", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_model_path(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))


def test_resolve_store_uri_uses_local_checkpoint(tmp_path, tiny_model_dir):
    from alignment_core.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    uri = store.checkpoint_uri("run", 0)
    store.save_checkpoint(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), uri)
    local = resolve_model_path(uri, store=store)
    assert model_digest(local) == model_digest(tiny_model_dir)
    file_uri = "file://" + uri
    assert model_digest(resolve_model_path(file_uri)) == model_digest(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_model_path("file://" + store.checkpoint_uri("run", 1))


def test_loaders(tiny_model_dir, tiny_reward_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(str(tiny_model_dir), dtype="float8")
    reward_model = load_reward_model(str(tiny_reward_model_dir), tokenizer=tokenizer)
    assert reward_model.config.pad_token_id == tokenizer.pad_token_id


def test_load_tokenizer_sets_missing_pad_to_eos(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no-pad")
    loaded = load_tokenizer(str(tmp_path / "no-pad"))
    assert loaded.pad_token == loaded.eos_token == "<|eos|>"


def test_model_digest_tracks_the_weights(tmp_path, tiny_model_dir):
    digest = model_digest(tiny_model_dir)
    assert len(digest) == 16 and digest == model_digest(tiny_model_dir)
    other = build_tiny(tmp_path / "seed1", seed=1, num_layers=4)
    assert model_digest(other) != digest
    with pytest.raises(FileNotFoundError, match="safetensors"):
        model_digest(tmp_path)


