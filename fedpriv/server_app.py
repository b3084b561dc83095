"""The ServerApp Flower loads for this app (``[tool.flwr.app.components]`` in pyproject.toml).

Flower's simulation runtime loads the ServerApp on one thread while another checks the ClientApp,
so two threads may import ``fedpriv`` at once. CPython looks a subpackage up in its parent's
search path without waiting for a parent that another thread is still initialising, and in a
checkout ``fedpriv``'s search path reaches ``common/``, ``server/`` and ``clients/`` only once
``fedpriv/__init__.py`` has run. A component named ``fedpriv.server.app`` therefore failed with
"No module named 'fedpriv.server'" in most such races. This module lies in ``fedpriv/`` itself,
so Flower always finds it, and its ``import fedpriv`` waits until ``fedpriv`` is initialised
before anything under it is looked up (tests/test_layers.py).
"""

import fedpriv  # noqa: F401 - waits for another thread that is initialising fedpriv; see above
from fedpriv.server.app import app

__all__ = ["app"]
