"""Benchmark of lrkernels.int8_linear (int8 weight-only, W8A16) against torch, side by side.

    python bench/int8.py                    # full sweep (GPU if one is visible, else a CPU sweep)
    python bench/int8.py --quick            # a handful of rows
    python bench/int8.py --headline         # the shapes the goals name, checked on 256 rows
    python bench/int8.py --dtype bf16 --M 1 16 --shapes 4096x4096 28672x8192 --group 0 128 \\
        --providers lrkernels-cuda,torch-bf16-linear
    python bench/int8.py --write-table      # also record the times in the dispatch table

Shapes are OUTxIN: out_features x in_features of the weight (N x K), from real models
(4096x4096 attention projections, 11008x4096 / 4096x11008 MLP up / down, 8192x8192 and
28672x8192 of a 70B model). --group 0 is one scale per output channel, 32 / 64 / 128 one per
group of that many input features. The weights come from lrkernels.quant.quantize of a random
weight (scales in the activation dtype); x ~ N(0, 1), so y is O(1).

Passes (--pass): fwd, y = int8_linear(x, qweight, scales, bias); dx, the input gradient
dy·W through the grad-input kernels (what autograd's backward runs; the weight is frozen).

Providers: lrkernels-cuda, lrkernels-triton, lrkernels-cpu (the library's backends);
torch-bf16-linear (F.linear with the dequantized weight materialised in the activation dtype,
bf16 or fp16, fp32 on CPU: the layer before quantization, and the speedup baseline);
torch-int8pack-mm (torch._weight_int8pack_mm plus the bias: per-channel scales and the forward
only, skipped with torch's reason where it refuses the case); torch-dequant-matmul (the op's
torch backend: dequantize, then F.linear, every call — what a user writes without the kernel;
for dx, dequantize then dy @ W); lrkernels-cuda-kernel / lrkernels-cuda-dequant (the cuda
backend forced onto its fused kernel or onto dequantize + cuBLAS, forward and dx, from M = 128
on). The backends and torch-dequant-matmul are the dispatch paths whose forward times
--write-table records; the two forced cuda paths are recorded under the table op
int8_linear.cuda_path, which moves the cuda backend's kernel / cuBLAS crossover
(lrkernels.ops.int8.cuda_path). The library's providers get the weight Int8Linear holds on the
device: packed (layout 2) on a GPU, plain (layout 1) on the CPU (--layout packed / plain
forces one; the cuda backend packs a plain weight on every call). A torch comparison provider whose time at one M,
scaled in proportion to the next M of the same weight, exceeds --slow-ms is not run there:
torch's naive int8 kernels must not eat the time budget at large M.

Every provider is first checked against a float64 reference (lrkernels.reference.
int8_linear_exact, on 256 rows spread over the output when M is larger), and lrkernels-cuda and
lrkernels-triton must agree on the whole output; a wrong one is reported FAILED, never timed,
and makes the exit status 1. Rows go to <out>/int8-<device>.csv, the headline shape's
speedup-vs-M chart to <out>/int8-<device>.svg. Bytes per row: int8 weight + scales + x + y +
bias (the floor of any implementation; the dense baseline is charged its full-precision weight).

Goals (issue 8; H100/H200, bf16, 4096x4096 and larger; PASS/MISS, not asserts): speedup over
torch-bf16-linear >= 1.7x at M <= 16, >= 1.3x at M = 64, >= 0.95x at M = 4096; at M = 1 on
8192x8192 and larger >= 85% of the measured copy bandwidth; dx at M = 4096 >= 0.9x of the bf16
dy @ W.
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
from lrkernels import _ext, backends
from lrkernels.ops import int8 as ops_int8
from lrkernels.reference import dequantize_reference, int8_linear_exact
from lrkernels.roofline import DevicePeaks, dense_linear_cost, int8_linear_cost

try:
    from lrkernels.quant import can_pack, pack, quantize
except ImportError:  # pragma: no cover - the quantizer ships with the library
    can_pack = pack = quantize = None

OP = "int8_linear"
BASELINE = "torch-bf16-linear"
ALL_PROVIDERS = [
    "lrkernels-cuda",
    "lrkernels-triton",
    "lrkernels-cpu",
    "torch-bf16-linear",
    "torch-int8pack-mm",
    "torch-dequant-matmul",
    "lrkernels-cuda-kernel",
    "lrkernels-cuda-dequant",
]
PASSES = ("fwd", "dx")
DISPATCH_PATHS = {
    "lrkernels-cuda": "cuda",
    "lrkernels-triton": "triton",
    "lrkernels-cpu": "cpu",
    "torch-dequant-matmul": "torch",
}
# The cuda backend's two paths, forced (lrkernels.ops.int8.cuda_path): their times, forward and
# dx, are the table rows of CUDA_PATH_OP, which move the kernel / dequantize + cuBLAS crossover.
CUDA_PATH_PROVIDERS = {
    "lrkernels-cuda-kernel": "kernel",
    "lrkernels-cuda-dequant": "dequant_matmul",
}
CUDA_PATH_MIN_M = 128  # below, the kernel is the only candidate (bytes: 1 vs >= 5 per weight)
GROUPS = (0, 32, 64, 128)
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
# (shapes as (out, in), Ms, dtypes, groups) per device and sweep
SWEEPS = {
    ("cuda", "full"): (
        GPU_SHAPES,
        [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096],
        ["bf16", "fp16"],
        [0, 128],
    ),
    ("cuda", "quick"): ([(4096, 4096)], [1, 16, 64, 4096], ["bf16"], [0, 128]),
    ("cpu", "full"): ([(1024, 1024), (4096, 1024)], [1, 16, 128], ["fp32"], [0, 128]),
    ("cpu", "quick"): ([(512, 256)], [1, 16, 128], ["fp32"], [0, 128]),
}
DX_MIN_M = 1024  # the full GPU sweep's dx pass: training shapes
# --headline: (out, in, dtype, group, M, pass); on a CPU, small stand-ins of the same paths
HEADLINE_CASES = {
    "cuda": [
        (n, k, "bf16", g, m, p)
        for g in (0, 128)
        for n, k, m, p in [(4096, 4096, m, "fwd") for m in (1, 16, 64, 4096)]
        + [(8192, 8192, 1, "fwd"), (4096, 4096, 4096, "dx")]
    ],
    "cpu": [
        (n, k, "fp32", g, m, p)
        for g in (0, 128)
        for n, k, m, p in [(512, 256, m, "fwd") for m in (1, 16, 64)] + [(512, 256, 64, "dx")]
    ],
}
# (out, in), dtype, group of the headline chart
HEADLINE = {"cuda": ((4096, 4096), "bfloat16", 0), "cpu": ((1024, 1024), "float32", 0)}
SLOW_MS_GPU = 50.0


def layout_name(group: int) -> str:
    return "per-channel" if group == 0 else f"group {group}"


# ------------------------------------------------------------------------------ providers


def _grad_input(backend: str, dy, q, s, path: int = 0):
    """dx = dy · W as autograd's backward runs it on `backend` (the C++ ops of q's layout, with
    the cuda path of dy's shape, or the Triton op)."""
    if backend == "triton":
        return torch.ops.lrkernels.int8_linear_grad_input_triton(dy, q, s)
    op = ops_int8._LAYOUT_OPS[2 if ops_int8.is_packed(q) else 1][1]
    return getattr(torch.ops.lrkernels, op)(dy, q, s, path)


