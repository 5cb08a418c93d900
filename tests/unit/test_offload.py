"""pcc_dist.offload: DeepSpeed's CPU Adam under optimizer offload, parameter offload by GPU
memory (pure decisions on the resolved DeepSpeed config; no GPU needed)."""

from __future__ import annotations

import copy

import pytest

from pcc_dist.config import load_config
from pcc_dist.ds_config import resolve_ds_config
from pcc_dist.offload import choose_param_offload, param_offload_need, use_deepspeed_cpu_adam

# MistralModel without the LM head: 32000 x 4096 embedding + 32 layers x 218,112,000 + norm.
MISTRAL_7B = 7_110_660_096
GIB = 2**30


def _ds(name: str) -> dict:
    cfg = load_config(None, [f"train.deepspeed_config={name}", "model.dtype=bf16"])
    return resolve_ds_config(cfg, cfg.stage1, world_size=8)


@pytest.mark.parametrize("name, optimizer, cuda, expected", [
    ("zero3_offload", "adamw_torch", True, True),   # a real run: CPU Adam does the host step
    ("zero3_offload", "adamw_torch", False, False),  # CPU test machines: no compiled op
    ("zero3_offload", "adamw_deepspeed", False, True),
    ("zero3", "adamw_torch", True, False),          # states on the GPU: not the host optimizer
])
def test_cpu_adam_when_optimizer_states_live_on_the_host(name, optimizer, cuda, expected):
    assert use_deepspeed_cpu_adam(optimizer, _ds(name), cuda=cuda) is expected


@pytest.mark.parametrize("gpu_gib, world_size, kept", [(80, 8, False), (24, 1, True),
                                                      (40, 2, True), (80, 4, False)])
def test_parameter_offload_is_dropped_where_the_gpu_holds_its_share(gpu_gib, world_size, kept,
                                                                    monkeypatch):
    monkeypatch.delenv("PCC_PARAM_OFFLOAD", raising=False)
    ds = choose_param_offload(_ds("zero3_offload"), MISTRAL_7B, world_size, gpu_gib * GIB)
    assert ("offload_param" in ds["zero_optimization"]) is kept
    assert "offload_optimizer" in ds["zero_optimization"]  # the optimizer states stay on the host
    need = param_offload_need(MISTRAL_7B, world_size, ds)
    assert (need > 0.5 * gpu_gib * GIB) is kept


def test_parameter_offload_choice_needs_cuda_and_can_be_pinned(monkeypatch):
    ds = _ds("zero3_offload")
    assert choose_param_offload(copy.deepcopy(ds), MISTRAL_7B, 8, None) == ds  # no GPU
    monkeypatch.setenv("PCC_PARAM_OFFLOAD", "keep")
    assert "offload_param" in choose_param_offload(ds, MISTRAL_7B, 8, 80 * GIB)[
        "zero_optimization"]
