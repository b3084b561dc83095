"""Nothing un-noised leaves a node: a client's reply carries no training loss, update norm or
example/step count in clear, and the run's report publishes no statistic of private data that the
accounting does not cover (the server's evaluation on its own test data is its own)."""

from __future__ import annotations

import csv
import io
import json
import math
import struct
from dataclasses import fields
from types import SimpleNamespace
from typing import Any, Iterator

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters

from fedpriv.clients.app import TRAINING_LOG, make_client_app
from fedpriv.common.config import load_config
from fedpriv.common.data import load_dataset
from fedpriv.common.models import build_model, resolve_model_name
from fedpriv.server.privacy import PrivacyRecorder
from fedpriv.server.report import build_summary, metrics_csv
from fedpriv.server.run_log import RoundEntry, RunLog
from fedpriv.server.strategy import FedprivStrategy
from tests.conftest import run_harness, task_identity

# What a reply's metrics may carry (docs/secure-aggregation.md, "What the server sees of each client").
REPLY_METRICS = {"client-id", "privacy.round-spend", "privacy.prior-spends"}
SPEND_FIELDS = {"sampling_probability", "noise_multiplier", "steps"}
# Words that name a per-client training statistic; no key of a reply or of the report may use them
# (but those in REPORT_KEYS and FLOWER_WEIGHT, and the report's copy of the configuration).
STATISTIC_WORDS = ("loss", "norm", "example", "steps")
# clipping_norm: the round's user-level clip, a setting (adaptive clipping moves it from noised counts).
ROUND_FIELDS = {"round", "accuracy", "loss", "record_epsilon_max", "user_epsilon", "clipping_norm", "clients_trained",
                "clients_failed", "seconds", "failed"}
# Keys of summary.json that name a setting or the server's own figure, not a client statistic: the
# server's test loss (each round's, and the initial model's), its dataset's sizes, the configured
# clip bounds.
REPORT_KEYS = {"loss", "initial_loss", "train_examples", "test_examples", "clipping_norm", "l2_norm_clip"}
# Flower's record of FitRes.num_examples: the FedAvg weight, 1 under user-level DP (checked by value).
FLOWER_WEIGHT = {"fitres.num_examples", "num_examples"}
CSV_HEADER = ["round", "accuracy", "loss", "record_epsilon_max", "user_epsilon", "clipping_norm", "clients_trained",
              "clients_failed", "seconds"]


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's runtime sets the task identity that messages are created under; so does this test."""
    with task_identity():
        yield


def numbers(value: Any, *, parse_strings: bool = True) -> Iterator[float | int]:
    """Every number in a value: scalars, list items, dict values and numbers inside JSON strings."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, str) and parse_strings:
        try:
            parsed = json.loads(value)
        except ValueError:
            try:
                yield float(value)
            except ValueError:
                pass
        else:
            if not isinstance(parsed, str):
                yield from numbers(parsed)
    elif isinstance(value, dict) and "blob" not in value:  # (a blob's index and length are the harness's)
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from numbers(v)


def keys(value: Any, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """Every dict key in a value, recursively (not below a key in ``skip``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            if k not in skip:
                yield from keys(v, skip)
    elif isinstance(value, list):
        for v in value:
            yield from keys(v, skip)


def leaks(value: Any, secrets: dict[str, list[float]]) -> list[str]:
    """The node-side statistics (``secrets``: name -> values) that appear among ``value``'s numbers.
    Floats match to 1e-9 relative, counts exactly."""
    found = []
    values = list(numbers(value))
    for name, targets in secrets.items():
        for target in targets:
            for v in values:
                if (isinstance(target, int) and isinstance(v, int) and v == target) or (
                        isinstance(target, float) and isinstance(v, float) and math.isfinite(v)
                        and math.isclose(v, target, rel_tol=1e-9, abs_tol=0.0)):
                    found.append(f"{name} {target!r}")
    return found


def statistic_keys(found: Iterator[str], allowed: set[str] = frozenset()) -> list[str]:
    return sorted({k for k in found if k not in allowed and any(w in k.lower() for w in STATISTIC_WORDS)})


def check_spend_declarations(metrics: dict[str, Any]) -> None:
    """The privacy declarations are DP-SGD spends (the accounting's parameters) and nothing else."""
    spend = json.loads(metrics["privacy.round-spend"])
    assert set(spend) == SPEND_FIELDS
    for prior in json.loads(metrics["privacy.prior-spends"]):
        assert set(prior) == SPEND_FIELDS


# ---- one client, in process -------------------------------------------------------------------
SETTINGS = ["data.dataset=digits", "model.name=mlp", "model.mlp_units=16", "client.batch_size=16",
            "dp.noise_multiplier=1.1", "user_dp.enabled=true", "user_dp.noise_mode=central",
            "user_dp.clipping_norm=0.01", "privacy.record_budget=8", "secure_aggregation.enabled=false"]


def _one_reply(tmp_path, cfg, dataset, weights, name: str, records: int):
    """A node holding ``records`` training records answers one round; its reply and its own log."""
    data = tmp_path / f"{name}.npz"
    np.savez(data, x=dataset.x_train[:records], y=dataset.y_train[:records])
    policy = tmp_path / "policy.toml"  # plain replies need a node that accepts a run without SecAgg+
    policy.write_text("[secure_aggregation]\nrequired = false\n")
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(data), "node-name": name,
                                                        "state-dir": str(tmp_path / "state"),
                                                        "policy-path": str(policy)},
                      state=RecordDict(), run_config=cfg.to_flat())
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), {"server-round": 1}), True)
    reply = make_client_app(cfg)(Message(content=content, dst_node_id=7, message_type="train", group_id="1"),
                                 context)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    (logged,) = [json.loads(line) for line in (tmp_path / "state" / name / TRAINING_LOG).read_text().splitlines()]
    return reply, logged


