"""The training run: stage 1 (InfoNCE on NLI triplets) then stage 2 (Pcc, 1 - Pearson r).

Reads as a table of contents. :func:`run_training` checks the output folder and the model, joins
the process group, runs each enabled stage (:class:`StageRunner`), scores the final model on STS7,
exports it and closes the group. :meth:`StageRunner.run`, on every rank:

1. open the stage's checkpoints and choose where to resume (:mod:`pcc_dist.stage_checkpoints`);
2. load its data, de-contaminated against the STS7 test sets, stage-2 scores rescaled
   (:mod:`pcc_dist.stage_data`), and plan its global batches (:mod:`pcc_dist.sampling`);
3. build a fresh embedder and engine; start from the previous stage's final weights, or resume
   from the chosen checkpoint (model, optimizer, scheduler, RNG, data position);
4. train: for each optimizer step take this rank's slice of the global batch (tokenised a step
   ahead, :mod:`pcc_dist.step_inputs`), run the gradient cache over length-sorted chunks, step
   the engine (a non-finite step is skipped on every rank); then each component acts when its
   cadence says so: the step log (:mod:`pcc_dist.step_log`), the STS-B dev evaluator
   (:mod:`pcc_dist.dev_eval`), the checkpoints (the last step always saves: the next stage
   starts from it);
5. finish: the final dev score and the stage's ``outcome.json``.

The loss of every step is computed over the whole global batch of N examples whatever the world
size (see :mod:`pcc_dist.sampling`), so runs on 1 and on W ranks take the same steps.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pcc_dist.checkpoint import TrainerState, preflight_output_dir
from pcc_dist.checkpoint_manager import load_weights_from
from pcc_dist.config import PccConfig, StageSettings
from pcc_dist.data import load_sts7, resolve_data_root
from pcc_dist.dev_eval import DevEvaluator
from pcc_dist.distributed import rank_barrier, shutdown_distributed
from pcc_dist.evaluation import evaluate_sts
from pcc_dist.progress import progress_enabled, step_progress
from pcc_dist.sampling import GlobalBatchPlan
from pcc_dist.sharded_encode import ShardedEncoder
from pcc_dist.stage_checkpoints import StageCheckpoints, earlier_stage1
from pcc_dist.stage_data import TrainingError, load_stage_examples
from pcc_dist.step_inputs import Prefetcher, tokenize_views
from pcc_dist.step_log import StepLog, StepRecord
from pcc_dist.sts_protocol import format_table

logger = logging.getLogger(__name__)

STAGES = ("stage1", "stage2")


@dataclass
class StageOutcome:
    """What a finished stage reports (also written to ``<stage>/outcome.json``)."""

    stage: str
    steps: int
    skipped_steps: int
    final_loss: float | None
    stsb_dev_spearman: float | None
    best_dev_spearman: float | None
    best_step: int | None
    seconds: float  # this job's wall time in the stage
    train_seconds: float  # time in training steps, summed over the jobs of a resumed stage
    final_checkpoint: str
    decontamination: dict[str, Any] | None


class StageRunner:
    """Runs one training stage on every rank, and holds the stage's components.

    :meth:`run` builds the components in the order of the module docstring and keeps them as
    attributes, so each step below it takes no arguments: ``checkpoints``
    (:class:`~pcc_dist.stage_checkpoints.StageCheckpoints`), ``plan``
    (:class:`~pcc_dist.sampling.GlobalBatchPlan`), ``embedder``, ``engine``
    (:class:`~pcc_dist.engine.TrainEngine`), ``state`` (:class:`~pcc_dist.checkpoint.TrainerState`),
    ``tracker``, ``log`` (:class:`~pcc_dist.step_log.StepLog`), ``evaluator``
    (:class:`~pcc_dist.dev_eval.DevEvaluator`), ``cache`` (:class:`~pcc_dist.gradcache.GradCache`)
    and ``loss``.

    Args:
        cfg: The resolved config.
        name: ``"stage1"`` or ``"stage2"``.
        dist_info: Rank, world size, ... from :func:`pcc_dist.distributed.init_distributed`.
        data_root: Resolved data folder.
        test_tasks: STS7 test sets for de-contamination (None = off).
        init_from: Final checkpoint of the previous stage, or None.
    """

    def __init__(self, cfg: PccConfig, name: str, dist_info, data_root: Path,
                 test_tasks: dict | None, init_from: Path | None):
        self.cfg = cfg
        self.name = name
        self.stage: StageSettings = getattr(cfg, name)
        self.dist = dist_info
        self.data_root = data_root
        self.test_tasks = test_tasks
        self.init_from = init_from
        self.stage_dir = Path(cfg.run.output_dir) / name
        self.is_main = dist_info.rank == 0
        self.total_steps = 0  # known once the data is loaded

    def run(self) -> tuple[StageOutcome, Any, Any]:
        """Train the stage; returns its outcome, the embedder and the engine (for export)."""
        from pcc_dist.tracking import make_tracker

        started = time.perf_counter()
        resume_from = self.open_checkpoints()                       # 1
        examples, contamination = self.load_examples()              # 2
        self.plan_batches(len(examples))
        self.build_model()                                          # 3
        self.start_state(resume_from)
        self.write_contamination(contamination)
        with make_tracker(self.cfg, self.stage_dir, rank=self.dist.rank,
                          resume_run_id=self.state.tracking_run_id, stage=self.name) as tracker:
            self.attach(tracker)
            self.train_steps(examples)                              # 4
            outcome = self.finish(started, contamination)           # 5
        return outcome, self.embedder, self.engine

    # -- 1. checkpoints ----------------------------------------------------------------------
    def open_checkpoints(self) -> Path | None:
        """The stage's checkpoint folder; returns the checkpoint to resume from, or None.

        Chosen before data and weights load: a damaged checkpoint folder fails in seconds.
        """
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = StageCheckpoints(self.cfg, self.name, self.stage_dir, self.dist)
        return self.checkpoints.resume_point()

    # -- 2. data -----------------------------------------------------------------------------
    def load_examples(self) -> tuple[list, dict[str, Any] | None]:
        """The examples and the de-contamination report (:func:`load_stage_examples`)."""
        return load_stage_examples(self.cfg, self.name, self.data_root, self.test_tasks)

    def plan_batches(self, count: int) -> None:
        """The global-batch plan over ``count`` examples and the stage's step count."""
        self.plan = GlobalBatchPlan(count, self.stage.global_batch_size, self.dist.world_size,
                                    self.cfg.run.seed)
        self.total_steps = self.plan.total_steps(self.stage.epochs, self.stage.max_steps)
        logger.info("%s: %d examples, global batch %d (%d per rank x %d ranks), %d steps",
                    self.name, count, self.plan.global_batch_size, self.plan.per_rank,
                    self.dist.world_size, self.total_steps)

    # -- 3. model, engine and where they start -------------------------------------------------
    def build_model(self) -> None:
        """A fresh embedder and its engine."""
        from pcc_dist.engine import build_engine
        from pcc_dist.modeling import load_embedder

        # Same seed on every rank for the weights it creates (LoRA A matrices): ZeRO-3 keeps
        # each rank's own slice of them, so different draws would make an inconsistent model.
        seed_everything(self.cfg.run.seed)
        self.embedder = load_embedder(self.cfg.model, for_training=True)
        self.engine = build_engine(self.embedder, self.cfg, self.stage, self.total_steps)
        # Then one stream per rank for dropout, so ranks do not draw identical masks.
        seed_everything(self.cfg.run.seed + 1 + self.dist.rank)

    def start_state(self, resume_from: Path | None) -> None:
        """Resume from ``resume_from``, or load the previous stage's weights, or start afresh."""
        self.state = TrainerState(stage=self.name, world_size=self.dist.world_size,
                                  global_batch_size=self.plan.global_batch_size)
        if resume_from is not None:
            self.state = self.checkpoints.load(self.engine, resume_from)
            self._check_resume_compatible()
        elif self.init_from is not None:
            load_weights_from(self.engine, self.init_from)
            logger.info("%s starts from the weights of %s", self.name, self.init_from)

    def _check_resume_compatible(self) -> None:
        state = self.state
        if state.global_batch_size != self.plan.global_batch_size:
            raise TrainingError(
                f"the checkpoint was written with global batch {state.global_batch_size}, this "
                f"run uses {self.plan.global_batch_size}; resume with the same global_batch_size "
                "(the data position is counted in global batches).")
        if state.world_size != self.dist.world_size:
            # Same global batch, so the same batches in the same order (the plan does not
            # depend on W) and the same loss; only per-rank dropout streams cannot carry over.
            logger.warning("%s: resuming a checkpoint written on %d ranks on %d ranks; the "
                           "data order and global batch are unchanged, dropout masks are "
                           "drawn afresh", self.name, state.world_size, self.dist.world_size)
            state.world_size = self.dist.world_size

    def write_contamination(self, report: dict[str, Any] | None) -> None:
        """``<stage>/decontamination.json`` on rank 0, when de-contamination is on."""
        if report is not None and self.is_main:
            (self.stage_dir / "decontamination.json").write_text(json.dumps(report, indent=2))

    # -- 4. train ------------------------------------------------------------------------------
    def attach(self, tracker) -> None:
        """The step's components: the step log and the dev evaluator (both report to
        ``tracker``) and the gradient cache."""
        from pcc_dist.gradcache import GradCache

        self.tracker = tracker
        tracker.log_params({"deepspeed": self.engine.ds_config})
        self.log = StepLog(tracker, self.name, self.stage_dir, self.cfg.train.log_every_steps,
                           world_size=self.dist.world_size,
                           global_batch_size=self.plan.global_batch_size,
                           total_steps=self.total_steps, is_main=self.is_main,
                           objective=stage_objective(self.cfg, self.name))
        self.evaluator = DevEvaluator(self.cfg, self.name, self.dist, self.data_root,
                                      self.stage_dir, self.embedder, self.engine, tracker)
        self.cache = GradCache(self.engine, self.stage.gradcache_chunk_size)

    def views(self, embedder, batch: list) -> tuple[list[dict[str, torch.Tensor]],
                                                     torch.Tensor | None]:
        """Token views (stage 1: anchor, positive[, negative]; 2: sentence1, 2), gold scores."""
        return tokenize_views(embedder, self.name, batch, self.stage.max_length)

    def train_steps(self, examples: list) -> None:
        """Every step from ``state.step`` on; each step's token views are made one step ahead
        in a thread (:mod:`pcc_dist.step_inputs`), then the components act on their cadence."""
        def produce(step: int):  # runs in the tokenise-ahead thread
            rows = self.plan.rank_indices(step, self.dist.rank)
            return self.views(self.embedder, [examples[i] for i in rows])

        with Prefetcher(produce, range(self.state.step, self.total_steps)) as ahead:
            self.loss = stage_loss(self.cfg, self.name)
            bar = step_progress(self.total_steps, self.state.step, self.name,
                                show=self.is_main and progress_enabled())
            self.engine.train()
            for step in range(self.state.step, self.total_steps):
                record = self.train_step(step, ahead)
                self.log.record(self.state, record)
                bar.update(1)
                bar.set_postfix(loss=f"{record.loss:.4f}")
                # After logging, so the step that stops the run is on record.
                if record.result.skipped:
                    self._stop_if_diverged()
                self.evaluator.evaluate_if_due(self.state)
                self.checkpoints.save_if_due(self.engine, self.state, tracker=self.tracker,
                                             last=self.state.step == self.total_steps)
            bar.close()

    def train_step(self, step: int, ahead: Prefetcher) -> StepRecord:
        """One optimizer step (0-based ``step``) on the global batch; updates ``state``."""
        tick = time.perf_counter()
        views, scores = ahead.get(step)
        loss_value = self.cache.run(self.engine.module, views, _bind_loss(self.loss, scores))
        result = self.engine.step()
        state = self.state
        state.step = step + 1
        if result.skipped:
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
        else:
            state.consecutive_nonfinite = 0
            state.last_loss = loss_value
        seconds = time.perf_counter() - tick
        state.train_seconds += seconds
        batch_r = getattr(self.loss, "last_r", None) if scores is not None else None
        return StepRecord(loss=loss_value, result=result, views=views, seconds=seconds,
                          real_token_fraction=self.cache.real_token_fraction, batch_r=batch_r)

    def _stop_if_diverged(self) -> None:
        state = self.state
        limit = self.cfg.train.max_consecutive_nonfinite
        if state.consecutive_nonfinite >= limit:
            # Every rank gets here at the same step: the skip decision comes from DeepSpeed's
            # all-reduced gradient norm (TrainEngine.step), never from a rank's own loss.
            latest = self.checkpoints.latest()
            where = (f"resume from {latest}" if latest is not None else
                     "no checkpoint was written yet, so start again")
            raise TrainingError(
                f"{self.name}: {limit} consecutive steps had a non-finite loss or gradient "
                f"(steps {state.step - limit + 1}-{state.step}, last at step {state.step}); "
                f"every rank skipped them. Lower the learning rate or check the data, then "
                f"{where}.")
        logger.warning("%s step %d: non-finite loss or gradient, step skipped on every rank "
                       "(%d in a row)", self.name, state.step, state.consecutive_nonfinite)

    # -- 5. finish -----------------------------------------------------------------------------
    def finish(self, started: float, contamination: dict[str, Any] | None) -> StageOutcome:
        """The final dev score and the stage's outcome, written to ``outcome.json`` on rank 0."""
        state = self.state
        final = self.checkpoints.latest()
        dev = self.evaluator.final(state)
        logger.info("%s finished at step %d", self.name, state.step)
        outcome = StageOutcome(
            stage=self.name, steps=state.step, skipped_steps=state.skipped_steps,
            final_loss=state.last_loss, stsb_dev_spearman=dev,
            best_dev_spearman=state.best_dev_spearman, best_step=state.best_step,
            seconds=time.perf_counter() - started, train_seconds=state.train_seconds,
            final_checkpoint=str(final), decontamination=contamination)
        if self.is_main:
            (self.stage_dir / "outcome.json").write_text(json.dumps(asdict(outcome), indent=2))
        return outcome


