"""LoRA adapters (`model.adapter`): training rounds, the adapter-off reference, checkpoints, merge, generation
(transformers and vLLM), reward models, the online flow and the config checks."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from alignment_core import adapters, losses
from alignment_core.config import ConfigError, GenerationConfig, parse_config
from alignment_core.generation import make_generator
from alignment_core.models import load_causal_lm, load_reward_model, load_tokenizer, model_digest, resolve_model_path
from alignment_core.rendering import render_prompt_ids
from alignment_core.store import ArtifactStore
from alignment_core.tiny import build_tiny
from alignment_core.training import Trainer
from tests.helpers import prefect_env
from tests.test_generation import POLICY_URI, make_prompts, teacher_forced_logprobs
from tests.test_training import dpo_on_pairs, make_units, reward_pair_accuracy, step_metrics

REPO = Path(__file__).resolve().parent.parent
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


@pytest.fixture(scope="module")
def tiny2_dir(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "llama2", num_layers=2))


def lora_cfg(setup: str, loss: str, adapter: dict | None = None, model: dict | None = None, **training_cfg):
    settings = {"loss": loss, "batch_size": 4, "epochs": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                "scheduler": "constant", **training_cfg}
    return parse_config({"setup": setup, "model": {"adapter": {**LORA, **(adapter or {})}, **(model or {})},
                         "training": settings})


def run_round(root: Path, policy: str, cfg, units, name="round", policy_name=None, reference=None):
    store = ArtifactStore(str(root / "store"))
    trainer = Trainer(cfg, policy_path=policy, tokenizer_path=None, store=store, policy_name=policy_name,
                      reference_path=reference)
    encoded = trainer.batch_factory.encode(units)
    result = trainer.train(encoded, store.checkpoint_uri(name, 0), store.stage_uri(name, 0, "metrics"))
    return store, trainer, encoded, result


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def lora_dpo_round(tiny2_dir, tmp_path_factory):
    """One LoRA DPO round on the 2-layer tiny model (3 epochs of 16 pairs)."""
    cfg = lora_cfg("offline_pairwise", "dpo", epochs=3)
    root = tmp_path_factory.mktemp("lora-dpo")
    name = root / "base-as-configured"  # the name the config gives the policy (here a link to the folder)
    name.symlink_to(tiny2_dir)
    store, trainer, encoded, result = run_round(root, tiny2_dir, cfg, make_units(16), policy_name=str(name))
    return {"cfg": cfg, "store": store, "trainer": trainer, "encoded": encoded, "result": result,
            "checkpoint": store.local_checkpoint(result.checkpoint_uri), "base_name": str(name)}


# ---- training rounds -----------------------------------------------------------------------------------------


def test_lora_dpo_round_lowers_the_loss_and_raises_reward_accuracy(lora_dpo_round, tiny2_dir):
    trainer, encoded, cfg = lora_dpo_round["trainer"], lora_dpo_round["encoded"], lora_dpo_round["cfg"]
    assert trainer.reference is None and trainer.reference_is_base  # no second copy of the weights
    reference = load_causal_lm(tiny2_dir).eval()
    before_loss, before_accuracy = dpo_on_pairs(trainer, encoded, reference, reference, cfg.training.beta)
    trained = load_causal_lm(lora_dpo_round["checkpoint"]).eval()  # base + adapter, merged
    after_loss, after_accuracy = dpo_on_pairs(trainer, encoded, trained, reference, cfg.training.beta)
    assert before_loss == pytest.approx(math.log(2), abs=1e-5) and before_accuracy == 0.0
    assert after_loss < 0.5 * before_loss
    assert after_accuracy >= 0.9
    metrics = step_metrics(lora_dpo_round["store"], lora_dpo_round["store"].stage_uri("round", 0, "metrics"))
    assert metrics["loss"].iloc[0] == pytest.approx(math.log(2), abs=1e-4)  # B = 0: the policy starts at the base


def test_the_checkpoint_is_a_small_adapter_naming_its_base(lora_dpo_round, tiny2_dir, tmp_path):
    folder = Path(lora_dpo_round["checkpoint"])
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    # the config's name for the base, not the folder the trainer loaded it from
    assert config["base_model_name_or_path"] == lora_dpo_round["base_name"] != tiny2_dir
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    # "all-linear": every projection of every layer, not the output head
    targets = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # A full checkpoint of the same model: weights + tokenizer (no optimizer state, which makes it larger still)
    full = ArtifactStore(str(tmp_path))
    full.save_checkpoint(load_causal_lm(tiny2_dir), load_tokenizer(tiny2_dir), full.checkpoint_uri("full", 0))
    full_bytes = folder_bytes(full.local_checkpoint(full.checkpoint_uri("full", 0)))
    ratio = folder_bytes(folder) / full_bytes  # the whole adapter checkpoint, optimizer state included
    assert ratio < 0.25, ratio
    weights_ratio = (folder / "adapter_model.safetensors").stat().st_size / Path(tiny2_dir,
                                                                                 "model.safetensors").stat().st_size
    assert weights_ratio < 0.05, weights_ratio

    # peft's own loader reads it, on a base loaded by hand
    from peft import PeftModel

    base = load_causal_lm(tiny2_dir).eval()
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny2_dir), str(folder)).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert (peft_model(ids).logits - base(ids).logits).abs().max() > 1e-3


@pytest.fixture(scope="module")
def named_adapter(lora_dpo_round) -> str:
    return lora_dpo_round["checkpoint"]


def test_adapter_off_reference_equals_a_separately_loaded_base(named_adapter, tiny2_dir, tmp_path, caplog):
    """Policy = a trained adapter (non-zero B), reference = its base: reference log-probs come from the policy
    model with the adapter switched off, and equal those of the base model loaded on its own."""
    cfg = lora_cfg("offline_pairwise", "dpo", epochs=1, precompute_reference=False)
    store = ArtifactStore(str(tmp_path / "store"))
    trainer = Trainer(cfg, policy_path=named_adapter, tokenizer_path=None, store=store, reference_path=tiny2_dir)
    encoded = trainer.batch_factory.encode(make_units(8, seed=3))
    trainer.model = trainer._load_policy(named_adapter)
    with caplog.at_level(logging.INFO, logger="alignment_core.training"):
        trainer.reference = trainer._load_reference()
    assert trainer.reference is None and trainer.reference_is_base
    assert "adapter switched off" in caplog.text
    trainer.model.train()  # as in a round: dropout and checkpointing state must not leak into the reference
    batch = trainer._collate(encoded, list(range(8)))
    adapter_off = trainer._reference_logps(batch)
    assert trainer.model.training  # restored after the reference forward
    base = load_causal_lm(tiny2_dir).eval()
    with torch.no_grad():
        separate = trainer.concatenated_forward(base, batch)[0]
        adapter_on = trainer.concatenated_forward(trainer.model, batch)[0]
    torch.testing.assert_close(adapter_off, separate, atol=1e-4, rtol=0)
    assert (adapter_on - separate).abs().max() > 1.0  # the adapter really changes the model


def test_a_reference_other_than_the_base_is_loaded_separately(named_adapter, tmp_path, caplog):
    other = str(build_tiny(tmp_path / "other", num_layers=2, seed=1))
    cfg = lora_cfg("offline_pairwise", "dpo", epochs=1)
    store = ArtifactStore(str(tmp_path / "store"))
    trainer = Trainer(cfg, policy_path=named_adapter, tokenizer_path=None, store=store, reference_path=other)
    trainer.model = trainer._load_policy(named_adapter)
    with caplog.at_level(logging.INFO, logger="alignment_core.training"):
        trainer.reference = trainer._load_reference()
    assert trainer.reference is not None and not trainer.reference_is_base
    assert "is not the adapter's base model: loading it separately" in caplog.text


def test_the_next_round_continues_the_same_adapter(named_adapter, tiny2_dir, tmp_path):
    cfg = lora_cfg("offline_pairwise", "dpo", epochs=1)
    store = ArtifactStore(str(tmp_path / "store"))
    trainer = Trainer(cfg, policy_path=named_adapter, tokenizer_path=None, store=store, reference_path=tiny2_dir)
    model = trainer._load_policy(named_adapter)
    from safetensors.torch import load_file

    saved = load_file(str(Path(named_adapter, "adapter_model.safetensors")))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == len(saved)
    for name, value in saved.items():  # peft saves "...lora_A.weight" for the parameter "...lora_A.default.weight"
        live = trainable[name.replace(".weight", ".default.weight")]
        assert torch.equal(live.detach(), value)
    _, _, _, result = run_round(tmp_path, named_adapter, cfg, make_units(8), reference=tiny2_dir)
    folder = store.local_checkpoint(result.checkpoint_uri)
    assert adapters.adapter_base(folder) == adapters.adapter_base(named_adapter)  # still on the same base
    assert not torch.equal(load_file(f"{folder}/adapter_model.safetensors")[next(iter(saved))],
                           next(iter(saved.values())))


@pytest.mark.parametrize(("setup", "loss"), [("sft", "sft"), ("offline_pointwise", "kto"), ("rl", "rl"),
                                              ("offline_pairwise", "ipo")])
def test_every_policy_loss_trains_an_adapter(tiny2_dir, tmp_path, setup, loss):
    units = make_units(8, samples_per_prompt=2 if loss == "rl" else 1)
    if loss == "kto":
        units["generation1_reward"] = [float(i % 2) for i in range(len(units))]
    store, trainer, _, result = run_round(tmp_path, tiny2_dir, lora_cfg(setup, loss, epochs=1), units)
    metrics = step_metrics(store, store.stage_uri("round", 0, "metrics"))
    assert metrics["loss"].map(math.isfinite).all()
    assert adapters.is_adapter(store.local_checkpoint(result.checkpoint_uri))
    assert trainer.reference is None
    assert trainer.reference_is_base == losses.LOSSES[loss].reference


def test_gradient_checkpointing_with_an_adapter_gives_the_same_round_and_is_its_default(tiny2_dir, tmp_path):
    units = make_units(8)
    losses_by_flag = {}
    for flag in (False, True, None):
        cfg = lora_cfg("offline_pairwise", "dpo", epochs=1, gradient_checkpointing=flag, precompute_reference=False)
        store, trainer, _, _ = run_round(tmp_path / str(flag), tiny2_dir, cfg, units)
        metrics_uri = store.stage_uri("round", 0, "metrics")
        losses_by_flag[flag] = step_metrics(store, metrics_uri)[["loss", "grad_norm"]]
        on = flag is not False  # None, the default, is on with an adapter
        assert trainer.model_unwrapped.base_model.model.model.gradient_checkpointing == on
        assert store.read_manifest(metrics_uri)["extra"]["gradient_checkpointing"] == on
    for flag in (True, None):
        torch.testing.assert_close(torch.tensor(losses_by_flag[flag].to_numpy().copy()),
                                   torch.tensor(losses_by_flag[False].to_numpy().copy()),
                                   atol=1e-5, rtol=1e-5)
    assert losses_by_flag[True]["grad_norm"].iloc[0] > 0


def test_lora_reward_model_trains_its_score_head_and_loads_as_annotator(tiny2_dir, tmp_path):
    cfg = lora_cfg("reward_modelling", "reward", epochs=3)
    store, trainer, encoded, result = run_round(tmp_path, tiny2_dir, cfg, make_units(16), policy_name=tiny2_dir)
    folder = store.local_checkpoint(result.checkpoint_uri)
    config = json.loads(Path(folder, "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]

    torch.manual_seed(0)
    before = reward_pair_accuracy(trainer, encoded, load_reward_model(tiny2_dir).eval())
    trained = load_reward_model(folder).eval()  # how the annotator loads it: base + adapter + score, merged
    after = reward_pair_accuracy(trainer, encoded, trained)
    assert after >= 0.9 and after > before
    from alignment_core.annotation.base import ScoreRules
    from alignment_core.annotation.scorers import RewardModelAnnotator

    annotator = RewardModelAnnotator(folder, ScoreRules())
    prompt = [{"role": "user", "content": "Say something."}]
    positive, negative = annotator.score([prompt, prompt], ["good happy great wonderful", "bad sad awful terrible"])
    assert positive > negative


# ---- merge, generation ----------------------------------------------------------------------------------------


def test_merge_command_writes_full_weights(named_adapter, tiny2_dir, tmp_path):
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "merge", named_adapter, str(out)],  # alignment-core merge
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        expected = load_causal_lm(named_adapter, adapter_mode="frozen").eval()(ids).logits
        base = load_causal_lm(tiny2_dir).eval()(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)
    assert (base - expected).abs().max() > 0.1


def test_a_judge_given_as_an_adapter_loads_base_and_adapter(named_adapter, tiny2_dir):
    """The local judge backend takes an adapter checkpoint like a full model: its verdict log-probs are those
    of base + adapter, not of the base."""
    from alignment_core.annotation.backends import LocalJudgeBackend, option_token_ids

    options = {"A": ["A"], "B": ["B"]}
    prompts = ["Which is better, A or B?", "Is the sun warm? A: yes B: no"]
    judge = LocalJudgeBackend(named_adapter).complete(prompts, options)
    base = LocalJudgeBackend(tiny2_dir).complete(prompts, options)
    peft_model = load_causal_lm(named_adapter, adapter_mode="frozen").eval()
    tokenizer = load_tokenizer(named_adapter)
    for prompt, reply, base_reply in zip(prompts, judge, base, strict=True):
        ids = render_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        with torch.no_grad():
            next_token = peft_model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        for option, token_ids in option_token_ids(tokenizer, options, "judge").items():
            expected = torch.logsumexp(next_token[token_ids], dim=0).item()
            assert reply.logprobs[option] == pytest.approx(expected, abs=1e-4)
        assert reply.logprobs != pytest.approx(base_reply.logprobs, abs=1e-3)


def random_adapter(base_dir: str, out_dir, seed: int = 0) -> str:
    """An adapter with random non-zero A and B on every linear layer: it changes the model a lot."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(base_dir), LoraConfig(r=8, lora_alpha=8, target_modules="all-linear",
                                                                init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name) + 1000 * seed))
    adapters.set_base_name(model, base_dir)
    model.save_pretrained(out_dir)
    load_tokenizer(base_dir).save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def stopping_adapter(stopping_model_dir, tmp_path_factory) -> str:
    return random_adapter(stopping_model_dir, tmp_path_factory.mktemp("adapter") / "lora")


