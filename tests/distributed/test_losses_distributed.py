"""Cross-rank losses on 2 real gloo ranks equal the one-process result on the union batch.

One spawn (module fixture) runs every rank-side scenario; the tests compare its results with the
same computation done here in one process on the union batch. Each rank embeds its own rows with
a shared linear "encoder" θ, so the tests see both embedding gradients and the parameter gradient
that DDP/DeepSpeed would average. Batches are uneven across ranks (5 + 6 Pearson pairs, 3 + 4
InfoNCE triplets) to exercise the variable-size gather and the label offsets. The stage-2
alternatives to Pearson (cosine MSE, CoSENT: loss.stage2_objective) run on the Pearson pairs.

Gradient convention under test (pcc_dist.cross_rank): each rank's embedding gradient is
W·∂L/∂(its embeddings), so after the (1/W) average of the parameter gradients the result equals the
union-batch gradient. Negative controls: grad_scale=1 (the official code's 1/W), per-rank losses,
perturbed inputs, and a collective counter that must see the InfoNCE gathers.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
import torch.distributed as dist
from helpers.spawn import run_ranks

from pcc_dist.distributed import all_gather_with_grad, all_reduce_sum, get_rank, get_world_size
from pcc_dist.losses import CoSENTLoss, CosineMSELoss, InfoNCELoss, PearsonLoss

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

W = 2
PEARSON_SIZES = [5, 6]
INFONCE_SIZES = [3, 4]
D_IN, D = 6, 4
TAU = 0.1
RANK_TIMEOUT = 300  # hard limit for the spawned ranks; start-up alone is a few seconds per rank


# --------------------------------------------------------------------------------------------------
# Shared between the ranks and the one-process oracle
# --------------------------------------------------------------------------------------------------


def _data(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1234)
    n_p, n_i = sum(PEARSON_SIZES), sum(INFONCE_SIZES)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return {
        "theta": randn(D_IN, D),
        "xa": randn(n_p, D_IN),
        "xb": randn(n_p, D_IN),
        "y": (torch.rand(n_p, generator=gen, dtype=torch.float64) * 5).to(dtype),
        "x0": randn(n_i, D_IN),
        "x1": randn(n_i, D_IN),
        "x2": randn(n_i, D_IN),
    }


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _pearson_step(data, rows, kernel="torch", grad_scale=None):
    theta = data["theta"].clone().requires_grad_()
    a, b = data["xa"][rows] @ theta, data["xb"][rows] @ theta
    a.retain_grad()
    b.retain_grad()
    loss_fn = PearsonLoss(kernel=kernel, grad_scale=grad_scale)
    loss = loss_fn(a, b, data["y"][rows])
    loss.backward()
    return {
        "loss": loss.detach(),
        "r": loss_fn.last_r,
        "a": a.grad,
        "b": b.grad,
        "theta": theta.grad,
    }


def _score_step(data, rows, name, grad_scale=None):
    """A stage-2 alternative to Pearson (loss.stage2_objective) on the Pearson pairs."""
    theta = data["theta"].clone().requires_grad_()
    a, b = data["xa"][rows] @ theta, data["xb"][rows] @ theta
    a.retain_grad()
    b.retain_grad()
    loss_fn = CoSENTLoss(grad_scale=grad_scale) if name == "cosent" else CosineMSELoss(
        grad_scale=grad_scale)
    # CoSENT's targets need only their order; the MSE's live on the cosine's scale (y / 5).
    loss = loss_fn(a, b, data["y"][rows] / 5)
    loss.backward()
    return {"loss": loss.detach(), "a": a.grad, "b": b.grad, "theta": theta.grad}


def _infonce_step(data, rows, negatives=True, kernel="torch", grad_scale=None):
    theta = data["theta"].clone().requires_grad_()
    embs = [data[k][rows] @ theta for k in ("x0", "x1", "x2")]
    for e in embs:
        e.retain_grad()
    loss_fn = InfoNCELoss(temperature=TAU, kernel=kernel, chunk_size=2, grad_scale=grad_scale)
    loss = loss_fn(embs[0], embs[1], embs[2] if negatives else None)
    loss.backward()
    grads = {k: e.grad for k, e in zip(("anchors", "positives", "negatives"), embs, strict=True)}
    return {"loss": loss.detach(), "theta": theta.grad} | grads


# --------------------------------------------------------------------------------------------------
# Rank side
# --------------------------------------------------------------------------------------------------

_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
)


@contextlib.contextmanager
def _count_collectives(log):
    """Record (name, numel of the first tensor argument) of every c10d collective called inside.

    One wrapper per collective, installed under both names (``torch.distributed.X`` and
    ``torch.distributed.distributed_c10d.X``), so a call is logged once whichever name it uses.
    """
    import torch.distributed.distributed_c10d as c10d

    patched = []
    for name in _COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None:
            continue

        def wrapper(*args, _name=name, _original=original, **kwargs):
            tensor = next((t for t in (*args, *kwargs.values()) if torch.is_tensor(t)), None)
            log.append((_name, tensor.numel() if tensor is not None else 0))
            return _original(*args, **kwargs)

        for module in (dist, c10d):
            if getattr(module, name, None) is original:
                patched.append((module, name, original))
                setattr(module, name, wrapper)
    try:
        yield log
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


def _count(step):
    fwd, bwd = [], []
    with _count_collectives(fwd):
        loss = step()
    with _count_collectives(bwd):
        loss.backward()
    return {"forward": fwd, "backward": bwd}


def _pearson_counts(rank, kernel, rows, dim):
    gen = torch.Generator().manual_seed(100 + rank)
    dtype = torch.float64 if kernel == "torch" else torch.float32
    a = torch.randn(rows, dim, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(rows, dim, generator=gen, dtype=dtype).requires_grad_()
    y = torch.rand(rows, generator=gen, dtype=dtype)
    return _count(lambda: PearsonLoss(kernel=kernel)(a, b, y))


def _error_of(fn):
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def _ddp_average(grad):
    """What DDP/DeepSpeed apply to a parameter gradient: the mean over ranks."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / get_world_size()


