"""Fast CPU tests of the int8 benchmark: cost model, quick run, cross-check, targets, budgets."""

from __future__ import annotations

import argparse
import csv
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from bench import int8 as bench_int8
from bench.harness import Provider, Row
from lrkernels.reference import int8_linear_reference
from lrkernels.roofline import DevicePeaks, dense_linear_cost, int8_linear_cost, roofline_time

SVG_NS = "{http://www.w3.org/2000/svg}"
FAST = ["--device", "cpu", "--rep-ms", "10"]  # short timing windows keep the tests quick


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_int8_cost_model_hand_example():
    # M=2, in=256, out=3, 2-byte activations and scales, bias:
    # flops = 2·2·256·3 + 2·3 (bias) = 3072 + 6
    # bytes = 3·256 (int8 weight) + 3·2·2 (scales, 2 groups of 128 per row) + 2·256·2 (x)
    #         + 2·3·2 (y) + 3·2 (bias) = 768 + 12 + 1024 + 12 + 6
    assert int8_linear_cost(2, 256, 3, 2, 128) == (3078, 1822)
    assert int8_linear_cost(2, 256, 3, 2, 128, bias=False) == (3072, 1816)
    # per channel: 3 scales of 2 bytes
    assert int8_linear_cost(2, 256, 3, 2, 0) == (3078, 1816)
    # float32 scales with 2-byte activations: 3·2·4 bytes of scales
    assert int8_linear_cost(2, 256, 3, 2, 128, scale_bytes=4) == (3078, 1834)
    # group 32: 8 groups per row
    assert int8_linear_cost(2, 256, 3, 2, 32)[1] == 768 + 3 * 8 * 2 + 1024 + 12 + 6
    # the same FLOPs as the dense layer; the dense weight costs 2 bytes an element
    assert dense_linear_cost(2, 256, 3, 2)[0] == 3078
    assert dense_linear_cost(2, 256, 3, 2)[1] == 2 * (2 * 256 + 3 * 256 + 2 * 3 + 3)
    with pytest.raises(ValueError):
        int8_linear_cost(2, 100, 3, 2, 128)  # 128 does not divide 100

    # decode on 4096x4096 bf16 per channel is memory bound: bytes / bandwidth
    flops, nbytes = int8_linear_cost(1, 4096, 4096, 2, 0)
    assert nbytes == 4096 * 4096 + 4096 * 2 + 4096 * 2 + 4096 * 2 + 4096 * 2
    peaks = DevicePeaks("t", bandwidth_bytes_per_s=3e12, flops_per_s=7e14, measured=False, how="")
    assert roofline_time(flops, nbytes, peaks) == pytest.approx(nbytes / 3e12)


