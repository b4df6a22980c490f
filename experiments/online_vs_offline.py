"""Online vs offline preference learning: the claim of online AI feedback (OAIF, Guo et al. 2024), reproduced
by the pipeline's own stages on the tiny task, on a CPU.

    python -m experiments.online_vs_offline [--seeds 5] [--quick] [--store-root DIR] [--arms a,b]
    python -m experiments.online_vs_offline --gpu      # hub models and vLLM instead of the tiny model (see GPU)
    python -m experiments.online_vs_offline --dev --set dpo_beta=0.3   # try a recipe away from the held-out topics

The task: answer in a positive tone. The true reward (`alignment_core.rewards.positive_words`) counts distinct
positive words and takes 0.05 per word beyond 20, so repeating a word or padding the answer does not pay.

1. Two SFT rounds on bundled:sft (the `sft` flow), shared by all seeds: the policy pi_0 from tiny://llama, and
   the behaviour model rho from another tiny model (seed 1: its own weights and tokenizer), same recipe.
2. Per seed, the offline dataset: rho answers each iteration's prompts twice and the true reward labels the
   pair (the annotate stage with the programmatic annotator). Iteration k's pairs become an examples stage; all
   pairs together are a prompt/chosen/rejected jsonl, the dataset a user would download.
3. Per seed, reward models: reward heads on pi_0 trained on that jsonl by the `reward-model` flow (three for an
   ensemble, differing in their training seed).
4. Per seed, the arms: K iterations of DPO from pi_0 (the reference stays pi_0). Iteration k of every arm sees
   the same P prompts, so every arm gets the same number of labelled pairs per iteration. By default:
     offline                      DPO on rho's pairs of iteration k (the distribution-shift case)
     offline-importance-tempered  the same, each pair weighted by its tempered, clipped pi / rho ratio
     online-rm-ensemble           the current policy answers twice, the reward-model ensemble labels (no new
                                  true labels)
     online-cascade-25            the same, the ensemble's least sure quarter of the pairs labelled by the true
                                  reward instead
     online-oracle                the current policy answers twice, the true reward labels
   and opt-in (--arms): offline-importance (untempered), online-rm (one reward model), online-cascade-12 and -50,
   and online-cascade-25-refresh (the ensemble retrained on the escalated labels before each iteration).
5. The report, per arm and iteration, mean and spread over seeds: the true reward of 4 answers to each of 40
   held-out prompts (topics no training prompt mentions; the `heldout_samples` stage), the win-rate against
   pi_0's answers judged by the true reward, and the answers' length. A Markdown table and a PNG in the store
   (`report/`), and as Prefect artifacts. (Each iteration also runs the pipeline's own `evaluate` stage.)

Every step is a stage in the store, so a rerun skips what is complete and a killed run resumes.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from alignment_core import pipeline
from alignment_core.config import TINY_MODEL, PipelineConfig, parse_config
from alignment_core.data import DatasetLoader
from alignment_core.refresh import refreshes
from alignment_core.rewards import positive_words, words
from alignment_core.store import ArtifactStore
from alignment_core.tiny import build_tiny
from flows.offline import reward_model, sft
from tasks import parse, stage_task
from tasks.annotate import annotate
from tasks.evaluate import evaluate_policy
from tasks.generate import generate
from tasks.load_prompts import load_eval_prompts, load_prompts
from tasks.refresh import refresh_reward_models
from tasks.train import train
from tasks.units_and_weights import units_and_weights

ORACLE = "alignment_core.rewards:positive_words"
# `make experiment`'s arms: offline DPO on rho's labelled pairs, the same reweighted, and online DPO labelled by a
# reward-model ensemble (no new true labels), by a cascade (the ensemble, its least sure quarter sent to the true
# reward) and by the true reward. The others are opt-in (--arms).
ARMS = ("offline", "offline-importance-tempered", "online-rm-ensemble", "online-cascade-25", "online-oracle")
# Online with a reward-model ensemble, and cascades that send a budget of the ensemble's least sure pairs per
# iteration to the true reward (12.5%, 25%, 50% of the prompts).
ENSEMBLE_ARMS = ("online-rm-ensemble", "online-cascade-12", "online-cascade-25", "online-cascade-50")
CASCADE_BUDGETS = {"online-cascade-12": 0.125, "online-cascade-25": 0.25, "online-cascade-50": 0.5,
                   "online-cascade-25-refresh": 0.25}
ENSEMBLE_SIZE = 3  # reward models per seed, trained alike but for their training seed
# Opt-in: the reward models learn online: a 25% cascade whose ensemble members are trained on bootstrap resamples of
# rho's pairs, and fine-tuned before each iteration on the true labels escalated so far (annotation.cascade.refresh,
# at the reward models' own learning rate and epochs).
REFRESH_ARMS = ("online-cascade-25-refresh",)
# Opt-in: importance weights made gentler: each response's typical ratio (the pair's mean), tempered (T = 4),
# clipped to [1/2, 2], and uniform when fewer than a third of the pairs would carry the weight.
TEMPERED_IMPORTANCE = {"strategy": "importance", "importance_pair": "mean", "temperature": 4.0, "clip": 2.0,
                       "min_effective_sample_fraction": 0.33}
CHEAP_ANNOTATOR_ARMS = ("online-rm", *ENSEMBLE_ARMS, *REFRESH_ARMS)
ALL_ARMS = ("offline", "offline-importance", "offline-importance-tempered", "online-rm", *ENSEMBLE_ARMS,
            *REFRESH_ARMS, "online-oracle")  # the report's order
TINY_BEHAVIOUR = "tiny://llama-seed1"  # the tiny model built with seed 1 (weights and tokenizer)


@dataclasses.dataclass(frozen=True)
class Setting:
    """The models and sizes of one experiment."""

    name: str
    policy: str = TINY_MODEL  # pi_0 before its SFT round
    behaviour: str = TINY_BEHAVIOUR  # rho before its SFT round
    backend: str = "transformers"
    mixed_precision: str = "no"
    sft_learning_rate: float = 2e-3
    sft_epochs: int = 4
    sft_batch_size: int = 16
    iterations: int = 4  # K
    prompts_per_iteration: int = 32  # P: one labelled pair per prompt and iteration, in every arm
    max_new_tokens: int = 40  # room for more than 20 words: padding is possible, and penalised
    reward_model_learning_rate: float = 5e-4
    reward_model_epochs: int = 3
    dpo_beta: float = 0.1
    dpo_learning_rate: float = 5e-4
    dpo_epochs: int = 2
    dpo_batch_size: int = 8
    dpo_chosen_nll_weight: float = 0.0  # training.chosen_nll_weight (RPO's alpha)
    eval_prompts: int = 40  # the held-out tail of bundled:prompts
    prompt_rows: int | None = None  # the first rows of bundled:prompts the setting uses (None: all 200)
    first_seed: int = 0  # seeds first_seed, first_seed + 1, ...
    # Answers per prompt where a cheap annotator labels (a reward model, or a cascade's first annotator): its
    # labels cost nothing, so the pair is the best and worst of more answers. The oracle arm keeps 2, the label
    # count of the offline arms.
    cheap_samples: int = 2
    cheap_label_smoothing: float = 0.0  # > 0: those arms train with cdpo, their labels flipped with this probability
    heldout_samples: int = 4  # answers per held-out prompt: one answer each leaves +-0.15 of sampling noise


FULL = Setting(name="full")
QUICK = dataclasses.replace(FULL, name="quick", iterations=2)  # the CI test's size
# DEV: where recipe choices are made without looking at the held-out topics. It trains on the first 128 prompts of
# bundled:prompts (FULL draws its 4 x 32 from the first 160) and measures on the next 32 (training topics, never
# trained on); the 40 held-out-topic prompts are not read. Its seeds (100, 101, ...) are not the reported ones.
DEV = dataclasses.replace(FULL, name="dev", prompt_rows=160, eval_prompts=32, first_seed=100)
# GPU: a small hub instruct model as pi_0 and another family as rho, sampled with vLLM, trained in bf16 autocast.
# The machine needs the hub (or HF_HOME holding both models). Not run in this project's CI.
GPU = dataclasses.replace(
    FULL, name="gpu", policy="Qwen/Qwen2.5-0.5B-Instruct", behaviour="HuggingFaceTB/SmolLM2-360M-Instruct",
    backend="vllm", mixed_precision="bf16", sft_learning_rate=1e-5, sft_epochs=2, sft_batch_size=16,
    iterations=4, prompts_per_iteration=40, max_new_tokens=64,
    reward_model_learning_rate=1e-5, reward_model_epochs=2, dpo_learning_rate=2e-6, dpo_epochs=2,
)
SETTINGS = {setting.name: setting for setting in (FULL, QUICK, DEV, GPU)}


# ---- configs ---------------------------------------------------------------------------------------------
def _merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and key in base else value
    return merged


def stage_config(setting: Setting, store_root: str, run_name: str, seed: int = 0, **changes) -> PipelineConfig:
    """The config every run of the experiment shares; `changes` (nested dicts) make it one run's."""
    base = {
        "setup": "online_pairwise",
        "iterations": setting.iterations,
        "data": {"source": "bundled:prompts", "eval_prompts": setting.eval_prompts, "max_rows": setting.prompt_rows},
        "generation": {"backend": setting.backend, "prompts_per_iteration": setting.prompts_per_iteration,
                       "n_samples": 2, "temperature": 1.0, "max_new_tokens": setting.max_new_tokens, "seed": seed},
        "annotation": {"annotator": "programmatic", "programmatic": ORACLE, "pair_selection": "best_vs_worst"},
        "reweight": {"strategy": "uniform"},
        "training": {"seed": seed, "mixed_precision": setting.mixed_precision},
        "evaluation": {"max_new_tokens": setting.max_new_tokens, "oracle": ORACLE},
        "store": {"root": store_root, "run_name": run_name},
    }
    return parse_config(_merge(base, changes))


