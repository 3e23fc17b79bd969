"""The built-in predictor factories, one file each. Importing this package registers them: the built-ins first, then
any other module dropped into this folder (a new predictor needs no line here)."""

import importlib
import pkgutil

from chimera.predict.plugins import (  # noqa: F401  (registers)
    size_prior, kind_accuracy, trained_router, running_mean, stage_mean, trained_forest, oracle, online,
)

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