def test_transformers_generation_with_an_adapter(stopping_adapter, stopping_model_dir):
    """The transformers backend samples from base + adapter; its log-probs are the unmerged PeftModel's."""
    gen_cfg = GenerationConfig(backend="transformers", n_samples=2, max_new_tokens=12, batch_size=3)
    generator = make_generator(gen_cfg, stopping_adapter, POLICY_URI)
    prompts = make_prompts(3)
    rows = generator.generate(prompts, seed=1)
    assert generator.lineage.policy_digest == model_digest(stopping_adapter) != model_digest(stopping_model_dir)
    peft_model = load_causal_lm(stopping_adapter, adapter_mode="frozen").eval()
    base = load_causal_lm(stopping_model_dir).eval()
    by_id = {p["prompt_id"]: p for p in prompts}
    gap_to_base = 0.0
    for row in rows:
        ids = render_prompt_ids(generator.tokenizer, by_id[row["prompt_id"]]["prompt_messages"])
        expected = teacher_forced_logprobs(peft_model, ids, row["response_token_ids"])
        torch.testing.assert_close(torch.tensor(row["token_logprobs"]), expected, atol=1e-4, rtol=0)
        base_logprobs = teacher_forced_logprobs(base, ids, row["response_token_ids"])
        gap_to_base = max(gap_to_base, (base_logprobs - expected).abs().max().item())
    assert gap_to_base > 0.1


