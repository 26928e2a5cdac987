"""The file-backed data modules read tiny files written here in each dataset's real format."""

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowforge.data.images import (
    CelebAHQDataModule,
    CIFAR10DataModule,
    ImageNetDownsampledDataModule,
    MNISTDataModule,
)
from flowforge.data.uci import (
    BSDS300DataModule,
    GASDataModule,
    HEPMASSDataModule,
    MINIBOONEDataModule,
    POWERDataModule,
)
from flowforge.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
RNG = np.random.default_rng(0)


def _pixels(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _split_x(dm, split: str) -> torch.Tensor:
    return torch.stack([dm.splits[split][i][0] for i in range(len(dm.splits[split]))])


def _split_y(dm, split: str) -> torch.Tensor:
    return torch.tensor([int(dm.splits[split][i][1]) for i in range(len(dm.splits[split]))])


def _assert_batch(dm, shape) -> None:
    x = next(iter(dm.train_dataloader()))[0]
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == tuple(shape)


# --------------------------------------------------------------------------- MNIST
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_dir(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for prefix, n in (("train", 10), ("t10k", 4)):
        x, y = _pixels(n, 28, 28), RNG.integers(0, 10, n).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        data[prefix] = (x, y)
    return tmp_path, data


def test_mnist_round_trip(mnist_dir):
    root, data = mnist_dir
    dm = MNISTDataModule(shape=[1, 28, 28], num_levels=256, data_dir=str(root), batch_size=4, val_size=3)
    dm.setup()
    x, y = data["train"]
    assert torch.equal(_split_x(dm, "train"), torch.from_numpy(x[:7, None]).float())
    assert torch.equal(_split_y(dm, "train"), torch.from_numpy(y[:7]).long())
    assert torch.equal(_split_x(dm, "val"), torch.from_numpy(x[7:, None]).float())
    xt, yt = data["t10k"]
    assert torch.equal(_split_x(dm, "test"), torch.from_numpy(xt[:, None]).float())
    assert torch.equal(_split_y(dm, "test"), torch.from_numpy(yt).long())
    _assert_batch(dm, (1, 28, 28))


def test_mnist_missing_and_corrupt(mnist_dir):
    root, _ = mnist_dir
    raw = root / "MNIST" / "raw"
    kwargs = dict(shape=[1, 28, 28], num_levels=256, data_dir=str(root), val_size=3)
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="download=true") as err:
        MNISTDataModule(**kwargs).setup()
    assert str(raw / "t10k-labels-idx1-ubyte") in str(err.value)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels)
    _truncate(raw / "train-images-idx3-ubyte")
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        MNISTDataModule(**kwargs).setup()
    assert str(raw / "train-images-idx3-ubyte") in str(err.value)


