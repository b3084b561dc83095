import re
import tomllib

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from fedpriv.common.config import ConfigError, RunConfig, load_config, parse_override
from fedpriv.common.presets import available, preset_layers
from tests.conftest import ROOT


def test_defaults_are_valid_and_roundtrip_through_flat_keys():
    cfg = RunConfig()
    cfg.validate()
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_overrides_apply_with_types():
    cfg = load_config(overrides=["dp.noise_multiplier=1.3", "run.rounds=7", "dp.enabled=false",
                                 "data.dataset=digits"])
    assert cfg.dp.noise_multiplier == 1.3
    assert cfg.run.rounds == 7
    assert cfg.dp.enabled is False
    assert cfg.data.dataset == "digits"


def test_integer_given_for_float_is_accepted():
    assert load_config(overrides=["dp.l2_norm_clip=2"]).dp.l2_norm_clip == 2.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("dp.noise_multipler=1", "unknown setting 'dp.noise_multipler' (did you mean 'noise_multiplier'?)"),
        ("dpp.enabled=true", "unknown section [dpp] (did you mean 'dp'?)"),
        ("run.rounds=1.5", "run.rounds must be an integer"),
        ("run.rounds=0", "run.rounds must be >= 1"),
        ("dp.noise_multiplier=-0.5", "dp.noise_multiplier must be >= 0.0"),
        ("privacy.delta=1", "privacy.delta must be < 1.0"),
        ("privacy.delta=0", "privacy.delta must be > 0.0"),
        ("dp.enabled=maybe", "dp.enabled must be true or false"),
        ("data.partitioning=random", "data.partitioning must be one of iid, dirichlet, pathological"),
        ("client.batch_size=\"big\"", "client.batch_size must be an integer"),
        ("dp.l2_norm_clip=nan", "dp.l2_norm_clip must be finite"),
        ("rounds=3", "must have the form section.key"),
        ("run.rounds", "--set expects section.key=value"),
    ],
)
def test_invalid_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["federation.num_clients=3", "federation.min_available_clients=5"], "min_available_clients (5) exceeds"),
        (["data.dataset=file"], "needs data.path"),
        (["dp.microbatches=64", "client.batch_size=32"], "dp.microbatches (64) exceeds"),
        (["dp.microbatches=4", "dp.implementation=fast"], "clips per example"),
    ],
)
def test_invalid_combinations(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=overrides)


def test_later_layers_can_fix_earlier_combinations():
    cfg = load_config([{"federation": {"num_clients": 1}}], ["federation.min_available_clients=1",
                                                             "federation.min_train_clients=1",
                                                             "secure_aggregation.enabled=false"])
    assert cfg.federation.num_clients == 1


def test_parse_override_reads_toml_values_and_falls_back_to_strings():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=3.5") == ("a.b", 3.5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=some/path.npz") == ("a.b", "some/path.npz")
    with pytest.raises(ConfigError):
        parse_override("a.b=[1, 2]")


def test_presets_load_and_no_dp_differs_only_in_dp_and_name():
    assert {"quickstart", "no-dp"} <= set(available())
    quick = load_config(preset_layers("quickstart"))
    no_dp = load_config(preset_layers("no-dp"))
    assert quick.dp.enabled and not no_dp.dp.enabled
    assert quick.federation.num_clients >= 10 and quick.run.rounds >= 5
    assert (quick.data, quick.client, quick.federation, quick.model) == (
        no_dp.data, no_dp.client, no_dp.federation, no_dp.model)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*quickstart"):
        preset_layers("nope")


