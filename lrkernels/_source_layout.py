"""Makes ``lrkernels.triton_kernels`` importable from a source checkout.

Installed, the top-level folder ``triton_kernels/`` becomes the subpackage
``lrkernels.triton_kernels`` (setup.py maps it; a top-level ``triton_kernels`` name would clash
with Triton's own kernel package). Run from the repository without installing, this module
registers the same mapping so that both layouts import identically.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_NAME = "lrkernels.triton_kernels"


def ensure_triton_kernels_package() -> None:
    if _NAME in sys.modules or importlib.util.find_spec(_NAME) is not None:
        return
    folder = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels"
    )
    init = os.path.join(folder, "__init__.py")
    if not os.path.exists(init):
        return
    spec = importlib.util.spec_from_file_location(_NAME, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
