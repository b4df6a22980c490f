"""DatasetLoader on files written in the exact layouts of the public datasets it adapts, plus the bundled data."""

import hashlib
import json
import logging

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from alignment_core import data, pipeline
from alignment_core.config import DataConfig, parse_config
from alignment_core.data import DatasetLoader, detect_format, prompt_id
from alignment_core.records import EXAMPLES, PROMPTS
from alignment_core.rewards import positive_words
from alignment_core.store import ArtifactStore
from tests.helpers import write_jsonl


def load(path, **options) -> tuple[list[dict], data.LoadReport]:
    loader = DatasetLoader(str(path), **options)
    table = loader.load()
    assert table.schema == EXAMPLES
    return table.to_pylist(), loader.report


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --- adapters on real-format rows ----------------------------------------------------------------------------

# Anthropic/hh-rlhf rows: only chosen/rejected, each the whole transcript; the answer after the last shared
# "\n\nAssistant:" marker starts with a space.
HH_ROWS = [
    {
        "chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I haven't even thought about it.",
        "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.",
    },
    {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
        "\n\nAssistant: I think a good one is about a cat.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
        "\n\nAssistant: I think not.",
    },
]


def test_hh_rlhf_splits_the_shared_prompt_into_turns(tmp_path):
    rows, report = load(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS))
    assert report.format == "hh_rlhf" and report.rows_kept == 2 and report.rows_skipped == 0
    first, second = rows
    assert first["prompt_messages"] == [user("What are some cuss words in english?")]
    assert first["prompt"] == "What are some cuss words in english?"
    assert first["chosen"] == "I haven't even thought about it."
    assert first["rejected"] == "Here's an incomplete list."
    # The answers share "I think " past the marker: the prompt still ends at the last marker.
    assert second["prompt_messages"] == [user("Hi there"), assistant("Hello! How can I help?"), user("Tell me a joke.")]
    assert second["prompt"] == "User: Hi there\n\nAssistant: Hello! How can I help?\n\nUser: Tell me a joke."
    assert (second["chosen"], second["rejected"]) == ("I think a good one is about a cat.", "I think not.")
    assert [row["source_row"] for row in rows] == [0, 1]


def test_hh_rlhf_unparseable_transcripts_are_counted(tmp_path):
    rows = [
        HH_ROWS[0],
        {"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: bye"},  # no markers
        {  # the conversations diverge before their final turn
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: d",
        },
        {"chosen": "preamble\n\nHuman: a\n\nAssistant: b", "rejected": "preamble\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:  "},  # empty answer
    ]
    kept, report = load(write_jsonl(tmp_path / "hh.jsonl", rows), format="hh_rlhf")
    assert [row["source_row"] for row in kept] == [0]
    assert report.skipped_by_reason == {"unparseable_transcript": 3, "empty_response": 1}
    assert report.first_bad_row_by_reason == {"unparseable_transcript": 1, "empty_response": 4}


# HuggingFaceH4/ultrafeedback_binarized (a parquet dataset): the prompt string is repeated as the first turn
# of chosen/rejected/messages, and the scores sit beside them.
ULTRAFEEDBACK_ROWS = [
    {
        "prompt": "how can i develop a habit of drawing daily",
        "prompt_id": "086b3e24f29b8956a01059f79c56db35d118a06fb6b844b095737d042795cd43",
        "chosen": [user("how can i develop a habit of drawing daily"), assistant("Set a small daily goal.")],
        "rejected": [user("how can i develop a habit of drawing daily"), assistant("Just draw.")],
        "messages": [user("how can i develop a habit of drawing daily"), assistant("Set a small daily goal.")],
        "score_chosen": 8.5,
        "score_rejected": 6.0,
    },
    {
        "prompt": "hello",
        "prompt_id": "b" * 64,
        "chosen": [user("hello"), assistant("Hi! How can I help?")],
        "rejected": [user("hello"), assistant("What.")],
        "messages": [user("hello"), assistant("Hi! How can I help?")],
        "score_chosen": 7.0,
        "score_rejected": 2.0,
    },
]


