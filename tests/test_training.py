"""The Trainer on a 2-layer tiny model: each loss trains, the NaN guard, resume, and a 2-process gloo run."""

import importlib.util
import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from alignment_core import logprobs, losses, training
from alignment_core.config import parse_config
from alignment_core.models import load_causal_lm, load_reward_model
from alignment_core.store import ArtifactStore
from alignment_core.tiny import POSITIVE_WORDS, build_tiny
from alignment_core.training import NonFiniteLossError, Trainer

ACCELERATE_CPU_CONFIG = Path(__file__).parents[1] / "deployments" / "accelerate" / "cpu_ddp_2proc.yaml"
ACCELERATE_ZERO3_CPU_CONFIG = ACCELERATE_CPU_CONFIG.with_name("cpu_deepspeed_zero3.yaml")
DEEPSPEED_SITE = Path(__file__).parents[1] / ".deepspeed"  # Makefile: DeepSpeed for this test, outside .venv
NEGATIVE = "bad sad angry terrible awful poor cold dark".split()
NOUNS = "dog cat sun moon tree river garden music".split()


@pytest.fixture(scope="module")
def tiny2_dir(tmp_path_factory) -> str:
    return str(build_tiny(tmp_path_factory.mktemp("tiny") / "llama2", num_layers=2))


