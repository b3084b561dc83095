"""Keys in a hardware security module: a SoftHSM2 token (Debian's softhsm2) through python-pkcs11.
A test token is created, the sealing key (AES-256) and the ledger-signing key (Ed25519) are
generated inside it, non-extractable; a short simulation seals its checkpoint and model and signs its
ledger with them, and the audit verifies it. Skipped, with the reason, where SoftHSM2 is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fedpriv.common import checkpoint, key_providers, rundir
from fedpriv.common.ledger import load_public_key, verify_ledger
from tests.conftest import run_cli_here, simulate_run

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


def test_a_simulation_seals_and_signs_with_keys_in_a_token_and_audits(tmp_path, own_server_state):
    label = f"fedpriv-{os.getpid()}"
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    init = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", "4321",
                           "--so-pin", "87654321"], env={**os.environ, "SOFTHSM2_CONF": str(conf)},
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    (tmp_path / "pin").write_text("4321\n")
    sealing, signing = f"pkcs11:token={label};object=sealing", f"pkcs11:token={label};object=ledger"
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), key_providers.MODULE_ENV: MODULE,
           key_providers.PIN_FILE_ENV: str(tmp_path / "pin"), "FEDPRIV_HOME": str(tmp_path / "home"),
           checkpoint.KEY_FILE_ENV: sealing, rundir.LEDGER_KEY_ENV: signing}
    env.pop(checkpoint.KEY_ENV, None)
    os.environ["SOFTHSM2_CONF"] = str(conf)  # (read once, when this process first loads the module)
    key_providers.generate(sealing, signing, env)

    run = tmp_path / "run"
    proc, summary = simulate_run(run, SETTINGS, env=env, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Nothing of either key on disk: no key file was made, and the token says they cannot be read out.
    assert not (tmp_path / "home" / rundir.KEYS_DIR).exists()
    from pkcs11 import Attribute

    token_key = checkpoint.key_from_environment(env)
    assert token_key._key[Attribute.EXTRACTABLE] is False and token_key._key[Attribute.SENSITIVE] is True
    # Sealed in the token: the files open with the token's key, bound to the run.
    run_id = verify_ledger(run).entries[0]["parameters"]["run_id"]
    model = checkpoint.read_model(run / "model.sealed", token_key, run_id)
    assert sum(a.size for a in model) == summary["model_parameters"]
    assert checkpoint.read_checkpoint(run / checkpoint.CHECKPOINT, token_key, run_id)[1]["round"] == 1
    with pytest.raises(checkpoint.CheckpointError, match="altered, or the key is wrong"):
        checkpoint.read_model(run / "model.sealed", checkpoint.new_key(), run_id)
    # Signed in the token: the ledger verifies with the token's Ed25519 public key.
    signer = key_providers.Pkcs11SigningKey(signing, env)
    (tmp_path / "token.pub").write_bytes((run / "ledger.pub").read_bytes())
    assert load_public_key(tmp_path / "token.pub") == signer.public_key()
    assert verify_ledger(run, signer.public_key()).ok
    audit = run_cli_here("audit", str(run), "--json", "--public-key", str(tmp_path / "token.pub"), env=env)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"] and report["key"]["pinned"], report["failures"]
    # The model exports through the token's key too.
    exported = run_cli_here("model", "export", str(run), "--out", str(tmp_path / "m.npz"), env=env)
    assert exported.returncode == 0, exported.stderr


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
