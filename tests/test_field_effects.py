"""Config fields that had no test at a non-default value where they are used: the loss hyper-parameters as the
config hands them to `losses.LOSSES`, the optimizer's weight decay and gradient clipping, gradient
accumulation, mixed precision, the adapter's dropout and bias, QLoRA's quantization settings, and the cascade's
escalation rule. tests/test_config_effects.py lists, for every field, the test that shows its effect."""

import json

import pytest
import torch

from alignment_core import losses, pipeline
from alignment_core.adapters import lora_config, quantization_config
from alignment_core.annotation.stage import make_annotator
from alignment_core.config import AdapterConfig, parse_config
from alignment_core.models import load_causal_lm, load_tokenizer
from tests.test_cascade import cascade_config, escalated, generations
from tests.test_ensemble import members  # noqa: F401 (the fixture: three tiny reward models)
from tests.test_training import make_cfg, make_units, run_round, step_metrics, tiny2_dir  # noqa: F401

# ---- loss hyper-parameters: each reaches its loss through the config ------------------------------------------

# (setup, loss, field, a non-default value)
LOSS_FIELDS = [
    ("offline_pairwise", "dpo", "beta", 0.5),
    ("offline_pairwise", "cdpo", "label_smoothing", 0.3),
    ("reward_modelling", "reward", "reward_margin", 2.0),
    ("offline_pairwise", "slic", "slic_margin", 3.0),
    ("offline_pairwise", "slic", "slic_nll_weight", 1.0),
    ("offline_pairwise", "dpo", "chosen_nll_weight", 1.0),
    ("online_pairwise", "cdpo", "chosen_nll_weight", 0.5),
    ("offline_pairwise", "ipo", "chosen_nll_weight", 2.0),
    ("offline_pairwise", "simpo", "simpo_gamma", 2.0),
    ("offline_pointwise", "kto", "kto_desirable_weight", 3.0),
    ("offline_pointwise", "kto", "kto_undesirable_weight", 3.0),
    ("rl", "rl", "rl_kl_coef", 1.0),
]


def loss_input(spec: losses.LossSpec, generator: torch.Generator) -> losses.LossInput:
    """Random log-probs for 4 examples, with what `spec` declares it needs."""
    n = 4 * spec.responses
    logps = lambda: -torch.rand(n, generator=generator) * 10  # noqa: E731
    return losses.LossInput(
        policy_logps=logps(), token_counts=torch.randint(3, 9, (n,), generator=generator).float(),
        weights=torch.ones(4), reference_logps=logps() if spec.reference else None,
        rewards=torch.tensor([1, 0, 1, 0]), group_ids=torch.tensor([0, 0, 1, 1]) if spec.grouped else None,
        kl_estimate=torch.tensor(0.2) if spec.mismatched_kl else None,
    )


@pytest.mark.parametrize(("setup", "loss", "field", "value"), LOSS_FIELDS,
                         ids=[f"{loss}-{field}" for _, loss, field, _ in LOSS_FIELDS])
def test_each_loss_hyperparameter_reaches_its_loss_via_config(setup, loss, field, value):
    spec = losses.LOSSES[loss]
    default, changed = (parse_config({"setup": setup, "training": {"loss": loss, **extra}}).training
                        for extra in ({}, {field: value}))
    assert getattr(default, field) != value
    x = loss_input(spec, torch.Generator().manual_seed(0))
    assert spec.compute(x, changed).loss.item() != pytest.approx(spec.compute(x, default).loss.item(), abs=1e-6)


# ---- the optimizer: weight decay, gradient clipping, accumulation, precision ------------------------------------


def one_step(tmp_path, model_dir, **training):
    """Weights before and after one DPO step on 4 pairs (constant learning rate 1e-3, no warm-up)."""
    cfg = make_cfg("offline_pairwise", "dpo", epochs=1, **training)
    store, _, _, result = run_round(tmp_path, model_dir, cfg, make_units(4))
    assert result.steps == 1
    return load_causal_lm(store.local_checkpoint(result.checkpoint_uri)).state_dict()


def test_weight_decay_shrinks_every_weight_by_lr_times_decay(tiny2_dir, tmp_path):  # noqa: F811
    """AdamW's decoupled decay: the same gradients, so the two runs differ by exactly -lr * decay * w."""
    before = load_causal_lm(tiny2_dir).state_dict()
    plain = one_step(tmp_path / "plain", tiny2_dir, weight_decay=0.0)
    decayed = one_step(tmp_path / "decayed", tiny2_dir, weight_decay=0.5)
    for name, weight in before.items():
        if weight.is_floating_point() and weight.abs().max() > 0:
            torch.testing.assert_close(decayed[name] - plain[name], -1e-3 * 0.5 * weight, atol=1e-6, rtol=1e-3)


