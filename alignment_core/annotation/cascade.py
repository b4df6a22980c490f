"""An annotator cascade: a cheap annotator labels every pair, and a budget of pairs, those it is least sure of,
go to an expensive one (a strong judge, a programmatic oracle, a person: annotation/human.py).

    cascade = CascadeAnnotator(first=RewardModelEnsemble(...), escalate_to=judge, budget=0.25,
                               prompts_per_iteration=64)
    rows = cascade.annotate(generations)      # one row per prompt: the first annotator's, or the escalated one

The budget is spent shard by shard, each shard its share by its place in the iteration (`quota`), so the
iteration never spends more than its budget, and a killed stage that resumes at its first missing shard spends
on that shard exactly what the uninterrupted run would have.

Each row says who labelled it (`annotator`: the first or the escalation annotator's name) and, in its raw JSON
under "cascade": whether it was escalated, why (the rule and the uncertainty it ranked by), its rank, the
shard's quota, and the first annotator's row it replaced. The stage summary counts rows per annotator.
"""

import json
import math
import random
import statistics

import pandas as pd

from alignment_core.annotation.base import FAILURE_STATUSES, Annotator

# Rows the first annotator gave no label: no verdict to trust, escalated before any labelled row.
_UNLABELLED = ("abstained", *FAILURE_STATUSES)


def uncertainty(row: dict) -> float:
    """How unsure the first annotator is of its row: the chance that its preference is the wrong one, read as a
    Bradley-Terry probability of the pair's margin, and infinite without a label.

    For an ensemble the margin is the members' mean, softened by their spread (the logistic averaged over a
    normal spread of margins, MacKay's probit approximation: sigma(m / sqrt(1 + pi s^2 / 8))), so both a small
    margin and members that disagree make a pair unsure. The spread alone is not a measure of it: it grows with
    the margin, and ranking by it sent up the pairs the ensemble got right most often (on the experiment's
    training pairs, 0.88-0.96 right against 0.67-0.96 for the pairs it kept)."""
    if row["status"] in _UNLABELLED:
        return math.inf
    members = json.loads(row["raw"]).get("members")
    if members is not None and row["generation2_id"] is not None:
        margins = [a - b for a, b in zip(members[row["generation1_id"]], members[row["generation2_id"]], strict=True)]
        margin, spread = abs(statistics.fmean(margins)), statistics.pstdev(margins)
    elif row["score1"] is not None and row["score2"] is not None:
        margin, spread = abs(row["score1"] - row["score2"]), 0.0
    else:
        return 0.0
    return 1.0 - 1.0 / (1.0 + math.exp(-margin / math.sqrt(1.0 + math.pi * spread**2 / 8)))


class CascadeAnnotator:
    def __init__(self, first: Annotator, escalate_to: Annotator, budget: float, prompts_per_iteration: int,
                 rule: str = "most_uncertain", seed: int = 0):
        self.first, self.escalate_to = first, escalate_to
        self.budget, self.prompts_per_iteration, self.rule, self.seed = budget, prompts_per_iteration, rule, seed
        self.name = f"cascade:{first.name}>{escalate_to.name}"

    @property
    def backend(self):
        """The judge backend of either annotator (a cascade has at most one judge): the stage closes it."""
        return next((a.backend for a in (self.first, self.escalate_to) if hasattr(a, "backend")), None)

    def quota(self, prompts: int, prompts_before: int = 0) -> int:
        """Pairs a shard of `prompts` prompts, after `prompts_before` prompts of the iteration, may escalate: the
        budget's share of the prompts through this shard less that of the prompts before it, so the shares of
        an iteration's shards add up to its budget (a count budget spent on shards smaller than its rate)."""
        fraction = self.budget if self.budget < 1 else self.budget / self.prompts_per_iteration

        def share(count: int) -> int:
            return math.floor(fraction * count + 1e-9)

        return min(prompts, share(prompts_before + prompts) - share(prompts_before))

    def annotate(self, generations: pd.DataFrame, prompts_before: int = 0) -> list[dict]:
        """Rows for one shard whose prompts come after `prompts_before` prompts of the iteration."""
        rows = self.first.annotate(generations)
        quota = self.quota(generations["prompt_id"].nunique(), prompts_before)
        ranked = self._ranked(rows)
        chosen = set(ranked[:quota])
        by_id = generations.set_index("generation_id", drop=False)
        up = [index for index, row in enumerate(rows) if index in chosen and row["generation2_id"] is not None]
        relabelled = dict(zip(up, self._escalate([
            by_id.loc[[rows[index]["generation1_id"], rows[index]["generation2_id"]]].assign(sample_index=[0, 1])
            for index in up]), strict=True))
        out = []
        for index, row in enumerate(rows):
            if index not in relabelled:
                out.append(_with_record(row, {"escalated": False, "quota": quota}))
                continue
            record = {"escalated": True, "rule": self.rule, "rank": ranked.index(index), "quota": quota,
                      "uncertainty": _finite(uncertainty(row)), "replaced": _summary(row)}
            out += [_with_record(escalated, record) for escalated in relabelled[index]]
        return out

    def _escalate(self, pairs: list[pd.DataFrame]) -> list[list[dict]]:
        """The expensive annotator's rows for each escalated pair; one that takes a shard's pairs together (a
        person: one form for them all, not one per pair) gets them together."""
        annotate_pairs = getattr(self.escalate_to, "annotate_pairs", None)
        if annotate_pairs is not None:
            return annotate_pairs(pairs)
        return [self.escalate_to.annotate(pair) for pair in pairs]

    def _ranked(self, rows: list[dict]) -> list[int]:
        """Indices of the pair rows that may escalate, first to go first."""
        pairs = [i for i, row in enumerate(rows) if row["generation2_id"] is not None]
        if self.rule == "random":
            ids = sorted(rows[i]["annotation_id"] for i in pairs)
            rng = random.Random(f"{self.seed}:{ids}")
            return rng.sample(pairs, len(pairs))
        return sorted(pairs, key=lambda i: -uncertainty(rows[i]))  # stable: ties keep the rows' order


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity: an unlabelled row ranks first


def _summary(row: dict) -> dict:
    return {key: row[key] for key in ("annotator", "status", "score1", "score2", "confidence",
                                      "generation1_id", "generation2_id")}


def _with_record(row: dict, record: dict) -> dict:
    return {**row, "raw": json.dumps({**json.loads(row["raw"]), "cascade": record}, sort_keys=True)}
