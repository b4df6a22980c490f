"""A person as annotator: pairs are put to them through an injected `ask`, and each answer is stored before
any row is built from it.

    annotator = HumanAnnotator(ask, max_pairs_per_form=8, answers=HumanAnswerStore(store))
    rows = annotator.annotate(generations)        # samples (0, 1), (2, 3), ... of each prompt, as the judge pairs them
    rows = annotator.annotate_pairs(pair_frames)  # a cascade's escalated pairs, all of a shard in one go

`ask(pairs: list[HumanPair]) -> FormAnswers` shows up to `max_pairs_per_form` pairs to a person and returns
their choices. In a flow, `tasks/human.py` `ask_in_the_ui` pauses the flow run with a form in the Prefect UI;
elsewhere (a notebook) pass your own (e.g. one that reads `input()`): without one the annotator refuses to start.

A pair is shown in an order fixed by its samples' ids, not by a first annotator's preference (no position hint).
The person picks, per pair:

    first / second  that response is preferred          status ok          (1.0 / 0.0)  trained on
    tie             equally good                        status tie         (0.5 / 0.5)  a label, as a judge's tie
    skip            declined to judge                   status skipped     no label     not trained on
    (nothing)       left blank, or the form timed out   status unanswered  no label     not trained on

Each row's raw JSON holds the answer, the labeller (the name typed in the form, else the Prefect sender of the
answer, else "unknown"), when it was answered and how long the form was open. Answers are stored by content
(the prompt and both responses as shown) under `{store root}/_human_labels/`, one small JSON file per pair,
written as soon as a form comes back: a killed or redone stage, or another run meeting the same pair, never asks
the person again. Unanswered pairs are not stored, so a stage redone later asks them again. After a form timed
out with no answer at all, the annotator asks no more forms (the person is away): a stage waits for one timeout,
not one per form.
"""

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from alignment_core.annotation.base import annotation_row, prompt_groups

log = logging.getLogger(__name__)

Choice = Literal["first", "second", "tie", "skip"]
CHOICES: tuple[str, ...] = ("first", "second", "tie", "skip")
ANSWERS_FOLDER = "_human_labels"
NAME = "human"


@dataclass(frozen=True)
class HumanPair:
    """One pair as the person sees it: the prompt and two responses, in the order shown."""

    key: str  # sha256 of the prompt and both responses in this order: the answer's identity in the store
    prompt: str
    first: str
    second: str


@dataclass
class FormAnswers:
    """What came back from one form."""

    choices: dict[str, Choice | None]  # pair key -> choice; a pair left out or None was not answered
    labeller: str = "unknown"
    timed_out: bool = False  # nobody answered before the form's timeout
    answered_at: str | None = None  # ISO 8601, UTC
    seconds_open: float | None = None  # from the form's opening to its answer (or its timeout)


Ask = Callable[[list[HumanPair]], FormAnswers]


class NoOneToAskError(RuntimeError):
    """A human annotator was built without a way to reach a person (no `ask`)."""


def pair_key(prompt: str, first: str, second: str) -> str:
    return hashlib.sha256(json.dumps([prompt, first, second]).encode()).hexdigest()


class HumanAnswerStore:
    """The person's answers by pair key under `{store root}/_human_labels/{key[:2]}/{key}.json`."""

    def __init__(self, store):
        self.store = store

    def _uri(self, key: str) -> str:
        return self.store.uri(ANSWERS_FOLDER, key[:2], f"{key}.json")

    def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        paths = [self.store._path(self._uri(key)) for key in keys]
        found = {}
        self.store.fs.invalidate_cache()
        for data in self.store.fs.cat(paths, on_error="omit").values():
            try:
                entry = json.loads(data)
            except ValueError:  # a damaged entry is a miss: asked again and rewritten
                continue
            found[entry["key"]] = entry
        return found

    def put(self, entry: dict) -> None:
        self.store.write_bytes(self._uri(entry["key"]), json.dumps(entry, sort_keys=True).encode())


class InMemoryAnswers:
    """Answers held in memory (a notebook, a test): the same interface as HumanAnswerStore."""

    def __init__(self):
        self.entries: dict[str, dict] = {}

    def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        return {key: self.entries[key] for key in keys if key in self.entries}

    def put(self, entry: dict) -> None:
        self.entries[entry["key"]] = entry


@dataclass
class _Shown:
    """A pair as shown, with the generation rows behind its first and second response."""

    pair: HumanPair
    first: pd.Series
    second: pd.Series


