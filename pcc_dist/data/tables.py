"""Generic tables: csv, tsv and jsonl files parsed into rows keyed by column name.

Parsing only; the readers validate values. Physical line numbers are kept for every row (a quoted
CSV field may span lines; a row is reported at its first line).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pcc_dist.data._core import DataError, missing_column, read_lines


@dataclass
class Table:
    """Rows of a csv/tsv/jsonl file as dicts keyed by column name.

    ``columns`` is the header (None for jsonl, whose keys may differ per row); ``rows`` holds
    ``(line, record)`` or ``(line, DataError)`` for rows that are already known to be bad.
    """

    path: str
    columns: list[str] | None
    header_line: int | None
    rows: list[tuple[int, dict | DataError]]


def _file_format(path: Path, lines: list[str]) -> str:
    """``"csv"``, ``"tsv"`` or ``"jsonl"`` from the suffix (and, for .csv, the header)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".tsv":
        return "tsv"
    if suffix == ".csv":
        # STS-B ships tab-separated files named .csv; a header with tabs and no commas is TSV.
        first = next(line for line in lines if line.strip())
        return "tsv" if "\t" in first and "," not in first else "csv"
    raise DataError(f"unsupported file type {suffix or '(no suffix)'!r}; use .csv, .tsv or "
                    f".jsonl (one JSON object per line)", path=path)


def load_table(path: Path) -> Table:
    """Parse a local csv/tsv/jsonl file into a :class:`Table` (no validation of values)."""
    lines, bad_lines = read_lines(path)
    fmt = _file_format(path, lines)
    if fmt == "jsonl":
        return Table(str(path), None, None, _jsonl_rows(str(path), lines, bad_lines))
    spans = _csv_spans(path, lines) if fmt == "csv" else _tsv_spans(lines)
    (header_line, _, header), body = spans[0], spans[1:]
    columns = [name.strip() for name in header]
    # A repeated column name would let one cell silently overwrite the other in the row dict.
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise DataError(f"header names column {repeated[0]!r} more than once (columns: "
                        f"{columns}); rename or drop the duplicate", path, header_line,
                        repeated[0])
    rows: list[tuple[int, dict | DataError]] = []
    for start, end, fields in body:
        bad_line = next((n for n in range(start, end + 1) if n in bad_lines), None)
        if bad_line is not None:
            rows.append((start, DataError(bad_lines[bad_line], path, bad_line)))
        elif len(fields) != len(columns):
            rows.append((start, _width_error(str(path), start, fields, columns)))
        else:
            rows.append((start, dict(zip(columns, fields, strict=True))))
    return Table(str(path), columns, header_line, rows)


def _width_error(path: str, line: int, fields: list[str], columns: list[str]) -> DataError:
    if len(fields) < len(columns):
        return missing_column((path, line), columns[len(fields)], len(fields),
                              f"{len(columns)} fields as in the header")
    return DataError(f"row has {len(fields)} fields but the header has {len(columns)}", path,
                     line)


def _tsv_spans(lines: list[str]) -> list[tuple[int, int, list[str]]]:
    """Non-blank lines split on tabs only, as ``(line, line, fields)``."""
    return [(n, n, line.split("\t")) for n, line in enumerate(lines, start=1) if line.strip()]


def _csv_spans(path: Path, lines: list[str]) -> list[tuple[int, int, list[str]]]:
    """CSV records as ``(first line, last line, fields)``; quoted fields may span lines.

    Raises:
        DataError: A quoting error. It cannot be skipped: after one, record boundaries are unknown.
    """
    reader = csv.reader((line + "\n" for line in lines), strict=True)
    spans = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return spans
        except csv.Error as exc:
            raise DataError(f"CSV parse error: {exc}", path, reader.line_num) from None
        # csv yields [] for a blank line; a lone whitespace field is a blank line too.
        if fields and not (len(fields) == 1 and not fields[0].strip()):
            spans.append((start, reader.line_num, fields))


def _jsonl_rows(path: str, lines: list[str], bad_lines: dict[int, str]
                ) -> list[tuple[int, dict | DataError]]:
    """One JSON object per non-blank line."""
    rows: list[tuple[int, dict | DataError]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if number in bad_lines:
            rows.append((number, DataError(bad_lines[number], path, number)))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append((number, DataError(f"invalid JSON: {exc.msg} (column {exc.colno})",
                                           path, number)))
            continue
        except (ValueError, RecursionError) as exc:
            # Valid JSON the decoder still refuses: an integer of more than 4,300 digits
            # (ValueError) or nesting deeper than the recursion limit. One bad line, not a crash.
            reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
            rows.append((number, DataError(f"unreadable JSON value: {reason}", path, number)))
            continue
        if not isinstance(record, dict):
            rows.append((number, DataError(
                f"expected a JSON object per line, found {type(record).__name__}", path, number)))
            continue
        rows.append((number, record))
    return rows


def require_columns(table: Table, wanted: Sequence[str], hint: str) -> None:
    """A header lacking a needed column is structural: no row can be read."""
    if table.columns is None:
        return
    missing = [name for name in wanted if name not in table.columns]
    if missing:
        raise DataError(f"header has no column {missing[0]!r} (columns: {table.columns}); {hint}",
                        table.path, table.header_line, missing[0])
