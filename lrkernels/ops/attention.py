"""Local-window and block-sparse softmax attention (the contract: docs/attention.md).

``block_sparse_attention`` attends, per query block, to the key blocks a
`lrkernels.masks.BlockLayout` lists — full blocks entirely, partial blocks through the layout's
window mask — so its cost grows with the number of listed blocks, not with Sq·Sk.
``local_attention`` builds the layout of a sliding window and calls it.

Ops (one per compiled backend; the ``torch`` backend is `lrkernels.reference`):

- ``lrkernels::block_sparse_attention_fwd`` / ``_bwd`` — C++ schemas with CPU and CUDA kernels;
- ``lrkernels::block_sparse_attention_fwd_triton`` / ``_bwd_triton`` — `torch.library.triton_op`s.

Autograd recomputes the softmax from the saved log-sum-exp (FlashAttention-2 style, two passes,
no atomics: deterministic). A gradient flowing into the returned ``lse`` is honoured too: it adds
``P·dlse`` to the score gradient, computed by a second call of the same backward kernel with
``dout = dlse·e₀``, ``out = −e₀`` and ``v = 0`` (so that ``dP − Δ = dlse``).
"""

from __future__ import annotations

import functools
import math
import os
import threading

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .. import _ext, backends, dispatch, masks
from ..reference import block_sparse_attention_reference
from . import compile_time_constant

_OP = "block_sparse_attention"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (32, 64, 96, 128)
_TRITON_HEAD_DIMS = (32, 64, 96, 128, 256)
_GPU_BLOCK_SIZES = (64, 128)
_INTERPRETER_BLOCK_SIZES = (16, 32, 64, 128)
_POISON = os.environ.get("LRKERNELS_POISON_OUTPUT") == "1"


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: tuple[int, int] = (-1, -1),
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    block_size: int = 128,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sliding-window attention, FlashAttention's convention: query ``i`` sees key ``j`` iff
    ``i + Sk − Sq − left ≤ j ≤ i + Sk − Sq + right`` (``−1``: unbounded on that side);
    ``causal=True`` means ``right = 0``.

    Args:
        q: ``(B, Hq, Sq, D)``; k, v: ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0`` (GQA/MQA, never
            repeated in memory). float16/bfloat16 (float32 too on triton, cpu, torch; float64
            on cpu, torch).
        window: ``(left, right)``.
        causal: shorthand for ``right = 0`` (``window=(left, r)`` with ``r > 0`` is an error).
        scale: score scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``(B, Hq, Sq)`` float32 (``−inf`` for a row
            that sees no key), so results of chunks can be merged; it carries gradients.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (auto).
        block_size: block size of the layout built for the window (64 or 128 on the GPUs).

    Returns:
        ``out (B, Hq, Sq, D)`` in q's dtype (zeros for a row that sees no key), or
        ``(out, lse)``.
    """
    left, right = normalize_window(window, causal)
    block_size = check_block_size(block_size)
    check_qkv(q, k, v)
    layout = _window_layout(q.shape[2], k.shape[2], left, right, block_size, q.device)
    return block_sparse_attention(
        q, k, v, layout, scale=scale, return_lse=return_lse, backend=backend
    )


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: masks.BlockLayout,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention restricted to the blocks `layout` lists: full blocks entirely, partial
    blocks through ``layout.window`` (docs/attention.md). Tensors, dtypes, ``scale``,
    ``return_lse`` and ``backend`` as in `local_attention`; the layout must be on q's device and
    match ``(Sq, Sk)``, with batch and head dims of 1 (broadcast) or B and Hq."""
    check_qkv(q, k, v)
    check_layout(layout, q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = backends.select_backend(_OP, backend, q, k, v, layout)
    if chosen == "torch":
        out, lse = block_sparse_attention_reference(q, k, v, layout, scale)
    else:
        if chosen == "triton":
            _ensure_triton_ops()
        fwd = (
            torch.ops.lrkernels.block_sparse_attention_fwd_triton
            if chosen == "triton"
            else torch.ops.lrkernels.block_sparse_attention_fwd
        )
        left, right = layout.window
        out, lse = fwd(
            q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks,
            layout.full_kv_indices, layout.block_q, layout.block_k, left, right, scale,
        )  # fmt: skip
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------ checks


def normalize_window(window, causal: bool) -> tuple[int, int]:
    """(left, right) as ints ≥ −1; causal=True sets right = 0. Entries must be ints (or
    one-element integer tensors): a float such as 4.9 or a bool is a TypeError, never rounded."""
    if isinstance(window, str | bytes) or not hasattr(window, "__len__"):
        raise TypeError(f"attention: window must be a pair (left, right) of ints, got {window!r}")
    if len(window) != 2:
        raise ValueError(f"attention: window must be a pair (left, right), got {window!r}")
    left = masks.as_int(window[0], "attention: window left")
    right = masks.as_int(window[1], "attention: window right")
    if left < -1 or right < -1:
        raise ValueError(f"attention: window entries must be >= -1 (-1: unbounded), got {window!r}")
    if causal:
        if right > 0:
            raise ValueError(
                f"attention: causal=True means right = 0, but window={window!r} has right > 0"
            )
        right = 0
    return left, right


def check_block_size(block_size) -> int:
    """``block_size`` as a positive int (TypeError for a non-int, ValueError below 1)."""
    value = masks.as_int(block_size, "attention: block_size")
    if value < 1:
        raise ValueError(f"attention: block_size must be a positive int, got {block_size!r}")
    return value


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raises TypeError/ValueError naming the bad argument (the C++ ops run the same checks)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D (batch, heads, seq, head_dim), got shape "
                f"{tuple(t.shape)}"
            )
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"attention: q must be float64, float32, float16 or bfloat16, got {q.dtype}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} must have q's dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(
                f"attention: {name} must be on q's device ({q.device}), got {t.device}"
            )
    if k.shape != v.shape:
        raise ValueError(
            f"attention: k and v must have the same shape, got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    b, hq, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"attention: k must have shape ({b}, kv_heads, kv_len, {d}) to match q of shape "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"attention: q heads ({hq}) must be a multiple of k/v heads ({hkv}) (GQA/MQA)"
        )
    if d < 1:
        raise ValueError(f"attention: head_dim must be >= 1, got q of shape {tuple(q.shape)}")