VLLM_CFG = GenerationConfig(backend="vllm", n_samples=2, max_new_tokens=16, max_model_len=256,
                            gpu_memory_utilization=0.3)


def adapter_logprob_gaps(rows, prompts, tokenizer, adapter_dir: str, base) -> tuple[float, float]:
    """(largest gap to the transformers PeftModel's teacher-forced log-probs, largest gap to the base's)."""
    peft_model = load_causal_lm(adapter_dir, adapter_mode="frozen").eval()
    by_id = {p["prompt_id"]: p for p in prompts}
    worst, gap_to_base = 0.0, 0.0
    for row in rows:
        ids = render_prompt_ids(tokenizer, by_id[row["prompt_id"]]["prompt_messages"])
        expected = teacher_forced_logprobs(peft_model, ids, row["response_token_ids"])
        worst = max(worst, (torch.tensor(row["token_logprobs"]) - expected).abs().max().item())
        gap_to_base = max(gap_to_base, (teacher_forced_logprobs(base, ids, row["response_token_ids"])
                                        - expected).abs().max().item())
    return worst, gap_to_base


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_adapters_with_transformers_logprobs(stopping_adapter, stopping_model_dir, vllm_env, tmp_path):
    """vLLM's LoRA path (the base loaded once, a LoRARequest per call): log-probs of its samples equal the
    transformers PeftModel's teacher-forced ones, as for full models in test_generation_vllm.py; then the same
    engine serves the next adapter of that base (`use_adapter`)."""
    pytest.importorskip("vllm")
    second_adapter = random_adapter(stopping_model_dir, tmp_path / "second", seed=1)
    prompts = make_prompts(4)
    generator = make_generator(VLLM_CFG, stopping_adapter, POLICY_URI)
    try:
        assert generator.adapter_path == stopping_adapter and generator.policy_path == stopping_model_dir
        first = generator.generate(prompts, seed=5)
        engine = generator.llm
        assert engine.llm_engine.vllm_config.lora_config.max_lora_rank == 8
        generator.use_adapter(second_adapter, "tiny://second", model_digest(second_adapter))
        second = generator.generate(prompts, seed=5)
        assert generator.llm is engine  # no restart, the base weights stay loaded
    finally:
        generator.close()
    base = load_causal_lm(stopping_model_dir).eval()
    for rows, adapter_dir in ((first, stopping_adapter), (second, second_adapter)):
        worst, gap_to_base = adapter_logprob_gaps(rows, prompts, generator.tokenizer, adapter_dir, base)
        print(f"vLLM+LoRA vs transformers+peft ({Path(adapter_dir).name}): largest log-prob gap {worst:.2e}; "
              f"base vs adapter: {gap_to_base:.2f}")
        assert worst < 1e-2, f"largest log-prob gap between vLLM+LoRA and transformers+peft: {worst}"
        assert gap_to_base > 0.1  # the adapter was applied: the base alone would not match
    assert {row["policy_uri"] for row in second} == {"tiny://second"}
    assert [r["response_token_ids"] for r in first] != [r["response_token_ids"] for r in second]


