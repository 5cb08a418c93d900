"""Gradient cache under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), with LoRA dropout 0.05 active.

One spawned 2-rank job (real ``deepspeed.initialize`` through :func:`pcc_dist.engine.build_engine`,
every parameter partitioned) runs, for InfoNCE with hard negatives and for Pearson, one micro batch
of B = 5 examples per rank (N = 10) in four ways and reads the full parameter gradients with
``deepspeed.utils.safe_get_full_grad`` before any optimizer step:

* ``cache``: :class:`GradCache` with chunk C = 2 < B (length-sorted chunks of 2, 2, 1 rows per
  view, each trimmed to its longest row);
* ``no_cache``: the plain path (one backward) with length groups of C rows: the same chunks
  embedded with autograd, so the dropout masks are drawn in the same order from the same state;
* ``no_replay``: the cache with RNG replay off (negative control: masks differ, gradients differ);
* ``perturbed``: the cache with one token of rank 0's input changed (negative control).

The parent process computes the oracle: one process, no DeepSpeed, the same loss on the union batch
of 2B examples, each rank's rows embedded from that rank's RNG state (same masks). Then the job
takes real steps: a normal one, one where rank 1 alone sees a non-finite loss (every rank must
skip it), and a normal one again. Two lighter jobs check the cache against the oracle under the
other shipped configs (ZeRO-3 with CPU offload, ZeRO-2).

Length-sorted chunks against the unsorted path (dropout off, since sorting changes which row gets
which mask), on the decoder (left padding) and on a tiny BERT encoder (right padding), each loss:
``sorted`` with the cache on (C = 3) and off (``plain``: groups of C rows), each against the
``unsorted`` reference (one untrimmed forward per view; the cache's own equality to it is pinned
above), ``skip`` (C = B: one chunk per view, the cache is skipped, forwards counted), and the
negative control ``wrong``: the inverse permutation skipped (cache on and off).
"""

from __future__ import annotations

import contextlib
import json
import math
import random

import pytest
import torch
from helpers.tiny_models import WORDS, tiny_model, word_tokenizer
from helpers.zero_spawn import REPO_ROOT, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(360)]

W = 2  # ranks
B = 5  # examples per rank
C = 2  # chunk: 5 rows -> ceil(5 / 2) = 3 chunks of 2, 2, 1
LOSSES = ("infonce", "pearson")
SCENARIOS = ("cache", "no_cache", "no_replay", "perturbed")
RNG_SEED = 1000  # rank r starts every scenario from torch.manual_seed(RNG_SEED + r)
# 1e-5 relative (L2 over each parameter tensor): fp32 sums reordered by the reduce-scatter and the
# chunking differ from the oracle by ~1e-7; a missing dropout replay changes gradients by >1e-2.
RTOL = 1e-5
CONTROL_MIN_DIFF = 1e-3


# -- shared by the ranks and the oracle ----------------------------------------------------------


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS[:60]) for _ in range(rng.randint(2, 7)))


def global_batch() -> dict[str, list]:
    """N = W*B rows of each view; rank r owns rows [r*B, (r+1)*B)."""
    rng = random.Random(7)
    n = W * B
    return {
        "anchor": [_sentence(rng) for _ in range(n)],
        "positive": [_sentence(rng) for _ in range(n)],
        "negative": [_sentence(rng) for _ in range(n)],
        "a": [_sentence(rng) for _ in range(n)],
        "b": [_sentence(rng) for _ in range(n)],
        "score": [rng.uniform(0.0, 5.0) for _ in range(n)],
    }


def build_embedder():
    """Tiny Llama (2 layers, width 64) + LoRA r=4 with dropout 0.05, random (non-zero) B."""
    import peft

    from pcc_dist.modeling import Embedder

    tokenizer = word_tokenizer("decoder")
    backbone = tiny_model("llama", tokenizer, seed=0)
    torch.manual_seed(1)
    # init_lora_weights=False: LoRA B starts random, not zero, so dL/dA is not identically zero
    # and the comparison cannot pass on two zero tensors.
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.05,
        init_lora_weights=False,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    backbone = peft.get_peft_model(backbone, config)
    return Embedder(backbone, tokenizer, kind="decoder", pooling="last", max_length=16)


