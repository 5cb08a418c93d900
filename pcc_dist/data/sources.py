"""Where data lives: the data root, the STS7 test sets and the training sets by name.

Layout under the data root (see ``MANIFEST.md`` there)::

    sts/STS12-en-test ... sts/STS16-en-test   SentEval STS12-16 folders
    sts/STSBenchmark/sts-{train,dev,test}.csv
    sts/SICK/SICK_{train,trial,test_annotated}.txt
    stage2/stsb_sickr_train.jsonl             built-in training set "stage2"
    nli/nli_for_simcse_devtest.csv            built-in training set "nli"
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from pcc_dist.data._core import STS7_TASKS, DataError, ScoredPair, StsTask, Triplet, check_policy
from pcc_dist.data.readers import (
    PAIR_ROLES,
    is_triplet_table,
    pair_columns,
    pairs_from_table,
    read_pairs,
    read_sick,
    read_stsb,
    triplets_from_table,
)
from pcc_dist.data.senteval import read_senteval_sts
from pcc_dist.data.tables import Table, load_table

logger = logging.getLogger(__name__)

ENV_DATA_DIR = "PCC_DATA_DIR"
CONFIG_FIELD = "data.root"

STS_FOLDERS = {
    "STS12": "STS12-en-test",
    "STS13": "STS13-en-test",
    "STS14": "STS14-en-test",
    "STS15": "STS15-en-test",
    "STS16": "STS16-en-test",
    "STSBenchmark": "STSBenchmark",
    "SICKRelatedness": "SICK",
}
STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
SPLIT_ALIASES = {"trial": "dev", "validation": "dev"}

BUILTIN_TRAINING_SETS = {
    "stage2": "stage2/stsb_sickr_train.jsonl",
    "nli": "nli/nli_for_simcse_devtest.csv",
}


def resolve_data_root(configured: str | None = None) -> Path:
    """Find the data root: config field, then ``$PCC_DATA_DIR``, then ``../shared/data``.

    An explicit setting (the config field or the environment variable) is authoritative: if it
    names a folder that does not exist, that is an error rather than a silent fall-back to another
    copy of the data. Only when neither is set are the defaults searched: ``../shared/data``
    relative to the project root (the folder holding ``setup.py``), then relative to the working
    directory.

    Args:
        configured: The ``data.root`` config value; None or "" means unset.

    Returns:
        The absolute data root.

    Raises:
        DataError: Nothing found; the message lists every place looked at and how it was chosen.
    """
    if configured:
        return _explicit_root(Path(configured), f"{CONFIG_FIELD} (config)")
    from_env = os.environ.get(ENV_DATA_DIR)
    if from_env:
        return _explicit_root(Path(from_env), f"${ENV_DATA_DIR}")
    candidates = _default_candidates()
    for _, candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = "; ".join(f"{origin}: {path}" for origin, path in candidates)
    raise DataError(f"no data root found. Looked at: {CONFIG_FIELD} (config): not set; "
                    f"${ENV_DATA_DIR}: not set; {looked}. Set {CONFIG_FIELD} or ${ENV_DATA_DIR} "
                    f"to the folder holding sts/, stage2/ and nli/", field=CONFIG_FIELD)


def _explicit_root(path: Path, origin: str) -> Path:
    path = path.expanduser()
    if path.is_dir():
        return path.resolve()
    raise DataError(f"data root {path} (from {origin}) is not a folder. Looked at: {origin}: "
                    f"{path}; lower-priority places are not consulted while {origin} is set. Fix "
                    f"it or unset it", field=CONFIG_FIELD)


def _default_candidates() -> list[tuple[str, Path]]:
    """Default data roots in search order, without duplicates."""
    candidates = []
    project = _project_root()
    if project is not None:
        candidates.append(("../shared/data from the project root",
                           project.parent / "shared" / "data"))
    candidates.append(("../shared/data from the working directory",
                       Path.cwd().parent / "shared" / "data"))
    unique: dict[Path, tuple[str, Path]] = {}
    for origin, path in candidates:
        unique.setdefault(path.resolve(), (origin, path.resolve()))
    return list(unique.values())


def _project_root() -> Path | None:
    """The source checkout holding this package (folder with ``setup.py``), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() else None