def test_max_grad_norm_clips_the_gradient_the_step_uses(tiny2_dir, tmp_path):  # noqa: F811
    """Adam's first step moves each weight by lr * g / (|g| + eps): gradients clipped to a total norm of 1e-9
    fall below eps, so the weights move much less than with gradients left whole."""
    before = load_causal_lm(tiny2_dir).state_dict()

    def mean_move(after) -> float:
        return torch.cat([(after[n] - w).abs().flatten() for n, w in before.items() if w.is_floating_point()]
                         ).mean().item()

    unclipped = mean_move(one_step(tmp_path / "unclipped", tiny2_dir, max_grad_norm=1e6))
    clipped = mean_move(one_step(tmp_path / "clipped", tiny2_dir, max_grad_norm=1e-9))
    assert unclipped > 5e-4  # most weights move by about the learning rate
    assert clipped < 0.1 * unclipped


def test_gradient_accumulation_makes_fewer_longer_steps_and_the_schedule_follows(tiny2_dir, tmp_path):  # noqa: F811
    """8 pairs, batch 2: 4 steps; with 2 micro-batches per step, 2 steps of 4 pairs, and a linear schedule
    that decays over those 2 steps (not over 4 micro-batches)."""
    runs = {}
    for accumulation in (1, 2):
        cfg = make_cfg("offline_pairwise", "dpo", epochs=1, batch_size=2, scheduler="linear",
                       gradient_accumulation_steps=accumulation)
        store, _, _, result = run_round(tmp_path / str(accumulation), tiny2_dir, cfg, make_units(8))
        runs[accumulation] = (result.steps, step_metrics(store, store.stage_uri("round", 0, "metrics")))
    assert runs[1][0] == 4 and runs[2][0] == 2
    assert runs[2][1]["learning_rate"].tolist() == pytest.approx([1e-3, 5e-4])


def test_bf16_mixed_precision_changes_the_forward_but_not_by_much(tiny2_dir, tmp_path):  # noqa: F811
    first_loss = {}
    for precision in ("no", "bf16"):
        cfg = make_cfg("offline_pairwise", "dpo", epochs=1, mixed_precision=precision, beta=1.0)
        store, trainer, _, _ = run_round(tmp_path / precision, tiny2_dir, cfg, make_units(4))
        assert trainer.accelerator.mixed_precision == precision
        first_loss[precision] = step_metrics(store, store.stage_uri("round", 0, "metrics"))["chosen_logp"].iloc[0]
    assert first_loss["bf16"] != first_loss["no"]
    assert first_loss["bf16"] == pytest.approx(first_loss["no"], rel=0.05)


# ---- adapters ---------------------------------------------------------------------------------------------------


def test_adapter_alpha_dropout_and_bias_reach_peft():
    default, changed = AdapterConfig(), AdapterConfig(alpha=8.0, dropout=0.3, bias="lora_only")
    peft_default, peft_changed = lora_config(default, "policy"), lora_config(changed, "policy")
    assert (peft_default.lora_alpha, peft_default.lora_dropout, peft_default.bias) == (32.0, 0.05, "none")
    assert (peft_changed.lora_alpha, peft_changed.lora_dropout, peft_changed.bias) == (8.0, 0.3, "lora_only")


