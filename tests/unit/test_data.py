"""Tests of pcc_dist.data readers, data-root resolution, loading and the pcc-data command.

Synthetic files are built in tmp_path; the real-data smoke tests read /work/shared/data (through
resolve_data_root) and assert the MANIFEST counts.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from pcc_dist import data
from pcc_dist.data import (
    STS7_TASKS,
    DataError,
    ScoredPair,
    Triplet,
    load_sts7,
    load_sts_task,
    load_training_set,
    read_nli_triplets,
    read_pairs,
    read_senteval_sts,
    read_sick,
    read_stsb,
    rescale_scores,
    reset_skipped_rows,
    resolve_data_root,
    skipped_rows,
)
from pcc_dist.data import sources as data_sources
from pcc_dist.data_cli import data_main

SICK_HEADER = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"


def stsb_row(score: str = "2.5", s1: str = "a girl is styling her hair .",
             s2: str = "a girl is brushing her hair .", extra: tuple[str, ...] = ()) -> str:
    return "\t".join(("main-captions", "MSRvid", "2012test", "0024", score, s1, s2, *extra))


def sick_row(score: str = "3.3", s1: str = "A boy plays", s2: str = "A kid plays") -> str:
    return "\t".join(("6", s1, s2, score, "NEUTRAL"))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_sts_folder(folder: Path, subsets: dict[str, tuple[list[str], list[str]]]) -> Path:
    """Write SentEval STS files: subset -> (input lines, gold lines)."""
    for name, (inputs, golds) in subsets.items():
        write(folder / f"STS.input.{name}.txt", "".join(line + "\n" for line in inputs))
        write(folder / f"STS.gs.{name}.txt", "".join(line + "\n" for line in golds))
    return folder


def make_data_root(root: Path) -> Path:
    """A tiny data root with the layout of /work/shared/data."""
    for year in ("STS12", "STS13", "STS14", "STS15", "STS16"):
        write_sts_folder(root / "sts" / f"{year}-en-test", {
            "headlines": ([f"{year} one .\t{year} uno .", f"{year} two .\t{year} dos .",
                           "not scored .\tnot scored either ."], ["4.0", "1.0", ""])})
    for split in ("train", "dev", "test"):
        write(root / "sts" / "STSBenchmark" / f"sts-{split}.csv",
              stsb_row("3.0", f"{split} a .", f"{split} b .") + "\n"
              + stsb_row("1.0", f"{split} c .", f"{split} d .") + "\n")
    for name in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt"):
        write(root / "sts" / "SICK" / name,
              f"{SICK_HEADER}\n{sick_row('4.5', name + ' x', name + ' y')}\n")
    stage2 = [
        {"sentence1": "STS12 One.", "sentence2": "STS12 uno", "score": 4.0, "source": "stsb"},
        {"sentence1": "Fresh pair", "sentence2": "Never tested", "score": 2.0, "source": "stsb"},
        {"sentence1": "SICK kid", "sentence2": "SICK boy", "score": 3.0, "source": "sickr"},
    ]
    write(root / "stage2" / "stsb_sickr_train.jsonl",
          "".join(json.dumps(row) + "\n" for row in stage2))
    write(root / "nli" / "nli_for_simcse_devtest.csv",
          'sent0,sent1,hard_neg\n"A man, tall",A man,A woman\nDogs run,Animals move,Cats sleep\n')
    return root


@pytest.fixture(autouse=True)
def _clean_registry():
    reset_skipped_rows()
    yield
    reset_skipped_rows()


# ---------------------------------------------------------------------------------------------
# Bad-row classes: each error names the file and the 1-based line.


def assert_located(exc: DataError, path: Path, line: int | None, *fragments: str) -> None:
    message = str(exc)
    assert path.name in message, message
    assert exc.path == str(path)
    if line is not None:
        assert f":{line}:" in message, message
        assert exc.line == line
    for fragment in fragments:
        assert fragment in message, message


def test_stsb_missing_column(tmp_path):
    path = write(tmp_path / "sts.csv", stsb_row() + "\n" + "\t".join(stsb_row().split("\t")[:6])
                 + "\n")
    with pytest.raises(DataError) as info:
        read_stsb(path)
    assert_located(info.value, path, 2, "missing column 'sentence2'", "found 6")


def test_sick_missing_column(tmp_path):
    path = write(tmp_path / "SICK.txt", f"{SICK_HEADER}\n{sick_row()}\n6\tonly one\n")
    with pytest.raises(DataError) as info:
        read_sick(path)
    assert_located(info.value, path, 3, "missing column 'sentence_B'")


def test_stsb_too_many_columns_is_not_silently_accepted(tmp_path):
    path = write(tmp_path / "sts.csv", stsb_row(extra=("x",)) + "\n")
    with pytest.raises(DataError) as info:
        read_stsb(path)
    assert_located(info.value, path, 1, "expected 7 or 9", "found 8")


@pytest.mark.parametrize("score", ["abc", "", "4,5"])
def test_stsb_non_numeric_score(tmp_path, score):
    path = write(tmp_path / "sts.csv", stsb_row() + "\n" + stsb_row(score) + "\n")
    with pytest.raises(DataError) as info:
        read_stsb(path)
    assert_located(info.value, path, 2, "not a number", repr(score))


@pytest.mark.parametrize("score", ["nan", "inf", "-Infinity"])
def test_stsb_non_finite_score(tmp_path, score):
    path = write(tmp_path / "sts.csv", stsb_row(score) + "\n")
    with pytest.raises(DataError) as info:
        read_stsb(path)
    assert_located(info.value, path, 1, "not a finite number")


def test_stsb_out_of_range_score(tmp_path):
    path = write(tmp_path / "sts.csv", stsb_row() + "\n" + stsb_row() + "\n" + stsb_row("5.5")
                 + "\n")
    with pytest.raises(DataError) as info:
        read_stsb(path)
    assert_located(info.value, path, 3, "score 5.5", "outside the allowed range [0, 5]")


def test_sick_out_of_range_score(tmp_path):
    path = write(tmp_path / "SICK.txt", f"{SICK_HEADER}\n{sick_row('0.5')}\n")
    with pytest.raises(DataError) as info:
        read_sick(path)
    assert_located(info.value, path, 2, "outside the allowed range [1, 5]")


def test_sts_gold_out_of_range_names_the_gold_file(tmp_path):
    folder = write_sts_folder(tmp_path / "STS12-en-test",
                              {"MSRpar": (["a\tb", "c\td"], ["1.0", "6.0"])})
    with pytest.raises(DataError) as info:
        read_senteval_sts(folder)
    assert_located(info.value, folder / "STS.gs.MSRpar.txt", 2, "outside the allowed range")


def test_generic_out_of_range_with_score_range(tmp_path):
    path = write(tmp_path / "pairs.tsv", "sentence1\tsentence2\tscore\na\tb\t0.5\nc\td\t1.5\n")
    assert len(read_pairs(str(path), score_range=(0.0, 2.0))) == 2
    with pytest.raises(DataError) as info:
        read_pairs(str(path), score_range=(0.0, 1.0))
    assert_located(info.value, path, 3, "outside the allowed range [0, 1]")


def test_generic_known_source_range_is_checked(tmp_path):
    path = write(tmp_path / "pairs.jsonl",
                 '{"sentence1": "a", "sentence2": "b", "score": 0.5, "source": "sickr"}\n')
    with pytest.raises(DataError) as info:
        read_pairs(str(path))
    assert_located(info.value, path, 1, "outside the allowed range [1, 5]")


@pytest.mark.parametrize("s1, s2, column", [("", "b .", "sentence1"), ("a .", "   ", "sentence2")])
def test_stsb_empty_sentence(tmp_path, s1, s2, column):
    path = write(tmp_path / "sts.csv", stsb_row() + "\n" + stsb_row("1.0", s1, s2) + "\n")
    with pytest.raises(DataError) as info:
        read_stsb(path)
    assert_located(info.value, path, 2, f"empty sentence in column {column!r}")


def test_sts_empty_sentence(tmp_path):
    folder = write_sts_folder(tmp_path / "STS13-en-test", {"FNWN": (["a\t "], ["2"])})
    with pytest.raises(DataError) as info:
        read_senteval_sts(folder)
    assert_located(info.value, folder / "STS.input.FNWN.txt", 1, "empty sentence")


def test_invalid_utf8_names_the_line(tmp_path):
    body = (stsb_row() + "\n").encode() * 2 + stsb_row(s1="caf\xe9").encode("latin-1") + b"\n"
    path = write(tmp_path / "sts.csv", body)
    with pytest.raises(DataError) as info:
        read_stsb(path)
    assert_located(info.value, path, 3, "invalid UTF-8", "\\xe9")


def test_invalid_utf8_in_csv_triplets(tmp_path):
    path = write(tmp_path / "nli.csv", b"sent0,sent1,hard_neg\na,b,c\n\xff\xfe,b,c\n")
    with pytest.raises(DataError) as info:
        read_nli_triplets(path)
    assert_located(info.value, path, 3, "invalid UTF-8")


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
@pytest.mark.parametrize("reader", [read_stsb, read_sick, read_nli_triplets,
                                    lambda p: read_pairs(str(p))])
def test_empty_file(tmp_path, content, reader):
    path = write(tmp_path / "empty.csv", content)
    with pytest.raises(DataError) as info:
        reader(path)
    assert_located(info.value, path, 1, "file is empty")


def test_header_only_file_has_no_rows(tmp_path):
    path = write(tmp_path / "SICK.txt", SICK_HEADER + "\n")
    with pytest.raises(DataError, match="no data rows") as info:
        read_sick(path)
    assert info.value.path == str(path)


def test_sts_line_count_mismatch(tmp_path):
    folder = write_sts_folder(tmp_path / "STS14-en-test",
                              {"images": (["a\tb", "c\td", "e\tf"], ["1", "2"])})
    with pytest.raises(DataError) as info:
        read_senteval_sts(folder, on_bad_row="skip")  # structural: not skippable
    assert_located(info.value, folder / "STS.input.images.txt", 3, "3 lines",
                   "STS.gs.images.txt has 2")


def test_sts_unpaired_input_file(tmp_path):
    folder = write_sts_folder(tmp_path / "STS15-en-test", {"belief": (["a\tb"], ["1"])})
    write(folder / "STS.input.orphan.txt", "a\tb\n")
    with pytest.raises(DataError, match=r"STS\.input\.orphan\.txt has no matching STS\.gs"):
        read_senteval_sts(folder)


def test_jsonl_invalid_json_line(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n{oops\n')
    with pytest.raises(DataError) as info:
        read_pairs(str(path))
    assert_located(info.value, path, 2, "invalid JSON")


def test_jsonl_missing_key_and_bool_score(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"sentence1": "a", "score": 1}\n')
    with pytest.raises(DataError) as info:
        read_pairs(str(path))
    assert_located(info.value, path, 1, "missing column 'sentence2'")
    path = write(tmp_path / "q.jsonl", '{"sentence1": "a", "sentence2": "b", "score": true}\n')
    with pytest.raises(DataError, match="not a number"):
        read_pairs(str(path))


def test_csv_header_missing_column_is_structural(tmp_path):
    path = write(tmp_path / "p.csv", "text_a,text_b,label\na,b,1\n")
    with pytest.raises(DataError) as info:
        read_pairs(str(path), on_bad_row="skip")
    assert_located(info.value, path, 1, "header has no column 'sentence1'", "columns=")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_stsb(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="file not found"):
        read_pairs(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("reader", [read_stsb, read_sick, read_nli_triplets,
                                    lambda p, **kw: read_pairs(str(p), **kw),
                                    lambda p, **kw: read_senteval_sts(p.parent, **kw),
                                    lambda p, **kw: load_training_set(str(p), **kw)])
def test_unknown_on_bad_row_is_value_error(tmp_path, reader):
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        reader(tmp_path / "whatever.csv", on_bad_row="ignore")


# ---------------------------------------------------------------------------------------------
# Skip mode: counted, logged, retrievable.


def test_skip_mode_counts_logs_and_records(tmp_path, caplog):
    lines = [stsb_row(), stsb_row("abc"), stsb_row("1.0"), stsb_row("9"), stsb_row("nan")]
    path = write(tmp_path / "sts.csv", "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="pcc_dist.data"):
        pairs = read_stsb(path, on_bad_row="skip")
    assert [p.score for p in pairs] == [2.5, 1.0]
    assert skipped_rows() == {str(path): 3}
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "skipped 3 bad row(s)" in warning[0].getMessage()
    assert "line 2" in warning[0].getMessage()


def test_skip_mode_with_no_bad_rows_records_zero(tmp_path, caplog):
    path = write(tmp_path / "sts.csv", stsb_row() + "\n")
    with caplog.at_level(logging.WARNING, logger="pcc_dist.data"):
        assert len(read_stsb(path, on_bad_row="skip")) == 1
    assert skipped_rows() == {str(path): 0}
    assert not caplog.records


def test_skip_mode_sts_folder_and_invalid_utf8(tmp_path):
    folder = tmp_path / "STS16-en-test"
    write_sts_folder(folder, {"headlines": (["a\tb", "c\td", "e"], ["1", "2", "3"])})
    write(folder / "STS.input.plagiarism.txt", b"a\tb\n\xff\tq\n")
    write(folder / "STS.gs.plagiarism.txt", "1\n2\n")
    task = read_senteval_sts(folder, on_bad_row="skip")
    assert {k: len(v) for k, v in task.subsets.items()} == {"headlines": 2, "plagiarism": 1}
    assert skipped_rows() == {str(folder / "STS.input.headlines.txt"): 1,
                              str(folder / "STS.input.plagiarism.txt"): 1}


def test_skip_mode_all_rows_bad_is_an_error(tmp_path):
    path = write(tmp_path / "sts.csv", stsb_row("x") + "\n" + stsb_row("y") + "\n")
    with pytest.raises(DataError, match="all 2 rows were bad"):
        read_stsb(path, on_bad_row="skip")


def test_skip_mode_generic_and_triplets(tmp_path):
    pairs = write(tmp_path / "p.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                  '[1, 2]\n{"sentence1": "", "sentence2": "b", "score": 1}\n')
    assert len(read_pairs(str(pairs), on_bad_row="skip")) == 1
    triplets = write(tmp_path / "t.csv", "sent0,sent1,hard_neg\na,b,c\nd,e\nf,,g\n")
    assert read_nli_triplets(triplets, on_bad_row="skip") == [Triplet("a", "b", "c")]
    assert skipped_rows() == {str(pairs): 2, str(triplets): 2}


# ---------------------------------------------------------------------------------------------
# Format details.


def test_stsb_nine_columns_and_stray_quotes(tmp_path):
    rows = [stsb_row("1.0", 'He said "no', "b .", extra=("src-a", "src-b")),
            stsb_row("2.0", "c .", 'd "quoted" ."'),
            stsb_row("3.0", '"', "f .")]
    path = write(tmp_path / "sts-train.csv", "\n".join(rows) + "\n")
    pairs = read_stsb(path)
    assert pairs == [ScoredPair('He said "no', "b .", 1.0, "stsb"),
                     ScoredPair("c .", 'd "quoted" ."', 2.0, "stsb"),
                     ScoredPair('"', "f .", 3.0, "stsb")]


def test_sick_header_crlf_and_missing_header(tmp_path):
    path = write(tmp_path / "SICK_test_annotated.txt",
                 f"{SICK_HEADER}\r\n{sick_row('3.3')}\r\n{sick_row('1')}\r\n")
    pairs = read_sick(path)
    assert pairs == [ScoredPair("A boy plays", "A kid plays", 3.3, "sickr"),
                     ScoredPair("A boy plays", "A kid plays", 1.0, "sickr")]
    headless = write(tmp_path / "SICK_train.txt", f"{sick_row()}\n")
    with pytest.raises(DataError) as info:
        read_sick(headless)
    assert_located(info.value, headless, 1, "expected a header line starting with 'pair_ID'")


def test_senteval_rules(tmp_path):
    """Empty gold lines dropped, extra input columns ignored, SentEval subset order."""
    folder = write_sts_folder(tmp_path / "STS12-en-test", {
        "surprise.SMTnews": (["x\ty\tattrib\tmore"], ["0"]),
        "MSRpar": (["a\tb", "c\td", "e\tf"], ["1.5", "", "5"]),
        "zzz-own": (["g\th"], ["2"]),
        "MSRvid": ([" i \tj"], ["3"]),
    })
    task = read_senteval_sts(folder)
    assert task.name == "STS12"
    assert list(task.subsets) == ["MSRpar", "MSRvid", "surprise.SMTnews", "zzz-own"]
    assert task.subsets["MSRpar"] == [ScoredPair("a", "b", 1.5, "MSRpar"),
                                      ScoredPair("e", "f", 5.0, "MSRpar")]
    assert task.subsets["surprise.SMTnews"] == [ScoredPair("x", "y", 0.0, "surprise.SMTnews")]
    assert task.subsets["MSRvid"][0].sentence1 == "i"
    assert len(task) == 5 and len(task.pairs) == 5


def test_read_pairs_formats_and_columns(tmp_path):
    csv_path = write(tmp_path / "p.csv",
                     'sentence1,sentence2,score,source\n"a, with comma","b\nsecond line",4,stsb\n'
                     "c,d,2,\n")
    assert read_pairs(str(csv_path)) == [ScoredPair("a, with comma", "b\nsecond line", 4.0, "stsb"),
                                         ScoredPair("c", "d", 2.0, "")]
    bad_csv = write(tmp_path / "q.csv", 'sentence1,sentence2,score\n"a\nb",c,1\nd,e,x\n')
    with pytest.raises(DataError) as info:
        read_pairs(str(bad_csv))
    assert_located(info.value, bad_csv, 4, "not a number")  # line numbers survive the newline
    tsv_path = write(tmp_path / "p.tsv", 'q1\tq2\tlabel\n"a\tb"\t0.5\n')
    assert read_pairs(str(tsv_path), columns=("q1", "q2", "label")) == [
        ScoredPair('"a', 'b"', 0.5, "")]
    jsonl = write(tmp_path / "p.jsonl", '{"x": "a", "y": "b", "s": "3.5"}\n\n')
    assert read_pairs(str(jsonl), columns={"sentence1": "x", "sentence2": "y", "score": "s"}) == [
        ScoredPair("a", "b", 3.5, "")]
    with pytest.raises(ValueError, match="unknown roles"):
        read_pairs(str(jsonl), columns={"text": "x"})


def test_read_pairs_tab_separated_csv_suffix(tmp_path):
    path = write(tmp_path / "p.csv", "sentence1\tsentence2\tscore\na\tb\t1\n")
    assert read_pairs(str(path)) == [ScoredPair("a", "b", 1.0, "")]


def test_read_pairs_unsupported_suffix(tmp_path):
    path = write(tmp_path / "p.parquet", "x")
    with pytest.raises(DataError, match="unsupported file type '.parquet'"):
        read_pairs(str(path))


def test_triplets_header_forms(tmp_path):
    three = write(tmp_path / "t.csv", 'sent0,sent1,hard_neg\n"x, y",z,w\n')
    assert read_nli_triplets(three) == [Triplet("x, y", "z", "w")]
    two = write(tmp_path / "u.csv", "sent0,sent1\nx,z\n")
    assert read_nli_triplets(two) == [Triplet("x", "z", None)]
    wrong = write(tmp_path / "v.csv", "premise,hypothesis,neg\nx,z,w\n")
    with pytest.raises(DataError) as info:
        read_nli_triplets(wrong)
    assert_located(info.value, wrong, 1, "expected the SimCSE header sent0,sent1,hard_neg")
    broken = write(tmp_path / "w.csv", 'sent0,sent1,hard_neg\nx,"unterminated,w\n')
    with pytest.raises(DataError, match="CSV parse error"):
        read_nli_triplets(broken)


# ---------------------------------------------------------------------------------------------
# Hub ids (datasets is faked: no network in tests).


class _FakeDataset(list):
    column_names = ["sentence1", "sentence2", "score"]


def test_hub_id_uses_datasets(monkeypatch):
    calls = []

    def load_dataset(repo, split):
        calls.append((repo, split))
        return _FakeDataset([{"sentence1": "a", "sentence2": "b", "score": 0.4},
                             {"sentence1": "c", "sentence2": "", "score": 0.1}])

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    assert read_pairs("owner/sts:validation", on_bad_row="skip") == [ScoredPair("a", "b", 0.4)]
    assert calls == [("owner/sts", "validation")]
    assert skipped_rows() == {"owner/sts:validation": 1}
    with pytest.raises(DataError) as info:
        read_pairs("owner/sts")
    assert "owner/sts:2: empty sentence" in str(info.value)


def test_hub_id_without_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    with pytest.raises(DataError, match=r"pcc-dist\[hub\]"):
        read_pairs("owner/some-sts")


def test_hub_id_offline_error(monkeypatch):
    def load_dataset(repo, split):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    with pytest.raises(DataError) as info:
        read_pairs("owner/some-sts")
    message = str(info.value)
    assert "owner/some-sts" in message and "Offline?" in message and "ConnectionError" in message


# ---------------------------------------------------------------------------------------------
# Score rescaling.


def test_rescale_scores():
    pairs = [ScoredPair("a", "b", 5.0, "stsb"), ScoredPair("a", "b", 2.0, "sickr"),
             ScoredPair("a", "b", 0.0, "stsb")]
    assert [p.score for p in rescale_scores(pairs)] == [1.0, 0.25, 0.0]
    assert rescale_scores(pairs, "none") == pairs
    with pytest.raises(ValueError, match="rescale mode"):
        rescale_scores(pairs, "minmax")


def test_rescale_unknown_source_by_declared_then_observed_range(caplog):
    mine = [ScoredPair("a", "b", 2.0, "mine.csv"), ScoredPair("c", "d", 4.0, "mine.csv"),
            ScoredPair("e", "f", 5.0, "stsb")]
    # Declared: low -> 0, high -> 1; a known source keeps its own range.
    assert [p.score for p in rescale_scores(mine, score_range=(0.0, 8.0))] == [0.25, 0.5, 1.0]
    assert not caplog.records
    # Not declared: the observed min and max of that source, with a warning saying so.
    with caplog.at_level(logging.WARNING, logger="pcc_dist.data._core"):
        assert [p.score for p in rescale_scores(mine)] == [0.0, 1.0, 1.0]
    assert "source 'mine.csv' has no known score range" in caplog.text
    assert "observed range [2, 4]" in caplog.text and "data.score_range" in caplog.text


def test_rescale_refuses_a_source_with_one_score_value():
    with pytest.raises(DataError, match=r"all 2 scores of source 'mine.csv' are 3: no "
                                        r"similarity signal.*data.score_scaling=none"):
        rescale_scores([ScoredPair("a", "b", 3.0, "mine.csv"), ScoredPair("c", "d", 3.0,
                                                                           "mine.csv")])


# ---------------------------------------------------------------------------------------------
# Data root resolution and loading by name.


def test_resolve_data_root_order(tmp_path, monkeypatch):
    config_dir, env_dir, default_dir = (tmp_path / n for n in ("config", "env", "default"))
    for folder in (config_dir, env_dir, default_dir):
        folder.mkdir()
    monkeypatch.setattr(data_sources, "_default_candidates",
                        lambda: [("default", default_dir)])
    monkeypatch.setenv("PCC_DATA_DIR", str(env_dir))
    assert resolve_data_root(str(config_dir)) == config_dir.resolve()
    assert resolve_data_root(None) == env_dir.resolve()
    assert resolve_data_root("") == env_dir.resolve()  # empty config value means unset
    monkeypatch.delenv("PCC_DATA_DIR")
    assert resolve_data_root() == default_dir.resolve()


def test_resolve_data_root_errors_list_places(tmp_path, monkeypatch):
    monkeypatch.delenv("PCC_DATA_DIR", raising=False)
    first, second = tmp_path / "a" / "shared" / "data", tmp_path / "b" / "shared" / "data"
    monkeypatch.setattr(data_sources, "_default_candidates",
                        lambda: [("project", first), ("cwd", second)])
    with pytest.raises(DataError) as info:
        resolve_data_root()
    message = str(info.value)
    for fragment in ("data.root (config): not set", "$PCC_DATA_DIR: not set", str(first),
                     str(second)):
        assert fragment in message
    monkeypatch.setenv("PCC_DATA_DIR", str(tmp_path / "missing-env"))
    with pytest.raises(DataError, match=r"missing-env \(from \$PCC_DATA_DIR\) is not a folder"):
        resolve_data_root()
    with pytest.raises(DataError, match=r"missing-cfg \(from data.root \(config\)\)"):
        resolve_data_root(str(tmp_path / "missing-cfg"))


def test_default_candidates_point_at_shared_data():
    project = Path(data_sources.__file__).resolve().parents[2]
    paths = [path for _, path in data_sources._default_candidates()]
    assert (Path.cwd().parent / "shared" / "data").resolve() in paths
    if (project / "setup.py").is_file():
        assert paths[0] == (project.parent / "shared" / "data").resolve()


def test_load_tasks_and_training_sets_from_a_root(tmp_path):
    root = make_data_root(tmp_path / "root")
    tasks = load_sts7(root)
    assert list(tasks) == list(STS7_TASKS)
    assert len(tasks["STS12"]) == 2 and len(tasks["SICKRelatedness"]) == 1
    assert list(tasks["STSBenchmark"].subsets) == ["test"]
    dev = load_sts_task("STSBenchmark", root, split="dev")
    assert list(dev.subsets) == ["dev"] and dev.pairs[0].sentence1 == "dev a ."
    trial = load_sts_task("SICKRelatedness", root, split="trial")
    assert trial.pairs[0].sentence1 == "SICK_trial.txt x"
    assert load_sts_task("SICKRelatedness", root, split="train").pairs[0].source == "sickr"
    with pytest.raises(DataError, match="only a 'test' split"):
        load_sts_task("STS12", root, split="train")
    with pytest.raises(DataError, match="unknown STS task 'STS17'"):
        load_sts_task("STS17", root)
    stage2 = load_training_set("stage2", root)
    assert [p.source for p in stage2] == ["stsb", "stsb", "sickr"]
    assert load_training_set("nli", root)[0] == Triplet("A man, tall", "A man", "A woman")


def test_load_training_set_detects_local_kind(tmp_path):
    triplets = write(tmp_path / "mine.csv", "sent0,sent1,hard_neg\na,b,c\n")
    assert load_training_set(str(triplets)) == [Triplet("a", "b", "c")]
    jsonl_triplets = write(tmp_path / "mine.jsonl", '{"sent0": "a", "sent1": "b"}\n')
    assert load_training_set(str(jsonl_triplets)) == [Triplet("a", "b", None)]
    pairs = write(tmp_path / "pairs.tsv", "sentence1\tsentence2\tscore\tsource\na\tb\t4\tstsb\n")
    assert load_training_set(str(pairs)) == [ScoredPair("a", "b", 4.0, "stsb")]
    with pytest.raises(DataError, match="built-in training set 'stage2' is missing"):
        load_training_set("stage2", tmp_path)


def test_load_training_set_names_sourceless_rows_after_the_file(tmp_path):
    path = write(tmp_path / "mine.csv", "sentence1,sentence2,score,source\na,b,4,\nc,d,1,stsb\n")
    assert [p.source for p in load_training_set(str(path))] == ["mine.csv", "stsb"]
    plain = write(tmp_path / "plain.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 7}\n')
    assert load_training_set(str(plain)) == [ScoredPair("a", "b", 7.0, "plain.jsonl")]


def test_load_training_set_checks_the_declared_range_of_unknown_sources_only(tmp_path):
    path = write(tmp_path / "mine.csv",
                 "sentence1,sentence2,score,source\na,b,4.5,stsb\nc,d,0.5,\ne,f,250,\n")
    with pytest.raises(DataError) as info:
        load_training_set(str(path), score_range=(0.0, 1.0))
    # Line 2 (stsb 4.5) is inside stsb's 0-5 although outside the declared [0, 1].
    assert_located(info.value, path, 4, "score 250 in column 'score' is outside the allowed "
                                        "range [0, 1]")


# ---------------------------------------------------------------------------------------------
# pcc-data check


def test_pcc_data_check_synthetic(tmp_path, capsys):
    root = make_data_root(tmp_path / "root")
    out = tmp_path / "report" / "check.json"
    assert data_main(["check", "--data-root", str(root), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stsb" in printed and "removed" in printed
    result = json.loads(out.read_text())
    report = result["decontamination"]
    assert report["total"] == 3 and report["kept"] == 2
    assert report["removed_per_source"] == {"stsb": 1, "sickr": 0}
    assert report["removed_per_task"]["STS12"] == 1
    assert result["test_pairs"]["STS12"] == 2


def test_pcc_data_check_errors(tmp_path, capsys):
    assert data_main(["check", "--data-root", str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert data_main([]) == 2


def test_pcc_data_check_refuses_what_stage2_scaling_would(tmp_path, capsys):
    root = make_data_root(tmp_path / "root")
    same = write(tmp_path / "same.csv", "sentence1,sentence2,score\na,b,3\nc,d,3\n")
    assert data_main(["check", "--data-root", str(root), "--train", str(same)]) == 1
    assert "all 2 scores of source 'same.csv' are 3" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "needle"), [
    (["--score-range", "5", "0"], "--score-range: got [5.0, 0.0]; give [low, high] with "
                                  "low < high"),
    (["--json", "FILE/x.json"], "is a file, not a folder"),
])
def test_pcc_data_check_usage_errors_before_any_work(tmp_path, capsys, args, needle):
    blocker = write(tmp_path / "FILE", "")
    args = [a.replace("FILE", str(blocker)) for a in args]
    assert data_main(["check", "--data-root", str(tmp_path / "nope"), *args]) == 2
    assert needle in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Real data (/work/shared/data): MANIFEST counts.


def _real_root() -> Path:
    try:
        return resolve_data_root()
    except DataError as exc:
        pytest.skip(f"shared data folder absent: {exc}")


REAL_COUNTS = {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
               "STSBenchmark": 1379, "SICKRelatedness": 4927}


def test_real_sts7_counts():
    tasks = load_sts7(_real_root())
    assert {name: len(task) for name, task in tasks.items()} == REAL_COUNTS
    assert [len(p) for p in tasks["STS13"].subsets.values()] == [189, 750, 561]
    assert list(tasks["STS14"].subsets) == ["deft-forum", "deft-news", "headlines", "images",
                                            "OnWN", "tweet-news"]


def test_real_training_sets_and_splits():
    root = _real_root()
    stage2 = load_training_set("stage2", root)
    assert len(stage2) == 10249
    assert sum(p.source == "stsb" for p in stage2) == 5749
    assert len(load_training_set("nli", root)) == 11809
    assert len(load_sts_task("STSBenchmark", root, split="train")) == 5749
    assert len(load_sts_task("STSBenchmark", root, split="dev")) == 1500
    assert len(load_sts_task("SICKRelatedness", root, split="train")) == 4500
    assert len(load_sts_task("SICKRelatedness", root, split="dev")) == 500


def test_real_raw_copies_parse():
    """sts-raw/ has 4-column STS16 inputs and 9-column STS-B rows with stray quotes."""
    root = _real_root()
    raw16 = read_senteval_sts(root / "sts-raw" / "STS16-en-test")
    assert len(raw16) == REAL_COUNTS["STS16"]
    assert len(read_stsb(root / "sts-raw" / "STSBenchmark" / "sts-train.csv")) == 5749
    assert len(read_stsb(root / "sts-raw" / "STSBenchmark" / "sts-test.csv")) == 1379


def test_package_exports_public_names():
    for name in ("DataError", "ScoredPair", "Triplet", "StsTask", "STS7_TASKS",
                 "resolve_data_root", "read_senteval_sts", "read_stsb", "read_sick",
                 "read_nli_triplets", "read_pairs", "load_sts_task", "load_sts7",
                 "load_training_set", "normalise_text", "DecontaminationReport", "decontaminate",
                 "rescale_scores"):
        assert hasattr(data, name), name
    assert issubclass(DataError, ValueError)


def test_a_bad_first_jsonl_row_does_not_decide_the_kind_of_the_file(tmp_path):
    """Found by the hostile-input property under load: a triplet file whose first row lacks
    ``sent0`` was read as scored pairs, so skip mode refused every row."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"sent1": "0", "hard_neg": "0"}\n'
                    '{"sent0": "a", "sent1": "b", "hard_neg": "c"}\n')
    assert load_training_set(str(path), on_bad_row="skip") == [Triplet("a", "b", "c")]
    with pytest.raises(DataError) as caught:
        load_training_set(str(path))
    assert caught.value.line == 1 and "sent0" in str(caught.value)
