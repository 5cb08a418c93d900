"""Launch planning shared by the kernels: tiles that fill the GPU, and one record per launch.

Every launch of a kernel goes through a :class:`Launch`, built by the kernel module's planner from
the shapes alone. The same records drive the real launches and
``tests/kernels/test_compile_resources.py`` / ``benchmarks/kernel_resources.py``, which compile
each of them for sm_80 and sm_90 without a GPU: what is checked there is what runs.

Imports no Triton (a :class:`Launch` only holds the kernel object it is given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# An H100 SXM has 132 SMs. Off CUDA (the interpreter, compile checks) launches are planned for it.
H100_SMS = 132
# Two programs per SM at least: one waits on memory while the other computes, and a wave that
# leaves SMs idle costs at most half of one program's time.
PROGRAMS_PER_SM = 2
MIN_TILE = 16  # the smallest tl.dot edge


TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}


def pointer(dtype: torch.dtype) -> str:
    """Triton signature type of a pointer to ``dtype`` elements, e.g. ``"*bf16"``."""
    return "*" + TRITON_DTYPES[dtype]


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, its compile-time constants, its argument types.

    Attributes:
        kernel: The ``@triton.jit`` function.
        grid: Programs per grid axis.
        constexprs: The kernel's ``tl.constexpr`` arguments.
        types: Triton signature types of the runtime arguments that are not the default
            (``*fp32`` for ``*_ptr`` arguments, ``i32`` for the others), e.g. ``{"a_ptr": "*bf16",
            "inv_temp": "fp32"}``; what a compile without a GPU needs to know.
        num_warps: Warps per program.
    """

    kernel: Any
    grid: tuple[int, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    num_warps: int = 4

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def signature(self) -> dict[str, str]:
        """``{argument: type}`` of every kernel argument, as ``triton.compiler.ASTSource`` takes."""
        def kind(name: str) -> str:
            if name in self.constexprs:
                return "constexpr"
            return self.types.get(name, "*fp32" if name.endswith("_ptr") else "i32")
        return {name: kind(name) for name in self.kernel.arg_names}

    def __call__(self, *args: Any) -> None:
        """Launch with positional runtime arguments (the constexprs come from the plan)."""
        if self.programs:
            self.kernel[self.grid](*args, **self.constexprs, num_warps=self.num_warps)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def target_programs(device: torch.device | None) -> int:
    """Programs one launch should have to fill the GPU: 2 × the SM count of ``device`` (CUDA), or
    of an H100 elsewhere."""
    if device is not None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = H100_SMS
    return PROGRAMS_PER_SM * sms


def grid_tiles(rows: int, cols: int, target: int, max_rows: int = 64,
               max_cols: int = 64) -> tuple[int, int]:
    """The largest power-of-two tile ``(tile_rows, tile_cols)``, each edge in [16, max], whose
    grid over a ``rows × cols`` output has at least ``target`` tiles; the 16 × 16 tile when even
    that has fewer. Edges never exceed the extent they tile (rounded up to a power of two).

    Larger tiles reuse each loaded operand more (a tile of r × c reads r + c rows per step for
    r·c products); smaller ones give more programs. Halving the larger edge first keeps the
    tile near square.
    """
    tile_r = max(MIN_TILE, min(max_rows, next_power_of_2(rows)))
    tile_c = max(MIN_TILE, min(max_cols, next_power_of_2(cols)))
    while cdiv(rows, tile_r) * cdiv(cols, tile_c) < target:
        if tile_c >= tile_r and tile_c > MIN_TILE:
            tile_c //= 2
        elif tile_r > MIN_TILE:
            tile_r //= 2
        else:
            break
    return tile_r, tile_c


def check_tile(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is a power of two ≥ 16 (the tl.dot tile edge)."""
    if value < MIN_TILE or value & (value - 1):
        raise ValueError(f"{name} must be a power of two ≥ 16 (tl.dot tile edge), got {value}")
