"""The CUDA kernels of csrc/cuda run on the CPU under an emulation of the CUDA execution model
(tests/cuda_emulation/README.md): each kernel file is rewritten from its current source, compiled
by g++ with AddressSanitizer + UBSan (and ThreadSanitizer in smaller runs), and every output is
compared with a float64 reference. No GPU needed; this is what tests the kernels' indexing,
bounds, barriers and fragment layouts in CI.

Emulated: every thread of every block, barriers and warp collectives (divergence and deadlock
are reported), NaN-filled shared memory with ASan redzones, launch and shared-memory limits,
wmma alignment rules, the lane layouts of ldmatrix / mma.sync. Not emulated: the lane layout of
wmma fragments, timing and hardware scheduling, the memory model beyond barrier ordering
(caches, fences, atomics), bank conflicts, registers and occupancy.

Cases are driver lines (key=value, see tests/cuda_emulation/drivers/). dist=int cases use small
integers, for which every intermediate is exact, so they must match the reference exactly;
dist=real cases use a tolerance of a few units in the last place of the dtype. A sweep draws
fresh random cases from the run's seed (LRKERNELS_TEST_SEED, see conftest.py); a failing line
can be replayed by piping it into the binary named in the failure message.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from itertools import cycle
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_emulation import build as emu_build  # noqa: E402
from cuda_emulation import generate  # noqa: E402

# Leak checking is off: the kernels allocate nothing, and LeakSanitizer needs ptrace, which some
# CI containers forbid.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=0",
    "UBSAN_OPTIONS": "print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1",
}

_binaries: dict[tuple[str, str], Path] = {}


def binary(family: str, sanitizer: str) -> Path:
    """The family's emulation binary (built once per session, cached on disk by build.py)."""
    key = (family, sanitizer)
    if key not in _binaries:
        try:
            _binaries[key] = emu_build.build(family, sanitizer)
        except emu_build.BuildUnavailable as e:
            pytest.skip(str(e))
    return _binaries[key]