def _weights_for_kernels(inp: dict):
    """(qweight, scales) the library's providers get: the packed weight where --layout packed
    (what Int8Linear holds on a GPU), else the plain one."""
    return inp.get("qpacked", inp["qweight"]), inp.get("spacked", inp["scales"])


def _backend_provider(name: str, backend: str) -> Provider:
    def build(inp: dict):
        x, b = inp["x"], inp["bias"]
        q, s = _weights_for_kernels(inp)
        reasons = backends.not_supported_reasons(OP, backend, x, q, s, b)
        if reasons:
            raise ProviderSkip("; ".join(reasons))
        if backend in ("cuda", "cpu"):
            key = "CUDA" if backend == "cuda" else "CPU"
            if not _ext.has_kernel_for(OP, key):
                raise ProviderSkip(f"the extension was built without the {OP} {key} kernel")
        if inp["pass"] == "dx":
            dy = inp["dy"]
            n, k = ops_int8.weight_shape(q, s)
            path = ops_int8._path_id(dy, n, n, k, True) if backend == "cuda" else 0
            return lambda: _grad_input(backend, dy, q, s, path)
        return lambda: lrkernels.int8_linear(x, q, s, b, backend=backend)

    return Provider(name, build)


def _cuda_path_provider(name: str, path: str) -> Provider:
    """The cuda backend forced onto one of its two paths (lrkernels.ops.int8.cuda_path): the
    fused kernel or dequantize + cuBLAS, side by side where the crossover may lie."""

    def build(inp: dict):
        x, b = inp["x"], inp["bias"]
        q, s = _weights_for_kernels(inp)
        if x.device.type != "cuda":
            raise ProviderSkip("a cuda path: needs a CUDA device")
        if not _ext.has_kernel_for(OP, "CUDA"):
            raise ProviderSkip(f"the extension was built without the {OP} CUDA kernel")
        if inp["shape"]["M"] < CUDA_PATH_MIN_M:
            raise ProviderSkip(
                f"M < {CUDA_PATH_MIN_M}: dequantize + cuBLAS moves several times the kernel's "
                "bytes there; not a crossover candidate"
            )
        pid = ops_int8.CUDA_PATHS[path]
        if inp["pass"] == "dx":
            dy = inp["dy"]
            return lambda: _grad_input("cuda", dy, q, s, pid)
        fwd = getattr(
            torch.ops.lrkernels, ops_int8._LAYOUT_OPS[2 if ops_int8.is_packed(q) else 1][0]
        )
        return lambda: fwd(x, q, s, b, pid)

    return Provider(name, build)


