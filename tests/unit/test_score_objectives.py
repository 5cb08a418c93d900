"""Stage-2 alternatives to Pearson (pcc_dist.losses.score_objectives): cosine MSE and CoSENT.

Each loss against a direct float64 formula (value and autograd gradient), against
sentence-transformers' own losses on the same embeddings, through the gradient cache, and chosen
by ``loss.stage2_objective``. The 2-rank global-batch equivalence is in
tests/distributed/test_losses_distributed.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers.tiny_models import (
    AutogradEngine,
    one_thread,  # noqa: F401  (module fixture, applied through pytestmark)
    tiny_mean_encoder,
)

from pcc_dist.config import load_config
from pcc_dist.gradcache import GradCache
from pcc_dist.losses import CoSENTLoss, CosineMSELoss, PearsonLoss
from pcc_dist.losses.score_objectives import cosent_objective
from pcc_dist.trainer import _bind_loss, stage_loss

pytestmark = pytest.mark.usefixtures("one_thread")

N, D = 9, 5


def _inputs(seed=0, ties=True):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (N,), generator=gen).double() / 5 if ties else torch.rand(
        N, generator=gen, dtype=torch.float64)
    return a, b, y


def _direct_cosines(a, b):
    """xᵢ = aᵢ·bᵢ / (‖aᵢ‖ ‖bᵢ‖), written out per pair."""
    return torch.stack([(a[i] * b[i]).sum() / (a[i].norm() * b[i].norm()) for i in range(N)])


def _direct_mse(a, b, y):
    x = _direct_cosines(a, b)
    return sum((x[i] - y[i]) ** 2 for i in range(N)) / N


def _direct_cosent(a, b, y, scale):
    """log(1 + Σ_{yᵢ > yⱼ} exp(λ(xⱼ − xᵢ))), the sum written as a double loop over pairs."""
    x = _direct_cosines(a, b)
    total = torch.ones((), dtype=torch.float64)
    for i in range(N):
        for j in range(N):
            if y[i] > y[j]:
                total = total + torch.exp(scale * (x[j] - x[i]))
    return torch.log(total)


def _value_and_grads(loss, a, b):
    a.grad = b.grad = None
    loss.backward()
    return loss.detach(), a.grad.clone(), b.grad.clone()


CASES = {
    "cosine_mse": (lambda: CosineMSELoss(), _direct_mse),
    "cosent": (lambda: CoSENTLoss(scale=3.0), lambda a, b, y: _direct_cosent(a, b, y, 3.0)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("ties", [True, False])
def test_loss_and_gradient_equal_the_direct_formula(name, ties):
    make, direct = CASES[name]
    a, b, y = _inputs(ties=ties)
    got = _value_and_grads(make()(a, b, y), a, b)
    want = _value_and_grads(direct(a, b, y), a, b)
    assert want[1].abs().max() > 1e-3  # not comparing zeros
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # Negative control: another pair's score changed moves value and gradient.
    y2 = y.clone()
    y2[0] = 1.0 - y2[0] + 0.3
    other = _value_and_grads(make()(a, b, y2), a, b)
    assert abs(other[0] - got[0]) > 1e-4 and not torch.allclose(other[1], got[1], rtol=1e-3)


def test_cosent_is_order_only_and_zero_without_ordered_pairs():
    a, b, y = _inputs()
    loss = CoSENTLoss()
    base = loss(a, b, y)
    torch.testing.assert_close(loss(a, b, 4 * y + 1), base)  # monotone rescaling
    torch.testing.assert_close(loss(a, b, torch.exp(y)), base)
    flat = loss(a, b, torch.full_like(y, 0.4))
    a.grad = None
    flat.backward()
    assert flat.item() == 0.0 and a.grad.abs().max() == 0.0


def test_cosent_is_finite_at_a_huge_scale():
    """logsumexp with the 0 term: λ = 1e4 overflows a naive exp (e^20000) but not this form."""
    x = torch.tensor([0.9, -0.9, 0.1], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    value = cosent_objective(x, y, 1e4)
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(x.grad).all()
    assert value.item() == pytest.approx(1e4 * 1.8, rel=1e-9)  # dominated by the worst pair


def _st_loss(name):
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    cls = st_losses.CoSENTLoss if name == "cosent" else st_losses.CosineSimilarityLoss
    # compute_loss_from_embeddings needs no model: build the module without one.
    loss = cls.__new__(cls)
    torch.nn.Module.__init__(loss)
    if name == "cosent":
        from sentence_transformers.util import pairwise_cos_sim

        loss.scale, loss.similarity_fct = 20.0, pairwise_cos_sim
    else:
        loss.loss_fct, loss.cos_score_transformation = torch.nn.MSELoss(), torch.nn.Identity()
    return loss


@pytest.mark.parametrize("name", ["cosine_mse", "cosent"])
def test_equals_sentence_transformers(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        st_loss = _st_loss(name)
    ours = CoSENTLoss() if name == "cosent" else CosineMSELoss()
    a, b, y = _inputs(seed=3)
    y = y.float().double()  # CosineSimilarityLoss casts the labels to fp32: keep them exact
    want = _value_and_grads(st_loss.compute_loss_from_embeddings([a, b], y), a, b)
    got = _value_and_grads(ours(a, b, y), a, b)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert got[0] > 1e-3


def test_fp32_inputs_give_fp32_loss_and_gradients():
    a, b, y = (t.detach().float() for t in _inputs())
    a.requires_grad_()
    loss = CoSENTLoss()(a, b, y)
    loss.backward()
    assert loss.dtype == torch.float32 and a.grad.dtype == torch.float32


def test_empty_global_batch_is_an_error():
    empty = torch.zeros(0, D)
    with pytest.raises(ValueError, match="at least one pair"):
        CosineMSELoss()(empty, empty, torch.zeros(0))


# -- chosen by the config, through the gradient cache -------------------------------------------


@pytest.mark.parametrize(("objective", "cls"), [("pearson", PearsonLoss),
                                                ("cosine_mse", CosineMSELoss),
                                                ("cosent", CoSENTLoss)])
def test_stage_loss_follows_the_config(objective, cls):
    cfg = load_config(None, [f"loss.stage2_objective={objective}", "loss.cosent_scale=7"])
    loss = stage_loss(cfg, "stage2")
    assert type(loss) is cls
    if objective == "cosent":
        assert loss.scale == 7.0
    assert type(stage_loss(cfg, "stage1")).__name__ == "InfoNCELoss"


@pytest.fixture(scope="module")
def encoder():
    return tiny_mean_encoder()


def _step(encoder, objective, chunk):
    a = ["a man plays", "the big red dog runs fast in the park", "two people", "a cat",
         "a woman is playing the piano near a tree", "music"]
    b = ["a man plays guitar", "the child eats food", "people standing", "happy cat",
         "blue ball", "loud music"]
    views = [encoder.tokenize(a), encoder.tokenize(b)]
    scores = torch.tensor([0.8, 0.1, 0.6, 0.6, 0.0, 0.7])
    cfg = load_config(None, [f"loss.stage2_objective={objective}"])
    encoder.zero_grad()
    value = GradCache(AutogradEngine(encoder), chunk).run(
        encoder, views, _bind_loss(stage_loss(cfg, "stage2"), scores))
    return value, {n: p.grad.clone() for n, p in encoder.named_parameters()
                   if not n.endswith("key.bias")}  # exactly-zero gradients: noise only


def _rel(got, want):
    return max(float((got[n] - g).norm() / g.norm()) for n, g in want.items())


@pytest.mark.parametrize("objective", ["cosine_mse", "cosent"])
def test_gradient_cache_equals_the_plain_path(encoder, objective):
    plain = _step(encoder, objective, 0)
    cached = _step(encoder, objective, 2)
    assert cached[0] == pytest.approx(plain[0], rel=1e-5)
    assert _rel(cached[1], plain[1]) < 1e-4
    # Negative control: the other objective's gradient is far from this one's.
    other = _step(encoder, "cosent" if objective == "cosine_mse" else "cosine_mse", 2)
    assert _rel(other[1], plain[1]) > 1e-2
