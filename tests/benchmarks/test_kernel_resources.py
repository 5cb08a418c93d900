"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, with no spills, within shared
memory, on tensor cores for 16-bit InfoNCE products (benchmarks/kernel_resources.py --quick).

The compiles run in a subprocess without ``TRITON_INTERPRET``: tests/kernels sets it for the
whole pytest process, and the interpreter replaces the kernels that are to be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pcc_dist.kernels.resources import Resources

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_quick_matrix_compiles_clean(tmp_path):
    out = tmp_path / "resources"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"),
                           "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["failures"] == []
    assert {"_infonce_fwd_kernel", "_dot_partial_kernel", "_grad_logits_kernel",
            "_scaled_matmul_kernel", "_pearson_fwd_kernel"} <= set(result["kernels"])
    rows = result["rows"]
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    assert all(row["spill_bytes"] == 0 and row["registers"] <= 255 for row in rows)
    bf16_dots = [row for row in rows if row["dtype"] == "bf16"
                 and row["kernel"] in ("_infonce_fwd_kernel", "_dot_partial_kernel")]
    assert bf16_dots and all(row["tensor_core"] in ("mma", "wgmma") for row in bf16_dots)
    assert any(row["tensor_core"] == "wgmma" for row in bf16_dots if row["arch"] == "sm_90")


_SPILLING = """
import json
from pcc_dist.kernels.infonce_jit import _infonce_fwd_kernel
from pcc_dist.kernels.launch import Launch
from pcc_dist.kernels.resources import compile_launch
# The fused forward in fp32 with 4 warps and 32-wide D steps: 255 registers and a stack on sm_80.
launch = Launch(_infonce_fwd_kernel, (1, 1),
                {"BLOCK_B": 64, "BLOCK_M": 64, "BLOCK_D": 32, "PRECISION": "ieee"},
                {"a_ptr": "*fp32", "c_ptr": "*fp32", "label_ptr": "*i64", "inv_temp": "fp32"})
print(json.dumps(compile_launch(launch, "sm_80", "fp32").as_dict()))
"""


def test_negative_control_a_spilling_configuration_is_reported():
    proc = subprocess.run([sys.executable, "-c", _SPILLING], capture_output=True, text=True,
                          env=_env(), timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["spill_bytes"] > 0 and row["problems"][0].startswith("spills")


def test_shared_memory_over_the_limit_is_reported():
    row = Resources("k", "sm_80", "bf16", "", 1, 100, 0, 170_000, 166_912, "mma", 0.1)
    assert row.problems == ["shared memory 170000 B > 166912 B"]