def test_ultrafeedback_binarized_parquet(tmp_path):
    path = tmp_path / "train_prefs.parquet"
    pq.write_table(pa.Table.from_pylist(ULTRAFEEDBACK_ROWS), path)
    rows, report = load(path)
    assert report.format == "messages_pairs" and report.rows_kept == 2
    first = rows[0]
    assert first["prompt_messages"] == [user("how can i develop a habit of drawing daily")]
    assert (first["chosen"], first["rejected"]) == ("Set a small daily goal.", "Just draw.")
    assert (first["chosen_score"], first["rejected_score"]) == (8.5, 6.0)
    assert rows[1]["prompt"] == "hello"


def test_messages_pairs_explicit_prompt_and_multi_turn(tmp_path):
    rows = [
        # TRL's explicit-prompt conversational form: the prompt only in `prompt`, no scores.
        {"prompt": [user("Name a colour.")], "chosen": [assistant("Blue.")], "rejected": [assistant("No.")]},
        # Implicit prompt, two turns of history shared by both answers.
        {
            "chosen": [user("Hi"), assistant("Hello"), user("Bye?"), assistant("Goodbye, friend!")],
            "rejected": [user("Hi"), assistant("Hello"), user("Bye?"), assistant("Whatever.")],
        },
        # Different histories: not one prompt with two answers.
        {"chosen": [user("A"), assistant("x")], "rejected": [user("B"), assistant("y")]},
        {"chosen": [user("A"), assistant("x")], "rejected": [user("A"), user("y")]},  # no final assistant
        {"chosen": [user("A"), assistant("x")], "rejected": [user("A"), assistant("y")], "score_chosen": "high"},
    ]
    kept, report = load(write_jsonl(tmp_path / "conv.jsonl", rows))
    assert report.format == "messages_pairs"
    assert kept[0]["prompt_messages"] == [user("Name a colour.")]
    assert kept[0]["chosen_score"] is None
    assert kept[1]["prompt_messages"] == [user("Hi"), assistant("Hello"), user("Bye?")]
    assert kept[1]["chosen"] == "Goodbye, friend!"
    assert report.skipped_by_reason == {"mismatched_prompts": 1, "invalid_messages": 1, "invalid_score": 1}
    assert report.first_bad_row_by_reason == {"mismatched_prompts": 2, "invalid_messages": 3, "invalid_score": 4}


def test_pairs_from_csv_and_json(tmp_path):
    rows = [
        {"prompt": "Describe your day.", "chosen": "A great day!", "rejected": "It was a day."},
        {"prompt": "Tell me about the weather.", "chosen": "Sunny and bright.", "rejected": "Weather."},
    ]
    csv_path = tmp_path / "pairs.csv"
    pa.csv.write_csv(pa.Table.from_pylist(rows), csv_path)
    json_path = tmp_path / "pairs.json"
    json_path.write_text(json.dumps(rows))
    wrapped_path = tmp_path / "wrapped.json"
    wrapped_path.write_text(json.dumps({"version": "1", "data": rows}))
    lines_path = tmp_path / "lines.json"  # JSON lines under a .json name, as datasets' to_json writes them
    write_jsonl(lines_path, rows)
    results = [load(path) for path in (csv_path, json_path, wrapped_path, lines_path)]
    for loaded, report in results:
        assert report.format == "pairs" and report.rows_kept == 2
        assert [row["chosen"] for row in loaded] == ["A great day!", "Sunny and bright."]
    assert len({tuple(row["example_id"] for row in loaded) for loaded, _ in results}) == 1


