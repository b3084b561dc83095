"""Fault injection for simulations: make chosen virtual clients fail at a chosen point.

Configured by ``simulation.fail_clients``, ``fail_stage``, ``fail_rounds`` and ``fail_mode``:

- ``crash``: an exception raised inside the ClientApp at ``fail_stage``, which Flower reports to
  the server as an error reply: what the server sees when a real device fails at that point;
- ``hang``: no answer at ``fail_stage`` until the round's deadline has passed (the client sleeps
  past ``federation.round_timeout``, and past ``secure_aggregation.timeout`` under SecAgg+), then
  gives up without training: a device that stalls;
- malformed replies (``wrong_count``, ``wrong_shape``, ``wrong_dtype``, ``nan``, ``inf``,
  ``over_clip``, ``bad_record``): the client trains, then its plain training reply is corrupted
  before anything else sees it (inside secure aggregation, so under SecAgg+ the client's own check
  in clients.mods meets it before masking).

:func:`make_fault_mods` returns the outer mod (crash, hang) and the inner one (malformed replies),
for ``make_client_app``'s ``extra_mods`` and ``inner_mods``.
"""

from __future__ import annotations

import time

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedpriv.common import secagg
from fedpriv.common.config import RunConfig, config_from_run_config
from fedpriv.common.protocol import PRIVACY, ROUND_SPEND

MALFORMED = ("wrong_count", "wrong_shape", "wrong_dtype", "nan", "inf", "over_clip", "bad_record")
HANG_MARGIN_S = 3.0  # how long past the deadline a hanging client sleeps


class InjectedFailure(RuntimeError):
    pass


def _ids(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part.strip()}


def _stage_and_round(msg: Message) -> tuple[str, int | None]:
    try:
        server_round = int(msg.metadata.group_id)
    except (TypeError, ValueError):
        server_round = None
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if configs is None:
        return "train", server_round
    return str(configs.get(Key.STAGE, "")), server_round


def _chosen(msg: Message, context: Context, cfg: RunConfig) -> tuple[str | None, str, int | None]:
    """The fault mode that strikes this message to this client (None: none), its stage and round."""
    partition = context.node_config.get("partition-id")
    stage, server_round = _stage_and_round(msg)
    mode = cfg.simulation.fault_modes().get(int(partition)) if partition is not None else None
    rounds = _ids(cfg.simulation.fail_rounds)
    if mode is None or (rounds and server_round not in rounds):
        return None, stage, server_round
    return mode, stage, server_round


def corrupt(arrays: list[np.ndarray], mode: str, clip: float) -> list[np.ndarray]:
    """``arrays`` made malformed the way ``mode`` names."""
    arrays = [np.array(a, copy=True) for a in arrays]
    if mode == "wrong_count":
        return arrays[:-1]
    if mode == "wrong_shape":
        arrays[0] = np.resize(arrays[0], (arrays[0].size + 1,))
    elif mode == "wrong_dtype":
        arrays = [np.round(a * 1000).astype(np.int32) for a in arrays]
    elif mode == "nan":
        arrays[0].flat[0] = np.nan
    elif mode == "inf":
        arrays[-1].flat[0] = np.inf
    elif mode == "over_clip":
        norm = secagg.l2_norm(arrays)
        if norm == 0:
            arrays = [np.ones_like(a) for a in arrays]
            norm = secagg.l2_norm(arrays)
        arrays = [a * (10 * clip / norm) for a in arrays]
    return arrays


def make_fault_mods(config: RunConfig | None = None) -> tuple:
    """(outer mod: crash and hang; inner mod: malformed replies). Each is a no-op for messages
    and clients the configured fault does not strike."""

    def fault_injection_mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        cfg = config_from_run_config(context.run_config, config)
        sim = cfg.simulation
        mode, stage, server_round = _chosen(msg, context, cfg)
        if mode in ("crash", "hang") and stage == sim.fail_stage:
            where = f"client {context.node_config.get('partition-id')} at {stage} in round {server_round}"
            if mode == "hang":
                deadline = cfg.federation.round_timeout
                if cfg.secure_aggregation.enabled:
                    deadline = max(deadline, cfg.secure_aggregation.timeout or 0.0)
                time.sleep(deadline + HANG_MARGIN_S)
                raise InjectedFailure(f"injected hang: {where} gave up after {deadline + HANG_MARGIN_S:g} s")
            raise InjectedFailure(f"injected failure: {where}")
        return call_next(msg, context)

    def malformed_reply_mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        cfg = config_from_run_config(context.run_config, config)
        mode, _, _ = _chosen(msg, context, cfg)
        if mode not in MALFORMED:
            return reply
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        if mode == "bad_record":
            fitres.metrics[f"{PRIVACY}.{ROUND_SPEND}"] = "{not a spend"
        else:
            arrays = corrupt(parameters_to_ndarrays(fitres.parameters), mode, cfg.user_dp.clipping_norm)
            fitres.parameters = ndarrays_to_parameters(arrays)
        return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return fault_injection_mod, malformed_reply_mod
