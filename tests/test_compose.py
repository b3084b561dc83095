"""docker-compose.yml and the Dockerfile, checked without Docker.

No Docker engine is needed (none is available where these tests run). Instead:

- the compose file is parsed, and its shape checked (a SuperLink, node services with their own
  data and state, the run submission, TLS material as secrets, each service only the keys it needs);
- the real ``fedpriv keys`` and ``fedpriv split-data`` write a deployment into a temporary
  directory, and every file the compose file mounts must be among what they wrote;
- each service's ``command:`` is parsed by fedpriv's own argument parser, then run as
  ``fedpriv <command> --dry-run`` against a directory tree that mirrors what the service's
  container sees (its secrets under /run/secrets, its bind mounts, its volumes), so fedpriv checks
  the keys, certificates and data exactly as it would in the container;
- the Flower command each dry run prints is given to Flower 1.42's own argument parsers
  (flower-superlink, flower-supernode) or checked against ``flwr run --help`` and Flower's own
  run-config merge;
- the Dockerfile and .dockerignore get plain text checks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# Keeps this module on one pytest-xdist worker, so that its module fixtures are built once
# (tests/conftest.py stops the run if the mark has no effect).
pytestmark = pytest.mark.xdist_group("test_compose")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"

# The two commands docs/deployment.md tells the operator to run (relative to the compose file).
KEYS_COMMAND = ["keys", "--out", "deploy/keys", "--host", "superlink", "--host", "superlink-admin",
                "--nodes", "3"]
SPLIT_COMMAND = ["split-data", "--out", "deploy/data", "--nodes", "3", "--preset", "federation"]
OPERATOR_COMMAND = ["keys", "--out", "deploy/keys", "--operator", "runner", "--role", "researcher"]
SECRETS_DIR = "/run/secrets"


def _fedpriv() -> list[str]:
    script = Path(sys.executable).parent / "fedpriv"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedpriv"]


def _flwr() -> str:
    script = Path(sys.executable).parent / "flwr"
    return str(script) if script.exists() else shutil.which("flwr") or "flwr"


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FEDPRIV_HOME=str(home / "fedpriv-home"), FLWR_HOME=str(home / "flwr-home"),
               FLWR_TELEMETRY_ENABLED="0", COLUMNS="240", TF_CPP_MIN_LOG_LEVEL="3")
    return env


# ---- the compose file -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _command(compose: dict[str, Any], name: str) -> list[str]:
    command = compose["services"][name]["command"]
    assert isinstance(command, list) and all(isinstance(a, str) for a in command), \
        f"{name}: command must be a YAML list of strings (exec form), got {command!r}"
    return command


def _services(compose: dict[str, Any], *prefix: str) -> list[str]:
    return [name for name, svc in compose["services"].items()
            if isinstance(svc.get("command"), list) and svc["command"][:len(prefix)] == list(prefix)]


def _node_services(compose: dict[str, Any]) -> list[str]:
    return _services(compose, "node", "join")


def _secret_mounts(compose: dict[str, Any], name: str) -> dict[str, Path]:
    """Container path -> host file (relative to the compose file) of each of a service's secrets."""
    mounts: dict[str, Path] = {}
    for entry in compose["services"][name].get("secrets", []):
        source, target = (entry, entry) if isinstance(entry, str) else (entry["source"], entry.get("target"))
        target = target or source
        path = target if target.startswith("/") else f"{SECRETS_DIR}/{target}"
        definition = compose["secrets"][source]
        assert "file" in definition, f"secret {source} must be file-based"
        mounts[path] = Path(definition["file"])
    return mounts


def _volume_mounts(compose: dict[str, Any], name: str) -> tuple[dict[str, Path], dict[str, str]]:
    """(container path -> host path of each bind mount, container path -> named volume)."""
    binds: dict[str, Path] = {}
    volumes: dict[str, str] = {}
    for entry in compose["services"][name].get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        else:
            source, target, kind = entry["source"], entry["target"], entry.get("type", "volume")
        if kind == "bind":
            binds[target] = Path(source)
        else:
            assert source in (compose.get("volumes") or {}), f"{name}: volume {source} is not declared"
            volumes[target] = source
    return binds, volumes


def _host_files(compose: dict[str, Any]) -> set[Path]:
    files: set[Path] = set()
    for name in compose["services"]:
        files |= set(_secret_mounts(compose, name).values())
        files |= set(_volume_mounts(compose, name)[0].values())
    return files