def test_pointwise_kto_standard_and_conversational(tmp_path):
    rows = [
        {"prompt": "Hey, hello", "completion": "hi nice to meet you", "label": True},
        {"prompt": "How are you", "completion": "leave me alone", "label": False},
        # trl-lib/kto-mix-14k: prompt and completion as chat turns.
        {"prompt": [user("Say something kind.")], "completion": [assistant("You are wonderful.")], "label": True},
        {"prompt": "Rate", "completion": "ok", "label": 0.5},
        {"prompt": "Rate", "completion": "ok", "label": "yes"},
    ]
    kept, report = load(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert report.format == "pointwise"
    assert [row["label"] for row in kept] == [1.0, 0.0, 1.0]
    assert kept[2]["prompt_messages"] == [user("Say something kind.")]
    assert kept[2]["completion"] == "You are wonderful."
    assert all(row["chosen"] is None and row["rejected"] is None for row in kept)
    assert report.skipped_by_reason == {"invalid_label": 2}
    assert report.first_bad_row == 3


def test_pointwise_integer_labels_from_csv(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nHi,Hello there,1\nHi,Go away,0\n")
    kept, report = load(path)
    assert report.format == "pointwise"
    assert [(row["completion"], row["label"]) for row in kept] == [("Hello there", 1.0), ("Go away", 0.0)]


def test_sft_prompt_completion_and_messages(tmp_path):
    rows = [{"prompt": "Say hi.", "completion": "Hi!"}, {"prompt": "Count.", "completion": "One two three."}]
    kept, report = load(write_jsonl(tmp_path / "sft.jsonl", rows))
    assert report.format == "sft"
    assert [(row["prompt"], row["completion"]) for row in kept] == [("Say hi.", "Hi!"), ("Count.", "One two three.")]

    chats = [
        {"messages": [{"role": "system", "content": "Be brief."}, user("Hello"), assistant("Hi.")]},
        {"messages": [user("Q1"), assistant("A1"), user("Q2"), assistant("A2")]},
        {"messages": [assistant("Only an answer.")]},  # nothing before the answer
    ]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(chats))
    kept, report = load(path)
    assert report.format == "sft"
    assert kept[0]["prompt_messages"] == [{"role": "system", "content": "Be brief."}, user("Hello")]
    assert kept[0]["prompt"] == "System: Be brief.\n\nUser: Hello"
    assert kept[1]["prompt_messages"] == [user("Q1"), assistant("A1"), user("Q2")]
    assert kept[1]["completion"] == "A2"
    assert report.skipped_by_reason == {"empty_prompt": 1}


def test_prompt_only_strings_and_messages(tmp_path):
    kept, report = load(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Describe your day."}, {"prompt": "  "}]))
    assert report.format == "prompt_only"
    assert [row["prompt"] for row in kept] == ["Describe your day."]
    assert all(row[name] is None for row in kept for name in ("chosen", "rejected", "completion", "label"))
    assert report.skipped_by_reason == {"empty_prompt": 1}

    rows = [{"messages": [user("Hi"), assistant("Hello"), user("How are you?")]}]
    kept, report = load(write_jsonl(tmp_path / "m.jsonl", rows))
    assert report.format == "prompt_only"
    assert kept[0]["prompt_messages"] == rows[0]["messages"]
    # Explicitly prompt_only over chats ending in an answer: the prompt ends at the last user turn.
    rows = [{"messages": [user("Hi"), assistant("Hello")]}]
    kept, _ = load(write_jsonl(tmp_path / "s.jsonl", rows), format="prompt_only")
    assert kept[0]["prompt_messages"] == [user("Hi")] and kept[0]["completion"] is None


def test_scored_lists_become_best_vs_worst_pairs(tmp_path):
    rows = [
        {"prompt": "Pick", "responses": ["meh", "great", "bad", "fine"], "scores": [2.0, 9.0, 1.0, 5.0]},
        {"prompt": "Close", "responses": ["a", "b"], "scores": [5.0, 4.5]},  # gap 0.5 < margin
        {"prompt": "Tie", "responses": ["a", "b"], "scores": [3, 3]},  # no preference at all
        {"prompt": "Short", "responses": ["a", "b", "c"], "scores": [1.0, 2.0]},
        {"prompt": "Same", "responses": ["same", "same"], "scores": [1.0, 2.0]},
        {"prompt": "One", "responses": ["only"], "scores": [1.0]},
    ]
    kept, report = load(write_jsonl(tmp_path / "scored.jsonl", rows), min_pair_margin=1.0)
    assert report.format == "scored"
    assert [(row["chosen"], row["rejected"], row["chosen_score"], row["rejected_score"]) for row in kept] == [
        ("great", "bad", 9.0, 1.0)
    ]
    assert report.skipped_by_reason == {"below_margin": 2, "length_mismatch": 2, "identical_responses": 1}
    assert report.first_bad_row_by_reason == {"below_margin": 1, "length_mismatch": 3, "identical_responses": 4}
    # Without a margin, the 0.5 gap makes a pair; the tie still does not.
    kept, report = load(write_jsonl(tmp_path / "scored.jsonl", rows[:3]))
    assert [row["prompt"] for row in kept] == ["Pick", "Close"]
    assert report.skipped_by_reason == {"below_margin": 1}


# --- detection and override ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "p"}, "prompt_only"),
        ({"messages": [user("q")]}, "prompt_only"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "hh_rlhf"),
        (ULTRAFEEDBACK_ROWS[0], "messages_pairs"),
        ({"prompt": "p", "completion": "c", "label": True}, "pointwise"),
        ({"prompt": "p", "completion": "c"}, "sft"),
        ({"messages": [user("q"), assistant("a")]}, "sft"),
        ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}, "scored"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format([row]) == expected


def test_detection_uses_several_rows_and_unknown_columns_fail(tmp_path):
    # The first row lacks `rejected`; the rows after it show the format.
    rows = [{"prompt": "p", "chosen": "a"}] + [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    kept, report = load(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert report.format == "pairs" and report.rows_kept == 3
    assert report.skipped_by_reason == {"missing_field": 1} and report.first_bad_row == 0
    with pytest.raises(ValueError, match=r"cannot detect the data format from columns \['question', 'text'\]"):
        DatasetLoader(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "text": "t"}])).load()


