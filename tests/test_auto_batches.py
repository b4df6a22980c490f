"""Batches sized for the stage: generation.batch_size and annotation.batch_size unset (the shipped default)."""

import pytest

from alignment_core.annotation.base import ScoreRules
from alignment_core.annotation.scorers import AUTO_SCORE_TOKENS, RewardModelAnnotator
from alignment_core.config import GenerationConfig
from alignment_core.generation import make_generator
from alignment_core.generation.transformers_backend import AUTO_LOGITS_BYTES, auto_prompts_per_call
from tests.test_generation import POLICY_URI, make_prompts


def test_auto_prompts_per_call_by_device_and_logits_memory():
    small_vocab = GenerationConfig(n_samples=2, max_new_tokens=24)
    assert auto_prompts_per_call(small_vocab, 1024, "cpu") == 64  # 128 sequences on a CPU
    assert auto_prompts_per_call(small_vocab, 1024, "cuda") == 256  # 512 on a GPU
    # A 128k vocabulary: 4 samples x 128 tokens x 128256 x 4 bytes per prompt, within 1 GiB of logits.
    big_vocab = GenerationConfig(n_samples=4, max_new_tokens=128)
    assert auto_prompts_per_call(big_vocab, 128256, "cuda") == AUTO_LOGITS_BYTES // (4 * 128 * 128256 * 4) == 4
    assert auto_prompts_per_call(GenerationConfig(n_samples=8, max_new_tokens=4096, max_model_len=8192), 128256,
                                 "cpu") == 1


def counted_generate(generator) -> list[int]:
    """The rows of every model.generate call the generator makes (a counter around the real method)."""
    calls, generate = [], generator.model.generate

    def counting(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    generator.model.generate = counting
    return calls


def greedy(model_dir: str, batch_size: int | None):
    gen_cfg = GenerationConfig(backend="transformers", max_new_tokens=8, temperature=0.0, n_samples=2,
                               batch_size=batch_size)
    return make_generator(gen_cfg, model_dir, POLICY_URI)


def test_auto_takes_the_shard_in_one_call_explicit_batch_size_is_honoured_same_greedy_samples(
        stopping_model_dir):  # noqa: F811
    prompts = make_prompts(7)
    auto, explicit = greedy(stopping_model_dir, None), greedy(stopping_model_dir, 3)
    assert (auto.prompts_per_call, explicit.prompts_per_call) == (64, 3)
    auto_calls, explicit_calls = counted_generate(auto), counted_generate(explicit)
    auto_rows, explicit_rows = auto.generate(prompts, seed=5), explicit.generate(prompts, seed=5)
    assert auto_calls == [14] and explicit_calls == [6, 6, 2]  # rows: prompts x 2 samples
    assert [r["response_token_ids"] for r in auto_rows] == [r["response_token_ids"] for r in explicit_rows]
    for a, b in zip(auto_rows, explicit_rows, strict=True):
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)


@pytest.fixture(scope="module")
def samples():
    prompts = make_prompts(9)
    # Responses of very different lengths, so that sorting by length changes the batches.
    responses = [" ".join(["word"] * (1 + 7 * (i % 4))) for i in range(len(prompts))]
    return [p["prompt_messages"] for p in prompts], responses


def test_reward_model_auto_batches_by_length_within_a_token_budget(tiny_reward_model_dir, samples):
    annotator = RewardModelAnnotator(str(tiny_reward_model_dir), ScoreRules(), device="cpu")
    sequences = annotator.sequences(*samples)
    batches = annotator.batches(sequences)
    assert sorted(i for batch in batches for i in batch) == list(range(len(sequences)))
    lengths = [[len(sequences[i]) for i in batch] for batch in batches]
    assert [n for batch in lengths for n in batch] == sorted(len(s) for s in sequences)
    assert all(len(batch) * max(batch) <= AUTO_SCORE_TOKENS["cpu"] for batch in lengths)
    assert len(batches) == 1  # 9 short samples fit one budget
    # A budget the samples do not fit in one batch: the next sample would overflow each batch.
    long_ones = [s * 40 for s in sequences]
    split = annotator.batches(long_ones)
    assert len(split) > 1
    assert all(len(batch) * max(len(long_ones[i]) for i in batch) <= AUTO_SCORE_TOKENS["cpu"] for batch in split)
    for batch, following in zip(split, split[1:], strict=False):
        assert (len(batch) + 1) * len(long_ones[following[0]]) > AUTO_SCORE_TOKENS["cpu"]


def test_reward_model_explicit_batch_size_is_honoured_and_scores_match_auto(tiny_reward_model_dir, samples):
    auto = RewardModelAnnotator(str(tiny_reward_model_dir), ScoreRules(), device="cpu")
    explicit = RewardModelAnnotator(str(tiny_reward_model_dir), ScoreRules(), batch_size=2, device="cpu")
    assert explicit.batches(explicit.sequences(*samples)) == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert auto.score(*samples) == pytest.approx(explicit.score(*samples), abs=1e-5)
