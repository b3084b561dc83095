"""Modules imported on first use.

A ClientApp process runs one message and exits (Flower starts a fresh one for each message of a
deployed node), and most messages (SecAgg+'s key, share and unmask stages) never account for
privacy. ``dp_accounting`` imports scipy, which costs seconds of CPU per process, so the modules
on a client's import path bind it with :func:`lazy_import`: the name is a module object whose
first attribute access loads it (the standard library's ``importlib.util.LazyLoader``).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name``, loaded when one of its attributes is first read (at once if already loaded)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
