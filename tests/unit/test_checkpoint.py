"""Checkpoint manager: atomic publish, pruning, RNG restore, incomplete writes, preflight."""

import json
from pathlib import Path

import pytest
import torch

import pcc_dist.checkpoint as checkpoint_module
from pcc_dist import output_paths
from pcc_dist.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    CheckpointManager,
    TrainerState,
    preflight_output_dir,
)


class FakeEngine:
    """Stores one tensor as its 'model'; fails on demand to simulate a full disk."""

    def __init__(self, value=0.0, fail=False):
        self.weight = torch.tensor([value])
        self.fail = fail

    def save_checkpoint(self, folder):
        if self.fail == "full_device":
            # A real write onto a device with no space: torch's zip writer raises RuntimeError.
            torch.save(torch.zeros(2**16), "/dev/full")
        if self.fail:
            raise OSError(28, "No space left on device")
        folder.mkdir(parents=True)
        torch.save(self.weight, folder / "w.pt")

    def load_checkpoint(self, folder):
        self.weight = torch.load(folder / "w.pt", weights_only=True)


def manager(tmp_path, keep_last=2):
    return CheckpointManager(tmp_path / "checkpoints", keep_last=keep_last, rank=0,
                             barrier=lambda: None)


def test_save_load_restores_engine_counters_and_rng(tmp_path):
    ckpt = manager(tmp_path)
    engine = FakeEngine(3.0)
    torch.manual_seed(7)
    path = ckpt.save(engine, TrainerState(stage="stage2", step=5, skipped_steps=1,
                                          tracking_run_id="abc"))
    expected_next = torch.rand(3)
    torch.manual_seed(999)  # disturb RNG and model, then restore
    other = FakeEngine(0.0)
    state = ckpt.load(other, path)
    assert other.weight.item() == 3.0
    assert (state.step, state.skipped_steps, state.tracking_run_id) == (5, 1, "abc")
    assert torch.equal(torch.rand(3), expected_next)


def test_keeps_last_k_and_latest_is_newest(tmp_path):
    ckpt = manager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        ckpt.save(FakeEngine(step), TrainerState(stage="s", step=step))
    names = [p.name for p in ckpt.complete()]
    assert names == ["step-00000020", "step-00000030"]
    assert ckpt.latest().name == "step-00000030"


def test_incomplete_write_is_never_picked_up_and_is_removed(tmp_path):
    ckpt = manager(tmp_path)
    good = ckpt.save(FakeEngine(1.0), TrainerState(stage="s", step=1))
    # A write that died: a tmp folder and a step folder without the marker.
    (ckpt.folder / ".tmp-step-00000002").mkdir()
    (ckpt.folder / "step-00000003").mkdir()
    assert ckpt.latest() == good
    ckpt.remove_incomplete()
    assert sorted(p.name for p in ckpt.folder.iterdir()) == [good.name]


def test_failed_save_keeps_previous_and_names_it(tmp_path):
    ckpt = manager(tmp_path)
    good = ckpt.save(FakeEngine(1.0), TrainerState(stage="s", step=1))
    with pytest.raises(CheckpointError, match="No space left on device.*step-00000001 is intact"):
        ckpt.save(FakeEngine(2.0, fail=True), TrainerState(stage="s", step=2))
    assert ckpt.latest() == good
    assert (good / COMPLETE_MARKER).exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_torch_save_onto_a_full_device_is_a_checkpoint_error(tmp_path):
    ckpt = manager(tmp_path)
    good = ckpt.save(FakeEngine(1.0), TrainerState(stage="s", step=1))
    with pytest.raises(CheckpointError, match=r"step-00000002 .* failed \(.*MiB free there\); "
                                              r"the previous checkpoint .*step-00000001 is intact"):
        ckpt.save(FakeEngine(2.0, fail="full_device"), TrainerState(stage="s", step=2))
    assert ckpt.latest() == good
    assert sorted(p.name for p in ckpt.folder.iterdir()) == [good.name]


def test_failure_to_prune_an_old_checkpoint_does_not_fail_the_save(tmp_path, monkeypatch, caplog):
    ckpt = manager(tmp_path, keep_last=1)
    first = ckpt.save(FakeEngine(1.0), TrainerState(stage="s", step=1))

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint_module, "_discard", refuse)
    second = ckpt.save(FakeEngine(2.0), TrainerState(stage="s", step=2))
    assert ckpt.latest() == second
    assert first.is_dir()  # still there, and said so
    assert f"could not delete old checkpoint {first} (Permission denied)" in caplog.text


def test_preflight_probes_with_a_unique_name_per_process(tmp_path, monkeypatch):
    """Ranks on several nodes probe one shared folder: no fixed (pid-only) name to collide."""
    names = []
    real_mkstemp = output_paths.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        names.append(Path(path).name)
        return fd, path

    monkeypatch.setattr(output_paths.tempfile, "mkstemp", spy)
    preflight_output_dir(tmp_path)
    preflight_output_dir(tmp_path)
    assert len(set(names)) == 2 and all(n.startswith(".write-probe-") for n in names)
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_incomplete(tmp_path):
    ckpt = manager(tmp_path)
    half = ckpt.folder / "step-00000009"
    half.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.load(FakeEngine(), half)


def test_state_file_is_plain_json(tmp_path):
    path = manager(tmp_path).save(FakeEngine(), TrainerState(stage="stage1", step=4))
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 4


def test_preflight_rejects_a_file_in_the_way(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="is not writable"):
        preflight_output_dir(blocker / "run")


def test_preflight_checks_free_space(tmp_path):
    with pytest.raises(CheckpointError, match="MiB free"):
        preflight_output_dir(tmp_path, min_free_bytes=2**62)


def test_preflight_without_create_leaves_the_disk_as_it_was(tmp_path):
    preflight_output_dir(tmp_path / "a" / "b", create=False)
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="is not writable"):
        preflight_output_dir(blocker / "run", create=False)
    with pytest.raises(CheckpointError, match="MiB free"):
        preflight_output_dir(tmp_path / "new", min_free_bytes=2**62, create=False)
