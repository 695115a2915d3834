"""Builds the emulation binary of a kernel family: the family's .cu files rewritten by
generate.py, the runtime and the family's driver, compiled by g++ under a sanitizer.

Objects and binaries are cached under build/cuda_emulation/ (gitignored; safe to delete), keyed
by a hash of everything that goes into them: the generated source (so the current kernel text),
the headers it includes, the runtime, the flags and the compiler version. Editing a kernel
recompiles only that kernel's object. Writes are atomic (temp file + rename), so concurrent test
processes can share the cache.

Usage by hand (from tests/): ``python -m cuda_emulation.build lowrank asan`` prints the binary;
feed it cases on stdin (see drivers/driver_common.h).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import generate

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNTIME = HERE / "runtime"
GENERATOR = HERE / "generate.py"
DRIVERS = HERE / "drivers"
DEFAULT_SRC_DIR = REPO / "csrc" / "cuda"
DEFAULT_CACHE_DIR = REPO / "build" / "cuda_emulation"

COMMON_FLAGS = [
    "-std=c++20",
    "-O1",
    "-g1",  # file:line in sanitizer reports; full -g made the ASan compiles ~1.5x slower
    "-fno-omit-frame-pointer",
    "-fno-strict-aliasing",  # kernels move data through uint4 / float4 views, as CUDA allows
    "-ffp-contract=off",  # a * b + c stays two roundings unless the source calls fmaf
    "-Wno-unknown-pragmas",  # #pragma unroll
]
SANITIZER_FLAGS = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    "tsan": ["-fsanitize=thread"],
}


@dataclass(frozen=True)
class Family:
    """Kernel files (in the source dir) that are emulated together, and the driver that calls
    their launch API. A kernel file that does not exist is left out and the driver is compiled
    with -DEMU_WITHOUT_<STEM> (e.g. EMU_WITHOUT_INT8_GEMM_TC), so it can skip that path."""

    name: str
    kernels: tuple[str, ...]
    driver: str
    # Folder of the kernel files, relative to this package, when they are not library kernels
    # (test-only kernels such as kernels/primitives.cu); they still include the library headers.
    kernel_dir: str | None = None


FAMILIES = {
    "lowrank": Family(
        "lowrank",
        ("lowrank_gemv.cu", "lowrank_tc_down.cu", "lowrank_tc_up.cu"),
        "lowrank_driver.cpp",
    ),
    "int8": Family(
        "int8",
        (
            "int8_mma_fwd.cu",
            "int8_mma_fwd_addend.cu",
            "int8_mma_fwd_dense.cu",
            "int8_mma_tr.cu",
            "int8_dequant.cu",
        ),
        "int8_driver.cpp",
    ),
    "attention": Family(
        "attention",
        (
            "attention_fwd.cu",
            "attention_fwd_f16.cu",
            "attention_fwd_bf16.cu",
            "attention_bwd.cu",
            "attention_bwd_f16.cu",
            "attention_bwd_bf16.cu",
        ),
        "attention_driver.cpp",
    ),
    "primitives": Family("primitives", ("primitives.cu",), "primitives_driver.cpp", "kernels"),
    "lora": Family(
        "lora",
        (
            "lora_gemv.cu",
            "int8_mma_fwd.cu",
            "int8_mma_fwd_addend.cu",
            "int8_mma_fwd_dense.cu",
            "int8_mma_tr.cu",
        ),
        "lora_driver.cpp",
    ),
}


class BuildUnavailable(RuntimeError):
    """No compiler or no CUDA headers here: the tests skip."""


class BuildError(RuntimeError):
    """Generation or compilation failed: the tests fail."""


def find_cuda_include() -> Path | None:
    """The CUDA toolkit's include dir (cuda_fp16.h etc.; nothing CUDA runs)."""
    candidates = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return None


def source_dir() -> Path:
    """The kernel sources: CUDA_EMU_SRC_DIR, else csrc/cuda."""
    return Path(os.environ.get("CUDA_EMU_SRC_DIR") or DEFAULT_SRC_DIR).resolve()


def cache_dir() -> Path:
    """Where objects and binaries are cached: CUDA_EMU_CACHE, else build/cuda_emulation."""
    return Path(os.environ.get("CUDA_EMU_CACHE") or DEFAULT_CACHE_DIR)


def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildUnavailable(f"C++ compiler {cxx!r} not found")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return cxx, version.splitlines()[0] if version else cxx


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        data = p.encode() if isinstance(p, str) else p
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:24]


def _files_digest(paths: list[Path]) -> str:
    return _digest(*(str(p) + "\0" + p.read_text() for p in sorted(paths)))


def _compile(cmd: list[str], out: Path) -> None:
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    proc = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(cmd)}\n{proc.stderr[-6000:]}")
    os.replace(tmp, out)