def run_binary(exe: Path, stdin: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs an emulation binary. GCC 12's TSan cannot start under the high ASLR entropy of some
    recent kernels ("unexpected memory mapping"); it is then rerun with ASLR off (setarch -R)."""
    env = {**os.environ, **SANITIZER_ENV}
    cmd = [str(exe)]
    for _ in range(2):
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, env=env, timeout=timeout
        )
        if "unexpected memory mapping" not in proc.stderr or not shutil.which("setarch"):
            break
        cmd = ["setarch", os.uname().machine, "-R", str(exe)]
    return proc


def run_cases(exe: Path, cases: list[str], timeout: float = 600) -> None:
    """Runs the cases through the binary; fails with every failing case, or with the case that
    crashed (sanitizer report, deadlock) and the end of stderr."""
    proc = run_binary(exe, "\n".join(cases) + "\n", timeout)
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok ", "FAIL "))]
    failed = [ln for ln in results if ln.startswith("FAIL ")]
    msg = []
    if failed:
        msg.append(f"{len(failed)} of {len(cases)} cases failed:\n" + "\n".join(failed[:20]))
    if proc.returncode != 0 and len(results) < len(cases):
        msg.append(f"crashed (exit {proc.returncode}) in case: {cases[len(results)]}")
        msg.append("stderr (end):\n" + proc.stderr[-5000:])
    elif proc.returncode != 0 and not failed:
        msg.append(f"exit {proc.returncode} after all cases:\n{proc.stderr[-5000:]}")
    if msg:
        msg.append(f"replay: echo '<case>' | {exe}")
        pytest.fail("\n".join(msg), pytrace=False)


# ------------------------------------------------------------------------------------ low-rank

# Tensor-core path (float16 / bfloat16; the planner's choice unless forced by tile=0|1|2 for the
# 16 / 64 / 128 tiles and splits=N): odd sizes (element loads), rank 1, rank 512+, every tile with
# split K and the last block's reduction (repeat=2 reuses the counters it must leave zeroed),
# transposed factors read in place (vt/ut: ldmatrix.trans) or strided (pads), padded rows of x,
# misaligned bases, in = 1, M = 0, the planner's own split counts at decode sizes, no PDL on
# sm_80 (cc=8).
LOWRANK_TC = [
    "M=1 in=64 out=40 rank=8",
    "M=37 in=45 out=29 rank=7",
    "M=37 in=45 out=29 rank=7 bias=0 mis=xUVby",
    "M=17 in=1 out=1 rank=1",
    "M=5 in=1 out=3 rank=1",
    "M=16 in=520 out=65 rank=33 splits=5 repeat=2",
    "M=40 in=480 out=70 rank=130 tile=1 splits=5 repeat=2",
    "M=129 in=200 out=136 rank=136 tile=2 splits=3",
    "M=65 in=130 out=130 rank=129 tile=1",
    "M=33 in=96 out=72 rank=40 vt=1 ut=1 tile=2",
    "M=33 in=96 out=72 rank=40 vt=1 ut=1",
    "M=70 in=200 out=72 rank=64 vt=1 ut=1 tile=1 splits=2",
    "M=33 in=96 out=72 rank=40 vt=1 ut=1 vpad=3 upad=5",
    "M=20 in=64 out=48 rank=16 xpad=8 vpad=8 upad=8",
    "M=20 in=64 out=48 rank=16 xpad=3",
    "M=17 in=37 out=8 rank=600",
    "M=3 in=4099 out=40 rank=8 mis=xUVby",
    "M=2 in=2048 out=8 rank=8 splits=64",
    "M=1 in=4096 out=64 rank=128",
    "M=8 in=2048 out=64 rank=256",
    "M=2 in=8 out=8 rank=8 cc=8",
    "M=0 in=8 out=8 rank=8",
    # the separate reduction kernel (reduce=sep) and the last block's (reduce=last), forced, each
    # checked bitwise against the other (both_reduce=1): every tile, odd M / rank / out, rows
    # past M in a tile, transposed and misaligned operands, repeated launches
    "M=40 in=480 out=70 rank=130 tile=1 splits=5 reduce=sep repeat=2 both_reduce=1",
    "M=129 in=200 out=136 rank=136 tile=2 splits=3 reduce=sep both_reduce=1",
    "M=17 in=520 out=65 rank=33 tile=0 splits=9 reduce=sep both_reduce=1",
    "M=70 in=200 out=72 rank=64 vt=1 ut=1 tile=1 splits=2 reduce=last both_reduce=1",
    "M=3 in=4099 out=40 rank=8 mis=xUVby splits=7 reduce=sep both_reduce=1",
    "M=65 in=96 out=33 rank=1 splits=3 reduce=sep",
    "M=17 in=64 out=8 rank=8 splits=1 reduce=sep",
    "M=64 in=640 out=64 rank=64 sms=132 fill=1.0",
]
# CUDA-core path: float32 at every M, 16-bit below sm_80 (cc=7) or forced (path=gemv); several
# splits of `in`, element loads (odd lengths, misaligned), several row chunks, rank > 256.
LOWRANK_GEMV = [
    "M=1 in=4099 out=64 rank=16",
    "M=3 in=1000 out=33 rank=9 bias=0",
    "M=16 in=700 out=40 rank=300 sms=8",
    "M=17 in=45 out=29 rank=7 mis=xUVby",
    "M=40 in=9 out=70 rank=33",
    "M=5 in=1 out=1 rank=1",
    "M=20 in=100 out=50 rank=300",
    "M=9 in=1024 out=24 rank=16 splits=16 repeat=2",
    "M=12 in=64 out=24 rank=16 xpad=8",
    "M=0 in=8 out=8 rank=8",
]
# Rounded inputs (tolerance instead of exact match): long sums, many splits, the largest ranks.
LOWRANK_REAL = [
    "dtype=f32 M=1 in=4099 out=64 rank=16",
    "dtype=bf16 M=70 in=100 out=37 rank=512",
    "dtype=f16 M=20 in=4099 out=40 rank=8",
    "dtype=bf16 M=8 in=4096 out=64 rank=128",
    "dtype=f16 M=130 in=512 out=64 rank=64 tile=2 splits=4",
    "dtype=bf16 M=16 in=600 out=40 rank=300 path=gemv",
    "dtype=bf16 M=300 in=2048 out=72 rank=96 tile=1 splits=19 reduce=sep both_reduce=1",
]
LOWRANK_INVALID = [
    "dtype=f32 M=2 in=16 out=8 rank=8 vt=1 expect=invalid",  # the float32 path reads row-major
    "dtype=f16 M=2 in=0 out=8 rank=8 expect=invalid",
]


def lowrank_fixed() -> list[str]:
    cases = [f"dtype={d} {c} dist=int" for d in ("f16", "bf16") for c in LOWRANK_TC]
    cases += [f"dtype=f32 {c} dist=int" for c in LOWRANK_GEMV]
    cases += [f"dtype={d} {c} cc=7 dist=int" for d in ("f16", "bf16") for c in LOWRANK_GEMV[:4]]
    return cases + [c + " dist=real" for c in LOWRANK_REAL] + LOWRANK_INVALID


def lowrank_sweep(rng: random.Random, n: int) -> list[str]:
    cases = []
    for i in range(n):
        fp32 = i % 4 == 3
        case = {
            "dtype": "f32" if fp32 else rng.choice(["f16", "bf16"]),
            "M": rng.choice([1, 2, 7, 16, 17, 31, 64, 65, 100, 130]),
            "in": rng.choice([1, 3, 8, 16, 31, 32, 33, 40, 64, 65, 96, 520, 1100]),
            "out": rng.choice([1, 5, 8, 63, 64, 65, 127, 136, 257]),
            "rank": rng.choice([1, 2, 8, 15, 16, 17, 31, 33, 64, 127, 128, 130, 257]),
            "bias": rng.randrange(2),
            "sms": rng.choice([1, 2, 5, 132]),
            "splits": rng.choice([0, 0, 1, 2, 3, 5, 9]),
            "reduce": rng.choice(["auto", "auto", "last", "sep"]),
            "tile": -1 if fp32 else rng.choice([-1, -1, 0, 1, 2]),
            "vt": 0 if fp32 else rng.randrange(2),
            "ut": 0 if fp32 else rng.randrange(2),
            "vpad": 0 if fp32 else rng.choice([0, 0, 3, 8]),
            "xpad": rng.choice([0, 0, 1, 8]),
            "mis": rng.choice(["-", "-", "xUVby", "x", "U", "y"]),
            "dist": rng.choice(["int", "real"]),
            "seed": rng.randrange(2**31),
        }
        cases.append(" ".join(f"{k}={v}" for k, v in case.items()))
    return cases


def test_int8_plans_cover_two_ctas_per_sm(monkeypatch):
    """The tensor-core plan at the benchmark's decode / small-batch shapes on 132 SMs (plan mode:
    the launches are recorded, not run): split-K brings the grid to >= 2 CTAs per SM (the
    issue's ">= 2 waves of the SM count") and no further than one resident wave (4 CTAs of 16
    rows or 3 of 64 rows per SM), both directions."""
    monkeypatch.setenv("EMU_PLAN_ONLY", "1")
    shapes = [(n, k) for n, k in ((4096, 4096), (8192, 8192), (11008, 4096), (4096, 11008))]
    lines = [
        f"op=mma dtype=bf16 dir={d} M={m} N={n} K={k} group={g} sms=132"
        for n, k in shapes
        for m in (1, 16, 64)
        for d in ("fwd", "tr")
        for g in (0, 128)
    ]
    proc = run_binary(binary("int8", "asan"), "\n".join(lines) + "\n")
    grids = [int(ln.split("grid=")[1].split(",")[0]) for ln in proc.stdout.splitlines() if
             ln.startswith("plan ")]  # fmt: skip
    assert len(grids) == len(lines), proc.stdout + proc.stderr[-2000:]
    for line, grid in zip(lines, grids, strict=True):
        resident = 132 * (4 if " M=64 " not in line else 3)
        assert 2 * 132 <= grid <= resident, (line, grid)


# Small shapes that still reach every barrier-separated phase and the inter-block reduction
# (partials written by other blocks, ordered by the counter's atomics).
LOWRANK_TSAN = [
    "dtype=f16 M=17 in=300 out=40 rank=40 splits=3",
    "dtype=bf16 M=33 in=300 out=40 rank=40 tile=1 splits=3 reduce=sep both_reduce=1",
    "dtype=bf16 M=65 in=130 out=70 rank=72 tile=1 splits=2 vt=1 ut=1",
    "dtype=f16 M=20 in=64 out=48 rank=24 tile=2 mis=xUVby",
    "dtype=f32 M=9 in=300 out=40 rank=9 splits=3",
    "dtype=bf16 M=5 in=45 out=29 rank=7 cc=7 mis=xUVby",
]


def test_lowrank_asan_fixed():
    run_cases(binary("lowrank", "asan"), lowrank_fixed())


def test_lowrank_asan_sweep():
    run_cases(binary("lowrank", "asan"), lowrank_sweep(random.Random(random.randrange(2**31)), 16))


def test_lowrank_tsan():
    run_cases(binary("lowrank", "tsan"), [c + " dist=int" for c in LOWRANK_TSAN])


def _lowrank_plans(lines: list[str]) -> list[dict[str, str]]:
    proc = run_binary(binary("lowrank", "asan"), "\n".join(lines) + "\n")
    plans = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert len(plans) == len(lines), proc.stdout + proc.stderr[-2000:]
    return [dict(kv.split("=") for kv in ln.split("|")[1].split() if "=" in kv) for ln in plans]


def _lowrank_fill_margin() -> float:
    """plan_detail::kFillMargin, read from csrc/cuda/lowrank_kernels.cuh."""
    header = (emu_build.source_dir() / "lowrank_kernels.cuh").read_text()
    return float(re.search(r"kFillMargin = ([0-9.]+);", header).group(1))


def test_lowrank_plans_fill_the_gpu():
    """The planner's choices at the benchmark's shapes (132 SMs): the first kernel gets >= 48
    blocks (decode: the V stream spread over the GPU), at most 64 slices, and a workspace (t +
    partials) of at most 16 MiB up to M = 1024 (32 MiB above: L2-sized). From M = 64 on, its grid
    has >= 2 blocks per SM (issue 9), except where the cheapest such grid costs more than
    kFillMargin times the planner's pick by its own model (fill=100 forces it, to compare)."""
    shapes = [
        (M, f, r)
        for f in (4096, 8192)
        for r in (64, 128, 256)
        for M in (1, 16, 64, 256, 1024, 4096, 8192)
    ]
    lines = [f"dtype=bf16 M={M} in={f} out={f} rank={r} mode=plan" for M, f, r in shapes]
    plans = _lowrank_plans(lines)
    forced = _lowrank_plans([ln + " fill=100" for ln in lines])
    declined = []
    for (M, _, _), line, plan, fill in zip(shapes, lines, plans, forced, strict=True):
        assert int(plan["down_blocks"]) >= 48, (line, plan)
        assert 1 <= int(plan["splits"]) <= 64, (line, plan)
        assert int(plan["ws"]) <= (16 if M <= 1024 else 32) * 2**20, (line, plan)
        if M >= 64 and int(plan["down_blocks"]) < 2 * 132:
            declined.append(line)
            assert int(fill["down_blocks"]) >= 2 * 132, (line, fill)
            ratio = float(fill["model_down_us"]) / float(plan["model_down_us"])
            assert ratio > _lowrank_fill_margin(), (line, ratio)
    assert len(declined) <= 4, declined  # the cost model's exceptions stay exceptions


