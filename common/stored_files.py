"""Every file fedpriv writes: where, what it holds, how it is protected.

The README's table "Files fedpriv writes" is generated from :data:`FILES` (``make generated``), and
the end-to-end tests walk what a simulation and the README's federation walk-through leave behind
and require every file there to be listed here, with the protection listed (:func:`entry_for`).
Every file is owner-only (0600) and every directory 0700, whatever the umask (common/fileio.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from fedpriv.common import rundir
from fedpriv.common.audit import AUDIT_EMPIRICAL, AUDIT_MD, AUDIT_PNG
from fedpriv.common.checkpoint import CHECKPOINT
from fedpriv.common.keys import (APP_KEY, APP_PUB, CA_CERT, CA_KEY, LEDGER_KEY, LEDGER_PUB, NODES_DIR, ROSTER,
                                 SUPERLINK_CERT, SUPERLINK_KEY)
from fedpriv.common.ledger import HEAD, LEDGER, PUBLIC_KEY, TORN
from fedpriv.common.operators import OPERATOR_LOG, OPERATORS_DIR
from fedpriv.common.roster import SIM_ANCHOR_KEY, SIM_ANCHOR_PUB, SIM_NODE_SECRET
from fedpriv.common.witness import RUNS as WITNESS_RUNS
from fedpriv.common.witness import STATE_PUBLIC_KEY, WITNESS_DIR

# Where (the table's first column)
RUN = "run directory"
NODE = "node state (`<state>/<node>`)"
HOME = "`$FEDPRIV_HOME`"
STATE = "server state (`--state`)"
KEYS = "key directory (`fedpriv keys --out`)"
DATA = "data files"

# How (the protection column)
SEALED = "sealed: AES-256-GCM under the sealing key, bound to run id and role"
SIGNED = "signed: Ed25519, hash-chained entries and a signed head"
SIGNED_HEAD = "signed: Ed25519 (binds run id, entry count, last hash)"
SIGNED_FILE = "signed: Ed25519 (the CA's signature)"
WITNESS = "integrity: compared with the signed ledger by the audit"
PROTECTABLE = "passphrase-protected with `--protect` (PKCS#8, scrypt, AES-256)"
PROTECTABLE_KEY = "passphrase-protected with `--protect` (scrypt, AES-256-GCM)"
PUBLIC = "public: integrity by the CA or pinning"
PLAIN = "owner-only file, not encrypted"
MADE_PROTECTED = "passphrase-protected when a key passphrase is set (PKCS#8, scrypt, AES-256)"
FLOWER = "owner-only file, not encrypted (written by Flower)"
SIGNED_REVIEW = "signed: Ed25519 over its canonical JSON (fedpriv review --verify)"


@dataclass(frozen=True)
class StoredFile:
    where: str
    pattern: str  # glob relative to ``where``
    content: str
    protection: str


LEDGER_FILES = (
    (LEDGER, "the ledger: every spend, refusal and stop as a dp-accounting DpEvent", SIGNED),
    (HEAD, "the ledger's signed head", SIGNED_HEAD),
    (PUBLIC_KEY, "the public key the ledger is signed with (a copy; the audit pins the witnessed one)", PUBLIC),
    (TORN, "only after a crash: the torn bytes crash recovery cut off the ledger's end", PLAIN),
)


def _ledger(where: str, prefix: str, whose: str) -> list[StoredFile]:
    return [StoredFile(where, prefix + name, f"{content} ({whose})", how) for name, content, how in LEDGER_FILES]


def _reviews(where: str, prefix: str = "") -> list[StoredFile]:
    """What ``fedpriv review`` writes by default (``TARGET/reviews/<UTC time>/``)."""
    return [
        StoredFile(where, f"{prefix}{rundir.REVIEWS_DIR}/*/review.json", "a compliance review: every control, its evidence, "
                   "the ledger heads it saw", SIGNED_REVIEW),
        StoredFile(where, f"{prefix}{rundir.REVIEWS_DIR}/*/*", "the review as Markdown and an HTML page, and the privacy "
                   "statement", PLAIN),
    ]


def _node(where: str, prefix: str) -> list[StoredFile]:
    return [
        *_ledger(where, prefix, "the node's own"),
        *_reviews(where, prefix),
        StoredFile(where, prefix + rundir.NODE_KEY, "the key that signs the node's ledger", MADE_PROTECTED),
        StoredFile(where, prefix + rundir.NODE_LOCK, "a lock held while the node writes its ledger (empty)", PLAIN),
        StoredFile(where, prefix + rundir.TRAINING_LOG,
                   "the node's loss, example and step counts, update norm per round (never sent)", PLAIN),
    ]


FILES: tuple[StoredFile, ...] = (
    StoredFile(RUN, rundir.SUMMARY, "final results, per-round metrics, privacy figures, the configuration", PLAIN),
    StoredFile(RUN, rundir.METRICS, "one row of server-side metrics and epsilon per round", PLAIN),
    StoredFile(RUN, rundir.PLOT, "accuracy and epsilon per round", PLAIN),
    StoredFile(RUN, rundir.MODEL, "the final global model", SEALED),
    StoredFile(RUN, CHECKPOINT, "the latest round's model, optimizer state and run state, for --resume", SEALED),
    *_ledger(RUN, "", "the run's"),
    StoredFile(RUN, AUDIT_MD, "the latest audit's report", PLAIN),
    StoredFile(RUN, AUDIT_PNG, "the latest audit's epsilon per round", PLAIN),
    StoredFile(RUN, AUDIT_EMPIRICAL, "the latest empirical audit's figures", PLAIN),
    *_reviews(RUN),
    StoredFile(RUN, f"{rundir.NODES_DIR}/{SIM_ANCHOR_KEY}", "simulations: the key that signs the simulated nodes' roster",
               PLAIN),
    StoredFile(RUN, f"{rundir.NODES_DIR}/{SIM_ANCHOR_PUB}", "simulations: its public half", PUBLIC),
    StoredFile(RUN, f"{rundir.NODES_DIR}/{SIM_NODE_SECRET}",
               "simulations: the secret the simulated nodes' SecAgg+ signing keys derive from", PLAIN),
    *_node(RUN, f"{rundir.NODES_DIR}/{rundir.simulated_node_name('*')}/"),
    *_node(NODE, ""),
    StoredFile(NODE, f"{rundir.NODE_FLWR_HOME}/*", "fedpriv node join: Flower's home for the node's "
               "processes, with the apps it installed (signed ones only)", FLOWER),
    StoredFile(HOME, f"{rundir.KEYS_DIR}/{rundir.LEDGER_SIGNING_KEY}", "the ledger-signing key fedpriv simulate makes",
               MADE_PROTECTED),
    StoredFile(HOME, f"{rundir.KEYS_DIR}/{rundir.CHECKPOINT_KEY}",
               "the sealing key fedpriv simulate (and data seal) make", MADE_PROTECTED),
    StoredFile(HOME, f"{rundir.KEYS_DIR}/{rundir.CHECKPOINT_KEY}.next", "only during fedpriv keys rotate: the new key",
               PLAIN),
    StoredFile(HOME, f"{WITNESS_DIR}/{STATE_PUBLIC_KEY}", "the ledger key's public half, to pin in an audit", PUBLIC),
    StoredFile(HOME, f"{WITNESS_DIR}/{WITNESS_RUNS}/*.json", "every run ledger's latest signed head (the witness)",
               WITNESS),
    StoredFile(HOME, f"{rundir.NODES_DIR}/*/*", "node state, when no run directory or client.state_dir names one "
               "(see node state)", "as node state"),
    StoredFile(STATE, f"{rundir.STATE_RUNS}/*/*", "the runs (see run directory)", "as run directory"),
    StoredFile(STATE, f"{WITNESS_DIR}/{STATE_PUBLIC_KEY}", "the ledger key's public half, to pin in an audit", PUBLIC),
    StoredFile(STATE, f"{WITNESS_DIR}/{WITNESS_RUNS}/*.json", "every run ledger's latest signed head (the witness)",
               WITNESS),
    *_ledger(STATE, f"{OPERATOR_LOG}/", "the operator log: every operator action"),
    *_reviews(STATE),
    StoredFile(STATE, rundir.STATE_OPERATORS, "the operators' port and its CA, for fedpriv operator commands", PLAIN),
    StoredFile(STATE, f"{rundir.STATE_DATABASE}*", "Flower's SuperLink database (runs, messages, registered nodes)",
               FLOWER),
    StoredFile(STATE, f"{rundir.STATE_FLWR_HOME}/*", "Flower's own configuration and installed apps", FLOWER),
    StoredFile(KEYS, CA_KEY, "the federation CA's key (keep it offline)", PROTECTABLE),
    StoredFile(KEYS, CA_CERT, "the federation CA certificate", PUBLIC),
    StoredFile(KEYS, SUPERLINK_KEY, "the SuperLink's TLS key", PROTECTABLE),
    StoredFile(KEYS, SUPERLINK_CERT, "the SuperLink's TLS certificate", PUBLIC),
    StoredFile(KEYS, f"{NODES_DIR}/node-*.pub", "each node's public key, to register", PUBLIC),
    StoredFile(KEYS, f"{NODES_DIR}/node-*", "each node's authentication key (OpenSSH; PKCS#8 when protected)",
               PROTECTABLE),
    StoredFile(KEYS, LEDGER_KEY, "the server's ledger-signing key", PROTECTABLE),
    StoredFile(KEYS, LEDGER_PUB, "its public half, to pin in an audit", PUBLIC),
    StoredFile(KEYS, APP_KEY, "the app-signing key", PROTECTABLE),
    StoredFile(KEYS, APP_PUB, "its public half, which nodes trust", PUBLIC),
    StoredFile(KEYS, rundir.CHECKPOINT_KEY, "the sealing key", PROTECTABLE_KEY),
    StoredFile(KEYS, ROSTER, "the node roster", SIGNED_FILE),
    StoredFile(KEYS, f"{OPERATORS_DIR}/*.key", "an operator's TLS client key", PROTECTABLE),
    StoredFile(KEYS, f"{OPERATORS_DIR}/*.crt", "an operator's client certificate (name and role)", PUBLIC),
    StoredFile(DATA, "*.sealed", "fedpriv data seal / split-data --seal: a node's data file", SEALED),
    StoredFile(DATA, "*.npz", "fedpriv split-data without --seal: a node's data file", PLAIN),
)


def entry_for(where: str, relative: str) -> StoredFile | None:
    """The entry listing the file at ``relative`` (a POSIX path) under ``where``; the first that
    matches, most specific first (as listed)."""
    for entry in FILES:
        if entry.where == where and fnmatch.fnmatchcase(relative, entry.pattern):
            return entry
    return None


def markdown() -> str:
    """The README's table."""
    lines = ["| where | file | what it holds | protection |", "|---|---|---|---|"]
    for entry in FILES:
        lines.append(f"| {entry.where} | `{entry.pattern}` | {entry.content} | {entry.protection} |")
    return "\n".join(lines)