def test_a_reply_under_user_dp_carries_only_its_id_and_its_spend(tmp_path):
    """The plain reply of a client (under SecAgg+, the same reply is handed to the mask, and this is
    what the server sees of it besides the masked vector): the client id and the spend
    declarations; its loss, counts and norm stay on the node.
    Two nodes with different amounts of data declare the same spend: the one planned for the
    run's public schedule size, so the spend reveals neither count."""
    cfg = load_config(overrides=SETTINGS)
    assert cfg.user_dp.enabled and cfg.dp.enabled
    dataset = load_dataset(cfg.data, cfg.run.seed)
    model = build_model(resolve_model_name(cfg.model, dataset.input_shape), cfg.model, dataset.input_shape,
                        dataset.num_classes)
    weights = [np.asarray(w) for w in model.get_weights()]
    # The public schedule, written out: ceil(training records / clients) records, batch 16.
    planned = math.ceil(len(dataset.y_train) / cfg.federation.num_clients)
    public = {"sampling_probability": 16 / planned, "noise_multiplier": 1.1, "steps": math.ceil(planned / 16)}
    declared = []
    for name, records in (("alice", 83), ("bob", 301)):
        reply, logged = _one_reply(tmp_path, cfg, dataset, weights, name, records)
        assert logged["examples"] == records and logged["steps"] == public["steps"]
        assert math.isfinite(logged["train_loss"]) and logged["update_norm"] > cfg.user_dp.clipping_norm
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        assert set(fitres.metrics) == REPLY_METRICS
        check_spend_declarations(fitres.metrics)
        declared.append(json.loads(fitres.metrics["privacy.round-spend"]))
        assert fitres.num_examples == 1  # uniform weights under DP: the count is not needed
        scalars = {name: {k: v for k, v in record.items()} for name, record in reply.content.config_records.items()}
        scalars.update({name: dict(record) for name, record in reply.content.metric_records.items()})
        secrets = {"train loss": [logged["train_loss"]], "update norm": [logged["update_norm"]],
                   "example count": [records], "sampling rate on it": [16 / records],
                   "steps on it": [math.ceil(records / 16)]}
        assert leaks(scalars, secrets) == []
        assert statistic_keys(keys(scalars), allowed=FLOWER_WEIGHT) == []
    assert declared[0] == declared[1]
    assert declared[0] == pytest.approx(public)


def test_the_server_keeps_no_client_statistic_even_if_a_client_sends_one(tmp_path):
    """A client that adds its loss, norm or count to its reply gets none of them into the report."""
    cfg = load_config(overrides=["dp.noise_multiplier=1.1"])
    recorder = PrivacyRecorder(cfg, tmp_path / "run")
    run_log = RunLog()
    strategy = FedprivStrategy(cfg, [np.zeros(3, np.float32)], run_log, recorder, lambda r, w: (0.0, 0.0))
    spend = json.dumps({"sampling_probability": 0.05, "noise_multiplier": 1.1, "steps": 20})
    chatty = {"client-id": 3, "privacy.round-spend": spend, "privacy.prior-spends": "[]",
              "train-loss": 0.8765432101, "update-norm": 3.14159265358, "num-examples": 12347,
              "steps": 20, "record-epsilon": 0.0001234}
    reply = SimpleNamespace(
        metadata=SimpleNamespace(group_id="1", src_node_id=99), has_error=lambda: False,
        content=compat.fitres_to_recorddict(
            FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 12347, chatty), keep_input=False))
    strategy.observe_reply(reply)
    assert strategy.rounds[1].replies[99].keys() == {"client-id", "record-epsilon"}
    assert strategy.rounds[1].replies[99]["record-epsilon"] != chatty["record-epsilon"]  # the server's own figure
    strategy._record_train(1, list(strategy.rounds[1].replies.values()), [])
    run_log.record_evaluation(1, 0.5, 1.25, 2.0)
    summary = build_summary(cfg, run_log, {}, recorder.finish(), recorder)
    published = {"summary": summary, "csv": list(csv.reader(io.StringIO(metrics_csv(run_log))))}
    secrets = {"train loss": [0.8765432101], "update norm": [3.14159265358], "example count": [12347],
               "client's own epsilon": [0.0001234]}
    assert leaks(published, secrets) == []
    assert [set(r) for r in summary["rounds"]] == [ROUND_FIELDS]
    assert published["csv"][0] == CSV_HEADER
    assert summary["privacy"]["record_level"]["clients"]["3"] == pytest.approx(run_log.client_epsilon["3"])


