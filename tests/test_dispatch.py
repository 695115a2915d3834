"""Auto selection (lrkernels.dispatch): shape classes, the measured table, the conservative
rules, explain, explicit-backend errors, and that selection traces under torch.compile."""

from __future__ import annotations

import json

import pytest
import torch

import lrkernels
from lrkernels import backends, dispatch, masks, quant

CPU_OK = lrkernels.available_backends()["cpu"] is None
SOURCE = {"bench": "bench/test.py", "commit": "abc1234", "date": "2026-01-01", "torch": "x"}


def _lowrank(M=3, in_f=64, out_f=32, rank=8, dtype=torch.float32):
    return (
        torch.randn(M, in_f, dtype=dtype),
        torch.randn(out_f, rank, dtype=dtype),
        torch.randn(rank, in_f, dtype=dtype),
        None,
    )


def _row(op, args, order, dtype="float32", measured=None):
    """A table row keyed like auto selection keys these arguments."""
    h = dispatch.hooks(op)
    return {
        "op": op,
        "device": dispatch.device_key(args[0].device),
        "dtype": dtype,
        "class": h.shape_class(h.features(*args)),
        "order": order,
        "measured": measured or [],
        "excluded": {},
        "source": SOURCE,
    }


# ------------------------------------------------------------------------------ classes


def test_buckets_and_linear_classes():
    b = dispatch.M_BUCKETS
    assert [dispatch.bucket(m, b) for m in (0, 1, 2, 16, 17, 64, 65, 4096, 4097)] == [
        "1", "1", "2-16", "2-16", "17-64", "17-64", "65-256", "1025-4096", ">4096"
    ]  # fmt: skip
    f = {"M": 16, "in": 4096, "out": 11008, "rank": 128}
    assert dispatch.linear_class(f) == "M=2-16 in=1025-4096 out=8193-16384 rank=33-128"
    f = {"M": 5000, "in": 100, "out": 20000, "scales": "g128"}
    assert dispatch.linear_class(f) == "M=>4096 in=1-1024 out=>16384 scales=g128"
    x, U, V, b = _lowrank(M=1)
    x = x.reshape(1, 1, 64).expand(2, 3, 64)  # M counts every leading dim
    assert dispatch.hooks("lowrank_linear").features(x, U, V, b)["M"] == 6


def test_attention_class_reads_the_window_not_the_lists():
    q = torch.randn(1, 2, 4096, 64)
    eager = masks.local_window_layout(4096, 4096, (255, 0), block_q=64, block_k=64)
    h = dispatch.hooks("block_sparse_attention")
    f = h.features(q, q, q, eager)
    assert f["keys"] == 256 and f["mode"] == "infer"
    assert h.shape_class(f) == "D=64 Sq=1025-4096 keys=sparse infer"
    dense = masks.local_window_layout(4096, 4096, (-1, 0), block_q=64, block_k=64)
    assert "keys=dense" in h.shape_class(h.features(q, q, q, dense))
    g = q.clone().requires_grad_()
    assert h.features(g, q, q, eager)["mode"] == "train"
    with torch.no_grad():
        assert h.features(g, q, q, eager)["mode"] == "infer"


# ------------------------------------------------------------------------------ rules