def stage_loss(cfg: PccConfig, name: str):
    """Stage 1's :class:`InfoNCELoss`; stage 2's :class:`PearsonLoss`, or the
    ``loss.stage2_objective`` alternative (:mod:`pcc_dist.losses.score_objectives`)."""
    from pcc_dist.losses import CoSENTLoss, CosineMSELoss, InfoNCELoss, PearsonLoss

    if name == "stage1":
        return InfoNCELoss(temperature=cfg.loss.temperature, kernel=cfg.loss.kernel,
                           chunk_size=cfg.loss.chunk_size)
    if cfg.loss.stage2_objective == "cosine_mse":
        return CosineMSELoss()
    if cfg.loss.stage2_objective == "cosent":
        return CoSENTLoss(scale=cfg.loss.cosent_scale)
    return PearsonLoss(kernel=cfg.loss.kernel)


def stage_objective(cfg: PccConfig, name: str) -> str:
    """The name of the loss ``name`` trains with: ``infonce`` or ``loss.stage2_objective``."""
    return "infonce" if name == "stage1" else cfg.loss.stage2_objective


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)


def _bind_loss(loss_module, scores: torch.Tensor | None):
    """``embeddings -> loss``: InfoNCE on the views, or Pearson against this step's scores."""
    if scores is None:
        return lambda embeddings: loss_module(*embeddings)
    return lambda embeddings: loss_module(embeddings[0], embeddings[1], scores)


