"""The tabular benchmarks POWER, GAS, HEPMASS, MINIBOONE and BSDS300 with the preprocessing of MAF.

Papamakarios, Pavlakou & Murray 2017, "Masked Autoregressive Flow for Density Estimation"; their data
archive is https://zenodo.org/record/1161203 (``data.tar.gz``). Extract it so that ``data_dir`` holds
``power/``, ``gas/``, ``hepmass/``, ``miniboone/`` and ``BSDS300/``. The splits are MAF's fixed ones
(``seed`` is not used), so numbers compare with the literature:

=========  ====  =========  =======  =======
dataset    dims  train      val      test
=========  ====  =========  =======  =======
POWER      6     1,659,917  184,435  204,928
GAS        8     852,174    94,685   105,206
HEPMASS    21    315,123    35,013   174,987
MINIBOONE  43    29,556     3,284    3,648
BSDS300    63    1,000,000  50,000   250,000
=========  ====  =========  =======  =======

"MAF split" below means: test = the last 10% of the rows (``int(0.1 * N)``), val = the last 10% of
the remaining rows, train = the rest.

Points reconstructed from memory of the MAF code rather than checked against it:

- POWER: rows are shuffled with ``numpy.random.RandomState(42)`` and the same generator then draws the
  noise, voltage first (``0.01 * U``), then global active power (``0.001 * U``), then the three
  sub-meterings (``U``); time gets none. Columns 1 (global reactive power) and 3 (global intensity) of
  the 8 in ``data.npy`` are dropped. Normalisation uses train+val mean and std (ddof 0).
- GAS: columns Time, Meth, Eth are dropped; then, while some column has a Pearson correlation > 0.98
  with another, the first such column is removed (this keeps 8 of 16 sensors on the real file). The
  data are standardised with the mean and std (ddof 1) of all rows, test included, before the split,
  without shuffling.
- HEPMASS: only rows with label 1 are kept and the label is dropped; when ``1000_test.csv`` has one
  column more than ``1000_train.csv``, its last column is dropped (MAF: "the data set is messed up").
  Both are standardised with the train mean and std (ddof 1). A feature is then dropped when its
  smallest training value occurs more than 5 times (what MAF's "too many re-occurring values" test
  computes). Val = the last 10% of the train rows; test = all positive test rows.
- MINIBOONE: ``data.npy`` is already cleaned by MAF; MAF split, then train+val standardisation (ddof 0).
- BSDS300: used as stored (the hdf5 file holds MAF's 63-dim patches and splits).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flowforge.data.base import FlowDataModule, require_file
from flowforge.errors import ConfigError, DataError
from flowforge.trust import PANDAS_FRAME_GLOBALS, safe_unpickle

_MAF_SEED = 42
_POWER_DROPPED = (1, 3)  # global reactive power, global intensity
_HOW_TO_GET = (
    "Download data.tar.gz of the MAF paper from https://zenodo.org/record/1161203 and extract it so "
    "that dataset.data_dir holds power/, gas/, hepmass/, miniboone/ and BSDS300/."
)


def _corrupt(dataset: str, path: Path, err: BaseException) -> DataError:
    return DataError(
        f"dataset '{dataset}': could not read {path}: the file is corrupt or truncated "
        f"({type(err).__name__}: {err}). Extract it again. {_HOW_TO_GET}"
    )


def _check_finite(dataset: str, path: Path, data: np.ndarray, ignored: Sequence[int] = ()) -> None:
    """A table with NaN/inf entries in the columns used (all but ``ignored``) is refused before any statistics are
    taken (they would call the column constant)."""
    bad = ~np.isfinite(data)
    bad[:, list(ignored)] = False
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"dataset '{dataset}': {path} holds {int(bad.sum())} NaN/inf values (first at row {row}, column {col}: "
            f"{data[row, col]}); the file is damaged or not the expected one. Extract it again. {_HOW_TO_GET}"
        )


def _tail(data: np.ndarray, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split off the last ``int(fraction * N)`` rows: returns (head, tail)."""
    n_tail = int(fraction * len(data))
    return data[: len(data) - n_tail], data[len(data) - n_tail :]


