"""Benchmark of lrkernels.lora_linear / lora_linear_multi (LoRA on a frozen bf16 or int8 base)
against the base layer alone and PEFT-style eager LoRA, side by side.

    python bench/lora.py                 # the issue's table (GPU if one is visible, else CPU)
    python bench/lora.py --quick         # a handful of rows

Cases (4096x4096, r = 16 on a GPU; small shapes on a CPU), each forward ("fwd") or forward +
backward ("fwdbwd": the frozen base gives dx only, the adapters dA, dB):

- single adapter, dense base (bf16 on a GPU, float32 on a CPU) and int8 base (per-channel
  scales), decode M = 16 and training M = 8192 with dropout 0.1 (fwdbwd);
- multi-adapter serving: M = 64 rows over 64 adapters, M = 4096 rows over 8 (fwd).

Providers: lrkernels-cuda / lrkernels-triton / lrkernels-cpu (the fused op); base-only (the
frozen layer alone: F.linear, or lrkernels.int8_linear for the int8 base: the yardstick of the
targets); peft-eager (PEFT's computation: base + s·(drop(x)·Aᵀ)·Bᵀ as three matmuls and an
add, on the same base; dropout uses a mask made outside the timed region, which spares it the
RNG: conservative for our speedups); peft-compiled (that, through torch.compile); for
multi-adapter, eager-loop (the base plus one masked LoRA product per adapter). Every provider
is first checked against the float64 reference (same dropout mask: the counter-based hash); a
wrong one is FAILED and never timed. Rows go to <out>/lora-<device>.csv with FLOPs, bytes
(`lrkernels.roofline.lora_linear_cost`), TFLOP/s, GB/s and the roofline fraction; on a GPU the
run ends with PASS/MISS against the issue's targets (goals, not asserts).
"""

from __future__ import annotations

import argparse
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
from lrkernels.quant import quantize
from lrkernels.reference import (
    dequantize_reference,
    lora_dropout_keep_mask,
    lora_dropout_threshold,
    lora_keep_scale,
    lora_linear_exact,
    lora_linear_multi_exact,
)
from lrkernels.roofline import DevicePeaks, lora_linear_cost, measure_peaks

OP = "lora_linear"
BASELINE = "base-only"
REPO = Path(__file__).resolve().parents[1]
ALL_PROVIDERS = [
    "lrkernels-cuda",
    "lrkernels-triton",
    "lrkernels-cpu",
    "base-only",
    "peft-eager",
    "peft-compiled",
    "eager-loop",
]
ALPHA = 32.0
SEED = 1234  # the dropout seed of every case (the reference reproduces the kernels' mask)

# (name, kind, base, M, pass, dropout, adapters); kind "single" or "multi".
GPU_CASES = [
    ("decode-dense", "single", "dense", 16, "fwd", 0.0, 1),
    ("decode-int8", "single", "int8", 16, "fwd", 0.0, 1),
    ("train-dense", "single", "dense", 8192, "fwdbwd", 0.1, 1),
    ("multi-64x64", "multi", "dense", 64, "fwd", 0.0, 64),
    ("multi-4096x8", "multi", "dense", 4096, "fwd", 0.0, 8),
]
CPU_CASES = [
    ("decode-dense", "single", "dense", 16, "fwd", 0.0, 1),
    ("decode-int8", "single", "int8", 16, "fwd", 0.0, 1),
    ("train-dense", "single", "dense", 256, "fwdbwd", 0.1, 1),
    ("multi-64x8", "multi", "dense", 64, "fwd", 0.0, 8),
]


def make_case(name, kind, base, M, pass_, p, n, *, size, rank, dtype, device, seed) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    K = N = size
    w = randn(N, K, s=K**-0.5)
    if base == "int8":
        qweight, scales = quantize(w, None, scale_dtype=dtype)
        spec, w_eff = (qweight, scales), dequantize_reference(qweight, scales, dtype)
    else:
        spec, w_eff = w, w
    bias = randn(N, s=0.1)
    x = randn(M, K)
    inp = {
        "name": name, "kind": kind, "base": base, "pass": pass_, "p": p, "spec": spec,
        "w_eff": w_eff, "bias": bias, "x": x, "dy": randn(M, N), "scale": ALPHA / rank,
        "shape": {"case": name, "M": M, "in": K, "out": N, "r": rank, "adapters": n,
                  "base": base, "pass": pass_, "dropout": p},
    }  # fmt: skip
    if kind == "single":
        inp["A"] = randn(rank, K, s=K**-0.5)
        inp["B"] = randn(N, rank, s=0.5)
        thr = lora_dropout_threshold(p) if p else 0
        inp["threshold"] = thr
        inp["keep"] = lora_dropout_keep_mask(SEED, M, K, thr, device) if thr else None
    else:
        inp["A"] = randn(n, rank, K, s=K**-0.5)
        inp["B"] = randn(n, N, rank, s=0.5)
        inp["ranks"] = torch.full((n,), rank, dtype=torch.int32, device=device)
        inp["scales"] = torch.full((n,), ALPHA / rank, dtype=torch.float32, device=device)
        inp["index"] = (torch.arange(M, device=device) % n).to(torch.int32)
    return inp


