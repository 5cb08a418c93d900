"""benchmarks/comm_bytes.py: the collective byte counter, on fakes and on a real 1-rank group."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from helpers import load_benchmark

from pcc_dist.distributed import free_port

CommCounter = load_benchmark("comm_bytes").CommCounter


def _fake_dist():
    calls = []
    module = types.SimpleNamespace()
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        setattr(module, name, lambda *a, _n=name, **k: calls.append(_n))
    return module, calls


def test_counts_bytes_per_op_and_phase_and_restores():
    module, calls = _fake_dist()
    original = module.all_reduce
    x = torch.zeros(6, dtype=torch.float64)  # 48 bytes
    emb = torch.zeros(4, 8)  # 128 bytes
    with CommCounter(module) as counter:
        with counter.phase("forward"):
            module.all_reduce(x)
            module.all_gather([torch.empty_like(emb), torch.empty_like(emb)], emb)
        with counter.phase("backward"):
            module.all_gather_into_tensor(torch.empty(8, 8), emb)
            module.reduce_scatter_tensor(output=torch.empty(2, 8), input=emb)
    assert module.all_reduce is original
    assert calls == ["all_reduce", "all_gather", "all_gather_into_tensor",
                     "reduce_scatter_tensor"]
    totals = counter.totals
    assert totals["forward"]["input_bytes"] == 48 + 128
    assert totals["forward"]["output_bytes"] == 48 + 256
    assert totals["forward"]["ops"] == {"all_reduce": 1, "all_gather": 1}
    assert totals["backward"]["input_bytes"] == 128 + 128
    assert totals["backward"]["output_bytes"] == 256 + 64


def test_negative_control_nothing_counted_outside_the_block():
    module, _ = _fake_dist()
    with CommCounter(module) as counter:
        pass
    module.all_reduce(torch.zeros(3))
    assert counter.totals == {}


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_real_gloo_collectives_are_counted(one_rank_group):
    sums = torch.zeros(6, dtype=torch.float64)
    emb = torch.randn(16, 32)
    with CommCounter() as counter:
        dist.all_reduce(sums)
        gathered = [torch.empty_like(emb)]
        dist.all_gather(gathered, emb)
    assert torch.equal(gathered[0], emb)  # the real collective still ran
    totals = counter.totals["default"]
    assert totals["ops"] == {"all_reduce": 1, "all_gather": 1}
    assert totals["output_bytes"] == 6 * 8 + 16 * 32 * 4
