"""The transformers generation backend and the resumable generate stage, on the tiny model."""

import json

import pytest
import torch

from alignment_core import records
from alignment_core.config import GenerationConfig
from alignment_core.generation import choose_backend, make_generator, run_generation, shard_seed
from alignment_core.generation.transformers_backend import TransformersGenerator
from alignment_core.models import load_causal_lm, load_tokenizer, model_digest
from alignment_core.rendering import render_prompt_ids
from alignment_core.store import ArtifactStore
from alignment_core.tiny import QUESTIONS

POLICY_URI = "tiny://test-policy"


def make_prompts(count: int) -> list[dict]:
    questions = [QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS)) for i in range(count)]
    return [
        {"prompt_id": f"p{i:03d}", "prompt": q, "prompt_messages": [{"role": "user", "content": q}]}
        for i, q in enumerate(questions)
    ]


@pytest.fixture(scope="session")
def tiny_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir)


def build_stopping_model(model_dir: str, out_dir) -> str:
    """A copy of the tiny model with its EOS row aimed at the typical final hidden state: EOS gets logit ~4.

    A randomly initialised model almost never samples EOS (p ~ 1/1024), so nothing would end with "stop";
    with this change about half of the 16-token samples stop early, and both finish reasons get tested.
    """
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    ids = render_prompt_ids(tokenizer, make_prompts(1)[0]["prompt_messages"])
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.lm_head.weight[tokenizer.eos_token_id] = 4.0 * hidden / hidden.dot(hidden)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def make_generator_for(model_dir: str, **cfg) -> TransformersGenerator:
    gen_cfg = GenerationConfig(**{"backend": "transformers", "max_new_tokens": 16, "batch_size": 3, **cfg})
    return make_generator(gen_cfg, model_dir, POLICY_URI)


def teacher_forced_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log p(response token | prefix) from one forward pass over prompt + response, no padding."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0].float()
    logprobs = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1)


def assert_rows_consistent(rows: list[dict], prompts: list[dict], tokenizer, gen_cfg: GenerationConfig,
                           backend: str, digest: str) -> None:
    """What every generation row must satisfy, whatever the backend (also used by the vLLM test)."""
    table = records.from_rows(rows, records.GENERATIONS)
    assert table.num_rows == len(prompts) * gen_cfg.n_samples
    by_id = {p["prompt_id"]: p for p in prompts}
    assert len({row["generation_id"] for row in rows}) == len(rows)
    for prompt_id in by_id:
        indices = sorted(row["sample_index"] for row in rows if row["prompt_id"] == prompt_id)
        assert indices == list(range(gen_cfg.n_samples)), prompt_id
    for row in rows:
        ids = row["response_token_ids"]
        assert 0 < len(ids) <= gen_cfg.max_new_tokens
        assert tokenizer.decode(ids, skip_special_tokens=True) == row["response"]
        assert len(row["token_logprobs"]) == len(ids)
        assert all(lp <= 0 for lp in row["token_logprobs"])
        assert row["sum_logprob"] == pytest.approx(sum(row["token_logprobs"]), abs=1e-9)
        eos_positions = [i for i, token in enumerate(ids) if token == tokenizer.eos_token_id]
        if row["finish_reason"] == "stop":
            assert eos_positions == [len(ids) - 1]
        else:
            assert row["finish_reason"] == "length"
            assert not eos_positions and len(ids) == gen_cfg.max_new_tokens
        assert row["prompt"] == by_id[row["prompt_id"]]["prompt"]
        assert row["prompt_messages"] == by_id[row["prompt_id"]]["prompt_messages"]
        assert (row["policy_uri"], row["policy_digest"], row["backend"]) == (POLICY_URI, digest, backend)
        assert json.loads(row["sampling_params"]) == {
            "n": gen_cfg.n_samples, "temperature": gen_cfg.temperature, "top_p": gen_cfg.top_p,
            "max_new_tokens": gen_cfg.max_new_tokens,
        }


def test_rows_conform_and_are_consistent(stopping_model_dir):
    prompts = make_prompts(5)
    generator = make_generator_for(stopping_model_dir, n_samples=3)
    rows = generator.generate(prompts, seed=7)
    assert_rows_consistent(rows, prompts, generator.tokenizer, generator.gen_cfg, "transformers",
                           model_digest(stopping_model_dir))
    assert {row["seed"] for row in rows} == {7}
    finish_reasons = [row["finish_reason"] for row in rows]
    assert "stop" in finish_reasons and "length" in finish_reasons
    # Different samples of one prompt really are different draws.
    assert len({tuple(row["response_token_ids"]) for row in rows if row["prompt_id"] == "p000"}) > 1


