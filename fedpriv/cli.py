"""The ``fedpriv`` command line: the single front door to simulations and tools.

Every command turns user mistakes into ``error: <one line>`` on stderr and a non-zero exit
status (2 for bad input), never a traceback; ``--verbose`` shows tracebacks and library logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fedpriv.common import key_providers, secret_env
from fedpriv.common.errors import FedprivError
from fedpriv.common.fileio import PRIVATE_UMASK

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    _configure_logging(verbose)
    os.umask(PRIVATE_UMASK)  # owner-only files for this process and every process it starts
    try:
        with secret_env.held():  # key material in the environment: handed only to children that need it
            key_providers.open_configured()  # keys in a PKCS#11 token: opened before TensorFlow loads
            return int(args.func(args) or 0)
    except FedprivError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - the front door never shows a traceback
        cause = _fedpriv_cause(exc)
        if cause is not None:
            _error(str(cause))
            return EXIT_BAD_INPUT
        if verbose:
            raise
        _error(f"{type(exc).__name__}: {exc} (run again with --verbose for details)")
        return EXIT_FAILURE


def _fedpriv_cause(exc: BaseException) -> FedprivError | None:
    """A FedprivError raised inside Flower's threads comes back wrapped; find it."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, FedprivError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _error(message: str) -> None:
    print(f"error: {message.splitlines()[0] if message else 'unknown error'}", file=sys.stderr)


def _configure_logging(verbose: bool) -> None:
    os.environ["FEDPRIV_VERBOSE"] = "1" if verbose else "0"
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        # Flower and Ray log every message exchange; the progress display replaces that.
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger("absl").setLevel(logging.ERROR)


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpriv",
        description="Privacy-preserving federated learning on Flower and TensorFlow Privacy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    simulate = sub.add_parser(
        "simulate",
        help="run a local federation of virtual clients",
        description=(
            "Run a federation of virtual clients on this machine (Flower simulation on Ray) and "
            "write a run directory with summary.json, metrics.csv, progress.png and model.npz. "
            "Settings come from a preset, then --config FILE, then --set overrides; "
            "'fedpriv config' lists every setting."
        ),
    )
    simulate.add_argument("--preset", default=None, help="named configuration (default: quickstart)")
    simulate.add_argument("--config", metavar="FILE", help="TOML file of settings, applied on the preset")
    simulate.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set dp.noise_multiplier=1.3 (repeatable)",
    )
    simulate.add_argument("--out", metavar="DIR", help="run directory (default: runs/<name>-<timestamp>)")
    simulate.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue RUN_DIR from its latest encrypted checkpoint (needs $FEDPRIV_CHECKPOINT_KEY or "
             "$FEDPRIV_CHECKPOINT_KEY_FILE), with the configuration it ran with; --config/--set change "
             "it, and run.rounds is the run's total, e.g. --set run.rounds=10 after 5 rounds runs 6 to 10",
    )
    simulate.add_argument("--verbose", action="store_true", help="show Flower, Ray and TensorFlow logs")
    simulate.set_defaults(func=cmd_simulate)

    presets = sub.add_parser("presets", help="list the named configurations",
                             description="List the presets that --preset accepts.")
    presets.set_defaults(func=cmd_presets)

    config = sub.add_parser(
        "config", help="show settings, or the resolved configuration of a run",
        description=(
            "Without options: list every setting with its default. With --preset/--config/--set: "
            "print the resolved, validated configuration as TOML."
        ),
    )
    config.add_argument("--preset", default=None)
    config.add_argument("--config", metavar="FILE")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    config.add_argument("--markdown", action="store_true", help="list the settings as a Markdown table")
    config.set_defaults(func=cmd_config)

    from fedpriv import (audit_cmd, data_cmd, deploy_cmd, keys_cmd, model_cmd, operator_cmd, privacy_cmd,
                         review_cmd)

    privacy_cmd.add_parser(sub)
    audit_cmd.add_parser(sub)
    keys_cmd.add_parser(sub)
    deploy_cmd.add_parser(sub)
    operator_cmd.add_parser(sub)
    model_cmd.add_parser(sub)
    data_cmd.add_parser(sub)
    review_cmd.add_parser(sub)
    return parser


