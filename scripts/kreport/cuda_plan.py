"""The CUDA launches of the headline shapes, from the real launch code.

The launch API of each kernel family (csrc/cuda/*.cu, torch-free) decides grid, block, dynamic
shared memory and template instance; the CPU emulation (tests/cuda_emulation) compiles it with
g++, and its plan mode (``EMU_PLAN_ONLY=1``) records every launch instead of running it. This
module feeds each family's driver one case per (headline shape, driver path) and names each
recorded kernel by its symbol: the plan line carries the kernel's address, `nm` of the binary the
symbol at that address, which demangles to the same name as the sm_90a kernel in cuobjdump.

Which path the torch op takes (csrc/cuda/*_cuda.cpp picks, e.g. gemv at M <= 16) is host code that
needs torch and a GPU; `HOST_PATH` restates that rule to mark the row the op runs. Every path the
driver offers (its "Case keys: path=a|b" comment) is planned anyway, so the spill check covers
every kernel a headline shape can launch even if the restatement falls behind.

A new family needs its driver in tests/cuda_emulation/build.py (plan mode comes with
driver_common.h) and a line in `DRIVER_CASE` / `HOST_PATH` here.
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


def _lowrank_case(case: Case, path: str) -> str:
    p = case.params
    # dx = lowrank(dy, Vᵀ, Uᵀ): (M, out) -> (M, in); the CUDA op makes Vᵀ and Uᵀ contiguous
    n_in, n_out, bias = (p["out"], p["in"], 0) if case.op == "dx" else (p["in"], p["out"], 1)
    return f"path={path} dtype=bf16 M={p['M']} in={n_in} out={n_out} rank={p['rank']} bias={bias}"


def _int8_case(case: Case, path: str) -> str:
    p = case.params
    d = "dir=tr bias=0" if case.op == "grad_input" else "dir=fwd bias=1"
    return f"path={path} dtype=bf16 {d} M={p['M']} N={p['N']} K={p['K']} group={p['group']}"


# family -> (case, driver path) -> the driver's case line
DRIVER_CASE = {"lowrank": _lowrank_case, "int8": _int8_case}

# family -> case -> the driver path the CUDA op takes on an sm_90 device for bf16 inputs, as
# csrc/cuda/lowrank_cuda.cpp and int8_cuda.cpp choose it (restated: that code needs torch).
HOST_PATH = {
    "lowrank": lambda c: "fused" if c.params["M"] > 16 and c.params["rank"] <= 512 else "gemv",
    "int8": lambda c: "tc" if c.params["M"] > 16 else "gemv",
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


def driver_paths(driver: Path) -> list[str]:
    """The paths a driver documents in its header ("Case keys: path=fused|gemv ...")."""
    m = re.search(r"Case keys:[^\n]*?\bpath=([\w|]+)", driver.read_text())
    return m.group(1).split("|") if m else []


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
    for family, fam in build.FAMILIES.items():
        fam_cases = [c for c in cases if c.family == family and "cuda" in c.backends]
        if family not in DRIVER_CASE:
            notes.append(f"{family}: an emulation driver exists but no headline cases are defined")
            continue
        if not fam_cases:
            continue
        paths = driver_paths(build.DRIVERS / fam.driver)
        if not paths:
            notes.append(f"{family}: the driver documents no path=... key")
            continue
        host = HOST_PATH.get(family)
        for c in fam_cases:
            if host is not None and host(c) not in paths:
                notes.append(f"{family}: host path {host(c)!r} is not a driver path {paths}")
                break
        binary = build.build(family, "asan")
        binaries[family] = str(binary)
        jobs = [(c, p, DRIVER_CASE[family](c, p)) for c in fam_cases for p in paths]
        work.append((family, host, binary, jobs))
    with ThreadPoolExecutor(max_workers=max(1, len(work))) as pool:  # one process per family
        runs = list(pool.map(lambda w: _run_driver(w[2], [ln for *_, ln in w[3]]), work))
    for (family, host, binary, jobs), results in zip(work, runs, strict=True):
        symbols = _symbols(binary)
        anchor_addr = next((a for a, n in symbols.items() if n == _ANCHOR), None)
        if anchor_addr is None:
            raise RuntimeError(f"{binary}: no symbol {_ANCHOR}")
        raw = []
        for (c, p, line), (_, ok, status, recs) in zip(jobs, results, strict=True):
            if not ok:
                failures.append(f"{family} {line}: {status}")
                continue
            for r in recs:
                addr = int(r["fn"], 16) - int(r["anchor"], 16) + anchor_addr
                raw.append((c, p, r, symbols.get(addr, f"<unknown symbol at {addr:#x}>")))
        names = sass.demangle([s for *_, s in raw])
        for c, p, r, sym in raw:
            launches.append(
                Launch(
                    case=c.id,
                    family=family,
                    path=p,
                    host_path=host is None or host(c) == p,
                    source_name=r["name"],
                    symbol=sym,
                    demangled=names.get(sym, sym),
                    grid=tuple(int(g) for g in r["grid"].split(",")),
                    block=int(r["block"]),
                    dynamic_smem=int(r["smem"]),
                )
            )
    return Plan(launches, failures, notes, binaries)
