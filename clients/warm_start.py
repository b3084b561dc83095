"""Warm ClientApp starts on a node: each task's process is forked from one that has already
imported Flower's ClientApp runtime, TensorFlow, dp-accounting and fedpriv's trainer.

Flower's SuperExec starts a fresh ``flwr-clientapp`` process for every message (its
``SubprocessExecutor``), and under SecAgg+ a round is four messages per node. Each process
imports Flower's runtime (about 1.5 s of CPU here), and the one that trains imports TensorFlow
(about 10 s) and dp-accounting (1.5 s) before it can build the model and check the node's
budget. :class:`WarmStart` is that executor with one change: it keeps a *zygote*
(``python -m fedpriv.clients.app_gate zygote``), a process that imports all of this once and
then waits, and hands each ClientApp task's command line to it
over a pipe. The zygote forks; the child runs the task exactly as the app gate's ``clientapp``
mode would (:func:`clients.app_gate.run_clientapp`: Flower's ``flwr-clientapp`` with the
signature gate) and exits. So every task still has a process of its own, started from the
same code, but pays none of the imports.

What a child inherits is only imported code: the zygote builds no model, opens no connection,
starts no TensorFlow runtime and draws no randomness before it forks. Every secret a task
draws comes from ``os.urandom`` at the time it is needed (:mod:`common.entropy`: the DP noise
key before each step, the sampling generator each round, SecAgg+'s keys), and Python's
``random`` and OpenSSL reseed in a forked child anyway. On a machine with an NVIDIA device the
zygote does not import TensorFlow (a CUDA runtime initialised before ``fork`` is unusable in
the child), and preloads the rest.

If the zygote cannot start or dies, tasks start as Flower starts them (a fresh process each),
and the node's log says so. To drop this module: when Flower's SuperExec can keep warm local
processes itself, remove :class:`WarmStart` from :func:`clients.app_gate.main`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any, Callable

from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TaskType
from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor

from fedpriv.common.tf_runtime import nvidia_device_present

READY = "fedpriv node: ClientApp tasks start warm"
COLD = "fedpriv node: ClientApp tasks start cold"


def command_line(spec: Any) -> list[str]:
    """The arguments after the command that Flower's ``SubprocessExecutor`` gives a task's
    process (tests/test_appsign.py checks them against Flower's own)."""
    args = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args.extend(["--root-certificates", spec.root_certificates_path])
    if spec.parent_pid is not None:
        args.extend(["--parent-pid", str(spec.parent_pid)])
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


class WarmStart(SubprocessExecutor):
    """Flower's subprocess executor, ClientApp tasks forked from a zygote (see the module)."""

    def __init__(self) -> None:
        self._zygote: subprocess.Popen[bytes] | None = None
        try:
            self._zygote = subprocess.Popen([sys.executable, "-m", "fedpriv.clients.app_gate", "zygote"],
                                            stdin=subprocess.PIPE)
        except OSError as exc:
            print(f"{COLD}: the zygote did not start ({exc})", file=sys.stderr, flush=True)

    def launch(self, spec: Any) -> Any:
        zygote = self._zygote
        if spec.task_type == TaskType.CLIENT_APP and zygote is not None and zygote.stdin is not None:
            request = {"argv": command_line(spec), "quiet": bool(spec.suppress_output)}
            try:
                if zygote.poll() is not None:
                    raise OSError(f"it exited with status {zygote.returncode}")
                zygote.stdin.write((json.dumps(request) + "\n").encode())
                zygote.stdin.flush()
                return LaunchResult.accepted()
            except OSError as exc:
                print(f"{COLD}: the zygote is gone ({exc})", file=sys.stderr, flush=True)
                self._zygote = None
        return super().launch(spec)

    def close(self) -> None:
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            try:
                if zygote.stdin is not None:
                    zygote.stdin.close()  # end of input: the zygote exits
                zygote.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                zygote.kill()
        super().close()


def preload() -> None:
    """Import what a ClientApp task needs, creating nothing: TensorFlow, tf-keras, fedpriv's
    ClientApp and trainer (TensorFlow only where no NVIDIA device is present), and dp-accounting,
    which fedpriv imports on first use (:mod:`common.lazy`) and every training task uses: the
    node's budget guard replays its ledger's spends as dp-accounting events. Left to the task, its
    import (scipy's signal and stats packages with it) took about 1.5 s of CPU in every training
    task of a node."""
    import dp_accounting  # noqa: F401
    import fedpriv.clients.app  # noqa: F401  - the ClientApp (fedpriv.client_app names it for Flower)
    import fedpriv.clients.trainer  # noqa: F401  - (common.tf_runtime with it: TensorFlow's environment)

    if not nvidia_device_present():
        import tensorflow  # noqa: F401
        import tf_keras  # noqa: F401

        import fedpriv.clients.bk_clipping  # noqa: F401


def zygote(run_task: Callable[[list[str]], None], runtime: Callable[[], Any]) -> None:
    """Import ``runtime()`` (Flower's ClientApp runtime) and :func:`preload`, then read one JSON
    request per line from stdin until it closes; fork a child for each that runs
    ``run_task(argv)`` and exits with its status."""
    runtime()
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print(READY, file=sys.stderr, flush=True)
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            _child(run_task, [str(a) for a in request["argv"]], bool(request.get("quiet")))


def _child(run_task: Callable[[list[str]], None], argv: list[str], quiet: bool) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        if quiet:
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        run_task(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, and the child exits
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
