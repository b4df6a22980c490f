"""Reading a source's rows: bundled datasets, local or fsspec files (JSON lines, JSON, Parquet, CSV, each unreadable
row a `BadRow` with its line), hub datasets, and a source's own column names mapped onto a format's."""

import json
import os
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

import fsspec
import pyarrow as pa

from alignment_core.config import (
    BUNDLED_PREFIX,
    DATA_FILE_SUFFIXES,
)
from alignment_core.data.formats import BadRow
from alignment_core.progress import apply_to_libraries

__all__ = [  # what the package re-exports
    "FILE_READERS",
    "bundled_names",
    "bundled_path",
    "check_source",
    "file_suffix",
    "map_columns",
    "read_hub",
]

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


def read_hub(source: str, subset: str | None, split: str, revision: str | None, max_rows: int | None):
    """A hub dataset (or local dataset folder) through `datasets.load_dataset`; no remote code is run."""
    import datasets


    apply_to_libraries()  # its download and split bars: on a terminal only
    dataset = datasets.load_dataset(source, subset, split=split, revision=revision)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return iter(dataset)


def file_suffix(source: str) -> str | None:
    lowered = source.lower()
    return next((suffix for suffix in DATA_FILE_SUFFIXES if lowered.endswith(suffix)), None)


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.exists(source)


def check_source(source: str) -> tuple[str, str | None]:
    """(path, file suffix) of a data source that exists; suffix None for a hub dataset or dataset folder.

    Raises at once for a missing file or folder, an unknown bundled name or an unsupported file type; a hub
    dataset is only known to exist once `datasets` loads it.
    """
    if source.startswith(BUNDLED_PREFIX):
        return bundled_path(source.removeprefix(BUNDLED_PREFIX)), ".jsonl"
    suffix = file_suffix(source)
    local = os.path.expanduser(source)
    if suffix is None:
        if os.path.isfile(local):
            raise ValueError(f"data source {source!r}: unsupported file type; expected one of {DATA_FILE_SUFFIXES}")
        if _looks_local(source) and not os.path.isdir(local):
            raise FileNotFoundError(f"data source {source!r}: no such dataset folder or file")
        return source, None
    filesystem, fs_path = fsspec.core.url_to_fs(local)
    if not filesystem.exists(fs_path):
        raise FileNotFoundError(f"data source {source!r}: no such file")
    return source, suffix
