"""Run the Triton kernel tests on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton decorates the kernels (``@triton.jit`` reads it
when ``pcc_dist.kernels.pearson`` / ``.infonce`` are imported), so it is set here, before any test
module of this folder is imported. If another part of a larger session imported the kernel modules
without the interpreter, they are dropped from ``sys.modules`` so that the imports below re-run
under it. On a CUDA machine set ``PCC_TRITON_COMPILED=1`` to test the compiled kernels instead.

The interpreter is ~1000× slower than torch and computes bf16 wrongly: tests here use fp32 and
tiny shapes (the folder runs in well under a minute on 2 CPU cores).
"""

import os
import sys

if os.environ.get("PCC_TRITON_COMPILED") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("pcc_dist.kernels.pearson", "pcc_dist.kernels.infonce"):
        sys.modules.pop(_name, None)
