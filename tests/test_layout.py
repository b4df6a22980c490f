"""The tests mirror the package: every module of alignment_core has its tests in tests/test_<module>.py, a module of
a subpackage in tests/test_<subpackage>.py, or is listed below with the file that tests it and why it lives there.
A new module fails this until it has one of the three."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "alignment_core"
TESTS = Path(__file__).resolve().parent

# module -> the test file that covers it, where the rule's name does not say it (and why)
TESTED_ELSEWHERE = {
    "cpu": ("test_cpu_threads.py", "what it sets: the thread counts and wait policy of a stage's process"),
    "errors": ("test_judge_hardening.py", "the error kinds are tested where they are raised (and test_cli.py)"),
    "evaluation": ("test_wiring.py", "win-rates and their intervals, beside the losses they judge"),
    "gpu": ("test_gpu_check.py", "GPU memory helpers: only the GPU acceptance script reaches them"),
    "inspect": ("test_runs_explain.py", "what `inspect` shows of a run"),
    "logprobs": ("test_training.py", "the log-prob kernels, against the Trainer's rounds (and test_rendering.py)"),
    "models": ("test_model_families.py", "loading each model family (and test_hub_models.py, test_adapters.py)"),
    "preflight": ("test_cli.py", "the checks before any model work, as a user meets them"),
    "progress": ("test_ui_artifacts.py", "progress bars and artifacts a flow run shows"),
    "records": ("test_verified_shards.py", "the schemas every shard conforms to (and test_store.py)"),
    "rewards": ("test_annotation.py", "the programmatic reward functions, as annotators"),
    "runner": ("test_stages.py", "the stage runner, row by row of the stage table"),
    "verdict": ("test_demo.py", "the verdict line of a run, on the demo's numbers"),
    "merge": ("test_adapters.py", "merging an adapter into full weights, beside the adapters it merges"),
    "make_bundled": ("test_data.py", "the bundled datasets it wrote, as the loader reads them"),
}


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path.name not in ("__init__.py", "__main__.py"))


def test_every_module_has_its_tests():
    missing = []
    for path in modules():
        subpackage = path.parent.name if path.parent != PACKAGE else None
        candidates = [f"test_{path.stem}.py", *([f"test_{subpackage}.py"] if subpackage else [])]
        if path.stem in TESTED_ELSEWHERE:
            candidates.append(TESTED_ELSEWHERE[path.stem][0])
        if not any((TESTS / name).is_file() for name in candidates):
            missing.append(str(path.relative_to(PACKAGE.parent)))
    assert not missing, f"modules with no test file (tests/test_<module>.py, or in TESTED_ELSEWHERE): {missing}"


def test_the_exceptions_name_modules_and_test_files_that_exist():
    stems = {path.stem for path in modules()}
    assert set(TESTED_ELSEWHERE) <= stems, sorted(set(TESTED_ELSEWHERE) - stems)
    assert all((TESTS / name).is_file() for name, _ in TESTED_ELSEWHERE.values())


def project_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its file (function-local imports too), those under
    `if TYPE_CHECKING:` aside (types only: never run)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for branch in ast.walk(tree)
                 if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                 for node in ast.walk(branch)}
    imported = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or "", *(f"{node.module}.{alias.name}" for alias in node.names)])
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own __init__
                imported.add(name)
    return imported


def test_no_import_circle():
    paths = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
             for path in PACKAGE.rglob("*.py")}
    graph = {module: project_imports(path, module, set(paths)) for module, path in paths.items()}

    def reaches(start: str, target: str) -> list[str] | None:
        seen, stack = set(), [(start, [start])]
        while stack:
            module, trail = stack.pop()
            for nxt in graph[module]:
                if nxt == target:
                    return [*trail, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    circles = [circle for module in graph if (circle := reaches(module, module))]
    assert not circles, f"import circles: {circles[:3]}"
