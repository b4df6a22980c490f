"""Head-to-head comparison of two policies' responses to the same held-out prompts, by the annotator.

A pairwise judge compares the two responses directly (both orders, as in training). Scoring annotators
(reward model, programmatic rule, pointwise judge) score each response and the higher score wins.
The outcome of each prompt is 1.0 (new wins), 0.5 (tie) or 0.0; a failed verdict is NaN, never a guess.
"""

import logging
import math

import numpy as np
import pandas as pd

from alignment_core.annotation.base import LABEL_STATUSES, ScoreRules
from alignment_core.annotation.scorers import RewardModelAnnotator, import_callable
from alignment_core.annotation.stage import make_annotator
from alignment_core.annotators import ANNOTATORS
from alignment_core.config import PipelineConfig
from alignment_core.setups import SETUPS
from alignment_core.verdict import is_demo_rule

log = logging.getLogger(__name__)
load_callable = import_callable


def judging_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config whose annotator judges evaluations: a cascade's expensive annotator, the best judgement the
    run has (evaluation pays no label budget: it is not trained on), unless that is a person (held-out
    comparisons are not put to them: its first annotator judges); else the run's annotator."""
    annotation = cfg.annotation
    if annotation.annotator != "cascade":
        return cfg
    cascade = annotation.cascade
    judge = cascade.first if cascade.escalate_to == "human" else cascade.escalate_to
    return cfg.model_copy(update={"annotation": annotation.model_copy(update={"annotator": judge})})


def annotator_label(cfg: PipelineConfig) -> str:
    """Who judges the win-rates of a run, in words (plots and summaries name it)."""
    annotation = judging_config(cfg).annotation
    return ANNOTATORS[annotation.annotator].describe(annotation)


def demo_judge_warning(cfg: PipelineConfig) -> str | None:
    """A warning when the policy's evaluation would be judged by a demo rule with no oracle beside it: a run on
    the user's own data that names no annotator (offline setups need none to train) would otherwise report
    win-rates by the toy task's rule as if they said something about the user's task."""
    judging = judging_config(cfg).annotation
    if not cfg.evaluation.enabled or cfg.evaluation.oracle or SETUPS[cfg.setup].flow == "reward-model":
        return None  # a reward model's evaluation is its held-out accuracy, no annotator involved
    if judging.annotator != "programmatic" or not is_demo_rule(judging.programmatic):
        return None
    return (f"evaluation will be judged by rule {judging.programmatic}, a demo rule of the toy task "
            "(alignment_core/rewards.py), not your task's: name your judge in annotation (annotator: "
            "reward_model, judge_pairwise, judge_pointwise, or programmatic with your own module:function) or "
            "set evaluation.oracle (README: Did it learn?)")


def mean_difference(key: str, new, baseline, z: float = 1.96) -> dict[str, float]:
    """`key`: the mean of new - baseline, prompt by prompt (prompts with both scores), with its 95% interval
    (`key`_low, `key`_high; normal approximation of the mean, as the win-rates' Wilson intervals use z)."""
    differences = pd.to_numeric(pd.Series(new), errors="coerce").to_numpy(float) - pd.to_numeric(
        pd.Series(baseline), errors="coerce").to_numpy(float)
    differences = differences[np.isfinite(differences)]
    if len(differences) < 2:
        return {key: math.nan, f"{key}_low": math.nan, f"{key}_high": math.nan}
    mean, half = differences.mean(), z * differences.std(ddof=1) / math.sqrt(len(differences))
    return {key: float(mean), f"{key}_low": float(mean - half), f"{key}_high": float(mean + half)}


