"""The typed run configuration: TOML presets and files, ``--set key=value`` overrides, validation.

A configuration is a set of sections (``[run]``, ``[data]``, ...) of scalar settings. Scalars only,
so that the same configuration flattens into Flower's run config (``"dp.noise_multiplier"``) and
comes back unchanged: ``RunConfig.from_flat(cfg.to_flat()) == cfg``. That is how the ServerApp and
ClientApp receive it under ``flwr run .`` as well as in ``fedpriv simulate``.

Every field carries its own constraint (a range or a set of choices) and help text, and
:meth:`RunConfig.validate` checks combinations. Errors are :class:`ConfigError` with one line
naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from fedpriv.common.errors import ConfigError

Scalar = bool | int | float | str
SECAGG_MIN_SHARES = 3  # the floor nodes enforce (clients.secagg_guard); see docs/secure-aggregation.md


def secagg_floor_problem(shares: int, threshold: int) -> str | None:
    """Why SecAgg+ settings fall below the floor every fedpriv node enforces (None if they don't):
    at least SECAGG_MIN_SHARES shares, and a threshold that is a strict majority of them, so no two
    disjoint sets of a node's neighbours can both rebuild one of its secrets."""
    if shares < SECAGG_MIN_SHARES:
        return f"{shares} shares is below the floor of {SECAGG_MIN_SHARES}"
    if not shares // 2 < threshold <= shares:
        return f"a reconstruction threshold of {threshold} is not a strict majority of {shares} shares"
    return None


ADAPTIVE_BIT = 0.5  # a client's clipped-or-not value: +0.5 unclipped, -0.5 clipped (sensitivity 0.5)
AUTO_SHARES = 5  # secure_aggregation.num_shares = 0 means this many, or fewer if fewer are sampled


def _setting(
    default: Scalar,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
) -> Any:
    meta = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
        "max_exclusive": max_exclusive,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunSection:
    name: str = _setting("fedpriv", "Name of the run; used in the run directory name.")
    seed: int = _setting(
        42,
        "Seed for the data split, partitioning and initial model. DP noise and batch "
        "sampling never use it: they draw from the operating system's entropy.",
        min=0,
    )
    rounds: int = _setting(5, "Number of federated rounds.", min=1, max=100_000)
    out_dir: str = _setting("", "Run directory. Empty: runs/<name>-<timestamp>.")
    resume: bool = _setting(
        False,
        "Continue the run in run.out_dir from its latest encrypted checkpoint, with its ledger "
        "and accounting: rounds after the checkpoint's up to run.rounds (the run's total). Needs "
        "the checkpoint key in the environment ($FEDPRIV_CHECKPOINT_KEY or "
        "$FEDPRIV_CHECKPOINT_KEY_FILE). fedpriv simulate --resume RUN_DIR sets both.",
    )
    app_signature: str = _setting(
        "",
        "The app bundle's signature by the federation's app-signing key, which fedpriv nodes check "
        "before they run any of the app's code (docs/deployment.md, 'Signed apps'). Set by fedpriv "
        "server run (or printed by fedpriv app sign for a plain flwr run), never by hand; unused in "
        "simulation.",
    )


@dataclass(frozen=True)
class DataSection:
    dataset: str = _setting(
        "builtin",
        "builtin (5,000 real MNIST digits, offline), digits (scikit-learn 8x8 digits), "
        "mnist, fashion_mnist, cifar10 (downloaded; fall back to builtin offline), or file.",
        choices=("builtin", "digits", "mnist", "fashion_mnist", "cifar10", "file"),
    )
    path: str = _setting("", "With dataset = 'file': a .npz (arrays x, y) or .csv file.")
    label_column: str = _setting("label", "With a .csv file: the name of the label column.")
    test_fraction: float = _setting(
        0.2, "Share of the data held out for server-side evaluation.", min=0.0, max=0.9,
        min_exclusive=True,
    )
    partitioning: str = _setting(
        "iid",
        "How training data is split across clients: iid, dirichlet (label skew) or "
        "pathological (k classes per client).",
        choices=("iid", "dirichlet", "pathological"),
    )
    alpha: float = _setting(
        0.5, "Dirichlet concentration; smaller is more skewed.", min=0.0, min_exclusive=True
    )
    classes_per_client: int = _setting(2, "Pathological partitioning: classes per client.", min=1)


@dataclass(frozen=True)
class ModelSection:
    name: str = _setting(
        "auto",
        "cnn (Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense), mlp, or auto (cnn for images, "
        "mlp for flat features).",
        choices=("auto", "cnn", "mlp"),
    )
    activation: str = _setting(
        "relu",
        "Hidden-layer activation: relu, or tanh (bounded activations often train better "
        "under DP-SGD; Papernot et al. 2021, 'Tempered Sigmoid Activations').",
        choices=("relu", "tanh"),
    )
    mlp_units: int = _setting(128, "Width of each MLP hidden layer.", min=1, max=65_536)
    mlp_layers: int = _setting(2, "Number of MLP hidden layers.", min=0, max=16)


@dataclass(frozen=True)
class ClientSection:
    local_epochs: int = _setting(
        1, "Local epochs per round; an epoch is ceil(schedule_examples / batch_size) steps.", min=1
    )
    batch_size: int = _setting(
        32,
        "Expected batch size at schedule_examples records: each step samples every local record "
        "with q = batch_size / schedule_examples.",
        min=1,
    )
    schedule_examples: int = _setting(
        0,
        "The public record count that every node's DP-SGD schedule (sampling rate and steps per "
        "round) is planned for, whatever its own data holds, so that the spend a node declares "
        "reveals nothing about its dataset. 0: the run's training records divided by "
        "federation.num_clients, rounded up.",
        min=0,
    )
    learning_rate: float = _setting(0.1, "Client learning rate.", min=0.0, min_exclusive=True)
    optimizer: str = _setting("sgd", "Client optimizer: sgd or adam.", choices=("sgd", "adam"))
    momentum: float = _setting(0.0, "SGD momentum.", min=0.0, max=1.0, max_exclusive=True)
    state_dir: str = _setting(
        "",
        "Where each node keeps its signed record of privacy spending, which carries across "
        "runs. Empty: <run directory>/nodes (simulated nodes start fresh in each run); set a "
        "fixed directory to carry virtual nodes' spending from run to run.",
    )


@dataclass(frozen=True)
class DPSection:
    enabled: bool = _setting(True, "Record-level DP-SGD on every client.")
    l2_norm_clip: float = _setting(
        1.0, "Per-example (or per-microbatch) gradient clipping norm C.", min=0.0,
        min_exclusive=True,
    )
    noise_multiplier: float = _setting(
        1.0, "Gaussian noise standard deviation as a multiple of C.", min=0.0
    )
    microbatches: int = _setting(
        0,
        "0: clip every example (one microbatch per example). k > 0: split each batch into k "
        "microbatches; sensitivity doubles, which the accounting reflects.",
        min=0,
    )
    implementation: str = _setting(
        "auto",
        "bookkeeping (fedpriv's book-keeping DP-SGD: per-example norms and clipped gradients "
        "from one backward pass; Dense and Conv2D models), fast (TF Privacy's DPSequential with "
        "fast clipping for Dense and, from fedpriv, Conv2D), vectorized (TF Privacy's vectorized "
        "DP optimizer), keras (TF Privacy's DPKeras optimizer), or auto (bookkeeping where the "
        "model allows, else fast; vectorized when microbatches are set).",
        choices=("auto", "bookkeeping", "fast", "vectorized", "keras"),
    )


@dataclass(frozen=True)
class UserDPSection:
    enabled: bool = _setting(
        False, "User-level DP (DP-FedAvg): clip each client's update, add Gaussian noise to the sum."
    )
    clipping_norm: float = _setting(
        1.0, "L2 bound on each client's model update.", min=0.0, min_exclusive=True
    )
    noise_multiplier: float = _setting(
        1.0, "Noise standard deviation on the sum, as a multiple of clipping_norm.", min=0.0
    )
    noise_mode: str = _setting(
        "central",
        "central: the server adds Gaussian noise to the (unmasked) sum, so the server is "
        "trusted to add it. distributed: each client adds its share of discrete Gaussian noise "
        "before masking (needs secure_aggregation.enabled), so the server only ever sees "
        "noised sums; each round is accounted by Kairouz et al.'s zCDP bound, without "
        "amplification by client sampling.",
        choices=("central", "distributed"),
    )
    adaptive_clipping: bool = _setting(
        False,
        "Adaptive clipping (Andrew et al. 2021): clipping_norm is the first round's clip, and "
        "after each round the clip moves toward the target_quantile of the clients' update norms. "
        "Each client adds whether its update was clipped to its update, so under SecAgg+ the "
        "server only sees the count inside the masked sum; the count gets noise of "
        "clipped_count_stddev (central mode: from the server; distributed mode: discrete Gaussian "
        "shares from the clients). noise_multiplier stays the round's total: the update's noise "
        "is raised so that the two compose to it (as TensorFlow Federated sizes them).",
    )
    target_quantile: float = _setting(
        0.5, "Adaptive clipping: the share of client updates the clip should leave unclipped.",
        min=0.0, max=1.0, min_exclusive=True, max_exclusive=True,
    )
    clip_learning_rate: float = _setting(
        0.2, "Adaptive clipping: geometric step; a round moves the clip by a factor of at most exp(rate).",
        min=0.0, min_exclusive=True,
    )
    clipped_count_stddev: float = _setting(
        0.0,
        "Adaptive clipping: Gaussian noise on the count of unclipped updates. 0: auto, the "
        "expected clients per round / 20 (Andrew et al.'s choice).",
        min=0.0,
    )


@dataclass(frozen=True)
class PrivacySection:
    delta: float = _setting(
        1e-5, "Target delta for reported epsilon.", min=0.0, max=1.0, min_exclusive=True,
        max_exclusive=True,
    )
    record_budget: float = _setting(
        0.0,
        "Record-level epsilon budget of every client (0: no budget). A client refuses a round "
        "that would take it past the budget. A resume may tighten it, never raise it or set it to 0.",
        min=0.0,
    )
    user_budget: float = _setting(
        0.0,
        "User-level epsilon budget of the run (0: no budget). The server ends the run before a "
        "round that would exceed it. A resume may tighten it, never raise it or set it to 0.",
        min=0.0,
    )


@dataclass(frozen=True)
class FederationSection:
    num_clients: int = _setting(10, "Number of (virtual) clients.", min=1, max=10_000_000)
    fraction_train: float = _setting(
        1.0, "Fraction of connected clients sampled each round.", min=0.0, max=1.0,
        min_exclusive=True,
    )
    min_train_clients: int = _setting(2, "Minimum clients trained per round.", min=1)
    min_available_clients: int = _setting(2, "Clients that must be connected before a round.", min=1)
    strategy: str = _setting(
        "fedavg", "Server strategy: fedavg or fedadam.", choices=("fedavg", "fedadam")
    )
    server_learning_rate: float = _setting(
        0.01, "FedAdam server learning rate (eta).", min=0.0, min_exclusive=True
    )
    round_timeout: float = _setting(
        3600.0, "Seconds to wait for client replies in a round.", min=0.0, min_exclusive=True
    )
    on_round_failure: str = _setting(
        "continue",
        "What to do when a round produces no aggregate (for example more secure-aggregation "
        "dropouts than tolerated): continue with the next round, or stop the run. Either way "
        "the failure is recorded and the model and ledger are kept.",
        choices=("continue", "stop"),
    )
    connect_timeout: float = _setting(
        300.0,
        "Seconds to wait before a round for min_available_clients to be connected; after that "
        "the run ends with an error instead of waiting forever.",
        min=0.0,
        min_exclusive=True,
    )


@dataclass(frozen=True)
class SecureAggregationSection:
    enabled: bool = _setting(
        True,
        "Flower's SecAgg+: clients mask their updates so the server only ever sees the sum.",
    )
    num_shares: int = _setting(
        0,
        "Each client's secrets are split into this many shares, one per neighbour (itself "
        "included): at least 3, at most the clients sampled per round, and odd unless it equals "
        "the clients a round can sample (Flower's SecAgg+ fails otherwise). 0: auto, 5 or the "
        "clients per round if fewer (odd under Poisson sampling).",
        min=0,
    )
    reconstruction_threshold: int = _setting(
        0,
        "Shares needed to rebuild a secret: a strict majority of num_shares, below it (nodes refuse "
        "anything less). A round survives up to num_shares - reconstruction_threshold dropouts. "
        "0: auto, the smallest majority.",
        min=0,
    )
    clipping_range: float = _setting(
        8.0,
        "Each coordinate of an update is clipped to [-clipping_range, clipping_range] before "
        "quantization. (In user_dp distributed mode updates are already integers and this "
        "is set to quantization_range / 2.)",
        min=0.0, min_exclusive=True,
    )
    quantization_range: int = _setting(
        4_194_304,
        "Levels a coordinate is quantized to (a power of 2, at most 2^30). Sampled clients "
        "x quantization_range must stay below 2^32, the masking modulus.",
        min=2, max=2**30,
    )
    max_weight: int = _setting(
        1000,
        "Largest weight (example count) a client may give its update without DP; larger counts "
        "are capped. With record-level or user-level DP every client has weight 1.",
        min=1,
    )
    timeout: float = _setting(
        600.0, "Seconds to wait for replies in each SecAgg+ stage.", min=0.0, min_exclusive=True
    )


FAIL_MODES = ("crash", "hang", "wrong_count", "wrong_shape", "wrong_dtype", "nan", "inf", "over_clip",
              "bad_record")


@dataclass(frozen=True)
class SimulationSection:
    cpus_per_client: float = _setting(
        1.0, "CPU cores reserved for each virtual client. Without a GPU, its TensorFlow runs that many "
        "threads (at least one) rather than one per core of the machine (fedpriv simulate).",
        min=0.0, min_exclusive=True
    )
    gpus_per_client: float = _setting(
        0.25,
        "Fraction of a GPU per virtual client when a GPU is present (0.25: four clients "
        "share one GPU). Ignored on machines without a GPU.",
        min=0.0,
        max=1.0,
    )
    ray_address: str = _setting(
        "",
        "An existing Ray cluster to run the virtual clients on: its address (head:6379, or "
        "auto for the cluster this machine belongs to). Empty: $RAY_ADDRESS when set, else a "
        "Ray instance of this machine started for the run alone (local: that, whatever "
        "$RAY_ADDRESS says). On a cluster, client.state_dir must name a directory that every "
        "machine sees at the same path (a shared filesystem with file locking); the run "
        "directory stays on this machine. (fedpriv simulate; under flwr run, Flower's "
        "federation settings decide where clients run.)",
    )
    fail_clients: str = _setting(
        "",
        "Fault injection: comma-separated partition ids of virtual clients that fail (raise an "
        "error) at fail_stage. Empty: none.",
    )
    fail_stage: str = _setting(
        "collect_masked_vectors",
        "When injected failures strike: train (without SecAgg), or a SecAgg+ stage: setup or "
        "share_keys (before the client's key shares reach anyone: the round goes on without it), "
        "collect_masked_vectors (after sharing keys: its masks are removed with its rebuilt key) "
        "or unmask.",
        choices=("train", "setup", "share_keys", "collect_masked_vectors", "unmask"),
    )
    fail_rounds: str = _setting(
        "",
        "Fault injection: comma-separated rounds in which the failures strike, counted by this "
        "server process (after a resume its first round is 1). Empty: every round.",
    )
    fail_mode: str = _setting(
        "crash",
        "Fault injection: how the chosen clients fail. crash: raise an error at fail_stage; "
        "hang: answer nothing at fail_stage until federation.round_timeout (and, under SecAgg+, "
        "secure_aggregation.timeout) has passed, then give up without training; or return a "
        "malformed training reply: wrong_count (an array missing), wrong_shape, wrong_dtype "
        "(integers), nan, inf, over_clip (an update 10x the user-level clip bound; needs "
        "user_dp.enabled) or bad_record (an unreadable privacy record). One mode for every "
        "client of fail_clients, or a comma-separated list, one mode per client.",
    )

    def fault_modes(self) -> dict[int, str]:
        """Each failing client's partition id and its mode: ``fail_mode`` is one mode for all of
        ``fail_clients`` or one per client (what :meth:`RunConfig.validate` checks)."""
        clients = [int(c) for c in self.fail_clients.split(",") if c.strip()]
        modes = [m.strip() for m in self.fail_mode.split(",")]
        return {c: modes[0] if len(modes) == 1 else modes[i] for i, c in enumerate(clients)}


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    client: ClientSection = field(default_factory=ClientSection)
    dp: DPSection = field(default_factory=DPSection)
    user_dp: UserDPSection = field(default_factory=UserDPSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    federation: FederationSection = field(default_factory=FederationSection)
    secure_aggregation: SecureAggregationSection = field(default_factory=SecureAggregationSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, nested: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build from nested sections, starting from ``base`` (defaults if None)."""
        base = base or cls()
        if not isinstance(nested, Mapping):
            raise ConfigError("configuration must be a table of sections")
        sections = {f.name: f for f in fields(cls)}
        updated: dict[str, Any] = {}
        for section_name, values in nested.items():
            if section_name not in sections:
                raise ConfigError(f"unknown section [{section_name}]{_suggest(section_name, sections)}")
            if not isinstance(values, Mapping):
                raise ConfigError(f"[{section_name}] must be a table of settings")
            current = getattr(base, section_name)
            changes = {
                key: _coerce(section_name, type(current), key, value) for key, value in values.items()
            }
            updated[section_name] = dataclasses.replace(current, **changes)
        config = dataclasses.replace(base, **updated)
        config.validate()
        return config

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build from dotted keys (``"dp.noise_multiplier"``), as in Flower's run config."""
        return cls.from_dict(unflatten(flat), base=base)

    def to_dict(self) -> dict[str, dict[str, Scalar]]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Scalar]:
        return {
            f"{section}.{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field's constraint, then combinations of fields."""
        for section_field in fields(self):
            section = getattr(self, section_field.name)
            for setting in fields(section):
                _check_constraint(section_field.name, setting, getattr(section, setting.name))
        fed = self.federation
        if fed.min_available_clients > fed.num_clients:
            raise ConfigError(
                f"federation.min_available_clients ({fed.min_available_clients}) exceeds "
                f"federation.num_clients ({fed.num_clients})"
            )
        if fed.min_train_clients > fed.num_clients:
            raise ConfigError(
                f"federation.min_train_clients ({fed.min_train_clients}) exceeds "
                f"federation.num_clients ({fed.num_clients})"
            )
        if self.run.resume and not self.run.out_dir:
            raise ConfigError("run.resume needs run.out_dir: the directory of the run to continue")
        if self.privacy.user_budget and not self.user_dp.enabled:
            raise ConfigError("privacy.user_budget needs user-level DP: set user_dp.enabled = true")
        if self.privacy.record_budget and not self.dp.enabled:
            raise ConfigError("privacy.record_budget needs record-level DP: set dp.enabled = true")
        if self.data.dataset == "file" and not self.data.path:
            raise ConfigError("data.dataset = 'file' needs data.path (a .npz or .csv file)")
        if self.dp.enabled and self.dp.microbatches > self.client.batch_size:
            raise ConfigError(
                f"dp.microbatches ({self.dp.microbatches}) exceeds client.batch_size "
                f"({self.client.batch_size})"
            )
        self._validate_secure_aggregation()
        self._validate_adaptive_clipping()
        for key in ("fail_clients", "fail_rounds"):
            value = getattr(self.simulation, key)
            if value and not all(part.strip().isdigit() for part in value.split(",")):
                raise ConfigError(f"simulation.{key} must be comma-separated integers, got {value!r}")
        modes = [m.strip() for m in self.simulation.fail_mode.split(",")]
        unknown = [m for m in modes if m not in FAIL_MODES]
        if unknown:
            raise ConfigError(f"simulation.fail_mode: unknown mode {unknown[0]!r} (choose from "
                              f"{', '.join(FAIL_MODES)})")
        clients = [c for c in self.simulation.fail_clients.split(",") if c.strip()]
        if len(modes) > 1 and len(modes) != len(clients):
            raise ConfigError(f"simulation.fail_mode lists {len(modes)} modes for {len(clients)} fail_clients; "
                              "give one mode, or one per client")
        if "over_clip" in self.simulation.fault_modes().values() and not self.user_dp.enabled:
            raise ConfigError("simulation.fail_mode = 'over_clip' needs user_dp.enabled (the clip bound is "
                              "user_dp.clipping_norm)")
        if self.dp.enabled and self.dp.microbatches and self.dp.implementation in ("fast", "bookkeeping"):
            raise ConfigError(
                f"dp.implementation = '{self.dp.implementation}' clips per example; set "
                "dp.microbatches = 0 or choose 'vectorized' or 'keras'"
            )


    def schedule_examples(self, train_records: int) -> int:
        """``client.schedule_examples``, or for 0 the expected partition size of the run's data:
        a function of the configuration and the public dataset alone, the same on every node."""
        if self.client.schedule_examples:
            return self.client.schedule_examples
        return max(1, math.ceil(train_records / self.federation.num_clients))

    def clients_per_round(self) -> int:
        """How many clients the server samples each round once all have connected."""
        fed = self.federation
        sampled = max(int(fed.num_clients * fed.fraction_train), fed.min_train_clients)
        return min(sampled, fed.num_clients)

    def secagg_shares(self) -> tuple[int, int]:
        """(num_shares, reconstruction_threshold) in effect, with the 0 = auto defaults resolved."""
        sa = self.secure_aggregation
        shares = sa.num_shares
        if not shares:
            shares = max(3, min(AUTO_SHARES, self.clients_per_round()))
            if self._even_shares_break(shares):
                shares -= 1
        threshold = sa.reconstruction_threshold or max(2, shares // 2 + 1)
        return shares, threshold

    def _even_shares_break(self, shares: int) -> bool:
        """Whether ``shares`` is even and a round may sample more clients than that. Flower 1.42's
        SecAggPlusWorkflow then sends clients the even count but gives each one neighbour more
        (it makes the count odd after sending it), and every client fails (IndexError)."""
        if shares % 2:
            return False
        most = self.federation.num_clients if self.user_dp.enabled else self.clients_per_round()
        return shares < most

    def _validate_adaptive_clipping(self) -> None:
        udp = self.user_dp
        if not udp.adaptive_clipping:
            return
        if not udp.enabled:
            raise ConfigError("user_dp.adaptive_clipping needs user-level DP: set user_dp.enabled = true")
        if (udp.noise_mode == "central" and self.secure_aggregation.enabled
                and self.secure_aggregation.clipping_range < ADAPTIVE_BIT):
            raise ConfigError(f"user_dp.adaptive_clipping needs secure_aggregation.clipping_range >= "
                              f"{ADAPTIVE_BIT} (each client's clipped-or-not value is +-{ADAPTIVE_BIT})")

    def _validate_secure_aggregation(self) -> None:
        sa = self.secure_aggregation
        if self.user_dp.enabled and self.user_dp.noise_mode == "distributed" and not sa.enabled:
            raise ConfigError(
                "user_dp.noise_mode = 'distributed' needs secure_aggregation.enabled = true "
                "(without masking the server would see each client's noised update)"
            )
        if not sa.enabled:
            return
        where = "secure_aggregation"
        if 0 < sa.num_shares < 3:
            raise ConfigError(f"{where}.num_shares must be at least 3 (or 0 for auto), got {sa.num_shares}")
        if sa.reconstruction_threshold == 1:
            raise ConfigError(f"{where}.reconstruction_threshold must be at least 2 (or 0 for auto)")
        shares, threshold = self.secagg_shares()
        if self._even_shares_break(shares):
            sampling = ("Poisson sampling may draw more clients than that" if self.user_dp.enabled
                        else f"{self.clients_per_round()} clients are sampled per round")
            raise ConfigError(
                f"{where}.num_shares ({shares}) must be odd here ({sampling}, and Flower's SecAgg+ "
                f"fails with an even share count below the number sampled); use {shares - 1} or {shares + 1}"
            )
        if threshold >= shares:
            raise ConfigError(
                f"{where}.reconstruction_threshold ({threshold}) must be below {where}.num_shares ({shares})"
            )
        floor = secagg_floor_problem(shares, threshold)
        if floor:
            raise ConfigError(f"{where}: {floor}; fedpriv nodes refuse such rounds (set "
                              f"{where}.reconstruction_threshold above {shares // 2}, or 0 for auto)")
        sampled = self.clients_per_round()
        if sampled < 3:
            raise ConfigError(
                f"secure aggregation needs at least 3 clients per round, but {sampled} are sampled; "
                f"sample more or set secure_aggregation.enabled = false"
            )
        if shares > sampled:
            raise ConfigError(
                f"{where}.num_shares ({shares}) exceeds the {sampled} clients sampled per "
                f"round; lower it or sample more clients (federation.fraction_train)"
            )
        if sa.quantization_range & (sa.quantization_range - 1):
            raise ConfigError(f"{where}.quantization_range must be a power of 2, got {sa.quantization_range}")
        if sampled * sa.quantization_range >= 2**32:
            raise ConfigError(
                f"{sampled} clients per round x {where}.quantization_range "
                f"({sa.quantization_range}) would overflow the 2^32 masking modulus; lower "
                f"quantization_range to {1 << (((2**32 - 1) // sampled).bit_length() - 1)} or less"
            )


def unflatten(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"dp.enabled": True}`` -> ``{"dp": {"enabled": True}}``."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        section, sep, key = str(dotted).partition(".")
        if not sep or not key or "." in key:
            raise ConfigError(f"setting '{dotted}' must have the form section.key")
        nested.setdefault(section, {})[key] = value
    return nested


def parse_override(text: str) -> tuple[str, Scalar]:
    """Parse one ``--set section.key=value``; the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got '{text}'")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, (dict, list)):
        raise ConfigError(f"--set {key}: only single values are allowed, got '{raw}'")
    return key, value


def toml_value(value: Any) -> str:
    """A setting's value as a TOML literal (also Flower's ``--run-config`` syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a TOML file (``what`` names it in errors), turning every failure into a one-line
    ConfigError."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} path is a directory, not a file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML in {what} {path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_config(
    layers: list[Mapping[str, Any]] | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Defaults, then each nested layer in order (preset, file), then ``--set`` overrides.

    Layers are merged first and validated once, so a later layer may fix a combination an
    earlier one left invalid.
    """
    merged: dict[str, dict[str, Any]] = {}
    stack: list[Mapping[str, Any]] = list(layers or [])
    if overrides:
        stack.append(unflatten(dict(parse_override(o) for o in overrides)))
    for layer in stack:
        if not isinstance(layer, Mapping):
            raise ConfigError("configuration must be a table of sections")
        for section, values in layer.items():
            if not isinstance(values, Mapping):
                raise ConfigError(f"[{section}] must be a table of settings")
            merged.setdefault(section, {}).update(values)
    return RunConfig.from_dict(merged)


def describe_settings() -> list[tuple[str, str, str]]:
    """(key, default, help) for every setting, for ``--help`` and the docs."""
    rows = []
    for section_field in fields(RunConfig):
        section = section_field.default_factory()  # type: ignore[misc]
        for setting in fields(section):
            rows.append(
                (f"{section_field.name}.{setting.name}", repr(getattr(section, setting.name)),
                 setting.metadata["help"])
            )
    return rows


# ---- helpers --------------------------------------------------------------------------------
def _suggest(name: str, known: Mapping[str, Any] | list[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(section: str, section_type: type, key: str, value: Any) -> Scalar:
    hints = get_type_hints(section_type)
    if key not in hints:
        raise ConfigError(f"unknown setting '{section}.{key}'{_suggest(key, hints)}")
    expected = hints[key]
    where = f"{section}.{key}"
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # e.g. --set simulation.fail_rounds=1
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _check_constraint(section: str, setting: dataclasses.Field, value: Any) -> None:
    meta = setting.metadata
    where = f"{section}.{setting.name}"
    if meta.get("choices") and value not in meta["choices"]:
        options = ", ".join(meta["choices"])
        raise ConfigError(f"{where} must be one of {options}; got {value!r}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value < low or (meta["min_exclusive"] and value == low)):
        relation = ">" if meta["min_exclusive"] else ">="
        raise ConfigError(f"{where} must be {relation} {low}, got {value!r}")
    if high is not None and (value > high or (meta["max_exclusive"] and value == high)):
        relation = "<" if meta["max_exclusive"] else "<="
        raise ConfigError(f"{where} must be {relation} {high}, got {value!r}")


def config_from_run_config(run_config: Mapping[str, Any], default: RunConfig | None = None) -> RunConfig:
    """The RunConfig an app should use: ``default`` if given (fedpriv simulate passes it
    directly), else the dotted keys of Flower's run config (``flwr run .``)."""
    if default is not None:
        return default
    return RunConfig.from_flat(dict(run_config))
