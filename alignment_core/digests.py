"""Digests of what a stage reads, for its fingerprint: data, templates, reward functions and library code.

A stage is skipped when its fingerprint matches; the fingerprint must therefore change whenever the stage's
output would, not only when the config text does:

- data files: the sha256 of their bytes (local or any fsspec URL; hashed once per process per path, size and
  modification stamp), bundled datasets likewise, a dataset folder file by file, a hub dataset its commit;
- a judge template: the sha256 of its text;
- a `module:function` (programmatic reward, evaluation oracle): the bytes of the module's file;
- the library: per stage, the source of the modules (and pipeline functions) its code reaches through the
  project's imports, from the stage's entries in `STAGE_ENTRIES`, so an edit to `inspect.py` redoes nothing and
  an edit to `generation/` redoes generation (`stage_code_digest`).
Models are identified by `models.model_digest` (hub commit or weight bytes), through `inputs.InputRef`.
"""

import ast
import hashlib
import importlib.util
import io
import json
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import fsspec

from alignment_core.data import BUNDLED_PREFIX, bundled_path, file_suffix
from alignment_core.stages import STAGES

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = __name__.partition(".")[0]

# Where each stage's code starts (`module:function`, or a bare module for all of it): the stage table's `code`.
# The code digest covers what these reach through the project's own imports (`stage_code`), so a helper in a new
# module is covered as soon as a covered module imports it; only a new stage needs a row (alignment_core/stages.py).
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {name: spec.code for name, spec in STAGES.items()}
# Code that decides whether a stage runs, not what it writes: the fingerprint (this module; the digests of
# input stages and models) and the skip / keep-finished checks. Not followed, or every stage would depend on
# the code of everything its inputs are digested with (`stage_digest` reaches models.py, this module the judge).
FINGERPRINT_CODE = frozenset({
    "alignment_core.digests",
    "alignment_core.stages",
    "alignment_core.runner",
    *(f"alignment_core.pipeline:{name}" for name in ("stage_digest", "model_input_digest", "annotator_digests")),
})

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
    if source.startswith(BUNDLED_PREFIX):
        return "sha256:" + file_digest(bundled_path(source.removeprefix(BUNDLED_PREFIX)))
    if file_suffix(source) is not None:
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

    from alignment_core.annotation.scorers import import_callable  # torch: every fingerprint imports digests

    function = import_callable(path)  # raises a ValueError that says what is wrong with the path
    try:
        return "source:" + hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
    except (OSError, TypeError):
        return f"unhashable:{path}"


def template_digest(template: str, suffix: str = "") -> str:
    """A judge template's text (bundled name or file), as the judge renders it."""
    from alignment_core.annotation.judge import load_template  # torch, likewise

    return hashlib.sha256(load_template(template, suffix=suffix).source.encode()).hexdigest()




# ---- library code, per stage ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Module:
    """What the reach needs of one project module's file: every project module it imports anywhere in it
    (function-local imports too), and for each top-level definition (function, class, assignment) the sha256
    of its source and what it names: definitions of the same module (`module:name`) and project modules (a
    name imported at module level, or an import inside it). `?module` is a name imported from a package, a
    module of it if it has one."""

    imports: tuple[str, ...]
    definitions: dict[str, tuple[str, tuple[str, ...]]]
    names: frozenset[str] | None  # every name its top level defines or imports (None: a `*` import binds some)


_parsed: dict[tuple[str, str], _Module] = {}


def _module_file(root: Path, module: str) -> Path | None:
    parts = module.split(".")[1:]  # below the package, which `root` is
    for path in (root.joinpath(*parts).with_suffix(".py") if parts else None, root.joinpath(*parts, "__init__.py")):
        if path is not None and path.is_file():
            return path
    return None


