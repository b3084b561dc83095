"""fedpriv ships under its own name: the wheel adds no generic top-level import names."""

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

PARTS = ("common", "server", "clients", "simulations")
OLD_IMPORT = re.compile(rf"^\s*(from|import)\s+({'|'.join(PARTS)})\b", re.M)


def test_no_source_file_imports_the_parts_by_their_bare_names():
    """One name per module: importing ``common.x`` beside ``fedpriv.common.x`` would load it twice."""
    offenders = []
    for folder in (*PARTS, "fedpriv", "tests", "benchmarks", "docs"):
        for path in (ROOT / folder).rglob("*.py"):
            if OLD_IMPORT.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def _uv() -> str | None:
    return shutil.which("uv") or next((str(p) for p in [ROOT / ".tools" / "bin" / "uv"] if p.exists()), None)


@pytest.mark.slow
@pytest.mark.skipif(_uv() is None, reason="uv builds the wheel (make installs it into .tools/)")
def test_the_wheel_adds_only_fedpriv_and_its_parts_import_from_it(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([_uv(), "build", "--wheel", "--out-dir", str(dist)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("fedpriv-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedpriv"}
    for part in PARTS:
        assert f"fedpriv/{part}/__init__.py" in names and f"{part}/__init__.py" not in names
    # Import from the unpacked wheel only (the checkout, put on the path by the editable install,
    # is removed): the parts resolve inside fedpriv, a bare ``common`` does not exist.
    probe = (
        "import sys\n"
        f"sys.path = [p for p in sys.path if p and __import__('pathlib').Path(p).resolve() != "
        f"__import__('pathlib').Path({str(ROOT)!r})]\n"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        "import fedpriv.server.app, fedpriv.clients.app, fedpriv.common.accounting\n"
        "print(fedpriv.server.app.__file__)\n"
        "try:\n    import common\nexcept ModuleNotFoundError:\n    print('no common')\n"
        "from fedpriv.cli import main\n"
        "main(['--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.splitlines()[0].startswith(str(tmp_path / "site" / "fedpriv" / "server"))
    assert "no common" in out and "usage: fedpriv" in out
