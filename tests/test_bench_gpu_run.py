"""scripts/gpu_run.sh: its dry run (every step's CPU path) produces the one archive and the
summary, and its compute-sanitizer filter selects every kernel of the library."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import sanitize  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LRKERNELS_TORCH") == "oldest",
    reason="a check of the script, not of torch: scripts/test.sh runs it once, in the newest env",
)
def test_dry_run_writes_one_archive_and_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "LRKERNELS_COMMIT": "0123abc"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_run.sh"), "--dry-run", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,  # a minute or two on CI's idle cores; much more on a crowded machine
        check=False,
    )
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert res.returncode == 0, f"{res.stdout[-4000:]}\n{res.stderr[-2000:]}\n{summary}"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_run.tar.gz", "summary.txt"]
    assert "commit: 0123abc" in summary and "ALL STEPS PASSED" in summary
    for step in ["headline-lowrank", "headline-int8", "headline-lora", "headline-attn",
                 "tests-collect"]:  # fmt: skip
        assert re.search(rf"^PASS\s+{step}\s", summary, re.M), step
    for step in ["sanitizer-memcheck", "sweep-lowrank", "sweep-int8", "sweep-lora", "sweep-attn",
                 "table"]:  # fmt: skip
        assert re.search(rf"^PASS\s+{step}\s", summary, re.M), step
    for name in ("lowrank_linear", "int8_linear", "lora_linear", "block_sparse_attention"):
        assert f"{name} headline on" in summary  # each family's headline rows
    assert "lowrank targets (issue 9" in summary and "int8 targets (issue 8)" in summary
    assert "LoRA targets (issue 11" in summary
    assert (
        "would run PYTORCH_NO_CUDA_MEMORY_CACHING=1"
        in (
            tarfile.open(out / "gpu_run.tar.gz")
            .extractfile("gpu_run/sanitizer-memcheck.log")
            .read()
        ).decode()
    )
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        names = set(tar.getnames())
        for f in ["summary.txt", "headline.txt", "dispatch_table.json", "dispatch_table.txt"]:
            assert f"gpu_run/{f}" in names, f
        for f in ["lowrank-cpu.csv", "int8-cpu.csv", "lora-cpu.csv", "attn-cpu.csv"]:
            assert f"gpu_run/results/{f}" in names, f
        table = json.load(tar.extractfile("gpu_run/dispatch_table.json"))
    ops = {r["op"] for r in table["rows"]}
    assert ops == {
        "lowrank_linear", "int8_linear", "lora_linear", "lora_linear_multi",
        "block_sparse_attention",
    }  # fmt: skip
    assert all(r["order"][-1] == "torch" and r["device"].startswith("cpu:") for r in table["rows"])
    assert all(r["source"]["commit"].startswith("0123abc") for r in table["rows"])


def test_script_parses():
    script = ROOT / "scripts" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(script)], check=False).returncode == 0


def test_sanitizer_filter_selects_every_kernel_of_the_library():
    """compute-sanitizer checks only the kernels whose mangled names match the regex: it must
    match every CUDA kernel of the built extension (their host stubs name them) and every
    Triton kernel (named after its function), and none of torch's."""
    regex = re.compile(sanitize.KERNEL_REGEX)
    kernels = []
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        src = path.read_text()
        kernels += re.findall(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", src)
    assert kernels, "no Triton kernels found"
    so = sorted((ROOT / "lrkernels").glob("_C*.so"))
    if so and shutil.which("nm"):
        syms = subprocess.run(["nm", str(so[0])], capture_output=True, text=True).stdout
        kernels += sorted(set(re.findall(r"__device_stub__(\w+)", syms)))
    missed = [k for k in kernels if not regex.search(k)]
    assert not missed, f"{sanitize.KERNEL_REGEX!r} misses {missed}"
    for torch_kernel in ["_ZN2at6native29vectorized_elementwise_kernel", "triton_poi_fused_0"]:
        assert not regex.search(torch_kernel)