def test_qlora_quantization_settings_reach_bitsandbytes(tiny2_dir, tmp_path):  # noqa: F811 (the fixture)
    """The quantization settings, at non-default values, reach the 4-bit layers of the policy a QLoRA round
    trains (bitsandbytes quantizes on this CPU too)."""
    import bitsandbytes.nn

    from alignment_core.store import ArtifactStore
    from alignment_core.training import Trainer

    settings = quantization_config(AdapterConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                 bnb_4bit_use_double_quant=False), "bfloat16")
    assert settings.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(AdapterConfig(), "float32") is None
    for quant_type, double_quant in (("fp4", False), ("nf4", True)):
        cfg = parse_config({"setup": "offline_pairwise", "model": {"dtype": "bfloat16", "adapter": {
            "load_in_4bit": True, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant}}})
        trainer = Trainer(cfg, policy_path=tiny2_dir, tokenizer_path=None, store=ArtifactStore(str(tmp_path)))
        layers = [m for m in trainer._load_policy(tiny2_dir).modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
        assert layers and {(layer.weight.quant_state.quant_type, layer.weight.quant_state.nested)
                           for layer in layers} == {(quant_type, double_quant)}


# ---- the cascade's escalation rule ---------------------------------------------------------------------------------


def test_the_configured_escalation_rule_decides_which_pairs_escalate(members):  # noqa: F811
    frame = generations(6)
    picked = {}
    for rule in ("most_uncertain", "random"):
        cascade = make_annotator(cascade_config(members, budget=0.5, escalate=rule))
        assert cascade.rule == rule
        picked[rule] = {r["prompt_id"] for r in escalated(cascade.annotate(frame))}
    assert len(picked["random"]) == len(picked["most_uncertain"]) == 3
    assert picked["random"] != picked["most_uncertain"]
    assert all(json.loads(r["raw"])["cascade"]["rule"] == "random"
               for r in escalated(make_annotator(cascade_config(members, budget=0.5, escalate="random"))
                                  .annotate(frame)))


# ---- the learning-rate schedule, the data order, the tokenizer ---------------------------------------------------


@pytest.mark.parametrize(("scheduler", "warmup_ratio"), [("constant", 0.0), ("linear", 0.0), ("cosine", 0.0),
                                                         ("linear", 0.5), ("constant", 0.5)])
def test_the_schedule_and_warmup_set_each_steps_learning_rate(tiny2_dir, tmp_path, scheduler, warmup_ratio):  # noqa: F811
    cfg = make_cfg("offline_pairwise", "dpo", epochs=1, batch_size=2, scheduler=scheduler, warmup_ratio=warmup_ratio)
    store, _, _, result = run_round(tmp_path, tiny2_dir, cfg, make_units(8))
    rates = (step_metrics(store, store.stage_uri("round", 0, "metrics"))["learning_rate"] / 1e-3).tolist()
    expected = {  # 4 steps; a warm-up of half the round rises over its 2 steps, then the schedule runs its course
        ("constant", 0.0): [1, 1, 1, 1],
        ("linear", 0.0): [1, 0.75, 0.5, 0.25],
        ("cosine", 0.0): [1, 0.853553, 0.5, 0.146447],
        ("linear", 0.5): [0, 0.5, 1, 0.5],
        ("constant", 0.5): [0, 0.5, 1, 1],
    }[(scheduler, warmup_ratio)]
    assert result.steps == 4 and rates == pytest.approx(expected, abs=1e-5)


def test_the_training_seed_orders_the_examples(tiny2_dir, tmp_path):  # noqa: F811
    plans = {}
    for seed in (0, 0, 1):
        cfg = make_cfg("offline_pairwise", "dpo", epochs=2, batch_size=2, seed=seed)
        _, trainer, _, _ = run_round(tmp_path / f"{seed}-{len(plans)}", tiny2_dir, cfg, make_units(4))
        plans.setdefault(seed, []).append(trainer.plan)
    assert plans[0][0] == plans[0][1]  # the same seed, the same order
    assert plans[1][0] != plans[0][0]
    for seed in (0, 1):  # 2 epochs of 2 steps: each epoch shuffles anew
        order = [i for step in plans[seed][0] for batch in step for i in batch]
        assert sorted(order[:4]) == sorted(order[4:]) and order[:4] != order[4:]
    assert sorted(i for step in plans[1][0] for batch in step for i in batch) == sorted(
        i for step in plans[0][0] for batch in step for i in batch)  # the same examples, in another order


def test_model_tokenizer_is_read_from_its_own_folder(tiny2_dir, tmp_path):  # noqa: F811
    """A policy folder with weights only trains with `model.tokenizer` naming where the tokenizer is."""
    import shutil
    from pathlib import Path

    from alignment_core.store import ArtifactStore
    from alignment_core.training import Trainer

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for file in Path(tiny2_dir).iterdir():
        if file.name in ("config.json", "generation_config.json") or file.suffix == ".safetensors":
            shutil.copy(file, weights_only / file.name)
    settings = {"setup": "offline_pairwise", "model": {"policy": str(weights_only)}, "training": {"loss": "dpo"}}
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(Exception, match="(?i)tokenizer"):
        Trainer(parse_config(settings), str(weights_only), None, store)
    settings["model"]["tokenizer"] = tiny2_dir
    trainer = Trainer(parse_config(settings), str(weights_only), None, store)
    assert trainer.tokenizer("a good day")["input_ids"] == load_tokenizer(tiny2_dir)("a good day")["input_ids"]


# ---- sampling: top-p; held-out prompts and how they are sampled ------------------------------------------------


def test_a_top_p_this_small_keeps_only_the_most_likely_token(tiny_model_dir):
    from tests.test_generation import make_generator_for, make_prompts

    prompts = make_prompts(3)

    def samples(**settings):
        rows = make_generator_for(str(tiny_model_dir), n_samples=2, **settings).generate(prompts, seed=0)
        return [row["response_token_ids"] for row in rows]

    greedy = samples(temperature=0.0)
    assert samples(temperature=1.0, top_p=1e-6) == greedy
    assert samples(temperature=1.0, top_p=1.0) != greedy


def test_held_out_prompts_from_eval_source_sampled_as_evaluation_says(tmp_path):
    from tests.test_fingerprints import config, write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about topic {i}."} for i in range(8)])
    held_out = [f"A held-out question {i}?" for i in range(3)]
    write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": p} for p in held_out])

    def eval_samples(seed: int, **evaluation) -> list[list[int]]:
        cfg = config(tmp_path, data={"eval_source": str(tmp_path / "held_out.jsonl"), "eval_prompts": 3},
                     generation={"seed": seed}, evaluation={"enabled": True, **evaluation})
        prompts_uri = pipeline.load_eval_prompts(cfg)
        store = pipeline.open_store(cfg)
        assert sorted(store.read_pandas(prompts_uri)["prompt"]) == held_out
        frame = store.read_pandas(pipeline.generate(cfg, prompts_uri, "tiny://llama", 0, stage="eval_generations"))
        assert sorted(frame["prompt_id"]) == sorted(set(frame["prompt_id"]))  # one sample per prompt
        return [list(ids) for ids in frame.sort_values("prompt_id")["response_token_ids"]]

    short_greedy = eval_samples(0, max_new_tokens=3, temperature=0.0)
    assert all(len(ids) <= 3 for ids in short_greedy) and max(map(len, short_greedy)) == 3
    assert eval_samples(1, max_new_tokens=3, temperature=0.0) == short_greedy  # greedy: the seed does not matter
    assert eval_samples(1, max_new_tokens=3, temperature=1.0) != short_greedy
    assert max(map(len, eval_samples(0, max_new_tokens=6, temperature=0.0))) == 6


# ---- the cascade's first annotator --------------------------------------------------------------------------------


def test_the_configured_first_annotator_labels_what_is_not_escalated(members):  # noqa: F811
    cfg = parse_config({
        "setup": "online_pairwise", "generation": {"prompts_per_iteration": 6, "n_samples": 4},
        "annotation": {"annotator": "cascade", "reward_model": members,
                       "cascade": {"first": "programmatic", "escalate_to": "reward_model", "budget": 2}},
    })
    cascade = make_annotator(cfg)
    rows = cascade.annotate(generations(6))
    kept = [r for r in rows if not json.loads(r["raw"])["cascade"]["escalated"]]
    assert len(kept) == 4 and {r["annotator"] for r in kept} == {cascade.first.name}
    assert cascade.first.name.startswith("programmatic:")


# ---- two processes: the loss and gradient scale of a step do not depend on how the batch is split --------------


def _train_as_one_of_two_processes(rank: int, port: int, store_root: str, model_dir: str) -> None:
    """One rank of a 2-process DDP round over gloo, as `accelerate launch` would start it (the env it sets)."""
    import os

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from alignment_core.store import ArtifactStore
    from alignment_core.training import Trainer

    store = ArtifactStore(store_root)
    trainer = Trainer(make_cfg("offline_pairwise", "dpo", epochs=1, batch_size=4, max_grad_norm=1e6),
                      policy_path=model_dir, tokenizer_path=None, store=store)
    trainer.train(trainer.batch_factory.encode(make_units(16)), store.checkpoint_uri("round", 0),
                  store.stage_uri("round", 0, "metrics"))


def test_two_processes_take_the_steps_of_one_with_twice_the_batch(tiny2_dir, tmp_path):  # noqa: F811
    """The same 8 pairs a step: one process with batch 8, or two gloo processes with 4 each. The loss and the
    gradient norm (after DDP's averaging and the Trainer's loss scale) of each step agree, and so do the
    weights; a wrong loss scale, plan or split of a step between the processes changes them."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_train_as_one_of_two_processes, args=(port, str(tmp_path / "two"), tiny2_dir), nprocs=2,
                       join=True, start_method="spawn")
    one_store, _, _, result = run_round(tmp_path / "one", tiny2_dir, make_cfg(
        "offline_pairwise", "dpo", epochs=1, batch_size=8, max_grad_norm=1e6), make_units(16))
    from alignment_core.store import ArtifactStore

    two_store = ArtifactStore(str(tmp_path / "two"))
    one, two = (step_metrics(s, s.stage_uri("round", 0, "metrics")) for s in (one_store, two_store))
    assert result.steps == len(two) == 2
    for name in ("loss", "grad_norm", "chosen_logp", "rejected_logp"):
        assert two[name].tolist() == pytest.approx(one[name].tolist(), rel=1e-4, abs=1e-6), name
    one_weights, two_weights = (load_causal_lm(s.local_checkpoint(s.checkpoint_uri("round", 0))).state_dict()
                                for s in (one_store, two_store))
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, atol=2e-4, rtol=0)  # Adam magnifies float noise