def _maf_split(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rest, test = _tail(data)
    train, val = _tail(rest)
    return train, val, test


def _standardise(dataset: str, reference: np.ndarray, *arrays: np.ndarray, ddof: int = 0) -> tuple:
    """Shift and scale ``arrays`` by the column mean and std of ``reference``."""
    mean = reference.mean(axis=0)
    std = reference.std(axis=0, ddof=ddof)
    if not np.all(std > 0):
        raise DataError(
            f"dataset '{dataset}': column(s) {np.flatnonzero(~(std > 0)).tolist()} of the data are constant, "
            "so they cannot be standardised; the data file is not the expected one"
        )
    return tuple((a - mean) / std for a in arrays)


def _uncorrelated_columns(data: np.ndarray, threshold: float) -> list[int]:
    """MAF's GAS cleaning: while a column correlates above ``threshold`` with another, drop the first such."""
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(data, rowvar=False)
    keep = list(range(data.shape[1]))
    while True:
        counts = (corr[np.ix_(keep, keep)] > threshold).sum(axis=1)
        over = np.flatnonzero(counts > 1)
        if over.size == 0:
            return keep
        del keep[over[0]]


def _is_header(line: str) -> bool:
    try:
        [float(field) for field in line.split(",")]
    except ValueError:
        return True
    return False


class _MAFDataModule(FlowDataModule):
    """A MAF tabular set: subclasses implement :meth:`prepare`, returning float (train, val, test) arrays."""

    kind = "vector"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.data_dir is None:
            raise ConfigError(f"dataset.data_dir must name the MAF data folder ({self.label}). {_HOW_TO_GET}")

    def prepare(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def load_splits(self):
        return {
            name: (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), None)
            for name, x in zip(("train", "val", "test"), self.prepare())
        }

    # ------------------------------------------------------------------ file readers
    def path(self, relative: str) -> Path:
        return require_file(self.data_dir / relative, self.label, _HOW_TO_GET)

    def table(self, path: Path, columns: int | None = None, ignored: Sequence[int] = ()) -> np.ndarray:
        """A 2-D float64 table from an ``.npy`` or a comma-separated ``.csv`` (optional header line) file; the
        columns not ``ignored`` (dropped by the preprocessing) must be finite."""
        try:
            if path.suffix == ".npy":
                data = np.load(path, allow_pickle=False)
            else:
                with open(path) as f:
                    skip = int(_is_header(f.readline()))
                data = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
        except (ValueError, EOFError, OSError, UnicodeDecodeError) as err:
            raise _corrupt(self.label, path, err) from err
        if data.ndim != 2 or (columns is not None and data.shape[1] != columns):
            expected = "a 2-D table" if columns is None else f"a table with {columns} columns"
            raise DataError(f"dataset '{self.label}': {path} holds an array of shape {data.shape}; expected {expected}")
        if len(data) == 0:
            raise DataError(
                f"dataset '{self.label}': {path} holds no rows (the file is empty); extract it again. {_HOW_TO_GET}"
            )
        data = data.astype(np.float64, copy=False)
        _check_finite(self.label, path, data, ignored)
        return data


class POWERDataModule(_MAFDataModule):
    """UCI household electric power consumption, MAF version ``data_dir/power/data.npy`` (N, 8); 6 dims."""

    def prepare(self):
        data = self.table(self.path("power/data.npy"), columns=8, ignored=_POWER_DROPPED)
        rng = np.random.RandomState(_MAF_SEED)
        rng.shuffle(data)
        n = len(data)
        data = np.delete(data, _POWER_DROPPED, axis=1)
        voltage = 0.01 * rng.rand(n, 1)
        active_power = 0.001 * rng.rand(n, 1)
        sub_metering = rng.rand(n, 3)
        data += np.hstack((active_power, voltage, sub_metering, np.zeros((n, 1))))
        train, val, test = _maf_split(data)
        return _standardise(self.label, np.vstack((train, val)), train, val, test)


class GASDataModule(_MAFDataModule):
    """UCI gas sensor array (ethylene + CO), MAF version under ``data_dir/gas/``; 8 dims.

    Reads the first file present of ``ethylene_CO.npy``, ``ethylene_CO.csv`` (both: 19 columns in the
    order Time, Meth, Eth, then the 16 sensors; the csv may have one header line) and MAF's pandas
    pickle ``ethylene_CO.pickle`` (needs pandas). Without pandas, convert the pickle once where pandas
    is installed: ``numpy.save("ethylene_CO.npy", pandas.read_pickle("ethylene_CO.pickle").to_numpy())``.
    """

    sensors = 16

    def prepare(self):
        data = self.sensor_table()
        data = data[:, _uncorrelated_columns(data, threshold=0.98)]
        (data,) = _standardise(self.label, data, data, ddof=1)
        return _maf_split(data)

    def sensor_table(self) -> np.ndarray:
        folder = self.data_dir / "gas"
        for name in ("ethylene_CO.npy", "ethylene_CO.csv"):
            if (folder / name).exists():
                return self.table(folder / name, columns=3 + self.sensors, ignored=(0, 1, 2))[:, 3:]
        path = require_file(
            folder / "ethylene_CO.pickle",
            self.label,
            f"{_HOW_TO_GET} (Also accepted: {folder}/ethylene_CO.npy or ethylene_CO.csv with the columns "
            "Time, Meth, Eth and the 16 sensors.)",
        )
        convert = (
            f"Save it as {folder}/ethylene_CO.npy where pandas is available: "
            "numpy.save('ethylene_CO.npy', pandas.read_pickle('ethylene_CO.pickle').to_numpy())"
        )
        try:
            import pandas  # noqa: F401 - the frame's classes come from it
        except ImportError as err:
            raise DataError(
                f"dataset '{self.label}': {path} is a pandas pickle and pandas is not installed: "
                f"pip install pandas, or save it as {folder}/ethylene_CO.npy where pandas is available"
            ) from err
        try:
            # parsed without running code: only a DataFrame's and numpy's reconstruction globals are resolved
            frame = safe_unpickle(
                path,
                self.label,
                f"Use the file from the MAF archive or a converted copy. {convert}",
                allowed=PANDAS_FRAME_GLOBALS,
            )
            data = frame.drop(columns=["Time", "Meth", "Eth"]).to_numpy(dtype=np.float64)
        except (pickle.UnpicklingError, EOFError, ValueError, KeyError, AttributeError, OSError, TypeError) as err:
            if isinstance(err, DataError):
                raise
            raise _corrupt(self.label, path, err) from err
        if data.ndim != 2 or data.shape[1] != self.sensors:
            raise DataError(
                f"dataset '{self.label}': {path} has {data.shape[1]} sensor columns; expected {self.sensors}"
            )
        return data


class HEPMASSDataModule(_MAFDataModule):
    """UCI HEPMASS, MAF version ``data_dir/hepmass/1000_train.csv`` and ``1000_test.csv``; 21 dims.

    CSV with one header line; column 0 is the label (1 = signal), the others are features.
    """

    def prepare(self):
        train = self.positives("hepmass/1000_train.csv")
        test = self.positives("hepmass/1000_test.csv")
        if test.shape[1] == train.shape[1] + 1:
            test = test[:, :-1]
        elif test.shape[1] != train.shape[1]:
            raise DataError(
                f"dataset '{self.label}': 1000_train.csv has {train.shape[1] + 1} columns but "
                f"1000_test.csv has {test.shape[1] + 1}; the files do not belong together"
            )
        train, test = _standardise(self.label, train, train, test, ddof=1)
        keep = [j for j in range(train.shape[1]) if np.count_nonzero(train[:, j] == train[:, j].min()) <= 5]
        train, val = _tail(train[:, keep])
        return train, val, test[:, keep]

    def positives(self, relative: str) -> np.ndarray:
        data = self.table(self.path(relative))
        return data[data[:, 0] == 1, 1:]


class MINIBOONEDataModule(_MAFDataModule):
    """UCI MiniBooNE particle identification, MAF version ``data_dir/miniboone/data.npy`` (N, 43)."""

    def prepare(self):
        train, val, test = _maf_split(self.table(self.path("miniboone/data.npy"), columns=43))
        return _standardise(self.label, np.vstack((train, val)), train, val, test)


class BSDS300DataModule(_MAFDataModule):
    """Berkeley BSDS300 8x8 patches minus one pixel, MAF's ``data_dir/BSDS300/BSDS300.hdf5``; 63 dims.

    The hdf5 file holds the datasets ``train``, ``validation`` and ``test``; reading it needs h5py.
    """

    def prepare(self):
        path = self.path("BSDS300/BSDS300.hdf5")
        try:
            import h5py
        except ImportError as err:
            raise DataError(f"dataset '{self.label}': reading {path} needs h5py: pip install h5py") from err
        try:
            with h5py.File(path, "r") as f:
                return tuple(np.asarray(f[key][()]) for key in ("train", "validation", "test"))
        except (OSError, KeyError, ValueError) as err:
            raise _corrupt(self.label, path, err) from err
