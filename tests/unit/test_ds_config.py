"""pcc_dist.ds_config: finding the DeepSpeed JSON, filling the fields the PccConfig owns, and
every error message of the resolver."""

from __future__ import annotations

import json

import pytest

from pcc_dist.config import ConfigError, load_config
from pcc_dist.ds_config import BUILTIN_DS_CONFIGS, find_ds_config, resolve_ds_config

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
    assert problem.startswith(f"{path}: \"{key}\" is {value} but the PccConfig gives {ours}")
    assert field in problem and "write \"auto\" in the JSON" in problem


@pytest.mark.parametrize("section, dtype", [("bf16", "fp32"), ("fp16", "bf16")])
def test_conflicting_precision_names_model_dtype(tmp_path, section, dtype):
    path = _write(tmp_path, {section: {"enabled": True}})
    cfg = _cfg(f"train.deepspeed_config={path}", f"model.dtype={dtype}")
    (problem,) = _problems(cfg)
    assert f"\"{section}.enabled\" is true but the PccConfig gives False" in problem
    assert f"model.dtype ({dtype!r})" in problem and "or change model.dtype" in problem


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_blocks_are_refused(tmp_path, block):
    path = _write(tmp_path, {block: {"type": "AdamW", "params": {}}})
    cfg = _cfg(f"train.deepspeed_config={path}")
    (problem,) = _problems(cfg)
    assert f"has a \"{block}\" block, but pcc_dist builds the {block} itself" in problem
    assert "delete the block" in problem


def test_auto_on_a_key_we_do_not_fill(tmp_path):
    # (reduce_bucket_size and the other hidden-size keys are filled: tests/unit/test_ds_hf_auto.py)
    path = _write(tmp_path, {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}})
    cfg = _cfg(f"train.deepspeed_config={path}")
    (problem,) = _problems(cfg)
    assert "\"zero_optimization.sub_group_size\" is \"auto\", but pcc_dist fills" in problem
    assert "delete the key to use DeepSpeed's default" in problem


def test_precision_section_must_be_an_object(tmp_path):
    path = _write(tmp_path, {"bf16": True})
    cfg = _cfg(f"train.deepspeed_config={path}")
    (problem,) = _problems(cfg)
    assert "\"bf16\" must be an object like {\"enabled\": \"auto\"}, got true" in problem


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


def test_builtin_configs_are_found_where_a_wheel_installs_them(tmp_path, monkeypatch):
    """Without the repository's ds_configs/ (a wheel install), the built-in names resolve to the
    copies setup.py installs under <prefix>/share/pcc_dist/ds_configs."""
    import shutil

    import pcc_dist.ds_config as ds_config_module

    share = tmp_path / "share" / "pcc_dist" / "ds_configs"
    shutil.copytree(ds_config_module._DS_CONFIG_DIRS[0], share)
    monkeypatch.setattr(ds_config_module, "_DS_CONFIG_DIRS", (tmp_path / "no_repo", share))
    assert find_ds_config("zero3") == share / "zero3.json"
    (share / "zero2.json").unlink()
    with pytest.raises(ConfigError, match="'zero2' not found"):
        find_ds_config("zero2")


# -- keys and values DeepSpeed would ignore or refuse ----------------------------------------


def test_misspelt_top_level_key_is_named_with_a_suggestion(tmp_path):
    path = _write(tmp_path, {"zero_optimisation": {"stage": 3}})
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert problem.startswith(f"{path}: unknown key \"zero_optimisation\"; did you mean "
                              "\"zero_optimization\"?")
    assert "would have no effect" in problem


def test_unknown_key_without_a_close_match_points_at_deepspeeds_key_list(tmp_path):
    path = _write(tmp_path, {"qqq": 1})
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert "unknown key \"qqq\"" in problem and "deepspeed.ai/docs/config-json" in problem


@pytest.mark.parametrize("stage", [7, -1, True, "3", 2.5, None])
def test_zero_stage_outside_0_to_3(tmp_path, stage):
    path = _write(tmp_path, {"zero_optimization": {"stage": stage}})
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert problem.startswith(f"{path}: \"zero_optimization.stage\" is {json.dumps(stage)}; "
                              "allowed values: 0, 1, 2, 3")


@pytest.mark.parametrize("key, suggestion", [
    ("overlap_com", "zero_optimization.overlap_comm"),
    ("stage3_param_persistance_threshold", "zero_optimization.stage3_param_persistence_threshold"),
    ("strict", None),  # a parameter name of DeepSpeed's model __init__, still an unknown key
])
def test_misspelt_zero_key(tmp_path, key, suggestion):
    path = _write(tmp_path, {"zero_optimization": {"stage": 3, key: True}})
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert problem.startswith(f"{path}: unknown key \"zero_optimization.{key}\"")
    if suggestion:
        assert f"did you mean \"{suggestion}\"?" in problem


