"""The layers stay layered: every import of a fedpriv module (at the top of a file or inside a
function) is read from the source, and the graph must have no cycle; common/ imports none of
server/, clients/, simulations/ or the command line; server/ and clients/ never import each other;
only ``python -m fedpriv`` imports the command line's entry point."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PARTS = ("common", "server", "clients", "simulations", "fedpriv")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "fedpriv" else ["fedpriv", *parts])


def _graph() -> dict[str, set[str]]:
    modules = {}
    for part in PARTS:
        for path in (ROOT / part).rglob("*.py"):
            modules[_module_name(path)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                found = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in found:
                while target and target not in modules:  # "pkg.mod.func" -> "pkg.mod"
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PARTS else "fedpriv"


def test_the_scan_sees_the_imports_it_checks():
    graph = _graph()
    assert "fedpriv.common.settings" in graph["fedpriv.cli"]  # an import inside a function
    assert "fedpriv.common.ledger" in graph["fedpriv.server.privacy"]


def test_layers_import_only_downwards():
    allowed = {
        "common": {"common"},
        "server": {"common", "server"},
        "clients": {"common", "clients"},
        "simulations": {"common", "server", "clients", "simulations"},
        "fedpriv": set(PARTS),
    }
    wrong = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets
                   if _layer(t) not in allowed[_layer(m)])
    assert not wrong, wrong


def test_only_the_entry_point_imports_the_command_line():
    graph = _graph()
    cli = next(name for name in graph if name.endswith(".cli") and _layer(name) == "fedpriv")
    importers = sorted(m for m, targets in graph.items() if cli in targets)
    assert importers == [cli.rsplit(".", 1)[0] + ".__main__"], importers


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles[:5]


def test_loading_the_client_app_imports_no_scipy_or_tensorflow():
    """A deployed node starts a fresh ClientApp process for every message, and most messages
    (SecAgg+'s stages) neither train nor account: loading the app must not pay for TensorFlow or
    for dp-accounting's scipy (common.lazy); training and accounting load them when used."""
    lines = _fresh_interpreter(
        "import sys; import fedpriv.client_app as a; a.app; "
        "print(sorted(m for m in ('scipy', 'tensorflow', 'tf_keras') if m in sys.modules)); "
        "from fedpriv.common.accounting import DPSGDSpend, epsilon; "
        "print(epsilon([DPSGDSpend(0.01, 1.1, 100).to_event()], 1e-5) > 0, 'scipy' in sys.modules)")
    assert lines[:2] == ["[]", "True True"], lines


def _fresh_interpreter(code: str) -> list[str]:
    """The lines ``python -c code`` prints in a fresh interpreter (it must succeed)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()


def test_the_command_line_loads_no_scipy_or_tensorflow_before_a_command_needs_them():
    """Every fedpriv command builds the whole parser: building it (and a command that needs no
    accounting, such as ``fedpriv keys``) must not import dp-accounting's scipy or TensorFlow,
    each seconds of CPU; the calculator loads dp-accounting when it runs."""
    lines = _fresh_interpreter(
        "import sys; from fedpriv.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('scipy', 'tensorflow', 'tf_keras') if m in sys.modules)); "
        "from fedpriv.cli import main; main(['privacy', 'dpsgd', '--examples', '1000', '--batch-size', '10', "
        "'--epochs', '1', '--noise', '1.1', '--delta', '1e-5']); print('scipy' in sys.modules)")
    assert lines[0] == "[]" and lines[-1] == "True", lines

_RACE = """
import sys, threading, tomllib
from flwr.supercore.object_ref import load_app, validate
root = sys.argv[1]
components = tomllib.load(open(root + "/pyproject.toml", "rb"))["tool"]["flwr"]["app"]["components"]
failed = []
for _ in range(30):
    for name in [m for m in sys.modules if m == "fedpriv" or m.startswith("fedpriv.")]:
        del sys.modules[name]
    barrier, errors = threading.Barrier(2), []
    def loads():
        barrier.wait()
        try:
            load_app(components["clientapp"], ValueError, root)
        except Exception as e:
            errors.append(repr(e))
    def checks():
        barrier.wait()
        for ref in (components["serverapp"], components["clientapp"]):
            ok, why = validate(ref, project_dir=root)
            if not ok:
                errors.append(why)
    threads = [threading.Thread(target=loads), threading.Thread(target=checks)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    failed += errors
print(len(failed), failed[:1])
"""


def test_two_threads_importing_fedpriv_at_once_both_find_its_parts():
    """Flower's simulation runtime (`flwr run .`) loads the ServerApp on one thread while another
    checks and loads the ClientApp, both with Flower's own object_ref functions and the component
    names in pyproject.toml. With components named ``fedpriv.server.app`` / ``fedpriv.clients.app``
    most such races failed with "No module named 'fedpriv.clients'" (CI saw it once under load;
    this loop saw it 28 times in 30). The components now lie in fedpriv/ itself and wait for the
    package (fedpriv/server_app.py), so thirty fresh races all succeed."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _RACE, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "0", proc.stdout


_SLOW_MODULE = """
import time
time.sleep(0.3)  # a slow import, as scipy's is: other threads arrive while it runs
ANSWER = 42
"""


def test_a_lazily_imported_module_is_whole_for_every_thread_that_reads_it_first(tmp_path):
    """Ten threads read an attribute of a lazily imported module at once, while it is still being
    imported: each sees the whole module and the module runs once (the standard library's
    LazyLoader on Python 3.11 hands some threads a half-filled module: CPython gh-114763)."""
    (tmp_path / "slow_module_for_lazy_test.py").write_text(_SLOW_MODULE)
    lines = _fresh_interpreter(f"""
import sys, threading
sys.path.insert(0, {str(tmp_path)!r})
from fedpriv.common.lazy import lazy_import
m = lazy_import("slow_module_for_lazy_test")
print("slow_module_for_lazy_test" in sys.modules)
seen = []
def read():
    try:
        seen.append(m.ANSWER)
    except AttributeError as e:
        seen.append(repr(e))
threads = [threading.Thread(target=read) for _ in range(10)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(seen)
print(sys.modules["slow_module_for_lazy_test"].ANSWER, m.ANSWER)
""")
    assert lines == ["False", str([42] * 10), "42 42"], lines


def test_lazy_import_reports_a_missing_module_at_once_and_returns_a_loaded_one_as_is():
    import json

    import pytest

    from fedpriv.common.lazy import lazy_import

    assert lazy_import("json") is json
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_fedpriv"):
        lazy_import("no_such_module_for_fedpriv")
