"""Benchmark of lrkernels.lowrank_linear against torch, side by side.

    python bench/lowrank.py                 # full sweep (GPU if one is visible, else a CPU sweep)
    python bench/lowrank.py --quick         # a handful of rows
    python bench/lowrank.py --dtype bf16 --M 1 16 --rank 128 --features 4096 --providers \
        lrkernels-cuda,torch-2mm

Providers: lrkernels-cuda, lrkernels-triton, lrkernels-cpu (the library's backends),
torch-2mm (two F.linear: the reference and the speedup baseline), torch-compile-2mm (the same
under torch.compile, dynamic=False), dense-linear (F.linear with W = U @ V precomputed).

Every provider is first checked against a float64 reference; a wrong one is reported FAILED,
never timed, and makes the exit status 1. Rows go to <out>/lowrank-<device>.csv, the headline
shape's time-vs-M chart to <out>/lowrank-<device>.svg.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
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
from lrkernels.roofline import dense_linear_cost, lowrank_linear_cost, measure_peaks

OP = "lowrank_linear"
BASELINE = "torch-2mm"
ALL_PROVIDERS = [
    "lrkernels-cuda",
    "lrkernels-triton",
    "lrkernels-cpu",
    "torch-2mm",
    "torch-compile-2mm",
    "dense-linear",
]
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# (features, ranks, Ms, dtypes) per device and mode
SWEEPS = {
    ("cuda", False): (
        [4096, 8192],
        [32, 64, 128, 256, 512],
        [1, 16, 128, 1024, 8192],
        ["bf16", "fp16"],
    ),
    ("cuda", True): ([4096], [128], [1, 16, 1024], ["bf16"]),
    ("cpu", False): ([1024], [32, 128], [1, 16, 128], ["fp32", "bf16"]),
    ("cpu", True): ([256], [32], [1, 16, 128], ["fp32"]),
}
HEADLINE = {"cuda": (4096, 128, "bfloat16"), "cpu": (1024, 128, "float32")}
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ providers


def _backend_provider(name: str, backend: str) -> Provider:
    def build(inp: dict):
        x, U, V, b = inp["x"], inp["U"], inp["V"], inp["bias"]
        reasons = backends.not_supported_reasons(OP, backend, x, U, V, b)
        if reasons:
            raise ProviderSkip("; ".join(reasons))
        return lambda: lrkernels.lowrank_linear(x, U, V, b, backend=backend)

    return Provider(name, build)


def _torch_2mm(inp: dict):
    x, U, V, b = inp["x"], inp["U"], inp["V"], inp["bias"]
    return lambda: lowrank_linear_reference(x, U, V, b)


def _torch_compile_2mm(inp: dict):
    x, U, V, b = inp["x"], inp["U"], inp["V"], inp["bias"]
    torch._dynamo.reset()  # one compile per shape: stay clear of the recompile limit
    try:
        compiled = torch.compile(lowrank_linear_reference, dynamic=False)
        compiled(x, U, V, b)
    except Exception as e:  # no C++ compiler, inductor unsupported, ...
        msg = " ".join(str(e).split())[:160]
        raise ProviderSkip(f"torch.compile failed: {type(e).__name__}: {msg}") from e
    return lambda: compiled(x, U, V, b)


def _dense(inp: dict):
    x, U, V, b = inp["x"], inp["U"], inp["V"], inp["bias"]
    W = (U.float() @ V.float()).to(x.dtype)  # formed once, outside the timing
    return lambda: F.linear(x, W, b)


def _dense_cost(inp: dict) -> tuple[int, int]:
    s = inp["shape"]
    return dense_linear_cost(s["M"], s["in"], s["out"], inp["x"].element_size(), s["bias"])


def make_providers(names: list[str]) -> list[Provider]:
    table = {
        "lrkernels-cuda": _backend_provider("lrkernels-cuda", "cuda"),
        "lrkernels-triton": _backend_provider("lrkernels-triton", "triton"),
        "lrkernels-cpu": _backend_provider("lrkernels-cpu", "cpu"),
        "torch-2mm": Provider("torch-2mm", _torch_2mm),
        "torch-compile-2mm": Provider("torch-compile-2mm", _torch_compile_2mm),
        "dense-linear": Provider("dense-linear", _dense, cost=_dense_cost),
    }
    return [table[n] for n in names]


# ------------------------------------------------------------------------------ cases


def make_inputs(M: int, in_f: int, out_f: int, rank: int, dtype, device, bias: bool, seed: int):
    """Seeded inputs scaled so y stays O(1): x ~ N(0,1), V ~ N(0,1/in), U ~ N(0,1/rank)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    return {
        "x": randn(M, in_f),
        "V": randn(rank, in_f, scale=in_f**-0.5),
        "U": randn(out_f, rank, scale=rank**-0.5),
        "bias": randn(out_f, scale=0.1) if bias else None,
        "shape": {"M": M, "in": in_f, "out": out_f, "rank": rank, "bias": bias},
    }