def test_lowrank_separate_reduce_where_partials_are_large():
    """The separate reduction is planned where one block would read many large partials (M =
    1024, rank 64: 19 slices of 64 x 64 tiles) and not at decode (16-row tiles: the last block
    reads a few KiB), where its extra dependent launch costs more than it saves."""
    plans = _lowrank_plans(
        [
            "dtype=bf16 M=1024 in=4096 out=4096 rank=64 mode=plan",
            "dtype=bf16 M=1 in=4096 out=4096 rank=128 mode=plan",
            "dtype=bf16 M=16 in=8192 out=8192 rank=256 mode=plan",
        ]
    )
    assert plans[0]["reduce"] == "sep" and int(plans[0]["down_blocks"]) >= 264, plans[0]
    assert plans[0]["counters"] == "0", plans[0]
    for p in plans[1:]:
        assert p["reduce"] == "last" and int(p["splits"]) > 1, p


# ---------------------------------------------------------------------------------------- int8

# The tensor-core family (int8_mma_*.cu: forward and input gradient on the packed weight, every
# M; tiles of 16 / 64 rows) and the dequantize kernel (int8_dequant.cu). Shapes: odd N
# (the input gradient needs N % 8 == 0, which the torch launcher provides by padding dy), K an
# odd multiple of 16 (several 64-wide steps plus a partial one), every group size, M in
# {1, 2, 15, 16, 17, 64, 300}; sms=1 (no split) or splits=N (forced split-K; det=1: a second
# launch in another block order must give the same bits); ypad / pad: padded rows of
# y / a (padding must stay unwritten); mis: bases off 16-byte alignment where the API allows it.
INT8_MS = [1, 2, 15, 16, 17, 64, 300]
INT8_SHAPES = {  # group -> [(N, K)] for (fwd, tr)
    0: [(37, 48), (40, 208)],
    32: [(70, 96), (72, 160)],
    64: [(33, 192), (40, 320)],
    128: [(100, 256), (136, 384)],
}


