"""Rank death: SIGKILL one worker of a 2-rank torchrun job (not the agent) after a checkpoint
exists; ``--max-restarts 1`` restarts the group, which resumes from the newest complete
checkpoint and finishes with the losses of the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers.runs import (
    EVERY,
    ROOT,
    STEPS,
    TIMEOUT,
    assert_same_losses,
    env,
    losses,
    max_step,
    reference,
    step_lines,
    tiny_llama,
    train_cmd,
)

from pcc_dist.checkpoint_manager import CheckpointManager

pytestmark = pytest.mark.distributed

KILL_AFTER_STEP = 11  # checkpoints 2..10 exist; the step in flight is 12 (next save at 12)


def _worker(agent: int, rank: str) -> psutil.Process | None:
    """The agent's worker process of ``rank`` (its direct child with RANK set)."""
    for child in psutil.Process(agent).children():
        try:
            if child.environ().get("RANK") == rank:
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _complete_steps(stage_dir) -> list[int]:
    manager = CheckpointManager(stage_dir / "checkpoints", 1, 0, lambda: None)
    return [int(path.name.removeprefix("step-")) for path in manager.complete()]


def test_rank_sigkill_restarts_the_group_and_resumes_without_lost_or_repeated_batches(
        tmp_path_factory, tmp_path):
    expected = losses(reference(tmp_path_factory, 2) / "stage2")
    out = tmp_path / "run"
    stage = out / "stage2"
    log = tmp_path / "log.txt"
    cmd = train_cmd(2, tiny_llama(tmp_path_factory), out, restarts=1)
    killed = None
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if killed is None and max_step(stage) >= KILL_AFTER_STEP:
                    victim = _worker(proc.pid, "1")
                    assert victim is not None, "no rank-1 worker under the torchrun agent"
                    victim.send_signal(signal.SIGKILL)
                    killed = {"pid": victim.pid, "logged": max_step(stage),
                              "complete": _complete_steps(stage)}
                time.sleep(0.05)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert killed is not None, "the run finished before a rank could be killed"
    assert proc.returncode == 0, text[-4000:]
    assert killed["logged"] < STEPS

    # The restarted group resumed from the newest checkpoint that was complete at the kill (a
    # save in flight cannot complete: it needs the dead rank).
    resume = killed["complete"][-1]
    assert resume >= KILL_AFTER_STEP - EVERY + 1
    assert f"resumed from {stage / 'checkpoints' / f'step-{resume:08d}'} at step {resume}" in text

    # metrics.jsonl in write order: 1..k before the kill, then resume+1..20 after the restart.
    # The steps between the checkpoint and the kill are trained again (nothing after a
    # checkpoint survives a crash), each exactly once more, and none is skipped.
    seq = [r["step"] for r in step_lines(stage)]
    k = next((i for i in range(1, len(seq)) if seq[i] <= seq[i - 1]), len(seq))  # restart
    assert seq[:k] == list(range(1, k + 1)) and k >= KILL_AFTER_STEP, seq
    assert seq[k:] == list(range(resume + 1, STEPS + 1)), seq

    # The redone steps saw the same batches (same loss as before the kill), and the whole
    # trajectory is the uninterrupted run's. Same world size, so bit-for-bit up to 1e-6.
    before = {r["step"]: r["train/loss"] for r in step_lines(stage)[:k]}
    got = losses(stage)
    assert_same_losses(got, before, range(resume + 1, k + 1), 1e-6)
    assert_same_losses(got, expected, range(1, STEPS + 1), 1e-6)

    # The training time survives the restart: the outcome sums the times of the steps kept
    # (1..resume from the killed job, resume+1..20 from the restarted one), each recovered from
    # its metrics line as global batch / pairs per second, not only the restarted job's steps.
    outcome = json.loads((stage / "outcome.json").read_text())
    state = json.loads((Path(outcome["final_checkpoint"]) / "trainer_state.json").read_text())
    lines = step_lines(stage)
    kept = lines[:resume] + lines[k:]
    assert [r["step"] for r in kept] == list(range(1, STEPS + 1))
    step_seconds = sum(state["global_batch_size"] / r["perf/pairs_per_s"] for r in kept)
    assert outcome["train_seconds"] == pytest.approx(step_seconds, rel=1e-6)