def test_format_override(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Same prompt", "chosen": "a", "rejected": "b"},
            {"prompt": "Same prompt", "chosen": "c", "rejected": "d"},
            {"prompt": "Other", "chosen": "e", "rejected": "f"},
        ],
    )
    # As prompts only, the second row repeats the first: counted as a duplicate, not silently dropped.
    kept, report = load(path, format="prompt_only")
    assert [row["prompt"] for row in kept] == ["Same prompt", "Other"]
    assert all(row["chosen"] is None for row in kept)
    assert report.skipped_by_reason == {"duplicate": 1} and report.first_bad_row == 1
    # The wrong adapter named explicitly skips every row with the reason, rather than guessing.
    kept, report = load(path, format="pointwise")
    assert kept == [] and report.skipped_by_reason == {"missing_field": 3}
    with pytest.raises(ValueError, match="unknown data format 'dpo'"):
        DatasetLoader(path, format="dpo")


# --- bad rows ----------------------------------------------------------------------------------------------------


BAD_PAIRS = [
    {"prompt": "ok", "chosen": "yes", "rejected": "no"},  # 0 good
    {"prompt": "ok", "chosen": "yes"},  # 1 missing rejected
    {"prompt": "ok", "chosen": 3, "rejected": "no"},  # 2 not a string
    {"prompt": "", "chosen": "yes", "rejected": "no"},  # 3 empty prompt
    {"prompt": "ok", "chosen": " ", "rejected": "no"},  # 4 empty response
    {"prompt": "ok", "chosen": "same", "rejected": "same"},  # 5 identical
    {"prompt": "ok", "chosen": "yes", "rejected": "no"},  # 6 duplicate of 0
    {"prompt": "fine", "chosen": "good", "rejected": "bad"},  # 7 good
    {"prompt": "ok", "chosen": None, "rejected": "no"},  # 8 missing (null)
]


def bad_pairs_file(tmp_path) -> str:
    lines = [json.dumps(row) for row in BAD_PAIRS]
    lines.insert(7, "{not json")  # becomes row 7; the good row after it is row 8
    lines.insert(3, "")  # blank lines are not rows
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "bad.jsonl")


