"""The config sections of the feedback: the annotator (judge, person, cascade and its reward-model refresh) and
how samples are reweighted."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignment_core.config.common import MAX_BATCH, StrictModel, check_reweight_clip

__all__ = [  # what the package re-exports
    "AnnotationConfig",
    "CascadeConfig",
    "HumanConfig",
    "JudgeConfig",
    "RefreshConfig",
    "ReweightConfig",
]


class JudgeConfig(StrictModel):
    backend: Literal["local", "vllm", "http"] = "local"
    """local: transformers; vllm: an in-process engine"""
    model: str | None = None
    """local path/hub name, or the served model name for http"""
    template: str = "helpfulness"
    """a bundled template name, or a path to a Jinja file"""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"""
    api_key_env: str = "OPENAI_API_KEY"
    """name of the environment variable that holds the key"""
    timeout_s: float = Field(default=60.0, gt=0)
    """http judge: seconds per request."""
    budget_s: float | None = Field(default=None, gt=0)
    """http judge: seconds for all of a stage's requests together, from its first; requests not answered by then
    fail as transient (like an outage: a rerun of the stage asks again). Unset: no bound beyond timeout_s."""
    version: str = ""
    """Part of the judge's identity in the answer cache, with its endpoint, model name, template and sampling:
    bump when the judge behind the same URL/name changed (new weights, a new server), so it is asked again."""
    max_retries: int = Field(default=3, ge=0)
    """http judge: retries of a failed request (transient errors only)."""
    concurrency: int = Field(default=4, gt=0)
    """http judge: requests in flight."""
    both_orders: bool = True
    """Ask the pairwise judge in both orders (position bias check)."""
    on_disagreement: Literal["tie", "drop"] = "tie"
    """When the two orders disagree: a tie, or drop the pair."""
    max_new_tokens: int = Field(default=8, gt=0)
    """Tokens the judge may write for its verdict."""
    pointwise_scale: Literal["yes_no", "score"] = "yes_no"
    """judge_pointwise: "yes_no" (desirable or not) or "score" (1-10); bundled templates are {template}_{scale}"""


class HumanConfig(StrictModel):
    """A person labels pairs through a form on the paused flow run in the Prefect UI (annotator `human`, or a
    cascade's `escalate_to: human`); each pair's answer is stored before its shard, so it is never asked twice."""

    timeout_s: int = Field(default=3600, gt=0)
    """Seconds a form waits for its answer; pairs still unanswered then are recorded `unanswered` (not trained
    on), and no further form is shown in that stage."""
    max_pairs_per_form: int = Field(default=8, gt=0, le=256)
    """Pairs per form: a shard with more pairs is asked in several forms, one after the other."""


class RefreshConfig(StrictModel):
    """The reward models learn online: from the second iteration on, each member of the cascade's first annotator
    (a reward model or an ensemble) is fine-tuned on the expensive (escalated) labels of the iterations before,
    and that iteration labels with the fine-tuned members (its `reward_models` stage)."""

    enabled: bool = False
    """Fine-tune the reward models on the escalated labels before each iteration's annotation (off: the same
    reward models label every iteration)."""
    learning_rate: float = Field(default=1e-4, gt=0)
    """Peak learning rate of each member's fine-tuning round (AdamW, training.scheduler and warmup_ratio)."""
    epochs: int = Field(default=2, gt=0, le=1000)
    """Passes over the escalated labels (each member over its own bootstrap sample of them)."""
    batch_size: int = Field(default=8, gt=0, le=MAX_BATCH)
    """Labelled pairs per optimizer step of the fine-tuning."""
    bootstrap: bool = True
    """Each member trains on its own bootstrap resample of the labels (n draws with replacement), so members that
    saw the same labels still disagree where the labels do not pin them down; off: every member sees every
    label once."""
    seed: int = 0
    """Member i's batch order and bootstrap sample are seeded by seed + i."""


class CascadeConfig(StrictModel):
    """A cheap annotator labels every pair; a budget of them, where it is least sure, go to an expensive one."""

    first: Literal["reward_model", "judge_pairwise", "programmatic"] = "reward_model"
    """The cheap annotator that labels every pair (a reward-model ensemble knows where it is unsure)."""
    escalate_to: Literal["reward_model", "judge_pairwise", "programmatic", "human"] = "judge_pairwise"
    """The expensive annotator (a strong judge, a programmatic oracle, a person: annotation.human) that relabels
    the escalated pairs."""
    budget: float = Field(default=0.25, gt=0)
    """Expensive labels per iteration: below 1, a fraction of the iteration's prompts (0.25: one pair in four);
    from 1 on, a number of pairs (a whole number). Never exceeded, resumes included."""
    escalate: Literal["most_uncertain", "random"] = "most_uncertain"
    """Which pairs go up: the first annotator's most uncertain (abstained or failed first, then the likeliest to
    be wrong: the smallest score margin, an ensemble's mean margin softened by the members' spread), or a random
    choice (a control)."""
    refresh: RefreshConfig = RefreshConfig()
    """Fine-tune the first annotator's reward models on the escalated labels gathered so far, each iteration."""

    @model_validator(mode="after")
    def _check(self) -> "CascadeConfig":
        if self.first == self.escalate_to:
            raise ValueError(f"annotation.cascade: first and escalate_to are both {self.first!r}; a cascade needs "
                             "two annotators")
        if self.refresh.enabled and self.first != "reward_model":
            raise ValueError(f"annotation.cascade.refresh fine-tunes reward models: cascade.first must be "
                             f"'reward_model', got {self.first!r}")
        if self.budget >= 1 and self.budget != int(self.budget):
            raise ValueError(f"annotation.cascade.budget from 1 on is a number of pairs, got {self.budget}")
        return self


