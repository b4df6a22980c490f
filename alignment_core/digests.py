"""Digests of what a stage reads, for its fingerprint: data, templates, reward functions and library code.

A stage is skipped when its fingerprint matches; the fingerprint must therefore change whenever the stage's
output would, not only when the config text does:

- data files: the sha256 of their bytes (local or any fsspec URL; hashed once per process per path, size and
  modification stamp), bundled datasets likewise, a dataset folder file by file, a hub dataset its commit;
- a judge template: the sha256 of its text;
- a `module:function` (programmatic reward, evaluation oracle): the bytes of the module's file;
- the library: per stage, the source of the modules (and pipeline functions) that produce it, so an edit to
  `inspect.py` redoes nothing and an edit to `generation/` redoes generation (`stage_code_digest`).
Models are identified by `models.model_digest` (hub commit or weight bytes), through `inputs.InputRef`.
"""

import ast
import hashlib
import importlib.util
import json
import os
import re
import threading
from functools import lru_cache
from pathlib import Path

import fsspec

PACKAGE_DIR = Path(__file__).resolve().parent

# The library code that produces each stage: files (globs) relative to the package, or `file.py:function`
# for one top-level function of a module whose other functions belong to other stages (pipeline.py).
_GENERATION = ["generation/*.py", "rendering.py", "setups.py", "records.py", "models.py", "inputs.py", "adapters.py",
               "pipeline.py:generate", "pipeline.py:_generation_config", "pipeline.py:resolve_policy"]
_ANNOTATOR = ["annotation/*.py", "rendering.py", "setups.py", "records.py", "models.py", "inputs.py", "adapters.py"]
STAGE_CODE: dict[str, list[str]] = {
    "prompts": ["data.py", "records.py", "pipeline.py:_all_prompts", "pipeline.py:load_prompts"],
    "eval_prompts": ["data.py", "records.py", "pipeline.py:_all_prompts", "pipeline.py:load_eval_prompts"],
    "examples": ["data.py", "records.py", "pipeline.py:_all_prompts", "pipeline.py:load_examples"],
    "generations": _GENERATION,  # every stage `pipeline.generate` writes (eval_generations too)
    "annotations": [*_ANNOTATOR, "pipeline.py:annotate"],
    "units": ["batches.py", "rendering.py", "setups.py", "records.py", "pipeline.py:build_units"],
    # importance weights: log-probs through training.py's sequence_logps on batches.py's encode / collate
    "weights": ["reweight.py", "batches.py", "rendering.py", "setups.py", "training.py", "records.py", "models.py",
                "inputs.py", "adapters.py", "pipeline.py:reweight"],
    "checkpoint": ["training.py", "losses.py", "batches.py", "rendering.py", "setups.py", "records.py", "models.py",
                   "inputs.py", "adapters.py", "pipeline.py:train", "pipeline.py:_carry_over",
                   "pipeline.py:_launch_distributed_round"],
    # the reward-model refresh (annotation.cascade.refresh): escalated units fine-tune each member
    "reward_models": ["refresh.py", "training.py", "losses.py", "batches.py", "rendering.py", "setups.py", "records.py",
                      "models.py", "inputs.py", "adapters.py"],
    "evaluation": [*_ANNOTATOR, "evaluation.py", "pipeline.py:evaluate", "pipeline.py:_win_rate",
                   "pipeline.py:_oracle_scores", "pipeline.py:wilson_interval",
                   "pipeline.py:evaluate_reward_model"],
}

_lock = threading.Lock()
_file_digests: dict[tuple, str] = {}


def _sha256_of(handle) -> str:
    sha = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        sha.update(block)
    return sha.hexdigest()


