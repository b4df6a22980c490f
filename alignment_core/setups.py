"""The seven learning setups, one row each: everything else (config validation, `batches`, the annotation
stage, the flows) reads this table instead of keeping its own list of setup names.

A setup says where the training units come from (a dataset, or the policy's own samples judged online), how
many responses a unit holds, and what its feedback is:

| setup             | online | responses | feedback      | losses                        | flow               |
| ----------------- | ------ | --------- | ------------- | ----------------------------- | ------------------ |
| sft               | no     | 1         | demonstration | sft                           | sft                |
| reward_modelling  | no     | 2         | ranking       | reward                        | reward-model       |
| offline_pointwise | no     | 1         | label         | kto                           | offline-preference |
| offline_pairwise  | no     | 2         | preference    | dpo cdpo ipo slic simpo       | offline-preference |
| rl                | yes    | 1         | reward        | rl                            | iterative-dpo      |
| online_pointwise  | yes    | 1         | label         | kto                           | iterative-dpo      |
| online_pairwise   | yes    | 2         | preference    | dpo cdpo ipo slic simpo       | iterative-dpo      |

Feedback: a *demonstration* is a response to imitate (no reward); a *ranking* is a chosen and a rejected
response for a reward model (no reward numbers); a *preference* is a pair put in canonical order (generation1
preferred, rewards 1.0 / 0.0, ties dropped); a *label* is 1.0 (desirable) or 0.0 (undesirable); a *reward* is a
scalar per response. This module imports neither torch nor pydantic: the config loads it.
"""

from dataclasses import dataclass
from typing import Literal

Feedback = Literal["demonstration", "ranking", "preference", "label", "reward"]

# What the annotation stage writes for an online setup's feedback (annotation.base.OutputMode).
ANNOTATION_OF_FEEDBACK = {"preference": "pairs", "label": "labels", "reward": "rewards"}


@dataclass(frozen=True)
class SetupSpec:
    name: str
    online: bool
    responses: int  # per training unit: 1, or 2 for a (chosen, rejected) pair
    feedback: Feedback
    losses: tuple[str, ...]  # the losses it trains with (alignment_core.losses.LOSSES)
    flow: str  # the flow (deployment name prefix) that runs it
    data_formats: tuple[str, ...] = ()  # offline: the explicit data.format values that give it examples

    @property
    def generations(self) -> tuple[str, ...]:
        """The units' generation columns: ("generation1",) or ("generation1", "generation2")."""
        return ("generation1", "generation2")[: self.responses]

    @property
    def has_rewards(self) -> bool:
        """Whether a unit's generation<k>_reward is a number (otherwise None)."""
        return self.feedback in ("preference", "label", "reward")

    @property
    def annotation(self) -> str | None:
        """What the annotation stage writes (online setups): pairs, labels or rewards."""
        return ANNOTATION_OF_FEEDBACK[self.feedback] if self.online else None


PAIR_FORMATS = ("pairs", "hh_rlhf", "messages_pairs", "scored")
PREFERENCE_LOSSES = ("dpo", "cdpo", "ipo", "slic", "simpo")

SETUPS: dict[str, SetupSpec] = {spec.name: spec for spec in (
    SetupSpec("sft", online=False, responses=1, feedback="demonstration", losses=("sft",), flow="sft",
              data_formats=("sft", *PAIR_FORMATS, "pointwise")),
    SetupSpec("reward_modelling", online=False, responses=2, feedback="ranking", losses=("reward",),
              flow="reward-model", data_formats=PAIR_FORMATS),
    SetupSpec("offline_pointwise", online=False, responses=1, feedback="label", losses=("kto",),
              flow="offline-preference", data_formats=("pointwise",)),
    SetupSpec("offline_pairwise", online=False, responses=2, feedback="preference", losses=PREFERENCE_LOSSES,
              flow="offline-preference", data_formats=PAIR_FORMATS),
    SetupSpec("rl", online=True, responses=1, feedback="reward", losses=("rl",), flow="iterative-dpo"),
    SetupSpec("online_pointwise", online=True, responses=1, feedback="label", losses=("kto",),
              flow="iterative-dpo"),
    SetupSpec("online_pairwise", online=True, responses=2, feedback="preference", losses=PREFERENCE_LOSSES,
              flow="iterative-dpo"),
)}


def setup_spec(name: str) -> SetupSpec:
    """The row of setup `name`; an unknown name fails listing the known ones."""
    if name not in SETUPS:
        raise ValueError(f"unknown setup {name!r}; expected one of {tuple(SETUPS)}")
    return SETUPS[name]


def setups_of_flow(flow: str) -> tuple[str, ...]:
    """The setups a flow runs, e.g. ("offline_pairwise", "offline_pointwise") for offline-preference."""
    return tuple(name for name, spec in SETUPS.items() if spec.flow == flow)
