import numpy as np
import pytest

from fedpriv.common.config import DataSection
from fedpriv.common.errors import DataError
from fedpriv.common.partition import dirichlet, iid, partition, pathological

LABELS = np.repeat(np.arange(10), 100)  # 1,000 examples, 10 balanced classes
RNG_LABELS = np.random.default_rng(0).permutation(LABELS)


def _check_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n, "partition sizes must add up to the dataset size"
    assert len(np.unique(joined)) == n, "no example may be given to two clients"


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_sizes_add_up_and_are_disjoint(scheme):
    parts = partition(RNG_LABELS, 7, DataSection(partitioning=scheme, alpha=0.5, classes_per_client=3), seed=1)
    assert len(parts) == 7
    if scheme == "pathological":
        # 7 clients x 3 classes cover all 10 classes, so every example is used
        _check_disjoint_cover(parts, len(LABELS))
    else:
        _check_disjoint_cover(parts, len(LABELS))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_deterministic_by_seed(scheme):
    data = DataSection(partitioning=scheme, alpha=0.3, classes_per_client=2)
    a = partition(RNG_LABELS, 5, data, seed=11)
    b = partition(RNG_LABELS, 5, data, seed=11)
    c = partition(RNG_LABELS, 5, data, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _label_share_of_top_class(parts):
    return np.mean([np.bincount(RNG_LABELS[p], minlength=10).max() / len(p) for p in parts])


def test_iid_is_balanced():
    parts = iid(len(LABELS), 10, seed=3)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert _label_share_of_top_class(parts) < 0.25  # ~0.1 expected plus sampling noise


def test_dirichlet_small_alpha_is_really_skewed():
    skewed = dirichlet(RNG_LABELS, 10, alpha=0.05, seed=5)
    mild = dirichlet(RNG_LABELS, 10, alpha=100.0, seed=5)
    # With alpha=0.05 most of a client's data comes from one class; with alpha=100 it is near 10%.
    assert _label_share_of_top_class(skewed) > 0.6
    assert _label_share_of_top_class(mild) < 0.25
    # and the number of classes a client really holds (>5% of its data) is small
    classes_held = [np.sum(np.bincount(RNG_LABELS[p], minlength=10) / len(p) > 0.05) for p in skewed]
    assert np.mean(classes_held) < 3


def test_pathological_gives_exactly_k_classes():
    parts = pathological(RNG_LABELS, 10, classes_per_client=2, seed=9)
    assert all(len(np.unique(RNG_LABELS[p])) == 2 for p in parts)


def test_too_many_clients_is_a_clear_error():
    with pytest.raises(DataError, match="only 1000 training examples"):
        partition(RNG_LABELS, 5000, DataSection(), seed=0)
    with pytest.raises(DataError, match="exceeds the 10 classes"):
        pathological(RNG_LABELS, 4, classes_per_client=11, seed=0)
