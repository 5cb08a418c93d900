"""Shared pieces of the data layer: record types, the error type, bad-row bookkeeping, decoding.

Bad-row policy (``on_bad_row``):

* ``"error"`` (default) raises :class:`DataError` at the first bad row, naming the file and the
  1-based physical line.
* ``"skip"`` drops bad rows, logs one warning per file with the count and the first few reasons,
  and records the count in a process-wide registry read with :func:`skipped_rows` (the trainer
  saves it with the run). A file read in skip mode is recorded even when nothing was skipped, so
  "0 skipped" is distinguishable from "not checked".

Bad rows are: a missing column, a non-numeric, NaN/inf or out-of-range score, an empty sentence,
a line that is not valid UTF-8, a line that is not valid JSON (jsonl). Structural problems cannot
be skipped, because no row of such a file can be trusted: a missing or empty file, a missing or
wrong header, an STS input/gold line-count mismatch, a CSV quoting error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from pcc_dist.errors import PccError

logger = logging.getLogger(__name__)

STS7_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")

# Raw gold-score range of each known training source; used to validate rows that carry a source
# and by rescale_scores. STS-B is annotated 0-5, SICK relatedness 1-5.
SOURCE_SCORE_RANGES: dict[str, tuple[float, float]] = {"stsb": (0.0, 5.0), "sickr": (1.0, 5.0)}

BAD_ROW_POLICIES = ("error", "skip")

# How many skip reasons a warning quotes; the count is always complete.
_REASONS_LOGGED = 3

_skipped: dict[str, int] = {}


class DataError(PccError, ValueError):
    """A data file (or data setting) is unusable; the message says where and why.

    Attributes:
        path: File (or hub id) the problem is in, or None for a problem with a setting.
        line: 1-based physical line of the file, or None when the problem is not tied to a line.
        field: Column or setting name involved, or None.
        reason: The message without the location prefix.
    """

    def __init__(self, reason: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.reason = reason
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        # "file:line: reason" is the form editors and terminals turn into a clickable location.
        if self.path is not None and self.line is not None:
            where = f"{self.path}:{self.line}: "
        elif self.path is not None:
            where = f"{self.path}: "
        elif self.field is not None:
            where = f"{self.field}: "
        else:
            where = ""
        return where + self.reason


@dataclass(frozen=True)
class ScoredPair:
    """Two sentences and a gold similarity score, with the data set they came from."""

    sentence1: str
    sentence2: str
    score: float
    source: str = ""


@dataclass(frozen=True)
class Triplet:
    """A contrastive training example: anchor, positive and an optional hard negative."""

    anchor: str
    positive: str
    hard_negative: str | None


@dataclass(frozen=True)
class StsTask:
    """One STS evaluation task: named, ordered subsets of scored pairs.

    STS12-16 have one subset per SentEval sub-file (e.g. ``MSRpar``); STS-B and SICK-R have a
    single subset named after the split (``"test"`` for the STS7 protocol).
    """

    name: str
    subsets: dict[str, list[ScoredPair]]

    @property
    def pairs(self) -> list[ScoredPair]:
        """All subsets concatenated in order (SentEval's "all" for STS12-16)."""
        return [pair for subset in self.subsets.values() for pair in subset]

    def __len__(self) -> int:
        return sum(len(subset) for subset in self.subsets.values())


def check_policy(on_bad_row: str) -> None:
    """Reject an unknown ``on_bad_row`` value before any file is touched."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")


def skipped_rows() -> dict[str, int]:
    """Rows skipped per file (path or hub id) by readers run with ``on_bad_row="skip"``.

    Returns:
        A copy of the registry; the latest read of a file replaces its earlier count.
    """
    return dict(_skipped)


def reset_skipped_rows() -> None:
    """Empty the skipped-rows registry (e.g. at the start of a run)."""
    _skipped.clear()


class BadRows:
    """Applies the bad-row policy for one file: raise, or count and log once at the end."""

    def __init__(self, path: str | Path, on_bad_row: str) -> None:
        check_policy(on_bad_row)
        self.path = str(path)
        self.on_bad_row = on_bad_row
        self.count = 0
        self._reasons: list[str] = []

    def handle(self, error: DataError) -> None:
        """Raise ``error`` in error mode; otherwise count it."""
        if self.on_bad_row == "error":
            raise error
        self.count += 1
        if len(self._reasons) < _REASONS_LOGGED:
            self._reasons.append(f"line {error.line}: {error.reason}")

    def finish(self) -> None:
        """Log and record the skip count (skip mode only)."""
        if self.on_bad_row != "skip":
            return
        _skipped[self.path] = self.count
        if self.count:
            logger.warning("%s: skipped %d bad row(s) (on_bad_row=skip); first: %s",
                           self.path, self.count, "; ".join(self._reasons))


def read_lines(path: Path) -> tuple[list[str], dict[int, str]]:
    """Read a UTF-8 text file as physical lines, validating the encoding line by line.

    Lines are split on ``\\n``, ``\\r\\n`` and ``\\r`` (Python's universal newlines, which is how
    SentEval's text-mode reads see them; SICK's test file has CRLF endings). A leading BOM is
    dropped.

    Args:
        path: File to read.

    Returns:
        ``(lines, bad)``: the decoded lines (invalid bytes replaced, so line numbering stays
        intact) and ``{1-based line: reason}`` for each line that is not valid UTF-8. Callers
        treat those lines as bad rows.

    Raises:
        DataError: The file is missing, unreadable, or holds nothing but whitespace (a BOM
            alone counts as empty).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror}", path=path) from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    lines: list[str] = []
    bad: dict[int, str] = {}
    for number, chunk in enumerate(raw.splitlines(), start=1):
        try:
            lines.append(chunk.decode("utf-8", errors="strict"))
        except UnicodeDecodeError as exc:
            bad[number] = (f"invalid UTF-8 at byte {exc.start} of the line "
                           f"({chunk[exc.start:exc.start + 4]!r})")
            lines.append(chunk.decode("utf-8", errors="replace"))
    # Emptiness is judged on the decoded text, the way every reader skips blank lines
    # (str.strip), not on the bytes: a BOM alone, or only Unicode whitespace such as U+001C or
    # U+3000, leaves the readers no line at all, which must be this error rather than theirs.
    if not any(line.strip() for line in lines):
        raise DataError("file is empty (no rows); expected at least one data row", path=path,
                        line=1)
    return lines, bad