# ---- config ------------------------------------------------------------------------------------------------------


def test_qlora_is_refused_at_config_load_where_bitsandbytes_cannot_run(monkeypatch):
    qlora = {"model": {"adapter": {"load_in_4bit": True}}}
    parse_config(qlora)  # the test extra's bitsandbytes quantizes on this CPU
    import bitsandbytes.functional

    def cuda_only(*args, **kwargs):
        raise RuntimeError("no kernel for the CPU")

    if not torch.cuda.is_available():
        monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", cuda_only)  # as an older one
        with pytest.raises(ConfigError, match="no CUDA device and bitsandbytes .* cannot quantize on its CPU "
                                              "\\(RuntimeError: no kernel for the CPU\\); upgrade bitsandbytes"):
            parse_config(qlora)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match="load_in_4bit \\(QLoRA\\) needs the bitsandbytes package"):
        parse_config(qlora)
    # sent to a GPU train deployment, it is checked there instead
    parse_config({**qlora, "scale_out": {"train_deployment": "train-stage/gpu"}})


def test_a_qlora_policy_passes_gradients_through_its_4bit_layers_after_a_forward_without_them(tiny2_dir, tmp_path):
    """bitsandbytes repacks a 4-bit layer on a CPU with AVX512-BF16 for inference on its first eval forward
    without gradients (as the reference pass and the layout check run), and passes no gradient back through it
    from then on: the trainer turns that off, so the adapters' gradients are the same after such a forward."""
    cfg = lora_cfg("offline_pairwise", "dpo", adapter={"load_in_4bit": True}, model={"dtype": "bfloat16"})
    trainer = Trainer(cfg, policy_path=tiny2_dir, tokenizer_path=None, store=ArtifactStore(str(tmp_path)))
    model = trainer._load_policy(tiny2_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 would give A no gradient at all
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])

    def adapter_gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    before = adapter_gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = adapter_gradients()
    first_layer = next(name for name in before if "layers.0.self_attn.q_proj.lora_A" in name)
    assert before[first_layer].abs().sum() > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-3, atol=1e-6, msg=name)


