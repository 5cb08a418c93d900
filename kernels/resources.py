"""Compile planned launches for NVIDIA GPUs without a GPU, and read what each one would use.

Triton's wheel ships ``ptxas`` and ``cuobjdump``: ``triton.compile`` turns a kernel plus its
signature and constexprs into PTX and a cubin for any target, here sm_80 (A100) and sm_90 (H100).
From those this module reads what the interpreter never shows: registers per thread, local-memory
stack (spills), shared memory per program, and whether ``tl.dot`` became tensor-core
instructions (``mma``/``wgmma``) or FP32 FMA.

The launches come from the kernels' own planners (:func:`pcc_dist.kernels.infonce.plan_launches`,
:func:`pcc_dist.kernels.pearson.plan_pearson`), so what is compiled is what the wrappers launch.
Must run in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces the kernels).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pcc_dist.kernels._utils import require_triton
from pcc_dist.kernels.launch import Launch

ARCHS = {"sm_80": 80, "sm_90": 90}
# Largest shared memory one program may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166_912, 90: 232_448}

# Recipe shapes (rows per rank, candidate blocks, D). stage1_7b: the 7B stage-1 recipe, global
# batch 256 on 8 GPUs (32 anchors per rank against 256 positives + 256 hard negatives);
# large_batch: B = 256 against M = 16,384 candidates (two blocks of 8,192).
INFONCE_SHAPES = {"stage1_7b": (32, [256, 256], 4096), "large_batch": (256, [8192, 8192], 4096)}
# Pearson: the 7B stage-2 recipe's 30 pairs per rank, and the 1M-pair benchmark size.
PEARSON_SHAPES = {"stage2_7b": (30, 4096), "n_1m": (1 << 20, 4096)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Resources:
    """What one compiled launch uses on one target."""

    kernel: str
    arch: str
    dtype: str
    constexprs: str
    programs: int
    registers: int
    spill_bytes: int  # local-memory stack per thread: > 0 means spills
    shared_bytes: int
    shared_limit: int
    tensor_core: str  # "wgmma", "mma" or "none"
    compile_seconds: float

    @property
    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"spills ({self.spill_bytes} B of stack per thread)")
        if self.shared_bytes > self.shared_limit:
            found.append(f"shared memory {self.shared_bytes} B > {self.shared_limit} B")
        return found

    def as_dict(self) -> dict:
        return {**asdict(self), "problems": self.problems}


def _tool(name: str) -> str:
    triton = require_triton()
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cubin_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED`` of the cubin's one function (``cuobjdump``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", handle.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED):(\d+)", line)}


def tensor_core_kind(ptx: str) -> str:
    """``"wgmma"`` (Hopper warpgroup MMA), ``"mma"`` (``mma.sync``) or ``"none"``."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "none"


def compile_launch(launch: Launch, arch: str, dtype_name: str) -> Resources:
    """Compile ``launch`` for ``arch`` (``"sm_80"``/``"sm_90"``) and read its resources.

    Raises:
        Exception: Triton's own compile error, unchanged (a kernel that does not compile).
    """
    triton = require_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability = ARCHS[arch]
    start = time.perf_counter()
    source = ASTSource(launch.kernel, launch.signature(), dict(launch.constexprs))
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": launch.num_warps})
    seconds = time.perf_counter() - start
    usage = _cubin_usage(compiled.asm["cubin"])
    name = getattr(launch.kernel, "__name__", None) or launch.kernel.fn.__name__
    return Resources(
        kernel=name, arch=arch, dtype=dtype_name,
        constexprs=",".join(f"{k}={v}" for k, v in sorted(launch.constexprs.items())),
        programs=launch.programs, registers=usage["REG"], spill_bytes=usage["STACK"],
        shared_bytes=max(compiled.metadata.shared, usage.get("SHARED", 0)),
        shared_limit=SHARED_LIMIT[capability],
        tensor_core=tensor_core_kind(compiled.asm["ptx"]), compile_seconds=round(seconds, 2))


def recipe_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """Every launch of both losses at the recipe shapes, named ``shape/role``."""
    from pcc_dist.kernels.infonce import plan_launches
    from pcc_dist.kernels.launch import H100_SMS, PROGRAMS_PER_SM
    from pcc_dist.kernels.pearson import plan_pearson

    launches = {}
    for shape, (rows, blocks, dim) in INFONCE_SHAPES.items():
        planned = plan_launches(rows, blocks, dim, dtype, PROGRAMS_PER_SM * H100_SMS)
        launches.update({f"infonce_{shape}/{role}": launch for role, launch in planned.items()})
    for shape, (rows, dim) in PEARSON_SHAPES.items():
        forward, backward = plan_pearson(rows, dim, dtype, torch.float32)
        launches[f"pearson_{shape}/forward"] = forward
        launches[f"pearson_{shape}/backward"] = backward
    return launches


def distinct(launches: dict[str, Launch]) -> dict[tuple, tuple[str, Launch]]:
    """One entry per different compilation (kernel, constexprs, types, warps), first name kept."""
    unique: dict[tuple, tuple[str, Launch]] = {}
    for name, launch in launches.items():
        key = (launch.kernel, tuple(sorted(launch.constexprs.items())),
               tuple(sorted(launch.types.items())), launch.num_warps)
        unique.setdefault(key, (name, launch))
    return unique
