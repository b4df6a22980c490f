"""Where models come from and how they are loaded.

A model is named by one of:
- `tiny://llama` / `tiny://reward`: the project's own tiny model, built once into the cache folder;
- a store URI (`s3://...`, `file://...`, `memory://...`): a checkpoint the pipeline saved, copied locally;
- a local folder;
- a Hugging Face hub id such as `org/name`, passed to `from_pretrained` as is.
Every loader resolves the name first, so a missing local path fails before anything is loaded.
"""

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignment_core.config import TINY_MODEL
from alignment_core.tiny import build_tiny

TINY_REWARD_MODEL = "tiny://reward"
TINY_BUILDS = {TINY_MODEL: ("tiny-llama", "causal_lm"), TINY_REWARD_MODEL: ("tiny-reward", "reward_model")}
DEFAULT_CACHE_DIR = "~/.cache/alignment_core"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", at most one slash


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return True
    return os.sep in name and not _HUB_ID.match(name)


def resolve_model_path(name_or_uri: str, store=None, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """Turn a model name into what `from_pretrained` takes: a local folder, or a hub id as is."""
    name_or_uri = str(name_or_uri)
    if name_or_uri in TINY_BUILDS:
        folder, kind = TINY_BUILDS[name_or_uri]
        return str(build_tiny(Path(cache_dir).expanduser() / folder, kind=kind))
    if _URI_SCHEME.match(name_or_uri):
        if store is None:
            from alignment_core.store import ArtifactStore

            store = ArtifactStore(name_or_uri.rstrip("/").rsplit("/", 1)[0], cache_dir=cache_dir)
        return store.local_checkpoint(name_or_uri)
    if Path(name_or_uri).expanduser().is_dir():
        return str(Path(name_or_uri).expanduser())
    if _looks_like_path(name_or_uri):
        raise FileNotFoundError(f"model path {name_or_uri!r} does not exist")
    return name_or_uri


def _from_pretrained(loader, name: str, path: str, **kwargs):
    """`loader.from_pretrained`, with a message that says what to do when a hub model cannot be fetched."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as error:
        if Path(path).is_dir():
            raise
        raise OSError(
            f"could not load {name!r} from the Hugging Face hub ({error}). If this machine is offline, "
            f"download the model elsewhere and pass its local folder, or use {TINY_MODEL!r}."
        ) from error


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, store=None, **kwargs):
    """AutoTokenizer with a pad token (the EOS token when the tokenizer has none)."""
    path = resolve_model_path(name_or_path, store=store)
    tokenizer = _from_pretrained(
        AutoTokenizer, name_or_path, path, trust_remote_code=trust_remote_code, **kwargs
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, store=None):
    path = resolve_model_path(name_or_path, store=store)
    return _from_pretrained(
        AutoModelForCausalLM, name_or_path, path,
        dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code,
    )


def load_reward_model(
    name_or_path: str, tokenizer=None, dtype: str = "float32", trust_remote_code: bool = False, store=None
):
    """A sequence classifier with one output (the reward), its pad id synced with the tokenizer.

    The classifier reads the score at the last non-pad token, which it finds through `pad_token_id`:
    a tokenizer that pads with EOS needs the model to know that id.
    """
    path = resolve_model_path(name_or_path, store=store)
    if tokenizer is None:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = _from_pretrained(
        AutoModelForSequenceClassification, name_or_path, path,
        num_labels=1, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def model_digest(path: str | Path) -> str:
    """First 16 hex chars of a sha256 over the folder's safetensors files (names and bytes, in name order)."""
    folder = Path(path).expanduser().resolve()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _digest(str(folder), stamp)


@lru_cache(maxsize=64)
def _digest(folder: str, stamp: tuple) -> str:  # `stamp` (names, mtimes, sizes) makes a rewrite a cache miss
    sha = hashlib.sha256()
    for name, _, _ in stamp:
        sha.update(name.encode())
        with open(Path(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]
