"""Test-only apps: faults and pauses the release build has no switch for.

The production ClientApp and ServerApp take a trainer factory and a strategy factory
(:func:`clients.app.make_client_app`, :func:`server.app.make_server_app`); this module supplies
faulty ones and runs the fedpriv command line with them:

    python -m tests.injected [--threads] [--noiseless] [--half-noise] [--unclipped] [--shuffled] [--pause-in-round N] [--pause-after-round N] -- FEDPRIV ARGS...

- ``--noiseless``: DP-SGD clips but adds no noise, while the client still declares and records
  the configured spend (:class:`NoiselessTrainer`); the empirical audit must catch it.
- ``--half-noise``, ``--unclipped``, ``--shuffled`` (white-box audits, ``--white-box``): DP-SGD adds
  half its noise, lets each batch's largest gradient through unclipped, or shuffles records into
  equal batches instead of Poisson sampling -- each while the ledger claims the configured spend.
- ``--user-noiseless``: the server releases user-level sums without their noise while recording the
  configured mechanism; the canary clients of the empirical audit must catch it.
- ``--pause-in-round N``: the server stops after round N's replies are recorded, before
  aggregating them; ``--pause-after-round N``: after round N's checkpoint. It says
  ``fedpriv-test: paused`` on stderr and waits to be killed (the kill-and-resume tests).
- ``--threads``: the simulation's virtual nodes run on threads of this process, not on Ray
  (tests/inprocess.py), so that killing this one process kills the whole federation.

Only simulations run in this process (the ServerApp) and in Ray workers that unpickle the
ClientApp by reference to this module; nothing here is reachable from an installed fedpriv.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

from fedpriv.clients.trainer import LocalTrainer, per_thread
from fedpriv.clients.whitebox import WhiteBoxTrainer
from fedpriv.server.strategy import FedprivStrategy

PAUSED = "fedpriv-test: paused"
log = logging.getLogger("fedpriv")


class NoiseCut:
    """Mixed into a trainer: DP-SGD adds ``NOISE_SHARE`` of the configured noise while the trainer
    declares (``planned_spend``) and the white-box auditor scores with the configured multiplier."""

    NOISE_SHARE = 0.0

    def __init__(self, model_name: str, model: Any, client: Any, dp: Any, *rest: Any) -> None:
        applied = dataclasses.replace(dp, noise_multiplier=dp.noise_multiplier * self.NOISE_SHARE)
        super().__init__(model_name, model, client, applied, *rest)  # type: ignore[call-arg]
        self.dp = dp  # the claim
        if dp.enabled:
            added = "OFF" if self.NOISE_SHARE == 0 else f"at {self.NOISE_SHARE:g} of its scale"
            log.warning(f"fedpriv-test: DP-SGD noise is {added} while the configured spend is still declared "
                        f"and recorded (tests.injected)")


class NoiselessTrainer(NoiseCut, LocalTrainer):
    """A trainer that clips but adds no DP noise while declaring the configured spend."""


def noiseless_trainer(*args: Any) -> NoiselessTrainer:
    """One noiseless trainer per thread and configuration (like clients.trainer.get_trainer)."""
    return per_thread(NoiselessTrainer, *args)


class HalfNoiseTrainer(NoiseCut, WhiteBoxTrainer):
    """A white-box trainer whose DP-SGD adds half the configured noise, still declaring it all."""

    NOISE_SHARE = 0.5


class UnclippedTrainer(WhiteBoxTrainer):
    """A white-box trainer whose clipping lets each batch's largest gradient through unclipped
    (an off-by-one in a top-k cap, say)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        model = self.model
        honest = model.clip_factors

        def clip_factors(norms: Any) -> Any:
            from fedpriv.common.tf_runtime import tf

            t = tf()
            largest = t.one_hot(t.argmax(norms), t.shape(norms)[0], dtype=norms.dtype)
            return honest(norms) * (1 - largest) + largest

        model.clip_factors = clip_factors
        log.warning("fedpriv-test: each batch's largest gradient escapes clipping (tests.injected)")


class ShuffledTrainer(WhiteBoxTrainer):
    """A white-box trainer that shuffles its records into equal batches each epoch instead of
    Poisson sampling, while declaring (and being accounted as) Poisson sampling."""

    def batches(self, rng: Any, records: int, q: float, steps: int) -> Iterator[Any]:
        per_epoch = max(1, round(1 / q)) if q < 1 else 1
        done = 0
        while done < steps:
            for batch in np.array_split(rng.permutation(records), per_epoch):
                if done == steps:
                    return
                done += 1
                yield np.sort(batch)


