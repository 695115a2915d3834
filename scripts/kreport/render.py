"""The report as markdown (bench/results/kernel_report.md): one table per family and side for the
headline launches, then every CUDA kernel of the extension and every compiled Triton kernel."""

from __future__ import annotations

from . import device, sass

FAMILIES = (
    ("lowrank", "Low-rank linear, y = (x·Vᵀ)·Uᵀ + b (dx = lowrank(dy, Vᵀ, Uᵀ))"),
    ("int8", "int8 weight-only linear (W8A16), y = x·Wᵀ + b, grad_input dx = dy·W"),
    ("attention", "Block-sparse attention, B=2 H=16, blocks 128"),
    ("lora", "LoRA, y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b (4096², r=16)"),
)
_PREFIX = {"attention": "attn"}  # a family's case ids start with this word

LEGEND = """\
How to read it. Every number comes from compiled code, not from a GPU run: registers and stack
from `cuobjdump -res-usage`; **LDL/STL** = local-memory load/store instructions in the SASS
(register spills, or a local array) — CI fails when a kernel a headline shape launches has any
(tests/test_kernel_report.py); **smem** = static + dynamic shared memory per block (the runtime
adds 1 KiB per block, counted in the occupancy); **blocks/SM** = resident blocks per SM on an
H200 and the resource that limits them (regs: 65,536 per SM in 4 sub-partitions, allocated per
warp in units of 256; smem: 228 KiB per SM; threads: 2,048; blocks: 32); **waves** = grid blocks
/ (blocks/SM × 132 SMs): below 1 leaves SMs idle for the whole kernel; **MMA** = tensor-core
instructions (HGMMA: Hopper warpgroup `wgmma`; HMMA: `mma.sync`/wmma); **LDSM** = `ldmatrix`;
**async** = asynchronous global→shared copies (LDGSTS: `cp.async`; UTMALDG: TMA). **floor** =
the shape's roofline time at the H200's measured peaks (4.3 TB/s copy, 770 TFLOP/s bf16 matmul;
lrkernels.roofline bytes and FLOPs; attention: FLOPs of the computed blocks): a GPU run reports
time / floor, the fraction of the roofline the kernels reach."""


def _kib(n: int) -> str:
    return "0" if not n else f"{n / 1024:.1f}K"


def _waves(w) -> str:
    return "no fit" if w is None else f"{w:.2f}"


def _grid(g) -> str:
    g = list(g)
    while len(g) > 1 and g[-1] == 1:
        g.pop()
    return "×".join(str(x) for x in g)


def _occ(ln: dict) -> str:
    return f"{ln['blocks_per_sm']} ({ln['limiter']})"


def _flag_cells(counts: dict) -> list[str]:
    f = sass.flags(counts)
    return [f["mma"], f["ldsm"], f["async"]]


def _local(counts: dict) -> str:
    ldl, stl = counts.get("LDL", 0), counts.get("STL", 0)
    return f"**{ldl}/{stl}**" if ldl or stl else "0"


def _case_label(case_id: str) -> str:
    return case_id.split(" ", 1)[1]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _cuda_rows(report: dict, family: str, host: bool) -> list[list[str]]:
    cuda = report["cuda"]
    floors = {c["id"]: c["floor"] for c in report["cases"]}
    rows, seen = [], set()
    for ln in cuda.get("launches", []):
        if ln["family"] != family or ln["host_path"] != host:
            continue
        k = cuda["kernels"].get(ln["kernel"])
        first = ln["case"] not in seen
        seen.add(ln["case"])
        label = _case_label(ln["case"]) if first else ""
        if k is None:
            rows.append([label, ln["path"], ln["kernel"], "?"] + [""] * 10)
            continue
        rows.append(
            [label, ln["path"], f"`{k['short']}`", _grid(ln["grid"]), ln["block"], k["regs"],
             _local(k["counts"]), f"{_kib(k['static_smem'])}+{_kib(ln['dynamic_smem'])}",
             _occ(ln), _waves(ln["waves"]), *_flag_cells(k["counts"]),
             floors[ln["case"]] if first and host else ""]
        )  # fmt: skip
    return rows


