"""QLoRA under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo): the NF4 base stays frozen, adapters learn.

Draft: experiment harness.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_models import WORDS, save_tiny_model  # noqa: E402
from _zero_spawn import REPO_ROOT, run_ranks  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

W = 2
B = 4
C = 3
STEPS = 8


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).clone()


def worker(rank: int, world_size: int, args: dict) -> dict:
    torch.set_num_threads(1)
    global LOG
    LOG = []
    import random

    import deepspeed
    import torch.distributed as dist

    from pcc_dist.config import load_config
    from pcc_dist.engine import build_engine
    from pcc_dist.gradcache import GradCache
    from pcc_dist.losses import PearsonLoss
    from pcc_dist.modeling import load_embedder

    t0 = time.time()
    cfg = load_config(None, [
        f"model.name_or_path={args['model']}",
        "model.mode=qlora",
        f"model.dtype={args['dtype']}",
        f"model.qlora.compute_dtype={args['dtype']}",
        "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.05",
        "model.max_length=16",
        f"stage2.global_batch_size={W * B}",
        f"stage2.gradcache_chunk_size={C}",
        f"stage2.lr={args['lr']}",
        "stage2.warmup_steps=0",
        "stage2.schedule=constant",
        "loss.kernel=torch",
        f"train.deepspeed_config={args['ds_config']}",
    ])
    embedder = load_embedder(cfg.model, for_training=True)
    q = {n: (type(p).__name__, p.dtype, tuple(p.shape), p.requires_grad)
         for n, p in embedder.named_parameters() if "base_layer" in n}
    before = {n: _bytes(p) for n, p in embedder.named_parameters() if "base_layer" in n}
    LOG.append(repr(("loaded", time.time() - t0, list(q.items())[:2])))
    engine = build_engine(embedder, cfg, cfg.stage2, total_steps=STEPS)
    LOG.append(repr(("engine", time.time() - t0)))
    for n, p in list(engine.module.named_parameters())[:6]:
        LOG.append(repr((n, type(p).__name__, p.shape, getattr(p, "ds_shape", None),
              getattr(p, "ds_status", None), p.requires_grad,
              getattr(p, "quant_state", "noqs") is not None)))
    rng = random.Random(3)
    n = W * B
    a = [" ".join(rng.choice(WORDS[15:60]) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    b = [" ".join(rng.choice(WORDS[15:60]) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    s = [rng.uniform(0, 5) for _ in range(n)]
    rows = slice(rank * B, (rank + 1) * B)
    views = [embedder.tokenize(a[rows]), embedder.tokenize(b[rows])]
    scores = torch.tensor(s[rows])
    loss_mod = PearsonLoss(kernel="torch")
    engine.train()
    losses = []
    for step in range(STEPS):
        torch.manual_seed(100 + rank)
        losses.append(GradCache(engine, C).run(engine.module, views,
                                               lambda e: loss_mod(e[0], e[1], scores)))
        r = engine.step()
        LOG.append(repr(("step", step, losses[-1], r, time.time() - t0)))
    after = {}
    for name, p in engine.module.named_parameters():
        if "base_layer" in name:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                after[name] = _bytes(p)
    same = {k: torch.equal(before[k], after[k]) for k in before}
    LOG.append(repr(("same", all(same.values()), len(same))))
    dist.barrier()
    dist.destroy_process_group()
    return {"losses": losses, "log": LOG}


def test_draft(tmp_path):
    model = save_tiny_model(tmp_path / "llama", "llama")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ds))
    out = run_ranks(f"{__file__}:worker", world_size=W,
                    args={"model": str(model), "ds_config": str(path), "lr": 1e-2,
                          "dtype": os.environ.get("QDT", "fp32")}, timeout=280)
    for line in out[0]["log"]:
        print(line)
    print(out[0]["losses"])
