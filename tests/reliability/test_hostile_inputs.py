"""Hostile inputs for every data reader and the config loader (issue #7), property-based.

The contract under test:

* A reader either returns rows or raises :class:`~pcc_dist.data.DataError`, whose message names
  the file (``file:line: reason`` when the problem sits on a line). The config loader either
  returns a config or raises :class:`~pcc_dist.config.ConfigError` naming the file. No other
  exception type escapes, whatever the bytes: random binary, truncation, inserted garbage,
  latin-1 / UTF-16 / UTF-32 re-encodings, BOMs, huge lines, NaN/inf scores, wrong column
  counts, empty and header-only files.
* Nothing is dropped silently: a valid file round-trips (every row comes back, in order, equal);
  with ``on_bad_row="skip"`` the recorded skip count equals the number of bad rows planted and
  the good rows all come back; with ``"error"`` the error names the first bad row's line.

Hypothesis runs derandomized with no example database (profile ``pcc-reliability`` in this
folder's conftest), so CI tries the same inputs every time. The bugs these properties found are
pinned as plain examples at the end of the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pcc_dist.config import ConfigError, PccConfig, load_config
from pcc_dist.data import (
    DataError,
    ScoredPair,
    StsTask,
    Triplet,
    load_training_set,
    read_nli_triplets,
    read_pairs,
    read_senteval_sts,
    read_sick,
    read_stsb,
    skipped_rows,
)

PROFILE = settings.get_profile("pcc-reliability")
# Sized for ~1 minute for the whole file on 2 shared cores; every example writes and reads files.
ROUND_TRIP = settings(PROFILE, max_examples=80)
BAD_ROWS = settings(PROFILE, max_examples=120)
HOSTILE = settings(PROFILE, max_examples=150)

SICK_HEADER = ("pair_ID", "sentence_A", "sentence_B", "relatedness_score", "entailment_judgment")

# --------------------------------------------------------------------------------------------
# Building files: each builder turns generated rows into (file bytes, expected records, bad
# lines). A row is ("good", fields) or ("bad", fields); bad rows are the documented bad-row
# classes (missing column, extra column, non-numeric / NaN / inf / out-of-range score, empty
# sentence, invalid UTF-8, invalid JSON), so skip mode must count each exactly once.
# --------------------------------------------------------------------------------------------

NO_SURROGATES = ("Cs",)
TAB_FORBIDDEN = "\t\n\r"


def sentences(forbidden: str = TAB_FORBIDDEN) -> st.SearchStrategy[str]:
    """Non-blank text; ``forbidden`` holds the characters the format cannot carry in a cell."""
    chars = st.characters(blacklist_categories=NO_SURROGATES, blacklist_characters=forbidden)
    return st.text(chars, min_size=1, max_size=24).filter(lambda s: s.strip())


def cells(forbidden: str = TAB_FORBIDDEN) -> st.SearchStrategy[str]:
    chars = st.characters(blacklist_categories=NO_SURROGATES, blacklist_characters=forbidden)
    return st.text(chars, max_size=8)


def scores(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


NON_FINITE = st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"])
NOT_A_NUMBER = st.sampled_from(["", "abc", "2,5", "1..0", "0x10", "--1", "five"])
BLANK = st.sampled_from(["", " ", "\t ", "\u3000"])
LATIN1 = st.sampled_from(["caf\u00e9", "na\u00efve", "\u00bfqu\u00e9?"])  # encoded as latin-1


@dataclass
class Built:
    """A generated file (or SentEval folder) and what reading it must give."""

    files: dict[str, bytes]            # relative name -> bytes
    expected: list = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)  # 1-based lines of the planted bad rows
    bad_file: str | None = None        # file the first bad line is in (SentEval: input or gold)
    skips: dict[str, int] = field(default_factory=dict)  # SentEval: input file -> bad rows
    target: str = ""                   # the name passed to the reader ("" = the folder)


def _line_of(prefix: bytes) -> int:
    """The 1-based physical line that starts right after ``prefix`` (which ends a line)."""
    return len(prefix.removeprefix(b"\xef\xbb\xbf").splitlines()) + 1


def _encode(text: str, bad_utf8: bool) -> bytes:
    # A latin-1 line holds one of LATIN1's words, whose byte is never valid UTF-8 there; other
    # characters latin-1 lacks become "?" (the row is bad either way).
    return text.encode("latin-1", "replace") if bad_utf8 else text.encode("utf-8")


@st.composite
def line_endings(draw) -> str:
    return draw(st.sampled_from(["\n", "\r\n", "\r"]))


@st.composite
def stsb_files(draw, bad: bool = False) -> Built:
    eol, bom = draw(line_endings()), draw(st.booleans())
    body, built = b"\xef\xbb\xbf" if bom else b"", Built({})
    n = draw(st.integers(1, 6))
    for _ in range(n):
        meta = [draw(cells()) for _ in range(4)]
        s1, s2, score = draw(sentences()), draw(sentences()), draw(scores(0, 5))
        extra = draw(st.sampled_from([(), ("src-a", "src-b")]))
        fields, latin1 = [*meta, repr(score), s1, s2, *extra], False
        kind = draw(st.sampled_from(["good"] * 3 + ["bad"])) if bad else "good"
        if kind == "bad":
            how = draw(st.sampled_from(["nonfinite", "nan_text", "range", "empty", "missing",
                                        "extra", "latin1"]))
            if how == "nonfinite":
                fields[4] = draw(NON_FINITE)
            elif how == "nan_text":
                fields[4] = draw(NOT_A_NUMBER)
            elif how == "range":
                fields[4] = draw(st.sampled_from(["5.01", "-0.5", "6", "100"]))
            elif how == "empty":
                fields[draw(st.sampled_from([5, 6]))] = draw(BLANK)
            elif how == "missing":
                fields = fields[:draw(st.integers(1, 6))]
            elif how == "extra":
                fields = fields[:7] + ["x"] * draw(st.sampled_from([1, 3]))
            else:
                fields[5], latin1 = draw(LATIN1), True
            built.bad_lines.append(_line_of(body))
        else:
            built.expected.append(ScoredPair(s1.strip(), s2.strip(), score, "stsb"))
        body += _encode("\t".join(fields) + eol, latin1)
        if draw(st.booleans()):
            body += draw(BLANK).encode() + eol.encode()  # blank lines are not rows
    built.files = {"sts-train.csv": body}
    built.target = "sts-train.csv"
    return built


@st.composite
def sick_files(draw, bad: bool = False) -> Built:
    eol, bom = draw(line_endings()), draw(st.booleans())
    body = (b"\xef\xbb\xbf" if bom else b"") + ("\t".join(SICK_HEADER) + eol).encode()
    built = Built({})
    for number in range(draw(st.integers(1, 6))):
        s1, s2, score = draw(sentences()), draw(sentences()), draw(scores(1, 5))
        fields = [str(number), s1, s2, repr(score), draw(cells())]
        latin1 = False
        kind = draw(st.sampled_from(["good"] * 3 + ["bad"])) if bad else "good"
        if kind == "bad":
            how = draw(st.sampled_from(["nonfinite", "nan_text", "range", "empty", "missing",
                                        "extra", "latin1"]))
            if how == "nonfinite":
                fields[3] = draw(NON_FINITE)
            elif how == "nan_text":
                fields[3] = draw(NOT_A_NUMBER)
            elif how == "range":
                fields[3] = draw(st.sampled_from(["0.99", "0", "5.5"]))
            elif how == "empty":
                fields[draw(st.sampled_from([1, 2]))] = draw(BLANK)
            elif how == "missing":
                fields = fields[:draw(st.integers(1, 4))]
            elif how == "extra":
                fields = [*fields, "x"]
            else:
                fields[1], latin1 = draw(LATIN1), True
            built.bad_lines.append(_line_of(body))
        else:
            built.expected.append(ScoredPair(s1.strip(), s2.strip(), score, "sickr"))
        body += _encode("\t".join(fields) + eol, latin1)
    built.files = {"SICK_train.txt": body}
    built.target = "SICK_train.txt"
    return built


def _csv_line(fields: list[str], eol: str) -> str:
    out = io.StringIO()
    # csv's writer quotes a field only for the characters of its own line terminator, so a "\n"
    # inside a field of a "\r"-terminated file would go out bare; quote such rows fully.
    quoting = csv.QUOTE_ALL if any("\n" in f or "\r" in f for f in fields) else csv.QUOTE_MINIMAL
    csv.writer(out, lineterminator=eol, quoting=quoting).writerow(fields)
    return out.getvalue()


@st.composite
def table_files(draw, kind: str, bad: bool = False) -> Built:
    """csv / tsv / jsonl files of scored pairs (``kind="pairs"``) or NLI triplets."""
    fmt = draw(st.sampled_from(["csv", "tsv", "tsv_named_csv", "jsonl"]))
    eol, bom = draw(line_endings()), draw(st.booleans())
    if fmt == "csv":
        # A quoted field may span lines: "\r" inside one is read back as "\n", so only "\n".
        text = sentences("\r")
    elif fmt == "jsonl":
        text = sentences("")
    else:
        text = sentences()
    if kind == "pairs":
        with_source = draw(st.booleans())
        columns = ["sentence1", "sentence2", "score"] + (["source"] if with_source else [])
    else:
        columns = ["sent0", "sent1"] + (["hard_neg"] if draw(st.booleans()) else [])
    if fmt == "jsonl":
        body = b"\xef\xbb\xbf" if bom else b""
    else:
        sep = "," if fmt == "csv" else "\t"
        body = (b"\xef\xbb\xbf" if bom else b"") + (sep.join(columns) + eol).encode()
    built = Built({})
    for _ in range(draw(st.integers(1, 6))):
        record: dict = {}
        if kind == "pairs":
            source = draw(st.sampled_from(["", "stsb", "sickr", "mine"])) if with_source else ""
            low, high = {"stsb": (0.0, 5.0), "sickr": (1.0, 5.0)}.get(source, (-1e6, 1e6))
            record = {"sentence1": draw(text), "sentence2": draw(text),
                      "score": draw(scores(low, high))}
            if with_source:
                record["source"] = source
            expected = ScoredPair(record["sentence1"].strip(), record["sentence2"].strip(),
                                  record["score"], source)
        else:
            record = {name: draw(text) for name in columns}
            expected = Triplet(record["sent0"].strip(), record["sent1"].strip(),
                               record["hard_neg"].strip() if "hard_neg" in record else None)
        latin1, raw_line = False, None
        is_bad = bad and draw(st.sampled_from([False, False, True]))
        if is_bad:
            how = draw(st.sampled_from(
                ["empty", "missing", "extra", "latin1"]
                + (["nonfinite", "nan_text"] if kind == "pairs" else [])
                + (["json_broken", "json_not_object", "json_types", "json_huge"]
                   if fmt == "jsonl" else [])
                + (["json_overflow"] if fmt == "jsonl" and kind == "pairs" else [])))
            sentence_key = columns[draw(st.integers(0, 1))]
            if how == "empty":
                record[sentence_key] = draw(BLANK)
            elif how == "missing":
                required = columns[:3] if kind == "pairs" else columns[:2]
                # jsonl: drop a required key; csv/tsv: a short row (fewer fields than the header).
                record.pop(draw(st.sampled_from(required)) if fmt == "jsonl" else columns[-1])
            elif how == "extra":
                if fmt == "jsonl":  # extra keys are allowed in jsonl; make it a wrong type
                    record[sentence_key] = draw(st.sampled_from([None, 1, [], {}]))
                else:
                    record["zz_extra"] = "x"
            elif how == "latin1":
                record[sentence_key], latin1 = draw(LATIN1), True
            elif how == "nonfinite":
                record["score"] = draw(NON_FINITE)
            elif how == "nan_text":
                record["score"] = draw(NOT_A_NUMBER)
            elif how == "json_broken":
                raw_line = draw(st.sampled_from(['{"sentence1": "a"', "{'a': 1}", "nul", "{]"]))
            elif how == "json_not_object":
                raw_line = draw(st.sampled_from(["[1, 2]", '"text"', "3", "null"]))
            elif how == "json_types":
                key = "score" if kind == "pairs" else sentence_key
                record[key] = draw(st.sampled_from([True, None, [1], {"a": 1}]))
            elif how == "json_overflow":
                record["score"] = 10 ** 400  # finite JSON, but no float
            else:  # a huge JSON value: deep nesting or an integer of thousands of digits
                raw_line = draw(st.sampled_from(["[" * 50_000 + "]" * 50_000,
                                                 '{"score": ' + "9" * 5_000 + "}"]))
            built.bad_lines.append(_line_of(body))
        else:
            built.expected.append(expected)
        if raw_line is not None:
            line = raw_line + eol
        elif fmt == "jsonl":
            # ensure_ascii would escape the latin-1 sentence into valid ASCII.
            line = json.dumps(record, ensure_ascii=not latin1 and draw(st.booleans())) + eol
        else:
            values = [str(record[c]) if c in record else None for c in columns]
            values = [v for v in values if v is not None]
            if "zz_extra" in record:
                values.append("x")
            line = (_csv_line(values, eol) if fmt == "csv"
                    else "\t".join(values) + eol)
        body += _encode(line, latin1)
        if fmt != "csv" and draw(st.booleans()):
            body += draw(st.sampled_from(["", "  "])).encode() + eol.encode()
    suffix = {"csv": ".csv", "tsv": ".tsv", "tsv_named_csv": ".csv", "jsonl": ".jsonl"}[fmt]
    built.target = f"data{suffix}"
    built.files = {built.target: body}
    return built


@st.composite
def senteval_folders(draw, bad: bool = False) -> Built:
    """A SentEval STS folder: subsets of input lines (s1<TAB>s2[<TAB>...]) and gold lines."""
    eol = draw(line_endings())
    names = draw(st.lists(st.sampled_from(["alpha", "beta", "gamma.x", "MSRvid"]), min_size=1,
                          max_size=3, unique=True))
    built, subsets = Built({}), {}
    first_bad: tuple[int, int, str] | None = None  # (subset index, line, file)
    for index, name in enumerate(sorted(names)):
        inputs, golds, pairs, skips = b"", b"", [], 0
        for _ in range(draw(st.integers(1, 5))):
            s1, s2 = draw(sentences()), draw(sentences())
            extra = draw(st.sampled_from([[], ["src1", "src2"]]))
            cols, gold, latin1_in, latin1_gold = [s1, s2, *extra], None, False, False
            # The first row is scored: a gold file of blank lines only is refused as an empty
            # file (a structural error), not read as a subset with no scored pairs.
            scored = not inputs or draw(st.sampled_from([True, True, True, False]))
            if scored:
                gold = draw(scores(0, 5))
            gold_text = repr(gold) if scored else draw(st.sampled_from(["", " "]))
            is_bad = bad and scored and draw(st.sampled_from([False, False, True]))
            if is_bad:
                how = draw(st.sampled_from(["nonfinite", "nan_text", "range", "empty",
                                            "missing", "latin1_input", "latin1_gold"]))
                if how == "nonfinite":
                    gold_text = draw(NON_FINITE)
                elif how == "nan_text":
                    gold_text = draw(NOT_A_NUMBER.filter(str.strip))
                elif how == "range":
                    gold_text = draw(st.sampled_from(["5.5", "-1"]))
                elif how == "empty":
                    cols[draw(st.integers(0, 1))] = draw(BLANK.filter(lambda b: "\t" not in b))
                elif how == "missing":
                    cols = [s1]
                elif how == "latin1_input":
                    cols[0], latin1_in = draw(LATIN1), True
                else:
                    gold_text, latin1_gold = "4.0 caf\u00e9", True
                # A bad gold line is reported in the gold file, the rest in the input file.
                where = "gold" if how in ("nonfinite", "nan_text", "range", "latin1_gold") \
                    else "input"
                line = _line_of(inputs)
                built.bad_lines.append(line)
                skips += 1
                if first_bad is None:
                    first_bad = (index, line, where)
            elif scored:
                pairs.append(ScoredPair(s1.strip(), s2.strip(), gold, name))
            inputs += _encode("\t".join(cols) + eol, latin1_in)
            golds += _encode(gold_text + eol, latin1_gold)
        built.files[f"STS.input.{name}.txt"] = inputs
        built.files[f"STS.gs.{name}.txt"] = golds
        built.skips[f"STS.input.{name}.txt"] = skips
        subsets[name] = pairs
    built.expected = [StsTask("STS99", subsets)]
    if first_bad is not None:
        name = sorted(names)[first_bad[0]]
        prefix = "STS.gs." if first_bad[2] == "gold" else "STS.input."
        built.bad_file = f"{prefix}{name}.txt"
        built.bad_lines = [first_bad[1]]  # only the first matters for error mode
    built.target = ""
    return built


# --------------------------------------------------------------------------------------------
# Running a reader on a built file in a fresh folder, and checking the error contract.
# --------------------------------------------------------------------------------------------

Reader = Callable[[Path, str], object]


def _pairs_reader(path: Path, mode: str):
    return read_pairs(str(path), on_bad_row=mode)


def _training_pairs(path: Path, mode: str) -> list[ScoredPair]:
    """``load_training_set`` on a pairs file, with the file's name mapped back to ``source=""``.

    Rows without a source take the file's name there (issue #19); the builders expect the
    readers' ``""``. No builder draws a source equal to a file name, so the mapping is exact.
    """
    pairs = load_training_set(str(path), on_bad_row=mode)
    return [replace(pair, source="") if pair.source == path.name else pair for pair in pairs]


READERS: dict[str, tuple[Callable, Reader]] = {
    # name: (strategy factory taking bad=..., reader(path, on_bad_row))
    "read_stsb": (stsb_files, lambda p, m: read_stsb(p, on_bad_row=m)),
    "read_sick": (sick_files, lambda p, m: read_sick(p, on_bad_row=m)),
    "read_pairs": (lambda bad=False: table_files("pairs", bad), _pairs_reader),
    "read_nli_triplets": (lambda bad=False: table_files("triplets", bad),
                          lambda p, m: read_nli_triplets(p, on_bad_row=m)),
    "load_training_set[pairs]": (lambda bad=False: table_files("pairs", bad),
                                 _training_pairs),
    "load_training_set[triplets]": (lambda bad=False: table_files("triplets", bad),
                                    lambda p, m: load_training_set(str(p), on_bad_row=m)),
    "read_senteval_sts": (senteval_folders, lambda p, m: read_senteval_sts(p, on_bad_row=m)),
}

TRIED: dict[str, int] = {}


def _count(test: str) -> None:
    TRIED[test] = TRIED.get(test, 0) + 1


def _materialise(built: Built, root: Path) -> Path:
    folder = root / "STS99-en-test"
    folder.mkdir()
    for name, data in built.files.items():
        (folder / name).write_bytes(data)
    return folder / built.target if built.target else folder


def _as_list(result) -> list:
    if isinstance(result, StsTask):
        return [result]
    return list(result)


def _check_data_error(error: DataError, path: Path) -> None:
    """The error names the file (a SentEval folder or a file inside it), and its line."""
    message = str(error)
    assert error.path is not None and str(path) in error.path, message
    assert message.startswith(error.path), message
    if error.line is not None:
        assert error.line >= 1 and message.startswith(f"{error.path}:{error.line}: "), message


def _read_guarded(reader: Reader, path: Path, mode: str):
    """Run a reader; only DataError may escape, and it must name the file."""
    try:
        return reader(path, mode)
    except DataError as error:
        _check_data_error(error, path)
        return error
    # Any other exception type fails the test with its traceback, which is the point.


@pytest.mark.parametrize("name", sorted(READERS))
def test_valid_files_round_trip(name):
    """Every good row comes back, equal and in order; skip mode records 0 skipped rows."""
    strategy, reader = READERS[name]

    @ROUND_TRIP
    @given(built=strategy())
    def check(built: Built):
        _count(f"round_trip[{name}]")
        with tempfile.TemporaryDirectory() as tmp:
            path = _materialise(built, Path(tmp))
            for mode in ("error", "skip"):
                result = reader(path, mode)
                assert _as_list(result) == built.expected
            if name != "read_senteval_sts":
                assert skipped_rows()[str(path)] == 0

    check()


@pytest.mark.parametrize("name", sorted(READERS))
def test_bad_rows_are_counted_or_reported_at_their_line(name):
    """skip: the good rows come back and the skip count equals the rows planted bad; error: a
    DataError at the first bad row's file and line."""
    strategy, reader = READERS[name]

    @BAD_ROWS
    @given(built=strategy(bad=True))
    def check(built: Built):
        _count(f"bad_rows[{name}]")
        with tempfile.TemporaryDirectory() as tmp:
            path = _materialise(built, Path(tmp))
            good = built.expected if name != "read_senteval_sts" else built.expected[0].pairs
            if not built.bad_lines:
                assert _as_list(reader(path, "error")) == built.expected
                return
            with pytest.raises(DataError) as caught:
                reader(path, "error")
            error = caught.value
            _check_data_error(error, path)
            bad_path = path / built.bad_file if built.bad_file else path  # SentEval: a folder
            assert (error.path, error.line) == (str(bad_path), built.bad_lines[0]), str(error)
            if name == "read_senteval_sts":
                result = reader(path, "skip")
                assert _as_list(result) == built.expected
                for input_name, count in built.skips.items():  # one count per input file
                    assert skipped_rows()[str(path / input_name)] == count, input_name
                return
            if not good:  # all rows bad: skip mode must refuse to train on nothing
                with pytest.raises(DataError, match="no usable rows") as caught:
                    reader(path, "skip")
                _check_data_error(caught.value, path)
            else:
                assert _as_list(reader(path, "skip")) == good
            assert skipped_rows()[str(path)] == len(built.bad_lines)

    check()


