"""Shared benchmark machinery: the command line every benchmark takes, the run (device,
metadata, time budget, peaks, output files), timing, the correctness cross-check, result rows,
CSV, text tables, the headline summary and the dispatch-table rows.

Every op benchmark (bench/lowrank.py, int8.py, attn.py, and LoRA's) describes one *case* (the
inputs of one shape and dtype), a float64 reference output and a list of providers; `run_case`
checks each provider against the reference, checks that the library's GPU backends agree with
each other on the whole output, then times the ones that passed and returns one `Row` per
provider. A provider whose output is wrong is reported FAILED and is never timed. At large M the
reference is computed on a spread of rows only (`check_rows`), so that checking costs seconds.

Timing on CUDA: CUDA events around each call, with the L2 cache flushed before every timed call
by writing a 256 MiB buffer (outside the events), after warm-up; median and 20th/80th percentiles.
Timing on CPU: time.perf_counter, after warm-up, caches warm; those rows say device=cpu and are
no stand-in for GPU numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from lrkernels import dispatch
from lrkernels.roofline import DevicePeaks, device_name, measure_peaks, roofline_time

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# The library's GPU backends: where two of them ran, their whole outputs must agree.
AGREE = ("lrkernels-cuda", "lrkernels-triton")
# Above this many rows the reference is computed on this many rows spread over the output.
CHECK_ROWS = 256

L2_FLUSH_BYTES = 256 << 20

# (relative Frobenius error, max |error| / max |reference|) a correct kernel stays under, per
# output dtype. bf16/fp16 cover rounding of the output and of a rank-r intermediate; float32
# leaves room for TF32 tensor-core products.
ERROR_BOUNDS: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-3, 5e-3),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


class ProviderSkip(Exception):
    """Raised by a provider's builder when it cannot run here; the message is the reason."""


@dataclasses.dataclass
class Provider:
    """A named implementation. `build(inputs)` returns a zero-argument callable producing the
    output (or raises ProviderSkip); `cost(inputs)` overrides the case's (flops, bytes) when this
    provider does different work (e.g. a dense baseline); `env`: environment variables set while
    it is built, checked and timed (a library knob read per call, e.g. a forced kernel plan)."""

    name: str
    build: Callable[[dict], Callable[[], torch.Tensor]]
    cost: Callable[[dict], tuple[int, int]] | None = None
    env: Mapping[str, str] | None = None