def file_digest(url: str, storage_options: dict | None = None) -> str:
    """The sha256 of a file's bytes (a local path or an fsspec URL such as s3://...).

    Hashed once per process for each (path, size, modification stamp): a file replaced in place gets a new
    stamp (locally: mtime, ctime and inode; on object storage: its ETag or last-modified time).
    """
    url = os.path.expanduser(str(url))
    if fsspec.utils.get_protocol(url) in ("file", "local"):
        path = os.path.abspath(fsspec.core.strip_protocol(url))
        stat = os.stat(path)
        stamp: tuple | None = ("file", path, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        opener = lambda: open(path, "rb")  # noqa: E731
    else:
        filesystem, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        info = filesystem.info(path)
        version = next((str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime", "updated", "md5Hash")
                        if info.get(k)), None)
        stamp = (url, info.get("size"), version) if version else None
        opener = lambda: filesystem.open(path, "rb")  # noqa: E731
    with _lock:
        if stamp is not None and stamp in _file_digests:
            return _file_digests[stamp]
    with opener() as handle:
        digest = _sha256_of(handle)
    if stamp is not None:
        with _lock:
            _file_digests[stamp] = digest
    return digest


def folder_digest(folder: str) -> str:
    """A local folder's files (relative names and contents), hidden files aside."""
    root = Path(folder).expanduser()
    sha = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        sha.update(f"{relative}\0{file_digest(str(path))}\n".encode())
    return sha.hexdigest()


@lru_cache(maxsize=64)
def hub_dataset_revision(repo_id: str, revision: str | None = None) -> str:
    """The commit a hub dataset name (and branch/tag) stands for: asked of the hub when it is reachable, else
    read from the local hub cache's refs; `repo@revision` as named when neither knows it."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            return HfApi().dataset_info(repo_id, revision=revision, timeout=10).sha
        except Exception:  # unreachable, gated, unknown: the cache or the name below still identify it
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip()
    return f"{repo_id}@{revision or 'main'} (unresolved)"


def data_source_digest(source: str, revision: str | None = None) -> str:
    """What a `data.source` holds: file bytes (bundled, local or fsspec file), folder contents, or hub commit."""
    from alignment_core.data import BUNDLED_PREFIX, _file_suffix, bundled_path

    if source.startswith(BUNDLED_PREFIX):
        return "sha256:" + file_digest(bundled_path(source.removeprefix(BUNDLED_PREFIX)))
    if _file_suffix(source) is not None:
        return "sha256:" + file_digest(source)
    if os.path.isdir(os.path.expanduser(source)):
        return "folder:" + folder_digest(source)
    return "hub:" + hub_dataset_revision(source, revision)


def data_digests(data_cfg) -> dict[str, str]:
    """The data a prompts / examples stage reads: the source, and the held-out source when there is one."""
    digests = {"source": data_source_digest(data_cfg.source, data_cfg.revision)}
    if data_cfg.eval_source:
        digests["eval_source"] = data_source_digest(data_cfg.eval_source, data_cfg.revision)
    return digests


def callable_digest(path: str) -> str:
    """A `module:function`'s code: the sha256 of its module file's bytes as they are on disk now (what a new
    process imports), or of the function's source when the module has no file."""
    module_name = path.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None)
    if origin and os.path.isfile(origin):
        return "sha256:" + file_digest(origin)
    import inspect

    from alignment_core.annotation.scorers import import_callable

    function = import_callable(path)  # raises a ValueError that says what is wrong with the path
    try:
        return "source:" + hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
    except (OSError, TypeError):
        return f"unhashable:{path}"


def template_digest(template: str, suffix: str = "") -> str:
    """A judge template's text (bundled name or file), as the judge renders it."""
    from alignment_core.annotation.judge import load_template

    return hashlib.sha256(load_template(template, suffix=suffix).source.encode()).hexdigest()


def _function_source(path: Path, name: str) -> str:
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(text, node) or ""
    raise KeyError(f"{path} has no top-level function {name!r} (digests.STAGE_CODE is out of date)")


def _code_entries(root: Path, entries: list[str]) -> list[tuple[str, str]]:
    found = []
    for entry in entries:
        file_part, _, function = entry.partition(":")
        if function:
            found.append((entry, hashlib.sha256(_function_source(root / file_part, function).encode()).hexdigest()))
            continue
        matches = sorted(root.glob(file_part))
        if not matches:
            raise KeyError(f"no library file matches {file_part!r} under {root} (digests.STAGE_CODE)")
        found += [(p.relative_to(root).as_posix(), file_digest(str(p))) for p in matches]
    return sorted(set(found))


def stage_code_digest(stage: str, root: str | Path | None = None) -> str:
    """A digest of the library code that produces `stage` (STAGE_CODE), 16 hex chars.

    `root` is the package folder (default: this package); tests point it at a copy to edit.
    """
    if stage not in STAGE_CODE:
        raise KeyError(f"no code list for stage {stage!r}; known: {sorted(STAGE_CODE)}")
    entries = _code_entries(Path(root) if root is not None else PACKAGE_DIR, STAGE_CODE[stage])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
