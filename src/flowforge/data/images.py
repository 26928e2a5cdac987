"""Image data modules that read the standard files of MNIST, CIFAR-10, Downsampled ImageNet and CelebA-HQ.

Every module reads 8-bit pixels from ``data_dir`` and delivers integer-valued float images in
``[0, num_levels - 1]`` with shape ``(C, H, W)``. A ``num_levels`` below 256 (a power of two) drops
low bits, ``x // (256 // num_levels)``, as Glow does for 5-bit CelebA-HQ.

MNIST and CIFAR-10 are small and go through :meth:`FlowDataModule.setup`, which keeps a float32 copy
(about 0.2 GB and 0.7 GB). Downsampled ImageNet (ImageNet64 is about 15 GB of uint8) and CelebA-HQ
(30,000 PNG files) are too large for that: their modules derive from
:class:`_PerItemImageDataModule`, whose splits keep uint8 arrays or file names and convert one example
at a time.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets.utils import check_integrity

from flowforge.data.base import FlowDataModule, require_file
from flowforge.errors import ConfigError, DataError
from flowforge.trust import safe_unpickle

# What a torchvision dataset raises on a file it cannot parse (or, with download=True, cannot fetch).
_TORCHVISION_READ_ERRORS = (
    RuntimeError,
    AssertionError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    OSError,
    pickle.UnpicklingError,
)
_NPZ_READ_ERRORS = (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError)
_8BIT_MODES = ("L", "P", "RGB", "RGBA")
_DOWNLOAD_HINT = "or set dataset.download=true on a machine with network access to fetch them"


def _bit_shift(num_levels: int | None) -> int:
    """The divisor that maps 8-bit pixels onto ``num_levels`` levels."""
    if num_levels is None or num_levels > 256 or 256 % num_levels:
        raise ConfigError(
            f"dataset.num_levels must be a power of two in [2, 256] for 8-bit image files, got {num_levels!r}"
        )
    return 256 // num_levels


def _corrupt(dataset: str, paths: Sequence[Path], err: BaseException, fix: str) -> DataError:
    names = ", ".join(str(p) for p in paths)
    which = "the file is" if len(paths) == 1 else "one of the files is"
    return DataError(
        f"dataset '{dataset}': could not read {names}: {which} corrupt or truncated "
        f"({type(err).__name__}: {err}). {fix}"
    )


def _hold_out(n: int, val_size: int, seed: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices of ``range(n)``; val is ``val_size`` of them, drawn with ``seed``."""
    if val_size >= n:
        raise DataError(
            f"dataset '{dataset}': the training files hold only {n} examples, too few to hold out "
            f"dataset.val_size={val_size} for validation"
        )
    val = np.sort(np.random.default_rng(seed).choice(n, size=val_size, replace=False))
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    return np.flatnonzero(keep), val


def _check_val_size(val_size: int) -> None:
    if not isinstance(val_size, int) or val_size <= 0:
        raise ConfigError(f"dataset.val_size must be a positive integer, got {val_size!r}")


class _ImageFileDataModule(FlowDataModule):
    """An image data module backed by 8-bit files under ``data_dir``."""

    kind = "image"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.data_dir is None:
            raise ConfigError(f"dataset.data_dir must name the folder that holds the {self.label} files")
        self.bit_shift = _bit_shift(self.num_levels)


