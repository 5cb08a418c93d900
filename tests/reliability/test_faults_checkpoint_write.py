"""Death during a checkpoint write: the half-written checkpoint is never resumed from, the
previous one is, and nothing is left that a later run could take for complete.

One real run is SIGKILLed inside the save (engine files, RNG and trainer state written, COMPLETE
marker not yet); the seams of the protocol itself (checkpoint_manager.py) are then hit one by one
with a stand-in engine in a fresh process, which costs a second each instead of a training run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from helpers.runs import (
    ROOT,
    STEPS,
    assert_same_losses,
    env,
    losses,
    reference,
    run,
    step_lines,
    tiny_llama,
    train_cmd,
)

from pcc_dist.checkpoint_manager import CheckpointManager

pytestmark = pytest.mark.distributed


def test_sigkill_before_the_marker_resumes_from_the_previous_checkpoint(tmp_path_factory,
                                                                       tmp_path):
    expected = losses(reference(tmp_path_factory, 1) / "stage2")
    out = tmp_path / "run"
    folder = out / "stage2" / "checkpoints"
    cmd = train_cmd(1, tiny_llama(tmp_path_factory), out, driver=True)
    proc = run(cmd, tmp_path / "killed.txt", expect=None,
               PCC_TEST_FAULTS='{"kill_before_marker": 4}')
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.txt").read_text()[-3000:]
    half = folder / ".tmp-step-00000004"
    assert (half / "engine" / "state").is_dir() and (half / "trainer_state.json").is_file()
    assert not (folder / "step-00000004").exists()
    assert CheckpointManager(folder, 2, 0, lambda: None).latest() == folder / "step-00000002"

    plain = train_cmd(1, tiny_llama(tmp_path_factory), out)
    run(plain, tmp_path / "resumed.txt")
    text = (tmp_path / "resumed.txt").read_text()
    assert "removing incomplete checkpoint" in text and str(half) in text
    assert f"resumed from {folder / 'step-00000002'} at step 2" in text
    seq = [r["step"] for r in step_lines(out / "stage2")]
    assert seq == [1, 2, 3, 4] + list(range(3, STEPS + 1))
    assert_same_losses(losses(out / "stage2"), expected, range(1, STEPS + 1), 1e-6)
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


# A stand-in engine and a SIGKILL at one seam of CheckpointManager.save. Steps 2 and 4 are saved
# cleanly, then step 6 (or a re-save of step 4, or a prune) dies at SEAM.
_SEAM_SCRIPT = textwrap.dedent('''
    import os, shutil, signal, sys, types
    from pathlib import Path
    import torch
    import pcc_dist.checkpoint_manager as ck
    from pcc_dist.checkpoint import COMPLETE_MARKER, TrainerState

    folder, seam = Path(sys.argv[1]), sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    class Engine:
        def __init__(self, step, fail=False):
            self.step, self.fail = step, fail
        def save_checkpoint(self, path):
            path.mkdir(parents=True)
            torch.save(torch.tensor([float(self.step)]), path / "w.pt")
            if self.fail and seam == "engine":
                die()

    keep = 2 if seam == "prune" else 5
    manager = ck.CheckpointManager(folder, keep, 0, lambda: None)
    for step in (2, 4):
        manager.save(Engine(step), TrainerState(stage="s", step=step))

    write, replace, rmtree = ck.fsync_write, os.replace, shutil.rmtree
    def dying_write(path, text):
        if seam == "marker" and path.name == COMPLETE_MARKER:
            die()
        return write(path, text)
    def dying_replace(src, dst):
        if seam == "rename" and Path(src).name.startswith(ck.TMP_PREFIX + ck.STEP_PREFIX):
            die()
        return replace(src, dst)
    def dying_rmtree(path, *args, **kwargs):
        # A removal that got as far as everything but the marker (rmtree's order is the
        # file system's), then the process died.
        path = Path(path)
        if seam in ("replace", "prune") and (path / COMPLETE_MARKER).is_file():
            for child in path.iterdir():
                if child.name != COMPLETE_MARKER:
                    rmtree(child) if child.is_dir() else child.unlink()
            die()
        return rmtree(path, *args, **kwargs)
    ck.fsync_write = dying_write
    ck.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if k[:2] != "__"})
    ck.os.replace = dying_replace
    ck.shutil = types.SimpleNamespace(rmtree=dying_rmtree, disk_usage=shutil.disk_usage)
    step = 4 if seam == "replace" else 6
    manager.save(Engine(step, fail=True), TrainerState(stage="s", step=step))
    print("SAVED")
''')


@pytest.mark.parametrize("seam", ["engine", "marker", "rename", "replace", "prune"])
def test_a_crash_at_any_seam_of_the_save_leaves_only_loadable_checkpoints(tmp_path, seam):
    folder = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", _SEAM_SCRIPT, str(folder), seam], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr

    manager = CheckpointManager(folder, 5, 0, lambda: None)
    manager.remove_incomplete()
    leftovers = [p.name for p in folder.iterdir() if not p.name.startswith("step-")]
    assert leftovers == [], f"{seam}: left behind {leftovers}"
    # Whatever a later run can find is whole: engine file, state file, marker.
    for path in manager.complete():
        assert (path / "engine" / "w.pt").is_file(), f"{seam}: {path} looks complete but is not"
        assert (path / "trainer_state.json").is_file()
    latest = manager.latest()
    # The interrupted write never becomes the resume point; the newest earlier one does (a
    # re-save of step 4 that died mid-way leaves step 2; a prune dies after step 6 is in place).
    expected = {"replace": "step-00000002", "prune": "step-00000006"}.get(seam, "step-00000004")
    assert latest is not None and latest.name == expected, (seam, latest)


def test_a_step_folder_without_its_marker_is_never_resumed_from(tmp_path):
    """The marker is the second guard, for what the rename cannot cover: a checkpoint copied in
    by hand (``cp -r``, rsync) that was interrupted has its final name but no marker."""
    import shutil

    folder = tmp_path / "checkpoints"
    manager = CheckpointManager(folder, 5, 0, lambda: None)
    done = folder / "step-00000004"
    (done / "engine").mkdir(parents=True)
    (done / "trainer_state.json").write_text("{}")
    (done / "COMPLETE").write_text("")
    partial = folder / "step-00000006"
    shutil.copytree(done, partial)
    (partial / "COMPLETE").unlink()  # the copy stopped before its last file
    assert manager.latest() == done
    manager.remove_incomplete()
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004"]