def rank_views(embedder, loss: str, rank: int, perturb: bool = False):
    """Token batches of ``rank``'s rows and, for Pearson, its gold scores."""
    batch = global_batch()
    rows = slice(rank * B, (rank + 1) * B)
    names = ("anchor", "positive", "negative") if loss == "infonce" else ("a", "b")
    views = [embedder.tokenize(batch[name][rows]) for name in names]
    if perturb:
        ids = views[0]["input_ids"].clone()
        ids[0, -1] = (ids[0, -1] + 7) % len(embedder.tokenizer)
        views[0] = dict(views[0], input_ids=ids)
    scores = torch.tensor(batch["score"][rows]) if loss == "pearson" else None
    return views, scores


def make_loss_fn(loss: str, scores):
    from pcc_dist.losses import InfoNCELoss, PearsonLoss

    if loss == "infonce":
        module = InfoNCELoss(temperature=0.05, kernel="torch")
        return lambda e: module(e[0], e[1], e[2])
    module = PearsonLoss(kernel="torch")
    return lambda e: module(e[0], e[1], scores)


def embed_in_chunks(embed, views: list[dict]) -> list[torch.Tensor]:
    """The views embedded as GradCache does: their rows pooled, ceil(N / C) length-sorted
    chunks, input order back, split per view (so each rank's dropout masks are replayed)."""
    from pcc_dist.length_chunks import plan_chunks, pool_views

    pooled = pool_views(views)
    plan = plan_chunks(pooled.view, math.ceil(len(views) * B / C))
    stacked = torch.cat([embed(**plan.take(pooled.view, k)) for k in range(len(plan.rows))])
    return pooled.split(plan.restore(stacked))


EXACT = ("sorted_cache", "sorted_plain", "unsorted_plain", "skip", "wrong_cache", "wrong_plain")
EXACT_C = 3  # 5 rows -> chunks of 3 and 2 (fewer ZeRO-3 forwards than C = 2, still sorted)
# Sorted vs unsorted is the same arithmetic on rows grouped and trimmed differently: fp32 sums in
# another order. Measured on this job with C = 2 (L2 over each tensor): median 0.6-1.2e-6, max
# 3.1e-6; two equivalent *unsorted* orderings (cache vs plain) already differ by up to 2.2e-6 on
# the encoder, so 1e-6 is below fp32's floor here. A skipped un-permutation moves them > 1e-3.
EXACT_RTOL = 1e-5
# The same comparison on the scale the optimizer sees (the global norm it clips by): each tensor's
# difference over the L2 norm of the whole gradient, the 1e-6. Measured max 6.8e-7
# (decoder, Pearson; 2.4-3.1e-7 for the others); a skipped un-permutation: > 1e-3.
EXACT_RTOL_OF_WHOLE = 1e-6


def build_encoder():
    """Tiny BERT (right padding), mean pooling, fully trainable."""
    from pcc_dist.modeling import Embedder

    tokenizer = word_tokenizer("bert")
    backbone = tiny_model("bert", tokenizer, seed=0)
    backbone.pooler = None  # unused by mean pooling (it would have no gradient)
    return Embedder(backbone, tokenizer, kind="encoder", pooling="mean", max_length=16)


def _exact_cache(engine, scenario: str):
    from pcc_dist.gradcache import GradCache

    if scenario == "skip":  # C = B: the cache is skipped for the plain path's pooled groups
        return GradCache(engine, B, plain_rows=EXACT_C)
    chunk = EXACT_C if scenario.endswith("cache") else 0
    return GradCache(engine, chunk, length_sorted=not scenario.startswith("unsorted"),
                     plain_rows=EXACT_C)


