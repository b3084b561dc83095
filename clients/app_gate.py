"""The node's app gate: a ClientApp runs only if its bundle is signed by a key the node trusts.

``fedpriv node join`` runs ``flower-supernode --isolation process`` and, in place of the
SuperExec Flower would start, this module's ``superexec`` mode: Flower's own SuperExec
(``flower_superexec``), taking ClientApp tasks only, whose command for them is this module's
``clientapp`` mode instead of ``flwr-clientapp``. That mode is Flower's ``flwr-clientapp`` with one change: Flower's
``pull_task_input`` (an attribute of ``flwr.supernode.runtime.run_clientapp``) is wrapped so that
right after the task's message, context, run and FAB arrive, and before Flower installs the FAB
(``install_from_fab``) or imports anything from it, the node checks that the FAB's bytes are the
ones its hash names and that ``run.app_signature`` verifies against the node's trusted keys
(:func:`common.appsign.check_bundle`). Otherwise the task ends there: the node logs the refusal,
records it in its own signed ledger (kind ``app_refusal``), answers the server with an error
reply (code :data:`common.appsign.APP_REFUSED_CODE`) and the app's code is never installed.

The check runs in the node's own process, with keys read from the node's disk (``$FEDPRIV_APP_TRUST``,
set by ``fedpriv node join``), over the very bytes that would then be installed: nothing the
SuperLink sends can skip it.

The superexec mode starts ClientApp tasks warm (:mod:`clients.warm_start`): each task's
process is forked from this module's ``zygote`` mode, which has imported Flower's runtime and
TensorFlow once, and runs the same ``clientapp`` mode (:func:`run_clientapp`), gate included.

To drop this module when Flower verifies self-hosted bundles on the SuperNode: run
``flower-supernode`` in its default isolation with ``--trusted-entities``, and delete this file
and :mod:`common.appsign`.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from fedpriv.common.appsign import (
    APP_REFUSED_CODE, SIGNATURE_SETTING, TRUST_ENV, AppRefused, check_bundle, load_trusted_keys,
)
from fedpriv.common.errors import FedprivError

Pull = Callable[[Any], tuple[Any, Any, Any, Any]]


def trusted_keys_from_environment() -> list:
    paths = [p for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p]
    if not paths:
        raise AppRefused(f"this node trusts no app-signing key (${TRUST_ENV} is empty)")
    return load_trusted_keys(Path(p) for p in paths)


def check_task(context: Any, fab: Any, trusted: list) -> None:
    """The gate: :class:`AppRefused` unless the task's FAB is signed by a trusted key."""
    signature = context.run_config.get(SIGNATURE_SETTING, "")
    check_bundle(fab.hash_str, fab.content, signature if isinstance(signature, str) else "", trusted)


def record_refusal(context: Any, reason: str) -> None:
    """Append the refusal to the node's own signed ledger (its ``state-dir``/``node-name``, as
    ``fedpriv node join`` sets them); a node without them (or a ledger that cannot be written)
    still refuses."""
    config = context.node_config
    if not config.get("state-dir") or not config.get("node-name"):
        return
    try:
        from fedpriv.clients.budget import open_guard
        from fedpriv.common.config import RunConfig
        from fedpriv.common.ledger_schema import NODE, Kind

        state_dir = Path(str(config["state-dir"])) / str(config["node-name"])
        with open_guard(state_dir, 0.0, RunConfig().privacy.delta) as guard:
            guard.ledger.append(actor=NODE, kind=Kind.APP_REFUSAL, round=None, note=reason)
    except Exception as exc:  # the refusal stands either way
        print(f"fedpriv: could not record the app refusal in the node's ledger ({exc})", file=sys.stderr)


def gated(pull: Pull, trusted: list | None = None, push: Callable[..., None] | None = None) -> Pull:
    """Flower's ``pull_task_input`` with the gate after it. On refusal the error reply is pushed
    here (Flower's handler only replies once ``pull_task_input`` has returned), then
    :class:`AppRefused` propagates into Flower's own error handling, which ends the task."""

    def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
        message, context, run, fab = pull(client)
        try:
            check_task(context, fab, trusted if trusted is not None else trusted_keys_from_environment())
        except AppRefused as refusal:
            from flwr.app import Error, Message
            from flwr.supernode.runtime import run_clientapp

            reason = f"fedpriv node refused the app: {refusal}"
            print(f"fedpriv: {reason} (run {getattr(run, 'run_id', '?')}); none of its code was installed "
                  f"or run", file=sys.stderr, flush=True)
            record_refusal(context, reason)
            (push or run_clientapp.push_message)(
                client, Message(Error(code=APP_REFUSED_CODE, reason=reason), reply_to=message), context)
            raise
        return message, context, run, fab

    return pull_task_input