def rank_worker(rank, world_size):
    out = {"rank": get_rank(), "world_size": get_world_size()}
    data = _data()
    data32 = _data(torch.float32)
    p_rows, i_rows = _rows(PEARSON_SIZES, rank), _rows(INFONCE_SIZES, rank)

    # Pearson and InfoNCE: default convention (grad_scale = W) and the 1/W control (grad_scale = 1).
    for key, step, rows in (("pearson", _pearson_step, p_rows), ("infonce", _infonce_step, i_rows)):
        res = step(data, rows)
        res["theta_avg"] = _ddp_average(res["theta"])
        unscaled = step(data, rows, grad_scale=1.0)
        res["theta_avg_unscaled"] = _ddp_average(unscaled["theta"])
        # The Triton kernels through the interpreter (TRITON_INTERPRET=1 in the ranks), fp32.
        fused = step(data32, rows, kernel="triton")
        fused["theta_avg"] = _ddp_average(fused["theta"])
        out[key], out[key + "_triton"] = res, fused
    out["infonce_no_neg"] = _infonce_step(data, i_rows, negatives=False)
    for name in ("cosine_mse", "cosent"):
        res = _score_step(data, p_rows, name)
        res["theta_avg"] = _ddp_average(res["theta"])
        res["theta_avg_unscaled"] = _ddp_average(_score_step(data, p_rows, name, 1.0)["theta"])
        out[name] = res
    out["infonce_no_neg"]["theta_avg"] = _ddp_average(out["infonce_no_neg"]["theta"])

    # Collective counts: Pearson forward = one all-reduce of ≤ 8 numbers whatever B and D.
    out["counts"] = {
        f"pearson_{kernel}_{rows}x{dim}": _pearson_counts(rank, kernel, rows, dim)
        for kernel in ("torch", "triton")
        for rows, dim in ((3, 4), (64, 300))
    }
    embs = [(data["x" + k][i_rows] @ data["theta"]).requires_grad_() for k in "012"]
    out["counts"]["infonce_torch"] = _count(lambda: InfoNCELoss(kernel="torch")(*embs))

    # Degenerate cases are decided on global sums, so every rank agrees (and none hangs).
    one = torch.randn(1, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    y_one = torch.tensor([float(rank)], dtype=torch.float64)
    out["pearson_one_pair_per_rank"] = PearsonLoss(kernel="torch")(one, one + 1, y_one).item()
    rows_by_rank = 1 if rank == 0 else 0
    out["pearson_one_pair_total_error"] = _error_of(
        lambda: PearsonLoss(kernel="torch")(
            one[:rows_by_rank], one[:rows_by_rank], y_one[:rows_by_rank]
        )
    )
    out["infonce_mixed_negatives_error"] = _error_of(
        lambda: InfoNCELoss(kernel="torch")(embs[0], embs[1], embs[2] if rank == 0 else None)
    )

    # all_gather_with_grad: uneven rows; rank r weights the gathered rows by (r + 1)·k for row k.
    x = torch.full((2 + rank, 3), float(rank), dtype=torch.float64, requires_grad=True)
    gathered = all_gather_with_grad(x)
    weights = (rank + 1) * torch.arange(gathered.shape[0], dtype=torch.float64)[:, None]
    (gathered * weights).sum().backward()
    out["gather"] = {"value": gathered.detach(), "grad": x.grad}
    out["reduce"] = all_reduce_sum(torch.tensor([rank + 1.0])).item()
    return out


def hanging_worker(rank, world_size):
    time.sleep(3600)


def failing_worker(rank, world_size):
    if rank == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # rank 0 blocks here until the launcher kills it


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(rank_worker, world_size=W, timeout=RANK_TIMEOUT, env={"TRITON_INTERPRET": "1"})


@pytest.fixture(scope="module")
def single():
    """The one-process oracle on the union batch (W = 1, no process group)."""
    data, data32, everything = _data(), _data(torch.float32), slice(None)
    return {
        "pearson": _pearson_step(data, everything),
        "infonce": _infonce_step(data, everything),
        "infonce_no_neg": _infonce_step(data, everything, negatives=False),
        "cosine_mse": _score_step(data, everything, "cosine_mse"),
        "cosent": _score_step(data, everything, "cosent"),
        "pearson_triton": _pearson_step(data32, everything),
        "infonce_triton": _infonce_step(data32, everything),
    }


def _assert_close(got, want, rtol):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


EMBEDDINGS = {
    "pearson": (("a", "b"), PEARSON_SIZES),
    "infonce": (("anchors", "positives", "negatives"), INFONCE_SIZES),
    "infonce_no_neg": (("anchors", "positives"), INFONCE_SIZES),
    "cosine_mse": (("a", "b"), PEARSON_SIZES),
    "cosent": (("a", "b"), PEARSON_SIZES),
}
CASES = [
    ("pearson", 1e-10),
    ("infonce", 1e-10),
    ("infonce_no_neg", 1e-10),
    ("cosine_mse", 1e-10),
    ("cosent", 1e-10),
    ("pearson_triton", 1e-5),
    ("infonce_triton", 1e-5),
]


def test_ranks_form_a_real_group(ranks):
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, W), (1, W)]
    assert [r["reduce"] for r in ranks] == [3.0, 3.0]