def run_exact(engine, rank: int, model: str, full_grads) -> dict:
    """Every EXACT scenario for both losses with dropout off: loss, rank-0 gradients, forwards."""
    from unittest import mock

    from pcc_dist.length_chunks import ChunkPlan

    for module in engine.module.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    forwards = [0]
    hook = engine.module.register_forward_pre_hook(
        lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    out: dict = {"grads": {}, "loss": {}, "forwards": {}, "fraction": {}}
    for loss in LOSSES:
        views, scores = rank_views(engine.module, loss, rank)
        for scenario in EXACT:
            cache = _exact_cache(engine, scenario)
            forwards[0] = 0
            # The negative control: embeddings left in sorted order (no inverse permutation).
            wrong = mock.patch.object(ChunkPlan, "restore", lambda self, stacked: stacked)
            with wrong if scenario.startswith("wrong") else contextlib.nullcontext():
                value = cache.run(engine.module, views, make_loss_fn(loss, scores))
            key = (model, loss, scenario)
            out["loss"][key], out["forwards"][key] = value, forwards[0]
            out["fraction"][key] = cache.real_token_fraction
            grads = full_grads()
            engine.zero_grad()
            if rank == 0:
                out["grads"][key] = grads
    hook.remove()
    return out


# -- the 2-rank job ------------------------------------------------------------------------------


def worker(rank: int, world_size: int, args: dict) -> dict:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from pcc_dist.config import load_config
    from pcc_dist.engine import build_engine
    from pcc_dist.gradcache import GradCache

    cfg = load_config(
        None,
        [
            f"stage1.global_batch_size={W * B}",
            f"stage1.gradcache_chunk_size={C}",
            "stage1.warmup_steps=0",
            "stage1.lr=1e-3",
            f"train.deepspeed_config={args['ds_config']}",
        ],
    )
    embedder = build_embedder()
    engine = build_engine(embedder, cfg, cfg.stage1, total_steps=10)
    engine.train()
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]

    def full_grads() -> dict[str, torch.Tensor]:
        # A collective per parameter (all-gather of the fp32 gradient partitions).
        return {n: safe_get_full_grad(p).detach().clone() for n, p in trainable}

    out: dict = {
        "grads": {},
        "loss": {},
        # Per trainable tensor: does this rank hold only a slice of it (ZeRO-3)?
        "partitioned": [
            hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for _, p in trainable
        ],
    }
    for loss in LOSSES:
        for scenario in args["scenarios"]:
            views, scores = rank_views(
                embedder, loss, rank, perturb=scenario == "perturbed" and rank == 0
            )
            loss_fn = make_loss_fn(loss, scores)
            torch.manual_seed(RNG_SEED + rank)
            if scenario == "no_cache":
                value = GradCache(engine, 0, plain_rows=C).run(engine.module, views, loss_fn)
            else:
                cache = GradCache(engine, C, replay_rng=scenario != "no_replay")
                value = cache.run(engine.module, views, loss_fn)
            grads = full_grads()
            engine.zero_grad()
            out["loss"][(loss, scenario)] = value
            if rank == 0:
                out["grads"][(loss, scenario)] = grads

    if not args["steps"]:
        dist.destroy_process_group()
        return out
    # Steps first (they need the dropout this decoder was built with), then the exact scenarios.
    out["steps"], moved_finite = _take_steps(engine, embedder, rank)
    if rank == 0:
        out["moved"], out["finite"] = moved_finite
    out["exact"] = run_exact(engine, rank, "decoder", full_grads)
    encoder = build_engine(build_encoder(), cfg, cfg.stage1, total_steps=10)
    encoder.train()
    enc_trainable = [(n, p) for n, p in encoder.module.named_parameters() if p.requires_grad]
    exact = run_exact(encoder, rank, "encoder", lambda: {
        n: safe_get_full_grad(p).detach().clone() for n, p in enc_trainable})
    for part in out["exact"]:
        out["exact"][part].update(exact[part])
    dist.barrier()
    dist.destroy_process_group()
    return out


def _take_steps(engine, embedder, rank: int):
    from pcc_dist.gradcache import GradCache

    # Real steps: normal, non-finite loss on rank 1 only, normal.
    views, _ = rank_views(embedder, "infonce", rank)
    good = make_loss_fn("infonce", None)

    def bad(e):
        value = good(e)
        # Finite gradients, non-finite value: only the loss guard can catch this.
        return value + float("inf") if rank == 1 else value

    states, results = [engine.gathered_state_dict(trainable_only=True)], []
    for loss_fn in (good, bad, good):
        GradCache(engine, C).run(engine.module, views, loss_fn)
        results.append(engine.step())
        states.append(engine.gathered_state_dict(trainable_only=True))
    moved = [any(not torch.equal(s0[k], s1[k]) for k in s0)
             for s0, s1 in zip(states, states[1:], strict=False)]
    finite = all(torch.isfinite(t).all() for t in states[-1].values())
    return results, (moved, finite)


# -- the parent: oracle and assertions -----------------------------------------------------------