@contextlib.contextmanager
def provider_env(prov: Provider):
    """Sets `prov.env` for the duration, then restores what was there."""
    saved = {k: os.environ.get(k) for k in prov.env or {}}
    os.environ.update(prov.env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclasses.dataclass
class Row:
    op: str
    provider: str
    device: str  # "cuda" or "cpu"
    dtype: str
    shape: dict[str, int | bool]
    status: str = "ok"  # "ok", "FAILED: ...", "skipped: ..."
    ms_median: float = math.nan
    ms_p20: float = math.nan
    ms_p80: float = math.nan
    n_runs: int = 0
    flops: int = 0
    bytes: int = 0
    rel_err: float = math.nan
    max_err: float = math.nan
    err_bound: float = math.nan
    roofline_ms: float = math.nan
    baseline: str = ""
    speedup: float = math.nan
    timing: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAILED")

    @property
    def tflops(self) -> float:
        return self.flops / (self.ms_median * 1e-3) / 1e12 if self.ok else math.nan

    @property
    def gbps(self) -> float:
        return self.bytes / (self.ms_median * 1e-3) / 1e9 if self.ok else math.nan

    @property
    def roofline_frac(self) -> float:
        return self.roofline_ms / self.ms_median if self.ok else math.nan


# --------------------------------------------------------------------------------------------
# metadata


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def device_slug(device: torch.device) -> str:
    """File-name tag: the GPU's name (e.g. nvidia-h100-80gb-hbm3) or plain 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    name = "".join(c if c.isalnum() else "-" for c in device_name(device).lower())
    return "-".join(filter(None, name.split("-")))


def collect_metadata(device: torch.device) -> dict[str, str]:
    """Run-level facts stamped on every CSV row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    # LRKERNELS_COMMIT (scripts/gpu_run.sh sets it; the GPU machine's copy of the tree has no
    # .git) names the commit, else git does
    commit = os.environ.get("LRKERNELS_COMMIT")
    if commit:
        dirty = os.environ.get("LRKERNELS_DIRTY", "unknown")
    else:
        commit = _git("rev-parse", "--short", "HEAD") or "unknown"
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = "unknown" if status is None or commit == "unknown" else str(bool(status))
    return {
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda or "none",
        "python_version": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# timing


class _L2Flusher:
    def __init__(self, device: torch.device):
        self.buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


_FLUSHERS: dict[torch.device, _L2Flusher] = {}


def _quantiles(ms: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(ms, dtype=np.float64)
    q = np.quantile(a, [0.5, 0.2, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def time_cuda(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 10.0,
    rep_ms: float = 40.0,
    min_runs: int = 5,
    max_runs: int = 100,
    flush_l2: bool = True,
) -> tuple[float, float, float, int, str]:
    """(median, p20, p80 in ms, runs, description): CUDA events around each call of fn, with the
    L2 flushed (256 MiB written) before each call outside the events."""
    device = torch.device("cuda", torch.cuda.current_device())
    if flush_l2 and device not in _FLUSHERS:
        _FLUSHERS[device] = _L2Flusher(device)
    flush = _FLUSHERS[device] if flush_l2 else (lambda: None)
    fn()
    torch.cuda.synchronize()
    # Estimate the cost of one (flush + call) round to size warm-up and repetitions.
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(3):
        flush()
        fn()
    t1.record()
    t1.synchronize()
    est = max(t0.elapsed_time(t1) / 3, 1e-3)
    n_warm = max(1, int(warmup_ms / est))
    n = int(min(max(rep_ms / est, min_runs), max_runs))
    for _ in range(n_warm):
        flush()
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends, strict=True):
        flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    med, p20, p80 = _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])
    how = (
        f"cuda events; cold L2 ({L2_FLUSH_BYTES >> 20} MiB buffer written before each run); "
        f"{n_warm} warm-up runs; median of {n}"
        if flush_l2
        else f"cuda events; warm L2; {n_warm} warm-up runs; median of {n}"
    )
    return med, p20, p80, n, how


def time_cpu(
    fn: Callable[[], object],
    *,
    warmup_s: float = 0.05,
    rep_s: float = 0.25,
    min_runs: int = 5,
    max_runs: int = 200,
) -> tuple[float, float, float, int, str]:
    """(median, p20, p80 in ms, runs, description) by time.perf_counter, after warm-up."""
    import time

    est = math.inf
    for _ in range(3):  # the fastest of three: one stray stall must not shrink the sample
        t = time.perf_counter()
        fn()
        est = min(est, time.perf_counter() - t)
    est = max(est, 1e-7)
    n_warm = int(min(max(warmup_s / est, 2), max_runs))
    for _ in range(n_warm):
        fn()
    n = int(min(max(rep_s / est, min_runs), max_runs))
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    med, p20, p80 = _quantiles(ms)
    how = (
        f"cpu perf_counter; {torch.get_num_threads()} threads; warm caches; "
        f"{n_warm} warm-up runs; median of {n}; "
        "CPU times, not GPU numbers"
    )
    return med, p20, p80, n, how


def time_fn(fn: Callable[[], object], device: torch.device, **kw):
    return time_cuda(fn, **kw) if device.type == "cuda" else time_cpu(fn, **kw)


# --------------------------------------------------------------------------------------------
# correctness


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max |out - ref| / max |ref|), computed in float64."""
    if out.shape != ref.shape:
        raise ValueError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o = out.detach().to(torch.float64)
    r = ref.detach().to(device=o.device, dtype=torch.float64)
    if not torch.isfinite(o).all():
        return math.inf, math.inf
    diff = o - r
    ref_norm = torch.linalg.vector_norm(r).item()
    ref_max = r.abs().max().item() if r.numel() else 0.0
    rel = torch.linalg.vector_norm(diff).item() / max(ref_norm, 1e-300)
    mx = diff.abs().max().item() / max(ref_max, 1e-300) if r.numel() else 0.0
    return rel, mx


# --------------------------------------------------------------------------------------------
# one case


def spread_rows(m: int, device, limit: int = CHECK_ROWS) -> torch.Tensor | None:
    """None when all `m` rows are checked, else `limit` row indices spread evenly over them
    (first and last included): the rows a large case's reference is computed on."""
    if m <= limit:
        return None
    return torch.linspace(0, m - 1, limit, device=device).round().long().unique()


def check_output(
    out, reference: torch.Tensor, dtype: torch.dtype, rows=None, shape=None
) -> tuple[float, float, str]:
    """(rel_err, max_err, failure message or "") of `out` against `reference` (computed on
    `rows` of the output's 2-D view when given; `shape`: the full output's expected shape)."""
    rel_bound, max_bound = ERROR_BOUNDS[dtype]
    want = tuple(shape) if shape is not None else tuple(reference.shape)
    if not torch.is_tensor(out) or tuple(out.shape) != want:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        return math.nan, math.nan, f"output shape {got} != expected {want}"
    if out.dtype != dtype:
        return math.nan, math.nan, f"output dtype {out.dtype} != {dtype}"
    part = out if rows is None else out.reshape(-1, out.shape[-1])[rows]
    rel, mx = compare(part, reference)
    if not (rel <= rel_bound and mx <= max_bound):
        what = "" if rows is None else f" (on {len(rows)} rows)"
        return (
            rel,
            mx,
            (
                f"rel_err {rel:.3g} (bound {rel_bound:g}), max_err {mx:.3g} (bound {max_bound:g})"
                + what
            ),
        )
    return rel, mx, ""


def agreement_failures(outs: Mapping[str, object], dtype: torch.dtype) -> dict[str, str]:
    """Providers (of `outs`: name -> output tensor or tuple of tensors) whose whole outputs
    differ from another's beyond twice the dtype's bounds, with the reason. Two correct
    implementations each within the bounds of the exact result are within twice them of each
    other; a disagreement condemns both, since it cannot tell which is wrong."""
    rel_bound, max_bound = ERROR_BOUNDS[dtype]
    names = list(outs)
    bad: dict[str, str] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ta, tb = outs[a], outs[b]
            ta = ta if isinstance(ta, tuple | list) else (ta,)
            tb = tb if isinstance(tb, tuple | list) else (tb,)
            for k, (x, y) in enumerate(zip(ta, tb, strict=True)):
                rel, mx = compare(x, y)
                if not (rel <= 2 * rel_bound and mx <= 2 * max_bound):
                    what = "the output" if k == 0 else f"gradient {k}"
                    msg = (
                        f"{what} differs from {{other}}'s on the whole output: rel {rel:.3g} "
                        f"(bound {2 * rel_bound:g}), max {mx:.3g} (bound {2 * max_bound:g})"
                    )
                    bad.setdefault(a, "FAILED: " + msg.format(other=b))
                    bad.setdefault(b, "FAILED: " + msg.format(other=a))
                    break
    return bad


def run_case(
    *,
    op: str,
    shape: dict[str, int | bool | str],
    dtype: torch.dtype,
    device: torch.device,
    inputs: dict,
    reference: torch.Tensor,
    cost: tuple[int, int],
    providers: Sequence[Provider],
    peaks: DevicePeaks,
    baseline: str,
    timer_kw: dict | None = None,
    check_rows: torch.Tensor | None = None,
    out_shape: tuple[int, ...] | None = None,
    agree: Sequence[str] = AGREE,
) -> list[Row]:
    """Check every provider on one case, then time those that passed; one Row each.

    `reference` is the float64 result, of the rows `check_rows` of the output's 2-D view when
    given (then `out_shape` is the whole output's shape). The providers named in `agree` that
    passed must also agree with each other on the whole output (`agreement_failures`)."""
    rows: list[Row] = []
    fns: dict[str, Callable] = {}
    kept: dict[str, torch.Tensor] = {}
    dtype_name = str(dtype).replace("torch.", "")
    for prov in providers:
        row = Row(op=op, provider=prov.name, device=device.type, dtype=dtype_name, shape=shape)
        row.flops, row.bytes = prov.cost(inputs) if prov.cost else cost
        row.err_bound = ERROR_BOUNDS[dtype][0]
        rows.append(row)
        try:
            with provider_env(prov):
                fn = prov.build(inputs)
                out = fn()
        except ProviderSkip as e:
            row.status = f"skipped: {e}"
            continue
        except Exception as e:  # a provider that should run but raises is broken
            row.status = f"FAILED: raised {type(e).__name__}: {_one_line(e)}"
            continue
        row.rel_err, row.max_err, msg = check_output(out, reference, dtype, check_rows, out_shape)
        if msg:
            row.status = f"FAILED: {msg}"
            continue
        fns[prov.name] = fn
        if prov.name in agree:
            kept[prov.name] = out
        del out
    for name, status in agreement_failures(kept, dtype).items():
        next(r for r in rows if r.provider == name).status = status
    kept.clear()
    by_name = {p.name: p for p in providers}
    for row in rows:
        if not row.ok:
            continue
        with provider_env(by_name[row.provider]):
            med, p20, p80, n, how = time_fn(fns[row.provider], device, **(timer_kw or {}))
        row.ms_median, row.ms_p20, row.ms_p80, row.n_runs, row.timing = med, p20, p80, n, how
        row.roofline_ms = roofline_time(row.flops, row.bytes, peaks) * 1e3
    fns.clear()
    set_speedups(rows, baseline)
    return rows


def set_speedups(rows: Sequence[Row], baseline: str) -> None:
    base = next((r for r in rows if r.provider == baseline and r.ok), None)
    for r in rows:
        r.baseline = baseline
        if base is not None and r.ok:
            r.speedup = base.ms_median / r.ms_median


def _one_line(e: BaseException, limit: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# output

METRIC_COLUMNS = [
    "ms_median",
    "ms_p20",
    "ms_p80",
    "n_runs",
    "flops",
    "bytes",
    "tflops",
    "gbps",
    "roofline_ms",
    "roofline_frac",
    "baseline",
    "speedup",
    "rel_err",
    "max_err",
    "err_bound",
    "timing",
]
META_COLUMNS = [
    "device_name",
    "torch_version",
    "triton_version",
    "cuda_version",
    "python_version",
    "git_commit",
    "git_dirty",
    "date",
    "peak_gbps",
    "peak_tflops",
    "peaks_measured",
    "peaks_how",
]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def csv_columns(rows: Sequence[Row], extra: Sequence[str] = ()) -> list[str]:
    shape_keys: list[str] = []
    for r in rows:
        shape_keys += [k for k in r.shape if k not in shape_keys]
    return (
        ["op", "provider", "status", "device", "dtype", *shape_keys]
        + METRIC_COLUMNS
        + list(extra)
        + [*META_COLUMNS]
    )


def row_dict(row: Row, meta: dict[str, str], peaks: DevicePeaks | None) -> dict[str, str]:
    d = {
        "op": row.op,
        "provider": row.provider,
        "status": row.status,
        "device": row.device,
        "dtype": row.dtype,
    }
    d.update({k: _fmt(v) for k, v in row.shape.items()})
    for c in METRIC_COLUMNS:
        d[c] = _fmt(getattr(row, c))
    d.update(meta)
    if peaks is not None:
        d["peak_gbps"] = _fmt(peaks.bandwidth_bytes_per_s / 1e9)
        d["peak_tflops"] = _fmt(peaks.flops_per_s / 1e12)
        d["peaks_measured"] = str(peaks.measured)
        d["peaks_how"] = peaks.how
    return d


def write_csv(
    path: Path,
    rows: Sequence[Row],
    meta: dict[str, str],
    peaks_by_dtype: dict[str, DevicePeaks],
    extra: Sequence[str] = (),
) -> Path:
    """Write rows (metadata and the row's dtype peaks on every line; `extra`: more attributes
    of the rows, as columns); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = csv_columns(rows, extra)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            d = row_dict(r, meta, peaks_by_dtype.get(r.dtype))
            d.update({c: _fmt(getattr(r, c)) for c in extra})
            w.writerow(d)
    tmp.replace(path)
    return path


def format_table(rows: Sequence[Row]) -> str:
    """Aligned plain-text table of the rows (status text for rows that were not timed)."""
    shape_keys: list[str] = []
    for r in rows:
        shape_keys += [k for k in r.shape if k not in shape_keys and k != "bias"]
    head = ["provider", "dtype", *shape_keys, "ms", "TFLOP/s", "GB/s", "roofline", "speedup"]
    lines = []
    for r in rows:
        cells = [r.provider, r.dtype, *[str(r.shape.get(k, "")) for k in shape_keys]]
        if r.ok:
            cells += [
                f"{r.ms_median:.4f}",
                f"{r.tflops:.3f}",
                f"{r.gbps:.1f}",
                f"{100 * r.roofline_frac:.1f}%",
                "" if math.isnan(r.speedup) else f"{r.speedup:.2f}x",
            ]
        else:
            cells += [r.status]
        lines.append(cells)
    n_prefix = 2 + len(shape_keys)
    widths = [len(h) for h in head]
    for cells in lines:
        timed = len(cells) == len(head)
        for i, c in enumerate(cells if timed else cells[:n_prefix]):
            widths[i] = max(widths[i], len(c))

    def fmt(cells: list[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            if len(cells) < len(head) and i >= n_prefix:
                out.append(c)  # status message of a row that was not timed
            elif i >= 2:
                out.append(c.rjust(widths[i]))
            else:
                out.append(c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *(fmt(c) for c in lines)])


def print_table(rows: Sequence[Row], file=None) -> None:
    print(format_table(rows), file=file or sys.stdout, flush=True)


# --------------------------------------------------------------------------------------------
# the command line


def flat(values) -> list[str]:
    """Space- and comma-separated command-line values as one list."""
    return [v for item in values for v in str(item).split(",") if v]


def parse_dtypes(names: Sequence[str]) -> list[torch.dtype]:
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    return list(dict.fromkeys(DTYPES[n] for n in names))


def default_out_dir() -> Path:
    """Where results go by default: $LRKERNELS_BENCH_OUT, else build/bench-results in the
    repository (git-ignored: measured GPU results are committed to bench/results/ by hand)."""
    return Path(os.environ.get("LRKERNELS_BENCH_OUT") or ROOT / "build" / "bench-results")


def make_parser(
    doc: str, providers: Sequence[str], *, unit: str = "case"
) -> argparse.ArgumentParser:
    """The options every benchmark takes (each adds its own sizes): defaults and choices in
    the help text."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--quick", action="store_true", help="the short sweep: a handful of rows")
    g.add_argument(
        "--headline",
        action="store_true",
        help="only the headline shapes the goals name, checked against the reference on a "
        "spread of rows / heads (what scripts/gpu_run.sh runs first); on a CPU, small "
        "stand-ins of them",
    )
    g.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        help="cuda or cpu (default: cuda if a GPU is visible, else cpu)",
    )
    g.add_argument(
        "--dtype",
        nargs="+",
        metavar="DTYPE",
        help="bf16, fp16 or fp32, space or comma separated (default: the sweep's)",
    )
    g.add_argument(
        "--providers",
        nargs="+",
        metavar="NAME",
        help=f"any of {', '.join(providers)} (default: all of them made for the device)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the inputs (default: 0)")
    g = p.add_argument_group("timing")
    g.add_argument(
        "--rep-ms",
        type=float,
        metavar="MS",
        help="time budget of one measurement (default: 40 ms on a GPU, 250 ms on a CPU)",
    )
    g.add_argument("--warm-l2", action="store_true", help="GPU: do not flush the L2 between runs")
    g.add_argument(
        "--max-seconds",
        type=float,
        metavar="S",
        help=f"start no new {unit} after S seconds, keeping the rows measured (default: no limit)",
    )
    g.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"CPU: torch.set_num_threads(N) (default: torch's, here {torch.get_num_threads()})",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        metavar="DIR",
        default=str(default_out_dir()),
        help="folder of the CSV and SVG (default: %(default)s; LRKERNELS_BENCH_OUT sets it)",
    )
    g.add_argument("--no-plot", action="store_true", help="write no SVG chart")
    g.add_argument(
        "--write-table",
        nargs="?",
        const=str(dispatch.PACKAGED_TABLE),
        metavar="FILE",
        help="merge the measured times of the providers that are dispatch paths into the "
        "dispatch table FILE (without FILE: the packaged lrkernels/dispatch_table.json)",
    )
    g.add_argument(
        "--summary",
        metavar="FILE",
        help="append the headline rows and the PASS/MISS lines of the goals to FILE",
    )
    return p


