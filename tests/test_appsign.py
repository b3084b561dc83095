"""Signed apps (common/appsign.py) and the node's app gate (clients/app_gate.py).

The gate is driven as Flower's ClientApp runner drives it: Flower's ``pull_task_input`` returns
a real message, context, run and a real FAB built from a small foreign app (its ClientApp reads
the node's data file and sends it back); then the runner's next steps, Flower's own
``install_from_fab`` and ClientApp loader, run only if the gate let the task through. The slow
end-to-end version, with real processes, is tests/test_app_gate_e2e.py.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.common.appsign import (
    APP_KEY, APP_PUB, APP_REFUSED_CODE, SIGNATURE_SETTING, AppRefused, build_app, check_bundle, fab_hash,
    load_signing_key, load_trusted_key, sign_app, snapshot_app, verify_app,
)
from fedpriv.common.errors import FedprivError
from tests.conftest import task_identity
from tests.foreign_app import FOREIGN_CLIENT, write_foreign_app

FOREIGN_MODULE = "foreignapp_gate_test"

def foreign_app(root: Path, module: str = FOREIGN_MODULE) -> Path:
    """A Flower app whose ClientApp returns the node's data file."""
    return write_foreign_app(root / "foreign", module)


def pem_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# ---- signatures -------------------------------------------------------------------------------
def test_a_good_signature_is_accepted_and_anything_else_refused():
    fab = b"PK\x03\x04 a bundle" * 50
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signature = sign_app(fab, key)
    assert signature.startswith("ed25519:") and " " not in signature
    trusted = [key.public_key()]
    assert verify_app(fab_hash(fab), signature, trusted) is trusted[0]
    assert check_bundle(fab_hash(fab), fab, signature, [other.public_key(), *trusted]) is trusted[0]

    with pytest.raises(AppRefused, match="is not signed"):
        check_bundle(fab_hash(fab), fab, "", trusted)
    with pytest.raises(AppRefused, match="which this node does not trust"):
        check_bundle(fab_hash(fab), fab, sign_app(fab, other), trusted)
    with pytest.raises(AppRefused, match="not a fedpriv app signature"):
        check_bundle(fab_hash(fab), fab, "ed25519:AAAA:!!", trusted)
    altered = bytearray(fab)
    altered[17] ^= 1  # one bit of one byte
    altered = bytes(altered)
    # the altered bundle under its own hash: the signature is for other contents
    with pytest.raises(AppRefused, match="was altered: its signature by trusted key"):
        check_bundle(fab_hash(altered), altered, signature, trusted)
    # the altered bundle under the signed hash: its bytes are not the ones the hash names
    with pytest.raises(AppRefused, match="contents do not match its hash"):
        check_bundle(fab_hash(fab), altered, signature, trusted)
    # a signature over the bare hash (no domain separation) does not pass
    bare = f"ed25519:{signature.split(':')[1]}:" + __import__("base64").b64encode(
        key.sign(hashlib.sha256(fab).digest())).decode()
    with pytest.raises(AppRefused, match="altered"):
        check_bundle(fab_hash(fab), fab, bare, trusted)
    # every refusal is one line
    for text in ("", sign_app(fab, other), "junk"):
        with pytest.raises(AppRefused) as info:
            check_bundle(fab_hash(fab), fab, text, trusted)
        assert "\n" not in str(info.value) and isinstance(info.value, FedprivError)


def test_flower_builds_the_same_bundle_twice_and_from_a_snapshot(tmp_path):
    app = foreign_app(tmp_path)
    first, second = build_app(app), build_app(app)
    assert first == second and zipfile.is_zipfile(app / "pyproject.toml") is False
    fab = snapshot_app(app, tmp_path / "snapshot")
    assert fab == first == build_app(tmp_path / "snapshot")
    (app / FOREIGN_MODULE / "client.py").write_text(FOREIGN_CLIENT + "\n# changed\n")
    assert build_app(app) != first  # any change to a file changes what has to be signed


