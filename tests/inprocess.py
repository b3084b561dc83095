"""Flower's simulation engine without Ray, for tests whose subject is fedpriv, not Ray.

``run_simulation`` runs the ServerApp in this process and hands every message for a virtual node
to a simulation backend; Flower 1.42 always builds its Ray backend (an actor pool of worker
processes, each importing TensorFlow and tracing the model afresh). :func:`in_process_backend`
swaps in a backend that runs the same ClientApp on a few threads of this process, where the
stack is already imported and warm. Everything else is Flower's own: the in-memory LinkState,
the message queues, the grid the ServerApp talks to, the node contexts and their run config.

What the swap keeps from Ray's backend: each message and context crosses the boundary pickled,
as Ray pickles them, so a ClientApp cannot share objects with the server by accident; an
exception inside the ClientApp reaches Flower as ``ClientAppException``, as Ray's actor raises it;
``num_workers`` messages run at once (a hanging client holds one worker, as it holds an actor).

Simulations in child processes keep Ray (the simulation end-to-end test, ``flwr run .``, the load
test, the scale benchmark).
"""

from __future__ import annotations

import ast
import contextlib
import pickle
import sys
import threading
import types
from typing import Any, Callable, Iterator

from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import Backend

WORKERS = 4
RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


class InProcessBackend(Backend):
    """A simulation backend whose workers are threads of this process."""

    def __init__(self, backend_config: dict[str, Any]) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        # This process's TensorFlow runtime starts before any ClientApp runs on its threads. The
        # ClientApp's outermost mod sizes a fresh Ray worker's thread pools before its first op
        # (clients/worker_threads.py), and does nothing outside a Ray actor; were it to run here,
        # it would still change nothing, rather than reconfigure the runtime while other threads
        # of the process start or use it.
        from fedpriv.common.tf_runtime import tf

        tf().constant(0.0)
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return WORKERS

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        assert self.app_fn is not None, "build() first"
        message, context = pickle.loads(pickle.dumps((message, context)))
        try:
            app = self.app_fn()
            reply = app(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        return pickle.loads(pickle.dumps((reply, context)))


@contextlib.contextmanager
def in_process_backend() -> Iterator[None]:
    """Within the block, Flower's simulations run their ClientApps on threads of this process.

    Flower's ``start_vce`` imports ``RayBackend`` from its module when a simulation starts; within
    the block that module name holds a stand-in whose ``RayBackend`` is :class:`InProcessBackend`,
    so Ray's own backend module is not imported at all (importing it costs about 16 s)."""
    stand_in = types.ModuleType(RAY_BACKEND_MODULE)
    stand_in.RayBackend = InProcessBackend  # type: ignore[attr-defined]
    saved = sys.modules.get(RAY_BACKEND_MODULE)
    sys.modules[RAY_BACKEND_MODULE] = stand_in
    parse = ast.parse
    ast.parse = _one_at_a_time(parse)
    try:
        yield
    finally:
        ast.parse = parse
        if saved is None:
            sys.modules.pop(RAY_BACKEND_MODULE, None)
        else:
            sys.modules[RAY_BACKEND_MODULE] = saved


def _one_at_a_time(parse: Callable[..., Any]) -> Callable[..., Any]:
    """``ast.parse``, never run on two threads at once. CPython 3.11 keeps the AST constructor's
    recursion depth in interpreter-wide state, so two threads building ASTs at once (TensorFlow's
    autograph parses each ClientApp's train step when it traces it) can fail one of them with
    "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905). Ray's workers are
    processes and never meet it; these threads do."""
    lock = threading.Lock()

    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return parse(*args, **kwargs)
    return locked