def check_layout(layout, q: Tensor, k: Tensor) -> None:
    if not isinstance(layout, masks.BlockLayout):
        raise TypeError(
            f"attention: layout must be a lrkernels.masks.BlockLayout, got {type(layout).__name__}"
        )
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    if (layout.q_len, layout.kv_len) != (sq, sk):
        raise ValueError(
            f"attention: layout is for (q_len, kv_len) = ({layout.q_len}, {layout.kv_len}), "
            f"but q and k have lengths ({sq}, {sk})"
        )
    bl, hl = layout.kv_num_blocks.shape[:2]
    if bl not in (1, b) or hl not in (1, hq):
        raise ValueError(
            f"attention: layout batch/head dims ({bl}, {hl}) must be 1 or match q's ({b}, {hq})"
        )
    if layout.kv_num_blocks.device != q.device:
        raise ValueError(
            f"attention: layout is on {layout.kv_num_blocks.device} but q is on {q.device}; "
            "move it with layout.to(q.device)"
        )


def _reasons(backend: str, q, k, v, layout, *, explicit: bool) -> list[str]:
    reasons = backends.device_and_dtype_reasons(backend, q, explicit=explicit)
    reasons += backends.kernel_reasons(
        backend, ("block_sparse_attention_fwd", "block_sparse_attention_bwd")
    )
    if reasons or backend in ("cpu", "torch"):
        return reasons
    d = q.shape[-1]
    blocks = (layout.block_q, layout.block_k)
    if backend == "cuda":
        if q.dtype == torch.float32:
            reasons.append("the cuda attention kernels take float16 or bfloat16 (not float32)")
        if d not in _CUDA_HEAD_DIMS:
            reasons.append(f"the cuda attention kernels take head_dim 32, 64, 96 or 128, got {d}")
    elif d not in _TRITON_HEAD_DIMS:
        reasons.append(
            f"the triton attention kernels take head_dim 32, 64, 96, 128 or 256, got {d}"
        )
    allowed = _GPU_BLOCK_SIZES if q.is_cuda else _INTERPRETER_BLOCK_SIZES
    if any(bs not in allowed for bs in blocks):
        reasons.append(f"the {backend} kernels take layout block sizes {allowed}, got {blocks}")
    return reasons


