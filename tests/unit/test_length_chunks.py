"""Length-aware chunk planning (pure functions), the GradCache paths that use it in one process,
the ``perf/real_token_fraction`` metric, and the tokenise-ahead thread.

The 2-rank ZeRO-3 equivalence of sorted and unsorted chunks (gradients, dropout replay, the wrong
un-permutation control) is in tests/distributed/test_gradcache_zero3.py.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from helpers.tiny_models import (
    AutogradEngine,
    one_thread,  # noqa: F401  (module fixture, applied through pytestmark)
    tiny_mean_encoder,
)

from pcc_dist.gradcache import GradCache
from pcc_dist.length_chunks import (
    column_span,
    inverse_permutation,
    length_order,
    padding_side,
    plan_chunks,
    pool_views,
    real_token_fraction,
)
from pcc_dist.step_inputs import Prefetcher, stage_texts

pytestmark = pytest.mark.usefixtures("one_thread")


def padded(lengths: list[int], side: str) -> dict[str, torch.Tensor]:
    """A view whose row i holds ``lengths[i]`` real tokens (ids 100*i + position), padded."""
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = 100 * i + torch.arange(1, n + 1)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


def row_signature(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A per-row "embedding" that depends on the real tokens only: [sum of ids, count]."""
    real = input_ids * attention_mask
    return torch.stack([real.sum(1), attention_mask.sum(1)], dim=1).float()


# -- pure planning ---------------------------------------------------------------------------


def test_length_order_is_longest_first_and_stable():
    assert length_order(torch.tensor([3, 7, 2, 7, 5])).tolist() == [1, 3, 4, 0, 2]
    assert length_order(torch.tensor([3, 7, 2]), sort=False).tolist() == [0, 1, 2]


def test_inverse_permutation_undoes_the_order():
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    inv = inverse_permutation(order)
    x = torch.arange(50) * 3
    assert torch.equal(x[order][inv], x)
    assert not torch.equal(x[order], x)  # the permutation is not the identity