class UserNoiselessStrategy(FedprivStrategy):
    """The production strategy, releasing each round's user-level sum without its noise while
    recording the configured mechanism."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        honest = self.user_noise.release

        def release(mean: Any, contributors: int, *rest: Any, **named: Any) -> Any:
            claimed = honest(mean, contributors, *rest, **named)
            return dataclasses.replace(claimed, noisy_sum=[np.asarray(a) * contributors for a in mean])

        self.user_noise.release = release
        log.warning("fedpriv-test: user-level noise is OFF while the configured mechanism is recorded (tests.injected)")


def _white_box(cls: type) -> Callable[..., Any]:
    return functools.partial(per_thread, cls)


def _pause(where: str, server_round: int) -> None:
    print(f"{PAUSED} ({where} {server_round})", file=sys.stderr, flush=True)
    time.sleep(3600)


class PausingStrategy(FedprivStrategy):
    """The production strategy, stopping at a known point of one round."""

    def __init__(self, *args: Any, pause_in_round: int | None = None, pause_after_round: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pause_in_round = pause_in_round
        self.pause_after_round = pause_after_round

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
        if self.fedpriv_round(server_round) == self.pause_in_round:  # replies recorded, not aggregated
            _pause("in round", self.pause_in_round)
        return super().aggregate_fit(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        result = super().evaluate(server_round, parameters)  # ends with the round's checkpoint
        if server_round > 0 and self.fedpriv_round(server_round) == self.pause_after_round:
            _pause("after round", self.pause_after_round)
        return result


WHITE_BOX_BUGS = {"half_noise": HalfNoiseTrainer, "unclipped": UnclippedTrainer, "shuffled": ShuffledTrainer}


def install(noiseless: bool = False, pause_in_round: int | None = None,
            pause_after_round: int | None = None, half_noise: bool = False, unclipped: bool = False,
            shuffled: bool = False, user_noiseless: bool = False) -> Callable[[], None]:
    """Make this process's simulations build their apps with the injected trainer and strategy;
    returns what undoes it."""
    from fedpriv.clients.app import make_client_app
    from fedpriv.server.app import make_server_app
    from fedpriv.simulations import run

    saved = run.make_client_app, run.make_server_app

    def undo() -> None:
        run.make_client_app, run.make_server_app = saved

    if noiseless:
        run.make_client_app = functools.partial(make_client_app, trainer_factory=noiseless_trainer)
    chosen = {"half_noise": half_noise, "unclipped": unclipped, "shuffled": shuffled}
    for name, cls in WHITE_BOX_BUGS.items():
        if chosen[name]:  # white-box audits only: these are white-box trainers
            run.make_client_app = functools.partial(make_client_app, trainer_factory=_white_box(cls))
    if user_noiseless:
        run.make_server_app = functools.partial(make_server_app, strategy_factory=UserNoiselessStrategy)
    if pause_in_round is not None or pause_after_round is not None:
        strategy = functools.partial(PausingStrategy, pause_in_round=pause_in_round,
                                     pause_after_round=pause_after_round)
        run.make_server_app = functools.partial(make_server_app, strategy_factory=strategy)
    return undo


@contextlib.contextmanager
def installed(**kwargs: Any) -> Iterator[None]:
    """:func:`install` for the length of a block (simulations run in the pytest process)."""
    undo = install(**kwargs)
    try:
        yield
    finally:
        undo()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.injected")
    parser.add_argument("--noiseless", action="store_true")
    parser.add_argument("--half-noise", action="store_true")
    parser.add_argument("--unclipped", action="store_true")
    parser.add_argument("--shuffled", action="store_true")
    parser.add_argument("--user-noiseless", action="store_true")
    parser.add_argument("--pause-in-round", type=int)
    parser.add_argument("--pause-after-round", type=int)
    parser.add_argument("--threads", action="store_true")
    parser.add_argument("fedpriv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.fedpriv[1:] if args.fedpriv[:1] == ["--"] else args.fedpriv
    install(args.noiseless, args.pause_in_round, args.pause_after_round, args.half_noise, args.unclipped,
            args.shuffled, args.user_noiseless)
    from fedpriv.cli import main as fedpriv_main

    if not args.threads:
        return fedpriv_main(rest)
    from tests.inprocess import in_process_backend

    with in_process_backend():
        return fedpriv_main(rest)


if __name__ == "__main__":
    # Run as the importable module tests.injected, not as __main__: Ray workers unpickle the
    # ClientApp's trainer factory by reference to its module.
    from tests.injected import main as injected_main

    sys.exit(injected_main(sys.argv[1:]))