def test_bad_rows_are_counted_per_reason_with_their_first_index(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="alignment_core.data"):
        kept, report = load(bad_pairs_file(tmp_path))
    assert [row["source_row"] for row in kept] == [0, 8]
    assert [row["prompt"] for row in kept] == ["ok", "fine"]
    assert report.rows_read == 10 and report.rows_kept == 2 and report.rows_skipped == 8
    assert report.skipped_by_reason == {
        "missing_field": 2,
        "not_a_string": 1,
        "empty_prompt": 1,
        "empty_response": 1,
        "identical_responses": 1,
        "duplicate": 1,
        "invalid_json": 1,
    }
    assert report.first_bad_row_by_reason == {
        "missing_field": 1,
        "not_a_string": 2,
        "empty_prompt": 3,
        "empty_response": 4,
        "identical_responses": 5,
        "duplicate": 6,
        "invalid_json": 7,
    }
    assert report.first_bad_row == 1 and report.first_bad_detail == "missing field 'rejected'"
    assert "skipping row 1 (pairs format): missing field 'rejected'" in caplog.text
    assert "read 10, kept 2, skipped 8" in caplog.text
    assert json.loads(json.dumps(report.to_dict()))["rows_skipped"] == 8


def test_fail_mode_raises_on_the_first_bad_row(tmp_path):
    with pytest.raises(ValueError, match=r"row 1 \(pairs format\): missing field 'rejected'"):
        DatasetLoader(bad_pairs_file(tmp_path), on_bad_row="fail").load()
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_ROWS[0], {"chosen": "no markers", "rejected": "none here"}])
    with pytest.raises(ValueError, match=r"row 1 \(hh_rlhf format\): .*Assistant:' turn marker"):
        DatasetLoader(path, on_bad_row="fail").load()


# --- ids, limits, prompts --------------------------------------------------------------------------------------


def test_ids_are_content_hashes(tmp_path):
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "Bye", "chosen": "See you!", "rejected": "Finally."},
    ]
    first, _ = load(write_jsonl(tmp_path / "a.jsonl", rows))
    again, _ = load(write_jsonl(tmp_path / "b.jsonl", rows[::-1]))
    assert {row["example_id"] for row in first} == {row["example_id"] for row in again}
    assert first[0]["example_id"] == again[1]["example_id"]
    # The documented recipe, computed independently: sha256 of the canonical JSON, first 16 hex chars.
    canonical = json.dumps([{"content": "Hi", "role": "user"}], separators=(",", ":"))
    assert first[0]["prompt_id"] == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    canonical = json.dumps([first[0]["prompt_id"], "Hello!", "Go away.", None, None], separators=(",", ":"))
    assert first[0]["example_id"] == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    # One changed answer: same prompt id, new example id. The same prompt as a pairs or HH row: same prompt id.
    changed, _ = load(write_jsonl(tmp_path / "c.jsonl", [{**rows[0], "rejected": "Go away!"}]))
    assert changed[0]["prompt_id"] == first[0]["prompt_id"]
    assert changed[0]["example_id"] != first[0]["example_id"]
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    from_hh, _ = load(write_jsonl(tmp_path / "hh.jsonl", [hh]))
    assert from_hh[0]["prompt_id"] == first[0]["prompt_id"] == prompt_id([user("Hi")])
    assert from_hh[0]["example_id"] == first[0]["example_id"]


def test_max_rows_reads_only_the_first_rows(tmp_path):
    path = bad_pairs_file(tmp_path)
    kept, report = load(path, max_rows=3)
    assert report.rows_read == 3 and [row["source_row"] for row in kept] == [0]
    assert report.skipped_by_reason == {"missing_field": 1, "not_a_string": 1}
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(50)]
    path = tmp_path / "many.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    kept, report = load(path, max_rows=20)
    assert len(kept) == 20 and kept[-1]["prompt"] == "p19" and report.rows_read == 20
    with pytest.raises(ValueError, match="max_rows must be > 0"):
        DatasetLoader(str(path), max_rows=0)


