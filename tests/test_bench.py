"""Fast CPU tests of the benchmark machinery: cost model, CSV, SVG, cross-check, quick run."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from bench import harness
from bench import lowrank as bench_lowrank
from bench.harness import Provider, ProviderSkip, Row
from bench.plot import write_svg
from lrkernels.reference import lowrank_linear_exact, lowrank_linear_reference
from lrkernels.roofline import (
    DevicePeaks,
    dense_linear_cost,
    lowrank_linear_cost,
    roofline_fraction,
    roofline_time,
)

ROOT = Path(__file__).resolve().parents[1]
SVG_NS = "{http://www.w3.org/2000/svg}"
FAST = ["--device", "cpu", "--rep-ms", "10"]  # short timing windows keep the tests quick


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_cost_model_hand_example():
    # M=2, in=3, out=5, rank=4, 2-byte elements:
    # flops = 2·2·3·4 + 2·2·4·5 (+ 2·5 bias) = 48 + 80 + 10; the intermediate is not counted
    # bytes = 2·(2·3 + 4·3 + 5·4 + 2·5 (+ 5 bias)) = 2·53
    assert lowrank_linear_cost(2, 3, 5, 4, 2) == (138, 106)
    assert lowrank_linear_cost(2, 3, 5, 4, 2, bias=False) == (128, 96)
    # dense: 2·2·3·5 (+10) flops; 2·(2·3 + 5·3 + 2·5 (+5)) bytes
    assert dense_linear_cost(2, 3, 5, 2) == (70, 72)
    assert dense_linear_cost(2, 3, 5, 2, bias=False) == (60, 62)

    peaks = DevicePeaks("test", bandwidth_bytes_per_s=1e9, flops_per_s=1e12, measured=False, how="")
    assert roofline_time(138, 106, peaks) == pytest.approx(106e-9)  # memory bound
    assert roofline_time(1e12, 1, peaks) == pytest.approx(1.0)  # compute bound
    assert roofline_fraction(138, 106, peaks, 212e-9) == pytest.approx(0.5)


def test_csv_has_metadata_columns(tmp_path):
    meta = harness.collect_metadata(torch.device("cpu"))
    assert meta["git_commit"]  # a short hash or "unknown"
    assert meta["git_dirty"] in ("True", "False", "unknown")
    peaks = DevicePeaks("cpu-x", 2e10, 1e11, True, "copy + matmul")
    row = Row(
        op="lowrank_linear",
        provider="p",
        device="cpu",
        dtype="float32",
        shape={"M": 4, "in": 8, "out": 8, "rank": 2, "bias": True},
        ms_median=0.5,
        ms_p20=0.4,
        ms_p80=0.6,
        n_runs=5,
        flops=1000,
        bytes=400,
        roofline_ms=0.01,
    )
    skipped = Row("lowrank_linear", "q", "cpu", "float32", dict(row.shape), status="skipped: x")
    path = harness.write_csv(tmp_path / "r.csv", [row, skipped], meta, {"float32": peaks})
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    for col in [*harness.META_COLUMNS, *harness.METRIC_COLUMNS, "op", "provider", "status"]:
        assert col in header, col
    for col in ["M", "in", "out", "rank", "bias", "dtype", "device"]:
        assert col in header, col
    got, skip = _read_csv(path)
    assert got["status"] == "ok"
    assert float(got["tflops"]) == pytest.approx(1000 / 0.5e-3 / 1e12)
    assert float(got["gbps"]) == pytest.approx(400 / 0.5e-3 / 1e9)
    assert float(got["roofline_frac"]) == pytest.approx(0.02)
    assert float(got["peak_gbps"]) == pytest.approx(20.0)
    assert got["device_name"] and got["torch_version"] == torch.__version__
    assert skip["status"] == "skipped: x" and skip["ms_median"] == ""
    table = harness.format_table([row, skipped])
    assert "skipped: x" in table and "0.5000" in table


def test_svg_is_well_formed_with_one_polyline_per_series(tmp_path):
    series = {
        "a & b": [(1, 0.01), (16, 0.02), (1024, 0.5)],
        "c": [(16, 0.03), (1, 0.02), (1024, float("nan"))],  # NaN dropped, order fixed
        "d": [(1, 0.0), (16, 1.0)],  # 0 cannot be shown on a log axis: dropped
    }
    path = write_svg(tmp_path / "p.svg", series, title="t <x>", xlabel="M", ylabel="ms")
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG_NS}svg"
    lines = root.findall(f"{SVG_NS}polyline")
    assert len(lines) == 3
    assert [len(pl.get("points").split()) for pl in lines] == [3, 2, 1]
    texts = "".join(t.text or "" for t in root.iter(f"{SVG_NS}text"))
    assert "a & b" in texts and "t <x>" in texts
    lin = write_svg(
        tmp_path / "l.svg", series, title="t", xlabel="x", ylabel="y", logx=False, logy=False
    )
    assert len(ET.parse(lin).getroot().findall(f"{SVG_NS}polyline")) == 3


def _case(M=3, feat=64, rank=8, dtype=torch.float32):
    inp = bench_lowrank.make_inputs(M, feat, feat, rank, dtype, torch.device("cpu"), True, 0)
    ref = lowrank_linear_exact(inp["x"], inp["U"], inp["V"], inp["bias"])
    cost = lowrank_linear_cost(M, feat, feat, rank, inp["x"].element_size())
    return inp, ref, cost


def _run_cpu_case(providers: list[Provider]) -> list[Row]:
    """harness.run_case on _case()'s inputs, on the CPU, with short timing windows."""
    inp, ref, cost = _case()
    return harness.run_case(
        op="lowrank_linear",
        shape=inp["shape"],
        dtype=torch.float32,
        device=torch.device("cpu"),
        inputs=inp,
        reference=ref,
        cost=cost,
        providers=providers,
        peaks=DevicePeaks("cpu", 1e10, 1e11, False, ""),
        baseline="torch-2mm",
        timer_kw={"rep_s": 0.005},
    )


