"""Typed configuration: one `PipelineConfig` composed of one model per stage.

This is the single source of truth for every knob. Defaults run the built-in tiny setup on a CPU.
Configs load from YAML (`load_config`); a wrong field, type or value fails at load time with a message
that names the field, e.g. `training.beta must be > 0, got -1`.
"""

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignment_core.setups import SETUPS

# The seven learning setups: one row each in alignment_core.setups (README: The seven learning setups), and
# the losses they train with, in the order the setups name them (each has a row in alignment_core.losses).
Setup = Literal[tuple(SETUPS)]
Loss = Literal[tuple(dict.fromkeys(loss for spec in SETUPS.values() for loss in spec.losses))]

# The bundled tiny model is built on first use under this folder-relative name (see alignment_core.tiny).
TINY_MODEL = "tiny://llama"

# ---- cross-field rules: each is one function, called by the config validators (so a bad combination fails at
# config load) and, where a library entry point takes the same values without a config, by that entry point.

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_single_file_source(source: str) -> bool:
    """A bundled dataset or a data file (one split of one dataset), as opposed to a hub dataset or a folder."""
    return source.startswith("bundled:") or source.lower().endswith(DATA_FILE_SUFFIXES)


# The columns the data formats read (alignment_core/data.py): what `data.columns` may map a source's columns onto.
DATA_COLUMNS = ("prompt", "messages", "chosen", "rejected", "completion", "label", "responses", "scores",
                "score_chosen", "score_rejected")


def check_single_file_options(source: str, split: str, subset: str | None, revision: str | None) -> None:
    """A file is one split of one dataset: a split, subset or revision asked of it would be silently ignored."""
    if is_single_file_source(source) and (split != "train" or subset is not None or revision is not None):
        raise ValueError(
            f"data source {source!r} is a single file: split/subset/revision apply only to hub datasets "
            f"and folders (got split={split!r}, subset={subset!r}, revision={revision!r})"
        )