def test_an_older_checkpoints_train_loss_is_dropped_on_resume():
    old = {"rounds": [{"round": 1, "accuracy": 0.5, "loss": 1.2, "record_epsilon_max": 0.7, "user_epsilon": None,
                       "clients_trained": 3, "clients_failed": 0, "train_loss": 0.91, "seconds": 3.0,
                       "failed": None}],
           "initial_accuracy": 0.1, "initial_loss": 2.3, "client_epsilon": {"0": 0.7}, "failures": []}
    run_log = RunLog()
    run_log.restore(old)
    (entry,) = run_log.state()["rounds"]
    assert set(entry) == {f.name for f in fields(RoundEntry)} == ROUND_FIELDS
    assert entry["accuracy"] == 0.5 and entry["clients_trained"] == 3
    assert "0.91" not in metrics_csv(run_log)
    with pytest.raises(TypeError, match="unknown round fields"):
        RunLog().restore({**old, "rounds": [{**old["rounds"][0], "surprise": 1}]})


# ---- end to end under Flower's SecAgg+ with user-level DP ------------------------------------
SMALL = [
    "federation.num_clients=4", "federation.min_available_clients=4", "run.rounds=2",
    "client.local_epochs=1", "client.batch_size=64", "secure_aggregation.num_shares=3",
    "secure_aggregation.reconstruction_threshold=2", "user_dp.enabled=true", "user_dp.noise_mode=central",
]


@pytest.mark.slow
def test_under_secagg_and_user_dp_no_reply_or_report_carries_a_client_statistic(tmp_path):
    proc = run_harness("leakage_harness", str(tmp_path), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [r["clients_trained"] for r in summary["rounds"]] == [4, 4]
    assert all(r["failed"] is None for r in summary["rounds"])

    # What each node knows of its own training (its log), per node and round.
    logs = [json.loads(line) for path in sorted(run.glob("nodes/sim-*/" + TRAINING_LOG))
            for line in path.read_text().splitlines()]
    assert len(logs) == 8  # 4 nodes, 2 rounds
    assert all(math.isfinite(e["train_loss"]) and e["update_norm"] > 0 and e["examples"] > 0 for e in logs)
    secrets = {"train loss": [e["train_loss"] for e in logs], "update norm": [e["update_norm"] for e in logs],
               "example count": sorted({e["examples"] for e in logs})}

    replies = json.loads((tmp_path / "replies.json").read_text())
    ok = [r for r in replies if not r["error"]]
    assert ok and len(ok) == len(replies)
    train_metrics = [r["records"]["config_records"]["fitres.metrics"] for r in ok
                     if "fitres.metrics" in r["records"]["config_records"]]
    assert len(train_metrics) == 8  # every masked-vector reply was captured
    for metrics in train_metrics:
        assert set(metrics) == REPLY_METRICS
        check_spend_declarations(metrics)
    for reply in ok:
        records = reply["records"]
        # Every ConfigRecord and MetricRecord: no per-client loss, norm or count, by name or value.
        assert leaks(records, secrets) == [], reply
        flower_weight = records["metric_records"].get("fitres.num_examples", {})
        assert set(flower_weight) <= {"num_examples"} and all(v in (0, 1) for v in flower_weight.values())
        assert statistic_keys(keys(records), allowed=FLOWER_WEIGHT) == []
        # The update itself is only in the masked vector: every array record is empty.
        assert all(not arrays for arrays in records["array_records"].values())
    # Nor is any of it hidden in the bytes (float64, the way numpy or struct would write it).
    patterns = [struct.pack("<d", v) for name in ("train loss", "update norm") for v in secrets[name]]
    for blob in (tmp_path / "blobs").iterdir():
        data = blob.read_bytes()
        assert not any(p in data for p in patterns), blob.name

    # The report publishes the server's evaluation, accounted epsilons and its own counts only.
    assert [set(r) for r in summary["rounds"]] == [ROUND_FIELDS] * 2
    assert statistic_keys(keys(summary, skip=("config",)), allowed=REPORT_KEYS) == []
    assert leaks(summary, secrets) == []
    rows = list(csv.reader(io.StringIO((run / "metrics.csv").read_text())))
    assert rows[0] == CSV_HEADER and len(rows) == 3
    assert leaks(rows, secrets) == []
