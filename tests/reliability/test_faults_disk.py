"""Unwritable or full output folder: a clear error before training starts, and a full disk at
save time fails with the folder and the previous (intact) checkpoint named, exit code 1, no
traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from helpers.runs import BASE, BIN, CONFIG, ROOT, env, run, step_lines, tiny_llama, train_cmd

from pcc_dist.checkpoint_manager import CheckpointManager

pytestmark = pytest.mark.distributed


def _pcc_train(model, out):
    return subprocess.run(
        [str(BIN / "pcc-train"), "--config", str(CONFIG), f"model.name_or_path={model}",
         f"run.output_dir={out}", *BASE], cwd=ROOT, env=env(), capture_output=True, text=True,
        timeout=300)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write into, root included (chmod alone does not stop root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    locked = False
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        locked = chattr is not None and subprocess.run(
            [chattr, "+i", str(folder)], capture_output=True).returncode == 0
        if not locked:
            pytest.skip("running as root without chattr +i: cannot make a folder unwritable")
    try:
        yield folder
    finally:
        if locked:
            subprocess.run([shutil.which("chattr"), "-i", str(folder)], check=False)
        folder.chmod(0o755)


def test_unwritable_output_folder_fails_before_training(tmp_path_factory, tmp_path,
                                                         read_only_dir):
    out = read_only_dir / "run"
    proc = _pcc_train(tiny_llama(tmp_path_factory), out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"pcc-train: output folder {out} is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Before the process group and the model: no engine, no step was started.
    assert "ZeRO stage" not in proc.stderr and "step 1/" not in proc.stderr


def test_nearly_full_disk_fails_before_training(tmp_path_factory, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(1, tiny_llama(tmp_path_factory), out, driver=True), tmp_path / "log.txt",
        expect=1, PCC_TEST_FAULTS=json.dumps({"free_bytes": 3 * 2**20}))
    text = (tmp_path / "log.txt").read_text()
    assert f"pcc-train: output folder {out} has 3 MiB free" in text
    assert "Traceback" not in text and "step 1/" not in text


def test_disk_full_at_save_names_the_folder_and_keeps_the_previous_checkpoint(
        tmp_path_factory, tmp_path):
    out = tmp_path / "run"
    folder = out / "stage2" / "checkpoints"
    log = tmp_path / "log.txt"
    run(train_cmd(1, tiny_llama(tmp_path_factory), out, driver=True), log, expect=1,
        PCC_TEST_FAULTS=json.dumps({"enospc_at": 4}))
    text = log.read_text()
    previous = folder / "step-00000002"
    assert f"pcc-train: writing checkpoint step-00000004 into {folder} failed (" in text, \
        text[-3000:]
    assert f"MiB free there); the previous checkpoint {previous} is intact" in text
    assert "Traceback" not in text
    # The previous checkpoint is whole and is what a rerun resumes from; the partial write is
    # gone (its space given back) and no step-4 folder exists.
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002"]
    assert CheckpointManager(folder, 2, 0, lambda: None).latest() == previous
    assert (previous / "engine" / "state").is_dir() and (previous / "rng_rank0.pt").is_file()
    assert max(r["step"] for r in step_lines(out / "stage2")) == 4
