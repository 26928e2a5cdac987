"""``flowforge.data.fake`` writes files that the real data modules, built from their real configs, load:
every split has the config's shape, float32 values in range, and the training loader yields a batch;
the CLI works; and ``train.py smoke=true`` runs end to end on the fake files."""

import json
import os

import forked
import hydra
import numpy as np
import pytest
import torch
from conftest import ROOT, compose

from flowforge.data import fake

N = 16  # training examples per dataset: small and fast; the CLI and smoke runs use the default n
IMAGE = {"mnist", "cifar10", "imagenet32", "imagenet64", "celebahq"}
CLASSES = {"mnist": 10, "cifar10": 10, "imagenet32": 1000, "imagenet64": 1000}


def _data_module(name, data_dir, n=N, extra=()):
    cfg = compose([f"dataset={name}", f"paths.data_dir={data_dir}", *fake.hydra_overrides(name, n), *extra])
    return cfg, hydra.utils.instantiate(cfg.dataset)


def _split(dm, split):
    """All examples of a split: x stacked, y stacked (None for unlabelled data)."""
    data = dm.splits[split]
    if hasattr(data, "tensors"):  # MNIST, CIFAR-10 and the tabular sets: TensorDatasets
        return data.tensors[0], (data.tensors[1] if len(data.tensors) > 1 else None)
    items = [data[i] for i in range(len(data))]  # ImageNet, CelebA-HQ: decoded one example at a time
    x = torch.stack([item[0] for item in items])
    y = torch.tensor([int(item[1]) for item in items]) if len(items[0]) > 1 else None
    return x, y


def _expected_sizes(name, n):
    """(train, val, test) sizes the fake files give with the default config and hydra_overrides."""
    if name == "mnist":
        return n, fake.MNIST_VAL_SIZE, fake.n_eval(n)
    if name == "celebahq":
        return fake.CELEBAHQ_SPLITS
    if name in IMAGE or name == "bsds300":
        return n, fake.n_eval(n), fake.n_eval(n)
    return None  # MAF tabular sets: fixed 10% fractions, checked as >= n / >= 1 below


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")  # celebahq.yaml: 4 workers
@pytest.mark.parametrize("name", fake.DATASETS)
def test_fake_files_load_with_the_real_config(name, tmp_path):
    if name == "bsds300":
        pytest.importorskip("h5py")
    written = fake.write_fake_datasets(tmp_path, [name], n=N)
    assert list(written) == [name] and written[name].is_dir() and (written[name] / fake.MARKER).exists()
    cfg, dm = _data_module(name, tmp_path)
    dm.setup()
    shape = tuple(cfg.dataset.shape)
    sizes = [len(dm.splits[s]) for s in ("train", "val", "test")]
    expected = _expected_sizes(name, N)
    if expected is None:
        assert sizes[0] >= N and min(sizes) >= 1, sizes
    else:
        assert sizes == list(expected)
    lo, hi = np.inf, -np.inf
    for split in ("train", "val", "test"):
        x, y = _split(dm, split)
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == shape, (split, x.dtype, x.shape)
        assert torch.isfinite(x).all()
        if name in IMAGE:
            assert torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= cfg.dataset.num_levels - 1
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        if name in CLASSES:
            assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < CLASSES[name]
    if name in IMAGE:  # random pixels cover the whole range of levels
        assert (lo, hi) == (0, cfg.dataset.num_levels - 1)
    batch = next(iter(dm.train_dataloader()))
    x = batch[0]
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == shape
    assert len(x) == min(cfg.dataset.batch_size, sizes[0])


def test_imagenet_oord_version(tmp_path):
    fake.write_fake_datasets(tmp_path, ["imagenet32"], n=N)
    cfg, dm = _data_module("imagenet32", tmp_path, extra=["dataset.version=oord"])
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [N, fake.n_eval(N), fake.n_eval(N)]
    x = next(iter(dm.train_dataloader()))[0]
    assert tuple(x.shape[1:]) == (3, 32, 32) and 0 <= x.min() and x.max() <= 255


def test_defaults_match_the_loaders(tmp_path):
    import inspect

    from flowforge.data.images import MNISTDataModule

    # the MNIST training file holds n + the loader's default hold-out
    defaults = [inspect.signature(c.__init__).parameters.get("val_size") for c in MNISTDataModule.__mro__]
    assert next(p.default for p in defaults if p is not None) == fake.MNIST_VAL_SIZE
    # deterministic: the same bytes on every call
    a, b = tmp_path / "a", tmp_path / "b"
    fake.write_fake_datasets(a, ["gas", "cifar10"], n=8)
    fake.write_fake_datasets(b, ["gas", "cifar10"], n=8)
    for path in a.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (b / path.relative_to(a)).read_bytes(), path


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "power").mkdir()
    (tmp_path / "power" / "data.npy").write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="real power data"):
        fake.write_fake_datasets(tmp_path, ["power"])
    assert (tmp_path / "power" / "data.npy").read_bytes() == b"real data"
    fake.write_fake_datasets(tmp_path, ["gas"], n=8)
    fake.write_fake_datasets(tmp_path, ["gas"], n=8)  # its own folder is rewritten
    with pytest.raises(ValueError, match="unknown dataset"):
        fake.write_fake_datasets(tmp_path, ["svhn"])
    with pytest.raises(ValueError, match="n must be"):
        fake.write_fake_datasets(tmp_path, ["gas"], n=3)


def _python(*args, cwd, timeout=120):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("FLOWFORGE_DATA", None)
    proc = forked.run(args, cwd=cwd, env=env, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_cli(tmp_path):
    code, out = _python("-m", "flowforge.data.fake", str(tmp_path / "data"), "--datasets", "power,mnist", cwd=tmp_path)
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["mnist", "power"]
    assert (tmp_path / "data" / "power" / "data.npy").exists()
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        f"{s}-{k}" for s in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )
    assert "random" in out.lower()
    code, out = _python("-m", "flowforge.data.fake", str(tmp_path / "data"), "--datasets", "svhn", cwd=tmp_path)
    assert code == 2 and "unknown dataset" in out


@pytest.mark.parametrize("dataset, model", [("cifar10", "realnvp"), ("power", "maf")])
def test_train_smoke_run(tmp_path, dataset, model):
    data = tmp_path / "data"
    fake.write_fake_datasets(data, [dataset])
    run = tmp_path / "run"
    code, out = _python(
        str(ROOT / "train.py"),
        "smoke=true",
        f"dataset={dataset}",
        f"model={model}",
        f"paths.data_dir={data}",
        f"hydra.run.dir={run}",
        "trainer.enable_progress_bar=false",
        *fake.hydra_overrides(dataset),
        cwd=tmp_path,
    )
    assert code == 0, out[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["test/loss"]) and metrics["global_step"] == 2, metrics
