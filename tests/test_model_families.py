"""Model families checked, not assumed: tiny random models of several transformers families (configs from
transformers at tiny sizes, the project's tokenizer), each a normal save_pretrained folder used as model.policy.

- Packing (training.padding_free): a family whose decoder keeps packed sequences apart (Llama, Qwen2) packs; OPT,
  whose decoder builds its causal mask without the restarting position ids, is caught and trains on padded rows.
- LoRA target_modules are resolved against the model's own module names at preflight: a list that matches
  nothing is a problem naming the model's linear layers; a list written for another family warns, naming what
  it leaves out (Phi-3's fused qkv_proj and gate_up_proj under a Llama-style list).
- The matrix (slow, ~60-110 s on 2 busy cores): GPT-2, Qwen2, Mistral, Gemma2, Phi-3, OPT and GPT-NeoX each run
  one online round (sample, annotate, train packed) and one offline round with a LoRA adapter.
"""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import transformers

from alignment_core import pipeline
from alignment_core.adapters import target_module_problems
from alignment_core.config import parse_config
from alignment_core.preflight import preflight_problems
from alignment_core.store import MANIFEST, ArtifactStore
from alignment_core.tiny import build_tokenizer
from alignment_core.training import Trainer
from tests.test_pipeline import offline_round, online_iteration, small
from tests.test_training import make_cfg, make_units

HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 64, 2, 4, 128, 512
# Per family: its config class and the keyword names it uses for the sizes.
FAMILIES = {
    "llama": ("LlamaConfig", {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                              "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS}),
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": POSITIONS}),
    "qwen2": ("Qwen2Config", {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                              "num_attention_heads": HEADS, "num_key_value_heads": 2,
                              "max_position_embeddings": POSITIONS}),
    "phi3": ("Phi3Config", {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                            "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS,
                            "original_max_position_embeddings": POSITIONS}),
    "mistral": ("MistralConfig", {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                                  "num_attention_heads": HEADS, "num_key_value_heads": 2,
                                  "max_position_embeddings": POSITIONS}),
    "gemma2": ("Gemma2Config", {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                                "num_attention_heads": HEADS, "num_key_value_heads": 2, "head_dim": HIDDEN // HEADS,
                                "max_position_embeddings": POSITIONS}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                                   "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS}),
    "opt": ("OPTConfig", {"hidden_size": HIDDEN, "ffn_dim": FFN, "num_hidden_layers": LAYERS,
                          "num_attention_heads": HEADS, "max_position_embeddings": POSITIONS,
                          "word_embed_proj_dim": HIDDEN}),
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tokenizer):
    """A folder per family, built on first use: random weights (seed 0), the project's tokenizer."""
    built = {}

    def build(family: str) -> str:
        if family not in built:
            config_class, sizes = FAMILIES[family]
            assert hasattr(transformers, config_class), f"transformers {transformers.__version__} has no {config_class}"
            config = getattr(transformers, config_class)(
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **sizes)
            transformers.set_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
            out = tmp_path_factory.mktemp(family)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            built[family] = str(out)
        return built[family]

    return build


# ---- packing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, packs", [("llama", True), ("qwen2", True), ("opt", False)])
def test_padding_free_packs_the_families_that_keep_sequences_apart_and_catches_opt(
        family, packs, family_dir, tmp_path, caplog):
    """Every sequence of the first micro-batch is packed into one row for the check: OPT's mixing (2.9e-2
    nats/token there) is caught. Its micro-batch of similar lengths gets a row per sequence in the layout that
    trains, so a check of that layout alone passes OPT (the mutation this test was checked against)."""
    store = ArtifactStore(str(tmp_path / "store"))
    trainer = Trainer(make_cfg("offline_pairwise", "dpo", padding_free=True, epochs=1), policy_path=family_dir(family),
                      tokenizer_path=None, store=store)
    with caplog.at_level(logging.WARNING, logger="alignment_core.training"):
        trainer.setup(trainer.batch_factory.encode(make_units(4)), store.checkpoint_uri("round", 0))
    assert trainer.packed is packs
    assert ("OPTForCausalLM's log-probs" in caplog.text and "using padded rows" in caplog.text) is not packs


# ---- LoRA targets at preflight -------------------------------------------------------------------------------


def adapter_cfg(policy: str, targets, tmp_path):
    return parse_config({"setup": "offline_pairwise",
                         "model": {"policy": policy, "adapter": {"target_modules": targets}},
                         "store": {"root": str(tmp_path / "store"), "run_name": "r"}})


def test_a_target_list_that_matches_nothing_stops_preflight_naming_the_models_linear_layers(family_dir, tmp_path):
    phi3, gpt2 = family_dir("phi3"), family_dir("gpt2")
    problems = preflight_problems(adapter_cfg(phi3, ["q_proj", "v_proj"], tmp_path))
    assert problems == [
        f"model.adapter.target_modules: ['q_proj', 'v_proj'] match no linear layer of {phi3} (its linear layers: "
        "['o_proj', 'qkv_proj', 'gate_up_proj', 'down_proj']); list some of those, or use \"all-linear\""]
    store = ArtifactStore(str(tmp_path / "store"))
    problems = target_module_problems(adapter_cfg(gpt2, ["q_proj", "v_proj"], tmp_path), store)
    assert len(problems) == 1 and "['c_attn', 'c_proj', 'c_fc']" in problems[0]
    # What does match passes: GPT-2's own names, and all-linear anywhere.
    assert target_module_problems(adapter_cfg(gpt2, ["c_attn"], tmp_path), store) == []
    assert target_module_problems(adapter_cfg(phi3, "all-linear", tmp_path), store) == []


def test_a_list_written_for_another_family_warns_naming_the_layers_it_leaves_out(family_dir, tmp_path, caplog):
    store = ArtifactStore(str(tmp_path / "store"))
    with caplog.at_level(logging.WARNING, logger="alignment_core.adapters"):
        assert target_module_problems(adapter_cfg(family_dir("phi3"), LLAMA_TARGETS, tmp_path), store) == []
    assert ("['q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj'] match nothing" in caplog.text
            and "its ['qkv_proj', 'gate_up_proj'] layers are left out" in caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignment_core.adapters"):
        # On its own family the list is whole; a deliberate subset (every name found) is not warned about.
        for targets in (LLAMA_TARGETS, ["q_proj", "v_proj"]):
            assert target_module_problems(adapter_cfg(family_dir("llama"), targets, tmp_path), store) == []
    assert caplog.text == ""


# ---- one online and one offline round per family -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "qwen2", "mistral", "gemma2", "phi3", "opt", "gpt_neox"])
def test_each_family_runs_an_online_round_packed_and_an_offline_round_with_lora(family, family_dir, tmp_path,
                                                                              tiny_reward_model_dir):
    """The online round samples, annotates (the tiny reward model: random samples would tie on the demo's
    positive-words rule) and trains with padding_free on (OPT falls back to padded rows); the offline round
    trains a LoRA adapter on all linear layers; both leave a checkpoint with finite metrics."""
    policy = family_dir(family)
    online = small(tmp_path / "online", model={"policy": policy},
                   annotation={"annotator": "reward_model", "reward_model": str(tiny_reward_model_dir)},
                   generation={"prompts_per_iteration": 4}, training={"padding_free": True, "epochs": 1})
    stages = online_iteration(online)
    store = pipeline.open_store(online)
    generations = store.read_pandas(stages["generations"])
    assert len(generations) == 8 and generations["response"].str.len().gt(0).any()
    metrics_manifest = store.read_json(f"{store.stage_uri('setups', 1, 'metrics')}/{MANIFEST}")
    assert metrics_manifest["extra"]["padding_free"] is (family != "opt")
    offline = small(tmp_path / "offline", setup="offline_pairwise", model={"policy": policy, "adapter": {"r": 4}},
                    data={"source": "bundled:preferences", "max_rows": 8}, training={"epochs": 1})
    checkpoint = store.local_checkpoint(offline_round(offline)["checkpoint"])
    assert (Path(checkpoint) / "adapter_model.safetensors").is_file()
    for cfg in (online, offline):
        metrics = pd.read_parquet(Path(cfg.store.root) / "setups" / "iter-001" / "metrics")
        assert len(metrics) > 0 and metrics["value"].notna().all() and np.isfinite(metrics["value"]).all()
