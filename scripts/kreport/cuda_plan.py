"""The CUDA launches of the headline shapes, from the real launch code.

The launch API of each kernel family (csrc/cuda/*.cu, torch-free) decides grid, block, dynamic
shared memory and template instance; the CPU emulation (tests/cuda_emulation) compiles it with
g++, and its plan mode (``EMU_PLAN_ONLY=1``) records every launch instead of running it. This
module feeds each family's driver one case per (headline shape, driver path) and names each
recorded kernel by its symbol: the plan line carries the kernel's address, `nm` of the binary the
symbol at that address, which demangles to the same name as the sm_90a kernel in cuobjdump.

Which path the torch op takes is decided partly in the launch API (lowrank's plan_lowrank:
driver path=auto runs it as csrc/cuda/lowrank_cuda.cpp does) and partly in host code that needs
torch and a GPU (int8: `lrkernels.ops.int8.cuda_path`, kernel or dequantize + cuBLAS; LoRA:
lora_cuda.cpp's routes); `HOST_PATH` marks the row the op runs. The other paths a
headline shape can take (`DRIVER_CASES`: lowrank forced to tc or gemv, int8's other path) are
planned too, so the spill check covers every kernel such a shape can launch.

A new family needs its driver in tests/cuda_emulation/build.py (plan mode comes with
driver_common.h: a driver must construct its Checker after its launches and skip its reference
when drv::plan_only()) and a line in `DRIVER_CASES` / `HOST_PATH` here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import sass
from .headline import Case

REPO = Path(__file__).resolve().parents[2]


def _lowrank_lines(case: Case) -> list[tuple[str, str]]:
    """The op's own plan (path=auto: plan_lowrank, as csrc/cuda/lowrank_cuda.cpp calls it) and
    each path forced."""
    p = case.params
    if case.op == "dx":  # dx = lowrank(dy, Vᵀ, Uᵀ): (M, out) -> (M, in)
        shape = f"M={p['M']} in={p['out']} out={p['in']} rank={p['rank']} bias=0"
        views = " vt=1 ut=1"  # transposed views, read in place on the tensor-core path (the
    else:  # gemv path gets them contiguous: lowrank_cuda.cpp copies)
        shape = f"M={p['M']} in={p['in']} out={p['out']} rank={p['rank']} bias=1"
        views = ""
    return [
        (path, f"path={path} dtype=bf16 {shape}{'' if path == 'gemv' else views}")
        for path in ("auto", "tc", "gemv")
    ]


def _int8_lines(case: Case) -> list[tuple[str, str]]:
    """The tensor-core kernel (op=mma, its own plan) at every M, and where the op dequantizes
    once + cuBLAS instead (large M), the dequantize kernel."""
    p = case.params
    d = "dir=tr bias=0" if case.op == "grad_input" else "dir=fwd bias=1"
    lines = [("mma", f"op=mma dtype=bf16 {d} M={p['M']} N={p['N']} K={p['K']} group={p['group']}")]
    if _int8_host(case) == "dequant+cuBLAS":
        lines.append(
            (
                "dequant+cuBLAS",
                f"op=dequant dtype=bf16 N={p['N']} K={p['K']} group={p['group']}"
                + (" smajor=g" if p["group"] else ""),
            )  # packed scales are group-major
        )
    return lines


def _attention_lines(case: Case) -> list[tuple[str, str]]:
    """One launch API per pass; the layout as lrkernels.masks.local_window_layout builds it (one
    list set shared by batch and heads, full blocks listed apart)."""
    p = case.params
    left, right = p["window"]
    return [(case.op, f"path={case.op} dtype=bf16 B={p['B']} Hq={p['H']} Hkv={p['H']} "
             f"Sq={p['S']} Sk={p['S']} D={p['D']} bq={p['block']} bk={p['block']} "
             f"win={left}:{right} layout=window full=1 bcast=1")]  # fmt: skip


def _lora_lines(case: Case) -> list[tuple[str, str]]:
    """csrc/cuda/lora_cuda.cpp: the shrink, then the tensor-core GEMM with the adapter in its
    epilogue (`fused`: an int8 base below 512 rows, packed as Int8Linear holds it on CUDA; a
    dense one at 17-1024 rows); M <= 16 otherwise the shrink + fused GEMV (a plain int8 base
    too: planned as the other path of the int8 decode row); above, the base by cuBLAS (or
    int8_linear), then shrink + expand (many adapters) or the dropout mask + cuBLAS (one)."""
    from lrkernels.ops.lora import CUDA_DENSE_FUSED_MAX_ROWS, DEQUANT_MATMUL_MIN_ROWS

    p = case.params
    shape = f"dtype=bf16 M={p['M']} N={p['N']} K={p['K']} R={p['rank']}"
    base = f"base={p['base']} group=0"
    line = f"{shape} {base} n={p['adapters']}"
    int8 = p["base"] == "int8"
    fused_rows = DEQUANT_MATMUL_MIN_ROWS - 1 if int8 else CUDA_DENSE_FUSED_MAX_ROWS
    if int8 and p["M"] <= fused_rows:
        lines = [("fused", f"path=fused {line}")]
        return lines + ([("gemv", f"path=gemv {line}")] if p["M"] <= 16 else [])
    if p["M"] <= 16:
        return [("gemv", f"path=gemv {line}")]
    if p["M"] <= fused_rows:
        return [("fused", f"path=fused {line}")]
    if p["adapters"]:
        return [("expand", f"path=expand {line}")]
    return [("mask+cuBLAS", f"path=mask {shape}")]


# family -> case -> [(path, driver case line)], the paths a headline shape can take
DRIVER_CASES = {
    "lowrank": _lowrank_lines,
    "int8": _int8_lines,
    "attention": _attention_lines,
    "lora": _lora_lines,
}


def _int8_host(case: Case, paths: list[str] | None = None) -> str:
    import torch

    from lrkernels.ops.int8 import cuda_path  # the op's own rule (kernel below M = 512)

    p = case.params
    rule = cuda_path(p["M"], p["N"], p["K"], torch.bfloat16, transposed=case.op == "grad_input")
    return "mma" if rule == "kernel" else "dequant+cuBLAS"


# family -> (case, planned paths) -> the path the CUDA op takes for bf16 on an H200 ("auto": the
# launch API plans itself, and the forced path whose launches equal it names the row; "torch":
# none of this family's kernels, every planned path is listed as not taken).
HOST_PATH = {
    "lowrank": lambda c, paths: "torch" if c.torch_reason("cuda") else "auto",
    "int8": _int8_host,
    "attention": lambda c, paths: paths[0],
    "lora": lambda c, paths: paths[0],
}


@dataclasses.dataclass
class Launch:
    case: str  # Case.id
    family: str
    path: str
    host_path: bool  # the path the torch op takes
    source_name: str  # the kernel expression at the launch site
    symbol: str  # mangled (g++)
    demangled: str
    grid: tuple[int, int, int]
    block: int
    dynamic_smem: int


@dataclasses.dataclass
class Plan:
    launches: list[Launch]
    failures: list[str]  # driver cases that did not plan (launch rejected, unknown path...)
    notes: list[str]  # families without driver or cases, etc.
    binaries: dict[str, str]


_PLAN = re.compile(
    r"^plan kernel=(?P<name>.*) fn=(?P<fn>0x[0-9a-f]+) anchor=(?P<anchor>0x[0-9a-f]+) "
    r"grid=(?P<grid>\d+,\d+,\d+) block=(?P<block>\d+) smem=(?P<smem>\d+)$"
)
_ANCHOR = "_ZN3emu12launch_countEv"  # emu::launch_count(), the plan line's anchor


def _emulation():
    sys.path.insert(0, str(REPO / "tests"))
    from cuda_emulation import build

    return build


def _symbols(binary: Path) -> dict[int, str]:
    out = subprocess.run(["nm", "--defined-only", str(binary)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nm {binary}: {out.stderr[-500:]}")
    table: dict[int, str] = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            table.setdefault(int(parts[0], 16), parts[2])
    return table


def _run_driver(binary: Path, lines: list[str]) -> list[tuple[str, bool, str, list[dict]]]:
    """(case line, ok, status text, plan records) per line, in order."""
    env = {
        **os.environ,
        "EMU_PLAN_ONLY": "1",
        "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=0",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    proc = subprocess.run(
        [str(binary)], input="\n".join(lines) + "\n", capture_output=True, text=True, env=env,
        timeout=900,
    )  # fmt: skip
    results, pending = [], []
    for out_line in proc.stdout.splitlines():
        m = _PLAN.match(out_line)
        if m:
            pending.append(m.groupdict())
        elif out_line.startswith(("ok ", "FAIL ")):
            ok = out_line.startswith("ok ")
            case_line, _, status = out_line.split(" ", 1)[1].partition(" | ")
            results.append((case_line, ok, status, pending))
            pending = []
    if len(results) < len(lines):
        missing = lines[len(results)]
        raise RuntimeError(
            f"{binary.name} stopped (exit {proc.returncode}) at: {missing}\n{proc.stderr[-3000:]}"
        )
    return results


def _signature(rows: list[Launch]) -> list[tuple]:
    return [(r.symbol, r.grid, r.block, r.dynamic_smem) for r in rows]


def _merge_paths(family: str, case: Case, by_path: dict[str, list[Launch]], host: str):
    """The case's rows: the host path's launches (host_path=True) and every other path whose
    launches differ from them. A self-planning host path ("auto") takes the name of the forced
    path it equals."""
    ref = host if host in by_path else "auto"  # "torch": dedupe against the kernels' own plan
    ref_rows = by_path.get(ref, [])
    out = []
    for path, rows in by_path.items():
        if path == ref:
            continue
        if rows and _signature(rows) == _signature(ref_rows):
            if ref == "auto":
                for r in ref_rows:
                    r.path = path
            continue
        out += rows
    return ref_rows + out


def plan(cases: list[Case]) -> Plan:
    """Plans every CUDA headline case through the emulation drivers. Raises
    cuda_emulation.build.BuildUnavailable when g++ or the CUDA headers are missing."""
    build = _emulation()
    launches: list[Launch] = []
    failures: list[str] = []
    notes: list[str] = []
    binaries: dict[str, str] = {}
    work = []
    wanted = {c.family for c in cases if "cuda" in c.backends}
    for family in sorted(wanted - set(build.FAMILIES)):
        notes.append(
            f"{family}: no CPU-emulation driver (tests/cuda_emulation/build.py FAMILIES), so no "
            "launch configuration; its kernels are listed from cuobjdump only"
        )
    for family in sorted(wanted & set(build.FAMILIES)):
        if family not in DRIVER_CASES:
            notes.append(f"{family}: an emulation driver exists but no headline cases are defined")
            continue
        fam_cases = [c for c in cases if c.family == family and "cuda" in c.backends]
        routed = [(c.id, c.torch_reason("cuda")) for c in fam_cases if c.torch_reason("cuda")]
        if routed:
            notes.append(
                f"CUDA {family}: {routed[0][1]} ({len(routed)} headline cases); their rows, "
                "under paths the op does not take, are the kernels it would launch"
            )
        binary = build.build(family, "asan")
        binaries[family] = str(binary)
        jobs = [(c, path, line) for c in fam_cases for path, line in DRIVER_CASES[family](c)]
        work.append((family, binary, jobs))
    with ThreadPoolExecutor(max_workers=max(1, len(work))) as pool:  # one process per family
        runs = list(pool.map(lambda w: _run_driver(w[1], [ln for *_, ln in w[2]]), work))
    for (family, binary, jobs), results in zip(work, runs, strict=True):
        symbols = _symbols(binary)
        anchor_addr = next((a for a, n in symbols.items() if n == _ANCHOR), None)
        if anchor_addr is None:
            raise RuntimeError(f"{binary}: no symbol {_ANCHOR}")
        raw = []
        for (c, path, line), (_, ok, status, recs) in zip(jobs, results, strict=True):
            if not ok:
                failures.append(f"{family} {line}: {status}")
                continue
            for r in recs:
                addr = int(r["fn"], 16) - int(r["anchor"], 16) + anchor_addr
                raw.append((c, path, r, symbols.get(addr, f"<unknown symbol at {addr:#x}>")))
        names = sass.demangle([s for *_, s in raw])
        per_case: dict[str, tuple[Case, dict[str, list[Launch]]]] = {}
        for c, path, r, sym in raw:
            rows = per_case.setdefault(c.id, (c, {}))[1].setdefault(path, [])
            rows.append(
                Launch(
                    case=c.id,
                    family=family,
                    path=path,
                    host_path=False,
                    source_name=r["name"],
                    symbol=sym,
                    demangled=names.get(sym, sym),
                    grid=tuple(int(g) for g in r["grid"].split(",")),
                    block=int(r["block"]),
                    dynamic_smem=int(r["smem"]),
                )
            )
        for c, by_path in per_case.values():
            host = HOST_PATH[family](c, list(by_path))
            for r in by_path.get(host, []):
                r.host_path = True
            launches += _merge_paths(family, c, by_path, host)
    return Plan(launches, failures, notes, binaries)