def reference(inp: dict) -> torch.Tensor:
    w, ws = (inp["spec"], None) if inp["base"] != "int8" else inp["spec"]
    if inp["kind"] == "multi":
        return lora_linear_multi_exact(
            inp["x"], w, ws, inp["A"], inp["B"], inp["index"], inp["ranks"], inp["scales"],
            inp["bias"],
        )  # fmt: skip
    thr = inp["threshold"]
    s = inp["scale"] * (lora_keep_scale(thr) if thr else 1.0)
    return lora_linear_exact(inp["x"], w, ws, inp["A"], inp["B"], inp["bias"], s, thr, SEED)


def base_reference(inp: dict) -> torch.Tensor:
    """The frozen base layer alone in float64 (the base-only provider's yardstick)."""
    return F.linear(inp["x"].double(), inp["w_eff"].double(), inp["bias"].double())


def cost(inp: dict) -> tuple[int, int]:
    sh = inp["shape"]
    return lora_linear_cost(
        sh["M"], sh["in"], sh["out"], sh["r"], inp["x"].element_size(),
        group_size=0 if sh["base"] == "int8" else None, n_adapters=sh["adapters"],
        backward=sh["pass"] == "fwdbwd",
    )  # fmt: skip


def _run(inp: dict, forward):
    """A callable running `forward(x, A, B, bias)` (plus its backward for fwdbwd) -> y."""
    if inp["pass"] == "fwd":
        return lambda: forward(inp["x"], inp["A"], inp["B"], inp["bias"])
    leaves = [inp[k].detach().requires_grad_() for k in ("x", "A", "B", "bias")]

    def step():
        for t in leaves:
            t.grad = None
        y = forward(*leaves)
        y.backward(inp["dy"])
        return y.detach()

    return step


def _ours(backend: str) -> Provider:
    def build(inp):
        reasons = (
            lrkernels.not_supported_reasons(
                "lora_linear_multi",
                backend,
                inp["x"],
                *_wsplit(inp),
                inp["A"],
                inp["B"],
                inp["index"],
                inp["ranks"],
                inp["scales"],
                inp["bias"],
            )  # fmt: skip
            if inp["kind"] == "multi"
            else lrkernels.not_supported_reasons(
                "lora_linear", backend, inp["x"], *_wsplit(inp), inp["A"], inp["B"], inp["bias"]
            )
        )
        if reasons:
            raise ProviderSkip("; ".join(reasons))
        if inp["kind"] == "multi":
            return lambda: lrkernels.lora_linear_multi(
                inp["x"], inp["spec"], inp["A"], inp["B"], inp["index"], ranks=inp["ranks"],
                scales=inp["scales"], bias=inp["bias"], backend=backend,
            )  # fmt: skip
        return _run(
            inp,
            lambda x, A, B, b: lrkernels.lora_linear(
                x, inp["spec"], A, B, b, scale=inp["scale"], dropout_p=inp["p"],
                dropout_seed=SEED, backend=backend,
            ),
        )  # fmt: skip

    return Provider(f"lrkernels-{backend}", build)


def _wsplit(inp):
    return (inp["spec"], None) if inp["base"] != "int8" else inp["spec"]


def _base_forward(inp: dict):
    if inp["base"] == "int8":
        q, s = inp["spec"]
        return lambda x, b: lrkernels.int8_linear(x, q, s, b)
    w = inp["spec"]
    return lambda x, b: F.linear(x, w, b)


def _base_only(inp: dict):
    base = _base_forward(inp)
    if inp["pass"] == "fwd":
        return lambda: base(inp["x"], inp["bias"])
    x = inp["x"].detach().requires_grad_()
    b = inp["bias"].detach().requires_grad_()

    def step():
        x.grad = b.grad = None
        y = base(x, b)
        y.backward(inp["dy"])
        return y.detach()

    return step