@pytest.mark.parametrize(("case", "rtol"), CASES)
def test_loss_equals_union_batch_on_every_rank(ranks, single, case, rtol):
    for res in ranks:
        _assert_close(res[case]["loss"], single[case]["loss"], rtol)
    if case.startswith("pearson"):
        for res in ranks:
            _assert_close(res[case]["r"], single[case]["r"], rtol)


@pytest.mark.parametrize(("case", "rtol"), CASES)
def test_embedding_gradients_equal_union_batch(ranks, single, case, rtol):
    names, sizes = EMBEDDINGS[case.removesuffix("_triton")]
    for rank, res in enumerate(ranks):
        for name in names:
            want = single[case][name][_rows(sizes, rank)]
            assert want.abs().max() > 1e-3  # not comparing zeros
            # Convention: a rank's embedding gradient is W·∂L/∂(its embeddings).
            _assert_close(res[case][name] / W, want, rtol)


@pytest.mark.parametrize(("case", "rtol"), CASES)
def test_averaged_parameter_gradient_equals_union_batch(ranks, single, case, rtol):
    want = single[case]["theta"]
    assert want.abs().max() > 1e-3
    for res in ranks:
        _assert_close(res[case]["theta_avg"], want, rtol)


@pytest.mark.parametrize("case", ["pearson", "infonce", "cosine_mse", "cosent"])
def test_control_unscaled_gradient_is_one_over_w(ranks, single, case):
    # The official Pcc-tuning convention: without the W factor DDP's average gives ∂L/∂θ / W.
    want = single[case]["theta"]
    got = ranks[0][case]["theta_avg_unscaled"]
    _assert_close(got, want / W, 1e-10)
    assert not torch.allclose(got, want, rtol=1e-3)


def test_control_per_rank_pearson_is_not_the_global_loss(single):
    data = _data()
    local = [_pearson_step(data, _rows(PEARSON_SIZES, r)) for r in range(W)]
    for rank, res in enumerate(local):
        assert abs(res["loss"].item() - single["pearson"]["loss"].item()) > 1e-2
        want = W * single["pearson"]["a"][_rows(PEARSON_SIZES, rank)]
        assert not torch.allclose(res["a"], want, rtol=1e-3)


@pytest.mark.parametrize("case", ["cosine_mse", "cosent"])
def test_control_per_rank_score_objective_is_not_the_global_loss(single, case):
    """Each rank's loss on its own pairs only (what a loss without the gather computes): CoSENT
    misses the cross-rank pairs of pairs in value and gradient; the MSE, a mean of per-pair
    terms, gets the value wrong and its gradient off by the rank's share N_r / N."""
    data = _data()
    local = [_score_step(data, _rows(PEARSON_SIZES, r), case) for r in range(W)]
    for rank, res in enumerate(local):
        assert abs(res["loss"].item() - single[case]["loss"].item()) > 1e-3
        want = W * single[case]["a"][_rows(PEARSON_SIZES, rank)]
        assert not torch.allclose(res["a"], want, rtol=1e-3)


