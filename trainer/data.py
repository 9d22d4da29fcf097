"""Datasets: the notebook's seed problem, scikit-learn's bundled tables, the user's CSV.

Every loader returns a ``Dataset`` of NumPy arrays split into train, validation
and test rows. The split is deterministic in the seed (scikit-learn's
``train_test_split``, stratified for classification); features, and regression
targets, are standardised with statistics of the training rows only. No network
is used: the scikit-learn tables ship inside the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DataError", "load_dataset", "load_member_datasets", "DATA_KINDS"]

DATA_KINDS = ("seed", "diabetes", "digits", "csv")
MAX_CLASSES = 1000        # more distinct labels than this cannot be classes of a small table
MAX_CLASSES_SHARE = 0.5   # nor more than one class per two rows
MAX_COLUMNS = 10_000      # columns of a CSV (digits has 64 features, MNIST 784)
# The network, its inputs and targets are float32: a value beyond this has no float32
# value (with data.standardize=false it would be cast to inf) and its square overflows the
# float64 statistics near 1e154 (a column of 1e200 had its std overflow and was zeroed).
FLOAT32_MAX = float(np.finfo(np.float32).max)  # ~3.4e38


class DataError(ValueError):
    """A data file or data setting that cannot be used; the message names file, column, row."""


@dataclass(frozen=True)
class Dataset:
    """A split, standardised table.

    Attributes:
      name: dataset name, e.g. ``"diabetes"``.
      task: ``"regression"`` or ``"classification"``.
      x_train, x_val, x_test: ``(N_split, D)`` float32 features.
      y_train, y_val, y_test: ``(N_split, T)`` float32 (standardised) targets for
        regression; ``(N_split,)`` int32 labels in ``[0, num_classes)`` for classification.
      feature_names: D names. target_names: T names (regression) or one name.
      class_names: the label of each class (classification), else empty.
      target_mean, target_std: ``(T,)`` float64; original target = y * std + mean.
      feature_mean, feature_std: ``(D,)`` float64 fitted on the training split;
        standardised x = (raw x - mean) / std (None: not standardised).
      source: where the rows came from (a scikit-learn loader, a CSV path and its
        SHA-256, or the seed problem's keys), for the record.
      baseline: the linear baseline's test metrics (``evaluate.linear_baseline``) when
        known at load (``data_cache``), else None.
    """

    name: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    target_mean: np.ndarray | None = None
    target_std: np.ndarray | None = None
    baseline: dict[str, float] | None = None
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    source: str = ""

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def out_features(self) -> int:
        """Model output size: number of classes, or of target columns."""
        return len(self.class_names) if self.task == "classification" else self.y_train.shape[1]

    def raw_features(self, x: np.ndarray) -> np.ndarray:
        """Undo the feature standardisation: ``(N, D)`` -> ``(N, D)`` float64 in the
        data's own units (what a served model takes)."""
        x = np.asarray(x, np.float64)
        if self.feature_mean is None:
            return x
        return x * self.feature_std + self.feature_mean

    def to_original_units(self, y: np.ndarray) -> np.ndarray:
        """Undo the target standardisation: ``(N, T)`` -> ``(N, T)`` float64."""
        y = np.asarray(y, np.float64)
        if self.target_mean is None:
            return y
        return y * self.target_std + self.target_mean


def load_dataset(data, *, seed: int) -> Dataset:
    """Load and split the dataset that ``data`` (a kind's ``config.*DataConfig``) names.

    Args:
      data: needs ``kind``, ``val_fraction``, ``test_fraction``, ``standardize``
        and, by kind: csv ``path``, ``target``, ``features``, ``task``; seed
        ``seed_width``, ``seed_x_key``, ``seed_y_key``.
      seed: the run's seed; decides the split.

    Raises:
      DataError: missing, unreadable or malformed file (not UTF-8, empty, rows longer
        than the header, columns without a name, a name given twice, more than
        ``MAX_COLUMNS`` columns), unknown column, a missing, non-numeric or out-of-range
        value (beyond float32's ±3.4e38; naming the file, column, line and value), or too
        few rows to split.
    """
    if data.kind == "seed":
        return _seed_problem(data)
    if data.kind in ("diabetes", "digits"):
        from sklearn import datasets

        bunch = datasets.load_diabetes() if data.kind == "diabetes" else datasets.load_digits()
        task = "regression" if data.kind == "diabetes" else "classification"
        x = np.asarray(bunch.data, np.float64)
        y = np.asarray(bunch.target)
        y = y.reshape(-1, 1).astype(np.float64) if task == "regression" else y.astype(np.int64)
        target_names = ("progression",) if task == "regression" else ("digit",)
        classes = tuple(str(c) for c in range(10)) if task == "classification" else ()
        from importlib import metadata

        source = (f"sklearn.datasets.load_{data.kind} (scikit-learn "
                  f"{metadata.version('scikit-learn')})")
        return _split(data.kind, task, x, y, tuple(map(str, bunch.feature_names)),
                      target_names, classes, data, seed, source=source)
    if data.kind == "csv":
        return _load_csv(data, seed)
    raise DataError(f"unknown data kind {data.kind!r}; choose one of {', '.join(DATA_KINDS)}")


def load_member_datasets(configs: list, launch_dir: Path) -> list[Dataset]:
    """Each member's split (``load_dataset``, through ``data_cache`` unless
    ``data.cache=false``), loaded once per seed (the split depends on the seed only); a
    relative ``data.path`` is taken from ``launch_dir``.

    Args:
      configs: the members' ``config.Config``.

    Raises:
      DataError: as ``load_dataset``.
    """
    import dataclasses

    by_seed: dict[int, Dataset] = {}
    for cfg in configs:
        data = cfg.data
        if data.kind == "csv" and data.path and not Path(data.path).expanduser().is_absolute():
            data = dataclasses.replace(data, path=str(Path(launch_dir) / data.path))
        if cfg.seed not in by_seed:
            if data.cache:
                from . import data_cache

                by_seed[cfg.seed] = data_cache.load(data, seed=cfg.seed)
            else:
                by_seed[cfg.seed] = load_dataset(data, seed=cfg.seed)
    return [by_seed[cfg.seed] for cfg in configs]


def _seed_problem(data) -> Dataset:
    """The notebook's problem: one input ``x ~ N(0, I)`` from ``PRNGKey(seed_x_key)``,
    one scalar target ``y ~ N(0, 1)`` from ``PRNGKey(seed_y_key)``.

    The loss ``mean((f(Θ, x) - y)²)`` averages over the ``n`` outputs, so ``y`` is
    repeated ``n`` times as the target row; train, validation and test are that one row.
    """
    import jax

    n = data.seed_width
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(data.seed_x_key), (n,)), np.float32)
    y = np.asarray(jax.random.normal(jax.random.PRNGKey(data.seed_y_key), ()), np.float32)
    x_row = x.reshape(1, n)
    y_row = np.full((1, n), y, np.float32)
    names = tuple(f"x{i}" for i in range(n))
    return Dataset("seed", "regression", x_row, y_row, x_row, y_row, x_row, y_row,
                   feature_names=names, target_names=tuple(f"y{i}" for i in range(n)),
                   source=f"x = normal(PRNGKey({data.seed_x_key}), ({n},)), "
                          f"y = normal(PRNGKey({data.seed_y_key}), ())")