def test_cross_check_marks_wrong_provider_failed_and_never_times_it():
    calls = {"wrong": 0}

    def wrong(i):
        def fn():
            calls["wrong"] += 1
            y = lowrank_linear_reference(i["x"], i["U"], i["V"], i["bias"]).clone()
            y[-1, -1] += 1.0  # one element off
            return y

        return fn

    def raises(i):
        def fn():
            raise RuntimeError("kernel exploded")

        return fn

    def skip(i):
        raise ProviderSkip("not here")

    providers = [
        *bench_lowrank.make_providers(["torch-2mm", "dense-linear"]),
        Provider("wrong", wrong),
        Provider("raises", raises),
        Provider("skip", skip),
        Provider(
            "wrong-dtype", lambda i: lambda: lowrank_linear_exact(i["x"], i["U"], i["V"], i["bias"])
        ),
    ]
    rows = _run_cpu_case(providers)
    by = {r.provider: r for r in rows}
    assert by["torch-2mm"].ok and by["torch-2mm"].speedup == pytest.approx(1.0)
    assert by["dense-linear"].ok and by["dense-linear"].flops == dense_linear_cost(3, 64, 64, 4)[0]
    assert by["wrong"].failed and "max_err" in by["wrong"].status
    assert calls["wrong"] == 1, "a provider that failed its check must not be timed"
    assert math.isnan(by["wrong"].ms_median) and math.isnan(by["wrong"].speedup)
    assert by["raises"].failed and "kernel exploded" in by["raises"].status
    assert by["skip"].status == "skipped: not here"
    assert by["wrong-dtype"].failed and "dtype" in by["wrong-dtype"].status


def test_provider_env_is_set_while_built_checked_and_timed(monkeypatch):
    """Provider.env (a library knob read per call, e.g. LRKERNELS_LOWRANK_FILL_MARGIN) holds
    while that provider runs, not while another one does, and is restored afterwards."""
    monkeypatch.setenv("LRKERNELS_TEST_KNOB", "before")
    seen = {"knob": [], "plain": []}

    def recording(name):
        def build(i):
            seen[name].append(("build", os.environ.get("LRKERNELS_TEST_KNOB")))

            def fn():
                seen[name].append(("call", os.environ.get("LRKERNELS_TEST_KNOB")))
                return lowrank_linear_reference(i["x"], i["U"], i["V"], i["bias"])

            return fn

        return build

    providers = [
        Provider("knob", recording("knob"), env={"LRKERNELS_TEST_KNOB": "set"}),
        Provider("plain", recording("plain")),
        *bench_lowrank.make_providers(["torch-2mm"]),
    ]
    rows = _run_cpu_case(providers)
    assert all(r.ok for r in rows), [r.status for r in rows]
    assert len(seen["knob"]) > 2 and {v for _, v in seen["knob"]} == {"set"}
    assert len(seen["plain"]) > 2 and {v for _, v in seen["plain"]} == {"before"}
    assert os.environ["LRKERNELS_TEST_KNOB"] == "before"
    modelbest = bench_lowrank.make_providers(["lrkernels-cuda-modelbest"])[0]
    assert modelbest.env == {"LRKERNELS_LOWRANK_FILL_MARGIN": "1.0"}


