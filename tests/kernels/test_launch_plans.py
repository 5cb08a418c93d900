"""Launch plans of the kernels: grids that fill an H100 at the recipe shapes, and the tile rule.

Planning is plain Python (no kernel runs), so these tests need neither a GPU nor the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from pcc_dist.kernels.infonce import plan_launches
from pcc_dist.kernels.launch import H100_SMS, grid_tiles, target_programs
from pcc_dist.kernels.resources import INFONCE_SHAPES

TARGET = 2 * H100_SMS


def test_target_off_cuda_is_two_programs_per_h100_sm():
    assert target_programs(torch.device("cpu")) == TARGET == 264


@pytest.mark.parametrize("shape", sorted(INFONCE_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_infonce_launch_fills_an_h100(shape, dtype):
    rows, blocks, dim = INFONCE_SHAPES[shape]
    launches = plan_launches(rows, blocks, dim, dtype, TARGET)
    assert {"anchors/norms", "block0/forward", "block0/grad_anchors",
            "block1/grad_candidates"} <= set(launches)
    short = {name: launch.programs for name, launch in launches.items()
             if launch.programs < TARGET}
    assert not short, f"launches below {TARGET} programs: {short}"


def test_recipe_shapes_take_both_forward_modes():
    small = plan_launches(32, [256, 256], 4096, torch.bfloat16, TARGET)
    large = plan_launches(256, [8192, 8192], 4096, torch.bfloat16, TARGET)
    assert small["block0/forward"].kernel.__name__ == "_dot_partial_kernel"
    assert large["block0/forward"].kernel.__name__ == "_infonce_fwd_kernel"
    assert "block0/grad_logits" in large and "block0/grad_logits" not in small


def test_negative_control_the_old_grid_would_fail():
    """cdiv(B, 32) anchor programs, the grid before the planner: 1 program for 32 anchors."""
    rows = INFONCE_SHAPES["stage1_7b"][0]
    assert -(-rows // 32) < TARGET


@pytest.mark.parametrize(("rows", "cols", "target", "expected"), [
    (4096, 4096, 264, (64, 64)),  # plenty of tiles: the largest
    (32, 4096, 264, (16, 16)),  # 2 × 256 tiles of 16 × 16 are needed to pass 264
    (32, 256, 264, (16, 16)),  # cannot reach the target: the smallest tile
    (5, 7, 1, (16, 16)),  # edges never exceed the extent rounded up to 16
    (256, 16384, 264, (64, 64)),
])
def test_grid_tiles(rows, cols, target, expected):
    assert grid_tiles(rows, cols, target) == expected
