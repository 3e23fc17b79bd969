"""Chimera's routing scorers, one file each. Importing this package registers every module in this folder (a new
scorer needs no line here, only its registration line and a weight in the policy's config)."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