def int8_fixed() -> list[str]:
    cases = []
    ms = cycle(INT8_MS)
    for d in ("f16", "bf16"):
        for direction, which in (("fwd", 0), ("tr", 1)):
            for g, shapes in INT8_SHAPES.items():
                n, k = shapes[which]
                cases.append(f"op=mma dtype={d} dir={direction} M={next(ms)} N={n} K={k} group={g}")
    cases += [  # several row tiles, forced / heuristic split-K, padded and misaligned operands
        "op=mma dtype=f16 dir=fwd M=130 N=200 K=96 group=32 sms=1",
        "op=mma dtype=bf16 dir=tr M=130 N=96 K=208 sms=1",
        "op=mma dtype=bf16 dir=fwd M=17 N=33 K=2048 group=32 splits=7 det=1",
        "op=mma dtype=f16 dir=tr M=64 N=128 K=48 splits=2 det=1",
        "op=mma dtype=f16 dir=fwd M=3 N=40 K=1024 splits=5 det=1",
        "op=mma dtype=bf16 dir=tr M=300 N=64 K=112 group=0 pad=8 ypad=2",
        "op=mma dtype=f16 dir=fwd M=1 N=64 K=4096 group=128",  # heuristic split (32)
        "op=mma dtype=f16 dir=fwd M=2 N=33 K=64 group=64 mis=by ypad=3",
        "op=mma dtype=bf16 dir=fwd M=15 N=33 K=64 group=0 mis=sby ypad=1",
        "op=mma dtype=bf16 dir=fwd M=16 N=1 K=16",
        "op=mma dtype=f16 dir=fwd M=0 N=8 K=32",
    ]
    real = [  # rounded inputs: tolerance instead of exact match
        "op=mma dtype=f16 dir=fwd M=37 N=70 K=256 group=128",
        "op=mma dtype=bf16 dir=tr M=40 N=96 K=48",
        "op=mma dtype=bf16 dir=fwd M=1 N=64 K=4096",
        "op=mma dtype=f16 dir=tr M=17 N=256 K=64 group=32 splits=3",
    ]
    cases += [c + " dist=real" for c in real]
    cases += [  # every dtype of the dequantize kernel, both scale storages
        f"op=dequant dtype={d} N=37 K={k} group={g} smajor={m}"
        for d, (g, k), m in zip(
            ("f32", "f16", "bf16", "f16"),
            ((0, 48), (32, 96), (64, 192), (128, 256)),
            "ngng",
            strict=True,
        )
    ]
    cases += INT8_ADDEND
    cases += [c + " expect=invalid" for c in INT8_INVALID]
    return [c if "dist=" in c else c + " dist=int" for c in cases]


