"""A user's own data: columns mapped onto a known format, format detection past bad leading rows, and prompts that
are not prompts (a lone system turn, an unknown role) counted as bad rows."""

import json
import logging
import subprocess
import sys

import pydantic
import pytest
import yaml

from alignment_core.config import DataConfig
from alignment_core.data import DETECT_MAX_ROWS, DatasetLoader
from alignment_core.store import ArtifactStore
from tests.helpers import REPO, prefect_env
from tests.test_cli import ALPACA_ROWS, write_alpaca

ALPACA_COLUMNS = {"prompt": ["instruction", "input"], "completion": "output"}


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_alpaca_columns_join_instruction_and_input_into_the_prompt(tmp_path):
    loader = DatasetLoader(write_alpaca(tmp_path / "alpaca.jsonl"), columns=ALPACA_COLUMNS)
    rows = loader.load().to_pylist()
    assert loader.report.format == "sft" and loader.report.rows_kept == len(ALPACA_ROWS) == 24
    # row 1 has an input: a blank line after the instruction; row 0's input is empty: the instruction alone
    assert rows[1]["prompt"] == "Write a sentence about item 1.\n\nItem 1 is blue."
    assert rows[0]["prompt"] == "Write a sentence about item 0."
    assert rows[0]["prompt_messages"] == [{"role": "user", "content": "Write a sentence about item 0."}]
    assert rows[1]["completion"] == "Item 1 is a good and happy thing."


def test_a_renamed_column_maps_onto_pairs(tmp_path):
    rows = [{"question": f"q{i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(3)]
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(row) for row in rows])
    loader = DatasetLoader(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    examples = loader.load().to_pylist()
    assert loader.report.format == "pairs"
    assert [(e["prompt"], e["chosen"], e["rejected"]) for e in examples] == [("q0", "yes 0", "no 0"),
                                                                             ("q1", "yes 1", "no 1"),
                                                                             ("q2", "yes 2", "no 2")]


def test_a_mapping_that_names_a_column_the_file_lacks_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data.columns names \['question'\], not among its columns "
                                         r"\['input', 'instruction', 'output'\]"):
        DatasetLoader(write_alpaca(tmp_path / "alpaca.jsonl"), columns={"prompt": "question"}).detect()


def test_columns_may_only_name_what_a_format_reads():
    with pytest.raises(pydantic.ValidationError, match=r"columns maps onto \['query'\], which no format reads"):
        DataConfig(columns={"query": "instruction"})
    with pytest.raises(pydantic.ValidationError, match=r"columns.prompt: name a source column"):
        DataConfig(columns={"prompt": []})


def test_format_detection_reads_past_bad_leading_rows_and_says_how_many(tmp_path, caplog):
    good = [json.dumps({"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) for i in range(5)]
    path = write_lines(tmp_path / "late.jsonl", ["{not json"] * 20 + ["[1, 2]"] * 5 + good)
    with caplog.at_level(logging.WARNING, logger="alignment_core.data"):
        loader = DatasetLoader(path)
        loader.load()
    assert loader.report.format == "pairs" and loader.report.rows_kept == 5
    assert loader.report.skipped_by_reason == {"invalid_json": 25}
    assert "format detection read past 25 unreadable rows among the first 30" in caplog.text


def test_no_readable_row_within_the_bound_is_a_clear_error(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{not json"] * (DETECT_MAX_ROWS + 5))
    with pytest.raises(ValueError, match=rf"none of its first {DETECT_MAX_ROWS} rows is an object with values "
                                         r"\(the first problem: line 1: "):
        DatasetLoader(path).load()


def test_a_lone_system_turn_or_an_unknown_role_is_a_bad_row(tmp_path):
    system = {"role": "system", "content": "You are terse."}
    rows = [
        {"prompt": [system], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "tool", "content": "42"}, {"role": "user", "content": "sum?"}], "chosen": "a",
         "rejected": "b"},
        {"prompt": [system, {"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"},
    ]
    path = write_lines(tmp_path / "roles.jsonl", [json.dumps(row) for row in rows])
    loader = DatasetLoader(path)
    kept = loader.load().to_pylist()
    assert [row["source_row"] for row in kept] == [2]
    assert loader.report.skipped_by_reason == {"no_user_turn": 1, "invalid_role": 1}
    with pytest.raises(ValueError, match=r"row 0 \(pairs format\): the prompt \('prompt'\) has no user turn"):
        DatasetLoader(path, on_bad_row="fail").load()


@pytest.mark.slow
def test_an_alpaca_file_trains_with_sft_through_the_command_line(tmp_path):
    config = {"setup": "sft",
              "data": {"source": write_alpaca(tmp_path / "alpaca.jsonl"), "columns": ALPACA_COLUMNS,
                       "eval_prompts": 4},
              "model": {"policy": "tiny://llama"},
              "training": {"loss": "sft", "batch_size": 4, "learning_rate": 1e-3},
              "evaluation": {"enabled": False},
              "store": {"root": str(tmp_path / "store"), "run_name": "alpaca"}}
    path = tmp_path / "alpaca.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "flows.offline", "sft", "--config", str(path)], cwd=REPO,
                            env=prefect_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    store = ArtifactStore(str(tmp_path / "store"))
    assert store.checkpoint_complete(store.checkpoint_uri("alpaca", 1))
    report = store.read_manifest(store.stage_uri("alpaca", 0, "examples"))["extra"]["report"]
    assert report["format"] == "sft" and report["rows_kept"] == len(ALPACA_ROWS), report
