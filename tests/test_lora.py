"""lora_linear / lora_linear_multi: every backend against the float64 reference (dense and int8
bases, dropout with a bit-exact regenerated mask), gradients, torch.library checks,
torch.compile, and argument errors."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_matches, device_for, skip_unless_runs

import lrkernels
from lrkernels.reference import (
    lora_dropout_keep_mask,
    lora_dropout_threshold,
    lora_keep_scale,
    lora_linear_exact,
    lora_linear_multi_exact,
    lora_linear_multi_reference,
    lora_linear_reference,
)

BACKENDS = ["cuda", "triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch shape, in, out, r, base): base "dense" or an int8 group size (0 = per channel).
SHAPES = [
    ((1,), 64, 40, 4, "dense"),
    ((5,), 45, 29, 3, "dense"),
    ((2, 3), 96, 33, 16, 32),
    ((17,), 128, 24, 8, 64),
    ((37,), 256, 31, 16, 128),
    ((16,), 160, 29, 1, 0),
    ((33,), 72, 65, 5, "dense"),
    ((0,), 64, 8, 4, 32),
    ((2, 0, 3), 32, 8, 2, "dense"),
    ((), 64, 12, 4, 64),
]


def make_base(kind, N, K, dtype, device):
    """A dense weight (N, K) or an int8 (qweight, scales) with |W| ~ 1/sqrt(K)."""
    if kind == "dense":
        return (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    q = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8)
    shape = (N,) if kind == 0 else (N, K // kind)
    s = ((torch.rand(shape, device=device) + 0.5) / (127 * K**0.5)).to(dtype)
    return (q, s)


def make_inputs(batch, K, N, r, kind, dtype, device, bias=True):
    x = torch.randn(*batch, K, device=device).to(dtype)
    base = make_base(kind, N, K, dtype, device)
    A = (torch.randn(r, K, device=device) / K**0.5).to(dtype)
    B = torch.randn(N, r, device=device).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return x, base, A, B, b


def split(base):
    return (base, None) if isinstance(base, torch.Tensor) else base


def refs(x, base, A, B, b, scale, p=0.0, seed=None):
    w, ws = split(base)
    thr = lora_dropout_threshold(p) if p else 0
    s = scale * (lora_keep_scale(thr) if thr else 1.0)
    return (
        lora_linear_exact(x, w, ws, A, B, b, s, thr, seed),
        lora_linear_reference(x, w, ws, A, B, b, s, thr, seed),
    )


def reasons_args(x, base, A, B, b):
    w, ws = split(base)
    return (x, w, ws, A, B, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(backend, dtype, shape):
    x, base, A, B, b = make_inputs(*shape, dtype, device_for(backend))
    skip_unless_runs("lora_linear", backend, *reasons_args(x, base, A, B, b))
    out = lrkernels.lora_linear(x, base, A, B, b, scale=0.75, backend=backend)
    assert out.dtype == x.dtype and out.device == x.device
    assert_matches(out, *refs(x, base, A, B, b, 0.75))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_forward_float64(backend):
    x, base, A, B, b = make_inputs((7,), 40, 12, 3, "dense", torch.float64, "cpu")
    skip_unless_runs("lora_linear", backend, *reasons_args(x, base, A, B, b))
    out = lrkernels.lora_linear(x, base, A, B, b, scale=2.0, backend=backend)
    torch.testing.assert_close(out, refs(x, base, A, B, b, 2.0)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", 32])
def test_forward_non_contiguous_no_bias(backend, kind):
    dev = device_for(backend)
    x, base, A, B, _ = make_inputs((6, 4), 64, 20, 5, kind, torch.float16, dev, bias=False)
    x = x.transpose(0, 1)
    A = A.t().contiguous().t()
    B = torch.randn(5, 20, device=dev).to(torch.float16).t()
    if kind == "dense":
        base = torch.randn(20, 128, device=dev).to(torch.float16)[:, ::2] / 8
    assert not (x.is_contiguous() or A.is_contiguous() or B.is_contiguous())
    skip_unless_runs("lora_linear", backend, *reasons_args(x, base, A, B, None))
    out = lrkernels.lora_linear(x, base, A, B, scale=0.5, backend=backend)
    assert_matches(out, *refs(x, base, A, B, None, 0.5))


# ------------------------------------------------------------------------------- dropout


def test_mask_statistics_and_determinism():
    thr = lora_dropout_threshold(0.1)
    keep = lora_dropout_keep_mask(12345, 512, 300, thr)
    assert abs(keep.float().mean().item() - (1 - thr / 65536)) < 0.005
    assert torch.equal(keep, lora_dropout_keep_mask(12345, 512, 300, thr))
    other = lora_dropout_keep_mask(12346, 512, 300, thr)
    assert (keep != other).float().mean() > 0.1  # another seed, another mask
    # Rows and column pairs are not copies of each other.
    assert (keep[1:] != keep[:-1]).float().mean() > 0.1
    assert (keep[:, 2:] != keep[:, :-2]).float().mean() > 0.1
    # The seed's high bits are ignored (documented): only the low 32 bits count.
    assert torch.equal(keep, lora_dropout_keep_mask(12345 + (7 << 32), 512, 300, thr))
    # A tensor seed gives the same mask as the int.
    assert torch.equal(keep, lora_dropout_keep_mask(torch.tensor([12345]), 512, 300, thr))


def test_mask_known_values():
    """Pins the hash (every backend must compute exactly these bits)."""
    keep = lora_dropout_keep_mask(42, 3, 8, 32768)
    expected = keep.int().tolist()

    # lowbias32 by hand, for row 1 and columns 0..3.
    def mix(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    key = mix(42 ^ mix(1))
    for c in range(8):
        word = mix((key + (c >> 1) * 0x9E3779B9) & 0xFFFFFFFF)
        assert expected[1][c] == int(((word >> (16 * (c & 1))) & 0xFFFF) >= 32768)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", 0])
def test_dropout_mask_is_bit_exact(backend, kind):
    """With A = I (r = in), the op's second output t = keep ⊙ x: the kernel's mask exactly."""
    dev = device_for(backend)
    M, K, N = 37, 48, 24
    x = torch.randn(M, K, device=dev) + 3.0  # no zeros: a kept element is visibly kept
    base = make_base(kind, N, K, torch.float32, dev)
    A = torch.eye(K, device=dev)
    B = torch.randn(N, K, device=dev)
    w, ws = split(base)
    skip_unless_runs("lora_linear", backend, x, w, ws, A, B, None)
    if backend == "torch":
        pytest.skip("torch: the reference itself")
    if backend == "triton":
        lrkernels.ops.register_triton_ops()  # registered on first use otherwise
    op = (
        torch.ops.lrkernels.lora_linear_triton
        if backend == "triton"
        else torch.ops.lrkernels.lora_linear
    )
    thr = lora_dropout_threshold(0.3)
    seed = torch.tensor([987654321], device=dev)
    _, t = op(x, w, ws, A, B, None, 1.0, thr, seed)
    keep = lora_dropout_keep_mask(seed, M, K, thr)
    assert torch.equal(t, x * keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", 64])
def test_dropout_forward_and_gradients(backend, kind):
    dev = device_for(backend)
    x, base, A, B, b = make_inputs((3, 7), 128, 40, 6, kind, torch.float32, dev)
    skip_unless_runs("lora_linear", backend, *reasons_args(x, base, A, B, b))
    seed = 2024
    xs, As, Bs, bs = (t.detach().requires_grad_() for t in (x, A, B, b))
    out = lrkernels.lora_linear(
        xs, base, As, Bs, bs, scale=0.5, dropout_p=0.25, dropout_seed=seed, backend=backend
    )
    exact, same = refs(x, base, A, B, b, 0.5, 0.25, seed)
    assert_matches(out.detach(), exact, same)
    dy = torch.randn_like(out)
    out.backward(dy)
    xd, Ad, Bd, bd = (t.detach().double().requires_grad_() for t in (x, A, B, b))
    w, ws = split(base)
    thr = lora_dropout_threshold(0.25)
    ref = lora_linear_exact(xd, w, ws, Ad, Bd, bd, 0.5 * lora_keep_scale(thr), thr, seed)
    ref.backward(dy.double())
    for name, got, want in (("dx", xs, xd), ("dA", As, Ad), ("dB", Bs, Bd), ("db", bs, bd)):
        err = (got.grad.double() - want.grad).norm() / want.grad.norm()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


def test_dropout_seed_drawn_and_eval_has_no_dropout():
    x, base, A, B, b = make_inputs((8,), 32, 16, 4, "dense", torch.float32, "cpu")
    y1 = lrkernels.lora_linear(x, base, A, B, b, scale=1.0, dropout_p=0.5)
    y2 = lrkernels.lora_linear(x, base, A, B, b, scale=1.0, dropout_p=0.5)
    assert not torch.equal(y1, y2)  # a fresh seed per call
    y0 = lrkernels.lora_linear(x, base, A, B, b, scale=1.0)
    torch.testing.assert_close(y0, refs(x, base, A, B, b, 1.0)[1])


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dense", 0, 32])
@pytest.mark.parametrize("M", [3, 21])
def test_gradients(backend, kind, M):
    dev = device_for(backend)
    x, base, A, B, b = make_inputs((M,), 64, 24, 5, kind, torch.float32, dev)
    skip_unless_runs("lora_linear", backend, *reasons_args(x, base, A, B, b))
    xs, As, Bs, bs = (t.detach().requires_grad_() for t in (x, A, B, b))
    dy = torch.randn(M, 24, device=dev)
    lrkernels.lora_linear(xs, base, As, Bs, bs, scale=1.5, backend=backend).backward(dy)
    xd, Ad, Bd, bd = (t.detach().double().requires_grad_() for t in (x, A, B, b))
    w, ws = split(base)
    lora_linear_exact(xd, w, ws, Ad, Bd, bd, 1.5).backward(dy.double())
    for name, got, want in (("dx", xs, xd), ("dA", As, Ad), ("dB", Bs, Bd), ("db", bs, bd)):
        err = (got.grad.double() - want.grad).norm() / want.grad.norm()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("kind", ["dense", 32])
def test_grad_ops_half(backend, kind):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no CUDA device")
    dev = "cuda" if backend == "cuda" else "cpu"
    M, K, N, r = 19, 96, 40, 7
    dy = torch.randn(M, N, device=dev).half()
    base = make_base(kind, N, K, torch.float16, dev)
    w, ws = split(base)
    A = (torch.randn(r, K, device=dev) / 4).half()
    dt = torch.randn(M, r, device=dev).half()
    skip_unless_runs("lora_linear", backend, dy, w, ws, A, A, None)
    thr, seed = lora_dropout_threshold(0.2), torch.tensor([77], device=dev)
    keep = lora_dropout_keep_mask(seed, M, K, thr)
    out = torch.ops.lrkernels.lora_linear_grad_input(dy, w, ws, dt, A, thr, seed)
    wd = (
        w.double()
        if ws is None
        else lrkernels.reference.dequantize_reference(w, ws.double(), torch.float64)
    )
    exact = dy.double() @ wd + keep * (dt.double() @ A.double())
    wh = w if ws is None else lrkernels.reference.dequantize_reference(w, ws, torch.float16)
    same = dy @ wh + keep * (dt @ A)
    assert_matches(out, exact, same, what="grad_input")
    x = torch.randn(M, K, device=dev).half()
    dA = torch.ops.lrkernels.lora_linear_grad_A(dt, x, thr, seed)
    assert_matches(dA, dt.double().t() @ (x.double() * keep), dt.t() @ (x * keep), what="dA")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_cpu_float64(p):
    x, base, A, B, b = make_inputs((2, 3), 16, 5, 3, "dense", torch.float64, "cpu")
    skip_unless_runs("lora_linear", "cpu", *reasons_args(x, base, A, B, b))
    for t in (x, A, B, b):
        t.requires_grad_()

    def fn(x, A, B, b):
        return lrkernels.lora_linear(
            x, base, A, B, b, scale=0.7, dropout_p=p, dropout_seed=5, backend="cpu"
        )

    assert torch.autograd.gradcheck(fn, (x, A, B, b))


def test_base_is_frozen():
    x, base, A, B, b = make_inputs((3,), 32, 4, 2, "dense", torch.float32, "cpu")
    base.requires_grad_()
    A.requires_grad_()
    lrkernels.lora_linear(x, base, A, B, b, scale=1.0).sum().backward()
    assert A.grad is not None and base.grad is None


# ----------------------------------------------------------------- torch.library / compile


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("kind", ["dense", 64])
@pytest.mark.parametrize("threshold", [0, 9000])
def test_opcheck_cpp_ops(backend, kind, threshold):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no CUDA device")
    dev = "cuda" if backend == "cuda" else "cpu"
    x, base, A, B, b = make_inputs((4, 5), 128, 10, 4, kind, torch.float32, dev)
    w, ws = split(base)
    skip_unless_runs("lora_linear", backend, x, w, ws, A, B, b)
    seed = torch.tensor([3], device=dev)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    torch.library.opcheck(
        torch.ops.lrkernels.lora_linear.default, (x, w, ws, A, B, b, 0.5, threshold, seed)
    )
    dy, dt = torch.randn(4, 5, 10, device=dev), torch.randn(20, 4, device=dev)
    torch.library.opcheck(
        torch.ops.lrkernels.lora_linear_grad_input.default,
        (dy, w, ws, dt, A.detach(), threshold, seed),
    )
    torch.library.opcheck(
        torch.ops.lrkernels.lora_linear_grad_A.default, (dt, x.detach(), threshold, seed)
    )
    idx = torch.randint(-1, 3, (4, 5), device=dev, dtype=torch.int32)
    A3, B3 = torch.randn(3, 4, 128, device=dev), torch.randn(3, 10, 4, device=dev)
    ranks = torch.tensor([4, 2, 3], device=dev, dtype=torch.int32)
    sc = torch.rand(3, device=dev)
    torch.library.opcheck(
        torch.ops.lrkernels.lora_linear_multi.default,
        (x.detach(), w, ws, A3, B3, idx, ranks, sc, b),
    )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", ["dense", 32])
def test_compile_fullgraph_with_dropout(backend, kind):
    x, base, A, B, b = make_inputs((6, 5), 64, 24, 4, kind, torch.float32, "cpu")
    skip_unless_runs("lora_linear", backend, *reasons_args(x, base, A, B, b))
    seed = torch.tensor([11])

    def fn(x, A, B, b, seed):
        return lrkernels.lora_linear(
            x, base, A, B, b, scale=0.5, dropout_p=0.1, dropout_seed=seed, backend=backend
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = [t.detach().requires_grad_() for t in (x, A, B, b)]
    out = compiled(*args, seed)
    eager_args = [t.detach().requires_grad_() for t in (x, A, B, b)]
    ref = fn(*eager_args, seed)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    for got, want in zip(args, eager_args, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
    # Another seed reuses the compiled graph (the seed is a tensor, not a constant).
    out2 = compiled(*[t.detach() for t in (x, A, B, b)], torch.tensor([12]))
    assert not torch.equal(out2, out.detach())


def test_compile_fullgraph_inductor_cpu():
    x, base, A, B, b = make_inputs((9,), 32, 16, 4, "dense", torch.float32, "cpu")
    skip_unless_runs("lora_linear", "cpu", *reasons_args(x, base, A, B, b))

    def fn(x):
        return lrkernels.lora_linear(x, base, A, B, b, scale=2.0, backend="cpu")

    out = torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(out, fn(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- multi-adapter


def make_multi(M, K, N, n, r_max, kind, dtype, device, garbage=True):
    x = torch.randn(M, K, device=device).to(dtype)
    base = make_base(kind, N, K, dtype, device)
    A = (torch.randn(n, r_max, K, device=device) / K**0.5).to(dtype)
    B = torch.randn(n, N, r_max, device=device).to(dtype)
    ranks = torch.randint(0, r_max + 1, (n,), device=device, dtype=torch.int32)
    ranks[0] = r_max
    if garbage:  # columns past each rank hold large values that must not contribute
        col = torch.arange(r_max, device=device)
        dead = col[None, :] >= ranks[:, None]
        A.masked_fill_(dead[:, :, None], 1e3)
        B.masked_fill_(dead[:, None, :], 1e3)
    scales = torch.rand(n, device=device) + 0.5
    idx = torch.randint(-1, n, (M,), device=device, dtype=torch.int32)
    return x, base, A, B, idx, ranks, scales


MULTI_SHAPES = [
    (1, 64, 40, 1, 4, "dense"),
    (5, 45, 29, 3, 8, "dense"),
    (33, 96, 33, 7, 16, 32),
    (64, 128, 24, 64, 4, 0),
    (17, 72, 65, 2, 5, "dense"),
    (0, 32, 8, 2, 4, 32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MULTI_SHAPES, ids=str)
def test_multi_matches_reference(backend, dtype, shape):
    dev = device_for(backend)
    x, base, A, B, idx, ranks, scales = make_multi(*shape, dtype, dev)
    bias = torch.randn(B.shape[1], device=dev).to(dtype)
    w, ws = split(base)
    skip_unless_runs("lora_linear_multi", backend, x, w, ws, A, B, idx, ranks, scales, bias)
    out = lrkernels.lora_linear_multi(
        x, base, A, B, idx, ranks=ranks, scales=scales, bias=bias, backend=backend
    )
    exact = lora_linear_multi_exact(x, w, ws, A, B, idx, ranks, scales, bias)
    same = lora_linear_multi_reference(x, w, ws, A, B, idx, ranks, scales, bias)
    assert_matches(out, exact, same)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_equals_one_adapter_per_row(backend):
    dev = device_for(backend)
    x, base, A, B, idx, ranks, scales = make_multi(23, 64, 20, 4, 8, 64, torch.float32, dev)
    x = x.reshape(23, 1, 64)
    idx = idx.reshape(23, 1)
    w, ws = split(base)
    skip_unless_runs("lora_linear_multi", backend, x, w, ws, A, B, idx, ranks, scales, None)
    out = lrkernels.lora_linear_multi(
        x, base, A, B, idx, ranks=ranks, scales=scales, backend=backend
    )
    assert out.shape == (23, 1, 20)
    for m in range(23):
        a = int(idx[m, 0])
        if a < 0:
            want = lrkernels.lora_linear(
                x[m], base, torch.zeros_like(A[0, :1]), torch.zeros_like(B[0, :, :1]), scale=0.0
            )
        else:
            r = int(ranks[a])
            if r == 0:
                want = lrkernels.lora_linear(
                    x[m], base, torch.zeros_like(A[0, :1]), torch.zeros_like(B[0, :, :1]),
                    scale=0.0,
                )  # fmt: skip
            else:
                want = lrkernels.lora_linear(
                    x[m], base, A[a, :r], B[a, :, :r], scale=float(scales[a])
                )
        torch.testing.assert_close(out[m], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_multi_index_out_of_range_is_an_error(backend):
    x, base, A, B, idx, ranks, scales = make_multi(6, 32, 8, 3, 4, "dense", torch.float32, "cpu")
    for bad in (3, -2):
        idx[2] = bad
        with pytest.raises(ValueError, match=r"adapter_index values must be in \[-1, 2\]"):
            lrkernels.lora_linear_multi(
                x, base, A, B, idx, ranks=ranks, scales=scales, backend=backend
            )
    idx[2] = 0
    ranks[1] = 5
    with pytest.raises(ValueError, match=r"ranks must be in \[0, 4\]"):
        lrkernels.lora_linear_multi(x, base, A, B, idx, ranks=ranks, scales=scales, backend=backend)


def test_multi_cpp_op_checks_values_itself():
    x, base, A, B, idx, ranks, scales = make_multi(6, 32, 8, 3, 4, "dense", torch.float32, "cpu")
    skip_unless_runs("lora_linear_multi", "cpu", x, base, None, A, B, idx, ranks, scales, None)
    idx[4] = 7
    with pytest.raises(RuntimeError, match="adapter_index values must be in"):
        torch.ops.lrkernels.lora_linear_multi(x, base, None, A, B, idx, ranks, scales, None)


def test_multi_is_inference_only():
    x, base, A, B, idx, ranks, scales = make_multi(4, 32, 8, 2, 4, "dense", torch.float32, "cpu")
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="inference op"):
        lrkernels.lora_linear_multi(x, base, A, B, idx, ranks=ranks, scales=scales)
    with torch.no_grad():
        lrkernels.lora_linear_multi(x, base, A, B, idx, ranks=ranks, scales=scales)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_multi_compile_fullgraph(backend):
    x, base, A, B, idx, ranks, scales = make_multi(12, 32, 16, 3, 4, 32, torch.float32, "cpu")
    w, ws = split(base)
    skip_unless_runs("lora_linear_multi", backend, x, w, ws, A, B, idx, ranks, scales, None)

    def fn(x, idx):
        return lrkernels.lora_linear_multi(
            x, base, A, B, idx, ranks=ranks, scales=scales, backend=backend
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, idx), fn(x, idx), rtol=1e-5, atol=1e-5)
    idx2 = torch.randint(-1, 3, (12,), dtype=torch.int32)  # another mix, same graph
    torch.testing.assert_close(compiled(x, idx2), fn(x, idx2), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def _err(match, exc=ValueError, **kw):
    x, base, A, B, b = make_inputs((3,), 32, 8, 4, "dense", torch.float32, "cpu")
    args = {"x": x, "base": base, "A": A, "B": B, "bias": b, "scale": 1.0}
    args.update(kw)
    with pytest.raises(exc, match=match):
        lrkernels.lora_linear(
            args.pop("x"), args.pop("base"), args.pop("A"), args.pop("B"), args.pop("bias"), **args
        )


def test_bad_inputs_python():
    _err(r"B must have shape \(8, 4\)", B=torch.randn(8, 3))
    _err(r"A must have shape \(r, 32\)", A=torch.randn(4, 31))
    _err(r"A must have x's dtype", TypeError, A=torch.randn(4, 32).half())
    _err(r"bias must have shape \(8,\)", bias=torch.randn(9))
    _err(r"x's last dimension must be 32", x=torch.randn(3, 33))
    _err(r"dropout_p must be a number in \[0, 1\)", dropout_p=1.0)
    _err(r"scale must be a finite number", scale=float("nan"))
    _err(r"base must be a dense weight", TypeError, base="w")
    q = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    _err(r"scales must have shape \(8,\)", base=(q, torch.rand(7)))
    _err(r"group_size=64 does not match", base=(q, torch.rand(8, 1), 64))
    _err(r"qweight must be int8", TypeError, base=(q.float(), torch.rand(8)))


def test_bad_inputs_cpp():
    x, base, A, B, b = make_inputs((3,), 32, 8, 4, "dense", torch.float32, "cpu")
    skip_unless_runs("lora_linear", "cpu", x, base, None, A, B, b)
    op = torch.ops.lrkernels.lora_linear
    with pytest.raises(RuntimeError, match=r"lora_linear: B must have shape \(8, 4\)"):
        op(x, base, None, A, torch.randn(8, 3), b, 1.0, 0, None)
    with pytest.raises(RuntimeError, match="lora_linear: A must have x's dtype"):
        op(x, base, None, A.double(), B, b, 1.0, 0, None)
    with pytest.raises(RuntimeError, match="dropout_threshold > 0 needs a seed"):
        op(x, base, None, A, B, b, 1.0, 5, None)
    with pytest.raises(RuntimeError, match=r"dropout_threshold must be in \[0, 65535\]"):
        op(x, base, None, A, B, b, 1.0, 70000, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        op(x, base.half(), None, A, B, b, 1.0, 0, None)
    with pytest.raises(RuntimeError, match=r"dt must have shape \(3, 4\)"):
        torch.ops.lrkernels.lora_linear_grad_input(
            torch.randn(3, 8), base, None, torch.randn(2, 4), A, 0, None
        )
