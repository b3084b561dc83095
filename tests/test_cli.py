"""The front door: help everywhere, and bad input gives one clear line, never a traceback.

Most cases run ``fedpriv`` in this process (``cli_here``: they stop before anything starts); the
top-level help and two bad inputs also run in a fresh interpreter (``cli``), as a user runs them.
"""

import numpy as np
import pytest


def _assert_clean_error(proc, fragment):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


@pytest.mark.parametrize("args", [[], ["simulate"], ["presets"], ["config"], ["privacy"], ["privacy", "dpsgd"],
                                  ["privacy", "dpfedavg"], ["audit"]])
def test_help(cli_here, args):
    proc = cli_here(*args, "--help")
    assert proc.returncode == 0 and "usage: fedpriv" in proc.stdout


def test_help_in_a_fresh_interpreter(cli):
    proc = cli("--help")
    assert proc.returncode == 0 and "usage: fedpriv" in proc.stdout


@pytest.mark.parametrize("fresh", [False, True], ids=["here", "fresh-interpreter"])
def test_unknown_preset(cli, cli_here, tmp_path, fresh):
    run = cli if fresh else cli_here
    _assert_clean_error(run("simulate", "--preset", "nope", "--out", str(tmp_path / "r")), "unknown preset 'nope'")


def test_malformed_toml(cli_here, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dp\nnoise_multiplier = \n")
    _assert_clean_error(cli_here("simulate", "--config", str(bad), "--out", str(tmp_path / "r")), "malformed TOML")


@pytest.mark.parametrize("fresh", [False, True], ids=["here", "fresh-interpreter"])
def test_bad_override(cli, cli_here, tmp_path, fresh):
    run = cli if fresh else cli_here
    _assert_clean_error(run("simulate", "--set", "dp.noise_multiplier=-1", "--out", str(tmp_path / "r")),
                        "dp.noise_multiplier must be >= 0.0")


def test_missing_data_file(cli_here, tmp_path):
    proc = cli_here("simulate", "--set", "data.dataset=file", "--set", f"data.path={tmp_path / 'missing.npz'}",
               "--out", str(tmp_path / "r"))
    _assert_clean_error(proc, "data file not found")


def test_wrong_shape_data(cli_here, tmp_path):
    path = tmp_path / "flat.npz"
    np.savez(path, x=np.random.default_rng(0).random((100, 20)), y=np.arange(100) % 2)
    proc = cli_here("simulate", "--set", "data.dataset=file", "--set", f"data.path={path}",
               "--set", "model.name=cnn", "--out", str(tmp_path / "r"))
    _assert_clean_error(proc, "the cnn model needs images")


def test_mismatched_labels(cli_here, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((10, 28, 28)), y=np.zeros(9))
    proc = cli_here("simulate", "--set", "data.dataset=file", "--set", f"data.path={path}", "--out", str(tmp_path / "r"))
    _assert_clean_error(proc, "10 feature rows but 9 labels")


@pytest.mark.parametrize("settings, fragment", [
    (["simulation.ray_address=127.0.0.1:1"], "set client.state_dir"),  # nowhere shared for the ledgers
    (["simulation.ray_address=head-without-port", "client.state_dir=S"], "must be host:port"),
    (["simulation.ray_address=127.0.0.1:1", "client.state_dir=S"], "cannot join the Ray cluster at 127.0.0.1:1"),
], ids=["no-state-dir", "malformed", "nothing-listening"])
def test_a_ray_cluster_that_cannot_be_used_is_refused_before_anything_starts(cli_here, tmp_path, settings, fragment):
    args = [x for s in settings for x in ("--set", s.replace("=S", f"={tmp_path / 'shared'}"))]
    proc = cli_here("simulate", *args, "--out", str(tmp_path / "r"))
    _assert_clean_error(proc, fragment)
    assert not (tmp_path / "r").exists() and not (tmp_path / "shared").exists()


def test_ray_address_names_the_cluster_unless_the_setting_says_local(cli_here, tmp_path, monkeypatch):
    from fedpriv.common.settings import resolve_config
    from fedpriv.simulations.run import ray_address

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    proc = cli_here("simulate", "--set", "data.dataset=digits", "--out", str(tmp_path / "r"))
    _assert_clean_error(proc, "the Ray cluster at 127.0.0.1:1")  # Ray's own variable is honoured
    assert ray_address(resolve_config("quickstart", None, ["simulation.ray_address=local"])) == ""
    assert ray_address(resolve_config("quickstart", None, ["simulation.ray_address=auto"])) == "auto"


def test_existing_run_directory_is_never_overwritten(cli_here, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    _assert_clean_error(cli_here("simulate", "--out", str(out)), "already exists")
    assert (out / "summary.json").read_text() == "{}"


def test_config_prints_resolved_toml(cli_here):
    proc = cli_here("config", "--preset", "no-dp", "--set", "run.rounds=3")
    assert proc.returncode == 0
    assert "[dp]\nenabled = false" in proc.stdout and "rounds = 3" in proc.stdout


def test_presets_lists_quickstart(cli_here):
    proc = cli_here("presets")
    assert proc.returncode == 0 and "quickstart" in proc.stdout and "no-dp" in proc.stdout


def test_configuration_docs_are_current():
    from fedpriv.cli import settings_markdown
    from tests.conftest import ROOT

    assert settings_markdown() in (ROOT / "docs" / "configuration.md").read_text()


def test_the_readme_table_of_stored_files_is_current():
    from fedpriv.common import stored_files
    from tests.conftest import ROOT

    assert stored_files.markdown() in (ROOT / "README.md").read_text()


def test_the_readme_review_controls_and_default_policy_are_current():
    from fedpriv.common import review
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    assert review.controls_markdown() in readme
    assert review.DEFAULT_POLICY.read_text().rstrip() in readme
