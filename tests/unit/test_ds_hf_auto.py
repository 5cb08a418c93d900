"""A stock Hugging Face Trainer ZeRO-3 JSON works: hidden-size "auto"s filled as HF fills them."""

import json

import pytest

from pcc_dist.config import ConfigError, load_config
from pcc_dist.ds_config import resolve_ds_config

# The ZeRO-3 JSON of the HF DeepSpeed integration guide, as users copy it.
HF_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto",
                                                 "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "none", "pin_memory": True},
        "offload_param": {"device": "none", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A model folder as far as the resolver reads it: config.json with its hidden size."""
    folder = tmp_path_factory.mktemp("m") / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return folder


def test_stock_hf_zero3_json_fills_hidden_size_keys(tmp_path, tiny_llama):
    path = tmp_path / "ds_config_zero3.json"
    path.write_text(json.dumps(HF_ZERO3))
    cfg = load_config(None, [f"train.deepspeed_config={path}",
                             f"model.name_or_path={tiny_llama}"])
    ds = resolve_ds_config(cfg, cfg.stage2, world_size=2)
    h = json.loads((tiny_llama / "config.json").read_text())["hidden_size"]
    zero = ds["zero_optimization"]
    assert h == 64
    assert zero["reduce_bucket_size"] == h * h
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
    assert zero["stage3_param_persistence_threshold"] == 10 * h
    # The all-"auto" optimizer/scheduler blocks mean "the trainer builds them": dropped.
    assert "optimizer" not in ds and "scheduler" not in ds
    assert "auto" not in json.dumps(ds)


def test_hard_coded_optimizer_block_is_still_refused(tmp_path, tiny_llama):
    payload = json.loads(json.dumps(HF_ZERO3))
    payload["optimizer"]["params"]["lr"] = 3e-5
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(payload))
    cfg = load_config(None, [f"train.deepspeed_config={path}",
                             f"model.name_or_path={tiny_llama}"])
    with pytest.raises(ConfigError) as info:
        resolve_ds_config(cfg, cfg.stage2, world_size=2)
    assert any("\"optimizer\" block" in p for p in info.value.problems)


def test_hidden_size_auto_without_a_readable_model_names_the_key(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3,
                                                      "reduce_bucket_size": "auto"}}))
    cfg = load_config(None, [f"train.deepspeed_config={path}",
                             f"model.name_or_path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError) as info:
        resolve_ds_config(cfg, cfg.stage2, world_size=2)
    (problem,) = info.value.problems
    assert "reduce_bucket_size" in problem and "hidden size" in problem and "missing" in problem