def install() -> None:
    """Put the gate into Flower's ClientApp runner (this process only)."""
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.pull_task_input = gated(run_clientapp.pull_task_input)


def _launcher() -> str:
    """An executable that runs this module's ``clientapp`` mode (Flower's SuperExec starts a
    ClientApp task as one command followed by its arguments); removed when this process exits."""
    folder = tempfile.mkdtemp(prefix="fedpriv-gate-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "fedpriv-clientapp"
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fedpriv.clients.app_gate clientapp \"$@\"\n")
    path.chmod(0o700)
    return str(path)


def flwr_clientapp_entry() -> Callable[[], None]:
    """Flower's own ``flwr-clientapp`` entry point, imported without running the ``__init__`` of its
    package ``flwr.supernode.cli``, which imports the whole SuperNode (SQLAlchemy, Alembic, the
    SuperNode's servers): about 2 s of CPU in every ClientApp process, and Flower starts one for
    every message. The package is entered in ``sys.modules`` with its real search path and spec,
    so ``flwr.supernode.cli.flwr_clientapp`` itself is Flower's module, imported as usual.
    To drop this when ``flwr.supernode.cli`` stops importing the SuperNode: import
    ``flwr_clientapp`` directly again (tests/test_appsign.py checks what it imports).
    """
    import importlib.util
    import types

    name = "flwr.supernode.cli"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)  # imports flwr.supernode, not this package
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{name} is not a package")
        package = types.ModuleType(name)
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        sys.modules[name] = package
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    return flwr_clientapp


def run_clientapp(argv: list[str]) -> None:
    """One ClientApp task: Flower's ``flwr-clientapp`` with these arguments, and the gate."""
    flwr_clientapp = flwr_clientapp_entry()
    install()
    sys.argv = ["flwr-clientapp", *argv]
    flwr_clientapp()


def _warm_executor(get_executor: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's executor factory, giving :class:`clients.warm_start.WarmStart` in place of its
    subprocess executor."""
    from flwr.supercore.constant import ExecutorType

    def make(executor_type: Any, *args: Any, **kwargs: Any) -> Any:
        if executor_type == ExecutorType.SUBPROCESS:
            from fedpriv.clients.warm_start import WarmStart

            return WarmStart()
        return get_executor(executor_type, *args, **kwargs)

    return make


def main(argv: list[str]) -> None:
    mode = argv[0] if argv else ""
    if mode == "clientapp":  # one ClientApp task, as flwr-clientapp with the gate
        run_clientapp(argv[1:])
    elif mode == "zygote":  # ClientApp tasks forked from one process that imported everything
        from fedpriv.clients.warm_start import zygote

        zygote(run_clientapp, flwr_clientapp_entry)
    elif mode == "superexec":  # Flower's SuperExec, starting ClientApp tasks in clientapp mode
        from flwr.supercore.cli.flower_superexec import flower_superexec
        from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
        from flwr.supercore.superexec import run_superexec
        from flwr.supercore.superexec.plugin import AutoExecPlugin

        class ClientAppsOnly(AutoExecPlugin):
            """Flower's plugin, taking ClientApp tasks only (a SuperNode can also be handed
            agent-app tasks, which would run a bundle's code without this gate)."""

            supported_task_types = frozenset({TaskType.CLIENT_APP})

        try:
            trusted_keys_from_environment()  # a node without trusted keys must not start
        except FedprivError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        run_superexec.AutoExecPlugin = ClientAppsOnly
        run_superexec.get_executor = _warm_executor(run_superexec.get_executor)
        TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = _launcher()  # cold starts (clients.warm_start)
        sys.argv = ["flower-superexec", *argv[1:]]
        flower_superexec()
    else:
        print("usage: python -m fedpriv.clients.app_gate {superexec|clientapp|zygote} FLOWER-ARGS...",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