def _run_job(tmp_path_factory, name: str, scenarios, steps: bool) -> list[dict]:
    ds = json.loads((REPO_ROOT / "ds_configs" / f"{name}.json").read_text())
    if ds["zero_optimization"]["stage"] == 3:
        # Every parameter partitioned and gathered on use: with DeepSpeed's default threshold
        # (1e5 elements) all of this tiny model's tensors would stay whole on every rank.
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / f"{name}.json"
    path.write_text(json.dumps(ds))
    args = {"ds_config": str(path), "scenarios": list(scenarios), "steps": steps}
    return run_ranks(f"{__file__}:worker", world_size=W, args=args, timeout=330)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _run_job(tmp_path_factory, "zero3", SCENARIOS, steps=True)


@pytest.fixture(scope="module")
def oracle() -> dict[str, tuple[float, dict[str, torch.Tensor]]]:
    """One process, no DeepSpeed: the loss on the union batch, each rank's masks replayed."""
    out = {}
    for loss in LOSSES:
        embedder = build_embedder().train()
        per_view: list[list[torch.Tensor]] = []
        all_scores = []
        for rank in range(W):
            views, scores = rank_views(embedder, loss, rank)
            all_scores.append(scores)
            torch.manual_seed(RNG_SEED + rank)
            embedded = embed_in_chunks(embedder, views)
            per_view = per_view or [[] for _ in views]
            for v, e in enumerate(embedded):
                per_view[v].append(e)
        union = [torch.cat(e) for e in per_view]
        scores = torch.cat(all_scores) if loss == "pearson" else None
        value = make_loss_fn(loss, scores)(union)
        value.backward()
        grads = {
            n: p.grad.detach().clone() for n, p in embedder.named_parameters() if p.requires_grad
        }
        out[loss] = (float(value), grads)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_close(got: dict, want: dict, what: str, rtol: float = RTOL) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        if name.endswith("key.bias"):
            # BERT's attention key bias: its gradient is exactly zero (softmax ignores a shift
            # shared by every key), so both sides are float noise with no relative scale.
            continue
        assert ref.norm() > 0, f"{name}: zero reference gradient, the comparison would be vacuous"
        assert _rel(got[name], ref) <= rtol, f"{what}: {name} differs by {_rel(got[name], ref):.2e}"


def _worst_of_whole(got: dict, want: dict) -> tuple[str, float]:
    """The tensor whose difference is largest, and that difference over the whole gradient's
    L2 norm (all tensors of ``want``)."""
    whole = math.sqrt(sum(float(g.norm()) ** 2 for g in want.values()))
    worst = max(want, key=lambda n: float((got[n] - want[n]).norm()))
    return worst, float((got[worst] - want[worst]).norm()) / whole


def _assert_close_to_whole(got: dict, want: dict, what: str, rtol: float) -> None:
    """Every tensor's difference within ``rtol`` of the whole gradient's L2 norm."""
    worst, diff = _worst_of_whole(got, want)
    assert diff <= rtol, f"{what}: {worst} differs by {diff:.2e} of the whole gradient's norm"


def test_every_parameter_is_partitioned(ranks):
    assert all(r["partitioned"] and all(r["partitioned"]) for r in ranks)


