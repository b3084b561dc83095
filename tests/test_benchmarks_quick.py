"""The benchmark harness's quick mode runs end to end, so the benchmarks cannot rot.

Timings on a shared 2-core machine are noisy, so only what always holds is checked: the results
file has the expected shape, every ratio is a positive number, and on the seed CNN per-example
clipping with one microbatch per example (the textbook baseline) is slower than non-private
training (by 10x or more; on the small MLP at the quick batch size the gap is small enough for
noise to blur it, so it is not asserted there).
"""

import json
import math
import subprocess
import sys

import pytest

from clients.trainer import choose_implementation
from common.config import DPSection
from tests.conftest import ROOT

VARIANTS = ("nonprivate", "textbook", "vectorized", "fast", "default")
RATIOS = ("textbook_ratio", "vectorized_ratio", "fast_ratio", "default_ratio")


@pytest.mark.slow
def test_dp_step_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/dp_step.py", "--quick", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "dp_step.json").read_text())
    assert (tmp_path / "dp_step.md").read_text().count("| cnn |") == len(VARIANTS)
    assert "| variant |" in proc.stdout  # the table is printed too

    assert results["quick"] is True and results["complete"] is True and results["device"] == "cpu"
    assert isinstance(results["seed"], int)
    assert results["versions"]["tensorflow"] and results["versions"]["tensorflow-privacy"]
    assert results["machine"]["cpus"] >= 1
    for model in ("cnn", "mlp"):
        assert set(results[model]) == {str(b) for b in results["settings"]["batch_sizes"]}
        for entry in results[model].values():
            for key in RATIOS:
                assert math.isfinite(entry[key]) and entry[key] > 0, (model, key, entry[key])
            assert set(entry["examples_per_s"]) == set(VARIANTS)
            assert all(v > 0 for v in entry["examples_per_s"].values())
            # "default" is what a client with the default [dp] section runs
            assert entry["default_implementation"] == choose_implementation(DPSection(), model)
    for entry in results["cnn"].values():
        assert entry["textbook_ratio"] > 1, entry
