"""``checkpoint.resume_from=PATH``: resume from a checkpoint folder named explicitly.

The Hugging Face Trainer's ``resume_from_checkpoint``. ``PATH`` is one ``step-NNNNNNNN`` folder
(``<run>/<stage>/checkpoints/step-…``, of this run or another one). It applies to the stage that
wrote it (its ``trainer_state.json`` says which); the other stage keeps the ``checkpoint.resume``
policy. The folder gets the same integrity checks as an automatically chosen one
(:func:`pcc_dist.checkpoint.find_damage`), but a damaged one is an error, not
skipped: the user asked for that folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pcc_dist.checkpoint import COMPLETE_MARKER, STATE_FILE, CheckpointError, read_trainer_state
from pcc_dist.checkpoint_manager import CheckpointManager
from pcc_dist.config import PccConfig
from pcc_dist.distributed import any_rank

logger = logging.getLogger(__name__)


def explicit_resume_point(cfg: PccConfig, stage: str,
                          checkpoints: CheckpointManager) -> Path | None:
    """The folder of ``cfg.checkpoint.resume_from`` when it was written by ``stage``, else None.

    A collective call (every rank checks its own files; one all-reduce makes the verdict common).

    Raises:
        CheckpointError: the folder does not exist, is not a finished checkpoint (no
            ``COMPLETE`` marker), or holds a damaged or missing file (each named).
    """
    spec = cfg.checkpoint.resume_from
    if spec is None:
        return None
    path = Path(spec).expanduser()
    field = f"checkpoint.resume_from={spec!r}"
    hint = "give a step-NNNNNNNN folder from <run.output_dir>/<stage>/checkpoints/"
    if not path.is_dir():
        raise CheckpointError(f"{field}: no such folder ({path.resolve()}); {hint}.")
    if not (path / COMPLETE_MARKER).is_file():
        found = "a checkpoints/ folder" if any(path.glob("step-*")) else "not a checkpoint"
        raise CheckpointError(
            f"{field}: {path} has no {COMPLETE_MARKER} marker ({found}: a checkpoint is "
            f"complete only once its write finished); {hint}.")
    try:
        written_by = read_trainer_state(path).stage
    except CheckpointError as exc:
        raise CheckpointError(f"{field}: damaged: {exc}; resume from another checkpoint.") from exc
    if written_by != stage:
        return None
    problems = checkpoints.find_damage(path)
    if any_rank(bool(problems)):
        found = "; ".join(problems) or "another rank found a damaged file (see its log)"
        raise CheckpointError(f"{field}: damaged: {found}. Resume from another checkpoint "
                              f"(its {STATE_FILE} says which step it holds).")
    logger.info("%s: resuming from %s (checkpoint.resume_from)", stage, path)
    return path
