"""The strategy reads a reply's metrics through Flower's public conversion of a reply to a legacy
``FitRes`` (``flwr.compat.common.recorddict_compat``), never through the record name Flower uses
inside it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedpriv.common.config import load_config
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.server.run_log import RunLog
from fedpriv.server.strategy import FedprivStrategy

SPEND = {"sampling_probability": 0.05, "noise_multiplier": 1.1, "steps": 20}


def _strategy(tmp_path):
    cfg = load_config(overrides=["dp.noise_multiplier=1.1"])
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    return FedprivStrategy(cfg, [np.zeros(3, np.float32)], RunLog(), recorder, lambda r, w: (0.0, 0.0)), recorder


def _reply(node, content):
    return SimpleNamespace(metadata=SimpleNamespace(group_id="1", src_node_id=node), has_error=lambda: False,
                           content=content)


def _metrics(client_id):
    return {"client-id": client_id, "privacy.round-spend": json.dumps(SPEND), "privacy.prior-spends": "[]"}


def test_a_training_reply_is_read_through_flowers_fitres_conversion(tmp_path):
    strategy, recorder = _strategy(tmp_path)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(3, np.float32)]), 10, _metrics(4))
    strategy.observe_reply(_reply(7, compat.fitres_to_recorddict(fitres, keep_input=False)))
    assert set(strategy.rounds[1].replies) == {7}
    assert strategy.rounds[1].replies[7]["client-id"] == "4"
    assert "4" in recorder.client_events


def test_a_metrics_record_that_is_no_fitres_is_not_read_as_a_training_reply(tmp_path):
    """A reply holding only a record under Flower's internal metrics name, without the rest of a
    FitRes (parameters, example count, status), is no training result: Flower's own workflow cannot
    turn it into one, so the strategy neither accounts it nor lets it claim a client id."""
    strategy, recorder = _strategy(tmp_path)
    bare = RecordDict({"fitres.metrics": ConfigRecord(_metrics(4))})
    strategy.observe_reply(_reply(7, bare))
    assert strategy.rounds[1].replies == {}
    assert recorder.client_events == {}
    # the same client id, declared by a real training reply afterwards, is charged to its sender
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 10, _metrics(4))
    strategy.observe_reply(_reply(8, compat.fitres_to_recorddict(fitres, keep_input=False)))
    assert set(strategy.rounds[1].replies) == {8}


def test_metrics_a_fitres_cannot_hold_make_the_reply_malformed(tmp_path):
    strategy, recorder = _strategy(tmp_path)
    content = compat.fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 10, _metrics(4)), keep_input=False)
    for record in content.config_records.values():
        if "client-id" in record:
            record["extra"] = [1, 2]  # a ConfigRecord holds lists; a FitRes's metrics do not
    strategy.observe_reply(_reply(7, content))
    assert 7 in strategy.rounds[1].malformed
    assert recorder.client_events == {}
