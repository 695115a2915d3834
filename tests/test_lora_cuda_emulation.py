"""The LoRA CUDA kernels (csrc/cuda/lora_gemv.cu) in the CPU emulation of the CUDA execution
model (tests/cuda_emulation/README.md), under AddressSanitizer + UBSan and ThreadSanitizer,
against the float64 reference of tests/cuda_emulation/drivers/lora_driver.cpp: the shrink +
weight-streaming GEMV (dense and int8 bases, one adapter and per-row adapters, dropout), the
shrink + the tensor-core GEMM with the adapter in its epilogue (the fused route of
csrc/cuda/lora_cuda.cpp, dense and packed int8 bases, launched as the shrink's programmatic
dependent), the shrink + expand of the large-M path, and the dropout mask (bit-exact)."""

from __future__ import annotations

import random

from test_cuda_emulation import binary, run_cases

DTYPES = ["f32", "f16", "bf16"]
# (base, group, K): dense with odd K (scalar loads), dense vector loads, every int8 group.
BASES = [("dense", 0, 45), ("dense", 0, 256), ("int8", 0, 80), ("int8", 32, 96), ("int8", 128, 256)]


def lora_fixed() -> list[str]:
    cases = []
    for i, dtype in enumerate(DTYPES):
        for j, ((base, g, k), (m, n, r)) in enumerate(
            zip(BASES, [(1, 37, 4), (16, 20, 16), (5, 33, 7), (3, 40, 64), (9, 17, 1)], strict=True)
        ):
            for dist in ("int", "real") if (i + j) % 2 == 0 else ("int",):  # exact cases for all
                common = f"dtype={dtype} M={m} N={n} K={k} R={r} base={base} group={g} dist={dist}"
                cases.append(f"path=gemv {common}")
                cases.append(f"path=gemv {common} drop=13107 bias=0")
                cases.append(f"path=gemv {common} n=3")
                cases.append(f"path=expand {common.replace(f'M={m}', 'M=21')} n=4")
    cases += [
        # per-row adapters with out-of-range indices and ranks: base-only rows, clamped ranks
        "path=gemv dtype=f16 M=16 N=24 K=64 R=8 n=5 bad=1 dist=int",
        "path=expand dtype=bf16 M=40 N=300 K=64 R=16 n=7 bad=1 dist=int",
        # misaligned activations / weights / output: scalar paths
        "path=gemv dtype=bf16 M=4 N=19 K=64 R=8 mis=x dist=int",
        "path=gemv dtype=f16 M=4 N=19 K=64 R=8 base=int8 mis=w dist=int",
        "path=gemv dtype=f32 M=2 N=9 K=33 R=3 mis=xy dist=real",
        # one split (few SMs) and many splits
        "path=gemv dtype=f32 M=16 N=8 K=2048 R=16 sms=1 dist=real",
        "path=gemv dtype=f16 M=1 N=8 K=4096 R=32 sms=132 drop=30000 dist=real",
        # empty batch, and launches the API must refuse
        "path=gemv dtype=f16 M=0 N=8 K=64 R=4 dist=int",
        "path=gemv dtype=f16 M=17 N=8 K=64 R=4 expect=invalid",
        "path=gemv dtype=f16 M=2 N=8 K=64 R=65 expect=invalid",
        "path=expand dtype=f16 M=2 N=8 K=64 R=0 expect=invalid",
        # the fused tensor-core route: dense (K % 8) and int8 (per channel, every group) bases,
        # one adapter (t_out) and per-row ones, dropout, 16- and 64-row tiles, split-K
        "path=fused dtype=bf16 M=5 N=40 K=72 R=16 base=dense dist=int",
        "path=fused dtype=f16 M=16 N=33 K=96 R=7 base=int8 group=32 drop=13107 dist=int",
        "path=fused dtype=bf16 M=37 N=70 K=256 R=16 base=int8 group=0 n=5 bad=1 dist=int",
        "path=fused dtype=f16 M=20 N=136 K=128 R=64 base=int8 group=64 n=3 dist=int",
        "path=fused dtype=bf16 M=70 N=136 K=200 R=64 base=dense n=9 drop=13107 dist=real",
        "path=fused dtype=f16 M=3 N=300 K=1024 R=24 base=int8 group=128 dist=real",
        "path=fused dtype=bf16 M=1 N=8 K=4096 R=32 base=dense drop=30000 dist=real",
        "path=fused dtype=f16 M=2 N=8 K=36 R=4 expect=invalid",  # dense: K % 8 != 0
        # the dropout mask alone: exactly the shared hash
        "path=mask dtype=bf16 M=37 K=129 drop=6554",
        "path=mask dtype=f32 M=5 K=1000 drop=65535",
        "path=mask dtype=f16 M=3 K=8 drop=0 mis=xy",
    ]
    return cases


def lora_sweep(rng: random.Random, count: int) -> list[str]:
    cases = []
    for _ in range(count):
        base, g, k = rng.choice(BASES)
        k = k if base == "int8" else rng.randint(1, 300)
        path = rng.choice(["gemv", "gemv", "expand", "fused"])
        if path == "fused":  # 16-bit, K % 8 (dense) / % 16 (int8: every BASES entry)
            k = k if base == "int8" else 8 * rng.randint(1, 40)
        m = rng.randint(1, 16) if path == "gemv" else rng.randint(1, 40)
        n_adapters = rng.choice([0, 0, 1, 3, 8]) if path == "gemv" else rng.choice([1, 3, 8])
        cases.append(
            f"path={path} dtype={rng.choice(DTYPES[1:] if path == 'fused' else DTYPES)} M={m} N={rng.randint(1, 70)} K={k} "
            f"R={rng.choice([1, 3, 8, 16, 17, 40, 64])} base={base} group={g} n={n_adapters} "
            f"drop={rng.choice([0, 0, 6554, 40000])} bias={rng.randint(0, 1)} "
            f"bad={int(rng.random() < 0.2)} dist={rng.choice(['int', 'real'])} "
            f"seed={rng.randrange(2**31)}"
        )
    return cases


LORA_TSAN = [
    "path=gemv dtype=f16 M=3 N=12 K=64 R=8 n=2",
    "path=gemv dtype=bf16 M=2 N=9 K=96 R=4 base=int8 group=32 drop=20000",
    "path=expand dtype=f32 M=5 N=20 K=32 R=16 n=3",
    "path=fused dtype=bf16 M=18 N=40 K=328 R=8 base=dense n=2",
    "path=fused dtype=f16 M=3 N=33 K=96 R=4 base=int8 group=32",
    "path=mask dtype=f16 M=4 K=40 drop=1000",
]


def test_lora_asan_fixed():
    run_cases(binary("lora", "asan"), lora_fixed())


def test_lora_asan_sweep():
    run_cases(binary("lora", "asan"), lora_sweep(random.Random(random.randrange(2**31)), 24))


def test_lora_tsan():
    run_cases(binary("lora", "tsan"), [c + " dist=int" for c in LORA_TSAN])
