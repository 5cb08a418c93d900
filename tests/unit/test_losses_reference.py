"""Pure-torch reference losses: hand-computed values, gradcheck in float64, naive-formula agreement,
degenerate cases, error messages, module dispatch. Single process (W = 1).

Cross-rank behaviour is in tests/distributed/test_losses_distributed.py, the Triton kernels in
tests/kernels/.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.near_cosines import gradient_error, near_cosine_pairs, relative_spread

from pcc_dist.cross_rank import local_moment_sums, pearson_global_stats
from pcc_dist.losses import (
    InfoNCELoss,
    PearsonLoss,
    PearsonOutput,
    infonce_reference,
    pearson_reference,
    reference_pearson,
)

# --------------------------------------------------------------------------------------------------
# Naive oracles: the textbook formulas through plain autograd (materialised, not distributed).
# --------------------------------------------------------------------------------------------------


def naive_pearson(a, b, y):
    x = (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)
    xc, yc = x - x.mean(), y - y.mean()
    return 1 - (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum())


def naive_infonce(anchors, positives, negatives, tau):
    cands = positives if negatives is None else torch.cat([positives, negatives])
    logits = F.normalize(anchors, dim=1) @ F.normalize(cands, dim=1).T / tau
    return F.cross_entropy(logits, torch.arange(anchors.shape[0]))


def _leaves(*shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


# --------------------------------------------------------------------------------------------------
# Pearson
# --------------------------------------------------------------------------------------------------


def _angle_pairs(thetas):
    """aᵢ = (cos θᵢ, sin θᵢ), bᵢ = (1, 0): xᵢ = cos θᵢ exactly, ∂xᵢ/∂aᵢ = (sin²θ, −sinθ cosθ)."""
    t = torch.tensor(thetas, dtype=torch.float64)
    a = torch.stack([torch.cos(t), torch.sin(t)], dim=1).requires_grad_()
    b = torch.tensor([[1.0, 0.0]] * len(thetas), dtype=torch.float64, requires_grad=True)
    return a, b


def test_pearson_hand_computed_value_and_gradient():
    # x = (1, 0, −1), y = (1, 3, 2): x̄ = 0, ȳ = 2, σx² = σy² = 2/3, cov = −1/3 → r = −0.5, L = 1.5.
    a, b = _angle_pairs([0.0, math.pi / 2, math.pi])
    out = pearson_reference(a, b, torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64))
    assert isinstance(out, PearsonOutput)
    assert out.loss.item() == pytest.approx(1.5, abs=1e-12)
    assert out.r.item() == pytest.approx(-0.5, abs=1e-12)
    out.loss.backward()
    # ∂r/∂x = (1/3)[(y−ȳ)/(2/3) − r(x−x̄)/(2/3)] = (−0.25, 0.5, −0.25); ∂L/∂x = −∂r/∂x.
    # Only a₁ (θ = π/2) has ∂x/∂a ≠ 0: (1, 0). So ∂L/∂a₁ = (−0.5, 0), ∂L/∂a₀ = ∂L/∂a₂ = 0.
    expected = torch.tensor([[0.0, 0.0], [-0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(a.grad, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("scores", "loss"), [([3.0, 2.0, 1.0], 0.0), ([1.0, 2.0, 3.0], 2.0)])
def test_pearson_perfect_correlations(scores, loss):
    a, b = _angle_pairs([0.0, math.pi / 2, math.pi])
    out = pearson_reference(a, b, torch.tensor(scores, dtype=torch.float64))
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)


def test_pearson_matches_naive_autograd_and_rejects_perturbation():
    a, b = _leaves((13, 7), (13, 7))
    y = torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = pearson_reference(a, b, y).loss
    grads = torch.autograd.grad(loss * 1.7, [a, b])
    ref = naive_pearson(a, b, y)
    ref_grads = torch.autograd.grad(ref * 1.7, [a, b])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # Negative control: one perturbed pair changes both the value and the gradients.
    b_pert = b.detach().clone()
    b_pert[3] += 0.3
    other = pearson_reference(a, b_pert.requires_grad_(), y).loss
    assert abs(other.item() - loss.item()) > 1e-3
    assert not torch.allclose(torch.autograd.grad(other, a)[0], grads[0] / 1.7, atol=1e-6)


def test_pearson_gradcheck_float64():
    a, b = _leaves((6, 5), (6, 5), seed=3)
    y = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(lambda a, b: pearson_reference(a, b, y).loss, (a, b))


def test_pearson_gradcheck_float64_with_zero_norm_row():
    # Row 2 of a has norm 0 < eps: x₂ = 0 and the gradient follows the clamp (no −x·a/n² term).
    a, b = _leaves((5, 4), (5, 4), seed=5)
    with torch.no_grad():
        a[2] = 0.0
    y = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fn = lambda a, b: pearson_reference(a, b, y, eps=1e-3).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-7, atol=1e-5)


def test_pearson_zero_norm_row_matches_normalize_formula():
    a, b = _leaves((6, 4), (6, 4), seed=7)
    with torch.no_grad():
        a[0] = 0.0
    y = torch.arange(6, dtype=torch.float64)
    loss = pearson_reference(a, b, y).loss
    ref = naive_pearson(a, b, y)  # F.normalize uses the same max(‖v‖, eps) clamp
    torch.testing.assert_close(loss, ref)
    got, want = torch.autograd.grad(loss, b)[0], torch.autograd.grad(ref, b)[0]
    torch.testing.assert_close(got, want)
    assert torch.isfinite(torch.autograd.grad(pearson_reference(a, b, y).loss, a)[0]).all()


def test_pearson_float64_sums_survive_cancellation():
    # N = 262,144 cosines with x̄ = 0.9, σx = 1e-3 (x̄²/σx² = 8.1e5), fp32 storage.
    gen = torch.Generator().manual_seed(8)
    n = 262_144
    x = (0.9 + 1e-3 * torch.randn(n, generator=gen)).float()
    y = (x.double() + 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    xd, yd = x.double(), y.double()
    xc, yc = xd - xd.mean(), yd - yd.mean()  # two-pass, centred, float64: the exact answer
    r_exact = ((xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum())).item()
    r_ours = pearson_global_stats(local_moment_sums(x, y)).r
    assert r_ours == pytest.approx(r_exact, rel=1e-9)
    # Negative control: the same one-pass sums in fp32 are far off (r ≈ 0.728 vs 0.708).
    m_x, m_y = x.sum() / n, y.sum() / n
    var_x = (x * x).sum() / n - m_x * m_x
    var_y = (y * y).sum() / n - m_y * m_y
    r_fp32 = (((x * y).sum() / n - m_x * m_y) / torch.sqrt(var_x * var_y)).item()
    assert not math.isfinite(r_fp32) or abs(r_fp32 - r_exact) > 1e-3


def _fp32_cosines(a, b, eps):
    """What the reference computed before issue #19: cosines in fp32 (the negative control)."""
    na, nb = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
    x = torch.linalg.vecdot(a, b) / (na.clamp_min(eps) * nb.clamp_min(eps))
    return x.double(), na.double(), nb.double()