def make_units(n: int, seed: int = 0, samples_per_prompt: int = 1) -> pd.DataFrame:
    """Prompts of random nouns; generation1 is positive words, generation2 negative ones (and an rl reward)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = "Tell me about the " + " ".join(rng.choice(NOUNS) for _ in range(rng.randint(2, 6)))
        for k in range(samples_per_prompt):
            positive = rng.random() < 0.5 if samples_per_prompt > 1 else True
            words = POSITIVE_WORDS if positive else NEGATIVE
            rows.append({
                "unit_id": f"u{i}-{k}", "prompt_id": f"p{i}", "prompt": prompt,
                "prompt_messages": [{"role": "user", "content": prompt}],
                "generation1_response": " ".join(rng.choice(words) for _ in range(rng.randint(4, 10))),
                "generation2_response": " ".join(rng.choice(NEGATIVE) for _ in range(rng.randint(4, 10))),
                "generation1_reward": 1.0 if positive else 0.0, "generation2_reward": 0.0,
            })
    return pd.DataFrame(rows)


def make_cfg(setup: str, loss: str, **training) -> object:
    settings = {"loss": loss, "batch_size": 4, "epochs": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                "scheduler": "constant", **training}
    return parse_config({"setup": setup, "training": settings})


def run_round(tmp_path, model_dir, cfg, units, name="round", **train_kwargs):
    store = ArtifactStore(str(tmp_path / "store"))
    trainer = Trainer(cfg, policy_path=model_dir, tokenizer_path=None, store=store)
    encoded = trainer.batch_factory.encode(units)
    result = trainer.train(encoded, store.checkpoint_uri(name, 0), store.stage_uri(name, 0, "metrics"),
                           **train_kwargs)
    return store, trainer, encoded, result


def step_metrics(store: ArtifactStore, metrics_uri: str) -> pd.DataFrame:
    frame = store.read_pandas(metrics_uri)
    return frame.pivot(index="step", columns="metric", values="value").sort_index()


@torch.no_grad()
def reward_pair_accuracy(trainer: Trainer, encoded: list[dict], model) -> float:
    """How often a reward model scores generation1 (chosen) above generation2 over all the training pairs."""
    batch = trainer.batch_factory.collate(encoded)
    ids, attention, _ = logprobs.concatenated_inputs(batch, ("generation1", "generation2"),
                                                    trainer.tokenizer.pad_token_id)
    chosen, rejected = model(input_ids=ids, attention_mask=attention).logits.squeeze(-1).chunk(2)
    return (chosen > rejected).float().mean().item()


@torch.no_grad()
def dpo_on_pairs(trainer: Trainer, encoded: list[dict], policy, reference, beta: float) -> tuple[float, float]:
    """(DPO loss, reward accuracy) of `policy` against `reference` over all the training pairs."""
    batch = trainer.batch_factory.collate(encoded)
    pad = trainer.tokenizer.pad_token_id
    inputs = logprobs.concatenated_inputs(batch, ("generation1", "generation2"), pad)
    policy_chosen, policy_rejected = logprobs.sequence_logps(policy, *inputs)[0].chunk(2)
    reference_chosen, reference_rejected = logprobs.sequence_logps(reference, *inputs)[0].chunk(2)
    out = losses.dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                     torch.ones(len(encoded)), beta)
    return out.loss.item(), out.metrics["reward_accuracy"].mean().item()


# ---- pieces ------------------------------------------------------------------------------------------------


def test_sequence_logps_matches_a_full_log_softmax(tiny2_dir):
    model = load_causal_lm(tiny2_dir).eval()
    torch.manual_seed(0)
    token_ids = torch.randint(10, 500, (3, 12))
    attention = torch.ones_like(token_ids)
    attention[2, 9:] = 0
    mask = torch.zeros_like(token_ids, dtype=torch.bool)
    mask[0, 4:12], mask[1, 7:12], mask[2, 5:9] = True, True, True
    with torch.no_grad():
        logps, counts = logprobs.sequence_logps(model, token_ids, attention, mask)
        full = model(input_ids=token_ids, attention_mask=attention).logits.log_softmax(-1)
    per_token = full[:, :-1].gather(2, token_ids[:, 1:, None]).squeeze(2)
    expected = (per_token * mask[:, 1:]).sum(1)
    assert counts.tolist() == [8, 5, 4]
    assert torch.allclose(logps, expected, atol=1e-4)


def test_length_sorted_chunks_give_the_same_logps_and_gradients(tiny2_dir, monkeypatch):
    monkeypatch.setattr(logprobs, "MIN_TOKENS_SAVED_PER_FORWARD", 0)  # chunk these short rows too
    model = load_causal_lm(tiny2_dir)
    torch.manual_seed(0)
    token_ids = torch.randint(10, 500, (5, 16))
    attention = torch.ones_like(token_ids)
    for row, length in enumerate([16, 6, 11, 9, 14]):
        attention[row, length:] = 0
    mask = attention.bool() & (torch.arange(16) >= 4)

    def logps_and_grad(rows_per_forward):
        model.zero_grad()
        logps, counts = logprobs.sequence_logps(model, token_ids, attention, mask, rows_per_forward)
        (logps * torch.arange(1.0, 6.0)).sum().backward()  # distinct weights: a row mix-up would show
        return logps.detach(), counts, model.model.layers[0].mlp.up_proj.weight.grad.clone()

    whole, chunked = logps_and_grad(0), logps_and_grad(2)
    assert torch.allclose(whole[0], chunked[0], atol=1e-4) and torch.equal(whole[1], chunked[1])
    assert torch.allclose(whole[2], chunked[2], atol=1e-5)


def test_rows_are_split_only_where_that_removes_enough_padding(tiny2_dir):
    """Each extra forward must remove MIN_TOKENS_SAVED_PER_FORWARD padded tokens: rows of similar lengths stay
    in one forward, rows of very different lengths go in length-sorted chunks."""
    model = load_causal_lm(tiny2_dir)
    forwards = []
    model.register_forward_hook(lambda module, args, output: forwards.append(1))

    def forwards_for(lengths):
        forwards.clear()
        token_ids = torch.randint(10, 500, (len(lengths), max(lengths)))
        attention = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
        with torch.no_grad():
            logprobs.sequence_logps(model, token_ids, attention, attention.bool() & (torch.arange(max(lengths)) >= 2),
                                    rows_per_forward=4)
        return len(forwards)

    assert forwards_for([44, 46, 45, 48, 43, 47, 44, 45]) == 1  # 8 rows, 6% padding: one forward
    assert forwards_for([40] * 4 + [300] * 4) == 2  # 4 x 260 = 1040 padded tokens removed by one more forward


def test_mismatched_inputs_pair_each_response_with_the_next_prompt():
    # rows: prompt tokens (1 2), (3), (4 5 6) then responses (7 8), (9), (10); 0 is padding
    token_ids = torch.tensor([[1, 2, 7, 8, 0], [3, 9, 0, 0, 0], [4, 5, 6, 10, 0]])
    attention = (token_ids != 0).long()
    responses = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]).bool()
    ids, mask, response_mask = logprobs.mismatched_inputs(token_ids, attention, responses, 0, max_length=16)
    assert ids.tolist() == [[3, 7, 8, 0], [4, 5, 6, 9], [1, 2, 10, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert response_mask.long().tolist() == [[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]]


def test_plan_steps_covers_every_example_and_does_not_depend_on_the_split():
    units = [[i] for i in range(10)]
    one_process = training.plan_steps(units, examples_per_step=4, micro_batches=2, epochs=2, seed=3)
    assert len(one_process) == 6  # 4 + 4 + 2 per epoch
    for epoch in (one_process[:3], one_process[3:]):
        assert sorted(i for step in epoch for micro in step for i in micro) == list(range(10))
    # 1 process x 2 accumulation steps and 2 processes x 1 give the same micro-batches
    assert training.plan_steps(units, 4, 2, 2, 3) == one_process
    groups = [[0, 1], [2, 3, 4], [5, 6], [7, 8]]
    for step in training.plan_steps(groups, examples_per_step=4, micro_batches=2, epochs=1, seed=0):
        for micro in step:
            assert all(set(g) <= set(micro) or not set(g) & set(micro) for g in groups)
    with pytest.raises(ValueError, match="cannot fill one optimizer step"):
        training.plan_steps([[0]], examples_per_step=4, micro_batches=2, epochs=1, seed=0)


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    files = training.optimizer_state_files(optimizer.state_dict())
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    restored.load_state_dict(training.optimizer_state_from_files(files["optimizer.safetensors"],
                                                                 files["optimizer.json"]))
    assert restored.param_groups[0]["lr"] == 0.1
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])


def test_a_sharded_optimizers_full_state_round_trips_by_parameter_name():
    """FSDP's full optimizer state is keyed by parameter names, which hold dots ('0.weight')."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    full = StateDictOptions(full_state_dict=True)
    files = training.optimizer_state_files(get_optimizer_state_dict(model, optimizer, options=full))
    restored_model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    restored = torch.optim.AdamW(restored_model.parameters(), lr=0.5)
    state = training.optimizer_state_from_files(files["optimizer.safetensors"], files["optimizer.json"])
    assert set(state["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    set_optimizer_state_dict(restored_model, restored, state, options=full)
    assert restored.param_groups[0]["lr"] == 0.1
    for index in range(4):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored.state_dict()["state"][index][key], optimizer.state_dict()["state"][index][key])


def test_a_loss_that_does_not_fit_the_setup_never_reaches_a_trainer(tiny2_dir, tmp_path):
    with pytest.raises(ValueError, match="does not fit setup 'sft'"):
        Trainer(make_cfg("sft", "dpo"), tiny2_dir, None, ArtifactStore(str(tmp_path)))


# ---- rounds --------------------------------------------------------------------------------------------------


def test_dpo_round_lowers_the_loss_and_raises_reward_accuracy(tiny2_dir, tmp_path):
    cfg = make_cfg("offline_pairwise", "dpo", epochs=3)
    store, trainer, encoded, result = run_round(tmp_path, tiny2_dir, cfg, make_units(16))
    assert result.steps == 12
    reference = load_causal_lm(tiny2_dir).eval()
    before_loss, before_accuracy = dpo_on_pairs(trainer, encoded, reference, reference, cfg.training.beta)
    trained = load_causal_lm(store.local_checkpoint(result.checkpoint_uri)).eval()
    after_loss, after_accuracy = dpo_on_pairs(trainer, encoded, trained, reference, cfg.training.beta)
    assert before_loss == pytest.approx(math.log(2), abs=1e-5) and before_accuracy == 0.0
    assert after_loss < 0.5 * before_loss
    assert after_accuracy >= 0.9
    metrics = step_metrics(store, store.stage_uri("round", 0, "metrics"))
    assert list(metrics.index) == list(range(1, 13))
    for name in ("loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "logratio_mean",
                 "grad_norm", "learning_rate", "tokens_per_s"):
        assert metrics[name].notna().all(), name
    assert metrics["loss"].iloc[0] == pytest.approx(math.log(2), abs=1e-4)
    assert result.metrics["loss"] == pytest.approx(metrics["loss"].iloc[-1])


def test_dpo_on_the_fly_reference_matches_precomputed(tiny2_dir, tmp_path):
    units = make_units(8)
    results = [run_round(tmp_path / str(flag), tiny2_dir, make_cfg("offline_pairwise", "dpo", epochs=1,
                                                                   precompute_reference=flag), units)
               for flag in (True, False)]
    losses_by_mode = [step_metrics(s, s.stage_uri("round", 0, "metrics"))["loss"].tolist() for s, *_ in results]
    assert losses_by_mode[0] == pytest.approx(losses_by_mode[1], abs=1e-5)


def test_sft_loss_decreases(tiny2_dir, tmp_path):
    store, *_ = run_round(tmp_path, tiny2_dir, make_cfg("sft", "sft", epochs=3), make_units(16))
    loss = step_metrics(store, store.stage_uri("round", 0, "metrics"))["loss"]
    assert loss.iloc[-2:].mean() < 0.7 * loss.iloc[0]


@pytest.mark.parametrize(("setup", "loss"), [("offline_pointwise", "kto"), ("rl", "rl"),
                                              ("offline_pairwise", "simpo"), ("offline_pairwise", "ipo")])
def test_other_losses_run_a_round(tiny2_dir, tmp_path, setup, loss):
    units = make_units(8, samples_per_prompt=2 if loss == "rl" else 1)
    if loss == "kto":  # half desirable, half not
        units["generation1_reward"] = [float(i % 2) for i in range(len(units))]
    store, _, _, result = run_round(tmp_path, tiny2_dir, make_cfg(setup, loss, epochs=1), units)
    metrics = step_metrics(store, store.stage_uri("round", 0, "metrics"))
    assert result.steps == len(metrics) > 0
    assert metrics["loss"].map(math.isfinite).all()
    if loss in ("kto", "rl"):
        assert (metrics["kl"] >= 0).all() if loss == "kto" else metrics["kl"].notna().all()


def test_reward_model_training_raises_pair_accuracy(tiny2_dir, tmp_path):
    cfg = make_cfg("reward_modelling", "reward", epochs=3)
    units = make_units(16)
    store, trainer, encoded, result = run_round(tmp_path, tiny2_dir, cfg, units)

    before = reward_pair_accuracy(trainer, encoded, load_reward_model(tiny2_dir).eval())
    checkpoint = store.local_checkpoint(result.checkpoint_uri)
    from transformers import AutoModelForSequenceClassification

    trained = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    assert trained.config.num_labels == 1
    after = reward_pair_accuracy(trainer, encoded, trained)
    assert after >= 0.9 and after > before
    # loads as the annotator does
    assert reward_pair_accuracy(trainer, encoded, load_reward_model(checkpoint).eval()) == after


# ---- the NaN guard and resume ---------------------------------------------------------------------------------


def checkpoint_bytes(store: ArtifactStore, uri: str) -> dict[str, bytes]:
    folder = Path(store.local_checkpoint(uri, resume_point=True))  # a mid-round save is a resume point
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.fault("NaN loss keeps the last checkpoint")
def test_nan_loss_stops_the_round_and_keeps_the_last_checkpoint(tiny2_dir, tmp_path, monkeypatch):
    real_dpo, calls = losses.dpo, []

    def dpo_with_nan_at_step_2(*args, **kwargs):
        calls.append(1)
        out = real_dpo(*args, **kwargs)
        if len(calls) == 2:
            out.losses = out.losses * float("nan")
        return out

    monkeypatch.setattr(losses, "dpo", dpo_with_nan_at_step_2)
    store = ArtifactStore(str(tmp_path / "store"))
    uri = store.checkpoint_uri("nan", 0)
    saved: dict[int, dict[str, bytes]] = {}

    def snapshot(step, total, metrics):
        saved[step] = checkpoint_bytes(store, uri)

    cfg = make_cfg("offline_pairwise", "dpo", save_every_steps=1)
    trainer = Trainer(cfg, policy_path=tiny2_dir, tokenizer_path=None, store=store)
    encoded = trainer.batch_factory.encode(make_units(16))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at optimizer step 2: nan") as error:
        trainer.train(encoded, uri, store.stage_uri("nan", 0, "metrics"), progress_callback=snapshot)
    assert error.value.step == 2 and math.isnan(error.value.loss)
    assert list(saved) == [1]
    assert checkpoint_bytes(store, uri) == saved[1]  # byte-identical: nothing written after step 1
    assert json.loads(saved[1]["trainer_state.json"])["step"] == 1


class Interrupted(Exception):
    pass


def test_resume_continues_to_the_same_weights(tiny2_dir, tmp_path):
    cfg = make_cfg("offline_pairwise", "dpo", epochs=1, save_every_steps=2, scheduler="cosine", warmup_ratio=0.25)
    units = make_units(16)
    store_a, _, _, uninterrupted = run_round(tmp_path / "a", tiny2_dir, cfg, units)

    def stop_at_step_3(step, total, metrics):
        if step == 3:
            raise Interrupted

    store_b = ArtifactStore(str(tmp_path / "b" / "store"))
    with pytest.raises(Interrupted):
        run_round(tmp_path / "b", tiny2_dir, cfg, units, progress_callback=stop_at_step_3)
    state = json.loads(Path(store_b.local_checkpoint(store_b.checkpoint_uri("round", 0), resume_point=True),
                            "trainer_state.json").read_text())
    assert state["step"] == 2
    _, _, _, resumed = run_round(tmp_path / "b", tiny2_dir, cfg, units)
    assert resumed.steps == uninterrupted.steps == 4
    marker = f"{resumed.checkpoint_uri}/_complete.json"
    saved_at = store_b.read_json(marker)["saved_at"]
    _, _, _, finished = run_round(tmp_path / "b", tiny2_dir, cfg, units)  # a finished round is not redone
    assert finished.metrics == resumed.metrics and store_b.read_json(marker)["saved_at"] == saved_at

    weights_a = load_causal_lm(store_a.local_checkpoint(uninterrupted.checkpoint_uri)).state_dict()
    weights_b = load_causal_lm(store_b.local_checkpoint(resumed.checkpoint_uri)).state_dict()
    for name, value in weights_a.items():
        assert torch.allclose(value, weights_b[name], atol=1e-6), name
    loss_a = step_metrics(store_a, store_a.stage_uri("round", 0, "metrics"))["loss"]
    loss_b = step_metrics(store_b, store_b.stage_uri("round", 0, "metrics"))["loss"]
    assert list(loss_b.index) == [1, 2, 3, 4]
    assert loss_b.tolist() == pytest.approx(loss_a.tolist(), abs=1e-6)


def test_a_resume_point_without_optimizer_state_resumes_with_fresh_moments(tiny2_dir, tmp_path, caplog):
    """DeepSpeed's resume points carry no optimizer state: the round resumes at its step and schedule, the
    moments start afresh, and the log says so."""
    cfg = make_cfg("offline_pairwise", "dpo", epochs=1, save_every_steps=2, scheduler="cosine")

    def stop_at_step_3(step, total, metrics):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_round(tmp_path, tiny2_dir, cfg, make_units(16), progress_callback=stop_at_step_3)
    store = ArtifactStore(str(tmp_path / "store"))
    local = Path(store.local_checkpoint(store.checkpoint_uri("round", 0), resume_point=True))
    for name in (training.OPTIMIZER_TENSORS, training.OPTIMIZER_SCALARS):
        (local / name).unlink()
    with caplog.at_level(logging.WARNING, logger="alignment_core.training"):
        _, trainer, _, result = run_round(tmp_path, tiny2_dir, cfg, make_units(16))
    assert "no optimizer state" in caplog.text and "start afresh at step 2" in caplog.text
    assert result.steps == 4
    assert list(step_metrics(store, store.stage_uri("round", 0, "metrics")).index) == [1, 2, 3, 4]


# ---- distributed -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_processes_match_one_process(tiny2_dir, tmp_path):
    """The same global batch of 8 pairs per step: 1 process x 8 vs 2 processes x 4 (DDP over gloo).

    The 2-process run must really be two processes: with a per-process batch of 4 a single process would
    take 12 steps instead of 6, which the step count below catches."""
    store = ArtifactStore(str(tmp_path / "store"))
    units_uri = store.stage_uri("ddp", 0, "units")
    store.write_stage(units_uri, "units", {"test": 1}, [__import__("pyarrow").Table.from_pandas(make_units(24))])
    losses_by_processes = {}
    for processes, batch_size in ((1, 8), (2, 4)):
        config = {"setup": "offline_pairwise", "model": {"policy": tiny2_dir},
                  "store": {"root": str(tmp_path / "store"), "run_name": "ddp"},
                  "training": {"loss": "dpo", "batch_size": batch_size, "epochs": 2, "learning_rate": 1e-3}}
        config_path = tmp_path / f"config-{processes}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        metrics_uri = store.stage_uri("ddp", processes, "metrics")
        # torchrun-style launcher (accelerate's --cpu one starts several processes only through MPI)
        launcher = ["--config_file", str(ACCELERATE_CPU_CONFIG)] if processes == 2 else ["--cpu"]
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
                   "-m", "alignment_core.training", "--config", str(config_path), "--units", units_uri,
                   "--checkpoint", store.checkpoint_uri("ddp", processes), "--metrics", metrics_uri]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        completed = subprocess.run(command, capture_output=True, text=True, timeout=540, env=env)
        assert completed.returncode == 0, completed.stderr[-4000:]
        losses_by_processes[processes] = step_metrics(store, metrics_uri)["loss"]
    one, two = losses_by_processes[1], losses_by_processes[2]
    assert len(one) == len(two) == 6
    assert (one - two).abs().max() < 1e-4
    assert one.iloc[-1] < one.iloc[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_deepspeed_zero3_round_matches_a_plain_one(tiny2_dir, tmp_path):
    """ZeRO-3 (one CPU process) against no DeepSpeed, 2 micro-batches per step: the same losses, gradient norms
    and saved weights. DeepSpeed steps inside `backward` and scales by its accumulation steps: stepping at each
    micro-batch, or a gradient divided by 2, changes the steps' gradient norms; a save that does not gather the
    partitioned parameters writes empty tensors."""
    site = DEEPSPEED_SITE if (DEEPSPEED_SITE / "deepspeed").is_dir() else None
    if site is None and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (`make test` puts it in .deepspeed/)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
        env["PATH"] = os.pathsep.join([str(site / "bin"), env["PATH"]])  # ninja, for the op DeepSpeed compiles
    store = ArtifactStore(str(tmp_path / "store"))
    units_uri = store.stage_uri("zero3", 0, "units")
    store.write_stage(units_uri, "units", {"test": 1}, [__import__("pyarrow").Table.from_pandas(make_units(16))])
    steps, weights = {}, {}
    for name, launcher in (("plain", ["--cpu"]), ("zero3", ["--config_file", str(ACCELERATE_ZERO3_CPU_CONFIG)])):
        config = {"setup": "offline_pairwise", "model": {"policy": tiny2_dir},
                  "store": {"root": str(tmp_path / "store"), "run_name": "zero3"},
                  "training": {"loss": "dpo", "batch_size": 2, "gradient_accumulation_steps": 2, "epochs": 1,
                               "learning_rate": 1e-3, "max_grad_norm": 0.5, "save_every_steps": 2}}
        config_path = tmp_path / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        metrics_uri, checkpoint_uri = store.stage_uri(name, 0, "metrics"), store.checkpoint_uri(name, 0)
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "1",
                   "-m", "alignment_core.training", "--config", str(config_path), "--units", units_uri,
                   "--checkpoint", checkpoint_uri, "--metrics", metrics_uri]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=540, env=env)
        assert completed.returncode == 0, completed.stderr[-4000:]
        steps[name] = step_metrics(store, metrics_uri)
        weights[name] = load_causal_lm(store.local_checkpoint(checkpoint_uri)).state_dict()
    plain, zero3 = steps["plain"], steps["zero3"]
    assert len(plain) == len(zero3) == 4
    assert (plain["loss"] - zero3["loss"]).abs().max() < 1e-4
    assert (plain["grad_norm"] / zero3["grad_norm"] - 1).abs().max() < 1e-3
    assert plain["grad_norm"].iloc[-1] > 0.5  # clipped, by DeepSpeed in the ZeRO-3 run
    for key, value in weights["plain"].items():
        torch.testing.assert_close(weights["zero3"][key], value, atol=1e-5, rtol=1e-4)


