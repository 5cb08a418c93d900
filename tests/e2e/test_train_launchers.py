"""The real launchers as subprocesses on a tiny random Llama + LoRA under ZeRO-3 (CPU, gloo).

torchrun with 2 ranks, the deepspeed launcher with 2 ranks, two torchrun "nodes" on 127.0.0.1,
and an exact resume after SIGKILL. Evaluation is switched off (eval.tasks=[], eval.dev=false):
these tests are about the engine and the launchers; the evaluator has its own tests.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import runs
from helpers.runs import BIN, CONFIG, TIMEOUT, env, free_port, run

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return runs.tiny_llama(tmp_path_factory)


def overrides(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), f"model.name_or_path={model}", f"run.output_dir={out}",
            "eval.tasks=[]", "eval.dev=false", "train.log_every_steps=1", *extra]


def losses(stage_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a step logged twice (before a kill) keeps its last line."""
    assert (stage_dir / "metrics.jsonl").is_file(), f"no metrics in {stage_dir}"
    return runs.losses(stage_dir)


def assert_two_stages_trained(out: Path, steps: int = 3) -> None:
    for stage in ("stage1", "stage2"):
        assert (out / stage / "checkpoints" / f"step-{steps:08d}" / "COMPLETE").is_file()
        values = losses(out / stage)
        assert sorted(values) == list(range(1, steps + 1))
        assert all(math.isfinite(v) for v in values.values())
    outcome = json.loads((out / "stage2" / "outcome.json").read_text())
    assert outcome["steps"] == steps and outcome["skipped_steps"] == 0
    meta = json.loads((out / "model" / "pcc_embedder.json").read_text())
    assert meta["mode"] == "lora"
    assert (out / "model" / "adapter").is_dir()


def sts_b(model: Path, tmp_path: Path) -> float:
    """STS-B test Spearman of a model folder through `pcc-eval` in a fresh process."""
    report = tmp_path / f"eval_{model.name}.json"
    run([str(BIN / "pcc-eval"), "--model", str(model), "--tasks", "STSBenchmark", "--json",
         str(report)], tmp_path / f"eval_{model.name}.txt")
    return json.loads(report.read_text())["spearman"]["STSBenchmark"]


def test_torchrun_two_ranks_both_stages_and_exported_model(tiny_llama, tmp_path):
    out = tmp_path / "run"
    run([str(BIN / "python"), "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "launchers/train.py",
         *overrides(tiny_llama, out, "eval.tasks=[STSBenchmark]", "stage1.lr=5e-2",
                    "stage2.lr=5e-2")], tmp_path / "log.txt")
    assert_two_stages_trained(out)
    # Stage 2 started from stage 1's final weights, not from the base model.
    assert "starts from the weights of" in (tmp_path / "log.txt").read_text()
    # The exported model/ folder is the trained model: reloaded in a fresh process (base +
    # LoRA adapter) it scores what the trainer measured on its ZeRO-3 partitioned weights...
    # The tolerance covers float noise: a random tiny model's cosines are nearly tied, so
    # different batch padding (2 ranks vs 1 process) moves its Spearman by ~0.02.
    trained = json.loads((out / "results.json").read_text())["sts"]["spearman"]["STSBenchmark"]
    assert abs(sts_b(out / "model", tmp_path) - trained) < 0.1
    # ...and not what the untrained base scores (negative control; lr 5e-2 moves it far).
    assert abs(sts_b(tiny_llama, tmp_path) - trained) > 1.0


# slow: tests/unit/test_launchers.py checks train_deepspeed.sh's command line with a fake
# `deepspeed`, and test_torchrun_two_ranks_both_stages_and_exported_model trains on 2 ranks.
@pytest.mark.slow
def test_deepspeed_launcher_two_ranks(tiny_llama, tmp_path):
    out = tmp_path / "run"
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
         "launchers/train.py", *overrides(tiny_llama, out)], tmp_path / "log.txt")
    assert_two_stages_trained(out)


def test_two_torchrun_nodes_on_loopback(tiny_llama, tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    procs = []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.txt", "w")
        cmd = [str(BIN / "python"), "-m", "torch.distributed.run", "--nnodes", "2",
               "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", port, "launchers/train.py", *overrides(tiny_llama, out)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = "\n".join((tmp_path / f"node{n}.txt").read_text()[-2000:] for n in (0, 1))
    assert codes == [0, 0], logs
    assert_two_stages_trained(out)


# slow: tests/reliability/test_faults_checkpoint_write.py kills and resumes the same one-rank
# run inside the default suite (equal losses to 1e-6); this one adds the launcher-level view.
@pytest.mark.slow
def test_sigkill_and_resume_reproduces_the_uninterrupted_losses(tiny_llama, tmp_path):
    stage2_only = ("stage1.enabled=false", "stage2.max_steps=6", "checkpoint.every_steps=2")
    python = str(BIN / "python")
    reference = tmp_path / "reference"
    run([python, "launchers/train.py", *overrides(tiny_llama, reference, *stage2_only)],
        tmp_path / "reference.txt")
    expected = losses(reference / "stage2")
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "killed"
    cmd = [python, "launchers/train.py", *overrides(tiny_llama, out, *stage2_only)]
    with open(tmp_path / "killed.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        metrics = out / "stage2" / "metrics.jsonl"
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and max(losses(out / "stage2"), default=0) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(losses(out / "stage2"))
    assert killed_at < 6

    run(cmd, tmp_path / "resumed.txt")
    resumed_log = (tmp_path / "resumed.txt").read_text()
    assert "resumed from" in resumed_log
    got = losses(out / "stage2")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])

    # Negative control: another seed draws other batches and other dropout masks, so the
    # comparison above can tell runs apart.
    other = tmp_path / "other_seed"
    run([python, "launchers/train.py",
         *overrides(tiny_llama, other, "stage1.enabled=false", "stage2.max_steps=2",
                    "run.seed=1")], tmp_path / "other.txt")
    assert abs(losses(other / "stage2")[2] - expected[2]) > 1e-4


def test_bad_training_row_stops_with_file_and_line(tiny_llama, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"sentence1": "a cat", "sentence2": "a dog", "score": 0.5}\n'
                    '{"sentence1": "a cat", "sentence2": "", "score": 0.5}\n')
    proc = subprocess.run(
        [str(BIN / "python"), "launchers/train.py",
         *overrides(tiny_llama, tmp_path / "run", "stage1.enabled=false", f"stage2.data={data}",
                    "data.decontaminate=false")],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"pcc-train: {data}:2" in proc.stderr
    assert "Traceback" not in proc.stderr