@pytest.mark.parametrize("rel_spread", [1e-5, 1.5e-6])
def test_pearson_nearly_equal_fp32_cosines_keep_an_exact_gradient(rel_spread):
    # σx/|x̄| between the 1e-6 zero-variance guard and 1e-4: float64 cosines keep r and the
    # gradient of fp32 inputs at the fp32 output's own rounding (measured 2e-8 and 1.6e-7).
    a, b, y = near_cosine_pairs(256, 256, rel_spread, seed=13)
    assert relative_spread(a, b) == pytest.approx(rel_spread, rel=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact, so nothing to warn about
        r_error, grad_error = gradient_error(pearson_reference, a, b, y)
    assert r_error < 1e-7
    assert grad_error < 1e-6


@pytest.mark.parametrize(("rel_spread", "at_least"), [(1e-5, 5e-3), (1.5e-6, 3e-2)])
def test_pearson_fp32_cosines_would_degrade_the_gradient(monkeypatch, rel_spread, at_least):
    # Negative control: the same comparison with fp32 cosines fails (measured 1.2 % and 8 %).
    monkeypatch.setattr(reference_pearson, "_float64_cosines", _fp32_cosines)
    a, b, y = near_cosine_pairs(256, 256, rel_spread, seed=13)
    _, grad_error = gradient_error(pearson_reference, a, b, y)
    assert grad_error > at_least


def test_pearson_needs_two_pairs():
    a, b = _leaves((1, 4), (1, 4))
    with pytest.raises(ValueError, match=r"at least 2 pairs .* got n = 1"):
        pearson_reference(a, b, torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize("constant", ["scores", "cosines"])
def test_pearson_zero_variance_gives_zero_gradient_and_warns(constant):
    a, b = _leaves((5, 3), (5, 3), seed=9)
    y = torch.arange(5, dtype=torch.float64)
    if constant == "scores":
        y = torch.full((5,), 3.0, dtype=torch.float64)
    else:  # identical pairs everywhere: every cosine is the same number
        a = a.detach()[:1].repeat(5, 1).requires_grad_()
        b = b.detach()[:1].repeat(5, 1).requires_grad_()
    with pytest.warns(RuntimeWarning, match="zero variance"):
        out = pearson_reference(a, b, y)
    assert out.r.item() == 0.0 and out.loss.item() == 1.0
    out.loss.backward()
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0


def test_pearson_grad_scale_scales_gradients_not_value():
    a, b = _leaves((8, 4), (8, 4), seed=10)
    y = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    base = pearson_reference(a, b, y)  # W = 1 here: grad_scale None means 1
    g1 = torch.autograd.grad(base.loss, a)[0]
    scaled = pearson_reference(a, b, y, grad_scale=3.0)
    g3 = torch.autograd.grad(scaled.loss, a)[0]
    assert scaled.loss.item() == base.loss.item()
    torch.testing.assert_close(g3, 3.0 * g1)
    assert not torch.allclose(g3, g1)


def test_pearson_half_inputs_compute_in_fp32():
    a, b = _leaves((16, 8), (16, 8), dtype=torch.float32, seed=12)
    y = torch.randn(16)
    out32 = pearson_reference(a, b, y).loss
    out16 = pearson_reference(a.detach().bfloat16(), b.detach().bfloat16(), y).loss
    assert out16.dtype == torch.float32
    assert out16.item() == pytest.approx(out32.item(), abs=0.05)


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "y_shape", "match"),
    [
        ((4, 3), (4, 2), (4,), r"same shape, got \(4, 3\) and \(4, 2\)"),
        ((4,), (4,), (4,), r"\[B, D\] matrices"),
        ((4, 3), (4, 3), (5,), r"scores must be a \[B\] vector with B = 4, got shape \(5,\)"),
    ],
)
def test_pearson_shape_errors(a_shape, b_shape, y_shape, match):
    with pytest.raises(ValueError, match=match):
        pearson_reference(torch.randn(a_shape), torch.randn(b_shape), torch.randn(y_shape))


