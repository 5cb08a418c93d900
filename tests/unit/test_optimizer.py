"""The optimizer pcc_dist builds for ``train.optimizer=adamw_torch``: torch's fused AdamW, the
same update as the element-wise (for-loop) AdamW up to float rounding."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pcc_dist.config import load_config
from pcc_dist.optim import build_optimizer


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, grads: list[list[torch.Tensor]]):
    for step_grads in grads:
        for param, grad in zip(model.parameters(), step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adamw_torch_is_fused_and_takes_the_elementwise_update():
    cfg = load_config(None, ["stage2.lr=1e-2", "stage2.weight_decay=0.1"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8))
    reference = copy.deepcopy(model)
    fused = build_optimizer(model, cfg, cfg.stage2, {"zero_optimization": {"stage": 1}})
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    groups = [{"params": [p for p in reference.parameters() if p.dim() >= 2],
               "weight_decay": 0.1},
              {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    loop = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    start = [p.detach().clone() for p in reference.parameters()]
    other = copy.deepcopy(reference)
    got, want = _steps(model, fused, grads), _steps(reference, loop, grads)
    for g, w, s in zip(got, want, start, strict=True):
        assert not torch.equal(w, s)  # the steps moved the weights
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-7)
    # Negative control: another learning rate is seen by the same comparison.
    slower = torch.optim.AdamW(other.parameters(), lr=5e-3, fused=True)
    moved = _steps(other, slower, grads)
    assert not all(torch.allclose(m, w, rtol=1e-6, atol=1e-7) for m, w in zip(moved, want,
                                                                               strict=True))
