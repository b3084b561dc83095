"""Split training data across clients: IID, Dirichlet label skew, pathological k-class.

Partitions are lists of index arrays into the training set (never copies of the data), and are a
pure function of the labels, the client count, the settings and the seed.

These are small numpy versions of the schemes flwr-datasets offers (``IidPartitioner``,
``DirichletPartitioner``, ``PathologicalPartitioner``). flwr-datasets works on Hugging Face
``datasets`` tables; fedpriv's data are plain arrays, so depending on it would pull in pyarrow and
the Hugging Face stack for three short functions.
"""

from __future__ import annotations

import numpy as np

from fedpriv.common.config import DataSection
from fedpriv.common.errors import DataError

DIRICHLET_MAX_TRIES = 100


def partition(labels: np.ndarray, num_clients: int, data: DataSection, seed: int) -> list[np.ndarray]:
    """Dispatch on ``data.partitioning``."""
    if num_clients > len(labels):
        raise DataError(
            f"{num_clients} clients but only {len(labels)} training examples: every client "
            "needs at least one"
        )
    if data.partitioning == "iid":
        return iid(len(labels), num_clients, seed)
    if data.partitioning == "dirichlet":
        return dirichlet(labels, num_clients, data.alpha, seed)
    return pathological(labels, num_clients, data.classes_per_client, seed)


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle, then cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """For each class, share its examples across clients in Dirichlet(alpha) proportions.

    Draws again (up to ``DIRICHLET_MAX_TRIES``) until every client has ``min_size`` examples.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise DataError(
        f"Dirichlet partitioning with alpha={alpha} left a client with fewer than {min_size} "
        f"examples in {DIRICHLET_MAX_TRIES} draws; raise data.alpha or use fewer clients"
    )


def pathological(
    labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes.

    Classes are dealt to clients round-robin over a seeded class order, then each class's
    examples are split evenly among the clients that hold it.
    """
    classes = np.unique(labels)
    if classes_per_client > len(classes):
        raise DataError(
            f"data.classes_per_client ({classes_per_client}) exceeds the {len(classes)} classes "
            "in the data"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(classes_per_client):
            owners[int(order[(client * classes_per_client + j) % len(order)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label, holders in owners.items():
        if not holders:
            continue
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < len(holders):
            raise DataError(
                f"class {label} has {len(members)} examples for {len(holders)} clients; "
                "use fewer clients or more classes per client"
            )
        for client, chunk in zip(holders, np.array_split(members, len(holders))):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]
