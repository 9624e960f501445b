"""Rows (CSV / JSONL / JSON) read into ``Row``s and split into train and test; nothing is tokenised here.

Pipeline: ``load_rows`` (read, check columns, convert token/tag rows, skip empty rows) -> ``split_rows``
(seeded shuffle, train from the head, test from the tail); ``finetune.data.examples`` then turns rows
into token ids and labels. ``DataStats`` counts what both stages skip or cut.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import DataConfig
from finetune.errors import UserError


@dataclass(frozen=True)
class Row:
    """One record of the data file as the loader understood it.

    Either an input/output pair (token/tag rows become one too: tokens joined by spaces, the entity
    lines as output), or a preformatted ``text`` (guanaco style: ``is_text``, input and output empty).
    """

    input: str = ""
    output: str = ""
    text: str | None = None
    source: str = "?"                # where it came from ("line 12", "item 3"), for messages

    @property
    def is_text(self) -> bool:
        return self.text is not None


@dataclass
class DataStats:
    """Counts reported at the start of a run: nothing is dropped or cut without being counted here."""

    rows: int = 0                    # rows read from the file (blank lines / blank CSV records excluded)
    empty_skipped: int = 0           # rows with no input (or no text / no tokens): skipped
    empty_outputs: int = 0           # rows kept with an empty output (e.g. no entities): the target is EOS
    train_rows: int = 0
    test_rows: int = 0
    truncated: int = 0               # rows whose input was cut (from its end) to fit max_length
    too_long_skipped: int = 0        # rows that do not fit even with the input cut away: skipped
    marker_missing_skipped: int = 0  # text rows without the configured response_marker: skipped
    unmasked_text_rows: int = 0      # text rows with no response marker found: trained on whole text
    train_examples: int = 0
    test_examples: int = 0
    train_tokens: int = 0            # non-padding tokens in the train split
    train_target_tokens: int = 0     # tokens that carry loss in the train split
    max_tokens: int = 0

    def summary(self) -> str:
        return (f"data: {self.rows} rows, {self.empty_skipped} empty skipped, {self.empty_outputs} empty "
                f"outputs; split {self.train_rows} train / {self.test_rows} test; {self.truncated} inputs "
                f"truncated, {self.too_long_skipped} too long skipped, {self.marker_missing_skipped} "
                f"without response marker skipped; {self.train_examples} train / {self.test_examples} "
                f"test examples, {self.train_target_tokens}/{self.train_tokens} train tokens with loss, "
                f"longest {self.max_tokens}")


# ---------------------------------------------------------------------------------------------------
# reading


def load_rows(cfg: DataConfig) -> list[Row]:
    """Read ``cfg.path`` into rows (pairs or preformatted texts); empty rows are skipped.

    Every row carries its ``source`` (e.g. ``"line 12"``) for messages. Raise ``UserError`` on a
    missing/empty file, bad encoding, malformed records, or missing columns.
    """
    rows, stats = read_rows(cfg)
    if stats.empty_skipped:
        warnings.warn(f"{cfg.path}: skipped {stats.empty_skipped} empty rows (no input text)", stacklevel=2)
    return rows


def read_rows(cfg: DataConfig) -> tuple[list[Row], DataStats]:
    """``load_rows`` without the warning, plus the counts (rows read, empty skipped, empty outputs)."""
    path = Path(cfg.path)
    fmt = cfg.format if cfg.format != "auto" else _format_from_suffix(path)
    text = _read_utf8(path)
    records = {"csv": _csv_records, "jsonl": _jsonl_records, "json": _json_records}[fmt](text, path)
    stats = DataStats()
    rows: list[Row] = []
    mode = None
    for where, record in records:
        if mode is None:
            mode = _detect_mode(cfg, record, path)
        stats.rows += 1
        try:
            row = _convert(cfg, mode, record, path=path, where=where)
        except ValueError as e:
            raise UserError(f"{path}: {where}: {e}") from None
        if row is None:
            stats.empty_skipped += 1
            continue
        if not row.is_text and not row.output.strip():
            stats.empty_outputs += 1
        rows.append(row)
    if stats.rows == 0:
        raise UserError(f"data file {path} has no data rows (only a header or blank lines); fill it or "
                        "change data.path")
    if not rows:
        raise UserError(f"data file {path}: all {stats.rows} rows are empty (no input text)")
    return rows, stats


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    formats = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
    if suffix not in formats:
        raise UserError(f"cannot tell the format of {path} from its extension '{suffix}'; set data.format to "
                        "csv, jsonl or json")
    return formats[suffix]


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"data file not found: {path} (set data.path; relative paths are from the current "
                        "directory)")
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"data file {path} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: line {line}: bytes {data[e.start:e.end]!r} are not valid UTF-8; re-save "
                        "the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # spreadsheet tools write a UTF-8 byte-order mark


def _csv_records(text: str, path: Path):
    # Windows line ends also appear inside quoted multi-line cells; a model should see "\n" there too
    reader = csv.DictReader(io.StringIO(text.replace("\r\n", "\n"), newline=""))
    # csv's default cell limit (131,072 characters) would reject a long email; the file is in memory
    # already, so a cell can be as long as the file (restored afterwards: the limit is process-wide)
    previous_limit = csv.field_size_limit(max(csv.field_size_limit(), min(len(text) + 1, 2**31 - 1)))
    try:
        header = reader.fieldnames
        if not header:
            raise UserError(f"data file {path} has no CSV header")
        start = reader.line_num + 1
        for record in reader:
            if None in record or any(v is None for v in record.values()):
                n = len(header) + len(record.get(None) or []) - sum(
                    v is None for k, v in record.items() if k is not None)
                raise UserError(f"{path}: line {start}: {n} fields but the header has {len(header)} "
                                f"({', '.join(header)}); quote fields that contain commas")
            yield f"line {start}", record
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    finally:
        csv.field_size_limit(previous_limit)


def _jsonl_records(text: str, path: Path):
    # split on "\n" only: str.splitlines would also split on U+2028 etc., legal inside JSON strings
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        record = _parse_json(line, path, number)
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number}: expected a JSON object per line, got "
                            f"{type(record).__name__}")
        yield f"line {number}", record


def _json_records(text: str, path: Path):
    data = _parse_json(text, path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(data).__name__} (for one "
                        "object per line use .jsonl)")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise UserError(f"{path}: item {index}: expected a JSON object, got {type(record).__name__}")
        yield f"item {index}", record


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """``json.loads``, or one line naming the file, the line and the column (``line``: ``text`` is
    that line of the file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {line or e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
                        ) from None


def _detect_mode(cfg: DataConfig, record: dict[str, Any], path: Path) -> str:
    found = ", ".join(map(str, record)) or "none"
    if cfg.text_column is not None:
        if cfg.text_column not in record:
            raise UserError(f"{path}: no column '{cfg.text_column}' (data.text_column); "
                            f"columns found: {found}")
        return "text"
    if cfg.input_column in record or cfg.output_column in record:
        missing = [c for c in (cfg.input_column, cfg.output_column) if c not in record]
        if missing:
            raise UserError(f"{path}: no column '{missing[0]}'; columns found: {found}; set "
                            "data.input_column / data.output_column")
        return "pair"
    if cfg.tokens_column in record and cfg.tags_column in record:
        return "tags"
    raise UserError(f"{path}: no columns '{cfg.input_column}'/'{cfg.output_column}' "
                    f"(columns found: {found}); set data.input_column and data.output_column, "
                    "data.text_column for preformatted text, or data.tokens_column/data.tags_column "
                    "for token/tag rows")


def _convert(cfg: DataConfig, mode: str, record: dict[str, Any], *, path: Path, where: str) -> Row | None:
    found = ", ".join(map(str, record))
    needed = {"text": [cfg.text_column], "pair": [cfg.input_column, cfg.output_column],
              "tags": [cfg.tokens_column, cfg.tags_column]}[mode]
    for column in needed:
        if column not in record:
            raise UserError(f"{path}: {where}: no column '{column}'; columns found: {found}")
    if mode == "text":
        text = _as_text(record[cfg.text_column], cfg.text_column)
        return Row(text=text, source=where) if text.strip() else None
    if mode == "pair":
        source = _as_text(record[cfg.input_column], cfg.input_column)
        target = _as_text(record[cfg.output_column], cfg.output_column)
        return Row(source, target, source=where) if source.strip() else None
    tokens = _as_list(record[cfg.tokens_column], cfg.tokens_column)
    tags = _as_list(record[cfg.tags_column], cfg.tags_column)
    if not tokens:
        return None
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    return Row(" ".join(map(str, tokens)), tags_to_entities(tokens, tags, cfg.tag_labels), source=where)


def _as_text(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):  # JSON NaN/Infinity: never train "nan"
        raise ValueError(f"column '{column}' holds {value} (a JSON NaN/Infinity, usually a missing value "
                         f"from a dataframe export); write text there, or an empty string to skip the row")
    if isinstance(value, (int, float)):
        return str(value)
    raise ValueError(f"column '{column}' must hold text, got {type(value).__name__}")


def _as_list(value: Any, column: str) -> list:
    if isinstance(value, str):  # a CSV cell holding a JSON or Python list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError(f"column '{column}' must hold a list, got {value[:40]!r}") from None
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"column '{column}' must hold a list, got {type(value).__name__}")
    return list(value)