def sft_config(setting: Setting, store_root: str, run_name: str, base_model: str) -> PipelineConfig:
    return stage_config(
        setting, store_root, run_name, setup="sft", iterations=1,
        # The experiment measures on its own held-out topics: SFT learns from every demonstration.
        data={"source": "bundled:sft", "eval_prompts": 0, "max_rows": None}, model={"policy": base_model},
        training={"loss": "sft", "learning_rate": setting.sft_learning_rate, "epochs": setting.sft_epochs,
                  "batch_size": setting.sft_batch_size},
        evaluation={"enabled": False},  # every arm's iteration 0 evaluates pi_0
    )


def arm_config(setting: Setting, store_root: str, seed: int, arm: str, sft_policy: str, behaviour: str,
               reward_models: list[str], bootstrap_models: list[str] | None = None) -> PipelineConfig:
    changes: dict = {"model": {"policy": sft_policy, "reference": sft_policy}, "training": {
        "loss": "dpo", "beta": setting.dpo_beta, "learning_rate": setting.dpo_learning_rate,
        "epochs": setting.dpo_epochs, "batch_size": setting.dpo_batch_size,
        "chosen_nll_weight": setting.dpo_chosen_nll_weight}}
    if arm in CHEAP_ANNOTATOR_ARMS and setting.cheap_label_smoothing:
        changes["training"].update(loss="cdpo", label_smoothing=setting.cheap_label_smoothing)
    if arm.startswith("offline"):
        changes["setup"] = "offline_pairwise"
    if arm == "offline-importance":
        changes["reweight"] = {"strategy": "importance", "behaviour_model": behaviour}
    if arm == "offline-importance-tempered":
        changes["reweight"] = {**TEMPERED_IMPORTANCE, "behaviour_model": behaviour}
    if arm == "online-rm":
        changes["annotation"] = {"annotator": "reward_model", "reward_model": reward_models[0]}
    if arm == "online-rm-ensemble":
        changes["annotation"] = {"annotator": "reward_model", "reward_model": reward_models}
    if arm in CASCADE_BUDGETS:
        changes["annotation"] = {"annotator": "cascade", "reward_model": reward_models, "cascade": {
            "first": "reward_model", "escalate_to": "programmatic", "budget": CASCADE_BUDGETS[arm]}}
    if arm in CHEAP_ANNOTATOR_ARMS:
        changes["generation"] = {"n_samples": setting.cheap_samples}
    if arm in REFRESH_ARMS:
        changes["annotation"]["reward_model"] = bootstrap_models
        changes["annotation"]["cascade"]["refresh"] = {
            "enabled": True, "learning_rate": setting.reward_model_learning_rate,
            "epochs": setting.reward_model_epochs}
    return stage_config(setting, store_root, f"seed{seed}-{arm}{recipe_suffix(setting, arm)}", seed, **changes)