def _triton_rows(report: dict, family: str) -> list[list[str]]:
    tri = report["triton"]
    floors = {c["id"]: c["floor"] for c in report["cases"]}
    rows, seen = [], set()
    for ln in tri.get("launches", []):
        if not ln["case"].startswith(_PREFIX.get(family, family) + " "):
            continue
        k = tri["kernels"][ln["compiled"]]
        first = ln["case"] not in seen
        seen.add(ln["case"])
        cfg = " ".join(
            f"{n}" if v is True else f"{n}={v}"
            for n, v in ln["constexprs"].items()
            if v is not False and v is not None
        )
        tune = "" if ln.get("autotune_config") is None else f" (autotune #{ln['autotune_config']})"
        tune += " (not taken)" if _not_taken(ln) else ""
        rows.append(
            [_case_label(ln["case"]) if first else "", f"`{k['kernel']}`{tune}",
             f"{cfg} w{k['num_warps']} s{k['num_stages']}", _grid(ln["grid"]), ln["block"],
             k["regs"], _local(k["counts"]), f"{_kib(k['static_smem'])}+{_kib(k['dynamic_smem'])}",
             _occ(ln), _waves(ln["waves"]), *_flag_cells(k["counts"]),
             floors[ln["case"]] if first else ""]
        )  # fmt: skip
    return rows


def _other_triton_rows(report: dict, family: str, other: dict) -> list[list[str]]:
    """Launches whose spills, shared memory or blocks/SM differ under another triton (the same
    launch plan: the launchers do not depend on the version)."""
    tri = report["triton"]
    prefix = _PREFIX.get(family, family) + " "
    rows = []
    for a, b in zip(tri.get("launches", []), other.get("launches", []), strict=False):
        if not a["case"].startswith(prefix):
            continue
        ka, kb = tri["kernels"][a["compiled"]], other["kernels"][b["compiled"]]
        if (a["case"], a["kernel"]) != (b["case"], b["kernel"]):
            return [["(launch plans differ: compare the JSON)"] + [""] * 5]
        same = (_local(ka["counts"]), ka["dynamic_smem"], a["blocks_per_sm"]) == (
            _local(kb["counts"]), kb["dynamic_smem"], b["blocks_per_sm"]
        )  # fmt: skip
        if same:
            continue  # a few registers more or less that change nothing
        rows.append(
            [_case_label(a["case"]), f"`{kb['kernel']}`", f"{ka['regs']} → {kb['regs']}",
             f"{_local(ka['counts'])} → {_local(kb['counts'])}",
             f"{_kib(ka['dynamic_smem'])} → {_kib(kb['dynamic_smem'])}",
             f"{_occ(a)} → {_occ(b)}"]
        )  # fmt: skip
    return rows


def _not_taken(ln: dict) -> bool:
    """A Triton launch recorded for a case whose op runs torch instead (triton_plan)."""
    return ln.get("phase", "").endswith("(not taken)")


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _fspan(values) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "no fit"
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}" if lo == hi else f"{lo:.2f}–{hi:.2f}"


def _kspan(values) -> str:
    lo, hi = min(values), max(values)
    return _kib(lo) if lo == hi else f"{_kib(lo)}–{_kib(hi)}"


def _base_name(short: str) -> str:
    return short.split("<", 1)[0]


