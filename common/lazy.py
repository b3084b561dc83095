"""Modules imported on first use.

A ClientApp process runs one message and exits (Flower starts a fresh one for each message of a
deployed node), and most messages (SecAgg+'s key, share and unmask stages) never account for
privacy; a simulation without DP never accounts at all. ``dp_accounting`` imports scipy, which
costs seconds of CPU per process, so the modules that use it bind it with :func:`lazy_import`: a
stand-in whose first attribute read imports the module with ``importlib.import_module``.

Not the standard library's ``importlib.util.LazyLoader``: on Python 3.11 a thread that reads an
attribute while another thread is loading the module can find it half-filled and fail with an
``AttributeError`` (CPython gh-114763, fixed in 3.12.3). ``import_module`` holds the import
system's lock for the module until it is fully executed, so every thread waits for a whole module.
When fedpriv requires Python 3.12.3 or later, ``LazyLoader`` is safe to use here again.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


class _OnFirstUse(ModuleType):
    """Stands in for module ``__name__``: any attribute it lacks is read from the real module,
    imported on the first such read."""

    def __getattr__(self, attr: str) -> Any:
        module = self.__dict__.get("_fedpriv_module")  # set once import_module has returned the whole module
        if module is None:
            if attr.startswith("__") and attr.endswith("__"):  # tools probe dunders: never an import for them
                raise AttributeError(f"module {self.__name__!r} is not imported yet (no {attr})")
            module = self.__dict__["_fedpriv_module"] = importlib.import_module(self.__name__)
        return getattr(module, attr)


def lazy_import(name: str) -> ModuleType:
    """``name``, imported when one of its attributes is first read (the module itself if it is
    already imported). A missing module is reported at once, not at first use."""
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _OnFirstUse(name)
