"""Benchmark of lrkernels.lowrank_linear against torch, side by side.

    python bench/lowrank.py                 # full sweep (GPU if one is visible, else a CPU sweep)
    python bench/lowrank.py --quick         # a handful of rows
    python bench/lowrank.py --headline      # the shapes the goals name, checked on 256 rows
    python bench/lowrank.py --dtype bf16 --M 1 16 --rank 128 --features 4096 \\
        --providers lrkernels-cuda,torch-2mm
    python bench/lowrank.py --write-table   # also record the times in the dispatch table

Passes (--pass): fwd, y = lowrank_linear(x, U, V, bias); dx, the input gradient dy·U·V =
lowrank_linear(dy, Vᵀ, Uᵀ) on the transposed (non-contiguous) factors: what autograd's
backward runs. The full GPU sweep adds dx at M >= 1024 (the training shapes).

Providers: lrkernels-cuda, lrkernels-triton, lrkernels-cpu (the library's backends);
lrkernels-cuda-modelbest (the cuda backend with the planner's cheapest grid by its cost model,
LRKERNELS_LOWRANK_FILL_MARGIN=1.0, instead of its default >= 2 blocks per SM: the A/B of issue 9's
filling grids; only on a GPU);
torch-2mm (two F.linear: the reference, the op's torch backend and the speedup baseline);
torch-compile-2mm (the same under torch.compile, dynamic=False; left out of --headline);
dense-linear (F.linear with W = U @ V precomputed). The backends and torch-2mm are the dispatch
paths whose times --write-table records.

Every provider is first checked against a float64 reference (on 256 rows spread over the output
when M is larger), and lrkernels-cuda and lrkernels-triton must agree with each other on the
whole output; a wrong one is reported FAILED, never timed, and makes the exit status 1. Rows go
to <out>/lowrank-<device>.csv, the headline shape's time-vs-M chart to <out>/lowrank-<device>.svg.

Goals (issue 9; H100/H200, bf16, in = out of 4096 or 8192, rank 64-256; PASS/MISS, not
asserts): speedup over torch-2mm >= 1.5x at M 1-16, >= 1.2x at M 64-256, >= 1.0x with >= 70% of
the roofline from M = 1024; the dx pass at M = 8192 >= 1.0x.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import lrkernels
from bench import harness
from bench.harness import Provider, ProviderSkip, Row
from bench.plot import write_svg
from lrkernels import backends
from lrkernels.reference import lowrank_linear_exact, lowrank_linear_reference
from lrkernels.roofline import dense_linear_cost, lowrank_linear_cost

OP = "lowrank_linear"
BASELINE = "torch-2mm"
ALL_PROVIDERS = [
    "lrkernels-cuda",
    "lrkernels-cuda-modelbest",
    "lrkernels-triton",
    "lrkernels-cpu",
    "torch-2mm",
    "torch-compile-2mm",
    "dense-linear",
]
PASSES = ("fwd", "dx")
# provider -> the dispatch path it measures
DISPATCH_PATHS = {
    "lrkernels-cuda": "cuda",
    "lrkernels-triton": "triton",
    "lrkernels-cpu": "cpu",
    "torch-2mm": "torch",
}
# (features, ranks, Ms, dtypes) per device and sweep
SWEEPS = {
    ("cuda", "full"): (
        [4096, 8192],
        [128, 64, 256, 32, 512],
        [1, 16, 64, 256, 1024, 4096, 8192, 16384],
        ["bf16", "fp16"],
    ),
    ("cuda", "quick"): ([4096], [128], [1, 16, 1024], ["bf16"]),
    ("cpu", "full"): ([1024], [32, 128], [1, 16, 128], ["fp32", "bf16"]),
    ("cpu", "quick"): ([256], [32], [1, 16, 128], ["fp32"]),
}
DX_MIN_M = 1024  # the full GPU sweep's dx pass: training shapes
# --headline: (features, rank, M, dtype, pass) — the rows the goals read; on a CPU, small
# stand-ins that run the same code paths
HEADLINE_CASES = {
    "cuda": [(f, 128, m, "bf16", "fwd") for f in (4096, 8192) for m in (1, 16, 64, 1024, 8192)]
    + [(f, 128, 8192, "bf16", "dx") for f in (4096, 8192)],
    "cpu": [(256, 32, m, "fp32", "fwd") for m in (1, 16, 64)] + [(256, 32, 64, "fp32", "dx")],
}
# the chart's shape: (features, rank, dtype)
HEADLINE = {"cuda": (4096, 128, "bfloat16"), "cpu": (1024, 128, "float32")}
GOAL_FEATURES, GOAL_RANKS = (4096, 8192), (64, 128, 256)
GOALS = [  # (description, pass, row filter, speedup goal)
    ("M 1-16", "fwd", lambda m: m <= 16, 1.5),
    ("M 64-256", "fwd", lambda m: 64 <= m <= 256, 1.2),
    ("M >= 1024", "fwd", lambda m: m >= 1024, 1.0),
    ("dx at M=8192", "dx", lambda m: m == 8192, 1.0),
]
ROOFLINE_GOAL = 0.70  # from M = 1024


# ------------------------------------------------------------------------------ providers


def _backend_provider(name: str, backend: str, env: dict[str, str] | None = None) -> Provider:
    def build(inp: dict):
        reasons = backends.not_supported_reasons(OP, backend, *inp["args"])
        if reasons:
            raise ProviderSkip("; ".join(reasons))
        args = inp["args"]
        return lambda: lrkernels.lowrank_linear(*args, backend=backend)

    return Provider(name, build, env=env)


# The cuda backend with the planner's cheapest grid by its own cost model instead of the >= 2
# blocks per SM it takes whenever the work splits that far (csrc/cuda/lowrank_kernels.cuh): the
# A/B that settles whether the filling grids pay.
MODEL_BEST_ENV = {"LRKERNELS_LOWRANK_FILL_MARGIN": "1.0"}


def _torch_2mm(inp: dict):
    args = inp["args"]
    return lambda: lowrank_linear_reference(*args)


def _torch_compile_2mm(inp: dict):
    args = inp["args"]
    torch._dynamo.reset()  # one compile per shape: stay clear of the recompile limit
    try:
        compiled = torch.compile(lowrank_linear_reference, dynamic=False)
        compiled(*args)
    except Exception as e:  # no C++ compiler, inductor unsupported, ...
        msg = " ".join(str(e).split())[:160]
        raise ProviderSkip(f"torch.compile failed: {type(e).__name__}: {msg}") from e
    return lambda: compiled(*args)


def _dense(inp: dict):
    x, U, V, b = inp["args"]
    W = (U.float() @ V.float()).to(x.dtype)  # formed once, outside the timing
    return lambda: F.linear(x, W, b)


def _dense_cost(inp: dict) -> tuple[int, int]:
    x, U, V, b = inp["args"]
    return dense_linear_cost(x.shape[0], V.shape[1], U.shape[0], x.element_size(), b is not None)


def make_providers(names: list[str]) -> list[Provider]:
    table = {
        "lrkernels-cuda": _backend_provider("lrkernels-cuda", "cuda"),
        "lrkernels-cuda-modelbest": _backend_provider(
            "lrkernels-cuda-modelbest", "cuda", MODEL_BEST_ENV
        ),
        "lrkernels-triton": _backend_provider("lrkernels-triton", "triton"),
        "lrkernels-cpu": _backend_provider("lrkernels-cpu", "cpu"),
        "torch-2mm": Provider("torch-2mm", _torch_2mm),
        "torch-compile-2mm": Provider("torch-compile-2mm", _torch_compile_2mm),
        "dense-linear": Provider("dense-linear", _dense, cost=_dense_cost),
    }
    return [table[n] for n in names]


# ------------------------------------------------------------------------------ cases


def make_inputs(
    M: int, in_f: int, out_f: int, rank: int, dtype, device, bias: bool, seed: int, pass_="fwd"
):
    """Seeded inputs scaled so y stays O(1): x ~ N(0,1), V ~ N(0,1/in), U ~ N(0,1/rank); for the
    dx pass dy ~ N(0,1). ``args``: the op's arguments in this pass."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    inp = {
        "x": randn(M, in_f),
        "V": randn(rank, in_f, scale=in_f**-0.5),
        "U": randn(out_f, rank, scale=rank**-0.5),
        "bias": randn(out_f, scale=0.1) if bias else None,
        "shape": {"M": M, "in": in_f, "out": out_f, "rank": rank, "bias": bias, "pass": pass_},
    }
    if pass_ == "dx":
        inp["shape"]["bias"] = False
        inp["args"] = (randn(M, out_f), inp["V"].t(), inp["U"].t(), None)
    else:
        inp["args"] = (inp["x"], inp["U"], inp["V"], inp["bias"])
    return inp


