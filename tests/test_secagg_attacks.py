"""The SecAgg+ attack harness: a server that plays the attacker against Flower's own protocol code.

Each test runs Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` in one process
(tests/secagg_protocol.py) and deviates from the protocol the way a curious server could:
first against stock Flower 1.42, where the attack works, then against fedpriv, where every node
refuses before anything leaves it, the round fails, and each refusal is in the node's ledger.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import scipy.stats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation import secaggplus_utils
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedpriv.clients.mods import make_secure_aggregation_mod, node_name_and_state_dir
from fedpriv.common import roster as rosters
from fedpriv.common import secagg_masks
from fedpriv.common.config import load_config
from fedpriv.common.ledger import verify_ledger
from fedpriv.server.secagg_workflow import FedprivSecAggPlusWorkflow, federation_roster
from tests.conftest import run_model
from tests.secagg_protocol import make_nodes, run_round, stock_mod

M = 2**32
CLIP, TARGET = 8.0, 2**20
VICTIM = 1000  # node ids are 1000, 1001, ...


# ---- the generator -------------------------------------------------------------------------
def _fold(seed: bytes) -> int:
    out = 0
    for i in range(0, len(seed), 4):
        out ^= int.from_bytes(seed[i:i + 4], "little")
    return out


def test_seeds_with_the_same_32_bit_fold_share_flowers_masks_but_not_fedprivs():
    seed = os.urandom(32)
    flip = int.from_bytes(os.urandom(4), "little") | 1
    words = [int.from_bytes(seed[i:i + 4], "little") for i in range(0, 32, 4)]
    words[0] ^= flip
    words[5] ^= flip  # the XOR-fold is unchanged
    other = b"".join(w.to_bytes(4, "little") for w in words)
    assert other != seed and _fold(other) == _fold(seed)
    shapes = [(64, 32), (100,)]
    stock = [secaggplus_utils.pseudo_rand_gen(s, M, shapes) for s in (seed, other)]
    assert all(np.array_equal(a, b) for a, b in zip(*stock, strict=True))  # Flower: the same masks
    ours = [secagg_masks.expand_masks(s, M, shapes) for s in (seed, other)]
    equal = sum(int(np.sum(a == b)) for a, b in zip(*ours, strict=True))
    assert equal <= 2  # of 2,148 values, each equal with probability 2^-32


def test_flowers_pairwise_seeds_fold_to_at_most_2_to_the_28_values():
    """A pairwise seed is base64 text: bit 7 of every byte of its fold is zero."""
    from cryptography.hazmat.primitives.asymmetric import ec

    for _ in range(50):
        ours, theirs = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
        seed = generate_shared_key(ours, theirs.public_key())
        assert len(seed) == 44 and _fold(seed) & 0x80808080 == 0  # 4 bits of 32 always zero


@pytest.mark.parametrize("modulus", [16, 64])
def test_fedprivs_masks_are_uniform_over_z_m_and_flowers_never_reach_m_minus_1(modulus):
    draws = np.concatenate([secagg_masks.expand_masks(os.urandom(32), modulus, [(4000,)])[0] for _ in range(40)])
    counts = np.bincount(draws, minlength=modulus)
    expected = draws.size / modulus
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # chi-square with modulus - 1 degrees of freedom, at a false-alarm rate of one in a million
    # (fresh os.urandom seeds every run: at 99.9% it failed one CI run in about 500); a generator
    # that favours or misses values by 10% on a 16-value modulus gives about 200
    limit = scipy.stats.chi2.isf(1e-6, modulus - 1)  # 56.5 (15 degrees), 131.4 (63)
    assert chi2 < limit, (chi2, limit)
    assert counts[modulus - 1] > 0
    stock = np.concatenate([secaggplus_utils.pseudo_rand_gen(os.urandom(32), modulus, [(4000,)])[0]
                            for _ in range(40)])
    assert np.sum(stock == modulus - 1) == 0  # randint(0, M - 1) excludes M - 1
    assert stock.max() == modulus - 2


def test_masks_match_between_clients_and_server():
    assert secagg_masks.installed()  # clients.mods installs it for both sides in this process
    seed = os.urandom(32)
    a = secagg_masks.expand_masks(seed, M, [(3, 5), ()])
    b = secagg_masks.expand_masks(seed, M, [(3, 5), ()])
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) and a[1].shape == ()


def test_flowers_masking_arithmetic_is_exact_with_fedprivs_32_bit_masks():
    """Masks for Flower's 2^32 modulus stay 32-bit unsigned words (no 64-bit copy); Flower's own
    arithmetic adds them to 32-bit quantized vectors and 64-bit masked ones without wrapping:
    masking with five masks and removing them again gives the quantized vector back, as Python's
    integers do, also where int32 arithmetic would overflow."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_subtraction

    shapes = [(3000,), (7, 11)]
    quantized = [np.full(shape, 2**31 - 1, np.int32) for shape in shapes]  # the largest int32
    masks = [secagg_masks.expand_masks(os.urandom(32), M, shapes) for _ in range(5)]
    assert all(m.dtype == np.uint32 for mask in masks for m in mask)
    assert max(int(m.max()) for mask in masks for m in mask) > 2**31  # values int32 cannot hold
    masked = quantized
    for i, mask in enumerate(masks):
        masked = (parameters_addition if i % 2 else parameters_subtraction)(masked, mask)
    masked = parameters_mod(masked, M)
    for q, m, mask_sets in zip(quantized, masked, zip(*masks), strict=True):
        expected = q.astype(object)
        for i, mask in enumerate(mask_sets):
            expected = expected + mask.astype(object) if i % 2 else expected - mask.astype(object)
        assert np.array_equal(m.astype(object), expected % M) and m.min() >= 0
    for i, mask in enumerate(masks):  # the server removes them
        masked = (parameters_subtraction if i % 2 else parameters_addition)(masked, mask)
    assert all(np.array_equal(parameters_mod([a], M)[0], q) for a, q in zip(masked, quantized, strict=True))
    # ranges above 2^32 come as signed 64-bit values (unsigned 64-bit plus signed would be floats)
    assert secagg_masks.expand_masks(os.urandom(32), 2**40, [(10,)])[0].dtype == np.int64


