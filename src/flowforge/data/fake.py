"""Tiny fake datasets in the real file formats: ``python -m flowforge.data.fake DIR``.

:func:`write_fake_datasets` writes, under a data folder ``DIR`` (what ``paths.data_dir`` names), small
files in exactly the formats and folder layout the file-backed data modules of
:mod:`flowforge.data.images` and :mod:`flowforge.data.uci` read, so that a smoke run, a sweep's smoke
variant or a test can exercise the real loaders without the real data::

    python -m flowforge.data.fake /tmp/fake [--datasets mnist,cifar10,power] [--n 64]
    python train.py smoke=true dataset=cifar10 paths.data_dir=/tmp/fake \\
        ++dataset.verify_checksums=false ++dataset.val_size=16

**All values are random** (``numpy.random.default_rng`` with a fixed seed per dataset, so the files are
the same on every call): pixels uniform in 0..255, labels uniform, table entries random numbers. They
are for smoke runs and tests only, never for numbers (a model fitted to them learns nothing).

What each dataset gets, with the default ``n = 64`` training examples and ``n_eval = max(2, n // 4)``
(16) examples per evaluation split; sizes on disk in brackets:

============  ====================================================================================
dataset       files under DIR
============  ====================================================================================
mnist         ``mnist/MNIST/raw/train-images-idx3-ubyte`` (uint8 idx, 5064 x 28 x 28, 4.0 MB),
              ``train-labels-idx1-ubyte`` (5064 labels 0-9), ``t10k-images-idx3-ubyte``
              (16 x 28 x 28, 12.6 kB), ``t10k-labels-idx1-ubyte``; 4.0 MB in all. The training file
              holds ``n`` + 5000 images because the loader holds out its default ``val_size`` (5,000)
              from the end of the training file: the default config loads, with 64 / 5000 / 16 images.
cifar10       ``cifar10/cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` (python pickles, 16 images
              each as ``data`` uint8 (16, 3072) plus ``labels``, ``batch_label``, ``filenames``; 49 kB
              each), ``test_batch`` (16 images), ``batches.meta`` (the ten class names); 0.3 MB in all.
              64 / 16 / 16 images with the overrides below.
imagenet32    ``imagenet32/train_data_batch_1.npz`` .. ``_10.npz`` (Chrabaszcz format, uncompressed
              ``np.savez``: ``data`` uint8 (8, 3072), ``labels`` 1..1000, ``mean`` float64 (3072,);
              50 kB each) and ``val_data.npz`` (16 images, 49 kB); plus the van den Oord version
              (``dataset.version=oord``): ``train_32x32/0000000.png`` .. (80 RGB PNGs, 3.2 kB each)
              and ``valid_32x32/`` (16 PNGs); 0.9 MB in all. 64 / 16 / 16 images with the overrides
              below (either version).
imagenet64    the same at 64x64: ``data`` uint8 (8, 12288) per batch (197 kB each with the mean),
              ``val_data.npz`` (16 images, 197 kB), ``train_64x64/`` (80 PNGs, 12.4 kB each),
              ``valid_64x64/`` (16 PNGs); 3.4 MB in all.
celebahq      ``celebahq/00000.png`` .. ``00009.png``: 10 RGB 256x256 PNGs (197 kB each, 2 MB), split
              6 / 2 / 2 by index with the overrides below (always 10 images, whatever ``n``).
power         ``power/data.npy``: float64 (78, 8) (5 kB); MAF split 64 / 7 / 7 rows.
gas           ``gas/ethylene_CO.npy``: float64 (78, 19), columns Time, Meth, Eth and 16 sensors (12 kB).
              Sensor ``8 + i`` is sensor ``i`` plus 1% noise, so the loader's correlation cleaning
              keeps exactly 8 sensors as on the real file. The ``.npy`` form is written because the
              loader reads it without pandas (the real archive's ``ethylene_CO.pickle`` needs pandas).
hepmass       ``hepmass/1000_train.csv`` (header ``# label,f0,..,f26,mass`` and 142 rows: 71 signal
              (label 1), 71 background; 29 columns, 39 kB) and ``1000_test.csv`` (32 rows, 16 signal,
              30 columns: like the real file it has one column more, which the loader drops). 7 of the
              28 features take few discrete values (the mass and six others), so the loader's
              "re-occurring minimum" rule drops them and 21 remain, as on the real file. Split
              64 / 7 / 16 signal rows.
miniboone     ``miniboone/data.npy``: float64 (78, 43) (27 kB); MAF split 64 / 7 / 7 rows.
bsds300       ``BSDS300/BSDS300.hdf5`` with float32 datasets ``train`` (64, 63), ``validation``
              (16, 63), ``test`` (16, 63) (26 kB). Needs h5py (as the loader does); when h5py is
              missing, writing all datasets skips BSDS300 with a warning.
sbi           ``sbi/sbibm/tasks/<task>/files/num_observation_<k>/`` for the five sbibm tasks and k = 1..10:
              ``observation.csv``, ``true_parameters.csv`` and ``reference_posterior_samples.csv.bz2``
              (``n`` samples), uniform in [-1, 1]; the simulations themselves are generated (0.2 MB).
============  ====================================================================================

Every dataset folder also gets ``FAKE_DATA.txt``, which says the files are random. The writer refuses
(``FileExistsError``) a dataset folder that exists, is not empty and has no such marker, so it never
overwrites real data; a folder it wrote before is rewritten.

Loader constraints the files cannot meet, and the Hydra overrides that lift them
(:func:`hydra_overrides` returns them; the CLI prints them):

- CIFAR-10 compares each batch file with torchvision's MD5 of the official file, which a fake file
  cannot match: ``++dataset.verify_checksums=false``.
- CIFAR-10 and Downsampled ImageNet hold out ``val_size`` (5,000 resp. 10,000) training images for
  validation; that many fake images would be 15 MB (CIFAR-10), 31 MB (ImageNet32) and 124 MB
  (ImageNet64), so: ``++dataset.val_size=<n_eval>``. (MNIST gets its 5,000 instead: 4 MB.)
- CelebA-HQ expects 30,000 images 00000..29999 (6 GB of random PNGs):
  ``++dataset.num_images=10 ++dataset.num_val=2 ++dataset.num_test=2``.
"""