# ---- commands -------------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> int:
    from fedpriv.common.presets import available, preset_layers

    for name in available():
        layers = preset_layers(name)
        described = {k: v for layer in layers for k, v in layer.get("run", {}).items()}
        print(f"{name:<14} rounds={described.get('rounds', '?')}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedpriv.common.config import describe_settings, toml_value

    if args.preset or args.config or args.overrides:
        from fedpriv.common.settings import resolve_config

        cfg = resolve_config(args.preset, args.config, args.overrides)
        for section, values in cfg.to_dict().items():
            print(f"[{section}]")
            for key, value in values.items():
                print(f"{key} = {toml_value(value)}")
            print()
        return 0
    if args.markdown:
        print(settings_markdown())
        return 0
    for key, default, help_text in describe_settings():
        print(f"{key:<32} {default:<12} {help_text}")
    return 0


def settings_markdown() -> str:
    """The settings reference in docs/configuration.md (a test keeps the two identical)."""
    from fedpriv.common.config import describe_settings

    lines = ["| setting | default | meaning |", "|---|---|---|"]
    for key, default, help_text in describe_settings():
        lines.append(f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedpriv.common import rundir
    from fedpriv.common.settings import resolve_config

    console = Console(stderr=False)
    if args.resume:
        if args.out:
            raise FedprivError("--resume continues RUN_DIR in place; drop --out")
        out_dir = Path(args.resume)
        cfg = resolve_config(args.preset, args.config, args.overrides, resume=out_dir)
    else:
        cfg = resolve_config(args.preset, args.config, args.overrides)
        out_dir = Path(args.out or cfg.run.out_dir or rundir.default_run_dir(cfg.run.name))
    if not cfg.run.resume and out_dir.exists() and any(out_dir.iterdir()):
        raise FedprivError(f"run directory {out_dir} already exists and is not empty; choose another --out "
                           f"(or continue it with --resume {out_dir})")
    # Every process (server, virtual clients, on any machine of a Ray cluster) must agree on the
    # run directory and the nodes' state directory, whatever directory each started in.
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out_dir.resolve())))
    if cfg.client.state_dir:
        cfg = dataclasses.replace(cfg, client=dataclasses.replace(
            cfg.client, state_dir=str(Path(cfg.client.state_dir).resolve())))

    from fedpriv.simulations.run import plan, ray_address

    started = time.perf_counter()
    with console.status("Loading data and checking the configuration..."):
        run_plan = plan(cfg)
    if run_plan.restore is not None:
        from fedpriv.server.resume import NothingToResume, remaining_rounds

        try:
            remaining_rounds(cfg, run_plan.restore, out_dir)
        except NothingToResume as done:
            console.print(str(done), highlight=False)
            return 0
    for note in run_plan.dataset.notes:
        console.print(f"[yellow]note:[/] {note}")
    for warning in run_plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    protections = []
    if cfg.dp.enabled:
        protections.append(f"DP-SGD C={cfg.dp.l2_norm_clip} z={cfg.dp.noise_multiplier}")
    if cfg.user_dp.enabled:
        protections.append(f"user-level DP C={cfg.user_dp.clipping_norm} z={cfg.user_dp.noise_multiplier} "
                           f"({cfg.user_dp.noise_mode} noise)")
    if cfg.dp.enabled or cfg.user_dp.enabled:
        protections.append(f"delta={cfg.privacy.delta}")
    else:
        protections.append("no DP")
    sa = cfg.secure_aggregation
    shares, threshold = cfg.secagg_shares()
    protections.append(
        f"SecAgg+ ({shares} shares, threshold {threshold})" if sa.enabled else "no secure aggregation")
    dp = ", ".join(protections)
    done = run_plan.restore.round if run_plan.restore is not None else 0
    rounds = (f"rounds {done + 1}-{cfg.run.rounds} (resuming after round {done})" if done
              else f"{cfg.run.rounds} rounds")
    cluster = ray_address(cfg)
    console.print(
        f"[bold]fedpriv simulate[/] {cfg.run.name}: {cfg.federation.num_clients} clients, "
        f"{rounds}, {run_plan.model_name} on {run_plan.dataset.name} "
        f"({len(run_plan.dataset.y_train)} train / {len(run_plan.dataset.y_test)} test), {dp}"
        + (f"; clients on the Ray cluster at {cluster}, node state in {cfg.client.state_dir}" if cluster else "")
    )
    summary = _run_with_progress(console, cfg, out_dir, args.verbose, run_plan)
    _print_result(console, summary, out_dir, time.perf_counter() - started)
    return _check_failures(console, summary)


def _run_with_progress(console: Any, cfg: Any, out_dir: Path, verbose: bool, run_plan: Any) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedpriv.simulations.run import simulate

    def describe(entry: Any) -> str:
        acc = f"{entry.accuracy:.3f}" if entry.accuracy is not None else "-"
        eps = f"{entry.record_epsilon_max:.2f}" if entry.record_epsilon_max is not None else "-"
        user = f"  user epsilon {entry.user_epsilon:.2f}" if entry.user_epsilon is not None else ""
        return f"accuracy {acc}  epsilon {eps}{user}"

    if not console.is_terminal or verbose:
        def on_round(entry: Any) -> None:
            console.print(f"round {entry.round}/{cfg.run.rounds}  {describe(entry)}", highlight=False)

        console.print("starting virtual clients...")
        return simulate(cfg, out_dir, verbose=verbose, on_round=on_round, run_plan=run_plan)

    progress = Progress(
        TextColumn("[bold blue]round"), MofNCompleteColumn(), BarColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
    )
    with progress:
        done = run_plan.restore.round if run_plan.restore is not None else 0
        task = progress.add_task("rounds", total=cfg.run.rounds, completed=done,
                                 status="starting virtual clients...")

        def on_round_live(entry: Any) -> None:
            progress.update(task, completed=entry.round, status=describe(entry))

        return simulate(cfg, out_dir, verbose=verbose, on_round=on_round_live, run_plan=run_plan)


