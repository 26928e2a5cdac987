"""Checkpoints, stored configurations and dataset files are untrusted input: crafted files whose payload would
create a marker file are refused, and the marker never appears."""

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import compose
from test_bad_inputs import QUICK_TRAIN, _fill, _save_ckpt

from flowforge import experiment
from flowforge.data.images import CIFAR10DataModule
from flowforge.errors import ConfigError, DataError
from flowforge.training.checkpoint_io import AtomicCheckpointIO
from flowforge.trust import check_stored_targets


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def ckpt(tmp_path):
    """A real checkpoint of one step of the default model."""
    return _save_ckpt(tmp_path, [], "run")


def _tamper(path, change):
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)


@pytest.fixture
def evil_ckpt(ckpt, tmp_path):
    marker = tmp_path / "PWNED"
    _tamper(ckpt, lambda data: data["hyper_parameters"].update(extra=_Payload(marker)))
    return ckpt, marker


@pytest.mark.parametrize("entry", ["eval", "sample", "resume"])
def test_checkpoint_payload_is_refused_and_never_runs(evil_ckpt, tmp_path, entry):
    path, marker = evil_ckpt
    with pytest.raises(
        ConfigError,
        match=r"refused to load ckpt_path=.*run\.ckpt: it holds a Python object that "
        r"would run code.*posix\.system.*source you trust",
    ):
        if entry == "eval":
            experiment.evaluate(compose([f"ckpt_path={path}"], config_name="eval"))
        elif entry == "sample":
            experiment.sample(compose([f"ckpt_path={path}", f"output_dir={tmp_path}/s"], config_name="sample"))
        else:
            experiment.train(compose(_fill([*QUICK_TRAIN, f"ckpt_path={path}"], tmp_path)))
    assert not marker.exists()


def test_lightning_resume_loads_weights_only(evil_ckpt, ckpt, tmp_path):
    """Lightning's own restore (``trainer.fit(ckpt_path=...)``, SLURM's hpc_ckpt) reads through
    AtomicCheckpointIO, which loads weights-only whatever it is asked."""
    import pytorch_lightning as pl

    path, marker = evil_ckpt
    io = AtomicCheckpointIO()
    with pytest.raises(ConfigError, match="refused to load"):
        io.load_checkpoint(path, weights_only=False)
    dm, module = experiment.build(
        compose(["dataset.n_train=16", "dataset.n_val=8", "dataset.n_test=8", "dataset.batch_size=8"])
    )
    trainer = pl.Trainer(
        max_steps=2,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[io],
    )
    with pytest.raises(ConfigError, match="refused to load"):
        trainer.fit(module, datamodule=dm, ckpt_path=path, weights_only=False)
    assert not marker.exists()


def test_stored_config_target_outside_flowforge_is_refused(ckpt, tmp_path):
    marker = tmp_path / "written.txt"
    _tamper(
        ckpt,
        lambda data: data["hyper_parameters"]["config"].update(
            dataset={"_target_": "numpy.savetxt", "fname": str(marker), "X": [1.0, 2.0]}
        ),
    )
    with pytest.raises(
        ConfigError,
        match=r"stores dataset\._target_='numpy\.savetxt', which lies outside flowforge "
        r"and torch; a stored configuration may only name flowforge classes",
    ):
        experiment.evaluate(compose([f"ckpt_path={ckpt}"], config_name="eval"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "target,problem",
    [
        ("torch.save", "is not a torch.optim optimizer or a torch.nn module"),
        ("flowforge.data.fake.write_fake_datasets", "writes files"),
        ("flowforge.training.checkpoint_io.atomic_torch_save", "writes files"),
        ("flowforge.experiment.train", "is a flowforge function, not a class or flow family"),
        ("os.system", "lies outside flowforge and torch"),
        ("flowforge.flows.nosuch.Thing", "does not exist"),
    ],
)
def test_stored_targets_allow_only_models_data_and_optimizers(target, problem):
    config = {"model": {"_target_": "flowforge.flows.realnvp.RealNVP", "inner": [{"_target_": target}]}}
    with pytest.raises(ConfigError, match=rf"model\.inner\[0\]\._target_='{target}', which .*{problem}"):
        check_stored_targets(config, "x.ckpt")
    check_stored_targets(
        {
            "model": {"_target_": "flowforge.flows.planar.planar_family"},
            "optim": {"optimizer": {"_target_": "torch.optim.AdamW"}},
            "dataset": {"_target_": "flowforge.data.toy2d.Toy2DDataModule"},
        },
        "x.ckpt",
    )


def _cifar_files(root, payload=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))  # the protocol of the official files
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    if payload is not None:
        (folder / "data_batch_1").write_bytes(pickle.dumps({"data": payload, "labels": [0]}))
    return folder


def test_cifar_batch_payload_is_refused_before_and_by_parsing(tmp_path):
    marker = tmp_path / "PWNED"
    folder = _cifar_files(tmp_path, _Payload(marker))
    kwargs = dict(shape=[3, 32, 32], num_levels=256, data_dir=str(tmp_path), val_size=3)
    with pytest.raises(DataError, match=r"data_batch_1 is corrupt or truncated \(its MD5 differs"):
        CIFAR10DataModule(**kwargs).setup()  # checked before it is parsed
    assert not marker.exists()
    with pytest.raises(
        DataError,
        match=rf"refused to read {folder}/data_batch_1: it asks to load posix\.system, "
        r"which is not part of the data format.*extract the official",
    ):
        CIFAR10DataModule(verify_checksums=False, **kwargs).setup()  # parsed without running code
    assert not marker.exists()


def test_cifar_batches_in_the_official_pickle_protocol_still_load(tmp_path):
    _cifar_files(tmp_path)
    dm = CIFAR10DataModule(
        shape=[3, 32, 32], num_levels=256, data_dir=str(tmp_path), val_size=3, verify_checksums=False
    )
    dm.setup()
    assert len(dm.splits["train"]) == 7 and len(dm.splits["test"]) == 2


def test_gas_pickle_payload_is_refused_without_running(tmp_path, monkeypatch):
    import types

    from flowforge.data.uci import GASDataModule

    monkeypatch.setitem(__import__("sys").modules, "pandas", types.ModuleType("pandas"))  # (pandas is optional)
    marker = tmp_path / "PWNED"
    (tmp_path / "gas").mkdir()
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(
        DataError,
        match=r"refused to read \S+ethylene_CO\.pickle: it asks to load posix\.system.*"
        r"ethylene_CO\.npy",
    ):
        GASDataModule(shape=[8], data_dir=str(tmp_path), name="gas").setup()
    assert not marker.exists()
