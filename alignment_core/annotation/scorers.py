"""Annotators that score each generation on its own: a reward model, or a Python function.

Both produce one score per generation and leave pairing / labelling to `rows_from_scores`, so the two
share the selection rules, the minimum margin and the pointwise threshold.
"""

import importlib
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import pandas as pd
import torch

from alignment_core import kept_models
from alignment_core.annotation.base import LABEL_STATUSES, Score, ScoreRules, rows_from_scores
from alignment_core.models import load_reward_model, load_tokenizer, model_digest, resolve_model_path
from alignment_core.rendering import pair_ids

log = logging.getLogger(__name__)

# annotation.batch_size unset: a reward model scores its samples sorted by length, in batches of at most this
# many tokens (padding included), by device: short samples are not padded to a long one's width, and a batch
# of short ones is wide. On a CPU wider is not faster: scoring 2048 samples of 52 tokens with the tiny reward
# model on 2 cores took 4.9 s in batches of 1024, 2048 or 4096 tokens and 6.2 s in batches of 8192 (the
# activations outgrow the caches); 2048 leaves room for models wider than the tiny one.
AUTO_SCORE_TOKENS = {"cpu": 2048, "cuda": 65536}


class RewardModelAnnotator:
    """Scores prompt + response with an AutoModelForSequenceClassification and its own tokenizer.

    The reward model's tokenizer (never the policy's) renders each pair by the rule training used on it
    (`rendering.pair_ids`: the prompt through its chat template, the response, the template's end-of-turn
    token), so the head reads its score from the token it was trained to score. Token ids from the policy mean
    nothing to another vocabulary, so responses are re-tokenised from their text. Long inputs keep their end
    (the response), since that is what is scored.
    """

    def __init__(
        self,
        model: str,
        rules: ScoreRules,
        batch_size: int | None = None,
        max_length: int = 512,
        dtype: str = "float32",
        device: str | None = None,
    ):
        path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = kept_models.shared("reward_model", path, partial(
            load_reward_model, path, tokenizer=self.tokenizer, dtype=dtype), dtype=dtype).to(self.device).eval()
        self.name = f"reward_model:{model_digest(path)}"
        self.rules, self.batch_size, self.max_length = rules, batch_size, max_length

    def sequences(self, prompts: Sequence, responses: Sequence[str]) -> list[list[int]]:
        """The token ids scored for each (prompt messages, response), cut to their last `max_length` tokens."""
        return [pair_ids(self.tokenizer, list(messages), response)[-self.max_length:]
                for messages, response in zip(prompts, responses, strict=True)]

    def batches(self, sequences: list[list[int]]) -> list[list[int]]:
        """The indices of `sequences` scored together: `batch_size` at a time in order where it is set, else
        by length, each batch within `AUTO_SCORE_TOKENS` of the device (one sample at least)."""
        if self.batch_size:
            return [list(range(start, min(start + self.batch_size, len(sequences))))
                    for start in range(0, len(sequences), self.batch_size)]
        budget = AUTO_SCORE_TOKENS.get(str(self.device).split(":")[0], AUTO_SCORE_TOKENS["cpu"])
        batches: list[list[int]] = []
        for index in sorted(range(len(sequences)), key=lambda i: len(sequences[i])):
            # Ascending lengths: the sample added is the batch's widest.
            if batches and (len(batches[-1]) + 1) * len(sequences[index]) <= budget:
                batches[-1].append(index)
            else:
                batches.append([index])
        return batches

    @torch.no_grad()
    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        """One scalar per (prompt messages, response)."""
        sequences, pad = self.sequences(prompts, responses), self.tokenizer.pad_token_id
        scores = [math.nan] * len(sequences)
        for indices in self.batches(sequences):
            batch = [sequences[i] for i in indices]
            width = max(len(ids) for ids in batch)
            # Right padding: the head reads the last token that is not padding.
            token_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=self.device)
            attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch],
                                     device=self.device)
            values = self.model(input_ids=token_ids, attention_mask=attention).logits[:, 0].float().tolist()
            for index, value in zip(indices, values, strict=True):
                scores[index] = value
        return scores

    def annotate(self, generations: pd.DataFrame) -> list[dict]:
        values = self.score(generations["prompt_messages"], generations["response"]) if len(generations) else []
        scores = [
            Score(v) if math.isfinite(v) else Score(None, "error", {"error": f"non-finite reward {v}"})
            for v in values
        ]
        return rows_from_scores(self.name, generations, scores, self.rules)


