"""LoRA in the library's machinery: auto selection of lora_linear / lora_linear_multi
(lrkernels.dispatch: features, shape classes, the conservative rules, a measured table row
overriding them, explain), and the int8 base in either layout of lrkernels.quant (plain or
packed): the same results on every backend that runs here, gradients included, and the cuda
backend's refusal of a packed base."""

from __future__ import annotations

import pytest
import torch
from conftest import skip_unless_runs

import lrkernels
from lrkernels import backends, dispatch, quant
from lrkernels.ops import lora as lora_ops
from lrkernels.reference import lora_linear_exact, lora_linear_multi_exact

CPU_OK = lrkernels.available_backends()["cpu"] is None
SOURCE = {"bench": "bench/lora.py", "commit": "abc1234", "date": "2026-01-01", "torch": "x"}


def _single(M=5, K=64, N=40, r=4, base="dense", dtype=torch.float32, requires_grad=False):
    x = torch.randn(M, K, dtype=dtype, requires_grad=requires_grad)
    if base == "dense":
        w, ws = torch.randn(N, K, dtype=dtype), None
    else:
        w, ws = quant.quantize(torch.randn(N, K), None, scale_dtype=dtype)
        if base == "packed":
            w, ws = quant.pack(w, ws)
    A = torch.randn(r, K, dtype=dtype)
    B = torch.randn(N, r, dtype=dtype)
    return x, w, ws, A, B


def _base(w, ws):
    return w if ws is None else (w, ws)


# ------------------------------------------------------------------------------ classes, rules


def test_features_and_class():
    h = dispatch.hooks("lora_linear")
    x, w, ws, A, B = _single(M=5, K=96, N=70, r=4, base="packed")
    f = h.features(x.reshape(1, 5, 96), w, ws, A, B, None)
    assert f == {"M": 5, "in": 96, "out": 70, "rank": 4, "base": "int8", "mode": "infer",
                 "dropout": False}  # fmt: skip
    assert h.shape_class(f) == "M=2-16 in=1-1024 out=1-1024 rank=1-32 base=int8 infer"
    A.requires_grad_()
    f = h.features(x, w, ws, A, B, None, dropout=True)
    assert f["mode"] == "train" and h.shape_class(f).endswith("base=int8 train dropout")
    with torch.no_grad():  # no backward will run: inference
        assert h.features(x, w, ws, A, B, None)["mode"] == "infer"
    hm = dispatch.hooks("lora_linear_multi")
    fm = hm.features(x, w, ws, A.detach()[None].expand(9, 4, 96), B[None].expand(9, 70, 4))
    assert fm["adapters"] == 9 and fm["rank"] == 4
    assert hm.shape_class(fm) == "M=2-16 in=1-1024 out=1-1024 rank=1-32 adapters=9-64 base=int8"


def _order(op, device, dtype, **f):
    base = {"M": 16, "in": 4096, "out": 4096, "rank": 16, "base": "dense", "mode": "infer",
            "dropout": False, "adapters": 8}  # fmt: skip
    return dispatch.hooks(op).rule(device, dtype, {**base, **f})[0]