@pytest.mark.parametrize("side", ["right", "left"])
def test_column_span_is_the_real_columns_of_either_padding_side(side):
    view = padded([2, 4, 3], side)
    start, stop = column_span(view["attention_mask"][[0, 2]])
    assert (start, stop) == ((0, 3) if side == "right" else (1, 4))
    assert column_span(torch.zeros((2, 5), dtype=torch.long)) == (0, 5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_plan_sorts_chunks_trims_and_restores_the_input_order(side):
    lengths = [3, 7, 2, 7, 5, 1, 6]
    view = padded(lengths, side)
    plan = plan_chunks(view, 3)
    assert [r.tolist() for r in plan.rows] == [[1, 3, 6], [4, 0], [2, 5]]
    chunks = [plan.take(view, k) for k in range(3)]
    # Each chunk is as wide as its longest row and keeps every real token of its rows.
    assert [c["input_ids"].shape[1] for c in chunks] == [7, 5, 2]
    assert [int(c["attention_mask"].sum()) for c in chunks] == [20, 8, 3]
    assert plan.processed_tokens == 3 * 7 + 2 * 5 + 2 * 2 < 7 * len(lengths)
    assert plan.real_tokens == sum(lengths)
    embedded = plan.restore(torch.cat([row_signature(**c) for c in chunks]))
    assert torch.equal(embedded, row_signature(**view))


def test_plan_negative_control_without_restore_rows_are_out_of_order():
    view = padded([3, 7, 2, 7, 5], "right")
    plan = plan_chunks(view, 2)
    stacked = torch.cat([row_signature(**plan.take(view, k)) for k in range(2)])
    assert not torch.equal(stacked, row_signature(**view))


def test_unsorted_plan_is_the_consecutive_untrimmed_split():
    view = padded([3, 7, 2, 7, 5], "right")
    plan = plan_chunks(view, 2, sort=False)
    assert [r.tolist() for r in plan.rows] == [[0, 1, 2], [3, 4]]
    assert all(plan.take(view, k)["input_ids"].shape[1] == 7 for k in range(2))
    assert plan.processed_tokens == view["attention_mask"].numel()


def test_one_chunk_is_the_view_itself():
    view = padded([3, 7, 2], "left")
    plan = plan_chunks(view, 1)
    assert plan.trivial and plan.take(view, 0) is view


def test_plan_refuses_more_chunks_than_rows():
    with pytest.raises(ValueError, match="cannot split a view of 2 rows into 3 chunks"):
        plan_chunks(padded([1, 2], "right"), 3)


def test_real_token_fraction_counts_the_chunks_masks():
    views = [padded([3, 7, 2, 7, 5], "right"), padded([1, 1, 4, 2, 2], "right")]
    plans = [plan_chunks(v, 2) for v in views]
    real = sum(int(v["attention_mask"].sum()) for v in views)
    processed = sum(plan.take(v, k)["attention_mask"].numel()
                    for v, plan in zip(views, plans, strict=True) for k in range(2))
    assert real_token_fraction(plans) == pytest.approx(real / processed)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooled_views_sort_together_and_split_back_per_view(side):
    """Two views of different widths: one batch, widened on their padding side; its chunks put
    back in order and split give each view's rows, and pooling pads fewer positions than
    chunking each view on its own."""
    a, b = padded([3, 7, 2, 7, 5], side), padded([1, 1, 4, 2, 2], side)
    pooled = pool_views([a, b])
    assert pooled.sizes == (5, 5)
    assert pooled.view["input_ids"].shape == (10, 7)
    assert padding_side([a, b]) == side
    plan = plan_chunks(pooled.view, 4)
    stacked = torch.cat([row_signature(**plan.take(pooled.view, k)) for k in range(4)])
    got = pooled.split(plan.restore(stacked))
    for view, rows in zip([a, b], got, strict=True):
        assert torch.equal(rows, row_signature(**view))
    apart = real_token_fraction([plan_chunks(a, 2), plan_chunks(b, 2)])
    assert real_token_fraction([plan]) > apart
    # Negative control: split without the inverse permutation mixes the two views' rows.
    assert not torch.equal(pooled.split(stacked)[1], row_signature(**b))


def test_padding_side_refuses_views_padded_on_both_sides():
    with pytest.raises(ValueError, match="both sides"):
        padding_side([padded([3, 1], "left"), padded([1, 3], "right")])
    full = padded([2, 2], "right")
    assert padding_side([full]) == "right"  # no padding: either side, right by convention


# -- GradCache in one process (no DeepSpeed) ---------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    return tiny_mean_encoder()


def _views(embedder):
    a = ["a man plays", "the big red dog runs fast in the park", "two people", "a cat",
         "a woman is playing the piano near a tree", "music"]
    b = ["dog", "the child eats food", "a man is sitting near the water with two dogs",
         "happy", "blue ball", "people standing in the street"]
    return [embedder.tokenize(a), embedder.tokenize(b)]


def _run(embedder, views, cache: GradCache):
    embedder.zero_grad()
    seen: list[torch.Tensor] = []

    def embed(batch):
        seen.append(batch["attention_mask"])
        return embedder(**batch)

    value = cache.run(embed, views, lambda e: (e[0] * e[1]).sum(1).square().mean())
    grads = {n: p.grad.clone() for n, p in embedder.named_parameters()}
    return value, grads, seen


def test_skip_one_chunk_per_view_is_the_plain_path(encoder):
    """C >= B: no second forward; the views' rows pooled in groups of ``plain_rows``, the same
    forwards and gradients as the plain path (chunk_size 0)."""
    cache_engine = AutogradEngine(encoder)
    views = _views(encoder)
    rows = views[0]["input_ids"].shape[0]
    plain = _run(encoder, views, GradCache(cache_engine, 0, plain_rows=4))
    skipped = _run(encoder, views, GradCache(cache_engine, rows, plain_rows=4))
    cached = _run(encoder, views, GradCache(cache_engine, 2))
    assert len(skipped[2]) == len(plain[2]) == 3  # 12 pooled rows in groups of 4
    assert len(cached[2]) == 2 * 6  # negative control: the cache does re-embed (12 rows by 2)
    assert skipped[0] == plain[0]
    assert all(torch.equal(skipped[1][n], g) for n, g in plain[1].items())
    # Attention key biases have an exactly zero gradient (softmax ignores a shift shared by
    # all keys): float noise on both sides, no relative comparison.
    assert max(float((cached[1][n] - g).norm() / g.norm()) for n, g in plain[1].items()
               if not n.endswith("key.bias")) < 1e-5


def test_real_token_fraction_equals_the_forwarded_masks(encoder):
    views = _views(encoder)
    cache = GradCache(AutogradEngine(encoder), 0, plain_rows=2)
    _, _, seen = _run(encoder, views, cache)
    assert len(seen) == 12 // 2  # both views' rows pooled, 2 per forward
    want = sum(int(m.sum()) for m in seen) / sum(m.numel() for m in seen)
    assert cache.real_token_fraction == pytest.approx(want)
    whole = sum(int(v["attention_mask"].sum()) for v in views) / sum(
        v["attention_mask"].numel() for v in views)
    assert cache.real_token_fraction > whole  # per-chunk padding processed fewer positions


def test_real_token_fraction_reaches_the_step_log(tmp_path):
    """The step log writes the step's fraction to the tracker and metrics.jsonl."""
    from pcc_dist.step_log import METRICS_FILE, StepLog, StepRecord

    logged = []
    tracker = SimpleNamespace(log_metrics=lambda m, step: logged.append(m))
    log = StepLog(tracker, "s", tmp_path, 1, world_size=1, global_batch_size=5, total_steps=1,
                  is_main=True, objective="pearson")
    views = [padded([3, 7, 2, 7, 5], "right")]
    plans = [plan_chunks(v, 2) for v in views]
    result = SimpleNamespace(lr=1e-3, grad_norm=1.0)
    state = SimpleNamespace(step=1, skipped_steps=0)
    log.record(state, StepRecord(loss=0.5, result=result, views=views, seconds=1.0,
                                 real_token_fraction=real_token_fraction(plans)))
    line = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])
    want = 24 / (3 * 7 + 2 * 3)  # rows 1, 3, 4 padded to 7; rows 0, 2 to 3
    assert line["perf/real_token_fraction"] == pytest.approx(want)
    assert logged[0]["perf/real_token_fraction"] == pytest.approx(want)


