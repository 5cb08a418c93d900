"""pcc_dist.engine without a process group: DeepSpeed JSON resolution, its errors, the schedule,
the optimizer groups and the TrainEngine bookkeeping (on a stand-in for DeepSpeed's engine)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pcc_dist.config import ConfigError, load_config
from pcc_dist.engine import (
    BUILTIN_DS_CONFIGS,
    DistInfo,
    TrainEngine,
    WarmupDecay,
    _param_groups,
    find_ds_config,
    resolve_ds_config,
)

OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
         "gradient_clipping")


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def _write(tmp_path, payload, name="ds.json") -> str:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


def _problems(cfg, world_size=2, stage="stage1") -> list[str]:
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(cfg, getattr(cfg, stage), world_size)
    return err.value.problems


# -- the shipped JSONs -----------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_DS_CONFIGS)
def test_shipped_configs_leave_every_owned_field_auto(name):
    raw = json.loads(find_ds_config(name).read_text())
    for key in OWNED:
        assert raw[key] == "auto", key
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"
    assert "optimizer" not in raw and "scheduler" not in raw


@pytest.mark.parametrize("name", BUILTIN_DS_CONFIGS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_builtin_names_resolve_and_fill_from_the_train_config(name, dtype):
    cfg = _cfg(f"train.deepspeed_config={name}", "stage2.global_batch_size=96",
               "stage2.grad_clip=0.5", f"model.dtype={dtype}")
    ds = resolve_ds_config(cfg, cfg.stage2, world_size=4)
    assert ds["train_batch_size"] == 96
    assert ds["train_micro_batch_size_per_gpu"] == 24  # N / W
    assert ds["gradient_accumulation_steps"] == 1  # each loss covers the whole global batch
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (dtype == "bf16")
    assert ds["fp16"]["enabled"] is (dtype == "fp16")
    assert "auto" not in json.dumps(ds)
    stage = json.loads(find_ds_config(name).read_text())["zero_optimization"]["stage"]
    assert ds["zero_optimization"]["stage"] == stage


def test_offload_with_torch_adamw_allows_the_client_optimizer():
    cfg = _cfg("train.deepspeed_config=zero3_offload")
    ds = resolve_ds_config(cfg, cfg.stage1, world_size=1)
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_default_relative_path_is_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg()  # train.deepspeed_config = "ds_configs/zero3.json"
    assert resolve_ds_config(cfg, cfg.stage1, 1)["zero_optimization"]["stage"] == 3


def test_a_json_file_of_the_user_is_used(tmp_path):
    path = _write(tmp_path, {"train_batch_size": "auto", "zero_optimization": {"stage": 1}})
    cfg = _cfg(f"train.deepspeed_config={path}")
    ds = resolve_ds_config(cfg, cfg.stage1, 2)
    assert ds["zero_optimization"]["stage"] == 1
    # Owned keys the JSON leaves out are filled too.
    assert ds["train_micro_batch_size_per_gpu"] == 128 and ds["gradient_clipping"] == 1.0


def test_hard_coded_values_equal_to_the_train_config_are_accepted(tmp_path):
    path = _write(tmp_path, {"train_batch_size": 256, "gradient_clipping": 1,
                             "train_micro_batch_size_per_gpu": 128,
                             "gradient_accumulation_steps": 1, "bf16": {"enabled": False}})
    cfg = _cfg(f"train.deepspeed_config={path}")
    assert resolve_ds_config(cfg, cfg.stage1, 2)["train_batch_size"] == 256


# -- every error message ---------------------------------------------------------------------


def test_missing_file_names_the_setting_and_the_builtins(tmp_path):
    cfg = _cfg(f"train.deepspeed_config={tmp_path / 'nope.json'}")
    (problem,) = _problems(cfg)
    assert problem.startswith("train.deepspeed_config:") and "nope.json" in problem
    assert "zero3, zero3_offload, zero2" in problem


def test_invalid_json_is_reported(tmp_path):
    cfg = _cfg(f"train.deepspeed_config={_write(tmp_path, '{not json')}")
    (problem,) = _problems(cfg)
    assert "is not valid JSON" in problem and "ds.json" in problem


def test_top_level_must_be_an_object(tmp_path):
    cfg = _cfg(f"train.deepspeed_config={_write(tmp_path, [1, 2])}")
    (problem,) = _problems(cfg)
    assert "must hold a JSON object, got list" in problem


def test_global_batch_not_divisible_by_world_size():
    cfg = _cfg("stage1.global_batch_size=250")
    (problem,) = _problems(cfg, world_size=3)
    assert problem.startswith("stage1.global_batch_size: 250 does not split evenly over world "
                              "size 3")
    assert "use a multiple of 3 (249 or 252)" in problem


def test_stage2_is_named_in_its_messages():
    cfg = _cfg("stage2.global_batch_size=5")
    (problem,) = _problems(cfg, world_size=2, stage="stage2")
    assert problem.startswith("stage2.global_batch_size: 5") and "(4 or 6)" in problem


@pytest.mark.parametrize("key, value, ours, field", [
    ("train_batch_size", 512, "256", "stage1.global_batch_size"),
    ("train_micro_batch_size_per_gpu", 64, "128", "stage1.global_batch_size / world size 2"),
    ("gradient_accumulation_steps", 4, "1", "pcc_dist never accumulates"),
    ("gradient_clipping", 0.5, "1.0", "stage1.grad_clip"),
])
def test_conflicting_hard_coded_value_names_file_key_and_both_values(tmp_path, key, value, ours,
                                                                     field):
    path = _write(tmp_path, {key: value})
    cfg = _cfg(f"train.deepspeed_config={path}")
    (problem,) = _problems(cfg, world_size=2)
    assert problem.startswith(f"{path}: \"{key}\" is {value} but the TrainConfig gives {ours}")
    assert field in problem and "write \"auto\" in the JSON" in problem


@pytest.mark.parametrize("section, dtype", [("bf16", "fp32"), ("fp16", "bf16")])
def test_conflicting_precision_names_model_dtype(tmp_path, section, dtype):
    path = _write(tmp_path, {section: {"enabled": True}})
    cfg = _cfg(f"train.deepspeed_config={path}", f"model.dtype={dtype}")
    (problem,) = _problems(cfg)
    assert f"\"{section}.enabled\" is true but the TrainConfig gives False" in problem
    assert f"model.dtype ({dtype!r})" in problem and "or change model.dtype" in problem


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_blocks_are_refused(tmp_path, block):
    path = _write(tmp_path, {block: {"type": "AdamW", "params": {}}})
    cfg = _cfg(f"train.deepspeed_config={path}")
    (problem,) = _problems(cfg)
    assert f"has a \"{block}\" block, but pcc_dist builds the {block} itself" in problem
    assert "delete the block" in problem


def test_auto_on_a_key_we_do_not_fill(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    cfg = _cfg(f"train.deepspeed_config={path}")
    (problem,) = _problems(cfg)
    assert "\"zero_optimization.reduce_bucket_size\" is \"auto\", but pcc_dist fills" in problem
    assert "delete the key to use DeepSpeed's default" in problem


def test_precision_section_must_be_an_object(tmp_path):
    path = _write(tmp_path, {"bf16": True})
    cfg = _cfg(f"train.deepspeed_config={path}")
    (problem,) = _problems(cfg)
    assert "\"bf16\" must be an object like {\"enabled\": \"auto\"}, got True" in problem


def test_settings_that_disable_the_nonfinite_guard(tmp_path):
    path = _write(tmp_path, {"bf16": {"enabled": "auto", "check_grad_overflow": False},
                             "zero_optimization": {"stage": 3, "compute_grad_norm": False}})
    cfg = _cfg(f"train.deepspeed_config={path}", "model.dtype=bf16")
    problems = _problems(cfg)
    assert any("\"bf16.check_grad_overflow\" is false" in p for p in problems)
    assert any("\"zero_optimization.compute_grad_norm\" is false" in p for p in problems)


def test_forced_ds_cpu_optimizer_with_torch_adamw(tmp_path):
    path = _write(tmp_path, {"zero_force_ds_cpu_optimizer": True,
                             "zero_optimization": {"stage": 3,
                                                   "offload_optimizer": {"device": "cpu"}}})
    cfg = _cfg(f"train.deepspeed_config={path}")
    (problem,) = _problems(cfg)
    assert "\"zero_force_ds_cpu_optimizer\" is true with train.optimizer='adamw_torch'" in problem


def test_every_problem_is_reported_at_once(tmp_path):
    path = _write(tmp_path, {"optimizer": {}, "gradient_clipping": 3.0,
                             "steps_per_print": "auto"})
    cfg = _cfg(f"train.deepspeed_config={path}", "stage1.global_batch_size=7")
    problems = _problems(cfg, world_size=2)
    assert len(problems) == 4
    assert "ds.json" in str(ConfigError(problems, source=path))


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
    groups = _param_groups(model, weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight),
                                                   id(model[1].bias), id(model[2].bias)}
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        _param_groups(frozen, 0.0)


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


def test_builtin_configs_are_found_where_a_wheel_installs_them(tmp_path, monkeypatch):
    """Without the repository's ds_configs/ (a wheel install), the built-in names resolve to the
    copies setup.py installs under <prefix>/share/pcc_dist/ds_configs."""
    import shutil

    import pcc_dist.engine as engine_module

    share = tmp_path / "share" / "pcc_dist" / "ds_configs"
    shutil.copytree(engine_module._DS_CONFIG_DIRS[0], share)
    monkeypatch.setattr(engine_module, "_DS_CONFIG_DIRS", (tmp_path / "no_repo", share))
    assert find_ds_config("zero3") == share / "zero3.json"
    (share / "zero2.json").unlink()
    with pytest.raises(ConfigError, match="'zero2' not found"):
        find_ds_config("zero2")


# -- checkpoint shapes -----------------------------------------------------------------------

_LORA_A = "backbone.layers.0.q_proj.lora_A.default.weight"
_LORA_B = "backbone.layers.0.q_proj.lora_B.default.weight"


@pytest.mark.parametrize(("name", "saved", "current"), [(_LORA_A, [4, 64], [8, 64]),
                                                        (_LORA_B, [64, 4], [64, 8])])
def test_another_lora_rank_names_the_tensor_shapes_and_setting(tmp_path, name, saved, current):
    from pcc_dist.checkpoint import CheckpointError
    from pcc_dist.engine import _check_same_shapes

    with pytest.raises(CheckpointError) as error:
        _check_same_shapes(tmp_path, {name: saved}, {name: current})
    message = str(error.value)
    assert f"{name} is {saved} in the checkpoint and {current} with this config" in message
    assert "model.lora.r was 4 when the checkpoint was written and is 8" in message
    assert "another run.output_dir" in message


def test_other_shape_changes_and_other_tensors_name_the_likely_settings(tmp_path):
    from pcc_dist.checkpoint import CheckpointError
    from pcc_dist.engine import _check_same_shapes

    _check_same_shapes(tmp_path, {_LORA_A: [4, 64]}, {_LORA_A: [4, 64]})  # same: no error
    with pytest.raises(CheckpointError, match=r"\[4, 64\] in the checkpoint and \[4, 96\].*"
                                              r"model\.name_or_path"):
        _check_same_shapes(tmp_path, {_LORA_A: [4, 64]}, {_LORA_A: [4, 96]})
    with pytest.raises(CheckpointError, match="other trainable tensors.*model.lora.target_modules"):
        _check_same_shapes(tmp_path, {_LORA_A: [4, 64]}, {_LORA_B: [64, 4]})


@pytest.mark.parametrize("text", ['{"world_size": 1, "shapes": {"w": [4, "x"]}}',
                                  '{"world_size": 1, "shapes": [4]}', '{"shapes": {}}', "{"])
def test_a_damaged_world_file_is_a_checkpoint_error(tmp_path, text):
    from pcc_dist.checkpoint import CheckpointError
    from pcc_dist.engine import _read_world_file

    (tmp_path / "world.json").write_text(text)
    with pytest.raises(CheckpointError, match="world.json is damaged"):
        _read_world_file(tmp_path / "world.json")