def test_keys_are_written_and_read_in_the_formats_given(tmp_path):
    from fedpriv.common.keys import federation_keys, write_keys

    files = {f.path.name: f for f in federation_keys(tmp_path, [], 1, 1)}
    assert files[APP_KEY].private and not files[APP_PUB].private
    write_keys(list(files.values()), force=False)
    assert (tmp_path / APP_KEY).stat().st_mode & 0o777 == 0o600
    key = load_signing_key(tmp_path / APP_KEY)
    assert load_trusted_key(tmp_path / APP_PUB) == key.public_key()
    (tmp_path / "ssh.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" app signer\n")
    assert load_trusted_key(tmp_path / "ssh.pub") == key.public_key()
    with pytest.raises(FedprivError, match="must be an Ed25519 key"):
        load_trusted_key(tmp_path / "nodes/node-1.pub")  # an EC node key
    ec_key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "ec.key").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(FedprivError, match="must be an Ed25519 key"):
        load_signing_key(tmp_path / "ec.key")
    with pytest.raises(FedprivError, match="cannot read"):
        load_trusted_key(tmp_path / "missing.pub")


# ---- the gate, in Flower's ClientApp runner's order ------------------------------------------------
def run_task(app: Path, signature: str, trusted: list, node_dir: Path, data: Path, flwr_home: Path,
             fab: bytes | None = None) -> tuple[list, object]:
    """What Flower's ``run_clientapp`` does with one task, with the gate in ``pull_task_input``:
    pull, (gate), install the FAB, load the ClientApp, call it. Returns the replies the gate
    pushed and the ClientApp's reply (or the refusal)."""
    from flwr.app import Context, Message, RecordDict
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

    from fedpriv.clients.app_gate import gated

    fab = build_app(app) if fab is None else fab
    with task_identity(run_id=5, node_id=7):
        message = Message(RecordDict(), dst_node_id=7, message_type="train", group_id="1")
        message.metadata.__dict__["_message_id"] = "m" * 64
        context = Context(run_id=5, node_id=7, state=RecordDict(),
                          node_config={"data-path": str(data), "state-dir": str(node_dir.parent),
                                       "node-name": node_dir.name},
                          run_config={SIGNATURE_SETTING: signature})
        run = Run.create_empty(5)
        run.fab_id, run.fab_version, run.fab_hash = "someone/foreignapp", "1.0.0", fab_hash(fab)
        pushed: list = []
        pull = gated(lambda client: (message, context, run, Fab(fab_hash(fab), fab, {})), trusted,
                     push=lambda client, reply, ctx: pushed.append(reply))
        try:
            message, context, run, got = pull(None)
        except AppRefused as refusal:
            return pushed, refusal
        os.environ["FLWR_HOME"] = str(flwr_home)
        install_from_fab(got.content, skip_prompt=True)
        client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, got.hash_str)
        return pushed, client_app(message=message, context=context)


def installed_apps(flwr_home: Path) -> list[Path]:
    return [p for p in flwr_home.rglob("pyproject.toml")] if flwr_home.exists() else []


