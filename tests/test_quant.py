"""Tests of lrkernels.quant: int8 weight quantization, dequantization, group sizes and the
clip-ratio search."""

from __future__ import annotations

import math

import pytest
import torch

from lrkernels.quant import (
    DEFAULT_CLIP_GRID,
    can_pack,
    dequantize,
    group_size_of,
    layout_of,
    pack,
    packed_shape,
    quantization_error,
    quantize,
    search_clip_ratio,
    unpack,
    unpack_qweight,
    weight_shape,
)
from lrkernels.reference import dequantize_reference

F64 = torch.float64
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

# (N, K, group sizes valid for K); N odd on purpose.
SHAPES = [
    (29, 96, [None, 32]),
    (29, 160, [None, 32]),
    (29, 256, [None, 32, 64, 128]),
    (29, 45, [None]),
]
CASES = [(n, k, g) for n, k, gs in SHAPES for g in gs]
# (weight dtype, scale dtype or None = the weight's)
DTYPES = [(BF16, None), (F16, None), (F32, None), (F32, BF16), (F32, F16), (F64, None)]


def _per_element(scales: torch.Tensor, k: int) -> torch.Tensor:
    """Scales expanded to (N, K) in float64 (independent of the code under test)."""
    s = scales.to(F64)
    return s[:, None].expand(-1, k) if s.dim() == 1 else s.repeat_interleave(k // s.shape[1], 1)


def _exact(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q·s exactly (float64: ≤ 7 + 24 significant bits)."""
    return q.to(F64) * _per_element(scales, q.shape[1])


def _weight(n: int, k: int, dtype: torch.dtype, *, low: float = -1.0, high: float = 1.5):
    """Rows with magnitudes spread over 10**low..10**high, a few outliers; normal-range scales."""
    row_scale = 10 ** torch.empty(n, 1, dtype=F64).uniform_(low, high)
    w = torch.randn(n, k, dtype=F64) * row_scale
    idx = torch.randint(0, k, (n,))
    w[torch.arange(n), idx] *= 8.0  # outliers
    return w.to(dtype)


def _groups_view(t: torch.Tensor, group: int | None) -> torch.Tensor:
    n, k = t.shape
    return t.reshape(n, 1, k) if not group else t.reshape(n, k // group, group)


# ---------------------------------------------------------------------------------------------
# Error bound, shapes, scale values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wdtype,sdtype", DTYPES)
@pytest.mark.parametrize("n,k,group", CASES)
def test_error_bound_per_element(n, k, group, wdtype, sdtype):
    w = _weight(n, k, wdtype)
    q, s = quantize(w, group, scale_dtype=sdtype)
    want_sdtype = sdtype or (F32 if wdtype == F64 else wdtype)
    assert q.dtype == torch.int8 and q.shape == (n, k) and q.is_contiguous()
    assert s.dtype == want_sdtype and s.is_contiguous()
    assert s.shape == ((n,) if group is None else (n, k // group))
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    step = _per_element(s, k)
    err = (w.to(F64) - _exact(q, s)).abs()
    worst = float((err / step).max())
    assert worst <= 0.5, f"|w - q*s| reached {worst} * s"
    # The absmax element of every channel/group maps to ±127 (normal-range scales: no level
    # is wasted), and the scale is absmax/127 to within one ulp of the scale dtype.
    qg = _groups_view(q, group).abs().amax(-1)
    assert bool((qg == 127).all())
    amax = _groups_view(w.to(F64), group).abs().amax(-1)
    ideal = amax / 127
    rel = ((s.to(F64).reshape(ideal.shape) - ideal).abs() / ideal).max()
    ulp = {BF16: 2.0**-7, F16: 2.0**-10, F32: 2.0**-23}[want_sdtype]
    assert float(rel) <= ulp


@pytest.mark.parametrize("sdtype", [BF16, F16, F32])
@pytest.mark.parametrize("group", [None, 32])
def test_clip_ratio_bound_and_clipping(group, sdtype):
    w = _weight(13, 128, F32)
    ratio = 0.8
    q, s = quantize(w, group, scale_dtype=sdtype, clip_ratio=ratio)
    w64 = w.to(F64)
    thr = _groups_view(w64, group).abs().amax(-1, keepdim=True) * ratio
    inside = (_groups_view(w64, group).abs() <= thr).reshape(w.shape)
    err = (w64 - _exact(q, s)).abs() / _per_element(s, 128)
    assert float(err[inside].max()) <= 0.5
    assert (~inside).any()
    assert bool((q[~inside].abs() == 127).all())  # clipped to the end of the grid
    assert bool((q[~inside].sign() == w[~inside].sign()).all())


def test_per_channel_clip_ratio_tensor_equals_row_by_row():
    w = _weight(9, 64, BF16)
    ratios = torch.tensor([1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.5, 0.01], dtype=F64)
    for group in (None, 32):
        q, s = quantize(w, group, clip_ratio=ratios)
        for i in range(9):
            qi, si = quantize(w[i : i + 1], group, clip_ratio=float(ratios[i]))
            assert torch.equal(q[i : i + 1], qi) and torch.equal(s[i : i + 1], si)
    q0, s0 = quantize(w, clip_ratio=torch.tensor(0.9))  # a 0-d tensor broadcasts
    q1, s1 = quantize(w, clip_ratio=0.9)
    assert torch.equal(q0, q1) and torch.equal(s0, s1)


# ---------------------------------------------------------------------------------------------
# Exactness, zeros, scale rounding edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wdtype,sdtype", [(BF16, BF16), (F16, F16), (F32, F32), (F32, BF16), (F32, F16)]
)
@pytest.mark.parametrize("group", [None, 32, 128])
def test_already_quantized_weight_is_reproduced_exactly(group, wdtype, sdtype):
    n, k = 29, 256
    g = group or k
    q = torch.randint(-127, 128, (n, k), dtype=torch.int16)
    # every channel/group reaches ±127 (else its absmax scale would differ)
    pos = torch.randint(0, g, (n, k // g)) + torch.arange(0, k, g)
    sign = torch.randint(0, 2, (n, k // g)) * 2 - 1
    q.scatter_(1, pos, (127 * sign).to(torch.int16))
    shape = (n,) if group is None else (n, k // g)
    if wdtype in (BF16, F16):
        # powers of two: q·s (≤ 7 significant bits) is representable in the 16-bit weight
        s = 2.0 ** torch.randint(-10, 1, shape).to(F64)
    else:
        # ≤ 8 significant bits: representable in every scale dtype, q·s exact in float32
        s = (torch.rand(shape, dtype=F64) * 3 + 0.01).to(BF16).to(F64)
    w = _exact(q, s).to(wdtype)
    assert torch.equal(w.to(F64), _exact(q, s))  # the premise: w is exactly q·s
    q2, s2 = quantize(w, group, scale_dtype=sdtype)
    assert torch.equal(q2, q.to(torch.int8))
    assert torch.equal(s2, s.to(sdtype))


@pytest.mark.parametrize("wdtype", [BF16, F16, F32])
@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_quantize_dequantize_quantize_is_a_fixed_point(group, wdtype):
    w = _weight(29, 256, wdtype)
    q, s = quantize(w, group)
    w2 = dequantize(q, s, dtype=F64)
    q2, s2 = quantize(w2, group, scale_dtype=s.dtype)
    assert torch.equal(q, q2) and torch.equal(s, s2)


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("group", [None, 32])
def test_zero_rows_and_groups(group, dtype):
    w = torch.randn(7, 96, dtype=dtype)
    w[0] = 0
    w[3] = 0
    w[5, 32:64] = 0
    q, s = quantize(w, group)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert not q[0].any() and not q[3].any()
    if group:
        assert not q[5, 32:64].any()
        assert float(s[5, 1]) == 1.0
    assert float(s[0].min()) == 1.0 == float(s[3].max())
    dq = dequantize(q, s, dtype=F64)
    assert not dq[0].any() and not dq[3].any()
    assert bool(torch.isfinite(dq).all())
    q0, s0 = quantize(torch.zeros(3, 64, dtype=dtype), group)
    assert not q0.any() and bool((s0 == 1).all())


def _bf16_neighbours(x: float) -> tuple[float, float]:
    """The bfloat16 values just below/at and just above the float64 x (x > 0, normal)."""
    e = math.floor(math.log2(x))
    ulp = 2.0 ** (e - 7)
    down = math.floor(x / ulp) * ulp
    return down, down + ulp


def _worst_bf16_round_down(wdtype: torch.dtype) -> tuple[float, float]:
    """An absmax m (representable in wdtype) whose scale m/127 bfloat16 rounds DOWN the most,
    and that rounded-down scale."""
    if wdtype == BF16:  # search every bf16 value in [1, 2)
        best = None
        for j in range(128):
            m = 1.0 + j / 128
            exact = m / 127
            down, up = _bf16_neighbours(exact)
            if exact - down < up - exact:  # round-to-nearest goes down
                if best is None or m / down > best[0] / best[1]:
                    best = (m, down)
        return best
    # float32 weight: put m/127 just below the midpoint between two bf16 values
    down, ulp = 1.0 + 3 / 128, 2.0**-7
    m = float(torch.tensor(127 * (down + 0.5 * ulp * (1 - 2.0**-10)), dtype=F64).to(F32))
    assert _bf16_neighbours(m / 127)[0] == down
    return m, down


@pytest.mark.parametrize("wdtype", [BF16, F32])
def test_bf16_scale_rounded_down_never_clips(wdtype):
    m, down = _worst_bf16_round_down(wdtype)
    # m / down > 127.25: rounding the scale down pushed the absmax well past 127 steps
    assert m / down > (127.25 if wdtype == BF16 else 127.45)
    k = 128
    w = torch.linspace(-m, m, k, dtype=F64).to(wdtype)
    w[0], w[-1] = -m, m
    w = torch.stack([w, -w.flip(0), 2.0**-20 * w])  # also the same shape far down in range
    assert float(w[0].abs().max()) == m
    q, s = quantize(w, scale_dtype=BF16)
    assert float(s[0]) == down  # the nearest bf16 scale; no bump needed since m/s <= 127.5
    ratio = w.to(F64) / s.to(F64)[:, None]
    assert float(ratio.abs().max()) <= 127.5  # no element needs clipping
    assert int(q.abs().max()) == 127
    err = (w.to(F64) - _exact(q, s)).abs() / s.to(F64)[:, None]
    assert float(err.max()) <= 0.5


def test_subnormal_scale_rounded_down_is_bumped_up():
    # float16 weight with absmax 178·2^-24 (subnormal): the exact scale 1.40·2^-24 rounds down
    # to 2^-24, which would need q = 178 — the scale must be raised to 2·2^-24.
    tiny = 2.0**-24
    w = (torch.arange(-178, 179, dtype=F64) * tiny).to(F16).reshape(1, -1)
    w = torch.nn.functional.pad(w, (0, 384 - w.shape[1])).reshape(3, 128)
    w[1:] = w[0]
    assert float(w.abs().max()) == 178 * tiny
    for group in (None, 32, 128):
        q, s = quantize(w, group)
        assert float(s.to(F64).min()) >= tiny
        step = _per_element(s, 128)
        assert float((w.to(F64) / step).abs().max()) <= 127.5
        err = (w.to(F64) - _exact(q, s)).abs() / step
        assert float(err.max()) <= 0.5
    _, s = quantize(w)
    assert float(s[0]) == 2 * tiny


def test_scale_that_rounds_to_zero_is_positive():
    w = torch.randn(4, 64, dtype=F32) * 1e-9  # absmax/127 ≈ 1e-11: below float16's range
    q, s = quantize(w, scale_dtype=F16)
    assert bool((s > 0).all())
    err = (w.to(F64) - _exact(q, s)).abs() / s.to(F64)[:, None]
    assert float(err.max()) <= 0.5


def test_scale_overflow_raises():
    w = torch.full((2, 64), 1e7, dtype=F32)
    with pytest.raises(ValueError, match="overflows"):
        quantize(w, scale_dtype=F16)


# ---------------------------------------------------------------------------------------------
# dequantize, group sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_dequantize_is_close_and_matches_reference(group, dtype):
    w = torch.randn(29, 256, dtype=dtype)
    q, s = quantize(w, group)
    dq = dequantize(q, s)
    assert dq.dtype == dtype and dq.shape == w.shape
    # relative error of the exact q·s: about max|w| / 127 / sqrt(12) / rms(w)
    rel = float((_exact(q, s) - w.to(F64)).norm() / w.to(F64).norm())
    assert 0 < rel < (0.01 if group is None else 0.008)  # > 0: random w is not on the grid
    assert quantization_error(w, q, s) == pytest.approx(rel, rel=1e-9)
    # materialised in the weight's dtype: one more rounding of q·s
    rel_dq = float((dq.to(F64) - w.to(F64)).norm() / w.to(F64).norm())
    assert rel_dq < 0.012
    assert torch.equal(dq, dequantize_reference(q, s, dtype))
    for out in (F32, F64):
        assert torch.equal(dequantize(q, s, dtype=out), dequantize_reference(q, s, out))
    assert torch.equal(dequantize(q, s, group_size=group), dq)
    if dtype != F32:  # 16-bit scales: the float32 product is exact
        assert torch.equal(dequantize(q, s, dtype=F32).to(F64), _exact(q, s))


def test_group_size_of_rules():
    q = torch.zeros(5, 256, dtype=torch.int8)
    assert group_size_of(q, torch.ones(5)) == 0
    assert group_size_of(q, torch.ones(5, 8)) == 32
    assert group_size_of(q, torch.ones(5, 4, dtype=BF16)) == 64
    assert group_size_of(q, torch.ones(5, 2, dtype=F16)) == 128
    assert group_size_of(torch.zeros(3, 128, dtype=torch.int8), torch.ones(3, 1)) == 128
    assert group_size_of(torch.zeros(3, 45, dtype=torch.int8), torch.ones(3)) == 0


@pytest.mark.parametrize(
    "qshape,qdtype,sshape,sdtype,exc,match",
    [
        (
            (5, 256),
            torch.int8,
            (5, 1),
            F32,
            ValueError,
            r"scales .*group size must be 32, 64 or 128",
        ),
        ((5, 256), torch.int8, (5, 16), F32, ValueError, r"scales .*group size"),
        ((5, 100), torch.int8, (5, 3), F32, ValueError, r"scales .*divide in_features"),
        (
            (5, 256),
            torch.int8,
            (6,),
            F32,
            ValueError,
            r"scales: per-channel scales must have shape \(5,\)",
        ),
        ((5, 256), torch.int8, (6, 8), F32, ValueError, r"scales must have shape \(5,\) or"),
        ((5, 256), torch.int8, (5, 8, 1), F32, ValueError, r"scales must have shape"),
        ((5, 256), torch.int8, (5, 0), F32, ValueError, r"scales must have shape"),
        ((5, 256), torch.int8, (5,), torch.int32, TypeError, r"scales must be a floating-point"),
        ((5, 256), torch.int16, (5,), F32, TypeError, r"qweight must be int8"),
        ((5, 256), torch.uint8, (5,), F32, TypeError, r"qweight must be int8"),
        ((256,), torch.int8, (5,), F32, ValueError, r"qweight must be 2-D"),
    ],
)
def test_group_size_of_errors(qshape, qdtype, sshape, sdtype, exc, match):
    q = torch.zeros(qshape, dtype=qdtype)
    s = torch.ones(sshape, dtype=sdtype)
    with pytest.raises(exc, match=match):
        group_size_of(q, s)
    with pytest.raises(exc, match=match):
        dequantize(q, s)


def test_group_size_of_rejects_non_tensors():
    with pytest.raises(TypeError, match="qweight must be a torch.Tensor"):
        group_size_of([[1]], torch.ones(1))
    with pytest.raises(TypeError, match="scales must be a torch.Tensor"):
        group_size_of(torch.zeros(1, 32, dtype=torch.int8), 1.0)


def test_dequantize_checks_group_size_and_dtype():
    q = torch.zeros(4, 128, dtype=torch.int8)
    s = torch.ones(4, 4)
    assert dequantize(q, s, group_size=32).shape == (4, 128)
    with pytest.raises(ValueError, match=r"group_size=64 does not match scales of shape \(4, 4\)"):
        dequantize(q, s, group_size=64)
    with pytest.raises(ValueError, match=r"group_size=0 does not match .* imply group size 32"):
        dequantize(q, s, group_size=0)
    with pytest.raises(ValueError, match="group_size must be"):
        dequantize(q, s, group_size=48)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        dequantize(q, s, dtype=torch.int32)
    assert dequantize(q, torch.ones(4), group_size=0).shape == (4, 128)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda w: quantize(w[:, :40], 32),
            ValueError,
            r"in_features \(40\) must be divisible by group_size \(32\)",
        ),
        (lambda w: quantize(w, 16), ValueError, "group_size must be None"),
        (lambda w: quantize(w, 256), ValueError, "group_size must be None"),
        (lambda w: quantize(w, True), ValueError, "group_size must be"),
        (lambda w: quantize(w, 32.0), ValueError, "group_size must be"),
        (lambda w: quantize(w.to(torch.int32)), TypeError, "weight must be a floating-point"),
        (lambda w: quantize(w.tolist()), TypeError, "weight must be a torch.Tensor"),
        (lambda w: quantize(w[0]), ValueError, r"weight must be 2-D"),
        (lambda w: quantize(w[None]), ValueError, r"weight must be 2-D"),
        (lambda w: quantize(w[:0]), ValueError, "weight must not be empty"),
        (lambda w: quantize(w, scale_dtype=F64), ValueError, "scale_dtype must be"),
        (lambda w: quantize(w, scale_dtype=torch.int8), ValueError, "scale_dtype must be"),
        (lambda w: quantize(w, clip_ratio=0.0), ValueError, r"clip_ratio must be in \(0, 1\]"),
        (lambda w: quantize(w, clip_ratio=1.01), ValueError, r"clip_ratio must be in \(0, 1\]"),
        (lambda w: quantize(w, clip_ratio=float("nan")), ValueError, "clip_ratio must be in"),
        (lambda w: quantize(w, clip_ratio=-0.5), ValueError, "clip_ratio must be in"),
        (lambda w: quantize(w, clip_ratio="0.9"), TypeError, "clip_ratio must be a real number"),
        (lambda w: quantize(w, clip_ratio=True), TypeError, "clip_ratio must be a real number"),
        (
            lambda w: quantize(w, clip_ratio=torch.ones(3)),
            ValueError,
            r"clip_ratio must be .* shape \(4,\)",
        ),
        (
            lambda w: quantize(w, clip_ratio=torch.tensor([1.0, 0.9, 0.0, 1.0])),
            ValueError,
            "clip_ratio must be in",
        ),
        (
            lambda w: quantize(w, clip_ratio=torch.ones(4, dtype=torch.bool)),
            TypeError,
            "clip_ratio must be a real tensor",
        ),
        (
            lambda w: quantize(w.index_fill(1, torch.tensor([3]), float("inf"))),
            ValueError,
            "non-finite",
        ),
    ],
)
def test_quantize_errors(call, exc, match):
    w = torch.randn(4, 64)
    with pytest.raises(exc, match=match):
        call(w)


def test_group_size_zero_means_per_channel():
    w = torch.randn(4, 64)
    q0, s0 = quantize(w, 0)
    q1, s1 = quantize(w)
    assert torch.equal(q0, q1) and torch.equal(s0, s1) and s0.shape == (4,)


def test_quantize_does_not_modify_or_track_the_weight():
    w = torch.randn(8, 64, requires_grad=True)
    before = w.detach().clone()
    q, s = quantize(w, 32)
    assert torch.equal(w.detach(), before)
    assert not q.requires_grad and not s.requires_grad


def test_row_blocks_give_the_same_result(monkeypatch):
    import lrkernels.quant as quant

    w = _weight(37, 128, BF16)
    ref = quantize(w, 32, clip_ratio=0.9)
    monkeypatch.setattr(quant, "_BLOCK_ELEMENTS", 128 * 5)  # 5 rows per block
    out = quantize(w, 32, clip_ratio=0.9)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    X = torch.randn(50, 128)
    r1 = search_clip_ratio(w, X, group_size=32)
    monkeypatch.setattr(quant, "_BLOCK_ELEMENTS", 1 << 24)
    assert torch.equal(r1, search_clip_ratio(w, X, group_size=32))


# ---------------------------------------------------------------------------------------------
# Clip-ratio search
# ---------------------------------------------------------------------------------------------


def _row_objective(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, G: torch.Tensor):
    """(w − q·s)ᵀ·G·(w − q·s) per row, float64 (the test's own implementation)."""
    e = w.to(F64) - _exact(q, s)
    return torch.einsum("nk,kl,nl->n", e, G, e)


def _calibration(m: int, k: int) -> torch.Tensor:
    # activations with per-channel scales spread over orders of magnitude, as in real models
    return torch.randn(m, k, dtype=F64) * torch.exp(1.5 * torch.randn(k, dtype=F64))


@pytest.mark.parametrize("sdtype", [BF16, F32])
@pytest.mark.parametrize("group", [None, 32])
def test_clip_search_is_optimal_on_grid_and_never_worse(group, sdtype):
    n, k = 24, 128
    w = (torch.distributions.StudentT(2.0).sample((n, k)) * 0.05).to(F32)
    X = _calibration(200, k)
    G = X.T @ X
    ratios = search_clip_ratio(w, X.to(F32), group_size=group, scale_dtype=sdtype)
    assert ratios.shape == (n,) and ratios.dtype == F64
    assert set(ratios.tolist()) <= set(DEFAULT_CLIP_GRID)
    per_candidate = torch.stack(
        [
            _row_objective(w, *quantize(w, group, scale_dtype=sdtype, clip_ratio=c), G)
            for c in DEFAULT_CLIP_GRID
        ]
    )
    chosen = _row_objective(w, *quantize(w, group, scale_dtype=sdtype, clip_ratio=ratios), G)
    torch.testing.assert_close(chosen, per_candidate.min(0).values, rtol=1e-9, atol=0)
    assert bool((chosen <= per_candidate[0] * (1 + 1e-12)).all())  # never worse than clip 1.0


def test_clip_search_strictly_better_on_outliers_in_quiet_inputs():
    # Heavy-tailed weight: a 25σ outlier in every group of 32 inputs of every row, sitting on
    # input features whose activations are small. Clipping the outliers costs little output
    # error while the finer scale helps every other weight of the row.
    n, k = 16, 256
    w = torch.randn(n, k, dtype=F64)
    cols = torch.arange(7, k, 32)
    w[:, cols] = 25.0 * torch.where(torch.rand(n, len(cols)) < 0.5, -1.0, 1.0).to(F64)
    w = w.to(F32)
    col_scale = torch.ones(k, dtype=F64)
    col_scale[cols] = 0.02
    X = torch.randn(400, k, dtype=F64) * col_scale
    G = X.T @ X
    for group in (None, 32):
        ratios = search_clip_ratio(w, gram=G, group_size=group)
        base = _row_objective(w, *quantize(w, group), G)
        clipped = _row_objective(w, *quantize(w, group, clip_ratio=ratios), G)
        assert bool((clipped <= base * (1 + 1e-12)).all())
        assert bool((clipped < base).all())
        assert float(clipped.sum()) < 0.85 * float(base.sum())
        assert bool((ratios < 1).all())
        q1, s1 = quantize(w, group)
        q2, s2 = quantize(w, group, clip_ratio=ratios)
        assert quantization_error(w, q2, s2, G) < quantization_error(w, q1, s1, G)
    # Without calibration data (identity Gram) clipping does not pay off at 8 bits.
    r = search_clip_ratio(w, gram=torch.eye(k))
    assert bool((r == 1).all())


def test_clip_search_gram_and_calibration_agree():
    w = torch.randn(10, 64)
    X = torch.randn(3, 40, 64) * torch.exp(torch.randn(64))
    G = X.reshape(-1, 64).double().T @ X.reshape(-1, 64).double()
    r1 = search_clip_ratio(w, X)
    r2 = search_clip_ratio(w, gram=G)
    assert torch.equal(r1, r2)


def test_clip_search_ties_keep_no_clipping():
    # zero Gram: every candidate scores 0, so 1.0 (no clipping) must be kept
    w = torch.randn(6, 64)
    r = search_clip_ratio(w, gram=torch.zeros(64, 64), grid=(0.8, 0.9))
    assert torch.equal(r, torch.ones(6, dtype=F64))


def test_clip_search_errors():
    w = torch.randn(4, 64)
    X = torch.randn(8, 64)
    with pytest.raises(ValueError, match="exactly one of calibration"):
        search_clip_ratio(w)
    with pytest.raises(ValueError, match="exactly one of calibration"):
        search_clip_ratio(w, X, gram=X.T @ X)
    with pytest.raises(ValueError, match=r"calibration must have shape \(\.\.\., 64\)"):
        search_clip_ratio(w, X[:, :32])
    with pytest.raises(ValueError, match=r"gram must have shape \(64, 64\)"):
        search_clip_ratio(w, gram=torch.eye(32))
    with pytest.raises(ValueError, match=r"grid values must be in \(0, 1\]"):
        search_clip_ratio(w, X, grid=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"grid values must be in \(0, 1\]"):
        search_clip_ratio(w, X, grid=(1.2,))
    with pytest.raises(ValueError, match="group_size must be"):
        search_clip_ratio(w, X, group_size=48)
    with pytest.raises(TypeError, match="calibration must be a torch.Tensor"):
        search_clip_ratio(w, X.tolist())


# ---------------------------------------------------------------------------------------------
# Layout 2: the packed weight
# ---------------------------------------------------------------------------------------------


def _packed_element(packed: torch.Tensor, n: int, k: int) -> int:
    """q[n, k] read from the packed bytes by the documented formula (independent of unpack)."""
    nb, j, g = n // 32, (n % 32) // 8, n % 8
    kb, kk = k // 16, k % 16
    b1, t, b0 = kk // 8, (kk % 8) // 2, kk % 2
    return int(packed[nb, kb, 16 * (4 * g + t) + 4 * j + 2 * b1 + b0])


@pytest.mark.parametrize(
    "n,k,group", [(1, 16, None), (29, 96, 32), (33, 48, None), (64, 256, 128), (70, 192, 64)]
)
def test_pack_follows_the_documented_layout_and_round_trips(n, k, group):
    q, s = quantize(torch.randn(n, k), group, scale_dtype=BF16)
    packed, ps = pack(q, s)
    assert layout_of(q) == 1 and layout_of(packed) == 2
    assert packed.shape == packed_shape(n, k) == (-(-n // 32), k // 16, 512)
    assert packed.dtype == torch.int8 and packed.is_contiguous()
    for _ in range(300):
        i, c = int(torch.randint(0, n, ())), int(torch.randint(0, k, ()))
        assert _packed_element(packed, i, c) == int(q[i, c])
    rows = packed.view(-1, 32, 16)  # padding rows are zero
    assert int(rows.abs().sum()) == int(q.abs().sum())
    # Scales: same values and shape; group scales stored group-major (column-major).
    assert torch.equal(ps, s) and ps.shape == s.shape
    if group:
        assert ps.stride() == (1, n)
    q2, s2 = unpack(packed, ps)
    assert torch.equal(q2, q) and torch.equal(s2, s) and s2.is_contiguous()
    assert group_size_of(packed, ps) == (group or 0)
    assert weight_shape(packed, ps) == (n, k)
    for dtype in (F32, BF16, F64):
        assert torch.equal(dequantize(packed, ps, dtype=dtype), dequantize(q, s, dtype=dtype))
        assert torch.equal(
            dequantize_reference(packed, ps, dtype), dequantize_reference(q, s, dtype)
        )
    qp, sp = quantize(torch.randn(n, k), group, layout=2)
    assert layout_of(qp) == 2 and group_size_of(qp, sp) == (group or 0)
    assert pack(packed, ps)[0] is packed  # packing a packed weight is a no-op


def test_pack_errors():
    q = torch.zeros(8, 40, dtype=torch.int8)
    assert not can_pack(40) and can_pack(48) and not can_pack(0)
    with pytest.raises(ValueError, match=r"in_features % 16 == 0, got 40"):
        pack(q, torch.ones(8))
    with pytest.raises(ValueError, match=r"in_features % 16 == 0, got 40"):
        quantize(torch.randn(8, 40), layout=2)
    with pytest.raises(ValueError, match="layout must be 1 or 2"):
        quantize(torch.randn(8, 48), layout=3)
    packed = torch.zeros(2, 3, 512, dtype=torch.int8)
    assert group_size_of(packed, torch.ones(40)) == 0
    with pytest.raises(ValueError, match="group size must be 32, 64 or 128"):
        group_size_of(packed, torch.ones(64, 3, dtype=F16))  # K = 48 in 3 groups of 16
    assert group_size_of(torch.zeros(2, 4, 512, dtype=torch.int8), torch.ones(64, 2)) == 32
    with pytest.raises(ValueError, match=r"holds ceil\(N / 32\) = 2 row units"):
        group_size_of(packed, torch.ones(65))
    with pytest.raises(ValueError, match=r"or packed \(layout 2"):
        layout_of(torch.zeros(2, 3, 256, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"scales of shape \(70,\) give N = 70"):
        unpack(packed, torch.ones(70))
    with pytest.raises(ValueError, match="does not match a packed weight"):
        unpack_qweight(packed, 70)
