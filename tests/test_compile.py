"""Compiled training through every op, on the layouts models produce.

torch.compile plans memory from the fake (meta) implementations and asserts, after each
compiled call of a custom op, that the real output has the sizes *and strides* the fake
promised. So every fake must describe its kernel's outputs exactly — contiguous tensors, on
every backend — also when the inputs are not contiguous: attention's q/k/v usually come from
``proj(x).view(B, S, H, D).transpose(1, 2)``, and the backward of a linear sees transposed
weights. Two checks:

- fast: each op's fake output (under FakeTensorMode) has the real output's shape, dtype and
  strides, on every backend that runs here (cpu; cuda and triton on a GPU);
- slow: one fullgraph-compiled training step through every op (lowrank_linear, int8_linear and
  its input gradient, block_sparse_attention forward/backward with lse, local_attention) on
  non-contiguous inputs with dynamic shapes, compared with eager, forward and gradients, on the
  backends inductor compiles on CPU (the C++ ops and the torch reference). The Triton ops
  compile only on a GPU (compiling a triton_op traces the kernel with fake tensors).
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import lrkernels
from lrkernels import masks, quant
from lrkernels.reference import relative_error

B, H, HKV, D, IN, RANK, OUT = 2, 4, 2, 32, 48, 8, 64
WINDOW, BLOCK = (7, 0), 16


def _device(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") else "cpu"


def _skip_unless(backend: str) -> None:
    if backend in ("cuda", "triton") and not HAS_CUDA:
        pytest.skip(f"{backend}: needs a CUDA device")
    reason = lrkernels.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _inputs(seq: int, device: str, dtype=torch.float32, requires_grad: bool = False, batch=B):
    """Non-contiguous inputs as models make them: q/k/v viewed out of one projection and
    transposed to (B, H, S, D); x a transposed (B, S, IN) view; weights and int8 tensors."""
    qkv = torch.randn(batch, seq, (H + 2 * HKV) * D, device=device, dtype=dtype)
    xt = torch.randn(batch, IN, seq, device=device, dtype=dtype)
    qkv.requires_grad_(requires_grad)
    xt.requires_grad_(requires_grad)
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], dim=-1)
    q = q.view(batch, seq, H, D).transpose(1, 2)
    k = k.view(batch, seq, HKV, D).transpose(1, 2)
    v = v.view(batch, seq, HKV, D).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    x = xt.transpose(1, 2)
    U = (torch.randn(OUT, RANK, device=device, dtype=dtype) / RANK**0.5).requires_grad_(
        requires_grad
    )
    V = (torch.randn(RANK, IN, device=device, dtype=dtype) / IN**0.5).requires_grad_(requires_grad)
    bias = torch.randn(OUT, device=device, dtype=dtype).requires_grad_(requires_grad)
    qweight, scales = quant.quantize(torch.randn(OUT, OUT, device=device), 32, scale_dtype=dtype)
    bias8 = torch.randn(OUT, device=device, dtype=dtype)
    return dict(qkv=qkv, xt=xt, q=q, k=k, v=v, x=x, U=U, V=V, bias=bias, qweight=qweight,
                scales=scales, bias8=bias8)  # fmt: skip


# ------------------------------------------------------------------ fakes match the kernels


def _op_cases(backend: str, t: dict, layout: masks.BlockLayout):
    """(name, op, args) for every op of the backend, on non-contiguous inputs."""
    ops = torch.ops.lrkernels
    suffix = "_triton" if backend == "triton" else ""
    if backend == "triton":
        lrkernels.ops.register_triton_ops()
    lists = (layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks,
             layout.full_kv_indices)  # fmt: skip
    params = (layout.block_q, layout.block_k, *layout.window, D**-0.5)
    fwd = getattr(ops, f"block_sparse_attention_fwd{suffix}")
    out, lse = fwd(t["q"], t["k"], t["v"], *lists, *params)
    tq = layout.transposed()
    dout = torch.randn_like(t["q"].transpose(1, 2)).transpose(1, 2)  # non-contiguous too
    seq, dev, dtype = t["q"].shape[2], t["x"].device, t["x"].dtype
    dy = torch.randn(B, OUT, seq, device=dev, dtype=dtype).transpose(1, 2)
    x8 = torch.randn(B, OUT, seq, device=dev, dtype=dtype).transpose(1, 2)
    return [
        ("lowrank_linear", getattr(ops, f"lowrank_linear{suffix}"),
         (t["x"], t["U"], t["V"], t["bias"])),
        ("lowrank_linear (dx: transposed factors)", getattr(ops, f"lowrank_linear{suffix}"),
         (dy, t["V"].t(), t["U"].t(), None)),
        ("int8_linear", getattr(ops, f"int8_linear{suffix}"),
         (x8, t["qweight"], t["scales"], t["bias8"])),
        ("int8_linear_grad_input", getattr(ops, f"int8_linear_grad_input{suffix}"),
         (dy, t["qweight"], t["scales"])),
        ("lowrank_linear (empty batch)", getattr(ops, f"lowrank_linear{suffix}"),
         (t["x"][:, :0], t["U"], t["V"], t["bias"])),
        ("int8_linear (one row)", getattr(ops, f"int8_linear{suffix}"),
         (x8[:, -1:], t["qweight"], t["scales"], None)),
        ("block_sparse_attention_fwd", fwd, (t["q"], t["k"], t["v"], *lists, *params)),
        ("block_sparse_attention_bwd", getattr(ops, f"block_sparse_attention_bwd{suffix}"),
         (dout, t["q"], t["k"], t["v"], out, lse, *lists, *tq, *params)),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_fake_outputs_have_the_kernels_strides(backend):
    _skip_unless(backend)
    dev = _device(backend)
    dtype = torch.float16 if dev == "cuda" else torch.float32
    seq = 45
    t = _inputs(seq, dev, dtype)
    layout = masks.local_window_layout(seq, seq, WINDOW, block_q=BLOCK, block_k=BLOCK).to(dev)
    if dev == "cuda":
        layout = masks.local_window_layout(seq, seq, WINDOW, block_q=64, block_k=64).to(dev)
    for name, op, args in _op_cases(backend, t, layout):
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real = real if isinstance(real, tuple | list) else (real,)
        fake = fake if isinstance(fake, tuple | list) else (fake,)
        assert len(real) == len(fake), name
        for i, (r, f) in enumerate(zip(real, fake, strict=True)):
            what = f"{backend} {name} output {i}"
            assert (f.shape, f.dtype) == (r.shape, r.dtype), what
            assert f.stride() == r.stride(), f"{what}: fake strides {f.stride()} != {r.stride()}"
            assert r.is_contiguous(), f"{what}: the kernels return contiguous tensors"


# ------------------------------------------------- one compiled training step through every op


def _step(t: dict, layout: masks.BlockLayout, backend: str) -> torch.Tensor:
    h = lrkernels.lowrank_linear(t["x"], t["U"], t["V"], t["bias"], backend=backend)
    h = lrkernels.int8_linear(h, t["qweight"], t["scales"], t["bias8"], backend=backend)
    q, k, v = t["q"], t["k"], t["v"]
    a = lrkernels.local_attention(q, k, v, WINDOW, backend=backend, block_size=BLOCK)
    # A layout is a constant of the compiled graph (its lengths are Python ints): attend over
    # the first FIXED positions, so that only the batch size varies for this op.
    n = layout.q_len
    o, lse = lrkernels.block_sparse_attention(
        q[:, :, :n], k[:, :, :n], v[:, :, :n], layout, return_lse=True, backend=backend
    )
    return h.square().mean() + a.square().mean() + (o * a[:, :, :n]).mean() + lse.mean() / 16


def _grads(loss: torch.Tensor, t: dict) -> list[torch.Tensor]:
    leaves = [t["xt"], t["qkv"], t["U"], t["V"], t["bias"]]
    return list(torch.autograd.grad(loss, leaves))


# Inductor where the custom ops are (its generated code asserts the fakes' strides after each
# call: the check the original bug tripped); the torch backend is plain torch ops, for which
# aot_eager checks tracing, fullgraph and dynamic shapes without minutes of C++ compilation.
COMPILER = {"cpu": "inductor", "torch": "aot_eager", "cuda": "inductor", "triton": "inductor"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "torch", "cuda", "triton"])
def test_compiled_training_step_non_contiguous_dynamic(backend):
    _skip_unless(backend)
    dev = _device(backend)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(COMPILER[backend])
    compiled = torch.compile(_step, backend=counter, fullgraph=True, dynamic=True)
    layout = masks.local_window_layout(32, 32, (12, 3), block_q=BLOCK, block_k=BLOCK).to(dev)
    # Odd lengths, not multiples of the block; batch and length change on the second call,
    # which must reuse the compiled graph.
    for batch, seq in ((3, 40), (5, 57)):  # no size shared with a fixed dim (duck sizing)
        t = _inputs(seq, dev, requires_grad=True, batch=batch)
        loss = compiled(t, layout, backend)
        grads = _grads(loss, t)
        ref_loss = _step(t, layout, backend)
        ref_grads = _grads(ref_loss, t)
        assert relative_error(loss.detach(), ref_loss.detach()) < 1e-5
        for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
            assert torch.isfinite(g).all(), f"gradient {i}"
            assert relative_error(g, r) < 1e-5, f"gradient {i} at batch {batch}, seq {seq}"
    assert counter.frame_count == 1, "dynamic shapes: the second call recompiled"