# ---- a federation in one process -----------------------------------------------------------
def _config(tmp_path, clients: int, shares: int, threshold: int):
    return load_config(overrides=[
        f"run.out_dir={tmp_path}", f"federation.num_clients={clients}", "federation.fraction_train=1.0",
        f"federation.min_train_clients={clients}", f"federation.min_available_clients={clients}",
        f"secure_aggregation.num_shares={shares}", f"secure_aggregation.reconstruction_threshold={threshold}",
    ])


def _updates(clients: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(7)
    return [[rng.uniform(-1, 1, (6, 4)), rng.uniform(-1, 1, 9)] for _ in range(clients)]


def _workflow(cls, shares, threshold, **extra):
    return cls(num_shares=shares, reconstruction_threshold=threshold, max_weight=1.0, clipping_range=CLIP,
               quantization_range=TARGET, modulus_range=M, timeout=10, **extra)


def _fedpriv_round(tmp_path, clients=5, shares=5, threshold=3, tamper=None, observe=None):
    cfg = _config(tmp_path, clients, shares, threshold)
    updates = _updates(clients)
    nodes = make_nodes(updates, make_secure_aggregation_mod(cfg))
    workflow = _workflow(FedprivSecAggPlusWorkflow, shares, threshold, roster=federation_roster(cfg))
    model = [np.zeros_like(a) for a in updates[0]]
    strategy, grid = run_round(workflow, nodes, model, tamper=tamper, observe=observe)
    return cfg, nodes, strategy, grid


def _stage(msg) -> str | None:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return None if configs is None else configs.get(Key.STAGE)


def _node_refusals(cfg, node) -> list[str]:
    """The SecAgg+ refusals in a node's own signed ledger (verified)."""
    _, state_dir = node_name_and_state_dir(node.context, cfg)
    if not (state_dir / "ledger.jsonl").exists():
        return []
    from fedpriv.clients.budget import NODE_KEY
    from fedpriv.common.ledger import load_or_create_signing_key

    report = verify_ledger(state_dir, load_or_create_signing_key(state_dir / NODE_KEY).public_key())
    assert report.ok, report.failures
    return [e["note"] for e in report.entries if e["kind"] == "secagg_refusal"]


def test_an_honest_round_unmasks_the_mean_with_signed_keys(tmp_path):
    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path)
    assert grid.refusals == {}
    mean = [np.mean([n.update[i] for n in nodes.values()], axis=0) for i in range(2)]
    step = 2 * CLIP / TARGET
    assert all(np.abs(a - b).max() <= step for a, b in zip(strategy.aggregate, mean, strict=True))