def test_compose_file_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "superlink" in services and _command(compose, "superlink")[:2] == ["server", "start"]
    nodes = _node_services(compose)
    assert len(nodes) >= 2
    assert len(_services(compose, "server", "run")) == 1, "one service submits the run"
    data_files, state_volumes = set(), set()
    for name in nodes:
        binds, volumes = _volume_mounts(compose, name)
        command = _command(compose, name)
        data = command[command.index("--data") + 1]
        state = command[command.index("--state") + 1]
        assert data in binds, f"{name}: its --data {data} is not a bind mount"
        assert binds[data].parent == Path("deploy/data") or str(binds[data]).startswith("./deploy/data/")
        assert all(isinstance(b, dict) and b.get("read_only") for b in services[name]["volumes"]
                   if isinstance(b, dict) and b.get("target") == data), f"{name}: mount its data read-only"
        assert state in volumes, f"{name}: its --state {state} is not a named volume"
        data_files.add(binds[data])
        state_volumes.add(volumes[state])
        assert "superlink" in services[name].get("depends_on", {})
    assert len(data_files) == len(nodes), "every node has its own data file"
    assert len(state_volumes) == len(nodes), "every node has its own state volume"
    assert _volume_mounts(compose, "superlink")[1].get("/state") not in state_volumes
    # TLS material and the server's keys arrive as secrets
    link = _secret_mounts(compose, "superlink")
    for target in ("ca.crt", "superlink.crt", "superlink.key", "ledger-signing.key", "checkpoint.key"):
        assert f"{SECRETS_DIR}/{target}" in link, f"superlink lacks the secret {target}"
    for name in (*nodes, *_services(compose, "server", "run")):
        assert f"{SECRETS_DIR}/ca.crt" in _secret_mounts(compose, name), f"{name} lacks ca.crt"
    assert any("9092" in str(port) for port in services["superlink"].get("ports", []))


def test_services_get_only_the_keys_they_need(compose: dict[str, Any]) -> None:
    private_node_keys = {Path(f"deploy/keys/nodes/{n}") for n in ("node-1", "node-2", "node-3")}
    for name in compose["services"]:
        files = {Path(os.path.normpath(p)) for p in _secret_mounts(compose, name).values()}
        assert Path("deploy/keys/ca.key") not in files, f"{name} must not get the CA's private key"
        mine = files & private_node_keys
        if name in _node_services(compose):
            command = _command(compose, name)
            own = Path(command[command.index("--auth-key") + 1]).name
            assert mine == {Path(f"deploy/keys/nodes/{own}")}, f"{name} gets exactly its own node key"
        else:
            assert not mine, f"{name} must not get a node's private key"
    # Only the run submission signs apps; every node gets the public half, which it checks apps against.
    (run,) = _services(compose, "server", "run")
    for name in compose["services"]:
        files = {Path(os.path.normpath(p)) for p in _secret_mounts(compose, name).values()}
        assert (Path("deploy/keys/app-signing.key") in files) == (name == run), name
        if name in _node_services(compose):
            mounts = _secret_mounts(compose, name)
            assert os.path.normpath(mounts.get(f"{SECRETS_DIR}/app-signing.pub", "")) == "deploy/keys/app-signing.pub"


def test_node_count_fits_the_preset(compose: dict[str, Any]) -> None:
    """SecAgg+ and min_available_clients of the preset the nodes join with need every node."""
    from fedpriv.common.settings import resolve_config

    nodes = _node_services(compose)
    presets = set()
    for name in (*nodes, *_services(compose, "server", "run")):
        command = _command(compose, name)
        presets.add(command[command.index("--preset") + 1] if "--preset" in command else None)
    assert len(presets) == 1, f"the nodes and the run use one configuration, got {presets}"
    cfg = resolve_config(presets.pop(), None, [])
    assert len(nodes) >= cfg.federation.min_available_clients
    register = _command(compose, "superlink")
    registered = [register[i + 1] for i, a in enumerate(register) if a == "--register"]
    assert len(registered) == len(nodes)


def test_every_command_parses_with_fedpriv(compose: dict[str, Any]) -> None:
    from fedpriv.cli import build_parser

    parser = build_parser()
    for name in compose["services"]:
        command = _command(compose, name)
        try:
            args = parser.parse_args(command)
        except SystemExit as exc:  # argparse exits 2 on an unknown flag or a missing argument
            pytest.fail(f"fedpriv rejects the command of {name}: {command} (exit {exc.code})")
        assert callable(args.func)
        assert not getattr(args, "dry_run", False), f"{name} must really run, not --dry-run"