def test_qlora_trains_on_a_4bit_base_computing_in_the_models_dtype(tiny2_dir, tmp_path):
    """A QLoRA round (here on the CPU): the base's linear layers are 4-bit and everything else stays in
    model.dtype, so the activations do too (peft's prepare_model_for_kbit_training made the norms, embeddings and
    head fp32, and with them every activation); the round learns."""
    import bitsandbytes.nn

    cfg = lora_cfg("offline_pairwise", "dpo", epochs=3, adapter={"load_in_4bit": True}, model={"dtype": "bfloat16"})
    decoder_outputs = set()

    def record_dtype(module, inputs, output):
        if type(module).__name__ == "LlamaDecoderLayer":
            decoder_outputs.add((output[0] if isinstance(output, tuple) else output).dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record_dtype)
    try:
        store, trainer, _, result = run_round(tmp_path, tiny2_dir, cfg, make_units(16))
    finally:
        hook.remove()
    model = trainer.model_unwrapped
    assert sum(isinstance(module, bitsandbytes.nn.Linear4bit) for module in model.modules()) == 2 * 7  # 2 layers
    base_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.dtype.is_floating_point}
    assert base_dtypes == {torch.bfloat16} and decoder_outputs == {torch.bfloat16}
    losses = step_metrics(store, store.stage_uri("round", 0, "metrics"))["loss"]
    assert losses.iloc[0] == pytest.approx(math.log(2), abs=1e-2)  # B = 0: the policy starts at the base
    assert losses.iloc[-3:].mean() < 0.5 * losses.iloc[0]
    assert adapters.is_adapter(store.local_checkpoint(result.checkpoint_uri))