def test_pearson_rejects_integer_scores_and_bad_grad_scale():
    with pytest.raises(ValueError, match="scores must be a floating-point tensor"):
        pearson_reference(torch.randn(3, 2), torch.randn(3, 2), torch.arange(3))
    with pytest.raises(ValueError, match="grad_scale must be a positive finite number"):
        pearson_reference(torch.randn(3, 2), torch.randn(3, 2), torch.randn(3), grad_scale=0.0)


# --------------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------------


def test_infonce_hand_computed_values():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    anchors, positives = torch.stack([e1, e2]), torch.stack([e1, e2])
    # In-batch only, τ = 1: row i has logits (1, 0) → ℓ = log(1 + e⁻¹) for both anchors.
    loss = infonce_reference(anchors, positives, temperature=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-12)
    # τ = 0.5: ℓ = log(1 + e⁻²).
    loss = infonce_reference(anchors, positives, temperature=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-12)
    # Hard negatives h₀ = −e1, h₁ = e1, τ = 1. Candidates (p₀, p₁, h₀, h₁):
    # row 0 cosines (1, 0, −1, 1) → ℓ₀ = −log(e / (e + 1 + e⁻¹ + e));
    # row 1 cosines (0, 1, 0, 0) → ℓ₁ = −log(e / (e + 3)).
    negatives = torch.stack([-e1, e1])
    loss = infonce_reference(anchors, positives, negatives, temperature=1.0)
    e = math.e
    expected = 0.5 * (-math.log(e / (2 * e + 1 + 1 / e)) - math.log(e / (e + 3)))
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_infonce_matches_naive_materialised(with_negatives, chunk_size):
    a, p, h = _leaves((7, 5), (7, 5), (7, 5), seed=13)
    negatives = h if with_negatives else None
    inputs = [a, p] + ([h] if with_negatives else [])
    loss = infonce_reference(a, p, negatives, temperature=0.1, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss * 0.7, inputs)
    ref = naive_infonce(a, p, negatives, 0.1)
    ref_grads = torch.autograd.grad(ref * 0.7, inputs)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # Negative control: swapping two positives changes the loss.
    swapped = p.detach()[[1, 0, 2, 3, 4, 5, 6]]
    other = infonce_reference(a, swapped, negatives, temperature=0.1)
    assert abs(other.item() - loss.item()) > 1e-3


