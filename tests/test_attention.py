"""local_attention / block_sparse_attention: every backend against the float64 dense
reference — windows, Sq ≠ Sk, GQA, odd lengths, fully masked rows, every layout builder, lse,
gradients (also through lse), torch.library checks, torch.compile and argument errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_matches, device_for, skip_unless_runs

import lrkernels
from lrkernels import masks
from lrkernels.reference import (
    attention_visibility,
    block_sparse_attention_reference,
    relative_error,
)

BACKENDS = ["cuda", "triton", "cpu", "torch"]
OP = "block_sparse_attention"


def block_for(backend):
    """Small blocks under the Triton interpreter (speed); the GPU kernels take 64/128."""
    return 64 if HAS_CUDA or backend == "cuda" else 16


def make_qkv(b, hq, hkv, sq, sk, d, dtype, device):
    q = torch.randn(b, hq, sq, d, device=device).to(dtype)
    k = torch.randn(b, hkv, sk, d, device=device).to(dtype)
    v = torch.randn(b, hkv, sk, d, device=device).to(dtype)
    return q, k, v


def exact(q, k, v, layout, scale=None):
    return block_sparse_attention_reference(q.double(), k.double(), v.double(), layout, scale)


def dtypes_for(backend):
    return [torch.float16, torch.bfloat16] if backend == "cuda" else [torch.float32, torch.float16]


def check_case(backend, q, k, v, layout, scale=None):
    skip_unless_runs(OP, backend, q, k, v, layout)
    out, lse = lrkernels.block_sparse_attention(
        q, k, v, layout, scale=scale, return_lse=True, backend=backend
    )
    ref_out, ref_lse = exact(q, k, v, layout, scale)
    same_dtype, _ = block_sparse_attention_reference(q, k, v, layout, scale)
    assert_matches(out, ref_out, same_dtype)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly on masked rows"
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-3, atol=1e-3)


# (Sq, Sk, window, causal): every window/causal combination, Sq ≠ Sk both ways, odd lengths.
WINDOWS = [
    (77, 77, (-1, -1), False),
    (77, 77, (-1, 0), True),
    (70, 70, (20, 0), True),
    (50, 83, (17, 9), False),
    (83, 50, (30, -1), False),
    (40, 90, (-1, 0), True),  # chunked prefill: the queries are the last 40 positions
    (1, 65, (31, 0), True),  # decode: one query sees the last 32 keys
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", WINDOWS, ids=str)
def test_local_attention_matches_reference(backend, case):
    sq, sk, window, causal = case
    dev = device_for(backend)
    dtype = dtypes_for(backend)[0]
    q, k, v = make_qkv(2, 4, 2, sq, sk, 32, dtype, dev)
    bs = block_for(backend)
    layout = masks.local_window_layout(sq, sk, window, causal=causal, block_q=bs, block_k=bs)
    check_case(backend, q, k, v, layout.to(dev))
    # local_attention builds the same layout itself
    skip_unless_runs(OP, backend, q, k, v, layout.to(dev))
    out = lrkernels.local_attention(q, k, v, window, causal=causal, backend=backend, block_size=bs)
    torch.testing.assert_close(
        out, lrkernels.block_sparse_attention(q, k, v, layout.to(dev), backend=backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [32, 64, 96])
def test_head_dims_dtypes_and_gqa(backend, d):
    dev = device_for(backend)
    bs = block_for(backend)
    for dtype in dtypes_for(backend):
        for hkv in (4, 1):  # MHA-like group of 1, and MQA
            q, k, v = make_qkv(1, 4, hkv, 45, 45, d, dtype, dev)
            layout = masks.local_window_layout(45, 45, (20, 0), block_q=bs, block_k=bs)
            check_case(backend, q, k, v, layout.to(dev), scale=0.3)


def _layouts(sq, sk, bs):
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    dense = torch.rand(2, 1, nqb, nkb) < 0.4
    dense[..., 0] = True
    return {
        "causal": masks.causal_layout(sq, sk, block_q=bs, block_k=bs),
        "dilated": masks.dilated_layout(sq, sk, stride=2, window_blocks=4, block_q=bs, block_k=bs, causal=True),
        "longformer": masks.longformer_layout(sq, sk, window=(bs, bs), global_tokens=bs, block_q=bs, block_k=bs),
        "bigbird": masks.bigbird_layout(sq, sk, window_blocks=1, global_blocks=1, random_blocks=1, block_q=bs, block_k=bs),
        "dense-matrix": masks.from_block_mask_matrix(dense, sq, sk, bs, bs),
    }  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["causal", "dilated", "longformer", "bigbird", "dense-matrix"])
def test_layout_builders(backend, pattern):
    dev = device_for(backend)
    bs = block_for(backend)
    sq = sk = 3 * bs + 5
    layout = _layouts(sq, sk, bs)[pattern].to(dev)
    q, k, v = make_qkv(2, 2, 2, sq, sk, 32, dtypes_for(backend)[0], dev)
    check_case(backend, q, k, v, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zeros_and_no_nan_gradients(backend):
    dev = device_for(backend)
    bs = block_for(backend)
    sq, sk = 2 * bs, 2 * bs
    # Only the second query block lists a key block: the first block's rows see nothing.
    dense = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    dense[0, 0, 1, 0] = True
    layout = masks.from_block_mask_matrix(dense, sq, sk, bs, bs).to(dev)
    q, k, v = make_qkv(1, 2, 2, sq, sk, 32, dtypes_for(backend)[0], dev)
    skip_unless_runs(OP, backend, q, k, v, layout)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = lrkernels.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert torch.all(out[:, :, :bs] == 0) and torch.all(lse[:, :, :bs] == float("-inf"))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :bs] == 0)


def _grad_check(backend, q, k, v, layout, use_lse):
    skip_unless_runs(OP, backend, q, k, v, layout)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[:3], device=q.device)

    def loss(out, lse, dout, dlse):
        total = (out.to(dout.dtype) * dout).sum()
        if use_lse:
            finite = torch.isfinite(lse)
            total = total + (torch.where(finite, lse, 0).to(dlse.dtype) * dlse).sum()
        return total

    out, lse = lrkernels.block_sparse_attention(*leaves, layout, return_lse=True, backend=backend)
    loss(out, lse, dout, dlse).backward()
    ref_out, ref_lse = block_sparse_attention_reference(*ref_leaves, layout)
    loss(ref_out, ref_lse, dout.double(), dlse.double()).backward()
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2
    for name, got, want in zip("qkv", leaves, ref_leaves, strict=True):
        err = (got.grad.double() - want.grad).norm() / want.grad.norm().clamp_min(1e-12)
        assert err < tol, f"d{name}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_lse", [False, True], ids=["out", "out+lse"])
def test_gradients(backend, use_lse):
    dev = device_for(backend)
    bs = block_for(backend)
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = make_qkv(1, 4, 2, 2 * bs + 3, 2 * bs + 9, 32, dtype, dev)
    layout = masks.local_window_layout(q.shape[2], k.shape[2], (bs, 3), block_q=bs, block_k=bs)
    _grad_check(backend, q, k, v, layout.to(dev), use_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = device_for(backend)
    bs = block_for(backend)
    dtype = dtypes_for(backend)[0]
    # (B, S, H, D) storage seen as (B, H, S, D): the layout most models produce
    q = torch.randn(2, 50, 4, 32, device=dev).to(dtype).transpose(1, 2)
    k = torch.randn(2, 50, 2, 32, device=dev).to(dtype).transpose(1, 2)
    v = torch.randn(2, 50, 2, 32, device=dev).to(dtype).transpose(1, 2)
    layout = masks.local_window_layout(50, 50, (-1, 0), block_q=bs, block_k=bs).to(dev)
    check_case(backend, q, k, v, layout)


def test_backward_is_deterministic():
    backend = "cuda" if HAS_CUDA else "cpu"
    dev = device_for(backend)
    q, k, v = make_qkv(1, 4, 1, 130, 130, 64, torch.float16 if HAS_CUDA else torch.float32, dev)
    layout = masks.local_window_layout(130, 130, (64, 0), block_q=64, block_k=64).to(dev)
    skip_unless_runs(OP, backend, q, k, v, layout)
    grads = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        lrkernels.block_sparse_attention(*leaves, layout, backend=backend).sum().backward()
        grads.append([t.grad.clone() for t in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_opcheck_cpp_op(backend):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no CUDA device")
    dev = "cuda" if backend == "cuda" else "cpu"
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = make_qkv(1, 2, 1, 70, 70, 32, dtype, dev)
    layout = masks.local_window_layout(70, 70, (30, 0), block_q=64, block_k=64).to(dev)
    skip_unless_runs(OP, backend, q, k, v, layout)
    args = (
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), layout.kv_num_blocks,
        layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices, 64, 64, 30, 0, 0.2,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lrkernels.block_sparse_attention_fwd.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("compiling a triton_op traces the kernel with fake tensors: GPU only")
    dtype = torch.float16 if dev == "cuda" else torch.float32
    q, k, v = make_qkv(1, 2, 2, 70, 70, 32, dtype, dev)
    layout = masks.local_window_layout(70, 70, (30, 0), block_q=64, block_k=64).to(dev)
    skip_unless_runs(OP, backend, q, k, v, layout)

    def f(q, k, v):
        return lrkernels.block_sparse_attention(q, k, v, layout, backend=backend).float().sum(-1)

    eager = f(q, k, v)
    q1 = q.detach().requires_grad_()
    out = torch.compile(f, fullgraph=True)(q1, k, v)
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
    out.sum().backward()
    assert torch.isfinite(q1.grad).all()


@pytest.mark.slow
def test_local_attention_compiles_fullgraph_and_matches_eager():
    """While compiling, local_attention builds its layout with static shapes; that layout must
    describe the same attention as the eager builder's."""
    q, k, v = make_qkv(1, 2, 1, 150, 170, 32, torch.float32, "cpu")
    skip_unless_runs(OP, "cpu", q, k, v, masks.causal_layout(150, 170, block_q=64, block_k=64))
    from lrkernels.ops.attention import _static_window_layout

    for window in [(40, 0), (-1, 0), (30, 20), (-1, -1), (70, -1)]:
        static = _static_window_layout(150, 170, *window, 64, "cpu")
        eager = masks.local_window_layout(150, 170, window, block_q=64, block_k=64)
        for which in ("partial", "full"):
            assert torch.equal(static.dense_block_mask(which), eager.dense_block_mask(which))

    def f(q, k, v):
        return lrkernels.local_attention(q, k, v, (40, 0), backend="cpu", block_size=64)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_sparse_attention_module():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 32, torch.float32, "cpu")
    mod = lrkernels.nn.SparseAttention((10, 0), block_size=16, backend="torch")
    want = lrkernels.local_attention(q, k, v, (10, 0), block_size=16, backend="torch")
    torch.testing.assert_close(mod(q, k, v), want)
    layout = masks.causal_layout(40, 40, block_q=16, block_k=16)
    mod = lrkernels.nn.SparseAttention(layout=layout, backend="torch")
    torch.testing.assert_close(
        mod(q, k, v),
        lrkernels.local_attention(q, k, v, causal=True, block_size=16, backend="torch"),
    )
    assert "layout" in repr(mod)
    with pytest.raises(ValueError, match="exactly one"):
        lrkernels.nn.SparseAttention((4, 0), layout=layout)