# ---- attack 1: a node listed as both surviving and dropped ---------------------------------
class BothListsAttack:
    """A server that lists the victim as surviving and dropped in every neighbour's unmask
    request, keeps both kinds of share aside, and hands Flower's workflow the rest."""

    def __init__(self, victim: int) -> None:
        self.victim = victim
        self.pk1: dict[int, bytes] = {}
        self.neighbours: list[int] = []
        self.masked: list[np.ndarray] | None = None
        self.seed_shares: list[bytes] = []
        self.key_shares: list[bytes] = []

    def tamper(self, msg):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if stage == Stage.SHARE_KEYS and msg.metadata.dst_node_id == self.victim:
            self.neighbours = [int(k) for k in configs if k != Key.STAGE]
            self.pk1 = {int(k): v[0] for k, v in configs.items() if k != Key.STAGE}
        if stage == Stage.UNMASK:
            active, dead = list(configs[Key.ACTIVE_NODE_ID_LIST]), list(configs[Key.DEAD_NODE_ID_LIST])
            if self.victim in active and msg.metadata.dst_node_id != self.victim:
                configs[Key.DEAD_NODE_ID_LIST] = [*dead, self.victim]
        return msg

    def observe(self, reply):
        if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
            return
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in record and reply.metadata.src_node_id == self.victim:
            self.masked = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
        if Key.NODE_ID_LIST in record:
            nids, shares = list(record[Key.NODE_ID_LIST]), list(record[Key.SHARE_LIST])
            hits = [i for i, n in enumerate(nids) if n == self.victim]
            if len(hits) == 2:  # the first is the self-mask seed share, the second the key share
                self.seed_shares.append(shares[hits[0]])
                self.key_shares.append(shares[hits[1]])
                del nids[hits[1]], shares[hits[1]]  # the workflow sees an ordinary reply
                record[Key.NODE_ID_LIST], record[Key.SHARE_LIST] = nids, shares

    def recover(self, generator) -> list[np.ndarray]:
        """The victim's individual update, from its masked vector and both of its secrets."""
        seed, key = combine_shares(self.seed_shares), combine_shares(self.key_shares)
        shapes = [a.shape for a in self.masked]
        vector = [a.astype(np.int64) - m for a, m in zip(self.masked, generator(seed, M, shapes), strict=True)]
        for other in self.neighbours:
            if other == self.victim:
                continue
            shared = generate_shared_key(bytes_to_private_key(key), bytes_to_public_key(self.pk1[other]))
            mask = generator(shared, M, shapes)
            sign = -1 if self.victim > other else 1  # undo the victim's own +/- of the pairwise mask
            vector = [v + sign * m for v, m in zip(vector, mask, strict=True)]
        ratio, quantized = factor_extract(parameters_mod(vector, M))
        return [a * (TARGET / ratio) for a in dequantize(quantized, CLIP, TARGET)]


@pytest.fixture
def stock_flower(monkeypatch):
    """Flower 1.42 as shipped: its own generator on both sides (undoing fedpriv's install)."""
    import importlib

    for name in secagg_masks.FLOWER_CALLERS:
        monkeypatch.setattr(importlib.import_module(name), "pseudo_rand_gen", secaggplus_utils.pseudo_rand_gen)


def test_a_server_listing_a_node_as_surviving_and_dropped_recovers_it_from_stock_flower(stock_flower):
    updates = _updates(5)
    nodes = make_nodes(updates, stock_mod)
    attack = BothListsAttack(VICTIM)
    model = [np.zeros_like(a) for a in updates[0]]
    strategy, grid = run_round(_workflow(SecAggPlusWorkflow, 5, 3), nodes, model,
                               tamper=attack.tamper, observe=attack.observe)
    assert grid.refusals == {} and strategy.aggregate is not None  # nobody noticed
    assert len(attack.seed_shares) >= 3 and len(attack.key_shares) >= 3
    recovered = attack.recover(secaggplus_utils.pseudo_rand_gen)
    step = 2 * CLIP / TARGET
    for got, true in zip(recovered, updates[0], strict=True):
        assert np.abs(got - true).max() <= step  # the victim's own update, to one quantization step