def _split(name, task, x, y, feature_names, target_names, class_names, data, seed, *,
           source: str) -> Dataset:
    from sklearn.model_selection import train_test_split

    n = x.shape[0]
    n_test = int(round(n * data.test_fraction))
    n_val = int(round(n * data.val_fraction))
    if n - n_test - n_val < 2 or n_test < 1 or n_val < 1:
        raise DataError(
            f"{name}: {n} rows are too few for val_fraction={data.val_fraction} and "
            f"test_fraction={data.test_fraction} (each split needs at least one row, train two)")
    stratify = y if task == "classification" and _can_stratify(y, n_test) else None
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=n_test, random_state=seed, stratify=stratify)
    stratify = y_rest if stratify is not None and _can_stratify(y_rest, n_val) else None
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=n_val, random_state=seed + 1, stratify=stratify)

    mean = std = None
    if data.standardize:
        mean, std = x_train.mean(0), x_train.std(0)
        std = np.where(std > 0, std, 1.0)  # constant columns (digits' blank pixels) stay 0
        x_train, x_val, x_test = ((a - mean) / std for a in (x_train, x_val, x_test))
    target_mean = target_std = None
    if task == "regression" and data.standardize:
        target_mean, target_std = y_train.mean(0), y_train.std(0)
        target_std = np.where(target_std > 0, target_std, 1.0)
        y_train, y_val, y_test = ((a - target_mean) / target_std for a in (y_train, y_val, y_test))
    ydtype = np.float32 if task == "regression" else np.int32
    f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    return Dataset(name, task, f32(x_train), y_train.astype(ydtype), f32(x_val),
                   y_val.astype(ydtype), f32(x_test), y_test.astype(ydtype),
                   feature_names=feature_names, target_names=target_names,
                   class_names=class_names, target_mean=target_mean, target_std=target_std,
                   feature_mean=mean, feature_std=std, source=source)