def summary_rows(report: dict) -> list[list[str]]:
    """One row per (family, side, kernel) over every headline launch of that kernel: how many
    launches, the spans of registers, shared memory, blocks/SM and waves, launches under 2
    waves, and the instruction classes (CUDA: the op's path and the other planned paths
    separately)."""
    groups: dict[tuple, list] = {}
    cuda, tri = report["cuda"], report["triton"]
    for ln in cuda.get("launches", []):
        k = cuda["kernels"].get(ln["kernel"])
        if k is None:
            continue
        side = "CUDA" if ln["host_path"] else "CUDA (other path)"
        key = (ln["family"], side, _base_name(k["short"]))
        groups.setdefault(key, []).append((ln, k, k["static_smem"] + ln["dynamic_smem"]))
    for ln in tri.get("launches", []):
        k = tri["kernels"][ln["compiled"]]
        family = next(f for f, _ in FAMILIES if ln["case"].startswith(_PREFIX.get(f, f) + " "))
        side = f"Triton {tri.get('triton', '')}" + (" (other path)" if _not_taken(ln) else "")
        key = (family, side, k["kernel"])
        groups.setdefault(key, []).append((ln, k, k["static_smem"] + k["dynamic_smem"]))
    order = {f: i for i, (f, _) in enumerate(FAMILIES)}
    rows = []
    for (family, side, name), items in sorted(groups.items(), key=lambda kv: (order[kv[0][0]],
                                              kv[0][1], kv[0][0])):  # fmt: skip
        n = len(items)
        spills = sum(1 for _, k, _ in items if k["counts"].get("LDL") or k["counts"].get("STL"))
        under = sum(1 for ln, _, _ in items if ln["waves"] is None or ln["waves"] < 2)
        per_sm = [device.grid_blocks(ln["grid"]) / device.H200.sms for ln, _, _ in items]
        under_sm = sum(1 for v in per_sm if v < 2)

        def share(op_flag: str, items=items, n=n) -> str:
            have = {sass.flags(k["counts"])[op_flag] for _, k, _ in items} - {"-"}
            hit = sum(1 for _, k, _ in items if sass.flags(k["counts"])[op_flag] != "-")
            label = "/".join(sorted(have)) or "-"
            return label if hit == n else ("-" if hit == 0 else f"{label} ({hit}/{n})")

        rows.append(
            [family, side, f"`{name}`", n, _span([k["regs"] for _, k, _ in items]),
             f"**{spills}**" if spills else "0", _kspan([b for *_, b in items]),
             _span([ln["blocks_per_sm"] for ln, _, _ in items]),
             _fspan([ln["waves"] for ln, _, _ in items]), f"{under}/{n}",
             _fspan(per_sm), f"{under_sm}/{n}", share("mma"), share("ldsm"), share("async")]
        )  # fmt: skip
    return rows


SUMMARY_HEADER = ["family", "side", "kernel", "launches", "regs", "spilling", "smem",
                  "blocks/SM", "waves", "< 2 waves", "CTAs/SM", "< 2 CTAs/SM", "MMA", "LDSM",
                  "async"]  # fmt: skip

CUDA_HEADER = ["case", "path", "kernel", "grid", "block", "regs", "LDL/STL", "smem", "blocks/SM",
               "waves", "MMA", "LDSM", "async", "floor"]  # fmt: skip
TRITON_HEADER = ["case", "kernel", "config", "grid", "threads", "regs", "LDL/STL", "smem",
                 "blocks/SM", "waves", "MMA", "LDSM", "async", "floor"]  # fmt: skip


