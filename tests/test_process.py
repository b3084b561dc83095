"""Flower's processes under fedpriv's commands: their output reaches the user without tracebacks."""

import io
import sys

from fedpriv.common.process import Child, flower_environment

CHILD = """
import sys
print("INFO :      starting", flush=True)
def shut_down():
    try:
        raise RuntimeError("inner")
    except RuntimeError:
        raise KeyboardInterrupt
shut_down()
"""


def run_child(monkeypatch, verbose: bool) -> tuple[str, Child]:
    monkeypatch.setenv("FEDPRIV_VERBOSE", "1" if verbose else "0")
    sink = io.StringIO()
    child = Child([sys.executable, "-c", CHILD], flower_environment(), sink=sink)
    assert child.wait() != 0
    return sink.getvalue(), child


def test_a_child_traceback_is_relayed_as_one_line_and_kept_in_the_tail(monkeypatch):
    shown, child = run_child(monkeypatch, verbose=False)
    lines = shown.splitlines()
    assert lines[0] == "INFO :      starting"
    assert "Traceback" not in shown and "inner" not in shown and "File " not in shown
    assert len(lines) == 2 and "KeyboardInterrupt" in lines[1]
    assert child.output_contains("Traceback (most recent call last):")  # kept for diagnosis
    assert child.output_contains("RuntimeError: inner")


def test_fedpriv_verbose_relays_the_whole_traceback(monkeypatch):
    shown, _ = run_child(monkeypatch, verbose=True)
    assert shown.count("Traceback (most recent call last):") == 2 and "RuntimeError: inner" in shown
