"""int8_linear (W8A16): every backend against the float64 reference, the input-gradient op,
torch.library checks, torch.compile, and argument errors."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_matches, device_for, skip_unless_runs

import lrkernels
from lrkernels import quant
from lrkernels.ops.int8 import dequantize_weight
from lrkernels.reference import dequantize_reference, int8_linear_exact, int8_linear_reference

BACKENDS = ["cuda", "triton", "cpu", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
F64 = torch.float64

# (batch shape, K, N, group): odd N, K not a multiple of 16 (per channel), every group size,
# empty batches, and M just past the decode path's 16 rows.
SHAPES = [
    ((1,), 64, 40, 0),
    ((5,), 45, 29, 0),
    ((2, 3), 96, 33, 32),
    ((17,), 128, 24, 64),
    ((37,), 256, 31, 128),
    ((16,), 160, 29, 32),
    ((0,), 64, 8, 32),
    ((2, 0, 3), 32, 8, 0),
    ((), 64, 12, 64),
]


def make_inputs(batch, K, N, group, dtype, device, bias=True):
    x = torch.randn(*batch, K, device=device).to(dtype)
    q = torch.randint(-127, 128, (N, K), device=device, dtype=torch.int8)
    shape = (N,) if group == 0 else (N, K // group)
    # |W| ~ 127 · s ≈ 1/sqrt(K): outputs O(1) in every dtype.
    s = ((torch.rand(shape, device=device) + 0.5) / (127 * K**0.5)).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return x, q, s, b


def check_forward(backend, x, q, s, b):
    skip_unless_runs("int8_linear", backend, x, q, s, b)
    out = lrkernels.int8_linear(x, q, s, b, backend=backend)
    assert out.dtype == x.dtype and out.device == x.device
    assert_matches(out, int8_linear_exact(x, q, s, b), int8_linear_reference(x, q, s, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(backend, dtype, shape):
    check_forward(backend, *make_inputs(*shape, dtype, device_for(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_no_bias_and_non_contiguous(backend):
    dev = device_for(backend)
    x, q, s, b = make_inputs((4, 6), 64, 20, 32, torch.float16, dev, bias=False)
    x = x.transpose(0, 1)
    q = torch.randint(-127, 128, (20, 128), device=dev, dtype=torch.int8)[:, ::2]
    s = s.t().contiguous().t()  # (20, 2) column-major
    assert not (x.is_contiguous() or q.is_contiguous() or s.is_contiguous())
    check_forward(backend, x, q, s, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("M", [3, 21])
def test_gradients(backend, group, M):
    dev = device_for(backend)
    x, q, s, b = make_inputs((M,), 64, 24, group, torch.float32, dev)
    skip_unless_runs("int8_linear", backend, x, q, s, b)
    x1, b1 = x.detach().requires_grad_(), b.detach().requires_grad_()
    dy = torch.randn(M, 24, device=dev)
    lrkernels.int8_linear(x1, q, s, b1, backend=backend).backward(dy)
    w = dequantize_reference(q, s.double(), torch.float64)
    dx_ref = dy.double() @ w
    assert (x1.grad.double() - dx_ref).norm() / dx_ref.norm() < 1e-5
    torch.testing.assert_close(b1.grad, dy.sum(0))


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_grad_input_op_half(backend):
    dev = "cuda" if backend == "cuda" else "cpu"
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no CUDA device")
    dy, q, s, _ = make_inputs((19,), 40, 96, 0, torch.float16, dev)  # dy (19, 40): N = 40
    q = torch.randint(-127, 128, (40, 96), device=dev, dtype=torch.int8)
    s = ((torch.rand(40, 3, device=dev) + 0.5) / 1000).to(torch.float16)  # group 32 over K = 96
    skip_unless_runs("int8_linear", backend, dy, q, s, None)
    out = torch.ops.lrkernels.int8_linear_grad_input(dy, q, s)
    exact = dy.double() @ dequantize_reference(q, s.double(), torch.float64)
    same_dtype = dy @ dequantize_reference(q, s, torch.float16)
    assert_matches(out, exact, same_dtype, what="grad_input")


def test_gradcheck_cpu_float64():
    x, q, s, b = make_inputs((2, 3), 64, 5, 32, torch.float64, "cpu")
    skip_unless_runs("int8_linear", "cpu", x, q, s, b)
    x.requires_grad_(), b.requires_grad_()
    fn = lambda x, b: lrkernels.int8_linear(x, q, s, b, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


def test_weight_is_frozen():
    x, q, s, b = make_inputs((3,), 32, 4, 0, torch.float32, "cpu")
    s.requires_grad_()
    x.requires_grad_()
    lrkernels.int8_linear(x, q, s, b).sum().backward()
    assert x.grad is not None and s.grad is None


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("group", [0, 64])
def test_opcheck_cpp_ops(backend, group):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no CUDA device")
    dev = "cuda" if backend == "cuda" else "cpu"
    x, q, s, b = make_inputs((4, 5), 128, 10, group, torch.float32, dev)
    skip_unless_runs("int8_linear", backend, x, q, s, b)
    torch.library.opcheck(torch.ops.lrkernels.int8_linear.default, (x.requires_grad_(), q, s, b))
    dy = torch.randn(4, 5, 10, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.lrkernels.int8_linear_grad_input.default, (dy, q, s))


@pytest.mark.skipif(not HAS_CUDA, reason="opcheck of a triton_op traces the kernel: GPU only")
def test_opcheck_triton_ops():
    lrkernels.ops.register_triton_ops()  # registered lazily otherwise
    x, q, s, b = make_inputs((4, 5), 128, 16, 32, torch.float16, "cuda")
    torch.library.opcheck(
        torch.ops.lrkernels.int8_linear_triton.default, (x.requires_grad_(), q, s, b)
    )
    dy = torch.randn(4, 5, 16, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.lrkernels.int8_linear_grad_input_triton.default, (dy, q, s))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("compiling a triton_op traces the kernel with fake tensors: GPU only")
    dtype = torch.float16 if dev == "cuda" else torch.float32
    x, q, s, b = make_inputs((5,), 64, 16, 32, dtype, dev)
    skip_unless_runs("int8_linear", backend, x, q, s, b)

    def f(x):
        return torch.relu(lrkernels.int8_linear(x, q, s, b, backend=backend)).sum(-1)

    eager = f(x)
    x1 = x.detach().requires_grad_()
    out = torch.compile(f, fullgraph=True)(x1)
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
    out.sum().backward()
    assert x1.grad is not None and torch.isfinite(x1.grad).all()


# ------------------------------------------------------------------------------- errors


def _bad_inputs():
    x, q, s, b = make_inputs((4,), 64, 6, 0, torch.float32, "cpu")
    sg = torch.rand(6, 2)  # group 32
    return [
        ("integer x", (x.long(), q, s, b), {}, TypeError, "x must be float"),
        ("float qweight", (x, q.float(), s, b), {}, TypeError, "qweight must be int8"),
        ("scales dtype", (x, q, s.half(), b), {}, TypeError, "scales must have x's dtype"),
        ("bias dtype", (x, q, s, b.half()), {}, TypeError, "bias must have x's dtype"),
        ("qweight 1-D", (x, q.flatten(), s, b), {}, ValueError, "qweight must be 2-D"),
        ("K mismatch", (torch.randn(4, 63), q, s, b), {}, ValueError, "last dimension must be 64"),
        (
            "scales len",
            (x, q, torch.rand(5), b),
            {},
            ValueError,
            r"per-channel scales must have shape \(6,\)",
        ),
        ("scales 3-D", (x, q, torch.rand(6, 2, 1), b), {}, ValueError, "scales must have shape"),
        (
            "groups not dividing",
            (x, q, torch.rand(6, 3), b),
            {},
            ValueError,
            "not divisible into 3 groups",
        ),
        (
            "group 16",
            (x, q, torch.rand(6, 4), b),
            {},
            ValueError,
            "group size must be 32, 64 or 128, got 16",
        ),
        (
            "group_size mismatch",
            (x, q, sg, b),
            {"group_size": 64},
            ValueError,
            "group_size=64 does not match",
        ),
        ("bias shape", (x, q, s, torch.randn(5)), {}, ValueError, r"bias must have shape \(6,\)"),
        ("0-d x", (torch.tensor(1.0), q, s, b), {}, ValueError, "0-d"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_python_errors(case):
    _, args, kwargs, exc, msg = case
    with pytest.raises(exc, match=msg):
        lrkernels.int8_linear(*args, **kwargs)


@pytest.mark.parametrize(
    "case", [c for c in _bad_inputs() if not c[2] and c[0] != "0-d x"], ids=lambda c: c[0]
)
def test_bad_input_cpp_errors(case):
    """The C++ checks shared by the CPU and CUDA kernels reject the same inputs."""
    if lrkernels.available_backends()["cpu"] is not None:
        pytest.skip("extension not built")
    _, args, _, _, msg = case
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.lrkernels.int8_linear(*args)


def test_grad_input_cpp_errors():
    if lrkernels.available_backends()["cpu"] is not None:
        pytest.skip("extension not built")
    q = torch.randint(-127, 128, (6, 64), dtype=torch.int8)
    with pytest.raises(RuntimeError, match="dy's last dimension must be 6"):
        torch.ops.lrkernels.int8_linear_grad_input(torch.randn(3, 64), q, torch.rand(6))


def test_explicit_backend_that_cannot_run_raises():
    x, q, s, b = make_inputs((3,), 64, 8, 0, torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        lrkernels.int8_linear(x, q, s, b, backend="triton")


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 5, 64, device="meta")
    q = torch.empty(8, 64, dtype=torch.int8, device="meta")
    out = lrkernels.int8_linear(x, q, torch.empty(8, 2, device="meta"))
    assert out.shape == (2, 5, 8)


# ----------------------------------------------------------------- layout 2 (packed weights)

# (batch shape, K, N, group) with K % 16 == 0: odd N (not a multiple of the 32-row units), every
# group size, empty batches, M around the kernels' 16-row tile.
PACKED_SHAPES = [
    ((1,), 48, 40, 0),
    ((2, 3), 96, 33, 32),
    ((17,), 128, 24, 64),
    ((16,), 256, 70, 128),
    ((0,), 64, 8, 32),
]


def packed_inputs(batch, K, N, group, dtype, device, bias=True):
    x, q, s, b = make_inputs(batch, K, N, group, dtype, device, bias)
    qp, sp = quant.pack(q, s)
    return x, q, s, qp, sp, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PACKED_SHAPES, ids=str)
def test_packed_forward_matches_reference(backend, dtype, shape):
    x, q, s, qp, sp, b = packed_inputs(*shape, dtype, device_for(backend))
    skip_unless_runs("int8_linear", backend, x, qp, sp, b)
    out = lrkernels.int8_linear(x, qp, sp, b, backend=backend)
    assert out.dtype == x.dtype and out.shape == (*shape[0], shape[2])
    # The same product as the plain layout (the packed weight only reorders bytes).
    assert_matches(out, int8_linear_exact(x, q, s, b), int8_linear_reference(x, q, s, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [0, 64])
def test_packed_gradients(backend, group):
    dev = device_for(backend)
    x, q, s, qp, sp, b = packed_inputs((7,), 128, 40, group, torch.float32, dev)
    skip_unless_runs("int8_linear", backend, x, qp, sp, b)
    x1, b1 = x.detach().requires_grad_(), b.detach().requires_grad_()
    dy = torch.randn(7, 40, device=dev)
    lrkernels.int8_linear(x1, qp, sp, b1, backend=backend).backward(dy)
    dx_ref = dy.double() @ dequantize_reference(q, s.double(), torch.float64)
    assert (x1.grad.double() - dx_ref).norm() / dx_ref.norm() < 1e-5
    torch.testing.assert_close(b1.grad, dy.sum(0))


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("group", [0, 32])
def test_opcheck_packed_ops(backend, group):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no CUDA device")
    dev = "cuda" if backend == "cuda" else "cpu"
    x, _, _, qp, sp, b = packed_inputs((4, 5), 128, 40, group, torch.float32, dev)
    skip_unless_runs("int8_linear", backend, x, qp, sp, b)
    ops = torch.ops.lrkernels
    torch.library.opcheck(ops.int8_linear_packed.default, (x.requires_grad_(), qp, sp, b))
    dy = torch.randn(4, 5, 40, device=dev, requires_grad=True)
    torch.library.opcheck(ops.int8_linear_packed_grad_input.default, (dy, qp, sp))
    torch.library.opcheck(ops.int8_dequantize_packed.default, (qp, sp))


def test_dequantize_weight_either_layout():
    _, q, s, qp, sp, _ = packed_inputs((1,), 96, 33, 32, torch.bfloat16, "cpu")
    want = dequantize_reference(q, s, torch.bfloat16)
    assert torch.equal(dequantize_weight(qp, sp), want)
    assert torch.equal(dequantize_weight(q, s), want)
    assert torch.equal(dequantize_weight(qp, sp, torch.float64), dequantize_reference(q, s, F64))
    if lrkernels.available_backends()["cpu"] is None:
        assert torch.equal(torch.ops.lrkernels.int8_dequantize_packed(qp, sp), want)


def test_cuda_path_choice(monkeypatch):
    from lrkernels.ops import int8 as ops_int8

    monkeypatch.delenv("LRKERNELS_INT8_CUDA_PATH", raising=False)
    rows = ops_int8.DEQUANT_MATMUL_MIN_ROWS
    assert ops_int8.cuda_path(1, 4096, 4096, torch.bfloat16) == "kernel"
    assert ops_int8.cuda_path(rows - 1, 4096, 4096, torch.bfloat16) == "kernel"
    assert ops_int8.cuda_path(rows, 4096, 4096, torch.bfloat16) == "dequant_matmul"
    monkeypatch.setenv("LRKERNELS_INT8_CUDA_PATH", "dequant_matmul")
    assert ops_int8.cuda_path(1, 8, 8, torch.float16, transposed=True) == "dequant_matmul"
    monkeypatch.setenv("LRKERNELS_INT8_CUDA_PATH", "cublas")
    with pytest.raises(ValueError, match="LRKERNELS_INT8_CUDA_PATH must be one of"):
        ops_int8.cuda_path(1, 8, 8, torch.float16)


def test_cuda_path_follows_a_measured_table_row(monkeypatch, tmp_path):
    """A GPU run's rows for int8_linear.cuda_path move the crossover, per (device, dtype,
    class, pass); a shape without a row keeps the rule."""
    from lrkernels import dispatch
    from lrkernels.ops import int8 as ops_int8

    monkeypatch.delenv("LRKERNELS_INT8_CUDA_PATH", raising=False)
    dev = torch.device("cpu")  # any device key: a GPU run writes "cuda:<its name>"
    f = ops_int8.cuda_path_features(300, 4096, 4096, False)
    measured = [{"shape": "M=300", "ms": {"kernel": 0.030, "dequant_matmul": 0.021}}]
    entries = [
        {
            "op": ops_int8.CUDA_PATH_OP,
            "device": dispatch.device_key(dev),
            "dtype": "bfloat16",
            "class": ops_int8.cuda_path_class(f),
            "shape": m["shape"],
            "ms": m["ms"],
            "excluded": {},
        }
        for m in measured
    ]
    table, rows = dispatch.merge_rows({"rows": []}, entries, source={"commit": "abc1234"})
    assert rows[0]["order"] == ["dequant_matmul", "kernel", "torch"]
    path = tmp_path / "table.json"
    dispatch.write_table(path, table)
    bf16 = torch.bfloat16
    assert ops_int8.cuda_path(300, 4096, 4096, bf16, device=dev) == "kernel"  # the rule
    dispatch.use_table(path)
    try:
        got, why = ops_int8._cuda_path_choice(300, 4096, 4096, bf16, False, dev)
        assert (got, why) == ("dequant_matmul", "table: measured dequant_matmul > kernel")
        # the same class, another pass / dtype / device: no row, the rule
        assert ops_int8.cuda_path(300, 4096, 4096, bf16, transposed=True, device=dev) == "kernel"
        assert ops_int8.cuda_path(300, 4096, 4096, torch.float16, device=dev) == "kernel"
        assert ops_int8.cuda_path(300, 4096, 4096, bf16) == "kernel"
        monkeypatch.setenv("LRKERNELS_INT8_CUDA_PATH", "kernel")  # forcing still wins
        assert ops_int8.cuda_path(300, 4096, 4096, bf16, device=dev) == "kernel"
    finally:
        dispatch.use_table(None)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["kernel", "dequant_matmul"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 16, 64, 300])
def test_cuda_paths_and_forced_splits(monkeypatch, path, dtype, M):
    """Both cuda paths, both layouts, and forced split counts (LRKERNELS_INT8_SPLITS)."""
    monkeypatch.setenv("LRKERNELS_INT8_CUDA_PATH", path)
    for splits in ("0", "3"):
        monkeypatch.setenv("LRKERNELS_INT8_SPLITS", splits)
        for group in (0, 128):
            x, q, s, qp, sp, b = packed_inputs((M,), 512, 200, group, dtype, "cuda")
            ref = (int8_linear_exact(x, q, s, b), int8_linear_reference(x, q, s, b))
            for qq, ss in ((q, s), (qp, sp)):
                assert_matches(lrkernels.int8_linear(x, qq, ss, b, backend="cuda"), *ref)
            dy = torch.randn(M, 200, device="cuda").to(dtype)
            exact = dy.double() @ dequantize_reference(q, s.double(), F64)
            same = dy @ dequantize_reference(q, s, dtype)
            for op, qq in ((torch.ops.lrkernels.int8_linear_grad_input, q),
                           (torch.ops.lrkernels.int8_linear_packed_grad_input, qp)):  # fmt: skip
                out = op(dy, qq, sp if qq is qp else s, ops_path(path))
                assert_matches(out, exact, same, what="grad_input")


def ops_path(path: str) -> int:
    from lrkernels.ops.int8 import CUDA_PATHS

    return CUDA_PATHS[path]


def test_packed_bad_inputs():
    x, _, _, qp, sp, b = packed_inputs((4,), 64, 40, 32, torch.float32, "cpu")
    cases = [
        ((x, qp[:, :, :256], sp, b), ValueError, "must be packed"),
        ((x, qp, sp[:20], b), ValueError, r"give out_features 20"),
        ((torch.randn(4, 48), qp, sp, b), ValueError, r"last dimension must be 64"),
        ((x, qp.float(), sp, b), TypeError, "qweight must be int8"),
        ((x, qp, sp, b[:3]), ValueError, r"bias must have shape \(40,\)"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            lrkernels.int8_linear(*args)
    if lrkernels.available_backends()["cpu"] is not None:
        return
    ops = torch.ops.lrkernels
    for args, msg in [
        ((x, qp[:, :, :256], sp, b), "must be packed"),
        ((x, qp, sp[:20], b), "give out_features 20"),
        ((torch.randn(4, 48), qp, sp, b), "last dimension must be 64"),
        ((x, qp, sp.half(), b), "scales must have x's dtype"),
    ]:
        with pytest.raises(RuntimeError, match=msg):
            ops.int8_linear_packed(*args)
    with pytest.raises(RuntimeError, match="dy's last dimension must be 40"):
        ops.int8_linear_packed_grad_input(torch.randn(3, 64), qp, sp)
