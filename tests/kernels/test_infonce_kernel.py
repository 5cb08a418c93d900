"""Fused Triton InfoNCE kernels against the torch reference (fp32, rel 1e-5), forward and backward.

On CPU the kernels run in Triton's interpreter (tests/kernels/conftest.py). Tiles are 16 (the
smallest ``tl.dot`` edge) so that tiny shapes still span several tiles in every dimension. Every
comparison runs in each of the planner's modes (``MODES``): split-D (the default for tiny shapes),
fused with one candidate slice per program, fused with several slices merged by log-sum-exp, and
fused with the backward cut into anchor panels.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pcc_dist.kernels.infonce import Tiles, infonce_triton, plan_block
from pcc_dist.losses import InfoNCELoss, infonce_reference

RTOL = 1e-5
SMALL = {"block_b": 16, "block_m": 16, "block_d": 16}
MODES = {
    "split_d": {},
    "fused": {"target": 1},
    "fused_slices": {"target": 4},
    "fused_panels": {"target": 1, "workspace_bytes": 1},
}


@pytest.fixture(params=sorted(MODES))
def mode(request):
    return MODES[request.param]


def test_modes_are_what_their_names_say():
    """The planner really takes each path that MODES names, on the shapes the tests use."""
    tiles = Tiles(16, 16, 16)
    split = plan_block(20, 20, 70, torch.float32, 264, tiles)
    assert not split.fused and split.forward.grid == (2, 2, 5) and split.d_chunk == 16
    fused = plan_block(20, 20, 70, torch.float32, 1, tiles)  # one slice of 2 candidate tiles
    assert fused.fused and fused.forward.grid == (2, 1) and fused.tiles_per_slice == 2
    assert fused.panel_rows == 20
    sliced = plan_block(20, 20, 70, torch.float32, 4, tiles)  # 2 slices merged on the host
    assert sliced.fused and sliced.forward.grid == (2, 2) and sliced.tiles_per_slice == 1
    panels = plan_block(20, 20, 70, torch.float32, 1, tiles, workspace_bytes=1)
    assert panels.fused and panels.panel_rows == 16


def _inputs(rows, dim, negatives=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    count = 3 if negatives else 2
    return [torch.randn(rows, dim, generator=gen).requires_grad_() for _ in range(count)]


def _run(fn, tensors, grad_out=1.0, **kwargs):
    loss = fn(*tensors, **kwargs)
    return loss, torch.autograd.grad(loss * grad_out, tensors)


def _close(got, want):
    """rel 1e-5, with an absolute floor of 1e-5 of the tensor's scale for entries near zero."""
    torch.testing.assert_close(
        got, want, rtol=RTOL, atol=RTOL * want.detach().abs().max().item() + 1e-12
    )


def _compare(tensors, grad_out=1.0, temperature=0.05, tiles=SMALL, mode=None):
    loss, grads = _run(infonce_triton, tensors, grad_out, temperature=temperature, **tiles,
                       **(mode or {}))
    ref, ref_grads = _run(
        infonce_reference, tensors, grad_out, temperature=temperature, chunk_size=4
    )
    _close(loss, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want)
    return ref, ref_grads


@pytest.mark.parametrize(
    ("rows", "dim", "negatives"),
    [
        (5, 33, True),  # B < block, D = 2 blocks + 1
        (20, 70, True),  # B, M = 40 and D all span partial tiles
        (17, 16, False),  # B = block + 1, D exactly one block, in-batch negatives only
        (1, 20, True),  # B = 1: one positive and one hard negative
        (3, 5, False),  # D smaller than one block
    ],
)
@pytest.mark.parametrize("grad_out", [1.0, 0.37])
def test_matches_reference(rows, dim, negatives, grad_out, mode):
    ref, ref_grads = _compare(_inputs(rows, dim, negatives, seed=rows * 100 + dim), grad_out,
                              mode=mode)
    assert ref.item() > 1e-5 and max(g.abs().max() for g in ref_grads) > 1e-5  # not comparing zeros


@pytest.mark.parametrize("temperature", [0.5, 0.01])
def test_temperatures(temperature, mode):
    _compare(_inputs(6, 24, seed=1), temperature=temperature, mode=mode)


