"""One rank trains at ZeRO-1 (pcc_dist.single_rank) and its checkpoints cross ZeRO stages.

One spawned 1-rank job, a full-parameter tiny BERT (two optimizer groups: weight decay on
matrices, none on biases and norms, the layout that broke DeepSpeed's lazily linked optimizer
state views): the default engine must be ZeRO-1 and step, save (portable copy included), and
that checkpoint must load into a ZeRO-3 engine (``train.single_rank_keep_zero=true``) through
the portable copy with every fp32 weight and Adam moment bitwise as saved. The 1-rank ZeRO-1 ->
2-rank ZeRO-3 resume of a whole run is tests/reliability/test_resume_world_size.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers.zero_spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _engine(keep_zero: bool, seed: int):
    from helpers.tiny_models import tiny_model, word_tokenizer

    from pcc_dist.config import load_config
    from pcc_dist.engine import build_engine
    from pcc_dist.modeling import Embedder

    tokenizer = word_tokenizer("encoder")
    embedder = Embedder(tiny_model("bert", tokenizer, seed=seed), tokenizer, kind="encoder",
                        pooling="mean", max_length=16)
    cfg = load_config(None, ["stage2.global_batch_size=4", "stage2.warmup_steps=0",
                             "stage2.weight_decay=0.01",
                             f"train.single_rank_keep_zero={str(keep_zero).lower()}"])
    return build_engine(embedder, cfg, cfg.stage2, total_steps=5), embedder


def _full_state(engine, moments: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pcc_dist.portable_state import link_state_fragments

    link_state_fragments(engine.deepspeed_engine)
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    out = {"params": {n: safe_get_full_fp32_param(p).clone() for n, p in params}}
    if moments:  # a fresh engine has none before its first step
        out["exp_avg_sq"] = {n: safe_get_full_optimizer_state(p, "exp_avg_sq").clone()
                             for n, p in params}
    return out


def worker(rank: int, world_size: int, args: dict) -> dict:
    torch.set_num_threads(1)
    engine, embedder = _engine(keep_zero=False, seed=0)
    stage_default = engine.zero_stage
    for _ in range(2):
        batch = embedder.tokenize(["a b c", "d e", "f g h i", "j"])
        engine.backward(engine(**batch).pow(2).sum(), boundary=True)
        engine.step()
    engine.save_checkpoint(args["folder"])
    saved = _full_state(engine)

    zero3, _ = _engine(keep_zero=True, seed=1)  # other initial weights: the load must move them
    before = _full_state(zero3, moments=False)
    zero3.load_checkpoint(args["folder"])
    return {"stage_default": stage_default, "stage_kept": zero3.zero_stage, "saved": saved,
            "loaded": _full_state(zero3), "before": before}


def test_one_rank_zero1_checkpoint_loads_into_zero3_exactly(tmp_path):
    (out,) = run_ranks(f"{__file__}:worker", world_size=1,
                       args={"folder": str(tmp_path / "ckpt")})
    assert (out["stage_default"], out["stage_kept"]) == (1, 3)
    assert (tmp_path / "ckpt" / "portable_state.pt").is_file()
    for kind in ("params", "exp_avg_sq"):
        saved, loaded = out["saved"][kind], out["loaded"][kind]
        assert set(saved) == set(loaded) and len(saved) > 10
        assert all(torch.equal(saved[n], loaded[n]) for n in saved), kind
    # Negative control: before the load the ZeRO-3 engine held other weights and no moments
    # equal to the saved ones, so the equality above is the load's doing.
    assert not any(torch.equal(out["saved"]["params"][n], out["before"]["params"][n])
                   for n in out["saved"]["params"] if "weight" in n and "LayerNorm" not in n)