def tags_to_entities(tokens: Sequence[str], tags: Sequence[int | str],
                     labels: Sequence[str] | None = None) -> str:
    """Token/tag rows -> the entity output format: one ``span: TYPE`` per line (docs/DESIGN.md).

    Tags are label strings (``B-PER``, ``I-PER``, ``O``; ``S-``/``E-`` of BIOES and bare ``PER`` are
    accepted) or integers indexing ``labels`` (MultiNERD's ``ner_tags``). ``B-`` (or a type change)
    opens a span, ``I-`` of the same type extends it; span tokens are joined with single spaces, like
    the input text built from the same tokens. Raise ValueError on an unknown tag index.
    """
    names = []
    for tag in tags:
        if isinstance(tag, bool) or not isinstance(tag, (int, str)):
            raise ValueError(f"tags must be integers or label strings, got {tag!r}")
        if isinstance(tag, int):
            if labels is None:
                raise ValueError("tags are integers but data.tag_labels is not set; give the label list, "
                                 "e.g. tag_labels: [O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC]")
            if not 0 <= tag < len(labels):
                raise ValueError(f"tag {tag} is outside data.tag_labels (which has {len(labels)} labels)")
            tag = labels[tag]
        names.append(tag.strip())
    entities: list[str] = []
    span: list[str] = []
    span_type = None
    for token, tag in zip(tokens, names):
        if tag in ("O", ""):
            prefix, kind = "O", None
        elif len(tag) > 2 and tag[1] == "-" and tag[0] in "BIES":
            prefix, kind = tag[0], tag[2:]
        else:
            prefix, kind = "I", tag
        if span and (prefix in ("O", "B", "S") or kind != span_type):
            entities.append(f"{' '.join(span)}: {span_type}")
            span = []
        if kind is not None:
            span.append(str(token))
            span_type = kind
            if prefix in ("E", "S"):
                entities.append(f"{' '.join(span)}: {span_type}")
                span = []
    if span:
        entities.append(f"{' '.join(span)}: {span_type}")
    return "\n".join(entities)


