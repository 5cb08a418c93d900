"""The training loop: stage 1 (InfoNCE on NLI triplets) then stage 2 (Pcc, 1 - Pearson r).

Reads as a list of named steps. Each stage:

1. load its data, de-contaminate it against the STS7 test sets, rescale stage-2 scores;
2. build a fresh embedder and engine; start from the previous stage's final weights, or resume
   from this stage's newest complete checkpoint (model, optimizer, scheduler, RNG, data position);
3. for each optimizer step: take this rank's slice of the global batch (tokenised a step ahead),
   run the gradient cache (or plain forwards/backward) over length-sorted chunks, step the engine
   (non-finite steps are skipped on every rank), log, evaluate on STS-B dev, checkpoint;
4. save a final checkpoint (the next stage starts from it) and export the model.

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
from pcc_dist.checkpoint_manager import CheckpointManager, load_weights_from
from pcc_dist.config import PccConfig, StageSettings
from pcc_dist.data import (
    ScoredPair,
    Triplet,
    decontaminate,
    load_sts7,
    load_sts_task,
    load_training_set,
    rescale_scores,
    resolve_data_root,
)
from pcc_dist.errors import PccError
from pcc_dist.evaluation import evaluate_sts
from pcc_dist.progress import progress_enabled
from pcc_dist.resume_from import explicit_resume_point
from pcc_dist.sampling import GlobalBatchPlan
from pcc_dist.sharded_encode import ShardedEncoder
from pcc_dist.step_inputs import Prefetcher, tokenize_views
from pcc_dist.sts_protocol import format_table

logger = logging.getLogger(__name__)

STAGES = ("stage1", "stage2")
METRICS_FILE = "metrics.jsonl"


class TrainingError(PccError, RuntimeError):
    """The run cannot continue; the message says why and how to resume."""


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


def _dist():
    from pcc_dist.distributed import init_distributed

    return init_distributed()


def _barrier(world_size: int):
    if world_size == 1:
        return lambda: None
    return torch.distributed.barrier


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


class StageRunner:
    """Runs one training stage on every rank.

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
        self.real_token_fraction = 1.0  # of the last step's views on this rank

    # -- step 1: data ---------------------------------------------------------------------
    def load_examples(self) -> tuple[list, dict[str, Any] | None]:
        examples = read_stage_examples(self.cfg, self.name, self.data_root)
        report = None
        if self.test_tasks is not None:
            examples, contamination = decontaminate(examples, self.test_tasks)
            report = contamination.to_dict()
            logger.info("%s: de-contamination removed %s (kept %d of %d)", self.name,
                        contamination.removed_per_source, contamination.kept, contamination.total)
        if self.name == "stage2":
            examples = rescale_scores(examples, self.cfg.data.score_scaling,
                                      self.cfg.data.score_bounds)
        self._require_one_global_batch(len(examples), report)
        return examples, report

    def _require_one_global_batch(self, count: int, report: dict[str, Any] | None) -> None:
        """Refuse a data set smaller than one global batch, naming it, its size and the batch."""
        batch = self.stage.global_batch_size
        if count >= batch:
            return
        if report is None:
            how = "with data.decontaminate=false"
        else:
            how = (f"after de-contamination removed {report['removed']} of {report['total']} "
                   "that occur in STS7 test sets")
        raise TrainingError(
            f"{self.name}.data={self.stage.data!r} has {count} examples {how}, fewer than one "
            f"global batch ({self.name}.global_batch_size={batch}); lower "
            f"{self.name}.global_batch_size to at most {count} (a multiple of the number of "
            "ranks) or add data.")

    # -- step 3a: one rank's batch as token views ---------------------------------------
    def views(self, embedder, batch: list) -> tuple[list[dict[str, torch.Tensor]],
                                                     torch.Tensor | None]:
        """Token views (stage 1: anchor, positive[, negative]; 2: sentence1, 2), gold scores."""
        return tokenize_views(embedder, self.name, batch, self.stage.max_length)

    def make_loss(self):
        from pcc_dist.losses import InfoNCELoss, PearsonLoss

        if self.name == "stage1":
            return InfoNCELoss(temperature=self.cfg.loss.temperature, kernel=self.cfg.loss.kernel,
                               chunk_size=self.cfg.loss.chunk_size)
        return PearsonLoss(kernel=self.cfg.loss.kernel)

    # -- step 3c: dev evaluation -------------------------------------------------------
    def dev_spearman(self, embedder) -> float:
        dev = {"STSBenchmark": load_sts_task("STSBenchmark", self.data_root, split="dev")}
        encoder = ShardedEncoder(embedder, self.dist.rank, self.dist.world_size)
        was_training = embedder.training
        result = evaluate_sts(encoder, dev, batch_size=self.cfg.eval.batch_size,
                              show_progress=False)
        embedder.train(was_training)
        return result.spearman["STSBenchmark"]

    # -- the stage -------------------------------------------------------------------------
    def run(self) -> tuple[StageOutcome, Any, Any]:
        """Train the stage; returns its outcome, the embedder and the engine (for export)."""
        from pcc_dist.engine import build_engine
        from pcc_dist.gradcache import GradCache
        from pcc_dist.modeling import load_embedder
        from pcc_dist.tracking import make_tracker

        started = time.perf_counter()
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        checkpoints = CheckpointManager(self.stage_dir / "checkpoints",
                                        self.cfg.checkpoint.keep_last, self.dist.rank,
                                        _barrier(self.dist.world_size))
        # Chosen before data and weights load: a damaged checkpoint folder fails in seconds.
        resume_from = self._resume_point(checkpoints)
        examples, contamination = self.load_examples()
        plan = GlobalBatchPlan(len(examples), self.stage.global_batch_size,
                               self.dist.world_size, self.cfg.run.seed)
        total_steps = self.total_steps = plan.total_steps(self.stage.epochs, self.stage.max_steps)
        logger.info("%s: %d examples, global batch %d (%d per rank x %d ranks), %d steps",
                    self.name, len(examples), plan.global_batch_size, plan.per_rank,
                    self.dist.world_size, total_steps)

        # Same seed on every rank for the weights it creates (LoRA A matrices): ZeRO-3 keeps
        # each rank's own slice of them, so different draws would make an inconsistent model.
        seed_everything(self.cfg.run.seed)
        embedder = load_embedder(self.cfg.model, for_training=True)
        engine = build_engine(embedder, self.cfg, self.stage, total_steps)
        # Then one stream per rank for dropout, so ranks do not draw identical masks.
        seed_everything(self.cfg.run.seed + 1 + self.dist.rank)
        state = TrainerState(stage=self.name, world_size=self.dist.world_size,
                             global_batch_size=plan.global_batch_size)
        if resume_from is not None:
            state = checkpoints.load(engine, resume_from)
            self._check_resume_compatible(state, plan)
            if state.world_size != self.dist.world_size:
                # Same global batch, so the same batches in the same order (the plan does not
                # depend on W) and the same loss; only per-rank dropout streams cannot carry over.
                logger.warning("%s: resuming a checkpoint written on %d ranks on %d ranks; the "
                               "data order and global batch are unchanged, dropout masks are "
                               "drawn afresh", self.name, state.world_size,
                               self.dist.world_size)
                state.world_size = self.dist.world_size
        elif self.init_from is not None:
            load_weights_from(engine, self.init_from)
            logger.info("%s starts from the weights of %s", self.name, self.init_from)
        if contamination is not None and self.is_main:
            (self.stage_dir / "decontamination.json").write_text(
                json.dumps(contamination, indent=2))

        with make_tracker(self.cfg, self.stage_dir, rank=self.dist.rank,
                          resume_run_id=state.tracking_run_id, stage=self.name) as tracker:
            tracker.log_params({"deepspeed": engine.ds_config})
            self._train_steps(engine, embedder, GradCache(engine, self.stage.gradcache_chunk_size),
                              examples, plan, total_steps, state, checkpoints, tracker)
            final = checkpoints.latest()
            dev = self.dev_spearman(embedder) if self.cfg.eval.dev else None
            if dev is not None:
                tracker.log_metrics({"eval/stsb_dev_spearman": dev}, step=state.step)
                logger.info("%s: STS-B dev Spearman %.2f", self.name, dev)
            logger.info("%s finished at step %d", self.name, state.step)
            outcome = StageOutcome(
                stage=self.name, steps=state.step, skipped_steps=state.skipped_steps,
                final_loss=state.last_loss, stsb_dev_spearman=dev,
                best_dev_spearman=state.best_dev_spearman, best_step=state.best_step,
                seconds=time.perf_counter() - started, train_seconds=state.train_seconds,
                final_checkpoint=str(final),
                decontamination=contamination)
            if self.is_main:
                (self.stage_dir / "outcome.json").write_text(json.dumps(asdict(outcome),
                                                                        indent=2))
        return outcome, embedder, engine

    def _train_steps(self, engine, embedder, cache, examples, plan, total_steps, state,
                     checkpoints, tracker) -> None:
        """The step loop, each step's token views made one step ahead (:mod:`.step_inputs`)."""
        def produce(step: int):  # runs in the tokenise-ahead thread
            rows = plan.rank_indices(step, self.dist.rank)
            return self.views(embedder, [examples[i] for i in rows])

        with Prefetcher(produce, range(state.step, total_steps)) as ahead:
            self._step_loop(engine, embedder, cache, ahead, plan, total_steps, state,
                            checkpoints, tracker)

    def _step_loop(self, engine, embedder, cache, ahead, plan, total_steps, state, checkpoints,
                   tracker) -> None:
        loss_module = self.make_loss()
        progress = _progress(total_steps, state.step, self.name,
                             enabled=self.is_main and progress_enabled())
        engine.train()
        for step in range(state.step, total_steps):
            tick = time.perf_counter()
            views, scores = ahead.get(step)
            loss_value = cache.run(engine.module, views, _bind_loss(loss_module, scores))
            self.real_token_fraction = cache.real_token_fraction
            result = engine.step()
            state.step = step + 1
            if result.skipped:
                state.skipped_steps += 1
                state.consecutive_nonfinite += 1
            else:
                state.consecutive_nonfinite = 0
                state.last_loss = loss_value
            seconds = time.perf_counter() - tick
            state.train_seconds += seconds
            batch_r = getattr(loss_module, "last_r", None) if scores is not None else None
            self._log_step(tracker, state, loss_value, batch_r, result, views, seconds, plan)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}")
            if result.skipped:  # after logging, so the step that stops the run is on record
                self._stop_if_diverged(state, checkpoints)

            if (self.cfg.eval.dev and self.cfg.eval.every_steps
                    and state.step % self.cfg.eval.every_steps == 0):
                self._evaluate_and_select(embedder, engine, tracker, state)
            if state.step % self.cfg.checkpoint.every_steps == 0 or state.step == total_steps:
                state.tracking_run_id = tracker.run_id
                checkpoints.save(engine, state)
        progress.close()

    def _resume_point(self, checkpoints: CheckpointManager) -> Path | None:
        """Clear writes that died, then pick the newest intact checkpoint (every rank the same
        one; damaged ones are skipped with a warning), or None to start the stage afresh."""
        checkpoints.remove_incomplete()
        explicit = explicit_resume_point(self.cfg, self.name, checkpoints)
        if explicit is not None:
            return explicit
        if self.cfg.checkpoint.resume != "auto":
            return None
        return checkpoints.latest_intact()

    def _check_resume_compatible(self, state: TrainerState, plan: GlobalBatchPlan) -> None:
        if state.global_batch_size != plan.global_batch_size:
            raise TrainingError(
                f"the checkpoint was written with global batch {state.global_batch_size}, this "
                f"run uses {plan.global_batch_size}; resume with the same global_batch_size "
                "(the data position is counted in global batches).")

    def _stop_if_diverged(self, state: TrainerState, checkpoints: CheckpointManager) -> None:
        limit = self.cfg.train.max_consecutive_nonfinite
        if state.consecutive_nonfinite >= limit:
            # Every rank gets here at the same step: the skip decision comes from DeepSpeed's
            # all-reduced gradient norm (TrainEngine.step), never from a rank's own loss.
            latest = checkpoints.latest()
            where = (f"resume from {latest}" if latest is not None else
                     "no checkpoint was written yet, so start again")
            raise TrainingError(
                f"{self.name}: {limit} consecutive steps had a non-finite loss or gradient "
                f"(steps {state.step - limit + 1}-{state.step}, last at step {state.step}); "
                f"every rank skipped them. Lower the learning rate or check the data, then "
                f"{where}.")
        logger.warning("%s step %d: non-finite loss or gradient, step skipped on every rank "
                       "(%d in a row)", self.name, state.step, state.consecutive_nonfinite)

    def _log_step(self, tracker, state, loss_value, batch_r, result, views, seconds, plan):
        if state.step % self.cfg.train.log_every_steps and state.step != 1:
            return
        # Tokens of this rank times W: ranks hold equal batches of similar length, and an exact
        # count would cost a collective per logged step for a throughput estimate.
        tokens = sum(int(v["attention_mask"].sum()) for v in views) * self.dist.world_size
        metrics = {
            "train/loss": loss_value,
            "train/lr": result.lr,
            "train/grad_norm": result.grad_norm,
            "train/skipped_steps": float(state.skipped_steps),
            "perf/pairs_per_s": plan.global_batch_size / seconds,
            "perf/tokens_per_s": tokens / seconds,
            # This rank's real / processed token positions (pcc_dist.length_chunks).
            "perf/real_token_fraction": self.real_token_fraction,
        }
        if batch_r is not None:
            metrics["train/pearson_r"] = float(batch_r)
        tracker.log_metrics(metrics, step=state.step)
        if self.is_main and not progress_enabled():
            # No progress bar in CI logs or pipes: a line per logged step instead.
            logger.info("%s step %d/%d: loss %.4f, lr %.3g, %.1f pairs/s", self.name,
                        state.step, self.total_steps, loss_value, result.lr,
                        metrics["perf/pairs_per_s"])
        if self.is_main:
            # A plain local record of every logged step, readable without MLflow. A resumed run
            # appends the steps after its checkpoint again; the last line of a step wins.
            with open(self.stage_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.step} | metrics) + "\n")

    def _evaluate_and_select(self, embedder, engine, tracker, state) -> None:
        """STS-B dev score; a new best is exported to ``<stage>/best`` (selection on dev only,
        never on the STS7 test sets)."""
        from pcc_dist.modeling import save_embedder

        dev = self.dev_spearman(embedder)
        tracker.log_metrics({"eval/stsb_dev_spearman": dev}, step=state.step)
        if state.best_dev_spearman is None or dev > state.best_dev_spearman:
            state.best_dev_spearman, state.best_step = dev, state.step
            state_dict = backbone_state_dict(engine)  # collective: every rank takes part
            if self.is_main:
                save_embedder(embedder, self.stage_dir / "best", state_dict=state_dict)
            logger.info("%s step %d: new best STS-B dev Spearman %.2f, saved to %s", self.name,
                        state.step, dev, self.stage_dir / "best")