def test_rules_without_a_table_row():
    lowrank = dispatch.hooks("lowrank_linear").rule
    for device in ("cuda", "cpu"):
        order, why = lowrank(device, "bfloat16", {"M": 16, "in": 4096, "out": 4096, "rank": 128})
        assert order == (("cuda", "torch") if device == "cuda" else ("torch",)) and why
    big = {"M": 8192, "in": 4096, "out": 4096, "rank": 128}
    assert lowrank("cuda", "bfloat16", big)[0] == ("torch",)
    assert lowrank("cuda", "float16", {**big, "M": 64})[0] == ("cuda", "triton", "torch")
    int8 = dispatch.hooks("int8_linear").rule
    f = {"in": 4096, "out": 4096, "scales": "channel"}
    assert int8("cuda", "bfloat16", {**f, "M": 1})[0] == ("cuda", "triton")
    assert int8("cuda", "bfloat16", {**f, "M": 64})[0] == ("cuda", "triton")
    assert int8("cuda", "bfloat16", {**f, "M": 4096})[0] == ("cuda", "torch")
    assert int8("cpu", "float32", {**f, "M": 1})[0] == ("torch",)
    attn = dispatch.hooks("block_sparse_attention").rule
    f = {"D": 64, "Sq": 256, "Sk": 256, "keys": 64, "mode": "infer"}
    assert attn("cuda", "bfloat16", f)[0] == ("triton", "cuda")
    assert attn("cpu", "float32", f)[0] == ("cpu",)
    assert attn("cpu", "float32", {**f, "Sq": 4096, "Sk": 4096, "keys": 4096})[0] == ("cpu",)


def test_auto_on_cpu_follows_the_rule(table):
    table([])
    args = _lowrank()
    assert backends.select_backend("lowrank_linear", None, *args) == "torch"
    q = torch.randn(1, 2, 2048, 32)
    layout = masks.local_window_layout(2048, 2048, (63, 0), block_q=64, block_k=64)
    want = "cpu" if CPU_OK else "torch"
    assert backends.select_backend("block_sparse_attention", None, q, q, q, layout) == want


# ------------------------------------------------------------------------------ the table


def test_table_row_decides_and_falls_through_unsupported_backends(table):
    args = _lowrank()
    table([_row("lowrank_linear", args, ["cpu", "torch"])])
    assert backends.select_backend("lowrank_linear", None, *args) == ("cpu" if CPU_OK else "torch")
    table([_row("lowrank_linear", args, ["cuda", "triton", "torch"])])  # no GPU here
    assert backends.select_backend("lowrank_linear", None, *args) == "torch"
    table([_row("lowrank_linear", args, ["no-such-backend", "torch"])])
    assert dispatch.preference("lowrank_linear", *args) == ("torch",)
    # another dtype, another class: the table's row does not apply
    table([_row("lowrank_linear", args, ["cpu", "torch"], dtype="bfloat16")])
    assert dispatch.decide("lowrank_linear", *args)[1].startswith("rule")


def test_derive_order_never_slower_than_torch():
    measured = [
        {"shape": "a", "ms": {"torch": 1.0, "cuda": 0.5, "triton": 0.8, "cpu": 0.9}},
        {"shape": "b", "ms": {"torch": 1.0, "cuda": 0.6, "triton": 1.2}},
    ]
    order, why = dispatch.derive_order(measured, {})
    assert order == ["cuda", "cpu", "torch"]
    assert "slower" not in why.get("cuda", "") and "1.20x torch's time" in why["triton"]
    order, why = dispatch.derive_order(
        [{"shape": "a", "ms": {"torch": 1.0, "cuda": 0.96}}], {}
    )  # within the margin: a tie goes to torch
    assert order == ["torch"] and "not 5% faster" in why["cuda"]
    order, why = dispatch.derive_order(measured, {"cuda": "FAILED at a: wrong"})
    assert order[0] == "cpu" and why["cuda"].startswith("FAILED")
    # torch too slow to time at these sizes: the kernels rank among themselves
    order, _ = dispatch.derive_order([{"shape": "a", "ms": {"cuda": 2.0, "triton": 1.0}}], {})
    assert order == ["triton", "cuda", "torch"]


