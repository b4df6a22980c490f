"""DatasLoader: turn a dataset in one of the common public formats into normalised example rows.

A source is a hub dataset name (or a local dataset folder), a `.jsonl` / `.json` / `.parquet` / `.csv` file
(local or any fsspec URL), or `bundled:<name>` for the small datasets shipped in `alignment_core/bundled/`.
Every source goes through one adapter, picked from the columns of its first readable rows (unreadable ones are
read past, up to DETECT_MAX_ROWS) or named by `format`; `columns` first renames a source's own columns onto
the names below (or joins several into one):

    prompt_only     prompt (string or chat turns), or messages whose prompt ends at the last user turn
    pairs           prompt, chosen, rejected strings
    hh_rlhf         Anthropic HH-RLHF: chosen and rejected are whole "\\n\\nHuman: ... \\n\\nAssistant: ..."
                    transcripts; the shared part up to the last "\\n\\nAssistant:" is the prompt
    messages_pairs  UltraFeedback-binarized: chosen and rejected are chat turn lists that share their leading
                    turns (the prompt) and end in the two assistant answers; optional score_chosen/score_rejected
    pointwise       prompt, completion, label (bool or 0/1): KTO-style unpaired feedback
    sft             prompt and completion, or messages ending in the assistant answer
    scored          prompt, responses (list of strings), scores (list of numbers): best vs worst becomes a pair

The output is a `records.EXAMPLES` table. Ids are content hashes, so the same content gets the same id in
every load and on every machine. A row that cannot be read (missing field, wrong type, empty prompt or
answer, identical answers, unparseable transcript, a prompt without a user turn, a role other than system,
user or assistant, ...) is skipped and counted per reason in `report`, or, with `on_bad_row="fail"`, raises a
ValueError naming the row, the format and the problem.
"""

import hashlib
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import fsspec
import pyarrow as pa

from alignment_core.config import DataConfig, check_single_file_options
from alignment_core.records import EXAMPLES, PROMPTS, from_rows

logger = logging.getLogger(__name__)

FORMATS = ("prompt_only", "pairs", "hh_rlhf", "messages_pairs", "pointwise", "sft", "scored")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BUNDLED_PREFIX = "bundled:"
DETECT_ROWS = 16  # format detection looks at the columns of this many readable leading rows
DETECT_MAX_ROWS = 1000  # ... reading past unreadable ones up to this many rows
ROLES = ("system", "user", "assistant")

# The turn markers of an HH-RLHF transcript.
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# --- ids and prompt text ---------------------------------------------------------------------------------


def stable_hash(value: Any) -> str:
    """First 16 hex chars of the sha256 of the canonical JSON of `value` (sorted keys, no spaces)."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def prompt_id(prompt_messages: list[dict]) -> str:
    """The id of a prompt: a hash of its chat turns, so one prompt has one id whatever dataset it came from."""
    return stable_hash(prompt_messages)


def render_prompt(prompt_messages: list[dict]) -> str:
    """The prompt as plain text: a lone user turn is its content; longer chats are "Role: content" blocks."""
    if len(prompt_messages) == 1 and prompt_messages[0]["role"] == "user":
        return prompt_messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt_messages)


# --- row validation ----------------------------------------------------------------------------------------


class BadRow(Exception):
    """A source row that cannot become an example; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _field(row: dict, name: str) -> Any:
    if row.get(name) is None:
        raise BadRow("missing_field", f"missing field {name!r}")
    return row[name]


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow("not_a_string", f"field {name!r} is {type(value).__name__}, expected a string")
    return value


def _response(value: Any, name: str) -> str:
    """An answer: a string with some non-blank text (kept verbatim)."""
    text = _string(value, name)
    if not text.strip():
        raise BadRow("empty_response", f"field {name!r} is empty")
    return text


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow("invalid_score", f"field {name!r} is {value!r}, expected a finite number")
    return float(value)


