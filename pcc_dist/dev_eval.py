"""STS-B dev evaluation of a training stage: when to score, the best model, the final score.

Model selection uses the dev split only, never the STS7 test sets. Every rank takes part in an
evaluation (the sentences are sharded over ranks, :class:`pcc_dist.sharded_encode.ShardedEncoder`)
and in gathering the weights of a new best model; rank 0 writes ``<stage>/best``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pcc_dist.config import PccConfig
from pcc_dist.data import load_sts_task
from pcc_dist.evaluation import evaluate_sts
from pcc_dist.sharded_encode import ShardedEncoder

logger = logging.getLogger(__name__)

DEV_METRIC = "eval/stsb_dev_spearman"


class DevEvaluator:
    """Scores the stage's model on STS-B dev (``eval.dev``): every ``eval.every_steps`` steps
    and at the end of the stage.

    Args:
        cfg: The resolved config (``eval.dev``, ``eval.every_steps``, ``eval.batch_size``).
        name: The stage, for log lines.
        dist_info: Rank and world size.
        data_root: Resolved data folder holding STS-B.
        stage_dir: The stage's folder; a new best model goes to ``<stage_dir>/best``.
        embedder: The model being trained.
        engine: Its :class:`~pcc_dist.engine.TrainEngine`, which gathers the weights to save.
        tracker: Where ``eval/stsb_dev_spearman`` goes.
    """

    def __init__(self, cfg: PccConfig, name: str, dist_info, data_root: Path, stage_dir: Path,
                 embedder, engine, tracker):
        self.cfg = cfg
        self.name = name
        self.dist = dist_info
        self.data_root = data_root
        self.best_dir = stage_dir / "best"
        self.embedder = embedder
        self.engine = engine
        self.tracker = tracker

    def due(self, step: int) -> bool:
        """True after the steps that end an ``eval.every_steps`` interval (0 = only at the end)."""
        every = self.cfg.eval.every_steps
        return bool(self.cfg.eval.dev and every and step % every == 0)

    def spearman(self) -> float:
        """STS-B dev Spearman x 100 of the model as it is now (its train/eval mode is kept)."""
        dev = {"STSBenchmark": load_sts_task("STSBenchmark", self.data_root, split="dev")}
        encoder = ShardedEncoder(self.embedder, self.dist.rank, self.dist.world_size)
        was_training = self.embedder.training
        result = evaluate_sts(encoder, dev, batch_size=self.cfg.eval.batch_size,
                              show_progress=False)
        self.embedder.train(was_training)
        return result.spearman["STSBenchmark"]

    def evaluate_if_due(self, state) -> None:
        """After step ``state.step``: when :meth:`due`, score; a new best is saved to ``best/``
        and recorded in ``state`` (``best_dev_spearman``, ``best_step``)."""
        if not self.due(state.step):
            return
        from pcc_dist.modeling import save_embedder

        dev = self.spearman()
        self.tracker.log_metrics({DEV_METRIC: dev}, step=state.step)
        if state.best_dev_spearman is None or dev > state.best_dev_spearman:
            state.best_dev_spearman, state.best_step = dev, state.step
            state_dict = self.engine.backbone_state_dict()  # collective: every rank takes part
            if self.dist.rank == 0:
                save_embedder(self.embedder, self.best_dir, state_dict=state_dict)
            logger.info("%s step %d: new best STS-B dev Spearman %.2f, saved to %s", self.name,
                        state.step, dev, self.best_dir)

    def final(self, state) -> float | None:
        """The score at the end of the stage (logged at ``state.step``); None when ``eval.dev``
        is off."""
        if not self.cfg.eval.dev:
            return None
        dev = self.spearman()
        self.tracker.log_metrics({DEV_METRIC: dev}, step=state.step)
        logger.info("%s: STS-B dev Spearman %.2f", self.name, dev)
        return dev
