"""Reference log-probs from the sampler (`training.reference_from_sampler`): the generation stage's raw log-probs
equal a reference forward over the same tokens, a round that uses them trains to the same weights as one that
runs the reference pass, and they are not used where the reference is another model or a response is cut."""

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from alignment_core import logprobs
from alignment_core.batches import units_from_online
from alignment_core.config import GenerationConfig, parse_config
from alignment_core.generation.transformers_backend import TransformersGenerator
from alignment_core.models import load_causal_lm, load_tokenizer, model_digest
from alignment_core.store import ArtifactStore
from alignment_core.tiny import build_tiny
from alignment_core.training import Trainer

# fp32 on a CPU: the sampler's log-probs (incremental decoding with a KV cache, left-padded prompts) against one
# full forward over the right-padded prompt + response. Measured: 7.6e-6 at most per summed sequence.
SEQUENCE_TOLERANCE = 1e-4
# The weights after 4 Adam steps at lr 1e-3: measured 2e-5 at most (embedding rows: Adam divides a tiny gradient
# by its own tiny scale, so 1e-6 apart in a log-prob moves a weight by a share of the learning rate).
WEIGHT_TOLERANCE = 1e-4
PROMPTS = ["Tell me about the dog", "Tell me about the sun and the moon", "A river", "Music in the garden",
           "The cat", "Trees and rivers and the cold dark moon", "Sun", "Tell me about music"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "llama2", num_layers=2))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "llama2-seed1", num_layers=2, seed=1))


@pytest.fixture(scope="module")
def online_units(policy_dir) -> pd.DataFrame:
    """Pairwise units of two samples per prompt from the policy (temperature 0.8, top-p 0.9: the raw log-probs
    are taken before both), the longer response preferred."""
    gen_cfg = GenerationConfig(n_samples=2, temperature=0.8, top_p=0.9, max_new_tokens=12, batch_size=3)
    generator = TransformersGenerator(load_causal_lm(policy_dir, dtype="float32"), load_tokenizer(policy_dir),
                                      gen_cfg, policy_uri=policy_dir, policy_digest=model_digest(policy_dir))
    prompts = [{"prompt_id": f"p{i}", "prompt": text, "prompt_messages": [{"role": "user", "content": text}]}
               for i, text in enumerate(PROMPTS)]
    generations = pd.DataFrame(generator.generate(prompts, seed=7))
    annotations = []
    for prompt_id, rows in generations.groupby("prompt_id"):
        first, second = rows.sort_values("sample_index").to_dict("records")
        longer = len(first["response_token_ids"]) >= len(second["response_token_ids"])
        annotations.append({
            "annotation_id": f"a-{prompt_id}", "prompt_id": prompt_id, "annotator": "length", "kind": "pairwise",
            "generation1_id": first["generation_id"], "generation2_id": second["generation_id"],
            "generation1_reward": 1.0 if longer else 0.0, "generation2_reward": 0.0 if longer else 1.0,
            "status": "ok", "raw": "{}",
        })
    return units_from_online(generations, pd.DataFrame(annotations), "online_pairwise")


def make_cfg(**training):
    return parse_config({"setup": "online_pairwise", "training": {
        "loss": "dpo", "batch_size": 4, "epochs": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0,
        "scheduler": "constant", **training}})


