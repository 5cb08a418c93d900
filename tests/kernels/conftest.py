"""Run the Triton kernel tests on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton decorates the kernels (``@triton.jit`` reads it
when ``pcc_dist.kernels.pearson`` / ``.infonce_jit`` are imported), so it is set here, before any
test module of this folder is imported. If another part of a larger session imported the kernel
modules without the interpreter, they are dropped from ``sys.modules`` so that the imports below
re-run under it. On a CUDA machine the compiled kernels are tested instead
(``PCC_TRITON_COMPILED=0`` forces the interpreter there).

The interpreter is ~1000× slower than torch and computes bf16 wrongly: tests here use fp32 and
tiny shapes (the folder runs in well under a minute on 2 CPU cores).
"""

import os
import sys

import torch

# Only where no CUDA GPU is present: on a GPU host the compiled kernels run (the interpreter
# would also take over every other Triton use of the session, and computes bf16 wrongly).
# PCC_TRITON_COMPILED=0 forces the interpreter there, =1 forbids it anywhere.
_compiled = os.environ.get("PCC_TRITON_COMPILED", "1" if torch.cuda.is_available() else "0")
if _compiled != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("pcc_dist.kernels.pearson", "pcc_dist.kernels.infonce_jit",
                  "pcc_dist.kernels.infonce"):
        sys.modules.pop(_name, None)
