"""Where models come from and how they are loaded.

A model is named by one of:
- `tiny://llama` / `tiny://reward`: the project's own tiny model, built once into the cache folder;
- a store URI (`s3://...`, `file://...`, `memory://...`): a checkpoint the pipeline saved, copied locally;
- a local folder;
- a Hugging Face hub id such as `org/name`, optionally pinned to a revision as `org/name@<branch, tag or
  commit>`: resolved to its snapshot in the local hub cache (`HF_HOME`), downloaded there first unless
  `HF_HUB_OFFLINE=1`. Gated models take their token from `HF_TOKEN`.
Every loader resolves the name first, so a missing model fails before anything is loaded, and a model's
identity in fingerprints and lineage (`model_digest`) is its hub commit or the bytes of its weights.
"""

import logging
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment_core import kept_models, progress
from alignment_core.adapters import adapter_base, is_adapter, load_adapter
from alignment_core.inputs import (  # noqa: F401  (re-exported: the names of models)
    DEFAULT_CACHE_DIR,
    InputRef,
    ModelNotFoundError,
    hub_revision,
    hub_snapshot,
    is_store_uri,
    model_digest,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

def resolve_model_path(name_or_uri: str, store=None, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """Turn a model name into a local folder that `from_pretrained` loads without touching the network
    (`inputs.InputRef.model(name).resolve`: one rule per kind of name)."""
    return InputRef.model(name_or_uri).resolve(store=store, cache_dir=cache_dir)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, store=None, **kwargs):
    """AutoTokenizer with a pad token (the EOS token when the tokenizer has none)."""
    path = resolve_model_path(name_or_path, store=store)
    if is_adapter(path) and not any(Path(path, f).exists() for f in ("tokenizer_config.json", "tokenizer.json")):
        path = resolve_model_path(adapter_base(path), store=store)  # an adapter saved without its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


AdapterMode = Literal["merge", "frozen", "trainable"]


def load_causal_lm(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, store=None, *,
    attn_implementation: str | None = None, adapter_mode: AdapterMode = "merge", **from_pretrained_kwargs,
):
    """A causal LM. A folder with `adapter_config.json` (a LoRA checkpoint) loads its base model, named in
    that file, and the adapter on it: merged into the weights (`adapter_mode="merge"`, for inference),
    a frozen PeftModel (`"frozen"`), or a PeftModel whose adapter trains (`"trainable"`).

    `from_pretrained_kwargs` go to the base model's `from_pretrained` (e.g. a 4-bit `quantization_config`).
    """
    return _load(AutoModelForCausalLM, name_or_path, dtype, trust_remote_code, store, attn_implementation,
                 adapter_mode, from_pretrained_kwargs)


def causal_lm_to_run(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None):
    """A causal LM to sample from or score with, never to train: kept loaded for the stages after this one
    where the pipeline keeps models (alignment_core/kept_models.py). Flex attention is a training kernel (decoding
    rebuilds its block mask at every token, slower than sdpa: docs/benchmarks.md), so it runs with sdpa."""
    attention = "sdpa" if attn_implementation == "flex_attention" else attn_implementation
    load = partial(load_causal_lm, name_or_path, dtype=dtype, attn_implementation=attention)
    return kept_models.shared("causal_lm", resolve_model_path(name_or_path), load, dtype=dtype,
                              attn_implementation=attention, trust_remote_code=False)


def load_reward_model(
    name_or_path: str, tokenizer=None, dtype: str = "float32", trust_remote_code: bool = False, store=None, *,
    attn_implementation: str | None = None, adapter_mode: AdapterMode = "merge", **from_pretrained_kwargs,
):
    """A sequence classifier with one output (the reward), its pad id synced with the tokenizer.

    The classifier reads the score at the last non-pad token, which it finds through `pad_token_id`:
    a tokenizer that pads with EOS needs the model to know that id. An adapter folder loads as in
    `load_causal_lm`, its trained score head included.
    """
    path = resolve_model_path(name_or_path, store=store)
    if tokenizer is None:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, store=store)
    model = _load(AutoModelForSequenceClassification, name_or_path, dtype, trust_remote_code, store,
                  attn_implementation, adapter_mode, {"num_labels": 1, **from_pretrained_kwargs})
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _load(loader, name_or_path, dtype, trust_remote_code, store, attn_implementation, adapter_mode, kwargs):
    progress.apply_to_libraries()  # the download and "Loading weights" bars: on a terminal only
    path = resolve_model_path(name_or_path, store=store)
    if is_adapter(path):
        base_name = adapter_base(path)
        base_path = resolve_model_path(base_name, store=store)
        if is_adapter(base_path):
            raise ValueError(f"adapter {name_or_path!r} names another adapter ({base_name!r}) as its base; "
                             "merge that one first (alignment-core merge ...)")
        base = _load(loader, base_name, dtype, trust_remote_code, store, attn_implementation, "merge", kwargs)
        model = load_adapter(base, path, trainable=adapter_mode == "trainable")
        return model.merge_and_unload() if adapter_mode == "merge" else model
    if attn_implementation is not None:
        kwargs = {**kwargs, "attn_implementation": attn_implementation}
    return loader.from_pretrained(path, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs)
