"""`make gpu-check`'s kernel section, run on CPU under the interpreter at tiny shapes: the script
that the only GPU run of a session depends on must not fail on its own logic there."""

from __future__ import annotations

import pytest
from helpers import load_benchmark

gpu_check = load_benchmark("gpu_check")


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


@pytest.mark.parametrize("mode", sorted(gpu_check.TRAINING_RUNS))
def test_training_commands_are_a_valid_run_and_a_cuda_evaluation(tmp_path, mode):
    """The training section's commands, checked here with the parsers they will meet: the train
    command's config + overrides load (LoRA/QLoRA, bf16, checkpointing, ZeRO-3), and pcc-eval's
    arguments parse with the device forced to CUDA."""
    from pcc_dist.config import load_config
    from pcc_dist.ds_config import find_ds_config
    from pcc_dist.eval_cli import _parser

    commands = gpu_check.training_commands(tmp_path, tmp_path / "llama", mode, 2)
    train = commands["train"]
    assert train[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "1"]
    at = train.index("--config")
    cfg = load_config(train[at + 1], train[at + 2:])
    assert (cfg.model.mode, cfg.model.dtype, cfg.model.gradient_checkpointing) == (mode, "bf16",
                                                                                    True)
    assert '"stage": 3' in find_ds_config(cfg.train.deepspeed_config).read_text()
    assert cfg.stage1.enabled and cfg.stage2.enabled and cfg.stage2.max_steps == 2
    args = _parser().parse_args(commands["eval"][3:])
    assert args.device == "cuda" and args.model == str(tmp_path / f"run_{mode}" / "model")
