"""A real node trains on its own data file (``data-path`` in its node config) and keeps its
own budget and ledger; a bad file is refused with a clear error."""

from __future__ import annotations

import json

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

from fedpriv.clients.app import make_client_app
from fedpriv.common.config import load_config
from fedpriv.common.data import load_dataset
from fedpriv.common.errors import DataError
from fedpriv.common.models import build_model, resolve_model_name
from tests.conftest import files_containing, raw_byte_runs, run_cli_here, task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's runtime sets the task identity that messages are created under; so does this test."""
    with task_identity():
        yield


SETTINGS = ["data.dataset=digits", "model.name=mlp", "model.mlp_units=16", "client.batch_size=16",
            "secure_aggregation.enabled=false", "dp.noise_multiplier=1.1", "privacy.record_budget=5"]


def _policy(tmp_path):
    """A node policy that accepts these runs without SecAgg+ (the default policy requires it)."""
    path = tmp_path / "node-policy.toml"
    path.write_text("[secure_aggregation]\nrequired = false\n")
    return str(path)


def _fit_message(weights, server_round):
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), {"server-round": server_round}), True)
    return Message(content=content, dst_node_id=7, message_type="train", group_id=str(server_round))


def _setup(tmp_path, extra=()):
    cfg = load_config(overrides=[*SETTINGS, *extra])
    dataset = load_dataset(cfg.data, cfg.run.seed)
    model = build_model(resolve_model_name(cfg.model, dataset.input_shape), cfg.model, dataset.input_shape,
                        dataset.num_classes)
    return cfg, dataset, [np.asarray(w) for w in model.get_weights()]


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_node_trains_on_its_own_file_and_keeps_its_own_ledger(tmp_path, sealed):
    cfg, dataset, weights = _setup(tmp_path)
    data = tmp_path / "alice.npz"
    np.savez(data, x=dataset.x_train[:80], y=dataset.y_train[:80])
    if sealed:  # fedpriv data seal: the node reads the sealed file, decrypting it in memory only
        done = run_cli_here("data", "seal", str(data), "--out", str(tmp_path / "alice.sealed"))
        assert done.returncode == 0 and "sealed 80 examples" in done.stdout, done.stderr
        data.unlink()
        data = tmp_path / "alice.sealed"
        assert files_containing([tmp_path], raw_byte_runs([dataset.x_train[:80]])) == []
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(data), "node-name": "alice",
                                                        "state-dir": str(tmp_path / "state"),
                                                        "policy-path": _policy(tmp_path)},
                      state=RecordDict(), run_config=cfg.to_flat())
    app = make_client_app(cfg)
    reply = app(_fit_message(weights, 1), context)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    update = parameters_to_ndarrays(fitres.parameters)
    assert [u.shape for u in update] == [w.shape for w in weights]
    assert fitres.num_examples == 1  # record-level DP: uniform weights, its count stays on the node
    # The schedule is the run's public one, ceil(1437 digits / 10 clients) = 144 records at batch 16,
    # not one planned for its own 80.
    assert json.loads(fitres.metrics["privacy.round-spend"]) == {
        "sampling_probability": 16 / 144, "noise_multiplier": 1.1, "steps": 9}
    state = tmp_path / "state" / "alice"
    entries = [json.loads(line) for line in (state / "ledger.jsonl").read_text().splitlines()]
    assert [e["epsilon"]["rdp"] > 0 for e in entries if e["kind"] == "record_level"] == [True]
    # Its loss and counts stay in its own training log, not in the reply.
    (logged,) = [json.loads(line) for line in (state / "training.jsonl").read_text().splitlines()]
    assert logged["examples"] == 80 and logged["steps"] == 9 and logged["round"] == 1
    assert set(fitres.metrics) == {"client-id", "privacy.round-spend", "privacy.prior-spends"}


def test_a_node_with_a_wrong_shaped_file_is_refused_clearly(tmp_path):
    cfg, dataset, weights = _setup(tmp_path)
    data = tmp_path / "bad.npz"
    np.savez(data, x=np.zeros((20, 5, 5)), y=np.zeros(20))
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(data), "policy-path": _policy(tmp_path)},
                      state=RecordDict(),
                      run_config=cfg.to_flat())
    with pytest.raises(DataError, match="but the federation's model takes"):
        make_client_app(cfg)(_fit_message(weights, 1), context)


def test_sealing_refuses_bad_input_and_a_sealed_file_refuses_tampering_and_wrong_keys(tmp_path, monkeypatch):
    import base64

    from fedpriv.common import checkpoint
    from fedpriv.common.data import load_node_data

    x, y = np.random.default_rng(1).random((12, 8, 8)).astype(np.float32), np.arange(12) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    sealed = tmp_path / "d.sealed"
    assert run_cli_here("data", "seal", str(tmp_path / "d.npz"), "--out", str(sealed)).returncode == 0
    assert sealed.stat().st_mode & 0o077 == 0 and x.tobytes()[:64] not in sealed.read_bytes()
    got_x, got_y = load_node_data(str(sealed), (8, 8, 1), 3)
    assert np.array_equal(got_x[..., 0], x) and np.array_equal(got_y, y)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "nan.npz", x=np.full((6, 3), np.nan), y=np.zeros(6))
    for args, message in [
        ((str(tmp_path / "d.npz"), "--out", str(sealed)), "exists; pass --force"),
        ((str(sealed), "--out", str(tmp_path / "again")), "is already sealed"),
        ((str(tmp_path / "bad.npz"), "--out", str(tmp_path / "b")), "not a readable .npz"),
        ((str(tmp_path / "nan.npz"), "--out", str(tmp_path / "n")), "NaN or infinite"),
        ((str(tmp_path / "missing.npz"), "--out", str(tmp_path / "m")), "data file not found"),
    ]:
        proc = run_cli_here("data", "seal", *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / n).exists() for n in ("again", "b", "n", "m"))
    altered = bytearray(sealed.read_bytes())
    altered[len(altered) // 2] ^= 1
    (tmp_path / "altered").write_bytes(bytes(altered))
    with pytest.raises(DataError, match="altered, or the key is wrong"):
        load_node_data(str(tmp_path / "altered"), (8, 8, 1), 3)
    monkeypatch.setenv(checkpoint.KEY_ENV, base64.b64encode(checkpoint.new_key()).decode())
    with pytest.raises(DataError, match="altered, or the key is wrong"):
        load_node_data(str(sealed), (8, 8, 1), 3)