def test_nested_zero_sections_use_deepspeeds_models(tmp_path):
    path = _write(tmp_path, {"zero_optimization": {
        "stage": 3, "offload_param": {"devic": "cpu"}, "offload_optimizer": {"device": "gpu"},
        "reduce_bucket_size": "big"}})
    problems = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert len(problems) == 3
    assert any("unknown key \"zero_optimization.offload_param.devic\"; did you mean "
               "\"zero_optimization.offload_param.device\"?" in p for p in problems)
    assert any("\"zero_optimization.offload_optimizer.device\" is \"gpu\": Input should be "
               "'none', 'cpu' or 'nvme'" in p for p in problems)
    assert any("\"zero_optimization.reduce_bucket_size\" is \"big\"" in p for p in problems)


def test_precision_sections_use_deepspeeds_models(tmp_path):
    path = _write(tmp_path, {"bf16": {"enabled": "auto", "check_grad_overflw": True},
                             "fp16": {"enabled": "auto", "loss_scale": -1}})
    problems = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert any("did you mean \"bf16.check_grad_overflow\"?" in p for p in problems)
    assert any("\"fp16.loss_scale\" is -1" in p and "must be >= 0" in p for p in problems)


def test_zero_section_must_be_an_object(tmp_path):
    path = _write(tmp_path, {"zero_optimization": True})
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert "\"zero_optimization\" must be an object like {\"stage\": 3}, got true" in problem


def test_both_spellings_of_bf16(tmp_path):
    path = _write(tmp_path, {"bf16": {"enabled": "auto"}, "bfloat16": {"enabled": True}})
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert "has both \"bf16\" and its older spelling \"bfloat16\"" in problem


def test_malformed_json_names_line_and_column(tmp_path):
    path = _write(tmp_path, '{\n  "zero_optimization": {"stage": 3,},\n}')
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert problem.startswith(f"train.deepspeed_config: {path} is not valid JSON: ")
    assert "at line 2, column 36" in problem and "trailing comma" in problem


def test_repeated_key_is_refused(tmp_path):
    path = _write(tmp_path, '{"zero_optimization": {"stage": 3}, "zero_optimization": {}}')
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert "key \"zero_optimization\" appears twice" in problem and str(path) in problem


@pytest.mark.parametrize("payload, reason", [
    (b"\xff\xfe{}", "not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nesting too deep"),
    ('{"train_batch_size": ' + "9" * 5000 + "}", "cannot be loaded"),
])
def test_unloadable_json_is_a_problem_not_a_crash(tmp_path, payload, reason):
    path = tmp_path / "ds.json"
    path.write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert str(path) in problem and reason in problem


def test_value_beyond_float_range_is_a_conflict_not_a_crash(tmp_path):
    path = _write(tmp_path, {"gradient_clipping": 10**400})
    (problem,) = _problems(_cfg(f"train.deepspeed_config={path}"))
    assert "\"gradient_clipping\" is 1000" in problem and "..." in problem


def test_our_key_list_covers_every_key_deepspeed_reads():
    """DEEPSPEED_KEYS against the installed DeepSpeed: every top-level key its config parser
    looks up (recorded by handing it a dict that logs lookups) is known to us, unless this
    DeepSpeed has removed it; and none of ours is one it refuses as removed."""
    from deepspeed.runtime import config as ds_runtime_config

    from pcc_dist.ds_checks import DEEPSPEED_KEYS

    looked_up: set[str] = set()

    class Recording(dict):
        def get(self, key, *default):
            looked_up.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            looked_up.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            looked_up.add(key)
            return super().__contains__(key)

    ds_runtime_config.DeepSpeedConfig(Recording(
        train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1))
    removed = set(getattr(ds_runtime_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    assert len(looked_up) > 40, "the recording dict saw too few lookups to mean anything"
    assert looked_up - removed <= DEEPSPEED_KEYS
    assert not DEEPSPEED_KEYS & removed


# -- bf16 gradient accumulation --------------------------------------------------------------


@pytest.mark.parametrize("name, dtype, expected", [
    ("zero3", "bf16", "fp32"), ("zero2", "bf16", "fp32"), ("zero3_offload", "bf16", "fp32"),
    ("zero3", "fp32", None),  # fp32 already accumulates in fp32: no key
])
def test_bf16_accumulates_gradient_partitions_in_fp32(name, dtype, expected):
    cfg = _cfg(f"train.deepspeed_config={name}", f"model.dtype={dtype}")
    ds = resolve_ds_config(cfg, cfg.stage1, world_size=2)
    assert ds.get("data_types", {}).get("grad_accum_dtype") == expected


def test_bf16_accumulation_leaves_stage0_and_an_explicit_choice_alone(tmp_path):
    base = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}}
    stage0 = _write(tmp_path, {**base, "zero_optimization": {"stage": 0}}, "z0.json")
    cfg = _cfg(f"train.deepspeed_config={stage0}", "model.dtype=bf16")
    # DeepSpeed refuses bf16 weights with fp32 accumulation without ZeRO.
    assert "data_types" not in resolve_ds_config(cfg, cfg.stage1, world_size=2)
    chosen = _write(tmp_path, {**base, "zero_optimization": {"stage": 3},
                               "data_types": {"grad_accum_dtype": "bf16"}}, "z3.json")
    cfg = _cfg(f"train.deepspeed_config={chosen}", "model.dtype=bf16")
    assert resolve_ds_config(cfg, cfg.stage1, 2)["data_types"]["grad_accum_dtype"] == "bf16"