# ------------------------------------------------------------------- the C++ CPU kernel
# (csrc/cpu/attention_cpu*.{cpp,h}: packed tiles padded to 16, a register-blocked micro-kernel,
# AVX2 + FMA or baseline code picked at run time). Shapes that exercise the padding and the
# micro-kernel's row remainders, every dtype, forward and backward against float64, with torch's
# masked SDPA in the same dtype as the yardstick.


def _sdpa_same_dtype(q, k, v, layout, scale, dout):
    """torch's own masked SDPA (and its gradients) in the inputs' dtype; rows that see no key
    give 0."""
    group = q.shape[1] // k.shape[1]
    vis = attention_visibility(layout, q.device)
    rows = vis.any(-1, keepdim=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(
        leaves[0], leaves[1].repeat_interleave(group, 1), leaves[2].repeat_interleave(group, 1),
        attn_mask=vis | ~rows, scale=scale,
    ) * rows  # fmt: skip
    out.backward(dout)
    return out.detach(), *(t.grad for t in leaves)


def _check_cpu_kernel(q, k, v, layout, scale):
    skip_unless_runs(OP, "cpu", q, k, v, layout)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = lrkernels.block_sparse_attention(
        *leaves, layout, scale=scale, return_lse=True, backend="cpu"
    )
    exact_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = block_sparse_attention_reference(*exact_leaves, layout, scale)
    dout = torch.randn_like(q)
    if q.dtype == torch.float64:
        yard = (block_sparse_attention_reference(q, k, v, layout, scale)[0],) + (None,) * 3
    else:
        yard = _sdpa_same_dtype(q, k, v, layout, scale, dout)
    assert_matches(out.detach(), ref_out.detach(), yard[0])
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly on masked rows"
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite].detach(), rtol=1e-5, atol=1e-5)
    out.backward(dout)
    ref_out.backward(dout.double())
    for name, got, want, y in zip("qkv", leaves, exact_leaves, yard[1:], strict=True):
        if y is None:
            # float64: the backward recomputes P from the lse the forward stored in float32
            # (the op's schema), so the gradients carry its 6e-8 relative rounding.
            err = relative_error(got.grad, want.grad)
            assert err < 1e-6, f"d{name}: relative error {err:.2e}"
        else:
            assert_matches(got.grad, want.grad, y, what=f"d{name}")
    return out, lse, [t.grad for t in leaves]