def _can_stratify(y, n_holdout) -> bool:
    _, counts = np.unique(y, return_counts=True)
    return counts.min() >= 2 and n_holdout >= len(counts)


def _load_csv(data, seed: int) -> Dataset:
    import hashlib

    if not data.path:
        raise DataError("data.kind=csv needs data.path=/path/to/table.csv")
    path = Path(data.path).expanduser()
    raw = _read_bytes(path)
    targets = list(data.target)
    if not targets:
        raise DataError("data.kind=csv needs data.target=[COLUMN] (the column(s) to predict)")
    columns, frame = _read_table(raw, path)
    features = list(data.features) if data.features else [c for c in columns if c not in targets]
    present = set(columns)
    for col in targets + features:
        if col not in present:
            hint = ""
            if len(columns) == 1 and any(d in columns[0] for d in ";\t|"):
                hint = " (the file seems to use another delimiter; save it comma-separated)"
            raise DataError(f"{path}: no column {col!r}; the columns are {_names(columns)}{hint}")
    overlap = set(targets) & set(features)
    if overlap:
        raise DataError(f"{path}: column(s) {sorted(overlap)} are both target and feature")
    if not features:
        raise DataError(f"{path}: no feature columns left besides the target {targets}")
    task = data.task
    if task == "auto":  # numbers are a regression target, text labels name classes
        # by the majority of a column's cells: one stray "NaN" or "n/a" in a numeric
        # target is a bad cell to name, not a sign that the numbers are class labels
        numeric = all(_numeric_share(frame[col]) > 0.5 for col in targets)
        task = "regression" if numeric or len(targets) > 1 else "classification"
    if task == "classification" and len(targets) != 1:
        raise DataError(f"classification takes one target column, got {targets}")

    x = _numeric_block(frame, features, path)
    if task == "regression":
        y = _numeric_block(frame, targets, path, target=True)
        class_names: tuple[str, ...] = ()
    else:
        labels = frame[targets[0]].str.strip()
        empty = np.flatnonzero(labels.eq("").to_numpy())
        if empty.size:
            raise DataError(f"{path}: missing value in column {targets[0]!r} at line "
                            f"{empty[0] + 2} (line 1 is the header)")
        class_names = tuple(sorted(labels.unique(), key=_natural_key))
        index = {c: i for i, c in enumerate(class_names)}
        y = labels.map(index).to_numpy(np.int64)
        if len(class_names) < 2:
            raise DataError(f"{path}: column {targets[0]!r} has one class only; "
                            "classification needs two or more")
        if len(class_names) > max(MAX_CLASSES_SHARE * len(labels), 2) or \
                len(class_names) > MAX_CLASSES:
            raise DataError(
                f"{path}: column {targets[0]!r} has {len(class_names)} distinct values in "
                f"{len(labels)} rows: too many to be classes (at most {MAX_CLASSES}, and at "
                f"most one per {int(1 / MAX_CLASSES_SHARE)} rows); for a numeric target use "
                "data.task=regression")
    source = f"{path.resolve()} (sha256 {hashlib.sha256(raw).hexdigest()})"
    return _split(path.stem, task, x, y, tuple(features), tuple(targets), class_names, data,
                  seed, source=source)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, or a DataError saying why they cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (set data.path to an existing CSV file)") \
            from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file (set data.path to the CSV file "
                        "itself)") from None
    except OSError as err:  # no permission, a broken mount: the OS names the cause
        raise DataError(f"{path}: cannot read the file ({err.strerror or err}); make it "
                        "readable by this user (chmod) or copy it where it is") from None