def parse_args(argv):
    p = harness.make_parser(__doc__, ALL_PROVIDERS)
    g = p.add_argument_group("sizes (default: the sweep's)")
    g.add_argument("--M", nargs="+", help="rows of x (space or comma separated)")
    g.add_argument("--rank", nargs="+", help="ranks")
    g.add_argument("--features", nargs="+", help="in = out features")
    g.add_argument(
        "--pass",
        dest="passes",
        nargs="+",
        help="fwd and/or dx (default: fwd; the full GPU sweep adds dx at M >= 1024)",
    )
    g.add_argument("--no-bias", action="store_true", help="benchmark without bias")
    return p.parse_args(argv)


def build_cases(args, device_type: str) -> list[tuple[int, int, int, torch.dtype, str]]:
    """(features, rank, M, dtype, pass) in run order: the headline shape first, so that a run
    cut short still has it."""
    if args.headline:
        return [(f, r, m, harness.DTYPES[d], p) for f, r, m, d, p in HEADLINE_CASES[device_type]]
    sweep = "quick" if args.quick else "full"
    feats, ranks, Ms, dts = SWEEPS[(device_type, sweep)]
    feats = [int(v) for v in harness.flat(args.features)] if args.features else feats
    ranks = [int(v) for v in harness.flat(args.rank)] if args.rank else ranks
    Ms = [int(v) for v in harness.flat(args.M)] if args.M else Ms
    dtypes = harness.parse_dtypes(harness.flat(args.dtype) if args.dtype else dts)
    passes = harness.flat(args.passes) if args.passes else None
    bad = [p for p in passes or () if p not in PASSES]
    if bad:
        raise SystemExit(f"unknown pass(es) {bad}; choose from {', '.join(PASSES)}")

    def wanted(p: str, m: int) -> bool:
        if passes is not None:
            return p in passes
        return p == "fwd" or (device_type == "cuda" and sweep == "full" and m >= DX_MIN_M)

    cases = [
        (f, r, m, dt, p)
        for dt in dtypes
        for f in feats
        for r in ranks
        for p in PASSES
        for m in Ms
        if wanted(p, m)
    ]
    hf, hr, hd = HEADLINE[device_type]
    cases.sort(key=lambda c: (c[0], c[1], str(c[3]).replace("torch.", "")) != (hf, hr, hd))
    return cases