def _dense_linear(inp: dict):
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    if inp["pass"] == "dx":
        dy = inp["dy"]
        return lambda: dy @ w
    return lambda: F.linear(x, w, b)


def _dense_cost(inp: dict) -> tuple[int, int]:
    s = inp["shape"]
    if inp["pass"] == "dx":
        return dense_linear_cost(s["M"], s["out"], s["in"], inp["x"].element_size(), False)
    return dense_linear_cost(s["M"], s["in"], s["out"], inp["x"].element_size(), s["bias"])


def _dequant_matmul(inp: dict):
    """The op's torch backend (dequantize in the activation dtype on every call, then
    F.linear: plain user code); for dx, dequantize then dy @ W."""
    x, q, s, b = inp["x"], inp["qweight"], inp["scales"], inp["bias"]
    if inp["pass"] == "dx":
        dy = inp["dy"]
        return lambda: dy @ dequantize_reference(q, s, dy.dtype)
    return lambda: lrkernels.int8_linear(x, q, s, b, backend="torch")


def _int8pack_provider(failures: dict[tuple, str]) -> Provider:
    """torch._weight_int8pack_mm, tried once per (device, shape, dtype): a refusal (missing op,
    unsupported dtype or shape) is remembered and reported as the skip reason."""

    def build(inp: dict):
        x, q, s, b = inp["x"], inp["qweight"], inp["scales"], inp["bias"]
        if inp["pass"] != "fwd":
            raise ProviderSkip("torch._weight_int8pack_mm has no input-gradient form")
        if not hasattr(torch, "_weight_int8pack_mm"):
            raise ProviderSkip(f"torch {torch.__version__} has no torch._weight_int8pack_mm")
        if s.dim() != 1:
            raise ProviderSkip("torch._weight_int8pack_mm takes per-channel scales only")
        key = (x.device.type, *q.shape, x.dtype)
        if key in failures:
            raise ProviderSkip(failures[key])
        op = torch._weight_int8pack_mm

        def fn():
            y = op(x, q, s)
            return y if b is None else y + b

        try:
            fn()
        except Exception as e:  # torch refuses this case: a limitation of torch, not a bug here
            msg = " ".join(str(e).split())[:160]
            failures[key] = f"torch._weight_int8pack_mm failed: {type(e).__name__}: {msg}"
            raise ProviderSkip(failures[key]) from e
        return fn

    return Provider("torch-int8pack-mm", build)


