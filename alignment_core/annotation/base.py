"""What every annotator shares: the protocol, the row format, and scores -> pairs / pointwise rows.

An annotator turns generation rows (records.GENERATIONS) into annotation rows (records.ANNOTATIONS). Every
decision it makes is a row, so the stage can be audited and its failures counted from the table alone:

    status       meaning                                                       a training label?
    ok           a clear verdict / score                                       yes
    tie          a pair judged equal (both orders disagreed, or equal scores)  yes (0.5 / 0.5)
    skipped      a pair whose score margin is below annotation.min_margin      no
    dropped      judge orders disagreed and judge.on_disagreement == "drop"    no
    unparseable  the judge answered, but not with a clear verdict              no (a failure)
    error        the annotator failed (exception, HTTP error, timeout)         no (a failure)

Downstream code keeps only rows whose status is in LABEL_STATUSES. An "error" row whose raw JSON says
`"transient": true` (the judge did not answer: outage, timeout, a malformed reply) is not final: a rerun of the
stage asks again for exactly those prompts (`is_transient_failure`); "unparseable" answers stay as they are.
"""

import hashlib
import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import pandas as pd

from alignment_core.redact import redact
from alignment_core.setups import setup_spec

LABEL_STATUSES = ("ok", "tie")
FAILURE_STATUSES = ("unparseable", "error")


def is_transient_failure(status: str, raw: str) -> bool:
    """An annotation row that failed for a reason that may pass (the judge did not answer): not final."""
    return status == "error" and bool(json.loads(raw or "{}").get("transient"))

# What the rows of a stage are, by learning setup: preference pairs, desirable/undesirable labels, or
# scalar rewards (online pairwise, online pointwise, reinforcement learning).
OutputMode = Literal["pairs", "labels", "rewards"]
PairSelection = Literal["best_vs_worst", "best_vs_random", "random", "all_pairs"]


class Annotator(Protocol):
    name: str  # e.g. "reward_model:<digest>", "judge:<model>:<template>", "programmatic:<module>:<fn>"

    def annotate(self, generations: pd.DataFrame) -> list[dict]:
        """ANNOTATIONS rows for these generations; all samples of a prompt must be in the same frame."""
        ...


class AnnotationFailureError(RuntimeError):
    """More annotations failed (unparseable or error) than annotation.max_failure_fraction allows."""


def output_mode(setup: str) -> OutputMode:
    """What the annotation stage writes for an online setup (alignment_core.setups)."""
    return setup_spec(setup).annotation


def annotation_id(annotator: str, generation_ids: Sequence[str]) -> str:
    payload = json.dumps([annotator, *generation_ids])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def annotation_row(
    annotator: str,
    prompt_id: str,
    kind: str,
    status: str,
    raw: dict,
    generation1_id: str,
    generation2_id: str | None = None,
    generation1_reward: float | None = None,
    generation2_reward: float | None = None,
    score1: float | None = None,
    score2: float | None = None,
    confidence: float | None = None,
    agreement: bool | None = None,
) -> dict:
    ids = [generation1_id] if generation2_id is None else [generation1_id, generation2_id]
    return {
        "annotation_id": annotation_id(annotator, ids),
        "prompt_id": prompt_id,
        "annotator": annotator,
        "kind": kind,
        "generation1_id": generation1_id,
        "generation2_id": generation2_id,
        "generation1_reward": generation1_reward,
        "generation2_reward": generation2_reward,
        "score1": score1,
        "score2": score2,
        "confidence": confidence,
        "agreement": agreement,
        "status": status,
        # Raw output and error text may echo a credential (an endpoint quoting the request's key): masked.
        "raw": redact(json.dumps(raw, sort_keys=True, default=str)),
    }


def prompt_groups(generations: pd.DataFrame) -> list[pd.DataFrame]:
    """The samples of each prompt, prompts in order of first appearance, samples by sample_index."""
    order = list(dict.fromkeys(generations["prompt_id"]))
    by_prompt = {
        pid: g.sort_values("sample_index", kind="stable") for pid, g in generations.groupby("prompt_id")
    }
    return [by_prompt[pid] for pid in order]


@dataclass
class Score:
    """One generation's score, or why there is none (status "error" / "unparseable")."""

    value: float | None
    status: str = "ok"
    raw: dict = field(default_factory=dict)


@dataclass
class ScoreRules:
    """How scores become rows: see `rows_from_scores`."""

    mode: OutputMode = "pairs"
    pair_selection: PairSelection = "best_vs_worst"
    min_margin: float = 0.0
    pointwise_threshold: float | None = None  # None: the median score of the prompt's samples
    seed: int = 0


def _group_rng(seed: int, annotator: str, generation_ids: Sequence[str]) -> random.Random:
    """A RNG fixed by the group's content, so a re-run or a resumed shard picks the same pairs."""
    key = hashlib.sha256(json.dumps([seed, annotator, *generation_ids]).encode()).hexdigest()
    return random.Random(int(key[:16], 16))


