"""pcc_dist.engine, optim and portable_state without a process group: the schedule, the
optimizer groups, the checkpoint's world file and shape check, and the TrainEngine bookkeeping
(on a stand-in for DeepSpeed's engine). The DeepSpeed JSON resolver is tested in
test_ds_config.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pcc_dist.distributed import DistInfo
from pcc_dist.engine import TrainEngine
from pcc_dist.optim import WarmupDecay, param_groups

# -- schedule and optimizer groups -----------------------------------------------------------


def test_warmup_then_linear_decay():
    f = WarmupDecay(warmup=4, total=12, schedule="linear")
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == 0.0 and f(20) == 0.0


def test_cosine_and_constant():
    cos = WarmupDecay(warmup=0, total=10, schedule="cosine")
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    const = WarmupDecay(warmup=2, total=10, schedule="constant")
    assert [const(s) for s in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule must be"):
        WarmupDecay(1, 10, "step")


def test_schedule_survives_a_lambdalr_state_dict_round_trip():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupDecay(2, 10, "cosine"))
    state = sched.state_dict()
    assert state["lr_lambdas"][0] == {"warmup": 2, "total": 10, "schedule": "cosine"}


def test_param_groups_cover_trainable_parameters_only_and_skip_decay_on_1d():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight),
                                                   id(model[1].bias), id(model[2].bias)}
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(frozen, 0.0)


# -- TrainEngine bookkeeping on a stand-in for deepspeed.DeepSpeedEngine ----------------------


class _FakeDeepSpeed:
    """Records what TrainEngine asks of DeepSpeed."""

    def __init__(self, module: nn.Module, accumulation: int = 1):
        self.module = module
        self.accumulation = accumulation
        self.calls: list[tuple] = []
        self.applied = True

    def gradient_accumulation_steps(self):
        return self.accumulation

    def zero_optimization_stage(self):
        return 3

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_gradient_accumulation_boundary(self, value):
        self.calls.append(("boundary", value))

    def backward(self, loss):
        self.calls.append(("backward", float(loss.detach())))

    def step(self):
        self.calls.append(("step",))

    def get_lr(self):
        return [0.5]

    def get_global_grad_norm(self):
        return 2.0

    def was_step_applied(self):
        return self.applied

    def zero_grad(self):
        self.calls.append(("zero_grad",))


def _engine(accumulation=1):
    fake = _FakeDeepSpeed(nn.Linear(2, 1), accumulation)
    return TrainEngine(fake, {}, DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")), fake


def test_backward_sets_the_boundary_only_on_the_last_backward_of_the_step():
    engine, fake = _engine(accumulation=2)
    x = torch.ones(1, 2)
    for boundary in (False, True, False, True):
        engine.backward(engine(x).sum(), boundary=boundary)
    assert [c[1] for c in fake.calls if c[0] == "boundary"] == [False, False, False, True]
    result = engine.step()
    assert result.lr == 0.5 and result.grad_norm == 2.0 and not result.skipped


def test_backward_without_an_engine_forward_is_refused():
    engine, _ = _engine()
    loss = engine.module(torch.ones(1, 2)).sum()
    with pytest.raises(RuntimeError, match=r"run the model as engine\(\*\*batch\)"):
        engine.backward(loss, boundary=True)


def test_step_before_the_micro_batches_are_closed_is_refused():
    engine, _ = _engine(accumulation=1)
    engine.backward(engine(torch.ones(1, 2)).sum(), boundary=False)
    with pytest.raises(RuntimeError, match="0 of 1 micro batches"):
        engine.step()
    engine.backward(engine(torch.ones(1, 2)).sum(), boundary=True)
    with pytest.raises(RuntimeError, match="call step\\(\\) first"):
        engine.backward(engine(torch.ones(1, 2)).sum(), boundary=True)


def test_nonfinite_loss_value_poisons_the_backward_and_reports_a_skip():
    engine, fake = _engine()
    engine.backward(engine(torch.ones(1, 2)).sum(), boundary=True, loss_value=float("inf"))
    assert math.isnan([c for c in fake.calls if c[0] == "backward"][-1][1])
    fake.applied = False
    assert engine.step().skipped


# -- checkpoint shapes -----------------------------------------------------------------------

_LORA_A = "backbone.layers.0.q_proj.lora_A.default.weight"
_LORA_B = "backbone.layers.0.q_proj.lora_B.default.weight"


@pytest.mark.parametrize(("name", "saved", "current"), [(_LORA_A, [4, 64], [8, 64]),
                                                        (_LORA_B, [64, 4], [64, 8])])
def test_another_lora_rank_names_the_tensor_shapes_and_setting(tmp_path, name, saved, current):
    from pcc_dist.checkpoint import CheckpointError
    from pcc_dist.portable_state import check_same_shapes

    with pytest.raises(CheckpointError) as error:
        check_same_shapes(tmp_path, {name: saved}, {name: current})
    message = str(error.value)
    assert f"{name} is {saved} in the checkpoint and {current} with this config" in message
    assert "model.lora.r was 4 when the checkpoint was written and is 8" in message
    assert "another run.output_dir" in message


def test_other_shape_changes_and_other_tensors_name_the_likely_settings(tmp_path):
    from pcc_dist.checkpoint import CheckpointError
    from pcc_dist.portable_state import check_same_shapes

    check_same_shapes(tmp_path, {_LORA_A: [4, 64]}, {_LORA_A: [4, 64]})  # same: no error
    with pytest.raises(CheckpointError, match=r"\[4, 64\] in the checkpoint and \[4, 96\].*"
                                              r"model\.name_or_path"):
        check_same_shapes(tmp_path, {_LORA_A: [4, 64]}, {_LORA_A: [4, 96]})
    with pytest.raises(CheckpointError, match="other trainable tensors.*model.lora.target_modules"):
        check_same_shapes(tmp_path, {_LORA_A: [4, 64]}, {_LORA_B: [64, 4]})


@pytest.mark.parametrize("text", ['{"world_size": 1, "shapes": {"w": [4, "x"]}}',
                                  '{"world_size": 1, "shapes": [4]}', '{"shapes": {}}', "{"])
def test_a_damaged_world_file_is_a_checkpoint_error(tmp_path, text):
    from pcc_dist.checkpoint import CheckpointError
    from pcc_dist.portable_state import read_world_file

    (tmp_path / "world.json").write_text(text)
    with pytest.raises(CheckpointError, match="world.json is damaged"):
        read_world_file(tmp_path / "world.json")