# -- the step's inputs and the tokenise-ahead thread -------------------------------------------


def test_stage_texts_per_stage():
    t = SimpleNamespace(anchor="a", positive="p", hard_negative="n")
    assert stage_texts("stage1", [t]) == ([["a"], ["p"], ["n"]], None)
    assert stage_texts("stage1", [t, SimpleNamespace(anchor="b", positive="q",
                                                     hard_negative=None)])[0] == [["a", "b"],
                                                                                  ["p", "q"]]
    pair = SimpleNamespace(sentence1="x", sentence2="y", score=0.5)
    assert stage_texts("stage2", [pair]) == ([["x"], ["y"]], [0.5])


def test_prefetcher_yields_every_step_in_order_from_another_thread():
    threads = set()

    def produce(step):
        threads.add(threading.get_ident())
        return step * 10

    with Prefetcher(produce, range(3, 8)) as ahead:
        assert [ahead.get(s) for s in range(3, 8)] == [30, 40, 50, 60, 70]
    assert threading.get_ident() not in threads and not ahead.alive


def test_prefetcher_raises_a_failed_step_in_the_main_thread_with_its_message():
    def produce(step):
        if step == 2:
            raise ValueError("row 17 of train.csv: no sentence2")
        return step

    with Prefetcher(produce, range(5)) as ahead:
        assert ahead.get(0) == 0 and ahead.get(1) == 1
        with pytest.raises(ValueError, match=r"^row 17 of train.csv: no sentence2$"):
            ahead.get(2)
    assert not ahead.alive


def test_prefetcher_stops_when_the_step_fails_while_it_waits_on_a_full_queue():
    produced = []

    def produce(step):
        produced.append(step)
        return step

    with pytest.raises(KeyboardInterrupt), Prefetcher(produce, range(1000), depth=1) as ahead:
        ahead.get(0)
        time.sleep(0.3)  # the worker fills the queue and blocks in put
        raise KeyboardInterrupt
    assert not ahead.alive
    assert len(produced) <= 3  # it stopped, it did not run ahead through the 1000 steps
