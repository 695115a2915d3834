"""Benchmark of lrkernels.lora_linear / lora_linear_multi (LoRA on a frozen bf16 or int8 base)
against the base layer alone and PEFT-style eager LoRA, side by side.

    python bench/lora.py                  # every case (GPU if one is visible, else CPU stand-ins)
    python bench/lora.py --quick          # a handful of rows
    python bench/lora.py --headline       # the cases the goals name (what gpu_run.sh runs)
    python bench/lora.py --cases decode-int8 train-dense --providers lrkernels-triton,peft-eager
    python bench/lora.py --write-table    # also record the times in the dispatch table

Cases (4096x4096, r = 16 on a GPU; 512x512 on a CPU; --size / --rank change them), each
forward ("fwd") or forward + backward ("fwdbwd": the frozen base gives dx only, the adapters
dA, dB):

- single adapter, dense base (bf16 on a GPU, float32 on a CPU) and int8 base (per-channel
  scales; the packed layout 2 on a GPU, as Int8Linear holds it there), decode M = 16 and
  training M = 8192 (CPU: 256) with dropout 0.1 (fwdbwd);
- multi-adapter serving: M = 64 rows over 64 adapters, M = 4096 rows over 8 (CPU: 64 over 8).

Providers: lrkernels-cuda / lrkernels-triton / lrkernels-cpu / lrkernels-torch (the op with
that backend: the dispatch paths whose times --write-table records, lrkernels-torch being the
torch path auto falls back to); base-only (the frozen layer alone: F.linear, or
lrkernels.int8_linear for the int8 base: the yardstick of the targets); peft-eager (PEFT's
computation: base + s·(drop(x)·Aᵀ)·Bᵀ as three matmuls and an add, on the same base; dropout
uses a mask made outside the timed region, which spares it the RNG: conservative for our
speedups); peft-compiled (that, through torch.compile; left out on a CPU unless named); for
multi-adapter, eager-loop (the base plus one masked LoRA product per adapter, with a host sync
per adapter).

Every provider is first checked against the float64 reference (same dropout mask: the
counter-based hash; base-only against the base alone); lrkernels-cuda and lrkernels-triton
must agree with each other on the whole output; a wrong one is FAILED, never timed, and makes
the exit status 1. Rows go to <out>/lora-<device>.csv with FLOPs, bytes
(`lrkernels.roofline.lora_linear_cost`), TFLOP/s, GB/s and the roofline fraction; the run ends
with PASS/MISS against the targets of issue 11 (goals, not asserts; GPU rows only):

  decode M=16 bf16 base            <= 1.05x the base F.linear alone
  decode M=16 int8 base            <= 1.05x int8_linear alone; <= 0.6x PEFT-style on bf16
  training M=8192, dropout 0.1     >= 1.3x faster than PEFT eager; <= 1.10x the frozen base
  multi-adapter M=64, 64 adapters  <= 1.6x the base alone
  multi-adapter M=4096, 8 adapters <= 1.05x the base alone
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import lrkernels
from bench import harness
from bench.harness import Provider, ProviderSkip, Row
from lrkernels.quant import pack, quantize
from lrkernels.reference import (
    dequantize_reference,
    lora_dropout_keep_mask,
    lora_dropout_threshold,
    lora_keep_scale,
    lora_linear_exact,
    lora_linear_multi_exact,
)
from lrkernels.roofline import lora_linear_cost

OP = "lora_linear"
OP_MULTI = "lora_linear_multi"
BASELINE = "base-only"
ALL_PROVIDERS = [
    "lrkernels-cuda",
    "lrkernels-triton",
    "lrkernels-cpu",
    "lrkernels-torch",
    "base-only",
    "peft-eager",
    "peft-compiled",
    "eager-loop",
]
DISPATCH_PATHS = {
    "lrkernels-cuda": "cuda",
    "lrkernels-triton": "triton",
    "lrkernels-cpu": "cpu",
    "lrkernels-torch": "torch",
}
ALPHA = 32.0
SEED = 1234  # the dropout seed of every case (the reference reproduces the kernels' mask)

# (name, kind, base, M, pass, dropout, adapters); kind "single" or "multi"; base "dense",
# "int8" (layout 1, plain qweight) or "int8-packed" (layout 2: what Int8Linear holds on CUDA).
GPU_CASES = [
    ("decode-dense", "single", "dense", 16, "fwd", 0.0, 1),
    ("decode-int8", "single", "int8-packed", 16, "fwd", 0.0, 1),
    ("train-dense", "single", "dense", 8192, "fwdbwd", 0.1, 1),
    ("multi-64x64", "multi", "dense", 64, "fwd", 0.0, 64),
    ("multi-4096x8", "multi", "dense", 4096, "fwd", 0.0, 8),
    ("decode-int8-plain", "single", "int8", 16, "fwd", 0.0, 1),
    ("mid-dense", "single", "dense", 256, "fwd", 0.0, 1),
    ("mid-int8", "single", "int8-packed", 256, "fwd", 0.0, 1),
    ("multi-64x64-int8", "multi", "int8-packed", 64, "fwd", 0.0, 64),
]
CPU_CASES = [
    ("decode-dense", "single", "dense", 16, "fwd", 0.0, 1),
    ("decode-int8", "single", "int8", 16, "fwd", 0.0, 1),
    ("train-dense", "single", "dense", 256, "fwdbwd", 0.1, 1),
    ("multi-64x8", "multi", "dense", 64, "fwd", 0.0, 8),
    ("decode-int8-packed", "single", "int8-packed", 16, "fwd", 0.0, 1),
]
# --headline: the cases the goals name (on a CPU, their small stand-ins)
HEADLINE_CASES = {
    "cuda": ["decode-dense", "decode-int8", "train-dense", "multi-64x64", "multi-4096x8"],
    "cpu": ["decode-dense", "decode-int8", "train-dense", "multi-64x8"],
}
QUICK_CASES = {
    "cuda": ["decode-dense", "decode-int8"],
    "cpu": ["decode-dense", "multi-64x8"],
}
SIZES = {"cuda": (4096, 16), "cpu": (512, 16)}  # (in = out, rank)


def make_case(name, kind, base, M, pass_, p, n, *, size, rank, dtype, device, seed) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    K = N = size
    w = randn(N, K, s=K**-0.5)
    if base.startswith("int8"):
        qweight, scales = quantize(w, None, scale_dtype=dtype)
        w_eff = dequantize_reference(qweight, scales, dtype)
        spec = pack(qweight, scales) if base == "int8-packed" else (qweight, scales)
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
    w, ws = _wsplit(inp)
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
        group_size=None if sh["base"] == "dense" else 0, n_adapters=sh["adapters"],
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
    return (inp["spec"], None) if inp["base"] == "dense" else inp["spec"]


def _base_forward(inp: dict):
    if inp["base"] != "dense":
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
        group_size=None if sh["base"] == "dense" else 0, n_adapters=0,
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
            if inp["base"] != "dense" and not torch.cuda.is_available():
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
    "lrkernels-torch": _ours("torch"),
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
    """PASS/MISS of every lrkernels provider against the goals of issue 11 (GPU rows only:
    the goals are H100/H200 numbers)."""
    lines = ["LoRA targets (issue 11; 4096x4096, r=16; goals, not asserts):"]
    gpu = [r for r in rows if r.device == "cuda"]
    if not gpu:
        return lines + ["  not measured: a CPU run (the goals are GPU goals)"]
    ours = [p for p in dict.fromkeys(r.provider for r in gpu) if p.startswith("lrkernels-")]
    ours = [p for p in ours if p != "lrkernels-torch"]  # torch's path: no goal of its own
    for label, case, base_prov, base_case, goal in TARGETS:
        for p in ours:
            ratio = _ratio(gpu, case, p, base_prov, base_case)
            if ratio is None:
                lines.append(f"  {p}: {label}: not measured")
            else:
                verdict = "PASS" if ratio <= goal else "MISS"
                lines.append(f"  {p}: {label}: {ratio:.3f} (goal <= {goal:.3f}) {verdict}")
    return lines


def is_headline(r: Row) -> bool:
    return r.shape["case"] in HEADLINE_CASES[r.device]


def dispatch_features(op: str):
    """The dispatch features of `op` for a row of this benchmark (None: not that op)."""

    def features(r: Row) -> dict | None:
        s = r.shape
        base = "dense" if s["base"] == "dense" else "int8"
        common = {"M": s["M"], "in": s["in"], "out": s["out"], "rank": s["r"], "base": base}
        if op == OP_MULTI and r.op == OP_MULTI:
            return {**common, "adapters": s["adapters"]}
        if op == OP and r.op == OP:
            train = s["pass"] == "fwdbwd"
            return {**common, "mode": "train" if train else "infer", "dropout": s["dropout"] > 0}
        return None

    return features


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    all_cases = list(dict.fromkeys(c[0] for c in GPU_CASES + CPU_CASES))
    p = harness.make_parser(__doc__, ALL_PROVIDERS)
    g = p.add_argument_group("sizes (default: the device's)")
    g.add_argument(
        "--cases",
        nargs="+",
        metavar="NAME",
        help=f"cases to run, of {', '.join(all_cases)} (default: all the device's)",
    )
    g.add_argument("--size", type=int, help="in = out features (default: 4096 GPU, 512 CPU)")
    g.add_argument("--rank", type=int, help="adapter rank r (default: 16)")
    return p.parse_args(argv)


def build_cases(args, device_type: str) -> list[tuple]:
    cases = GPU_CASES if device_type == "cuda" else CPU_CASES
    if args.headline:
        cases = [c for c in cases if c[0] in HEADLINE_CASES[device_type]]
    elif args.quick:
        cases = [c for c in cases if c[0] in QUICK_CASES[device_type]]
    if args.cases:
        wanted = set(harness.flat(args.cases))
        unknown = wanted - {c[0] for c in GPU_CASES + CPU_CASES}
        if unknown:
            raise SystemExit(f"unknown case(s) {sorted(unknown)}")
        cases = [c for c in (GPU_CASES if device_type == "cuda" else CPU_CASES) if c[0] in wanted]
    return cases


def _left_out(device_type: str) -> list[tuple[str, str]]:
    if device_type == "cpu":
        return [("peft-compiled", "torch.compile on a CPU costs a compile per case (name it)")]
    return []


def main(argv: list[str] | None = None, extra_providers: list[Provider] | None = None) -> int:
    """Run the benchmark; the exit status is 1 iff a correctness check failed.
    `extra_providers` adds providers (tests inject a deliberately wrong one)."""
    args = parse_args(argv)
    run = harness.Bench(
        name="lora",
        op=OP,
        args=args,
        all_providers=ALL_PROVIDERS,
        baseline=BASELINE,
        extra_left_out=_left_out,
    )
    gpu = run.device_type == "cuda"
    size, rank = SIZES[run.device_type]
    size, rank = args.size or size, args.rank or rank
    dtypes = harness.parse_dtypes(harness.flat(args.dtype)) if args.dtype else []
    dtypes = dtypes or [torch.bfloat16 if gpu else torch.float32]
    providers = [PROVIDERS[n] for n in run.provider_names if n != BASELINE]
    providers += list(extra_providers or [])
    cases = [(c, dt) for dt in dtypes for c in build_cases(args, run.device_type)]
    run.banner(f"lora_linear benchmark ({size}x{size}, r={rank})")
    print(f"{len(cases)} cases x {len(providers) + 1} providers; baseline {BASELINE}", flush=True)

    rows: list[Row] = []
    truncated = 0
    for i, ((name, kind, base, M, pass_, p, n), dtype) in enumerate(cases):
        if run.out_of_time():
            truncated = len(cases) - i
            break
        peaks = run.peaks(dtype)
        inp = make_case(
            name, kind, base, M, pass_, p, n, size=size, rank=rank, dtype=dtype,
            device=run.device, seed=args.seed + i,
        )  # fmt: skip
        common = dict(
            shape=inp["shape"], dtype=dtype, device=run.device, inputs=inp, peaks=peaks,
            baseline=BASELINE, timer_kw=run.timer_kw,
        )  # fmt: skip
        case_rows = harness.run_case(
            op=OP if kind == "single" else OP_MULTI,
            reference=reference(inp),
            cost=cost(inp),
            providers=providers,
            **common,
        )
        # The frozen base alone computes another function: its own reference and check.
        base_rows = harness.run_case(
            op="base",
            reference=base_reference(inp),
            cost=_base_cost(inp),
            providers=[PROVIDERS[BASELINE]],
            **common,
        )
        base_row = base_rows[0]
        for r in case_rows:
            if r.ok and base_row.ok:
                r.speedup = base_row.ms_median / r.ms_median
        case_rows += base_rows
        rows += case_rows
        del inp
        where = f"{name}: M={M} {base} {pass_} dropout={p} adapters={n} {dtype}"
        print(f"\n[{i + 1}/{len(cases)}] {where.replace('torch.', '')}")
        harness.print_table(case_rows)
        run.write_csv(rows)  # after every case: a run cut short still leaves its rows

    def entries() -> list[dict]:
        return [
            e
            for op in (OP, OP_MULTI)
            for e in harness.dispatch_entries(
                rows,
                op=op,
                paths=DISPATCH_PATHS,
                features=dispatch_features(op),
                device=run.device,
            )  # fmt: skip
        ]

    return run.finish(
        rows,
        report=targets_summary(rows),
        truncated=truncated,
        headline=is_headline,
        dispatch_entries=entries,
    )


if __name__ == "__main__":
    sys.exit(main())