def load_sts_task(name: str, root: Path | None = None, *, split: str = "test") -> StsTask:
    """Load one STS7 task from ``root/sts`` (SentEval format).

    Test sets are always read with ``on_bad_row="error"``: a silently shortened test set would
    make scores incomparable.

    Args:
        name: One of ``STS7_TASKS``.
        root: Data root; None resolves it with :func:`resolve_data_root`.
        split: ``"test"``; STSBenchmark and SICKRelatedness also take ``"dev"`` (SICK's
            ``trial``; aliases ``trial``/``validation``) and ``"train"``.

    Returns:
        The task. STS-B and SICK-R have one subset named after the split.

    Raises:
        DataError: Unknown task or split, or a problem in the files.
    """
    if name not in STS7_TASKS:
        raise DataError(f"unknown STS task {name!r}; choose from {', '.join(STS7_TASKS)}",
                        field="task")
    split = SPLIT_ALIASES.get(split, split)
    folder = (Path(root) if root is not None else resolve_data_root()) / "sts" / STS_FOLDERS[name]
    if name == "STSBenchmark":
        return StsTask(name, {split: read_stsb(folder / _split_file(name, split, STSB_FILES))})
    if name == "SICKRelatedness":
        return StsTask(name, {split: read_sick(folder / _split_file(name, split, SICK_FILES))})
    if split != "test":
        raise DataError(f"{name} has only a 'test' split, got {split!r}", field="split")
    return read_senteval_sts(folder)


def _split_file(name: str, split: str, files: dict[str, str]) -> str:
    if split not in files:
        raise DataError(f"{name} has splits {sorted(files)} (and 'trial'), got {split!r}",
                        field="split")
    return files[split]


def load_sts7(root: Path | None = None) -> dict[str, StsTask]:
    """Load the test splits of all seven STS tasks, in ``STS7_TASKS`` order."""
    root = Path(root) if root is not None else resolve_data_root()
    return {name: load_sts_task(name, root) for name in STS7_TASKS}


def load_training_set(spec: str, root: Path | None = None, *, on_bad_row: str = "error",
                      score_range: tuple[float, float] | None = None
                      ) -> list[ScoredPair] | list[Triplet]:
    """Load a training set by built-in name, local path or hub id.

    Scored pairs without a ``source`` (no such column, or an empty cell) take the file's name (or
    the hub id) as their source, so a user's ``sentence1,sentence2,score`` file is one source of
    its own for de-contamination counts and per-source score scaling
    (:func:`pcc_dist.data.rescale_scores`).

    Args:
        spec: ``"stage2"`` (STS-B train + SICK-R train, raw scores with ``source``), ``"nli"``
            (SimCSE triplets), a local csv/tsv/jsonl file (triplets when the header or first
            jsonl object names ``sent0``/``sent1``, scored pairs otherwise), or a hub id.
        root: Data root for the built-in names; None resolves it. Unused for paths and hub ids.
        on_bad_row: ``"error"`` or ``"skip"``.
        score_range: Inclusive ``(low, high)`` of scores whose source has no known range
            (``data.score_range``); a score outside it is a bad row (file and line). None = no
            check beyond finiteness.

    Returns:
        Scored pairs or triplets.

    Raises:
        DataError: Missing data or a bad row in error mode.
        ValueError: Unknown ``on_bad_row``.
    """
    check_policy(on_bad_row)
    if spec in BUILTIN_TRAINING_SETS:
        root = Path(root) if root is not None else resolve_data_root()
        path = root / BUILTIN_TRAINING_SETS[spec]
        if not path.is_file():
            raise DataError(f"built-in training set {spec!r} is missing from the data root "
                            f"{root}", path=path)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            return _named_sources(read_pairs(spec, on_bad_row=on_bad_row,
                                             score_range=score_range), spec)
    table = load_table(path)
    if is_triplet_table(table.columns, _deciding_record(table)):
        return triplets_from_table(table, on_bad_row)
    pairs = pairs_from_table(table, pair_columns(None), on_bad_row, score_range)
    return _named_sources(pairs, path.name)


def _deciding_record(table: Table) -> dict | None:
    """The first jsonl record that names both sentence columns of a kind (triplets ``sent0`` and
    ``sent1``, pairs ``sentence1`` and ``sentence2``), else the first record: a bad first row
    (a missing column, skipped under ``on_bad_row=skip``) must not decide the kind of the file."""
    records = [record for _, record in table.rows if isinstance(record, dict)]
    for record in records:
        if is_triplet_table(None, record) or set(PAIR_ROLES[:2]) <= record.keys():
            return record
    return records[0] if records else None


def _named_sources(pairs: list[ScoredPair], name: str) -> list[ScoredPair]:
    """``pairs`` with an empty ``source`` replaced by ``name`` (the file name or hub id)."""
    return [pair if pair.source else replace(pair, source=name) for pair in pairs]
