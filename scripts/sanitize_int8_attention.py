"""Drive the CUDA int8 and attention kernels over odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_int8_attention.py

int8_linear: M = 1, 5, 17, 37, 130 (GEMV, split-K and tensor-core paths), per channel and group
32/128, K not a multiple of 16 per channel, forward and input gradient, fp32/fp16/bf16.
Attention: odd Sq/Sk, Sq ≠ Sk, GQA, D 32/64/96/128, block 64 and 128, windows, a fully masked
query block, forward and backward. Outputs are NaN-poisoned before each launch and every result
is compared with the float64 reference. Exit status: 0 all good, 1 a wrong result or an
exception, 2 the CUDA backend is unavailable.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("LRKERNELS_POISON_OUTPUT", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import lrkernels  # noqa: E402
from lrkernels import masks  # noqa: E402
from lrkernels.reference import (  # noqa: E402
    block_sparse_attention_reference,
    int8_linear_exact,
    relative_error,
)

BOUND = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    err = relative_error(out.detach().cpu(), ref.detach().cpu())
    ok = torch.isfinite(out).all().item() and err <= BOUND[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e}")
    return bool(ok)


def int8_cases() -> bool:
    ok = True
    for m, k, n, group in [(1, 96, 80, 32), (5, 45, 29, 0), (17, 256, 136, 128), (37, 160, 72, 32),
                           (130, 128, 200, 0)]:  # fmt: skip
        for dtype in BOUND:
            x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
            q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
            shape = (n,) if group == 0 else (n, k // group)
            s = ((torch.rand(shape, device="cuda") + 0.5) / (127 * k**0.5)).to(dtype)
            b = torch.randn(n, device="cuda", dtype=dtype)
            y = lrkernels.int8_linear(x, q, s, b, backend="cuda")
            name = f"int8 M={m} K={k} N={n} G={group} {dtype}"
            ok &= check(name, y, int8_linear_exact(x, q, s, b), dtype)
            dy = torch.randn_like(y)
            y.backward(dy)
            w = (q.double() * (s.double().unsqueeze(1) if group == 0
                               else s.double().repeat_interleave(group, 1)))  # fmt: skip
            ok &= check(name + " dx", x.grad, dy.double() @ w, dtype)
    return ok


def attention_cases() -> bool:
    ok = True
    for sq, sk, d, hq, hkv, window, bs in [(77, 130, 64, 4, 2, (40, 0), 64),
                                            (130, 77, 32, 2, 2, (-1, -1), 64),
                                            (200, 200, 128, 4, 1, (127, 0), 128),
                                            (1, 300, 96, 2, 1, (63, 0), 64)]:  # fmt: skip
        for dtype in (torch.float16, torch.bfloat16):
            q = torch.randn(1, hq, sq, d, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(1, hkv, sk, d, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(1, hkv, sk, d, device="cuda", dtype=dtype, requires_grad=True)
            layout = masks.local_window_layout(sq, sk, window, block_q=bs, block_k=bs).to("cuda")
            out = lrkernels.block_sparse_attention(q, k, v, layout, backend="cuda")
            leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref, _ = block_sparse_attention_reference(*leaves, layout)
            name = f"attn Sq={sq} Sk={sk} D={d} H={hq}/{hkv} w={window} b={bs} {dtype}"
            ok &= check(name, out, ref, dtype)
            dout = torch.randn_like(out)
            out.backward(dout)
            ref.backward(dout.double())
            for t, r, g in zip((q, k, v), leaves, "qkv", strict=True):
                ok &= check(f"{name} d{g}", t.grad, r.grad, dtype)
    return ok


def main() -> int:
    if lrkernels.available_backends()["cuda"] is not None:
        print("cuda backend unavailable:", lrkernels.available_backends()["cuda"])
        return 2
    torch.manual_seed(0)
    try:
        ok = int8_cases() & attention_cases()
    except Exception:
        traceback.print_exc()
        return 1
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