def make_providers(names: list[str]) -> list[Provider]:
    table = {
        "lrkernels-cuda": _backend_provider("lrkernels-cuda", "cuda"),
        "lrkernels-triton": _backend_provider("lrkernels-triton", "triton"),
        "lrkernels-cpu": _backend_provider("lrkernels-cpu", "cpu"),
        "torch-bf16-linear": Provider("torch-bf16-linear", _dense_linear, cost=_dense_cost),
        "torch-int8pack-mm": _int8pack_provider({}),
        "torch-dequant-matmul": Provider("torch-dequant-matmul", _dequant_matmul),
        **{p: _cuda_path_provider(p, path) for p, path in CUDA_PATH_PROVIDERS.items()},
    }
    return [table[n] for n in names]


def _guard_slow(prov: Provider, last: dict[tuple, tuple[int, float]], slow_ms: float) -> Provider:
    """The provider, skipped where its last time on this weight (`last`: (provider, weight,
    pass) -> (M, ms)), scaled in proportion to this M, exceeds slow_ms (0 = never)."""

    def build(inp: dict):
        seen = last.get((prov.name, inp["wkey"], inp["pass"]))
        if slow_ms and seen is not None:
            m0, ms0 = seen
            m = inp["shape"]["M"]
            guess = ms0 * max(1.0, m / m0)
            if guess > slow_ms:
                raise ProviderSkip(
                    f"{ms0:.3g} ms at M={m0} suggests ~{guess:.3g} ms at M={m}, over --slow-ms "
                    f"{slow_ms:g}: not run"
                )
        return prov.build(inp)

    return Provider(prov.name, build, prov.cost)


# ------------------------------------------------------------------------------ cases


def make_weights(
    out_f: int,
    in_f: int,
    group: int,
    dtype,
    device,
    bias: bool,
    seed: int,
    layout: str = "packed",
) -> dict:
    """Seeded int8 weight, scales in `dtype`, the dequantized weight in `dtype` (the dense
    baseline's operand) and the bias; with `layout` "packed" also the packed weight (layout 2,
    what Int8Linear holds on a GPU) that the library's providers get. W ~ N(0, 1/in) is
    quantized by lrkernels.quant.quantize when the library has it; otherwise q is drawn
    uniformly from -127..127 with positive scales of the same magnitude."""
    g = torch.Generator(device=device).manual_seed(seed)
    if quantize is not None:
        w = torch.randn(out_f, in_f, device=device, generator=g) * in_f**-0.5
        q, s = quantize(w, group or None, scale_dtype=dtype)
        del w
    else:
        q = torch.randint(-127, 128, (out_f, in_f), device=device, generator=g, dtype=torch.int8)
        s_shape = (out_f, in_f // group) if group else (out_f,)
        s = ((torch.rand(s_shape, device=device, generator=g) + 0.5) / (127 * in_f**0.5)).to(dtype)
    b = (torch.randn(out_f, device=device, generator=g) * 0.1).to(dtype) if bias else None
    weights = {
        "qweight": q,
        "scales": s,
        "bias": b,
        "weight": dequantize_reference(q, s, dtype),
        "wkey": (out_f, in_f, str(dtype), group, layout),
    }
    if layout == "packed" and pack is not None and can_pack(in_f):
        weights["qpacked"], weights["spacked"] = pack(q, s)
    return weights


def make_inputs(weights: dict, M: int, dtype, device, seed: int, pass_: str = "fwd") -> dict:
    q = weights["qweight"]
    out_f, in_f = q.shape
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, in_f, device=device, generator=g).to(dtype)
    group = weights["wkey"][3]
    bias = weights["bias"] is not None and pass_ == "fwd"
    layout = "packed" if "qpacked" in weights else "plain"
    shape = {"M": M, "out": out_f, "in": in_f, "group": group, "bias": bias, "pass": pass_}
    shape["layout"] = layout
    inp = {**weights, "x": x, "shape": shape, "pass": pass_}
    if pass_ == "dx":
        inp["dy"] = torch.randn(M, out_f, device=device, generator=g).to(dtype)
    return inp