def run_training(cfg: PccConfig) -> dict[str, Any]:
    """Train every enabled stage, evaluate on STS7, export; returns the results document.

    Written to ``<output_dir>/results.json``; the final model goes to ``<output_dir>/model``
    (the run-folder layout that ``pcc-eval --model`` and ``pcc-export`` read).
    """
    run_dir = Path(cfg.run.output_dir)
    check_before_start(cfg, run_dir)
    dist_info = start_process_group(cfg, run_dir)
    data_root = resolve_data_root(cfg.data.root)
    test_tasks = load_sts7(data_root) if cfg.data.decontaminate else None
    outcomes, embedder, engine = train_stages(cfg, dist_info, data_root, test_tasks)
    results: dict[str, Any] = {"stages": outcomes}
    sts = score_sts7(cfg, embedder, dist_info, data_root)
    if sts is not None:
        results["sts"] = sts.to_json()
    export_run(cfg, run_dir, embedder, engine, dist_info, results, sts)
    shutdown_distributed()
    return results


def check_before_start(cfg: PccConfig, run_dir: Path) -> None:
    """Fail in seconds on an unwritable or full output folder or a missing or damaged model.

    Every rank, before the process group and any weight load, not after the first checkpoint
    interval. (Each rank probes with its own file, so a shared folder is fine; of the model
    folder only small files and headers are read.)
    """
    from pcc_dist.memory_plan import checkpoint_space_needed
    from pcc_dist.modeling import check_model_files

    needed, why = checkpoint_space_needed(cfg)
    logger.info("run.output_dir needs %.2f GiB free: %s", needed / 2**30, why)
    preflight_output_dir(run_dir, needed)
    check_model_files(cfg.model)


