"""Where one-rank ZeRO stages part ways: losses, gradients and weights, step by step.

One process, one rank, the tiny LoRA Llama of the tests (``tests/distributed/
test_gradcache_zero3.py``: 2 layers, width 64, LoRA r=4, random non-zero B), the same Pearson
batch every step through the gradient cache (chunk 2), torch AdamW, lr 1e-3, clipping at 1.0.
For each ZeRO stage in ``--stages`` a fresh engine (``train.single_rank_keep_zero=true``, so the
stage is the JSON's) trains ``--steps`` steps from the same weights and RNG state; recorded per
step: the loss, the global gradient norm, the full fp32 gradient before the step and the fp32
master weights after it (``deepspeed.utils.safe_get_full_*``). The JSON then gives, against the
first stage, the largest loss difference and the first step at which gradients (before any
update differs, a forward/backward difference) or weights (an optimizer-path difference) stop
being bitwise equal.

Usage:
    python benchmarks/zero_stage_drift.py [--stages 0 1 3] [--steps 6] [--dropout 0.0] [--chunk 2]

Writes ``benchmarks/results/zero_stage_drift.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "distributed"))

import torch  # noqa: E402
from _common import REPO_ROOT, machine_facts, write_result  # noqa: E402


def _ds_json(stage: int, folder: Path) -> str:
    raw = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    if stage != 3:
        raw["zero_optimization"] = {"stage": stage}
    path = folder / f"zero{stage}.json"
    path.write_text(json.dumps(raw))
    return str(path)


def train(stage: int, steps: int, dropout: float, chunk: int, folder: Path) -> list[dict]:
    """``steps`` optimizer steps at ZeRO ``stage``; per step loss, norm, grads and weights."""
    import test_gradcache_zero3 as tg
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from pcc_dist.config import load_config
    from pcc_dist.engine import build_engine
    from pcc_dist.gradcache import GradCache

    cfg = load_config(None, [f"stage2.global_batch_size={tg.B}", "stage2.warmup_steps=0",
                             "stage2.lr=1e-3", "stage2.grad_clip=1.0",
                             f"train.deepspeed_config={_ds_json(stage, folder)}",
                             "train.single_rank_keep_zero=true"])
    embedder = tg.build_embedder()
    for module in embedder.modules():  # LoRA dropout p (0: no masks to draw)
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    engine = build_engine(embedder, cfg, cfg.stage2, total_steps=steps)
    engine.train()
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    views, scores = tg.rank_views(embedder, "pearson", 0)
    loss_fn = tg.make_loss_fn("pearson", scores)
    torch.manual_seed(tg.RNG_SEED)
    rows = []
    for _ in range(steps):
        # chunk 0: one forward with autograd and one backward per step (no cache)
        loss = GradCache(engine, chunk).run(engine.module, views, loss_fn)
        # Without ZeRO the gradient and the fp32 weight are the parameter's own.
        grads = {n: (p.grad if stage == 0 else safe_get_full_grad(p)).detach().clone()
                 for n, p in trainable}
        result = engine.step()
        weights = {n: (p if stage == 0 else safe_get_full_fp32_param(p)).detach().float().clone()
                   for n, p in trainable}
        rows.append({"loss": float(loss), "grad_norm": result.grad_norm, "grads": grads,
                     "weights": weights})
    return rows


def _rel(a: dict, b: dict) -> dict[str, float]:
    """Relative L2 difference per tensor name."""
    return {k: float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a}


def _max_rel(a: dict, b: dict) -> float:
    return max(_rel(a, b).values())


def compare(runs: dict[int, list[dict]]) -> dict:
    """Every stage against the first: per step loss difference, gradient and weight drift."""
    first, *others = runs
    out = {}
    for stage in others:
        per_step = []
        for ref, got in zip(runs[first], runs[stage], strict=True):
            per_step.append({"loss_diff": got["loss"] - ref["loss"],
                             "grad_norm_diff": got["grad_norm"] - ref["grad_norm"],
                             "grads_max_rel": _max_rel(got["grads"], ref["grads"]),
                             "weights_max_rel": _max_rel(got["weights"], ref["weights"]),
                             "grads_differing": sorted(n for n, v in _rel(got["grads"],
                                                                          ref["grads"]).items()
                                                       if v > 0)})
        first_grad = next((i + 1 for i, s in enumerate(per_step) if s["grads_max_rel"] > 0), None)
        first_weight = next((i + 1 for i, s in enumerate(per_step) if s["weights_max_rel"] > 0),
                            None)
        out[f"zero{stage}_vs_zero{first}"] = {
            "max_abs_loss_diff": max(abs(s["loss_diff"]) for s in per_step),
            "first_step_grads_differ": first_grad, "first_step_weights_differ": first_weight,
            "steps": per_step}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", type=int, default=[0, 1, 3], choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--chunk", type=int, default=2, help="gradient-cache chunk (0 = off)")
    parser.add_argument("--out", default="zero_stage_drift")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {s: train(s, args.steps, args.dropout, args.chunk, Path(tmp)) for s in args.stages}
    document = {"benchmark": "zero_stage_drift", "machine": machine_facts(),
                "setup": vars(args), "losses": {s: [r["loss"] for r in rows]
                                                for s, rows in runs.items()},
                "comparisons": compare(runs)}
    path = write_result(args.out, document)
    for name, c in document["comparisons"].items():
        print(f"{name}: max |loss diff| {c['max_abs_loss_diff']:.3g}; gradients first differ at "
              f"step {c['first_step_grads_differ']}, weights at {c['first_step_weights_differ']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