def test_flower_run_config_in_pyproject_is_the_quickstart_preset():
    """`flwr run .` must run the same configuration as `fedpriv simulate`."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower_config = pyproject["tool"]["flwr"]["app"]["config"]
    flat = {f"{s}.{k}": v for s, table in flower_config.items() for k, v in table.items()}
    from_flower = RunConfig.from_flat(flat)
    assert from_flower == load_config(preset_layers("quickstart"))


def test_strategy_choice():
    from flwr.server.strategy import FedAdam, FedAvg

    from fedpriv.server.strategy import build_inner_strategy

    initial = ndarrays_to_parameters([np.zeros(3, dtype=np.float32)])
    fedavg = build_inner_strategy(load_config(overrides=["federation.fraction_train=0.5",
                                                         "federation.min_train_clients=5"]), initial)
    assert type(fedavg) is FedAvg and fedavg.fraction_fit == 0.5 and fedavg.min_fit_clients == 5
    assert fedavg.fraction_evaluate == 0.0  # the server evaluates centrally
    fedadam = build_inner_strategy(load_config(overrides=["federation.strategy=fedadam",
                                                          "federation.server_learning_rate=0.05"]), initial)
    assert isinstance(fedadam, FedAdam) and fedadam.eta == 0.05


def test_secure_aggregation_settings_are_validated():
    cfg = load_config(overrides=["secure_aggregation.num_shares=7", "secure_aggregation.reconstruction_threshold=4"])
    assert cfg.secure_aggregation.num_shares == 7 and cfg.secure_aggregation.enabled
    assert cfg.secagg_shares() == (7, 4)
    assert load_config().secagg_shares() == (5, 3)  # auto
    small = load_config(overrides=["federation.num_clients=3", "federation.min_available_clients=3"])
    assert small.secagg_shares() == (3, 2)
    # An even share count works when it is the number sampled (every client a neighbour)...
    four = ["federation.num_clients=4", "federation.min_available_clients=4"]
    assert load_config(overrides=four).secagg_shares() == (4, 3)
    assert load_config(overrides=[*four, "secure_aggregation.num_shares=4"]).secagg_shares() == (4, 3)
    # ...but not under Poisson sampling, which may draw more: auto picks the odd count below.
    poisson = ["federation.num_clients=10", "federation.fraction_train=0.4", "user_dp.enabled=true"]
    assert load_config(overrides=poisson).secagg_shares() == (3, 2)
    cases = {
        "must be below secure_aggregation.num_shares": ["secure_aggregation.reconstruction_threshold=5"],
        "exceeds the 10 clients sampled": ["secure_aggregation.num_shares=11",
                                           "secure_aggregation.reconstruction_threshold=6"],
        "power of 2": ["secure_aggregation.quantization_range=1000"],
        "a reconstruction threshold of 2 is not a strict majority of 5 shares": [
            "secure_aggregation.reconstruction_threshold=2"],
        "overflow the 2^32 masking modulus": ["secure_aggregation.quantization_range=1073741824"],
        "needs secure_aggregation.enabled = true": ["secure_aggregation.enabled=false", "user_dp.enabled=true",
                                                     "user_dp.noise_mode=distributed"],
        "secure_aggregation.num_shares must be at least 3": ["secure_aggregation.num_shares=2"],
        "at least 3 clients per round": ["federation.num_clients=2", "federation.min_available_clients=2"],
        "secure_aggregation.timeout must be > 0": ["secure_aggregation.timeout=0"],
        "num_shares (4) must be odd here (10 clients are sampled": ["secure_aggregation.num_shares=4",
                                                                    "secure_aggregation.reconstruction_threshold=3"],
        "num_shares (4) must be odd here (Poisson sampling": [
            "secure_aggregation.num_shares=4", "secure_aggregation.reconstruction_threshold=3",
            "federation.fraction_train=0.4", "user_dp.enabled=true"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(overrides=overrides)


def test_budgets_need_the_matching_dp():
    with pytest.raises(ConfigError, match="user_budget needs user-level DP"):
        load_config(overrides=["privacy.user_budget=3"])
    with pytest.raises(ConfigError, match="record_budget needs record-level DP"):
        load_config(overrides=["privacy.record_budget=3", "dp.enabled=false"])


def _connecting(counts):
    """Connected clients as a client manager's ``all`` reports them, more at each look."""
    counts = list(counts)

    def connected():
        return {str(i): object() for i in range(counts.pop(0) if len(counts) > 1 else counts[0])}
    return connected


def test_waiting_for_clients_ends_with_a_clear_error():
    from fedpriv.server.strategy import NotEnoughClients, wait_for_clients

    assert len(wait_for_clients(_connecting([1, 2, 3]), needed=3, timeout=5, poll=0.01)) == 3
    with pytest.raises(NotEnoughClients, match="only 2 of the 10 clients"):
        wait_for_clients(_connecting([2]), needed=10, timeout=0.05, poll=0.01)
