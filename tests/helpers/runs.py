"""Shared pieces of the fault tests: launch commands, the tiny model, metrics readers, and the
uninterrupted reference runs every comparison is made against (computed once per session).

Every run here is stage 2 only (Pearson, so the loss is a cross-rank statistic), LoRA dropout 0
and fp32 on CPU: with dropout on, each rank draws its own masks, so runs on 1 and on 2 ranks could
not match; with it off, the loss of a step is a function of the weights and the step's global
batch alone, and the trajectories of different world sizes agree up to float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pcc_dist.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "launchers" / "configs" / "tiny_cpu.yaml"
BIN = Path(sys.executable).parent
DRIVER = Path(__file__).resolve().parents[1] / "reliability" / "_faults_driver.py"
TIMEOUT = 420
# Built once per session: the tiny model folder and the uninterrupted reference runs.
_CACHE: dict[str, Path] = {}
STEPS = 20
EVERY = 2
# W = 1 and W = 2 add the same numbers in another order (the Pearson sums, DeepSpeed's
# reduce-scatter of gradients): measured over the 20 reference steps the losses differ by at most
# 7.7e-7 (loss ~ 0.1-1.6, fp32 eps 1.2e-7), so 1e-5 leaves 10x room for float noise while a wrong
# batch, a lost Adam state or a reset schedule moves the loss by > 1e-3.
TOL_ACROSS_W = 1e-5

# Stage 2 only, 20 steps, a checkpoint every 2 steps and all of them kept (a test may start from
# any of them), no evaluation, a metrics line per step.
BASE = ("stage1.enabled=false", f"stage2.max_steps={STEPS}",
        f"checkpoint.every_steps={EVERY}", f"checkpoint.keep_last={STEPS}",
        "model.lora.dropout=0", "data.decontaminate=false", "eval.tasks=[]", "eval.dev=false",
        "train.log_every_steps=1")


def env(**extra: str) -> dict[str, str]:
    # One thread per rank: two ranks share the 2 cores of this machine.
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                         "PATH": f"{BIN}:{os.environ.get('PATH', '')}"} | extra


def tiny_llama(tmp_path_factory) -> Path:
    """The tiny random Llama folder, built once per session."""
    if "model" not in _CACHE:
        from helpers.tiny_models import save_tiny_model

        _CACHE["model"] = save_tiny_model(tmp_path_factory.mktemp("model") / "llama", "llama")
    return _CACHE["model"]


def train_cmd(world: int, model: Path, out: Path, *extra: str, driver: bool = False,
              restarts: int = 0) -> list[str]:
    """``python launchers/train.py`` (W = 1) or ``torchrun --nproc_per_node W`` (W > 1);
    ``driver`` runs the test-only fault driver instead, which wraps the same entry point."""
    script = str(DRIVER if driver else ROOT / "launchers" / "train.py")
    args = ["--config", str(CONFIG), f"model.name_or_path={model}", f"run.output_dir={out}",
            *BASE, *extra]
    if world == 1:
        return [str(BIN / "python"), script, *args]
    return [str(BIN / "python"), "-m", "torch.distributed.run", "--nproc_per_node", str(world),
            "--max-restarts", str(restarts), "--master_port", str(free_port()), script, *args]


def run(cmd: list[str], log: Path, expect: int | None = 0,
        **env_extra: str) -> subprocess.CompletedProcess:
    """Run to the end with stdout+stderr in ``log``; assert the exit code unless None."""
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), stdout=handle,
                              stderr=subprocess.STDOUT, timeout=TIMEOUT)
    if expect is not None:
        assert proc.returncode == expect, \
            f"{cmd[:4]} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
    return proc


def step_lines(stage_dir: Path) -> list[dict]:
    """Every metrics line in write order (a resumed run appends the steps after its checkpoint
    again)."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(stage_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice keeps its last line."""
    return {r["step"]: r["train/loss"] for r in step_lines(stage_dir)}


def max_step(stage_dir: Path) -> int:
    return max((r["step"] for r in step_lines(stage_dir)), default=0)


def reference(tmp_path_factory, world: int) -> Path:
    """Run folder of the uninterrupted 20-step run on ``world`` ranks (once per session)."""
    key = f"reference_w{world}"
    if key not in _CACHE:
        out = tmp_path_factory.mktemp(key) / "run"
        run(train_cmd(world, tiny_llama(tmp_path_factory), out), out.parent / "log.txt")
        assert sorted(losses(out / "stage2")) == list(range(1, STEPS + 1))
        _CACHE[key] = out
    return _CACHE[key]


def assert_same_losses(got: dict[int, float], expected: dict[int, float], steps, tol: float):
    for step in steps:
        assert abs(got[step] - expected[step]) <= tol, (step, got[step], expected[step])