# --------------------------------------------------------------------------------------------
# one benchmark run


class Bench:
    """The run-level state of one benchmark invocation: device, providers, metadata, timing
    settings, time budget, measured peaks and output files.

    `name` prefixes the files (``<out>/<name>-<device>.csv/.svg``); `all_providers` and
    `baseline` as in the benchmark's docstring; `gpu_only` / `cpu_only` providers are left out
    by default on the other device (`extra_left_out`: more (name, why) left out by default;
    `require_baseline`: run the baseline even when --providers leaves it out)."""

    def __init__(
        self,
        *,
        name: str,
        op: str,
        args: argparse.Namespace,
        all_providers: Sequence[str],
        baseline: str,
        gpu_only: Sequence[str] = AGREE,
        cpu_only: Sequence[str] = ("lrkernels-cpu",),
        extra_left_out: Callable[[str], list[tuple[str, str]]] | None = None,
        require_baseline: bool = True,
    ):
        self.name, self.op, self.args, self.baseline = name, op, args, baseline
        self.t_start = time.monotonic()
        self.device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device_type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.device_type == "cuda"
            else torch.device("cpu")
        )
        if args.threads:
            torch.set_num_threads(args.threads)
        if self.device_type == "cpu":
            # Inductor's pool of compile workers would compete with the timed CPU kernels.
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
        names = flat(args.providers) if args.providers else list(all_providers)
        bad = [n for n in names if n not in all_providers]
        if bad:
            raise SystemExit(f"unknown provider(s) {bad}; choose from {', '.join(all_providers)}")
        self.left_out: list[tuple[str, str]] = []
        if not args.providers:  # by default only the library backends made for this device
            import lrkernels

            avail = lrkernels.available_backends()
            other = cpu_only if self.device_type == "cuda" else gpu_only
            for n in other:
                why = avail.get(n.split("-", 1)[1]) or f"not a {self.device_type} backend"
                self.left_out.append((n, why))
            if extra_left_out is not None:
                self.left_out += extra_left_out(self.device_type)
            dropped = {n for n, _ in self.left_out}
            names = [n for n in names if n not in dropped]
        if require_baseline and baseline not in names:
            names.append(baseline)  # speedups need it
        self.provider_names = names
        self.meta = collect_metadata(self.device)
        self.timer_kw: dict = {}
        if self.device_type == "cuda":
            self.timer_kw["flush_l2"] = not args.warm_l2
            if args.rep_ms:
                self.timer_kw["rep_ms"] = args.rep_ms
        elif args.rep_ms:
            self.timer_kw["rep_s"] = args.rep_ms / 1e3
        slug = device_slug(self.device)
        self.out_dir = Path(args.out)
        self.csv_path = self.out_dir / f"{name}-{slug}.csv"
        self.svg_path = self.out_dir / f"{name}-{slug}.svg"
        self.label = f"{self.meta['device_name']} ({self.device_type})"
        self.peaks_by_dtype: dict[str, DevicePeaks] = {}

    @property
    def deadline(self) -> float | None:
        return self.t_start + self.args.max_seconds if self.args.max_seconds else None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def banner(self, title: str, notes: Sequence[str] = ()) -> None:
        m = self.meta
        print(
            f"{title} on {self.label}; torch {m['torch_version']}, triton "
            f"{m['triton_version']}, CUDA {m['cuda_version']}, git {m['git_commit']}"
            f"{' (dirty)' if m['git_dirty'] == 'True' else ''}"
        )
        if self.device_type == "cpu":
            print(
                "NOTE: CPU run (no CUDA device or --device cpu): small shapes, CPU times; these "
                "are not the GPU numbers. The CPU roofline uses DRAM copy bandwidth, so "
                "cache-resident shapes can exceed 100%."
            )
        for n in notes:
            print(n)
        for n, why in self.left_out:
            print(f"provider {n} not run on {self.device_type}: {why}")

    def peaks(self, dtype: torch.dtype) -> DevicePeaks:
        """The device's copy bandwidth and matmul rate in `dtype`, measured once per run."""
        name = str(dtype).replace("torch.", "")
        if name not in self.peaks_by_dtype:
            pk = self.peaks_by_dtype[name] = measure_peaks(self.device, dtype)
            print(
                f"measured peaks ({name}): {pk.bandwidth_bytes_per_s / 1e9:.0f} GB/s, "
                f"{pk.flops_per_s / 1e12:.2f} TFLOP/s [{pk.how}]",
                flush=True,
            )
        return self.peaks_by_dtype[name]

    def write_csv(self, rows: Sequence[Row], extra: Sequence[str] = ()) -> Path:
        return write_csv(self.csv_path, rows, self.meta, self.peaks_by_dtype, extra)

    def finish(
        self,
        rows: Sequence[Row],
        *,
        table: Callable[[Sequence[Row]], str] = format_table,
        report: Sequence[str] = (),
        plot: Callable[[Path], Path] | None = None,
        truncated: int = 0,
        headline: Callable[[Row], bool] | None = None,
        dispatch_entries: Callable[[], list[dict]] | None = None,
    ) -> int:
        """Print all rows and the `report` (targets, linearity...), write the plot, the
        dispatch-table rows and the summary; the exit status: 1 iff a check FAILED."""
        print("\n=== all rows ===")
        print(table(rows))
        if truncated:
            print(
                f"\nWARNING: --max-seconds {self.args.max_seconds:g} reached; {truncated} "
                f"{'case' if truncated == 1 else 'cases'} not run"
            )
        if report:
            print()
            print("\n".join(report))
        print(f"\nCSV: {self.csv_path}")
        if plot is not None and not self.args.no_plot and any(r.ok for r in rows):
            print(f"SVG: {plot(self.svg_path)}")
        if self.args.write_table and dispatch_entries is not None:
            write_dispatch_rows(self.args.write_table, dispatch_entries(), self.meta, self.name)
        if self.args.summary:
            sel = [r for r in rows if headline is None or headline(r)]
            with open(self.args.summary, "a", encoding="utf-8") as f:
                f.write(f"\n== {self.name}: {self.op} headline on {self.label}\n")
                f.write(table(sel) + "\n" if sel else "(no headline rows were run)\n")
                if truncated:
                    f.write(f"({truncated} case(s) not run: --max-seconds reached)\n")
                f.write("\n".join(report) + "\n")
        failed = [r for r in rows if r.failed]
        if failed:
            print(f"\n{len(failed)} correctness check(s) FAILED:", file=sys.stderr)
            for r in failed:
                print(f"  {r.provider} {r.shape} {r.dtype}: {r.status}", file=sys.stderr)
            return 1
        return 0


