"""fedpriv: privacy-preserving federated learning on Flower, TensorFlow Privacy and dp-accounting.

Its parts are ``fedpriv.common`` (config, data, models, accounting, the ledger, crypto helpers),
``fedpriv.server`` (the ServerApp and what it runs), ``fedpriv.clients`` (the ClientApp and the
node's guards) and ``fedpriv.simulations`` (local runs). In the wheel they are subpackages of this
package. In a source checkout (and in the Flower app bundle built from it) they are the
repository's top-level folders ``common/``, ``server/``, ``clients/`` and ``simulations/``; this
package's search path then includes the checkout's root, so the same ``fedpriv.*`` names work.
Installing fedpriv adds no top-level import name but ``fedpriv``.
"""

from pathlib import Path as _Path

_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "common" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 - a package's __path__
