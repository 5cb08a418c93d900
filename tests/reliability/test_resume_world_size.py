"""Resume on another world size with the same global batch: 2 ranks -> 1 and 1 -> 2.

DeepSpeed's ZeRO-3 files are cut per rank and load only on the world size that wrote them; the
engine also writes a world-size-free copy of the trainable state (weights, Adam moments and step,
schedule: ``TrainEngine.save_checkpoint``) and loads it when W changed. The data order is the
global-batch plan, a function of (seed, step) alone, so the resumed run must see the same batches
and follow the uninterrupted trajectory.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _runs import (
    ROOT,
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

from pcc_dist.sampling import GlobalBatchPlan

pytestmark = pytest.mark.distributed

RESUME_AT = 10


def test_global_batch_plan_does_not_depend_on_world_size():
    """The batches of every step are the same set in the same order for W = 1, 2, 4."""
    plans = {w: GlobalBatchPlan(1000, 8, w, seed=3) for w in (1, 2, 4)}
    for step in (0, 1, 124, 125, 400):  # 125 steps per epoch: the epoch boundary too
        expected = plans[1].global_indices(step)
        for w, plan in plans.items():
            assert plan.global_indices(step) == expected
            assert sum((plan.rank_indices(step, r) for r in range(w)), []) == expected


@pytest.mark.parametrize(("saved_w", "resumed_w"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_follows_the_same_trajectory(tmp_path_factory, tmp_path,
                                                                  saved_w, resumed_w):
    source = reference(tmp_path_factory, saved_w)
    # The job of `saved_w` ranks stopped after its step-10 checkpoint: a fresh run folder that
    # holds only that checkpoint.
    name = f"step-{RESUME_AT:08d}"
    out = tmp_path / "run"
    (out / "stage2" / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "stage2" / "checkpoints" / name,
                    out / "stage2" / "checkpoints" / name)

    log = tmp_path / "log.txt"
    run(train_cmd(resumed_w, tiny_llama(tmp_path_factory), out), log)
    text = log.read_text()
    assert f"{name} at step {RESUME_AT}" in text and "portable copy" in text, text[-3000:]

    # No lost or repeated batch: exactly steps 11..20, once each.
    assert [r["step"] for r in step_lines(out / "stage2")] == list(range(RESUME_AT + 1,
                                                                        STEPS + 1))
    got = losses(out / "stage2")
    after = range(RESUME_AT + 1, STEPS + 1)
    # The uninterrupted run on the old world size and on the new one.
    assert_same_losses(got, losses(source / "stage2"), after, TOL_ACROSS_W)
    assert_same_losses(got, losses(reference(tmp_path_factory, resumed_w) / "stage2"), after,
                       TOL_ACROSS_W)
    # The compared values are real, varied losses, not constants that match trivially.
    assert len({round(v, 4) for v in got.values()}) >= 8


def test_negative_control_resume_with_lost_adam_moments_leaves_the_trajectory(
        tmp_path_factory, tmp_path):
    """The same 2 -> 1 resume with the portable copy's Adam moments zeroed (as a conversion that
    lost them would): the losses must leave the tolerance above, so that test can tell."""
    source = reference(tmp_path_factory, 2)
    name = f"step-{RESUME_AT:08d}"
    out = tmp_path / "run"
    target = out / "stage2" / "checkpoints" / name
    shutil.copytree(source / "stage2" / "checkpoints" / name, target)
    portable = target / "engine" / "portable_state.pt"
    state = torch.load(portable, weights_only=True)
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = {n: torch.zeros_like(t) for n, t in state[key].items()}
    torch.save(state, portable)

    run(train_cmd(1, tiny_llama(tmp_path_factory), out), tmp_path / "log.txt")
    got = losses(out / "stage2")
    expected = losses(source / "stage2")
    worst = max(abs(got[s] - expected[s]) for s in range(RESUME_AT + 1, STEPS + 1))
    assert worst > 100 * TOL_ACROSS_W, worst


def test_without_zero_checkpoints_save_and_resume_on_another_world_size(tmp_path_factory,
                                                                      tmp_path):
    """ZeRO stage 0 (a user's own DeepSpeed JSON): DeepSpeed wraps no ZeRO optimizer, so there
    are no partitions to gather for a portable copy; its own files hold whole tensors and load
    on any world size. The step-10 checkpoint of a 1-rank run, resumed on 2 ranks, continues
    that run's trajectory."""
    raw = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    raw["zero_optimization"] = {"stage": 0}
    ds_json = tmp_path / "zero0.json"
    ds_json.write_text(json.dumps(raw))
    model = tiny_llama(tmp_path_factory)
    zero0 = f"train.deepspeed_config={ds_json}"
    source = tmp_path / "source"
    run(train_cmd(1, model, source, zero0), tmp_path / "1.txt")
    name = f"step-{RESUME_AT:08d}"
    assert not (source / "stage2" / "checkpoints" / name / "engine" / "portable_state.pt").exists()

    out = tmp_path / "run"
    shutil.copytree(source / "stage2" / "checkpoints" / name,
                    out / "stage2" / "checkpoints" / name)
    log = tmp_path / "2.txt"
    run(train_cmd(2, model, out, zero0), log)
    assert f"{name} at step {RESUME_AT}" in log.read_text()
    after = range(RESUME_AT + 1, STEPS + 1)
    assert [r["step"] for r in step_lines(out / "stage2")] == list(after)
    got = losses(out / "stage2")
    assert_same_losses(got, losses(source / "stage2"), after, TOL_ACROSS_W)
    assert len({round(v, 4) for v in got.values()}) >= 8
