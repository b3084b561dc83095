"""Running Flower's own long-lived processes (SuperLink, SuperNode) under fedpriv's commands.

The child's output is relayed line by line and its tail kept, so that when it fails the command
can say why in one line; SIGINT and SIGTERM are passed on, so stopping fedpriv stops Flower.
A Python traceback the child prints (Flower's processes print some while shutting down, for
example when a signal lands in an exit handler) is relayed as one line naming the exception;
``FEDPRIV_VERBOSE=1`` relays it whole. The tail always keeps every line.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence, TextIO

from fedpriv.common import secret_env
from fedpriv.common.errors import FedprivError


def flower_executable(name: str) -> str:
    """A Flower console script: the one installed beside this Python first, then PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise FedprivError(f"{name} is not installed (it comes with flwr; reinstall fedpriv)")
    return found


def flower_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: this Python's scripts first on PATH (the
    SuperLink and SuperNode start ``flower-superexec`` from it), no telemetry."""
    env = secret_env.scrubbed(os.environ)  # key material only where a caller adds it (common/secret_env.py)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.update(extra or {})
    return env


def terminate_as_exit() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` in the main thread, so that ``finally`` and
    ``except BaseException`` blocks run (and stop children) when a command is terminated."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


TRACEBACK_START = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


class TracebackFilter:
    """Condenses each Python traceback (chained ones included) in a stream of lines to one line
    naming its last exception."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inside = False
        self.pending: str | None = None  # the exception line, held until no chained traceback follows

    def __call__(self, line: str) -> str | None:
        """The text to relay for ``line`` (and any summary due before it), or None to hold it back."""
        text = line.rstrip("\n")
        if text.startswith(TRACEBACK_START) or text.startswith(CHAINED):
            self.inside, self.pending = True, None
            return None
        if self.inside:
            if not text.strip() or text.startswith((" ", "\t")):
                return None  # the frames
            self.inside, self.pending = False, text.strip()[:200]  # the exception line
            return None
        if self.pending is not None and not text.strip():
            return None  # a blank line between chained tracebacks
        return self.flush() + line

    def flush(self) -> str:
        """The summary of a traceback that has ended, if any."""
        if self.pending is None:
            return ""
        summary, self.pending = self.pending, None
        return f"{self.name}: exited through {summary} (traceback withheld; FEDPRIV_VERBOSE=1 shows it)\n"


class Child:
    """A supervised child process whose merged output is relayed to ``sink``."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], sink: TextIO | None = None,
                 keep: int = 200, on_line: Callable[[str], None] | None = None,
                 pass_fds: Sequence[int] = ()) -> None:
        self.argv = list(argv)
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self._sink = sink if sink is not None else sys.stderr
        self._on_line = on_line
        self._filter = None if os.environ.get("FEDPRIV_VERBOSE") == "1" else TracebackFilter(Path(self.argv[0]).name)
        self.proc = subprocess.Popen(self.argv, env=dict(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     start_new_session=True, pass_fds=tuple(pass_fds))
        self._relay = threading.Thread(target=self._pump, daemon=True)
        self._relay.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line.rstrip("\n"))
            if self._on_line is not None:
                self._on_line(line)
            shown = line if self._filter is None else self._filter(line)
            if shown is None:
                continue
            self._write(shown)
        if self._filter is not None:
            self._write(self._filter.flush())

    def _write(self, text: str) -> None:
        if not text:
            return
        try:
            self._sink.write(text)
            self._sink.flush()
        except (OSError, ValueError):
            pass

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the child's process group (it has helpers), then SIGKILL if it lingers."""
        if self.running():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self._relay.join(timeout=5)
        return self.proc.returncode

    def wait(self) -> int:
        """Wait for the child; SIGINT/SIGTERM to this process stop it cleanly (exit 0)."""
        stopping = {"by_signal": False}

        def forward(signum: int, _frame: object) -> None:
            stopping["by_signal"] = True
            threading.Thread(target=self.stop, daemon=True).start()

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = self.proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self._reap()
        self._relay.join(timeout=5)
        return 0 if stopping["by_signal"] else code

    def _reap(self) -> None:
        """Stop helpers the child left behind (Flower's SuperExec) in its process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def output_contains(self, *needles: str) -> bool:
        text = "\n".join(self.tail)
        return any(n in text for n in needles)
