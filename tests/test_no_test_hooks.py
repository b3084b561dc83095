"""No environment variable turns a release build into a test fixture: the production trainer
always adds the configured DP noise and the production strategy never pauses. Tests inject such
faults through tests/injected.py (a trainer or strategy factory) instead."""

from __future__ import annotations

import time

import numpy as np

from fedpriv.clients.trainer import LocalTrainer
from fedpriv.common.config import load_config
from fedpriv.common.data import load_dataset
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.server.run_log import RunLog
from fedpriv.server.strategy import FedprivStrategy
from tests.conftest import ROOT

# The variables release builds obeyed before (they are inherited by every child process).
OLD_HOOKS = {"FEDPRIV_TEST_BREAK_NOISE": "1", "FEDPRIV_TEST_PAUSE_AFTER_ROUND": "1",
             "FEDPRIV_TEST_PAUSE_IN_ROUND": "1"}
PRODUCTION = ("common", "server", "clients", "simulations", "fedpriv")


def test_the_production_trainer_adds_noise_whatever_the_environment(monkeypatch):
    for name, value in OLD_HOOKS.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(overrides=["data.dataset=digits", "model.name=mlp", "model.mlp_units=8",
                                 "dp.noise_multiplier=1.3", "client.batch_size=64"])
    dataset = load_dataset(cfg.data, cfg.run.seed)
    x, y = dataset.x_train[:40], dataset.y_train[:40]  # batch 64 > 40 records: every step takes all
    trainer = LocalTrainer("mlp", cfg.model, cfg.client, cfg.dp, dataset.input_shape, dataset.num_classes)
    assert trainer.applied_noise_multiplier == 1.3
    start = [np.asarray(w) for w in trainer.model.get_weights()]
    # The same records in every batch: only the DP noise can make two trainings differ.
    first, second = trainer.train(start, x, y, 40).weights, trainer.train(start, x, y, 40).weights
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(first, second))


def test_the_production_strategy_never_pauses(tmp_path, monkeypatch):
    for name, value in OLD_HOOKS.items():
        monkeypatch.setenv(name, value)

    def no_sleep(seconds):
        raise AssertionError(f"the strategy slept {seconds} s")

    monkeypatch.setattr(time, "sleep", no_sleep)
    cfg = load_config(overrides=["dp.noise_multiplier=1.1"])
    strategy = FedprivStrategy(cfg, [np.zeros(3, np.float32)], RunLog(), PrivacyRecorder(cfg, tmp_path / "run"),
                               lambda r, w: (0.0, 0.0))
    strategy.aggregate_fit(1, [], [])
    strategy.evaluate(1, None)


def test_no_production_module_reads_a_test_variable():
    offenders = [str(path.relative_to(ROOT)) for package in PRODUCTION for path in (ROOT / package).rglob("*.py")
                 if "FEDPRIV_TEST_" in path.read_text()]
    assert offenders == []