def select_pairs(scores: dict[str, float], rule: PairSelection, rng: random.Random) -> list[tuple[str, str]]:
    """(preferred id, other id) pairs among the scored samples of one prompt (at least two).

    best_vs_worst: the highest against the lowest score; best_vs_random: the highest against a random other;
    random: two random samples; all_pairs: every two samples (n(n-1)/2 pairs). The higher-scored sample is
    preferred; equal scores keep sample order.
    """
    ids = list(scores)
    if len(ids) < 2:
        raise ValueError(f"a pair needs two scored samples, got {len(ids)}")

    def ordered(first: str, second: str) -> tuple[str, str]:
        return (first, second) if scores[first] >= scores[second] else (second, first)

    best = max(ids, key=lambda i: scores[i])  # max/min return the first of equal scores
    if rule == "best_vs_worst":
        others = [i for i in ids if i != best]
        return [(best, min(others, key=lambda i: scores[i]))]
    if rule == "best_vs_random":
        return [(best, rng.choice([i for i in ids if i != best]))]
    if rule == "random":
        return [ordered(*rng.sample(ids, 2))]
    if rule == "all_pairs":
        return [ordered(first, second) for index, first in enumerate(ids) for second in ids[index + 1:]]
    raise ValueError(f"unknown pair selection rule {rule!r}")


def rows_from_scores(
    annotator: str, generations: pd.DataFrame, scores: Sequence[Score], rules: ScoreRules
) -> list[dict]:
    """Turn one score per generation (aligned with the rows of `generations`) into annotation rows.

    mode "pairs": per prompt one pair chosen by `rules.pair_selection`; generation1 is the preferred sample
    (reward 1.0, the other 0.0); equal scores give a "tie" (0.5 / 0.5); a margin below `rules.min_margin`
    gives a "skipped" row (no label, counted). The raw JSON keeps every score of the prompt.
    mode "labels": one row per generation, reward 1.0 when score >= threshold else 0.0; the threshold is
    `rules.pointwise_threshold`, or, when unset, the median score of the prompt's samples (so the better
    half of each prompt's samples is desirable: this needs >= 2 samples per prompt; a sample whose
    siblings all failed is "skipped").
    mode "rewards": one row per generation, reward = score.
    A generation without a score gives a row with its status ("error"/"unparseable") and no reward.
    """
    if len(scores) != len(generations):
        raise ValueError(f"{len(scores)} scores for {len(generations)} generations")
    score_by_id = dict(zip(generations["generation_id"], scores, strict=True))
    kind = "pairwise" if rules.mode == "pairs" else "pointwise"
    rows = []
    for group in prompt_groups(generations):
        prompt_id = group["prompt_id"].iloc[0]
        ids = list(group["generation_id"])
        for gid in ids:
            failed = score_by_id[gid]
            if failed.value is None:
                rows.append(annotation_row(annotator, prompt_id, kind, failed.status, failed.raw, gid))
        valid = {gid: score_by_id[gid].value for gid in ids if score_by_id[gid].value is not None}
        if rules.mode == "pairs":
            rows += _pair_rows(annotator, prompt_id, ids, valid, rules)
        else:
            rows += _pointwise_rows(annotator, prompt_id, ids, valid, score_by_id, rules)
    return rows


def _pair_rows(annotator: str, prompt_id: str, ids: list, valid: dict, rules: ScoreRules) -> list[dict]:
    if len(ids) < 2:
        raise ValueError(
            f"pairwise annotation needs >= 2 samples per prompt; prompt {prompt_id!r} has {len(ids)}"
        )
    if len(valid) < 2:  # the failed samples already have their rows
        return []
    rng = _group_rng(rules.seed, annotator, ids)
    return [_pair_row(annotator, prompt_id, chosen, rejected, valid, rules)
            for chosen, rejected in select_pairs(valid, rules.pair_selection, rng)]


def _pair_row(annotator: str, prompt_id: str, chosen: str, rejected: str, valid: dict, rules: ScoreRules) -> dict:
    margin = valid[chosen] - valid[rejected]
    raw = {"rule": rules.pair_selection, "margin": margin, "scores": valid}
    if margin < rules.min_margin:
        status, rewards = "skipped", (None, None)
    elif margin == 0:
        status, rewards = "tie", (0.5, 0.5)
    else:
        status, rewards = "ok", (1.0, 0.0)
    return annotation_row(annotator, prompt_id, "pairwise", status, raw, chosen, rejected,
                          generation1_reward=rewards[0], generation2_reward=rewards[1],
                          score1=valid[chosen], score2=valid[rejected])


def _pointwise_rows(
    annotator: str, prompt_id: str, ids: list, valid: dict, score_by_id: dict, rules: ScoreRules
) -> list[dict]:
    by_median = rules.mode == "labels" and rules.pointwise_threshold is None
    if by_median and len(ids) < 2:
        raise ValueError(
            f"pointwise labels by the per-prompt median need >= 2 samples per prompt; prompt {prompt_id!r} "
            f"has {len(ids)}: set annotation.pointwise_threshold or generation.n_samples >= 2"
        )
    if by_median and len(valid) < 2:  # the others failed: nothing to compare the survivor with
        raw = {"reason": "no other scored sample of the prompt to take a median with"}
        return [
            annotation_row(annotator, prompt_id, "pointwise", "skipped", {**raw, "score": v}, gid, score1=v)
            for gid, v in valid.items()
        ]
    threshold = statistics.median(valid.values()) if by_median else rules.pointwise_threshold
    rows = []
    for gid, value in valid.items():
        if rules.mode == "labels":
            reward = 1.0 if value >= threshold else 0.0
            raw = {**score_by_id[gid].raw, "score": value, "threshold": threshold}
        else:
            reward, raw = value, {**score_by_id[gid].raw, "score": value}
        rows.append(
            annotation_row(
                annotator, prompt_id, "pointwise", "ok", raw, gid, generation1_reward=reward, score1=value
            )
        )
    return rows
