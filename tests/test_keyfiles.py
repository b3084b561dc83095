"""Passphrase-protected keys (common/keyfiles.py) and key material held out of child processes
(common/secret_env.py)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.common import checkpoint, keyfiles, secret_env
from fedpriv.common.keyfiles import PassphraseError
from tests.conftest import run_cli_here

SECRET = b"correct horse battery"
GOOD = {keyfiles.PASSPHRASE_ENV: SECRET.decode()}


def _public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("make", [lambda: ec.generate_private_key(ec.SECP384R1()), Ed25519PrivateKey.generate],
                         ids=["ec", "ed25519"])
def test_a_protected_key_opens_only_with_its_passphrase(make, tmp_path):
    key = make()
    pem = keyfiles.private_pem(key, SECRET)
    assert keyfiles.is_protected(pem) and not keyfiles.is_protected(keyfiles.private_pem(key))
    body = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    plain = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    assert plain[-32:] not in body  # (the key's secret bytes end its plain PKCS#8 encoding)
    assert _public(keyfiles.parse_private_key(pem, GOOD)) == _public(key)
    # cryptography's own loader reads the same file with the passphrase (the format is standard)
    assert _public(serialization.load_pem_private_key(pem, SECRET)) == _public(key)
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        keyfiles.parse_private_key(pem, {keyfiles.PASSPHRASE_ENV: "not the one"})
    with pytest.raises(PassphraseError, match="is passphrase-protected"):
        keyfiles.parse_private_key(pem, {})
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(pem, None)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_openssl_reads_the_protected_key_and_sees_scrypt(tmp_path):
    """OpenSSL, an implementation fedpriv does not share, decrypts the file, and its ASN.1 parse shows
    PBES2 with scrypt at N = 16384, r = 8, p = 5 and AES-256-CBC."""
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "k.pem"
    path.write_bytes(keyfiles.private_pem(key, SECRET))
    out = subprocess.run(["openssl", "pkey", "-in", str(path), "-passin", f"pass:{SECRET.decode()}", "-pubout"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == _public(key)
    wrong = subprocess.run(["openssl", "pkey", "-in", str(path), "-passin", "pass:wrong", "-noout"],
                           capture_output=True, timeout=60)
    assert wrong.returncode != 0
    parsed = subprocess.run(["openssl", "asn1parse", "-in", str(path)], capture_output=True, text=True, timeout=60).stdout
    assert ":PBES2" in parsed and ":scrypt" in parsed and ":aes-256-cbc" in parsed
    integers = [line.rsplit(":", 1)[1] for line in parsed.splitlines() if "prim: INTEGER" in line]
    assert integers[:3] == ["4000", "08", "05"]  # hex: N = 16384, r = 8, p = 5


def test_the_passphrase_comes_from_a_file_or_the_environment_never_argv(tmp_path, monkeypatch):
    path = tmp_path / "pass"
    path.write_bytes(SECRET + b"\nignored second line\n")
    assert keyfiles.passphrase({keyfiles.PASSPHRASE_FILE_ENV: str(path)}) == SECRET
    assert keyfiles.passphrase(GOOD) == SECRET
    assert keyfiles.passphrase({}) is None
    with pytest.raises(PassphraseError, match="cannot read the passphrase file"):
        keyfiles.passphrase({keyfiles.PASSPHRASE_FILE_ENV: str(tmp_path / "missing")})
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(PassphraseError, match="is empty"):
        keyfiles.passphrase({keyfiles.PASSPHRASE_FILE_ENV: str(tmp_path / "empty")})
    proc = run_cli_here("keys", "--help")
    assert "--passphrase" not in proc.stdout and "--protect" in proc.stdout


def test_a_protected_checkpoint_key_unwraps_only_with_its_passphrase(tmp_path):
    key = checkpoint.new_key()
    path = tmp_path / "checkpoint.key"
    path.write_bytes(checkpoint.encode_key(key, SECRET))
    assert base64.b64encode(key) not in path.read_bytes()
    assert checkpoint.key_from_environment({checkpoint.KEY_FILE_ENV: str(path), **GOOD}) == key
    with pytest.raises(checkpoint.CheckpointError, match="wrong passphrase"):
        checkpoint.key_from_environment({checkpoint.KEY_FILE_ENV: str(path), keyfiles.PASSPHRASE_ENV: "nope nope"})
    with pytest.raises(checkpoint.CheckpointError, match="is passphrase-protected"):
        checkpoint.key_from_environment({checkpoint.KEY_FILE_ENV: str(path)})


def test_flower_gets_a_protected_key_decrypted_in_memory_only(tmp_path, monkeypatch):
    """What a Flower process is handed for a protected key: an in-memory file a child can read,
    in the form Flower takes (OpenSSH for node keys), and no plaintext key file anywhere."""
    monkeypatch.setenv(keyfiles.PASSPHRASE_ENV, SECRET.decode())
    key = ec.generate_private_key(ec.SECP384R1())
    plain = tmp_path / "plain"
    plain.write_bytes(keyfiles.private_openssh(key))
    assert keyfiles.key_for_flower(plain, openssh=True) == (str(plain), [])
    protected = tmp_path / "node-1"
    protected.write_bytes(keyfiles.private_pem(key, SECRET))
    before = sorted(p.name for p in tmp_path.iterdir())
    name, fds = keyfiles.key_for_flower(protected, openssh=True)
    try:
        assert name == f"/dev/fd/{fds[0]}"
        child = subprocess.run([sys.executable, "-c", f"import sys; sys.stdout.buffer.write(open({name!r}, 'rb').read())"],
                               capture_output=True, pass_fds=fds, timeout=60)
        handed = child.stdout
        assert handed.startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
        assert _public(serialization.load_ssh_private_key(handed, None)) == _public(key)
        assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("/memfd:")  # no file system path
    finally:
        for fd in fds:
            os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_key_material_in_the_environment_is_held_out_of_children(monkeypatch):
    from fedpriv.common.process import flower_environment

    value = base64.b64encode(checkpoint.new_key()).decode()
    monkeypatch.setenv(checkpoint.KEY_ENV, value)
    monkeypatch.setenv(keyfiles.PASSPHRASE_ENV, SECRET.decode())
    with secret_env.held():
        assert checkpoint.KEY_ENV not in os.environ and keyfiles.PASSPHRASE_ENV not in os.environ
        assert checkpoint.key_from_environment() == base64.b64decode(value)  # still fedpriv's to use
        assert keyfiles.passphrase() == SECRET
        env = flower_environment()
        child = subprocess.run([sys.executable, "-c", "import os; print('\\n'.join(os.environ))"], env=env,
                               capture_output=True, text=True, timeout=60)
        names = child.stdout.splitlines()
        assert checkpoint.KEY_ENV not in names and keyfiles.PASSPHRASE_ENV not in names
        assert value not in child.stdout
        assert secret_env.for_child(checkpoint.KEY_ENV) == {checkpoint.KEY_ENV: value}
    assert os.environ[checkpoint.KEY_ENV] == value  # put back when the command ends