def test_superlink_healthcheck_is_valid_python(compose: dict[str, Any]) -> None:
    from fedpriv.common import tls
    test = compose["services"]["superlink"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3]
    compile(code, "healthcheck", "exec")
    for name in re.findall(r"import ([\w, ]+)", code)[-1].split(","):
        if name.strip() not in ("Path",):
            assert hasattr(tls, name.strip()), name
    port = _command(compose, "superlink")[_command(compose, "superlink").index("--port") + 1]
    assert f"'127.0.0.1', {port}" in code and "/run/secrets/ca.crt" in code


# ---- against a real deployment: the files fedpriv keys and split-data write ----------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory laid out like the compose file's: deploy/keys and deploy/data, written by
    the real commands docs/deployment.md gives."""
    root = tmp_path_factory.mktemp("compose")
    env = _env(root)
    procs = [subprocess.Popen([*_fedpriv(), *command], cwd=root, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for command in (KEYS_COMMAND, SPLIT_COMMAND)]
    for command, proc in zip((KEYS_COMMAND, SPLIT_COMMAND), procs):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"fedpriv {shlex.join(command)} failed:\n{out}"
    proc = subprocess.run([*_fedpriv(), *OPERATOR_COMMAND], cwd=root, env=env, text=True, capture_output=True,
                          timeout=300)  # after the CA exists
    assert proc.returncode == 0, f"fedpriv {shlex.join(OPERATOR_COMMAND)} failed:\n{proc.stdout}{proc.stderr}"
    return root


def _compose_cli() -> list[str] | None:
    """Docker Compose v2 (``docker compose`` or a standalone ``docker-compose`` v2), if installed."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version"], capture_output=True, text=True)
        if version.returncode == 0 and re.search(r"version v?2\.", version.stdout):
            return [standalone]
    return None


def test_compose_config_validates(deployment: Path) -> None:
    """Where Docker Compose v2 is installed, its own validation (no engine needed)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("Docker Compose v2 is not installed")
    shutil.copy(COMPOSE_FILE, deployment / "docker-compose.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDPRIV_", "COMPOSE_"))}
    proc = subprocess.run([*cli, "--profile", "run", "config", "-q"], cwd=deployment, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_mounted_file_is_written_by_fedpriv(compose: dict[str, Any], deployment: Path) -> None:
    files = _host_files(compose)
    assert files
    missing = [str(f) for f in sorted(files) if not (deployment / f).is_file()]
    assert not missing, f"the compose file mounts files fedpriv keys/split-data do not write: {missing}"
    for f in files:  # nothing outside the deployment directory
        assert not f.is_absolute() and ".." not in f.parts, f


def _mirror(compose: dict[str, Any], name: str, deployment: Path) -> Path:
    """A directory tree with what the service's container sees: secrets, bind mounts, volumes."""
    tree = deployment / "containers" / name
    if tree.exists():
        return tree
    binds, volumes = _volume_mounts(compose, name)
    for target, source in {**_secret_mounts(compose, name), **binds}.items():
        dest = tree / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(deployment / source, dest)  # keeps the 0600 mode of private files
    for target in volumes:
        (tree / target.lstrip("/")).mkdir(parents=True, exist_ok=True, mode=0o700)
    return tree


def _map_paths(command: list[str], tree: Path) -> list[str]:
    """The command with every container path replaced by its place in the mirror tree."""
    mapped = []
    for arg in command:
        if arg.startswith("/"):
            local = tree / arg.lstrip("/")
            assert local.exists(), f"{arg} is not mounted in this container"
            arg = str(local)
        mapped.append(arg)
    return mapped