def test_merge_rows_keeps_a_run_and_replaces_an_old_one():
    key = {"op": "lowrank_linear", "device": "cuda:X", "dtype": "bfloat16", "class": "c"}
    first = [{**key, "shape": "s1", "ms": {"torch": 1.0, "cuda": 0.5}, "excluded": {}}]
    table, touched = dispatch.merge_rows({"rows": []}, first, source=SOURCE)
    assert touched[0]["order"] == ["cuda", "torch"]
    second = [{**key, "shape": "s2", "ms": {"torch": 1.0}, "excluded": {"cuda": "FAILED at s2: x"}}]
    table, _ = dispatch.merge_rows(table, second, source=SOURCE)  # same commit: merged
    (row,) = table["rows"]
    assert [m["shape"] for m in row["measured"]] == ["s1", "s2"] and row["order"] == ["torch"]
    newer = {**SOURCE, "commit": "def5678"}
    table, _ = dispatch.merge_rows(table, first, source=newer)  # a new commit: measured anew
    (row,) = table["rows"]
    assert [m["shape"] for m in row["measured"]] == ["s1"] and row["order"] == ["cuda", "torch"]
    unknown = {**SOURCE, "commit": "unknown"}
    table, _ = dispatch.merge_rows(table, second, source=unknown)
    table, _ = dispatch.merge_rows(table, first, source=unknown)  # unknown commits never merge
    assert [m["shape"] for m in table["rows"][0]["measured"]] == ["s1"]


def test_packaged_table_is_valid():
    raw = json.loads(dispatch.PACKAGED_TABLE.read_text())
    assert raw["format"] == dispatch.TABLE_FORMAT
    for r in raw["rows"]:
        assert r["order"][-1] == "torch" and set(r["order"]) <= set(lrkernels.BACKENDS), r
        assert r["op"] and r["device"] and r["dtype"] and r["class"] and r["source"]["commit"]
        assert not any(b in r["order"] for b, why in r["excluded"].items()), r
    assert dispatch.main([str(dispatch.PACKAGED_TABLE)]) == 0


# ------------------------------------------------------------------------------ explain


def test_explain_rule_table_and_requested(table, capsys):
    args = _lowrank()
    table([])
    e = lrkernels.explain("lowrank_linear", *args)
    assert e.backend == "torch" and e.how == "rule" and e.table_row is None
    text = str(e)
    assert "runs: torch (rule)" in text and "no table row" in text
    assert "cuda: cannot:" in text and "torch: can run" in text
    assert "M=2-16 in=1-1024 out=1-1024 rank=1-32" in text

    row = _row("lowrank_linear", args, ["cpu", "torch"], measured=[
        {"shape": "M=3", "ms": {"cpu": 0.01, "torch": 0.02}}])  # fmt: skip
    table([row])
    e = lrkernels.explain(lrkernels.lowrank_linear, *args)
    assert e.how == "table" and e.table_row is not None
    assert e.backend == ("cpu" if CPU_OK else "torch")
    text = str(e)
    assert "table row measured by bench/test.py at commit abc1234" in text
    assert "M=3: cpu 0.01 ms, torch 0.02 ms" in text
    if not CPU_OK:
        assert "passed over: cpu" in text

    e = lrkernels.explain("lowrank_linear", *args, backend="cuda")
    assert e.backend is None and e.how == "requested"
    assert "cannot run these inputs" in e.error and e.reasons["cuda"]
    assert e.error.endswith("; ".join(e.reasons["cuda"]))
    e = lrkernels.explain("lowrank_linear", *args, backend="torch")
    assert e.backend == "torch" and "auto selection does not apply" in e.why


def test_explain_other_ops_and_bad_calls():
    q = torch.randn(1, 2, 100, 32)
    e = lrkernels.explain("local_attention", q, q, q, (15, 0))
    assert e.op == "block_sparse_attention" and e.backend in ("cpu", "torch")
    w = torch.randn(64, 128)
    qw, s = quant.quantize(w, 32)
    e = lrkernels.explain("int8_linear", torch.randn(2, 128), qw, s)
    assert e.backend == "torch" and "scales=g32" in e.shape_class
    with pytest.raises(ValueError, match="unknown op"):
        lrkernels.explain("matmul", q)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lrkernels.explain("lowrank_linear", 1.0, *_lowrank()[1:])
    assert not dispatch.explaining()  # reset after an error
    x, U, V, b = _lowrank()
    assert torch.equal(lrkernels.lowrank_linear(x, U, V, backend="torch"), x @ V.t() @ U.t())


