"""Keys in a hardware security module: a SoftHSM2 token (Debian's softhsm2) through python-pkcs11.
A test token is created, the sealing key (AES-256) and the ledger-signing key (Ed25519) are
generated inside it, non-extractable; a short simulation seals its checkpoint and model and signs its
ledger with them, and the audit verifies it. Skipped, with the reason, where SoftHSM2 is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest

from fedpriv.common import checkpoint, key_providers, rundir
from fedpriv.common.ledger import load_public_key, verify_ledger
from tests.conftest import ROOT, run_cli, run_cli_here

MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
           "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
MODULE = next((m for m in MODULES if Path(m).is_file()), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MODULE is None or shutil.which("softhsm2-util") is None,
                       reason="SoftHSM2 is not installed (Debian package softhsm2; .ci/run installs it where it can)"),
]

SETTINGS = ["run.rounds=1", "federation.num_clients=3", "federation.min_available_clients=3",
            "data.dataset=digits", "model.name=mlp", "model.mlp_units=16"]


CHECK = """
import json, sys
from pkcs11 import Attribute
from fedpriv.common import checkpoint, key_providers
key = checkpoint.key_from_environment()
arrays, header = checkpoint.read_checkpoint(checkpoint.Path(sys.argv[1]), key, sys.argv[2])
print(json.dumps({"round": header["round"], "extractable": key._key[Attribute.EXTRACTABLE],
                  "sensitive": key._key[Attribute.SENSITIVE]}))
"""


def test_a_simulation_seals_and_signs_with_keys_in_a_token_and_audits(tmp_path, own_server_state):
    """Every use of the token is in a process of its own (the command line, as a user runs it):
    a PKCS#11 module loaded into the long-lived pytest worker shares it with everything earlier
    tests loaded there."""
    label = f"fedpriv-{os.getpid()}"
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    init = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", "4321",
                           "--so-pin", "87654321"], env=env, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    (tmp_path / "pin").write_text("4321\n")
    sealing, signing = f"pkcs11:token={label};object=sealing", f"pkcs11:token={label};object=ledger"
    env.update({key_providers.MODULE_ENV: MODULE, key_providers.PIN_FILE_ENV: str(tmp_path / "pin"),
                "FEDPRIV_HOME": str(tmp_path / "home"), checkpoint.KEY_FILE_ENV: sealing,
                rundir.LEDGER_KEY_ENV: signing})
    env.pop(checkpoint.KEY_ENV, None)
    made = run_cli("keys", "pkcs11", "--sealing", sealing, "--signing", signing, env=env)
    assert made.returncode == 0, made.stderr
    token_public = made.stdout[made.stdout.index("-----BEGIN PUBLIC KEY"):].encode()
    (tmp_path / "token.pub").write_bytes(token_public)

    run = tmp_path / "run"
    args = ["simulate", "--preset", "quickstart", *[x for s in SETTINGS for x in ("--set", s)], "--out", str(run)]
    proc = subprocess.run([sys.executable, "-m", "tests.injected", "--threads", "--", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Nothing of either key on disk: no key file was made.
    assert not (tmp_path / "home" / rundir.KEYS_DIR).exists()
    # Signed in the token: the ledger verifies with the token's Ed25519 public key, and audits.
    assert (run / "ledger.pub").read_bytes() == token_public
    assert verify_ledger(run, load_public_key(tmp_path / "token.pub")).ok
    # (the audit needs no private key: in this process, without the token's variables, which would
    # make the command open the token here)
    plain_env = {k: v for k, v in env.items() if k not in (checkpoint.KEY_FILE_ENV, rundir.LEDGER_KEY_ENV)}
    audit = run_cli_here("audit", str(run), "--json", "--public-key", str(tmp_path / "token.pub"), env=plain_env)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"] and report["key"]["pinned"], report["failures"]
    # Sealed in the token: the files are bound to the run and open with the token's key only,
    # which the token will not hand out.
    run_id = report["run_id"]
    assert checkpoint.binding_of((run / "model.sealed").read_bytes(), "model")[0] == {"role": "model", "run": run_id}
    with pytest.raises(checkpoint.CheckpointError, match="altered, or the key is wrong"):
        checkpoint.read_model(run / "model.sealed", checkpoint.new_key(), run_id)
    checked = subprocess.run([sys.executable, "-c", CHECK, str(run / checkpoint.CHECKPOINT), run_id], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"round": 1, "extractable": False, "sensitive": True}
    exported = run_cli("model", "export", str(run), "--out", str(tmp_path / "m.npz"), env=env)
    assert exported.returncode == 0, exported.stderr
    with np.load(tmp_path / "m.npz") as model:
        assert sum(model[name].size for name in model.files) == json.loads((run / "summary.json").read_text())[
            "model_parameters"]


def test_bad_pkcs11_references_are_one_clear_error(tmp_path):
    for uri, message in (("pkcs11:object=x", "must name a token and an object"),
                         ("pkcs11:token=t;object", "is not NAME=VALUE")):
        with pytest.raises(key_providers.KeyProviderError, match=message):
            key_providers.parse_uri(uri)
    env = {checkpoint.KEY_FILE_ENV: "pkcs11:token=none;object=sealing"}
    with pytest.raises(key_providers.KeyProviderError, match="FEDPRIV_PKCS11_MODULE"):
        checkpoint.key_from_environment(env)
    # (a module that is not there: loading SoftHSM2 here would fix its configuration for this process)
    env[key_providers.MODULE_ENV] = str(tmp_path / "libmissing.so")
    with pytest.raises(key_providers.KeyProviderError, match="cannot open PKCS#11 token 'none'"):
        checkpoint.key_from_environment(env)