def _mirror_headers(src_dir: Path, cache: Path) -> Path:
    """A copy of every header under src_dir (same relative paths), in a cache folder named by
    their contents, that the kernels include instead of the originals: a header with inline PTX
    (e.g. common/ptx.cuh) is rewritten by generate.py like a kernel file, so its instructions run
    as their emulations; the others are copied as they are (a header whose PTX generate.py does
    not know stays as written: it must keep that PTX out of host code, e.g. behind
    __CUDA_ARCH__). Each copy starts with a #line naming the original, for diagnostics."""
    paths = sorted(p for ext in ("*.cuh", "*.h") for p in src_dir.rglob(ext))
    texts = {p: p.read_text() for p in paths}
    root = (
        cache
        / "hdr"
        / _digest(
            GENERATOR.read_text(), *(str(p.relative_to(src_dir)) + "\0" + texts[p] for p in paths)
        )
    )
    if root.is_dir():
        return root
    tmp = root.with_name(f"{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in paths:
        out = tmp / p.relative_to(src_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = texts[p]
        if generate.needs_rewrite(text):
            try:
                text = generate.rewrite(text, str(p))
            except generate.GenerateError:
                text = f'#line 1 "{p}"\n' + text
        else:
            text = f'#line 1 "{p}"\n' + text
        out.write_text(text)
    try:
        os.replace(tmp, root)
    except OSError:  # a concurrent build made the same folder
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def build(
    family: str | Family,
    sanitizer: str,
    src_dir: Path | None = None,
    cache: Path | None = None,
) -> Path:
    """Path of the family's binary for `sanitizer` ("asan" or "tsan"), built if not cached.
    src_dir: the kernel sources (default: source_dir()); cache: default cache_dir()."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    src_dir = Path(src_dir).resolve() if src_dir else source_dir()
    cache = Path(cache) if cache else cache_dir()
    cuda_inc = find_cuda_include()
    if cuda_inc is None:
        raise BuildUnavailable("CUDA toolkit headers (cuda_fp16.h) not found; set CUDA_HOME")
    cxx, cxx_version = _compiler()
    flags = COMMON_FLAGS + SANITIZER_FLAGS[sanitizer]
    runtime_key = _files_digest(sorted(RUNTIME.rglob("*.h")))
    headers = _mirror_headers(src_dir, cache)
    includes = [f"-I{RUNTIME / 'shim'}", f"-I{RUNTIME}", f"-I{headers}", f"-I{cuda_inc}"]
    # The mirror's folder name changes with any header; each unit's key covers the headers it
    # includes, so the base key names the source folder instead.
    base_key = _digest(cxx_version, *flags, *includes[:2], str(src_dir), *includes[3:], runtime_key)

    kernel_dir = HERE / fam.kernel_dir if fam.kernel_dir else src_dir
    present = [k for k in fam.kernels if (kernel_dir / k).is_file()]
    if not present:
        raise BuildUnavailable(f"none of {fam.kernels} in {kernel_dir}")
    defines = ["-DEMU_WITHOUT_" + Path(k).stem.upper() for k in fam.kernels if k not in present]
    if fam.kernel_dir:
        defines.append(f"-I{kernel_dir}")

    obj_dir, src_cache = cache / "obj", cache / "src"
    obj_dir.mkdir(parents=True, exist_ok=True)
    src_cache.mkdir(parents=True, exist_ok=True)

    # (key, source file, extra flags) of every translation unit: the generated kernel files
    # (written to the cache; their #line points back at csrc/cuda) and the driver.
    units = []
    for k in present:
        try:
            text = generate.rewrite((kernel_dir / k).read_text(), str(kernel_dir / k))
        except generate.GenerateError as e:
            raise BuildError(f"generate.py on {k}: {e}") from e
        # The headers it includes, and the generator (which rewrites the PTX headers).
        deps = _files_digest([*generate.quoted_includes(kernel_dir / k, src_dir), GENERATOR])
        key = _digest(base_key, text, deps)
        src = src_cache / f"{key}.cpp"
        if not src.is_file():
            tmp = src.with_name(f"{src.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, src)
        units.append((key, src, defines if fam.kernel_dir else []))
    driver = DRIVERS / fam.driver
    deps = _files_digest([*generate.quoted_includes(driver, src_dir), GENERATOR])
    units.append((_digest(base_key, driver.read_text(), deps, *defines), driver, defines))

    jobs = []
    for key, src, extra in units:
        obj = obj_dir / f"{key}.o"
        if not obj.is_file():
            jobs.append(([cxx, *flags, *includes, f"-I{DRIVERS}", *extra, "-c", str(src)], obj))
    if jobs:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for f in [pool.submit(_compile, cmd, obj) for cmd, obj in jobs]:
                f.result()

    objs = [obj_dir / f"{key}.o" for key, _, _ in units]
    binary = cache / "bin" / f"{fam.name}-{sanitizer}-{_digest(*(o.name for o in objs))}"
    if not binary.is_file():
        binary.parent.mkdir(parents=True, exist_ok=True)
        _compile([cxx, *flags, *map(str, objs), "-pthread"], binary)
    _prune(cache, keep=[*objs, binary, headers, *(src for _, src, _ in units[:-1])])
    return binary


def _prune(cache: Path, keep: list[Path], max_age_days: float = 7) -> None:
    """Marks `keep` as used and deletes cache files unused for max_age_days (every kernel edit
    leaves an object behind)."""
    now = time.time()
    for p in keep:
        os.utime(p, (now, now))
    for sub in ("obj", "src", "bin", "hdr"):
        for p in (cache / sub).glob("*"):
            try:
                if now - p.stat().st_mtime > max_age_days * 86400:
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
            except OSError:
                pass  # removed by a concurrent run


def available_kernels(family: str, src_dir: Path | None = None) -> set[str]:
    """The family's kernel files that exist (paths the tests can run)."""
    src_dir = Path(src_dir) if src_dir else source_dir()
    return {k for k in FAMILIES[family].kernels if (src_dir / k).is_file()}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in FAMILIES or sys.argv[2] not in SANITIZER_FLAGS:
        sys.exit(f"usage: python -m cuda_emulation.build {{{','.join(FAMILIES)}}} {{asan,tsan}}")
    print(build(sys.argv[1], sys.argv[2]))