@pytest.mark.parametrize("with_negatives", [False, True])
def test_infonce_gradcheck_float64(with_negatives):
    a, p, h = _leaves((5, 3), (5, 3), (5, 3), seed=14)
    if with_negatives:
        fn = lambda a, p, h: infonce_reference(a, p, h, temperature=0.5, chunk_size=2)  # noqa: E731
        inputs = (a, p, h)
    else:
        fn = lambda a, p: infonce_reference(a, p, temperature=0.5, chunk_size=2)  # noqa: E731
        inputs = (a, p)
    assert torch.autograd.gradcheck(fn, inputs)


def test_infonce_gradcheck_float64_sharp_temperature():
    a, p, h = _leaves((4, 3), (4, 3), (4, 3), seed=15)
    fn = lambda a, p, h: infonce_reference(a, p, h, temperature=0.05, chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, p, h))


def test_infonce_saves_no_logit_matrix():
    # Everything autograd keeps for backward must be O((B + M)·D), not O(B·M).
    rows, dim = 96, 4
    a, p, h = _leaves((rows, dim), (rows, dim), (rows, dim), dtype=torch.float32, seed=16)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = infonce_reference(a, p, h, chunk_size=8)
    loss.backward()
    logits = rows * 2 * rows  # 18,432 entries of the [B × M] matrix
    inputs_and_rows = 3 * rows * dim + 10 * rows  # 1,152 + O(B + M)
    assert sum(saved) <= inputs_and_rows < logits
    # Negative control: the naive version does save O(B·M).
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_infonce(a, p, h, 0.05)
    assert sum(saved) >= logits


def test_infonce_stable_at_sharp_temperature():
    a, p = _leaves((4, 8), (4, 8), dtype=torch.float32, seed=17)
    loss = infonce_reference(a, a.detach().clone(), temperature=0.001)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(a.grad).all()


