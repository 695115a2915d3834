"""lowrank_linear: every backend against the float64 reference, gradients, torch.library
checks, torch.compile, backend selection and argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_matches, device_for, skip_unless_runs

import lrkernels
from lrkernels.reference import lowrank_linear_exact, lowrank_linear_reference

BACKENDS = ["cuda", "triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch shape, in, out, rank): odd sizes, tiny and empty dimensions, rank 1, rank > block.
SHAPES = [
    ((1,), 16, 8, 4),
    ((37,), 45, 29, 7),
    ((2, 3), 33, 17, 1),
    ((0,), 24, 12, 5),
    ((2, 0, 3), 8, 8, 2),
    ((), 19, 23, 3),
    ((5,), 40, 48, 70),  # rank above in/out (valid, if wasteful)
    ((17,), 64, 72, 20),  # two row tiles of the 16-row tensor-core tile
    ((9,), 600, 40, 33),  # several slices of `in` on a GPU (split-K with the last-block sum)
]


def make_inputs(batch, in_f, out_f, rank, dtype, device, bias=True):
    # Scaled so that outputs are O(1) in every dtype (no fp16 overflow, no underflow).
    x = torch.randn(*batch, in_f, device=device).to(dtype)
    V = (torch.randn(rank, in_f, device=device) / in_f**0.5).to(dtype)
    U = (torch.randn(out_f, rank, device=device) / rank**0.5).to(dtype)
    b = torch.randn(out_f, device=device).to(dtype) if bias else None
    return x, U, V, b


def check_forward(backend, x, U, V, b):
    skip_unless_runs("lowrank_linear", backend, x, U, V, b)
    out = lrkernels.lowrank_linear(x, U, V, b, backend=backend)
    assert out.dtype == x.dtype and out.device == x.device
    assert_matches(out, lowrank_linear_exact(x, U, V, b), lowrank_linear_reference(x, U, V, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(backend, dtype, shape):
    check_forward(backend, *make_inputs(*shape, dtype, device_for(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_no_bias(backend, dtype):
    check_forward(backend, *make_inputs((9,), 31, 26, 6, dtype, device_for(backend), bias=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_non_contiguous(backend):
    dev = device_for(backend)
    x, U, V, b = make_inputs((6, 10), 20, 12, 5, torch.float32, dev)
    x = x.transpose(0, 1)  # (10, 6, 20), non-contiguous leading dims
    U = torch.randn(5, 12, device=dev).t()  # (12, 5) transposed view
    V = torch.randn(5, 40, device=dev)[:, ::2]  # (5, 20) strided
    b = torch.randn(24, device=dev)[::2]
    assert not (x.is_contiguous() or U.is_contiguous() or V.is_contiguous() or b.is_contiguous())
    check_forward(backend, x, U, V, b)


def test_forward_float64_on_cpu_and_torch():
    x, U, V, b = make_inputs((7,), 13, 11, 3, torch.float64, "cpu")
    for backend in ("cpu", "torch"):
        check_forward(backend, x, U, V, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_reference(backend, bias):
    dev = device_for(backend)
    x, U, V, b = make_inputs((3, 7), 21, 18, 5, torch.float32, dev, bias=bias)
    skip_unless_runs("lowrank_linear", backend, x, U, V, b)
    leaves = [t.detach().requires_grad_() for t in (x, U, V, b) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    dy = torch.randn(3, 7, 18, device=dev)

    def unpack(ts):
        return (*ts[:3], ts[3] if bias else None)

    lrkernels.lowrank_linear(*unpack(leaves), backend=backend).backward(dy)
    lowrank_linear_exact(*unpack(ref_leaves)).backward(dy.double())
    for name, got, want in zip("xUVb", leaves, ref_leaves, strict=False):
        assert got.grad is not None, f"no gradient for {name}"
        err = (got.grad.double() - want.grad).norm() / want.grad.norm()
        assert err < 1e-5, f"grad {name}: relative error {err:.2e}"


def test_gradcheck_cpu_float64():
    skip_unless_runs("lowrank_linear", "cpu", *make_inputs((2,), 3, 3, 1, torch.float64, "cpu"))
    inputs = [t.requires_grad_() for t in make_inputs((2, 3), 6, 5, 2, torch.float64, "cpu")]
    fn = lambda *a: lrkernels.lowrank_linear(*a, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cpp_op(backend, bias):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no CUDA device")
    dev = "cuda" if backend == "cuda" else "cpu"
    x, U, V, b = make_inputs((4, 5), 12, 10, 3, torch.float32, dev, bias=bias)
    skip_unless_runs("lowrank_linear", backend, x, U, V, b)
    args = (x.requires_grad_(), U.requires_grad_(), V.requires_grad_(), b)
    torch.library.opcheck(torch.ops.lrkernels.lowrank_linear.default, args)


@pytest.mark.skipif(not HAS_CUDA, reason="opcheck of a triton_op traces the kernel: GPU only")
def test_opcheck_triton_op():
    lrkernels.ops.register_triton_ops()  # registered lazily otherwise
    x, U, V, b = make_inputs((4, 5), 32, 16, 8, torch.float16, "cuda")
    args = (x.requires_grad_(), U.requires_grad_(), V.requires_grad_(), b)
    torch.library.opcheck(torch.ops.lrkernels.lowrank_linear_triton.default, args)


class _TwoLayer(torch.nn.Module):
    def __init__(self, backend, device, dtype):
        super().__init__()
        self.backend = backend
        self.a = lrkernels.nn.LowRankLinear(24, 32, 4, device=device, dtype=dtype)
        self.b = lrkernels.nn.LowRankLinear(32, 16, 6, device=device, dtype=dtype)
        self.a.backend = self.b.backend = backend

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("compiling a triton_op traces the kernel with fake tensors: GPU only")
    dtype = torch.float16 if dev == "cuda" else torch.float32
    model = _TwoLayer(backend, dev, dtype)
    x = torch.randn(5, 24, device=dev, dtype=dtype)
    skip_unless_runs("lowrank_linear", backend, x, model.a.U, model.a.V, model.a.bias)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    x1 = x.detach().requires_grad_()
    out = compiled(x1)
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
    out.sum().backward()  # the compiled backward runs the registered autograd
    assert x1.grad is not None and torch.isfinite(x1.grad).all()


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("M", [1, 16, 300])
def test_cuda_input_gradient_shapes_read_transposed_factors(dtype, M):
    """dx = lowrank(dy, Vᵀ, Uᵀ) on the op itself (what the backward calls): the transposed
    views are read in place by the tensor-core kernels, at decode and tile-filling M."""
    _, U, V, _ = make_inputs((M,), 512, 384, 72, dtype, "cuda", bias=False)
    dy = torch.randn(M, 384, device="cuda").to(dtype)
    Ut, Vt = V.t(), U.t()  # (512, 72) and (72, 384), transposed views
    assert not (Ut.is_contiguous() or Vt.is_contiguous())
    out = torch.ops.lrkernels.lowrank_linear(dy, Ut, Vt, None)
    assert_matches(out, lowrank_linear_exact(dy, Ut, Vt), lowrank_linear_reference(dy, Ut, Vt))


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA kernels need a GPU")
def test_cuda_split_sums_are_deterministic_on_every_stream():
    """Decode sizes split `in` across blocks; the last block adds the partials in slice order,
    so repeated calls are bitwise equal, on the default stream and on a side stream (each
    stream has its own zeroed counters, which the kernels leave zeroed)."""
    x, U, V, b = make_inputs((3,), 4096, 256, 64, torch.bfloat16, "cuda")
    first = lrkernels.lowrank_linear(x, U, V, b, backend="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        again = [lrkernels.lowrank_linear(x, U, V, b, backend="cuda") for _ in range(3)]
    side.synchronize()
    for y in again + [lrkernels.lowrank_linear(x, U, V, b, backend="cuda")]:
        assert torch.equal(first, y)


def test_kernel_expected_faster_default():
    """The crossover default (until the measured dispatch table): kernels at small and mid M,
    torch's two matmuls where cuBLAS is expected faster."""
    faster = lrkernels.ops.lowrank.kernel_expected_faster
    for M in (1, 16, 256, 1024):
        assert faster("cuda", M, 4096, 4096, 128, torch.bfloat16)
    assert not faster("cuda", 8192, 4096, 4096, 128, torch.bfloat16)
    assert faster("cuda", 1, 4096, 4096, 128, torch.float32)
    assert not faster("cuda", 64, 4096, 4096, 128, torch.float32)
    assert not faster("triton", 1, 4096, 4096, 128, torch.float16)
    assert faster("triton", 64, 4096, 4096, 128, torch.float16)
    assert not faster("triton", 64, 4096, 4096, 128, torch.float32)
    assert faster("cpu", 10**6, 8, 8, 2, torch.float32)


