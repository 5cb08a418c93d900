"""pcc_dist.devices: the inference device of pcc-eval / pcc-export --verify, and the dtype and
attention that fit it (CUDA simulated by patching torch.cuda)."""

from __future__ import annotations

import pytest
import torch

from pcc_dist import devices
from pcc_dist.devices import DeviceError, choose_device, place_for_inference
from pcc_dist.eval_cli import eval_main


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(devices.torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("gpus, requested, local_rank, expected", [
    (0, "auto", None, "cpu"), (2, "auto", None, "cuda:0"), (2, "auto", "1", "cuda:1"),
    (2, "cpu", None, "cpu"), (2, "cuda", None, "cuda:0"), (2, "CUDA:1", None, "cuda:1"),
])
def test_auto_takes_cuda_when_there_is_a_gpu(monkeypatch, gpus, requested, local_rank,
                                             expected):
    _gpus(monkeypatch, gpus)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert choose_device(requested) == torch.device(expected)


@pytest.mark.parametrize("gpus, requested, needle", [
    (0, "cuda", "sees no CUDA GPU"), (1, "cuda:3", "GPU 3 does not exist"),
    (1, "tpu", "use one of auto, cpu, cuda"),
])
def test_impossible_devices_are_refused(monkeypatch, gpus, requested, needle):
    _gpus(monkeypatch, gpus)
    with pytest.raises(DeviceError, match=needle):
        choose_device(requested)


def test_cpu_placement_drops_flash_attention_and_fp16(tiny_llama_module):
    model = tiny_llama_module.half()
    model.config._attn_implementation = "flash_attention_2"  # as loaded on a CUDA host
    place_for_inference(model, torch.device("cpu"))
    assert model.config._attn_implementation == "sdpa"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    bf16 = tiny_llama_module.to(torch.bfloat16)
    place_for_inference(bf16, torch.device("cpu"))  # bf16 runs on CPU: kept
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_pcc_eval_refuses_cuda_without_a_gpu_before_loading(monkeypatch, capsys):
    _gpus(monkeypatch, 0)
    assert eval_main(["--model", "/no/such/model", "--device", "cuda"]) == 2
    assert "--device='cuda', but this process sees no CUDA GPU" in capsys.readouterr().err


@pytest.fixture
def tiny_llama_module():
    from helpers.tiny_models import tiny_model, word_tokenizer

    return tiny_model("llama", word_tokenizer("decoder"))