def test_infonce_single_candidate_is_zero_loss():
    a, p = _leaves((1, 4), (1, 4), seed=18)
    loss = infonce_reference(a, p)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert a.grad.abs().max() < 1e-12  # P = 1 for the only candidate, up to rounding


def test_infonce_zero_norm_anchor_matches_normalize_formula():
    a, p, h = _leaves((4, 3), (4, 3), (4, 3), seed=19)
    with torch.no_grad():
        a[1] = 0.0
    loss = infonce_reference(a, p, h, temperature=0.2)
    ref = naive_infonce(a, p, h, 0.2)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, p)[0], torch.autograd.grad(ref, p)[0])


def test_infonce_grad_scale_scales_gradients_not_value():
    a, p = _leaves((6, 4), (6, 4), seed=20)
    base = infonce_reference(a, p, temperature=0.3)
    scaled = infonce_reference(a, p, temperature=0.3, grad_scale=2.0)
    assert scaled.item() == base.item()
    g_scaled, g_base = torch.autograd.grad(scaled, p)[0], torch.autograd.grad(base, p)[0]
    torch.testing.assert_close(g_scaled, 2.0 * g_base)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"positives": torch.randn(3, 5)}, r"positives must have the anchors' shape \(4, 5\)"),
        ({"hard_negatives": torch.randn(2, 5)}, r"hard_negatives must have the anchors' shape"),
        ({"temperature": 0.0}, "temperature must be a positive finite number, got 0.0"),
        ({"temperature": float("nan")}, "temperature must be a positive finite number"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
        ({"anchors": torch.randn(4)}, r"anchors must be a \[B, D\] matrix"),
    ],
)
def test_infonce_input_errors(kwargs, match):
    args = {"anchors": torch.randn(4, 5), "positives": torch.randn(4, 5)} | kwargs
    with pytest.raises(ValueError, match=match):
        infonce_reference(**args)


# --------------------------------------------------------------------------------------------------
# Modules and kernel dispatch
# --------------------------------------------------------------------------------------------------


def test_modules_match_functions_and_expose_r(caplog):
    a, b = _leaves((9, 6), (9, 6), dtype=torch.float32, seed=21)
    y = torch.rand(9) * 5
    module = PearsonLoss()
    with caplog.at_level(logging.INFO, logger="pcc_dist.losses.pearson"):
        loss = module(a, b, y)
        module(a, b, y)
    assert loss.item() == pearson_reference(a, b, y).loss.item()
    assert module.last_r.item() == pytest.approx(1.0 - loss.item(), abs=1e-6)
    chosen = [r.getMessage() for r in caplog.records if "implementation" in r.getMessage()]
    assert chosen == ["PearsonLoss(kernel='auto') on cpu tensors: using the torch implementation"]

    info = InfoNCELoss(temperature=0.07, chunk_size=4)
    assert info(a, b).item() == infonce_reference(a, b, temperature=0.07, chunk_size=4).item()


@pytest.mark.parametrize("cls", [PearsonLoss, InfoNCELoss])
def test_unknown_kernel_is_rejected(cls):
    match = r"kernel must be one of \('auto', 'triton', 'torch'\), got 'cuda'"
    with pytest.raises(ValueError, match=match):
        cls(kernel="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
@pytest.mark.parametrize("cls", [PearsonLoss, InfoNCELoss])
def test_triton_without_cuda_is_an_error(cls, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="kernel='triton' needs a CUDA GPU .*TRITON_INTERPRET=1"):
        cls(kernel="triton")


def test_missing_triton_names_the_package(monkeypatch):
    from pcc_dist.kernels._utils import require_triton

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(ImportError, match=r"pcc-dist\[triton\]"):
        require_triton()


def test_infonce_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got -1"):
        InfoNCELoss(temperature=-1)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 2.5"):
        InfoNCELoss(chunk_size=2.5)


def test_import_losses_does_not_import_triton():
    code = "import sys, pcc_dist.losses; sys.exit(int('triton' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