def recipe_suffix(setting: Setting, arm: str) -> str:
    """The setting's fields changed from its named version (`--set`) that this arm's runs depend on, for their
    run name: runs of two recipes share a store (and its SFT models, offline data and reward models; a change to
    those needs its own store)."""
    changed = [name for name in changed_fields(setting) if name != "cheap_samples" or arm in CHEAP_ANNOTATOR_ARMS]
    return "".join(f"-{name}{getattr(setting, name):g}" for name in changed)


def changed_fields(setting: Setting) -> list[str]:
    """The fields in which `setting` differs from the named setting it was made from (`--set`)."""
    base = SETTINGS[setting.name]
    return [field.name for field in dataclasses.fields(Setting)
            if getattr(setting, field.name) != getattr(base, field.name)]


def train_reward_model(setting: Setting, store_root: str, run: str, seed: int, dataset: str, sft_policy: str,
                       bootstrap: bool = False) -> str:
    """A reward head on pi_0 (it already reads this kind of text) trained on rho's pairs by the `reward-model` flow;
    `bootstrap`: on a resample of them drawn with the training seed. Returns its checkpoint."""
    reward_model(config=stage_config(
        setting, store_root, run, seed, setup="reward_modelling", data={"source": dataset, "max_rows": None},
        model={"policy": sft_policy},
        training={"loss": "reward", "learning_rate": setting.reward_model_learning_rate,
                  "epochs": setting.reward_model_epochs, "bootstrap_seed": seed if bootstrap else None},
    ))
    return pipeline.open_store(stage_config(setting, store_root, run)).checkpoint_uri(run, 1)


def base_model_path(name: str, cache_dir: str) -> str:
    """The model an SFT round starts from: a hub name or tiny:// name as is, the seed-1 tiny model built here."""
    if name == TINY_BEHAVIOUR:
        return str(build_tiny(Path(cache_dir).expanduser() / "tiny-llama-seed1", seed=1))
    return name


