"""Data: real bundled tables, deterministic splits, train-only statistics, CSV errors."""

from __future__ import annotations

import contextlib
import dataclasses
import os

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
    ("a,b,y\n1,2,3\n4,5,6,7\n", {}, "line 3 has 4 fields, the header 3"),
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


# --- issue 14: wrong results without a word, malformed files -----------------------------------

def test_issue14_item6_a_repeated_column_name_is_refused_naming_it(tmp_path):
    """``y,a,y``: pandas renamed the second ``y`` to ``y.1`` and trained on it as a feature
    (baseline RMSE 0.0000, R² 1.0000); now the header is refused, naming the name and where."""
    rows = "".join(f"{i * 0.5},{i % 7},{i * 0.5}\n" for i in range(40))
    path = write(tmp_path, "y,a,y\n" + rows)
    with pytest.raises(DataError) as err:
        load_dataset(csv_cfg(path), seed=0)
    assert str(path) in str(err.value)
    assert "names a column more than once ('y' at columns [1, 3])" in str(err.value)
    assert "give each column its own name" in str(err.value)


def test_issue14_item6_rows_one_field_longer_than_the_header_are_refused(tmp_path):
    """Every data row one field longer than the header: pandas took the first column as
    the index and shifted every name one column to the right (``y`` held the last field)."""
    path = write(tmp_path, "a,b,y\n" + "".join(f"{i},{i % 5},{i * 0.5},{i}\n" for i in range(40)))
    with pytest.raises(DataError, match="line 2 has 4 fields, the header 3"):
        load_dataset(csv_cfg(path), seed=0)


def numbers(n=40, a=lambda i: i, y=lambda i: i * 0.5) -> str:
    return "a,b,y\n" + "".join(f"{a(i)},{i % 5},{y(i)}\n" for i in range(n))


@pytest.mark.parametrize("text,column,line,value", [
    # the std overflowed, the column was zeroed with a RuntimeWarning only
    (numbers(a=lambda i: f"{(i + 1) * 1e200:g}"), "a", 2, "'1e+200'"),
    (numbers(a=lambda i: "1e300" if i == 7 else i), "a", 9, "'1e300'"),
    # "Input contains NaN" from the baseline's LinearRegression
    (numbers(y=lambda i: f"{(i + 1) * 1e300:g}"), "y", 2, "'1e+300'"),
    # an error that blamed the learning rate
    (numbers(a=lambda i: "1e308" if i % 2 else "-1e308"), "a", 2, "'-1e308'"),
    (numbers(a=lambda i: "-4e38" if i == 30 else i), "a", 32, "'-4e38'"),
])
def test_issue14_item8_values_beyond_float32_are_refused(tmp_path, text, column, line, value):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as err:
        load_dataset(csv_cfg(path), seed=0)
    message = str(err.value)
    assert f"value {value} beyond the float32 range" in message, message
    assert f"in column {column!r} at line {line}" in message and str(path) in message
    assert "rescale the column" in message and "\n" not in message


def test_issue14_item8_large_values_within_float32_train_standardised(tmp_path):
    """The limit is float32's: a column of values up to 4e37 loads with finite statistics
    and keeps its information (standardised to unit variance, not zeroed)."""
    d = load_dataset(csv_cfg(write(tmp_path, numbers(a=lambda i: f"{(i + 1) * 1e36:g}"))),
                     seed=0)
    np.testing.assert_allclose(d.x_train.std(0), 1, atol=1e-4)
    assert np.isfinite(d.feature_std).all() and d.feature_std[0] > 1e36
    # the column still orders the rows as in the file: it is y's exact linear function
    raw = d.raw_features(d.x_train)[:, 0]
    np.testing.assert_allclose(d.to_original_units(d.y_train).ravel(),
                               (raw / 1e36 - 1) * 0.5, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad,what", [
    ("NaN", "missing value 'NaN' (not a number)"),
    ("hello", "non-numeric value 'hello'"),
    ("n/a", "non-numeric value 'n/a'"),
])
def test_issue14_item9_a_bad_cell_in_a_numeric_target_is_named(tmp_path, bad, what):
    """One bad cell made ``data.task=auto`` take the numbers for 120 class labels and stop
    with "too many to be classes"; now the cell is named (line and value)."""
    path = write(tmp_path, numbers(n=120, y=lambda i: bad if i == 5 else i * 0.5))
    with pytest.raises(DataError) as err:
        load_dataset(csv_cfg(path), seed=0)
    message = str(err.value)
    assert f"{what} in column 'y' at line 7" in message, message
    assert "1 such row(s)" in message and "too many to be classes" not in message