def test_load_prompts_unique_in_first_occurrence_order(tmp_path):
    rows = [
        {"prompt": "B", "chosen": "1", "rejected": "2"},
        {"prompt": "A", "chosen": "1", "rejected": "2"},
        {"prompt": "B", "chosen": "3", "rejected": "4"},
        {"prompt": "C", "chosen": "1", "rejected": "2"},
    ]
    prompts = DatasetLoader(write_jsonl(tmp_path / "p.jsonl", rows)).load_prompts()
    assert prompts.schema == PROMPTS
    assert prompts.column("prompt").to_pylist() == ["B", "A", "C"]
    assert prompts.column("prompt_id").to_pylist() == [prompt_id([user(p)]) for p in "BAC"]


# --- sources -----------------------------------------------------------------------------------------------------


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        DatasetLoader(str(tmp_path / "missing.jsonl")).load()
    with pytest.raises(FileNotFoundError, match="no such dataset folder or file"):
        DatasetLoader(str(tmp_path / "missing_folder")).load()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        DatasetLoader(str(tmp_path / "notes.txt")).load()
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match="single file: split/subset/revision apply only to hub datasets"):
        DatasetLoader(path, split="test").load()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no rows"):
        DatasetLoader(str(tmp_path / "empty.jsonl")).load()
    with pytest.raises(ValueError, match=r"unknown bundled dataset 'nope'; available: \['pointwise', 'preferences'"):
        DatasetLoader("bundled:nope").load()


