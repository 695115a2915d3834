"""Drive the library's GPU kernels over small odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck --kernel-name regex='lrkernels|_attn_|...' \\
        python scripts/sanitize.py [--family lowrank,int8,attention] [--backend cuda|triton]
    python scripts/sanitize.py --dry-run     # the same driver on the CPU backend (CI)

Families: lowrank_linear (M = 1, 17, 37, 130; rank 7 to 512; feature sizes that are no
multiple of a tile; with and without bias; forward and backward, whose input gradient runs the
op again on transposed, non-contiguous factors); int8_linear (M = 1, 5, 17, 37, 130: the GEMV,
split-K and tensor-core paths; per channel and groups of 32 / 128; forward and input gradient);
attention (odd Sq / Sk, Sq != Sk, GQA, head dims 32-128, blocks 64 and 128, windows, a query
that sees no key; forward and backward). float32 / float16 / bfloat16 as each backend takes.
Shapes stay tiny: the sanitizer instruments every access of the kernels it checks.

Outputs are poisoned with NaN before each launch (LRKERNELS_POISON_OUTPUT=1) and every result
is compared with the float64 reference, so an element never written or computed wrongly fails
too. Exit status: 0 all good, 1 a wrong result or an exception, 2 the backend is unavailable.
"""

from __future__ import annotations

import argparse
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
    lowrank_linear_exact,
    relative_error,
)

FAMILIES = ("lowrank", "int8", "attention")
BOUND = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative error
# The regular expression of compute-sanitizer's --kernel-name filter: the CUDA kernels live in
# namespace lrkernels::cuda (mangled names hold "lrkernels"), the Triton kernels are named after
# their functions. scripts/gpu_run.sh passes it; tests/test_bench_gpu_run.py checks it matches.
KERNEL_REGEX = "lrkernels|_lowrank_|_int8_|_attn_|_lora_|_split_reduce_"

LOWRANK_SHAPES = [  # (M, in_features, out_features, rank)
    (1, 96, 80, 7),
    (17, 130, 72, 130),
    (37, 200, 136, 512),
    (1, 264, 520, 130),
    (130, 256, 192, 64),
]
INT8_SHAPES = [(1, 96, 80, 32), (5, 45, 29, 0), (17, 256, 136, 128), (37, 160, 72, 32),
               (130, 128, 200, 0)]  # (M, K, N, group)  # fmt: skip
ATTENTION_SHAPES = [(77, 130, 64, 4, 2, (40, 0), 64), (130, 77, 32, 2, 2, (-1, -1), 64),
                    (200, 200, 128, 4, 1, (127, 0), 128),
                    (1, 300, 96, 2, 1, (63, 0), 64)]  # (Sq, Sk, D, Hq, Hkv, window, block)  # fmt: skip