def test_senteval_skip_count_per_file(tmp_path):
    """The SentEval reader keeps one skip count per subset input file."""
    folder = tmp_path / "STS99-en-test"
    folder.mkdir()
    (folder / "STS.input.a.txt").write_text("x\ty\nonly-one-column\np\tq\n")
    (folder / "STS.gs.a.txt").write_text("1\n2\nnan\n")
    task = read_senteval_sts(folder, on_bad_row="skip")
    assert task.pairs == [ScoredPair("x", "y", 1.0, "a")]
    assert skipped_rows()[str(folder / "STS.input.a.txt")] == 2


# --------------------------------------------------------------------------------------------
# Arbitrary damage: the readers may refuse, but only with DataError naming the file.
# --------------------------------------------------------------------------------------------

HUGE = 300_000  # beyond csv's 131,072-character field limit and json's 4,300-digit int limit


@st.composite
def damaged(draw, built: Built) -> Built:
    """One of: random bytes, truncation, inserted/deleted bytes, a re-encoding, BOMs, a huge
    line, an empty / whitespace-only / BOM-only / header-only file, a NaN score."""
    name = built.target or draw(st.sampled_from(sorted(built.files)))
    data = built.files[name]
    how = draw(st.sampled_from(["random", "truncate", "insert", "delete", "encode", "bom",
                                "huge", "empty", "empty", "header_only", "nan"]))
    if how == "random":
        data = draw(st.binary(max_size=400))
    elif how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    elif how == "delete":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + data[at + draw(st.integers(1, 16)):]
    elif how == "encode":
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1",
                                      "cp1252", "utf-8-sig", "cp037"]))
        data = data.decode("utf-8", "replace").encode(codec, "replace")
    elif how == "bom":
        boms = [b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf\xef\xbb\xbf"]
        data = draw(st.sampled_from(boms)) + data
    elif how == "huge":
        filler = draw(st.sampled_from([b"x", b"[", b"9", b"\t", b",", b'"', b"\x00", b"\xe9"]))
        at = draw(st.integers(0, len(data)))
        data = data[:at] + filler * draw(st.integers(HUGE // 2, HUGE)) + b"\n" + data[at:]
    elif how == "empty":
        # Bytes-blank, a BOM alone, and text that only str.strip() sees as blank (U+001C-1F,
        # U+0085, U+3000 ideographic space).
        data = draw(st.sampled_from([b"", b"\n", b" \r\n\t", b"\xef\xbb\xbf", b"\x1c\x1d",
                                     b"\xef\xbb\xbf\n\n", b"\x0b\x0c\n", b"\xc2\x85\n",
                                     b"\xe3\x80\x80", b"\x1f\r\n\x1e"]))
    elif how == "header_only":
        lines = data.splitlines(keepends=True)
        data = lines[0] if lines else data
    else:
        text = data.decode("utf-8", "replace")
        for number in ("0.", "1.", "2.", "3.", "4."):
            text = text.replace(number, draw(NON_FINITE) + "_", 1)
        data = text.encode("utf-8")
    return Built({**built.files, name: data}, target=built.target)


def _non_blank_lines(data: bytes) -> int:
    data = data.removeprefix(b"\xef\xbb\xbf")
    return sum(1 for line in data.splitlines() if line.decode("utf-8", "replace").strip())


def _tab_header(data: bytes) -> bool:
    """A .csv whose header has tabs and no commas is read as TSV (STS-B ships such files)."""
    lines = [line for line in data.removeprefix(b"\xef\xbb\xbf").splitlines() if line.strip()]
    return bool(lines) and b"\t" in lines[0] and b"," not in lines[0]


def _csv_records(data: bytes) -> int:
    """Non-blank CSV records (a quoted field may span lines), counted by the csv module alone."""
    lines = data.removeprefix(b"\xef\xbb\xbf").splitlines()
    records = csv.reader((line.decode("utf-8", "replace") + "\n" for line in lines), strict=True)
    return sum(1 for fields in records
               if fields and not (len(fields) == 1 and not fields[0].strip()))


@pytest.mark.parametrize("name", sorted(READERS))
def test_damaged_files_raise_only_data_error(name):
    strategy, reader = READERS[name]

    @HOSTILE
    @given(built=strategy(bad=True).flatmap(damaged))
    def check(built: Built):
        _count(f"damaged[{name}]")
        with tempfile.TemporaryDirectory() as tmp:
            path = _materialise(built, Path(tmp))
            _read_guarded(reader, path, "error")
            result = _read_guarded(reader, path, "skip")
            if isinstance(result, DataError) or name == "read_senteval_sts":
                return
            # Row-per-line formats: every non-blank line (minus a header) is a row that was
            # either returned or counted as skipped; nothing vanishes.
            data = built.files[built.target]
            if name == "read_stsb" or (path.suffix == ".jsonl"):
                rows = _non_blank_lines(data)
            elif name == "read_sick" or path.suffix == ".tsv" or _tab_header(data):
                rows = _non_blank_lines(data) - 1  # the header
            else:
                rows = _csv_records(data) - 1
            assert len(result) + skipped_rows()[str(path)] == rows

    check()


# --------------------------------------------------------------------------------------------
# Config loader
# --------------------------------------------------------------------------------------------

DEFAULTS = PccConfig().flat()
FLOAT_KEYS = sorted(k for k, v in DEFAULTS.items() if isinstance(v, float))


def _valid_value(key: str) -> st.SearchStrategy:
    """Values that each field accepts on its own (combinations may still be refused)."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, float):
        return st.floats(0.001, 0.9)
    if isinstance(default, int):
        return st.integers(1, 10_000)
    if key.endswith(("mode", "kind", "pooling", "dtype", "on_bad_row", "kernel", "schedule",
                     "backend", "resume", "optimizer", "score_scaling", "attn_implementation",
                     "quant_storage_dtype")):
        return st.just(default)
    if isinstance(default, list):
        return st.just(default)
    return st.text(st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=12)


# A 5,000-digit integer: PyYAML can neither dump nor load it (Python's 4,300-digit str limit), so
# it is written into the YAML text as this placeholder and replaced afterwards.
HUGE_INT = "__HUGE_INT__"
HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.just(HUGE_INT), st.just(-(10 ** 400)),
    st.floats(), st.sampled_from([".nan", ".inf", "-.inf", "1e999", "nan"]), st.text(max_size=20),
    st.lists(st.integers() | st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def config_entries(draw, hostile: bool) -> list[tuple[str, object]]:
    keys = draw(st.lists(st.sampled_from(sorted(DEFAULTS)), min_size=1, max_size=6))
    entries = []
    for key in keys:
        value = draw(HOSTILE_VALUES if hostile and draw(st.booleans()) else _valid_value(key))
        if hostile and draw(st.integers(0, 9)) == 0:
            key = key + draw(st.sampled_from(["x", ".deeper", "_"]))
        entries.append((key, value))
    return entries


def _yaml_text(entries: list[tuple[str, object]]) -> str:
    """One ``section:`` block per entry, in order: a repeated section or key is written twice,
    as a user concatenating two recipes would."""
    out = []
    for key, value in entries:
        *parents, leaf = key.split(".")
        node: object = {leaf: value}
        for parent in reversed(parents):
            node = {parent: node}
        out.append(yaml.safe_dump(node, default_flow_style=False, allow_unicode=True))
    return "".join(out).replace(HUGE_INT, "9" * 5000)


def _merged_yaml_text(entries: list[tuple[str, object]]) -> str:
    """All entries in one tree (each section once, a repeated key's last value), as a user
    writes a recipe by hand."""
    tree: dict = {}
    for key, value in entries:
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return yaml.safe_dump(tree, default_flow_style=False, allow_unicode=True)


def _check_config_error(error: ConfigError, path: Path | None) -> None:
    assert error.problems, str(error)
    if path is not None:
        assert f" in {path}:" in str(error).splitlines()[0], str(error)


def _load_guarded(path: Path | None, overrides: list[str]):
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        _check_config_error(error, path)
        return error


@ROUND_TRIP
@given(entries=config_entries(hostile=False))
def test_config_file_values_all_arrive(entries):
    """Every value of an accepted file is in the config, none dropped; a refused one (values
    valid alone, a combination may not be) is refused for a field the file sets."""
    _count("config_round_trip")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(_merged_yaml_text(entries), encoding="utf-8")
        result = _load_guarded(path, [])
        if isinstance(result, ConfigError):
            assert any(key in str(result) for key, _ in entries), str(result)
            return
        flat = result.flat()
        for key, value in dict(entries).items():
            assert flat[key] == value, (key, value, flat[key])


def test_config_file_with_several_keys_per_section_is_accepted_whole(tmp_path):
    """The control for the property above: a hand-written tree of valid values loads, every
    value in place (so the property's accepted branch is really taken)."""
    entries = [("stage2.lr", 1e-4), ("stage2.warmup_steps", 5), ("model.max_length", 32),
               ("model.lora.r", 8), ("run.name", "x1")]
    path = tmp_path / "run.yaml"
    path.write_text(_merged_yaml_text(entries), encoding="utf-8")
    flat = load_config(path).flat()
    assert [flat[key] for key, _ in entries] == [value for _, value in entries]


@settings(PROFILE, max_examples=60)
@given(key=st.sampled_from(FLOAT_KEYS),
       value=st.sampled_from([".nan", ".inf", "-.inf", "1e999", "-1e999", "nan", ".NaN"]),
       as_override=st.booleans())
def test_config_refuses_non_finite_floats(key, value, as_override):
    """NaN/inf in any float field, alone (so no other problem masks it), is a ConfigError."""
    _count("config_non_finite")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        *parents, leaf = key.split(".")
        path.write_text("".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents))
                        + f"{'  ' * len(parents)}{leaf}: {value}\n")
        for args in ((None, [f"{key}={value}"]),) if as_override else ((path, []),):
            with pytest.raises(ConfigError) as caught:
                load_config(*args)
            _check_config_error(caught.value, args[0])
            assert key in str(caught.value), str(caught.value)


@HOSTILE
@given(entries=config_entries(hostile=True), as_override=st.booleans())
def test_config_hostile_values_raise_only_config_error(entries, as_override):
    """Huge ints, NaN/inf, wrong types, unknown keys: ConfigError or a valid config."""
    _count("config_hostile_values")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        if as_override:
            overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
                         .removesuffix("\n...").replace(HUGE_INT, "9" * 5000)
                         for key, value in entries]
            result = _load_guarded(None, overrides)
        else:
            path.write_text(_yaml_text(entries), encoding="utf-8")
            result = _load_guarded(path, [])
        if isinstance(result, ConfigError):
            return
        for key in FLOAT_KEYS:  # an accepted config never carries NaN/inf
            assert math.isfinite(result.flat()[key]), (key, result.flat()[key])


VALID_YAML = st.builds(lambda entries: _yaml_text(entries).encode(),
                       config_entries(hostile=False))


@HOSTILE
@given(data=VALID_YAML.flatmap(lambda text: damaged(Built({"c.yaml": text}, target="c.yaml"))))
def test_config_damaged_files_raise_only_config_error(data):
    _count("config_damaged")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(data.files["c.yaml"])
        _load_guarded(path, [])


@HOSTILE
@given(overrides=st.lists(st.text(max_size=40) | st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(sorted(DEFAULTS)),
    # Deep nesting costs ~1 s per YAML parse here; it is pinned once in the regressions below.
    st.text(max_size=30) | st.sampled_from(["[" * 50, "9" * 5000, "{a: [", "&a [*a]", ".nan",
                                            "1e999", "{a: 1, a: 2}"])),
    max_size=4))
def test_config_hostile_overrides_raise_only_config_error(overrides):
    _count("config_overrides")
    _load_guarded(None, overrides)


# --------------------------------------------------------------------------------------------
# Regression examples: each bug the properties above found, as a plain test.
# --------------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _located(error: DataError, path: Path, line: int | None, needle: str) -> None:
    assert (error.path, error.line) == (str(path), line), str(error)
    assert needle in error.reason, str(error)


@pytest.mark.parametrize("data", [b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n", b"\x1c\n\x1d",
                                  b"\xe3\x80\x80"])
@pytest.mark.parametrize("name,read", [
    ("a.csv", read_pairs), ("a.tsv", read_pairs), ("a.csv", read_nli_triplets),
    ("a.tsv", load_training_set), ("SICK_train.txt", read_sick), ("sts-train.csv", read_stsb),
])
def test_regression_bom_or_unicode_whitespace_only_file_is_empty(tmp_path, data, name, read):
    # Was: StopIteration (csv header sniffing), IndexError (tsv table, SICK header check): the
    # emptiness test looked at bytes, the readers skip lines blank by str.strip().
    path = _write(tmp_path, name, data)
    with pytest.raises(DataError) as caught:
        read(str(path)) if read in (read_pairs, load_training_set) else read(path)
    _located(caught.value, path, 1, "file is empty")


@pytest.mark.parametrize("line,needle", [
    ('{"sentence1": "a", "sentence2": "b", "score": ' + "9" * 5000 + "}", "4300 digits"),
    ("[" * 100_000 + "]" * 100_000, "nesting too deep"),
])
def test_regression_jsonl_values_the_decoder_refuses_are_bad_rows(tmp_path, line, needle):
    # Was: ValueError / RecursionError escaping json.loads (only JSONDecodeError was caught).
    good = '{"sentence1": "a", "sentence2": "b", "score": 1}\n'
    path = _write(tmp_path, "p.jsonl", (good + line + "\n" + good).encode())
    with pytest.raises(DataError) as caught:
        read_pairs(str(path))
    _located(caught.value, path, 2, needle)
    assert len(read_pairs(str(path), on_bad_row="skip")) == 2
    assert skipped_rows()[str(path)] == 1


def test_regression_json_score_beyond_float_range_is_a_bad_row(tmp_path):
    # Was: OverflowError from float(10**400) in parse_score (only ValueError was caught).
    path = _write(tmp_path, "p.jsonl",
                  b'{"sentence1": "a", "sentence2": "b", "score": 1' + b"0" * 400 + b"}\n")
    with pytest.raises(DataError) as caught:
        read_pairs(str(path))
    _located(caught.value, path, 1, "not a number")


def test_regression_repeated_header_column_is_refused(tmp_path):
    # Was: silent: the second "score" cell overwrote the first in the row dict.
    path = _write(tmp_path, "p.csv", b"sentence1,sentence2,score,score\na,b,1,2\n")
    with pytest.raises(DataError) as caught:
        read_pairs(str(path))
    _located(caught.value, path, 1, "'score' more than once")


@pytest.mark.parametrize("source", ["0", "false", "[]"])
def test_regression_falsy_non_text_source_is_a_bad_row(tmp_path, source):
    # Was: silent: `record.get("source") or ""` turned 0 / false / [] into "no source".
    path = _write(tmp_path, "p.jsonl", ('{"sentence1": "a", "sentence2": "b", "score": 1, '
                                        f'"source": {source}}}\n').encode())
    with pytest.raises(DataError) as caught:
        read_pairs(str(path))
    _located(caught.value, path, 1, "not text")


def test_regression_repeated_config_section_is_refused_not_half_dropped(tmp_path):
    # Was: silent: the second `model:` block replaced the first, dropping double_quant.
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  qlora:\n    double_quant: false\nmodel:\n  attn_implementation: "
                    "auto\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    _check_config_error(caught.value, path)
    assert "found key 'model' again (first at line 1, column 1)" in str(caught.value)
    assert "line 4" in str(caught.value)


def test_regression_key_repeated_on_one_line_is_refused(tmp_path):
    # Was: silent: repeats were told apart by line number, so `{r: 64, r: 8}` kept r = 8.
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  lora: {r: 64, r: 8}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    _check_config_error(caught.value, path)
    assert "found key 'r' again (first at line 2, column 10)" in str(caught.value)


def test_regression_yaml_merge_keys_load_and_explicit_keys_override(tmp_path):
    # Was: ConstructorError for `<<: *base`, which yaml.safe_load accepts.
    path = tmp_path / "run.yaml"
    path.write_text("stage1: &base\n  lr: 1.0e-4\n  warmup_steps: 7\n"
                    "stage2:\n  <<: *base\n  lr: 3.0e-4\n")
    cfg = load_config(path)
    assert (cfg.stage1.lr, cfg.stage1.warmup_steps) == (1e-4, 7)
    assert (cfg.stage2.lr, cfg.stage2.warmup_steps) == (3e-4, 7)


@pytest.mark.parametrize("text,needle", [
    ("stage2:\n  lr: " + "9" * 5000 + "\n", "4300 digits"),
    ("stage2:\n  lr: " + "[" * 3000 + "]" * 3000 + "\n", "nesting too deep"),
])
def test_regression_yaml_values_pyyaml_cannot_build_are_config_errors(tmp_path, text, needle):
    # Was: ValueError / RecursionError escaping yaml.safe_load.
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    _check_config_error(caught.value, path)
    assert needle in str(caught.value)


@pytest.mark.parametrize("value", ["9" * 5000, "[" * 3000 + "]" * 3000])
def test_regression_override_values_pyyaml_cannot_build_are_config_errors(value):
    # Was: ValueError / RecursionError escaping the override parser.
    with pytest.raises(ConfigError, match="stage2.lr: got"):
        load_config(None, [f"stage2.lr={value}"])


def test_regression_integer_beyond_float_range_for_a_float_field(tmp_path):
    # Was: OverflowError from float(10**400) while coercing stage2.lr.
    path = tmp_path / "run.yaml"
    path.write_text("stage2:\n  lr: 1" + "0" * 400 + "\n")
    with pytest.raises(ConfigError, match=r"stage2\.lr: got 10{400}, expected float"):
        load_config(path)


@pytest.mark.parametrize("field", ["weight_decay", "grad_clip"])
@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_regression_non_finite_weight_decay_and_grad_clip_are_refused(field, value):
    # Was: silent: `x < 0` is False for NaN, and inf passed; both reached the optimizer.
    with pytest.raises(ConfigError, match=rf"stage1\.{field}: got (nan|inf)"):
        load_config(None, [f"stage1.{field}={value}"])
