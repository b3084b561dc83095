"""Flower mods of the fedpriv ClientApp.

The outermost, :func:`make_policy_mod`, holds every training request to the node's own privacy
floor (:mod:`clients.policy`) before anything else runs: a run that falls short is refused with
its reason (error code 4004) and the refusal is recorded in the node's signed ledger.

The mod :func:`make_secure_aggregation_mod` makes runs Flower's own ``secaggplus_mod`` for the
messages of a SecAgg+ round and lets every other message through, so one ClientApp serves runs
with and without secure aggregation. It also keeps a node's budget refusal visible to the server: inside SecAgg+, the
training reply is consumed by ``secaggplus_mod``, which cannot carry an error, so the refusal is
raised past it and turned back into the refusal reply here. Before its update is masked, the
client checks it (:func:`common.updates.update_problem`: array count, shapes, dtypes, finite
values, the user-level clip bound): the server cannot see a masked update, so a malformed one is
refused here, and the node drops out of the round (SecAgg+'s dropout rules then apply).

Every SecAgg+ message first passes :class:`clients.secagg_guard.SecAggGuard`, which refuses a
server that deviates from the protocol and signs this node's public keys; its refusals are
recorded in the node's ledger. Masks come from fedpriv's generator (:mod:`common.secagg_masks`,
installed when this module is imported). After masking, the reply's plain example count (Flower
leaves ``fitres.num_examples`` beside the masked vector, which carries the weight) is cleared.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedpriv.clients.node import node_identity, node_name_and_state_dir, node_policy, record_budget
from fedpriv.clients.secagg_guard import SecAggGuard, SecAggRefusal
from fedpriv.common import secagg_masks
from fedpriv.common.config import RunConfig, config_from_run_config
from fedpriv.common.ledger_schema import NODE, Kind
from fedpriv.common.protocol import MALFORMED_UPDATE_CODE, POLICY_REFUSED_CODE, SECAGG_REFUSED_CODE

secagg_masks.install()
PLAIN_WEIGHT_KEY = "fitres.num_examples"  # where Flower's legacy FitRes keeps the example count


def record_refusal(context: Context, cfg: RunConfig, server_round: int | None, reason: str,
                   kind: Kind = Kind.SECAGG_REFUSAL) -> None:
    """Put a refusal (SecAgg+, or of a run below the node's policy) in the node's own signed
    ledger, before the reply leaves."""
    from fedpriv.clients.budget import open_guard

    _, state_dir = node_name_and_state_dir(context, cfg)
    with open_guard(state_dir, 0.0, cfg.privacy.delta) as guard:
        guard.ledger.append(actor=NODE, kind=kind, round=server_round, note=reason)


def _message_round(msg: Message) -> int | None:
    try:
        return int(msg.metadata.group_id)
    except ValueError:
        return None


def make_policy_mod(config: RunConfig | None = None):
    """The mod that refuses, before any training or SecAgg+ step, a run whose configuration is
    weaker than this node's policy (``config`` as for :func:`make_secure_aggregation_mod`)."""

    def policy_mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        policy = node_policy(context)
        if policy is None:
            return call_next(msg, context)
        cfg = config_from_run_config(context.run_config, config)
        problems = policy.problems(cfg, node_budget=record_budget(context, cfg, policy))
        if not problems:
            return call_next(msg, context)
        reason = "run refused by this node's policy: " + "; ".join(problems)
        record_refusal(context, cfg, _message_round(msg), reason, kind=Kind.POLICY_REFUSAL)
        return Message(Error(code=POLICY_REFUSED_CODE, reason=reason), reply_to=msg)

    return policy_mod


def _own_update_problem(request: Message, reply: Message, context: Context,
                        config: RunConfig | None) -> str | None:
    """Why this client's plain training reply is not a well-formed update of the model it was
    sent (None when it is)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    from fedpriv.common.updates import individual_problem, round_clip

    cfg = config_from_run_config(context.run_config, config)
    fitins = compat.recorddict_to_fitins(request.content, True)
    shapes = [a.shape for a in parameters_to_ndarrays(fitins.parameters)]
    try:
        arrays = parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, True).parameters)
    except Exception as exc:  # not arrays at all
        return f"undecodable arrays ({type(exc).__name__})"
    return individual_problem(cfg, arrays, shapes, round_clip(cfg, fitins.config))


class _Refused(Exception):
    def __init__(self, error: Error) -> None:
        super().__init__(error.reason)
        self.error = error


def is_secagg_message(msg: Message) -> bool:
    return (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def make_secure_aggregation_mod(config: RunConfig | None = None):
    """The mod (``config``: the run's configuration when the app was given one, as in
    simulations; else it comes from Flower's run config)."""

    def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
        return _secure_aggregation(msg, context, call_next, config)

    return secure_aggregation_mod


def _secure_aggregation(msg: Message, context: Context, call_next, config: RunConfig | None) -> Message:
    if not is_secagg_message(msg):
        if msg.metadata.message_type == MessageType.TRAIN:
            cfg = config_from_run_config(context.run_config, config)
            policy = node_policy(context)
            if cfg.secure_aggregation.enabled or (policy is not None and policy.require_secagg):
                # A server that asks for a plain training reply in a SecAgg+ run would see this
                # node's update alone: refused, as every other deviation.
                reason = ("SecAgg+ refused: the server asked for a plain training reply in a run "
                          "that uses SecAgg+ (the update would leave this node unmasked)")
                record_refusal(context, cfg, _message_round(msg), reason)
                return Message(Error(code=SECAGG_REFUSED_CODE, reason=reason), reply_to=msg)
        return call_next(msg, context)
    cfg = config_from_run_config(context.run_config, config)
    policy = node_policy(context)
    guard = SecAggGuard(context, lambda: node_identity(context, cfg), policy.min_shares if policy else 0)
    try:
        guard.check(msg)
    except SecAggRefusal as refusal:
        guard.save()
        reason = f"SecAgg+ refused: {refusal}"
        record_refusal(context, cfg, _message_round(msg), reason)
        return Message(Error(code=SECAGG_REFUSED_CODE, reason=reason), reply_to=msg)

    def train_or_raise(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error():
            raise _Refused(reply.error)
        problem = _own_update_problem(inner, reply, ctx, config)
        if problem:
            raise _Refused(Error(code=MALFORMED_UPDATE_CODE,
                                 reason=f"refusing to mask a malformed update ({problem})"))
        return reply

    try:
        reply = secaggplus_mod(msg, context, train_or_raise)
    except _Refused as refused:
        guard.save()
        return Message(Error(code=refused.error.code, reason=refused.error.reason), reply_to=msg)
    guard.sign_reply(msg, reply)
    guard.save()
    if reply.has_content() and PLAIN_WEIGHT_KEY in reply.content.metric_records:
        # The weight travels inside the masked vector; the plain count stays on the node.
        reply.content.metric_records[PLAIN_WEIGHT_KEY]["num_examples"] = 0
    return reply