# ---- the offline dataset ---------------------------------------------------------------------------------
def pairs_jsonl(units: pd.DataFrame) -> bytes:
    """Training units (generation1 preferred, ties already dropped) as prompt/chosen/rejected lines."""
    lines = [json.dumps({"prompt": [dict(turn) for turn in messages], "chosen": chosen, "rejected": rejected})
             for messages, chosen, rejected in zip(units["prompt_messages"], units["generation1_response"],
                                                    units["generation2_response"], strict=True)]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def examples_from_pairs(cfg: PipelineConfig, iteration: int, generations_uri: str, annotations_uri: str) -> str:
    """Iteration k's labelled pairs of rho: `iter-k/pairs.jsonl` and, read back by DatasetLoader, `iter-k/examples`."""
    store = pipeline.open_store(cfg)
    units = pipeline.build_units(cfg, iteration, generations_uri=generations_uri, annotations_uri=annotations_uri)
    out = store.stage_uri(cfg.store.run_name, iteration, "examples")
    fingerprint = {"stage": "examples", "units": pipeline.stage_digest(store, units)}
    if store.is_complete(out, fingerprint):
        return out
    jsonl = store.uri(cfg.store.run_name, f"iter-{iteration:03d}", "pairs.jsonl")
    store.write_bytes(jsonl, pairs_jsonl(store.read_pandas(units)))
    loader = DatasetLoader(jsonl, format="pairs")
    store.write_stage(out, "examples", fingerprint, [loader.load()], extra={"report": loader.report.to_dict()})
    return out


def behaviour_dataset(setting: Setting, store_root: str, seed: int, behaviour: str) -> tuple[list[str], str]:
    """rho's oracle-labelled pairs: one examples stage per iteration, and all of them as one jsonl file."""
    cfg = stage_config(setting, store_root, f"seed{seed}-behaviour-data", seed, model={"policy": behaviour})
    config_json = cfg.model_dump_json()
    store = pipeline.open_store(cfg)
    examples, pairs = [], b""
    for k in range(1, setting.iterations + 1):
        prompts = load_prompts(config_json, k)
        generations = generate(config_json, prompts, behaviour, k)
        annotations = annotate(config_json, generations, k)
        examples.append(examples_from_pairs(cfg, k, generations, annotations))
        pairs += pairs_jsonl(store.read_pandas(store.stage_uri(cfg.store.run_name, k, "units")))
    # The name carries the content digest: the reward model's examples stage is keyed by the source's name.
    dataset = store.uri(cfg.store.run_name, f"pairs-{hashlib.sha256(pairs).hexdigest()[:12]}.jsonl")
    if not store.exists(dataset):
        store.write_bytes(dataset, pairs)
    return examples, dataset


# ---- one arm ---------------------------------------------------------------------------------------------
@stage_task("sample-heldout")
def sample_heldout(config_json: str, eval_prompts_uri: str, policy_uri: str, iteration: int,
                   samples_per_prompt: int) -> str:
    """`heldout_samples`: several answers per held-out prompt, sampled as the evaluate stage samples."""
    cfg = parse(config_json)
    sampling = cfg.generation.model_copy(update={
        "n_samples": samples_per_prompt, "temperature": cfg.evaluation.temperature,
        "max_new_tokens": cfg.evaluation.max_new_tokens,
    })
    return pipeline.generate(cfg.model_copy(update={"generation": sampling}), eval_prompts_uri, policy_uri, iteration,
                             stage="heldout_samples")


def run_arm(cfg: PipelineConfig, sft_policy: str, offline_examples: list[str], samples_per_prompt: int) -> str:
    """K iterations from pi_0; offline arms train on rho's pairs, online arms on their own labelled samples."""
    config_json = cfg.model_dump_json()
    eval_prompts = load_eval_prompts(config_json, 0)
    sample_heldout(config_json, eval_prompts, sft_policy, 0, samples_per_prompt)
    policy = sft_policy
    for k in range(1, cfg.iterations + 1):
        if cfg.online:
            prompts = load_prompts(config_json, k)
            generations = generate(config_json, prompts, policy, k)
            reward_models = refresh_reward_models(config_json, k) if refreshes(cfg, k) else None
            annotations = annotate(config_json, generations, k, reward_models)
            round_data = units_and_weights(config_json, policy, k, generations_uri=generations,
                                           annotations_uri=annotations)
        else:
            round_data = units_and_weights(config_json, policy, k, examples_uri=offline_examples[k - 1])
        checkpoint = train(config_json, round_data["units"], round_data["weights"], policy, sft_policy, k)
        evaluate_policy(config_json, eval_prompts, checkpoint, policy, sft_policy, k)
        sample_heldout(config_json, eval_prompts, checkpoint, k, samples_per_prompt)
        policy = checkpoint
    return cfg.store.run_name


# ---- measurements ----------------------------------------------------------------------------------------
def true_rewards(answers: pd.DataFrame) -> pd.Series:
    """The true reward of each answer, indexed by (prompt_id, sample_index)."""
    rewards = [positive_words(p, r) for p, r in zip(answers["prompt"], answers["response"], strict=True)]
    return pd.Series(rewards, index=pd.MultiIndex.from_frame(answers[["prompt_id", "sample_index"]]))


