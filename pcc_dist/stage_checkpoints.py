"""A training stage's checkpoints: which one it resumes from, and after which steps it saves.

Writing, reading, integrity checks and pruning are
:class:`pcc_dist.checkpoint_manager.CheckpointManager`'s; this module holds the stage's policy on
top of it (``checkpoint.resume``,
``checkpoint.resume_from``, ``checkpoint.every_steps``) and the hand-over between the two stages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pcc_dist.checkpoint import TrainerState
from pcc_dist.checkpoint_manager import CheckpointManager
from pcc_dist.config import PccConfig
from pcc_dist.distributed import rank_barrier
from pcc_dist.resume_from import explicit_resume_point

logger = logging.getLogger(__name__)


class StageCheckpoints:
    """The checkpoints of one stage in ``<stage_dir>/checkpoints``.

    Args:
        cfg: The resolved config (``checkpoint.*``).
        name: The stage, ``"stage1"`` or ``"stage2"``.
        stage_dir: The stage's folder.
        dist_info: Rank and world size.
    """

    def __init__(self, cfg: PccConfig, name: str, stage_dir: Path, dist_info):
        self.cfg = cfg
        self.name = name
        self.manager = CheckpointManager(stage_dir / "checkpoints", cfg.checkpoint.keep_last,
                                         dist_info.rank, rank_barrier(dist_info.world_size))

    def resume_point(self) -> Path | None:
        """Clear writes that died, then pick the newest intact checkpoint (every rank the same
        one; damaged ones are skipped with a warning), or None to start the stage afresh.

        A collective call; cheap, so it runs before the data and weights load and a damaged
        checkpoint folder fails in seconds.
        """
        self.manager.remove_incomplete()
        explicit = explicit_resume_point(self.cfg, self.name, self.manager)
        if explicit is not None:
            return explicit
        if self.cfg.checkpoint.resume != "auto":
            return None
        return self.manager.latest_intact()

    def due(self, step: int, last: bool) -> bool:
        """After every ``checkpoint.every_steps``-th step and after the stage's last step (the
        next stage starts from that one)."""
        return step % self.cfg.checkpoint.every_steps == 0 or last

    def save_if_due(self, engine, state: TrainerState, *, last: bool, tracker) -> None:
        """Save ``state.step`` when :meth:`due`; a collective call on every rank.

        Args:
            engine: The stage's :class:`~pcc_dist.engine.TrainEngine`.
            state: The trainer state to save with it.
            last: ``state.step`` is the stage's last step.
            tracker: The stage's tracker; its ``run_id`` is saved, so a resumed job logs into
                the same run.
        """
        if not self.due(state.step, last):
            return
        state.tracking_run_id = tracker.run_id
        self.manager.save(engine, state)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return self.manager.latest()

    def load(self, engine, path: Path) -> TrainerState:
        """Restore ``engine`` and the RNG from ``path``; returns its trainer state."""
        return self.manager.load(engine, path)


def earlier_stage1(cfg: PccConfig, run_dir: Path, dist_info) -> Path | None:
    """Stage 1's final checkpoint from an earlier run in the same folder, when this run trains
    stage 2 only (the two stages as two jobs, e.g. the mistral7b_qlora_stage{1,2} recipes)."""
    if cfg.stage1.enabled or not cfg.stage2.enabled:
        return None
    # The newest intact one: a damaged checkpoint is skipped (and set aside) as on resume.
    found = CheckpointManager(run_dir / "stage1" / "checkpoints", 1, dist_info.rank,
                              rank_barrier(dist_info.world_size)).latest_intact()
    if found is None:
        logger.info("stage 2 starts from %s (no stage-1 checkpoint in %s)",
                    cfg.model.name_or_path, run_dir)
    return found