class Driver:
    def __init__(self, backend: str, device: str, dtypes, small: bool):
        self.backend, self.device, self.dtypes, self.small = backend, device, dtypes, small
        self.failures = 0

    def check(self, name: str, out: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
        err = relative_error(out.detach().cpu().double(), ref.detach().cpu().double())
        ok = bool(torch.isfinite(out).all()) and err <= bound
        self.failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (bound {bound:g})", flush=True)

    def run(self, name: str, fn) -> None:
        try:
            fn()
        except Exception:
            self.failures += 1
            print(f"FAIL {name}: raised", flush=True)
            traceback.print_exc()

    def shapes(self, shapes: list) -> list:
        return shapes[:2] if self.small else shapes

    # ------------------------------------------------------------------ families

    def lowrank(self) -> None:
        for M, in_f, out_f, rank in self.shapes(LOWRANK_SHAPES):
            for dtype in self.dtypes:
                for bias in (True, False):
                    name = f"lowrank M={M} in={in_f} out={out_f} rank={rank} {dtype} bias={bias}"
                    self.run(name, lambda a=(M, in_f, out_f, rank, dtype, bias), n=name:
                             self._lowrank(n, *a))  # fmt: skip

    def _lowrank(self, name, M, in_f, out_f, rank, dtype, bias) -> None:
        g = torch.Generator().manual_seed(M * 1000003 + in_f * 1009 + rank)
        host = {
            "x": torch.randn(M, in_f, generator=g),
            "U": torch.randn(out_f, rank, generator=g) * rank**-0.5,
            "V": torch.randn(rank, in_f, generator=g) * in_f**-0.5,
            "bias": torch.randn(out_f, generator=g) * 0.1 if bias else None,
        }
        backward = bias  # the backward once per shape and dtype
        dev = {
            k: None if v is None else v.to(self.device, dtype, copy=True).requires_grad_(backward)
            for k, v in host.items()
        }
        y = lrkernels.lowrank_linear(
            dev["x"], dev["U"], dev["V"], dev["bias"], backend=self.backend
        )
        exact = {
            k: None if v is None else v.to(dtype).double().requires_grad_(backward)
            for k, v in host.items()
        }
        ref = lowrank_linear_exact(exact["x"], exact["U"], exact["V"], exact["bias"])
        bound = BOUND[dtype]
        self.check(name, y, ref, bound)
        if backward:
            dy = torch.randn(M, out_f, generator=g).to(dtype)
            y.backward(dy.to(self.device))
            ref.backward(dy.double())
            for k in ("x", "U", "V", "bias"):
                self.check(f"{name} d{k}", dev[k].grad, exact[k].grad, 2 * bound)

    def int8(self) -> None:
        for m, k, n, group in self.shapes(INT8_SHAPES):
            for dtype in self.dtypes:
                name = f"int8 M={m} K={k} N={n} G={group} {dtype}"
                self.run(name, lambda a=(m, k, n, group, dtype), nm=name: self._int8(nm, *a))

    def _int8(self, name, m, k, n, group, dtype) -> None:
        dev = self.device
        x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
        q = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        shape = (n,) if group == 0 else (n, k // group)
        s = ((torch.rand(shape, device=dev) + 0.5) / (127 * k**0.5)).to(dtype)
        b = torch.randn(n, device=dev, dtype=dtype)
        y = lrkernels.int8_linear(x, q, s, b, backend=self.backend)
        self.check(name, y, int8_linear_exact(x, q, s, b), BOUND[dtype])
        dy = torch.randn_like(y)
        y.backward(dy)
        w = q.double() * (
            s.double().unsqueeze(1) if group == 0 else s.double().repeat_interleave(group, 1)
        )
        self.check(name + " dx", x.grad, dy.double() @ w, BOUND[dtype])

    def attention(self) -> None:
        dtypes = [d for d in self.dtypes if d != torch.float32 or self.backend != "cuda"]
        for sq, sk, d, hq, hkv, window, bs in self.shapes(ATTENTION_SHAPES):
            for dtype in dtypes:
                name = f"attn Sq={sq} Sk={sk} D={d} H={hq}/{hkv} w={window} b={bs} {dtype}"
                self.run(
                    name,
                    lambda a=(sq, sk, d, hq, hkv, window, bs, dtype), nm=name: self._attn(nm, *a),
                )

    def _attn(self, name, sq, sk, d, hq, hkv, window, bs, dtype) -> None:
        dev = self.device
        q = torch.randn(1, hq, sq, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, hkv, sk, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, hkv, sk, d, device=dev, dtype=dtype, requires_grad=True)
        layout = masks.local_window_layout(sq, sk, window, block_q=bs, block_k=bs).to(dev)
        out = lrkernels.block_sparse_attention(q, k, v, layout, backend=self.backend)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, _ = block_sparse_attention_reference(*leaves, layout)
        self.check(name, out, ref, BOUND[dtype])
        dout = torch.randn_like(out)
        out.backward(dout)
        ref.backward(dout.double())
        for t, r, g in zip((q, k, v), leaves, "qkv", strict=True):
            self.check(f"{name} d{g}", t.grad, r.grad, 2 * BOUND[dtype])


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--family",
        nargs="+",
        default=list(FAMILIES),
        help=f"any of {', '.join(FAMILIES)}, space or comma separated (default: all)",
    )
    p.add_argument("--backend", choices=["cuda", "triton"], default="cuda", help="(default: cuda)")
    p.add_argument(
        "--print-kernel-regex",
        action="store_true",
        help="print the --kernel-name regex that selects the library's kernels, and exit",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run the driver on the cpu backend, float32, two shapes per family (CI)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_kernel_regex:
        print(KERNEL_REGEX)
        return 0
    families = [f for item in args.family for f in item.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise SystemExit(f"unknown family {bad}; choose from {', '.join(FAMILIES)}")
    if args.dry_run:
        backend, device, dtypes = "cpu", "cpu", [torch.float32]
    else:
        backend, device, dtypes = args.backend, "cuda", list(BOUND)
    reason = lrkernels.available_backends()[backend]
    if reason is not None:
        print(f"{backend} backend unavailable: {reason}")
        return 2
    torch.manual_seed(0)
    drv = Driver(backend, device, dtypes, small=args.dry_run)
    for fam in families:
        getattr(drv, fam)()
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{drv.failures} failure(s)")
    return 1 if drv.failures else 0


if __name__ == "__main__":
    sys.exit(main())