# --------------------------------------------------------------------------------------------
# the dispatch table


def dispatch_entries(
    rows: Sequence[Row],
    *,
    op: str,
    paths: Mapping[str, str],
    features: Callable[[Row], dict | None],
    device: torch.device,
) -> list[dict]:
    """The table entries of a run: one per measured shape (and dtype), holding the median
    time of every provider that is a dispatch path (`paths`: provider -> backend). A provider
    that FAILED its check at a shape is excluded from that shape's class; skipped ones are
    just absent, and a shape where every path was skipped gives no entry. `features(row)`: the
    op's dispatch features of the row's shape (None: the row is no measurement of the op's own
    dispatch, e.g. another pass)."""
    hooks = dispatch.hooks(op)
    if hooks is None:
        return []
    groups: dict[tuple, tuple[dict, list[Row]]] = {}
    for r in rows:
        if r.provider not in paths:
            continue
        f = features(r)
        if f is None:
            continue
        label = " ".join(f"{k}={v}" for k, v in r.shape.items())
        groups.setdefault((label, r.dtype), (f, []))[1].append(r)
    dev = dispatch.device_key(device)
    out = []
    for (label, dt), (f, rs) in groups.items():
        ms = {paths[r.provider]: round(r.ms_median, 6) for r in rs if r.ok}
        failed = {paths[r.provider]: f"FAILED at {label}: {r.status}" for r in rs if r.failed}
        if not ms and not failed:  # every path skipped here (e.g. cuda-only paths on a CPU)
            continue
        out.append(
            {
                "op": op,
                "device": dev,
                "dtype": dt,
                "class": hooks.shape_class(f),
                "shape": label,
                "ms": ms,
                "excluded": failed,
            }
        )
    return out


def write_dispatch_rows(path, entries: list[dict], meta: Mapping[str, str], bench: str) -> None:
    """Merge `entries` into the table file at `path` and print the rows touched."""
    if not entries:
        print(f"\ndispatch table {path}: nothing measured that is a dispatch path")
        return
    source = {
        "bench": f"bench/{bench}.py",
        "commit": meta["git_commit"] + (" (dirty)" if meta["git_dirty"] == "True" else ""),
        "date": meta["date"],
        "torch": meta["torch_version"],
        "triton": meta["triton_version"],
        "cuda": meta["cuda_version"],
    }
    table = dispatch.read_table(path)
    table, touched = dispatch.merge_rows(table, entries, source=source)
    dispatch.write_table(path, table)
    print(f"\ndispatch table {path}: {len(touched)} row(s) written")
    print(dispatch.format_rows(touched))