def check_prompt_fits(max_prompt_length: int, max_length: int) -> None:
    """The prompt must leave room for a response in the training sequence."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")


def check_fits_model_len(what: str, max_new_tokens: int, max_model_len: int) -> None:
    """A response of max_new_tokens after a prompt of at least one token must fit the engine's max_model_len
    (else generation skips every prompt)."""
    if max_new_tokens >= max_model_len:
        raise ValueError(f"{what} ({max_new_tokens}) must be < generation.max_model_len ({max_model_len}): "
                         "a prompt and its response must fit the model length")


def check_reweight_clip(clip: float) -> None:
    if clip < 1:
        raise ValueError(f"clip must be >= 1 (weights are clipped to [1/clip, clip]), got {clip}")


def samples_needed(cfg: "PipelineConfig") -> tuple[int, str]:
    """(samples per prompt the online setup needs, why): pairs, a leave-one-out baseline or a median need 2."""
    annotation = cfg.annotation
    if cfg.setup == "online_pairwise":
        return 2, "a preference pair is two samples of one prompt"
    if cfg.setup == "rl":
        return 2, "rl's leave-one-out baseline compares each sample with the prompt's other samples"
    judge_yes_no = annotation.judge_kind == "judge_pointwise" and annotation.judge.pointwise_scale == "yes_no"
    if cfg.setup == "online_pointwise" and annotation.pointwise_threshold is None and not judge_yes_no:
        return 2, ("pointwise labels by the per-prompt median need two samples (or set "
                   "annotation.pointwise_threshold)")
    return 1, ""


# A run name is one folder under any store (local, S3, hub): portable characters only.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Upper bounds of sizes: far above any real use, low enough that a typo (an extra zero or three) fails at load
# instead of allocating for hours or overflowing.
MAX_TOKENS = 1 << 20  # a sequence or a response: 1M tokens
MAX_BATCH = 1 << 16  # rows in one batch or one shard
MAX_COUNT = 1 << 24  # prompts, rows, steps


class StrictModel(BaseModel):
    # A field's docstring (the string under it) is its description: in the JSON schema, so in the Prefect UI's
    # form, and in `--help`-style listings.
    # allow_inf_nan=False: every float knob is a finite number (YAML's .inf / .nan fail at load).
    # strict=True: a number or a bool must be one, not a string that looks like one ('1e-4', 'yes', '8'): a quoted
    # value in YAML is a string, and reading it as a number would hide a typo such as '1e-4O'. (load_config reads
    # an unquoted 1e-4 as the float YAML 1.2 says it is; an int still fills a float field.)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              allow_inf_nan=False, strict=True)


class StoreConfig(StrictModel):
    """Where artifacts live. Credentials never go here: they come from the environment (AWS_*) or a block."""

    root: str = "./runs"
    """a local folder or an fsspec URI such as s3://bucket/prefix"""
    run_name: str = "tiny"
    """The run's folder under the root; every flow run with this name continues the same run."""
    endpoint_url: str | None = None
    """S3-compatible server, e.g. http://127.0.0.1:9000"""
    cache_dir: str = "~/.cache/alignment_core"
    """local copies of remote checkpoints"""
    lease_timeout_s: float = Field(default=600.0, gt=0)
    """One flow run writes a run at a time: it holds `{root}/{run}/_lease.json`, renewed every quarter of this
    timeout while it runs; a lease not renewed for this long (its owner crashed) is taken over."""
    lease_token: str | None = None
    """Set by the flow that holds the run's lease (dispatched stage flows verify it instead of taking their own);
    leave it unset."""
    verify_checksums: bool | None = None
    """Deprecated and ignored (still accepted, so older configs load): deciding that a stage is complete, and
    reading it, always checks each shard's size, rows and sha256 against its manifest."""
    force_rerun: bool = False
    """A finished iteration (complete checkpoint) whose stages would now be computed from something else (config,
    data, template, reward function, library code) is refused; true redoes it, replacing its checkpoint
    (`--force`, the flow parameter `force`)."""

    @field_validator("verify_checksums")
    @classmethod
    def _deprecated_verify_checksums(cls, verify_checksums: bool | None) -> bool | None:
        if verify_checksums is not None:
            import warnings

            warnings.warn("store.verify_checksums is deprecated and ignored: every stage's shards are checked "
                          "against their sha256 before the stage counts as complete; remove the setting",
                          FutureWarning, stacklevel=2)
        return verify_checksums

    @field_validator("run_name")
    @classmethod
    def _one_folder(cls, run_name: str) -> str:
        """The run is one folder under the root: `../x` or `a/b` would write (and clear stages) elsewhere."""
        from alignment_core.store import check_segment

        check_segment(run_name, "run_name")
        if run_name[0] in "._":
            raise ValueError(f"must not start with {run_name[0]!r} (such folders are not listed as runs)")
        if not RUN_NAME.fullmatch(run_name):
            raise ValueError("must be at most 128 letters, digits, '.', '_' or '-' (a folder name every store and "
                             "shell takes as is: no spaces, no quotes or other punctuation)")
        return run_name


