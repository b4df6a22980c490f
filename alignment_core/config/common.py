"""What every config section shares: the setup and loss names, the bounds of counts and sizes, the checks that
several sections (and the data loader) make, and `StrictModel`, the base of every section."""

import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from alignment_core.setups import SETUPS

if TYPE_CHECKING:  # only a type: the whole config is built from these sections
    from alignment_core.config.pipeline_config import PipelineConfig

__all__ = [  # what the package re-exports
    "BUNDLED_PREFIX",
    "DATA_COLUMNS",
    "DATA_FILE_SUFFIXES",
    "DATA_FORMATS",
    "DEFAULT_CACHE_DIR",
    "Loss",
    "MAX_BATCH",
    "MAX_COUNT",
    "MAX_TOKENS",
    "RUN_NAME",
    "Setup",
    "StrictModel",
    "TINY_MODEL",
    "check_fits_model_len",
    "check_prompt_fits",
    "check_reweight_clip",
    "check_segment",
    "check_single_file_options",
    "is_single_file_source",
    "samples_needed",
]

# The seven learning setups: one row each in alignment_core.setups (README: The seven learning setups), and
# the losses they train with, in the order the setups name them (each has a row in alignment_core.losses).
Setup = Literal[tuple(SETUPS)]
Loss = Literal[tuple(dict.fromkeys(loss for spec in SETUPS.values() for loss in spec.losses))]

# The bundled tiny model is built on first use under this folder-relative name (see alignment_core.tiny).
TINY_MODEL = "tiny://llama"
# Where tiny builds, downloaded checkpoints and hub snapshots are kept (store.cache_dir's default).
DEFAULT_CACHE_DIR = "~/.cache/alignment_core"
# The data formats a source can be in (alignment_core/data/: one adapter each), files it can be, and the
# prefix of the datasets shipped in alignment_core/bundled/.
DATA_FORMATS = ("prompt_only", "pairs", "hh_rlhf", "messages_pairs", "pointwise", "sft", "scored")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BUNDLED_PREFIX = "bundled:"

# ---- cross-field rules: each is one function, called by the config validators (so a bad combination fails at
# config load) and, where a library entry point takes the same values without a config, by that entry point.

def check_segment(segment: str, what: str = "path segment") -> str:
    """One folder or file name under the store root: no separator, not `.` or `..`, not empty."""
    if not isinstance(segment, str) or segment in ("", ".", "..") or any(c in segment for c in "/\\\0"):
        raise ValueError(f"{what} must be a single folder name (no '/', '\\', '..', not empty), got {segment!r}")
    return segment


def is_single_file_source(source: str) -> bool:
    """A bundled dataset or a data file (one split of one dataset), as opposed to a hub dataset or a folder."""
    return source.startswith(BUNDLED_PREFIX) or source.lower().endswith(DATA_FILE_SUFFIXES)


# The columns the data formats read (alignment_core/data/): what `data.columns` may map a source's columns onto.
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