# --------------------------------------------------------------------------- CIFAR-10
@pytest.fixture
def cifar_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name, n in [(f"data_batch_{k}", 2) for k in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": _pixels(n, 3072), "labels": RNG.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return tmp_path, batches


def test_cifar10_round_trip(cifar_dir):
    root, batches = cifar_dir
    dm = CIFAR10DataModule(
        shape=[3, 32, 32],
        num_levels=256,
        data_dir=str(root),
        val_size=3,
        batch_size=2,
        flip=True,
        verify_checksums=False,
    )
    dm.setup()
    train = [batches[f"data_batch_{k}"] for k in range(1, 6)]
    x = np.concatenate([b["data"] for b in train]).reshape(-1, 3, 32, 32)  # channel-major rows
    y = sum((b["labels"] for b in train), [])
    assert torch.equal(_split_x(dm, "train"), torch.from_numpy(x[:7]).float())
    assert torch.equal(_split_y(dm, "val"), torch.tensor(y[7:]))
    test = batches["test_batch"]
    assert torch.equal(_split_x(dm, "test"), torch.from_numpy(test["data"].reshape(-1, 3, 32, 32)).float())
    _assert_batch(dm, (3, 32, 32))


def test_cifar10_missing_corrupt_and_checksum(cifar_dir):
    root, _ = cifar_dir
    folder = root / "cifar-10-batches-py"
    kwargs = dict(shape=[3, 32, 32], num_levels=256, data_dir=str(root), val_size=3)
    with pytest.raises(DataError, match="MD5") as err:  # our tiny files are not the official ones
        CIFAR10DataModule(**kwargs).setup()
    assert str(folder / "data_batch_1") in str(err.value)
    _truncate(folder / "data_batch_3")
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        CIFAR10DataModule(verify_checksums=False, **kwargs).setup()
    assert str(folder / "data_batch_3") in str(err.value)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as err:
        CIFAR10DataModule(verify_checksums=False, **kwargs).setup()
    assert str(folder / "test_batch") in str(err.value)


# --------------------------------------------------------------------------- Downsampled ImageNet
@pytest.fixture
def imagenet_npz(tmp_path):
    train_x, train_y = [], []
    for k in range(1, 11):
        x, y = _pixels(3, 3 * 32 * 32), RNG.integers(1, 1001, 3)
        save = np.savez if k % 2 else np.savez_compressed  # both occur in the wild
        save(tmp_path / f"train_data_batch_{k}.npz", data=x, labels=y.tolist(), mean=x.mean(0))
        train_x.append(x)
        train_y.append(y)
    test_x, test_y = _pixels(4, 3 * 32 * 32), RNG.integers(1, 1001, 4)
    np.savez(tmp_path / "val_data.npz", data=test_x, labels=test_y)
    train = (np.concatenate(train_x).reshape(-1, 3, 32, 32), np.concatenate(train_y) - 1)
    return tmp_path, train, (test_x.reshape(-1, 3, 32, 32), test_y - 1)


def _imagenet(root, val_size=5, **kwargs):
    return ImageNetDownsampledDataModule(
        shape=[3, 32, 32], num_levels=256, data_dir=str(root), batch_size=4, val_size=val_size, **kwargs
    )


def test_imagenet_chrabaszcz_round_trip(imagenet_npz):
    root, (x, y), (test_x, test_y) = imagenet_npz
    dm = _imagenet(root, seed=3)
    dm.setup()
    train, val = dm.splits["train"], dm.splits["val"]
    assert (len(train), len(val), len(dm.splits["test"])) == (25, 5, 4)
    assert sorted(np.concatenate([train.index, val.index]).tolist()) == list(range(30))
    for split in ("train", "val"):
        index = torch.from_numpy(dm.splits[split].index)
        assert torch.equal(_split_x(dm, split), torch.from_numpy(x).float()[index])
        assert torch.equal(_split_y(dm, split), torch.from_numpy(y)[index])
    assert torch.equal(_split_x(dm, "test"), torch.from_numpy(test_x).float())
    assert torch.equal(_split_y(dm, "test"), torch.from_numpy(test_y))
    # data stay uint8; uncompressed npz members are memory-mapped
    assert all(c.dtype == np.uint8 for c in train.chunks)
    assert isinstance(train.chunks[0], np.memmap) and not isinstance(train.chunks[1], np.memmap)
    _assert_batch(dm, (3, 32, 32))
    again = _imagenet(root, seed=3)
    again.setup()
    assert np.array_equal(again.splits["val"].index, val.index)
    other = _imagenet(root, seed=4)
    other.setup()
    assert not np.array_equal(other.splits["val"].index, val.index)


def test_imagenet_chrabaszcz_missing_corrupt_and_resolution(imagenet_npz):
    root = imagenet_npz[0]
    with pytest.raises(DataError, match="resolution"):
        ImageNetDownsampledDataModule(
            shape=[3, 64, 64], resolution=64, num_levels=256, data_dir=str(root), val_size=5
        ).setup()
    _truncate(root / "val_data.npz")
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        _imagenet(root).setup()
    assert str(root / "val_data.npz") in str(err.value)
    (root / "train_data_batch_7.npz").unlink()
    with pytest.raises(DataError, match="image-net.org") as err:
        _imagenet(root).setup()
    assert str(root / "train_data_batch_7.npz") in str(err.value)
    with pytest.raises(ConfigError):
        ImageNetDownsampledDataModule(shape=[3, 32, 32], resolution=48, data_dir=str(root), num_levels=256)


def _write_pngs(folder: Path, names, size: int) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    images = {}
    for name in names:
        images[name] = _pixels(size, size, 3)
        Image.fromarray(images[name]).save(folder / name)
    return images


def test_imagenet_oord_round_trip(tmp_path):
    train = _write_pngs(tmp_path / "train_32x32", [f"{i:07d}.png" for i in range(8)], 32)
    valid = _write_pngs(tmp_path / "valid_32x32", ["a.png", "b.png"], 32)
    dm = _imagenet(tmp_path, version="oord", val_size=3)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [5, 3, 2]
    seen = sorted(bytes(img.numpy().astype(np.uint8)) for s in ("train", "val") for (img,) in dm.splits[s])
    expected = sorted(bytes(a.transpose(2, 0, 1)) for a in train.values())
    assert seen == expected
    assert torch.equal(dm.splits["test"][0][0], torch.from_numpy(valid["a.png"]).permute(2, 0, 1).float())
    _assert_batch(dm, (3, 32, 32))
    with pytest.raises(DataError, match="valid_64x64"):
        ImageNetDownsampledDataModule(
            shape=[3, 64, 64], resolution=64, version="oord", num_levels=256, data_dir=str(tmp_path)
        ).setup()


# --------------------------------------------------------------------------- CelebA-HQ
@pytest.fixture
def celebahq_dir(tmp_path):
    images = _write_pngs(tmp_path / "celebahq", [f"{i:05d}.png" for i in range(10)], 8)
    return tmp_path, [images[f"{i:05d}.png"] for i in range(10)]


def _celebahq(root, **kwargs):
    return CelebAHQDataModule(
        shape=[3, 8, 8],
        resolution=8,
        num_levels=32,
        data_dir=str(root),
        num_images=10,
        num_test=3,
        num_val=2,
        batch_size=2,
        **kwargs,
    )


def test_celebahq_round_trip_5bit(celebahq_dir):
    root, images = celebahq_dir
    dm = _celebahq(root, flip=True)
    dm.setup()
    expected = torch.from_numpy(np.stack(images) // 8).permute(0, 3, 1, 2).float()
    assert torch.equal(_split_x(dm, "train"), expected[:5])
    assert torch.equal(_split_x(dm, "val"), expected[5:7])
    assert torch.equal(_split_x(dm, "test"), expected[7:])
    assert _split_x(dm, "train").max() <= 31
    _assert_batch(dm, (3, 8, 8))


def test_celebahq_bad_files(celebahq_dir):
    root, _ = celebahq_dir
    folder = root / "celebahq"
    (folder / "00009.png").unlink()
    (folder / "00009.png").symlink_to(folder / "00000.png")
    with pytest.raises(DataError, match="same file") as err:
        _celebahq(root).setup()
    assert str(folder / "00009.png") in str(err.value)
    (folder / "00009.png").unlink()
    with pytest.raises(DataError) as err:
        _celebahq(root).setup()
    assert str(folder / "00009.png") in str(err.value)
    Image.fromarray(_pixels(8, 8, 3)).save(folder / "00009.png")
    _truncate(folder / "00001.png")
    Image.fromarray(_pixels(16, 16, 3)).save(folder / "00002.png")
    dm = _celebahq(root)
    dm.setup()  # files are decoded on demand
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        dm.splits["train"][1]
    assert str(folder / "00001.png") in str(err.value)
    with pytest.raises(DataError, match="16x16") as err:
        dm.splits["train"][2]
    assert str(folder / "00002.png") in str(err.value)


# --------------------------------------------------------------------------- MAF tabular sets
def _vector(cls, root, dims, **kwargs):
    dm = cls(shape=[dims], data_dir=str(root), batch_size=16, **kwargs)
    dm.setup()
    _assert_batch(dm, (dims,))
    return [dm.splits[s].tensors[0].double().numpy() for s in ("train", "val", "test")]


def test_power(tmp_path):
    n = 200
    data = RNG.normal(size=(n, 8))
    data[:, [1, 3]] = np.nan  # dropped columns: NaN would fail the finiteness check
    data[:, 7] = np.arange(n)  # time: no noise is added
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", data)
    train, val, test = _vector(POWERDataModule, tmp_path, 6)
    assert (len(train), len(val), len(test)) == (162, 18, 20)
    fit = np.concatenate([train, val])
    assert np.allclose(fit.mean(0), 0, atol=1e-5) and np.allclose(fit.std(0), 1, atol=1e-5)
    time = np.concatenate([train, val, test])[:, 5]
    ranks = np.argsort(np.argsort(time))
    assert np.allclose(np.polyval(np.polyfit(ranks, time, 1), ranks), time, atol=1e-4)  # affine in 0..n-1
    assert not np.all(np.diff(train[:, 5]) > 0)  # rows were shuffled
    assert np.array_equal(train, _vector(POWERDataModule, tmp_path, 6)[0])


def _gas_table(n=300):
    sensors = RNG.normal(size=(n, 8))
    copies = sensors + 0.01 * RNG.normal(size=(n, 8))  # correlation > 0.98 with their originals
    meta = np.full((n, 3), np.nan)  # Time, Meth, Eth are dropped
    return np.hstack([meta, sensors, copies]), copies


@pytest.mark.parametrize("fmt", ["npy", "csv"])
def test_gas(tmp_path, fmt):
    table, kept = _gas_table()
    (tmp_path / "gas").mkdir()
    if fmt == "npy":
        np.save(tmp_path / "gas" / "ethylene_CO.npy", table)
    else:
        header = "Time,Meth,Eth," + ",".join(f"s{i}" for i in range(16))
        np.savetxt(tmp_path / "gas" / "ethylene_CO.csv", table, delimiter=",", header=header, comments="")
    train, val, test = _vector(GASDataModule, tmp_path, 8)
    assert (len(train), len(val), len(test)) == (243, 27, 30)
    expected = (kept - kept.mean(0)) / kept.std(0, ddof=1)  # the earlier column of each pair goes
    assert np.allclose(np.concatenate([train, val, test]), expected, atol=1e-5)


def test_gas_pickle_needs_pandas(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="ethylene_CO.pickle") as err:
        GASDataModule(shape=[8], data_dir=str(tmp_path)).setup()
    assert str(tmp_path / "gas" / "ethylene_CO.pickle") in str(err.value)
    (tmp_path / "gas").mkdir()
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(DataError, match="pip install pandas"):
        GASDataModule(shape=[8], data_dir=str(tmp_path)).setup()


def _hepmass_table(n, extra_column):
    labels = (np.arange(n) % 2).astype(float)
    features = RNG.normal(size=(n, 7))
    features[:, 5] = RNG.integers(0, 3, n)  # its smallest value repeats: dropped
    columns = [labels[:, None], features] + ([np.full((n, 1), 1000.0)] if extra_column else [])
    return np.hstack(columns)


def test_hepmass(tmp_path):
    folder = tmp_path / "hepmass"
    folder.mkdir()
    train_table, test_table = _hepmass_table(120, False), _hepmass_table(40, True)
    for name, table in (("1000_train.csv", train_table), ("1000_test.csv", test_table)):
        header = "# label," + ",".join(f"f{i}" for i in range(table.shape[1] - 1))
        np.savetxt(folder / name, table, delimiter=",", header=header, comments="", fmt="%.9g")
    train, val, test = _vector(HEPMASSDataModule, tmp_path, 6)
    assert (len(train), len(val), len(test)) == (54, 6, 20)  # positives only; val = last 10% of train
    positives = train_table[train_table[:, 0] == 1][:, [1, 2, 3, 4, 5, 7]]
    mean, std = positives.mean(0), positives.std(0, ddof=1)
    assert np.allclose(np.concatenate([train, val]), (positives - mean) / std, atol=1e-5)
    test_positives = test_table[test_table[:, 0] == 1][:, [1, 2, 3, 4, 5, 7]]
    assert np.allclose(test, (test_positives - mean) / std, atol=1e-5)
    _truncate(folder / "1000_test.csv", keep=0.7)
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        HEPMASSDataModule(shape=[6], data_dir=str(tmp_path)).setup()
    assert str(folder / "1000_test.csv") in str(err.value)


def test_miniboone(tmp_path):
    data = RNG.normal(size=(100, 43))
    (tmp_path / "miniboone").mkdir()
    path = tmp_path / "miniboone" / "data.npy"
    np.save(path, data)
    train, val, test = _vector(MINIBOONEDataModule, tmp_path, 43)
    assert (len(train), len(val), len(test)) == (81, 9, 10)
    mean, std = data[:90].mean(0), data[:90].std(0)
    assert np.allclose(np.concatenate([train, val, test]), (data - mean) / std, atol=1e-5)
    _truncate(path)
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        MINIBOONEDataModule(shape=[43], data_dir=str(tmp_path)).setup()
    assert str(path) in str(err.value)
    path.unlink()
    with pytest.raises(DataError, match="zenodo") as err:
        MINIBOONEDataModule(shape=[43], data_dir=str(tmp_path)).setup()
    assert str(path) in str(err.value)


def test_bsds300_round_trip(tmp_path):
    h5py = pytest.importorskip("h5py")
    (tmp_path / "BSDS300").mkdir()
    splits = {
        key: RNG.normal(size=(n, 63)).astype(np.float32) for key, n in (("train", 20), ("validation", 5), ("test", 7))
    }
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for key, value in splits.items():
            f[key] = value
    train, val, test = _vector(BSDS300DataModule, tmp_path, 63)
    for got, key in ((train, "train"), (val, "validation"), (test, "test")):
        assert np.array_equal(got, splits[key])


def test_bsds300_missing_file_and_h5py(tmp_path, monkeypatch):
    path = tmp_path / "BSDS300" / "BSDS300.hdf5"
    with pytest.raises(DataError) as err:
        BSDS300DataModule(shape=[63], data_dir=str(tmp_path)).setup()
    assert str(path) in str(err.value)
    path.parent.mkdir()
    path.write_bytes(b"\x89HDF")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError, match="pip install h5py"):
        BSDS300DataModule(shape=[63], data_dir=str(tmp_path)).setup()


def test_vector_modules_reject_flip(tmp_path):
    with pytest.raises(ConfigError, match="flip"):
        POWERDataModule(shape=[6], data_dir=str(tmp_path), flip=True)


# --------------------------------------------------------------------------- configs
FILE_CONFIGS = "mnist cifar10 imagenet32 imagenet64 celebahq power gas hepmass miniboone bsds300".split()


@pytest.mark.parametrize("name", FILE_CONFIGS)
def test_config_instantiates(name, tmp_path):
    import hydra
    from omegaconf import OmegaConf

    dataset = OmegaConf.load(CONF / f"{name}.yaml")
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "dataset": dataset})
    dm = hydra.utils.instantiate(cfg.dataset)
    assert dm.name == name and dm.dim == int(np.prod(cfg.dataset.shape))
    assert dm.data_dir.is_relative_to(tmp_path)
    with pytest.raises(DataError, match=str(tmp_path)):  # no files there: the error names where they go
        dm.setup()