def _messages(value: Any, name: str) -> list[dict]:
    """A list of {role, content} string turns, keeping only those two keys (ids hash exactly them)."""
    if not isinstance(value, list):
        raise BadRow("invalid_messages", f"field {name!r} is {type(value).__name__}, expected a list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise BadRow("invalid_messages", f"{name}[{i}] is not a {{role, content}} turn of strings: {turn!r}")
        if turn["role"] not in ROLES:
            # A chat template renders other roles its own way or not at all: the policy would see another prompt.
            raise BadRow("invalid_role", f"{name}[{i}] has role {turn['role']!r}, expected one of {ROLES}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _non_empty_prompt(turns: list[dict], name: str) -> list[dict]:
    """A prompt with text, and a user turn to answer (a system turn alone asks nothing)."""
    if not any(turn["content"].strip() for turn in turns):
        raise BadRow("empty_prompt", f"the prompt ({name!r}) is empty")
    if not any(turn["role"] == "user" for turn in turns):
        raise BadRow("no_user_turn", f"the prompt ({name!r}) has no user turn, only {[t['role'] for t in turns]}")
    return turns


def _prompt(value: Any, name: str = "prompt") -> list[dict]:
    """A prompt given as a string (one user turn) or as chat turns."""
    if isinstance(value, str):
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        turns = _messages(value, name)
    else:
        raise BadRow("not_a_string", f"field {name!r} is {type(value).__name__}, expected a string or turns")
    return _non_empty_prompt(turns, name)


def _split_final_answer(turns: list[dict], name: str) -> tuple[list[dict], str]:
    """(the turns before, the final assistant answer) of a chat."""
    if not turns or turns[-1]["role"] != "assistant":
        last = turns[-1]["role"] if turns else "nothing"
        raise BadRow("invalid_messages", f"{name!r} ends with {last!r}, expected an assistant turn")
    return turns[:-1], _response(turns[-1]["content"], f"{name}[-1].content")


def _prompt_and_completion(row: dict) -> tuple[list[dict], str]:
    """prompt + completion, where either may be chat turns (TRL's conversational format)."""
    prompt_messages = _prompt(_field(row, "prompt"))
    completion = _field(row, "completion")
    if isinstance(completion, list):
        leading, answer = _split_final_answer(_messages(completion, "completion"), "completion")
        return prompt_messages + leading, answer
    return prompt_messages, _response(completion, "completion")


def _check_distinct(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise BadRow("identical_responses", "chosen and rejected are identical")


# --- adapters: one source row -> the format-specific example fields ------------------------------------------


def adapt_prompt_only(row: dict, loader: "DatasLoader") -> dict:
    if row.get("prompt") is not None:
        return {"prompt_messages": _prompt(row["prompt"])}
    if row.get("messages") is None:
        raise BadRow("missing_field", "missing field 'prompt' (or 'messages')")
    turns = _messages(row["messages"], "messages")
    user_turns = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
    if not user_turns:
        raise BadRow("empty_prompt", "'messages' has no user turn")
    return {"prompt_messages": _non_empty_prompt(turns[: user_turns[-1] + 1], "messages")}


def adapt_pairs(row: dict, loader: "DatasLoader") -> dict:
    prompt_messages = _prompt(_field(row, "prompt"))
    chosen = _response(_field(row, "chosen"), "chosen")
    rejected = _response(_field(row, "rejected"), "rejected")
    _check_distinct(chosen, rejected)
    return {"prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}


def parse_hh_prompt(prompt_text: str) -> list[dict]:
    """The turns of an HH transcript prefix ending in "\\n\\nAssistant:" (that last, empty turn is dropped)."""
    pieces = HH_TURN.split(prompt_text)  # [text before the first marker, role, content, role, content, ...]
    if pieces[0].strip():
        raise BadRow("unparseable_transcript", f"text before the first turn marker: {pieces[0][:40]!r}")
    roles, contents = pieces[1::2], pieces[2::2]
    if not roles or roles[0] != "Human":
        raise BadRow("unparseable_transcript", "the transcript does not start with a Human turn")
    role_names = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": role_names[r], "content": c.strip()} for r, c in zip(roles[:-1], contents[:-1], strict=True)]
    return turns


def adapt_hh_rlhf(row: dict, loader: "DatasLoader") -> dict:
    chosen_text = _string(_field(row, "chosen"), "chosen")
    rejected_text = _string(_field(row, "rejected"), "rejected")
    _check_distinct(chosen_text, rejected_text)
    shared = len(os.path.commonprefix([chosen_text, rejected_text]))
    # The prompt ends at the last "\n\nAssistant:" lying wholly inside the shared prefix.
    marker = chosen_text.rfind(ASSISTANT, 0, shared)
    if marker < 0:
        raise BadRow("unparseable_transcript", "chosen and rejected share no '\\n\\nAssistant:' turn marker")
    prompt_end = marker + len(ASSISTANT)
    chosen, rejected = chosen_text[prompt_end:].strip(), rejected_text[prompt_end:].strip()
    if HUMAN in chosen or HUMAN in rejected:
        raise BadRow("unparseable_transcript", "chosen and rejected differ before their final Assistant turn")
    prompt_messages = _non_empty_prompt(parse_hh_prompt(chosen_text[:prompt_end]), "chosen")
    chosen, rejected = _response(chosen, "chosen"), _response(rejected, "rejected")
    return {"prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}


def adapt_messages_pairs(row: dict, loader: "DatasLoader") -> dict:
    chosen_leading, chosen = _split_final_answer(_messages(_field(row, "chosen"), "chosen"), "chosen")
    rejected_leading, rejected = _split_final_answer(_messages(_field(row, "rejected"), "rejected"), "rejected")
    if chosen_leading != rejected_leading:
        raise BadRow("mismatched_prompts", "chosen and rejected differ before their final assistant turn")
    _check_distinct(chosen, rejected)
    # UltraFeedback repeats the prompt as the leading turns (its `prompt` string is only a copy); TRL's
    # explicit-prompt form has no leading turns and the prompt only in `prompt`.
    if chosen_leading:
        prompt_messages = _non_empty_prompt(chosen_leading, "chosen")
    elif row.get("prompt") is not None:
        prompt_messages = _prompt(row["prompt"])
    else:
        raise BadRow("empty_prompt", "no 'prompt' and no turns before the answers")
    example = {"prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}
    for source_name, name in (("score_chosen", "chosen_score"), ("score_rejected", "rejected_score")):
        if row.get(source_name) is not None:
            example[name] = _number(row[source_name], source_name)
    return example


def adapt_pointwise(row: dict, loader: "DatasLoader") -> dict:
    prompt_messages, completion = _prompt_and_completion(row)
    label = _field(row, "label")
    if isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1)):
        return {"prompt_messages": prompt_messages, "completion": completion, "label": float(label)}
    raise BadRow("invalid_label", f"field 'label' is {label!r}, expected a bool or 0/1")


def adapt_sft(row: dict, loader: "DatasLoader") -> dict:
    if row.get("completion") is None and row.get("messages") is not None:
        leading, completion = _split_final_answer(_messages(row["messages"], "messages"), "messages")
        return {"prompt_messages": _non_empty_prompt(leading, "messages"), "completion": completion}
    prompt_messages, completion = _prompt_and_completion(row)
    return {"prompt_messages": prompt_messages, "completion": completion}


def _column(row: dict, spellings: tuple[str, ...]) -> str:
    """The first of the spellings the row has a value for (else the first spelling: missing_field names it)."""
    return next((name for name in spellings if row.get(name) is not None), spellings[0])


def _scored_response(value: Any, name: str) -> str:
    """One response of a scored list: a string, or chat turns ending in the assistant's answer."""
    if isinstance(value, list):
        return _split_final_answer(_messages(value, name), name)[1]
    return _string(value, name)


def adapt_scored(row: dict, loader: "DatasLoader") -> dict:
    prompt_messages = _prompt(_field(row, "prompt"))
    responses_name, scores_name = _column(row, SCORED_RESPONSES), _column(row, SCORED_SCORES)
    responses, scores = _field(row, responses_name), _field(row, scores_name)
    if not isinstance(responses, list) or not isinstance(scores, list):
        raise BadRow("not_a_list", f"fields {responses_name!r} and {scores_name!r} must both be lists")
    if len(responses) != len(scores):
        raise BadRow("length_mismatch", f"{len(responses)} {responses_name} but {len(scores)} {scores_name}")
    if len(responses) < 2:
        raise BadRow("length_mismatch", f"{len(responses)} {responses_name}: a pair needs at least 2")
    responses = [_scored_response(r, f"{responses_name}[{i}]") for i, r in enumerate(responses)]
    scores = [_number(s, f"{scores_name}[{i}]") for i, s in enumerate(scores)]
    best = max(range(len(scores)), key=scores.__getitem__)  # the first of equal scores, for determinism
    worst = min(range(len(scores)), key=scores.__getitem__)
    gap = scores[best] - scores[worst]
    if gap <= 0 or gap < loader.min_pair_margin:
        raise BadRow("below_margin", f"best-worst score gap {gap:g} (needs > 0 and >= {loader.min_pair_margin:g})")
    chosen = _response(responses[best], f"{responses_name}[{best}]")
    rejected = _response(responses[worst], f"{responses_name}[{worst}]")
    _check_distinct(chosen, rejected)
    return {
        "prompt_messages": prompt_messages,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_score": scores[best],
        "rejected_score": scores[worst],
    }


# Spellings of a scored list's columns in public datasets: responses and their scores, index for index.
SCORED_RESPONSES = ("responses", "completions", "outputs", "candidates", "generations")
SCORED_SCORES = ("scores", "rewards", "ratings")
# The columns each format reads (for messages that say what a source should look like).
FORMAT_COLUMNS = {
    "prompt_only": "prompt or messages",
    "pairs": "prompt, chosen, rejected",
    "hh_rlhf": "chosen, rejected transcripts",
    "messages_pairs": "chosen, rejected chat turns",
    "pointwise": "prompt, completion, label",
    "sft": "prompt, completion or messages",
    "scored": f"prompt, {'/'.join(SCORED_RESPONSES)}, {'/'.join(SCORED_SCORES)}",
}
# Columns that carry no training signal: beside them, a prompt column alone is a prompt_only source.
PROMPT_ONLY_METADATA = frozenset({
    "id", "idx", "index", "uid", "prompt_id", "example_id", "source", "dataset", "origin", "category",
    "categories", "task", "task_type", "type", "domain", "subset", "split", "tags", "tag", "lang", "language",
    "metadata", "meta", "info", "license", "url", "title", "created_at", "timestamp", "difficulty", "level",
})

ADAPTERS: dict[str, Callable[[dict, "DatasLoader"], dict]] = {
    "prompt_only": adapt_prompt_only,
    "pairs": adapt_pairs,
    "hh_rlhf": adapt_hh_rlhf,
    "messages_pairs": adapt_messages_pairs,
    "pointwise": adapt_pointwise,
    "sft": adapt_sft,
    "scored": adapt_scored,
}


def detect_format(rows: list[dict]) -> str:
    """The adapter that fits the columns (and, where needed, the value types) of the given leading rows.

    prompt_only is detected only when every other column is known metadata (PROMPT_ONLY_METADATA): a column
    such as `response` or `reward` that no adapter reads would otherwise be dropped without a word, and an
    offline run would train on nothing it meant to. Such a source fails, naming the columns; rename them to a
    known spelling, or name `format: prompt_only` to load only the prompts.
    """
    columns = {name for row in rows for name, value in row.items() if value is not None}

    def first(name: str) -> Any:
        return next(row[name] for row in rows if row.get(name) is not None)

    if "prompt" in columns and columns & set(SCORED_RESPONSES) and columns & set(SCORED_SCORES):
        return "scored"
    if {"chosen", "rejected"} <= columns:
        if isinstance(first("chosen"), list):
            return "messages_pairs"
        return "pairs" if "prompt" in columns else "hh_rlhf"
    if {"completion", "label"} <= columns:
        return "pointwise"
    if {"prompt", "completion"} <= columns:
        return "sft"
    fmt = None
    if "messages" in columns:
        last_turn = (first("messages") or [None])[-1]
        fmt = "sft" if isinstance(last_turn, dict) and last_turn.get("role") == "assistant" else "prompt_only"
    elif "prompt" in columns:
        fmt = "prompt_only"
    known = "; ".join(f"{name}: {spelled}" for name, spelled in FORMAT_COLUMNS.items())
    if fmt is None:
        raise ValueError(f"cannot detect the data format from columns {sorted(columns)}; the known formats read "
                         f"({known}); name one with format=, or map your columns onto those names with columns= "
                         "(e.g. Alpaca's: {prompt: [instruction, input], completion: output})")
    unread = sorted(columns - {"prompt", "messages"} - PROMPT_ONLY_METADATA)
    if fmt == "prompt_only" and unread:
        raise ValueError(
            f"cannot detect the data format from columns {sorted(columns)}: as prompt_only, columns {unread} "
            f"would not be read. The known formats read ({known}). Rename the columns to a known spelling, name "
            "the format with format=, or format=prompt_only to load the prompts alone"
        )
    return fmt


# --- reading sources ---------------------------------------------------------------------------------------


def bundled_names() -> list[str]:
    """Names of the datasets shipped in alignment_core/bundled/ (usable as "bundled:<name>")."""
    folder = resources.files("alignment_core.bundled")
    return sorted(entry.name.removesuffix(".jsonl") for entry in folder.iterdir() if entry.name.endswith(".jsonl"))


def bundled_path(name: str) -> str:
    """The local path of a bundled dataset file."""
    if name not in bundled_names():
        raise ValueError(f"unknown bundled dataset {name!r}; available: {bundled_names()}")
    return str(resources.files("alignment_core.bundled") / f"{name}.jsonl")


def _unencodable_field(value: Any, name: str = "") -> str | None:
    """The first string inside `value` that is not valid UTF-8 text, by its path (None when all are).

    Such strings hold undecodable bytes (read with surrogateescape) or an unpaired surrogate escape such as
    "\\ud800" (valid JSON, but no UTF-8 encoding exists): Arrow, ids and Parquet all need UTF-8.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return name or "the row"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable_field(key, name) or _unencodable_field(item, f"{name}.{key}" if name else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable_field(item, f"{name}[{index}]")
            if found:
                return found
    return None


def _checked_row(row: Any, where: str) -> dict | BadRow:
    """A parsed JSON row, or the BadRow saying why it cannot be one (`where`: "line 7", "item 3")."""
    if not isinstance(row, dict):
        return BadRow("invalid_json", f"{where} is not an object")
    field_path = _unencodable_field(row)
    if field_path is not None:
        return BadRow("invalid_encoding", f"{where}: {field_path!r} is not valid UTF-8 text (undecodable bytes "
                                          "or an unpaired surrogate escape)")
    return row


def _read_jsonl(path: str) -> Iterator[dict | BadRow]:
    """One item per non-blank line; a line that is not a UTF-8 JSON object is a BadRow (counted, not fatal)."""
    with fsspec.open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield BadRow("invalid_encoding", f"line {line_number}: not valid UTF-8 (byte "
                                                 f"{raw[error.start]:#04x} at column {error.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield BadRow("invalid_json", f"line {line_number}: {error.msg}")
                continue
            yield _checked_row(row, f"line {line_number}")


def _array_items_with_lines(text: str) -> list[tuple[Any, int]]:
    """(item, line of its first character) for each item of the top-level JSON array `text`."""
    decoder, items = json.JSONDecoder(), []
    whitespace = re.compile(r"\s*")
    position = whitespace.match(text, text.index("[") + 1).end()
    line, counted_to = 1, 0
    while text[position : position + 1] != "]":
        if items:
            if text[position : position + 1] != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
            position = whitespace.match(text, position + 1).end()
        item, end = decoder.raw_decode(text, position)
        line += text.count("\n", counted_to, position)
        counted_to = position
        items.append((item, line))
        position = whitespace.match(text, end).end()
    if text[position + 1 :].strip():
        raise json.JSONDecodeError("Extra data", text, position + 1)
    return items


def _read_json(path: str) -> Iterator[dict | BadRow]:
    """A JSON array of objects, or {"<key>": [objects]}; a file of JSON lines named .json also works.

    Undecodable bytes do not stop the load: the text is decoded with surrogateescape, and each row holding
    such bytes is a BadRow (with its line, for a top-level array).
    """
    with fsspec.open(path, "rb") as handle:
        text = handle.read().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    try:
        if text.lstrip().startswith("["):
            items = [(row, f"item {index} (line {line})")
                     for index, (row, line) in enumerate(_array_items_with_lines(text))]
        else:
            document = json.loads(text)
            if not isinstance(document, dict):
                raise ValueError(f"{path}: expected a JSON array of rows, got {type(document).__name__}")
            lists = [value for value in document.values() if isinstance(value, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a JSON array of rows, or an object holding one array of rows")
            items = [(row, f"item {index}") for index, row in enumerate(lists[0])]
    except json.JSONDecodeError:
        yield from _read_jsonl(path)
        return
    for row, where in items:
        yield _checked_row(row, where)


def _read_parquet(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _csv_record_lines(raw: bytes) -> list[int]:
    """The line on which each non-empty CSV record (the header first) starts; quoted fields may span lines."""
    import csv
    import io

    # latin-1 maps bytes to characters one to one, so quotes and newlines stay where they are in any encoding.
    reader = csv.reader(io.StringIO(raw.decode("latin-1"), newline=""))
    starts, line = [], 1
    for record in reader:
        if record:
            starts.append(line)
        line = reader.line_num + 1
    return starts


def _read_csv(path: str) -> Iterator[dict | BadRow]:
    """CSV holds flat columns only (prompt, chosen, rejected, completion, label); types are inferred.

    pyarrow reads a column holding bytes that are not UTF-8 as binary: each value of such a column is decoded
    here, and a row with undecodable bytes is a BadRow naming its line (the rest of the column loads as text).
    """
    import pyarrow.csv as pcsv

    with fsspec.open(path, "rb") as handle:
        raw = handle.read()
    table = pcsv.read_csv(pa.BufferReader(raw))
    binary = [field.name for field in table.schema if pa.types.is_binary(field.type) or
              pa.types.is_large_binary(field.type)]
    record_lines = _csv_record_lines(raw) if binary else []
    for index, row in enumerate(table.to_pylist()):
        bad = None
        for name in binary:
            if row[name] is None:
                continue
            try:
                row[name] = row[name].decode("utf-8")
            except UnicodeDecodeError:
                bad = bad or name
        if bad is None:
            yield row
            continue
        line = record_lines[index + 1] if index + 1 < len(record_lines) else None
        where = f"line {line}" if line is not None else f"record {index + 1}"
        yield BadRow("invalid_encoding", f"{where}: column {bad!r} is not valid UTF-8 text")


def map_columns(row: dict, columns: dict[str, str | list[str]]) -> dict | BadRow:
    """A source row under the names a format reads (`data.columns`): each target takes its source column's
    value, or the text of its source columns joined with a blank line (None and blank ones left out; none
    left: None). The source columns a target took are dropped; the others keep their names."""
    if not columns:
        return row
    taken = {name for sources in columns.values() for name in ([sources] if isinstance(sources, str) else sources)}
    mapped = {name: value for name, value in row.items() if name not in taken}
    for target, sources in columns.items():
        if isinstance(sources, str):
            mapped[target] = row.get(sources)
            continue
        texts = [row.get(name) for name in sources]
        wrong = next((name for name, text in zip(sources, texts, strict=True)
                      if text is not None and not isinstance(text, str)), None)
        if wrong is not None:
            return BadRow("not_a_string", f"column {wrong!r} (joined into {target!r}) is "
                                          f"{type(row[wrong]).__name__}, expected a string")
        mapped[target] = "\n\n".join(text for text in texts if text and text.strip()) or None
    return mapped


FILE_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


def _read_hub(source: str, subset: str | None, split: str, revision: str | None, max_rows: int | None):
    """A hub dataset (or local dataset folder) through `datasets.load_dataset`; no remote code is run."""
    import datasets

    from alignment_core.progress import apply_to_libraries

    apply_to_libraries()  # its download and split bars: on a terminal only
    dataset = datasets.load_dataset(source, subset, split=split, revision=revision)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return iter(dataset)


def _file_suffix(source: str) -> str | None:
    lowered = source.lower()
    return next((suffix for suffix in FILE_SUFFIXES if lowered.endswith(suffix)), None)


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.exists(source)


def check_source(source: str) -> tuple[str, str | None]:
    """(path, file suffix) of a data source that exists; suffix None for a hub dataset or dataset folder.

    Raises at once for a missing file or folder, an unknown bundled name or an unsupported file type; a hub
    dataset is only known to exist once `datasets` loads it.
    """
    if source.startswith(BUNDLED_PREFIX):
        return bundled_path(source.removeprefix(BUNDLED_PREFIX)), ".jsonl"
    suffix = _file_suffix(source)
    local = os.path.expanduser(source)
    if suffix is None:
        if os.path.isfile(local):
            raise ValueError(f"data source {source!r}: unsupported file type; expected one of {FILE_SUFFIXES}")
        if _looks_local(source) and not os.path.isdir(local):
            raise FileNotFoundError(f"data source {source!r}: no such dataset folder or file")
        return source, None
    filesystem, fs_path = fsspec.core.url_to_fs(local)
    if not filesystem.exists(fs_path):
        raise FileNotFoundError(f"data source {source!r}: no such file")
    return source, suffix


def check_data(config: DataConfig, source: str) -> str | None:
    """The format of a data file (or bundled source), found on its first rows as its load will: raises at once
    what that load would raise at its start (no such file, no format fits, `columns` naming columns the file
    lacks). None for a hub dataset or a dataset folder: those are read by the prompts stage, which runs first."""
    if check_source(source)[1] is None:
        return None
    return DatasLoader.from_config(config.model_copy(update={"source": source})).detect()[0]


# --- the loader --------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a load did: every source row read is either kept or skipped under exactly one reason."""

    source: str
    format: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    first_bad_row: int | None = None  # source index of the first skipped row
    first_bad_row_by_reason: dict[str, int] = field(default_factory=dict)
    first_bad_detail: str | None = None

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def skip(self, index: int, bad: BadRow) -> None:
        self.skipped_by_reason[bad.reason] = self.skipped_by_reason.get(bad.reason, 0) + 1
        self.first_bad_row_by_reason.setdefault(bad.reason, index)
        if self.first_bad_row is None:
            self.first_bad_row, self.first_bad_detail = index, bad.detail

    def to_dict(self) -> dict:
        """A JSON-able summary, e.g. for a stage manifest."""
        return {
            "source": self.source,
            "format": self.format,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": self.rows_skipped,
            "skipped_by_reason": dict(self.skipped_by_reason),
            "first_bad_row": self.first_bad_row,
            "first_bad_row_by_reason": dict(self.first_bad_row_by_reason),
            "first_bad_detail": self.first_bad_detail,
        }

    def summary(self) -> str:
        text = f"{self.source} ({self.format}): read {self.rows_read}, kept {self.rows_kept}"
        if self.rows_skipped:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped_by_reason.items()))
            first = f"first: row {self.first_bad_row}: {self.first_bad_detail}"
            text += f", skipped {self.rows_skipped} ({reasons}; {first})"
        return text


class DatasLoader:
    """Loads one dataset split into `records.EXAMPLES` rows (`load`) or unique prompts (`load_prompts`).

    `max_rows` reads only the first rows of the source; skipped rows count against it. `min_pair_margin` is the
    smallest best-worst score gap that makes a pair in the `scored` format. After `load`, `report` says how
    many rows were read, kept and skipped (per reason); with `on_bad_row="fail"` the first bad row raises.
    Rows repeating an earlier row's content (same example_id) are skipped as "duplicate": ids stay unique.
    """

    def __init__(
        self,
        source: str,
        format: str = "auto",
        split: str = "train",
        subset: str | None = None,
        revision: str | None = None,
        max_rows: int | None = None,
        on_bad_row: str = "skip",
        min_pair_margin: float = 0.0,
        columns: dict[str, str | list[str]] | None = None,
    ):
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"unknown data format {format!r}; expected 'auto' or one of {FORMATS}")
        if on_bad_row not in ("skip", "fail"):
            raise ValueError(f"on_bad_row must be 'skip' or 'fail', got {on_bad_row!r}")
        if max_rows is not None and max_rows <= 0:
            raise ValueError(f"max_rows must be > 0, got {max_rows}")
        if min_pair_margin < 0:
            raise ValueError(f"min_pair_margin must be >= 0, got {min_pair_margin}")
        self.source = source
        self.format = format
        self.split = split
        self.subset = subset
        self.revision = revision
        self.max_rows = max_rows
        self.on_bad_row = on_bad_row
        self.min_pair_margin = min_pair_margin
        self.columns = columns or {}
        self.report: LoadReport | None = None
        self._examples: pa.Table | None = None

    @classmethod
    def from_config(cls, config: DataConfig) -> "DatasLoader":
        return cls(
            source=config.source,
            format=config.format,
            split=config.split,
            subset=config.subset,
            revision=config.revision,
            max_rows=config.max_rows,
            on_bad_row=config.on_bad_row,
            min_pair_margin=config.min_pair_margin,
            columns=config.columns,
        )

    def _source_rows(self) -> Iterator[dict | BadRow]:
        """The raw rows of the source, at most `max_rows` of them."""
        path, suffix = check_source(self.source)
        if suffix is None:
            return _read_hub(os.path.expanduser(path), self.subset, self.split, self.revision, self.max_rows)
        check_single_file_options(self.source, self.split, self.subset, self.revision)
        return itertools.islice(FILE_READERS[suffix](path), self.max_rows)

    def detect(self) -> tuple[str, list[dict | BadRow], Iterator[dict | BadRow]]:
        """(the format, the rows read to find it, the rows after them), every row under `columns`' names.

        The format is that of the first DETECT_ROWS readable rows (objects with a value), or `format` when
        named; unreadable leading rows are read past, up to DETECT_MAX_ROWS rows, and counted in the log.
        """
        rows = self._source_rows()
        head, readable = [], []
        for row in rows:
            head.append(row)
            if isinstance(row, dict) and any(value is not None for value in row.values()):
                readable.append(row)
            if len(readable) == DETECT_ROWS or len(head) == DETECT_MAX_ROWS:
                break
        if not head:
            raise ValueError(f"data source {self.source!r} has no rows")
        unreadable = len(head) - len(readable)
        if not readable:
            first_bad = next((row for row in head if isinstance(row, BadRow)), None)
            raise ValueError(f"data source {self.source!r}: none of its first {len(head)} rows is an object with "
                             "values" + (f" (the first problem: {first_bad})" if first_bad else ""))
        if unreadable:
            logger.warning("%s: format detection read past %d unreadable rows among the first %d", self.source,
                           unreadable, len(head))
        self._check_columns_present(readable)
        head = [self._mapped(row) for row in head]
        fmt = self.format
        if fmt == "auto":
            fmt = detect_format([row for row in head if isinstance(row, dict)])
        return fmt, head, (self._mapped(row) for row in rows)

    def _mapped(self, row: dict | BadRow) -> dict | BadRow:
        return row if isinstance(row, BadRow) else map_columns(row, self.columns)

    def _check_columns_present(self, rows: list[dict]) -> None:
        """The columns `columns` names are in the source (a typo would leave its target empty in every row): each
        one named alone, and at least one of a list (Alpaca's `input` may be left out of rows without one)."""
        present = {name for row in rows for name in row}
        missing = [sources for sources in self.columns.values()
                   if not present & ({sources} if isinstance(sources, str) else set(sources))]
        if missing:
            raise ValueError(f"data source {self.source!r}: data.columns names {missing}, not among its columns "
                             f"{sorted(present)}")

    def load(self) -> pa.Table:
        """The examples table (computed once per loader; `report` describes the load)."""
        if self._examples is None:
            self._examples = self._load()
        return self._examples

    def _load(self) -> pa.Table:
        fmt, head, rows = self.detect()
        adapter = ADAPTERS[fmt]
        report = LoadReport(source=self.source, format=fmt)
        examples: list[dict] = []
        first_index_of_example: dict[str, int] = {}
        for index, row in enumerate(itertools.chain(head, rows)):
            report.rows_read += 1
            try:
                if isinstance(row, BadRow):
                    raise row
                example = self._example(adapter(row, self), index)
                earlier = first_index_of_example.setdefault(example["example_id"], index)
                if earlier != index:
                    raise BadRow("duplicate", f"same content as row {earlier}")
            except BadRow as bad:
                if self.on_bad_row == "fail":
                    raise ValueError(f"{self.source}: row {index} ({fmt} format): {bad.detail}") from None
                if bad.reason not in report.skipped_by_reason:
                    logger.warning("%s: skipping row %d (%s format): %s; further %r rows are counted in the load "
                                   "report, not logged one by one", self.source, index, fmt, bad.detail, bad.reason)
                report.skip(index, bad)
                continue
            examples.append(example)
        report.rows_kept = len(examples)
        self.report = report
        logger.log(logging.INFO if examples else logging.WARNING, "loaded %s", report.summary())
        return from_rows(examples, EXAMPLES, name=f"examples from {self.source}")

    @staticmethod
    def _example(fields: dict, index: int) -> dict:
        """Complete an adapter's fields with the plain-text prompt, the ids and the source row."""
        example = {field.name: None for field in EXAMPLES}
        example.update(fields)
        example["prompt"] = render_prompt(example["prompt_messages"])
        example["prompt_id"] = prompt_id(example["prompt_messages"])
        example["example_id"] = stable_hash(
            [example["prompt_id"], example["chosen"], example["rejected"], example["completion"], example["label"]]
        )
        example["source_row"] = index
        return example

    def load_prompts(self) -> pa.Table:
        """The unique prompts of the dataset (by prompt_id), in order of first occurrence."""
        examples = self.load()
        unique = {}
        for row in examples.select(["prompt_id", "prompt", "prompt_messages"]).to_pylist():
            unique.setdefault(row["prompt_id"], row)
        return from_rows(list(unique.values()), PROMPTS, name=f"prompts from {self.source}")
