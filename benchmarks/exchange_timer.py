"""Run a ``fedpriv`` command with the time of each message exchange recorded (a benchmark probe).

    python benchmarks/exchange_timer.py OUT.json simulate --preset quickstart ...

Every exchange between the ServerApp and its clients goes through fedpriv's
``ObservedGrid.send_and_receive`` (server/strategy.py): one exchange a round without SecAgg+
(``train``), four with it (Flower's SecAgg+ stages ``setup``, ``share_keys``,
``collect_masked_vectors``, in which the clients also train, and ``unmask``). This wraps that
method, and each of Flower's four SecAgg+ stage methods of fedpriv's workflow (the exchange plus
the server's own work before and after it), with timers, runs the command in this process, and
writes what it measured to OUT.json when the command ends:

    {"exchanges": {"<round>": {"<exchange>": seconds}}, "stages": {"<stage>": [seconds per round]}}

Nothing else changes: the wrappers call the methods they wrap with the same arguments.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def exchange_name(message: Any) -> str:
    """A message's SecAgg+ stage if it carries one, else its message type (``train``, ...)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        return str(configs[Key.STAGE])
    return str(message.metadata.message_type)


class Timings:
    """What the wrappers measured."""

    def __init__(self) -> None:
        self.exchanges: dict[int, dict[str, float]] = defaultdict(dict)
        self.stages: dict[str, list[float]] = defaultdict(list)

    def exchange(self, server_round: int | None, name: str, seconds: float) -> None:
        if server_round is not None:
            entry = self.exchanges[server_round]
            entry[name] = entry.get(name, 0.0) + seconds

    def as_json(self) -> dict[str, Any]:
        return {"exchanges": {str(r): self.exchanges[r] for r in sorted(self.exchanges)},
                "stages": dict(self.stages)}


def install(timings: Timings) -> None:
    """Wrap ``ObservedGrid.send_and_receive`` and the SecAgg+ stage methods with timers."""
    from fedpriv.server.secagg_workflow import FedprivSecAggPlusWorkflow
    from fedpriv.server.strategy import ObservedGrid

    send_and_receive = ObservedGrid.send_and_receive

    def timed_send_and_receive(self: Any, messages: Any, *, timeout: float | None = None) -> Any:
        sent = list(messages)
        started = time.perf_counter()
        try:
            return send_and_receive(self, sent, timeout=timeout)
        finally:
            if sent:
                timings.exchange(self._strategy.message_round(sent[0]), exchange_name(sent[0]),
                                 time.perf_counter() - started)

    ObservedGrid.send_and_receive = timed_send_and_receive
    for stage in STAGES:
        name = f"{stage}_stage"
        setattr(FedprivSecAggPlusWorkflow, name, _timed(getattr(FedprivSecAggPlusWorkflow, name), stage, timings))


def _timed(method: Callable[..., Any], stage: str, timings: Timings) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            timings.stages[stage].append(time.perf_counter() - started)

    return timed


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    sys.path.insert(0, str(ROOT))
    timings = Timings()
    install(timings)
    atexit.register(lambda: out.write_text(json.dumps(timings.as_json(), indent=1) + "\n"))
    from fedpriv.cli import main as fedpriv

    return fedpriv(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
