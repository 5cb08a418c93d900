"""Checkpoint manager: atomic publish, pruning, RNG restore, incomplete writes, preflight."""

import json
from pathlib import Path

import pytest
import torch

import pcc_dist.checkpoint as checkpoint_module
import pcc_dist.checkpoint_manager as manager_module
from pcc_dist import output_paths
from pcc_dist.checkpoint import (
    COMPLETE_MARKER,
    CheckpointError,
    TrainerState,
    preflight_output_dir,
)
from pcc_dist.checkpoint_manager import CheckpointManager


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

    monkeypatch.setattr(manager_module, "discard", refuse)
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


def _save_steps(ckpt, *steps):
    return {step: ckpt.save(FakeEngine(float(step)), TrainerState(stage="s", step=step))
            for step in steps}


def test_resume_skips_a_damaged_newest_checkpoint_and_sets_it_aside(tmp_path, caplog):
    ckpt = manager(tmp_path, keep_last=5)
    saved = _save_steps(ckpt, 2, 4, 6)
    (saved[6] / "trainer_state.json").write_text('{"stage": "s", "st')  # truncated
    assert ckpt.find_damage(saved[4]) == []
    assert ckpt.latest_intact() == saved[4]
    assert "trainer_state.json is not valid JSON" in caplog.text
    assert f"resuming from {saved[4]}, the newest intact checkpoint" in caplog.text
    # Kept under a name that neither resume nor pruning sees: the next saves cannot prune the
    # intact checkpoints in favour of it.
    aside = ckpt.folder / "damaged-step-00000006"
    assert (aside / "trainer_state.json").read_text() == '{"stage": "s", "st'
    assert ckpt.complete() == [saved[2], saved[4]]
    state = ckpt.load(FakeEngine(), saved[4])
    assert state.step == 4


def test_a_step_damaged_twice_keeps_both_damaged_copies(tmp_path):
    ckpt = manager(tmp_path, keep_last=5)
    for _ in range(2):
        saved = _save_steps(ckpt, 2, 4)
        (saved[4] / "engine" / "w.pt").write_bytes(b"")
        assert ckpt.latest_intact() == saved[2]
    names = sorted(p.name for p in ckpt.folder.iterdir())
    assert names == ["damaged-step-00000004", "damaged-step-00000004.1", "step-00000002"]


def test_no_intact_checkpoint_is_an_error_naming_each_file_and_touching_none(tmp_path):
    ckpt = manager(tmp_path, keep_last=5)
    saved = _save_steps(ckpt, 2, 4)
    (saved[4] / "engine" / "w.pt").write_bytes(b"PK\x03\x04 cut")
    (saved[2] / "rng_rank0.pt").unlink()
    torch.save({"not": "rng"}, saved[2] / "rng_rank0.pt")
    with pytest.raises(CheckpointError) as error:
        ckpt.latest_intact()
    message = str(error.value)
    assert "step-00000004: engine/w.pt is not a complete torch file" in message
    assert "step-00000002: rng_rank0.pt cannot be read as RNG states (KeyError" in message
    assert "Delete the damaged" in message and "run.output_dir" in message
    assert ckpt.complete() == [saved[2], saved[4]]


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path):
    assert manager(tmp_path).latest_intact() is None


@pytest.mark.parametrize("text", ['{"stage": "s", "step": true}', '{"stage": "s", "step": -1}',
                                  '{"step": 4}', '[4]', '{"stage": "s", "last_loss": "nan"}'])
def test_a_trainer_state_with_wrong_fields_is_damage(tmp_path, text):
    ckpt = manager(tmp_path)
    path = _save_steps(ckpt, 4)[4]
    (path / "trainer_state.json").write_text(text)
    [problem] = ckpt.find_damage(path)
    assert problem.startswith("trainer_state.json ")


def test_load_checks_the_small_files_before_the_engine_restores_anything(tmp_path):
    class Recording(FakeEngine):
        loads = 0

        def load_checkpoint(self, folder):
            self.loads += 1

    ckpt = manager(tmp_path)
    path = _save_steps(ckpt, 4)[4]
    (path / "rng_rank0.pt").write_bytes(b"")
    engine = Recording()
    with pytest.raises(CheckpointError, match=r"step-00000004 is damaged: rng_rank0\.pt"):
        ckpt.load(engine, path)
    assert engine.loads == 0


