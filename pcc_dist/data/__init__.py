"""The data layer: readers, data-root resolution, STS7 loading, de-contamination.

Modules:

* ``_core``: record types (:class:`ScoredPair`, :class:`Triplet`, :class:`StsTask`),
  :class:`DataError`, the bad-row policy and its registry (:func:`skipped_rows`),
  :func:`rescale_scores`.
* ``tables``: csv / tsv / jsonl parsing with line numbers.
* ``readers``: one reader per training / STS-B / SICK file format.
* ``senteval``: :func:`read_senteval_sts` (SentEval STS12-16 folders).
* ``sources``: :func:`resolve_data_root`, :func:`load_sts_task`, :func:`load_sts7`,
  :func:`load_training_set`.
* ``decontamination``: :func:`normalise_text`, :func:`decontaminate`.
"""

from pcc_dist.data._core import (
    SOURCE_SCORE_RANGES,
    STS7_TASKS,
    DataError,
    ScoredPair,
    StsTask,
    Triplet,
    rescale_scores,
    reset_skipped_rows,
    skipped_rows,
)
from pcc_dist.data.decontamination import DecontaminationReport, decontaminate, normalise_text
from pcc_dist.data.readers import (
    is_hub_id,
    read_nli_triplets,
    read_pairs,
    read_sick,
    read_stsb,
)
from pcc_dist.data.senteval import read_senteval_sts
from pcc_dist.data.sources import (
    ENV_DATA_DIR,
    load_sts7,
    load_sts_task,
    load_training_set,
    resolve_data_root,
)

__all__ = [
    "ENV_DATA_DIR",
    "SOURCE_SCORE_RANGES",
    "STS7_TASKS",
    "DataError",
    "DecontaminationReport",
    "ScoredPair",
    "StsTask",
    "Triplet",
    "decontaminate",
    "is_hub_id",
    "load_sts7",
    "load_sts_task",
    "load_training_set",
    "normalise_text",
    "read_nli_triplets",
    "read_pairs",
    "read_senteval_sts",
    "read_sick",
    "read_stsb",
    "rescale_scores",
    "reset_skipped_rows",
    "resolve_data_root",
    "skipped_rows",
]