# ---------------------------------------------------------------------------------------------------
# splitting


def split_rows(rows: list[Row], cfg: DataConfig) -> tuple[list[Row], list[Row]]:
    """Seeded shuffle, then the first ``train_size`` rows train and the last ``test_size`` rows test.

    The seeds' layout (``shuffle(df, random_state=42)``, ``head(4000)``, ``tail(1500)``; our shuffle is
    Python's ``random.Random(seed)``, so the row order differs from pandas'). Taking the test rows from
    the end means changing ``train_size`` never changes the test set, and the two never overlap."""
    n = len(rows)
    n_test = cfg.test_size or 0
    if n_test > n:
        raise UserError(f"data.test_size={n_test} is larger than the data: {cfg.path} has {n} usable rows; "
                        "lower data.test_size")
    n_train = n - n_test if cfg.train_size is None else cfg.train_size
    if n_train < 1:
        raise UserError(f"no rows left for training: {cfg.path} has {n} usable rows and data.test_size is "
                        f"{n_test}; lower data.test_size")
    if n_train + n_test > n:
        raise UserError(f"data.train_size + data.test_size = {n_train} + {n_test} is larger than the data: "
                        f"{cfg.path} has {n} usable rows; lower them (train_size: null takes the rest)")
    order = list(range(n))
    random.Random(cfg.shuffle_seed).shuffle(order)
    train = [rows[i] for i in order[:n_train]]
    test = [rows[i] for i in order[n - n_test:]]
    return train, test