def start_process_group(cfg: PccConfig, run_dir: Path):
    """Join the process group; rank 0 writes the resolved config into the run folder."""
    from pcc_dist.distributed import init_distributed
    from pcc_dist.modeling import TRAINING_CONFIG_NAME

    dist_info = init_distributed()
    if dist_info.rank == 0:
        (run_dir / TRAINING_CONFIG_NAME).write_text(cfg.to_yaml())
    rank_barrier(dist_info.world_size)()
    return dist_info


def train_stages(cfg: PccConfig, dist_info, data_root: Path,
                 test_tasks: dict | None) -> tuple[dict[str, Any], Any, Any]:
    """Each enabled stage in order, each starting from the previous one's final checkpoint.

    Returns:
        ``({stage: outcome as a dict}, embedder, engine)`` of the last stage.
    """
    outcomes: dict[str, Any] = {}
    previous = earlier_stage1(cfg, Path(cfg.run.output_dir), dist_info)
    embedder = engine = None
    for name in STAGES:
        if not getattr(cfg, name).enabled:
            continue
        runner = StageRunner(cfg, name, dist_info, data_root, test_tasks, previous)
        if engine is not None:
            # Stage 1's engine and model are freed before stage 2 builds its own.
            engine.release()
            embedder = engine = None
        outcome, embedder, engine = runner.run()
        outcomes[name] = asdict(outcome)
        previous = Path(outcome.final_checkpoint)
    return outcomes, embedder, engine