def win_rate(rewards: pd.Series, baseline_rewards: pd.Series) -> float:
    """Share of answers that beat the baseline's answer with the same index; a tie counts half."""
    common = rewards.index.intersection(baseline_rewards.index)
    if len(common) == 0:
        raise ValueError("no answer has a baseline answer to compare with (different prompts or samples)")
    return float((np.sign(rewards[common] - baseline_rewards[common]) / 2 + 0.5).mean())


def annotator_agreement(store: ArtifactStore, run: str, iteration: int) -> float:
    """How often the annotator's chosen answer is the one the true reward prefers (true-reward ties left out)."""
    generations, annotations = _stage_frames(store, run, iteration)
    agree = []
    for row in annotations[annotations["status"] == "ok"].itertuples():
        true_gap = _true_gap(generations, row.generation1_id, row.generation2_id)
        if true_gap != 0:
            agree.append((true_gap > 0) == (row.generation1_reward > row.generation2_reward))
    return float(np.mean(agree)) if agree else math.nan


def _stage_frames(store: ArtifactStore, run: str, iteration: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An iteration's generations (indexed by id) and annotations."""
    generations = store.read_pandas(store.stage_uri(run, iteration, "generations")).set_index("generation_id")
    return generations, store.read_pandas(store.stage_uri(run, iteration, "annotations"))


def _true_gap(generations: pd.DataFrame, first_id: str, second_id: str) -> float:
    """The true reward of the first answer less that of the second."""
    first, second = generations.loc[first_id], generations.loc[second_id]
    return positive_words(first.prompt, first.response) - positive_words(second.prompt, second.response)


def first_annotator_agreement(store: ArtifactStore, run: str, iteration: int) -> tuple[float, float]:
    """A cascade's first annotator: how often its choice was the one the true reward prefers, on the pairs it
    escalated and on the pairs it kept (its own ties and true-reward ties left out). Escalation pays where the
    first is often wrong."""
    generations, annotations = _stage_frames(store, run, iteration)
    right: dict[bool, list[bool]] = {True: [], False: []}
    for row in annotations.itertuples():
        record = json.loads(row.raw).get("cascade", {})
        first = record["replaced"] if record.get("escalated") else row._asdict()
        if first["status"] != "ok" or first["score1"] == first["score2"]:
            continue
        true_gap = _true_gap(generations, first["generation1_id"], first["generation2_id"])
        if true_gap != 0:
            right[bool(record.get("escalated"))].append((true_gap > 0) == (first["score1"] > first["score2"]))
    return tuple(float(np.mean(right[up])) if right[up] else math.nan for up in (True, False))


def true_labels_spent(store: ArtifactStore, run: str, iteration: int, arm: str, prompts_per_iteration: int) -> int:
    """Pairs the true reward labelled in an iteration: every prompt's pair for the oracle and the offline arms
    (rho's pairs, ties included), the escalated ones for a cascade, none for a reward model (its training data
    aside)."""
    if arm in ("online-rm", "online-rm-ensemble"):
        return 0
    if arm.startswith("offline"):
        return prompts_per_iteration
    annotations = store.read_manifest(store.stage_uri(run, iteration, "annotations"))
    return annotations["extra"]["escalated"] if arm in CASCADE_BUDGETS else annotations["rows"]


def arm_measurements(store: ArtifactStore, run: str, iterations: int, seed: int, arm: str,
                     online: bool, prompts_per_iteration: int) -> list[dict]:
    """One row per iteration (0: pi_0): held-out true reward, win-rate against pi_0, words, pairs trained on.

    The win-rate compares the i-th answer to a prompt with pi_0's i-th answer to it (iteration 0's samples).
    """
    initial_rewards = true_rewards(store.read_pandas(store.stage_uri(run, 0, "heldout_samples")))
    rows, pairs_so_far, true_labels = [], 0, 0
    for k in range(0, iterations + 1):
        answers = store.read_pandas(store.stage_uri(run, k, "heldout_samples"))
        rewards = true_rewards(answers)
        if k > 0:
            pairs_so_far += store.read_manifest(store.stage_uri(run, k, "units"))["rows"]
            true_labels += true_labels_spent(store, run, k, arm, prompts_per_iteration)
        escalated, kept = first_annotator_agreement(store, run, k) if arm in CASCADE_BUDGETS and k > 0 else (
            math.nan, math.nan)
        rows.append({
            "seed": seed, "arm": arm, "iteration": k, "true_reward": float(rewards.mean()),
            "win_rate_vs_sft": win_rate(rewards, initial_rewards),
            "words": float(np.mean([len(words(r)) for r in answers["response"]])), "pairs_trained": pairs_so_far,
            "true_labels": true_labels,
            "annotator_agreement": annotator_agreement(store, run, k) if online and k > 0 else math.nan,
            "first_right_escalated": escalated, "first_right_kept": kept,
        })
    return rows


# ---- the report ------------------------------------------------------------------------------------------
def _spread(values: pd.Series, digits: int = 2) -> str:
    if values.isna().all():
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return (f"{values.mean():.{digits}f} ± {values.std(ddof=0):.{digits}f} "
            f"[{values.min():.{digits}f}, {values.max():.{digits}f}]")


def results_table(measurements: pd.DataFrame) -> str:
    """Markdown: one row per arm and iteration, mean ± std [min, max] over seeds; iteration 0 is pi_0."""
    seeds = measurements["seed"].nunique()
    lines = [
        "| iteration | arm | true-reward labels | pairs trained | held-out true reward | win-rate vs SFT | words "
        "| annotator agrees with true reward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    start = measurements[measurements["iteration"] == 0]
    lines.append(f"| 0 | SFT policy pi_0 | 0 | 0 | {_spread(start.groupby('seed')['true_reward'].mean())} | 0.50 "
                 f"| {start['words'].mean():.1f} | - |")
    for k in sorted(set(measurements["iteration"]) - {0}):
        for arm in [a for a in ALL_ARMS if a in set(measurements["arm"])]:
            rows = measurements[(measurements["iteration"] == k) & (measurements["arm"] == arm)]
            agreement = _spread(rows["annotator_agreement"]) if arm != "online-oracle" and arm.startswith(
                "online") else "-"
            lines.append(f"| {k} | {arm} | {rows['true_labels'].mean():.0f} | {rows['pairs_trained'].mean():.0f} "
                         f"| {_spread(rows['true_reward'])} | {_spread(rows['win_rate_vs_sft'])} "
                         f"| {rows['words'].mean():.1f} | {agreement} |")
    return (f"Mean ± std [min, max] over {seeds} seed(s). True-reward labels: pairs labelled by the true reward "
            f"so far (the reward models learned from the offline arms' labels; a cascade's are the pairs it "
            f"escalated).\n\n" + "\n".join(lines) + escalation_table(measurements))


def escalation_table(measurements: pd.DataFrame) -> str:
    """Markdown (empty without a cascade arm): how often a cascade's first annotator was right on the pairs it
    escalated and on those it kept, per iteration."""
    cascades = [a for a in ALL_ARMS if a in CASCADE_BUDGETS and a in set(measurements["arm"])]
    if not cascades or "first_right_escalated" not in measurements:
        return ""
    lines = ["", "", "A cascade's first annotator agrees with the true reward, on the pairs it escalated and on those "
             "it kept (mean over seeds):", "", "| iteration | arm | escalated pairs | kept pairs |",
             "|---|---|---|---|"]
    for k in sorted(set(measurements["iteration"]) - {0}):
        for arm in cascades:
            rows = measurements[(measurements["iteration"] == k) & (measurements["arm"] == arm)]
            lines.append(f"| {k} | {arm} | {rows['first_right_escalated'].mean():.2f} "
                         f"| {rows['first_right_kept'].mean():.2f} |")
    return "\n".join(lines)


def paired_comparison(measurements: pd.DataFrame, baseline: str = "offline", resamples: int = 10_000) -> pd.DataFrame:
    """Each arm against `baseline` at the last iteration, paired by seed (the same prompts, SFT policy and data):
    the mean difference in held-out true reward with a percentile bootstrap 95% interval over seeds, the seeds
    where the arm is ahead, and its share of `online-oracle`'s gain over pi_0 (when that arm ran)."""
    last = measurements[measurements["iteration"] == measurements["iteration"].max()]
    final = last.pivot_table(index="seed", columns="arm", values="true_reward")
    start = measurements[measurements["iteration"] == 0].groupby("seed")["true_reward"].mean()
    labels = last.pivot_table(index="seed", columns="arm", values="true_labels")
    rows, rng = [], np.random.default_rng(0)
    for arm in [a for a in ALL_ARMS if a in final.columns and a != baseline]:
        if baseline not in final.columns:
            break
        difference = (final[arm] - final[baseline]).dropna()
        means = rng.choice(difference.to_numpy(), size=(resamples, len(difference))).mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        oracle_share = math.nan
        if "online-oracle" in final.columns and arm != "online-oracle":
            # a ratio of mean gains: a seed where the oracle barely moved would blow up a mean of ratios
            oracle_share = float((final[arm] - start).mean() / (final["online-oracle"] - start).mean())
        rows.append({"arm": arm, "versus": baseline, "seeds": len(difference), "difference": difference.mean(),
                     "low": low, "high": high, "seeds_ahead": int((difference > 0).sum()),
                     "share_of_oracle_gain": oracle_share, "true_labels": labels[arm].mean(),
                     "baseline_true_labels": labels[baseline].mean()})
    return pd.DataFrame(rows)


def comparison_table(comparison: pd.DataFrame) -> str:
    """Markdown: the paired differences of `paired_comparison`."""
    if comparison.empty:
        return ""
    versus = comparison["versus"].iloc[0]
    lines = [f"| arm | true-reward labels (vs {versus}'s) | difference vs {versus} [95% bootstrap] "
             "| seeds ahead | share of online-oracle's gain |", "|---|---|---|---|---|"]
    for row in comparison.itertuples():
        share = "-" if math.isnan(row.share_of_oracle_gain) else f"{row.share_of_oracle_gain:.0%}"
        lines.append(f"| {row.arm} | {row.true_labels:.0f} ({row.baseline_true_labels:.0f}) "
                     f"| {row.difference:+.2f} [{row.low:+.2f}, {row.high:+.2f}] | {row.seeds_ahead} of {row.seeds} "
                     f"| {share} |")
    return (f"Last iteration, paired by seed against `{versus}`: mean difference in held-out true reward, "
            "percentile bootstrap over seeds.\n\n" + "\n".join(lines))


def label_efficiency_plot(measurements: pd.DataFrame) -> bytes:
    """Held-out true reward against the true-reward labels spent so far, one line per arm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    start = measurements[measurements["iteration"] == 0]
    for arm in [a for a in ALL_ARMS if a in set(measurements["arm"])]:
        rows = pd.concat([start.assign(arm=arm), measurements[(measurements["arm"] == arm)
                                                              & (measurements["iteration"] > 0)]])
        mean = rows.groupby("iteration")[["true_labels", "true_reward"]].mean()
        axis.plot(mean["true_labels"], mean["true_reward"], marker="o", label=arm)
    axis.set_xlabel("true-reward labels spent so far (a reward model's training labels not counted)")
    axis.set_ylabel("held-out true reward")
    axis.set_title(f"label efficiency: mean over {measurements['seed'].nunique()} seed(s), a point per iteration")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def results_plot(measurements: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("true_reward", "held-out true reward"), ("win_rate_vs_sft", "win-rate vs SFT (true reward)"),
              ("words", "answer length (words)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    start = measurements[measurements["iteration"] == 0]
    for arm in [a for a in ALL_ARMS if a in set(measurements["arm"])]:
        rows = pd.concat([start.assign(arm=arm), measurements[(measurements["arm"] == arm)
                                                              & (measurements["iteration"] > 0)]])
        by_iteration = rows.groupby("iteration")
        for axis, (column, _) in zip(axes, panels, strict=True):
            mean, low, high = (by_iteration[column].agg(f) for f in ("mean", "min", "max"))
            (line,) = axis.plot(mean.index, mean.values, marker="o", label=arm)
            axis.fill_between(mean.index, low.values, high.values, color=line.get_color(), alpha=0.15)
    for axis, (_, title) in zip(axes, panels, strict=True):
        axis.set_title(title)
        axis.set_xlabel("iteration (the same new prompts in every arm)")
        axis.set_xticks(sorted(set(measurements["iteration"])))
        axis.grid(alpha=0.3)
    axes[0].legend()
    penalty = axes[2].axhline(20, color="grey", linestyle="--", linewidth=1)
    axes[2].legend([penalty], ["length penalty starts"], loc="lower right")
    figure.suptitle(f"online vs offline DPO, tiny model; line: mean over {measurements['seed'].nunique()} "
                    "seed(s), band: min-max")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def publish(store: ArtifactStore, measurements: pd.DataFrame, setting: Setting, wall_s: float) -> dict[str, str]:
    """Write table, plot and measurements under `report/` in the store and as Prefect artifacts."""
    table = results_table(measurements) + "\n\n" + comparison_table(paired_comparison(measurements))
    header = (f"# Online vs offline ({setting.name} setting)\n\nWall time {wall_s / 60:.1f} min. "
              f"{setting.iterations} iterations of {setting.prompts_per_iteration} prompts; the arms a reward model "
              f"labels sample {setting.cheap_samples} answers per prompt."
              + "".join(f" {name}={getattr(setting, name):g} (--set)." for name in changed_fields(setting))
              + "\n\n")
    uris = {name: store.uri("report", name)
            for name in ("results.md", "results.png", "label-efficiency.png", "measurements.csv")}
    store.write_bytes(uris["results.md"], (header + table + "\n").encode())
    store.write_bytes(uris["results.png"], results_plot(measurements))
    store.write_bytes(uris["label-efficiency.png"], label_efficiency_plot(measurements))
    store.write_bytes(uris["measurements.csv"], measurements.to_csv(index=False).encode())
    create_markdown_artifact(header + table, key="online-vs-offline", description="online vs offline: results")
    for name, uri in uris.items():
        create_link_artifact(uri if "://" in uri else f"file://{uri}", link_text=name,
                             key="online-vs-offline-" + name.replace(".", "-"))
    return uris


# ---- the flow --------------------------------------------------------------------------------------------
@flow(name="online-vs-offline", log_prints=True)
def online_vs_offline(seeds: int = 5, setting_name: str = "full", store_root: str = "./runs/online-vs-offline-full",
                      arms: list[str] | None = None, setting_changes: dict[str, int | float] | None = None) -> dict:
    """The whole experiment; returns the measurements (one row per seed, arm and iteration) and report URIs.
    `setting_changes` replace fields of the setting (e.g. {"cheap_samples": 4})."""
    started = time.time()
    setting, arms = SETTINGS[setting_name], list(arms or ARMS)
    setting = dataclasses.replace(setting, **(setting_changes or {}))
    unknown = sorted(set(arms) - set(ALL_ARMS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; expected some of {ALL_ARMS}")
    logger = get_run_logger()
    needs_behaviour_data = any(arm != "online-oracle" for arm in arms)  # the offline arms and the reward model

    # 1. pi_0 and rho: one SFT round each, shared by every seed
    policy_cfg = sft_config(setting, store_root, "sft-policy", setting.policy)
    store = pipeline.open_store(policy_cfg)
    sft(config=policy_cfg)
    sft_policy = store.checkpoint_uri("sft-policy", 1)
    if needs_behaviour_data:
        behaviour_base = base_model_path(setting.behaviour, policy_cfg.store.cache_dir)
        sft(config=sft_config(setting, store_root, "sft-behaviour", behaviour_base))
    behaviour = store.checkpoint_uri("sft-behaviour", 1)

    measurements = []
    for seed in range(setting.first_seed, setting.first_seed + seeds):
        offline_examples, reward_models, bootstrap_models = [], [], []
        if needs_behaviour_data:
            # 2. rho's pairs labelled by the true reward; 3. reward models trained on them (one, or an ensemble
            # whose members differ in their training seed: head initialisation and data order)
            offline_examples, dataset = behaviour_dataset(setting, store_root, seed, behaviour)
            members = ENSEMBLE_SIZE if set(arms) & set(ENSEMBLE_ARMS) else 1
            for member in range(members):
                rm_run = f"seed{seed}-reward-model" + (f"-m{member}" if member else "")
                reward_models.append(train_reward_model(setting, store_root, rm_run, seed + 1000 * member,
                                                        dataset, sft_policy))
            # (the refresh arms' members: each also on its own bootstrap resample of rho's pairs)
            for member in range(ENSEMBLE_SIZE if set(arms) & set(REFRESH_ARMS) else 0):
                bootstrap_models.append(train_reward_model(
                    setting, store_root, f"seed{seed}-reward-model-bootstrap-m{member}", seed + 1000 * member,
                    dataset, sft_policy, bootstrap=True))
        # 4. the arms
        for arm in arms:
            cfg = arm_config(setting, store_root, seed, arm, sft_policy, behaviour, reward_models, bootstrap_models)
            run = run_arm(cfg, sft_policy, offline_examples, setting.heldout_samples)
            measurements += arm_measurements(store, run, setting.iterations, seed, arm, cfg.online,
                                             setting.prompts_per_iteration)
            logger.info("seed %d %s: %s", seed, arm, measurements[-1])

    # 5. the report
    frame = pd.DataFrame(measurements)
    uris = publish(store, frame, setting, time.time() - started)
    logger.info("report: %s", uris["results.md"])
    return {"measurements": measurements, "report": uris, "wall_s": time.time() - started}


def setting_changes(assignments: list[str]) -> dict[str, int | float]:
    """`--set FIELD=VALUE` options as Setting fields of their declared type (numbers only)."""
    types = {field.name: field.type for field in dataclasses.fields(Setting)}
    changes = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if types.get(name) not in (int, float):
            numeric = sorted(n for n, t in types.items() if t in (int, float))
            raise SystemExit(f"--set {assignment}: expected FIELD=NUMBER with FIELD one of {numeric}")
        try:
            changes[name] = types[name](value)
        except ValueError:
            raise SystemExit(f"--set {assignment}: {name} is a{'n int' if types[name] is int else ' float'}") from None
    return changes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Online vs offline DPO on the tiny task (a Prefect flow).")
    parser.add_argument("--seeds", type=int, default=5)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the reduced size of the CI test")
    size.add_argument("--gpu", action="store_true", help="hub models (Qwen2.5-0.5B, SmolLM2-360M) with vLLM")
    size.add_argument("--dev", action="store_true",
                      help="for choosing a recipe: measured on unused training prompts, seeds from 100")
    parser.add_argument("--store-root", help="a folder or s3:// URI; default ./runs/online-vs-offline-{size}")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {','.join(ALL_ARMS)}")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the setting (Setting), e.g. --set cheap_samples=4")
    args = parser.parse_args(argv)
    setting = "quick" if args.quick else "gpu" if args.gpu else "dev" if args.dev else "full"
    store_root = args.store_root or f"./runs/online-vs-offline-{setting}"
    store_root = store_root if "://" in store_root else str(Path(store_root).resolve())
    result = online_vs_offline(seeds=args.seeds, setting_name=setting, store_root=store_root,
                               arms=args.arms.split(","), setting_changes=setting_changes(args.set))
    print(Path(result["report"]["results.md"]).read_text() if "://" not in result["report"]["results.md"]
          else result["report"]["results.md"])
    print(f"wall time {result['wall_s'] / 60:.1f} min; report in {result['report']['results.md']}")


if __name__ == "__main__":
    main()