def test_sampler_logprobs_equal_a_reference_forward_over_the_same_tokens(tmp_path, policy_dir, online_units):
    trainer = Trainer(make_cfg(), policy_path=policy_dir, tokenizer_path=None, store=ArtifactStore(str(tmp_path)))
    encoded = trainer.batch_factory.encode(online_units)
    batch = trainer.batch_factory.collate(encoded)
    inputs = logprobs.concatenated_inputs(batch, ("generation1", "generation2"), trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        forward = logprobs.sequence_logps(load_causal_lm(policy_dir, dtype="float32").eval(), *inputs)[0]
    sampler = torch.tensor([example[f"{side}_sampler"][0] for side in ("generation1", "generation2")
                            for example in encoded], dtype=torch.float64)
    assert len(sampler) == 2 * len(PROMPTS)
    assert (sampler < 0).all()
    assert torch.allclose(sampler, forward.double(), atol=SEQUENCE_TOLERANCE, rtol=0)


def run(tmp_path, policy_dir, units, reference_dir=None, **training):
    store = ArtifactStore(str(tmp_path / "store"))
    trainer = Trainer(make_cfg(**training), policy_path=policy_dir, tokenizer_path=None, store=store,
                      reference_path=reference_dir)
    encoded = trainer.batch_factory.encode(units)
    result = trainer.train(encoded, store.checkpoint_uri("round", 1), store.stage_uri("round", 1, "metrics"))
    manifest = store.read_manifest(store.stage_uri("round", 1, "metrics"))["extra"]
    weights = load_file(f"{store.local_checkpoint(result.checkpoint_uri)}/model.safetensors")
    losses = store.read_pandas(store.stage_uri("round", 1, "metrics")).query("metric == 'loss'")
    return manifest, weights, losses.sort_values("step")["value"].tolist()


def test_a_round_on_sampler_logprobs_trains_as_one_with_the_reference_pass(tmp_path, policy_dir, online_units):
    with_sampler = run(tmp_path / "sampler", policy_dir, online_units)
    with_forward = run(tmp_path / "forward", policy_dir, online_units, reference_from_sampler=False)
    assert with_sampler[0]["reference_rows_from_sampler"] == len(PROMPTS)
    assert with_sampler[0]["reference_rows_forward"] == 0
    assert with_sampler[0]["reference_model_loaded"] is False  # nothing left for it to compute: never loaded
    assert with_forward[0]["reference_model_loaded"] is True
    assert with_forward[0]["reference_rows_from_sampler"] == 0
    assert with_forward[0]["reference_rows_forward"] == len(PROMPTS)
    assert with_sampler[2] == pytest.approx(with_forward[2], abs=1e-5)
    assert with_sampler[2][-1] < with_sampler[2][0]  # it trained
    for name, tensor in with_forward[1].items():
        assert torch.allclose(with_sampler[1][name], tensor, atol=WEIGHT_TOLERANCE, rtol=0), name


def test_the_sampler_is_not_the_reference_when_the_reference_is_another_model(tmp_path, policy_dir, other_dir,
                                                                               online_units):
    """Iteration 2 against a fixed pi_0, or any configured reference that did not sample: the forward runs."""
    manifest, _, losses = run(tmp_path, policy_dir, online_units, reference_dir=other_dir)
    assert manifest["reference_rows_from_sampler"] == 0
    assert manifest["reference_rows_forward"] == len(PROMPTS)
    assert manifest["reference_model_loaded"] is True
    # The losses are those of the other reference: not log 2 at the first step, as with the policy's own.
    assert abs(losses[0] - 0.6931) > 1e-3


def test_a_truncated_response_takes_the_reference_pass(tmp_path, policy_dir, online_units):
    def encode(cfg):
        store = ArtifactStore(str(tmp_path / "encode"))
        return Trainer(cfg, policy_path=policy_dir, tokenizer_path=None, store=store).batch_factory.encode(online_units)

    def tokens(example):
        return example["prompt_ids"], example["generation1_response_ids"], example["generation2_response_ids"]

    encoded = encode(make_cfg(max_length=24, max_prompt_length=16))
    untruncated = encode(make_cfg())
    cut = [short for short, full in zip(encoded, untruncated, strict=True) if tokens(short) != tokens(full)]
    kept = [short for short, full in zip(encoded, untruncated, strict=True) if tokens(short) == tokens(full)]
    assert cut and kept, "the fixture should give both truncated and whole pairs"
    assert all(e["generation1_sampler"] is None and e["generation2_sampler"] is None for e in cut)
    assert all(e["generation1_sampler"] is not None and e["generation2_sampler"] is not None for e in kept)
    manifest, _, _ = run(tmp_path, policy_dir, online_units, max_length=24, max_prompt_length=16)
    assert manifest["reference_rows_from_sampler"] == len(kept)
    assert manifest["reference_rows_forward"] == len(cut)
    assert manifest["reference_model_loaded"] is True  # the cut pairs need its forward
