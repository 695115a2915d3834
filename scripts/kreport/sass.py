"""Static facts of compiled GPU kernels from CUDA's binary tools (no GPU needed).

`cuobjdump -res-usage` gives per kernel the registers per thread, the stack frame and the static
shared memory; `cuobjdump -sass` the instructions, of which the report counts the classes a
kernel engineer checks first:

- tensor-core MMAs: HGMMA (warpgroup ``wgmma``, sm_90), HMMA (``mma.sync`` / wmma), IMMA/QGMMA...;
- LDSM: ``ldmatrix``;
- asynchronous copies: LDGSTS (``cp.async``), UTMALDG (TMA tile load), UBLKCP (bulk copy);
- local memory: STL / LDL, i.e. register spills (or a local array the compiler could not keep in
  registers); either way, traffic the kernel was not written to make.

cuobjdump's SHARED includes the 1 KiB per-block reservation of sm_90 whenever a kernel uses
shared memory at all (ptxas ``-v`` prints the same number without it); `static_smem` removes it.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MMA_OPS = ("HGMMA", "HMMA", "IMMA", "IGMMA", "QGMMA", "OMMA", "UTCMMA")
LDSM_OPS = ("LDSM",)
ASYNC_OPS = ("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF")
LOCAL_OPS = ("STL", "LDL")
COUNTED = MMA_OPS + LDSM_OPS + ASYNC_OPS + LOCAL_OPS + ("STSM", "UTMASTG", "I2F", "PRMT", "BAR")

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RES_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def find_tool(name: str) -> str | None:
    """Path of a CUDA binary tool (cuobjdump, nvdisasm): $PATH, $CUDA_HOME/bin, /usr/local/cuda,
    the nvidia-* pip packages (site-packages/nvidia/*/bin), then the copy Triton ships."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [
        os.path.join(os.environ[v], "bin") for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ
    ]
    dirs.append("/usr/local/cuda/bin")
    for site in sys.path:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin")))
        dirs.append(os.path.join(site, "triton", "backends", "nvidia", "bin"))
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def resource_usage(path: str | Path, arch: str | None = "sm_90a") -> dict[str, dict]:
    """Mangled kernel name -> {"REG", "STACK", "SHARED", "LOCAL", ...} of every kernel for `arch`
    in a fat binary / shared library (or of a lone cubin with arch=None)."""
    cmd = [_require("cuobjdump"), "-res-usage"] + (["-arch", arch] if arch else []) + [str(path)]
    return parse_resource_usage(_run(cmd))


def parse_resource_usage(text: str) -> dict[str, dict]:
    """The -res-usage part of cuobjdump's output, per mangled kernel name; "source" is the file
    the kernel was compiled from (the fat binary's identifier), when cuobjdump names it."""
    out: dict[str, dict] = {}
    current = None
    source = None
    for line in text.splitlines():
        if line.startswith("identifier = "):
            source = os.path.basename(line.split("=", 1)[1].strip())
            continue
        m = _RES_FUNCTION.match(line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            out[current] = {k: int(v) for k, v in _RES_FIELD.findall(line)}
            if source:
                out[current]["source"] = source
            current = None
    return out


def count_instructions(sass: str) -> dict[str, collections.Counter]:
    """Mangled kernel name -> counts of the COUNTED opcode classes in cuobjdump/nvdisasm text."""
    out: dict[str, collections.Counter] = {}
    current: collections.Counter | None = None
    for line in sass.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = out.setdefault(m.group(1), collections.Counter())
            continue
        if current is None:
            continue
        m = _INSTR.search(line)
        if m:
            op = m.group(1)
            if op in COUNTED:
                current[op] += 1
    return out


def sass_of_cubin(cubin: str | Path) -> str:
    return _run([_require("cuobjdump"), "-sass", str(cubin)])


def analyze_cubin(cubin: str | Path) -> tuple[dict[str, dict], dict]:
    """(resource usage, instruction counts) per kernel of one cubin, from one cuobjdump call."""
    text = _run([_require("cuobjdump"), "-res-usage", "-sass", str(cubin)])
    return parse_resource_usage(text), count_instructions(text)


def sass_counts(path: str | Path, arch: str = "sm_90a") -> dict[str, collections.Counter]:
    """count_instructions of every `arch` kernel of a fat binary: its cubins are extracted and
    disassembled in parallel (one cuobjdump per cubin)."""
    with tempfile.TemporaryDirectory(prefix="kreport-") as tmp:
        _run_in(tmp, [_require("cuobjdump"), "-xelf", "all", str(Path(path).resolve())])
        cubins = sorted(Path(tmp).glob(f"*.{arch}.cubin"))
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            texts = list(pool.map(sass_of_cubin, cubins))
    out: dict[str, collections.Counter] = {}
    for text in texts:
        out.update(count_instructions(text))
    return out


def _run_in(cwd: str, cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def _require(tool: str) -> str:
    p = find_tool(tool)
    if p is None:
        raise FileNotFoundError(f"{tool} not found (CUDA toolkit, nvidia-cuda-* wheels or Triton)")
    return p


def demangle(names: list[str]) -> dict[str, str]:
    """Itanium-ABI names (g++ and nvcc mangle alike) -> demangled, through c++filt; names stay
    as they are without it."""
    names = list(dict.fromkeys(names))
    filt = shutil.which("c++filt")
    if not names or filt is None:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines, strict=True))


def static_smem(res: dict[str, int]) -> int:
    """Static shared memory in bytes as ptxas -v reports it (cuobjdump adds the 1 KiB per-block
    reservation whenever a kernel uses shared memory)."""
    shared = res.get("SHARED", 0)
    return max(0, shared - 1024) if shared else 0


def _split_top(text: str, sep: str) -> list[str]:
    """Splits on `sep` outside <...> and (...)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "<(":
            depth += 1
        elif c in ">)":
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


def short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::k<__nv_bfloat16, 64, true>(Params<...>)`` ->
    ``k<bf16, 64, true>``: no return type, namespaces or parameter list."""
    s = demangled.strip()
    if s.endswith(")"):  # drop the parameter list: the last top-level (...)
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += s[i] == ")"
            depth -= s[i] == "("
            if depth == 0:
                s = s[:i]
                break
    if s.startswith("void "):
        s = s[5:]
    s = _split_top(s, "::")[-1]
    s = re.sub(r"(?:\(anonymous namespace\)|[A-Za-z_]\w*)::", "", s)  # in template arguments
    s = re.sub(r"\((\w+)\)(-?\d+)", r"\1\2", s)  # an enum value: (Layout)0 -> Layout0
    return s.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace(" ", "")


def flags(counts: collections.Counter) -> dict[str, str]:
    """The report's summary of instruction counts: which MMA, ldmatrix, which async copies,
    local loads/stores."""
    mma = "+".join(op for op in MMA_OPS if counts.get(op))
    asyn = "+".join(op for op in ASYNC_OPS if counts.get(op))
    return {
        "mma": mma or "-",
        "ldsm": "LDSM" if counts.get("LDSM") else "-",
        "async": asyn or "-",
        "local": f"{counts.get('LDL', 0)}/{counts.get('STL', 0)}",
    }