@pytest.fixture(scope="module")
def dry_runs(compose: dict[str, Any], deployment: Path) -> dict[str, tuple[Path, list[str], str]]:
    """Every service's command with --dry-run, run at once: service -> (mirror, command, stdout)."""
    env = _env(deployment)
    started = {}
    for name in compose["services"]:
        tree = _mirror(compose, name, deployment)
        command = _map_paths(_command(compose, name), tree)
        started[name] = (tree, command, subprocess.Popen(
            [*_fedpriv(), *command, "--dry-run"], cwd=deployment, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    for name, (tree, command, proc) in started.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"fedpriv {shlex.join(command)} --dry-run failed ({name}):\n{err}{out}"
        results[name] = (tree, command, out)
    return results


def _printed_command(out: str, program: str) -> list[str]:
    """The command line for ``program`` among what a dry run printed (it may print more lines)."""
    for line in out.splitlines():
        if line.strip() and Path(line.split()[0]).name == program:
            return shlex.split(line)
    pytest.fail(f"the dry run printed no {program} command:\n{out}")


def _parse_flower(parser_factory: Any, argv: list[str]) -> Any:
    try:
        return parser_factory().parse_args(argv)
    except SystemExit as exc:  # argparse: exit 2 on an unknown flag or a bad value
        pytest.fail(f"Flower rejects {shlex.join(argv)} (exit {exc.code})")


def _cert_names(deployment: Path) -> list[str]:
    from fedpriv.common.tls import load_certificate, subject_names

    return subject_names(load_certificate(deployment / "deploy/keys/superlink.crt", "certificate"))


def test_superlink_command_is_accepted_by_fedpriv_and_flower(
        compose: dict[str, Any], deployment: Path, dry_runs: dict[str, Any]) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    from fedpriv.common.tls import check_node_key

    tree, _, out = dry_runs["superlink"]
    argv = _printed_command(out, "flower-superlink")
    args = _parse_flower(_parse_args_run_superlink, argv[1:])
    secrets = tree / SECRETS_DIR.lstrip("/")
    assert args.enable_supernode_auth and not args.insecure
    assert Path(args.ssl_certfile) == secrets / "superlink.crt"
    assert Path(args.ssl_keyfile) == secrets / "superlink.key"
    assert Path(args.ssl_ca_certfile) == secrets / "ca.crt"
    assert Path(args.database).parent == tree / "state", "the database lives in the state volume"
    # The SuperLink itself listens on the container's loopback only; the nodes' port (9092) is
    # fedpriv's Fleet-only gateway and the operators' port (9093, on the admin network) fedpriv's
    # mutual-TLS gateway, which the run service reaches as superlink-admin:9093, so the certificate
    # must name it.
    assert args.host == "127.0.0.1" and args.port not in (9092, 9093)
    start = _command(compose, "superlink")
    assert start[start.index("--port") + 1] == "9092" and start[start.index("--host") + 1] == "0.0.0.0"
    assert start[start.index("--admin-port") + 1] == "9093" and start[start.index("--admin-host") + 1] == \
        "superlink-admin"
    run = _command(compose, "run")
    assert "--operator-cert" in run and "--operator-key" in run  # the run submits as an operator
    assert "superlink-admin" in _cert_names(deployment)
    networks = compose["services"]["superlink"]["networks"]
    assert "superlink-admin" in networks["admin"]["aliases"] and compose["networks"]["admin"]["internal"]
    for name in _node_services(compose):
        assert compose["services"][name]["networks"] == ["fleet"], f"{name} must not reach the admin network"
    assert compose["services"]["run"]["networks"] == ["admin"]
    # the registered keys are exactly the public halves of the nodes' private keys
    registered = {Path(line.split(" ", 1)[1]).read_text().strip()
                  for line in out.splitlines() if line.startswith("register ")}
    node_keys = set()
    for name in _node_services(compose):
        _, command, _ = dry_runs[name]
        node_keys.add(check_node_key(Path(command[command.index("--auth-key") + 1])).strip())
    assert registered == node_keys


@pytest.mark.parametrize("index", range(3))
def test_node_command_is_accepted_by_fedpriv_and_flower(
        compose: dict[str, Any], deployment: Path, dry_runs: dict[str, Any], index: int) -> None:
    from flwr.common.config import parse_config_args
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    nodes = _node_services(compose)
    if index >= len(nodes):
        pytest.skip(f"only {len(nodes)} node services")
    name = nodes[index]
    tree, mapped, out = dry_runs[name]
    container = _command(compose, name)
    argv = _printed_command(out, "flower-supernode")
    args = _parse_flower(_parse_args_run_supernode, argv[1:])
    secrets = tree / SECRETS_DIR.lstrip("/")
    superlink = container[container.index("--superlink") + 1]
    assert args.superlink == superlink and not args.insecure
    assert superlink.rpartition(":")[0] in _cert_names(deployment), "TLS checks the SuperLink's name"
    assert superlink.rpartition(":")[2] == _command(compose, "superlink")[
        _command(compose, "superlink").index("--port") + 1]
    assert Path(args.root_certificates) == secrets / "ca.crt"
    key = container[container.index("--auth-key") + 1]
    assert Path(args.auth_supernode_private_key) == tree / key.lstrip("/")
    node_config = parse_config_args([args.node_config])  # as flower-supernode parses it
    data = container[container.index("--data") + 1]
    assert Path(node_config["data-path"]) == tree / data.lstrip("/")
    assert Path(node_config["state-dir"]) == tree / "state"
    assert node_config["node-name"] == Path(key).name
    assert node_config["record-budget"] == float(container[container.index("--budget") + 1])
    # Flower's SuperExec is replaced by fedpriv's app gate, which trusts the mounted app-signing.pub
    assert args.isolation == "process"
    gate = next(line for line in out.splitlines() if "fedpriv.clients.app_gate superexec" in line)
    assert gate.startswith(f"FEDPRIV_APP_TRUST={secrets / 'app-signing.pub'} ")
    assert f"--runtime-api-address 127.0.0.1:{args.port}" in gate


def test_run_command_is_accepted_by_fedpriv_and_flower(
        compose: dict[str, Any], deployment: Path, dry_runs: dict[str, Any]) -> None:
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    from fedpriv.common.settings import resolve_config

    (name,) = _services(compose, "server", "run")
    _, _, out = dry_runs[name]
    container = _command(compose, name)
    argv = _printed_command(out, "flwr")
    assert argv[1] == "run"
    app = Path(argv[2])
    assert (app / "pyproject.toml").is_file()
    help_text = subprocess.run([_flwr(), "run", "--help"], capture_output=True, text=True,
                               env=_env(deployment), timeout=120)
    assert help_text.returncode == 0, help_text.stderr
    flags = [a for a in argv[3:] if a.startswith("--")]
    assert flags and set(flags) <= {"--run-config", "--stream"}
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text.stdout), \
            f"flwr run has no {flag}"
    # Flower merges the run config into the app's defaults (it refuses undeclared keys)
    overrides = parse_config_args([argv[argv.index("--run-config") + 1]])
    fused = get_fused_config_from_dir(app, overrides)
    superlink = container[container.index("--superlink") + 1]
    assert superlink.rpartition(":")[0] in _cert_names(deployment)
    cfg = resolve_config(container[container.index("--preset") + 1], None, [])
    assert fused["federation.min_available_clients"] == cfg.federation.min_available_clients
    assert fused["run.name"] == cfg.run.name
    # the bundle is signed with the deployment's app-signing key, which nodes trust
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from fedpriv.common.appsign import load_trusted_key

    signer = base64.b64decode(fused["run.app_signature"].split(":")[1])
    public = load_trusted_key(deployment / "deploy/keys/app-signing.pub")
    assert signer == public.public_bytes(Encoding.Raw, PublicFormat.Raw)


# ---- the image ------------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    by_kind: dict[str, list[str]] = {}
    for kind, rest in steps:
        by_kind.setdefault(kind, []).append(rest)
    assert json.loads(by_kind["ENTRYPOINT"][-1]) == ["fedpriv"]
    args = dict(a.split("=", 1) for a in by_kind.get("ARG", []) if "=" in a)
    base = by_kind["FROM"][-1]
    base = args.get(base.strip("${}"), base) if base.startswith("$") else base
    assert base.startswith("python:3.11"), base
    runs = " ".join(by_kind["RUN"])
    assert "pip install" in runs and "uv" in runs
    assert re.search(r"uv sync --frozen --no-dev(?! --no-install-project)", runs), \
        "the project itself is installed from the lock: uv sync --frozen --no-dev"
    assert by_kind["WORKDIR"][-1] == "/app"
    assert any("/app/.venv/bin" in e and "PATH" in e for e in by_kind["ENV"])
    user = by_kind["USER"][-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    assert steps.index(("USER", user)) > max(i for i, (k, _) in enumerate(steps) if k == "RUN")


def test_dockerignore_keeps_secrets_out_and_the_build_in() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for excluded in (".venv", "deploy/keys", "deploy/data", ".git", "runs"):
        assert excluded in patterns, f".dockerignore must exclude {excluded}"
    for needed in ("pyproject.toml", "uv.lock", "README.md", ".gitignore", "fedpriv", "server",
                   "clients", "common", "simulations", "*", "**"):
        assert needed not in patterns, f"the build needs {needed}"


def test_compose_services_use_this_image(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        build = svc.get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context in (".", "./"), f"{name} is built from this directory"
        assert "entrypoint" not in svc, f"{name} keeps the image's entrypoint (fedpriv)"


def test_key_material_is_never_committed() -> None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("git is not available")
    for path in ("deploy/keys/ca.key", "deploy/keys/nodes/node-1", "deploy/data/node-1.npz"):
        proc = subprocess.run([git, "check-ignore", "--no-index", "-q", path], cwd=ROOT)
        assert proc.returncode == 0, f"{path} is not ignored by git"


def test_docs_give_the_commands_tested_here() -> None:
    text = DEPLOYMENT_DOC.read_text()
    assert f"fedpriv {shlex.join(KEYS_COMMAND)}" in text
    assert f"fedpriv {shlex.join(SPLIT_COMMAND)}" in text
    assert f"fedpriv {shlex.join(OPERATOR_COMMAND)}" in text
