"""The 2-rank ZeRO spawner tells DeepSpeed the accelerator that matches the engine's backend
(NCCL whenever CUDA is visible: pcc_dist.distributed.init_distributed), with CUDA's presence
mocked."""

from __future__ import annotations

import pytest
import torch
from helpers.zero_spawn import engine_accelerator_env


@pytest.mark.parametrize(("cuda", "gpus", "world", "expected"), [
    (True, 8, 2, {"DS_ACCELERATOR": "cuda"}),       # a GPU per rank: NCCL + CUDA accelerator
    (True, 1, 2, {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}),  # too few: hide them
    (False, 0, 2, {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}),  # this machine
])
def test_accelerator_matches_the_backend_the_ranks_will_pick(monkeypatch, cuda, gpus, world,
                                                             expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    env = engine_accelerator_env(world)
    assert env == expected
    # What the ranks will see: CUDA stays visible exactly when DeepSpeed is told "cuda", so the
    # engine's NCCL-when-CUDA rule and DeepSpeed's accelerator agree.
    ranks_see_cuda = cuda and env.get("CUDA_VISIBLE_DEVICES") != ""
    assert (env["DS_ACCELERATOR"] == "cuda") == ranks_see_cuda