# --------------------------------------------------------------------------- torchvision formats
class _TorchvisionDataModule(_ImageFileDataModule):
    """Official train/test files of a torchvision dataset; the last ``val_size`` training images are val.

    Subclasses name the torchvision class, the files each split needs, and how to get them.
    """

    dataset_cls: type
    how_to_get: str
    labelled = True

    def __init__(self, download: bool = False, val_size: int = 5000, **kwargs):
        super().__init__(**kwargs)
        _check_val_size(val_size)
        self.download = download
        self.val_size = val_size

    def split_files(self, train: bool) -> list[Path]:
        raise NotImplementedError

    def tensors(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) and int64 labels (N,) of a loaded torchvision dataset."""
        raise NotImplementedError

    def read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        files = self.split_files(train)
        try:
            dataset = self.dataset_cls(root=str(self.data_dir), train=train, download=self.download)
        except DataError:
            raise
        except _TORCHVISION_READ_ERRORS as err:
            cause = " (if the download failed, check the network)" if self.download else ""
            fix = f"Delete them and fetch them again{cause}. {self.how_to_get}, {_DOWNLOAD_HINT}."
            raise _corrupt(self.label, files, err, fix) from err
        x, y = self.tensors(dataset)
        if len(x) != len(y):
            raise DataError(
                f"dataset '{self.label}': {', '.join(map(str, files))} hold {len(x)} images but "
                f"{len(y)} labels; the files are corrupt or truncated"
            )
        return x // self.bit_shift, y

    def load_splits(self):
        if not self.download:  # torchvision wants the files of both splits to read either
            for path in self.split_files(train=True) + self.split_files(train=False):
                require_file(path, self.label, f"{self.how_to_get}, {_DOWNLOAD_HINT}.")
        x, y = self.read(train=True)
        cut = len(x) - self.val_size
        if cut <= 0:
            raise DataError(
                f"dataset '{self.label}': the training files hold only {len(x)} images, too few to hold "
                f"out dataset.val_size={self.val_size} for validation"
            )
        return {"train": (x[:cut], y[:cut]), "val": (x[cut:], y[cut:]), "test": self.read(train=False)}


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST in torchvision's layout: ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    The four decompressed idx files come from http://yann.lecun.com/exdb/mnist/ (mirror
    https://ossci-datasets.s3.amazonaws.com/mnist/); ``download=True`` fetches them. Splits: train = the
    first 55,000 official training images, val = the last ``val_size`` (5,000), test = the official
    10,000. Labels 0-9. torchvision ships no checksums for the decompressed files, so only parse errors
    reveal corruption.
    """

    dataset_cls = torchvision.datasets.MNIST

    @property
    def how_to_get(self) -> str:
        return (
            f"Expected torchvision's MNIST layout {self.data_dir}/MNIST/raw/ with the four decompressed idx "
            "files from http://yann.lecun.com/exdb/mnist/"
        )

    def split_files(self, train: bool) -> list[Path]:
        prefix = "train" if train else "t10k"
        raw = self.data_dir / "MNIST" / "raw"
        return [raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"]

    def tensors(self, dataset):
        return dataset.data.unsqueeze(1), dataset.targets.long()


class _CIFAR10Files(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 reader that parses the batch files with :func:`flowforge.trust.safe_unpickle`
    (numpy arrays and lists only: a crafted batch file cannot run code) and without torchvision's own MD5 check
    (:class:`CIFAR10DataModule` checks each file before it is parsed)."""

    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}

    def __init__(self, root: str, train: bool = True, download: bool = False):
        torchvision.datasets.VisionDataset.__init__(self, root)
        self.train = train
        if download:
            torchvision.datasets.CIFAR10(root, train=train, download=True)  # fetches the MD5-checked archive
        folder = Path(root) / self.base_folder
        data, labels = [], []
        for name, _ in self.train_list if train else self.test_list:
            entry = safe_unpickle(
                folder / name, "cifar10", "Delete it and extract the official cifar-10-python.tar.gz again"
            )
            data.append(np.asarray(entry["data"], dtype=np.uint8))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [int(label) for label in labels]


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10, python version: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.

    Extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into ``data_dir`` (``download=True``
    does it). Splits: train = the first 45,000 official training images, val = the last ``val_size``
    (5,000), test = the official 10,000. Labels 0-9.

    Args:
        verify_checksums: compare each batch file with torchvision's MD5 and raise on a mismatch; turn
            off only for a deliberately modified copy of the files.
    """

    dataset_cls = _CIFAR10Files

    def __init__(self, verify_checksums: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.verify_checksums = verify_checksums

    @property
    def how_to_get(self) -> str:
        return (
            f"Expected the CIFAR-10 python batches in {self.data_dir}/cifar-10-batches-py/; extract "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {self.data_dir}"
        )

    def split_files(self, train: bool) -> list[Path]:
        folder = self.data_dir / torchvision.datasets.CIFAR10.base_folder
        batches = [name for name, _ in (_CIFAR10Files.train_list if train else _CIFAR10Files.test_list)]
        return [folder / name for name in batches] + [folder / _CIFAR10Files.meta["filename"]]

    def tensors(self, dataset):
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)

    def read(self, train: bool):
        """Check each file's MD5 against the official one before any file is parsed, then read them."""
        if self.verify_checksums and not self.download:  # (a download is checked by torchvision, below)
            self.verify(train)
        return super().read(train)

    def verify(self, train: bool) -> None:
        reference = torchvision.datasets.CIFAR10
        md5s = dict(reference.train_list + reference.test_list)
        md5s[reference.meta["filename"]] = reference.meta["md5"]
        for path in self.split_files(train):
            if not check_integrity(path, md5s[path.name]):
                raise DataError(
                    f"dataset '{self.label}': {path} is corrupt or truncated (its MD5 differs from "
                    f"the official file). Delete it and fetch it again: {self.how_to_get}."
                )


# --------------------------------------------------------------------------- per-item datasets
class _UInt8Images(Dataset):
    """Examples ``index`` of the concatenated uint8 chunks (N_k, C, H, W), as ``(x // shift, label)``.

    The chunks may be memory maps; only the requested example is read and converted to float.
    """

    def __init__(self, chunks: Sequence[np.ndarray], labels: np.ndarray, index: np.ndarray, shift: int):
        self.chunks = list(chunks)
        self.offsets = np.cumsum([0] + [len(c) for c in self.chunks])
        self.labels = labels
        self.index = index
        self.shift = shift

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = int(self.index[i])
        k = int(np.searchsorted(self.offsets, j, side="right")) - 1
        x = np.asarray(self.chunks[k][j - self.offsets[k]]) // self.shift
        return torch.from_numpy(x).float(), int(self.labels[j])


class _ImageFiles(Dataset):
    """8-bit image files decoded on demand with PIL, returned as ``(x // shift,)`` of shape ``shape``."""

    def __init__(self, files: Sequence[str], shape: tuple[int, int, int], shift: int, dataset: str):
        self.files = list(files)
        self.shape = shape
        self.shift = shift
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        channels, height, width = self.shape
        try:
            with Image.open(path) as image:
                mode = image.mode
                if mode in _8BIT_MODES:
                    pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
        except (OSError, SyntaxError) as err:
            raise _corrupt(self.dataset, [Path(path)], err, "Replace the file with a good copy.") from err
        if mode not in _8BIT_MODES:
            raise DataError(
                f"dataset '{self.dataset}': {path} has PIL mode {mode!r}; expected an 8-bit image "
                f"(one of {', '.join(_8BIT_MODES)})"
            )
        if pixels.shape[:2] != (height, width):
            raise DataError(
                f"dataset '{self.dataset}': {path} is {pixels.shape[1]}x{pixels.shape[0]} pixels, but "
                f"dataset.shape={list(self.shape)} expects {width}x{height}"
            )
        x = torch.from_numpy(pixels.reshape(height, width, channels) // self.shift)
        return (x.permute(2, 0, 1).float(),)


def _npz_member(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of the npz archive ``path``: memory-mapped when stored uncompressed, else read."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }
            if info.compress_type != zipfile.ZIP_STORED or version not in read_header:
                with np.load(path, allow_pickle=False) as whole:
                    return whole[key]
            shape, fortran_order, dtype = read_header[version](member)
            header_size = member.tell()
    with open(path, "rb") as raw:  # the member's data start after its local header
        raw.seek(info.header_offset + 26)
        name_size, extra_size = struct.unpack("<HH", raw.read(4))
    offset = info.header_offset + 30 + name_size + extra_size + header_size
    order = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


# --------------------------------------------------------------------------- per-item modules
class _PerItemImageDataModule(_ImageFileDataModule):
    """Base of image sets too large for the float32 copy :meth:`FlowDataModule.setup` makes.

    Subclasses implement :meth:`build_splits`, returning Datasets that hold uint8 arrays or file names
    and convert one example to float when it is fetched. Range and finiteness then hold by
    construction (uint8 // shift); :meth:`setup` checks the split sizes and decodes each split's first
    example so that a wrong format or shape fails at setup rather than mid-epoch.
    """

    def build_splits(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, data in self.build_splits().items():
            if len(data) == 0:
                raise DataError(f"dataset '{self.label}': the {split} split is empty")
            shape = tuple(data[0][0].shape)
            if shape != self.shape:
                raise DataError(
                    f"dataset '{self.label}': {split} examples have shape {shape}, but the config says "
                    f"dataset.shape={list(self.shape)}; fix dataset.shape or the data files"
                )
            if self.limit is not None:
                data = Subset(data, range(min(self.limit, len(data))))
            self.splits[split] = data


class ImageNetDownsampledDataModule(_PerItemImageDataModule):
    """Downsampled ImageNet at 32x32 or 64x64 (configs imagenet32, imagenet64), in one of two versions.

    ``version="chrabaszcz"`` (default): Chrabaszcz, Loshchilov & Hutter 2017, "A Downsampled Variant of
    ImageNet as an Alternative to the CIFAR datasets" (box-resized), from
    https://image-net.org/download-images (Imagenet32_train_npz.zip and Imagenet32_val_npz.zip, resp.
    Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and Imagenet64_val_npz.zip). Put
    ``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` and ``val_data.npz`` directly into
    ``data_dir``. Each npz holds ``data`` (N, 3*R*R) uint8 in channel-major order, ``labels`` 1..1000
    (returned 0-based) and ``mean`` (unused). Arrays stored uncompressed (``np.savez``) are memory-mapped,
    others are read into memory as uint8. Splits: test = ``val_data.npz`` (50,000), val = ``val_size``
    (10,000) training images drawn at random with ``seed``, train = the remaining 1,271,167.

    ``version="oord"``: the "small ImageNet" of van den Oord, Kalchbrenner & Kavukcuoglu 2016 (PixelRNN;
    also used by RealNVP and Glow), formerly at http://image-net.org/small/download.php: folders
    ``data_dir/train_{R}x{R}/`` and ``data_dir/valid_{R}x{R}/`` of PNG files (about 1.28M and 50,000),
    decoded on demand; no labels. Splits: test = ``valid_{R}x{R}``, val = ``val_size`` training images
    drawn with ``seed``, train = the rest (in file-name order).

    The two versions are resized differently and differ by roughly 0.2 bits/dim for the same model, so
    report which one a number comes from.

    ``conditional=True`` (``version="chrabaszcz"``, ``num_classes=1000``) yields ``(x, label)``.
    """

    labelled = True

    def __init__(self, resolution: int = 32, version: str = "chrabaszcz", val_size: int = 10000, **kwargs):
        super().__init__(**kwargs)
        if self.context is not None and version == "oord":
            raise ConfigError(
                "dataset.conditional=true needs class labels, but dataset.version=oord (PNG folders) has none; use "
                "dataset.version=chrabaszcz or dataset.conditional=false"
            )
        if self.context is not None and self.num_classes != 1000:
            raise ConfigError(
                f"downsampled ImageNet has 1000 classes; set dataset.num_classes=1000, not {self.num_classes}"
            )
        if resolution not in (32, 64):
            raise ConfigError(f"dataset.resolution must be 32 or 64, got {resolution!r}")
        if version not in ("chrabaszcz", "oord"):
            raise ConfigError(f"dataset.version must be 'chrabaszcz' or 'oord', got {version!r}")
        if self.shape != (3, resolution, resolution):
            raise ConfigError(
                f"dataset.shape={list(self.shape)} does not match dataset.resolution={resolution}; "
                f"use [3, {resolution}, {resolution}]"
            )
        _check_val_size(val_size)
        self.resolution = resolution
        self.version = version
        self.val_size = val_size

    def build_splits(self) -> dict[str, Dataset]:
        return self._chrabaszcz_splits() if self.version == "chrabaszcz" else self._oord_splits()

    def _chrabaszcz_splits(self) -> dict[str, Dataset]:
        train = [self._npz_batch(f"train_data_batch_{k}.npz") for k in range(1, 11)]
        chunks = [x for x, _ in train]
        labels = np.concatenate([y for _, y in train])
        train_idx, val_idx = _hold_out(len(labels), self.val_size, self.seed, self.label)
        test_x, test_y = self._npz_batch("val_data.npz")
        return {
            "train": _UInt8Images(chunks, labels, train_idx, self.bit_shift),
            "val": _UInt8Images(chunks, labels, val_idx, self.bit_shift),
            "test": _UInt8Images([test_x], test_y, np.arange(len(test_y)), self.bit_shift),
        }

    def _npz_batch(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The (N, 3, R, R) uint8 images and 0-based labels of one Chrabaszcz npz file."""
        r = self.resolution
        path = require_file(
            self.data_dir / name,
            self.label,
            f"Download the Downsampled ImageNet {r}x{r} npz archives (Chrabaszcz et al. 2017) from "
            f"https://image-net.org/download-images and put train_data_batch_1..10.npz and val_data.npz "
            f"directly into {self.data_dir}.",
        )
        try:
            data = _npz_member(path, "data")
            with np.load(path, allow_pickle=False) as archive:
                labels = archive["labels"]
        except _NPZ_READ_ERRORS as err:
            raise _corrupt(self.label, [path], err, "Download it again.") from err
        labels = np.asarray(labels).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * r * r or len(labels) != len(data):
            raise DataError(
                f"dataset '{self.label}': {path} holds data {data.dtype}{tuple(data.shape)} and "
                f"{len(labels)} labels; expected uint8 (N, {3 * r * r}) for {r}x{r} images and N labels "
                "(check dataset.resolution, or the file is corrupt)"
            )
        if len(labels) and (labels.min() < 1 or labels.max() > 1000):
            raise DataError(
                f"dataset '{self.label}': {path} has labels in [{labels.min()}, {labels.max()}]; the "
                "Downsampled ImageNet format uses 1..1000 (the file is corrupt or not in that format)"
            )
        return data.reshape(-1, 3, r, r), labels.astype(np.int64) - 1

    def _oord_splits(self) -> dict[str, Dataset]:
        r = self.resolution
        train = self._png_files(f"train_{r}x{r}")
        train_idx, val_idx = _hold_out(len(train), self.val_size, self.seed, self.label)

        def files(paths: Sequence[str]) -> _ImageFiles:
            return _ImageFiles(paths, self.shape, self.bit_shift, self.label)

        return {
            "train": files([train[i] for i in train_idx]),
            "val": files([train[i] for i in val_idx]),
            "test": files(self._png_files(f"valid_{r}x{r}")),
        }

    def _png_files(self, folder_name: str) -> list[str]:
        folder = require_file(
            self.data_dir / folder_name,
            self.label,
            f"Extract train_{self.resolution}x{self.resolution}.tar and valid_{self.resolution}x"
            f"{self.resolution}.tar of the van den Oord et al. 2016 small ImageNet into {self.data_dir}.",
        )
        names = sorted(entry.name for entry in os.scandir(folder) if entry.name.endswith(".png"))
        if not names:
            raise DataError(f"dataset '{self.label}': folder {folder} holds no .png files")
        return [os.path.join(folder, name) for name in names]


class CelebAHQDataModule(_PerItemImageDataModule):
    """CelebA-HQ (Karras et al. 2018) as used by Glow and Residual Flows: 256x256, usually 5 bits.

    Layout: ``data_dir/celebahq/00000.png`` .. ``data_dir/celebahq/29999.png`` (``extension`` "png" or
    "jpg"), image k being CelebA-HQ image k as produced by the progressive-GAN ``dataset_tool.py
    create_celebahq`` (or Glow's celeba-hq tfrecords) and saved as 8-bit files, not resized. Each image
    must be ``resolution`` x ``resolution``; files are decoded on demand, never all held in memory.
    With ``num_levels=32`` pixels are quantised by ``x // 8``.

    Splits, by index (disjoint by construction; setup also refuses two names resolving to one file):
    images 0..25,999 train, 26,000..26,999 val, 27,000..29,999 test, i.e. the first
    ``num_images - num_test`` images are for training, of which the last ``num_val`` are val.
    """

    def __init__(
        self,
        resolution: int = 256,
        extension: str = "png",
        num_images: int = 30000,
        num_test: int = 3000,
        num_val: int = 1000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if self.shape != (3, resolution, resolution):
            raise ConfigError(
                f"dataset.shape={list(self.shape)} does not match dataset.resolution={resolution}; "
                f"use [3, {resolution}, {resolution}]"
            )
        if extension not in ("png", "jpg"):
            raise ConfigError(f"dataset.extension must be 'png' or 'jpg', got {extension!r}")
        if not (0 < num_val and 0 < num_test and num_val + num_test < num_images):
            raise ConfigError(
                "dataset.num_val and dataset.num_test must be positive and leave training images: got "
                f"num_images={num_images}, num_val={num_val}, num_test={num_test}"
            )
        self.resolution = resolution
        self.extension = extension
        self.num_images = num_images
        self.num_test = num_test
        self.num_val = num_val

    def build_splits(self) -> dict[str, Dataset]:
        folder = self.data_dir / "celebahq"
        how = (
            f"Expected CelebA-HQ as {self.num_images} {self.resolution}x{self.resolution} images "
            f"{folder}/00000.{self.extension} .. {self.num_images - 1:05d}.{self.extension} (e.g. from the "
            "progressive-GAN dataset_tool.py create_celebahq, saved one file per image)."
        )
        names = (f"{i:05d}.{self.extension}" for i in range(self.num_images))
        files = [require_file(folder / name, self.label, how) for name in names]
        val_start = self.num_images - self.num_test - self.num_val
        test_start = self.num_images - self.num_test
        parts = {"train": files[:val_start], "val": files[val_start:test_start], "test": files[test_start:]}
        seen: dict[str, tuple[str, Path]] = {}
        for split, paths in parts.items():
            for path in paths:
                real = os.path.realpath(path)
                if real in seen:
                    other_split, other = seen[real]
                    raise DataError(
                        f"dataset '{self.label}': {path} ({split}) and {other} ({other_split}) are the same "
                        f"file {real}; the splits would overlap. Replace the link with the real image"
                    )
                seen[real] = (split, path)
        return {
            split: _ImageFiles([str(p) for p in paths], self.shape, self.bit_shift, self.label)
            for split, paths in parts.items()
        }