# (B, Hq, Hkv, Sq, Sk, D, block_q, block_k, window)
CPU_KERNEL_CASES = [
    (1, 2, 2, 37, 37, 1, 16, 16, (20, 0)),  # D = 1: a 16-column padded tile
    (2, 4, 1, 50, 83, 40, 24, 40, (17, 9)),  # D, blocks not multiples of 16; MQA; Sq < Sk
    (1, 3, 3, 130, 130, 100, 64, 48, (-1, 0)),  # causal, 64 rows = 10 x 6 + 4 micro-tiles
    (1, 2, 1, 45, 30, 16, 8, 8, (-1, 0)),  # Sq > Sk: the first 15 rows see no key
    (1, 2, 2, 40, 70, 72, 128, 128, (63, 0)),  # blocks larger than both sequences
    (1, 4, 2, 65, 65, 160, 32, 16, (10, 10)),  # D > 128, two-sided window, GQA
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CPU_KERNEL_CASES, ids=str)
def test_cpu_kernel_shapes_and_dtypes(case, dtype):
    b, hq, hkv, sq, sk, d, bq, bk, window = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype, "cpu")
    layout = masks.local_window_layout(sq, sk, window, block_q=bq, block_k=bk)
    _check_cpu_kernel(q, k, v, layout, scale=d**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_per_batch_and_head_layout(dtype):
    # Lists per (batch, query head), random blocks, GQA; non-contiguous (B, S, H, D) inputs.
    b, hq, hkv, s, d, bs = 2, 4, 2, 70, 48, 16
    n = -(-s // bs)
    dense = torch.rand(b, hq, n, n) < 0.5
    layout = masks.from_block_mask_matrix(dense, s, s, bs, bs)
    q = torch.randn(b, s, hq, d).to(dtype).transpose(1, 2)
    k = torch.randn(b, s, hkv, d).to(dtype).transpose(1, 2)
    v = torch.randn(b, s, hkv, d).to(dtype).transpose(1, 2)
    _check_cpu_kernel(q, k, v, layout, scale=0.2)


def test_cpu_kernel_is_bitwise_independent_of_the_thread_count():
    q, k, v = make_qkv(2, 4, 2, 150, 150, 64, torch.float32, "cpu")
    layout = masks.local_window_layout(150, 150, (70, 0), block_q=32, block_k=32)
    skip_unless_runs(OP, "cpu", q, k, v, layout)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = lrkernels.block_sparse_attention(*leaves, layout, backend="cpu")
            out.backward(torch.ones_like(out))
            results.append([out.detach(), *(t.grad for t in leaves)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_cpu_kernel_baseline_isa():
    """The kernels' baseline-ISA copy (taken when the CPU lacks AVX2/FMA, or with
    ATEN_CPU_CAPABILITY=default) against float64, in a fresh process."""
    if lrkernels.available_backends()["cpu"] is not None:
        pytest.skip("extension not built")
    script = textwrap.dedent(
        """
        import torch
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        import lrkernels
        from lrkernels import masks
        from lrkernels.reference import block_sparse_attention_reference as ref
        torch.manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-6), (torch.bfloat16, 2e-2)):
            q, k, v = (torch.randn(1, 4, 75, 40).to(dtype) for _ in range(3))
            layout = masks.local_window_layout(75, 75, (30, 5), block_q=16, block_k=32)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
            out = lrkernels.block_sparse_attention(*leaves, layout, backend="cpu")
            want = ref(*exact, layout)[0]
            g = torch.randn_like(out)
            out.backward(g)
            want.backward(g.double())
            for a, b in [(out, want)] + [(x.grad, y.grad) for x, y in zip(leaves, exact)]:
                err = ((a.double() - b.double()).norm() / b.double().norm()).item()
                assert err < tol, (dtype, err)
        print("ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ------------------------------------------------------------------------------- errors


def test_bad_inputs_errors():
    q, k, v = make_qkv(1, 4, 2, 20, 20, 32, torch.float32, "cpu")
    layout = masks.local_window_layout(20, 20, (-1, 0), block_q=16, block_k=16)
    cases = [
        ((q[0], k, v, layout), ValueError, "q must be 4-D"),
        ((q.long(), k, v, layout), TypeError, "q must be float"),
        ((q, k.half(), v, layout), TypeError, "k must have q's dtype"),
        ((q, k, v[:, :, :19], layout), ValueError, "k and v must have the same shape"),
        ((q, k[:, :, :, :16], v[:, :, :, :16], layout), ValueError, "k must have shape"),
        ((q[:, :3], k, v, layout), ValueError, "multiple of k/v heads"),
        ((q, k, v, "causal"), TypeError, "layout must be a lrkernels.masks.BlockLayout"),
        ((q[:, :, :19], k, v, layout), ValueError, "layout is for"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            lrkernels.block_sparse_attention(*args)
    with pytest.raises(ValueError, match="causal=True means right = 0"):
        lrkernels.local_attention(q, k, v, (4, 2), causal=True)
    with pytest.raises(ValueError, match="window entries must be >= -1"):
        lrkernels.local_attention(q, k, v, (-2, 0))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(window=(4.9, 0)), TypeError, r"window left must be an int, got 4\.9"),
        (dict(window=(-0.5, 0)), TypeError, r"window left must be an int, got -0\.5"),
        (dict(window=(True, 0)), TypeError, "window left must be an int, got True"),
        (dict(window=(3, 1.0)), TypeError, "window right must be an int"),
        (dict(window=(3, torch.tensor(0.0))), TypeError, "window right must be an int or a one"),
        (dict(window=4), TypeError, "window must be a pair"),
        (dict(window=(1, 2, 3)), ValueError, "window must be a pair"),
        (dict(window=(4, 0), block_size=16.0), TypeError, "block_size must be an int"),
        (dict(window=(4, 0), block_size=0), ValueError, "block_size must be a positive int"),
    ],
)
def test_window_and_block_size_must_be_ints(kwargs, exc, match):
    q, k, v = make_qkv(1, 2, 1, 20, 20, 32, torch.float32, "cpu")
    with pytest.raises(exc, match=match):
        lrkernels.local_attention(q, k, v, backend="torch", **kwargs)
    module_kwargs = dict(kwargs)
    window = module_kwargs.pop("window")
    with pytest.raises(exc, match=match):  # the module checks at construction
        lrkernels.nn.SparseAttention(window, **module_kwargs)


def test_window_accepts_integer_tensors_and_numpy_ints():
    import numpy as np

    q, k, v = make_qkv(1, 2, 1, 20, 20, 32, torch.float32, "cpu")
    want = lrkernels.local_attention(q, k, v, (4, 0), block_size=16, backend="torch")
    got = lrkernels.local_attention(
        q, k, v, (torch.tensor(4), np.int64(0)), block_size=np.int32(16), backend="torch"
    )
    assert torch.equal(got, want)
    mod = lrkernels.nn.SparseAttention((torch.tensor(4), 0), block_size=16, backend="torch")
    assert mod.window == (4, 0) and torch.equal(mod(q, k, v), want)
    for bad, exc in (
        (dict(layout="causal"), TypeError),
        (dict(window=(4, 0), causal="yes"), TypeError),
        (dict(window=(4, 0), scale="0.1"), TypeError),
        (dict(window=(4, 0), backend="gpu"), ValueError),
        (dict(window=(4, 2), causal=True), ValueError),
    ):
        with pytest.raises(exc):
            lrkernels.nn.SparseAttention(**bad)


def test_unsupported_head_dim_on_gpu_kernels_is_a_clear_error():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 48, torch.float16, "cpu")
    layout = masks.local_window_layout(20, 20, (-1, 0), block_q=64, block_k=64)
    reasons = lrkernels.not_supported_reasons(OP, "cuda", q, k, v, layout)
    assert reasons
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="head_dim"):
            lrkernels.block_sparse_attention(
                q.cuda(), k.cuda(), v.cuda(), layout.to("cuda"), backend="cuda"
            )


def test_cpp_op_errors():
    if lrkernels.available_backends()["cpu"] is not None:
        pytest.skip("extension not built")
    q, k, v = make_qkv(1, 4, 2, 20, 20, 32, torch.float32, "cpu")
    layout = masks.local_window_layout(20, 20, (-1, 0), block_q=16, block_k=16)
    args = [layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks,
            layout.full_kv_indices, 16, 16, -1, 0, 0.1]  # fmt: skip
    with pytest.raises(RuntimeError, match="block_sparse_attention"):
        torch.ops.lrkernels.block_sparse_attention_fwd(q[:, :3], k, v, *args)
    bad = list(args)
    bad[0] = layout.kv_num_blocks.long()
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.lrkernels.block_sparse_attention_fwd(q, k, v, *bad)


# ------------------------------------------------------------------- CUDA kernels (GPU only)


def _cuda_or_skip():
    if not HAS_CUDA:
        pytest.skip("cuda: no CUDA device")


@pytest.mark.parametrize("bq,bk", [(64, 64), (64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_cuda_tiles_head_dims_and_deterministic_backward(bq, bk, d):
    """Every (block_q, block_k) tiling (4- and 8-warp forward tiles, one or two key tiles per
    block in the backward's ordered dQ accumulation) at every head dim, GQA, bf16: forward and
    gradients against float64, and the backward bitwise equal on a second run."""
    _cuda_or_skip()
    q, k, v = make_qkv(2, 4, 2, 300, 333, d, torch.bfloat16, "cuda")
    layout = masks.local_window_layout(300, 333, (150, 0), block_q=bq, block_k=bk).to("cuda")
    check_case("cuda", q, k, v, layout)
    _grad_check("cuda", q, k, v, layout, use_lse=False)
    grads = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        lrkernels.block_sparse_attention(*leaves, layout, backend="cuda").sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_cuda_inputs_the_kernels_copy():
    """Rows that are not 16-byte aligned (an odd storage offset, padded rows, a non-unit last
    stride) are copied by the launcher; the result is the same as for contiguous inputs."""
    _cuda_or_skip()
    b, h, s, d = 1, 2, 100, 64
    base = torch.randn(b * h * s * d + 1, device="cuda").half()
    q = base[1:].view(b, h, s, d)  # 2-byte offset
    k = torch.randn(b, h, s, d + 4, device="cuda").half()[..., :d]  # row stride d + 4
    v = torch.randn(b, h, d, s, device="cuda").half().transpose(2, 3)  # last stride s
    layout = masks.local_window_layout(s, s, (40, 0), block_q=64, block_k=64).to("cuda")
    check_case("cuda", q, k, v, layout)
    contiguous = [t.contiguous() for t in (q, k, v)]
    torch.testing.assert_close(
        lrkernels.block_sparse_attention(q, k, v, layout, backend="cuda"),
        lrkernels.block_sparse_attention(*contiguous, layout, backend="cuda"),
        rtol=0,
        atol=0,
    )
    _grad_check("cuda", q, k, v, layout, use_lse=True)
