"""Data: real bundled tables, deterministic splits, train-only statistics, CSV errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trainer.config import ConfigError, CsvDataConfig, SeedDataConfig, TabularDataConfig
from trainer.data import DataError, load_dataset


def test_diabetes_split_is_deterministic_disjoint_and_complete():
    a = load_dataset(TabularDataConfig(kind="diabetes"), seed=0)
    b = load_dataset(TabularDataConfig(kind="diabetes"), seed=0)
    c = load_dataset(TabularDataConfig(kind="diabetes"), seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)
    sizes = (len(a.x_train), len(a.x_val), len(a.x_test))
    assert sum(sizes) == 442 and sizes == (310, 66, 66)
    assert a.task == "regression" and a.in_features == 10 and a.out_features == 1
    rows = np.concatenate([a.x_train, a.x_val, a.x_test])
    assert len(np.unique(rows, axis=0)) == 442  # no row in two splits


def test_standardisation_uses_training_rows_only():
    d = load_dataset(TabularDataConfig(kind="diabetes"), seed=0)
    np.testing.assert_allclose(d.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std(0), 1, atol=1e-4)
    assert np.abs(d.x_val.mean(0)).max() > 1e-3  # val statistics were not used
    np.testing.assert_allclose(d.y_train.mean(), 0, atol=1e-5)
    # targets come back in their original units
    from sklearn.datasets import load_diabetes

    original = set(np.round(load_diabetes().target, 3))
    back = np.round(d.to_original_units(d.y_test).ravel(), 3)
    assert set(back) <= original


def test_digits_is_stratified_classification():
    d = load_dataset(TabularDataConfig(kind="digits"), seed=0)
    assert d.task == "classification" and d.out_features == 10 and d.in_features == 64
    assert d.y_train.dtype == np.int32 and set(np.unique(d.y_test)) == set(range(10))
    assert np.isfinite(d.x_train).all()  # constant pixel columns did not divide by zero


def test_seed_problem_is_the_notebooks_draws():
    import jax

    d = load_dataset(SeedDataConfig(standardize=False), seed=0)
    np.testing.assert_array_equal(d.x_train[0], jax.random.normal(jax.random.PRNGKey(1), (100,)))
    y = float(jax.random.normal(jax.random.PRNGKey(2), ()))
    np.testing.assert_array_equal(d.y_train, np.full((1, 100), y, np.float32))


def csv_cfg(path, **kw) -> CsvDataConfig:
    return dataclasses.replace(CsvDataConfig(path=str(path), target=["y"]), **kw)


def write(tmp_path, text, name="table.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def table(n=40, bad_row=None, bad_value="oops"):
    lines = ["a,b,y"]
    for i in range(n):
        lines.append(f"{i},{(i * 7) % 5},{i * 0.5}")
    if bad_row is not None:
        a, b, y = lines[bad_row + 1].split(",")
        lines[bad_row + 1] = f"{a},{bad_value},{y}"
    return "\n".join(lines) + "\n"


def test_csv_regression_loads(tmp_path):
    d = load_dataset(csv_cfg(write(tmp_path, table())), seed=0)
    assert d.feature_names == ("a", "b") and d.target_names == ("y",)
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 40


def test_csv_classification_with_string_labels(tmp_path):
    text = "f1,f2,label\n" + "".join(f"{i},{i % 3},{'cat' if i % 2 else 'dog'}\n"
                                     for i in range(30))
    d = load_dataset(csv_cfg(write(tmp_path, text), target=["label"], task="classification"),
                     seed=0)
    assert d.class_names == ("cat", "dog") and d.out_features == 2


@pytest.mark.parametrize("content,cfg_kw,message", [
    (None, {}, "no such file"),
    ("", {}, "the file is empty"),
    ("a,b,y\n", {}, "no data rows"),
    (table(), {"target": ["z"]}, "no column 'z'; the columns are ['a', 'b', 'y']"),
    (table(), {"features": ["a", "q"]}, "no column 'q'"),
    (table(bad_row=4), {}, "non-numeric value 'oops' in column 'b' at line 6"),
    (table(bad_row=0, bad_value=""), {}, "missing value in column 'b' at line 2"),
    ("a,b,y\n1,2,3\n4,5,6,7\n", {}, "not a readable CSV table"),
    (table(n=3), {}, "too few"),
])
def test_csv_errors_name_file_column_and_line(tmp_path, content, cfg_kw, message):
    path = tmp_path / "missing.csv" if content is None else write(tmp_path, content)
    with pytest.raises(DataError) as err:
        load_dataset(csv_cfg(path, **cfg_kw), seed=0)
    assert message in str(err.value)
    assert str(path) in str(err.value) or "data.target" in message or "too few" in message


def test_a_csv_config_without_a_target_is_refused_when_built(tmp_path):
    """The schema checks itself: no table is read for a config that cannot run."""
    with pytest.raises(ConfigError, match=r"data=csv needs .*data.target=\[COL\]"):
        csv_cfg(write(tmp_path, table()), target=[])


def test_csv_auto_task_takes_text_labels_as_classes(tmp_path):
    text = "f1,f2,species\n" + "".join(f"{i},{i % 3},{['a', 'b', 'c'][i % 3]}\n"
                                       for i in range(30))
    d = load_dataset(csv_cfg(write(tmp_path, text), target=["species"]), seed=0)
    assert d.task == "classification" and d.class_names == ("a", "b", "c")


def test_csv_refuses_a_continuous_column_as_classes(tmp_path):
    """Classification on a column of decimals stops before training, naming the fix."""
    with pytest.raises(DataError, match="too many to be classes.*data.task=regression"):
        load_dataset(csv_cfg(write(tmp_path, table()), task="classification"), seed=0)


def test_csv_text_in_a_regression_target_suggests_classification(tmp_path):
    text = "a,y\n" + "".join(f"{i},{'x' if i == 3 else i}\n" for i in range(20))
    with pytest.raises(DataError, match="line 5.*data.task=classification"):
        load_dataset(csv_cfg(write(tmp_path, text), task="regression"), seed=0)


def test_csv_with_another_delimiter_says_so(tmp_path):
    with pytest.raises(DataError, match="another delimiter"):
        load_dataset(csv_cfg(write(tmp_path, table().replace(",", ";"))), seed=0)
