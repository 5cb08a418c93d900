"""The stage's components decide their own cadence (pcc_dist.step_log, .dev_eval,
.stage_checkpoints): which steps are logged, scored on STS-B dev, and checkpointed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pcc_dist.config import load_config
from pcc_dist.dev_eval import DevEvaluator
from pcc_dist.stage_checkpoints import StageCheckpoints
from pcc_dist.step_log import METRICS_FILE, StepLog, StepRecord

ONE_RANK = SimpleNamespace(rank=0, world_size=1)


def test_step_log_writes_step_one_and_every_nth_step(tmp_path):
    logged = []
    tracker = SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m)))
    log = StepLog(tracker, "stage2", tmp_path, 3, world_size=2, global_batch_size=4,
                  total_steps=7, is_main=True, objective="cosent")
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # 5 real tokens on this rank
    for step in range(1, 8):
        log.record(SimpleNamespace(step=step, skipped_steps=1),
                   StepRecord(loss=0.25, result=SimpleNamespace(lr=1e-3, grad_norm=2.0),
                              views=[{"attention_mask": mask}], seconds=0.5,
                              real_token_fraction=0.8, batch_r=0.9))
    assert [s for s in range(1, 8) if log.due(s)] == [1, 3, 6]
    assert [step for step, _ in logged] == [1, 3, 6]
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 3, 6]
    metrics = logged[0][1]
    assert metrics["perf/pairs_per_s"] == pytest.approx(4 / 0.5)
    assert metrics["perf/tokens_per_s"] == pytest.approx(5 * 2 / 0.5)  # this rank's x W
    assert metrics["train/skipped_steps"] == 1.0 and metrics["train/pearson_r"] == 0.9
    # The metric names the objective that ran (runs of different stage-2 losses side by side).
    assert metrics["train/loss_cosent"] == metrics["train/loss"] == 0.25
    assert lines[0]["train/loss_cosent"] == 0.25


def test_step_log_of_other_ranks_writes_no_file(tmp_path):
    tracker = SimpleNamespace(log_metrics=lambda m, step: None)
    log = StepLog(tracker, "stage1", tmp_path, 1, world_size=2, global_batch_size=4,
                  total_steps=1, is_main=False, objective="infonce")
    log.record(SimpleNamespace(step=1, skipped_steps=0),
               StepRecord(loss=0.1, result=SimpleNamespace(lr=1e-3, grad_norm=1.0),
                          views=[{"attention_mask": torch.ones(2, 2)}], seconds=1.0,
                          real_token_fraction=1.0))
    assert not (tmp_path / METRICS_FILE).exists()


def test_checkpoints_save_every_nth_step_and_the_last(tmp_path):
    cfg = load_config(None, ["checkpoint.every_steps=3"])
    checkpoints = StageCheckpoints(cfg, "stage1", tmp_path, ONE_RANK)
    assert [s for s in range(1, 8) if checkpoints.due(s, last=s == 7)] == [3, 6, 7]
    saved = []
    checkpoints.manager.save = lambda engine, state: saved.append((state.step,
                                                                   state.tracking_run_id))
    for step in range(1, 8):
        checkpoints.save_if_due(None, SimpleNamespace(step=step, tracking_run_id=None),
                                last=step == 7, tracker=SimpleNamespace(run_id=f"run{step}"))
    assert saved == [(3, "run3"), (6, "run6"), (7, "run7")]


@pytest.mark.parametrize("overrides, want", [
    (["eval.every_steps=2"], [2, 4, 6]),
    (["eval.every_steps=0"], []),  # only at the end of the stage
    (["eval.every_steps=2", "eval.dev=false"], []),
])
def test_dev_evaluator_scores_every_nth_step_when_on(tmp_path, overrides, want):
    cfg = load_config(None, ["eval.dev=true", *overrides])
    evaluator = DevEvaluator(cfg, "stage2", ONE_RANK, tmp_path, tmp_path, None, None, None)
    assert [s for s in range(1, 8) if evaluator.due(s)] == want


def test_dev_evaluator_keeps_the_best_score_and_saves_only_new_bests(tmp_path, monkeypatch):
    import pcc_dist.modeling

    cfg = load_config(None, ["eval.dev=true", "eval.every_steps=2"])
    logged, saved = [], []
    tracker = SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m)))
    engine = SimpleNamespace(backbone_state_dict=lambda: {"w": torch.zeros(1)})
    monkeypatch.setattr(pcc_dist.modeling, "save_embedder",
                        lambda embedder, folder, state_dict: saved.append(folder))
    evaluator = DevEvaluator(cfg, "stage2", ONE_RANK, tmp_path, tmp_path, "model", engine,
                             tracker)
    scores = iter([50.0, 40.0, 70.0])
    evaluator.spearman = lambda: next(scores)
    state = SimpleNamespace(step=0, best_dev_spearman=None, best_step=None)
    for step in range(1, 7):
        state.step = step
        evaluator.evaluate_if_due(state)
    assert [step for step, _ in logged] == [2, 4, 6]
    assert (state.best_dev_spearman, state.best_step) == (70.0, 6)
    assert saved == [tmp_path / "best", tmp_path / "best"]  # steps 2 and 6, not 4