@dataclass
class HumanAnnotator:
    ask: Ask | None
    max_pairs_per_form: int = 8
    answers: HumanAnswerStore | InMemoryAnswers = field(default_factory=InMemoryAnswers)
    name: str = NAME
    forms_asked: int = 0
    pairs_asked: int = 0
    person_away: bool = False  # a form timed out with no answer: no more forms in this stage

    def __post_init__(self):
        if self.ask is None:
            raise NoOneToAskError(
                "annotation.annotator 'human' (or cascade.escalate_to 'human') asks a person, and nothing here can "
                "reach one: run the online flow under Prefect (the run pauses with a form in the UI), or call "
                "pipeline.annotate(..., ask=your_function) with a function that takes a list of HumanPair and "
                "returns FormAnswers (alignment_core/annotation/human.py)")
        if self.max_pairs_per_form < 1:
            raise ValueError(f"max_pairs_per_form must be >= 1, got {self.max_pairs_per_form}")

    def annotate(self, generations: pd.DataFrame) -> list[dict]:
        """One row per pair of samples (0, 1), (2, 3), ... of each prompt."""
        pairs = []
        for group in prompt_groups(generations):
            if len(group) < 2:
                raise ValueError(f"a person compares two samples of a prompt; prompt {group['prompt_id'].iloc[0]!r} "
                                 f"has {len(group)} (generation.n_samples)")
            samples = [row for _, row in group.iterrows()]
            pairs += [(samples[i], samples[i + 1]) for i in range(0, len(samples) - 1, 2)]
        return self._label(pairs)

    def annotate_pairs(self, pairs: Sequence[pd.DataFrame]) -> list[list[dict]]:
        """Rows for each two-sample frame (a cascade's escalated pairs), asked together in as few forms as fit."""
        rows = self._label([(frame.iloc[0], frame.iloc[1]) for frame in pairs])
        return [[row] for row in rows]

    def _label(self, pairs: list[tuple[pd.Series, pd.Series]]) -> list[dict]:
        shown = [_show(a, b) for a, b in pairs]
        stored = self.answers.get_many([s.pair.key for s in shown])
        to_ask = list({s.pair.key: s.pair for s in shown if s.pair.key not in stored}.values())
        if stored:
            log.info("human annotator: %d of %d pairs answered before, %d to ask", len(shown) - len(to_ask),
                     len(shown), len(to_ask))
        unanswered = {}
        for start in range(0, len(to_ask), self.max_pairs_per_form):
            form = to_ask[start : start + self.max_pairs_per_form]
            if self.person_away:
                unanswered.update({pair.key: {"reason": "not asked: an earlier form timed out unanswered"}
                                   for pair in form})
                continue
            stored.update(self._ask(form, unanswered))
        return [_row(s, stored.get(s.pair.key) or unanswered[s.pair.key]) for s in shown]

    def _ask(self, form: list[HumanPair], unanswered: dict) -> dict[str, dict]:
        """Ask one form; store and return its answers, and note the pairs left unanswered (and why)."""
        result = self.ask(form)
        self.forms_asked += 1
        self.pairs_asked += len(form)
        context = {"labeller": result.labeller or "unknown", "answered_at": result.answered_at,
                   "seconds_open": result.seconds_open, "form": self.forms_asked, "form_pairs": len(form)}
        answered = {}
        for pair in form:
            choice = result.choices.get(pair.key)
            if choice is None:
                why = "the form timed out" if result.timed_out else "left blank in the form"
                unanswered[pair.key] = {**context, "reason": why}
                continue
            if choice not in CHOICES:
                raise ValueError(f"human annotator: answer {choice!r} for pair {pair.key[:12]}; expected one of "
                                 f"{CHOICES}")
            entry = {**context, "key": pair.key, "choice": choice}
            self.answers.put(entry)  # before any row: a stage killed from here on does not ask again
            answered[pair.key] = entry
        if result.timed_out and not answered:
            self.person_away = True
            log.warning("human annotator: form %d (%d pairs) timed out with no answer; the stage's remaining pairs "
                        "are recorded unanswered without asking", self.forms_asked, len(form))
        return answered


def _show(a: pd.Series, b: pd.Series) -> _Shown:
    """The pair in an order fixed by its samples' ids: neither sample order nor a first annotator's verdict."""
    first, second = sorted((a, b), key=lambda row: hashlib.sha256(str(row["generation_id"]).encode()).hexdigest())
    return _Shown(HumanPair(pair_key(first["prompt"], first["response"], second["response"]), first["prompt"],
                            first["response"], second["response"]), first, second)


def _row(shown: _Shown, answer: dict) -> dict:
    """The annotation row of one shown pair and its answer (or why there is none)."""
    first, second = shown.first, shown.second
    choice = answer.get("choice")
    raw = {**{k: v for k, v in answer.items() if k != "key"}, "pair_key": shown.pair.key,
           "shown": [first["generation_id"], second["generation_id"]]}
    prompt_id = first["prompt_id"]
    if choice in ("first", "second"):
        chosen, rejected = (first, second) if choice == "first" else (second, first)
        return annotation_row(NAME, prompt_id, "pairwise", "ok", raw, chosen["generation_id"],
                              rejected["generation_id"], generation1_reward=1.0, generation2_reward=0.0)
    status, rewards = {"tie": ("tie", (0.5, 0.5)), "skip": ("skipped", (None, None))}.get(
        choice, ("unanswered", (None, None)))
    return annotation_row(NAME, prompt_id, "pairwise", status, raw, first["generation_id"], second["generation_id"],
                          generation1_reward=rewards[0], generation2_reward=rewards[1])