class DataConfig(StrictModel):
    source: str = "bundled:preferences"
    """hub dataset name, local file, or bundled:<name>"""
    format: Literal[
        "auto", "prompt_only", "pairs", "hh_rlhf", "messages_pairs", "pointwise", "sft", "scored"
    ] = "auto"
    """The source's format; auto detects it from the columns (README: Bring your own data)."""
    split: str = "train"
    """Hub datasets and dataset folders: the split to read."""
    subset: str | None = None
    """Hub datasets: the configuration (subset) name."""
    revision: str | None = None
    """Hub datasets: a branch, tag or commit."""
    max_rows: int | None = Field(default=None, gt=0, le=1 << 31)
    """Read at most this many rows of the source (skipped rows count)."""
    on_bad_row: Literal["skip", "fail"] = "skip"
    """skip: count and log rows that cannot be read; fail: stop at the first one."""
    eval_source: str | None = None
    """held-out prompts; defaults to the tail of `source`"""
    eval_prompts: int = Field(default=16, ge=0, le=MAX_COUNT)
    """How many held-out prompts evaluation uses (never trained on)."""
    min_pair_margin: float = Field(default=0.0, ge=0)
    """scored lists: minimum score gap of a pair"""
    columns: dict[str, str | list[str]] = Field(default_factory=dict)
    """Your columns under a known format's names, e.g. `{prompt: question, completion: answer}`. A list joins
    those columns' text with a blank line, leaving out empty ones: Alpaca's instruction and optional input make
    one prompt with `{prompt: [instruction, input], completion: output}` (as TRL's and axolotl's Alpaca
    templates put the input after the instruction). Columns not named here keep their names; the format is
    then detected from the renamed columns, or named by `format`. The names formats read: prompt, messages,
    chosen, rejected, completion, label, responses, scores, score_chosen, score_rejected."""
    prompt_reuse: Literal["cycle", "never"] = "cycle"
    """Online runs take `generation.prompts_per_iteration` new prompts per iteration. When the source runs out:
    "cycle" samples earlier iterations' prompts again (with a warning), "never" stops the run at its first stage
    with an error."""

    @field_validator("columns")
    @classmethod
    def _columns(cls, columns: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        unknown = sorted(set(columns) - set(DATA_COLUMNS))
        if unknown:
            raise ValueError(f"columns maps onto {unknown}, which no format reads; the names formats read: "
                             f"{list(DATA_COLUMNS)}")
        for target, sources in columns.items():
            names = [sources] if isinstance(sources, str) else sources
            if not names or not all(name.strip() for name in names):
                raise ValueError(f"columns.{target}: name a source column (or a non-empty list of them)")
        return columns

    @model_validator(mode="after")
    def _file_options(self) -> "DataConfig":
        # split/subset/revision apply to eval_source too (it is read with the same options).
        for source in (self.source, self.eval_source):
            if source:
                check_single_file_options(source, self.split, self.subset, self.revision)
        return self


class AdapterConfig(StrictModel):
    """LoRA (or QLoRA: a 4-bit base) trained instead of the full weights; see alignment_core/adapters.py.

    Checkpoints then hold the adapter only (adapter_config.json + adapter_model.safetensors) and name their
    base model; the next iteration continues the same adapter; the reference is the base with the adapter off.
    """

    r: int = Field(default=16, gt=0, le=4096)
    """LoRA rank"""
    alpha: float = Field(default=32.0, gt=0)
    """scaling alpha / r"""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """LoRA dropout."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names (suffixes) to adapt, or "all-linear": every linear layer but the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases LoRA trains (peft's `bias`)."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4 bits (bitsandbytes NF4; needs a CUDA device), compute in model.dtype."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """QLoRA: 4-bit quantisation type of the frozen base."""
    bnb_4bit_use_double_quant: bool = True
    """QLoRA: quantise the quantisation constants too."""

    @model_validator(mode="after")
    def _targets(self) -> "AdapterConfig":
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError('target_modules must name at least one module, or be "all-linear"')
        return self


class ModelConfig(StrictModel):
    policy: str = TINY_MODEL
    """hub name, local folder, store URI, or tiny://llama"""
    reference: str | None = None
    """defaults to the policy the round starts from"""
    tokenizer: str | None = None
    """defaults to the policy's"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for loading every model of the run."""
    trust_remote_code: bool = False
    """Run model code from the hub repository (only for models you trust)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = "sdpa"
    """Attention kernel passed to from_pretrained; flash_attention_2/3 need the flash-attn package (and a GPU);
    flex_attention trains on a GPU only (no backward on CPUs), and sampling uses sdpa in its place."""
    adapter: AdapterConfig | None = None
    """None: full fine-tuning"""
    torch_threads: int | None = Field(default=None, gt=0, le=1024)
    """torch's CPU threads in each stage (generate, annotate, reweight, train, evaluate), set in the thread that
    runs it. Unset: the CPUs this process may use (its affinity, bounded by a cgroup CPU quota), or torch's own
    count where OMP_NUM_THREADS is set. Lower it when other processes share the cores."""


class GenerationConfig(StrictModel):
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """auto: vLLM where a GPU and vllm are present, else transformers."""
    prompts_per_iteration: int = Field(default=32, gt=0, le=MAX_COUNT)
    """New training prompts sampled each online iteration."""
    n_samples: int = Field(default=2, gt=0, le=1024)
    """Responses per prompt (pairwise setups need at least 2)."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling probability mass."""
    max_new_tokens: int = Field(default=32, gt=0, le=MAX_TOKENS)
    """Longest response, in tokens."""
    batch_size: int | None = Field(default=None, gt=0, le=MAX_BATCH)
    """Prompts per model.generate call (transformers backend; vLLM always takes a whole shard). Unset: sized for
    the stage, the whole shard up to a budget of sequences and of kept logits
    (generation/transformers_backend.py: auto_prompts_per_call)."""
    shard_size: int = Field(default=64, gt=0, le=MAX_BATCH)
    """prompts per output shard: the unit of resume"""
    seed: int = 0
    """Base seed; each shard's seed derives from run, iteration and shard."""
    tensor_parallel_size: int = Field(default=1, gt=0, le=1024)
    """vLLM: GPUs one engine shards the model over."""
    data_parallel_size: int = Field(default=1, gt=0, le=1024)
    """vLLM: engine replicas on this machine (data parallelism), each on `tensor_parallel_size` GPUs of its own,
    passed to vLLM's `LLM(data_parallel_size=...)`. vLLM 0.32 refuses it in one process: then (and across machines)
    use scale_out.generate_workers, one worker per GPU group."""
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    """vLLM: fraction of GPU memory the engine may take."""
    max_model_len: int = Field(default=512, gt=0, le=MAX_TOKENS)
    """vLLM: longest prompt + response the engine accepts."""

    @model_validator(mode="after")
    def _data_parallel_is_vllm(self) -> "GenerationConfig":
        if self.data_parallel_size > 1 and self.backend == "transformers":
            raise ValueError("data_parallel_size > 1 runs vLLM engine replicas: set backend to vllm (or auto on a GPU "
                             "machine); to spread transformers sampling, use scale_out.generate_workers")
        return self

    @model_validator(mode="after")
    def _response_fits(self) -> "GenerationConfig":
        check_fits_model_len("generation.max_new_tokens", self.max_new_tokens, self.max_model_len)
        return self


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
    """Which pairs go up: the first annotator's most uncertain (abstained or failed first, then the largest
    ensemble disagreement, or else the smallest score margin), or a random choice (a control)."""
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
    """importance: the model that wrote the responses"""
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


class TrainingConfig(StrictModel):
    loss: Loss = "dpo"
    """The loss; must fit the setup (README: The seven learning setups)."""
    beta: float = Field(default=0.1, gt=0)
    """Strength of the KL regularisation towards the reference (dpo family, kto)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """cdpo"""
    reward_margin: float = Field(default=0.0, ge=0)
    """reward model: -log sigmoid(r_chosen - r_rejected - margin)"""
    slic_margin: float = Field(default=1.0, ge=0)
    """slic: max(0, margin - beta * (logp_chosen - logp_rejected))"""
    simpo_gamma: float = Field(default=0.5, ge=0)
    """simpo: target reward margin."""
    slic_nll_weight: float = Field(default=0.1, ge=0)
    """slic: weight of the chosen response's NLL term."""
    kto_desirable_weight: float = Field(default=1.0, gt=0)
    """kto: weight of desirable examples."""
    kto_undesirable_weight: float = Field(default=1.0, gt=0)
    """kto: weight of undesirable examples."""
    rl_kl_coef: float = Field(default=0.05, ge=0)
    """rl: KL penalty coefficient of the shaped reward."""
    learning_rate: float = Field(default=5e-5, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    epochs: int = Field(default=1, gt=0, le=1000)
    """Passes over this round's data."""
    batch_size: int = Field(default=8, gt=0, le=MAX_BATCH)
    """per process"""
    gradient_accumulation_steps: int = Field(default=1, gt=0, le=MAX_BATCH)
    """Micro-batches per optimizer step."""
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    """Fraction of the round's steps spent warming up the learning rate."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Gradient clipping norm."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """accelerate's mixed precision (bf16 on recent GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, slower)."""
    padding_free: bool | None = None
    """One forward per micro-batch over its sequences laid end to end, without padding (position ids restart at
    each sequence, so attention stays within it): the log-probs and gradients of padded rows without computing
    padding. Checked once per round against padded rows; a model whose attention mixes packed sequences falls
    back to padded rows, with a warning. None: on with flash attention (variable-length kernels) and flex
    attention (block-sparse masks), whose cost is what the sequences cost: every micro-batch is then one row; off
    with sdpa and eager, which compute a packed row as a masked square that costs what the padding saved
    (measurements: docs/benchmarks.md). Off: padded rows, `rows_per_forward` at a time."""
    rows_per_forward: int | None = Field(default=None, ge=0, le=MAX_BATCH)
    """Without padding_free: rows per forward pass; 0: every row of a micro-batch in one forward. On CPUs a few
    rows sorted by length waste far fewer padded tokens; a micro-batch is split only where that removes enough
    padding to pay for the extra forwards (rows of similar lengths stay in one). None: 4 on a CPU, 0 on an
    accelerator."""
    precompute_reference: bool = True
    """Compute reference log-probs once before training (the reference then leaves memory)."""
    reference_from_sampler: bool = True
    """Use the generation stage's log-probs as the reference log-probs, skipping the reference forward, for the
    responses whose sampling model is the reference (same digest: iteration 1 from the initial policy, or a
    reference that is the behaviour policy) and whose tokens training sees untruncated. Exact up to float
    rounding: the sampler records raw log-probs (before temperature and top-p). Other rows take the reference
    forward as before."""
    max_length: int = Field(default=256, gt=0, le=MAX_TOKENS)
    """Longest prompt + response in tokens; longer ones are truncated."""
    max_prompt_length: int = Field(default=128, gt=0, le=MAX_TOKENS)
    """Longest prompt in tokens."""
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of a too-long prompt to keep."""
    seed: int = 0
    """Seed of the batch order."""
    bootstrap_seed: int | None = None
    """Train on a bootstrap resample of the round's units (as many draws with replacement as there are units),
    drawn with this seed: reward models of an ensemble, each with its own seed, learn from different samples of
    the same data. Unset: every unit once per epoch."""
    save_every_steps: int = Field(default=0, ge=0, le=MAX_COUNT)
    """0: save only at the end of the round"""
    num_processes: int | None = Field(default=None, gt=0, le=4096)
    """Processes the round trains on. More than one: the round runs under `accelerate launch` (DDP, DeepSpeed or
    FSDP per the accelerate config file; deployments/accelerate/ ships some). Unset: the `num_processes` of
    `accelerate_config`, 1 without one; set, it overrides the file's."""
    accelerate_config: str | None = None
    """accelerate config file (deployments/accelerate/). Once named, the round always runs under `accelerate launch`
    with it, also with one process (FSDP or DeepSpeed offload on a single GPU), on the file's `num_processes`
    unless `num_processes` is set."""

    @model_validator(mode="after")
    def _prompt_fits(self) -> "TrainingConfig":
        check_prompt_fits(self.max_prompt_length, self.max_length)
        if self.loss == "kto" and self.batch_size < 2:
            raise ValueError("loss 'kto' needs batch_size >= 2 for its mismatched KL pairs")
        return self


class EvaluationConfig(StrictModel):
    """Held-out prompts, the new policy against the previous and the initial one, judged by the annotator."""

    enabled: bool = True
    """Evaluate each iteration on held-out prompts."""
    max_new_tokens: int = Field(default=32, gt=0, le=MAX_TOKENS)
    """Longest held-out response, in tokens."""
    temperature: float = Field(default=0.7, ge=0)
    """Sampling temperature of held-out responses."""
    oracle: str | None = None
    """module:function true reward to report beside the annotator (experiments)"""


class ScaleOutConfig(StrictModel):
    """Run the GPU stages as their own deployed flows (e.g. on a GPU work pool); None runs them in-process."""

    generate_deployment: str | None = None
    """e.g. `generate-stage/gpu`"""
    train_deployment: str | None = None
    """e.g. `train-stage/gpu`"""
    timeout_s: float = Field(default=6 * 3600, gt=0)
    """Seconds to wait for a dispatched stage flow."""
    stage_deadline_s: float | None = Field(default=None, gt=0)
    """An overall deadline for each stage task, in seconds (None: none): a stage still running then fails with
    an error naming it and the deadline, and is not retried (a retry would get a whole new deadline); the
    shards it finished are kept, so a rerun continues from them."""
    annotate_deployment: str | None = None
    """e.g. `annotate-stage/gpu`: for annotators that run a model here (reward model, local or vLLM judge)."""
    generate_workers: int = Field(default=1, gt=0, le=1024)
    """Fan-out: the generate stage's shards split across this many flow runs of `generate_deployment`, started
    together (worker i samples shards i, i+N, ...); the rows are the same as one worker's."""
    annotate_workers: int = Field(default=1, gt=0, le=1024)
    """Fan-out of the annotate stage across flow runs of `annotate_deployment`, as for generate_workers."""
    max_redispatches: int = Field(default=2, ge=0)
    """A worker's flow run that crashed (its process or machine died; Prefect does not retry those) is started
    again, at most this many times per worker; it redoes only its missing shards."""
    concurrency_limit: str | None = None
    """A Prefect global concurrency limit (e.g. "gpu", made with `prefect gcl create gpu --limit 1`) whose slot every
    GPU stage body holds while it runs, in-process or dispatched: pipelines sharing GPUs queue instead of
    oversubscribing them."""

    @model_validator(mode="after")
    def _workers_need_a_deployment(self) -> "ScaleOutConfig":
        for stage in ("generate", "annotate"):
            if getattr(self, f"{stage}_workers") > 1 and not getattr(self, f"{stage}_deployment"):
                raise ValueError(f"{stage}_workers > 1 fans the {stage} stage out over flow runs of "
                                 f"{stage}_deployment: set it (e.g. {stage}-stage/gpu)")
        return self


# Experiment trackers (driven through accelerate's tracker classes) and the pip package each one needs.
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


class TrackingConfig(StrictModel):
    """Experiment trackers: one tracker run per pipeline run, fed from the store after each iteration.

    Part of no stage's fingerprint: turning a tracker on or off redoes no work. Credentials never go here:
    they come from the environment (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY,
    HF_TOKEN), as each tracker reads them. Whether a tracker's package is installed is checked when a flow
    starts (its preflight: alignment_core.tracking.tracking_problems), not here: stage workers never track.
    """

    report_to: list[str] = []
    """any of tensorboard, mlflow, wandb, trackio; "none" or [] for no tracker"""
    project: str | None = None
    """MLflow experiment, W&B / trackio project; default: store.run_name"""
    run_name: str | None = None
    """the tracker run's name; default: store.run_name"""
    logging_dir: str | None = None
    """A local folder: TensorBoard event files, the default MLflow database, W&B's files. Default: the run's folder
    + /tracking when the store is local (required for tensorboard when the store is remote)."""
    mlflow_tracking_uri: str | None = None
    """default: MLFLOW_TRACKING_URI, else sqlite:///{logging_dir}/mlflow.db"""

    @model_validator(mode="before")
    @classmethod
    def _known_trackers(cls, data: Any) -> Any:
        if isinstance(data, dict) and "report_to" in data:
            names = data["report_to"]
            names = [] if names in (None, "none") else [names] if isinstance(names, str) else names
            if isinstance(names, list):
                unknown = [n for n in names if n not in TRACKERS]
                if unknown:
                    raise ValueError(f"unknown tracker {unknown[0]!r} in report_to; known: {', '.join(TRACKERS)}")
                data = {**data, "report_to": list(dict.fromkeys(names))}
        if isinstance(data, dict) and "://" in str(data.get("logging_dir") or "").removeprefix("file://"):
            raise ValueError(f"logging_dir must be a local folder, got {data['logging_dir']!r}")
        return data


def _check_4bit_possible() -> None:
    """QLoRA's 4-bit base (bitsandbytes) runs on CUDA devices only: say so at config load, not mid-run."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ValueError("model.adapter.load_in_4bit (QLoRA) needs a CUDA device and this machine has none; "
                         "use LoRA without load_in_4bit here, or send training to a GPU machine "
                         "(scale_out.train_deployment)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("model.adapter.load_in_4bit (QLoRA) needs the bitsandbytes package: "
                         "pip install bitsandbytes")


class PipelineConfig(StrictModel):
    setup: Setup = "online_pairwise"
    """The learning setup: online (rl, online_pointwise, online_pairwise) or offline (the other four)."""
    iterations: int = Field(default=2, gt=0, le=10_000)
    """Online iterations of the run (the flow's `iterations` parameter overrides it when set)."""
    data: DataConfig = DataConfig()
    """Where prompts or examples come from, and which are held out."""
    model: ModelConfig = ModelConfig()
    """The policy, reference, tokenizer, adapter and loading knobs."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling from the policy (online setups)."""
    annotation: AnnotationConfig = AnnotationConfig()
    """Labelling the samples: reward model, LLM judge or rule (online setups, and evaluation)."""
    reweight: ReweightConfig = ReweightConfig()
    """Per-unit training weights."""
    training: TrainingConfig = TrainingConfig()
    """One training round per iteration."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Held-out win-rates and rewards after each round."""
    store: StoreConfig = StoreConfig()
    """Where stages and checkpoints are written (the flow's `run_name` and `store_root` override it when set)."""
    scale_out: ScaleOutConfig = ScaleOutConfig()
    """Stages run as their own deployed flows (e.g. on a GPU pool)."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment trackers (TensorBoard, MLflow, W&B, trackio)."""

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        """Combinations that would only fail after expensive work (sampling, loading models) fail here."""
        spec = SETUPS[self.setup]
        if self.training.loss not in spec.losses:
            raise ValueError(f"training.loss {self.training.loss!r} does not fit setup {self.setup!r}; "
                             f"use one of {spec.losses}")
        annotation = self.annotation
        needed, why = samples_needed(self)
        if self.online and self.generation.n_samples < needed:
            raise ValueError(f"generation.n_samples must be >= {needed} for setup {self.setup!r} "
                             f"({why}), got {self.generation.n_samples}")
        pairs_only = ("judge_pairwise", "cascade", "human")
        if self.online and spec.annotation != "pairs" and annotation.annotator in pairs_only:
            raise ValueError(f"annotation.annotator {annotation.annotator!r} gives preference pairs, but setup "
                             f"{self.setup!r} needs {spec.annotation}: use "
                             "'judge_pointwise', 'reward_model' or 'programmatic'")
        if self.online and annotation.annotator == "human" and self.evaluation.enabled:
            raise ValueError("annotation.annotator 'human' labels the training pairs only; held-out evaluation needs "
                             "an automatic judge: set evaluation.enabled: false, or use a cascade with "
                             "escalate_to: human (evaluation is then judged by its first annotator)")
        if self.evaluation.enabled:
            check_fits_model_len("evaluation.max_new_tokens", self.evaluation.max_new_tokens,
                                 self.generation.max_model_len)
        if not self.online and self.data.format != "auto" and self.data.format not in spec.data_formats:
            raise ValueError(f"data.format {self.data.format!r} gives no examples setup {self.setup!r} can train "
                             f"on; use one of {spec.data_formats} (or auto)")
        if self.online and "reward_model" in annotation.kinds and not annotation.reward_model:
            raise ValueError("annotation.reward_model must name a reward model when annotation.annotator is "
                             "'reward_model' (or a cascade uses one)")
        if annotation.cascade.refresh.enabled and annotation.annotator != "cascade":
            raise ValueError("annotation.cascade.refresh learns from a cascade's escalated labels: set "
                             "annotation.annotator to 'cascade'")
        ensemble_options = annotation.ensemble_penalty or annotation.max_disagreement is not None
        if ensemble_options and len(annotation.reward_models) < 2:
            raise ValueError("annotation.ensemble_penalty and annotation.max_disagreement need an ensemble: "
                             "annotation.reward_model as a list of two or more reward models")
        if self.online and annotation.judge_kind:
            judge = annotation.judge
            if judge.backend in ("local", "vllm") and not judge.model:
                raise ValueError("annotation.judge.model must name the judge model for a local judge")
            if judge.backend == "http" and not (judge.base_url and judge.model):
                raise ValueError("annotation.judge.base_url and annotation.judge.model are needed for an http judge")
        if self.reweight.strategy == "importance" and not self.reweight.behaviour_model:
            raise ValueError("reweight.behaviour_model must name the model that wrote the responses when "
                             "reweight.strategy is 'importance'")
        remote_store = "://" in self.store.root and not self.store.root.startswith("file://")
        if "tensorboard" in self.tracking.report_to and remote_store and not self.tracking.logging_dir:
            raise ValueError("tracking.logging_dir must name a local folder for tensorboard when store.root is "
                             f"remote ({self.store.root})")
        adapter = self.model.adapter
        if adapter is not None and adapter.load_in_4bit and not self.scale_out.train_deployment:
            # Training runs here (a train deployment runs it elsewhere, and validates the config there).
            _check_4bit_possible()
        return self

    @property
    def online(self) -> bool:
        return SETUPS[self.setup].online

    def with_reward_models(self, members: list[str]) -> "PipelineConfig":
        """This config with `members` (refreshed reward models, alignment_core/refresh.py) in place of
        `annotation.reward_model`; one model stays one model."""
        models = members[0] if isinstance(self.annotation.reward_model, str) else list(members)
        return self.model_copy(update={"annotation": self.annotation.model_copy(update={"reward_model": models})})

    def stage_hash(self, *sections: str) -> str:
        """A short digest of the named config sections: the part of the config a stage depends on."""
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config that cannot be used, with one line per problem naming the field."""


_STRICT_TYPES = {"float_type": "a number", "int_type": "an integer", "bool_type": "true or false"}
_BOUND_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _fields_at(location: tuple) -> list[str]:
    """The field names of the config section at `location` (e.g. ("training",)), for suggestions."""
    section: type[BaseModel] = PipelineConfig
    for name in location:
        annotation = section.model_fields[name].annotation if name in section.model_fields else None
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is None:
            return []
    return list(section.model_fields)


def _looks_like_a_value(text: Any) -> bool:
    """A string a lax parser would have read as a number or a bool ('1e-4', '8', 'yes'): quoted by mistake."""
    if not isinstance(text, str):
        return False
    try:
        float(text)
    except ValueError:
        return text.strip().lower() in ("true", "false", "yes", "no", "on", "off")
    return True


def _describe(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "config"
    got = f", got {error['input']!r}" if not isinstance(error.get("input", {}), dict) else ""
    if error["type"] in _BOUND_WORDS:
        bound = next(iter(error["ctx"].values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{field} must be {_BOUND_WORDS[error['type']]} {bound}{got}"
    if error["type"] == "extra_forbidden":
        known = _fields_at(error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
        return f"{field} is not a known field{hint}"
    if error["type"] in _STRICT_TYPES and _looks_like_a_value(error.get("input")):
        return (f"{field} must be {_STRICT_TYPES[error['type']]}, got the string {error['input']!r} "
                "(write it without quotes)")
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}: {message}{got}"


def parse_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig, raising ConfigError naming each wrong field."""
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as error:
        raise ConfigError("invalid config:\n" + "\n".join(_describe(e) for e in error.errors())) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a mapping repeating a key (plain YAML keeps the last one silently).

    Keys brought in by a merge (`<<: *anchor`) may be overridden by the mapping's own keys, as YAML intends.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_line.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {earlier})", key_node.start_mark)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads a float only with a dot: an unquoted `1e-4` or `5E+3` would be the string '1e-4', which
# the strict config then refuses. YAML 1.2's float rule (the dot optional before an exponent) reads them as numbers.
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def yaml_load_unique(text: str) -> Any:
    """yaml.safe_load, except that a repeated mapping key raises a yaml.YAMLError naming the key and line."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a YAML config; `overrides` maps dotted names to values (`{"training.beta": 0.2}`)."""
    try:
        data = yaml_load_unique(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not a valid config file: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        section = data
        *parents, leaf = dotted.split(".")
        for depth, name in enumerate(parents):
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"{dotted}: {where} is a value ({section!r}), not a section with fields")
        section[leaf] = value
    return parse_config(data)


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