def test_quick_cpu_run_writes_csv(tmp_path):
    assert bench_lowrank.main(["--quick", "--out", str(tmp_path), "--no-plot", *FAST]) == 0
    rows = _read_csv(tmp_path / "lowrank-cpu.csv")
    assert not list(tmp_path.glob("*.svg"))
    assert rows and {r["device"] for r in rows} == {"cpu"}
    providers = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"lrkernels-cpu", "torch-2mm", "dense-linear"} <= providers
    for r in rows:
        if r["provider"] == "torch-compile-2mm" and r["status"].startswith("skipped"):
            continue  # no working compiler here: a reason, not a failure
        assert r["status"] == "ok", r
        for col in ("ms_median", "ms_p20", "ms_p80", "flops", "bytes", "tflops", "gbps"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (col, r)
        assert float(r["rel_err"]) <= float(r["err_bound"])
        assert r["git_commit"] and r["torch_version"] and r["peaks_how"]
        assert "not GPU numbers" in r["timing"]
    assert {r["M"] for r in rows} == {"1", "16", "128"}


def test_wrong_provider_makes_main_exit_nonzero(tmp_path):
    def wrong(i):
        return lambda: 1.5 * lowrank_linear_reference(i["x"], i["U"], i["V"], i["bias"])

    argv = ["--out", str(tmp_path), "--M", "1,16", "--features", "128", "--rank", "16"]
    argv += ["--dtype", "bf16", "fp32", "--providers", "torch-2mm,lrkernels-cpu,dense-linear"]
    assert bench_lowrank.main(argv + FAST, extra_providers=[Provider("wrong", wrong)]) == 1
    rows = _read_csv(tmp_path / "lowrank-cpu.csv")
    assert len(rows) == 2 * 2 * 4
    for r in rows:
        if r["provider"] == "wrong":
            assert r["status"].startswith("FAILED") and r["ms_median"] == ""
        else:  # the real providers pass the bf16 and fp32 bounds
            assert r["status"] == "ok", r
    svg = ET.parse(tmp_path / "lowrank-cpu.svg").getroot()
    assert len(svg.findall(f"{SVG_NS}polyline")) == 3


def test_targets_summary_pass_and_miss():
    def row(provider, M, ms, frac=0.8, pas="fwd", feat=4096, rank=128):
        shape = {"M": M, "in": feat, "out": feat, "rank": rank, "bias": True, "pass": pas}
        r = Row("lowrank_linear", provider, "cuda", "bfloat16", shape)
        r.ms_median, r.roofline_ms = ms, frac * ms
        return r

    rows = []
    cases = [(1, 0.03, 0.01, "fwd"), (16, 0.03, 0.015, "fwd"), (64, 0.02, 0.015, "fwd")]
    cases += [(1024, 0.1, 0.12, "fwd"), (8192, 0.5, 0.4, "dx")]
    for M, base, mine, pas in cases:
        pair = [row("torch-2mm", M, base, pas=pas), row("lrkernels-cuda", M, mine, 0.75, pas)]
        for r in pair:
            r.speedup = base / r.ms_median
        rows += pair
    rows.append(row("lrkernels-cuda", 16, 1.0, rank=32))  # rank 32: not a goal row
    rows[-1].speedup = 0.01
    text = "\n".join(bench_lowrank.targets_summary(rows))
    assert "at M 1-16: 2.00x (min, at M=16 in=out=4096 rank=128) (goal >= 1.5x) PASS" in text
    assert "at M 64-256: 1.33x (min, at M=64 in=out=4096 rank=128) (goal >= 1.2x) PASS" in text
    assert "at M >= 1024: 0.83x (min, at M=1024 in=out=4096 rank=128) (goal >= 1x) MISS" in text
    assert "at dx at M=8192: 1.25x" in text and "(goal >= 1x) PASS" in text
    assert "roofline fraction at M >= 1024: 75.0%" in text and "(goal >= 70%) PASS" in text
    verdicts = [ln for ln in text.splitlines() if ln.rstrip().endswith(("PASS", "MISS"))]
    assert len(verdicts) == 5 and not any("torch-2mm:" in ln for ln in verdicts)
    assert "no lrkernels provider" in "\n".join(bench_lowrank.targets_summary(rows[:1]))


@pytest.mark.parametrize("name", ["lowrank", "int8", "attn", "lora"])
def test_help_shows_defaults_and_choices_readably(name, capsys):
    import importlib

    bench = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "{'" not in text and "':" not in text  # no Python dict
    assert "--headline" in text and "--write-table" in text and "--max-seconds" in text
    # However argparse wraps it (it also breaks words at hyphens: "/tmp/ci-" + "clone/...").
    assert f"(default:{harness.default_out_dir()}" in "".join(text.split())
    assert "lrkernels-cuda, lrkernels-triton" in text  # the providers, listed


def test_outputs_go_outside_the_source_tree_by_default(monkeypatch):
    monkeypatch.delenv("LRKERNELS_BENCH_OUT", raising=False)
    out = harness.default_out_dir()
    assert out == ROOT / "build" / "bench-results"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(out / "lowrank-cpu.csv")], cwd=ROOT, check=False
    )
    assert ignored.returncode in (0, 128)  # ignored (128: not a git checkout)
    assert bench_lowrank.parse_args([]).out == str(out)