class RewardModelEnsemble:
    """K reward models that each score every sample; their spread says where the ensemble does not know.

    A sample's score is the members' mean minus `penalty` times their standard deviation (a conservative
    score), and pairs are chosen on it as for one reward model. Each row's raw JSON keeps every member's score
    of its samples, the mean and the disagreement: for a pair, the standard deviation of the per-member
    margins (members that rank the pair differently disagree, however sure each is); for a sample, the
    standard deviation of its member scores. `confidence` is the fraction of members that rank the pair as the
    row does. Above `max_disagreement` the row abstains (status "abstained", no label): a cascade escalates
    such rows to a stronger annotator, a plain run does not train on them.
    """

    def __init__(self, models: Sequence[str], rules: ScoreRules, penalty: float = 0.0,
                 max_disagreement: float | None = None, **member_options):
        self.members = [RewardModelAnnotator(model, rules, **member_options) for model in models]
        self.name = "reward_ensemble:" + ",".join(member.name.split(":", 1)[1] for member in self.members)
        self.rules, self.penalty, self.max_disagreement = rules, penalty, max_disagreement

    def member_scores(self, generations: pd.DataFrame) -> np.ndarray:
        """[members, samples] scores."""
        prompts, responses = generations["prompt_messages"], generations["response"]
        return np.array([member.score(prompts, responses) for member in self.members], dtype=float)

    def annotate(self, generations: pd.DataFrame) -> list[dict]:
        if not len(generations):
            return []
        members = self.member_scores(generations)
        by_id = dict(zip(generations["generation_id"], members.T, strict=True))
        scores = []
        for member_scores in members.T:
            if not np.isfinite(member_scores).all():
                scores.append(Score(None, "error", {"error": f"non-finite member rewards {member_scores.tolist()}"}))
            else:
                mean, spread = float(member_scores.mean()), float(member_scores.std())
                scores.append(Score(mean - self.penalty * spread, "ok", {"mean": mean, "std": spread}))
        return [self._with_disagreement(row, by_id) for row in rows_from_scores(self.name, generations, scores,
                                                                                 self.rules)]

    def _with_disagreement(self, row: dict, by_id: dict) -> dict:
        if row["status"] not in LABEL_STATUSES:
            return row
        first = by_id[row["generation1_id"]]
        if row["generation2_id"] is None:
            disagreement, confidence = float(first.std()), None
        else:
            margins = first - by_id[row["generation2_id"]]
            disagreement = float(margins.std())
            confidence = float((margins > 0).mean()) if row["status"] == "ok" else None
        raw = {**json.loads(row["raw"]), "members": {gid: by_id[gid].tolist() for gid in
                                                    (row["generation1_id"], row["generation2_id"]) if gid},
               "disagreement": disagreement}
        agreement = None if confidence is None else confidence == 1.0
        row = {**row, "raw": json.dumps(raw, sort_keys=True), "confidence": confidence, "agreement": agreement}
        if self.max_disagreement is not None and disagreement > self.max_disagreement:
            row.update(status="abstained", generation1_reward=None, generation2_reward=None)
        return row


# Comma-separated module prefixes that config-named code (annotation.programmatic, evaluation.oracle) may come
# from; unset: any module. Deployments set it (deployments/prefect.yaml, flows/serve.py): README, Trust model.
ALLOWED_CODE_ENV = "ALIGNMENT_CORE_ALLOWED_CODE"


def check_allowed_code(module_name: str) -> None:
    """Raise unless `module_name` is under a prefix of $ALIGNMENT_CORE_ALLOWED_CODE (when that is set).

    "pkg." allows pkg's submodules, "pkg" allows pkg and its submodules, "*" allows everything.
    """
    setting = os.environ.get(ALLOWED_CODE_ENV)
    if setting is None:
        return
    prefixes = [p.strip() for p in setting.split(",") if p.strip()]
    for prefix in prefixes:
        if prefix == "*" or module_name == prefix or module_name.startswith(prefix.rstrip(".") + "."):
            return
    raise ValueError(f"module {module_name!r} is not allowed here: {ALLOWED_CODE_ENV} allows only modules under "
                     f"{prefixes or 'nothing'} (README: Trust model)")


def import_callable(path: str) -> Callable:
    """`module:function` -> the function; any problem is a ValueError that says what was wrong.

    The module must be allowed by $ALIGNMENT_CORE_ALLOWED_CODE when that is set; it is checked before the
    import, since importing a module runs its code.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"programmatic reward {path!r} must be 'module:function', "
            "e.g. alignment_core.rewards:positive_words"
        )
    try:
        check_allowed_code(module_name)
    except ValueError as error:
        raise ValueError(f"programmatic reward {path!r}: {error}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"programmatic reward {path!r}: cannot import module {module_name!r}: {error}"
        ) from error
    target = module
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise ValueError(
                f"programmatic reward {path!r}: module {module_name!r} has no attribute {attribute!r}"
            )
        target = getattr(target, name)
        if os.environ.get(ALLOWED_CODE_ENV) is not None:
            # Not through an allowed module to what it imported (`allowed:os.system`, `allowed:np.load`).
            where = target.__name__ if inspect.ismodule(target) else getattr(target, "__module__", None)
            try:
                check_allowed_code(where or "?")
            except ValueError as error:
                raise ValueError(f"programmatic reward {path!r}: {attribute!r} is defined elsewhere: "
                                 f"{error}") from None
    if not callable(target):
        raise ValueError(f"programmatic reward {path!r}: {attribute!r} is not callable")
    return target


class ProgrammaticAnnotator:
    """Scores with a Python function `(prompt: str, response: str) -> float` named by import path.

    A call that raises or returns something that is not a finite number is an "error" row for that
    generation (logged once per batch, counted by the stage), never a score.
    """

    def __init__(self, function_path: str, rules: ScoreRules):
        self.function = import_callable(function_path)
        self.name = f"programmatic:{function_path}"
        self.rules = rules

    def score(self, prompt: str, response: str) -> Score:
        try:
            value = self.function(prompt, response)
            value = float(value)
        except Exception as error:  # a user function may raise anything; the row records what
            return Score(None, "error", {"error": f"{type(error).__name__}: {error}"})
        if not math.isfinite(value):
            return Score(None, "error", {"error": f"non-finite reward {value}"})
        return Score(value)

    def annotate(self, generations: pd.DataFrame) -> list[dict]:
        scores = [
            self.score(p, r) for p, r in zip(generations["prompt"], generations["response"], strict=True)
        ]
        failed = sum(s.value is None for s in scores)
        if failed:
            first = next(s for s in scores if s.value is None)
            log.warning(
                "%s failed on %d of %d generations (first: %s)", self.name, failed, len(scores), first.raw
            )
        return rows_from_scores(self.name, generations, scores, self.rules)
