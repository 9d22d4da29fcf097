"""A disk cache of split, standardised datasets and their linear baselines.

Loading a table needs scikit-learn (its bundled tables, ``train_test_split`` and the
baseline's ``LinearRegression`` / ``LogisticRegression``), and ``import sklearn``
alone takes about 2 s of a small job's wall time on a 2-core machine. The split is a
pure function of its inputs, so a second run of the same data loads the arrays from
one ``.npz`` file and imports no scikit-learn at all.

Key: SHA-256 of the data settings that shape the split (kind, resolved path, target,
features, task, fractions, standardisation), the seed, the source (scikit-learn's
version for its bundled tables; the file's SHA-256 for a CSV) and the source of
``data.py`` and ``evaluate.py`` (a change to how tables are split or baselines fitted
makes new entries). An entry holds the ``Dataset`` arrays, its names and the baseline's
test metrics, which are computed when the entry is written.

Where: ``$TRAINER_DATA_CACHE_DIR``, else ``$XDG_CACHE_HOME/trainer/datasets``
(``~/.cache/trainer/datasets``); ``data.cache=false`` turns it off. An unreadable,
corrupt or unwritable entry costs only the cache: one warning, and the data is
loaded from its source.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .data import Dataset, load_dataset

__all__ = ["default_dir", "load"]

FORMAT = 2  # bump when the entry's layout changes
_ARRAYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "target_mean",
           "target_std", "feature_mean", "feature_std")


def default_dir() -> Path:
    """``$TRAINER_DATA_CACHE_DIR``, else ``$XDG_CACHE_HOME/trainer/datasets``, else
    ``~/.cache/trainer/datasets``."""
    from .compile_cache import cache_dir

    return cache_dir("TRAINER_DATA_CACHE_DIR", "datasets")


def load(data, *, seed: int, directory: Path | None = None) -> Dataset:
    """``data.load_dataset(data, seed=seed)`` with ``baseline`` set, from the cache when an
    entry exists, else loaded from the source and stored.

    Args:
      data: a data kind's schema (``config.TabularDataConfig``, ``config.CsvDataConfig``
        whose ``path`` is absolute, ...).
      seed: the run's seed; decides the split.
      directory: the cache folder (default: ``default_dir()``).

    Raises:
      DataError: as ``load_dataset`` (errors are never cached).
    """
    if data.kind == "seed":  # drawn with JAX in milliseconds: nothing to save
        return load_dataset(data, seed=seed)
    directory = Path(directory) if directory is not None else default_dir()
    try:
        key = _key(data, seed)
    except OSError:  # a missing file: load_dataset names it
        return load_dataset(data, seed=seed)
    entry = directory / f"{data.kind}-{key[:24]}.npz"
    if entry.is_file():
        try:
            return _read(entry)
        except Exception as err:  # noqa: BLE001 - any damage means: load from the source
            warnings.warn(f"dataset cache entry {entry} is damaged ({type(err).__name__}); "
                          f"loading {data.kind} from its source and writing it again",
                          stacklevel=2)
    from .evaluate import linear_baseline

    dataset = load_dataset(data, seed=seed)
    dataset = dataclasses.replace(dataset, baseline=linear_baseline(dataset))
    try:
        _write(entry, dataset)
    except OSError as err:
        warnings.warn(f"cannot write the dataset cache in {directory} ({err}); the next run "
                      "loads the data again (set TRAINER_DATA_CACHE_DIR to a writable folder "
                      "or data.cache=false)", stacklevel=2)
    return dataset


def _key(data, seed: int) -> str:
    from importlib import metadata

    # every key of the data kind's schema but those that do not shape the split
    settings = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)
                if f.name not in ("batch_size", "cache")}
    if data.kind == "csv":
        source = hashlib.sha256(Path(data.path).expanduser().read_bytes()).hexdigest()
    else:
        source = f"scikit-learn {metadata.version('scikit-learn')}"
    blob = json.dumps({"format": FORMAT, "settings": settings, "seed": seed, "source": source,
                       "numpy": np.__version__, "code": _code_digest()}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of the code that splits tables and fits baselines, read once per process."""
    here = Path(__file__).resolve().parent
    return hashlib.sha256(b"".join((here / f).read_bytes()
                                   for f in ("data.py", "evaluate.py"))).hexdigest()


def _write(entry: Path, dataset: Dataset) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": dataset.name, "task": dataset.task,
            "feature_names": list(dataset.feature_names),
            "target_names": list(dataset.target_names),
            "class_names": list(dataset.class_names), "baseline": dataset.baseline,
            "source": dataset.source}
    arrays = {k: getattr(dataset, k) for k in _ARRAYS if getattr(dataset, k) is not None}
    # written whole then renamed: a reader never sees half an entry, even from another run
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain file would be, not mkstemp's 0600
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(entry: Path) -> Dataset:
    with np.load(entry, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: (z[k] if k in z.files else None) for k in _ARRAYS}
    return Dataset(meta["name"], meta["task"], **{k: arrays[k] for k in _ARRAYS[:6]},
                   feature_names=tuple(meta["feature_names"]),
                   target_names=tuple(meta["target_names"]),
                   class_names=tuple(meta["class_names"]), target_mean=arrays["target_mean"],
                   target_std=arrays["target_std"], baseline=meta["baseline"],
                   feature_mean=arrays["feature_mean"], feature_std=arrays["feature_std"],
                   source=meta["source"])