def test_fedpriv_nodes_refuse_to_unmask_a_node_listed_as_surviving_and_dropped(tmp_path):
    attack = BothListsAttack(VICTIM)
    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, tamper=attack.tamper, observe=attack.observe)
    assert strategy.aggregate is None  # the round fails: too few shares reach the server
    assert attack.seed_shares == [] and attack.key_shares == []  # no share of the victim left a node
    refused = {n for n in nodes if n != VICTIM}
    assert set(grid.refusals) == refused
    for node_id in refused:
        assert "listed as both surviving and dropped" in grid.refusals[node_id][0]
        notes = _node_refusals(cfg, nodes[node_id])
        assert len(notes) == 1 and "listed as both surviving and dropped" in notes[0]


# ---- attacks 2-5: substituted keys, a repeated unmask, too few survivors, too many neighbours ---
def _substitute_unsigned(configs, target):
    pk1, _ = configs[target]
    configs[target] = [pk1, b"a public key of the server's choosing"]


def _substitute_foreign_signature(configs, target, msg):
    """Keys re-signed with a key that is not on the roster (for the right run, round and node)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    pk1 = public_key_to_bytes(generate_key_pairs()[1])
    pk2 = public_key_to_bytes(generate_key_pairs()[1])
    context = f"flower-run:{msg.metadata.run_id}/round:{msg.metadata.group_id}"
    configs[target] = [pk1, rosters.advertise(ec.generate_private_key(ec.SECP384R1()), context, int(target), pk1, pk2)]


def _substitute_first_key(configs, target):
    """The neighbour's genuine advertisement, with its mask key swapped for the server's."""
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    configs[target] = [public_key_to_bytes(generate_key_pairs()[1]), configs[target][1]]


@pytest.mark.parametrize("variant", ["unsigned", "foreign signer", "swapped mask key"])
def test_substituted_public_keys_are_refused(tmp_path, variant):
    def tamper(msg):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if _stage(msg) == Stage.SHARE_KEYS and msg.metadata.dst_node_id == VICTIM:
            target = str(VICTIM + 1)
            if variant == "unsigned":
                _substitute_unsigned(configs, target)
            elif variant == "foreign signer":
                _substitute_foreign_signature(configs, target, msg)
            else:
                _substitute_first_key(configs, target)
        return msg

    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, tamper=tamper)
    expected = {"unsigned": "no signed advertisement", "foreign signer": "not on the federation's roster",
                "swapped mask key": "signature does not verify"}[variant]
    assert expected in grid.refusals[VICTIM][0]
    assert expected in _node_refusals(cfg, nodes[VICTIM])[0]


def test_a_repeated_unmask_request_is_refused(tmp_path):
    first: dict[str, object] = {}

    def tamper(msg):
        if _stage(msg) == Stage.UNMASK and msg.metadata.dst_node_id == VICTIM:
            node = nodes_holder["nodes"][VICTIM]
            first["reply"] = node.handler(copy.deepcopy(msg), node.context)  # answered once...
        return msg  # ...then the same request again

    nodes_holder: dict[str, object] = {}
    cfg = _config(tmp_path, 5, 5, 3)
    updates = _updates(5)
    nodes = make_nodes(updates, make_secure_aggregation_mod(cfg))
    nodes_holder["nodes"] = nodes
    workflow = _workflow(FedprivSecAggPlusWorkflow, 5, 3, roster=federation_roster(cfg))
    run_round(workflow, nodes, [np.zeros_like(a) for a in updates[0]], tamper=tamper)
    assert not first["reply"].has_error()
    notes = _node_refusals(cfg, nodes[VICTIM])
    assert notes and "a second unmask request in one round" in notes[0]


def test_too_few_survivors_are_refused(tmp_path):
    def tamper(msg):
        if _stage(msg) == Stage.UNMASK:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            me = msg.metadata.dst_node_id
            others = [n for n in configs[Key.ACTIVE_NODE_ID_LIST] if n != me]
            configs[Key.ACTIVE_NODE_ID_LIST] = [me, *others[:1]]  # 2 survivors, threshold 3
            configs[Key.DEAD_NODE_ID_LIST] = list(configs[Key.DEAD_NODE_ID_LIST]) + others[1:]
        return msg

    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, tamper=tamper)
    assert strategy.aggregate is None and set(grid.refusals) == set(nodes)
    for node in nodes.values():
        assert "fewer than the threshold 3" in _node_refusals(cfg, node)[0]


def test_a_wrong_neighbour_count_is_refused(tmp_path):
    keys: dict[int, list[bytes]] = {}

    def observe(reply):
        if not reply.has_error() and RECORD_KEY_CONFIGS in reply.content.config_records:
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            if Key.PUBLIC_KEY_1 in record:
                keys[reply.metadata.src_node_id] = [record[Key.PUBLIC_KEY_1], record[Key.PUBLIC_KEY_2]]

    def tamper(msg):
        if _stage(msg) == Stage.SHARE_KEYS and msg.metadata.dst_node_id == VICTIM:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            extra = next(n for n in keys if str(n) not in configs)
            configs[str(extra)] = keys[extra]  # a genuine, signed neighbour too many
        return msg

    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, clients=5, shares=3, threshold=2,
                                                tamper=tamper, observe=observe)
    assert "named 4 neighbours for 3 shares" in _node_refusals(cfg, nodes[VICTIM])[0]


@pytest.mark.parametrize("setting, value, reason", [
    (None, None, "stock Flower generator"),
    (Key.THRESHOLD, 2, "not a strict majority"),
    (Key.SHARE_NUMBER, 2, "below the floor of 3"),
    (Key.MOD_RANGE, 3 * 2**30, "not a power of two"),
    (rosters.ROSTER_KEY, b"{}", "roster is malformed"),
])
def test_a_setup_below_the_nodes_floor_is_refused(tmp_path, setting, value, reason):
    def tamper(msg):
        if _stage(msg) == Stage.SETUP:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            if setting is None:
                del configs[secagg_masks.GENERATOR_KEY]  # a server running Flower's own generator
            else:
                configs[setting] = value
        return msg

    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, tamper=tamper)
    assert strategy.aggregate is None and set(grid.refusals) == set(nodes)
    assert all(reason in _node_refusals(cfg, node)[0] for node in nodes.values())


def test_a_setup_below_a_nodes_own_policy_minimum_is_refused(tmp_path):
    """A node whose policy asks for more shares than fedpriv's floor holds the server's actual setup
    message to it, whatever the run's configuration says."""
    cfg = _config(tmp_path, 5, 5, 3)
    updates = _updates(5)
    nodes = make_nodes(updates, make_secure_aggregation_mod(cfg))
    policy = tmp_path / "policy.toml"
    policy.write_text("[secure_aggregation]\nmin_shares = 7\n")
    for node in nodes.values():
        node.context.node_config["policy-path"] = str(policy)
    workflow = _workflow(FedprivSecAggPlusWorkflow, 5, 3, roster=federation_roster(cfg))
    strategy, grid = run_round(workflow, nodes, [np.zeros_like(a) for a in updates[0]])
    assert strategy.aggregate is None and set(grid.refusals) == set(nodes)
    assert all("below this node's policy minimum of 7" in _node_refusals(cfg, node)[0] for node in nodes.values())