@pytest.mark.skipif(not HAS_CUDA, reason="auto selection on CUDA tensors")
def test_auto_selection_follows_the_crossover():
    small = make_inputs((4,), 256, 256, 16, torch.float16, "cuda")
    large = make_inputs((4096,), 256, 256, 16, torch.float16, "cuda")
    select = lrkernels.backends.select_backend
    if lrkernels.available_backends()["cuda"] is None:
        assert select("lowrank_linear", None, *small) == "cuda"
    assert select("lowrank_linear", None, *large) == "torch"


# ------------------------------------------------------------------- selection and errors


def test_available_backends_reports_reasons():
    avail = lrkernels.available_backends()
    assert set(avail) == set(lrkernels.BACKENDS)
    assert avail["torch"] is None
    for name, why in avail.items():
        assert why is None or (isinstance(why, str) and why), name
    if not HAS_CUDA:
        assert avail["cuda"] is not None


def test_auto_selection_on_cpu_never_picks_the_interpreter():
    x, U, V, b = make_inputs((3,), 8, 8, 2, torch.float32, "cpu")
    chosen = lrkernels.backends.select_backend("lowrank_linear", None, x, U, V, b)
    assert chosen != "triton"  # the interpreter is slow: never an automatic choice
    assert chosen == lrkernels.explain("lowrank_linear", x, U, V, b).backend  # tests/test_dispatch