def test_an_engine_that_fails_to_load_gives_a_checkpoint_error(tmp_path):
    class Broken(FakeEngine):
        def load_checkpoint(self, folder):
            raise RuntimeError("PytorchStreamReader failed reading zip archive\nmore lines")

    ckpt = manager(tmp_path)
    path = _save_steps(ckpt, 4)[4]
    with pytest.raises(CheckpointError, match=r"step-00000004 passed the integrity checks but "
                                              r"its engine state could not be loaded "
                                              r"\(RuntimeError: PytorchStreamReader failed "
                                              r"reading zip archive\); delete it"):
        ckpt.load(Broken(), path)


def test_the_trainer_state_check_covers_every_field_type():
    """A TrainerState field of a type the check does not know would go unchecked: extend
    checkpoint.JSON_TYPES with it."""
    from dataclasses import fields

    for field in fields(TrainerState):
        words = [w.strip() for w in str(field.type).split("|")]
        assert all(w in checkpoint_module.JSON_TYPES for w in words), (field.name, field.type)


class WeightsOnlyEngine(FakeEngine):
    def load_checkpoint(self, folder, module_only=False):
        assert module_only
        super().load_checkpoint(folder)


def test_stage_two_starts_from_the_newest_intact_stage_one_checkpoint(tmp_path):
    """Two jobs (stage 1, then stage 2 in the same run folder): a damaged final stage-1
    checkpoint is skipped and set aside as on resume, not a traceback in stage 2."""
    from types import SimpleNamespace

    from pcc_dist.config import load_config
    from pcc_dist.stage_checkpoints import earlier_stage1

    stage1 = CheckpointManager(tmp_path / "stage1" / "checkpoints", keep_last=5, rank=0,
                               barrier=lambda: None)
    saved = _save_steps(stage1, 2, 4)
    cfg = load_config(None, ["stage1.enabled=false"])
    one_rank = SimpleNamespace(rank=0, world_size=1)
    assert earlier_stage1(cfg, tmp_path, one_rank) == saved[4]  # control: intact
    (saved[4] / "engine" / "w.pt").write_bytes(b"PK\x03\x04 cut")
    assert earlier_stage1(cfg, tmp_path, one_rank) == saved[2]
    assert (stage1.folder / "damaged-step-00000004").is_dir()


def test_weights_from_a_damaged_checkpoint_are_a_checkpoint_error(tmp_path):
    from pcc_dist.checkpoint_manager import load_weights_from

    saved = _save_steps(manager(tmp_path, keep_last=5), 2)
    engine = WeightsOnlyEngine()
    load_weights_from(engine, saved[2])  # control: the weights of step 2 load
    assert engine.weight.item() == 2.0
    (saved[2] / "engine" / "w.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"which this stage starts from, is damaged: "
                                              r"engine/w\.pt"):
        load_weights_from(engine, saved[2])


# -- CUDA RNG states on a node with fewer GPUs than the writer ------------------------------


class _FakeCuda:
    """torch.cuda as a node with ``count`` GPUs sees it: records which states were set."""

    def __init__(self, count: int):
        self.count = count
        self.set: dict[int, torch.Tensor] = {}

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def set_rng_state(self, state, device):
        if device >= self.count:  # what the real call does for a device that is not there
            raise IndexError(f"device {device} of {self.count}")
        self.set[device] = state

    def set_rng_state_all(self, states):  # the old code path: one state per writer GPU
        for index, state in enumerate(states):
            self.set_rng_state(state, index)


@pytest.mark.parametrize("visible", [1, 2, 8, 12])
def test_cuda_rng_restores_the_states_of_the_gpus_that_exist(monkeypatch, caplog, visible):
    saved = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]  # written on 8 GPUs
    fake = _FakeCuda(visible)
    monkeypatch.setattr(checkpoint_module.torch, "cuda", fake)
    state = {"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
             "cuda": saved}
    # Negative control: restoring every saved state, as before, fails on a smaller node.
    if visible < len(saved):
        with pytest.raises(IndexError):
            _FakeCuda(visible).set_rng_state_all(saved)
    checkpoint_module.restore_rng(state)
    assert sorted(fake.set) == list(range(min(visible, 8)))
    assert all(torch.equal(fake.set[i], saved[i]) for i in fake.set)
    assert ("holds CUDA RNG states of 8 GPUs" in caplog.text) is (visible != 8)
