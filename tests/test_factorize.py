"""Tests of lrkernels.factorize: SVD optimality, activation-aware SVD, rank selection,
numerical safeguards and argument checking."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lrkernels.factorize import (
    GramAccumulator,
    activation_aware_svd,
    factorize_weight,
    relative_output_error,
    select_rank,
    truncated_svd,
    whitening_factor,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    return q * torch.sign(torch.diagonal(r))


def _anisotropic_inputs(n: int, d: int, g: torch.Generator, decades: float = 3.0):
    """X = Z · diag(scales) · R: strongly anisotropic covariance in a random basis."""
    scales = torch.logspace(0.0, -decades, d, dtype=F64)
    return torch.randn(n, d, dtype=F64, generator=g) * scales @ _orthogonal(d, g)


def _tail(s: torch.Tensor, r: int) -> float:
    return float(s[r:].square().sum().sqrt())


# ---------------------------------------------------------------------------------------------
# Plain truncated SVD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (25, 25)])
def test_truncated_svd_is_eckart_young_optimal(shape):
    g = _gen(0)
    W = torch.randn(*shape, dtype=F64, generator=g)
    s = torch.linalg.svdvals(W)
    for r in (1, 5, min(shape) - 1, min(shape)):
        U, V = truncated_svd(W, r)
        assert U.shape == (shape[0], r) and V.shape == (r, shape[1])
        assert U.dtype == F64 and V.dtype == F64
        err = float(torch.linalg.matrix_norm(W - U @ V))
        assert abs(err - _tail(s, r)) < 1e-10
        if r < min(shape):
            # Any other rank-r matrix does worse: random factors, and perturbed optimal ones.
            for _ in range(5):
                A = torch.randn(shape[0], r, dtype=F64, generator=g)
                B = torch.randn(r, shape[1], dtype=F64, generator=g)
                # best scaling of the random product, to make the comparison fair
                M = A @ B
                M = M * (W * M).sum() / M.square().sum()
                assert float(torch.linalg.matrix_norm(W - M)) > err
                dU = 1e-3 * torch.randn(U.shape, dtype=F64, generator=g)
                assert float(torch.linalg.matrix_norm(W - (U + dU) @ V)) > err


def test_truncated_svd_factors_are_balanced():
    g = _gen(1)
    W = torch.randn(20, 12, dtype=F64, generator=g)
    s = torch.linalg.svdvals(W)
    U, V = truncated_svd(W, 6)
    torch.testing.assert_close(torch.linalg.vector_norm(U, dim=0), s[:6].sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(V, dim=1), s[:6].sqrt(), rtol=1e-12, atol=0)
    # orthogonal columns / rows: UᵀU = VVᵀ = diag(σ)
    torch.testing.assert_close(U.T @ U, torch.diag(s[:6]), atol=1e-12, rtol=0)
    torch.testing.assert_close(V @ V.T, torch.diag(s[:6]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_truncated_svd_keeps_dtype_and_is_accurate(dtype):
    g = _gen(2)
    W64 = torch.randn(48, 32, dtype=F64, generator=g) * 30.0
    W = W64.to(dtype)
    U, V = truncated_svd(W, 32)  # full rank: U@V reproduces W up to the dtype's rounding
    assert U.dtype == dtype and V.dtype == dtype
    eps = torch.finfo(dtype).eps
    rel = torch.linalg.matrix_norm(W.double() - U.double() @ V.double()) / torch.linalg.matrix_norm(
        W.double()
    )
    assert float(rel) < 20 * eps
    # balanced factors stay in range: max |U|, |V| ~ sqrt(σ_max), not σ_max
    assert float(U.abs().max()) < 0.5 * float(W.abs().max())


def test_truncated_svd_rank_deficient_weight():
    g = _gen(3)
    W = torch.randn(16, 3, dtype=F64, generator=g) @ torch.randn(3, 24, dtype=F64, generator=g)
    U, V = truncated_svd(W, energy=1.0)
    assert U.shape[1] == 3  # numerical rank
    torch.testing.assert_close(U @ V, W, atol=1e-11, rtol=0)
    U, V = truncated_svd(torch.zeros(5, 7), energy=0.9)
    assert U.shape == (5, 1) and not torch.isnan(U).any() and not (U @ V).any()


# ---------------------------------------------------------------------------------------------
# Activation-aware SVD
# ---------------------------------------------------------------------------------------------


def test_activation_aware_beats_plain_svd_and_matches_whitened_spectrum():
    g = _gen(4)
    out_f, in_f, n = 32, 48, 2000
    W = torch.randn(out_f, in_f, dtype=F64, generator=g)
    X = _anisotropic_inputs(n, in_f, g)
    # Independent ground truth: σ(W·S) = σ(W·Xᵀ) since (W·S)(W·S)ᵀ = W·XᵀX·Wᵀ.
    s_out = torch.linalg.svdvals(W @ X.T)
    for r in (2, 8, 16, 31):
        Ua, Va = activation_aware_svd(W, r, calibration=X, damping=0.0)
        Up, Vp = truncated_svd(W, r)
        err_aware = float(torch.linalg.matrix_norm((W - Ua @ Va) @ X.T))
        err_plain = float(torch.linalg.matrix_norm((W - Up @ Vp) @ X.T))
        optimum = _tail(s_out, r)
        assert abs(err_aware - optimum) <= 1e-8 * optimum
        # strictly better at every rank, and by far once r reaches the decaying directions
        assert err_aware < (0.9 if r < 8 else 0.5) * err_plain
        # A random rank-r factorisation cannot beat the optimum either.
        M = torch.randn(out_f, r, dtype=F64, generator=g) @ torch.randn(
            r, in_f, dtype=F64, generator=g
        )
        assert float(torch.linalg.matrix_norm((W - M) @ X.T)) > err_aware


def test_activation_aware_gram_equals_calibration_and_batches():
    g = _gen(5)
    W = torch.randn(24, 20, dtype=F64, generator=g)
    X = _anisotropic_inputs(300, 20, g, decades=2.0)
    fa = factorize_weight(W, 6, calibration=X.reshape(3, 100, 20))
    fb = factorize_weight(W, 6, gram=X.T @ X)
    assert fa.whitened and fb.whitened and fa.damping > 0
    torch.testing.assert_close(fa.U @ fa.V, fb.U @ fb.V, atol=1e-9, rtol=1e-9)
    # The whitened spectrum: σ(W·S)² = eig(W·(G + λI)·Wᵀ), λ = damping·mean(diag(G)).
    G = X.T @ X
    lam = 1e-6 * float(torch.diagonal(G).mean())
    assert fa.damping == pytest.approx(lam, rel=1e-12)
    ev = torch.linalg.eigvalsh(W @ (G + lam * torch.eye(20, dtype=F64)) @ W.T).flip(0)[:20]
    torch.testing.assert_close(fa.singular_values, ev.sqrt(), rtol=1e-9, atol=0)
    # The residual predicted from the spectrum is the achieved output error.
    f0 = factorize_weight(W, 6, gram=X.T @ X, damping=0.0)
    err = float(torch.linalg.matrix_norm((W - f0.U @ f0.V) @ X.T))
    assert abs(err - f0.residual) <= 1e-9 * err
    # relative_output_error agrees with the direct computation
    rel = relative_output_error(W, f0.U, f0.V, X.T @ X)
    direct = err / float(torch.linalg.matrix_norm(W @ X.T))
    assert abs(rel - direct) <= 1e-10
    assert (
        abs(
            relative_output_error(W, f0.U, f0.V)
            - float(torch.linalg.matrix_norm(W - f0.U @ f0.V) / torch.linalg.matrix_norm(W))
        )
        <= 1e-12
    )


def test_activation_aware_full_rank_reproduces_weight():
    g = _gen(6)
    W = torch.randn(10, 14, dtype=F64, generator=g)
    X = _anisotropic_inputs(200, 14, g)
    U, V = activation_aware_svd(W, 10, calibration=X)
    torch.testing.assert_close(U @ V, W, atol=1e-9, rtol=0)
    # float32 weight: factors come back in float32, computed in float64
    U32, V32 = activation_aware_svd(W.float(), 10, calibration=X.float())
    assert U32.dtype == torch.float32 and V32.dtype == torch.float32
    torch.testing.assert_close(U32 @ V32, W.float(), atol=1e-4, rtol=1e-4)


def test_energy_uses_whitened_spectrum():
    g = _gen(7)
    W = torch.randn(30, 30, dtype=F64, generator=g)
    X = _anisotropic_inputs(500, 30, g, decades=4.0)
    s = torch.linalg.svdvals(W @ X.T)
    kept = torch.cumsum(s**2, 0) / (s**2).sum()
    for energy in (0.5, 0.9, 0.99, 0.999):
        expected = int((kept < energy).sum()) + 1
        U, _ = activation_aware_svd(W, energy=energy, gram=X.T @ X, damping=0.0)
        assert U.shape[1] == expected
    # the whitened spectrum decays much faster than W's: fewer ranks for the same energy
    Up, _ = truncated_svd(W, energy=0.99)
    Ua, _ = activation_aware_svd(W, energy=0.99, gram=X.T @ X)
    assert Ua.shape[1] < Up.shape[1]


@pytest.mark.parametrize("damping", [0.0, 1e-6])
def test_singular_gram_is_handled(damping):
    g = _gen(8)
    in_f, out_f, k = 20, 12, 5
    W = torch.randn(out_f, in_f, dtype=F64, generator=g)
    # inputs in a 5-dim subspace, and three dead (all-zero) input features
    basis = torch.randn(k, in_f, dtype=F64, generator=g)
    basis[:, [2, 7, 11]] = 0.0
    X = torch.randn(400, k, dtype=F64, generator=g) @ basis
    G = X.T @ X
    for r in (3, k, 10):
        f = factorize_weight(W, r, gram=G, damping=damping)
        assert torch.isfinite(f.U).all() and torch.isfinite(f.V).all()
        M = f.U @ f.V
        # U·V = P_r·P_rᵀ·W: never larger than W, however singular G is.
        assert float(torch.linalg.matrix_norm(M, 2)) <= float(torch.linalg.matrix_norm(W, 2)) * (
            1 + 1e-9
        )
        rel = relative_output_error(W, f.U, f.V, G)
        if r >= k:
            assert rel < 1e-5  # the outputs on the subspace are reproduced
        else:
            assert 0 < rel < 1
    # float32 / float16 with a singular Gram: no NaN
    for dtype in (torch.float32, torch.float16):
        U, V = activation_aware_svd(W.to(dtype), 4, gram=G.to(dtype), damping=damping)
        assert torch.isfinite(U).all() and torch.isfinite(V).all()


def test_zero_gram_falls_back_to_plain_svd_with_warning():
    g = _gen(9)
    W = torch.randn(8, 6, dtype=F64, generator=g)
    with pytest.warns(UserWarning, match="all zeros"):
        f = factorize_weight(W, 3, calibration=torch.zeros(10, 6, dtype=F64))
    assert not f.whitened
    U, V = truncated_svd(W, 3)
    torch.testing.assert_close(f.U @ f.V, U @ V)


def test_indefinite_gram_uses_eigen_fallback():
    g = _gen(10)
    Q = _orthogonal(6, g)
    G = Q @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, -3.0], dtype=F64)) @ Q.T
    wh = whitening_factor(G)
    assert not wh.lower_triangular
    assert torch.isfinite(wh.factor).all()
    W = torch.randn(4, 6, dtype=F64, generator=g)
    U, V = activation_aware_svd(W, 2, gram=G)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    # PSD Gram: Cholesky route with S·Sᵀ = G + λI, λ = damping·mean(diag(G))
    X = torch.randn(50, 6, dtype=F64, generator=g)
    P = X.T @ X
    wh = whitening_factor(P, damping=1e-3)
    assert wh.lower_triangular
    lam = 1e-3 * float(torch.diagonal(P).mean())
    assert wh.damping == pytest.approx(lam)
    torch.testing.assert_close(wh.factor @ wh.factor.T, P + lam * torch.eye(6, dtype=F64))
    assert torch.equal(wh.factor, torch.tril(wh.factor))


def test_gram_is_symmetrised():
    g = _gen(15)
    W = torch.randn(6, 8, dtype=F64, generator=g)
    X = _anisotropic_inputs(100, 8, g, decades=2.0)
    G = X.T @ X
    A = torch.randn(8, 8, dtype=F64, generator=g)
    A = (A - A.T) * 0.1 * float(G.abs().max())  # antisymmetric: (G + A)'s symmetric part is G
    f = factorize_weight(W, 3, gram=G)
    fa = factorize_weight(W, 3, gram=G + A)
    torch.testing.assert_close(fa.U @ fa.V, f.U @ f.V, atol=1e-10, rtol=1e-10)


def test_damping_escalates_on_cholesky_failure():
    g = _gen(11)
    X = torch.randn(3, 8, dtype=F64, generator=g)  # rank-3 Gram of size 8
    wh = whitening_factor(X.T @ X, damping=0.0)
    assert torch.isfinite(wh.factor).all()
    assert wh.lower_triangular and wh.damping >= 0.0


# ---------------------------------------------------------------------------------------------
# Rank selection
# ---------------------------------------------------------------------------------------------


def test_energy_rank_hand_checked():
    # σ² = 4, 3, 2, 1 (total 10): cumulative energy 0.4, 0.7, 0.9, 1.0
    s = torch.tensor([2.0, math.sqrt(3.0), math.sqrt(2.0), 1.0], dtype=F64)
    cases = {0.1: 1, 0.4: 1, 0.41: 2, 0.7: 2, 0.71: 3, 0.9: 3, 0.95: 4, 1.0: 4}
    for energy, expected in cases.items():
        assert select_rank(4, 4, energy=energy, singular_values=s) == expected, energy
        # the same through the SVD of a matrix with exactly that spectrum (boundaries 0.4,
        # 0.7, 0.9 included: rounding of the SVD must not flip them)
        W = torch.diag(s)
        U, _ = truncated_svd(W, energy=energy)
        assert U.shape[1] == expected, energy
    zero_tail = torch.tensor([3.0, 0.0, 0.0])
    assert select_rank(3, 3, energy=1.0, singular_values=zero_tail) == 1


def test_energy_threshold_tolerates_rounding():
    # A spectrum one rounding error below an exact boundary still selects the exact rank:
    # σ² = 4, 3·(1 − 4ε), 2, 1 keeps 0.7 of the energy at r = 2 up to rounding.
    eps = torch.finfo(F64).eps
    s = torch.tensor([2.0, math.sqrt(3.0 * (1 - 4 * eps)), math.sqrt(2.0), 1.0], dtype=F64)
    assert select_rank(4, 4, energy=0.7, singular_values=s) == 2
    # ... but a real shortfall (1e-9 relative) does not
    s[1] = math.sqrt(3.0 * (1 - 1e-9))
    assert select_rank(4, 4, energy=0.7, singular_values=s) == 3


def test_ratio_rank_hand_checked():
    # rank·(in + out) ≤ ratio·in·out
    assert select_rank(8, 8, ratio=0.5) == 2  # 2·16 = 32 ≤ 32
    assert select_rank(8, 8, ratio=0.49) == 1  # 2·16 = 32 > 31.36
    assert select_rank(8, 8, ratio=0.01) == 1  # at least 1
    assert select_rank(8, 8, ratio=100.0) == 8  # at most min(out, in)
    assert select_rank(4, 6, ratio=0.5) == 1  # floor(12 / 10)
    assert select_rank(4, 6, ratio=0.9) == 2  # floor(21.6 / 10)
    assert select_rank(4096, 1024, ratio=0.25) == 204  # floor(1048576 / 5120) = 204.8 -> 204
    U, V = truncated_svd(torch.randn(64, 64), ratio=0.25)  # floor(1024 / 128) = 8
    assert U.shape == (64, 8) and V.shape == (8, 64)
    assert select_rank(5, 7, rank=3) == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({}, "exactly one"),
        ({"rank": 2, "energy": 0.5}, "exactly one"),
        ({"energy": 0.5, "ratio": 0.5}, "exactly one"),
        ({"rank": 0}, "rank"),
        ({"rank": 7}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": "2"}, "rank"),
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.5}, "energy"),
        ({"energy": float("nan")}, "energy"),
        ({"energy": "0.5"}, "energy"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": -1.0}, "ratio"),
        ({"ratio": float("inf")}, "ratio"),
        ({"ratio": None, "rank": None, "energy": None}, "exactly one"),
    ],
)
def test_bad_rank_arguments_raise_value_error(kwargs, name):
    W = torch.randn(6, 5)
    with pytest.raises(ValueError, match=name):
        truncated_svd(W, **kwargs)
    with pytest.raises(ValueError, match=name):
        activation_aware_svd(W, **kwargs, gram=torch.eye(5))
    if "energy" not in kwargs or len(kwargs) > 1:
        with pytest.raises(ValueError, match=name):
            select_rank(6, 5, **kwargs)


def test_bad_inputs_raise_value_error():
    W = torch.randn(6, 5)
    with pytest.raises(ValueError, match="weight"):
        truncated_svd(torch.randn(6), 1)
    with pytest.raises(ValueError, match="weight"):
        truncated_svd(torch.ones(3, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="weight"):
        truncated_svd(torch.full((3, 3), float("nan")), 1)
    with pytest.raises(ValueError, match="gram"):
        activation_aware_svd(W, 2, gram=torch.eye(6))
    with pytest.raises(ValueError, match="gram"):
        activation_aware_svd(W, 2, gram=torch.full((5, 5), float("nan")))
    with pytest.raises(ValueError, match="gram"):
        activation_aware_svd(W, 2, gram=-torch.eye(5))
    with pytest.raises(ValueError, match="calibration"):
        activation_aware_svd(W, 2, calibration=torch.randn(10, 6))
    with pytest.raises(ValueError, match="calibration"):
        activation_aware_svd(W, 2, calibration=torch.randn(10, 5), gram=torch.eye(5))
    with pytest.raises(ValueError, match="calibration"):
        activation_aware_svd(W, 2)
    with pytest.raises(ValueError, match="damping"):
        activation_aware_svd(W, 2, gram=torch.eye(5), damping=-1.0)
    with pytest.raises(ValueError, match="energy needs singular_values"):
        select_rank(6, 5, energy=0.5)


# ---------------------------------------------------------------------------------------------
# GramAccumulator
# ---------------------------------------------------------------------------------------------


def test_gram_accumulator_matches_direct_gram():
    g = _gen(12)
    acc = GramAccumulator(7)
    assert acc.count == 0 and not acc.gram.any()
    parts = [
        torch.randn(3, 4, 7, generator=g),
        torch.randn(5, 7, generator=g),
        torch.randn(7, generator=g),
        torch.randn(0, 7, generator=g),
        torch.randn(2, 7, dtype=F64, generator=g).T.contiguous().T,  # non-contiguous
    ]
    for p in parts:
        acc.update(p)
    X = torch.cat([p.reshape(-1, 7).double() for p in parts])
    assert acc.count == X.shape[0] == 20
    assert acc.gram.dtype == F64
    torch.testing.assert_close(acc.gram, X.T @ X, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="7"):
        acc.update(torch.randn(4, 6))
    acc.reset()
    assert acc.count == 0 and not acc.gram.any()


def test_gram_accumulator_float64_accumulation_is_exact_enough():
    # float32 inputs with large offset: float64 accumulation keeps the Gram accurate
    x = torch.full((10000, 2), 1000.0) + torch.randn(10000, 2, generator=_gen(13))
    acc = GramAccumulator(2)
    for chunk in x.split(100):
        acc.update(chunk)
    ref = x.double().T @ x.double()
    torch.testing.assert_close(acc.gram, ref, rtol=1e-13, atol=0)


def test_no_warnings_on_regular_inputs():
    g = _gen(14)
    W = torch.randn(8, 8, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        activation_aware_svd(W, 4, calibration=torch.randn(100, 8, generator=g))