def score_sts7(cfg: PccConfig, embedder, dist_info, data_root: Path):
    """The final model's :class:`~pcc_dist.sts_protocol.StsResult` on ``eval.tasks`` (None if
    empty); every rank embeds its share of the sentences."""
    if not cfg.eval.tasks:
        return None
    embedder.eval()
    tasks = {n: t for n, t in load_sts7(data_root).items() if n in cfg.eval.tasks}
    return evaluate_sts(ShardedEncoder(embedder, dist_info.rank, dist_info.world_size),
                        tasks, batch_size=cfg.eval.batch_size)


def export_run(cfg: PccConfig, run_dir: Path, embedder, engine, dist_info,
               results: dict[str, Any], sts) -> None:
    """The final model to ``<run>/model`` and ``results.json`` (rank 0), the STS7 scores to the
    run's tracker. Gathering the weights is a collective call: every rank takes part."""
    from pcc_dist.modeling import TRAINING_MODEL_DIR, save_embedder
    from pcc_dist.tracking import make_tracker

    state_dict = engine.backbone_state_dict()
    if dist_info.rank != 0:
        return
    save_embedder(embedder, run_dir / TRAINING_MODEL_DIR, state_dict=state_dict)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    if sts is not None:
        logger.info("STS results:\n%s", format_table(sts))
    with make_tracker(cfg, run_dir, rank=0) as pipeline:
        if sts is not None:
            pipeline.log_metrics({f"eval/sts/{k}": v for k, v in sts.spearman.items()}
                                 | {"eval/sts/avg": sts.avg}, step=0)
        pipeline.log_artifact(run_dir / "results.json", "eval")