def test_quick_cpu_run_writes_csv(tmp_path):
    assert bench_int8.main(["--quick", "--out", str(tmp_path), "--no-plot", *FAST]) == 0
    rows = _read_csv(tmp_path / "int8-cpu.csv")
    assert not list(tmp_path.glob("*.svg"))
    assert rows and {r["device"] for r in rows} == {"cpu"}
    assert {r["op"] for r in rows} == {"int8_linear"}
    ok = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"lrkernels-cpu", "torch-bf16-linear", "torch-dequant-matmul"} <= ok
    for r in rows:
        if r["status"].startswith("skipped: "):
            assert len(r["status"]) > len("skipped: ") + 5, r  # a reason, not a bare skip
            assert r["ms_median"] == ""
            continue
        assert r["status"] == "ok", r
        for col in ("ms_median", "ms_p20", "ms_p80", "flops", "bytes", "tflops", "gbps"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (col, r)
        assert 0 < float(r["roofline_frac"]) and math.isfinite(float(r["speedup"]))
        assert float(r["rel_err"]) <= float(r["err_bound"])
        assert r["git_commit"] and r["torch_version"] and r["peaks_how"]
        assert "not GPU numbers" in r["timing"]
        if r["provider"] == "torch-bf16-linear":
            assert float(r["speedup"]) == pytest.approx(1.0)
    for r in rows:  # torch's int8 kernel takes one scale per output channel only
        if r["provider"] == "torch-int8pack-mm" and r["group"] != "0":
            assert r["status"].startswith("skipped:") and "per-channel" in r["status"]
    assert {r["M"] for r in rows} == {"1", "16", "128"}
    assert {r["group"] for r in rows} == {"0", "128"}
    assert {r["dtype"] for r in rows} == {"float32"}
    # the int8 providers are charged 1 byte per weight, the dense baseline 4 (float32)
    by = {(r["provider"], r["M"], r["group"]): r for r in rows}
    out_f, in_f = int(rows[0]["out"]), int(rows[0]["in"])
    int8_bytes, dense_bytes = (
        f(1, in_f, out_f, 4)[1] for f in (int8_linear_cost, dense_linear_cost)
    )
    assert int(by["lrkernels-cpu", "1", "0"]["bytes"]) == int8_bytes
    assert int(by["torch-bf16-linear", "1", "0"]["bytes"]) == dense_bytes


def test_wrong_provider_makes_main_exit_nonzero(tmp_path):
    def wrong(i):
        def fn():
            y = int8_linear_reference(i["x"], i["qweight"], i["scales"], i["bias"]).clone()
            y[-1, -1] += 1.0  # one element off
            return y

        return fn

    argv = ["--out", str(tmp_path), "--M", "1,16", "--shapes", "128x256", "--group", "0", "64"]
    argv += ["--dtype", "bf16", "fp32", "--providers", "torch-bf16-linear,lrkernels-cpu"]
    argv += ["torch-dequant-matmul"]  # space or comma separated
    assert bench_int8.main(argv + FAST, extra_providers=[Provider("wrong", wrong)]) == 1
    rows = _read_csv(tmp_path / "int8-cpu.csv")
    assert len(rows) == 2 * 2 * 2 * 4  # dtypes x groups x M x providers
    for r in rows:
        if r["provider"] == "wrong":
            assert r["status"].startswith("FAILED") and r["ms_median"] == ""
        else:  # the real providers pass the bf16 and fp32 bounds
            assert r["status"] == "ok", r
    # the chart: speedup vs M of the first weight timed (no headline shape in this run)
    svg = ET.parse(tmp_path / "int8-cpu.svg").getroot()
    assert len(svg.findall(f"{SVG_NS}polyline")) == 3
    title = "".join(t.text or "" for t in svg.iter(f"{SVG_NS}text"))
    assert "128x256" in title and "per-channel" in title and "speedup" in title


def test_slow_torch_provider_is_not_run_at_larger_M(tmp_path):
    argv = ["--out", str(tmp_path), "--no-plot", "--M", "1,4,16", "--shapes", "64x128"]
    argv += ["--group", "0", "--providers", "torch-dequant-matmul", "--slow-ms", "1e-9"]
    assert bench_int8.main(argv + FAST) == 0
    rows = {(r["provider"], r["M"]): r for r in _read_csv(tmp_path / "int8-cpu.csv")}
    assert rows["torch-dequant-matmul", "1"]["status"] == "ok"
    for M in ("4", "16"):
        st = rows["torch-dequant-matmul", M]["status"]
        assert st.startswith("skipped:") and "at M=1 suggests" in st and "--slow-ms" in st
        assert rows["torch-bf16-linear", M]["status"] == "ok"  # the baseline is never cut


def _args(**kw) -> argparse.Namespace:
    base = {"quick": False, "shapes": None, "M": None, "group": None, "dtype": None}
    return argparse.Namespace(**{**base, **kw})


def test_case_order_puts_the_headline_first_and_drops_bad_groups(capsys):
    cases = bench_int8.build_cases(_args(), "cuda")
    first = [c for c in cases if c[:4] == (4096, 4096, torch.bfloat16, 0)]
    assert cases[: len(first)] == first
    fwd = [c[4] for c in first if c[5] == "fwd"]
    assert fwd == sorted(fwd) and [c[4] for c in first if c[5] == "dx"] == [1024, 4096]
    assert len(cases) == 5 * (12 + 2) * 2 * 2  # the full GPU sweep adds dx at M >= 1024
    cases = bench_int8.build_cases(
        _args(shapes=["64x96,32x128"], group=["0", "64"], M=["16", "1"], dtype=["fp32"]), "cpu"
    )
    assert (64, 96, torch.float32, 64, 1, "fwd") not in cases  # 64 does not divide 96
    assert (64, 96, torch.float32, 0, 1, "fwd") in cases
    assert "64x96 skipped for group 64" in capsys.readouterr().out
    assert [c[4] for c in cases[:2]] == [1, 16]
    assert len(cases) == 2 * 3
    with pytest.raises(SystemExit):
        bench_int8.build_cases(_args(shapes=["4096"]), "cpu")
    with pytest.raises(SystemExit):
        bench_int8.build_cases(_args(group=["48"]), "cpu")


def test_targets_summary_pass_and_miss():
    peaks = {"bfloat16": DevicePeaks("gpu", 3e12, 7e14, True, "")}

    def row(provider, out_f, in_f, M, ms, speedup, nbytes=0, pas="fwd"):
        shape = {"M": M, "out": out_f, "in": in_f, "group": 0, "bias": True, "pass": pas}
        r = Row("int8_linear", provider, "cuda", "bfloat16", shape)
        r.ms_median, r.speedup, r.bytes = ms, speedup, nbytes
        return r

    rows = [
        row("lrkernels-cuda", 4096, 4096, 1, 0.01, 1.9),
        row("lrkernels-cuda", 4096, 4096, 16, 0.01, 1.8),
        row("lrkernels-cuda", 28672, 8192, 16, 0.01, 1.6),  # the worst M<=16 row
        row("lrkernels-cuda", 4096, 4096, 64, 0.02, 1.35),
        row("lrkernels-cuda", 4096, 4096, 4096, 0.5, 0.92),
        row("lrkernels-cuda", 4096, 4096, 4096, 0.5, 0.91, pas="dx"),
        row("lrkernels-cuda", 1024, 1024, 16, 0.01, 0.5),  # below 4096x4096: not a target row
        # M=1 on 8192x8192: 2.7e12 bytes/s of 3e12 = 90%
        row("lrkernels-cuda", 8192, 8192, 1, 1.0, 2.0, nbytes=int(2.7e9)),
        row("torch-bf16-linear", 4096, 4096, 16, 0.02, 1.0),
    ]
    text = "\n".join(bench_int8.targets_summary(rows, peaks))
    tag = "lrkernels-cuda int8 per-channel"
    assert f"{tag}: speedup at M<=16: 1.60x (min, at 28672x8192 M=16 bfloat16)" in text
    assert "(goal >= 1.7x) MISS" in text
    assert f"{tag}: speedup at M=64: 1.35x" in text and "(goal >= 1.3x) PASS" in text
    assert f"{tag}: speedup at M=4096: 0.92x" in text and "(goal >= 0.95x) MISS" in text
    assert f"{tag}: speedup at dx M=4096: 0.91x" in text and "(goal >= 0.9x) PASS" in text
    assert "2700 GB/s = 90.0% of the 3000 GB/s copy" in text and "(goal >= 85%) PASS" in text
    assert "torch-bf16-linear int8" not in text
    # every verdict line ends in PASS or MISS (scripts/gpu_run.sh greps for them)
    verdicts = [ln for ln in text.splitlines() if ln.rstrip().endswith(("PASS", "MISS"))]
    assert len(verdicts) == 5
    empty = "\n".join(bench_int8.targets_summary(rows[-1:], peaks))
    assert "no lrkernels provider" in empty
