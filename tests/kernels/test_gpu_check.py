"""`make gpu-check`'s kernel section, run on CPU under the interpreter at tiny shapes: the script
that the only GPU run of a session depends on must not fail on its own logic there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check  # noqa: E402


def test_kernel_section_passes_at_tiny_shapes():
    # 5 anchors against two blocks of 40 candidates: the planner's split-D mode under the H100
    # target (both modes are compared with the reference in test_infonce_kernel.py; this test is
    # about the script's own wiring: per-anchor cores, gradients, the error measure).
    result = gpu_check.check_kernels("cpu", {"tiny": (5, 40, 24)}, {"tiny": (9, 20)}, ("fp32",))
    rows = result["rows"]
    assert [(r["loss"], r["dtype"]) for r in rows] == [("infonce", "fp32"), ("pearson", "fp32")]
    assert all(0 <= r["max_rel_error"] <= 1e-5 for r in rows)


def test_kernel_section_reports_a_wrong_kernel(monkeypatch):
    """Negative control: a kernel that returns twice the loss fails the section."""
    from pcc_dist.kernels.infonce import InfoNCETritonFunction

    original = InfoNCETritonFunction.apply
    monkeypatch.setattr(InfoNCETritonFunction, "apply", lambda *a: 2 * original(*a))
    with pytest.raises(AssertionError, match="beyond tolerance"):
        gpu_check.check_kernels("cpu", {"tiny": (5, 40, 24)}, {}, ("fp32",))
