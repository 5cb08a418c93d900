"""checkpoint.resume_from=PATH (HF resume_from_checkpoint): the folder, its stage, its damage."""

import pytest
import torch

from pcc_dist.checkpoint import CheckpointError, TrainerState
from pcc_dist.checkpoint_manager import CheckpointManager
from pcc_dist.config import load_config
from pcc_dist.resume_from import explicit_resume_point


class FakeEngine:
    def save_checkpoint(self, folder):
        folder.mkdir(parents=True)
        torch.save(torch.ones(2), folder / "w.pt")


def _manager(folder):
    return CheckpointManager(folder, keep_last=5, rank=0, barrier=lambda: None)


@pytest.fixture()
def saved(tmp_path):
    """A finished stage-2 checkpoint of another run, and this run's (empty) stage managers."""
    path = _manager(tmp_path / "old" / "stage2" / "checkpoints").save(
        FakeEngine(), TrainerState(stage="stage2", step=4))
    return path, {name: _manager(tmp_path / "new" / name / "checkpoints")
                  for name in ("stage1", "stage2")}


def _point(spec, stage, managers):
    cfg = load_config(None, [f"checkpoint.resume_from={spec}"])
    return explicit_resume_point(cfg, stage, managers[stage])


def test_the_named_checkpoint_is_used_by_the_stage_that_wrote_it(saved):
    path, managers = saved
    assert _point(path, "stage2", managers) == path
    # Stage 1 keeps its own policy (checkpoint.resume); the HF name is an alias.
    assert _point(path, "stage1", managers) is None
    cfg = load_config(None, [f"resume_from_checkpoint={path}"])
    assert explicit_resume_point(cfg, "stage2", managers["stage2"]) == path
    assert explicit_resume_point(load_config(), "stage2", managers["stage2"]) is None


def test_a_missing_folder_is_named(saved, tmp_path):
    _, managers = saved
    with pytest.raises(CheckpointError, match=r"checkpoint.resume_from=.*nope.*no such folder"):
        _point(tmp_path / "nope", "stage2", managers)


def test_an_unfinished_or_wrong_folder_is_refused(saved):
    path, managers = saved
    with pytest.raises(CheckpointError, match="a checkpoints/ folder"):
        _point(path.parent, "stage2", managers)  # the folder above the checkpoint
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        _point(path, "stage2", managers)


@pytest.mark.parametrize("damage", ["state", "engine"])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(saved, damage):
    path, managers = saved
    if damage == "state":
        (path / "trainer_state.json").write_text("{not json")
        expected = "trainer_state.json is not valid JSON"
    else:
        weights = path / "engine" / "w.pt"
        weights.write_bytes(weights.read_bytes()[:40])  # truncated
        expected = "engine/w.pt"
    with pytest.raises(CheckpointError, match="damaged") as info:
        _point(path, "stage2", managers)
    assert expected in str(info.value)
