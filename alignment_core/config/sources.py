"""The config sections of what a run reads and writes: the store, the data, the models (and adapters), and how
the policy samples."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignment_core.config.common import (
    DATA_COLUMNS,
    DATA_FORMATS,
    DEFAULT_CACHE_DIR,
    MAX_BATCH,
    MAX_COUNT,
    MAX_TOKENS,
    RUN_NAME,
    TINY_MODEL,
    StrictModel,
    check_fits_model_len,
    check_segment,
    check_single_file_options,
)

__all__ = [  # what the package re-exports
    "AdapterConfig",
    "DataConfig",
    "GenerationConfig",
    "ModelConfig",
    "StoreConfig",
]


class StoreConfig(StrictModel):
    """Where artifacts live. Credentials never go here: they come from the environment (AWS_*) or a block."""

    root: str = "./runs"
    """a local folder or an fsspec URI such as s3://bucket/prefix"""
    run_name: str = "tiny"
    """The run's folder under the root; every flow run with this name continues the same run."""
    endpoint_url: str | None = None
    """S3-compatible server, e.g. http://127.0.0.1:9000"""
    cache_dir: str = DEFAULT_CACHE_DIR
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
    format: Literal[("auto", *DATA_FORMATS)] = "auto"
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
    """QLoRA: load the frozen base in 4 bits (bitsandbytes NF4; a CUDA device, or a CPU with bitsandbytes>=0.50),
    compute in model.dtype."""
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