def test_process_default_is_reported(monkeypatch):
    monkeypatch.setattr(backends, "_DEFAULT_BACKEND", "torch")
    e = lrkernels.explain("lowrank_linear", *_lowrank())
    assert e.how == "requested" and "process default" in e.why


# ------------------------------------------------------------------------------ errors


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    x, U, V, b = _lowrank()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run these inputs: .*CUDA"):
        lrkernels.lowrank_linear(x, U, V, b, backend="cuda")
    q = torch.randn(1, 2, 20, 48, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        lrkernels.local_attention(q, q, q, (7, 0), backend="triton")


def test_an_op_without_hooks_runs_torch_and_a_registered_one_its_rule(monkeypatch):
    monkeypatch.setitem(backends._REASONS, "toy_op", lambda b, x, explicit: [])
    x = torch.randn(3, 4)
    assert backends.select_backend("toy_op", None, x) == "torch"
    assert dispatch.decide("toy_op", x)[1] == "rule: toy_op registered no dispatch hooks"
    monkeypatch.setitem(dispatch._HOOKS, "toy_op", None)  # restored after the test
    dispatch.register_op(
        "toy_op",
        features=lambda x: {"M": dispatch.rows_of(x)},
        shape_class=lambda f: f"M={dispatch.bucket(f['M'], dispatch.M_BUCKETS)}",
        rule=lambda device, dtype, f: (("cpu",), "toy"),
    )
    assert backends.select_backend("toy_op", None, x) == ("cpu" if CPU_OK else "torch")


# ------------------------------------------------------------------------------ compile


@pytest.mark.parametrize("dynamic", [False, True])
def test_selection_traces_under_compile(table, dynamic):
    """Auto selection is plain Python on shapes and dtypes: fullgraph compiles, and a shape in
    another bucket re-traces (a table row picks the cpu kernel for one class only)."""
    args = _lowrank(M=3)
    table([_row("lowrank_linear", args, ["cpu", "torch"])])
    torch._dynamo.reset()

    def f(x, U, V):
        return lrkernels.lowrank_linear(x, U, V) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    for M in (3, 5, 40):  # 3 and 5 share a class (M 2-16), 40 does not
        x, U, V, _ = _lowrank(M=M)
        torch.testing.assert_close(compiled(x, U, V), f(x, U, V))
    q = torch.randn(1, 2, 64, 32)
    attn = torch.compile(
        lambda q: lrkernels.local_attention(q, q, q, (15, 0)), fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(attn(q), lrkernels.local_attention(q, q, q, (15, 0)))


def test_merge_a_gpu_runs_table_into_another(tmp_path, capsys):
    key = {"device": "cuda:X", "dtype": "bfloat16", "order": ["torch"], "measured": []}
    key |= {"excluded": {}, "source": SOURCE}
    mine = [
        {**key, "op": "lowrank_linear", "class": "a"},
        {**key, "op": "int8_linear", "class": "b"},
    ]
    theirs = [{**key, "op": "lowrank_linear", "class": "a", "order": ["cuda", "torch"]}]
    dst, src = tmp_path / "dst.json", tmp_path / "src.json"
    dispatch.write_table(dst, {"format": 1, "rows": mine})
    dispatch.write_table(src, {"format": 1, "rows": theirs})
    assert dispatch.main([str(dst), "--merge", str(src)]) == 0
    rows = {r["op"]: r for r in dispatch.read_table(dst)["rows"]}
    assert rows["lowrank_linear"]["order"] == ["cuda", "torch"] and "int8_linear" in rows
    assert dispatch.main([str(dst)]) == 0
    assert "lowrank_linear | cuda:X | bfloat16 | a -> cuda > torch" in capsys.readouterr().out