# The low-rank addend (the fused LoRA expand): one set and t_out, per-row sets with out-of-range
# indices and ranks, rank 1 / odd / 64, per-channel and group scales, 16- and 64-row tiles,
# split-K and one split, columns past N in the last tile.
INT8_ADDEND = [
    "op=mma dtype=bf16 dir=fwd M=5 N=40 K=64 lora=16 tsplits=3",
    "op=mma dtype=f16 dir=fwd M=16 N=33 K=96 group=32 lora=7 tsplits=2 splits=2 det=1",
    "op=mma dtype=bf16 dir=fwd M=70 N=136 K=128 lora=64 bias=0",
    "op=mma dtype=f16 dir=fwd M=37 N=72 K=64 group=64 lora=1 tsplits=4",
    "op=mma dtype=bf16 dir=fwd M=13 N=48 K=256 lora=24 sets=5 bad=1 splits=3 det=1",
    "op=mma dtype=f16 dir=fwd M=80 N=257 K=48 lora=16 sets=9 tsplits=2",
    "op=mma dtype=bf16 dir=fwd M=66 N=40 K=160 group=32 lora=33 sets=70",  # 4 sets a chunk
    "op=mma dtype=f16 dir=fwd M=16 N=130 K=64 lora=64 sets=16",  # 2 sets a chunk, 16-row tile
    "op=mma dtype=f16 dir=fwd M=3 N=8 K=32 lora=16 tout=0 mis=y ypad=1",
    "op=mma dtype=bf16 dir=fwd M=40 N=100 K=1024 lora=16 tsplits=5 dist=real",
    "op=mma dtype=f16 dir=fwd M=9 N=64 K=512 group=128 lora=48 sets=3 dist=real",
    # the dense 16-bit weight (the LoRA ops' dense base): K % 8 only, both tiles, split-K
    "op=mma dtype=bf16 dir=fwd M=37 N=136 K=200 weight=dense lora=16 tsplits=2",
    "op=mma dtype=f16 dir=fwd M=16 N=33 K=1032 weight=dense lora=5 sets=4 bad=1 splits=3 det=1",
    "op=mma dtype=bf16 dir=fwd M=70 N=72 K=64 weight=dense lora=64 sets=66 bias=0 mis=y ypad=1",
    "op=mma dtype=f16 dir=fwd M=3 N=257 K=8 weight=dense lora=1",
    "op=mma dtype=bf16 dir=fwd M=64 N=100 K=2048 weight=dense lora=16 dist=real",
]


