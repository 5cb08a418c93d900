"""LoRA on ZeRO-3 across the stage boundary, on 2 CPU ranks (gloo), in one spawned job:

* gradient checkpointing (non-reentrant, frozen base: fixed in DeepSpeed 0.19.3, PR #8148) gives
  the same LoRA gradients as the same engine with checkpointing switched off (negative control:
  another batch gives other gradients, so the comparison is not between zeros);
* the warm start of stage 2 reads each rank's own ZeRO-3 partition (DeepSpeed's whole-model
  fp32 rebuild is patched to fail) and restores exactly the checkpoint's adapters, weights only
  (negative control: one more step had moved them; the Adam moments are not touched);
* then the engine is released: weak references to its Adam moments, fp32 master partitions and
  weight partitions are dead (DeepSpeed 0.19.8 keeps the engine objects themselves reachable
  from C++, see pcc_dist.stage_memory; the memory is what matters).

One engine serves all three (each engine build costs seconds per rank).
"""

from __future__ import annotations

import gc
import json
import time
import weakref
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import save_tiny_model
from helpers.zero_spawn import REPO_ROOT, run_ranks

# The only default-suite cover of the stage handover and of checkpointing with LoRA on ZeRO-3:
# one 2-rank job (215-236 s measured under a load average of 6, hence the generous timeout).
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

W, B, SEED = 2, 3, 99
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn",
             "rain falls on the roof", "the sun is warm today", "we walk by the river"]


def worker(rank: int, world_size: int, args: dict) -> dict:
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_grad

    from pcc_dist.config import load_config
    from pcc_dist.engine import build_engine
    from pcc_dist.modeling import load_embedder

    cfg = load_config(None, [
        f"model.name_or_path={args['model']}", "model.mode=lora", "model.lora.r=4",
        "model.lora.alpha=8", "model.lora.dropout=0", "model.max_length=16",
        "model.gradient_checkpointing=true", f"stage1.global_batch_size={W * B}",
        "stage1.lr=0.05", "stage1.warmup_steps=0", "stage1.schedule=constant",
        f"train.deepspeed_config={args['ds_config']}"])
    torch.manual_seed(SEED)
    embedder = load_embedder(cfg.model, for_training=True)
    engine = build_engine(embedder, cfg, cfg.stage1, total_steps=4)
    hf_model = embedder.backbone.base_model.model  # under peft

    def loss_of(sentences):
        # A fixed direction: the embeddings are L2-normalised, so |e|^2 would have no gradient.
        direction = torch.linspace(-1.0, 1.0, embedder.embedding_dim)
        batch = embedder.tokenize(sentences[rank * B:(rank + 1) * B])
        return (engine(**batch).float() @ direction).sum()

    def lora_grads(sentences):
        engine.backward(loss_of(sentences), boundary=True)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
                 if p.requires_grad}
        engine.zero_grad()
        return grads

    started = time.perf_counter()
    out: dict = {"checkpointing_on": [bool(hf_model.is_gradient_checkpointing)]}
    with_ckpt = lora_grads(SENTENCES)
    # The same engine and weights without checkpointing (transformers 5 renamed the switch).
    (getattr(hf_model, "activation_checkpointing_disable", None)
     or hf_model.gradient_checkpointing_disable)()
    out["checkpointing_on"].append(bool(hf_model.is_gradient_checkpointing))
    without = lora_grads(SENTENCES)
    # Negative control: the same words in another order (other positions, other gradients).
    other = lora_grads([" ".join(reversed(x.split())) for x in SENTENCES])
    out["grad_max_diff"] = max((with_ckpt[n] - without[n]).abs().max().item() for n in without)
    out["grad_scale"] = max(g.abs().max().item() for g in without.values())
    out["control_diff"] = max((other[n] - without[n]).abs().max().item() for n in without)

    # Stage 1's last step and checkpoint; then one more step moves the weights away from it.
    engine.backward(loss_of(SENTENCES), boundary=True)
    engine.step()
    folder = Path(args["folder"])
    engine.save_checkpoint(folder)
    trained = engine.gathered_state_dict(trainable_only=True)
    engine.backward(loss_of(SENTENCES), boundary=True)
    engine.step()
    moved = engine.gathered_state_dict(trainable_only=True)
    opt = engine.deepspeed_engine.optimizer
    moments = [t.clone() for st in opt.optimizer.state.values() for t in st.values()
               if torch.is_tensor(t) and t.numel() > 1]

    # Warm start, with DeepSpeed's whole-model fp32 rebuild made to fail.
    import deepspeed.runtime.engine as ds_engine_module

    def no_full_rebuild(*_a, **_k):
        raise AssertionError("the whole fp32 model was rebuilt on this rank")

    ds_engine_module.get_fp32_state_dict_from_zero_checkpoint = no_full_rebuild
    engine.load_checkpoint(folder, module_only=True)
    loaded = engine.gathered_state_dict(trainable_only=True)
    if rank == 0:
        out["before_load_diff"] = max((moved[n] - trained[n]).abs().max().item() for n in trained)
        out["after_load_diff"] = max((loaded[n] - trained[n]).abs().max().item() for n in trained)
    after = [t for st in opt.optimizer.state.values() for t in st.values()
             if torch.is_tensor(t) and t.numel() > 1]
    out["moments_untouched"] = len(after) == len(moments) > 0 and all(
        torch.equal(a, b) for a, b in zip(after, moments, strict=True))
    engine.backward(loss_of(SENTENCES), boundary=True)
    result = engine.step()
    out["step_applied"] = not result.skipped and result.grad_norm > 0

    # Release: every large tensor of the engine and model is let go of.
    held = {"adam": after, "fp32_master": list(opt.fp32_partitioned_groups_flat),
            "weight_partitions": [p.ds_tensor for p in embedder.parameters()]}
    refs = {k: [weakref.ref(t) for t in v] for k, v in held.items()}
    out["held_tensors"] = {k: len(v) for k, v in refs.items()}
    del held, opt, after, moments, hf_model
    engine.release()
    engine = embedder = None  # the caller's references, as run_training drops them
    gc.collect()
    out["alive_after_release"] = {k: sum(r() is not None for r in v) for k, v in refs.items()}
    out["seconds"] = time.perf_counter() - started
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("handover")
    model = save_tiny_model(root / "llama", "llama")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every tensor sliced
    (root / "zero3.json").write_text(json.dumps(ds))
    args = {"model": str(model), "ds_config": str(root / "zero3.json"),
            "folder": str(root / "ckpt")}
    return run_ranks(f"{__file__}:worker", world_size=W, args=args, timeout=240)


def test_gradient_checkpointing_with_lora_on_zero3_gives_the_same_gradients(ranks):
    for out in ranks:
        assert out["checkpointing_on"] == [True, False]
        assert out["grad_scale"] > 1e-4
        assert out["grad_max_diff"] <= 1e-6 * out["grad_scale"]
        assert out["control_diff"] > 1e-2 * out["grad_scale"]


def test_stage1_engine_memory_is_freed(ranks):
    for out in ranks:
        assert all(count > 0 for count in out["held_tensors"].values())
        assert out["alive_after_release"] == {k: 0 for k in out["held_tensors"]}


def test_stage2_warm_start_loads_the_rank_shards_exactly_and_weights_only(ranks):
    assert ranks[0]["before_load_diff"] > 1e-3
    assert ranks[0]["after_load_diff"] == 0.0
    # Weights only: the optimizer state is not read (a new stage builds a fresh one anyway).
    assert all(out["moments_untouched"] for out in ranks)
    assert all(out["step_applied"] for out in ranks)
