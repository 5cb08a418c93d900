"""What a training stage trains on: its set read and checked, de-contaminated, rescaled.

Stage 1 trains InfoNCE on triplets, stage 2 Pcc on scored pairs. :func:`load_stage_examples` is
the first step of every stage (:class:`pcc_dist.trainer.StageRunner`); :func:`read_stage_examples`
alone is what ``pcc-train --validate`` reads (:mod:`pcc_dist.preflight`), so a set the trainer
would refuse is refused there first, with the same message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pcc_dist.config import PccConfig
from pcc_dist.data import (
    ScoredPair,
    Triplet,
    decontaminate,
    load_training_set,
    rescale_scores,
)
from pcc_dist.errors import PccError

logger = logging.getLogger(__name__)


class TrainingError(PccError, RuntimeError):
    """The run cannot continue; the message says why and how to resume."""


def read_stage_examples(cfg: PccConfig, name: str, data_root: Path) -> list:
    """The training set of stage ``name``, checked for the examples that stage trains on.

    Args:
        cfg: The resolved config (``<stage>.data``, ``data.on_bad_row``).
        name: ``"stage1"`` (InfoNCE: triplets) or ``"stage2"`` (Pcc: scored pairs).
        data_root: Resolved data folder, for the built-in sets.

    Raises:
        DataError: missing data, or a bad row with ``data.on_bad_row=error``.
        TrainingError: the set holds the other kind of example.
    """
    spec = getattr(cfg, name).data
    examples = load_training_set(spec, data_root, on_bad_row=cfg.data.on_bad_row,
                                 score_range=cfg.data.score_bounds)
    if name == "stage1" and not all(isinstance(e, Triplet) for e in examples):
        raise TrainingError(f"stage1.data={spec!r} is not a triplet set "
                            "(sent0,sent1[,hard_neg]); stage 1 trains InfoNCE on triplets.")
    if name == "stage2" and not all(isinstance(e, ScoredPair) for e in examples):
        raise TrainingError(f"stage2.data={spec!r} holds no scored pairs; "
                            "stage 2 trains on (sentence1, sentence2, score).")
    return examples


def load_stage_examples(cfg: PccConfig, name: str, data_root: Path,
                        test_tasks: dict | None) -> tuple[list, dict[str, Any] | None]:
    """The examples stage ``name`` trains on, and the de-contamination report.

    Args:
        cfg: The resolved config.
        name: ``"stage1"`` or ``"stage2"``.
        data_root: Resolved data folder.
        test_tasks: STS7 test sets to remove from the training set (None = off).

    Returns:
        ``(examples, report)``: stage 2's scores rescaled to ``data.score_bounds``; ``report``
        is :meth:`Contamination.to_dict` (None when de-contamination is off).

    Raises:
        TrainingError: what :func:`read_stage_examples` raises, or fewer examples are left than
            one global batch.
    """
    examples = read_stage_examples(cfg, name, data_root)
    report = None
    if test_tasks is not None:
        examples, contamination = decontaminate(examples, test_tasks)
        report = contamination.to_dict()
        logger.info("%s: de-contamination removed %s (kept %d of %d)", name,
                    contamination.removed_per_source, contamination.kept, contamination.total)
    if name == "stage2":
        examples = rescale_scores(examples, cfg.data.score_scaling, cfg.data.score_bounds)
    _require_one_global_batch(cfg, name, len(examples), report)
    return examples, report


def _require_one_global_batch(cfg: PccConfig, name: str, count: int,
                              report: dict[str, Any] | None) -> None:
    """Refuse a data set smaller than one global batch, naming it, its size and the batch."""
    stage = getattr(cfg, name)
    batch = stage.global_batch_size
    if count >= batch:
        return
    if report is None:
        how = "with data.decontaminate=false"
    else:
        how = (f"after de-contamination removed {report['removed']} of {report['total']} "
               "that occur in STS7 test sets")
    raise TrainingError(
        f"{name}.data={stage.data!r} has {count} examples {how}, fewer than one "
        f"global batch ({name}.global_batch_size={batch}); lower "
        f"{name}.global_batch_size to at most {count} (a multiple of the number of "
        "ranks) or add data.")
