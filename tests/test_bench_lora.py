"""Fast CPU tests of the LoRA benchmark: cost model, a quick run with its cross-checks, a wrong
provider caught, and the PASS/MISS summary."""

from __future__ import annotations

import csv

import pytest
import torch

import lrkernels
from bench import lora as bench_lora
from bench.harness import Provider, Row
from lrkernels.roofline import lora_linear_cost

FAST = ["--device", "cpu", "--rep-ms", "5"]


def test_lora_cost_model_hand_example():
    # M=2, in=256, out=3, r=4, 2-byte dtype, bias, dense:
    # flops = 2·2·256·3 + 2·2·256·4 + 2·2·4·3 + 2·3 = 3072 + 4096 + 48 + 6
    # bytes = 2·(2·256 + 2·3) (x, y) + 2·3·256 (W) + 2·4·(256 + 3) (A, B) + 2·3 (bias)
    assert lora_linear_cost(2, 256, 3, 4, 2) == (7222, 1036 + 1536 + 2072 + 6)
    # int8 per channel: 1 byte a weight + 3 two-byte scales
    assert lora_linear_cost(2, 256, 3, 4, 2, group_size=0)[1] == 1036 + 768 + 6 + 2072 + 6
    # serving 5 adapters reads each once
    assert lora_linear_cost(2, 256, 3, 4, 2, n_adapters=5)[1] == 1036 + 1536 + 5 * 2072 + 6
    # fwd + bwd of a frozen base: dx (3072 + 48 + 4096), dA (4096), dB (48), dbias (6)
    f, b = lora_linear_cost(2, 256, 3, 4, 2, backward=True)
    assert f == 7222 + 3072 + 48 + 4096 + 4096 + 48 + 6
    assert b == 4650 + 2 * (2 * 3 + 2 * 2 * 256) + 1536 + 2 * 2072 + 6


def test_quick_cpu_run_checks_and_writes_csv(tmp_path):
    assert bench_lora.main(["--quick", "--out", str(tmp_path), *FAST]) == 0
    with open(tmp_path / "lora-cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ok = {(r["case"], r["provider"]) for r in rows if r["status"] == "ok"}
    assert ("decode-dense", "base-only") in ok and ("decode-dense", "peft-eager") in ok
    assert ("multi-64x8", "eager-loop") in ok
    if lrkernels.available_backends()["cpu"] is None:  # the extension is built for this torch
        assert ("decode-dense", "lrkernels-cpu") in ok and ("multi-64x8", "lrkernels-cpu") in ok
    assert {r["device"] for r in rows} == {"cpu"}


def test_wrong_provider_is_failed_not_timed(tmp_path):
    def build(inp):
        return lambda: bench_lora._base_only(inp)()  # the base alone: misses the adapter

    wrong = Provider("wrong", build)
    args = ["--cases", "decode-dense", "--providers", "peft-eager", "--out", str(tmp_path), *FAST]
    assert bench_lora.main(args, extra_providers=[wrong]) == 1


def _row(case, provider, ms):
    return Row(op="x", provider=provider, device="cuda", dtype="bfloat16",
               shape={"case": case}, ms_median=ms)  # fmt: skip


def test_targets_summary_pass_and_miss():
    rows = [
        _row("decode-dense", "base-only", 10.0),
        _row("decode-dense", "peft-eager", 14.0),
        _row("decode-dense", "lrkernels-cuda", 10.4),
        _row("decode-int8", "base-only", 5.0),
        _row("decode-int8", "lrkernels-cuda", 6.0),
    ]
    lines = "\n".join(bench_lora.targets_summary(rows))
    assert "decode M=16 bf16: time / base F.linear: 1.040 (goal <= 1.050) PASS" in lines
    assert "decode M=16 int8: time / int8_linear: 1.200 (goal <= 1.050) MISS" in lines
    assert "PEFT-style on bf16: 0.429 (goal <= 0.600) PASS" in lines
    assert "multi M=4096, 8 adapters: time / base: not measured" in lines


@pytest.mark.parametrize("case", [c[0] for c in bench_lora.CPU_CASES])
def test_case_inputs_match_their_reference_shapes(case):
    spec = next(c for c in bench_lora.CPU_CASES if c[0] == case)
    inp = bench_lora.make_case(*spec, size=64, rank=4, dtype=bench_lora.torch.float32,
                               device="cpu", seed=0)  # fmt: skip
    assert bench_lora.reference(inp).shape == (spec[3], 64)


def test_headline_writes_dispatch_rows_and_summary(tmp_path):
    """--headline runs the goals' cases (CPU stand-ins here); --write-table records the times
    of the dispatch paths under the classes auto selection looks up; --summary gets the rows
    and the targets' lines."""
    table, summary = tmp_path / "table.json", tmp_path / "summary.txt"
    args = ["--headline", "--out", str(tmp_path), "--write-table", str(table),
            "--summary", str(summary), "--providers", "lrkernels-torch,base-only", *FAST]  # fmt: skip
    assert bench_lora.main(args) == 0
    with open(tmp_path / "lora-cpu.csv", newline="") as f:
        cases = {r["case"] for r in csv.DictReader(f)}
    assert cases == set(bench_lora.HEADLINE_CASES["cpu"])
    rows = lrkernels.dispatch.read_table(table)["rows"]
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
        assert r["order"] == ["torch"] and r["device"].startswith("cpu:")
    assert sorted(by_op) == ["lora_linear", "lora_linear_multi"]
    classes = {r["class"] for r in by_op["lora_linear"]}
    assert any(c.endswith("base=int8 infer") for c in classes)
    assert any(c.endswith("base=dense train dropout") for c in classes)
    # the class written is the one auto selection computes for the same call
    h = lrkernels.dispatch.hooks("lora_linear")
    x = torch.randn(16, 512)
    w, A, B = torch.randn(512, 512), torch.randn(16, 512), torch.randn(512, 16)
    assert h.shape_class(h.features(x, w, None, A, B, None)) in classes
    text = summary.read_text()
    assert "lora_linear headline on" in text and "LoRA targets (issue 11" in text
