"""Readers for the training and STS-B/SICK file formats (SentEval folders: ``senteval``).

Each reader validates every row it keeps (see the bad-row policy in ``pcc_dist.data._core``) and
reports problems as ``file:line: reason``. Line numbers are 1-based physical lines, so a header is
line 1 and a quoted CSV field spanning lines is reported at the line where its row starts.

Formats:

* STS Benchmark ``sts-*.csv`` (tab-separated despite the name), :func:`read_stsb`.
* SICK ``SICK_*.txt`` (tab-separated with header), :func:`read_sick`.
* SimCSE NLI triplets (``sent0,sent1[,hard_neg]``), :func:`read_nli_triplets`.
* Generic scored pairs in csv / tsv / jsonl (parsed by ``tables``), or a ``datasets`` hub id,
  :func:`read_pairs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pcc_dist.data._core import (
    SOURCE_SCORE_RANGES,
    BadRows,
    DataError,
    ScoredPair,
    Triplet,
    check_policy,
    missing_column,
    parse_score,
    parse_sentence,
    read_lines,
)
from pcc_dist.data.tables import Table, load_table, require_columns

STS_SCORE_RANGE = (0.0, 5.0)
SICK_SCORE_RANGE = (1.0, 5.0)

STSB_COLUMNS = ("genre", "file", "year", "id", "score", "sentence1", "sentence2")
SICK_COLUMNS = ("pair_ID", "sentence_A", "sentence_B", "relatedness_score", "entailment_judgment")
TRIPLET_COLUMNS = ("sent0", "sent1", "hard_neg")
PAIR_ROLES = ("sentence1", "sentence2", "score", "source")

_PATH_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt")


# --------------------------------------------------------------------------------------------
# STS Benchmark and SICK


def read_stsb(path: Path, *, on_bad_row: str = "error") -> list[ScoredPair]:
    """Read an STS Benchmark file (``sts-train.csv`` / ``sts-dev.csv`` / ``sts-test.csv``).

    Rows are split on tabs only: the raw release contains stray quote characters, so a CSV quote
    parser would merge rows. Columns: genre, file, year, id, score (0-5), sentence1, sentence2;
    some raw rows carry two extra attribution columns (9 in all). Blank lines are ignored.

    Args:
        path: The file.
        on_bad_row: ``"error"`` or ``"skip"``.

    Returns:
        Pairs with ``source="stsb"`` and raw 0-5 scores.

    Raises:
        DataError: Missing or empty file, or a bad row in error mode.
        ValueError: Unknown ``on_bad_row``.
    """
    def row(where: tuple[str, int], columns: list[str]) -> ScoredPair:
        _check_width(where, columns, STSB_COLUMNS, allowed=(7, 9))
        score = parse_score(columns[4], where, "score", STS_SCORE_RANGE)
        return ScoredPair(parse_sentence(columns[5], where, "sentence1"),
                          parse_sentence(columns[6], where, "sentence2"), score, "stsb")

    return _read_tab_rows(Path(path), on_bad_row, row, header=None)


def read_sick(path: Path, *, on_bad_row: str = "error") -> list[ScoredPair]:
    """Read a SICK file (``SICK_train.txt`` / ``SICK_trial.txt`` / ``SICK_test_annotated.txt``).

    The first non-blank line must be the SICK header; rows have 5 tab-separated columns: pair_ID,
    sentence_A, sentence_B, relatedness_score (1-5), entailment_judgment.

    Args:
        path: The file.
        on_bad_row: ``"error"`` or ``"skip"``.

    Returns:
        Pairs with ``source="sickr"`` and raw 1-5 relatedness scores.

    Raises:
        DataError: Missing or empty file, missing header, or a bad row in error mode.
        ValueError: Unknown ``on_bad_row``.
    """
    def row(where: tuple[str, int], columns: list[str]) -> ScoredPair:
        _check_width(where, columns, SICK_COLUMNS, allowed=(5,))
        score = parse_score(columns[3], where, "relatedness_score", SICK_SCORE_RANGE)
        return ScoredPair(parse_sentence(columns[1], where, "sentence_A"),
                          parse_sentence(columns[2], where, "sentence_B"), score, "sickr")

    return _read_tab_rows(Path(path), on_bad_row, row, header=SICK_COLUMNS[0])


def _check_width(where: tuple[str, int], columns: list[str], names: tuple[str, ...],
                 allowed: tuple[int, ...]) -> None:
    """Reject rows whose tab-column count is not one of ``allowed``."""
    if len(columns) in allowed:
        return
    expected = " or ".join(str(n) for n in allowed) + " tab-separated columns"
    if len(columns) < len(names):
        raise missing_column(where, names[len(columns)], len(columns), expected)
    raise DataError(f"expected {expected}, found {len(columns)} (a stray tab?)", *where)


def _read_tab_rows(path: Path, on_bad_row: str,
                   row: Callable[[tuple[str, int], list[str]], ScoredPair],
                   header: str | None) -> list[ScoredPair]:
    """Shared loop of the tab-separated readers: header check, blank lines, bad-row policy."""
    check_policy(on_bad_row)
    lines, bad_lines = read_lines(path)
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if header is not None:
        first_number, first = numbered[0]
        if first.split("\t")[0].strip() != header:
            raise DataError(f"expected a header line starting with {header!r}, found "
                            f"{first[:60]!r}", path, first_number)
        numbered = numbered[1:]
    bad = BadRows(path, on_bad_row)
    out = []
    for number, line in numbered:
        try:
            if number in bad_lines:
                raise DataError(bad_lines[number], path, number)
            out.append(row((str(path), number), line.split("\t")))
        except DataError as error:
            bad.handle(error)
    bad.finish()
    _require_rows(path, out, len(numbered), bad.count)
    return out


def _require_rows(path: Path | str, rows: list, candidates: int, skipped: int) -> None:
    """A data set with no usable row is an error even in skip mode: training on nothing is a bug."""
    if rows:
        return
    if candidates == 0:
        raise DataError("no data rows (only a header or blank lines)", path=path)
    raise DataError(f"no usable rows: all {skipped} rows were bad (on_bad_row=skip)", path=path)


# --------------------------------------------------------------------------------------------
# NLI triplets


def read_nli_triplets(path: Path, *, on_bad_row: str = "error") -> list[Triplet]:
    """Read SimCSE-format NLI triplets.

    A csv (Python ``csv`` quoting, which SimCSE's files need) or tsv with header
    ``sent0,sent1,hard_neg`` (or ``sent0,sent1`` for pairs without hard negatives), or jsonl with
    those keys (``hard_neg`` optional per row).

    Args:
        path: The file.
        on_bad_row: ``"error"`` or ``"skip"``.

    Returns:
        Triplets; ``hard_negative`` is None when the file has no ``hard_neg`` column.

    Raises:
        DataError: Missing or empty file, wrong header, CSV quoting error, or a bad row in error
            mode.
        ValueError: Unknown ``on_bad_row``.
    """
    check_policy(on_bad_row)
    path = Path(path)
    return _triplets_from_table(load_table(path), on_bad_row)


def is_triplet_table(columns: list[str] | None, first_record: dict | None) -> bool:
    """True when a header (or the first jsonl record) names SimCSE triplet columns."""
    names = columns if columns is not None else list(first_record or {})
    return TRIPLET_COLUMNS[0] in names and TRIPLET_COLUMNS[1] in names


def _triplets_from_table(table: Table, on_bad_row: str) -> list[Triplet]:
    if table.columns is not None and table.columns not in (list(TRIPLET_COLUMNS),
                                                           list(TRIPLET_COLUMNS[:2])):
        raise DataError(f"expected the SimCSE header {','.join(TRIPLET_COLUMNS)} (or "
                        f"{','.join(TRIPLET_COLUMNS[:2])}), found {','.join(table.columns)}",
                        table.path, table.header_line)
    bad = BadRows(table.path, on_bad_row)
    triplets = []
    for number, record in table.rows:
        try:
            triplets.append(_triplet(table.path, number, record))
        except DataError as error:
            bad.handle(error)
    bad.finish()
    _require_rows(table.path, triplets, len(table.rows), bad.count)
    return triplets


def _triplet(path: str, number: int, record: dict | DataError) -> Triplet:
    if isinstance(record, DataError):
        raise record
    where = (path, number)
    for name in TRIPLET_COLUMNS[:2]:
        if name not in record:
            raise missing_column(where, name, len(record), f"keys {list(TRIPLET_COLUMNS[:2])}")
    negative = record.get(TRIPLET_COLUMNS[2])
    return Triplet(parse_sentence(record["sent0"], where, "sent0"),
                   parse_sentence(record["sent1"], where, "sent1"),
                   None if negative is None else parse_sentence(negative, where, "hard_neg"))


# --------------------------------------------------------------------------------------------
# Generic scored pairs (local file or hub id)


def read_pairs(path_or_hub_id: str, *, on_bad_row: str = "error",
               columns: Mapping[str, str] | Sequence[str] | None = None,
               score_range: tuple[float, float] | None = None) -> list[ScoredPair]:
    """Read scored sentence pairs from a local csv/tsv/jsonl file or a ``datasets`` hub id.

    Columns default to ``sentence1``, ``sentence2``, ``score`` and optional ``source``. A csv/tsv
    needs a header naming them. Scores must be finite; they are range-checked against the row's
    source range when the source is a known one (``SOURCE_SCORE_RANGES``: stsb 0-5, sickr 1-5),
    else against ``score_range`` when given. Rows without a source keep ``source=""`` here
    (:func:`pcc_dist.data.load_training_set` names them after the file).

    A string that is not an existing file is treated as a hub id ``owner/name[:split]`` (split
    defaults to ``train``) unless it looks like a file path (a known suffix or a leading ``/``,
    ``.`` or ``~``), which is then reported as not found.

    Args:
        path_or_hub_id: Local file or hub id.
        on_bad_row: ``"error"`` or ``"skip"``.
        columns: Column names, as a mapping from role (``sentence1``, ``sentence2``, ``score``,
            ``source``) to name, or a sequence in that order (source optional).
        score_range: Inclusive ``(low, high)`` allowed scores of rows whose source has no known
            range.

    Returns:
        The pairs, in file order.

    Raises:
        DataError: Missing/empty file, missing header column, unavailable hub data set, or a bad
            row in error mode.
        ValueError: Unknown ``on_bad_row`` or malformed ``columns``.
    """
    check_policy(on_bad_row)
    names = pair_columns(columns)
    path = Path(path_or_hub_id).expanduser()
    if path.is_file():
        return pairs_from_table(load_table(path), names, on_bad_row, score_range)
    if not is_hub_id(path_or_hub_id):
        raise DataError("file not found (and not a hub id)", path=path)
    return _read_hub_pairs(path_or_hub_id, names, on_bad_row, score_range)


def pair_columns(columns: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Role -> column-name mapping from the ``columns`` argument of :func:`read_pairs`."""
    names = {role: role for role in PAIR_ROLES}
    if columns is None:
        return names
    if isinstance(columns, Mapping):
        unknown = set(columns) - set(PAIR_ROLES)
        if unknown:
            raise ValueError(f"columns has unknown roles {sorted(unknown)}; roles are {PAIR_ROLES}")
        names.update(columns)
        return names
    if isinstance(columns, str) or len(columns) not in (3, 4):
        raise ValueError(f"columns must name 3 or 4 columns (sentence1, sentence2, score"
                         f"[, source]), got {columns!r}")
    names.update(zip(PAIR_ROLES, columns, strict=False))
    return names


def is_hub_id(spec: str) -> bool:
    """Whether :func:`read_pairs` reads ``spec`` from the ``datasets`` hub: nothing exists at
    that path and it does not look like a file path (a known suffix or a leading ``/``, ``.``
    or ``~``)."""
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.lower().endswith(_PATH_SUFFIXES)
    return not looks_like_path and not Path(spec).expanduser().exists()


def pairs_from_table(table: Table, names: dict[str, str], on_bad_row: str,
                     score_range: tuple[float, float] | None) -> list[ScoredPair]:
    """Validate the rows of a parsed table as scored pairs."""
    require_columns(table, [names[r] for r in PAIR_ROLES[:3]],
                     "name the columns with columns={'sentence1': ..., 'sentence2': ..., "
                     "'score': ...}")
    bad = BadRows(table.path, on_bad_row)
    pairs = []
    for number, record in table.rows:
        try:
            pairs.append(_pair(table.path, number, record, names, score_range))
        except DataError as error:
            bad.handle(error)
    bad.finish()
    _require_rows(table.path, pairs, len(table.rows), bad.count)
    return pairs


def _pair(path: str, number: int, record: dict | DataError, names: dict[str, str],
          score_range: tuple[float, float] | None) -> ScoredPair:
    if isinstance(record, DataError):
        raise record
    where = (path, number)
    for role in PAIR_ROLES[:3]:
        if names[role] not in record:
            raise missing_column(where, names[role], len(record),
                                 f"keys {[names[r] for r in PAIR_ROLES[:3]]}")
    # Only a missing/null source means "no source": 0, false and [] are wrong values, not absent.
    source = record.get(names["source"])
    source = "" if source is None else source
    if not isinstance(source, str):
        raise DataError(f"source column {names['source']!r} holds {source!r}, not text", path,
                        number, names["source"])
    source = source.strip()
    # A known source's scale is fixed (stsb 0-5, sickr 1-5); score_range covers the others.
    bounds = SOURCE_SCORE_RANGES.get(source, score_range)
    score = parse_score(record[names["score"]], where, names["score"], bounds)
    return ScoredPair(parse_sentence(record[names["sentence1"]], where, names["sentence1"]),
                      parse_sentence(record[names["sentence2"]], where, names["sentence2"]),
                      score, source)


def _read_hub_pairs(hub_id: str, names: dict[str, str], on_bad_row: str,
                    score_range: tuple[float, float] | None) -> list[ScoredPair]:
    """Load ``owner/name[:split]`` with ``datasets`` (imported lazily) and validate its rows.

    Rows are reported as "lines" numbered from 1 in the split's order.
    """
    repo, _, split = hub_id.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{hub_id!r} is not a local file, and reading it as a hub data set needs "
                        "the `datasets` package: pip install 'pcc-dist[hub]'",
                        path=hub_id) from None
    try:
        dataset = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # datasets raises many types (network, missing repo, bad split)
        raise DataError(
            f"not a local file, and loading it as a hub data set (repo {repo!r}, split {split!r}) "
            f"failed: {type(exc).__name__}: {exc}. Offline? Save the data as a local "
            f"csv/tsv/jsonl file and pass its path (needs `pip install 'pcc-dist[hub]'` and "
            f"internet for hub ids)", path=hub_id) from exc
    rows: list[tuple[int, dict | DataError]] = list(enumerate(dataset, start=1))
    table = Table(hub_id, list(dataset.column_names), None, rows)
    return pairs_from_table(table, names, on_bad_row, score_range)


def triplets_from_table(table: Table, on_bad_row: str) -> list[Triplet]:
    """Validate a parsed table as NLI triplets."""
    check_policy(on_bad_row)
    return _triplets_from_table(table, on_bad_row)