def test_a_roster_signed_by_another_anchor_is_refused(tmp_path):
    foreign = rosters.sign_roster(Ed25519PrivateKey.generate(), [])

    def tamper(msg):
        if _stage(msg) == Stage.SETUP:
            msg.content.config_records[RECORD_KEY_CONFIGS][rosters.ROSTER_KEY] = foreign
        return msg

    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, tamper=tamper)
    assert all("does not verify against this node's trust anchor" in grid.refusals[n][0] for n in nodes)


def test_a_simulated_round_carries_the_roster_of_its_own_nodes_and_another_rounds_is_refused(tmp_path):
    """In a simulation the roster is signed for each round's nodes (so a round costs the same
    whatever the population): it names exactly the nodes set up, and a node given the anchor's
    roster of other nodes refuses."""
    from fedpriv.common import rundir

    sent = []

    def observe(msg):
        if _stage(msg) == Stage.SETUP:
            sent.append((msg.metadata.dst_node_id, msg.content.config_records[RECORD_KEY_CONFIGS][rosters.ROSTER_KEY]))
        return msg

    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, tamper=observe)
    assert strategy.aggregate is not None and not grid.refusals
    root = rundir.nodes_root(cfg)
    anchor = rosters.load_trust_anchor(root / rosters.SIM_ANCHOR_PUB)
    expected = {rosters.public_key_text(rosters.simulated_node_key(
        root / rosters.SIM_NODE_SECRET, rosters.simulated_key_name(n)).public_key()) for n in nodes}
    assert {n for n, _ in sent} == set(nodes) and len({blob for _, blob in sent}) == 1
    assert rosters.open_roster(sent[0][1], anchor).nodes == expected

    others = federation_roster(cfg)([n + 100 for n in nodes])  # the same anchor, other nodes

    def swap(msg):
        if _stage(msg) == Stage.SETUP:
            msg.content.config_records[RECORD_KEY_CONFIGS][rosters.ROSTER_KEY] = others
        return msg

    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, tamper=swap)
    assert strategy.aggregate is None
    assert all("own key is not on the roster" in grid.refusals[n][0] for n in nodes)


