"""The ClientApp Flower loads for this app (``[tool.flwr.app.components]`` in pyproject.toml).

Named here, in ``fedpriv/`` itself, for the reason ``fedpriv/server_app.py`` gives: so that a
thread loading it never looks up ``fedpriv.clients`` before ``fedpriv`` is initialised.
"""

import fedpriv  # noqa: F401 - waits for another thread that is initialising fedpriv
from fedpriv.clients.app import app

__all__ = ["app"]