def test_rules_follow_the_static_estimate():
    op = "lora_linear"
    assert _order(op, "cuda", "bfloat16", M=1) == ("cuda", "triton")
    assert _order(op, "cuda", "bfloat16", M=16, base="int8") == ("cuda", "triton")
    # 16 < M: the cuda tensor-core pass, adapter fused (dense up to 1024, int8 below 512)
    assert _order(op, "cuda", "bfloat16", M=17) == ("cuda", "triton")
    assert _order(op, "cuda", "float16", M=1024, mode="train", dropout=True) == ("cuda", "triton")
    assert _order(op, "cuda", "bfloat16", M=1025) == ("torch",)
    assert _order(op, "cuda", "bfloat16", M=17, base="int8") == ("cuda", "triton")
    assert _order(op, "cuda", "float16", M=511, base="int8") == ("cuda", "triton")
    assert _order(op, "cuda", "bfloat16", M=512, base="int8") == ("torch",)
    assert _order(op, "cuda", "float32", M=16) == ("cuda", "triton")
    assert _order(op, "cuda", "float32", M=17) == ("torch",)
    assert _order(op, "cuda", "float32", M=64, base="int8") == ("torch",)
    assert _order(op, "cpu", "float32", M=1) == ("torch",)
    assert lora_ops.CUDA_DENSE_FUSED_MAX_ROWS == 1024
    multi = "lora_linear_multi"
    assert _order(multi, "cuda", "bfloat16", M=16) == ("cuda", "triton")
    assert _order(multi, "cuda", "bfloat16", M=1024) == ("cuda", "triton")
    assert _order(multi, "cuda", "bfloat16", M=4096) == ("triton", "cuda")
    assert _order(multi, "cuda", "float32", M=4096) == ("triton", "cuda")
    assert _order(multi, "cuda", "float32", M=17) == ("triton", "cuda")
    assert _order(multi, "cuda", "bfloat16", M=64, base="int8") == ("cuda", "triton")
    assert _order(multi, "cuda", "bfloat16", M=512, base="int8") == ("triton", "cuda")
    assert _order(multi, "cpu", "float32", M=64) == ("torch",)


def test_auto_on_cpu_runs_torch_and_explains_why():
    x, w, ws, A, B = _single(base="int8")
    e = lrkernels.explain("lora_linear", x, (w, ws), A, B, scale=0.5, dropout_p=0.1)
    assert e.backend == "torch" and e.how == "rule" and e.features["dropout"]
    assert "rule:" in e.why and "lora_linear on cpu:" in str(e)
    assert e.shape_class.endswith("base=int8 infer dropout")
    e = lrkernels.explain("lora_linear", x, (w, ws), A, B, scale=0.5, backend="torch")
    assert e.how == "requested" and e.backend == "torch"
    idx = torch.zeros(x.shape[0], dtype=torch.int32)
    e = lrkernels.explain(
        "lora_linear_multi", x, (w, ws), A[None], B[None], idx,
        ranks=torch.tensor([4], dtype=torch.int32), scales=torch.ones(1),
    )  # fmt: skip
    assert e.backend == "torch" and "adapters=1" in e.shape_class


@pytest.mark.skipif(not CPU_OK, reason="the cpu backend (the extension) is not built")
def test_table_row_overrides_the_rule(table):
    x, w, ws, A, B = _single(base="dense")
    h = dispatch.hooks("lora_linear")
    row = {
        "op": "lora_linear",
        "device": dispatch.device_key(x.device),
        "dtype": "float32",
        "class": h.shape_class(h.features(x, w, ws, A, B, None)),
        "order": ["cpu", "torch"],
        "measured": [{"shape": "case=t", "ms": {"cpu": 1.0, "torch": 2.0}}],
        "excluded": {},
        "source": SOURCE,
    }
    table([row])
    e = lrkernels.explain("lora_linear", x, w, A, B, scale=0.5)
    assert e.backend == "cpu" and e.how == "table" and e.table_row["order"] == ["cpu", "torch"]
    assert backends.select_backend("lora_linear", None, x, w, ws, A, B, None) == "cpu"
    # another class (training) has no row: the rule again
    assert backends.select_backend("lora_linear", None, x.requires_grad_(), w, ws, A, B, None) == (
        "torch"
    )


def test_auto_selection_traces_under_compile():
    x, w, ws, A, B = _single(base="packed")

    def f(x):
        return lrkernels.lora_linear(x, (w, ws), A, B, scale=0.5)

    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, f(x))


# ------------------------------------------------------------------------------ packed bases


def test_cuda_takes_a_packed_base(monkeypatch):
    """The cuda backend reads a packed base in place (the int8 tensor-core kernel): no reason
    refuses it (with a pretend cuda backend, so that only the input-dependent reasons speak)."""
    x, w, ws, A, B = _single(base="packed")
    monkeypatch.setattr(backends, "device_and_dtype_reasons", lambda b, x, explicit: [])
    monkeypatch.setattr(backends, "kernel_reasons", lambda b, ops: [])
    assert lora_ops._reasons("cuda", x, w, ws, A, B, None, explicit=True) == []
    idx = torch.zeros(x.shape[0], dtype=torch.int32)
    assert lora_ops._reasons_multi("cuda", x, w, ws, A[None], B[None], idx, explicit=True) == []
    # ranks past the cuda kernels' 64 are still refused, with the limit named
    big = torch.randn(65, x.shape[1])
    assert "ranks up to 64" in lora_ops._reasons("cuda", x, w, ws, big, None, explicit=True)[0]