backends.register_reasons(_OP, _reasons)


# ----------------------------------------------------------------------------- auto selection


def _dispatch_features(q: Tensor, k: Tensor, v: Tensor, layout) -> dict:
    """What auto selection keys on (lrkernels.dispatch): Python ints from shapes and the
    layout's window only. ``keys``: the most keys one query may see — the window's width when
    both sides are bounded, else the width of the layout's block lists."""
    sk = k.shape[2]
    left, right = layout.window
    width = layout.kv_indices.shape[-1]
    if layout.full_kv_indices is not None:
        width = width + layout.full_kv_indices.shape[-1]
    keys = width * layout.block_k
    if left >= 0 and right >= 0 and left + right + 1 < keys:
        keys = left + right + 1
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return {
        "D": q.shape[-1],
        "Sq": q.shape[2],
        "Sk": sk,
        "keys": keys,
        "mode": "train" if train else "infer",
    }


def _dispatch_class(f) -> str:
    """Head dim, query length bucket, the share of keys a query sees (<= 1/8: sparse, <= 1/2:
    medium, else dense) and inference (forward only) or training (forward and backward)."""
    keys, sk = f["keys"], f["Sk"]
    share = "sparse" if keys * 8 <= sk else ("medium" if keys * 2 <= sk else "dense")
    return (
        f"D={f['D']} Sq={dispatch.bucket(f['Sq'], dispatch.SEQ_BUCKETS)} keys={share} {f['mode']}"
    )


def _dispatch_rule(device: str, dtype: str, f) -> tuple[tuple[str, ...], str]:
    """Backends in the order they are expected to win where the measured table has no row.
    The torch path is a dense masked softmax: Sq x Sk scores in memory, all of them computed."""
    if device == "cuda":
        return ("triton", "cuda"), (
            "the torch path computes all Sq x Sk scores densely; static report (issue 10): "
            "on sm_90 the triton kernels issue warpgroup MMAs (wgmma), the cuda kernels "
            "mma.sync (about 2/3 of wgmma's peak), so triton first until a GPU run measures both"
        )
    return ("cpu",), (
        "on the CPU the cpu kernel (blockwise, listed blocks only): measured on a 2-core CPU "
        "(bench/attn.py, float32, D 32-64, S 128-512, causal windows and dense causal) 4.5-8.5x "
        "faster than the torch path's forward and 1.2-3.6x its forward + backward"
    )


dispatch.register_op(
    _OP, features=_dispatch_features, shape_class=_dispatch_class, rule=_dispatch_rule
)


@functools.lru_cache(maxsize=64)
def _cached_window_layout(sq, sk, left, right, block_size, device):
    return masks.local_window_layout(
        sq, sk, (left, right), block_q=block_size, block_k=block_size
    ).to(device)


def _window_layout(sq, sk, left, right, block_size, device):
    """Window layouts are small (O(blocks)) but cost a few launches to build: cache them.
    While compiling, build them with static shapes instead (the eager builder sizes its lists
    from the data, which torch.compile cannot trace)."""
    if torch.compiler.is_compiling():
        return _static_window_layout(sq, sk, left, right, block_size, device)
    return _cached_window_layout(sq, sk, left, right, block_size, torch.device(device))


def _pack_static(listed: Tensor) -> tuple[Tensor, Tensor]:
    """Left-packed (counts, indices) of a bool (..., NQB, NKB) block matrix, width NKB."""
    nkb = listed.shape[-1]
    kb = torch.arange(nkb, device=listed.device, dtype=torch.int32)
    keys = torch.where(listed, kb, torch.full_like(kb, nkb)).sort(dim=-1).values
    return listed.sum(-1, dtype=torch.int32), keys.clamp_max(max(nkb - 1, 0)).contiguous()