def test_explicit_backend_that_cannot_run_raises_with_reason():
    x, U, V, b = make_inputs((3,), 8, 8, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run these inputs"):
        lrkernels.lowrank_linear(x, U, V, b, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        lrkernels.lowrank_linear(x, U, V, b, backend="cuBLAS")


def test_float64_goes_to_torch_not_to_gpu_kernels():
    x, U, V, b = make_inputs((3,), 8, 8, 2, torch.float64, "cpu")
    for backend in ("cuda", "triton"):
        assert lrkernels.not_supported_reasons("lowrank_linear", backend, x, U, V, b)


def test_set_default_backend(monkeypatch):
    x, U, V, b = make_inputs((3,), 8, 8, 2, torch.float32, "cpu")
    monkeypatch.setattr(lrkernels.backends, "_DEFAULT_BACKEND", None)
    lrkernels.set_default_backend("torch")
    assert lrkernels.backends.select_backend("lowrank_linear", None, x, U, V, b) == "torch"
    lrkernels.set_default_backend("cuda")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cannot run"):
            lrkernels.lowrank_linear(x, U, V, b)
    lrkernels.set_default_backend(None)
    with pytest.raises(ValueError):
        lrkernels.set_default_backend("fastest")


def _bad_inputs():
    f32 = dict(dtype=torch.float32)
    x, U, V, b = torch.randn(4, 8), torch.randn(6, 3), torch.randn(3, 8), torch.randn(6)
    return [
        ("integer x", (x.long(), U, V, b), TypeError, "x must be float"),
        ("U dtype", (x, U.half(), V, b), TypeError, "U must have x's dtype"),
        ("V dtype", (x, U, V.double(), b), TypeError, "V must have x's dtype"),
        ("bias dtype", (x, U, V, b.half()), TypeError, "bias must have x's dtype"),
        ("0-d x", (torch.tensor(1.0), U, V, b), ValueError, "0-d"),
        ("V not 2-D", (x, U, V.reshape(24), b), ValueError, "V must be 2-D"),
        ("U not 2-D", (x, U.reshape(18), V, b), ValueError, "U must be 2-D"),
        (
            "in mismatch",
            (x, U, torch.randn(3, 7, **f32), b),
            ValueError,
            r"V must have shape \(rank, 8\)",
        ),
        (
            "rank mismatch",
            (x, torch.randn(6, 4, **f32), V, b),
            ValueError,
            r"U must have shape \(out_features, 3\)",
        ),
        (
            "rank 0",
            (x, torch.randn(6, 0, **f32), torch.randn(0, 8, **f32), b),
            ValueError,
            "rank must be >= 1",
        ),
        (
            "bias shape",
            (x, U, V, torch.randn(5, **f32)),
            ValueError,
            r"bias must have shape \(6,\)",
        ),
        (
            "bias 2-D",
            (x, U, V, torch.randn(1, 6, **f32)),
            ValueError,
            r"bias must have shape \(6,\)",
        ),
        ("not a tensor", (x.tolist(), U, V, b), TypeError, "x must be a torch.Tensor"),
        (
            "in 0",
            (torch.randn(4, 0), U, torch.randn(3, 0), b),
            ValueError,
            "in_features must be >= 1",
        ),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_python_errors(case):
    _, args, exc, msg = case
    with pytest.raises(exc, match=msg):
        lrkernels.lowrank_linear(*args)


@pytest.mark.parametrize(
    "case", [c for c in _bad_inputs() if c[0] != "not a tensor"], ids=lambda c: c[0]
)
def test_bad_input_cpp_errors(case):
    """The C++ checks (shared by the CPU and CUDA kernels) reject the same inputs."""
    if lrkernels.available_backends()["cpu"] is not None:
        pytest.skip("extension not built")
    _, args, _, msg = case
    with pytest.raises(RuntimeError, match=msg.replace("Tensor", "")):
        torch.ops.lrkernels.lowrank_linear(*args)


def test_device_mismatch_error():
    if not HAS_CUDA:
        meta = torch.empty(3, 8, device="meta")
        with pytest.raises(ValueError, match="U must be on x's device"):
            lrkernels.lowrank_linear(torch.randn(4, 8), meta, torch.randn(3, 8))
        return
    with pytest.raises(ValueError, match="V must be on x's device"):
        lrkernels.lowrank_linear(
            torch.randn(4, 8, device="cuda"), torch.randn(6, 3, device="cuda"), torch.randn(3, 8)
        )


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 5, 8, device="meta")
    out = lrkernels.lowrank_linear(
        x, torch.empty(6, 3, device="meta"), torch.empty(3, 8, device="meta")
    )
    assert out.shape == (2, 5, 6) and out.device.type == "meta"


def test_equals_dense_linear():
    x, U, V, b = make_inputs((4,), 10, 9, 3, torch.float64, "cpu")
    torch.testing.assert_close(lrkernels.lowrank_linear(x, U, V, b), F.linear(x, U @ V, b))
