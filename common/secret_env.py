"""Key material passed by environment variable, held out of child processes.

``$FEDPRIV_CHECKPOINT_KEY`` (the sealing key itself), ``$FEDPRIV_KEY_PASSPHRASE`` and
``$FEDPRIV_PKCS11_PIN`` hold secrets
in the environment, which every child process inherits. The ``fedpriv`` command moves them out of
its environment when it starts (:func:`held`); fedpriv reads them from this module, and hands them
only to the children that need them (:func:`for_child`): the SuperLink (its ServerApp processes
seal checkpoints and sign ledgers), a node's app runner when its data file or key is sealed or
protected, Ray's workers when simulated nodes read a sealed data file. Key *files*
(``$FEDPRIV_CHECKPOINT_KEY_FILE``, ``$FEDPRIV_KEY_PASSPHRASE_FILE``) are names, not secrets, and
stay in the environment.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

CHECKPOINT_KEY_ENV = "FEDPRIV_CHECKPOINT_KEY"
PASSPHRASE_ENV = "FEDPRIV_KEY_PASSPHRASE"
PKCS11_PIN_ENV = "FEDPRIV_PKCS11_PIN"
KEY_MATERIAL_ENV = (CHECKPOINT_KEY_ENV, PASSPHRASE_ENV, PKCS11_PIN_ENV)

_held: dict[str, str] = {}


def get(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of ``name``: from ``env`` when given, else this process's environment, else
    what :func:`held` took out of it."""
    if env is not None:
        return env.get(name) or None
    return os.environ.get(name) or _held.get(name) or None


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Take the key material out of ``os.environ`` for the duration (a command's run), so no
    child inherits it unasked; put it back afterwards."""
    taken = {name: os.environ.pop(name) for name in KEY_MATERIAL_ENV if name in os.environ}
    previous = dict(_held)
    _held.clear()
    _held.update(taken)
    try:
        yield
    finally:
        _held.clear()
        _held.update(previous)
        for name, value in taken.items():
            os.environ.setdefault(name, value)


def for_child(*names: str) -> dict[str, str]:
    """The held values of ``names`` (those set), for the environment of a child that needs them."""
    return {name: value for name in names if (value := get(name))}


def scrubbed(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without key material."""
    return {k: v for k, v in env.items() if k not in KEY_MATERIAL_ENV}
