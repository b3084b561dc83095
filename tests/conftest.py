"""Shared test helpers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from fedpriv.common import tf_runtime  # noqa: F401  - sets TF_USE_LEGACY_KERAS before anything imports TF

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first, the costliest (``slow(cost=N)``, minutes on 2 cores) first of
    all, so that pytest-xdist's workers do not end on one long test while the others wait; and,
    on an xdist worker, a stop if an ``xdist_group`` mark had no effect (pytest-xdist appends
    ``@group`` to the node id; pytest 9 ignores what pytest-xdist 3.8 sets, and modules that share
    one expensive fixture would then build it on every worker)."""
    def cost(item: pytest.Item) -> float:
        slow = item.get_closest_marker("slow")
        return 0.0 if slow is None else float(slow.kwargs.get("cost", 1))

    items.sort(key=cost, reverse=True)  # stable: the order is kept otherwise
    if getattr(config, "workerinput", None) is not None and config.getoption("dist", None) == "loadgroup":
        ignored = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if ignored:
            raise pytest.UsageError(f"xdist_group marks had no effect (e.g. on {ignored[0]}); pytest-xdist and "
                                    f"pytest versions do not work together")


@pytest.fixture(autouse=True, scope="session")
def _isolated_fedpriv_home(tmp_path_factory):
    """Keys and node state go to a throwaway FEDPRIV_HOME, never the user's."""
    os.environ["FEDPRIV_HOME"] = str(tmp_path_factory.mktemp("fedpriv-home"))
    yield


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves this process's environment as it found it. fedpriv sets variables in its
    own process (``checkpoint.ensure_key`` names the key file it made, ``backend_config`` what Ray
    workers inherit), and a test's ``monkeypatch`` restores only what it changed itself; without
    this, what one test left decided what a later one on the same worker saw."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True, scope="session")
def _simulation_backend():
    """Simulations started in the pytest process run their ClientApps on threads of this process
    (tests/inprocess.py) rather than on Ray's worker processes. Simulations in child processes
    (``run_cli``: tests/test_simulation_e2e.py, tests/test_load.py, tests/test_flower_run.py, the
    scale benchmark) run on Ray as a user's do."""
    from tests.inprocess import in_process_backend

    with in_process_backend():
        yield


