"""Runs the test suite as several concurrent pytest processes (shards of test files), so that a
2-core CI machine keeps both cores busy: one pytest process is single-threaded most of the time
(the Triton interpreter, g++ compiling one emulation binary at a time).

    python scripts/run_pytest.py [--jobs N] [pytest args...] [tests]

Files are assigned greedily, heaviest first, to the least loaded shard. Weights are measured
seconds on the CI machine's class of hardware where known (WEIGHTS), else the file's size as a
proxy. The CUDA emulation files and the static kernel report stay in one shard: the report reuses
the emulation binaries that shard builds (tests/cuda_emulation's cache), and two shards building
the same binary would do the work twice. Each shard has its own --basetemp; its output goes to a
log (build/pytest-shards/, with a JUnit XML of per-test times to refresh WEIGHTS) printed after
it ends. Exit status: the first nonzero shard's, else 0. With explicit test paths or -k / -m selections, or --jobs 1, it is plain pytest.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# Seconds per file measured in CI conditions (2 cores), rounded: only the heavy ones matter.
WEIGHTS = {
    "test_cuda_emulation.py": 330,
    "test_cuda_emulation_attention.py": 280,
    "test_lora_cuda_emulation.py": 100,
    "test_kernel_report.py": 100,
    "test_bench_gpu_run.py": 125,
    "test_import_time.py": 80,
    "test_attention.py": 90,
    "test_compile.py": 60,
    "test_int8.py": 60,
}
# Files that share one shard (the report reuses the emulation's binaries).
TOGETHER = ("cuda_emulation", "test_kernel_report.py")


def _weight(path: Path) -> float:
    return WEIGHTS.get(path.name, path.stat().st_size / 2000)


def shards(files: list[Path], jobs: int) -> list[list[Path]]:
    units: list[list[Path]] = []
    grouped = [f for f in files if any(t in f.name for t in TOGETHER)]
    if grouped:
        units.append(grouped)
    units += [[f] for f in files if f not in grouped]
    units.sort(key=lambda u: -sum(_weight(f) for f in u))
    out: list[list[Path]] = [[] for _ in range(jobs)]
    load = [0.0] * jobs
    for unit in units:
        i = load.index(min(load))
        out[i] += unit
        load[i] += sum(_weight(f) for f in unit)
    return [s for s in out if s]


def file_seconds(xml_files: list[Path]) -> dict[str, float]:
    """Seconds per test file from the shards' JUnit XML (what WEIGHTS is refreshed from)."""
    out: dict[str, float] = collections.defaultdict(float)
    for path in xml_files:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        for case in root.iter("testcase"):
            name = case.get("classname", "").split(".")[-1] + ".py"
            out[name] += float(case.get("time", 0) or 0)
    return dict(out)


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("LRKERNELS_TEST_JOBS", 0)))
    ours, pytest_args = parser.parse_known_args()
    # Twice the cores: a shard whose weight was underestimated then still shares the machine
    # with the others instead of running alone on one core at the end.
    jobs = ours.jobs or min(2 * (os.cpu_count() or 1), 4)
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs"]
    selects = any(a in ("-k", "-m") or a.startswith(("-k", "-m")) for a in pytest_args)
    paths = [a for a in pytest_args if not a.startswith("-") and Path(a).exists()]
    if jobs <= 1 or selects or [p for p in paths if Path(p).resolve() != TESTS]:
        return subprocess.call(base + pytest_args, cwd=ROOT)
    options = [a for a in pytest_args if a not in paths]
    ignored = {(ROOT / a.split("=", 1)[1]).resolve() for a in options if a.startswith("--ignore=")}
    globs = [a.split("=", 1)[1] for a in options if a.startswith("--ignore-glob=")]
    files = [
        f
        for f in sorted(TESTS.glob("test_*.py"))
        if f.resolve() not in ignored and not any(f.match(g) for g in globs)
    ]
    logs = ROOT / "build" / "pytest-shards"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("shard-*"):
        old.unlink()
    procs = []
    start = time.time()
    for i, shard in enumerate(shards(files, jobs)):
        log = open(logs / f"shard-{i}.log", "w")  # noqa: SIM115 (closed below)
        extra = [f"--basetemp={logs / f'tmp-{i}'}", f"--junitxml={logs / f'shard-{i}.xml'}"]
        cmd = base + options + extra + [str(f) for f in shard]
        procs.append((i, shard, log, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)))
    status = 0
    for i, shard, log, proc in procs:
        rc = proc.wait()
        log.close()
        text = (logs / f"shard-{i}.log").read_text(errors="replace")
        names = " ".join(f.name.removeprefix("test_").removesuffix(".py") for f in shard)
        print(f"== shard {i} ({names}): exit {rc}, done after {time.time() - start:.0f} s")
        print(text, flush=True)
        status = status or rc
    times = sorted(file_seconds(sorted(logs.glob("shard-*.xml"))).items(), key=lambda t: -t[1])
    print("== slowest test files (s): " + ", ".join(f"{n} {t:.0f}" for n, t in times[:12]))
    return status


if __name__ == "__main__":
    sys.exit(main())
