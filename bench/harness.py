"""Shared benchmark machinery: timing, correctness cross-check, result rows, CSV and text table.

Every op benchmark (low-rank linear today, attention / int8 later) describes one *case* (the
inputs of one shape and dtype), a float64 reference output and a list of providers; `run_case`
checks each provider against the reference, times the ones that pass and returns one `Row` per
provider. A provider whose output is wrong is reported FAILED and is never timed.

Timing on CUDA: CUDA events around each call, with the L2 cache flushed before every timed call
by writing a 256 MiB buffer (outside the events), after warm-up; median and 20th/80th percentiles.
Timing on CPU: time.perf_counter, after warm-up, caches warm; those rows say device=cpu and are
no stand-in for GPU numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lrkernels.roofline import DevicePeaks, device_name, roofline_time

ROOT = Path(__file__).resolve().parents[1]

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
    provider does different work (e.g. a dense baseline)."""

    name: str
    build: Callable[[dict], Callable[[], torch.Tensor]]
    cost: Callable[[dict], tuple[int, int]] | None = None


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


def run_case(
    *,
    op: str,
    shape: dict[str, int | bool],
    dtype: torch.dtype,
    device: torch.device,
    inputs: dict,
    reference: torch.Tensor,
    cost: tuple[int, int],
    providers: Sequence[Provider],
    peaks: DevicePeaks,
    baseline: str,
    timer_kw: dict | None = None,
) -> list[Row]:
    """Check, then time, every provider on one case; one Row each."""
    rows: list[Row] = []
    rel_bound, max_bound = ERROR_BOUNDS[dtype]
    dtype_name = str(dtype).replace("torch.", "")
    for prov in providers:
        row = Row(op=op, provider=prov.name, device=device.type, dtype=dtype_name, shape=shape)
        row.flops, row.bytes = prov.cost(inputs) if prov.cost else cost
        row.err_bound = rel_bound
        rows.append(row)
        try:
            fn = prov.build(inputs)
            out = fn()
        except ProviderSkip as e:
            row.status = f"skipped: {e}"
            continue
        except Exception as e:  # a provider that should run but raises is broken
            row.status = f"FAILED: raised {type(e).__name__}: {_one_line(e)}"
            continue
        try:
            row.rel_err, row.max_err = compare(out, reference)
        except ValueError as e:
            row.status = f"FAILED: {e}"
            continue
        if out.dtype != dtype:
            row.status = f"FAILED: output dtype {out.dtype} != {dtype}"
            continue
        if not (row.rel_err <= rel_bound and row.max_err <= max_bound):
            row.status = (
                f"FAILED: rel_err {row.rel_err:.3g} (bound {rel_bound:g}), "
                f"max_err {row.max_err:.3g} (bound {max_bound:g})"
            )
            continue
        del out
        med, p20, p80, n, how = time_fn(fn, device, **(timer_kw or {}))
        row.ms_median, row.ms_p20, row.ms_p80, row.n_runs, row.timing = med, p20, p80, n, how
        row.roofline_ms = roofline_time(row.flops, row.bytes, peaks) * 1e3
    base = next((r for r in rows if r.provider == baseline and r.ok), None)
    for r in rows:
        r.baseline = baseline
        if base is not None and r.ok:
            r.speedup = base.ms_median / r.ms_median
    return rows


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


def csv_columns(rows: Sequence[Row]) -> list[str]:
    shape_keys: list[str] = []
    for r in rows:
        shape_keys += [k for k in r.shape if k not in shape_keys]
    return (
        ["op", "provider", "status", "device", "dtype", *shape_keys]
        + METRIC_COLUMNS
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
) -> Path:
    """Write rows (metadata and the row's dtype peaks on every line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = csv_columns(rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow(row_dict(r, meta, peaks_by_dtype.get(r.dtype)))
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
