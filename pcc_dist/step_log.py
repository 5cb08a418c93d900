"""The training-step log: which steps are logged, their metrics, and where they go.

A logged step's metrics go to the tracker (MLflow on rank 0, :mod:`pcc_dist.tracking`), to a plain
``<stage>/metrics.jsonl`` on rank 0 (readable without MLflow), and, when no progress bar shows (CI
logs, pipes), to one INFO line. Keys (``train/…``, ``perf/…``) are the ones README lists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pcc_dist.progress import progress_enabled

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass
class StepRecord:
    """What one optimizer step hands to the log.

    Attributes:
        loss: The step's loss over the global batch (NaN on a skipped step).
        result: The engine's :class:`~pcc_dist.engine.StepResult` (``lr``, ``grad_norm``).
        views: This rank's token views of the step (``attention_mask`` ``[B, T]`` each).
        seconds: Wall time of the step.
        real_token_fraction: This rank's real / processed token positions
            (:mod:`pcc_dist.length_chunks`).
        batch_r: Pearson r of the global batch (stage 2), else None.
    """

    loss: float
    result: Any
    views: list[dict[str, torch.Tensor]]
    seconds: float
    real_token_fraction: float
    batch_r: float | None = None


class StepLog:
    """Decides which steps are logged and writes them.

    Args:
        tracker: Where metrics go (``log_metrics(metrics, step=...)``).
        name: The stage (``"stage1"`` / ``"stage2"``), for the INFO line.
        stage_dir: The stage's folder; rank 0 appends to ``<stage_dir>/metrics.jsonl``.
        every_steps: ``train.log_every_steps``.
        world_size: W, to turn this rank's token count into the global one.
        global_batch_size: N, pairs per step.
        total_steps: The stage's step count, for the INFO line.
        is_main: Rank 0, the rank that writes files and INFO lines.
        objective: The loss that ran (``infonce``, ``pearson``, ``cosine_mse``, ``cosent``):
            logged as ``train/loss_<objective>`` beside ``train/loss`` and named in the INFO
            line, so runs of different stage-2 objectives are told apart by their metrics.
    """

    def __init__(self, tracker, name: str, stage_dir: Path, every_steps: int, *,
                 world_size: int, global_batch_size: int, total_steps: int, is_main: bool,
                 objective: str):
        self.tracker = tracker
        self.objective = objective
        self.name = name
        self.stage_dir = stage_dir
        self.every_steps = every_steps
        self.world_size = world_size
        self.global_batch_size = global_batch_size
        self.total_steps = total_steps
        self.is_main = is_main

    def due(self, step: int) -> bool:
        """Step 1 (the first sign of life) and every ``every_steps``-th step."""
        return step == 1 or step % self.every_steps == 0

    def record(self, state, step: StepRecord) -> None:
        """Log the step just taken (``state.step``, 1-based) when it is :meth:`due`.

        Called after every step, so whoever wraps it sees every step (the throughput benchmark
        stamps its timings here).
        """
        if not self.due(state.step):
            return
        metrics = self.metrics(state, step)
        self.tracker.log_metrics(metrics, step=state.step)
        if self.is_main and not progress_enabled():
            # No progress bar in CI logs or pipes: a line per logged step instead.
            logger.info("%s step %d/%d: %s loss %.4f, lr %.3g, %.1f pairs/s", self.name,
                        state.step, self.total_steps, self.objective, step.loss,
                        step.result.lr,
                        metrics["perf/pairs_per_s"])
        if self.is_main:
            # A plain local record of every logged step, readable without MLflow. A resumed run
            # appends the steps after its checkpoint again; the last line of a step wins.
            with open(self.stage_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.step} | metrics) + "\n")

    def metrics(self, state, step: StepRecord) -> dict[str, float]:
        """The metrics of one step: loss, lr, gradient norm, skips, throughput, padding."""
        # Tokens of this rank times W: ranks hold equal batches of similar length, and an exact
        # count would cost a collective per logged step for a throughput estimate.
        tokens = sum(int(v["attention_mask"].sum()) for v in step.views) * self.world_size
        metrics = {
            "train/loss": step.loss,
            "train/lr": step.result.lr,
            "train/grad_norm": step.result.grad_norm,
            "train/skipped_steps": float(state.skipped_steps),
            "perf/pairs_per_s": self.global_batch_size / step.seconds,
            "perf/tokens_per_s": tokens / step.seconds,
            "perf/real_token_fraction": step.real_token_fraction,
        }
        metrics[f"train/loss_{self.objective}"] = step.loss
        if step.batch_r is not None:
            metrics["train/pearson_r"] = float(step.batch_r)
        return metrics
