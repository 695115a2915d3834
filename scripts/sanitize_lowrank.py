"""Drive the CUDA backend of lowrank_linear over odd shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_lowrank.py

Shapes with M = 1, 17, 37, 130 and rank 7, 64, 130, 512 (feature sizes that are no multiple of
a tile), float32 / float16 / bfloat16, with and without bias, forward and backward (the backward
runs the op again on transposed, non-contiguous factors). Outputs are poisoned with NaN before
each launch (LRKERNELS_POISON_OUTPUT=1), and every result is checked against a float64 CPU
reference, so an element never written or computed wrongly fails too. Exit status: 0 all good,
1 a wrong result or an exception, 2 the CUDA backend is unavailable.
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
from lrkernels.reference import lowrank_linear_exact  # noqa: E402

SHAPES = [  # (M, in_features, out_features, rank)
    (1, 96, 80, 7),
    (17, 130, 72, 130),
    (37, 200, 136, 512),
    (1, 264, 520, 130),
    (130, 256, 192, 64),
]
DTYPES = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # rel. error bound


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def one_case(M: int, in_f: int, out_f: int, rank: int, dtype, bias: bool, backward: bool) -> str:
    g = torch.Generator().manual_seed(M * 1000003 + in_f * 1009 + rank)
    host = {
        "x": torch.randn(M, in_f, generator=g),
        "U": torch.randn(out_f, rank, generator=g) * rank**-0.5,
        "V": torch.randn(rank, in_f, generator=g) * in_f**-0.5,
        "bias": torch.randn(out_f, generator=g) * 0.1 if bias else None,
    }
    host = {k: None if v is None else v.to(dtype) for k, v in host.items()}
    dev = {k: None if v is None else v.cuda().requires_grad_(backward) for k, v in host.items()}
    bound = DTYPES[dtype]
    y = lrkernels.lowrank_linear(dev["x"], dev["U"], dev["V"], dev["bias"], backend="cuda")
    torch.cuda.synchronize()

    exact = {
        k: None if v is None else v.detach().double().requires_grad_(backward)
        for k, v in host.items()
    }
    ref = lowrank_linear_exact(exact["x"], exact["U"], exact["V"], exact["bias"])
    errs = {"y": rel_err(y, ref.detach())}
    if backward:
        dy = torch.randn(M, out_f, generator=g).to(dtype)
        y.backward(dy.cuda())
        torch.cuda.synchronize()
        ref.backward(dy.double())
        for k in ("x", "U", "V", "bias"):
            if exact[k] is not None:
                errs["d" + k] = rel_err(dev[k].grad, exact[k].grad)
    bad = {k: e for k, e in errs.items() if not e <= (bound if k == "y" else 2 * bound)}
    desc = f"M={M} in={in_f} out={out_f} rank={rank} {str(dtype)[6:]} bias={bias}"
    desc += f" {'fwd+bwd' if backward else 'fwd'}: " + " ".join(
        f"{k}={e:.2e}" for k, e in errs.items()
    )
    if bad:
        raise AssertionError(f"{desc}  -> error above bound {bound:g}: {sorted(bad)}")
    return desc


def main() -> int:
    reason = lrkernels.available_backends()["cuda"]
    if reason is not None:
        print(f"cuda backend unavailable: {reason}")
        return 2
    failures = 0
    for M, in_f, out_f, rank in SHAPES:
        for dtype in DTYPES:
            for bias in (True, False):
                try:
                    print(
                        "ok  ",
                        one_case(M, in_f, out_f, rank, dtype, bias, backward=bias),
                        flush=True,
                    )
                except Exception:
                    failures += 1
                    print(f"FAIL M={M} in={in_f} out={out_f} rank={rank} {dtype} bias={bias}")
                    traceback.print_exc()
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