def markdown(report: dict) -> str:
    cuda, tri = report["cuda"], report["triton"]
    others = report.get("triton_others", [])
    out = [
        "# Static kernel report (H200, sm_90a / sm_90)",
        "",
        "Generated by `python scripts/kernel_report.py` (bench/results/README.md) at commit "
        f"`{report['commit']}`{' with local changes' if report['dirty'] else ''}; "
        f"Triton side: triton {tri.get('triton', '-')}, torch {tri.get('torch', '-')}"
        + "".join(f"; also compiled by triton {o.get('triton', '?')}" for o in others)
        + ". "
        "No GPU involved: CUDA kernels from `cuobjdump` of the built extension (sm_90a), their "
        "launches from the real launch code in the CPU emulation's plan mode; Triton kernels "
        "compiled ahead of time for sm_90 at the configurations the launchers pick on a fake "
        "H200.",
        "",
        LEGEND,
        "",
        "## Spill check (headline kernels)",
        "",
    ]
    if report["spills"]:
        out += [f"- **{s}**" for s in report["spills"]]
    else:
        n_cuda = len({ln["kernel"] for ln in cuda.get("launches", [])})
        n_tri = len({ln["compiled"] for ln in tri.get("launches", [])})
        out.append(
            f"No spill: none of the {n_cuda} CUDA kernels and {n_tri} Triton kernel "
            "specialisations launched by a headline shape has a local load or store."
        )
    problems = cuda.get("errors", []) + [
        f"triton {t.get('triton', '?')}: {e}" for t in [tri, *others] for e in t.get("errors", [])
    ]
    for part, name in ((cuda, "CUDA"), (tri, "Triton"), *((o, "Triton") for o in others)):
        if part.get("status") != "ok":
            problems.append(f"{name} side {part['status']}")
        elif name == "CUDA" and part.get("plan_status") != "ok":
            problems.append(f"CUDA launches {part.get('plan_status')}")
    out += [""] + [f"- {n}" for n in cuda.get("notes", []) + tri.get("notes", []) + problems]
    rows = summary_rows(report)
    if rows:
        out += [
            "",
            "## Headline kernels at a glance",
            "",
            "Every kernel a headline shape launches, over all its headline launches (spans "
            'are min–max; smem = static + dynamic per block; "spilling": launches of a '
            'kernel with local loads/stores; "< 2 waves": launches whose grid covers '
            "fewer than two full waves of the H200, a wave being blocks/SM × 132 CTAs; "
            '"CTAs/SM": grid / 132 SMs, the other reading of "waves", the issues\' "≥ 2 '
            'waves on the device\'s SM count"; "< 2 CTAs/SM": launches below it). CUDA (other '
            "path): a path the op does "
            "not take at these shapes (lowrank forced to the other path, int8's fused kernel "
            "where the op dequantizes + cuBLAS), planned for the spill check.",
            "",
        ]
        out += _table(SUMMARY_HEADER, rows)
    for family, title in FAMILIES:
        out += ["", f"## {title}", ""]
        rows = _cuda_rows(report, family, host=True)
        if rows:
            out += ["### CUDA (the path the torch op takes)", ""] + _table(CUDA_HEADER, rows)
        else:
            listed = sorted(
                k["short"] for k in cuda.get("kernels", {}).values()
                if k.get("source", "").startswith(family + "_") and "fp16" not in k["short"]
            )  # fmt: skip
            out += ["### CUDA", "", "No launch configurations (see the notes above). Its kernels "
                    "in the extension (fp16 twins omitted; all in the last table): "
                    + ", ".join(f"`{s}`" for s in listed)]  # fmt: skip
        rows = _triton_rows(report, family)
        if rows:
            out += ["", f"### Triton {tri.get('triton', '')}", ""] + _table(TRITON_HEADER, rows)
        for other in report.get("triton_others", []):
            if other.get("status") != "ok":
                continue
            rows = _other_triton_rows(report, family, other)
            out += ["", f"Compiled by triton {other['triton']} instead, the launches whose spills, "
                    f"shared memory or blocks/SM change ({len(rows) or 'none'}; registers differ "
                    "by a few in many more: the JSON has them all):", ""]  # fmt: skip
            if rows:
                hdr = ["case", "kernel", "regs", "LDL/STL", "dyn smem", "blocks/SM"]
                out += _table(hdr, rows)
    other = []
    for family, _ in FAMILIES:
        other += _cuda_rows(report, family, host=False)
    if other:
        out += ["", "## CUDA driver paths the torch op does not take at these shapes", "",
                "Planned anyway so that the spill check covers every kernel a headline shape can "
                "launch (which path the op takes: scripts/kreport/cuda_plan.py HOST_PATH).",
                ""] + _table(CUDA_HEADER[:-1], [r[:-1] for r in other])  # fmt: skip
    if cuda.get("kernels"):
        used = {ln["kernel"] for ln in cuda.get("launches", [])}
        rows = [
            [f"`{k['short']}`", k.get("source", ""), "yes" if name in used else "", k["regs"],
             k["stack"],
             _local(k["counts"]), _kib(k["static_smem"]), *_flag_cells(k["counts"])]
            for name, k in sorted(
                cuda["kernels"].items(), key=lambda kv: (kv[1].get("source", ""), kv[1]["short"])
            )
        ]  # fmt: skip
        out += ["", f"## Every CUDA kernel in `{cuda['extension']}` (sm_90a)", "",
                "<details><summary>" f"{len(rows)} kernels</summary>", ""]  # fmt: skip
        out += _table(["kernel", "file", "headline", "regs", "stack", "LDL/STL", "static smem",
                       "MMA", "LDSM", "async"], rows)  # fmt: skip
        out += ["", "</details>"]
    return "\n".join(out) + "\n"