def compare_responses(cfg: PipelineConfig, new: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt present in both: prompt_id, outcome, score_new, score_baseline."""
    new = new.drop_duplicates("prompt_id").set_index("prompt_id")
    baseline = baseline.drop_duplicates("prompt_id").set_index("prompt_id")
    prompts = [pid for pid in new.index if pid in baseline.index]
    cfg = judging_config(cfg)
    if cfg.annotation.annotator == "judge_pairwise":
        return _judge_pairs(cfg, new.loc[prompts], baseline.loc[prompts])
    return _compare_scores(cfg, new.loc[prompts], baseline.loc[prompts])


def _as_pairs(new: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Both policies' responses as one generations frame: sample 0 is the new policy's, 1 the baseline's."""
    first = new.reset_index().assign(sample_index=0)
    second = baseline.reset_index().assign(sample_index=1)
    # The same policy on both sides (iteration 1 compares against the initial policy twice) keeps ids apart.
    second["generation_id"] = second["generation_id"] + "-baseline"
    return pd.concat([first, second], ignore_index=True)


def _judge_pairs(cfg: PipelineConfig, new: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    judge = make_annotator(cfg.model_copy(update={"setup": "online_pairwise"}))
    rows = judge.annotate(_as_pairs(new, baseline))
    new_ids = set(new["generation_id"])
    results = []
    for row in rows:
        new_first = row["generation1_id"] in new_ids
        if row["status"] not in LABEL_STATUSES:
            outcome = math.nan
        else:
            outcome = row["generation1_reward"] if new_first else row["generation2_reward"]
        score_new, score_baseline = (row["score1"], row["score2"]) if new_first else (row["score2"], row["score1"])
        results.append({"prompt_id": row["prompt_id"], "outcome": outcome, "score_new": score_new,
                        "score_baseline": score_baseline})
    return pd.DataFrame(results, columns=["prompt_id", "outcome", "score_new", "score_baseline"])


def _compare_scores(cfg: PipelineConfig, new: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    scorer = make_annotator(cfg.model_copy(update={"setup": "rl"}))  # "rl" rows carry the raw score
    pairs = _as_pairs(new, baseline)
    scores = {row["generation1_id"]: row["generation1_reward"] if row["status"] in LABEL_STATUSES else math.nan
              for row in scorer.annotate(pairs)}
    results = []
    for pid, first, second in zip(new.index, new["generation_id"], baseline["generation_id"] + "-baseline",
                                  strict=True):
        a, b = scores.get(first, math.nan), scores.get(second, math.nan)
        outcome = math.nan if np.isnan(a) or np.isnan(b) else (1.0 if a > b else 0.5 if a == b else 0.0)
        results.append({"prompt_id": pid, "outcome": outcome, "score_new": a, "score_baseline": b})
    return pd.DataFrame(results, columns=["prompt_id", "outcome", "score_new", "score_baseline"])


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a win-rate (ties count half a win)."""
    if n == 0:
        return (math.nan, math.nan)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(versus: str, outcome: pd.Series, prefix: str = "") -> dict[str, float]:
    """`{prefix}win_rate_{versus}` with its 95% Wilson interval and how many prompts were judged."""
    low, high = wilson_interval(float(outcome.sum()), len(outcome))
    key = f"{prefix}win_rate_{versus}"
    return {key: float(outcome.mean()) if len(outcome) else math.nan, f"{key}_low": low, f"{key}_high": high,
            f"{prefix}judged_{versus}": float(len(outcome))}


def oracle_scores(oracle, generations: pd.DataFrame) -> np.ndarray:
    """One oracle score per prompt, in prompt_id order (evaluation samples one response per prompt)."""
    frame = generations.drop_duplicates("prompt_id").sort_values("prompt_id")
    return np.array([oracle(p, r) for p, r in zip(frame["prompt"], frame["response"], strict=True)], dtype=float)


def score_evaluation(cfg: PipelineConfig, new: pd.DataFrame, baselines: dict[str, pd.DataFrame]) -> dict:
    """The evaluation's numbers: the new policy's held-out samples against each baseline's ("previous",
    "initial"), judged by the annotator and, when the run names one, by the oracle."""
    summary = {}
    for name, baseline in baselines.items():
        comparison = compare_responses(cfg, new, baseline)
        summary.update(win_rate(f"vs_{name}", comparison["outcome"].dropna()))  # failed verdicts are NaN
        if name == "previous":
            summary["annotator_score_mean"] = float(comparison["score_new"].mean())
            summary["annotator_score_mean_previous"] = float(comparison["score_baseline"].mean())
        else:  # how far the policy moved since the start, with an interval (the plot's reward panel)
            summary.update(mean_difference("annotator_score_delta_vs_initial", comparison["score_new"],
                                           comparison["score_baseline"]))
    if cfg.evaluation.oracle:
        # The true reward, when the experiment has one: the same comparisons judged by the oracle, because the
        # annotator's win-rate can rise while the true reward falls (reward hacking).
        oracle = load_callable(cfg.evaluation.oracle)
        scores = {"new": oracle_scores(oracle, new)}
        summary["oracle_reward_mean"] = float(np.mean(scores["new"]))
        summary["oracle_reward_std"] = float(np.std(scores["new"]))
        for name, baseline in baselines.items():
            scores[name] = oracle_scores(oracle, baseline)
            summary[f"oracle_reward_mean_{name}"] = float(np.mean(scores[name]))
            outcome = np.sign(scores["new"] - scores[name]) / 2 + 0.5  # 1 win, 0.5 tie, 0 loss, prompt by prompt
            summary.update(win_rate(f"vs_{name}", pd.Series(outcome), prefix="oracle_"))
        summary.update(mean_difference("oracle_reward_delta_vs_initial", scores["new"], scores["initial"]))
    summary["response_words_mean"] = float(new["response"].str.split().str.len().mean())
    return summary


def reward_model_accuracy(pairs: pd.DataFrame, reward_model_path: str, cfg: PipelineConfig, where: str) -> dict:
    """A reward model on preference pairs of held-out prompts: how often it scores the chosen response above the
    rejected one (ties count half), with a 95% Wilson interval, and the mean margin."""
    summary: dict = {"heldout_pairs": float(len(pairs))}
    if len(pairs) == 0:
        log.warning("%s: no held-out pairs (data.eval_prompts: %d); held-out accuracy not measured", where,
                    cfg.data.eval_prompts)
        return summary
    scorer = RewardModelAnnotator(reward_model_path, ScoreRules(), max_length=cfg.training.max_length,
                                  dtype=cfg.model.dtype)
    chosen, rejected = (np.array(scorer.score(pairs["prompt_messages"], pairs[column]))
                        for column in ("chosen", "rejected"))
    outcome = pd.Series(np.sign(chosen - rejected) / 2 + 0.5)
    low, high = wilson_interval(float(outcome.sum()), len(outcome))
    summary.update(heldout_accuracy=float(outcome.mean()), heldout_accuracy_low=low, heldout_accuracy_high=high,
                   heldout_margin_mean=float(np.mean(chosen - rejected)))
    return summary