def test_int8_path_is_the_int8_ops_choice(monkeypatch):
    """The C++ ops' int8_path comes from lrkernels.ops.int8 (the measured table, else its rule):
    0 off CUDA and for a dense base; on CUDA the id of int8's cuda_path for the same product
    (forward: M x in -> out; input gradient: transposed)."""
    x, w, ws, A, B = _single(M=5, K=96, N=70, base="packed")
    assert lora_ops._int8_path(x, w, ws, transposed=False) == 0  # CPU tensor
    assert lora_ops._int8_path(x, w, None, transposed=False) == 0  # dense base
    seen = []

    def fake_path_id(act, features, n, k, transposed):
        seen.append((features, n, k, transposed))
        return 2

    monkeypatch.setattr(lora_ops, "_path_id", fake_path_id)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert lora_ops._int8_path(x, w, ws, transposed=False) == 2
    assert lora_ops._int8_path(torch.empty(5, 70), w, ws, transposed=True) == 2
    assert seen == [(96, 70, 96, False), (70, 70, 96, True)]


@pytest.mark.skipif(not CPU_OK, reason="the cpu backend (the extension) is not built")
def test_cpp_ops_check_a_packed_base_and_the_int8_path():
    """The shared C++ checks take a packed base (N from the scales); the cpu kernels, which read
    layout 1, say so instead of running; int8_path outside 0..2 is named."""
    x, w, ws, A, B = _single(M=5, K=96, N=70, base="packed")
    op = torch.ops.lrkernels.lora_linear
    with pytest.raises(RuntimeError, match=r"cpu backend\): reads an int8 base in layout 1"):
        op(x, w, ws, A, B, None, 1.0, 0, None, 0)
    with pytest.raises(RuntimeError, match=r"B must have shape \(70, 4\)"):
        op(x, w, ws, A, B[:69], None, 1.0, 0, None, 0)
    with pytest.raises(RuntimeError, match=r"x's last dimension must be 96"):
        op(x[:, :80], w, ws, A[:, :80], B, None, 1.0, 0, None, 0)
    plain = quant.unpack(w, ws)
    with pytest.raises(RuntimeError, match=r"int8_path must be 0 \(the default rule\)"):
        op(x, *plain, A, B, None, 1.0, 0, None, 3)
    y, _ = op(x, *plain, A, B, None, 1.0, 0, None, 2)  # a valid path: ignored off CUDA
    torch.testing.assert_close(y, op(x, *plain, A, B, None, 1.0, 0, None)[0])


def test_packed_base_shape_errors():
    x, w, ws, A, B = _single(N=40, base="packed")
    with pytest.raises(ValueError, match="row units"):
        lrkernels.lora_linear(x, (w, ws[:8]), A, B[:8], scale=1.0)
    with pytest.raises(ValueError, match="x's last dimension must be 64"):
        lrkernels.lora_linear(x[:, :48], (w, ws), A[:, :48], B, scale=1.0)
    with pytest.raises(ValueError, match="packed"):
        lrkernels.lora_linear(x, (w[..., :256], ws), A, B, scale=1.0)


BACKENDS = ["triton", "cpu", "torch"]
# (leading dims, in (a multiple of 16: packable), out (odd, not a multiple of 32), r, group)
PACKED_SHAPES = [
    ((5,), 48, 37, 3, 0),
    ((2, 7), 96, 70, 5, 32),
    ((19,), 128, 33, 16, 64),
    ((1,), 256, 65, 8, 128),
    ((0,), 64, 9, 2, 32),
]


