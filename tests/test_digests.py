"""Code digests (alignment_core/digests.py): a stage's digest covers the library code its entries reach through
the project's own imports, so an edit redoes the stages whose code reaches it and no other. Each test edits a
copy of the package and computes the digests there (`stage_code_digest(stage, root)`)."""

import ast
import importlib
import inspect
import io
import os
import re
import shutil
import tokenize
from itertools import count
from pathlib import Path

import pytest

from alignment_core import digests, stages

STAGES = sorted(digests.STAGE_ENTRIES)
_stamps = count(1_700_000_000_000_000_000, 1_000_000_000)


def copy_package(tmp_path: Path) -> Path:
    package = tmp_path / "alignment_core"
    shutil.copytree(digests.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    return package


def stage_digests(root: Path | None = None) -> dict[str, str]:
    return {stage: digests.stage_code_digest(stage, root) for stage in STAGES}


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(stage for stage in before if before[stage] != after[stage])


def write(path: Path, content: bytes) -> None:
    """Write with a modification stamp of its own: a same-size rewrite within one clock tick must not look like
    the file digests already cached (they are cached per size and stamp)."""
    path.write_bytes(content)
    stamp = next(_stamps)
    os.utime(path, ns=(stamp, stamp))


def edit(path: Path, anchor: str | None, replacement: str) -> None:
    """Replace the one occurrence of `anchor` (None: append `replacement` at the end)."""
    text = path.read_text()
    if anchor is None:
        text += replacement
    else:
        assert text.count(anchor) == 1, f"{anchor!r} is not once in {path}"
        text = text.replace(anchor, replacement)
    write(path, text.encode())


def test_every_stage_row_starts_at_a_function_that_runs_it_through_run_stage(tmp_path):
    assert stage_digests(copy_package(tmp_path)) == stage_digests()  # the digest depends on contents, not place
    assert set(STAGES) == set(stages.STAGES)
    for spec in stages.STAGES.values():
        for entry in spec.code:
            module, _, function = entry.partition(":")
            source = inspect.getsource(getattr(importlib.import_module(module), function))
            assert "run_stage(" in source, f"{spec.name}: {entry} does not run its stage through run_stage"
    with pytest.raises(KeyError, match="no-such-stage"):
        digests.stage_code_digest("no-such-stage")


TRAINER_METHOD = "    def release(self) -> None:\n"
COLLATE = "    def collate(self, encoded: list[dict]) -> dict:\n"


@pytest.mark.parametrize("file, anchor, replacement, expected", [
    # the Trainer is no code of the weights stage (log-probs come from logprobs.py)
    ("training/trainer.py", TRAINER_METHOD, "    def unused(self):\n        return None\n\n" + TRAINER_METHOD,
     ["checkpoint", "reward_models"]),
    ("logprobs.py", None, "\n# an edit\n", ["checkpoint", "reward_models", "weights"]),
    # collate is no code of sampling or annotation (prompt rendering lives in rendering.py)
    ("batches.py", COLLATE, COLLATE + "        # an edit\n", ["checkpoint", "reward_models", "units", "weights"]),
    ("generation/common.py", None, "\n# an edit\n", ["eval_generations", "generations"]),
    ("annotation/judge.py", None, "\n# an edit\n", ["annotations", "evaluation", "reward_model_evaluation"]),
    # another stage's function in a shared module
    ("pipeline.py", '"""One training round;', '"""One (edited) training round;', ["checkpoint"]),
    # what decides whether a stage runs, not what it writes
    ("runner.py", '"""Whether a stage of a finished iteration', '"""Whether (edited) a stage of a finished iteration',
     []),
    ("inspect.py", None, "\n# an edit\n", []),
], ids=["trainer", "logprobs", "collate", "generation", "judge", "pipeline-train", "keep-finished",
        "inspect"])
def test_an_edit_changes_the_digests_of_the_stages_whose_code_reaches_it(tmp_path, file, anchor, replacement,
                                                                        expected):
    package = copy_package(tmp_path)
    before = stage_digests(package)
    edit(package / file, anchor, replacement)
    assert changed(before, stage_digests(package)) == expected


def test_a_name_a_package_exports_lazily_cannot_hide_its_code_from_the_digests(tmp_path):
    """The annotation package resolves its names on first use (PEP 562), which no reading of its source follows:
    a stage importing `run_annotation` from the package would cover none of the annotation code, and an edit
    there would redo nothing. The reach refuses such an import, naming it."""
    package = copy_package(tmp_path)
    edit(package / "pipeline.py", "    from alignment_core.annotation.stage import run_annotation\n",
         "    from alignment_core.annotation import run_annotation\n")
    with pytest.raises(KeyError, match="imports run_annotation from alignment_core.annotation, which does not "
                                       "bind it at its top level"):
        digests.stage_code_digest("annotations", package)


def test_the_fingerprint_code_is_followed_by_no_stage_however_it_is_imported(tmp_path):
    package = copy_package(tmp_path)
    edit(package / "reweight.py", None, "\n\nfrom alignment_core import digests  # noqa: E402,F401\n")
    before = stage_digests(package)
    edit(package / "digests.py", None, "\n# an edit\n")
    assert changed(before, stage_digests(package)) == []


NEW_HELPER = "def scale(x):\n    return {factor} * x\n"


@pytest.mark.parametrize("helper, file, anchor, call, expected", [
    # a module-level import in a module a stage covers whole
    ("helpers_new.py", "reweight.py", None,
     "\n\nfrom alignment_core.helpers_new import scale  # noqa: E402\n\n\ndef _scaled(x):\n    return scale(x)\n",
     ["weights"]),
    # a function-local import inside the Trainer
    ("helpers_new.py", "training/trainer.py", TRAINER_METHOD,
     "    def scaled(self, x):\n        from alignment_core.helpers_new import scale\n\n        return scale(x)\n\n"
     + TRAINER_METHOD, ["checkpoint", "reward_models"]),
    # a module-level import of the shared pipeline module that only one stage's function uses
    ("helpers_new.py", "pipeline.py", "    sources = [uri for uri in (examples_uri,",
     "    sources = [scale(uri) for uri in (examples_uri,", ["units"]),
    # a relative import inside a package
    ("generation/helpers_new.py", "generation/common.py", None,
     "\n\nfrom .helpers_new import scale  # noqa: E402\n\n\ndef _scaled(x):\n    return scale(x)\n",
     ["eval_generations", "generations"]),
], ids=["module-import", "local-import-in-trainer", "pipeline-function", "relative-import"])
def test_a_helper_in_a_new_module_is_code_of_the_stages_that_call_it(tmp_path, helper, file, anchor, call, expected):
    package = copy_package(tmp_path)
    original = stage_digests(package)
    if file == "pipeline.py":  # the name imported at the top of the module, used by build_units alone
        edit(package / file, "from alignment_core.store import", "from alignment_core.helpers_new import scale\n"
                                                                  "from alignment_core.store import")
    edit(package / file, anchor, call)
    write(package / helper, NEW_HELPER.format(factor=1).encode())
    with_helper = stage_digests(package)
    assert changed(original, with_helper) == expected
    assert helper in digests.stage_code(expected[0], package)

    write(package / helper, NEW_HELPER.format(factor=2).encode())  # the helper alone changes
    assert changed(with_helper, stage_digests(package)) == expected


def flippable_offsets(text: str, lines: tuple[int, int]) -> list[int]:
    """Offsets (in the file's bytes) of a letter inside each comment and string on lines `lines` (first, last):
    changing it keeps the file valid Python with the same imports."""
    line_starts = [0]
    for line in io.StringIO(text, newline="").readlines():
        line_starts.append(line_starts[-1] + len(line.encode()))
    source_lines = io.StringIO(text, newline="").readlines()
    offsets = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        (row, column) = token.start
        if token.type not in (tokenize.COMMENT, tokenize.STRING) or not lines[0] <= row <= lines[1]:
            continue
        body = token.string.encode()
        opening = re.search(rb"[#'\"]+", body).end()  # past the prefix and the quotes
        letters = [i for i in range(opening, len(body)) if chr(body[i]).isalpha()]
        if letters:
            offsets.append(line_starts[row - 1] + len(source_lines[row - 1][:column].encode()) + letters[0])
    return offsets


def definition_lines(text: str, name: str) -> tuple[int, int]:
    node = next(n for n in ast.parse(text).body
                if getattr(n, "name", None) == name
                or any(isinstance(t, ast.Name) and t.id == name for t in getattr(n, "targets", [])))
    return node.lineno, node.end_lineno


def test_any_byte_of_a_covered_piece_of_code_changes_the_digest(tmp_path):
    """Every file and pipeline function any stage's digest covers: one letter of a comment or string changed
    (same size, same imports) changes that stage's digest, and the original bytes give the original digest."""
    package = copy_package(tmp_path)
    pieces = {piece: stage for stage in STAGES for piece in digests.stage_code(stage, package)}
    tried = []
    for piece, stage in sorted(pieces.items()):
        file, _, definition = piece.partition(":")
        path = package / file
        original, before = path.read_bytes(), digests.stage_code_digest(stage, package)
        text = original.decode()
        offsets = flippable_offsets(text, definition_lines(text, definition) if definition else (1, 10**9))
        if not offsets:  # an assignment without a comment or string: the edit tests above cover code
            continue
        mutated = bytearray(original)
        mutated[offsets[0]] = ord("Q") if mutated[offsets[0]] != ord("Q") else ord("Z")
        write(path, bytes(mutated))
        assert digests.stage_code_digest(stage, package) != before, f"{piece}: a changed byte went unnoticed"
        write(path, original)
        assert digests.stage_code_digest(stage, package) == before, piece
        tried.append(piece)
    assert {"pipeline.py:generate", "training/trainer.py", "generation/common.py", "__init__.py"} <= set(tried)
    assert len(tried) >= len(pieces) - 5, sorted(set(pieces) - set(tried))


def test_a_data_folders_digest_follows_each_files_bytes(tmp_path):
    folder = tmp_path / "data"
    (folder / "part").mkdir(parents=True)
    write(folder / "a.jsonl", b'{"prompt": "hello"}\n')
    write(folder / "part" / "b.jsonl", b'{"prompt": "world"}\n')
    before = digests.folder_digest(str(folder))
    write(folder / "part" / "b.jsonl", b'{"prompt": "wOrld"}\n')  # one byte, same size and name
    assert digests.folder_digest(str(folder)) != before
    write(folder / "part" / "b.jsonl", b'{"prompt": "world"}\n')
    assert digests.folder_digest(str(folder)) == before