def test_the_gate_refuses_before_the_app_is_installed_or_imported(tmp_path, monkeypatch):
    from fedpriv.common.ledger import verify_ledger

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    app = foreign_app(tmp_path)
    data = tmp_path / "node-data.npz"
    data.write_bytes(os.urandom(256))
    node_dir = tmp_path / "nodes" / "node-1"
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    fab = build_app(app)
    altered = bytearray(fab)
    altered[40] ^= 1
    cases = {
        "is not signed": "",
        "which this node does not trust": sign_app(fab, other),
    }
    for expected, signature in cases.items():
        pushed, outcome = run_task(app, signature, [key.public_key()], node_dir, data, tmp_path / "flwr")
        assert isinstance(outcome, AppRefused) and expected in str(outcome), outcome
        (reply,) = pushed
        assert reply.has_error() and reply.error.code == APP_REFUSED_CODE and expected in reply.error.reason
        assert reply.metadata.reply_to_message_id == "m" * 64
        assert not installed_apps(tmp_path / "flwr") and FOREIGN_MODULE not in sys.modules
    # an altered bundle (one bit) under the trusted signature of the original
    pushed, outcome = run_task(app, sign_app(fab, key), [key.public_key()], node_dir, data, tmp_path / "flwr",
                               fab=bytes(altered))
    assert isinstance(outcome, AppRefused) and "altered" in str(outcome)
    assert not installed_apps(tmp_path / "flwr") and FOREIGN_MODULE not in sys.modules
    # each refusal is in the node's own signed ledger
    ledger = verify_ledger(node_dir)
    assert ledger.ok, ledger.failures
    refusals = [e for e in ledger.entries if e["kind"] == "app_refusal"]
    assert len(refusals) == 3 and "not signed" in refusals[0]["note"]

    # Signed by the trusted key, the same app is installed, imported and run: it does read the
    # data file and send it back, which is what the gate kept from happening above.
    try:
        pushed, reply = run_task(app, sign_app(fab, key), [key.public_key()], node_dir, data, tmp_path / "flwr")
        assert not pushed and not isinstance(reply, AppRefused)
        assert reply.content["stolen"]["data"] == data.read_bytes()
        assert installed_apps(tmp_path / "flwr") and FOREIGN_MODULE in sys.modules
    finally:
        for name in [m for m in sys.modules if m.startswith(FOREIGN_MODULE)]:
            del sys.modules[name]