def test_same_seed_same_samples_and_caller_rng_untouched(stopping_model_dir):
    prompts = make_prompts(4)
    generator = make_generator_for(stopping_model_dir)
    torch.manual_seed(123)
    expected_next_draw = torch.rand(1)
    torch.manual_seed(123)
    first = generator.generate(prompts, seed=11)
    assert torch.equal(torch.rand(1), expected_next_draw)
    second = generator.generate(prompts, seed=11)
    other_seed = generator.generate(prompts, seed=12)
    assert first == second
    assert [r["response_token_ids"] for r in first] != [r["response_token_ids"] for r in other_seed]


def test_greedy_equals_plain_generate(tiny_dir):
    prompts = make_prompts(5)  # different prompt lengths: the batch is left padded
    generator = make_generator_for(tiny_dir, temperature=0.0, n_samples=2, batch_size=5)
    rows = generator.generate(prompts, seed=0)
    model = load_causal_lm(tiny_dir)
    for prompt in prompts:
        ids = render_prompt_ids(generator.tokenizer, prompt["prompt_messages"])
        plain = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                               pad_token_id=generator.tokenizer.pad_token_id)[0, len(ids):].tolist()
        samples = [row["response_token_ids"] for row in rows if row["prompt_id"] == prompt["prompt_id"]]
        assert samples == [plain, plain]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 0.8)])
def test_logprobs_are_the_models_raw_logprobs(stopping_model_dir, temperature, top_p):
    """At any temperature and top-p the recorded log-probs are the model's own (teacher-forced) ones."""
    prompts = make_prompts(4)
    generator = make_generator_for(stopping_model_dir, temperature=temperature, top_p=top_p)
    rows = generator.generate(prompts, seed=3)
    model = load_causal_lm(stopping_model_dir)
    by_id = {p["prompt_id"]: p for p in prompts}
    for row in rows:
        prompt_ids = render_prompt_ids(generator.tokenizer, by_id[row["prompt_id"]]["prompt_messages"])
        expected = teacher_forced_logprobs(model, prompt_ids, row["response_token_ids"])
        torch.testing.assert_close(torch.tensor(row["token_logprobs"]), expected, atol=1e-4, rtol=0)


def test_prompt_too_long_for_max_model_len_is_skipped(tiny_dir):
    prompts = make_prompts(2)
    prompts[1]["prompt_messages"] = [{"role": "user", "content": "the dog ran home " * 40}]
    generator = make_generator_for(tiny_dir, max_model_len=64)
    rows = generator.generate(prompts, seed=0)
    assert {row["prompt_id"] for row in rows} == {"p000"}


def test_shard_seed_is_stable_and_distinct():
    assert shard_seed("run", 1, 0, 0) == shard_seed("run", 1, 0, 0)
    seeds = {shard_seed(run, it, shard, base) for run in ("a", "b") for it in (0, 1) for shard in (0, 1)
             for base in (0, 1)}
    assert len(seeds) == 16 and all(0 <= s < 2**31 for s in seeds)
    assert shard_seed("run", 1, 0, 0) == 325087837  # pinned: a change would silently change every sample


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks vLLM where a GPU is present")
def test_auto_backend_without_gpu_is_transformers(tiny_dir):
    assert choose_backend("auto") == "transformers"
    generator = make_generator(GenerationConfig(backend="auto"), tiny_dir, POLICY_URI)
    assert isinstance(generator, TransformersGenerator)
    assert generator.lineage.policy_digest == model_digest(tiny_dir)


# ---- the stage ---------------------------------------------------------------------------------------
STAGE_CFG = GenerationConfig(
    backend="transformers", n_samples=2, max_new_tokens=12, shard_size=3, batch_size=2
)


def write_prompts(store: ArtifactStore, prompts: list[dict]) -> str:
    uri = store.stage_uri("run", 1, "prompts")
    table = records.from_rows(prompts, records.PROMPTS)
    store.write_stage(uri, "prompts", {"prompts": len(prompts)}, [table])
    return uri


def generate_stage(store, model_dir, progress_callback=None) -> dict:
    prompts_uri = store.stage_uri("run", 1, "prompts")
    return run_generation(
        store, prompts_uri, store.stage_uri("run", 1, "generations"), STAGE_CFG, policy_path=model_dir,
        policy_uri=POLICY_URI, run_name="run", iteration=1, fingerprint={"test": 1},
        progress_callback=progress_callback,
    )


class Killed(Exception):
    pass