from __future__ import annotations

import argparse
import bz2
import importlib.util
import pickle
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

DATASETS = (
    "mnist",
    "cifar10",
    "imagenet32",
    "imagenet64",
    "celebahq",
    "power",
    "gas",
    "hepmass",
    "miniboone",
    "bsds300",
    "sbi",
)
DEFAULT_N = 64
MIN_N = 8
MARKER = "FAKE_DATA.txt"

#: MNIST's default ``val_size`` (:class:`flowforge.data.images.MNISTDataModule`), the training images it holds
#: out for validation; the fake training file holds ``n`` more. (Not read from the class: importing it pulls in
#: torch, Lightning and torchvision, seconds of start-up for this small CLI; tests/test_fake_data.py checks it.)
MNIST_VAL_SIZE = 5000

#: CelebA-HQ images written (train / val / test by index), whatever ``n``: 256x256 PNGs are 197 kB each
CELEBAHQ_SPLITS = (6, 2, 2)

#: the dataset folder under DIR, as the configs in conf/dataset/ and the loaders name it
FOLDERS = {
    "mnist": "mnist",
    "cifar10": "cifar10",
    "imagenet32": "imagenet32",
    "imagenet64": "imagenet64",
    "celebahq": "celebahq",
    "power": "power",
    "gas": "gas",
    "hepmass": "hepmass",
    "miniboone": "miniboone",
    "bsds300": "BSDS300",
    "sbi": "sbi",
}