def _base_cost(inp: dict) -> tuple[int, int]:
    sh = inp["shape"]
    f, nb = lora_linear_cost(
        sh["M"], sh["in"], sh["out"], 1, inp["x"].element_size(),
        group_size=0 if sh["base"] == "int8" else None, n_adapters=0,
        backward=sh["pass"] == "fwdbwd",
    )  # fmt: skip
    return f, nb


def _peft_forward(inp: dict):
    base = _base_forward(inp)
    keep = inp.get("keep")
    s = inp["scale"] * (lora_keep_scale(inp["threshold"]) if keep is not None else 1.0)

    def forward(x, A, B, b):
        xd = x if keep is None else x * keep  # PEFT's dropout, with our mask (RNG-free)
        return base(x, b) + s * F.linear(F.linear(xd, A), B)

    return forward


def _peft(compiled: bool) -> Provider:
    def build(inp):
        if inp["kind"] != "single":
            raise ProviderSkip("PEFT-style eager is one adapter per call (see eager-loop)")
        fwd = _peft_forward(inp)
        if compiled:
            if inp["base"] == "int8" and not torch.cuda.is_available():
                raise ProviderSkip("compiling the int8 op's CPU path is not a peer here")
            fwd = torch.compile(fwd, fullgraph=True)
        return _run(inp, fwd)

    return Provider("peft-compiled" if compiled else "peft-eager", build)


def _eager_loop(inp: dict):
    if inp["kind"] != "multi":
        raise ProviderSkip("multi-adapter only")
    base = _base_forward(inp)
    x, idx = inp["x"], inp["index"].long()

    def fn():
        y = base(x, inp["bias"])
        for a in range(inp["A"].shape[0]):
            rows = (idx == a).nonzero().squeeze(1)  # host sync: what a naive server does
            t = F.linear(x[rows], inp["A"][a])
            y.index_add_(0, rows, F.linear(t, inp["B"][a]) * inp["scales"][a].to(x.dtype))
        return y

    return fn


PROVIDERS = {
    "lrkernels-cuda": _ours("cuda"),
    "lrkernels-triton": _ours("triton"),
    "lrkernels-cpu": _ours("cpu"),
    "base-only": Provider("base-only", _base_only, _base_cost),
    "peft-eager": _peft(False),
    "peft-compiled": _peft(True),
    "eager-loop": Provider("eager-loop", _eager_loop),
}


# ------------------------------------------------------------------------------ targets


def _ratio(rows, case, prov, base_prov=BASELINE, base_case=None):
    def find(c, p):
        return next((r for r in rows if r.shape["case"] == c and r.provider == p and r.ok), None)

    a, b = find(case, prov), find(base_case or case, base_prov)
    return None if a is None or b is None else a.ms_median / b.ms_median


TARGETS = [
    # (label, case, base provider, base case, goal, "<=" time ratio)
    ("decode M=16 bf16: time / base F.linear", "decode-dense", BASELINE, None, 1.05),
    ("decode M=16 int8: time / int8_linear", "decode-int8", BASELINE, None, 1.05),
    (
        "decode M=16 int8: time / PEFT-style on bf16",
        "decode-int8",
        "peft-eager",
        "decode-dense",
        0.6,
    ),
    (
        "training M=8192 p=0.1 fwd+bwd: time / PEFT eager",
        "train-dense",
        "peft-eager",
        None,
        1 / 1.3,
    ),
    ("training M=8192 p=0.1 fwd+bwd: time / frozen base", "train-dense", BASELINE, None, 1.10),
    ("multi M=64, 64 adapters: time / base", "multi-64x64", BASELINE, None, 1.6),
    ("multi M=4096, 8 adapters: time / base", "multi-4096x8", BASELINE, None, 1.05),
]