def test_stage_resumes_after_a_kill_with_the_same_samples(stopping_model_dir, tmp_path, monkeypatch):
    prompts = make_prompts(8)  # shards of 3, 3, 2 prompts
    uninterrupted = ArtifactStore(str(tmp_path / "uninterrupted"))
    write_prompts(uninterrupted, prompts)
    progress = []
    manifest = generate_stage(uninterrupted, stopping_model_dir,
                              lambda *done_total: progress.append(done_total))
    assert progress == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert manifest["rows"] == 16 and [s["rows"] for s in manifest["shards"]] == [6, 6, 4]
    assert manifest["extra"]["backend"] == "transformers" and manifest["extra"]["generated_tokens"] > 0
    expected = uninterrupted.read_pandas(store_uri := uninterrupted.stage_uri("run", 1, "generations"))
    assert expected["seed"].nunique() == 3  # one seed per shard
    assert set(expected["seed"]) == {shard_seed("run", 1, i, STAGE_CFG.seed) for i in range(3)}

    # Kill the stage after its second shard, then run it again.
    resumed = ArtifactStore(str(tmp_path / "resumed"))
    write_prompts(resumed, prompts)

    def kill_after_two_shards(done, total):
        if done == 2:
            raise Killed

    with pytest.raises(Killed):
        generate_stage(resumed, stopping_model_dir, kill_after_two_shards)
    assert resumed.read_manifest(resumed.stage_uri("run", 1, "generations")) is None
    manifest = generate_stage(resumed, stopping_model_dir)
    assert (manifest["extra"]["resumed_shards"], manifest["extra"]["generated_shards"]) == (2, 1)
    table = resumed.read_pandas(resumed.stage_uri("run", 1, "generations"))
    assert table["generation_id"].is_unique
    assert table["generation_id"].tolist() == expected["generation_id"].tolist()
    assert table["response_token_ids"].map(list).tolist() == expected["response_token_ids"].map(list).tolist()

    # Every shard in (whether the stage is run at all is `runner.run_stage`'s call: tests/test_stages.py): no
    # model is loaded, and the manifest keeps its fingerprint.
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a complete stage")

    monkeypatch.setattr("alignment_core.generation.stage.make_generator", no_model)
    assert generate_stage(uninterrupted, stopping_model_dir)["fingerprint_digest"] == (
        uninterrupted.read_manifest(store_uri)["fingerprint_digest"]
    )


def test_stage_rejects_repeated_prompt_ids(tiny_dir, tmp_path):
    store = ArtifactStore(str(tmp_path))
    prompts = make_prompts(2)
    prompts[1]["prompt_id"] = prompts[0]["prompt_id"]
    write_prompts(store, prompts)
    with pytest.raises(ValueError, match="repeats prompt_id 'p000'"):
        generate_stage(store, tiny_dir)


def test_stage_fails_when_every_prompt_is_too_long(tiny_dir, tmp_path):
    store = ArtifactStore(str(tmp_path))
    write_prompts(store, [{**p, "prompt_messages": [{"role": "user", "content": "word " * 600}]}
                          for p in make_prompts(2)])
    with pytest.raises(ValueError, match="every prompt was skipped"):
        generate_stage(store, tiny_dir)


def test_the_policys_attention_kernel_reaches_the_sampler(tiny_dir, tmp_path, monkeypatch):
    """model.attn_implementation is the transformers backend's kernel too, not only training's."""
    from alignment_core import pipeline
    from alignment_core.config import parse_config
    from alignment_core.generation import stage

    assert make_generator(STAGE_CFG, tiny_dir, POLICY_URI, attn_implementation="eager").model.config \
        ._attn_implementation == "eager"
    # flex attention trains fast packed rows but samples slowly: the sampler uses sdpa then
    assert make_generator(STAGE_CFG, tiny_dir, POLICY_URI, attn_implementation="flex_attention").model.config \
        ._attn_implementation == "sdpa"
    kernels = []

    def spy(*args, **kwargs):
        generator = make_generator(*args, **kwargs)
        kernels.append(generator.model.config._attn_implementation)
        return generator

    monkeypatch.setattr(stage, "make_generator", spy)
    cfg = parse_config({"model": {"policy": tiny_dir, "attn_implementation": "eager"},
                        "generation": {"backend": "transformers", "prompts_per_iteration": 2, "max_new_tokens": 4},
                        "store": {"root": str(tmp_path), "run_name": "kernel"}})
    pipeline.generate(cfg, pipeline.load_prompts(cfg, 1), cfg.model.policy, 1)
    assert kernels == ["eager"]