def backbone_state_dict(engine) -> dict[str, torch.Tensor]:
    """The backbone's full (or adapter-only) state dict gathered from the ZeRO-3 partitions.

    The engine wraps the :class:`Embedder`, whose keys carry a ``backbone.`` prefix; the
    backbone's ``save_pretrained`` expects its own keys. Under ZeRO-3 the module's own tensors
    are empty partitions, so a key that does not match is not a harmless miss: the saved model
    would be garbage. A collective call; ranks other than 0 get ``{}``.
    """
    prefix = "backbone."
    gathered = engine.gathered_state_dict()
    stray = [k for k in gathered if not k.startswith(prefix)]
    if stray:
        raise RuntimeError(f"unexpected non-backbone weights in the embedder: {stray[:3]}")
    return {k[len(prefix):]: v for k, v in gathered.items()}


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)


def _bind_loss(loss_module, scores: torch.Tensor | None):
    """``embeddings -> loss``: InfoNCE on the views, or Pearson against this step's scores."""
    if scores is None:
        return lambda embeddings: loss_module(*embeddings)
    return lambda embeddings: loss_module(embeddings[0], embeddings[1], scores)


def _progress(total: int, initial: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", disable=not enabled)


def run_training(cfg: PccConfig) -> dict[str, Any]:
    """Train every enabled stage, evaluate on STS7, export; returns the results document.

    Written to ``<output_dir>/results.json``; the final model goes to ``<output_dir>/model``
    (the run-folder layout that ``pcc-eval --model`` and ``pcc-export`` read).
    """
    from pcc_dist.modeling import (
        TRAINING_CONFIG_NAME,
        TRAINING_MODEL_DIR,
        check_model_files,
        save_embedder,
    )
    from pcc_dist.tracking import make_tracker

    run_dir = Path(cfg.run.output_dir)
    # Every rank, before the process group and any weight load: an unwritable or full output
    # folder fails in seconds with its name, not after the first checkpoint interval. (Each rank
    # probes with its own file, so a shared folder is fine.) Likewise a missing or damaged model
    # folder (only small files and headers are read).
    from pcc_dist.memory_plan import checkpoint_space_needed

    needed, why = checkpoint_space_needed(cfg)
    logger.info("run.output_dir needs %.2f GiB free: %s", needed / 2**30, why)
    preflight_output_dir(run_dir, needed)
    check_model_files(cfg.model)
    dist_info = _dist()
    if dist_info.rank == 0:
        (run_dir / TRAINING_CONFIG_NAME).write_text(cfg.to_yaml())
    _barrier(dist_info.world_size)()
    data_root = resolve_data_root(cfg.data.root)
    test_tasks = load_sts7(data_root) if cfg.data.decontaminate else None

    outcomes: dict[str, Any] = {}
    previous = _earlier_stage1(cfg, run_dir, dist_info)
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

    results: dict[str, Any] = {"stages": outcomes}
    if cfg.eval.tasks:
        embedder.eval()
        tasks = {n: t for n, t in load_sts7(data_root).items() if n in cfg.eval.tasks}
        sts = evaluate_sts(ShardedEncoder(embedder, dist_info.rank, dist_info.world_size),
                           tasks, batch_size=cfg.eval.batch_size)
        results["sts"] = sts.to_json()
    state_dict = backbone_state_dict(engine)  # collective: every rank takes part
    if dist_info.rank == 0:
        save_embedder(embedder, run_dir / TRAINING_MODEL_DIR, state_dict=state_dict)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        if "sts" in results:
            logger.info("STS results:\n%s", format_table(sts))
        with make_tracker(cfg, run_dir, rank=0) as pipeline:
            if "sts" in results:
                pipeline.log_metrics({f"eval/sts/{k}": v for k, v in sts.spearman.items()}
                                     | {"eval/sts/avg": sts.avg}, step=0)
            pipeline.log_artifact(run_dir / "results.json", "eval")
    shutdown_distributed()
    return results


def _earlier_stage1(cfg: PccConfig, run_dir: Path, dist_info: Any) -> Path | None:
    """Stage 1's final checkpoint from an earlier run in the same folder, when this run trains
    stage 2 only (the two stages as two jobs, e.g. the mistral7b_qlora_stage{1,2} recipes)."""
    if cfg.stage1.enabled or not cfg.stage2.enabled:
        return None
    # The newest intact one: a damaged checkpoint is skipped (and set aside) as on resume.
    found = CheckpointManager(run_dir / "stage1" / "checkpoints", 1, dist_info.rank,
                              _barrier(dist_info.world_size)).latest_intact()
    if found is None:
        logger.info("stage 2 starts from %s (no stage-1 checkpoint in %s)",
                    cfg.model.name_or_path, run_dir)
    return found


def shutdown_distributed() -> None:
    """Wait for every rank, then close the process group.

    Without it a rank that finishes first exits while gloo still has a peer, and its process
    aborts ("terminate called without an active exception"), failing the launcher.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