def _static_window_layout(sq, sk, left, right, block_size, device) -> masks.BlockLayout:
    """The window layout of `masks.local_window_layout` (same full and partial blocks), with
    lists of static width NKB: O(NQB·NKB) booleans, blocks² and never elements."""
    nqb, nkb, o = -(-sq // block_size), -(-sk // block_size), sk - sq
    i0 = torch.arange(nqb, device=device).unsqueeze(1) * block_size
    i1 = (i0 + block_size).clamp_max(sq) - 1
    k0 = torch.arange(nkb, device=device).unsqueeze(0) * block_size
    k1 = (k0 + block_size).clamp_max(sk) - 1
    yes = torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    touched = (k1 >= i0 + o - left if left >= 0 else yes) & (
        k0 <= i1 + o + right if right >= 0 else yes
    )
    full = (k0 >= i1 + o - left if left >= 0 else yes) & (
        k1 <= i0 + o + right if right >= 0 else yes
    )
    counts, indices = _pack_static((touched & ~full)[None, None])
    full_counts, full_indices = _pack_static((touched & full)[None, None])
    return masks.BlockLayout(
        q_len=sq, kv_len=sk, block_q=block_size, block_k=block_size, kv_num_blocks=counts,
        kv_indices=indices, full_kv_num_blocks=full_counts, full_kv_indices=full_indices,
        window=(left, right),
    )  # fmt: skip


# ----------------------------------------------------------------------------- torch ops


# The fakes return what every backend returns: contiguous tensors, whatever the strides of q, k
# and v (the usual layout is ``.view(B, S, H, D).transpose(1, 2)``). The C++ CPU kernels compute
# on contiguous float copies and return fresh tensors; the CUDA launchers and the Triton ops
# allocate out/lse/dq/dk/dv with torch.empty of the logical shape. (``empty_like(q)`` would keep
# q's transposed strides, and torch.compile then asserts on the real kernel's output.)


def _fake_fwd(q, k, v, *layout_and_params):
    b, hq, sq, d = q.shape
    out = q.new_empty((b, hq, sq, d))
    return out, q.new_empty((b, hq, sq), dtype=torch.float32)


def _fake_bwd(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_num, kv_idx, full_num, full_idx, block_q, block_k, left, right, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_num, kv_idx, full_num, full_idx)
    ctx.params = (block_q, block_k, left, right, scale)
    ctx.set_materialize_grads(False)  # dlse is None unless the caller used lse


def _static_transpose(counts: Tensor, indices: Tensor, nkb: int) -> tuple[Tensor, Tensor]:
    """Transpose of left-packed block lists with the static width NQB (no data-dependent
    sizes, so it traces with fake tensors). O(NQB·NKB) int32 — blocks², never elements."""
    nqb = counts.shape[-1]
    valid = torch.arange(indices.shape[-1], device=counts.device) < counts.unsqueeze(-1)
    hits = torch.zeros((*counts.shape, nkb), dtype=torch.int32, device=counts.device)
    idx = indices.long().clamp(0, max(nkb - 1, 0))
    listed = hits.scatter_add(-1, idx, valid.to(torch.int32)).transpose(-1, -2) > 0
    q_counts = listed.sum(-1, dtype=torch.int32)
    qb = torch.arange(nqb, device=counts.device, dtype=torch.int32)
    keys = torch.where(listed, qb, torch.full_like(qb, nqb))  # unlisted sort last
    q_indices = keys.sort(dim=-1).values.clamp_max(max(nqb - 1, 0))
    return q_counts, q_indices.contiguous()


def _transposed_lists(layout):
    """Eagerly the layout's own O(listed blocks) transpose; while tracing (fake tensors,
    torch.compile) a static-width one, since the eager one sizes its output from the data."""
    tracing = torch.compiler.is_compiling() or is_fake(layout.kv_num_blocks)
    if not tracing:
        return layout.transposed()
    nkb = layout.num_kv_blocks
    q_num, q_idx = _static_transpose(layout.kv_num_blocks, layout.kv_indices, nkb)
    if layout.full_kv_num_blocks is None:
        return q_num, q_idx, None, None
    full_num, full_idx = _static_transpose(layout.full_kv_num_blocks, layout.full_kv_indices, nkb)
    return q_num, q_idx, full_num, full_idx


def _make_backward(bwd_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_num, kv_idx, full_num, full_idx = ctx.saved_tensors
        block_q, block_k, left, right, scale = ctx.params
        layout = masks.BlockLayout(
            q_len=q.shape[2], kv_len=k.shape[2], block_q=block_q, block_k=block_k,
            kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_num,
            full_kv_indices=full_idx, window=(left, right),
        )  # fmt: skip
        q_num, q_idx, full_q_num, full_q_idx = _transposed_lists(layout)
        lists = (kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx)
        params = (block_q, block_k, left, right, scale)
        dq = dk = dv = None
        if dout is not None:
            dq, dk, dv = bwd_op(dout, q, k, v, out, lse, *lists, *params)
        if dlse is not None:
            # P·dlse on the scores: with v = 0, dout = dlse·e₀ and out = −e₀ the kernel's
            # dS = P∘(dP − Δ) becomes P∘(0 + dlse).
            unit = torch.zeros_like(out)
            unit[..., 0] = 1
            dq2, dk2, _ = bwd_op(
                unit * dlse.unsqueeze(-1).to(out.dtype), q, k, torch.zeros_like(v), -unit, lse,
                *lists, *params,
            )  # fmt: skip
            dq = dq2 if dq is None else dq + dq2
            dk = dk2 if dk is None else dk + dk2
            dv = torch.zeros_like(v) if dv is None else dv
        return dq, dk, dv, None, None, None, None, None, None, None, None, None

    return backward


if _ext.has_op("block_sparse_attention_fwd"):
    torch.library.register_fake("lrkernels::block_sparse_attention_fwd")(_fake_fwd)
    torch.library.register_fake("lrkernels::block_sparse_attention_bwd")(_fake_bwd)
    torch.library.register_autograd(
        "lrkernels::block_sparse_attention_fwd",
        _make_backward(lambda *a: torch.ops.lrkernels.block_sparse_attention_bwd(*a)),
        setup_context=_setup_context,
    )

_TRITON_LOCK = threading.Lock()
_TRITON_OPS_REGISTERED = False


@compile_time_constant  # torch.compile runs it eagerly, never traces it
def _ensure_triton_ops() -> bool:
    """Registers the ``lrkernels::block_sparse_attention_*_triton`` ops on first use of the
    triton backend (importing triton and defining a `torch.library.triton_op`, which imports
    torch._inductor, costs about a second that ``import lrkernels`` must not pay)."""
    global _TRITON_OPS_REGISTERED
    with _TRITON_LOCK:
        if not _TRITON_OPS_REGISTERED:
            _register_triton_ops()
            _TRITON_OPS_REGISTERED = True
    return True


def _register_triton_ops() -> None:
    from ..triton_kernels.attention import (
        launch_block_sparse_attention_bwd,
        launch_block_sparse_attention_fwd,
    )

    @torch.library.triton_op("lrkernels::block_sparse_attention_fwd_triton", mutates_args=())
    def _fwd_triton(
        q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
        full_kv_num_blocks: Tensor | None, full_kv_indices: Tensor | None, block_q: int,
        block_k: int, window_left: int, window_right: int, scale: float,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        b, hq, sq, d = q.shape
        out = torch.empty((b, hq, sq, d), device=q.device, dtype=q.dtype)
        lse = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
        if _POISON:
            out.fill_(math.nan)
            lse.fill_(math.nan)
        if out.numel() > 0:
            launch_block_sparse_attention_fwd(
                q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                block_q, block_k, window_left, window_right, scale, out, lse,
            )  # fmt: skip
        return out, lse

    @torch.library.triton_op("lrkernels::block_sparse_attention_bwd_triton", mutates_args=())
    def _bwd_triton(
        dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor | None,
        full_kv_indices: Tensor | None, q_num_blocks: Tensor, q_indices: Tensor,
        full_q_num_blocks: Tensor | None, full_q_indices: Tensor | None, block_q: int,
        block_k: int, window_left: int, window_right: int, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        if _POISON:
            for t in (dq, dk, dv):
                t.fill_(math.nan)
        if q.numel() == 0 or k.numel() == 0:
            return dq.zero_(), dk.zero_(), dv.zero_()
        launch_block_sparse_attention_bwd(
            dout.contiguous(), q, k, v, out.contiguous(), lse, kv_num_blocks, kv_indices,
            full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks,
            full_q_indices, block_q, block_k, window_left, window_right, scale, dq, dk, dv,
        )  # fmt: skip
        return dq, dk, dv

    torch.library.register_autograd(
        "lrkernels::block_sparse_attention_fwd_triton",
        _make_backward(lambda *a: torch.ops.lrkernels.block_sparse_attention_bwd_triton(*a)),
        setup_context=_setup_context,
    )
