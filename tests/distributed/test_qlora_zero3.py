"""QLoRA under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo): the NF4 base stays frozen, adapters learn.

One spawned 2-rank job per ``model.dtype`` (fp32, bf16; compute dtype the same) loads a tiny
Llama (saved with ``save_tiny_model``) through :func:`pcc_dist.modeling.load_embedder` with
``model.mode=qlora`` (bitsandbytes NF4, double quant, packed weights stored in ``model.dtype``;
LoRA r=4, dropout 0.05 on every linear layer), wraps it with :func:`pcc_dist.engine.build_engine`
(ZeRO-3, every tensor partitioned) and trains stage 2 (Pearson loss on fixed synthetic scored
pairs) with the gradient cache (chunk C=2 < B=5 rows per rank): 3 steps at lr=0, then 8 at 1e-2.

Why each check exists:

* ZeRO-3 partitions the packed 4-bit weights like any tensor (flat byte copies of ``Params4bit``
  data; the ``quant_state`` with the NF4 scales stays on the parameter object, unpartitioned). The
  forward through the engine must therefore equal the forward of the same model before DeepSpeed
  touched it; flipping packed bytes through ``GatheredParameters(modifier_rank=0)`` must change both
  the gathered bytes and that forward (negative control: the checks read the real partitions).
  The forward runs in eval mode without autograd, the case where bitsandbytes' AVX512-BF16 CPU
  path would repack the gathered bytes in place and flag the shared quant_state (measured: the
  next ``state_dict`` then fails in ``_convert_weight_packed_for_cpu_inverse``); load_embedder
  turns that path off, and this forward keeps it off.
* Training must leave every packed byte and every quantisation constant as loaded, and move every
  LoRA tensor (read gathered: under ZeRO-3 a rank holds only a slice).
* The batch and the dropout masks are the same at every step (fixed rows, RNG re-seeded), so the
  loss is a deterministic function of the adapters: it must drop with lr=1e-2 and stay exactly
  constant with lr=0 (negative control on the same engine: nothing else, such as dropout, makes
  it move; the config refuses lr=0, so the test sets it on the built optimizer and schedule).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers.tiny_models import WORDS, save_tiny_model
from helpers.zero_spawn import REPO_ROOT, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

W = 2  # ranks
B = 5  # pairs per rank (N = 10)
C = 2  # gradient-cache chunk < B: chunks of 2, 2, 1 rows per view
STEPS = 8
CONTROL_STEPS = 3  # lr = 0 steps before the real ones
LR = 1e-2
SEED = 1234  # model init (LoRA A) on every rank; dropout uses SEED + 1 + rank at every step
N_LAYERS, N_PROJ = 2, 7  # tiny Llama: q, k, v, o, gate, up, down per layer
FLIPPED = "backbone.base_model.model.layers.1.mlp.down_proj.base_layer.weight"


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    # Packed NF4 nibbles stored as fp32/bf16 hold arbitrary bit patterns (NaNs, -0.0): compare
    # raw bytes, never float values.
    return tensor.detach().contiguous().view(torch.uint8).clone()


def _quant_constants(module) -> dict[str, torch.Tensor]:
    """Every tensor of a Linear4bit's quant_state (absmax, nested absmax, code, offset, ...)."""
    state = module.weight.quant_state.as_dict(packed=True)
    return {k: _bytes(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _pairs() -> tuple[list[str], list[str], list[float]]:
    """N = W*B fixed synthetic scored pairs; rank r owns rows [r*B, (r+1)*B)."""
    rng = random.Random(3)
    n = W * B

    def sentence() -> str:
        return " ".join(rng.choice(WORDS[15:60]) for _ in range(rng.randint(2, 6)))

    a = [sentence() for _ in range(n)]
    b = [sentence() for _ in range(n)]
    return a, b, [rng.uniform(0.0, 5.0) for _ in range(n)]


# -- the 2-rank job ------------------------------------------------------------------------------


def worker(rank: int, world_size: int, args: dict) -> dict:
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from bitsandbytes.nn import Linear4bit, Params4bit

    from pcc_dist.config import load_config
    from pcc_dist.engine import build_engine
    from pcc_dist.gradcache import GradCache
    from pcc_dist.losses import PearsonLoss
    from pcc_dist.modeling import load_embedder

    dtype = args["dtype"]
    cfg = load_config(
        None,
        [
            f"model.name_or_path={args['model']}",
            "model.mode=qlora",
            f"model.dtype={dtype}",
            f"model.qlora.compute_dtype={dtype}",
            "model.qlora.double_quant=true",
            "model.lora.r=4",
            "model.lora.alpha=8",
            "model.lora.dropout=0.05",
            "model.max_length=16",
            f"stage2.global_batch_size={W * B}",
            f"stage2.gradcache_chunk_size={C}",
            f"stage2.lr={LR}",
            "stage2.warmup_steps=0",
            "stage2.schedule=constant",
            "loss.kernel=torch",
            f"train.deepspeed_config={args['ds_config']}",
        ],
    )
    # Same LoRA init on every rank and in every run (DeepSpeed broadcasts rank 0's values anyway).
    torch.manual_seed(SEED)
    embedder = load_embedder(cfg.model, for_training=True)
    q4 = {n: m for n, m in embedder.named_modules() if isinstance(m, Linear4bit)}
    packed_before = {f"{n}.weight": _bytes(m.weight) for n, m in q4.items()}
    consts_before = {n: _quant_constants(m) for n, m in q4.items()}
    lora_before = {n: p.detach().clone() for n, p in embedder.named_parameters() if "lora_" in n}

    a, b, scores = _pairs()
    rows = slice(rank * B, (rank + 1) * B)
    views = [embedder.tokenize(a[rows]), embedder.tokenize(b[rows])]
    labels = torch.tensor(scores[rows])
    with torch.no_grad():
        reference = embedder.eval()(**views[0]).float()  # no DeepSpeed yet

    engine = build_engine(embedder, cfg, cfg.stage2, total_steps=STEPS)
    params = dict(engine.module.named_parameters())
    out: dict = {
        "n_linear4bit": len(q4),
        "base_params4bit": all(
            isinstance(params[n], Params4bit) and params[n].quant_state is not None
            for n in packed_before
        ),
        "base_frozen": not any(params[n].requires_grad for n in packed_before),
        "trainable": sorted(n for n, p in params.items() if p.requires_grad),
        "lora_names": sorted(lora_before),
        # Every tensor sliced over the ranks (a rank holds ds_tensor, a part of ds_numel).
        "partitioned": all(p.ds_tensor.numel() < p.ds_numel for p in params.values()),
        "storage_dtype": str(params[next(iter(packed_before))].dtype),
    }

    def gathered_bytes(name: str) -> torch.Tensor:
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
            return _bytes(params[name])

    def engine_forward() -> torch.Tensor:
        engine.eval()
        with torch.no_grad():
            return engine(**views[0]).float()

    # The sharded NF4 model computes what the unsharded one did.
    out["forward_rel"] = float((engine_forward() - reference).norm() / reference.norm())

    # Negative control: flip packed bytes on rank 0 and broadcast (modifier_rank=0); the gathered
    # bytes and the forward must see it on every rank. Then flip back (XOR is its own inverse).
    def flip() -> None:
        with deepspeed.zero.GatheredParameters([params[FLIPPED]], modifier_rank=0):
            if rank == 0:
                params[FLIPPED].data.view(torch.uint8)[:64] ^= 0xFF

    flip()
    out["flip_seen_in_bytes"] = not torch.equal(gathered_bytes(FLIPPED), packed_before[FLIPPED])
    out["flip_forward_rel"] = float((engine_forward() - reference).norm() / reference.norm())
    flip()
    out["unflip_restores"] = torch.equal(gathered_bytes(FLIPPED), packed_before[FLIPPED])

    loss_module = PearsonLoss(kernel="torch")
    ds_engine = engine.deepspeed_engine

    def set_lr(value: float) -> None:
        # The config refuses lr=0, so the control sets it on the built engine: now (the param
        # groups) and for the following steps (LambdaLR's base values; the schedule is constant).
        ds_engine.lr_scheduler.base_lrs = [value] * len(ds_engine.lr_scheduler.base_lrs)
        for group in ds_engine.optimizer.param_groups:
            group["lr"] = value

    def train(steps: int, lr: float) -> tuple[list[float], list]:
        set_lr(lr)
        engine.train()
        losses, results = [], []
        for _ in range(steps):
            torch.manual_seed(SEED + 1 + rank)  # the same dropout masks at every step
            losses.append(
                GradCache(engine, C).run(
                    engine.module, views, lambda e: loss_module(e[0], e[1], labels)
                )
            )
            results.append(engine.step())
        return losses, results

    # Negative control first, on the same engine, batch and masks: only the lr differs.
    out["control_losses"], out["control_steps"] = train(CONTROL_STEPS, 0.0)
    lora_control = engine.gathered_state_dict(trainable_only=True)  # rank 0 only
    out["losses"], out["steps"] = train(STEPS, LR)

    out["packed_unchanged"] = {
        n: torch.equal(gathered_bytes(n), before) for n, before in packed_before.items()
    }
    out["constants_unchanged"] = {
        n: all(torch.equal(v, consts_before[n][k]) for k, v in _quant_constants(m).items())
        for n, m in q4.items()
    }
    lora_after = engine.gathered_state_dict(trainable_only=True)  # rank 0 only
    if rank == 0:
        out["lora_control_unchanged"] = all(
            torch.equal(lora_control[n], before) for n, before in lora_before.items()
        )
        out["lora_after_keys"] = sorted(lora_after)
        out["lora_changed"] = {
            n: not torch.equal(lora_after[n], before) for n, before in lora_before.items()
        }
    dist.barrier()
    dist.destroy_process_group()
    return out


# -- the parent ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run (and cache) one 2-rank job per dtype."""
    root = tmp_path_factory.mktemp("qlora_zero3")
    model = save_tiny_model(root / "llama", "llama")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    # Every tensor partitioned: with the default threshold (1e5 elements) all of this tiny
    # model's tensors would stay whole on every rank and the test would not exercise ZeRO-3.
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_path = root / "zero3.json"
    ds_path.write_text(json.dumps(ds))
    cache: dict[str, list[dict]] = {}

    def run(dtype: str) -> list[dict]:
        if dtype not in cache:
            args = {"model": str(model), "ds_config": str(ds_path), "dtype": dtype}
            cache[dtype] = run_ranks(f"{__file__}:worker", world_size=W, args=args, timeout=240)
        return cache[dtype]

    return run


# fp32 is slow (its own 2-rank job): bf16 is what QLoRA runs use, and every assertion below is
# the same for both; `make test-slow` runs fp32 too.
DTYPES = [pytest.param("fp32", marks=pytest.mark.slow), "bf16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_base_is_nf4_frozen_and_sharded(job, dtype):
    for r in job(dtype):
        assert r["n_linear4bit"] == N_LAYERS * N_PROJ
        assert r["base_params4bit"] and r["base_frozen"]
        assert r["trainable"] == r["lora_names"]
        assert len(r["trainable"]) == 2 * N_LAYERS * N_PROJ  # lora_A and lora_B per projection
        assert r["partitioned"]
        # quant_storage_dtype "auto" follows model.dtype.
        assert r["storage_dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_forward_equals_unsharded_and_flipped_bytes_are_seen(job, dtype):
    for r in job(dtype):
        assert r["forward_rel"] <= 1e-6, r["forward_rel"]
        assert r["flip_seen_in_bytes"] and r["unflip_restores"]
        assert r["flip_forward_rel"] > 1e-3, r["flip_forward_rel"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_keeps_base_bytes_and_changes_adapters(job, dtype):
    rank0, rank1 = job(dtype)
    for r in (rank0, rank1):
        assert r["packed_unchanged"] and all(r["packed_unchanged"].values()), r["packed_unchanged"]
        assert all(r["constants_unchanged"].values()), r["constants_unchanged"]
    assert rank0["lora_after_keys"] == rank0["lora_names"]
    unchanged = [n for n, moved in rank0["lora_changed"].items() if not moved]
    assert not unchanged, f"adapters not updated: {unchanged}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_decreases(job, dtype):
    rank0, rank1 = job(dtype)
    losses = rank0["losses"]
    assert losses == pytest.approx(rank1["losses"], rel=1e-6)  # one global Pearson loss
    for step in rank0["steps"]:
        assert not step.skipped and step.lr == pytest.approx(LR) and step.grad_norm > 0
    # A fixed batch with fixed masks: the drop is the optimiser's doing (control below).
    assert sum(losses[-2:]) / 2 < 0.5 * losses[0], losses


@pytest.mark.parametrize("dtype", DTYPES)
def test_lr0_control_adapters_and_loss_do_not_move(job, dtype):
    rank0, rank1 = job(dtype)
    assert rank0["lora_control_unchanged"]
    for r in (rank0, rank1):
        # Gradients did flow; only the learning rate was 0.
        assert all(s.grad_norm > 0 and not s.skipped and s.lr == 0.0 for s in r["control_steps"])
        assert r["control_losses"] == [r["control_losses"][0]] * CONTROL_STEPS, r["control_losses"]
        # Same adapters, batch and masks: the first real step starts from the same loss.
        assert r["losses"][0] == r["control_losses"][0]