def _flat(values) -> list[str]:
    return [v for item in values for v in str(item).split(",") if v]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a handful of rows")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--dtype", nargs="+", help="bf16, fp16, fp32 (space or comma separated)")
    p.add_argument("--M", nargs="+", help="rows of x")
    p.add_argument("--rank", nargs="+", help="ranks")
    p.add_argument("--features", nargs="+", help="in = out features")
    p.add_argument("--providers", nargs="+", help=f"subset of {','.join(ALL_PROVIDERS)}")
    p.add_argument("--no-bias", action="store_true", help="benchmark without bias")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="output folder")
    p.add_argument("--no-plot", action="store_true", help="skip the SVG")
    p.add_argument("--warm-l2", action="store_true", help="GPU: do not flush L2 between runs")
    p.add_argument("--rep-ms", type=float, help="time budget per measurement (ms)")
    p.add_argument("--max-seconds", type=float, help="start no new case after this many seconds")
    p.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_cases(args, device_type: str):
    feats, ranks, Ms, dts = SWEEPS[(device_type, args.quick)]
    feats = [int(v) for v in _flat(args.features)] if args.features else feats
    ranks = [int(v) for v in _flat(args.rank)] if args.rank else ranks
    Ms = [int(v) for v in _flat(args.M)] if args.M else Ms
    names = _flat(args.dtype) if args.dtype else dts
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    dtypes = list(dict.fromkeys(DTYPES[n] for n in names))
    cases = [(f, r, m, dt) for dt in dtypes for f in feats for r in ranks for m in Ms]
    hf, hr, hd = HEADLINE[device_type]
    # the headline shape first, so that a run cut short still has it
    cases.sort(key=lambda c: (c[0], c[1], str(c[3]).replace("torch.", "")) != (hf, hr, hd))
    return cases


# ------------------------------------------------------------------------------ reports


def _headline_rows(rows: list[Row], device_type: str) -> tuple[str, list[Row]]:
    ok = [r for r in rows if r.ok]
    hf, hr, hd = HEADLINE[device_type]
    key = (hf, hr, hd)
    if not any((r.shape["in"], r.shape["rank"], r.dtype) == key for r in ok) and ok:
        key = (ok[0].shape["in"], ok[0].shape["rank"], ok[0].dtype)
    sel = [r for r in rows if (r.shape["in"], r.shape["rank"], r.dtype) == key]
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


