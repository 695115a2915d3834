"""Auto selection (``backend=None``): a table of measured results, conservative rules where the
table has no row, and `explain`, which says which path runs and why.

The choice is made per **(op, device, dtype, shape class)**:

- *device*: ``"cuda:<GPU name>"`` (``torch.cuda.get_device_name``) or ``"cpu:<CPU model>"``;
- *shape class*: a coarse bucket of the op's sizes, computed by a hook each op registers
  (`register_op`). The linear ops share `linear_class`: rows ``M`` in 1, 2–16, 17–64, 65–256,
  257–1024, 1025–4096, >4096 (M = the product of x's leading dims) and feature sizes / ranks in
  `FEATURE_BUCKETS` / `RANK_BUCKETS`; attention uses head dim, query length, the share of keys
  a query may see, and whether gradients are needed (inference or training).

**The table** (``dispatch_table.json`` in this package, or the file named by
``LRKERNELS_DISPATCH_TABLE``) holds, per key, the median times each backend took on the shapes
of that class that a benchmark measured side by side with torch's own path
(``bench/*.py --write-table``, ``scripts/gpu_run.sh``), and the order derived from them: the
kernels that took at most 95% of torch's time on every measured shape of the class, fastest
(geometric mean of time / torch's time) first, then ``torch``. A kernel slower than that on one
shape, or one that failed a benchmark's correctness check, is never chosen for that class. So
where the table has a row, auto is never slower than torch.

**The rules** stand in where the table has no row (another GPU, an unmeasured class): each op's
`rule` hook names the backends in the order they are *expected* to win — a kernel only where a
measurement or a static estimate says it beats torch, torch otherwise.

Either way the first backend in the order whose `not_supported_reasons` is empty runs (torch
supports every valid input). Selection is plain dict lookups on Python ints and strings — no
tensor data is read — so it is cheap and traces under ``torch.compile(fullgraph=True)`` (a
shape crossing a bucket boundary recompiles, as any shape guard does).

**A new op** (LoRA's, say) registers, next to its `backends.register_reasons`:
``dispatch.register_op(op, features=..., shape_class=dispatch.linear_class, rule=...)``; its
benchmark builds on ``bench/harness.py`` and passes ``harness.dispatch_entries(rows, op=op,
paths={provider: backend}, features=...)`` to ``Bench.finish`` so that ``--write-table`` and
``scripts/gpu_run.sh`` fill its rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from .ops import compile_time_constant

BACKENDS = ("cuda", "triton", "cpu", "torch")  # lrkernels.BACKENDS
TABLE_FORMAT = 1
# A kernel is preferred in a class only if it took at most this fraction of torch's time on
# every measured shape of it: a tie within timing noise goes to torch.
WIN_MARGIN = 0.95
PACKAGED_TABLE = Path(__file__).with_name("dispatch_table.json")

# Upper bounds of the buckets; a value above the last falls in ">last".
M_BUCKETS = (1, 16, 64, 256, 1024, 4096)
FEATURE_BUCKETS = (1024, 4096, 8192, 16384)
RANK_BUCKETS = (32, 128, 512)
SEQ_BUCKETS = (16, 1024, 4096, 16384)

# Rule = (device type, dtype name, features) -> (backends in order of preference, why).
Rule = Callable[[str, str, Mapping], tuple[tuple[str, ...], str]]


@dataclasses.dataclass(frozen=True)
class OpHooks:
    """What auto selection needs from an op: `features` maps the op's (validated) arguments to a
    dict of Python ints / strings (no tensor data), `shape_class` turns it into the coarse class
    the table is keyed by, `rule` orders the backends where the table has no row."""

    features: Callable[..., dict]
    shape_class: Callable[[Mapping], str]
    rule: Rule


_HOOKS: dict[str, OpHooks] = {}


def register_op(
    op: str,
    *,
    features: Callable[..., dict],
    shape_class: Callable[[Mapping], str],
    rule: Rule,
) -> None:
    """Register (or replace) the auto-selection hooks of `op` (the name `select_backend` and
    `not_supported_reasons` use). An op without hooks runs ``torch`` under auto."""
    _HOOKS[op] = OpHooks(features, shape_class, rule)


def hooks(op: str) -> OpHooks | None:
    return _HOOKS.get(op)


# ----------------------------------------------------------------------------- shape classes


def bucket(value, bounds: tuple[int, ...]) -> str:
    """The label of the bucket holding `value`: ``"1"``, ``"2-16"``, ..., ``">4096"`` for
    bounds (1, 16, ..., 4096); values below 1 fall in the first bucket."""
    lo = 1
    for b in bounds:
        if value <= b:
            return str(b) if lo >= b else f"{lo}-{b}"
        lo = b + 1
    return f">{bounds[-1]}"


def rows_of(x: torch.Tensor):
    """M: the number of rows of x (the product of its leading dims)."""
    return math.prod(x.shape[:-1])


def linear_class(f: Mapping) -> str:
    """Shape class of a linear op from its features M, in, out (and rank / scales if given)."""
    parts = [
        f"M={bucket(f['M'], M_BUCKETS)}",
        f"in={bucket(f['in'], FEATURE_BUCKETS)}",
        f"out={bucket(f['out'], FEATURE_BUCKETS)}",
    ]
    if "rank" in f:
        parts.append(f"rank={bucket(f['rank'], RANK_BUCKETS)}")
    if "scales" in f:
        parts.append(f"scales={f['scales']}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- devices, dtypes

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_DEVICE_KEYS: dict[tuple[str, int | None], str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")


def _device_key_uncached(kind: str, index: int | None) -> str:
    if kind not in ("cuda", "cpu"):
        return kind
    from .roofline import device_name

    return f"{kind}:{device_name(torch.device(kind, index))}"


# Evaluated once, outside the graph, when torch.compile meets it (`compile_time_constant`:
# torch.compiler.assume_constant_result without importing torch._dynamo at import time).
_device_key_const = compile_time_constant(_device_key_uncached)


def device_key(device: torch.device) -> str:
    """``"cuda:NVIDIA H200"``, ``"cpu:AMD EPYC ..."`` (``"meta"`` etc. as is); cached."""
    key = (device.type, device.index)
    hit = _DEVICE_KEYS.get(key)
    if hit is None:
        hit = _device_key_const(device.type, device.index)
        _DEVICE_KEYS[key] = hit
    return hit


# ----------------------------------------------------------------------------- the table


def _index(rows: Iterable[dict]) -> dict[tuple[str, str, str, str], dict]:
    return {(r["op"], r["device"], r["dtype"], r["class"]): r for r in rows}


def read_table(path: str | Path) -> dict:
    """The table file as a dict (an empty table when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {"format": TABLE_FORMAT, "rows": []}
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if table.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: dispatch table format {table.get('format')!r}, expected 1")
    return table


def _initial_table_path() -> Path:
    return Path(os.environ.get("LRKERNELS_DISPATCH_TABLE") or PACKAGED_TABLE)


_TABLE_PATH: Path = _initial_table_path()
_TABLE: dict[tuple[str, str, str, str], dict] = _index(read_table(_TABLE_PATH)["rows"])


def use_table(path: str | Path | None) -> None:
    """Read auto selection's table from `path` (None: the packaged one) for this process."""
    global _TABLE_PATH, _TABLE
    _TABLE_PATH = Path(path) if path is not None else PACKAGED_TABLE
    _TABLE = _index(read_table(_TABLE_PATH)["rows"])


def table_path() -> Path:
    return _TABLE_PATH


def table_rows() -> list[dict]:
    """The rows auto selection reads now (copies)."""
    return [json.loads(json.dumps(r)) for r in _TABLE.values()]


# ----------------------------------------------------------------------------- the decision


def _with_torch_last(order: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(b for b in order if b != "torch" and b in BACKENDS))
    return (*out, "torch")


def decide(op: str, *args, **kwargs) -> tuple[tuple[str, ...], str, dict | None]:
    """(backends in order of preference, where the order comes from, the table row or None)
    for these arguments. Cheap: dict lookups on the op's Python-int features."""
    h = _HOOKS.get(op)
    if h is None:
        return ("torch",), f"rule: {op} registered no dispatch hooks", None
    x = args[0]
    features = h.features(*args, **kwargs)
    key = (op, device_key(x.device), dtype_name(x.dtype), h.shape_class(features))
    row = _TABLE.get(key)
    if row is not None:
        return _with_torch_last(row["order"]), "table", row
    order, why = h.rule(x.device.type, key[2], features)
    return _with_torch_last(order), "rule: " + why, None


def table_row(op: str, device: torch.device, dtype: torch.dtype, shape_class: str) -> dict | None:
    """The table's row for a key, or None: for choices below the backend level (e.g. the two
    paths of int8_linear's cuda backend, `lrkernels.ops.int8.cuda_path`)."""
    return _TABLE.get((op, device_key(device), dtype_name(dtype), shape_class))


def preference(op: str, *args, **kwargs) -> tuple[str, ...]:
    """The backends auto selection tries, in order (the first that supports the inputs runs)."""
    return decide(op, *args, **kwargs)[0]


# ----------------------------------------------------------------------------- explain


@dataclasses.dataclass
class Explanation:
    """What `explain` returns; ``str()`` gives the readable account."""

    op: str
    backend: str | None  # the backend that runs (None: the call would raise)
    how: str  # "requested" (backend= or the process default), "table" or "rule"
    why: str
    device: str
    dtype: str
    shape_class: str
    features: dict
    order: tuple[str, ...]
    reasons: dict[str, list[str]]  # per backend, why auto would not take it ([] = it can)
    table_row: dict | None = None
    error: str | None = None  # the RuntimeError an explicit backend would raise

    def __str__(self) -> str:
        feats = ", ".join(f"{k}={v}" for k, v in self.features.items())
        lines = [
            f"{self.op} on {self.device}, {self.dtype}, shape class [{self.shape_class}] ({feats})",
            f"  runs: {self.backend if self.backend else 'nothing: the call raises'} ({self.how})",
            f"  why: {self.why}",
        ]
        if self.error:
            lines.append(f"  error: {self.error}")
        if self.how in ("table", "rule"):
            lines.append(f"  auto order: {' > '.join(self.order)}")
        row = self.table_row
        if row is not None:
            src = row.get("source", {})
            lines.append(
                f"  table row measured by {src.get('bench', '?')} at commit "
                f"{src.get('commit', '?')} on {src.get('date', '?')} (torch "
                f"{src.get('torch', '?')}, triton {src.get('triton', '?')}):"
            )
            for m in row.get("measured", []):
                times = ", ".join(f"{b} {ms:.4g} ms" for b, ms in sorted(m["ms"].items()))
                lines.append(f"    {m['shape']}: {times}")
            for b, why in sorted(row.get("excluded", {}).items()):
                lines.append(f"    {b} never chosen here: {why}")
        lines.append("  backends:")
        for b, rs in self.reasons.items():
            lines.append(f"    {b}: " + ("can run" if not rs else "cannot: " + "; ".join(rs)))
        return "\n".join(lines)


class _Explained(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, explanation: Explanation):
        super().__init__(explanation.op)
        self.explanation = explanation


_EXPLAINING: int | None = None  # the thread in `explain`, around one call of the public op


def explaining() -> bool:
    """Whether this thread is inside `explain` (a plain global test first: free when not)."""
    return _EXPLAINING is not None and _EXPLAINING == threading.get_ident()


def explanation(
    op: str, requested: str | None, how_requested: str, args: tuple, kwargs: dict
) -> Explanation:
    """The full account of what `select_backend` would do with these arguments."""
    from . import backends

    order, source, row = decide(op, *args, **kwargs)
    h = _HOOKS.get(op)
    x = args[0]
    features = h.features(*args, **kwargs) if h else {}
    reasons = {
        b: backends.not_supported_reasons(op, b, *args, explicit=requested == b, **kwargs)
        for b in backends.BACKENDS
    }
    exp = Explanation(
        op=op,
        backend=None,
        how="",
        why="",
        device=device_key(x.device),
        dtype=dtype_name(x.dtype),
        shape_class=h.shape_class(features) if h else "",
        features=features,
        order=order,
        reasons=reasons,
    )
    if requested is not None:
        exp.how = "requested"
        if reasons[requested]:
            exp.why = f"{how_requested}, and it cannot run these inputs"
            exp.error = f"{op}: backend {requested!r} cannot run these inputs: " + "; ".join(
                reasons[requested]
            )
        else:
            exp.backend = requested
            exp.why = f"{how_requested}: auto selection does not apply"
        return exp
    exp.how = "table" if source == "table" else "rule"
    chosen = next(b for b in order if not reasons[b] or b == "torch")
    exp.backend = chosen
    skipped = [f"{b} ({'; '.join(reasons[b])})" for b in order[: order.index(chosen)]]
    if source == "table":
        exp.table_row = row
        exp.why = f"measured: the table's order for this class is {' > '.join(order)}"
    else:
        exp.why = "no table row for this device, dtype and class; " + source
    if skipped:
        exp.why += "; passed over: " + ", ".join(skipped)
    return exp


def explain(op, *args, **kwargs) -> Explanation:
    """Which backend ``op(*args, **kwargs)`` would run, and why — without running it.

    `op` is a public op of lrkernels, by name (``"lowrank_linear"``, ``"int8_linear"``,
    ``"local_attention"``, ``"block_sparse_attention"``, ...) or the function itself; the
    arguments are those of the call (``backend=`` included). The call's argument checks run as
    usual (bad arguments raise their error); then, instead of launching anything, the backend
    decision is returned: the backend, whether it was requested, read from the measured table
    (with the measured times) or from the op's rule, and every backend's reasons for not
    taking these inputs. ``print(lrkernels.explain(...))`` gives the readable form.
    """
    global _EXPLAINING
    import lrkernels

    fn = getattr(lrkernels, op, None) if isinstance(op, str) else op
    if not callable(fn):
        public = sorted(n for n in getattr(lrkernels, "__all__", ()) if n.endswith(("_linear",
                        "_attention")))  # fmt: skip
        raise ValueError(f"explain: unknown op {op!r}; the ops are {', '.join(public)}")
    if _EXPLAINING is not None:
        raise RuntimeError("explain: another explain is in progress (one at a time)")
    _EXPLAINING = threading.get_ident()
    try:
        fn(*args, **kwargs)
    except _Explained as e:
        return e.explanation
    finally:
        _EXPLAINING = None
    raise RuntimeError(
        f"explain: {getattr(fn, '__name__', op)} returned without choosing a backend"
    )


# ----------------------------------------------------------------------------- writing the table


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def derive_order(
    measured: list[dict], excluded: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """(order, why each left-out backend is never chosen) from a class's measured shapes
    (``[{"shape": ..., "ms": {backend: ms}}]``): kernels never slower than torch where both were
    measured, by geometric mean of their time over torch's, then torch. Without torch times (too
    slow to time at these sizes) the kernels are ranked by the geometric mean of their times
    over the shapes all of them ran."""
    why = dict(excluded)
    kernels = sorted({b for m in measured for b in m["ms"] if b != "torch"} - set(why))
    with_torch = [m for m in measured if "torch" in m["ms"]]
    score: dict[str, float] = {}
    for b in kernels:
        if with_torch:
            ratios = [
                (m["ms"][b] / m["ms"]["torch"], m["shape"]) for m in with_torch if b in m["ms"]
            ]
            if not ratios:
                why[b] = "never measured on a shape where torch was measured"
                continue
            worst, where = max(ratios)
            if worst > WIN_MARGIN:
                why[b] = (
                    f"not {100 * (1 - WIN_MARGIN):.0f}% faster than torch at {where} "
                    f"({worst:.2f}x torch's time)"
                )
                continue
            score[b] = _geomean([r for r, _ in ratios])
        else:
            common = [m for m in measured if all(k in m["ms"] for k in kernels)]
            if not common:
                why[b] = "not measured on the same shapes as the other backends"
                continue
            score[b] = _geomean([m["ms"][b] for m in common])
    return sorted(score, key=lambda b: (score[b], b)) + ["torch"], why


def merge_rows(
    table: dict, new: Iterable[dict], *, source: Mapping[str, str]
) -> tuple[dict, list[dict]]:
    """Merge measured shapes into `table` (modified and returned, with the rows touched).

    `new`: ``{"op", "device", "dtype", "class", "shape", "ms": {backend: ms}, "excluded":
    {backend: why}}``, one per measured shape. Per key, measurements from the same commit are
    kept and a re-measured shape is replaced; rows from other commits are dropped (the class is
    measured anew). The order is derived again from the merged measurements."""
    rows = _index(table.get("rows", []))
    touched: dict[tuple, dict] = {}
    for m in new:
        key = (m["op"], m["device"], m["dtype"], m["class"])
        row = touched.get(key)
        if row is None:
            old = rows.get(key)
            commit = str(source.get("commit", "unknown"))
            same = old is not None and old.get("source", {}).get("commit") == commit
            keep = old if same and not commit.startswith("unknown") else None
            row = {
                "op": m["op"],
                "device": m["device"],
                "dtype": m["dtype"],
                "class": m["class"],
                "order": [],
                "measured": list(keep["measured"]) if keep else [],
                "excluded": dict(keep.get("excluded", {})) if keep else {},
                "source": dict(source),
            }
            touched[key] = rows[key] = row
        row["measured"] = [s for s in row["measured"] if s["shape"] != m["shape"]]
        if m["ms"]:
            row["measured"].append({"shape": m["shape"], "ms": dict(m["ms"])})
        row["excluded"].update(m.get("excluded", {}))
    for row in touched.values():
        order, why = derive_order(row["measured"], {})
        failed = {b: w for b, w in row["excluded"].items() if w.startswith("FAILED")}
        row["order"] = [b for b in order if b not in failed]
        row["excluded"] = {**why, **failed}
    table["format"] = TABLE_FORMAT
    table["rows"] = sorted(
        rows.values(), key=lambda r: (r["op"], r["device"], r["dtype"], r["class"])
    )
    return table, list(touched.values())


def write_table(path: str | Path, table: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    about = (
        "Measured backend choices read by lrkernels auto selection (lrkernels/dispatch.py). "
        "Written by bench/*.py --write-table and scripts/gpu_run.sh; not edited by hand."
    )
    table = {"format": TABLE_FORMAT, "about": table.get("about", about), **table}
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1, sort_keys=False)
        f.write("\n")
    tmp.replace(path)
    return path


def format_rows(rows: Iterable[dict]) -> str:
    """One line per table row: key, order and the time ratios to torch."""
    lines = []
    for r in rows:
        ratios = []
        for m in r["measured"]:
            t = m["ms"].get("torch")
            cells = ", ".join(
                f"{b} {m['ms'][b] / t:.2f}x" if t else f"{b} {m['ms'][b]:.4g} ms"
                for b in sorted(m["ms"])
                if b != "torch"
            )
            ratios.append(f"{m['shape']}: {cells or 'torch only'}")
        lines.append(
            f"{r['op']} | {r['device']} | {r['dtype']} | {r['class']} -> {' > '.join(r['order'])}"
        )
        lines += [f"    {s} (time / torch's)" for s in ratios]
        lines += [f"    {b}: {w}" for b, w in sorted(r.get("excluded", {}).items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m lrkernels [TABLE]``: print a table's rows (default: the one in use);
    ``--merge FILE``: copy FILE's rows into the packaged table (a GPU run's table), replacing
    the rows of the same (op, device, dtype, class)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("table", nargs="?", help=f"table file (default: {_TABLE_PATH})")
    p.add_argument("--merge", metavar="FILE", help="merge FILE's rows into TABLE (default: the "
                   "packaged lrkernels/dispatch_table.json)")  # fmt: skip
    args = p.parse_args(argv)
    if args.merge:
        dst = Path(args.table) if args.table else PACKAGED_TABLE
        table = read_table(dst)
        new = read_table(args.merge)["rows"]
        rows = _index(table["rows"])
        rows.update(_index(new))
        table["rows"] = sorted(
            rows.values(), key=lambda r: (r["op"], r["device"], r["dtype"], r["class"])
        )
        write_table(dst, table)
        print(f"{dst}: {len(new)} row(s) merged from {args.merge}, {len(rows)} in all")
        return 0
    rows = read_table(args.table)["rows"] if args.table else table_rows()
    print(format_rows(rows) if rows else "(no rows: auto selection uses the rules everywhere)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