@pytest.mark.parametrize("loss", LOSSES)
def test_cache_equals_no_cache_under_zero3(ranks, loss):
    grads = ranks[0]["grads"]
    _assert_close(grads[(loss, "cache")], grads[(loss, "no_cache")], f"{loss} cache vs no cache")
    for r in ranks:
        assert r["loss"][(loss, "cache")] == pytest.approx(r["loss"][(loss, "no_cache")], rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_cache_equals_one_process_on_union_batch(ranks, oracle, loss):
    value, grads = oracle[loss]
    _assert_close(ranks[0]["grads"][(loss, "cache")], grads, f"{loss} 2-rank cache vs 1 process")
    for r in ranks:
        assert r["loss"][(loss, "cache")] == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("control", ["no_replay", "perturbed"])
def test_negative_controls_differ(ranks, loss, control):
    grads = ranks[0]["grads"]
    worst = max(_rel(grads[(loss, control)][n], ref) for n, ref in grads[(loss, "cache")].items())
    assert worst > CONTROL_MIN_DIFF, f"{control} did not change the {loss} gradients ({worst:.1e})"


def test_steps_apply_and_a_nonfinite_loss_on_one_rank_skips_everywhere(ranks):
    for r in ranks:
        first, poisoned, last = r["steps"]
        assert not first.skipped and math.isfinite(first.grad_norm) and first.grad_norm > 0
        assert poisoned.skipped and not math.isfinite(poisoned.grad_norm)
        assert not last.skipped and math.isfinite(last.grad_norm)
        assert first.lr == pytest.approx(1e-3)
    assert ranks[0]["moved"] == [True, False, True]
    assert ranks[0]["finite"]
    # The same decision on both ranks (a rank stepping alone would desynchronise ZeRO-3).
    assert [s.skipped for s in ranks[0]["steps"]] == [s.skipped for s in ranks[1]["steps"]]


# zero2 is slow: no recipe uses it (the default suite checks zero3 and zero3_offload).
@pytest.mark.parametrize("name", ["zero3_offload",
                                  pytest.param("zero2", marks=pytest.mark.slow)])
def test_other_shipped_configs_match_the_union_batch_oracle(tmp_path_factory, oracle, name):
    """The same multi-backward path with CPU offload (ZeRO-3) and with ZeRO-2's buckets."""
    rank0, _ = _run_job(tmp_path_factory, name, ["cache"], steps=False)
    for loss in LOSSES:
        _assert_close(rank0["grads"][(loss, "cache")], oracle[loss][1], f"{name} {loss}")


# -- length-sorted chunks (dropout off) ----------------------------------------------------------


@pytest.mark.parametrize("model", ["decoder", "encoder"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("path", ["cache", "plain"])
def test_length_sorted_chunks_equal_the_unsorted_path(ranks, model, loss, path):
    """Same loss and every parameter gradient within 1e-6, for fewer processed tokens."""
    exact = ranks[0]["exact"]
    got, want = (model, loss, f"sorted_{path}"), (model, loss, "unsorted_plain")
    _assert_close(exact["grads"][got], exact["grads"][want], f"{got} vs unsorted",
                  rtol=EXACT_RTOL)
    _assert_close_to_whole(exact["grads"][got], exact["grads"][want], f"{got} vs unsorted",
                           rtol=EXACT_RTOL_OF_WHOLE)
    for r in ranks:
        assert r["exact"]["loss"][got] == pytest.approx(r["exact"]["loss"][want], rel=1e-6)
        # The sort and trim did act (else the comparison above would be vacuous).
        assert r["exact"]["fraction"][got] > r["exact"]["fraction"][want]


@pytest.mark.parametrize("model", ["decoder", "encoder"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("path", ["cache", "plain"])
def test_negative_control_a_skipped_inverse_permutation_is_caught(ranks, model, loss, path):
    exact = ranks[0]["exact"]
    ref = exact["grads"][(model, loss, "unsorted_plain")]
    wrong = exact["grads"][(model, loss, f"wrong_{path}")]
    worst = max(_rel(wrong[n], g) for n, g in ref.items() if not n.endswith("key.bias"))
    assert worst > CONTROL_MIN_DIFF, f"un-permutation skipped, gradients moved {worst:.1e} only"
    _, of_whole = _worst_of_whole(wrong, ref)
    assert of_whole > CONTROL_MIN_DIFF, f"moved {of_whole:.1e} of the whole gradient's norm only"
    assert exact["loss"][(model, loss, f"wrong_{path}")] != pytest.approx(
        exact["loss"][(model, loss, "unsorted_plain")], rel=1e-4)


@pytest.mark.parametrize("model", ["decoder", "encoder"])
@pytest.mark.parametrize("loss", LOSSES)
def test_one_chunk_per_view_skips_the_cache(ranks, model, loss):
    """C >= B on every rank: no replay, the plain path's forwards and gradients. The views'
    rows are pooled before chunking: ceil(views * B / C) forwards, not views * ceil(B / C)."""
    views = 3 if loss == "infonce" else 2
    for r in ranks:
        forwards = r["exact"]["forwards"]
        assert forwards[(model, loss, "skip")] == math.ceil(views * B / EXACT_C)
        assert forwards[(model, loss, "sorted_cache")] == 2 * math.ceil(views * B / EXACT_C)
        assert forwards[(model, loss, "sorted_plain")] == math.ceil(views * B / EXACT_C)
        assert forwards[(model, loss, "unsorted_plain")] == views
        assert r["exact"]["loss"][(model, loss, "skip")] == \
            r["exact"]["loss"][(model, loss, "sorted_plain")]
    exact = ranks[0]["exact"]
    skip, plain = exact["grads"][(model, loss, "skip")], exact["grads"][(model, loss,
                                                                          "sorted_plain")]
    assert all(torch.equal(skip[n], plain[n]) for n in plain)
