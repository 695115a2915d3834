"""The block-sparse attention CUDA kernels (csrc/cuda/attention_*.cu) in the CPU emulation
(tests/cuda_emulation/README.md): forward and backward against a float64 reference of
docs/attention.md, under AddressSanitizer + UBSan, and a small set under ThreadSanitizer (the
backward's ordered dQ hand-off between blocks included).

Cases cover every head dim in both dtypes, 64- and 128-row tiles (4 and 8 warps), block_k 64 and
128, windows (causal, two-sided, one side unbounded, dense), full and partial blocks, random
layouts with empty rows, broadcast / shuffled / padded lists with negative entries, GQA and MQA,
Sq != Sk both ways (decode, chunked prefill), lengths that are not multiples of the tiles, strided
and padded inputs, a negative scale, empty sides, and the launch API's refusals. Shapes stay small:
the emulation runs every thread. Driver keys: tests/cuda_emulation/drivers/attention_driver.cpp.
"""

from __future__ import annotations

import random

from test_cuda_emulation import binary, run_cases

# (Sq, Sk, window, extra keys): shapes and layouts both paths run, each with its own head dim and
# dtype (cycled below so that every head dim meets both dtypes on both paths).
SHAPES = [
    "Sq=77 Sk=77 win=20:0",  # causal window, odd length, partial + full blocks
    "Sq=130 Sk=130 win=-1:0 bq=128 bk=128",  # causal, 8 warps, two key tiles per block
    "Sq=50 Sk=83 win=17:9 bk=128",  # Sq < Sk, two-sided window
    "Sq=83 Sk=50 win=30:-1 bq=128",  # Sq > Sk: the first rows see nothing
    "Sq=1 Sk=65 win=31:0",  # decode
    "Sq=40 Sk=90 win=-1:0 bk=128",  # chunked prefill
    "Sq=70 Sk=70 win=-1:-1 full=0",  # dense, every block partial
    "Sq=129 Sk=100 win=-1:-1 bq=128 bk=64",  # dense, full blocks crossing Sq and Sk
    "Sq=90 Sk=90 layout=random dens=0.4 win=25:3 shuf=1 bad=1",  # empty rows, messy lists
    "Sq=96 Sk=130 layout=random dens=0.6 bcast=1 bk=128 win=-1:-1",  # broadcast layout
    "Sq=65 Sk=65 win=40:0 bcast=h qlay=bshd kvpad=8 scale=-0.3",  # strided, padded, scale < 0
]
HEADS = ["B=1 Hq=2 Hkv=1", "B=2 Hq=2 Hkv=2", "B=1 Hq=4 Hkv=1", "B=2 Hq=3 Hkv=3"]
HEAD_DIMS = [32, 64, 96, 128]
EDGES = [  # empty sides
    "dtype=f16 B=1 Hq=2 Hkv=1 Sq=5 Sk=0 D=32",
    "dtype=bf16 B=1 Hq=2 Hkv=1 Sq=0 Sk=7 D=64",
]
# The launch API refuses what the kernels cannot take (the torch launchers copy such inputs).
INVALID = [
    "dtype=f16 B=1 Hq=2 Hkv=1 Sq=70 Sk=70 D=32 mis=q",
    "dtype=bf16 B=1 Hq=2 Hkv=1 Sq=70 Sk=70 D=64 kvpad=4",
    "dtype=f16 B=1 Hq=2 Hkv=1 Sq=70 Sk=70 D=48",
    "dtype=f16 B=1 Hq=2 Hkv=1 Sq=70 Sk=70 D=32 bq=32",
]


def fixed(path: str) -> list[str]:
    cases = []
    for i, shape in enumerate(SHAPES):
        for dtype in ("f16", "bf16"):
            d = HEAD_DIMS[(i + (dtype == "bf16") * 2) % len(HEAD_DIMS)]
            heads = HEADS[(i + (dtype == "bf16")) % len(HEADS)]
            cases.append(f"path={path} dtype={dtype} {heads} D={d} {shape} seed={i}")
    cases += [f"path={path} {c}" for c in EDGES]
    cases += [f"path={path} {c} expect=invalid" for c in INVALID]
    return cases


def sweep(rng: random.Random, n: int) -> list[str]:
    cases = []
    for _ in range(n):
        hkv = rng.choice([1, 2])
        sq, sk = rng.choice([1, 17, 64, 65, 100, 129]), rng.choice([1, 33, 64, 90, 128, 131])
        case = {
            "path": rng.choice(["fwd", "bwd"]),
            "dtype": rng.choice(["f16", "bf16"]),
            "B": rng.choice([1, 2]),
            "Hq": hkv * rng.choice([1, 2, 3]),
            "Hkv": hkv,
            "Sq": sq,
            "Sk": sk,
            "D": rng.choice(HEAD_DIMS),
            "bq": rng.choice([64, 128]),
            "bk": rng.choice([64, 128]),
            "win": f"{rng.choice([-1, 0, 5, 40, 70])}:{rng.choice([-1, 0, 3, 64])}",
            "layout": rng.choice(["window", "window", "random"]),
            "dens": rng.choice([0.3, 0.7]),
            "full": rng.randrange(2),
            "bcast": rng.choice(["0", "1", "b", "h"]),
            "shuf": rng.randrange(2),
            "bad": rng.randrange(2),
            "seed": rng.randrange(2**31),
        }
        cases.append(" ".join(f"{k}={v}" for k, v in case.items()))
    return cases


# Small shapes that still reach every barrier-separated phase: K/V stages, several query tiles
# per key tile, first / middle / last dQ contributors, GQA heads walked in one block.
TSAN = [
    "path=fwd dtype=f16 B=1 Hq=2 Hkv=1 Sq=130 Sk=130 D=32 bq=128 win=-1:0",
    "path=fwd dtype=bf16 B=1 Hq=1 Hkv=1 Sq=70 Sk=200 D=64 win=90:10 bk=128",
    "path=bwd dtype=f16 B=1 Hq=2 Hkv=1 Sq=130 Sk=130 D=32 win=-1:0 bq=128",
    "path=bwd dtype=bf16 B=1 Hq=1 Hkv=1 Sq=100 Sk=200 D=32 win=-1:-1 layout=random dens=0.7",
]


def test_attention_fwd_asan():
    run_cases(binary("attention", "asan"), fixed("fwd"))


def test_attention_bwd_asan():
    run_cases(binary("attention", "asan"), fixed("bwd"))


def test_attention_asan_sweep():
    run_cases(binary("attention", "asan"), sweep(random.Random(random.randrange(2**31)), 8))


def test_attention_tsan():
    run_cases(binary("attention", "tsan"), TSAN)