def test_sharp_temperature_is_finite_and_close():
    # τ = 0.001 turns the 6e-8 fp32 error of a cosine into 6e-5 in a logit: compare at 1e-3.
    tensors = _inputs(5, 24, seed=10)
    loss, grads = _run(infonce_triton, tensors, temperature=0.001, **SMALL)
    ref, ref_grads = _run(infonce_reference, tensors, temperature=0.001, chunk_size=4)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * scale)


def test_default_tiles():
    _compare(_inputs(9, 40, seed=2), grad_out=2.0, tiles={})


def test_perturbed_input_does_not_match():
    tensors = _inputs(6, 20, seed=3)
    ref, ref_grads = _run(infonce_reference, tensors, chunk_size=4)
    changed = [t.detach().clone().requires_grad_() for t in tensors]
    with torch.no_grad():
        changed[2][1] += 0.5
    loss, grads = _run(infonce_triton, changed, **SMALL)
    assert abs(loss.item() - ref.item()) > 1e-4
    assert not torch.allclose(grads[0], ref_grads[0], rtol=RTOL, atol=1e-6)


def test_single_candidate_gives_zero_loss_and_gradient():
    tensors = _inputs(1, 20, negatives=False, seed=4)
    loss, grads = _run(infonce_triton, tensors, **SMALL)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert all(g.abs().max() < 1e-6 for g in grads)


def test_zero_norm_rows(mode):
    tensors = _inputs(5, 18, seed=5)
    with torch.no_grad():
        tensors[0][2] = 0.0  # anchor
        tensors[1][4] = 0.0  # positive
        tensors[2][0] = 0.0  # hard negative
    _compare(tensors, mode=mode)


def test_identical_candidates():
    # All 2B = 8 candidates equal: every logit row is constant, ℓᵢ = log 8 exactly, and the anchor
    # gradient Σⱼ (Pᵢⱼ − δ) ĉ = ĉ·Σⱼ (Pᵢⱼ − δ) vanishes.
    a, _, _ = _inputs(4, 16, seed=6)
    same = torch.randn(1, 16, generator=torch.Generator().manual_seed(11)).repeat(4, 1)
    tensors = [a, same.clone().requires_grad_(), same.clone().requires_grad_()]
    loss, grads = _run(infonce_triton, tensors, **SMALL)
    ref, ref_grads = _run(infonce_reference, tensors, chunk_size=4)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=RTOL)
    assert grads[0].abs().max() < 1e-4 and ref_grads[0].abs().max() < 1e-4
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):
        _close(got, want)


def test_strided_rows(mode):
    gen = torch.Generator().manual_seed(7)
    tensors = [torch.randn(6, 48, generator=gen)[:, :29].requires_grad_() for _ in range(3)]
    _compare(tensors, mode=mode)


def test_rejects_float64_and_bad_tiles():
    tensors = _inputs(4, 8)
    with pytest.raises(ValueError, match="kernel='torch' for float64"):
        infonce_triton(*(t.double() for t in tensors))
    with pytest.raises(ValueError, match=r"block_m must be a power of two ≥ 16 .*got 8"):
        infonce_triton(*tensors, block_m=8)


def test_module_dispatches_to_triton(caplog):
    tensors = _inputs(5, 12, seed=8)
    module = InfoNCELoss(kernel="triton", temperature=0.1)
    with caplog.at_level(logging.INFO, logger="pcc_dist.losses.infonce"):
        loss = module(*tensors)
    assert "using the triton implementation" in caplog.text
    _close(loss, infonce_reference(*tensors, temperature=0.1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", [None, 1], ids=["planned", "fused"])
def test_compiled_cuda_matches_reference(dtype, target):
    # Needs a compiled (non-interpreted) run: PCC_TRITON_COMPILED=1 on a CUDA machine.
    gen = torch.Generator().manual_seed(9)
    tensors = [
        torch.randn(300, 257, generator=gen).to("cuda", dtype).requires_grad_() for _ in range(3)
    ]
    loss, grads = _run(infonce_triton, tensors, 0.5, target=target)
    ref, ref_grads = _run(infonce_reference, tensors, 0.5, chunk_size=64)
    tol = RTOL if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max())