INT8_INVALID = [
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=32 mis=a",  # activations off 16-byte alignment
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=32 mis=q",
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=64 group=32 mis=s",  # staged scales misaligned
    "op=mma dtype=f16 dir=tr M=2 N=16 K=32 mis=s",
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=40",  # K % 16 != 0
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=32 pad=3",  # lda % 8 != 0
    "op=mma dtype=f16 dir=tr M=2 N=12 K=32",  # R = N % 8 != 0
    "op=mma dtype=f16 dir=tr M=2 N=16 K=32 bias=1",
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=96 group=48",
    "op=dequant dtype=bf16 N=64 K=32 mis=q",
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=32 lora=0",  # addend rank 0
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=32 lora=65",  # addend rank past 64
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=32 weight=dense",  # a dense weight without an addend
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=36 weight=dense lora=4",  # K % 8 != 0
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=32 weight=dense lora=4 mis=w",  # W misaligned
    "op=mma dtype=f16 dir=fwd M=2 N=8 K=64 weight=dense lora=4 group=32",
]


def int8_sweep(rng: random.Random, n: int) -> list[str]:
    cases = []
    for i in range(n):
        if i % 6 == 5:
            g = rng.choice([0, 32, 64, 128])
            k = max(16, (g or 16) * rng.choice([1, 2, 3]))
            d = rng.choice(["f32", "f16", "bf16"])
            cases.append(
                f"op=dequant dtype={d} N={rng.choice([1, 31, 33, 100])} K={k} group={g} "
                f"smajor={rng.choice('ng')} seed={rng.randrange(2**31)} dist=real"
            )
            continue
        tr = rng.random() < 0.5
        g = rng.choice([0, 0, 32, 64, 128])
        k = 16 * rng.choice([1, 3, 5, 9, 17]) if g == 0 else g * rng.choice([1, 2, 3, 5])
        n_out = rng.choice([8, 24, 40, 64, 136]) if tr else rng.choice([1, 7, 33, 64, 100, 257])
        case = {
            "op": "mma",
            "dtype": rng.choice(["f16", "bf16"]),
            "dir": "tr" if tr else "fwd",
            "M": rng.choice(INT8_MS + [3, 37, 70]),
            "N": n_out,
            "K": k,
            "group": g,
            "bias": 0 if tr else rng.randrange(2),
            "sms": rng.choice([1, 3, 132]),
            "splits": rng.choice([0, 0, 0, 2, 3]),
            "ypad": rng.choice([0, 0, 1, 8]),
            "mis": rng.choice(["-", "-", "by", "y", "b"]),
            "dist": rng.choice(["int", "real"]),
            "seed": rng.randrange(2**31),
        }
        if not tr and rng.random() < 0.4:  # the low-rank addend
            case |= {
                "lora": rng.choice([1, 5, 16, 32, 64]),
                "sets": rng.choice([0, 0, 2, 7]),
                "tsplits": rng.choice([1, 2, 5]),
                "bad": rng.randrange(2),
            }
            if g == 0 and rng.random() < 0.5:  # on a dense weight (K % 8 is enough)
                case |= {"weight": "dense", "K": k + rng.choice([0, 8, 24]), "mis": "-"}
        cases.append(" ".join(f"{k}={v}" for k, v in case.items()))
    return cases


