"""``python -m lrkernels [TABLE] [--merge FILE]``: the backends this machine has, and auto
selection's table (`lrkernels.dispatch.main`: print it, or merge a GPU run's table into it)."""

import sys

from . import available_backends
from .dispatch import main

for name, why in available_backends().items():
    print(f"backend {name}: {why or 'available'}")
sys.exit(main(sys.argv[1:]))