def test_control_per_rank_infonce_is_not_the_global_loss(single):
    data = _data()
    local = [_infonce_step(data, _rows(INFONCE_SIZES, r)) for r in range(W)]
    mean_local = sum(res["loss"] * s for res, s in zip(local, INFONCE_SIZES, strict=True)) / 7
    assert abs(mean_local.item() - single["infonce"]["loss"].item()) > 1e-2


@pytest.mark.parametrize("case", ["pearson", "infonce"])
def test_control_perturbed_input_does_not_match(ranks, case):
    data = _data()
    data["xb" if case == "pearson" else "x2"][-1] += 1.0  # a row that lives on rank 1
    step = _pearson_step if case == "pearson" else _infonce_step
    other = step(data, slice(None))
    assert abs(other["loss"].item() - ranks[0][case]["loss"].item()) > 1e-4
    assert not torch.allclose(other["theta"], ranks[0][case]["theta_avg"], rtol=1e-3)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("shape", ["3x4", "64x300"])
def test_pearson_forward_one_small_all_reduce_backward_none(ranks, kernel, shape):
    for res in ranks:
        counts = res["counts"][f"pearson_{kernel}_{shape}"]
        assert len(counts["forward"]) == 1, counts
        name, numel = counts["forward"][0]
        assert name == "all_reduce" and 1 <= numel <= 8  # the six sums
        assert counts["backward"] == []


def test_control_counter_sees_infonce_collectives(ranks):
    counts = ranks[0]["counts"]["infonce_torch"]
    names = [name for name, _ in counts["forward"]]
    assert names.count("all_gather") == 3  # sizes, positives, hard negatives
    assert names.count("all_reduce") == 1  # the loss value
    # Backward: one all-reduce per gathered block (the gather's gradient goes back to its owner).
    assert [name for name, _ in counts["backward"]] == ["all_reduce", "all_reduce"]


def test_degenerate_pearson_is_decided_globally(ranks):
    # One pair per rank: n = 2 globally is valid (r = ±1), on both ranks alike.
    values = [res["pearson_one_pair_per_rank"] for res in ranks]
    assert values[0] == values[1] and min(abs(values[0]), abs(values[0] - 2)) < 1e-9
    # One pair in total (rank 1 holds none): every rank raises, so none blocks in a collective.
    for res in ranks:
        assert (
            "at least 2 pairs over the global batch, got n = 1"
            in res["pearson_one_pair_total_error"]
        )


def test_infonce_rejects_hard_negatives_on_some_ranks_only(ranks):
    for res in ranks:
        assert (
            "given on every rank or on none; ranks with hard negatives: [0]"
            in (res["infonce_mixed_negatives_error"])
        )


def test_all_gather_with_grad_routes_gradients_to_owners(ranks):
    # Rank r holds 2 + r rows of value r; gathered rows k get weight (r' + 1)·k on rank r'.
    expected_value = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)[:, None].expand(
        5, 3
    )
    k = torch.arange(5, dtype=torch.float64)[:, None].expand(5, 3)
    summed = (1 + 2) * k  # Σ over ranks of (r' + 1)·k
    for rank, res in enumerate(ranks):
        torch.testing.assert_close(res["gather"]["value"], expected_value)
        rows = slice(0, 2) if rank == 0 else slice(2, 5)
        torch.testing.assert_close(res["gather"]["grad"], summed[rows])
        assert not torch.allclose(
            res["gather"]["grad"], ((rank + 1) * k)[rows]
        )  # local-only control


def test_helpers_without_process_group():
    assert not dist.is_initialized()
    assert (get_rank(), get_world_size()) == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x
    t = torch.tensor([2.0])
    assert all_reduce_sum(t).item() == 2.0


def test_launcher_kills_hung_ranks():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 15 s"):
        run_ranks(hanging_worker, world_size=W, timeout=15)
    assert time.monotonic() - start < 45


def test_launcher_reports_a_failing_rank_and_stops_its_peer():
    start = time.monotonic()
    # Rank 1 raises; rank 0 then dies of the closed connection or is killed: both are reported.
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[(0, )?1\] failed") as info:
        run_ranks(failing_worker, world_size=W, timeout=120)
    assert "ValueError: rank one refuses" in str(info.value)
    assert time.monotonic() - start < 60  # the peer blocked in barrier() was killed, not awaited