def test_the_runner_and_superexec_modes_put_the_gate_in_place(tmp_path, monkeypatch):
    """``python -m fedpriv.clients.app_gate clientapp`` wraps Flower's own pull_task_input; the
    superexec mode takes only ClientApp tasks and starts them with fedpriv's runner."""
    import subprocess

    code = (
        "import sys; from flwr.supernode.runtime import run_clientapp as r; import fedpriv.clients.app_gate as g;"
        "orig = r.pull_task_input; g.install(); assert r.pull_task_input is not orig;"
        "assert r.pull_task_input.__qualname__.startswith('gated'); print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    # without a trusted key the superexec refuses to start, in one line
    env = {k: v for k, v in os.environ.items() if k != "FEDPRIV_APP_TRUST"}
    proc = subprocess.run([sys.executable, "-m", "fedpriv.clients.app_gate", "superexec", "--runtime-api-address",
                           "127.0.0.1:1", "--insecure"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr


def test_the_clientapp_mode_runs_flowers_runner_without_importing_the_supernode():
    """Flower starts a ClientApp process for every message: the gate's clientapp mode loads
    Flower's own ``flwr_clientapp`` (the function the ``flwr-clientapp`` script runs) without the
    SuperNode that ``flwr.supernode.cli``'s ``__init__`` imports (SQLAlchemy, Alembic)."""
    import subprocess

    code = (
        "import sys, inspect; import fedpriv.clients.app_gate as g; f = g.flwr_clientapp_entry();"
        "print(f.__module__, f.__name__, inspect.getsourcefile(f).endswith('flwr/supernode/cli/flwr_clientapp.py'));"
        "print(sorted(m for m in ('sqlalchemy', 'alembic', 'flwr.supernode.cli.flower_supernode') if m in sys.modules));"
        "from importlib.metadata import entry_points;"
        "print([e.value for e in entry_points(group='console_scripts') if e.name == 'flwr-clientapp'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "flwr.supernode.cli.flwr_clientapp flwr_clientapp True"
    assert lines[1] == "[]"
    # the function Flower's own flwr-clientapp script runs
    assert lines[2] in ("['flwr.supernode.cli:flwr_clientapp']", "['flwr.supernode.cli.flwr_clientapp:flwr_clientapp']")


def test_an_older_key_directory_gets_an_app_signing_key(cli_here, tmp_path):
    """fedpriv keys --app-key-only adds the pair, refusing (writing nothing) to replace one."""
    out = tmp_path / "keys"
    proc = cli_here("keys", "--out", str(out), "--app-key-only")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [APP_KEY, APP_PUB]
    before = (out / APP_KEY).read_bytes()
    proc = cli_here("keys", "--out", str(out), "--app-key-only")
    assert proc.returncode == 2 and "already exist" in proc.stderr and (out / APP_KEY).read_bytes() == before
    assert cli_here("keys", "--out", str(out), "--app-key-only", "--force").returncode == 0
    assert (out / APP_KEY).read_bytes() != before
    assert load_trusted_key(out / APP_PUB) == load_signing_key(out / APP_KEY).public_key()


def test_warm_starts_give_a_task_the_command_line_flowers_executor_gives(monkeypatch):
    """A warm ClientApp task gets the arguments Flower's own SubprocessExecutor would start its
    process with (captured from Flower's executor, whatever the spec)."""
    import itertools
    import subprocess

    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, SubprocessExecutor

    from fedpriv.clients.warm_start import command_line

    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **_: started.append(list(args)))
    for insecure, certs, parent, deps in itertools.product((True, False), (None, "/ca.crt"), (None, 42), (False, True)):
        spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9101", token="t0k",
                             insecure=insecure, root_certificates_path=certs, runtime_dependency_install=deps,
                             parent_pid=parent, suppress_output=False, task_id=7)
        SubprocessExecutor().launch(spec)
        assert started[-1] == [TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP], *command_line(spec)], spec
    assert len(started) == 16


def test_the_zygote_runs_each_task_in_a_forked_process_of_its_own():
    """``app_gate zygote`` preloads, says so, and runs one forked child per request line (here
    Flower's own ``flwr-clientapp --help``, which exits at once), silenced when asked; it exits
    when its input closes."""
    import json
    import subprocess

    from fedpriv.clients.warm_start import READY

    requests = [{"argv": ["--help"]}, {"argv": ["--help"], "quiet": True}, {"argv": ["--help"]}]
    proc = subprocess.run([sys.executable, "-m", "fedpriv.clients.app_gate", "zygote"], capture_output=True,
                          text=True, timeout=180, input="".join(json.dumps(r) + "\n" for r in requests))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert READY in proc.stderr and "Traceback" not in proc.stderr
    # (the output is read until every child has closed it too); the quiet one printed nothing
    assert proc.stdout.count("usage: flwr-clientapp") == 2, proc.stdout


def test_a_warm_task_finds_what_the_node_budget_accounts_with_already_imported(tmp_path):
    """What the zygote preloads covers the node's budget guard, which every training task opens:
    replaying the ledger's spends, checking a planned one and recording it import no further
    dp-accounting or scipy module (each such import would be paid again by every task). The
    preload runs as on a machine with an NVIDIA device, where it leaves TensorFlow out; elsewhere
    it imports the same and TensorFlow besides."""
    import subprocess

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fedpriv.clients import warm_start\n"
        "warm_start.nvidia_device_present = lambda: True\n"  # TensorFlow, which the guard never needs, stays out
        "warm_start.preload()\n"
        "assert 'tensorflow' not in sys.modules\n"
        "before = set(sys.modules)\n"
        "from fedpriv.clients.budget import open_guard\n"
        "from fedpriv.common.accounting import DPSGDSpend\n"
        "spend, state = DPSGDSpend(0.05, 1.1, 20), Path(sys.argv[1])\n"
        "state.mkdir()\n"
        "for recorded in range(2):\n"
        "    with open_guard(state, 10.0, 1e-5) as guard:\n"
        "        assert len(guard.spends) == recorded, guard.spends\n"  # the second open replays the first
        "        guard.check(spend)\n"
        "        guard.record(spend, recorded + 1)\n"
        "late = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('dp_accounting', 'scipy'))\n"
        "assert not late, late\n"
    )
    env = {**os.environ, "FEDPRIV_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "node")], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