def test_adapter_and_attention_fields_are_validated():
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        parse_config({"model": {"attn_implementation": "fastest"}})
    with pytest.raises(ConfigError, match="model.adapter.r must be > 0"):
        parse_config({"model": {"adapter": {"r": 0}}})
    with pytest.raises(ConfigError, match="target_modules must name at least one module"):
        parse_config({"model": {"adapter": {"target_modules": []}}})
    cfg = parse_config({"model": {"adapter": {"target_modules": ["q_proj", "v_proj"]}}})
    assert adapters.lora_config(cfg.model.adapter, "causal_lm").target_modules == {"q_proj", "v_proj"}


def test_attn_implementation_reaches_from_pretrained(tiny2_dir):
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    eager = load_causal_lm(tiny2_dir, attn_implementation="eager").eval()
    sdpa = load_causal_lm(tiny2_dir, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, atol=1e-4, rtol=0)
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="FlashAttention2 .* doesn't seem to be installed"):
            load_causal_lm(tiny2_dir, attn_implementation="flash_attention_2")


# ---- the online flow with a LoRA reward model and a LoRA policy -----------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_lora_reward_model_then_two_online_lora_iterations(tmp_path):
    root = tmp_path / "store"
    env = prefect_env(tmp_path)
    # 1. a LoRA reward model (offline reward-model flow)
    rm_config = {"setup": "reward_modelling", "data": {"source": "bundled:preferences", "max_rows": 64},
                 "model": {"policy": "tiny://llama", "adapter": LORA},
                 "training": {"loss": "reward", "batch_size": 8, "learning_rate": 1e-3, "max_length": 128,
                              "max_prompt_length": 64},
                 "store": {"root": str(root), "run_name": "rm"}}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(rm_config))
    done = subprocess.run([sys.executable, "-m", "flows.offline", "reward-model", "--config",
                           str(tmp_path / "rm.yaml")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    store = ArtifactStore(str(root))
    reward_model = store.checkpoint_uri("rm", 1)
    assert adapters.is_adapter(store.local_checkpoint(reward_model))

    # 2. two online iterations of a LoRA policy, annotated by the LoRA reward model
    from tests.helpers import SMALL

    config = {**SMALL, "model": {"policy": "tiny://llama", "adapter": LORA},
              "annotation": {"annotator": "reward_model", "reward_model": reward_model},
              "training": {"loss": "dpo", "batch_size": 4, "learning_rate": 1e-3},
              "evaluation": {"enabled": False}, "store": {"root": str(root), "run_name": "lora"}}
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", str(tmp_path / "online.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "run lora finished" in done.stdout

    annotations = pd.read_parquet(store.stage_uri("lora", 1, "annotations"))
    assert annotations["annotator"].str.startswith("reward_model:").all()
    tiny_digest = model_digest(resolve_model_path("tiny://llama"))
    full_bytes = folder_bytes(resolve_model_path("tiny://llama"))
    for k in (1, 2):
        folder = Path(store.local_checkpoint(store.checkpoint_uri("lora", k)))
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
        assert not (folder / "model.safetensors").exists()
        assert folder_bytes(folder) < 0.25 * full_bytes
        # every iteration's adapter sits on the configured base, named as configured
        assert adapters.adapter_base(folder) == "tiny://llama"
        lineage = json.loads((folder / "lineage.json").read_text())
        assert lineage["models"]["adapter_base"]["name"] == "tiny://llama"
        assert lineage["models"]["adapter_base"]["digest"] == tiny_digest
    second = pd.read_parquet(store.stage_uri("lora", 2, "generations"))
    assert set(second["policy_uri"]) == {store.checkpoint_uri("lora", 1)}  # sampled from iteration 1's adapter
    lineage2 = json.loads(Path(store.local_checkpoint(store.checkpoint_uri("lora", 2)), "lineage.json").read_text())
    assert lineage2["policy_uri"] == store.checkpoint_uri("lora", 1)  # iteration 2 trained from iteration 1's
    assert lineage2["reference_uri"] == "tiny://llama"


# ---- distributed ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_round_on_two_gloo_processes_matches_one_process(tiny2_dir, tmp_path):
    """As tests/test_training.py's DDP test, with an adapter: 1 process x 8 pairs vs 2 processes x 4 per step
    give the same losses, and the checkpoint is an adapter naming its base by the name the pipeline passes."""
    import pyarrow as pa

    from tests.test_training import ACCELERATE_CPU_CONFIG

    store = ArtifactStore(str(tmp_path / "store"))
    units_uri = store.stage_uri("ddp", 0, "units")
    store.write_stage(units_uri, "units", {"test": 1}, [pa.Table.from_pandas(make_units(16))])
    losses_by_processes = {}
    for processes, batch_size in ((1, 8), (2, 4)):
        config = {"setup": "offline_pairwise", "model": {"policy": tiny2_dir, "adapter": LORA},
                  "store": {"root": str(tmp_path / "store"), "run_name": "ddp"},
                  "training": {"loss": "dpo", "batch_size": batch_size, "epochs": 2, "learning_rate": 1e-2,
                               "precompute_reference": processes == 2}}  # both reference paths, same numbers
        config_path = tmp_path / f"config-{processes}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        metrics_uri = store.stage_uri("ddp", processes, "metrics")
        launcher = ["--config_file", str(ACCELERATE_CPU_CONFIG)] if processes == 2 else ["--cpu"]
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
                   "-m", "alignment_core.training", "--config", str(config_path), "--units", units_uri,
                   "--checkpoint", store.checkpoint_uri("ddp", processes), "--metrics", metrics_uri,
                   "--policy-name", "tiny-base-name"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        assert completed.returncode == 0, completed.stderr[-4000:]
        losses_by_processes[processes] = step_metrics(store, metrics_uri)["loss"]
        folder = store.local_checkpoint(store.checkpoint_uri("ddp", processes))
        assert adapters.adapter_base(folder) == "tiny-base-name"
    one, two = losses_by_processes[1], losses_by_processes[2]
    assert len(one) == len(two) == 4
    assert (one - two).abs().max() < 1e-4
    assert one.iloc[-1] < one.iloc[0]
