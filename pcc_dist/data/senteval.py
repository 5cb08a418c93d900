"""Reader of SentEval STS12-16 folders (``STS.input.X.txt`` + ``STS.gs.X.txt``)."""

from __future__ import annotations

from pathlib import Path

from pcc_dist.data._core import (
    BadRows,
    DataError,
    ScoredPair,
    StsTask,
    check_policy,
    missing_column,
    parse_score,
    parse_sentence,
    read_lines,
)
from pcc_dist.data.readers import STS_SCORE_RANGE

# Subset order exactly as SentEval's STS12-16 classes list them (senteval/sts.py). Subsets found
# in a folder but not listed here (a user's own folder) follow in sorted order.
SENTEVAL_SUBSETS: dict[str, tuple[str, ...]] = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}

_INPUT_PREFIX, _GOLD_PREFIX = "STS.input.", "STS.gs."


def read_senteval_sts(folder: Path, *, on_bad_row: str = "error") -> StsTask:
    """Read a SentEval STS12-16 folder.

    Every ``STS.input.X.txt`` is paired line by line with ``STS.gs.X.txt``; lines whose gold line
    is empty are dropped (SentEval's rule: some subsets score only part of their inputs). The first
    two tab-separated columns of an input line are the sentences; more columns are allowed because
    the raw STS16 release carries source attribution in columns 3-4.

    Subsets are ordered as SentEval lists them (``SENTEVAL_SUBSETS``), unknown ones sorted after.
    The task name comes from the folder name (``STS12-en-test`` -> ``STS12``). Each pair's
    ``source`` is its subset name.

    Args:
        folder: The ``STS1x-en-test`` folder.
        on_bad_row: ``"error"`` or ``"skip"``.

    Returns:
        The task with one subset per input file.

    Raises:
        DataError: Missing folder or files, input/gold line-count mismatch, or a bad row in error
            mode.
        ValueError: Unknown ``on_bad_row``.
    """
    check_policy(on_bad_row)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("STS folder not found", path=folder)
    task_name = folder.name.split("-")[0]
    subsets = {name: _read_sts_subset(folder, name, on_bad_row)
               for name in _sts_subset_names(folder, task_name)}
    return StsTask(name=task_name, subsets=subsets)


def _sts_subset_names(folder: Path, task_name: str) -> list[str]:
    """Subset names present in ``folder``, in SentEval order; unpaired files are errors."""
    inputs = {p.name[len(_INPUT_PREFIX):-len(".txt")] for p in folder.glob(_INPUT_PREFIX + "*.txt")}
    golds = {p.name[len(_GOLD_PREFIX):-len(".txt")] for p in folder.glob(_GOLD_PREFIX + "*.txt")}
    if not inputs:
        raise DataError(f"no {_INPUT_PREFIX}*.txt files in this folder", path=folder)
    for name in sorted(inputs ^ golds):
        have, lacks = (_INPUT_PREFIX, _GOLD_PREFIX) if name in inputs else (_GOLD_PREFIX,
                                                                             _INPUT_PREFIX)
        raise DataError(f"{have}{name}.txt has no matching {lacks}{name}.txt",
                        path=folder / f"{lacks}{name}.txt")
    known = [name for name in SENTEVAL_SUBSETS.get(task_name, ()) if name in inputs]
    return known + sorted(inputs - set(known))


def _read_sts_subset(folder: Path, name: str, on_bad_row: str) -> list[ScoredPair]:
    """Pair one subset's input and gold files line by line."""
    input_path = folder / f"{_INPUT_PREFIX}{name}.txt"
    gold_path = folder / f"{_GOLD_PREFIX}{name}.txt"
    inputs, bad_inputs = read_lines(input_path)
    golds, bad_golds = read_lines(gold_path)
    if len(inputs) != len(golds):
        raise DataError(
            f"{len(inputs)} lines, but the gold file {gold_path.name} has {len(golds)}; SentEval "
            f"pairs them line by line, so the files do not belong together",
            path=input_path, line=min(len(inputs), len(golds)) + 1)
    bad = BadRows(input_path, on_bad_row)
    pairs = []
    for number, (text, gold) in enumerate(zip(inputs, golds, strict=True), start=1):
        try:
            pair = _sts_row(number, text, gold, input_path, gold_path, bad_inputs, bad_golds, name)
        except DataError as error:
            bad.handle(error)
            continue
        if pair is not None:
            pairs.append(pair)
    bad.finish()
    return pairs


def _sts_row(number: int, text: str, gold: str, input_path: Path, gold_path: Path,
             bad_inputs: dict[int, str], bad_golds: dict[int, str], name: str
             ) -> ScoredPair | None:
    """One STS line pair; None when the gold line is empty (not scored)."""
    if number in bad_golds:
        raise DataError(bad_golds[number], gold_path, number)
    if number in bad_inputs:
        raise DataError(bad_inputs[number], input_path, number)
    if not gold.strip():
        return None
    score = parse_score(gold.strip(), (str(gold_path), number), "gold score", STS_SCORE_RANGE)
    where = (str(input_path), number)
    columns = text.split("\t")
    if len(columns) < 2:
        raise missing_column(where, "sentence2", len(columns), "2 tab-separated columns")
    return ScoredPair(parse_sentence(columns[0], where, "sentence1"),
                      parse_sentence(columns[1], where, "sentence2"), score, name)