# ------------------------------------------------------------------------------ reports


def _headline_rows(rows: list[Row], device_type: str) -> tuple[str, list[Row]]:
    fwd = [r for r in rows if r.shape.get("pass", "fwd") == "fwd"]
    ok = [r for r in fwd if r.ok]
    hf, hr, hd = HEADLINE[device_type]
    key = (hf, hr, hd)
    if not any((r.shape["in"], r.shape["rank"], r.dtype) == key for r in ok) and ok:
        key = (ok[0].shape["in"], ok[0].shape["rank"], ok[0].dtype)
    sel = [r for r in fwd if (r.shape["in"], r.shape["rank"], r.dtype) == key]
    return f"in=out={key[0]}, rank={key[1]}, {key[2]}", sel


def write_plot(path: Path, rows: list[Row], device_type: str, device_label: str) -> Path:
    label, sel = _headline_rows(rows, device_type)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in sel:
        if r.ok:
            series.setdefault(r.provider, []).append((r.shape["M"], r.ms_median))
    return write_svg(
        path,
        series,
        title=f"lowrank_linear, {label} — {device_label}",
        xlabel="M (rows of x)",
        ylabel="median time (ms)",
    )


def _is_goal_row(r: Row) -> bool:
    s = r.shape
    return (
        r.ok
        and r.device == "cuda"
        and r.dtype == "bfloat16"
        and s["in"] == s["out"]
        and s["in"] in GOAL_FEATURES
        and s["rank"] in GOAL_RANKS
    )


def _where(r: Row) -> str:
    s = r.shape
    return f"M={s['M']} in=out={s['in']} rank={s['rank']}"