@pytest.mark.parametrize("bad,what", [
    ("NaN", "missing value 'NaN' (not a number)"),
    ("hello", "non-numeric value 'hello'"),
    ("inf", "infinite value 'inf'"),
])
def test_issue14_item9_a_bad_cell_in_a_feature_is_named(tmp_path, bad, what):
    path = write(tmp_path, numbers(a=lambda i: bad if i == 5 else i))
    with pytest.raises(DataError) as err:
        load_dataset(csv_cfg(path), seed=0)
    assert f"{what} in column 'a' at line 7" in str(err.value)
    assert "leave the column out with data.features" in str(err.value)


def test_issue14_item9_text_labels_among_numbers_are_classes_when_asked(tmp_path):
    """Numbers with a text label are a regression target with a bad cell under
    ``data.task=auto``; ``data.task=classification`` (the fix the message names) takes
    them as classes."""
    labels = ["1", "2", "n/a"]
    path = write(tmp_path, numbers(n=60, y=lambda i: labels[i % 3]))
    with pytest.raises(DataError, match="non-numeric value 'n/a'.*data.task=classification"):
        load_dataset(csv_cfg(path), seed=0)
    d = load_dataset(csv_cfg(path, task="classification"), seed=0)
    assert d.task == "classification" and d.class_names == ("1", "2", "n/a")


@contextlib.contextmanager
def unprivileged():
    """As root (tests may run so), act as ``nobody`` for file permissions: root reads a
    chmod 000 file. The real uid stays 0, so the effective one comes back."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def _folder(tmp_path):
    (tmp_path / "tables.csv").mkdir()
    return tmp_path / "tables.csv"


def _unreadable(tmp_path):
    path = write(tmp_path, numbers())
    path.chmod(0)
    return path


def _latin1(tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes(numbers().replace("a,b,y", "a,b,größe").encode("latin-1"))
    return path


MALFORMED = {  # case: (file maker or text, target, what the one line says)
    "empty": ("", "y", "the file is empty"),
    "blank-lines-only": ("\n\n\n", "y", "the file is empty"),
    "header-only": ("a,b,y\n", "y", "the file has a header but no data rows"),
    "header-only-no-newline": ("a,b,y", "y", "the file has a header but no data rows"),
    "row-too-long": (numbers().replace("\n3,", "\n3,9,", 1), "y",
                     "line 5 has 4 fields, the header 3; give every row as many fields"),
    "rows-all-longer": ("a,b,y\n" + "".join(f"{i},{i},{i},{i}\n" for i in range(40)), "y",
                        "line 2 has 4 fields, the header 3"),
    "row-too-short": (numbers() + "1,2\n", "y", "missing value in column 'y' at line 42"),
    "not-utf8": (_latin1, "größe", "not UTF-8 text (byte 0xf6 at line 1); save the table as "
                                   "a UTF-8 CSV file"),
    "target-missing": (numbers(), "z", "no column 'z'; the columns are ['a', 'b', 'y']"),
    "folder": (_folder, "y", "is a folder, not a file (set data.path to the CSV file"),
    "unreadable": (_unreadable, "y", "cannot read the file (Permission denied); make it "
                                     "readable"),
    "too-many-columns": (",".join(f"c{i}" for i in range(10_001)) + ",y\n"
                         + ("1," * 10_001 + "2\n") * 3, "y",
                         "10002 columns, more than the 10000 a table may have"),
    "unnamed-column": (",a,y\n" + "".join(f"{i},{i % 5},{i}\n" for i in range(40)), "y",
                       "column(s) [1] (counting from 1) have no name in the header"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_issue14_malformed_csv_is_one_data_error(tmp_path, case):
    """Each malformed table: one DataError line naming the file and the fix, no other
    exception (a traceback in the CLI), no silent load."""
    content, target, expected = MALFORMED[case]
    path = content(tmp_path) if callable(content) else write(tmp_path, content)
    as_user = unprivileged() if case == "unreadable" else contextlib.nullcontext()
    with pytest.raises(DataError) as err, as_user:
        load_dataset(csv_cfg(path, target=[target]), seed=0)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message and len(message) < 400, message


@pytest.mark.slow
@pytest.mark.parametrize("text", [
    "y,a,y\n" + "".join(f"{i * 0.5},{i % 7},{i * 0.5}\n" for i in range(40)),
    "a,b,y\n" + "".join(f"{i},{i % 5},{i * 0.5},{i}\n" for i in range(40)),
], ids=["repeated-name", "rows-longer-than-header"])
def test_issue14_malformed_csv_stops_the_cli_before_any_run(run_cli, tmp_path, text):
    """End to end: both used to train and exit 0 on shifted or leaked columns. Now exit 2,
    one data error naming the file, no traceback, no store."""
    (tmp_path / "table.csv").write_text(text)
    proc = run_cli("+experiment=smoke", "data=csv", "data.path=table.csv", "data.target=[y]")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "Error executing job" not in err, err
    assert "data error:" in err and "table.csv" in err, err
    assert not (tmp_path / "mlruns").exists()
    assert not list(tmp_path.rglob("mlflow.db"))