# Small shapes that still reach every barrier-separated phase: several pipeline stages (more
# steps than stages), the split-K partials / counter / reduction, both directions and tiles.
INT8_TSAN = [
    "op=mma dtype=f16 dir=fwd M=3 N=40 K=416 group=32 splits=2",  # K: 6.5 64-wide steps
    "op=mma dtype=bf16 dir=fwd M=17 N=33 K=336 sms=1",
    "op=mma dtype=bf16 dir=tr M=5 N=320 K=64 group=64 splits=3",
    "op=mma dtype=f16 dir=tr M=20 N=40 K=48",
    "op=dequant dtype=bf16 N=33 K=96 group=32",
    "op=mma dtype=bf16 dir=fwd M=20 N=40 K=128 lora=16 sets=3 splits=2",
    "op=mma dtype=f16 dir=fwd M=5 N=40 K=328 weight=dense lora=8 splits=2",
]


def test_int8_asan_fixed():
    run_cases(binary("int8", "asan"), int8_fixed())


def test_int8_asan_sweep():
    run_cases(binary("int8", "asan"), int8_sweep(random.Random(random.randrange(2**31)), 24))


def test_int8_tsan():
    run_cases(binary("int8", "tsan"), [c + " dist=int" for c in INT8_TSAN])


# ----------------------------------------------------------- shared primitives (common/ptx.cuh)

# kernels/primitives.cu: cp.async (zero-fill, two groups, a partial wait), every ldmatrix form,
# mma.sync in f16 and bf16, each against a float64 product on small integers (exact).
PRIMITIVES = [
    f"dtype={d} kvalid={k} seed={s}" for d in ("f16", "bf16") for k in (8, 16) for s in (1, 2)
]


def test_primitives_asan():
    run_cases(binary("primitives", "asan"), PRIMITIVES)


def test_primitives_tsan():
    run_cases(binary("primitives", "tsan"), PRIMITIVES[:2])


