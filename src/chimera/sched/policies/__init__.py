"""The built-in policies, one file each. Importing this package registers them: the built-ins first, in the
benchmarks' row order, then any other module dropped into this folder (a new policy needs no line here)."""

import importlib
import pkgutil

from chimera.sched.policies import vllm, least_loaded, routellm, sjf, ltr, mlfq, chimera  # noqa: F401  (registers)

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