def _parse_shape(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        out_f, in_f = (int(p) for p in parts)
    except ValueError:
        raise SystemExit(f"--shapes: expected OUTxIN such as 4096x11008, got {text!r}") from None
    if out_f < 1 or in_f < 1:
        raise SystemExit(f"--shapes: sizes must be positive, got {text!r}")
    return out_f, in_f


def parse_args(argv):
    p = harness.make_parser(__doc__, ALL_PROVIDERS)
    g = p.add_argument_group("sizes (default: the sweep's)")
    g.add_argument("--M", nargs="+", help="rows of x (space or comma separated)")
    g.add_argument("--shapes", nargs="+", help="weights as OUTxIN, e.g. 4096x4096 11008x4096")
    g.add_argument(
        "--group", nargs="+", help="scale layouts: 0 (per channel), 32, 64 or 128 input features"
    )
    g.add_argument(
        "--pass",
        dest="passes",
        nargs="+",
        help="fwd and/or dx (default: fwd; the full GPU sweep adds dx at M >= 1024)",
    )
    g.add_argument("--no-bias", action="store_true", help="benchmark without bias")
    g.add_argument(
        "--layout",
        choices=("auto", "packed", "plain"),
        default="auto",
        help="the weight the library's providers get: packed (layout 2, what Int8Linear holds "
        "on a GPU) or plain (layout 1, which the cuda backend packs on every call); auto "
        "(default): what Int8Linear holds on the device, packed on a GPU, plain on the CPU",
    )
    g.add_argument(
        "--slow-ms",
        type=float,
        metavar="MS",
        help="skip a torch comparison provider where its time at the previous M, scaled to "
        f"this M, exceeds MS (default: {SLOW_MS_GPU:g} on a GPU, off on a CPU; 0 = off)",
    )
    return p.parse_args(argv)


def build_cases(args, device_type: str) -> list[tuple[int, int, torch.dtype, int, int, str]]:
    """(out, in, dtype, group, M, pass) in run order: the headline weight first, then by dtype,
    layout and shape as listed, M ascending within a weight (one weight is built per run of
    cases)."""
    if getattr(args, "headline", False):
        return [
            (n, k, harness.DTYPES[d], g, m, p) for n, k, d, g, m, p in HEADLINE_CASES[device_type]
        ]
    sweep = "quick" if args.quick else "full"
    shapes, Ms, dts, groups = SWEEPS[(device_type, sweep)]
    shapes = [_parse_shape(v) for v in harness.flat(args.shapes)] if args.shapes else shapes
    Ms = [int(v) for v in harness.flat(args.M)] if args.M else Ms
    groups = [int(v) for v in harness.flat(args.group)] if args.group else groups
    dtypes = harness.parse_dtypes(harness.flat(args.dtype) if args.dtype else dts)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise SystemExit(f"unknown group size(s) {bad}; choose from {', '.join(map(str, GROUPS))}")
    if any(m < 1 for m in Ms):
        raise SystemExit(f"--M: rows must be positive, got {Ms}")
    passes = harness.flat(args.passes) if getattr(args, "passes", None) else None
    bad = [p for p in passes or () if p not in PASSES]
    if bad:
        raise SystemExit(f"unknown pass(es) {bad}; choose from {', '.join(PASSES)}")

    def wanted(p: str, m: int) -> bool:
        if passes is not None:
            return p in passes
        return p == "fwd" or (device_type == "cuda" and sweep == "full" and m >= DX_MIN_M)

    shapes, groups = list(dict.fromkeys(shapes)), list(dict.fromkeys(groups))
    Ms = sorted(set(Ms))
    (h_out, h_in), h_dt, h_g = HEADLINE[device_type]
    cases = []
    for dt in dtypes:
        for g in groups:
            for out_f, in_f in shapes:
                if g and in_f % g:
                    print(f"note: {out_f}x{in_f} skipped for group {g}: {in_f} % {g} != 0")
                    continue
                cases += [(out_f, in_f, dt, g, m, p) for p in PASSES for m in Ms if wanted(p, m)]

    def is_headline(c) -> bool:
        return (c[0], c[1], str(c[2]).replace("torch.", ""), c[3]) == (h_out, h_in, h_dt, h_g)

    # the headline weight first, so that a run cut short still has it (stable sort)
    cases.sort(key=lambda c: not is_headline(c))
    return cases


# ------------------------------------------------------------------------------ reports


def _weight_key(r: Row) -> tuple:
    return (r.shape["out"], r.shape["in"], r.dtype, r.shape["group"])


def _pass(r: Row) -> str:
    return r.shape.get("pass", "fwd")


def _where(r: Row) -> str:
    return f"{r.shape['out']}x{r.shape['in']} M={r.shape['M']} {r.dtype}"


def _headline_rows(rows: list[Row], device_type: str) -> tuple[str, list[Row]]:
    fwd = [r for r in rows if _pass(r) == "fwd"]
    ok = [r for r in fwd if r.ok]
    (h_out, h_in), h_dt, h_g = HEADLINE[device_type]
    key = (h_out, h_in, h_dt, h_g)
    if not any(_weight_key(r) == key for r in ok) and ok:
        key = _weight_key(ok[0])
    sel = [r for r in fwd if _weight_key(r) == key]
    return f"{key[0]}x{key[1]} (out x in), {layout_name(key[3])}, {key[2]}", sel


def write_plot(path: Path, rows: list[Row], device_type: str, device_label: str) -> Path:
    label, sel = _headline_rows(rows, device_type)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in sel:
        if r.ok and not math.isnan(r.speedup):
            series.setdefault(r.provider, []).append((r.shape["M"], r.speedup))
    return write_svg(
        path,
        series,
        title=f"int8_linear, {label} — {device_label}",
        xlabel="M (rows of x)",
        ylabel=f"speedup over {BASELINE} (x)",
        logy=False,
    )


def _is_large(r: Row) -> bool:  # 4096x4096 and larger
    return min(r.shape["out"], r.shape["in"]) >= 4096


def _is_huge(r: Row) -> bool:  # 8192x8192 and larger
    return min(r.shape["out"], r.shape["in"]) >= 8192


SPEEDUP_TARGETS = [  # (description, pass, row filter, goal)
    ("M<=16", "fwd", lambda r: r.shape["M"] <= 16, 1.7),
    ("M=64", "fwd", lambda r: r.shape["M"] == 64, 1.3),
    ("M=4096", "fwd", lambda r: r.shape["M"] == 4096, 0.95),
    ("dx M=4096", "dx", lambda r: r.shape["M"] == 4096, 0.9),
]
BANDWIDTH_GOAL = 0.85


def targets_summary(rows: list[Row], peaks_by_dtype: dict[str, DevicePeaks]) -> list[str]:
    """The goals of issue 8, per lrkernels provider and scale layout: PASS/MISS with the
    measured number, the worst matching row named (goals, not asserts)."""
    gpu = [r for r in rows if r.ok and r.device == "cuda"]
    lines = [
        f"int8 targets (issue 8) on 4096x4096 and larger (goals, not asserts; the worst row is "
        f"shown): speedup over {BASELINE} >= 1.7x at M<=16, >= 1.3x at M=64, >= 0.95x at "
        f"M=4096, dx >= 0.9x at M=4096; at M=1 on 8192x8192 and larger >= "
        f"{100 * BANDWIDTH_GOAL:.0f}% of the copy bandwidth"
    ]
    provs = [
        p
        for p in dict.fromkeys(r.provider for r in gpu)
        if p.startswith("lrkernels-") and p not in CUDA_PATH_PROVIDERS
    ]
    if not provs:
        return lines + ["  no lrkernels provider was timed on a GPU"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    for p in provs:
        for group in sorted({r.shape["group"] for r in gpu if r.provider == p}):
            mine = [r for r in gpu if r.provider == p and r.shape["group"] == group]
            mine = [r for r in mine if _is_large(r)]
            tag = f"{p} int8 {layout_name(group)}"
            for what, pas, keep, goal in SPEEDUP_TARGETS:
                sel = [r for r in mine if _pass(r) == pas and keep(r)]
                sel = [r for r in sel if not math.isnan(r.speedup)]
                if not sel:
                    lines.append(f"  {tag}: speedup at {what}: not measured")
                    continue
                w = min(sel, key=lambda r: r.speedup)
                lines.append(
                    f"  {tag}: speedup at {what}: {w.speedup:.2f}x (min, at {_where(w)}) "
                    f"(goal >= {goal:g}x) {verdict(w.speedup >= goal)}"
                )
            sel = [r for r in mine if _pass(r) == "fwd" and r.shape["M"] == 1 and _is_huge(r)]
            sel = [r for r in sel if r.dtype in peaks_by_dtype]
            if not sel:
                lines.append(f"  {tag}: M=1 bandwidth on 8192x8192 and larger: not measured")
                continue

            def frac(r: Row) -> float:
                return r.gbps * 1e9 / peaks_by_dtype[r.dtype].bandwidth_bytes_per_s

            w = min(sel, key=frac)
            peak = peaks_by_dtype[w.dtype].bandwidth_bytes_per_s / 1e9
            lines.append(
                f"  {tag}: M=1 bandwidth: {w.gbps:.0f} GB/s = {100 * frac(w):.1f}% of the "
                f"{peak:.0f} GB/s copy (min, at {_where(w)}) "
                f"(goal >= {100 * BANDWIDTH_GOAL:.0f}%) {verdict(frac(w) >= BANDWIDTH_GOAL)}"
            )
    return lines


def is_headline(r: Row) -> bool:
    key = (r.shape["out"], r.shape["in"], r.dtype, r.shape["group"], r.shape["M"], _pass(r))
    cases = HEADLINE_CASES[r.device]
    return key in {(n, k, str(harness.DTYPES[d])[6:], g, m, p) for n, k, d, g, m, p in cases}


def dispatch_features(r: Row) -> dict | None:
    """The op's dispatch features of a forward row (dx runs the grad-input op: not recorded)."""
    if _pass(r) != "fwd":
        return None
    s = r.shape
    scales = f"g{s['group']}" if s["group"] else "channel"
    return {"M": s["M"], "in": s["in"], "out": s["out"], "scales": scales}


def cuda_path_features(r: Row) -> dict:
    """The features of CUDA_PATH_OP's table rows: forward and dx alike."""
    s = r.shape
    return ops_int8.cuda_path_features(s["M"], s["out"], s["in"], _pass(r) == "dx")


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None, extra_providers: list[Provider] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 iff a correctness check failed).
    `extra_providers` adds providers (tests inject a deliberately wrong one)."""
    args = parse_args(argv)
    run = harness.Bench(
        name="int8", op=OP, args=args, all_providers=ALL_PROVIDERS, baseline=BASELINE
    )
    slow_ms = args.slow_ms
    if slow_ms is None:
        slow_ms = SLOW_MS_GPU if run.device_type == "cuda" else 0.0
    last_ms: dict[tuple, tuple[int, float]] = {}  # (provider, weight, pass) -> (M, ms) last timed
    providers = [
        _guard_slow(p, last_ms, slow_ms)
        if p.name.startswith("torch-") and p.name != BASELINE
        else p
        for p in make_providers(run.provider_names)
    ] + list(extra_providers or [])
    cases = build_cases(args, run.device_type)
    layout = (
        args.layout
        if args.layout != "auto"
        else ("packed" if run.device_type == "cuda" else "plain")
    )
    notes = []
    if quantize is None:
        notes.append("NOTE: lrkernels.quant is missing: random int8 weights and scales are used")
    run.banner("int8_linear benchmark", notes)
    print(f"{len(cases)} cases x {len(providers)} providers; baseline {BASELINE}", flush=True)

    rows: list[Row] = []
    weights: dict | None = None
    truncated = 0
    for i, (out_f, in_f, dtype, group, M, pas) in enumerate(cases):
        if run.out_of_time():
            truncated = len(cases) - i
            break
        if str(dtype).replace("torch.", "") not in run.peaks_by_dtype:
            weights = None  # free the last weight before the peak measurement's buffers
        peaks = run.peaks(dtype)
        wkey = (out_f, in_f, str(dtype), group)
        if weights is None or weights["wkey"] != (*wkey, layout):
            weights = None
            weights = make_weights(
                out_f,
                in_f,
                group,
                dtype,
                run.device,
                not args.no_bias,
                args.seed + 1000 * i,
                layout,
            )
        inp = make_inputs(weights, M, dtype, run.device, args.seed + i, pas)
        check = harness.spread_rows(M, run.device)
        if pas == "dx":
            dy = inp["dy"] if check is None else inp["dy"][check]
            w64 = dequantize_reference(inp["qweight"], inp["scales"].double(), torch.float64)
            ref, out_shape = dy.double() @ w64, (M, in_f)
            del w64
        else:
            x = inp["x"] if check is None else inp["x"][check]
            ref = int8_linear_exact(x, inp["qweight"], inp["scales"], inp["bias"])
            out_shape = (M, out_f)
        bias = inp["shape"]["bias"]
        cost = int8_linear_cost(M, in_f, out_f, inp["x"].element_size(), group, bias)
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
            out_shape=out_shape,
        )
        rows += case_rows
        del inp, ref
        for r in case_rows:
            if r.ok:
                last_ms[(r.provider, weights["wkey"], pas)] = (M, r.ms_median)
        where = f"{pas} {out_f}x{in_f} (out x in) {layout_name(group)} M={M} {dtype}"
        print(f"\n[{i + 1}/{len(cases)}] {where.replace('torch.', '')}")
        harness.print_table(case_rows)
        run.write_csv(rows)  # after every case: a run cut short still leaves its rows
    weights = None

    return run.finish(
        rows,
        report=targets_summary(rows, run.peaks_by_dtype),
        plot=lambda path: write_plot(path, rows, run.device_type, run.label),
        truncated=truncated,
        headline=is_headline,
        dispatch_entries=lambda: (
            harness.dispatch_entries(
                rows, op=OP, paths=DISPATCH_PATHS, features=dispatch_features, device=run.device
            )
            + harness.dispatch_entries(
                rows,
                op=ops_int8.CUDA_PATH_OP,
                paths=CUDA_PATH_PROVIDERS,
                features=cuda_path_features,
                device=run.device,
            )
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
