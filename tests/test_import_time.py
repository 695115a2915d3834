"""``import lrkernels`` stays cheap: the heavy parts (triton, torch._inductor, torch._dynamo,
transformers) load on first use, not at import. Measured in fresh subprocesses: which modules
the import adds (deterministic), and its time relative to ``import torch`` (with margin for a
loaded machine, still catching the 0.9 s that importing torch._inductor used to add)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("triton", "torch._inductor", "torch._dynamo", "sympy", "transformers", "safetensors")


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def test_import_loads_no_heavy_module():
    code = (
        "import json, sys, torch\n"
        "before = set(sys.modules)\n"
        "import lrkernels, lrkernels.nn, lrkernels.masks\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before)))"
    )
    assert json.loads(_run(code)) == []


def test_compile_time_constant_matches_torchs_decorator():
    """`lrkernels.ops.compile_time_constant` stands in for torch.compiler.assume_constant_result
    (which imports torch._dynamo): it must still set what dynamo reads."""
    from lrkernels.ops import compile_time_constant

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(lambda: True)
    attrs = {k: v for k, v in vars(marked).items() if not k.startswith("__")}
    assert attrs == {"_dynamo_marked_constant": True}
    assert vars(compile_time_constant(probe)) == attrs


def test_triton_ops_register_on_first_use_also_inside_torch_compile():
    """The first use may be inside a compiled function: dynamo runs the registration eagerly
    (a compile-time constant) instead of tracing into it, and fullgraph holds."""
    pytest.importorskip("triton")
    code = (
        "import torch, lrkernels.ops.lowrank as m\n"
        "assert not m._TRITON_OPS_REGISTERED\n"
        "f = torch.compile(lambda x: x + m._ensure_triton_ops(), fullgraph=True, backend='eager')\n"
        "assert torch.equal(f(torch.zeros(2)), torch.ones(2))\n"
        "print(m._TRITON_OPS_REGISTERED and hasattr(torch.ops.lrkernels, 'lowrank_linear_triton'))"
    )
    assert _run(code) == "True"


@pytest.mark.slow
def test_import_time_relative_to_torch():
    timer = "import time; t = time.perf_counter(); {}; print(time.perf_counter() - t)"
    torch_only, with_lrk = [], []
    for _ in range(3):  # interleaved, so both see the same machine load
        torch_only.append(float(_run(timer.format("import torch"))))
        with_lrk.append(float(_run(timer.format("import torch; import lrkernels"))))
    base, total = statistics.median(torch_only), statistics.median(with_lrk)
    extra = total - base
    # Target: <= 0.2 s over torch's ~1 s on an idle machine. Load stretches both times alike, so
    # the bound scales with torch's own time: 0.45 s at 1 s (the old 0.9 s fails it).
    assert extra <= 0.1 + 0.35 * base, (
        f"import lrkernels adds {extra:.2f} s to import torch's {base:.2f} s"
    )
