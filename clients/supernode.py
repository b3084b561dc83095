"""``fedpriv node join``: this machine and its own data join a real federation.

Before anything starts, the node checks its data against the federation's configuration, its
key and the CA certificate, the app-signing keys it trusts, that the SuperLink is reachable (a
bounded number of tries) and that it presents a certificate the CA signed. Then it runs Flower's
``flower-supernode`` with TLS and node authentication, in process isolation beside fedpriv's app
gate (:mod:`clients.app_gate`), so that only apps signed by a trusted key run on the node, and
fedpriv's ClientApp trains on the node's file under the node's own record-level budget, kept in
a signed ledger in its state directory, so spending carries across runs and restarts. Without TLS (``--insecure``) it warns loudly and cannot
authenticate (Flower only authenticates nodes over TLS).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpriv.clients.budget import NodeBudgetGuard
from fedpriv.common import checkpoint, keyfiles, secret_env
from fedpriv.common.fileio import private_dir
from fedpriv.clients.policy import POLICY_PATH_KEY, load_policy
from fedpriv.common.appsign import APP_PUB, TRUST_ENV, fingerprint, load_trusted_keys
from fedpriv.common.config import RunConfig
from fedpriv.common.data import load_dataset, load_node_data
from fedpriv.common.process import Child, flower_environment, flower_executable
from fedpriv.common.rundir import NODE_FLWR_HOME, home_nodes_root
from fedpriv.common.tls import (
    Address, DeploymentError, check_node_key, check_tls, load_certificate, parse_address, wait_for_port,
)

INSECURE_WARNING = (
    "WARNING: --insecure: this node talks to the SuperLink WITHOUT TLS. Model updates and "
    "privacy records cross the network in plaintext, anyone on the path can read or alter them, "
    "and the node cannot authenticate. Use it only on a trusted test network."
)
UNGATED_WARNING = (
    "WARNING: --insecure without a trusted app-signing key (--trust): this node runs ANY app the "
    "SuperLink sends it, and such an app can read this node's data."
)


@dataclass(frozen=True)
class JoinPlan:
    argv: list[str]
    env: dict[str, str]
    superlink: Address
    root_cert: Path | None
    name: str
    state_dir: Path  # this node's ledger lives in state_dir / name
    examples: int
    budget: float
    spent: float
    max_retries: int
    gate_argv: list[str]  # fedpriv's app gate (clients.app_gate), started beside the SuperNode; [] = none
    gate_env: dict[str, str]
    trusted: list[str]  # fingerprints of the app-signing keys the node trusts
    pass_fds: tuple[int, ...] = ()  # a protected node key, decrypted in memory for the SuperNode


def flwr_home(state_dir: Path, name: str) -> Path:
    """Flower's home for a node's SuperNode and app processes: Flower installs each app it runs
    under ``$FLWR_HOME/apps``, so the node's own, in its state, not the user's ``~/.flwr``, which
    other nodes on the machine would install into at the same moment."""
    return state_dir / name / NODE_FLWR_HOME


def _node_config_value(text: str, what: str) -> str:
    if '"' in text or "\n" in text:
        raise DeploymentError(f"{what} {text!r} cannot contain quotes or newlines")
    return f'"{text}"'


def plan_join(cfg: RunConfig, superlink: str, data: Path, root_cert: Path | None = None,
              auth_key: Path | None = None, budget: float | None = None, name: str | None = None,
              state: Path | None = None, insecure: bool = False, port: int = 9094,
              max_retries: int = 5, max_wait: float = 120.0, trust: list[Path] | None = None,
              policy: Path | None = None) -> JoinPlan:
    """Check everything ``join`` needs (and the node's ledger, if it has one); nothing is started or written."""
    address = parse_address(superlink, "--superlink")
    if max_retries < 0 or max_wait <= 0:
        raise DeploymentError("--max-retries must be >= 0 and --max-wait positive")
    if budget is not None and not budget > 0:
        raise DeploymentError(f"--budget must be a positive epsilon, got {budget}")
    if not insecure:
        if root_cert is None or auth_key is None:
            raise DeploymentError("--root-cert and --auth-key are required (TLS and node authentication); "
                                  "--insecure runs without both, for trusted test networks only")
        load_certificate(root_cert, "root certificate")
        check_node_key(auth_key)
    trust = [p.resolve() for p in trust or []]
    if not trust and root_cert is not None and (root_cert.parent / APP_PUB).exists():
        trust = [(root_cert.parent / APP_PUB).resolve()]  # the keys directory of fedpriv keys
    if not trust and not insecure:
        raise DeploymentError(f"no trusted app-signing key: give --trust {APP_PUB} (from fedpriv keys), or put it "
                              f"next to --root-cert; the node runs only apps signed by a key it trusts")
    trusted = [fingerprint(k) for k in load_trusted_keys(trust)]
    dataset = load_dataset(cfg.data, cfg.run.seed)  # the federation's input shape and classes
    x, _ = load_node_data(str(data), dataset.input_shape, dataset.num_classes, cfg.data.label_column)
    name = name or (auth_key.name if auth_key else "node")
    state_dir = (state or home_nodes_root()).resolve()
    floor = load_policy(policy)  # the node's own privacy floor: every run is held to it
    record_budget = floor.budget_total if budget is None else budget
    spent = 0.0
    if (state_dir / name / "ledger.jsonl").exists():  # verify what this node has spent before
        guard = NodeBudgetGuard(state_dir / name, record_budget, cfg.privacy.delta)
        spent = guard.epsilon() if guard.spends else 0.0
    node_config = [
        f"data-path={_node_config_value(str(data.resolve()), '--data')}",
        f"node-name={_node_config_value(name, '--name')}",
        f"state-dir={_node_config_value(str(state_dir), '--state')}",
    ]
    if budget is not None:
        node_config.append(f"record-budget={float(budget)!r}")
    if policy is not None:
        node_config.append(f"{POLICY_PATH_KEY}={_node_config_value(str(policy.resolve()), '--policy')}")
    if not insecure:  # the node signs its SecAgg+ keys and checks the roster with these
        node_config += [f"auth-key={_node_config_value(str(auth_key.resolve()), '--auth-key')}",
                        f"ca-cert={_node_config_value(str(root_cert.resolve()), '--root-cert')}"]
    argv = [flower_executable("flower-supernode"), "--superlink", str(address)]
    pass_fds: list[int] = []
    if insecure:
        argv.append("--insecure")
    else:
        flower_key, pass_fds = keyfiles.key_for_flower(auth_key.resolve(), openssh=True)
        argv += ["--root-certificates", str(root_cert.resolve()), "--auth-supernode-private-key", flower_key]
    argv += ["--node-config", " ".join(node_config), "--port", str(port),
             "--max-retries", str(max_retries), "--max-wait-time", str(float(max_wait))]
    gate_argv: list[str] = []
    if trust:  # Flower's SuperExec is replaced by the app gate, which fedpriv starts beside the SuperNode
        argv += ["--isolation", "process"]
        gate_argv = [sys.executable, "-m", "fedpriv.clients.app_gate", "superexec",
                     "--runtime-api-address", f"127.0.0.1:{port}", "--insecure"]
    # The node's app processes read its data file and its key: key material only if they need it.
    secrets: dict[str, str] = {}
    if checkpoint.is_sealed(data):
        secrets.update(secret_env.for_child(checkpoint.KEY_ENV, keyfiles.PASSPHRASE_ENV))
    if auth_key is not None and keyfiles.is_protected(auth_key.read_bytes()):
        secrets.update(secret_env.for_child(keyfiles.PASSPHRASE_ENV))
    own = {"FLWR_HOME": str(flwr_home(state_dir, name))}
    gate_env = flower_environment({TRUST_ENV: os.pathsep.join(str(p) for p in trust), **own, **secrets})
    # (without the gate, Flower's own SuperExec under the SuperNode runs the apps)
    return JoinPlan(argv, flower_environment(own if gate_argv else {**own, **secrets}), address,
                    None if insecure else root_cert, name, state_dir, int(len(x)), float(record_budget or 0), spent,
                    max_retries, gate_argv, gate_env, trusted, tuple(pass_fds))


NOT_REGISTERED = ("code: 2004", "Failed to activate SuperNode")


def _failure(child: Child, plan: JoinPlan, code: int) -> DeploymentError:
    if child.output_contains(*NOT_REGISTERED):
        return DeploymentError(
            f"the SuperLink at {plan.superlink} refused this node: its key is not registered there "
            "(the operator registers the node's .pub file with fedpriv server start --register)")
    if child.output_contains("CERTIFICATE_VERIFY_FAILED"):
        return DeploymentError(f"the SuperLink at {plan.superlink} failed TLS verification against "
                               f"{plan.root_cert}")
    if child.output_contains("Giving up reconnection"):
        return DeploymentError(f"lost the SuperLink at {plan.superlink}: gave up after "
                               f"{plan.max_retries} retries")
    errors = [ln.strip() for ln in child.tail if ln.strip() and "INFO" not in ln]
    return DeploymentError(f"flower-supernode exited with code {code}" + (f": {errors[-1]}" if errors else ""))


def describe(plan: JoinPlan) -> str:
    """Who joins where, with what, and what the node has already spent (from its own ledger)."""
    budget = f"record-level budget epsilon {plan.budget:g}" if plan.budget else "no record-level budget"
    text = (f"node {plan.name} joining {plan.superlink} ({'TLS, authenticated' if plan.root_cert else 'NO TLS'}) "
            f"with {plan.examples} examples; {budget}, spent so far {plan.spent:.3f} "
            f"(ledger {plan.state_dir / plan.name})")
    if plan.budget and plan.spent >= plan.budget:
        text += "; the budget is spent: this node will refuse to train"
    if plan.trusted:
        text += f"; runs only apps signed by app-signing key {', '.join(plan.trusted)}"
    else:
        text += "; runs ANY app (no trusted app-signing key)"
    return text


def join(plan: JoinPlan, out: Any = sys.stdout) -> int:
    """Run the SuperNode until it exits or this process is stopped."""
    wait_for_port(plan.superlink, attempts=plan.max_retries + 1)
    if plan.root_cert is None:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    if not plan.gate_argv:
        print(UNGATED_WARNING, file=sys.stderr, flush=True)
    if plan.root_cert is not None:
        check_tls(plan.superlink, plan.root_cert)
    print(f"fedpriv: {describe(plan)}", file=out, flush=True)
    private_dir(flwr_home(plan.state_dir, plan.name))
    delay = 2.0
    for attempt in range(plan.max_retries + 1):
        child = Child(plan.argv, plan.env, pass_fds=plan.pass_fds)
        gate = (Child([*plan.gate_argv, "--parent-pid", str(child.proc.pid)], plan.gate_env)
                if plan.gate_argv else None)
        try:
            code = child.wait()
        finally:
            if gate is not None:
                gate.stop()
        if code == 0:
            return 0
        failure = _failure(child, plan, code)
        # A node can start before the operator has registered its key: try again, boundedly.
        if not child.output_contains(*NOT_REGISTERED) or attempt == plan.max_retries:
            raise failure
        print(f"fedpriv: {failure}; trying again in {delay:.0f} s", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(2 * delay, 30.0)
    raise AssertionError("unreachable")