# ---- end to end: the fedpriv ServerApp deviating, in a simulation --------------------------
@pytest.mark.slow
def test_a_deviating_fedpriv_server_gets_refused_and_the_round_fails_cleanly_in_the_ledgers(tmp_path):
    """``fedpriv``'s own ServerApp, patched in its process to list one node as surviving and
    dropped (tests/secagg_harness.py --deviate), against simulated fedpriv nodes: every neighbour
    refuses, the round fails, the model is untouched, and each refusal is in the run's ledger and
    in the refusing node's."""
    import json

    from tests.conftest import run_harness

    small = ["run.rounds=1", "federation.num_clients=5", "federation.min_available_clients=5",
             "client.batch_size=64", "secure_aggregation.num_shares=5",
             "secure_aggregation.reconstruction_threshold=3"]
    proc = run_harness("secagg_harness", "--deviate", str(tmp_path), *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    report = verify_ledger(run)
    assert report.ok, report.failures
    refusals = [e for e in report.entries if e["kind"] == "refusal"]
    assert len(refusals) == 4  # every neighbour of the victim
    assert all("listed as both surviving and dropped" in e["note"] for e in refusals)
    failed = [e for e in report.entries if e["kind"] == "round_failed"]
    assert [e["round"] for e in failed] == [1]
    assert summary["privacy"]["failed_rounds"][0]["round"] == 1
    assert summary["secure_aggregation"]["mask_generator"] == secagg_masks.GENERATOR
    # The global model is the initial one: nothing was unmasked.
    view = np.load(tmp_path / "server-view.npz")
    final = np.concatenate([a.ravel() for a in run_model(run)]).astype(np.float64)
    assert np.array_equal(final, view["global"].astype(np.float64))
    # Each refusing node recorded it in its own ledger before replying.
    from fedpriv.clients.budget import NODE_KEY
    from fedpriv.common.ledger import load_or_create_signing_key

    noted = 0
    for node_dir in sorted((run / "nodes").glob("sim-*")):
        if not (node_dir / "ledger.jsonl").exists():  # (no DP-SGD here: only refusals are recorded)
            continue
        node_report = verify_ledger(node_dir, load_or_create_signing_key(node_dir / NODE_KEY).public_key())
        assert node_report.ok, node_report.failures
        noted += sum("listed as both surviving and dropped" in e.get("note", "")
                     for e in node_report.entries if e["kind"] == "secagg_refusal")
    assert noted == 4


def test_after_a_refused_setup_the_round_goes_no_further(tmp_path):
    """A server that carries on with a node that refused its setup gets refusals, not shares."""
    def tamper(msg):
        if _stage(msg) == Stage.SETUP and msg.metadata.dst_node_id == VICTIM:
            del msg.content.config_records[RECORD_KEY_CONFIGS][secagg_masks.GENERATOR_KEY]
        return msg

    cfg, nodes, strategy, grid = _fedpriv_round(tmp_path, tamper=tamper)
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message_type import MessageType

    from tests.conftest import task_identity
    from tests.secagg_protocol import RUN_ID

    assert "stock Flower generator" in grid.refusals[VICTIM][0]
    victim = nodes[VICTIM]
    for stage in (Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
        with task_identity(run_id=RUN_ID, node_id=1):
            msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})}),
                          dst_node_id=VICTIM, message_type=MessageType.TRAIN, group_id="1")
        msg.metadata.__dict__["_message_id"] = "m"
        reply = victim.handler(msg, victim.context)
        assert reply.has_error(), stage
        assert "out of order" in reply.error.reason or "before this node sent" in reply.error.reason, reply.error.reason