def test_hub_name_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(HH_ROWS * 3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loader = DatasetLoader("Anthropic/hh-rlhf", subset="harmless-base", split="test", revision="abc123", max_rows=2)
    rows = loader.load().to_pylist()
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", {"split": "test", "revision": "abc123"})]
    assert loader.report.format == "hh_rlhf" and len(rows) == 2


def test_local_dataset_folder_through_datasets(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    write_jsonl(folder / "test.jsonl", [{"prompt": "q", "completion": "d"}, {"prompt": "r", "completion": "e"}])
    loader = DatasetLoader(str(folder), split="test")
    assert loader.load().column("prompt").to_pylist() == ["q", "r"]
    assert loader.report.format == "sft"


def test_from_config():
    config = DataConfig(source="bundled:prompts", format="prompt_only", max_rows=5, on_bad_row="fail")
    loader = DatasetLoader.from_config(config)
    assert (loader.source, loader.format, loader.max_rows, loader.on_bad_row) == (
        "bundled:prompts",
        "prompt_only",
        5,
        "fail",
    )
    assert loader.load().num_rows == 5


# --- bundled data ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, format, rows",
    [
        ("preferences", "pairs", 300),
        ("prompts", "prompt_only", 200),
        ("sft", "sft", 300),
        ("pointwise", "pointwise", 200),
    ],
)
def test_bundled_datasets_load_without_skips(name, format, rows):
    loader = DatasetLoader(f"bundled:{name}")
    table = loader.load()
    assert table.schema == EXAMPLES and table.num_rows == rows
    assert loader.report.format == format and loader.report.rows_skipped == 0
    assert len(set(table.column("example_id").to_pylist())) == rows


def test_bundled_preferences_favour_positive_words():
    rows = DatasetLoader("bundled:preferences").load().to_pylist()
    margins = [positive_words(r["prompt"], r["chosen"]) - positive_words(r["prompt"], r["rejected"]) for r in rows]
    assert min(margins) > 0
    assert len({row["prompt_id"] for row in rows}) == 300  # one row per prompt
    labels = DatasetLoader("bundled:pointwise").load().to_pylist()
    for row in labels:
        assert (positive_words(row["prompt"], row["completion"]) >= 2) == (row["label"] == 1.0)


def test_bundled_prompts_tail_is_held_out():
    from alignment_core.bundled import make_bundled

    prompts = DatasetLoader("bundled:prompts").load_prompts().column("prompt").to_pylist()
    head, tail = prompts[: -make_bundled.HELD_OUT_PROMPTS], prompts[-make_bundled.HELD_OUT_PROMPTS :]
    assert len(prompts) == 200 and len(tail) == 40
    training_pool = {prompt for prompt, _ in make_bundled.prompt_pool(make_bundled.TOPICS, personal=True)}
    held_out_pool = {prompt for prompt, _ in make_bundled.prompt_pool(make_bundled.HELD_OUT_TOPICS, personal=False)}
    assert set(head) <= training_pool and set(tail) <= held_out_pool
    used_in_training = {
        prompt
        for name in ("preferences", "sft", "pointwise")
        for prompt in DatasetLoader(f"bundled:{name}").load().column("prompt").to_pylist()
    }
    assert not used_in_training.intersection(tail)
    assert used_in_training <= training_pool


def test_bundled_files_are_what_the_script_writes(tmp_path, monkeypatch):
    from alignment_core.bundled import make_bundled

    monkeypatch.setattr(make_bundled, "HERE", tmp_path)
    make_bundled.main()
    for name in data.bundled_names():
        assert (tmp_path / f"{name}.jsonl").read_bytes() == open(data.bundled_path(name), "rb").read(), name


def test_chosen_without_rejected_is_not_a_preference_pair(tmp_path):
    from alignment_core.data import detect_format

    assert detect_format([{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}]) == "pairs"
    with pytest.raises(ValueError, match=r"columns \['chosen'\] would not be read"):
        detect_format([{"prompt": "Hi", "chosen": "Hello"}])  # no silent pairs without a rejected response


def test_the_original_designs_spelling_is_the_same_loader():
    from alignment_core.data import DatasetLoader, DatasLoader

    assert DatasLoader is DatasetLoader


# --- rows that are not UTF-8 text: counted skips with their line ---------------------------------------------


def test_non_utf8_and_unencodable_jsonl_rows_are_counted_with_their_line(tmp_path, caplog):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(
        b'{"prompt": "first"}\n'
        b"\n"
        b'{"prompt": "caf\xe9 latin-1"}\n'  # line 3: a Latin-1 byte, not UTF-8
        b'{"prompt": "second"}\n'
        b'{"prompt": "lone \\ud800 surrogate"}\n'  # line 5: valid JSON, but no UTF-8 encoding exists
        b'{"prompt": "third \\ud83d\\ude00"}\n'  # a proper surrogate pair: an emoji, kept
    )
    rows, report = load(path)
    assert [row["prompt"] for row in rows] == ["first", "second", "third \U0001f600"]
    assert report.skipped_by_reason == {"invalid_encoding": 2} and report.rows_read == 5
    assert report.first_bad_detail.startswith("line 3: not valid UTF-8 (byte 0xe9")
    assert "line 3" in caplog.text
    assert report.first_bad_row_by_reason == {"invalid_encoding": 1}  # the source row index (line 2 is blank)
    with pytest.raises(ValueError, match=r"row 1 \(prompt_only format\): line 3: not valid UTF-8"):
        DatasetLoader(str(path), on_bad_row="fail").load()
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_bytes(b'{"prompt": "ok"}\n{"prompt": "ok too", "meta": {"note": "\\udc80"}}\n')
    with pytest.raises(ValueError, match=r"line 2: 'meta.note' is not valid UTF-8 text"):
        DatasetLoader(str(surrogate), on_bad_row="fail").load()


def test_non_utf8_json_array_item_is_counted_with_its_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_bytes(
        b'[\n  {"prompt": "a", "chosen": "x", "rejected": "y"},\n'
        b'  {"prompt": "b\xff", "chosen": "x", "rejected": "y"},\n'
        b'  {"prompt": "c", "chosen": "x", "rejected": "y"}\n]\n'
    )
    rows, report = load(path)
    assert [row["prompt"] for row in rows] == ["a", "c"]
    assert report.skipped_by_reason == {"invalid_encoding": 1}
    assert report.first_bad_detail.startswith("item 1 (line 3): 'prompt' is not valid UTF-8")


def test_non_utf8_csv_row_is_counted_and_the_column_still_loads_as_text(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(
        b'prompt,chosen,rejected\n'
        b'"a prompt\nover two lines",good,bad\n'
        b'caf\xe9,good,bad\n'  # line 4: not UTF-8
        b'plain,good,bad\n'
    )
    rows, report = load(path)
    assert [row["prompt"] for row in rows] == ["a prompt\nover two lines", "plain"]  # text, not bytes
    assert report.skipped_by_reason == {"invalid_encoding": 1}
    assert report.first_bad_detail == "line 4: column 'prompt' is not valid UTF-8 text"


def test_load_reports_reach_the_prompts_and_examples_manifests(tmp_path):
    source = tmp_path / "pairs.jsonl"
    good = [json.dumps({"prompt": f"p{i}", "chosen": "great", "rejected": "bad"}).encode() for i in range(6)]
    source.write_bytes(b"\n".join(good[:3] + [b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}'] + good[3:]))
    data = {"source": str(source), "eval_prompts": 2}
    store = {"root": str(tmp_path / "runs"), "run_name": "r"}
    online = parse_config({"data": data, "store": store, "generation": {"prompts_per_iteration": 2}})
    offline = parse_config({"setup": "offline_pairwise", "data": data, "store": store})
    uris = [pipeline.load_prompts(online, 1), pipeline.load_eval_prompts(online), pipeline.load_examples(offline)]
    manifests = [ArtifactStore(str(tmp_path / "runs")).read_manifest(uri) for uri in uris]
    for manifest in manifests:
        report = manifest["extra"]["report"]
        assert report["skipped_by_reason"] == {"invalid_encoding": 1} and report["rows_kept"] == 6
        assert report["first_bad_detail"].startswith("line 4: not valid UTF-8")


# --- scored lists in public spellings; no silent prompt_only ------------------------------------------------


def test_scored_lists_in_other_spellings(tmp_path):
    rows = [
        {"prompt": "Pick", "completions": ["meh", "great", "bad"], "rewards": [0.2, 0.9, 0.1]},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Chat"}],
         "completions": [[{"role": "assistant", "content": "hello friend"}], [{"role": "assistant", "content": "go"}]],
         "rewards": [2, 1]},
        {"prompt": "Bad", "completions": ["a", "b"], "rewards": [1.0, "high"]},
    ]
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    kept, report = load(path)
    assert report.format == "scored"
    assert [(row["chosen"], row["rejected"]) for row in kept] == [("great", "bad"), ("hello friend", "go")]
    assert kept[1]["prompt_messages"][0] == {"role": "system", "content": "Be kind."}
    assert report.skipped_by_reason == {"invalid_score": 1}
    assert "rewards[1]" in report.first_bad_detail
    for responses, scores in (("responses", "ratings"), ("outputs", "scores"), ("candidates", "rewards")):
        assert detect_format([{"prompt": "p", responses: ["a", "b"], scores: [1, 2]}]) == "scored"


@pytest.mark.parametrize(
    "row, unread",
    [
        ({"prompt": "p", "response": "r", "reward": 1.0}, "['response', 'reward']"),
        ({"prompt": "p", "completions": ["a", "b"]}, "['completions']"),  # scores missing
        ({"prompt": "p", "output": "o", "id": 3}, "['output']"),
        ({"messages": [{"role": "user", "content": "q"}], "answer": "a"}, "['answer']"),
    ],
)
def test_unread_columns_are_an_error_not_a_prompt_only_load(tmp_path, row, unread):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError) as error:
        DatasetLoader(str(path)).load()
    message = str(error.value)
    assert f"columns {unread} would not be read" in message
    assert "scored: prompt, responses/completions" in message and "pairs: prompt, chosen, rejected" in message
    kept, report = load(path, format="prompt_only")  # named explicitly: the prompts alone
    assert report.format == "prompt_only" and len(kept) == 1


def test_prompt_only_beside_metadata_columns_is_detected():
    assert detect_format([{"prompt": "p", "id": 1, "source": "web", "category": "chat", "lang": "en"}]) == "prompt_only"
