"""Fuzzing config parsing and data loading (hypothesis): whatever a user hands fedpriv, it either
works or fails with fedpriv's one-line error (a FedprivError, which every command prints as one
``error:`` line and exits 2): never another exception, which would be a traceback, and never a
hang (each example has a deadline). At least 500 examples per target; derandomized, so a failure
reproduces."""

from __future__ import annotations

import io
import itertools
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedpriv.common.config import DataSection, RunConfig, ConfigError, load_config, read_toml, toml_value
from fedpriv.common.data import load_dataset, load_node_data
from fedpriv.common.errors import FedprivError

EXAMPLES = 500
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
COUNTER = itertools.count()

# ---- configs ----------------------------------------------------------------------------------
DEFAULTS = RunConfig().to_dict()
SECTIONS = sorted(DEFAULTS)
KEYS = sorted(f"{s}.{k}" for s, keys in DEFAULTS.items() for k in keys)
names = st.one_of(st.sampled_from(SECTIONS), st.text(max_size=12))
scalars = st.one_of(
    st.booleans(), st.integers(min_value=-10**20, max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["fedavg", "fedadam", "central", "distributed", "auto", "cnn", "mlp", "builtin", "file",
                     "iid", "dirichlet", "crash", "nan,inf", "0,1", "1e-5", "-1", "0"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=5)


def _literal(value) -> str:
    """``value`` as a TOML literal (lists and inline tables included)."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {_literal(v)}" for k, v in value.items()) + "}"
    return toml_value(value)


@st.composite
def toml_documents(draw) -> bytes:
    """Mostly well-formed TOML over real and made-up sections and keys; some raw text or bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    lines = []
    for section in draw(st.lists(names, max_size=4, unique=True)):
        if draw(st.booleans()) and section in DEFAULTS:
            keys = st.one_of(st.sampled_from(sorted(DEFAULTS[section])), st.text(max_size=10))
        else:
            keys = st.text(max_size=10)
        lines.append(f"[{toml_value(section)}]")
        for key in draw(st.lists(keys, max_size=5, unique=True)):
            lines.append(f"{toml_value(key)} = {_literal(draw(values))}")
    if kind == 2 and lines:  # a damaged document
        cut = draw(st.integers(0, len(lines) - 1))
        lines[cut] = lines[cut][: draw(st.integers(0, len(lines[cut])))]
    return "\n".join(lines).encode()


@FUZZ
@given(document=toml_documents())
def test_config_files_work_or_fail_with_one_clear_error(tmp_path_factory, document):
    path = tmp_path_factory.getbasetemp() / f"fuzz-{next(COUNTER)}.toml"
    path.write_bytes(document)
    try:
        cfg = load_config([read_toml(path)])
    except FedprivError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
        event("refused")
        return
    event("loaded")
    assert isinstance(cfg, RunConfig)
    cfg.validate()  # what loads is valid


overrides = st.one_of(
    st.text(max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=20)),
    st.builds(lambda k, v: f"{k}={_literal(v)}", st.sampled_from(KEYS), values),
)


@FUZZ
@given(sets=st.lists(overrides, max_size=4))
def test_set_overrides_work_or_fail_with_one_clear_error(sets):
    try:
        cfg = load_config(overrides=sets)
    except ConfigError as exc:
        assert str(exc), repr(exc)
        event("refused")
        return
    event("loaded")
    cfg.validate()


# ---- data files -------------------------------------------------------------------------------
dtypes = st.sampled_from(["float32", "float64", "int64", "uint8", "int8", "bool", "complex64", "U3", "float16"])
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)


@st.composite
def arrays(draw):
    dtype, shape = draw(dtypes), draw(shapes)
    size = int(np.prod(shape)) if shape else 1
    if dtype == "U3":
        return np.array(draw(st.lists(st.text(max_size=3), min_size=size, max_size=size)), dtype="U3").reshape(shape)
    raw = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=size, max_size=size))
    with np.errstate(all="ignore"):
        return np.array(raw, dtype=np.float64).astype(dtype).reshape(shape)


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return ".npz", draw(st.binary(max_size=300))
    if kind == 1:
        return ".csv", draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if kind == 2:  # CSV with a label column
        rows = draw(st.lists(st.lists(st.one_of(st.floats(), st.text(max_size=3)), min_size=1, max_size=4),
                             max_size=8))
        text = "label,a,b\n" + "\n".join(",".join(str(c) for c in row) for row in rows)
        return ".csv", text.encode()
    buffer = io.BytesIO()
    names = draw(st.lists(st.sampled_from(["x", "y", "z"]), min_size=0, max_size=3, unique=True))
    content = {name: draw(arrays()) for name in names}
    if kind >= 6:  # plausible images: n x 28 x 28 (x 1), labels of some kind
        n = draw(st.integers(0, 6))
        x = draw(st.sampled_from([np.zeros((n, 28, 28)), np.ones((n, 28, 28, 1), np.float32),
                                  np.full((n, 28, 28, 1), 255, np.uint8), np.full((n, 8, 8, 1), np.nan)]))
        y = np.array(draw(st.lists(st.integers(-3, 12), min_size=max(n - 1, 0), max_size=n + 1)))
        content = {"x": x, "y": y}
    np.savez(buffer, **content)
    data = buffer.getvalue()
    if kind == 5:  # truncated
        data = data[: draw(st.integers(0, len(data)))]
    return ".npz", data


@FUZZ
@given(file=data_files())
def test_data_files_load_or_fail_with_one_clear_error(tmp_path_factory, file):
    suffix, data = file
    path = tmp_path_factory.getbasetemp() / f"fuzz-{next(COUNTER)}{suffix}"
    path.write_bytes(data)
    # A node's own file, checked against the federation's model (fedpriv node join)...
    try:
        x, y = load_node_data(str(path), (28, 28, 1), 10)
    except FedprivError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
        event("node file refused")
    else:
        event("node file loaded")
        assert x.shape[1:] == (28, 28, 1) and np.all(np.isfinite(x)) and 0 <= y.min() and y.max() < 10
    # ...and a dataset file a simulation is configured with (data.dataset = "file").
    try:
        dataset = load_dataset(DataSection(dataset="file", path=str(path)), seed=0)
    except FedprivError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
        event("dataset refused")
    else:
        event("dataset loaded")
        assert len(dataset.y_train) + len(dataset.y_test) >= 4 and np.all(np.isfinite(dataset.x_train))


def test_the_fuzzers_reach_both_outcomes(tmp_path):
    """The generators are not all-failure: a valid config and a valid data file load."""
    path = tmp_path / "ok.toml"
    path.write_text('[dp]\nnoise_multiplier = 1.5\n[federation]\nnum_clients = 4\nmin_available_clients = 4\n')
    assert load_config([read_toml(path)]).dp.noise_multiplier == 1.5
    data = tmp_path / "ok.npz"
    np.savez(data, x=np.ones((5, 28, 28, 1), np.float32), y=np.arange(5))
    assert load_node_data(str(data), (28, 28, 1), 10)[0].shape == (5, 28, 28, 1)
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(FedprivError, match="must hold arrays 'x' and 'y'"):
        load_node_data(str(tmp_path / "empty.npz"), (28, 28, 1), 10)
    assert isinstance(Path(data), Path)
