"""The static kernel report (scripts/kernel_report.py, bench/results/kernel_report.md) in CI.

Regenerates the report's launches and kernels from the current code and fails when

- a kernel that a headline shape launches (CUDA: any path of the emulation driver; Triton: the
  launchers' configurations, compiled for sm_90 by the installed triton) has a local load or
  store in its SASS — a register spill;
- a headline shape cannot be planned, or a launched CUDA kernel is not in the built extension;
- the committed bench/results/kernel_report.json no longer matches the launches the code makes
  (regenerate it with ``python scripts/kernel_report.py``).

The CUDA side needs the extension built with sm_90a, cuobjdump (CUDA toolkit, the
nvidia-cuda-cuobjdump wheel or Triton's copy), g++ and the CUDA headers (the emulation); it does
not depend on torch, so scripts/test.sh runs it on the newest torch only (LRKERNELS_TORCH=oldest
skips it). The Triton side runs on every torch: the oldest is the GPU machine's triton 3.6.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import kernel_report  # noqa: E402
from kreport import device, headline, sass  # noqa: E402

COMMITTED = REPO / "bench" / "results" / "kernel_report.json"
REGENERATE = "regenerate it: python scripts/kernel_report.py"


def _cuda_expected() -> bool:
    return os.environ.get("LRKERNELS_EXPECT_CUDA_BUILD") == "1"


@pytest.fixture(scope="module")
def sides() -> tuple[dict | str, dict | str]:
    """(CUDA side, Triton side) of a regenerated report, or the reason one is skipped. The
    Triton side compiles in a subprocess while this process plans the CUDA side."""
    job = kernel_report.TritonJob(sys.executable)
    try:
        if os.environ.get("LRKERNELS_TORCH") == "oldest":
            cuda = "the CUDA side does not depend on torch: checked on the newest torch"
        else:
            cuda = kernel_report.cuda_part(headline.cases())
    finally:
        triton = job.result()
    if isinstance(cuda, dict):
        reason = cuda["status"] if cuda["status"] != "ok" else cuda.get("plan_status", "ok")
        if reason != "ok":
            if _cuda_expected() and "emulation unavailable" not in reason:
                cuda = f"FAIL: CUDA build expected, but the report's CUDA side was {reason}"
            else:
                cuda = reason
    if triton["status"] != "ok" and triton["status"].startswith("skipped"):
        triton = triton["status"]
    return cuda, triton


def _side(value):
    if isinstance(value, str):
        if value.startswith("FAIL: "):
            pytest.fail(value[6:])
        pytest.skip(value)
    return value


@pytest.fixture(scope="module")
def cuda_side(sides) -> dict:
    return _side(sides[0])


@pytest.fixture(scope="module")
def triton_side(sides) -> dict:
    return _side(sides[1])


@pytest.mark.slow  # regenerates the report once per module: ~1-1.5 min on 2 cores
def test_cuda_headline_kernels_do_not_spill(cuda_side):
    assert not cuda_side["errors"], "\n".join(cuda_side["errors"])
    bad = kernel_report.gate(kernel_report.spills({"cuda": cuda_side, "triton": {}}))
    assert not bad, "spills in CUDA kernels launched by headline shapes:\n" + "\n".join(bad)


@pytest.mark.slow  # regenerates the report once per module: ~1-1.5 min on 2 cores
def test_triton_headline_kernels_do_not_spill(triton_side):
    assert not triton_side["errors"], "\n".join(triton_side["errors"])
    bad = kernel_report.gate(kernel_report.spills({"cuda": {}, "triton": triton_side}))
    assert not bad, "spills in Triton kernels launched by headline shapes:\n" + "\n".join(bad)


@pytest.mark.slow  # regenerates the report once per module: ~1-1.5 min on 2 cores
def test_every_cuda_headline_case_launches(cuda_side):
    host = collections.Counter(ln["case"] for ln in cuda_side["launches"] if ln["host_path"])
    any_path = collections.Counter(ln["case"] for ln in cuda_side["launches"])
    planned = {ln["family"] for ln in cuda_side["launches"]}
    cases = [c for c in headline.cases() if "cuda" in c.backends and c.family in planned]
    # where the op itself runs torch's matmuls (its crossover), the kernels it would launch
    missing = [c.id for c in cases if not (any_path if c.torch_reason("cuda") else host)[c.id]]
    assert not missing, f"CUDA cases without a launch on the host path: {missing}"
    for ln in cuda_side["launches"]:
        assert ln["blocks_per_sm"] >= 1, f"{ln} cannot run on an H200"


@pytest.mark.slow  # regenerates the report once per module: ~1-1.5 min on 2 cores
def test_every_triton_headline_case_launches(triton_side):
    launched = collections.Counter(ln["case"] for ln in triton_side.get("launches", []))
    missing = [c.id for c in headline.cases() if "triton" in c.backends and not launched[c.id]]
    assert not missing, f"Triton cases without a launch: {missing}"
    for ln in triton_side["launches"]:
        assert ln["blocks_per_sm"] >= 1, f"{ln} cannot run on an H200"


def _cuda_plan(part: dict) -> list:
    return sorted(
        (ln["case"], ln["path"], ln["kernel"], tuple(ln.get("grid", ())), ln.get("block"),
         ln.get("dynamic_smem"))
        for ln in part.get("launches", [])
    )  # fmt: skip


def _triton_plan(part: dict) -> list:
    out = []
    for ln in part.get("launches", []):
        k = part["kernels"][ln["compiled"]]
        cfg = json.dumps(ln["constexprs"], sort_keys=True)
        out.append((ln["case"], ln["phase"], ln["kernel"], tuple(ln["grid"]), cfg,
                    k["num_warps"], k["num_stages"]))  # fmt: skip
    return sorted(out)


def _committed() -> dict:
    if not COMMITTED.is_file():
        pytest.fail(f"{COMMITTED.relative_to(REPO)} is missing; {REGENERATE}")
    return json.loads(COMMITTED.read_text())


@pytest.mark.slow  # regenerates the report once per module: ~1-1.5 min on 2 cores
def test_committed_report_has_the_current_cuda_launches(cuda_side):
    committed = _committed()["cuda"]
    assert _cuda_plan(committed) == _cuda_plan(cuda_side), (
        f"the CUDA launches of the headline shapes changed since the report was made; {REGENERATE}"
    )


@pytest.mark.slow  # regenerates the report once per module: ~1-1.5 min on 2 cores
def test_committed_report_has_the_current_triton_launches(triton_side):
    committed = _committed()["triton"]
    assert _triton_plan(committed) == _triton_plan(triton_side), (
        f"the Triton launches of the headline shapes changed since the report was made; "
        f"{REGENERATE}"
    )


# ------------------------------------------------------------------ the model, without tools


@pytest.mark.parametrize(
    "threads, regs, static, dynamic, blocks, limiter",
    [
        (256, 32, 0, 0, 8, "threads"),  # 2048 threads per SM
        (256, 128, 0, 0, 2, "regs"),  # 128 regs x 256 threads = half the register file
        (256, 168, 0, 0, 1, "regs"),  # 168 x 32 = 5376 per warp: 3 warps per sub-partition
        (128, 168, 0, 0, 3, "regs"),  # 4 warps per block: 12 warps fit
        (128, 255, 0, 0, 2, "regs"),  # 8192 regs per warp (255 rounds to 256): 2 per sub-part.
        (256, 64, 0, 100 * 1024, 2, "smem"),  # 101 KiB with the reservation: 2 in 228 KiB
        (256, 64, 0, 227 * 1024, 1, "smem"),  # the opt-in maximum still fits once
        (256, 64, 0, 227 * 1024 + 1, 0, "smem"),  # beyond it the launch fails
        (32, 16, 0, 0, 32, "blocks"),  # at most 32 blocks per SM
        (1024, 65, 0, 0, 0, "regs"),  # 72 x 32 x 32 warps > 65536: the launch fails
    ],
)
def test_occupancy_model(threads, regs, static, dynamic, blocks, limiter):
    occ = device.occupancy(threads, regs, static, dynamic)
    assert occ.blocks_per_sm == blocks and limiter in occ.limiter.split("/"), occ


def test_waves():
    assert device.waves((132, 1, 1), 1) == 1.0
    assert device.waves((64, 2, 1), 2) == pytest.approx(128 / 264)
    assert device.waves((1, 1, 1), 0) is None


SASS_SAMPLE = """
        Function : _Z6kernelPf
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1+0x4], R2 ;
        /*0020*/               @P0 LDL R3, [R1+0x4] ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0040*/              @!P1 LDGSTS.E.BYPASS.128 [R5], desc[UR6][R2.64] ;
        /*0050*/                   LDSM.16.M88.4 R8, [R9] ;
        Function : _Z5otherv
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
"""


def test_instruction_classes():
    counts = sass.count_instructions(SASS_SAMPLE)
    assert counts["_Z6kernelPf"] == {"STL": 1, "LDL": 1, "HGMMA": 1, "LDGSTS": 1, "LDSM": 1}
    assert sass.flags(counts["_Z6kernelPf"]) == {
        "mma": "HGMMA", "ldsm": "LDSM", "async": "LDGSTS", "local": "1/1"
    }  # fmt: skip
    assert sass.flags(counts["_Z5otherv"])["mma"] == "HMMA"


def test_short_names():
    name = (
        "void lrkernels::cuda::(anonymous namespace)::fused_kernel<__nv_bfloat16, 64, true>"
        "(lrkernels::cuda::(anonymous namespace)::Params<__nv_bfloat16>)"
    )
    assert sass.short_name(name) == "fused_kernel<bf16,64,true>"
    assert sass.short_name("void k<__half>(__half const*, int)") == "k<fp16>"
    assert sass.static_smem({"SHARED": 1024}) == 0 and sass.static_smem({"SHARED": 0}) == 0
    assert sass.static_smem({"SHARED": 31744}) == 30720


def test_headline_floors():
    cases = {c.id: c for c in headline.cases()}
    # 4096->4096 r=128 M=1: V, U and x read once (bf16), y written: memory-bound, ~0.98 us
    c = cases["lowrank fwd 4096->4096 r=128 M=1"]
    flops, nbytes = c.cost()
    assert nbytes == 2 * (4096 + 128 * 4096 + 4096 * 128 + 4096 + 4096)
    assert c.expectation().startswith("memory-bound")
    assert cases["attn fwd local c512 S=16384 D=128 B=2 H=16"].expectation().startswith("compute")


def test_spill_gate_flags_local_memory():
    """The gate the CI tests apply: any LDL/STL in a launched kernel, CUDA or Triton, any triton."""
    clean, spilled = {"LDGSTS": 4}, {"STL": 2, "LDL": 3}
    cuda = {
        "kernels": {"k1": {"short": "k1", "stack": 0, "counts": clean},
                    "k2": {"short": "k2", "stack": 16, "counts": spilled}},
        "launches": [{"kernel": "k1", "case": "c", "path": "p"},
                     {"kernel": "k2", "case": "c", "path": "q"}],
    }  # fmt: skip
    tri = {
        "triton": "3.6.0",
        "kernels": {"t0": {"kernel": "_k", "stack": 8, "counts": spilled}},
        "launches": [{"compiled": "t0", "case": "c"}],
    }
    found = kernel_report.spills({"cuda": cuda, "triton": {}, "triton_others": [tri]})
    assert len(found) == 2 and "k2" in found[0] and "3 LDL / 2 STL" in found[0]
    assert "Triton 3.6.0 _k" in found[1]
    assert kernel_report.spills({"cuda": {**cuda, "launches": cuda["launches"][:1]},
                                 "triton": {}}) == []  # fmt: skip


def test_known_spills_pass_only_within_their_budget(monkeypatch):
    """A KNOWN_SPILLS entry is reported as known and passes the gate only up to its budget."""
    name = "some_kernel<bf16,128>"
    max_ldl, max_stl = 8, 6
    monkeypatch.setitem(kernel_report.KNOWN_SPILLS, name, (max_ldl, max_stl, "why"))

    def report(ldl, stl):
        k = {"short": name, "stack": 16, "counts": {"LDL": ldl, "STL": stl}}
        return {"cuda": {"kernels": {"k": k}, "launches": [{"kernel": "k", "case": "c",
                                                            "path": "p"}]}, "triton": {}}  # fmt: skip

    within = kernel_report.spills(report(max_ldl, max_stl))
    assert len(within) == 1 and kernel_report.KNOWN in within[0]
    assert kernel_report.gate(within) == []
    assert kernel_report.gate(kernel_report.spills(report(max_ldl + 1, max_stl))) != []