def targets_summary(rows: list[Row]) -> list[str]:
    lines = ["LoRA targets (4096x4096, r=16; goals, not asserts):"]
    ours = [p for p in dict.fromkeys(r.provider for r in rows) if p.startswith("lrkernels-")]
    for label, case, base_prov, base_case, goal in TARGETS:
        for p in ours:
            ratio = _ratio(rows, case, p, base_prov, base_case)
            if ratio is None:
                lines.append(f"  {p}: {label}: not measured")
            else:
                verdict = "PASS" if ratio <= goal else "MISS"
                lines.append(f"  {p}: {label}: {ratio:.3f} (goal <= {goal:.3f}) {verdict}")
    return lines


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a handful of rows")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--providers", nargs="+", help=f"subset of {','.join(ALL_PROVIDERS)}")
    p.add_argument("--cases", nargs="+", help="case names (default: all for the device)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="output folder")
    p.add_argument("--warm-l2", action="store_true", help="GPU: do not flush L2 between runs")
    p.add_argument("--rep-ms", type=float, help="time budget per measurement (ms)")
    p.add_argument("--max-seconds", type=float, help="start no new case after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None, extra_providers: list[Provider] | None = None) -> int:
    """Run the benchmark; the exit status is 1 iff a correctness check failed."""
    args = parse_args(argv)
    t0 = time.monotonic()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if device_type == "cuda"
        else (torch.device("cpu"))
    )
    gpu = device_type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    size, rank = (4096, 16) if gpu else (512, 16)
    cases = GPU_CASES if gpu else CPU_CASES
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases]
    if args.quick:
        cases = cases[:2] if gpu else [c for c in cases if c[0] in ("decode-dense", "multi-64x8")]
    names = args.providers or [
        n
        for n in ALL_PROVIDERS
        if n != {"cuda": "lrkernels-cpu", "cpu": "lrkernels-cuda"}[device_type]
    ]
    if gpu is False and not args.providers:
        names = [n for n in names if n not in ("lrkernels-triton", "peft-compiled")]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; choose from {ALL_PROVIDERS}")
    if BASELINE not in names:
        names.append(BASELINE)
    providers = [PROVIDERS[n] for n in names] + list(extra_providers or [])

    meta = harness.collect_metadata(device)
    slug = harness.device_slug(device)
    csv_path = Path(args.out) / f"lora-{slug}.csv"
    timer_kw: dict = {}
    if gpu:
        timer_kw["flush_l2"] = not args.warm_l2
        if args.rep_ms:
            timer_kw["rep_ms"] = args.rep_ms
    elif args.rep_ms:
        timer_kw["rep_s"] = args.rep_ms / 1e3
    print(
        f"lora_linear benchmark on {meta['device_name']} ({device_type}); torch "
        f"{meta['torch_version']}, git {meta['git_commit']}; {size}x{size}, r={rank}, {dtype}"
    )
    if not gpu:
        print("NOTE: CPU run: small shapes and CPU times, not the GPU numbers.")
    peaks: DevicePeaks = measure_peaks(device, dtype)
    dname = str(dtype).replace("torch.", "")
    rows: list[Row] = []
    for i, (name, kind, base, M, pass_, p, n) in enumerate(cases):
        if args.max_seconds and time.monotonic() - t0 > args.max_seconds:
            print(f"--max-seconds reached: {len(cases) - i} case(s) not run")
            break
        inp = make_case(
            name, kind, base, M, pass_, p, n, size=size, rank=rank, dtype=dtype, device=device,
            seed=args.seed + i,
        )  # fmt: skip
        common = dict(shape=inp["shape"], dtype=dtype, device=device, inputs=inp, peaks=peaks)
        case_rows = harness.run_case(
            op=OP if kind == "single" else "lora_linear_multi",
            reference=reference(inp),
            cost=cost(inp),
            providers=[p for p in providers if p.name != BASELINE],
            baseline=BASELINE,
            timer_kw=timer_kw,
            **common,
        )
        # The frozen base alone computes another function: its own reference and check.
        base_rows = harness.run_case(
            op="base",
            reference=base_reference(inp),
            cost=_base_cost(inp),
            providers=[PROVIDERS[BASELINE]],
            baseline=BASELINE,
            timer_kw=timer_kw,
            **common,
        )
        base_row = base_rows[0]
        for r in case_rows:
            if r.ok and base_row.ok:
                r.speedup = base_row.ms_median / r.ms_median
        case_rows += base_rows
        rows += case_rows
        print(f"\n[{i + 1}/{len(cases)}] {name}: M={M} {base} {pass_} dropout={p} adapters={n}")
        harness.print_table(case_rows)
        harness.write_csv(csv_path, rows, meta, {dname: peaks})
    if gpu:
        print("\n" + "\n".join(targets_summary(rows)))
    print(f"\nCSV: {csv_path}")
    failed = [r for r in rows if r.failed]
    for r in failed:
        print(f"FAILED {r.provider} {r.shape}: {r.status}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
