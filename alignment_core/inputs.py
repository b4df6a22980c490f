"""What a stage reads, as one typed reference: a stage output or a model, each resolved and digested by one rule.

An `InputRef` is a kind and the name as it was written (a URI, a path, a hub id). The kinds:

    kind        written as                                 resolves to                       digest
    stage       a stage of the store: {run}/iter-k/<stage> (rows, not a folder)              its manifest's fingerprint
                                                                                             digest (+ labels digest)
    tiny        tiny://llama, tiny://reward,               the build in the cache folder     its safetensors' sha256
                tiny://llama-sft (the demo's SFT policy)
    checkpoint  s3://..., file://..., memory://...         a local copy of the finished      its safetensors' sha256
                (a checkpoint the pipeline saved)          checkpoint (local_checkpoint)
    local       a folder (/abs, ./rel, ~/..., a/b/c)       that folder                       its safetensors' sha256
                                                                                             (a hub snapshot: commit)
    hub         org/name or org/name@<branch|tag|commit>   its snapshot in the hub cache     the hub commit

The labels digest is that of annotations whose transient failures a rerun retried: what was built from the
old rows is redone. A model folder holding an adapter (`adapter_config.json`) adds its base model's digest
(`models.model_digest`). Errors name the kind that was meant: "stage output ... has no manifest (the stage
did not finish)" is not "model ... (local folder) ...".

`models.resolve_model_path` and the pipeline's fingerprints and lineage (`pipeline.stage_digest`,
`policy_digest`, `model_lineage`) all go through this module, so each rule is written once.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from alignment_core.config import DEFAULT_CACHE_DIR, TINY_MODEL
from alignment_core.store import ArtifactStore

TINY_REWARD_MODEL = "tiny://reward"
TINY_SFT_MODEL = "tiny://llama-sft"  # the demo's starting policy: tiny://llama after SFT on bundled:sft
TINY_BUILDS = {TINY_MODEL: ("tiny-llama", "causal_lm"), TINY_REWARD_MODEL: ("tiny-reward", "reward_model"),
               TINY_SFT_MODEL: ("tiny-llama-sft", "sft")}

Kind = Literal["stage", "tiny", "checkpoint", "local", "hub"]
KIND_NAMES = {"stage": "stage output", "tiny": "tiny build", "checkpoint": "store checkpoint",
              "local": "local folder", "hub": "hub id"}

_URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")  # "name" or "org/name"
_STAGE_PATH = re.compile(r"^[^/]+/iter-\d+/(?P<stage>[^/]+)/?$")  # below the store root: {run}/iter-k/{stage}


class ModelNotFoundError(FileNotFoundError):
    """A configured model cannot be found; the message names it, its kind, and how to make it available."""


class StageNotFinishedError(FileNotFoundError):
    """A stage output read as an input has no manifest: the stage never ran, or did not finish."""


def split_revision(name: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`); names without `@` have no revision."""
    repo, at, revision = name.partition("@")
    return (repo, revision) if at and revision else (name, None)


