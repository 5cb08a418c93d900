"""Hostile checkpoints (issue #19): a damaged checkpoint is skipped for the newest intact one, by
every rank alike; with none intact, or with a setting that changes tensor shapes, the run stops
with one message naming the file or setting and the fix. Never a traceback, never a lost file.

The damage is what a failing disk, a copy that broke off or a hand edit leaves behind a COMPLETE
marker: a truncated DeepSpeed shard, RNG file or portable copy, a truncated or invalid
``trainer_state.json``. Each run case is the real CLI resuming a fresh run folder that holds
copies of checkpoints from the uninterrupted reference runs (``_runs.reference``, computed once
per session and shared with the other reliability tests). ``_runs.run`` logs stdout and stderr
together, so "no traceback in the log" covers stderr.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.runs import (
    STEPS,
    TOL_ACROSS_W,
    assert_same_losses,
    losses,
    reference,
    run,
    step_lines,
    tiny_llama,
    train_cmd,
)

from pcc_dist.checkpoint import STATE_FILE
from pcc_dist.checkpoint_manager import CheckpointManager

pytestmark = pytest.mark.distributed

# DeepSpeed's files of a one-rank run, which trains at ZeRO-1 (pcc_dist.single_rank): the
# optimizer shard and the whole-model states (ZeRO-3 would write zero_pp_rank_0_mp_rank_00_...).
OPTIM = "engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "engine/state/mp_rank_00_model_states.pt"
PORTABLE = "engine/portable_state.pt"
RNG0 = "rng_rank0.pt"
# Same world size, same files: the resumed losses equal the uninterrupted run's up to fp32
# rounding (as in test_faults_checkpoint_write).
TOL_SAME_W = 1e-6


def name(step: int) -> str:
    return f"step-{step:08d}"


def truncate(file: Path) -> None:
    """Keep the first half of ``file``, as a copy or a write that broke off would."""
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def set_state_field(file: Path, **fields: object) -> None:
    """A hand edit of ``trainer_state.json`` that keeps it valid JSON."""
    file.write_text(json.dumps(json.loads(file.read_text()) | fields))


def copy_checkpoints(source: Path, out: Path, steps: list[int]) -> Path:
    """A fresh run folder ``out`` with copies of ``source``'s stage-2 checkpoints of ``steps``
    (a job that stopped after them); returns its checkpoints folder."""
    folder = out / "stage2" / "checkpoints"
    for step in steps:
        shutil.copytree(source / "stage2" / "checkpoints" / name(step), folder / name(step))
    return folder


def manager(folder: Path, rank: int = 0) -> CheckpointManager:
    return CheckpointManager(folder, STEPS, rank, lambda: None)


def error_line(text: str) -> str:
    """The one ``pcc-train: ...`` line the CLI prints for an expected failure."""
    lines = [line for line in text.splitlines() if line.startswith("pcc-train: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# The check itself, on real checkpoint files (no training run beyond the shared reference)
# --------------------------------------------------------------------------------------------

# How each file of a checkpoint gets damaged: (file, damage).
DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated optimizer shard": (OPTIM, truncate),
    "truncated model shard": (MODEL, truncate),
    "truncated portable copy": (PORTABLE, truncate),
    "truncated world.json": ("engine/world.json", truncate),
    "truncated RNG file": (RNG0, truncate),
    "empty RNG file": (RNG0, lambda f: f.write_bytes(b"")),
    # A whole torch file, but not RNG states: only reading it in full tells.
    "RNG file holding a tensor": (RNG0, lambda f: torch.save(torch.zeros(3), f)),
    "truncated trainer state": (STATE_FILE, truncate),
    "trainer state not JSON": (STATE_FILE, lambda f: f.write_text("step: 2\n")),
    "trainer state with a wrong type": (STATE_FILE, lambda f: set_state_field(f, step="two")),
    "trainer state with an unknown field": (STATE_FILE, lambda f: set_state_field(f, epoch=1)),
}


def test_every_checkpoint_of_an_undamaged_run_is_found_intact(tmp_path_factory):
    """Negative control for the check: nothing of what a real run writes is flagged."""
    done = manager(reference(tmp_path_factory, 1) / "stage2" / "checkpoints").complete()
    assert [p.name for p in done] == [name(s) for s in range(2, STEPS + 1, 2)]
    for path in done:
        assert manager(path.parent).find_damage(path) == [], path


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_find_damage_names_the_damaged_file(tmp_path_factory, tmp_path, kind):
    folder = copy_checkpoints(reference(tmp_path_factory, 1), tmp_path / "run", [2])
    path = folder / name(2)
    file, damage = DAMAGE[kind]
    damage(path / file)
    problems = manager(folder).find_damage(path)
    assert len(problems) == 1 and problems[0].startswith(f"{file} "), problems


# --------------------------------------------------------------------------------------------
# The real CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", [True, False], ids=["damaged", "control-undamaged"])
def test_resume_skips_damaged_checkpoints_for_the_newest_intact_one(tmp_path_factory, tmp_path,
                                                                    damaged):
    """Three damaged checkpoints, newest first (a truncated optimizer shard, trainer state and
    RNG file, each under its COMPLETE marker): the run resumes from step 4 and follows the
    uninterrupted trajectory from there. The control, the same folder undamaged, resumes from
    the newest (step 10)."""
    source = reference(tmp_path_factory, 1)
    out = tmp_path / "run"
    folder = copy_checkpoints(source, out, [2, 4, 6, 8, 10])
    planted = {10: OPTIM, 8: STATE_FILE, 6: RNG0} if damaged else {}
    for step, file in planted.items():
        truncate(folder / name(step) / file)
    planted_bytes = {s: (folder / name(s) / f).read_bytes() for s, f in planted.items()}

    log = tmp_path / "log.txt"
    run(train_cmd(1, tiny_llama(tmp_path_factory), out), log)
    text = log.read_text()
    assert "Traceback" not in text
    start = 4 if damaged else 10
    assert f"resumed from {folder / name(start)} at step {start}" in text
    for step, file in planted.items():
        assert (f"checkpoint {folder / name(step)} is damaged and is not resumed from: "
                f"{file} ") in text, text[-3000:]
    if damaged:
        assert f"resuming from {folder / name(4)}, the newest intact checkpoint" in text
        # Set aside, not deleted: each damaged checkpoint is kept whole under a name that is
        # never resumed from nor pruned.
        for step, file in planted.items():
            assert (folder / f"damaged-{name(step)}" / file).read_bytes() == planted_bytes[step]
    else:
        assert "is damaged" not in text

    # Continued from `start`: each later step once, with the uninterrupted run's losses.
    after = range(start + 1, STEPS + 1)
    assert [r["step"] for r in step_lines(out / "stage2")] == list(after)
    got = losses(out / "stage2")
    assert_same_losses(got, losses(source / "stage2"), after, TOL_SAME_W)
    assert len({round(v, 4) for v in got.values()}) >= 8  # real, varied losses
    # What the run leaves to resume from is whole.
    done = manager(folder).complete()
    assert [p.name for p in done] == [name(s) for s in range(2, STEPS + 1, 2)]
    assert all(manager(folder).find_damage(p) == [] for p in done)


def test_no_intact_checkpoint_stops_naming_every_damaged_file_and_the_fix(tmp_path_factory,
                                                                         tmp_path):
    out = tmp_path / "run"
    folder = copy_checkpoints(reference(tmp_path_factory, 1), out, [2, 4])
    truncate(folder / name(4) / MODEL)
    set_state_field(folder / name(2) / STATE_FILE, step="two")
    before = digest(folder)

    log = tmp_path / "log.txt"
    run(train_cmd(1, tiny_llama(tmp_path_factory), out), log, expect=1)
    text = log.read_text()
    assert "Traceback" not in text
    message = error_line(text)
    assert f"no intact checkpoint to resume from in {folder}" in message
    assert f"{name(4)}: {MODEL} is not a complete torch file" in message
    assert f"{name(2)}: {STATE_FILE} is not a trainer state (step='two')" in message
    assert "Delete the damaged step-... folders" in message and "run.output_dir" in message
    # Nothing moved or deleted: what happens to the only checkpoints is the user's call.
    assert digest(folder) == before
    # Decided before the model loads: no training state was built.
    assert "engine: ZeRO stage" not in text


def test_resume_with_another_lora_rank_names_the_tensor_shapes_and_fix(tmp_path_factory,
                                                                     tmp_path):
    out = tmp_path / "run"
    folder = copy_checkpoints(reference(tmp_path_factory, 1), out, [10])
    before = digest(folder)

    log = tmp_path / "log.txt"
    run(train_cmd(1, tiny_llama(tmp_path_factory), out, "model.lora.r=8"), log, expect=1)
    text = log.read_text()
    assert "Traceback" not in text and "size mismatch" not in text
    message = error_line(text)
    assert f"{folder / name(10)}/engine does not fit this model" in message
    # LoRA A is [r, in]: the saved and the configured rank, with the tensor's name.
    assert re.search(r"\.lora_A\.default\.weight is \[4, (\d+)\] in the checkpoint and "
                     r"\[8, \1\] with this config", message), message
    assert "model.lora.r was 4 when the checkpoint was written and is 8" in message
    assert ("Resume with the settings the run was started with, or start a new run in another "
            "run.output_dir") in message
    # A settings mismatch is not damage: the checkpoint is left as it was.
    assert digest(folder) == before


def test_ranks_agree_to_skip_what_one_rank_or_the_portable_copy_shows_damaged(tmp_path_factory,
                                                                             tmp_path):
    """A 1-rank run resumed on 2 ranks reads the portable copy. Step 10's copy is truncated
    (every rank checks it); step 8 gets a rank-1 RNG file that holds a tensor, a whole torch file
    that only rank 1 reads in full, so only rank 1 finds that damage. Both ranks must still skip
    both checkpoints and resume from step 6 together, on the uninterrupted trajectory."""
    source = reference(tmp_path_factory, 1)
    out = tmp_path / "run"
    folder = copy_checkpoints(source, out, [6, 8, 10])
    truncate(folder / name(10) / PORTABLE)
    torch.save(torch.zeros(3), folder / name(8) / "rng_rank1.pt")

    log = tmp_path / "log.txt"
    run(train_cmd(2, tiny_llama(tmp_path_factory), out), log)
    text = log.read_text()
    assert "Traceback" not in text
    assert f"is damaged and is not resumed from: {PORTABLE} is not a complete torch file" in text
    # Rank 1 names its file; rank 0, which found step 8 whole, says another rank did not.
    assert "rng_rank1.pt cannot be read as RNG states" in text
    assert "another rank found a damaged file" in text
    assert text.count(f"resumed from {folder / name(6)} at step 6") == 2  # both ranks
    assert "portable copy" in text

    after = range(7, STEPS + 1)
    assert [r["step"] for r in step_lines(out / "stage2")] == list(after)
    got = losses(out / "stage2")
    assert_same_losses(got, losses(source / "stage2"), after, TOL_ACROSS_W)
    assert len({round(v, 4) for v in got.values()}) >= 8
