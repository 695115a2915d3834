"""Builds lrkernels and its extension lrkernels._C.

The C++ CPU sources are always built. The CUDA sources are built whenever the installed torch
has CUDA and nvcc is found -- never gated on a GPU being present, so CI (no GPU) compiles and
links them. LRKERNELS_BUILD_CUDA=0/1 forces either way; TORCH_CUDA_ARCH_LIST is honoured and
defaults to sm_80 and sm_90a. LRKERNELS_BUILD_EXT=0 skips the extension entirely (pure Python
install: the torch and triton backends still work).

Install with `pip install --no-build-isolation -e .` (build isolation would pull a second torch).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _cuda_home():
    """The CUDA toolkit folder (holding bin/nvcc, include/, lib64/), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:  # follow symlinks: /usr/bin/nvcc -> /opt/cuda-13/bin/nvcc
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(home, "include")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _cuda_include_workaround():
    # torch's CUDA headers include cusparse.h, which a bare toolkit may lack; the CUDA build of
    # torch ships it under site-packages/nvidia/cu13/include (ENVIRONMENT.md). Searched after
    # the toolkit's own headers (-idirafter): that folder also holds a partial cuda_runtime.h
    # that must not shadow the toolkit's.
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    hits = glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h"))
    return sorted({os.path.dirname(h) for h in hits})


def _extensions():
    if _env_flag("LRKERNELS_BUILD_EXT") is False:
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home:
        # torch otherwise infers CUDA_HOME from nvcc's folder (/usr/local/bin/nvcc gives
        # /usr/local): the wrong headers, and the link fails with "cannot find -lcudart". It
        # reads CUDA_HOME when torch.utils.cpp_extension is imported, so set it first.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp")
    )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))

    want_cuda = _env_flag("LRKERNELS_BUILD_CUDA")
    can_cuda = torch.version.cuda is not None and cuda_home is not None
    if want_cuda is None:
        want_cuda = can_cuda
    elif want_cuda and not can_cuda:
        raise SystemExit(
            "LRKERNELS_BUILD_CUDA=1 but "
            + (
                "torch is a CPU build"
                if torch.version.cuda is None
                else "no CUDA toolkit was found (set CUDA_HOME)"
            )
        )

    # No -std flag: torch's cpp_extension passes the standard the installed torch needs (C++20 for
    # torch >= 2.10, C++17 before).
    # -g0: Python's own CFLAGS carry -g, and debug info for these ATen-heavy files made each
    # compile several times slower (lowrank_cpu.cpp: 2m13s with -g on a loaded 2-core machine,
    # 19s without).
    cxx_flags = ["-O3", "-g0"]
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        ext = CUDAExtension(
            "lrkernels._C",
            cpu_sources + cuda_sources,
            define_macros=[("LRKERNELS_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags + [f"-idirafter{d}" for d in _cuda_include_workaround()],
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
        )
    else:
        ext = CppExtension("lrkernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="lrkernels",
    version="0.1.0",
    description="Fused low-rank, sparse-attention and int8 kernels for PyTorch (CUDA C++ and Triton)",
    packages=find_packages(include=["lrkernels", "lrkernels.*"]) + ["lrkernels.triton_kernels"],
    package_dir={"lrkernels.triton_kernels": "triton_kernels"},
    package_data={"lrkernels": ["dispatch_table.json"]},  # auto selection's measured table
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