def parse_score(value: object, where: tuple[str, int], column: str,
                score_range: tuple[float, float] | None) -> float:
    """Turn a score cell into a finite float inside ``score_range`` (inclusive).

    Args:
        value: Cell text, or a JSON number.
        where: ``(path, line)`` for the error message.
        column: Column name for the error message.
        score_range: Inclusive ``(low, high)`` bounds, or None for no range check.

    Raises:
        DataError: Non-numeric, NaN/inf or out-of-range score.
    """
    path, line = where
    # bool is an int subclass: a JSON true/false is a data bug, not a score of 1/0.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"score column {column!r} holds {value!r}, not a number", path, line,
                        column)
    try:
        score = float(value)
    except (ValueError, OverflowError):
        # OverflowError: a JSON integer beyond float range (10**400) is finite JSON but no float.
        raise DataError(f"score column {column!r} holds {value!r}, not a number", path, line,
                        column) from None
    if not math.isfinite(score):
        raise DataError(f"score column {column!r} holds {value!r}, not a finite number", path,
                        line, column)
    if score_range is not None and not score_range[0] <= score <= score_range[1]:
        raise DataError(f"score {score:g} in column {column!r} is outside the allowed range "
                        f"[{score_range[0]:g}, {score_range[1]:g}]", path, line, column)
    return score


def parse_sentence(value: object, where: tuple[str, int], column: str) -> str:
    """Strip a sentence cell; empty or non-text cells are bad rows.

    Surrounding whitespace is dropped because SentEval splits sentences on whitespace before
    embedding; inner whitespace is kept as in the file.

    Raises:
        DataError: The cell is not text or is empty after stripping.
    """
    path, line = where
    if not isinstance(value, str):
        raise DataError(f"sentence column {column!r} holds {value!r}, not text", path, line,
                        column)
    text = value.strip()
    if not text:
        raise DataError(f"empty sentence in column {column!r}", path, line, column)
    return text


def missing_column(where: tuple[str, int], column: str, found: int, expected: str) -> DataError:
    """The error for a row that is too short (or the wrong shape) to hold ``column``."""
    path, line = where
    return DataError(f"missing column {column!r}: expected {expected}, found {found}", path, line,
                     column)


def rescale_scores(pairs: list[ScoredPair], mode: str = "per_source",
                   score_range: tuple[float, float] | None = None) -> list[ScoredPair]:
    """Map raw gold scores to [0, 1] per training source.

    Pearson r is invariant to one affine map of all labels, but STS-B (0-5) and SICK-R (1-5) mixed
    in one batch need different maps to share a scale: stsb -> s / 5, sickr -> (s - 1) / 4. The
    range of each source is, in this order: its known range (``SOURCE_SCORE_RANGES``), the
    declared ``score_range`` (``data.score_range``), or the observed min and max of its scores
    (logged as a warning: with a single source r does not change, but an outlier such as 250 for
    2.50 squeezes every other score, and two sources only share a scale if their observed ranges
    are their true ones).

    Args:
        pairs: Scored pairs; rows of a user's file without a ``source`` carry the file's name
            (:func:`pcc_dist.data.load_training_set`).
        mode: ``"per_source"`` rescales, ``"none"`` returns the pairs unchanged.
        score_range: Inclusive ``(low, high)`` of the sources without a known range, or None.

    Returns:
        New pairs (the input is not modified).

    Raises:
        DataError: A source without a known or declared range whose scores are all equal (the
            message names the source and the fix).
        ValueError: Unknown ``mode``.
    """
    if mode == "none":
        return list(pairs)
    if mode != "per_source":
        raise ValueError(f"rescale mode must be 'per_source' or 'none', got {mode!r}")
    bounds = {source: _source_range(source, pairs, score_range)
              for source in dict.fromkeys(pair.source for pair in pairs)}
    return [ScoredPair(pair.sentence1, pair.sentence2,
                       (pair.score - bounds[pair.source][0])
                       / (bounds[pair.source][1] - bounds[pair.source][0]), pair.source)
            for pair in pairs]


def _source_range(source: str, pairs: list[ScoredPair],
                  declared: tuple[float, float] | None) -> tuple[float, float]:
    """The score range of ``source``: known, else declared, else observed (logged)."""
    if source in SOURCE_SCORE_RANGES:
        return SOURCE_SCORE_RANGES[source]
    if declared is not None:
        return declared
    scores = [pair.score for pair in pairs if pair.source == source]
    low, high = min(scores), max(scores)
    if low == high:
        raise DataError(
            f"all {len(scores)} scores of source {source!r} are {low:g}: no similarity signal to "
            f"train on and no range to scale by; give pairs with different scores (set "
            f"data.score_scaling=none to train on them anyway)", field="score")
    logger.warning("source %r has no known score range and data.score_range is not set: "
                   "scaling its %d scores by their observed range [%g, %g]; set "
                   "data.score_range=[low,high] if the scale is wider", source, len(scores), low,
                   high)
    return low, high