_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def n_eval(n: int) -> int:
    """Examples per evaluation split (val, test) of the image sets for ``n`` training examples."""
    return max(2, n // 4)


def hydra_overrides(dataset: str, n: int = DEFAULT_N) -> list[str]:
    """The Hydra overrides (besides ``paths.data_dir=DIR``) that the fake files of ``dataset`` need."""
    _check_name(dataset)
    if dataset == "cifar10":
        return ["++dataset.verify_checksums=false", f"++dataset.val_size={n_eval(n)}"]
    if dataset in ("imagenet32", "imagenet64"):
        return [f"++dataset.val_size={n_eval(n)}"]
    if dataset == "celebahq":
        train, val, test = CELEBAHQ_SPLITS
        return [f"++dataset.num_images={train + val + test}", f"++dataset.num_val={val}", f"++dataset.num_test={test}"]
    return []


# --------------------------------------------------------------------------- helpers
def _check_name(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; fake files exist for {', '.join(DATASETS)}")


def _rng(dataset: str) -> np.random.Generator:
    """A fixed generator per dataset, so each dataset's files do not depend on which others are written."""
    return np.random.default_rng([20240, DATASETS.index(dataset)])


def _pixels(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _maf_rows(n: int) -> int:
    """The fewest rows whose MAF split (test = last 10%, val = last 10% of the rest) leaves >= n for
    training and at least one row for val and test."""
    rows = n
    while True:
        test = int(0.1 * rows)
        val = int(0.1 * (rows - test))
        if test >= 1 and val >= 1 and rows - test - val >= n:
            return rows
        rows += 1


def _tail_rows(n: int) -> int:
    """The fewest rows whose last 10% (HEPMASS's val) is non-empty and leaves >= n for training."""
    rows = n
    while int(0.1 * rows) < 1 or rows - int(0.1 * rows) < n:
        rows += 1
    return rows


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx (SN3 / "Pascal Vincent") file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _write_pngs(folder: Path, images: np.ndarray, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    keep = set(names)
    for stale in folder.glob("*.png"):  # only in a folder this module wrote (see _prepare)
        if stale.name not in keep:
            stale.unlink()
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name)  # uint8 (H, W, 3): RGB


def _prepare(folder: Path, dataset: str) -> None:
    """Create ``folder`` and its marker; refuse a non-empty folder that this module did not write."""
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; not writing fake {dataset} files there")
        if not (folder / MARKER).exists() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} is not empty and holds no {MARKER}: it may hold the real {dataset} data, which "
                "fake files would overwrite. Write the fake datasets into another folder."
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(
        f"Fake {dataset} files written by `python -m flowforge.data.fake` (flowforge.data.fake): tiny files in\n"
        "the real format whose values are RANDOM. For smoke runs and tests only, never for numbers.\n"
        "Delete this folder and put the real data here for real runs.\n"
    )


# --------------------------------------------------------------------------- image sets
def _mnist(folder: Path, n: int) -> None:
    rng = _rng("mnist")
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", n + MNIST_VAL_SIZE), ("t10k", n_eval(n))):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _pixels(rng, count, 28, 28))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count).astype(np.uint8))


def _cifar10(folder: Path, n: int) -> None:
    rng = _rng("cifar10")
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    sizes = [len(part) for part in np.array_split(np.arange(n + n_eval(n)), 5)]
    files = [(f"data_batch_{k + 1}", f"training batch {k + 1} of 5", size) for k, size in enumerate(sizes)]
    files.append(("test_batch", "testing batch 1 of 1", n_eval(n)))
    for name, label, size in files:
        batch = {
            "batch_label": label,
            "labels": rng.integers(0, 10, size).tolist(),
            "data": _pixels(rng, size, 3 * 32 * 32),  # rows: 1024 red, 1024 green, 1024 blue values
            "filenames": [f"fake_{name}_{i:05d}.png" for i in range(size)],
        }
        (batches / name).write_bytes(pickle.dumps(batch))
    meta = {"num_cases_per_batch": max(sizes), "label_names": list(_CIFAR10_CLASSES), "num_vis": 3072}
    (batches / "batches.meta").write_bytes(pickle.dumps(meta))


def _imagenet(folder: Path, n: int, resolution: int, dataset: str) -> None:
    rng = _rng(dataset)
    r = resolution
    train_total, test_total = n + n_eval(n), n_eval(n)
    train = _pixels(rng, train_total, 3 * r * r)  # channel-major rows, as in the real npz files
    train_labels = rng.integers(1, 1001, train_total)
    test = _pixels(rng, test_total, 3 * r * r)
    test_labels = rng.integers(1, 1001, test_total)
    mean = train.mean(axis=0)  # the real files store the mean training image (the loader ignores it)
    for k, part in enumerate(np.array_split(np.arange(train_total), 10), start=1):
        np.savez(folder / f"train_data_batch_{k}.npz", data=train[part], labels=train_labels[part].tolist(), mean=mean)
    np.savez(folder / "val_data.npz", data=test, labels=test_labels.tolist())

    # van den Oord et al. "small ImageNet" (dataset.version=oord): PNG folders, no labels
    def hwc(rows: np.ndarray) -> np.ndarray:
        return rows.reshape(-1, 3, r, r).transpose(0, 2, 3, 1)

    _write_pngs(folder / f"train_{r}x{r}", hwc(train), [f"{i:07d}.png" for i in range(train_total)])
    _write_pngs(folder / f"valid_{r}x{r}", hwc(test), [f"{i:07d}.png" for i in range(test_total)])


def _celebahq(folder: Path, n: int) -> None:
    rng = _rng("celebahq")
    count = sum(CELEBAHQ_SPLITS)
    _write_pngs(folder, _pixels(rng, count, 256, 256, 3), [f"{i:05d}.png" for i in range(count)])


# --------------------------------------------------------------------------- MAF tabular sets
def _power(folder: Path, n: int) -> None:
    rng = _rng("power")
    rows = _maf_rows(n)
    # columns: global active power, global reactive power, voltage, global intensity, sub-metering 1-3,
    # time (the loader drops columns 1 and 3 and adds its own noise)
    data = rng.random((rows, 8)) * np.array([5.0, 0.5, 10.0, 20.0, 40.0, 40.0, 20.0, 1.0])
    data[:, 2] += 235.0  # volts
    np.save(folder / "data.npy", data)


def _gas(folder: Path, n: int) -> None:
    rng = _rng("gas")
    rows = _maf_rows(n)
    sensors = rng.normal(size=(rows, 8))
    copies = sensors + 0.01 * rng.normal(size=(rows, 8))  # correlation ~0.9999 > 0.98: the originals go
    time = np.arange(rows, dtype=np.float64)
    concentrations = rng.random((rows, 2)) * 600.0  # Meth, Eth (ppm); dropped by the loader
    np.save(folder / "ethylene_CO.npy", np.hstack([time[:, None], concentrations, sensors, copies]))


def _hepmass_features(rng: np.random.Generator, rows: int) -> np.ndarray:
    """28 feature columns: 21 continuous and 7 discrete (their minimum recurs > 5 times, so MAF drops them)."""
    features = rng.normal(size=(rows, 28))
    discrete = [5, 9, 13, 17, 21, 25, 27]  # 27: the mass
    for j in discrete:
        levels = np.array([500.0, 750.0, 1000.0, 1250.0, 1500.0]) if j == 27 else np.array([0.0, 1.0, 2.0])
        column = rng.choice(levels[1:], size=rows)
        column[rng.permutation(rows)[: max(6, rows // 2)]] = levels[0]  # the minimum, > 5 times
        features[:, j] = column
    return features


def _hepmass(folder: Path, n: int) -> None:
    rng = _rng("hepmass")
    names = ["# label"] + [f"f{i}" for i in range(27)] + ["mass"]
    for name, positives, extra in (("1000_train.csv", _tail_rows(n), False), ("1000_test.csv", n_eval(n), True)):
        positives = max(positives, 8)  # so the discrete features recur and still vary
        labels = np.concatenate([np.ones(positives), np.zeros(positives)])
        # signal and background rows separately, so the discrete features recur among the signal rows
        features = np.vstack([_hepmass_features(rng, positives), _hepmass_features(rng, positives)])
        table = np.hstack([labels[:, None], features])
        table = table[rng.permutation(len(table))]
        header = names
        if extra:  # the real 1000_test.csv has one column more than 1000_train.csv
            table = np.hstack([table, rng.normal(size=(len(table), 1))])
            header = names + ["extra"]
        np.savetxt(folder / name, table, delimiter=",", header=",".join(header), comments="", fmt="%.9g")


def _miniboone(folder: Path, n: int) -> None:
    rng = _rng("miniboone")
    np.save(folder / "data.npy", rng.normal(size=(_maf_rows(n), 43)))


def _bsds300(folder: Path, n: int) -> None:
    import h5py

    rng = _rng("bsds300")
    with h5py.File(folder / "BSDS300.hdf5", "w") as f:
        for key, rows in (("train", n), ("validation", n_eval(n)), ("test", n_eval(n))):
            f.create_dataset(key, data=(0.1 * rng.normal(size=(rows, 63))).astype(np.float32))


def _sbi(folder: Path, n: int) -> None:
    """sbibm's reference files (:mod:`flowforge.sbi.reference`) for every task: 10 observations, each with a random
    observation, true parameter and ``n`` reference samples, uniform in [-1, 1] (inside every task's prior)."""
    from flowforge.sbi.reference import NUM_OBSERVATIONS
    from flowforge.sbi.tasks import TASKS

    rng = _rng("sbi")

    def csv_text(prefix: str, rows: np.ndarray) -> bytes:
        head = ",".join(f"{prefix}_{i + 1}" for i in range(rows.shape[1]))
        return ("\n".join([head, *(",".join(f"{v:.6f}" for v in row) for row in rows)]) + "\n").encode()

    for name, task in TASKS.items():
        for k in range(1, NUM_OBSERVATIONS + 1):
            where = folder / "sbibm" / "tasks" / name / "files" / f"num_observation_{k}"
            where.mkdir(parents=True, exist_ok=True)
            (where / "observation.csv").write_bytes(csv_text("data", rng.uniform(-1, 1, (1, task.dim_x))))
            (where / "true_parameters.csv").write_bytes(csv_text("parameter", rng.uniform(-1, 1, (1, task.dim_theta))))
            samples = csv_text("parameter", rng.uniform(-1, 1, (n, task.dim_theta)))
            (where / "reference_posterior_samples.csv.bz2").write_bytes(bz2.compress(samples))


_WRITERS: dict[str, Callable[[Path, int], None]] = {
    "mnist": _mnist,
    "cifar10": _cifar10,
    "imagenet32": lambda folder, n: _imagenet(folder, n, 32, "imagenet32"),
    "imagenet64": lambda folder, n: _imagenet(folder, n, 64, "imagenet64"),
    "celebahq": _celebahq,
    "power": _power,
    "gas": _gas,
    "hepmass": _hepmass,
    "miniboone": _miniboone,
    "bsds300": _bsds300,
    "sbi": _sbi,
}


def _h5py_available() -> bool:
    return importlib.util.find_spec("h5py") is not None


# --------------------------------------------------------------------------- entry points
def write_fake_datasets(root: str | Path, datasets: Iterable[str] | None = None, n: int = DEFAULT_N) -> dict[str, Path]:
    """Write fake files for ``datasets`` (default: all of :data:`DATASETS`) under the data folder ``root``.

    Args:
        root: the data folder (``paths.data_dir`` of a run); created if missing.
        datasets: names of dataset configs (e.g. ``["mnist", "power"]``); None writes all of them
            (BSDS300 only when h5py is installed).
        n: training examples per dataset (at least 8); val and test get ``max(2, n // 4)`` each (MAF
            tabular sets: their fixed 10% fractions; MNIST: 5,000 val; CelebA-HQ: always 6 / 2 / 2).

    Returns:
        ``{dataset: folder}``, the folder under ``root`` that holds each dataset's files.

    Raises:
        ValueError: an unknown dataset name or ``n`` below 8.
        FileExistsError: a dataset folder exists, is not empty and was not written by this module.
        ImportError: ``bsds300`` named explicitly without h5py installed.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < MIN_N:
        raise ValueError(f"n must be an integer >= {MIN_N}, got {n!r}")
    n = int(n)
    if datasets is None:
        names = list(DATASETS)
        if not _h5py_available():
            warnings.warn("h5py is not installed: skipping the fake BSDS300 file (pip install h5py)", stacklevel=2)
            names.remove("bsds300")
    else:
        names = list(dict.fromkeys([datasets] if isinstance(datasets, str) else datasets))
        for name in names:
            _check_name(name)
        if "bsds300" in names and not _h5py_available():
            raise ImportError("writing the fake BSDS300.hdf5 needs h5py (as reading it does): pip install h5py")
    root = Path(root)
    written: dict[str, Path] = {}
    for name in names:
        folder = root / FOLDERS[name]
        _prepare(folder, name)
        _WRITERS[name](folder, n)
        written[name] = folder
    return written


def _size(nbytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowforge.data.fake",
        description="Write tiny fake datasets (random values, real file formats) for smoke runs and tests.",
    )
    parser.add_argument("dir", help="data folder to write into (pass it to runs as paths.data_dir=DIR)")
    parser.add_argument(
        "--datasets", default=None, help=f"comma-separated subset of {','.join(DATASETS)} (default: all)"
    )
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"training examples per dataset (default {DEFAULT_N})")
    args = parser.parse_args(argv)
    names = None if args.datasets is None else [s.strip() for s in args.datasets.split(",") if s.strip()]
    try:
        written = write_fake_datasets(args.dir, names, n=args.n)
    except (ValueError, FileExistsError, ImportError) as err:
        parser.exit(2, f"error: {err}\n")
    for name, folder in written.items():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
        total = sum(p.stat().st_size for p in files)
        print(f"{name:<11} {folder}  ({len(files)} files, {_size(total)})")
        overrides = hydra_overrides(name, args.n)
        if overrides:
            print(f"{'':<11} needs: {' '.join(overrides)}")
    print(f"Random values, for smoke runs and tests only. Use them with paths.data_dir={Path(args.dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