def targets_summary(rows: list[Row]) -> list[str]:
    """The goals of issue 9 per lrkernels provider: PASS/MISS with the worst row measured
    (goals, not asserts)."""
    sel = [r for r in rows if _is_goal_row(r)]
    lines = [
        f"lowrank targets (issue 9; bf16, in=out in {GOAL_FEATURES}, rank in {GOAL_RANKS}; "
        f"goals, not asserts; the worst row is shown):"
    ]
    provs = [p for p in dict.fromkeys(r.provider for r in sel) if p.startswith("lrkernels-")]
    if not provs:
        return lines + ["  no lrkernels provider was timed at these shapes on a GPU"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    for p in provs:
        mine = [r for r in sel if r.provider == p]
        for what, pas, keep, goal in GOALS:
            cand = [r for r in mine if r.shape.get("pass", "fwd") == pas and keep(r.shape["M"])]
            cand = [r for r in cand if not math.isnan(r.speedup)]
            if not cand:
                lines.append(f"  {p}: speedup vs {BASELINE} at {what}: not measured")
                continue
            w = min(cand, key=lambda r: r.speedup)
            lines.append(
                f"  {p}: speedup vs {BASELINE} at {what}: {w.speedup:.2f}x (min, at {_where(w)}) "
                f"(goal >= {goal:g}x) {verdict(w.speedup >= goal)}"
            )
        big = [r for r in mine if r.shape.get("pass", "fwd") == "fwd" and r.shape["M"] >= 1024]
        if not big:
            lines.append(f"  {p}: roofline fraction at M >= 1024: not measured")
        else:
            w = min(big, key=lambda r: r.roofline_frac)
            f = w.roofline_frac
            lines.append(
                f"  {p}: roofline fraction at M >= 1024: {100 * f:.1f}% (min, at {_where(w)}) "
                f"(goal >= {100 * ROOFLINE_GOAL:.0f}%) {verdict(f >= ROOFLINE_GOAL)}"
            )
    return lines


def _row_key(r: Row) -> tuple:
    s = r.shape
    return (s["in"], s["rank"], s["M"], r.dtype, s.get("pass", "fwd"))


def is_headline(r: Row) -> bool:
    cases = HEADLINE_CASES[r.device]
    return _row_key(r) in {(f, rk, m, str(harness.DTYPES[d])[6:], p) for f, rk, m, d, p in cases}


def dispatch_features(r: Row) -> dict:
    """The op's dispatch features of a row: the dx pass calls the op with in and out swapped."""
    s = r.shape
    inn, out = (s["out"], s["in"]) if s.get("pass") == "dx" else (s["in"], s["out"])
    return {"M": s["M"], "in": inn, "out": out, "rank": s["rank"]}


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None, extra_providers: list[Provider] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 iff a correctness check failed).
    `extra_providers` adds providers (tests inject a deliberately wrong one)."""
    args = parse_args(argv)

    def left_out_by_default(device_type: str) -> list[tuple[str, str]]:
        left = [("lrkernels-cuda-modelbest", "a CUDA plan A/B")] if device_type == "cpu" else []
        if not args.headline:
            return left
        why = "--headline: one compile per shape costs seconds; name it in --providers to run it"
        return left + [("torch-compile-2mm", why)]

    run = harness.Bench(
        name="lowrank",
        op=OP,
        args=args,
        all_providers=ALL_PROVIDERS,
        baseline=BASELINE,
        extra_left_out=left_out_by_default,
    )
    providers = make_providers(run.provider_names) + list(extra_providers or [])
    cases = build_cases(args, run.device_type)
    run.banner("lowrank_linear benchmark")
    print(f"{len(cases)} cases x {len(providers)} providers; baseline {BASELINE}", flush=True)

    rows: list[Row] = []
    truncated = 0
    for i, (feat, rank, M, dtype, pas) in enumerate(cases):
        if run.out_of_time():
            truncated = len(cases) - i
            break
        peaks = run.peaks(dtype)
        inp = make_inputs(
            M, feat, feat, rank, dtype, run.device, not args.no_bias, args.seed + i, pas
        )
        x, U, V, b = inp["args"]
        check = harness.spread_rows(M, run.device)
        ref = lowrank_linear_exact(x if check is None else x[check], U, V, b)
        cost = lowrank_linear_cost(M, V.shape[1], U.shape[0], rank, x.element_size(), b is not None)
        case_rows = harness.run_case(
            op=OP,
            shape=inp["shape"],
            dtype=dtype,
            device=run.device,
            inputs=inp,
            reference=ref,
            cost=cost,
            providers=providers,
            peaks=peaks,
            baseline=BASELINE,
            timer_kw=run.timer_kw,
            check_rows=check,
            out_shape=(M, U.shape[0]),
        )
        rows += case_rows
        del inp, ref
        dname = str(dtype).replace("torch.", "")
        print(f"\n[{i + 1}/{len(cases)}] {pas} in=out={feat} rank={rank} M={M} {dname}")
        harness.print_table(case_rows)
        run.write_csv(rows)  # after every case: partial runs count

    return run.finish(
        rows,
        report=targets_summary(rows),
        plot=lambda path: write_plot(path, rows, run.device_type, run.label),
        truncated=truncated,
        headline=is_headline,
        dispatch_entries=lambda: harness.dispatch_entries(
            rows, op=OP, paths=DISPATCH_PATHS, features=dispatch_features, device=run.device
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