def test_emulation_catches_a_read_before_cp_async_lands():
    """The emulated cp.async lands only when its group is waited for: a kernel that waits for
    too few groups reads shared memory the copy has not written yet (NaN-filled), and fails."""
    binary("primitives", "asan")  # skips without a toolchain
    mutant = emu_build.cache_dir() / "mutant" / "primitives"
    mutant.mkdir(parents=True, exist_ok=True)
    kernels = emu_build.HERE / "kernels"
    text = (kernels / "primitives.cu").read_text()
    assert text.count("ptx::cp_async_wait<0>();") == 1, "mutation site moved: update"
    (mutant / "primitives.cu").write_text(
        text.replace("ptx::cp_async_wait<0>();", "ptx::cp_async_wait<1>();")
    )
    shutil.copy(kernels / "primitives.cuh", mutant / "primitives.cuh")
    fam = emu_build.Family("primitives", ("primitives.cu",), "primitives_driver.cpp", str(mutant))
    proc = run_binary(emu_build.build(fam, "asan"), PRIMITIVES[0] + "\n")
    assert proc.stdout.startswith("FAIL "), proc.stdout + proc.stderr[-3000:]
    assert "got nan" in proc.stdout


# ------------------------------------------------------------------------- the harness itself


def test_generator_rewrites_launches_shared_memory_and_ptx():
    src = """
    __global__ void k(float* p) {
      __shared__ __align__(16) float tile[2][kN];  // a comment with __shared__ and <<<
      extern __shared__ __align__(128) unsigned char dyn[];
      uint32_t r;
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\\n"
                   : "=r"(r), "=r"(r), "=r"(r), "=r"(r) : "r"(0u) : "memory");
      asm volatile("" ::: "memory");
    }
    void go(float* p, cudaStream_t s) {
      k<T, (1 > 0)>
          <<<dim3(2, 3), 256, 0, s>>>(p);
    }
    """
    out = generate.rewrite(src, "/x/k.cu")
    body = out.split('#line 1 "/x/k.cu"\n', 1)[1]
    assert body.count("\n") == src.count("\n"), "line numbers must be preserved"
    assert "auto& tile = emu::static_shared<float[2][kN]>(0, 16);" in body
    assert "unsigned char* dyn = reinterpret_cast<unsigned char*>(emu::dynamic_shared());" in body
    assert "emu::ptx::ldmatrix_x4<false>(r, r, r, r, 0u);" in body
    assert (
        'emu::launch("k<T, (1 > 0)>", k<T, (1 > 0)>, emu::config(dim3(2, 3), 256, 0, s), p);'
        in body
    )
    assert "std::atomic_signal_fence(std::memory_order_seq_cst);" in body
    assert "a comment with __shared__ and <<<" in body
    with pytest.raises(generate.GenerateError, match="not emulated"):
        generate.rewrite('void f() { asm("bar.sync 0;"); }', "f.cu")


def test_emulation_catches_a_missing_barrier():
    """The tests can fail: a copy of lowrank_gemv.cu without the barrier between staging x in
    shared memory and reading it must be reported (ThreadSanitizer: data race). The copy lives
    in the build cache, so its object is compiled once, not on every run."""
    mutated = emu_build.cache_dir() / "mutant" / "csrc"
    shutil.copytree(emu_build.source_dir(), mutated, dirs_exist_ok=True)
    gemv = mutated / "lowrank_gemv.cu"
    text = (emu_build.source_dir() / "lowrank_gemv.cu").read_text()
    site = re.search(r"dst\[c \+ q\] = v\[q\];\s*\}\s*\}\s*(__syncthreads\(\);)", text)
    assert site, "mutation site (barrier after staging x in the down kernel) moved: update"
    gemv.write_text(text[: site.start(1)] + ";" + text[site.end(1) :])
    binary("lowrank", "tsan")  # skips without a toolchain; shares its cached objects
    exe = emu_build.build("lowrank", "tsan", src_dir=mutated)
    proc = run_binary(exe, "dtype=f32 M=2 in=64 out=8 rank=8 dist=int\n")
    assert proc.returncode != 0, "the missing barrier went unnoticed"
    assert "ThreadSanitizer: data race" in proc.stderr, proc.stderr[-3000:]