def _int8_pair(N, K, group, dtype):
    q, s = quant.quantize(torch.randn(N, K) / K**0.5, group or None, scale_dtype=dtype)
    return (q, s), quant.pack(q, s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", PACKED_SHAPES, ids=str)
def test_packed_and_plain_bases_agree(backend, dtype, shape):
    """The same weight in layout 1 and layout 2: identical outputs and gradients on each
    backend (the same dequantized values, the same arithmetic), and both match float64."""
    lead, K, N, r, group = shape
    torch.manual_seed(K + N)
    plain, packed = _int8_pair(N, K, group, dtype)
    x = torch.randn(*lead, K).to(dtype)
    skip_unless_runs("lora_linear", backend, x, *plain, x.new_ones(r, K), x.new_ones(N, r), None)
    A = (torch.randn(r, K) / K**0.5).to(dtype)
    B = torch.randn(N, r).to(dtype)
    b = torch.randn(N).to(dtype)
    outs, grads = [], []
    for base in (plain, packed):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, b)]
        y = lrkernels.lora_linear(
            leaves[0], base, *leaves[1:3], leaves[3], scale=0.75, dropout_p=0.2,
            dropout_seed=11, backend=backend,
        )  # fmt: skip
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for g_plain, g_packed in zip(*grads, strict=True):
        torch.testing.assert_close(g_packed, g_plain, rtol=0, atol=0)
    if x.numel():  # and both are right (float64 reference, the same dropout mask)
        thr = lrkernels.reference.lora_dropout_threshold(0.2)
        s = 0.75 * lrkernels.reference.lora_keep_scale(thr)
        exact = lora_linear_exact(x, *packed, A, B, b, s, thr, torch.tensor([11]))
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(outs[1].double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_base_multi_adapter(backend):
    K, N, n, r_max = 80, 45, 3, 8
    plain, packed = _int8_pair(N, K, 0, torch.float32)
    x = torch.randn(2, 9, K)
    idx = torch.randint(-1, n, (2, 9), dtype=torch.int32)
    A = torch.randn(n, r_max, K) / K**0.5
    B = torch.randn(n, N, r_max)
    ranks = torch.tensor([8, 3, 0], dtype=torch.int32)
    scales = torch.tensor([0.5, 2.0, 1.0])
    skip_unless_runs("lora_linear_multi", backend, x, *plain, A, B, idx, ranks, scales, None)
    ys = [
        lrkernels.lora_linear_multi(
            x, base, A, B, idx, ranks=ranks, scales=scales, bias=None, backend=backend
        )
        for base in (plain, packed)
    ]
    torch.testing.assert_close(ys[1], ys[0], rtol=0, atol=0)
    exact = lora_linear_multi_exact(x, *packed, A, B, idx, ranks, scales)
    torch.testing.assert_close(ys[1].double(), exact, rtol=1e-4, atol=1e-4)


def test_triton_config_blocks_fit_packed_units():
    from lrkernels.triton_kernels.lora import choose_config

    for transposed in (False, True):  # N = 10: a plain base gets a 16-wide N-block
        plain = choose_config(3, 10, 64, 4, 0, torch.float16, 1, transposed, True, False)
        packed = choose_config(3, 10, 64, 4, 0, torch.float16, 1, transposed, True, True)
        assert plain["BLOCK_N"] == 16 and packed["BLOCK_N"] == 32
        assert packed["BLOCK_K"] % 16 == 0


def test_python_mirrors_of_the_cuda_constants():
    """The Python side's copies of the cuda LoRA limits equal the C++ ones they mirror (auto
    selection and the reasons rely on them without calling into the extension)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    src = (root / "lora_kernels.cuh").read_text() + (root / "lora_cuda.cpp").read_text()
    src += (root / "int8_kernels.cuh").read_text()
    for name, value in [
        ("kLoraMaxRank", lora_ops._CUDA_MAX_RANK),
        ("kLoraGemvMaxRows", lora_ops._CUDA_GEMV_MAX_ROWS),
        ("kDenseFusedMaxRows", lora_ops.CUDA_DENSE_FUSED_MAX_ROWS),
        ("kInt8MaxAddendRank", lora_ops._CUDA_MAX_RANK),
        ("kInt8DequantMatmulMinRows", lora_ops.DEQUANT_MATMUL_MIN_ROWS),
    ]:
        assert f"constexpr int64_t {name} = {value};" in src, name
