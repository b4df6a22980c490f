"""`DatasetLoader`: a source's rows through its format's adapter into `records.EXAMPLES` (or `PROMPTS`), with a
`LoadReport` of what was kept and skipped, by reason."""

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from alignment_core.config import (
    DATA_FORMATS,
    DataConfig,
    check_single_file_options,
)
from alignment_core.data.formats import (
    ADAPTERS,
    DETECT_MAX_ROWS,
    DETECT_ROWS,
    BadRow,
    detect_format,
    prompt_id,
    render_prompt,
    stable_hash,
)
from alignment_core.data.readers import FILE_READERS, check_source, map_columns, read_hub
from alignment_core.records import EXAMPLES, PROMPTS, from_rows

__all__ = [  # what the package re-exports
    "DatasLoader",
    "DatasetLoader",
    "LoadReport",
    "check_data",
]

logger = logging.getLogger(__name__)

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


class DatasetLoader:
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
        if format != "auto" and format not in DATA_FORMATS:
            raise ValueError(f"unknown data format {format!r}; expected 'auto' or one of {DATA_FORMATS}")
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
    def from_config(cls, config: DataConfig) -> "DatasetLoader":
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
            return read_hub(os.path.expanduser(path), self.subset, self.split, self.revision, self.max_rows)
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


def check_data(config: DataConfig, source: str) -> str | None:
    """The format of a data file (or bundled source), found on its first rows as its load will: raises at once
    what that load would raise at its start (no such file, no format fits, `columns` naming columns the file
    lacks). None for a hub dataset or a dataset folder: those are read by the prompts stage, which runs first."""
    if check_source(source)[1] is None:
        return None
    return DatasetLoader.from_config(config.model_copy(update={"source": source})).detect()[0]


# The original design's spelling, kept importable for code written against it.
DatasLoader = DatasetLoader