def _print_result(console: Any, summary: dict, out_dir: Path, seconds: float) -> None:
    from rich.table import Table

    user_dp = summary["privacy"]["user_level"]["enabled"]
    table = Table(title=f"{summary['name']} finished in {seconds:.0f} s")
    # The server's own evaluation on its test data; clients' training loss never reaches it.
    columns = ["round", "test accuracy", "test loss", "record epsilon (max)"]
    columns += ["user epsilon"] if user_dp else []
    for column in columns + ["clients"]:
        table.add_column(column, justify="right")
    for entry in summary["rounds"]:
        clients = f"{entry['clients_trained']}" + (
            f" ({entry['clients_failed']} failed)" if entry["clients_failed"] else "")
        if entry.get("failed"):
            clients += ", round failed"
        row = [str(entry["round"]), _fmt(entry["accuracy"], ".4f"), _fmt(entry["loss"], ".4f"),
               _fmt(entry["record_epsilon_max"], ".3f")]
        row += [_fmt(entry["user_epsilon"], ".3f")] if user_dp else []
        table.add_row(*row, clients)
    console.print(table)
    privacy = summary["privacy"]
    eps = privacy["record_level"]["max_epsilon"]
    console.print(
        f"final accuracy {_fmt(summary['final_accuracy'], '.4f')}; record-level epsilon "
        f"{_fmt(eps, '.3f')} at delta {privacy['delta']:g}"
        + ("" if privacy["record_level"]["enabled"] else " (DP off)")
    )
    user = privacy["user_level"]
    if user["enabled"]:
        console.print(f"user-level epsilon {_fmt(user['epsilon'], '.3f')} at delta {privacy['delta']:g}"
                      + (f" (budget {user['budget']:g})" if user["budget"] else ""))
        if user.get("composed_runs"):
            console.print(f"user-level epsilon with the {len(user['composed_runs'])} earlier run(s) of this "
                          f"server state {_fmt(user.get('cumulative_epsilon'), '.3f')}")
        if user.get("epsilon_gaussian_approximation") is not None:
            console.print(f"  continuous-Gaussian approximation (not a bound; for comparison only): "
                          f"{_fmt(user['epsilon_gaussian_approximation'], '.3f')}")
    if privacy["refusals"]:
        console.print(f"{len(privacy['refusals'])} round(s) refused by clients whose budget was spent")
    for failed in privacy.get("failed_rounds", []):
        console.print(f"[yellow]round {failed['round']} failed:[/] {failed['reason']}", highlight=False)
    if privacy["stopped_early"]:
        console.print(f"[yellow]stopped early:[/] {privacy['stopped_early']['reason']}", highlight=False)
    console.print(f"run directory: {out_dir}   (verify with: fedpriv audit {out_dir})")
    key = privacy.get("ledger_key")
    if key:  # outside the run directory: whoever can rewrite the run cannot rewrite these
        console.print(f"ledger signed by key {key['fingerprint']}; its public half: {key['public_key']} "
                      f"(pin it: fedpriv audit {out_dir} --public-key {key['public_key']}); ledger heads "
                      f"witnessed in {key['witness']}", highlight=False, soft_wrap=True)


def _check_failures(console: Any, summary: dict) -> int:
    """Report client failures; a run in which no client ever trained is a failed run."""
    failures = summary.get("failures") or []
    failed_rounds = summary["privacy"].get("failed_rounds") or []
    if failed_rounds and summary["config"]["federation"]["on_round_failure"] == "stop":
        _error(f"the run stopped after round {failed_rounds[-1]['round']} failed; the model and "
               f"ledger up to that point are kept")
        return EXIT_FAILURE
    if not failures:
        return 0
    console.print(
        f"[yellow]warning:[/] {len(failures)} failure(s) were recorded in summary.json; "
        f"first: {failures[0]['reason'][:200]}", highlight=False,
    )
    if not any(entry["clients_trained"] for entry in summary["rounds"]):
        _error(f"no client completed training in any round; first failure: {failures[0]['reason'][:200]}")
        return EXIT_FAILURE
    return 0


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