def _read_table(raw: bytes, path: Path) -> tuple[list[str], object]:
    """Parse the CSV text: ``(column names, DataFrame of the data rows as str)``.

    The header is read as a row of its own (``header=None``) so that pandas neither
    renames a repeated name (a second ``y`` would become a feature ``y.1``) nor takes
    the first column as an index when every data row is one field longer than the header.

    Raises:
      DataError: not UTF-8, empty, no data rows, a row longer than the header, a column
        without a name or with the name of another, more than ``MAX_COLUMNS`` columns.
    """
    import csv
    import io

    import pandas as pd

    try:
        text = raw.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not a name
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at line {line});"
                        " save the table as a UTF-8 CSV file") from None
    # the width first, with the csv module: pandas takes ~45 s to read a 200 000-field row
    width = next((len(row) for row in csv.reader(io.StringIO(text)) if row), 0)
    if width > MAX_COLUMNS:
        raise DataError(f"{path}: {width} columns, more than the {MAX_COLUMNS} a table may "
                        f"have; keep only the columns to use (at most {MAX_COLUMNS}) in the file")
    try:
        frame = pd.read_csv(io.StringIO(text), header=None, dtype=str, keep_default_na=False,
                            skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; a CSV needs a header row and data rows") \
            from None
    except pd.errors.ParserError as err:
        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
        if fields:
            expected, line, saw = fields.groups()
            raise DataError(f"{path}: line {line} has {saw} fields, the header {expected}; "
                            "give every row as many fields as the header (quote a value that "
                            "holds a comma)") from None
        raise DataError(f"{path}: not a readable CSV table ({_one_line(err)})") from None
    columns = [str(name).strip() for name in frame.iloc[0]]
    unnamed = [i + 1 for i, name in enumerate(columns) if not name]
    if unnamed:
        raise DataError(f"{path}: column(s) {_names(unnamed)} (counting from 1) have no name in "
                        "the header; name them, or drop them (a pandas index saved by to_csv: "
                        "write the table with index=False)")
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(columns):
        seen.setdefault(name, []).append(i + 1)
    repeated = [f"{name!r} at columns {where}" for name, where in seen.items() if len(where) > 1]
    if repeated:
        listed = "; ".join(repeated[:10]) + (f"; {len(repeated) - 10} more" if len(repeated) > 10
                                             else "")
        raise DataError(f"{path}: the header names a column more than once ({listed}); give "
                        "each column its own name")
    if len(frame) < 2:
        raise DataError(f"{path}: the file has a header but no data rows")
    frame = frame.iloc[1:].reset_index(drop=True)
    frame.columns = columns
    return columns, frame


def _names(columns: list, limit: int = 20) -> str:
    """A list for a one-line message: the first ``limit`` items and the count of the rest."""
    if len(columns) <= limit:
        return str(columns)
    return f"{columns[:limit]} and {len(columns) - limit} more"


def _numeric_share(column) -> float:
    """The share of a column's non-empty cells that are finite numbers (1.0: all)."""
    import pandas as pd

    raw = column.str.strip()
    filled = raw[raw != ""]
    if filled.empty:
        return 1.0
    return float(np.isfinite(pd.to_numeric(filled, errors="coerce").to_numpy(np.float64)).mean())


def _numeric_block(frame, cols: list[str], path: Path, *, target: bool = False) -> np.ndarray:
    """Columns ``cols`` as an ``(N, len(cols))`` float64 array; every value a number the
    float32 network can hold (``|v| <= FLOAT32_MAX``).

    Raises:
      DataError: the first bad cell of the first column that has one: missing, not a
        number, or beyond float32's range, naming its column, line and value.
    """
    import pandas as pd

    n = len(frame)
    # one conversion for the whole block: per column, 10 000 columns took ~20 s
    raw = pd.Series(frame[cols].to_numpy().ravel(order="F")).str.strip()
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
    bad = ~(np.abs(values) <= FLOAT32_MAX)  # NaN (missing, text) and inf too
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        col, row = cols[first // n], first % n
        cell = raw.iloc[first]
        in_col = int(bad[first // n * n:(first // n + 1) * n].sum())
        value = values[first]
        if cell == "":
            what, fix = "missing value", ""
        elif np.isnan(value) and _parses_as_nan(cell):
            what, fix = f"missing value {cell!r} (not a number)", ""
        elif np.isnan(value):
            what = f"non-numeric value {cell!r}"
            fix = "for class labels set data.task=classification" if target else ""
        elif cell.lstrip("+-").lower() in ("inf", "infinity"):
            what, fix = f"infinite value {cell!r}", ""
        else:
            what = (f"value {cell!r} beyond the float32 range the network computes in "
                    f"(magnitude at most {FLOAT32_MAX:.3g})")
            fix = "rescale the column (other units, or its logarithm)"
        if not target:
            fix = f"{fix}, or leave it out with data.features" if fix else \
                "or leave the column out with data.features"
        raise DataError(f"{path}: {what} in column {col!r} at line {row + 2} (line 1 is the "
                        f"header); {in_col} such row(s) in that column. Fix or drop those rows"
                        + (f"; {fix}" if fix else ""))
    return values.reshape(len(cols), n).T


def _parses_as_nan(cell: str) -> bool:
    try:
        return np.isnan(float(cell))
    except ValueError:
        return False


def _natural_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