@pytest.fixture
def own_server_state(tmp_path, monkeypatch):
    """A server state of the test's own: user-level spending composes across the runs of one
    server state (common/population.py), and the session's FEDPRIV_HOME is shared by every test."""
    root = tmp_path / "server-state" / "ledger-witness"
    monkeypatch.setenv("FEDPRIV_LEDGER_WITNESS", str(root))
    return root


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``fedpriv`` as a user would, in a fresh interpreter (``env``: its environment, default
    this process's)."""
    env = {**(os.environ if env is None else env), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fedpriv", *args], cwd=cwd or ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


def _call_here(fn, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
               log_to_stderr: bool = False) -> tuple[int, str, str]:
    """``fn(args)`` in this process as if it were a program's ``main``: its output captured, an
    uncaught exception printed as a fresh interpreter prints it (exit status 1); the environment,
    working directory and log levels it changes are restored. Returns (status, stdout, stderr)."""
    import io
    import logging
    import traceback

    saved_env, saved_cwd, saved_umask = dict(os.environ), os.getcwd(), os.umask(0o022)
    os.umask(saved_umask)
    loggers = {name: logging.getLogger(name).level for name in ("flwr", "ray", "absl")}
    flower_propagates = logging.getLogger("flwr").propagate
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    if log_to_stderr:
        logging.getLogger().addHandler(handler)
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = fn(list(args))
            except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - reported as the interpreter would report it
                traceback.print_exc()
                code = 1
    finally:
        os.umask(saved_umask)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger("flwr").propagate = flower_propagates
        logging.getLogger().removeHandler(handler)
    return code, out.getvalue(), err.getvalue()


def run_cli_here(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float | None = None, log_to_stderr: bool = False) -> subprocess.CompletedProcess:
    """``fedpriv ARGS`` in this process: ``fedpriv.cli.main`` with its output captured, returned as
    ``run_cli`` returns it. It saves starting an interpreter and importing the stack for every
    case, and a simulation it starts runs on threads of this process (``_simulation_backend``);
    ``run_cli`` remains for the checks that a fresh interpreter prints no traceback, for real
    processes (servers, nodes, kills) and for simulations on Ray. ``timeout`` is accepted for
    ``run_cli``'s signature and not enforced. ``log_to_stderr``: log records reach the captured
    stderr as the CLI's own ``logging.basicConfig`` sends them there in a fresh interpreter (under
    pytest the root logger already has handlers, so that call does nothing)."""
    from fedpriv.cli import main

    code, out, err = _call_here(main, list(args), env=env, cwd=cwd, log_to_stderr=log_to_stderr)
    return subprocess.CompletedProcess(["fedpriv", *args], code, out, err)


@pytest.fixture
def cli_here():
    return run_cli_here


def run_harness(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m tests.<module> ARGS`` (a simulation harness that captures what the server
    process sees), run in this process as ``run_cli_here`` runs the command line."""
    import importlib

    harness = importlib.import_module(f"tests.{module}")
    code, out, err = _call_here(harness.main, list(args), log_to_stderr=True)
    return subprocess.CompletedProcess([sys.executable, "-m", f"tests.{module}", *args], code, out, err)


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """The identity Flower's runtime gives a process, under which it creates messages (tests that
    create messages outside a Flower runtime set it; it is restored afterwards)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def simulate_run(out: Path, settings: list[str], preset: str = "quickstart", env: dict[str, str] | None = None,
                 resume: bool = False, here: bool = False) -> tuple[subprocess.CompletedProcess, dict | None]:
    """``fedpriv simulate`` with ``--set`` settings (``resume``: ``--resume out`` instead of
    ``--preset``/``--out``); its process and summary.json (None if absent). ``here``: in this
    process (``run_cli_here``, log records on its stderr), its virtual nodes on threads of this
    process (``_simulation_backend``), which saves a fresh interpreter's imports, Ray's start and
    every worker's TensorFlow start. Keep a fresh interpreter where a new process is the point (a
    restart, a resume after a crash, a clean stderr, Ray itself)."""
    sets = [x for s in settings for x in ("--set", s)]
    if resume:
        args = ["simulate", "--resume", str(out), *sets]
    else:
        args = ["simulate", "--preset", preset, *sets, "--out", str(out)]
    proc = run_cli_here(*args, env=env, log_to_stderr=True) if here else run_cli(*args, env=env)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return proc, summary


def poisson_gaussian_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    """Epsilon from dp-accounting directly (RDP): ``steps`` Poisson-sampled (rate ``q``) Gaussian
    steps with noise multiplier ``z`` (one client's DP-SGD, or the server's user-level rounds)."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p + 1 free too (the nodes' port and the operators' port)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            if port < 65535 and s.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture
def loose_umask():
    """The umask most systems have (022), restored afterwards."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def assert_private(*roots: Path) -> int:
    """Every directory under ``roots`` is owner-only (no group or other bits) and every file
    readable by its owner only; returns how many paths were checked."""
    import stat

    checked = 0
    for root in roots:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            assert stat.S_IMODE(info.st_mode) & 0o077 == 0, f"{path} is {oct(stat.S_IMODE(info.st_mode))}"
            checked += 1
    return checked


def dp_sgd_epsilon(spends: list, delta: float) -> float:
    """Record-level epsilon from dp-accounting directly (RDP): each spend (a DPSGDSpend) is
    ``steps`` Poisson-sampled Gaussian steps."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    for s in spends:
        gaussian = dp_accounting.GaussianDpEvent(s.noise_multiplier)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(s.sampling_probability, gaussian), s.steps)
    return accountant.get_epsilon(delta)


def run_model(run_dir: Path, key: bytes | None = None) -> list:
    """A run's final model: its sealed model.sealed, opened with ``key`` (default: the configured
    sealing key) and bound to the run id of the run's verified ledger."""
    from fedpriv.common import checkpoint, rundir
    from fedpriv.common.ledger import ledger_run_id, verify_ledger

    verified = verify_ledger(run_dir)
    assert verified.ok, verified.failures
    key = key or checkpoint.require_key("reading the run's model")
    return checkpoint.read_model(run_dir / rundir.MODEL, key, ledger_run_id(verified.entries))


def raw_byte_runs(arrays: list, count: int = 3, length: int = 64) -> list[bytes]:
    """``count`` windows of ``length`` raw bytes from the largest of ``arrays``, each with at least
    10 distinct byte values (so that no run of zero pixels matches any file): a file that holds the
    array in plaintext contains all of them."""
    import numpy as np

    biggest = max((np.ascontiguousarray(a) for a in arrays), key=lambda a: a.nbytes)
    raw = biggest.tobytes()
    windows = [raw[i:i + length] for i in range(0, len(raw) - length, length)]
    varied = [w for w in windows if len(set(w)) >= 10]
    assert len(varied) >= count, "the array has too little variety to search for"
    return varied[::max(1, len(varied) // count)][:count]


def files_containing(roots: list[Path], needles: list[bytes]) -> list[Path]:
    """Every file under ``roots`` that contains one of ``needles`` verbatim (a plaintext copy of
    an array holds every window :func:`raw_byte_runs` takes from it)."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if any(n in data for n in needles):
                    found.append(path)
    return found


def assert_listed(root: Path, where: str, protected_keys: bool = False) -> int:
    """Every file under ``root`` (a place of kind ``where``, common/stored_files.py) is listed in
    the README's table of stored files, and is protected as listed: sealed files open as sealed
    files, ledgers verify, and with ``protected_keys`` every protectable key is protected. Returns
    how many files were checked."""
    from fedpriv.common import checkpoint, keyfiles, stored_files
    from fedpriv.common.ledger import verify_ledger

    nested = {"as run directory": stored_files.RUN, "as node state": stored_files.NODE}
    checked = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(root).as_posix()
        entry = stored_files.entry_for(where, relative)
        assert entry is not None, f"{path} ({where}) is not in common/stored_files.py"
        if entry.protection in nested:  # STATE/runs/RUN/..., HOME/nodes/NODE/...
            inner = path.relative_to(root / Path(relative).parts[0] / Path(relative).parts[1]).as_posix()
            entry = stored_files.entry_for(nested[entry.protection], inner)
            assert entry is not None, f"{path} is not in common/stored_files.py"
        data = path.read_bytes()
        if entry.protection == stored_files.SEALED:
            assert checkpoint.binding_of(data, str(path))[0]["role"], path
        elif entry.protection == stored_files.SIGNED:
            report = verify_ledger(path.parent)
            assert report.ok, (path, report.failures)
        elif entry.protection in (stored_files.PROTECTABLE, stored_files.MADE_PROTECTED) and protected_keys:
            assert keyfiles.is_protected(data), f"{path} is not passphrase-protected"
        elif entry.protection == stored_files.PROTECTABLE_KEY and protected_keys:
            assert data.startswith(keyfiles.WRAPPED_PREFIX), f"{path} is not passphrase-protected"
        checked += 1
    return checked


def reissue_expired(keys: Path, env: dict[str, str] | None = None) -> None:
    """The SuperLink certificate in ``keys`` again, signed by the same CA, but expired yesterday
    (``env``: where the CA key's passphrase is, when it has one)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from fedpriv.common import keyfiles

    ca_cert = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    ca_key = keyfiles.parse_private_key((keys / "ca.key").read_bytes(), env)
    old = x509.load_pem_x509_certificate((keys / "superlink.crt").read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca_cert.subject)
               .public_key(old.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now - datetime.timedelta(days=1)))
    for extension in old.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    (keys / "superlink.crt").write_bytes(builder.sign(ca_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM))
