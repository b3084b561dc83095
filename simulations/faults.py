"""Fault injection for simulations: make chosen virtual clients fail at a chosen point.

Configured by ``simulation.fail_clients``, ``fail_stage`` and ``fail_rounds``. The failure is an
exception raised inside the ClientApp, which Flower reports to the server as an error reply:
exactly what the server sees when a real device drops out at that point.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from common.config import RunConfig, config_from_run_config


class InjectedFailure(RuntimeError):
    pass


def _ids(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part.strip()}


def _stage_and_round(msg: Message) -> tuple[str, int | None]:
    try:
        server_round = int(msg.metadata.group_id)
    except (TypeError, ValueError):
        server_round = None
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return "train", server_round
    return str(configs.get(Key.STAGE, "")), server_round


def make_fault_mod(config: RunConfig | None = None):
    """A Flower mod that fails the configured clients (a no-op when none are configured)."""

    def fault_injection_mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        cfg = config_from_run_config(context.run_config, config)
        sim = cfg.simulation
        partition = context.node_config.get("partition-id")
        if sim.fail_clients and partition is not None and int(partition) in _ids(sim.fail_clients):
            stage, server_round = _stage_and_round(msg)
            rounds = _ids(sim.fail_rounds)
            if stage == sim.fail_stage and (not rounds or server_round in rounds):
                raise InjectedFailure(
                    f"injected failure: client {partition} at {stage} in round {server_round}")
        return call_next(msg, context)

    return fault_injection_mod