class AnnotationConfig(StrictModel):
    annotator: Literal["reward_model", "judge_pairwise", "judge_pointwise", "programmatic", "cascade", "human"] = (
        "programmatic")
    """Who labels the samples: a reward model, an LLM judge (pairwise or pointwise), a rule, a cascade of
    two of them under a label budget (`cascade`), or a person in the Prefect UI (`human`, every pair asked)."""
    reward_model: str | list[str] | None = None
    """path or hub name of an AutoModelForSequenceClassification; a list: an ensemble whose members each score
    every sample (reward models trained with different seeds or data), recorded per member in each row"""
    ensemble_penalty: float = Field(default=0.0, ge=0)
    """Ensemble: a sample's score is the members' mean minus this times their standard deviation (0: the mean;
    larger: more conservative where the members disagree)."""
    max_disagreement: float | None = Field(default=None, gt=0)
    """Ensemble: abstain (no label, status "abstained") on a pair whose per-member margins have a standard
    deviation above this, or a sample whose member scores do (pointwise); unset: never abstain."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Weights dtype of the reward model or local judge; unset: model.dtype."""
    programmatic: str = "alignment_core.rewards:positive_words"
    """module:function(prompt, response) -> float"""
    pair_selection: Literal["best_vs_worst", "best_vs_random", "random", "all_pairs"] = "best_vs_worst"
    """Which of a prompt's scored samples make pairs: best_vs_worst (the largest margin of n samples, as
    RLHFlow), best_vs_random, random, or all_pairs (every two samples, each pair a training unit; with
    min_margin, pairs closer than it are skipped)."""
    min_margin: float = Field(default=0.0, ge=0)
    """Drop pairs whose score gap is smaller than this."""
    pointwise_threshold: float | None = None
    """pointwise labels: reward >= threshold is desirable"""
    batch_size: int | None = Field(default=None, gt=0, le=MAX_BATCH)
    """Samples per reward-model or local-judge forward. Unset: the reward model scores length-sorted batches up
    to a token budget (annotation/scorers.py), a local judge 16 prompts per call."""
    max_failure_fraction: float = Field(default=0.2, ge=0, le=1)
    """Fail the stage when more than this fraction of annotations failed."""
    judge: JudgeConfig = JudgeConfig()
    """The LLM judge (annotator judge_pairwise / judge_pointwise)."""
    cascade: CascadeConfig = CascadeConfig()
    """annotator cascade: which annotator labels first, which one the uncertain pairs go to, and the budget."""
    human: HumanConfig = HumanConfig()
    """A person as annotator (`human`, or a cascade's escalate_to): the form's timeout and size."""

    @property
    def kinds(self) -> tuple[str, ...]:
        """The annotators that label: this one, or a cascade's first and escalation annotators."""
        return (self.cascade.first, self.cascade.escalate_to) if self.annotator == "cascade" else (self.annotator,)

    @property
    def judge_kind(self) -> str | None:
        """judge_pairwise or judge_pointwise when an LLM judge labels (alone or in a cascade), else None."""
        return next((kind for kind in self.kinds if kind.startswith("judge")), None)

    @property
    def reward_models(self) -> list[str]:
        """`reward_model` as a list: none, the one model, or the ensemble's members."""
        if self.reward_model is None:
            return []
        return [self.reward_model] if isinstance(self.reward_model, str) else list(self.reward_model)


class ReweightConfig(StrictModel):
    strategy: Literal["uniform", "margin", "judge_confidence", "importance", "length_debias"] = "uniform"
    """How training units are weighted (uniform, margin, judge_confidence, importance, length_debias)."""
    temperature: float = Field(default=1.0, gt=0)
    """Softens margin and importance weights (higher: flatter)."""
    clip: float = Field(default=5.0, gt=0)
    """importance ratios and weights are clipped to [1/clip, clip]"""
    behaviour_model: str | None = None
    """importance: the model that wrote the responses; `sampler` (online): the checkpoint that sampled each
    response, by the log-probs it recorded then (the off-policy correction of samples from an older checkpoint,
    scale_out.schedule async)."""
    importance_pair: Literal["joint", "mean"] = "joint"
    """importance, pairs: the pair's log ratio is the sum of its two responses' (joint: the pair's probability)
    or their mean (a response's typical ratio: half the spread)."""
    min_effective_sample_fraction: float = Field(default=0.0, ge=0, le=1)
    """A guard: weights whose effective sample size, (sum w)^2 / sum w^2, is below this fraction of the units
    fall back to uniform (logged, recorded in each row's inputs); 0 never falls back."""

    @field_validator("clip")
    @classmethod
    def _clip_at_least_one(cls, clip: float) -> float:
        check_reweight_clip(clip)
        return clip

    @property
    def uses_sampler(self) -> bool:
        """importance against the checkpoint that sampled each response (its recorded log-probs): no model to load."""
        return self.strategy == "importance" and self.behaviour_model == "sampler"
