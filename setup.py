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


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_include_workaround():
    # torch's CUDA headers include cusparse.h, which a bare toolkit may lack; the CUDA build of
    # torch ships it under site-packages/nvidia/cu13/include (ENVIRONMENT.md).
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    extra = [
        d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d)
    ]
    return extra


def _extensions():
    if _env_flag("LRKERNELS_BUILD_EXT") is False:
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp")
    )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))

    want_cuda = _env_flag("LRKERNELS_BUILD_CUDA")
    can_cuda = torch.version.cuda is not None and _find_nvcc() is not None
    if want_cuda is None:
        want_cuda = can_cuda
    elif want_cuda and not can_cuda:
        raise SystemExit(
            "LRKERNELS_BUILD_CUDA=1 but "
            + ("torch is a CPU build" if torch.version.cuda is None else "nvcc was not found")
        )

    # No -std flag: torch's cpp_extension passes the standard the installed torch needs (C++20 for
    # torch >= 2.10, C++17 before).
    cxx_flags = ["-O3"]
    if want_cuda:
        if not os.environ.get("CUDA_HOME"):
            # torch otherwise infers CUDA_HOME from nvcc's folder (/usr/local/bin -> /usr/local)
            # and the link fails with "cannot find -lcudart".
            os.environ["CUDA_HOME"] = os.path.dirname(
                os.path.dirname(os.path.realpath(_find_nvcc()))
            )
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        ext = CUDAExtension(
            "lrkernels._C",
            cpu_sources + cuda_sources,
            include_dirs=_cuda_include_workaround(),
            define_macros=[("LRKERNELS_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
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
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