def _with_packages(module: str) -> list[str]:
    """A module and the packages above it: importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` too."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _import_bindings(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> dict[str, tuple[str, ...]]:
    """The names one import statement binds, each with the project modules it loads (none: not ours)."""
    if isinstance(node, ast.Import):
        return {alias.asname or alias.name.partition(".")[0]:
                tuple(_with_packages(alias.name)) if alias.name.partition(".")[0] == PACKAGE else ()
                for alias in node.names}
    source = node.module or ""
    if node.level:  # relative: from the importing module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        source = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    if source.partition(".")[0] != PACKAGE:
        return {alias.asname or alias.name: () for alias in node.names}
    loaded = tuple(_with_packages(source))
    return {alias.asname or alias.name: (*loaded, f"?{source}.{alias.name}") for alias in node.names}


def _module(path: Path, module: str, sha256: str) -> _Module:
    """`module`'s file, parsed once per process for each version of it (its bytes' sha256)."""
    key = (module, sha256)
    if key in _parsed:
        return _parsed[key]
    text = path.read_bytes().decode()
    tree = ast.parse(text, filename=str(path))
    is_package = path.name == "__init__.py"

    def imported(node) -> list[str]:
        return [m for modules in _import_bindings(node, module, is_package).values() for m in modules]

    nodes: dict[str, ast.stmt] = {}
    bound: dict[str, tuple[str, ...]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nodes[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            nodes.update((n.id, node) for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update(_import_bindings(node, module, is_package))
    lines = io.StringIO(text, newline="").readlines()  # split where `ast` counts lines: \n, \r\n and \r
    definitions = {}
    for name, node in nodes.items():
        follows: list[str] = []
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and child.id in nodes and child.id != name:
                follows.append(f"{module}:{child.id}")
            elif isinstance(child, ast.Name) and child.id in bound:
                follows += bound[child.id]
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                follows += imported(child)
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        source = "".join(lines[first - 1 : node.end_lineno])  # its lines, decorators included
        definitions[name] = (hashlib.sha256(source.encode()).hexdigest(), tuple(dict.fromkeys(follows)))
    imports = {m for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for m in imported(node)}
    names = None if "*" in bound else frozenset(nodes) | frozenset(bound)
    _parsed[key] = _Module(tuple(sorted(imports)), definitions, names)
    return _parsed[key]


def stage_code(stage: str, root: str | Path | None = None) -> dict[str, str]:
    """The library code `stage`'s digest covers, each piece's sha256 by name: `path.py` for a module (its
    bytes), `path.py:name` for one top-level definition of an entry module. From the stage's entries
    (`STAGE_ENTRIES`): a function covers its own source, the top-level definitions of its module that it names,
    and the modules its names are imported from or that it imports itself; a module covers its bytes and every
    project module it imports anywhere, and the packages above it. `FINGERPRINT_CODE` is not followed.

    `root` is the package folder (default: this package); tests point it at a copy to edit.
    """
    if stage not in STAGE_ENTRIES:
        raise KeyError(f"no code entries for stage {stage!r}; known: {sorted(STAGE_ENTRIES)}")
    root = Path(root) if root is not None else PACKAGE_DIR
    covered: dict[str, str] = {}
    pending, seen = list(STAGE_ENTRIES[stage]), set()
    while pending:
        entry = pending.pop()
        if entry in seen or entry.removeprefix("?") in FINGERPRINT_CODE:
            continue
        seen.add(entry)
        name, _, definition = entry.removeprefix("?").partition(":")
        path = _module_file(root, name)
        if path is None and entry.startswith("?"):  # a name imported from a package, not a module of it
            package, _, attribute = name.rpartition(".")
            package_path = _module_file(root, package)
            names = _module(package_path, package, file_digest(str(package_path))).names
            if names is not None and attribute not in names and attribute != "*":
                # (a lazy package's PEP 562 `__getattr__`): its module, and so the code behind the name, unseen
                raise KeyError(f"the library imports {attribute} from {package}, which does not bind it at its "
                               f"top level: import it from the module that defines it")
            continue
        if path is None:
            raise KeyError(f"the library imports {name}, which has no file under {root}")
        sha256 = file_digest(str(path))
        module, label = _module(path, name, sha256), path.relative_to(root).as_posix()
        pending += _with_packages(name)[:-1]  # the packages above a module run when it is imported
        if not definition:
            covered[label] = sha256
            pending += module.imports
        elif definition in module.definitions:
            covered[f"{label}:{definition}"], follows = module.definitions[definition]
            pending += follows
        else:
            raise KeyError(f"{label} has no top-level definition {definition!r} (digests.STAGE_ENTRIES)")
    return dict(sorted(covered.items()))


def stage_code_digest(stage: str, root: str | Path | None = None) -> str:
    """A digest of the library code that produces `stage` (`stage_code`), 16 hex chars."""
    return hashlib.sha256(json.dumps(stage_code(stage, root)).encode()).hexdigest()[:16]