# ---- padding-free forwards -----------------------------------------------------------------------------------


def test_packed_forwards_give_the_log_probs_and_gradients_of_padded_rows(tiny2_dir):
    model = load_causal_lm(tiny2_dir)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 40, (6,), generator=generator)
    ids = torch.zeros(6, int(lengths.max()), dtype=torch.long)
    attention = torch.zeros_like(ids)
    responses = torch.zeros_like(ids, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        ids[row, :length] = torch.randint(5, 200, (length,), generator=generator)
        attention[row, :length] = 1
        responses[row, 1 + row % 5 : length] = True  # prompts of 1-5 tokens
    padded, padded_counts = logprobs.sequence_logps(model, ids, attention, responses)
    padded.sum().backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert padded_counts.tolist() == (lengths - 1 - torch.arange(6) % 5).tolist()
    for one_row in (False, True):  # rows as wide as the longest sequence (sdpa, eager), or one row (flash)
        model.zero_grad()
        packed, packed_counts = logprobs.sequence_logps(model, ids, attention, responses, packed=True,
                                                        one_row=one_row)
        packed.sum().backward()
        assert torch.equal(packed_counts, padded_counts)
        torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-6)
        for padded_grad, parameter in zip(padded_grads, model.parameters(), strict=True):
            torch.testing.assert_close(parameter.grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_a_packed_round_matches_a_padded_one_and_falls_back_where_attention_mixes_sequences(
        tiny2_dir, tmp_path, monkeypatch, caplog):
    """transformers keeps packed sequences apart by reading restarts of the position ids; a model that does not
    (simulated: the detection switched off) would give wrong log-probs, so the round falls back to padding."""
    import transformers.masking_utils

    units = make_units(8)

    def first_step(name: str, one_row: bool = False, **training_config) -> tuple[Trainer, pd.Series]:
        store = ArtifactStore(str(tmp_path / name))
        trainer = Trainer(make_cfg("offline_pairwise", "dpo", **training_config), policy_path=tiny2_dir,
                          tokenizer_path=None, store=store)
        trainer.one_row = one_row  # one row: every sequence in it, so that they would see each other
        trainer.train(trainer.batch_factory.encode(units), store.checkpoint_uri("round", 0),
                      store.stage_uri("round", 0, "metrics"))
        return trainer, step_metrics(store, store.stage_uri("round", 0, "metrics")).iloc[0]

    _, padded = first_step("padded", padding_free=False)
    for one_row in (False, True):
        trainer, packed = first_step(f"packed-{one_row}", one_row, padding_free=True)
        assert trainer.packed
        assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with caplog.at_level(logging.WARNING, logger="alignment_core.training"):
        trainer, mixed = first_step("mixed", one_row=True, padding_free=True)
    assert not trainer.packed and "using padded rows" in caplog.text
    assert mixed["loss"] == pytest.approx(padded["loss"], rel=1e-5)


# ---- prefix sharing -------------------------------------------------------------------------------------------


def shared_prompt_pairs(n: int, seed: int = 0):
    """Rows i and i + n: two responses (of 1-30 tokens) to one prompt (of 1-12 tokens), right padded."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> torch.Tensor:
        return torch.randint(5, 200, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                             generator=generator)

    prompts = [tokens(1, 12) for _ in range(n)]
    sequences = [torch.cat([prompts[i % n], tokens(1, 30)]) for i in range(2 * n)]
    ids = torch.zeros(2 * n, max(len(s) for s in sequences), dtype=torch.long)
    attention = torch.zeros_like(ids)
    responses = torch.zeros_like(ids, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)], attention[row, : len(sequence)] = sequence, 1
        responses[row, len(prompts[row % n]) : len(sequence)] = True
    return ids, attention, responses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_shared_forwards_give_the_log_probs_and_gradients_of_padded_rows(tiny2_dir, attention):
    model = load_causal_lm(tiny2_dir, attn_implementation=attention)
    ids, mask, responses = shared_prompt_pairs(6)
    assert logprobs.shared_prompts(ids, responses)
    padded, padded_counts = logprobs.sequence_logps(model, ids, mask, responses)
    padded.sum().backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    additive = torch.float32 if attention == "eager" else None  # eager adds its mask to the scores
    for pairs_per_forward in (0, 2):
        model.zero_grad()
        shared, shared_counts = logprobs.sequence_logps(model, ids, mask, responses, pairs_per_forward,
                                                        prefix_sharing=True, additive_mask=additive)
        shared.sum().backward()
        assert torch.equal(shared_counts, padded_counts)
        torch.testing.assert_close(shared, padded, atol=1e-4, rtol=1e-6)
        for padded_grad, parameter in zip(padded_grads, model.parameters(), strict=True):
            torch.testing.assert_close(parameter.grad, padded_grad, atol=1e-5, rtol=1e-4)
    # The second response must not see the first: with the first's tokens changed, the second's log-probs stay
    n = ids.shape[0] // 2
    changed = ids.clone()
    changed[:n][responses[:n]] = 7
    with torch.no_grad():
        before = logprobs.sequence_logps(model, ids, mask, responses, prefix_sharing=True, additive_mask=additive)[0]
        after = logprobs.sequence_logps(model, changed, mask, responses, prefix_sharing=True, additive_mask=additive)[0]
    torch.testing.assert_close(after[n:], before[n:], atol=1e-5, rtol=0)
    assert not torch.allclose(after[:n], before[:n])


def test_rows_share_a_prompt_only_with_the_same_tokens_up_to_the_same_response_start():
    ids, mask, responses = shared_prompt_pairs(3)
    assert logprobs.shared_prompts(ids, responses)
    other = ids.clone()
    other[4, 0] += 1  # pair 1's second row: another first prompt token
    assert not logprobs.shared_prompts(other, responses)
    shorter = responses.clone()
    start = int(responses[3].float().argmax())
    shorter[3, start] = False  # pair 0's second row: its response starts a token later (a truncated prompt)
    assert not logprobs.shared_prompts(ids, shorter)
    assert not logprobs.shared_prompts(ids[:5], responses[:5])  # not pairs


def test_a_prefix_shared_round_matches_a_padded_one_and_falls_back_where_attention_ignores_the_mask(
        tiny2_dir, tmp_path, monkeypatch, caplog):
    """transformers passes a 4D mask to the attention as it is; a model that built its own causal mask instead
    (simulated: the 4D mask dropped) would let each pair's second response see the first, so the round falls back
    to padded rows."""
    import transformers.masking_utils

    units = make_units(8)

    def first_step(name: str, **training_config) -> tuple[Trainer, pd.Series, dict]:
        store = ArtifactStore(str(tmp_path / name))
        trainer = Trainer(make_cfg("offline_pairwise", "dpo", **training_config), policy_path=tiny2_dir,
                          tokenizer_path=None, store=store)
        metrics_uri = store.stage_uri("round", 0, "metrics")
        trainer.train(trainer.batch_factory.encode(units), store.checkpoint_uri("round", 0), metrics_uri)
        return trainer, step_metrics(store, metrics_uri).iloc[0], store.read_manifest(metrics_uri)["extra"]

    _, padded, recorded = first_step("padded", prefix_sharing=False)
    assert recorded["prefix_sharing"] is False
    trainer, shared, recorded = first_step("shared")  # None: on, on a CPU
    assert trainer.prefix_sharing and recorded["prefix_sharing"] is True
    assert recorded["gradient_checkpointing"] is False  # None: off when every weight trains
    assert not trainer.model_unwrapped.model.gradient_checkpointing
    assert shared["loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert shared["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    preprocess = transformers.masking_utils._preprocess_mask_arguments

    def without_custom_masks(config, inputs_embeds, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.ndim == 4:
            attention_mask = None
        return preprocess(config, inputs_embeds, attention_mask, *args, **kwargs)

    monkeypatch.setattr(transformers.masking_utils, "_preprocess_mask_arguments", without_custom_masks)
    with caplog.at_level(logging.WARNING, logger="alignment_core.training"):
        trainer, mixed, _ = first_step("mixed", prefix_sharing=True)
    assert not trainer.prefix_sharing and "prefix_sharing: sharing prompts changes" in caplog.text
    assert mixed["loss"] == pytest.approx(padded["loss"], rel=1e-5)


def test_prefix_sharing_is_for_pairs_of_causal_lm_responses(tiny2_dir, tmp_path):
    store = ArtifactStore(str(tmp_path))
    for setup, loss, shares in (("offline_pairwise", "dpo", True), ("offline_pointwise", "kto", False),
                                ("sft", "sft", False), ("reward_modelling", "reward", False)):
        cfg = make_cfg(setup, loss, prefix_sharing=True)
        assert Trainer(cfg, policy_path=tiny2_dir, tokenizer_path=None, store=store).prefix_sharing is shares, setup


def test_a_one_step_round_with_warmup_still_trains(tiny2_dir, tmp_path, caplog):
    """A warm-up's first step has learning rate 0: a one-step round that were all warm-up would change nothing."""
    cfg = make_cfg("offline_pairwise", "dpo", epochs=1, warmup_ratio=0.1, scheduler="linear")
    with caplog.at_level(logging.WARNING, logger="alignment_core.training"):
        store, _, _, result = run_round(tmp_path, tiny2_dir, cfg, make_units(4))
    assert result.steps == 1 and "warming up over 0" in caplog.text
    assert step_metrics(store, store.stage_uri("round", 0, "metrics"))["learning_rate"].iloc[0] == 1e-3
    before, after = load_causal_lm(tiny2_dir).state_dict(), load_causal_lm(
        store.local_checkpoint(result.checkpoint_uri)).state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
