"""Flower mods of the fedpriv ClientApp.

:func:`secure_aggregation_mod` runs Flower's own ``secaggplus_mod`` for the messages of a SecAgg+
round and lets every other message through, so one ClientApp serves runs with and without secure
aggregation. It also keeps a node's budget refusal visible to the server: inside SecAgg+, the
training reply is consumed by ``secaggplus_mod``, which cannot carry an error, so the refusal is
raised past it and turned back into the refusal reply here.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS


class _Refused(Exception):
    def __init__(self, error: Error) -> None:
        super().__init__(error.reason)
        self.error = error


def is_secagg_message(msg: Message) -> bool:
    return (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    if not is_secagg_message(msg):
        return call_next(msg, context)

    def train_or_raise(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error():
            raise _Refused(reply.error)
        return reply

    try:
        return secaggplus_mod(msg, context, train_or_raise)
    except _Refused as refused:
        return Message(Error(code=refused.error.code, reason=refused.error.reason), reply_to=msg)