def targets_summary(rows: list[Row]) -> list[str]:
    """The GPU goals at the headline shape: PASS/MISS with the measured numbers (not asserts)."""
    hf, hr, hd = HEADLINE["cuda"]
    sel = [
        r
        for r in rows
        if r.ok and (r.shape["in"], r.shape["rank"], r.dtype) == (hf, hr, hd) and r.device == "cuda"
    ]
    lines = [f"targets at in=out={hf}, rank={hr}, {hd} (goals, not asserts):"]
    provs = [p for p in dict.fromkeys(r.provider for r in sel) if p.startswith("lrkernels-")]
    if not provs:
        return lines + ["  no lrkernels provider was timed at this shape"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    for p in provs:
        mine = [r for r in sel if r.provider == p and not math.isnan(r.speedup)]
        small = [r for r in mine if r.shape["M"] <= 16]
        big = [r for r in sel if r.provider == p and r.shape["M"] >= 1024]
        if small:
            s = min(r.speedup for r in small)
            lines.append(
                f"  {p}: speedup vs {BASELINE} at M<=16: {s:.2f}x (goal >= 1.5x) {verdict(s >= 1.5)}"
            )
        if mine:
            s = min(r.speedup for r in mine)
            worst = min(mine, key=lambda r: r.speedup).shape["M"]
            lines.append(
                f"  {p}: min speedup over all M: {s:.2f}x at M={worst} (goal >= 1.0x) {verdict(s >= 1.0)}"
            )
        if big:
            f = min(r.roofline_frac for r in big)
            lines.append(
                f"  {p}: roofline fraction at M>=1024: {100 * f:.1f}% (min; goal >= 70%) {verdict(f >= 0.7)}"
            )
    return lines


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None, extra_providers: list[Provider] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 iff a correctness check failed).
    `extra_providers` adds providers (tests inject a deliberately wrong one)."""
    args = parse_args(argv)
    t_start = time.monotonic()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = (
        torch.device(device_type, torch.cuda.current_device())
        if device_type == "cuda"
        else torch.device("cpu")
    )
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")

    if args.threads:
        torch.set_num_threads(args.threads)
    if device_type == "cpu":
        # Inductor's pool of compile workers would compete with the timed CPU kernels.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1

    names = _flat(args.providers) if args.providers else list(ALL_PROVIDERS)
    left_out: list[str] = []
    if not args.providers:  # by default only the library backends made for this device
        other = {"cpu": ("lrkernels-cuda", "lrkernels-triton"), "cuda": ("lrkernels-cpu",)}
        left_out = [n for n in names if n in other[device_type]]
        names = [n for n in names if n not in left_out]
    bad = [n for n in names if n not in ALL_PROVIDERS]
    if bad:
        raise SystemExit(f"unknown provider(s) {bad}; choose from {ALL_PROVIDERS}")
    if BASELINE not in names:
        names.append(BASELINE)  # speedups need it
    providers = make_providers(names) + list(extra_providers or [])

    cases = build_cases(args, device_type)
    out_dir = Path(args.out)
    slug = harness.device_slug(device)
    csv_path = out_dir / f"lowrank-{slug}.csv"
    svg_path = out_dir / f"lowrank-{slug}.svg"
    meta = harness.collect_metadata(device)
    timer_kw: dict = {}
    if device_type == "cuda":
        timer_kw["flush_l2"] = not args.warm_l2
        if args.rep_ms:
            timer_kw["rep_ms"] = args.rep_ms
    elif args.rep_ms:
        timer_kw["rep_s"] = args.rep_ms / 1e3

    label = f"{meta['device_name']} ({device_type})"
    print(
        f"lowrank_linear benchmark on {label}; torch {meta['torch_version']}, "
        f"triton {meta['triton_version']}, CUDA {meta['cuda_version']}, "
        f"git {meta['git_commit']}{' (dirty)' if meta['git_dirty'] == 'True' else ''}"
    )
    if device_type == "cpu":
        print(
            "NOTE: CPU run (no CUDA device or --device cpu): small shapes, CPU times; "
            "these are not the GPU numbers. The CPU roofline uses DRAM copy bandwidth, so "
            "cache-resident shapes can exceed 100%."
        )
    avail = lrkernels.available_backends()
    for n in left_out:
        why = avail[n.split("-", 1)[1]] or f"not a {device_type} backend"
        print(f"provider {n} not run on {device_type}: {why}")
    print(f"{len(cases)} cases x {len(providers)} providers; baseline {BASELINE}", flush=True)

    rows: list[Row] = []
    peaks_by_dtype = {}
    truncated = 0
    for i, (feat, rank, M, dtype) in enumerate(cases):
        if args.max_seconds and time.monotonic() - t_start > args.max_seconds:
            truncated = len(cases) - i
            break
        dname = str(dtype).replace("torch.", "")
        if dname not in peaks_by_dtype:
            peaks_by_dtype[dname] = measure_peaks(device, dtype)
            pk = peaks_by_dtype[dname]
            print(
                f"measured peaks ({dname}): {pk.bandwidth_bytes_per_s / 1e9:.0f} GB/s, "
                f"{pk.flops_per_s / 1e12:.2f} TFLOP/s [{pk.how}]",
                flush=True,
            )
        inp = make_inputs(M, feat, feat, rank, dtype, device, not args.no_bias, args.seed + i)
        ref = lowrank_linear_exact(inp["x"], inp["U"], inp["V"], inp["bias"])
        cost = lowrank_linear_cost(M, feat, feat, rank, inp["x"].element_size(), not args.no_bias)
        case_rows = harness.run_case(
            op=OP,
            shape=inp["shape"],
            dtype=dtype,
            device=device,
            inputs=inp,
            reference=ref,
            cost=cost,
            providers=providers,
            peaks=peaks_by_dtype[dname],
            baseline=BASELINE,
            timer_kw=timer_kw,
        )
        rows += case_rows
        del inp, ref
        print(f"\n[{i + 1}/{len(cases)}] in=out={feat} rank={rank} M={M} {dname}")
        harness.print_table(case_rows)
        harness.write_csv(
            csv_path, rows, meta, peaks_by_dtype
        )  # after every case: partial runs count

    print("\n=== all rows ===")
    harness.print_table(rows)
    if truncated:
        print(f"\nWARNING: --max-seconds {args.max_seconds:g} reached; {truncated} case(s) not run")
    if device_type == "cuda":
        print()
        print("\n".join(targets_summary(rows)))
    print(f"\nCSV: {csv_path}")
    if not args.no_plot and rows:
        print(f"SVG: {write_plot(svg_path, rows, device_type, label)}")
    failed = [r for r in rows if r.failed]
    if failed:
        print(f"\n{len(failed)} correctness check(s) FAILED:", file=sys.stderr)
        for r in failed:
            print(f"  {r.provider} {r.shape} {r.dtype}: {r.status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