# Files a causal LM or classifier never needs: other frameworks' weights, original (non-HF) checkpoints.
_HUB_IGNORE = ["*.pth", "*.pt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "original/*", "onnx/*"]


@lru_cache(maxsize=64)
def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot folder of a hub model, downloaded into the hub cache once per machine (here, not in
    `models`, so that a preflight checks a hub id without importing torch).

    Cached per process, so the many resolutions of one run ask the hub (when online) once per model.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return snapshot_download(repo_id, revision=revision, ignore_patterns=_HUB_IGNORE)
    except GatedRepoError as error:
        raise ModelNotFoundError(
            f"hub model {name!r} is gated: accept its licence on the hub, then set HF_TOKEN to a token of that "
            f"account ({type(error).__name__})") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"hub model {name!r} does not exist, or is private: check the name, or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"hub model {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

        why = "HF_HUB_OFFLINE is set" if HF_HUB_OFFLINE else "the hub cannot be reached"
        revision_flag = f" --revision {revision}" if revision else ""
        raise ModelNotFoundError(
            f"hub model {name!r} is not in the local hub cache ({HF_HUB_CACHE}) and {why}. Download it "
            f"where there is internet with `hf download {repo_id}{revision_flag}` (same HF_HOME), or name a local "
            f"folder instead, or use {TINY_MODEL!r}") from None


def is_store_uri(name: str) -> bool:
    """A checkpoint in a store (`s3://...`, `file://...`), not one of the `tiny://` builds."""
    return bool(_URI_SCHEME.match(name)) and name not in TINY_BUILDS


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return True
    return not _HUB_ID.match(split_revision(name)[0])


def is_stage_uri(store, uri: str) -> bool:
    """Whether `uri` is laid out as a stage of `store` ({root}/{run}/iter-k/{stage}), a checkpoint aside."""
    prefix = store.root.rstrip("/") + "/"
    if not uri.startswith(prefix):
        return False
    match = _STAGE_PATH.match(uri[len(prefix):])
    return bool(match) and match["stage"] != "checkpoint"


@dataclass(frozen=True)
class InputRef:
    """One input of a stage: `kind` (see the module docstring) and `name`, as written."""

    kind: Kind
    name: str

    # ---- construction: the one classification rule per form of name ----------------------------------------
    @classmethod
    def stage(cls, uri: str) -> "InputRef":
        """A stage's output, read through its manifest."""
        return cls("stage", str(uri))

    @classmethod
    def model(cls, name: str) -> "InputRef":
        """A model, by how its name is written: a tiny build, a store URI, an existing folder or a path, else a
        hub id (`org/name`, optionally `@revision`)."""
        name = str(name)
        if name in TINY_BUILDS:
            return cls("tiny", name)
        if is_store_uri(name):
            return cls("checkpoint", name)
        if Path(name).expanduser().is_dir() or _looks_like_path(name):
            return cls("local", name)
        return cls("hub", name)

    @classmethod
    def of(cls, store, uri: str) -> "InputRef":
        """An input named by its URI alone: a stage output when `uri` is laid out as a stage of `store` or holds
        a stage manifest, else a model."""
        uri = str(uri)
        if is_stage_uri(store, uri) or store.read_manifest(uri) is not None:
            return cls.stage(uri)
        return cls.model(uri)

    # ---- what it is -----------------------------------------------------------------------------------------
    @property
    def repo(self) -> str:
        """A hub id without its revision."""
        return split_revision(self.name)[0]

    @property
    def revision(self) -> str | None:
        """A hub id's branch, tag or commit (None: the default branch)."""
        return split_revision(self.name)[1] if self.kind == "hub" else None

    def describe(self) -> str:
        """The reference in words, for errors: which kind was meant."""
        if self.kind == "stage":
            return f"stage output {self.name}"
        if self.kind == "hub":
            return f"model {self.repo!r} (hub id at revision {self.revision or 'main'})"
        return f"model {self.name!r} ({KIND_NAMES[self.kind]})"

    # ---- resolution: a local folder to load from (models) ---------------------------------------------------
    def resolve(self, store=None, cache_dir: str | Path | None = None) -> str:
        """A local folder that `from_pretrained` loads without touching the network.

        `cache_dir` (default: the store's, else DEFAULT_CACHE_DIR) holds tiny builds and, without a `store`,
        copies of store checkpoints.
        """
        if self.kind == "stage":
            raise ValueError(f"{self.describe()} is a stage's rows, not a model folder to load")
        if cache_dir is None:
            cache_dir = store.cache_dir if store is not None else DEFAULT_CACHE_DIR
        if self.kind == "tiny":
            from alignment_core.tiny import build_tiny, build_tiny_sft  # torch: not for a hub id's preflight check

            folder, kind = TINY_BUILDS[self.name]
            if kind == "sft":  # its folder is tiny-llama-sft-<digest of what built it>
                return str(build_tiny_sft(Path(cache_dir).expanduser()))
            return str(build_tiny(Path(cache_dir).expanduser() / folder, kind=kind))
        if self.kind == "checkpoint":
            if store is None:
                store = ArtifactStore(self.name.rstrip("/").rsplit("/", 1)[0], cache_dir=str(cache_dir))
            try:
                return store.local_checkpoint(self.name)
            except ModelNotFoundError:
                raise
            except FileNotFoundError as error:
                raise ModelNotFoundError(f"{self.describe()}: {error}") from None
        if self.kind == "local":
            folder = Path(self.name).expanduser()
            if not folder.is_dir():
                raise ModelNotFoundError(f"{self.describe()} does not exist")
            return str(folder)
        return hub_snapshot(self.repo, self.revision)

    # ---- digests: what fingerprints and lineage record ------------------------------------------------------
    def digest(self, store=None, path: str | None = None) -> str:
        """A stage output: its manifest's fingerprint digest (+ the labels digest of a stage whose rows a rerun
        retried, so that what was built from the old rows is redone). A model: its content digest (of `path`,
        its folder when already resolved)."""
        if self.kind == "stage":
            if store is None:
                raise ValueError(f"{self.describe()}: a stage output is read through its store; pass the store")
            manifest = store.read_manifest(self.name)
            if manifest is None:
                raise StageNotFinishedError(f"{self.describe()} has no manifest (the stage did not finish)")
            labels = manifest.get("extra", {}).get("labels_digest")
            return manifest["fingerprint_digest"] + (f"+{labels}" if labels else "")
        return self._model_digest(path or self.resolve(store))

    def lineage(self, store=None, path: str | None = None) -> dict:
        """What a checkpoint's lineage records of a model: its name as written, digest and hub commit (`path`:
        its folder when already resolved)."""
        path = path or self.resolve(store)
        return {"name": self.name, "digest": self._model_digest(path), "hub_revision": hub_revision(path)}

    def _model_digest(self, path: str) -> str:
        try:
            return model_digest(path)
        except ModelNotFoundError as error:
            raise ModelNotFoundError(f"{self.describe()}: {error}") from None


# ---- a model's identity: no model library needed ---------------------------------------------------------
# A snapshot in the hub cache: .../models--org--name/snapshots/<commit>
_HUB_SNAPSHOT = re.compile(r"models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


def model_digest(path: str | Path) -> str:
    """A model's identity, 16 hex chars: what fingerprints and lineage record for it.

    - a hub snapshot: its commit (the hub's own content address; no need to read gigabytes);
    - an adapter folder (`adapter_config.json`): its safetensors files and the digest of its base model;
    - any other folder: a sha256 over its safetensors files (names and bytes, in name order).
    """
    folder = Path(path).expanduser()
    snapshot = _HUB_SNAPSHOT.search(folder.as_posix())
    if snapshot:
        return hashlib.sha256(f"hub:{snapshot['repo']}@{snapshot['commit']}".encode()).hexdigest()[:16]
    folder = folder.resolve()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no .safetensors files in {folder}")
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    digest = _digest(str(folder), stamp)
    adapter_config = folder / "adapter_config.json"
    if adapter_config.exists():
        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        digest = hashlib.sha256(f"{digest}+{model_digest(InputRef.model(base).resolve())}".encode()).hexdigest()[:16]
    return digest


def hub_revision(path: str | Path) -> str | None:
    """The hub commit of a resolved snapshot folder, None for anything else (for lineage)."""
    snapshot = _HUB_SNAPSHOT.search(Path(path).expanduser().as_posix())
    return snapshot["commit"] if snapshot else None


@lru_cache(maxsize=64)
def _digest(folder: str, stamp: tuple) -> str:  # `stamp` (names, mtimes, sizes) makes a rewrite a cache miss
    sha = hashlib.sha256()
    for name, _, _ in stamp:
        sha.update(name.encode())
        with open(Path(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]
