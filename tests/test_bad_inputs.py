"""One table of bad inputs, each asserting a clear message that names the problem and the fix.

Each case is ``(id, trigger, exception type, regex)``.  ``trigger`` is either a list of Hydra overrides
(composed with the real config tree and built by :func:`flowforge.experiment.build`; a ``{tmp}`` in an
override is replaced by the test's tmp_path) or a callable ``trigger(tmp_path)``.  The regex is searched
(DOTALL) in ``str(exception)`` plus the message of its cause, so a bare type match cannot pass.
"""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, compose
from hydra.errors import ConfigCompositionException

from flowforge import experiment
from flowforge.data.base import FlowDataModule
from flowforge.errors import ConfigError, DataError

# --------------------------------------------------------------------------- triggers


def _fill(overrides, tmp_path):
    return [o.replace("{tmp}", str(tmp_path)) for o in overrides]


def _build(overrides, tmp_path):
    experiment.build(compose(_fill(overrides, tmp_path)))


def _setup(*overrides):
    """Instantiate the composed dataset and read its files."""

    def run(tmp_path):
        cfg = compose(_fill(overrides, tmp_path))
        experiment.instantiate(cfg.dataset).setup()

    return run


QUICK_TRAIN = [
    "+trainer.fast_dev_run=true",
    "callbacks=none",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "paths.output_dir={tmp}/run",
    "dataset.n_train=16",
    "dataset.n_val=8",
    "dataset.n_test=8",
    "dataset.batch_size=8",
    "model.hidden=[8]",
]


def _train(*overrides):
    def run(tmp_path):
        experiment.train(compose(_fill([*QUICK_TRAIN, *overrides], tmp_path)))

    return run


def _unknown(group):
    return (
        f"unknown-{group}",
        [f"{group}=nosuch"],
        ConfigCompositionException,
        rf"Could not find '{group}/nosuch'.*Available options in '{group}'",
    )


# --------------------------------------------------------------------------- tiny files in the real formats


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist_files(root: Path) -> Path:
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 10), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return raw


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def mnist_truncated(tmp_path):
    raw = _mnist_files(tmp_path)
    _truncate(raw / "train-images-idx3-ubyte")
    _setup("dataset=mnist", "paths.data_dir={tmp}", "+dataset.val_size=3")(tmp_path)


def cifar_truncated(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    _truncate(folder / "data_batch_3")
    _setup("dataset=cifar10", "paths.data_dir={tmp}", "+dataset.val_size=3", "+dataset.verify_checksums=false")(
        tmp_path
    )


def _power(tmp_path, array):
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", array)
    return tmp_path / "power" / "data.npy"


def power_truncated(tmp_path):
    _truncate(_power(tmp_path, np.random.default_rng(0).normal(size=(100, 8))))
    _setup("dataset=power", "paths.data_dir={tmp}")(tmp_path)


def power_wrong_columns(tmp_path):
    _power(tmp_path, np.random.default_rng(0).normal(size=(100, 7)))
    _setup("dataset=power", "paths.data_dir={tmp}")(tmp_path)


def power_empty(tmp_path):
    _power(tmp_path, np.zeros((0, 8)))
    _setup("dataset=power", "paths.data_dir={tmp}")(tmp_path)


def miniboone_not_npy(tmp_path):
    (tmp_path / "miniboone").mkdir()
    (tmp_path / "miniboone" / "data.npy").write_bytes(b"this is not an npy file")
    _setup("dataset=miniboone", "paths.data_dir={tmp}")(tmp_path)


def hepmass_mismatched(tmp_path):
    folder = tmp_path / "hepmass"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, cols in (("1000_train.csv", 28), ("1000_test.csv", 25)):
        data = np.hstack([np.ones((50, 1)), rng.normal(size=(50, cols - 1))])
        np.savetxt(folder / name, data, delimiter=",", header=",".join(f"c{i}" for i in range(cols)), comments="")
    _setup("dataset=hepmass", "paths.data_dir={tmp}")(tmp_path)


def imagenet_truncated(tmp_path):
    folder = tmp_path / "imagenet32"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(1, 11):
        np.savez(
            folder / f"train_data_batch_{k}.npz", data=rng.integers(0, 256, (3, 3072), dtype=np.uint8), labels=[1, 2, 3]
        )
    np.savez(folder / "val_data.npz", data=rng.integers(0, 256, (3, 3072), dtype=np.uint8), labels=[1, 2, 3])
    _truncate(folder / "val_data.npz")
    _setup("dataset=imagenet32", "paths.data_dir={tmp}", "+dataset.val_size=2")(tmp_path)


def data_dir_unreadable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not make a directory unreadable")
    raw = _mnist_files(tmp_path)
    os.chmod(raw, 0)
    try:
        _setup("dataset=mnist", "paths.data_dir={tmp}", "+dataset.val_size=3")(tmp_path)
    finally:
        os.chmod(raw, 0o755)


# --------------------------------------------------------------------------- data modules / flows / batches


class _Arrays(FlowDataModule):
    """A data module whose splits are given tensors."""

    def __init__(self, x, y=None, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y = x, y

    def load_splits(self):
        return {s: (self.x, self.y) for s in ("train", "val", "test")}


def _flow(*overrides):
    return experiment.instantiate(compose(["model=realnvp", *SMALL["realnvp"], *overrides]).model)


def datamodule_shape_mismatch(tmp_path):
    _Arrays(torch.randn(8, 3), shape=[2], name="toy").setup()


def datamodule_nan(tmp_path):
    x = torch.randn(8, 2)
    x[3, 1] = float("nan")
    _Arrays(x, shape=[2], name="toy").setup()


def datamodule_off_grid_images(tmp_path):
    _Arrays(torch.rand(8, 1, 4, 4), shape=[1, 4, 4], num_levels=4, name="img").setup()


def flow_wrong_shape(tmp_path):
    _flow().log_prob(torch.randn(4, 3))


def module_step(batch, *overrides, model="realnvp", stage="training"):
    """One training (or validation) step of the built module on a hand-made batch."""

    def run(tmp_path):
        cfg = compose([f"model={model}", *SMALL[model], "dataset.batch_size=4", *overrides])
        _, module = experiment.build(cfg)
        getattr(module, f"{stage}_step")(batch(), 0)

    return run


def _nan_batch():
    x = torch.randn(4, 2)
    x[0, 0] = float("inf")
    return (x,)


def _save_ckpt(tmp_path, model_overrides, name):
    """A real Lightning checkpoint of one optimisation step of a small model."""
    import pytorch_lightning as pl

    cfg = compose(
        [
            "dataset.n_train=16",
            "dataset.n_val=8",
            "dataset.n_test=8",
            "dataset.batch_size=8",
            f"paths.output_dir={tmp_path}/{name}",
            *model_overrides,
        ]
    )
    dm, module = experiment.build(cfg)
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


MAF = ["model=maf", *SMALL["maf"]]


def resume_from_other_model(tmp_path):
    ckpt = _save_ckpt(tmp_path, MAF, "maf")
    _train("model=realnvp", "model.num_steps=2", "model.channels=8", f"ckpt_path={ckpt}")(tmp_path)


def eval_state_of_other_model(tmp_path):
    ckpt = _save_ckpt(tmp_path, MAF, "maf")
    data = torch.load(ckpt, weights_only=False)
    realnvp = compose(["model=realnvp", *SMALL["realnvp"]])
    from omegaconf import OmegaConf

    data["hyper_parameters"]["config"]["model"] = OmegaConf.to_container(realnvp.model, resolve=True)
    torch.save(data, ckpt)
    experiment.evaluate(compose([f"ckpt_path={ckpt}"], config_name="eval"))


def eval_missing_ckpt(tmp_path):
    experiment.evaluate(compose([f"ckpt_path={tmp_path}/nope.ckpt"], config_name="eval"))


def eval_garbage_ckpt(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    experiment.evaluate(compose([f"ckpt_path={tmp_path}/bad.ckpt"], config_name="eval"))


def eval_ckpt_without_config(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    experiment.evaluate(compose([f"ckpt_path={tmp_path}/plain.ckpt"], config_name="eval"))


def resume_missing_ckpt(tmp_path):
    _train(f"ckpt_path={tmp_path}/nope.ckpt")(tmp_path)


def sample_with(*overrides):
    """sample.py on a real checkpoint with ``overrides``."""

    def run(tmp_path):
        ckpt = _save_ckpt(tmp_path, [], "run")
        experiment.sample(compose([f"ckpt_path={ckpt}", f"output_dir={tmp_path}/s", *overrides], config_name="sample"))

    return run


def power_with_nan(tmp_path):
    data = np.random.default_rng(0).normal(size=(100, 8))
    data[3, 2] = np.nan
    _power(tmp_path, data)
    _setup("dataset=power", "paths.data_dir={tmp}")(tmp_path)


def power_symlink_loop(tmp_path):
    (tmp_path / "power").mkdir()
    os.symlink(tmp_path / "power" / "data.npy", tmp_path / "power" / "data.npy")
    _setup("dataset=power", "paths.data_dir={tmp}")(tmp_path)


def power_dangling_symlink(tmp_path):
    (tmp_path / "power").mkdir()
    os.symlink(tmp_path / "elsewhere.npy", tmp_path / "power" / "data.npy")
    _setup("dataset=power", "paths.data_dir={tmp}")(tmp_path)


def eval_ckpt_is_directory(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    experiment.evaluate(compose([f"ckpt_path={tmp_path}/run"], config_name="eval"))


def eval_ckpt_symlink_loop(tmp_path):
    os.symlink(tmp_path / "loop.ckpt", tmp_path / "loop.ckpt")
    experiment.evaluate(compose([f"ckpt_path={tmp_path}/loop.ckpt"], config_name="eval"))


def _write_lock(folder, pid, host=None, command="python train.py (other)", slurm_job=None):
    """A run-directory lock as a run with ``pid`` on ``host`` (default: this one) leaves it."""
    import json
    import socket

    from flowforge.training.run_lock import LOCK_NAME

    folder.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "command": command, "slurm_job": slurm_job}
    (folder / LOCK_NAME).write_text(json.dumps(holder))


def run_dir_in_use(tmp_path):
    _write_lock(tmp_path / "run", os.getppid(), command="python train.py model=glow")  # a live process
    _train()(tmp_path)


def resume_with(*changes):
    """Resume the QUICK_TRAIN run from its own checkpoint with ``changes``."""

    def run(tmp_path):
        same = [o for o in _fill(QUICK_TRAIN, tmp_path) if not o.startswith(("paths.", "dataset."))]
        ckpt = _save_ckpt(tmp_path, same, "first")
        _train(f"ckpt_path={ckpt}", *changes)(tmp_path)

    return run


# --------------------------------------------------------------------------- the table

RESFLOW = ["model=resflow", *SMALL["resflow"]]
CNF = ["model=cnf", *SMALL["cnf"]]
TARGET = ["dataset=target", "objective=reverse_kl"]

CASES = [
    # unknown choice in each config group
    *[
        _unknown(g)
        for g in (
            "model",
            "dataset",
            "estimator",
            "objective",
            "optim",
            "trainer",
            "logger",
            "dequantization",
            "callbacks",
            "experiment",
            "debug",
        )
    ],
    # wrong types and ranges
    (
        "resflow-coeff-1",
        [*RESFLOW, "model.coeff=1.0"],
        ConfigError,
        r"coeff must be in \(0, 1\).*got 1\.0; use e\.g\. 0\.9",
    ),
    ("resflow-coeff-0", [*RESFLOW, "model.coeff=0"], ConfigError, r"coeff must be in \(0, 1\).*got 0; use e\.g\. 0\.9"),
    (
        "batch-size-negative",
        ["dataset.batch_size=-4"],
        ConfigError,
        r"dataset\.batch_size must be a positive integer, got -4",
    ),
    (
        "batch-size-zero",
        ["dataset.batch_size=0"],
        ConfigError,
        r"dataset\.batch_size must be a positive integer, got 0",
    ),
    (
        "batch-size-float",
        ["dataset.batch_size=2.5"],
        ConfigError,
        r"dataset\.batch_size must be a positive integer, got 2\.5",
    ),
    (
        "eval-batch-size-zero",
        ["dataset.eval_batch_size=0"],
        ConfigError,
        r"dataset\.eval_batch_size must be a positive integer",
    ),
    (
        "logit-alpha-high",
        ["dataset=digits", "dataset.logit_alpha=0.7"],
        ConfigError,
        r"logit_alpha must lie in \(0, 0\.5\), got 0\.7",
    ),
    (
        "logit-alpha-zero",
        ["dataset=digits", "dataset.logit_alpha=0"],
        ConfigError,
        r"logit_alpha must lie in \(0, 0\.5\), got 0",
    ),
    (
        "num-levels-1",
        ["dataset=digits", "dataset.num_levels=1"],
        ConfigError,
        r"dataset\.num_levels must be >= 2, got 1",
    ),
    ("warmup-negative", ["optim.warmup_steps=-1"], ConfigError, r"warmup_steps must be >= 0, got -1"),
    ("schedule-unknown", ["optim.schedule=linear"], ConfigError, r"optim.schedule='linear' is not one of constant"),
    ("min-lr-negative", ["optim.schedule=cosine", "optim.min_lr=-1"], ConfigError, r"optim.min_lr must be a number"),
    (
        "on-nonfinite-unknown",
        ["faults.on_nonfinite=explode"],
        ConfigError,
        r"on_nonfinite must be one of .*stop.*got 'explode'",
    ),
    # fault policies, fault injection and checkpoint cadence
    (
        "on-solver-failure-unknown",
        ["faults.on_solver_failure=explode"],
        ConfigError,
        r"on_solver_failure must be one of \('warn', 'stop', 'skip', 'reduce_lr'\), got 'explode'",
    ),
    (
        "on-power-iteration-skip",
        ["faults.on_power_iteration_failure=skip"],
        ConfigError,
        r"on_power_iteration_failure must be one of \('warn', 'stop', 'reduce_lr'\), got 'skip'",
    ),
    (
        "fault-lr-factor-2",
        ["faults.fault_lr_factor=2"],
        ConfigError,
        r"fault_lr_factor must be a number in \(0, 1\), got 2",
    ),
    (
        "max-fault-events-0",
        ["faults.max_fault_events=0"],
        ConfigError,
        r"max_fault_events must be a positive integer, got 0",
    ),
    (
        "faults-unknown-kind",
        _train("+faults.bogus=1"),
        ConfigError,
        r"unknown fault kind\(s\) \['bogus'\]; choose from",
    ),
    ("faults-layer-missing", _train("+faults.nan_output=1"), ConfigError, r"faults\.nan_output needs faults\.layer"),
    (
        "faults-signal-without-step",
        _train("+faults.signal=SIGTERM"),
        ConfigError,
        r"faults\.signal and faults\.signal_at_step go together",
    ),
    (
        "checkpoint-every-0",
        _train("checkpoint_every_n_steps=0"),
        ConfigError,
        r"checkpoint_every_n_steps must be a positive integer, got 0",
    ),
    (
        "lipschitz-step-iters-zero",
        [*RESFLOW, "lipschitz_step_iters=0"],
        ConfigError,
        r"lipschitz_step_iters must be null or a positive integer, got 0",
    ),
    (
        "lipschitz-step-iters-string",
        [*RESFLOW, "lipschitz_step_iters=many"],
        ConfigError,
        r"lipschitz_step_iters must be null or a positive integer, got 'many'",
    ),
    ("toy-name-unknown", ["dataset.name=spiral"], ConfigError, r"unknown toy dataset 'spiral'.*2spirals"),
    (
        "model-act-unknown",
        [*RESFLOW, "model.act=nosuch"],
        ConfigError,
        r"unknown Lipschitz activation 'nosuch'; choose one of .*lipswish",
    ),
    (
        "resflow-norm-unknown",
        [*RESFLOW, "model.norm=nosuch"],
        ConfigError,
        r"unknown Lipschitz norm 'nosuch'; choose spectral or induced",
    ),
    (
        "resflow-inverse-solver-unknown",
        [*RESFLOW, "model.inverse_solver=nosuch"],
        ConfigError,
        r"unknown solver method 'nosuch'; choose one of",
    ),
    # estimator options
    (
        "roulette-n-probes-0",
        [*RESFLOW, "estimator=roulette", "estimator.n_probes=0"],
        ConfigError,
        r"estimator\.n_probes must be an integer >= 1, got 0",
    ),
    (
        "roulette-probe-unknown",
        [*RESFLOW, "estimator=roulette", "estimator.probe=cauchy"],
        ConfigError,
        r"unknown Hutchinson probe 'cauchy'; choose one of",
    ),
    (
        "roulette-p-out-of-range",
        [*RESFLOW, "estimator=roulette", "estimator.p=1.5"],
        ConfigError,
        r"geometric p must be in \(0, 1\), got 1\.5",
    ),
    (
        "roulette-dist-unknown",
        [*RESFLOW, "estimator=roulette", "estimator.dist=binomial"],
        ConfigError,
        r"unknown roulette distribution 'binomial'; choose one of",
    ),
    (
        "hutchinson-on-resflow",
        [*RESFLOW, "estimator=hutchinson"],
        ConfigError,
        r"estimator=hutchinson is the CNF trace estimator; residual flows take exact, power_series or roulette",
    ),
    (
        "roulette-on-closed-form",
        ["estimator=roulette"],
        ConfigError,
        r"RealNVP has a closed-form log-det: use estimator=exact",
    ),
    (
        "cnf-probe-unknown",
        [*CNF, "estimator=hutchinson", "estimator.probe=cauchy"],
        ConfigError,
        r"unknown Hutchinson probe 'cauchy'; choose one of",
    ),
    (
        "cnf-n-probes-0",
        [*CNF, "estimator=hutchinson", "estimator.n_probes=0"],
        ConfigError,
        r"n_probes must be an integer >= 1, got 0",
    ),
    # CNF solver options
    (
        "cnf-method-unknown",
        [*CNF, "model.method=nosuch"],
        ConfigError,
        r"unknown ODE solver method 'nosuch'; choose one of .*model\.method",
    ),
    ("cnf-fixed-step-no-step-size", [*CNF, "model.step_size=null"], ConfigError, r"rk4.*step_size"),
    # objectives
    (
        "hybrid-lam-negative",
        ["dataset=digits", *RESFLOW, "objective=hybrid", "objective.lam=-1"],
        ConfigError,
        r"objective\.lam must be a number >= 0 or '1/D', got -1",
    ),
    (
        "hybrid-num-classes-1",
        ["dataset=digits", *RESFLOW, "objective=hybrid", "objective.num_classes=1"],
        ConfigError,
        r"objective\.num_classes must be an integer >= 2 \(e\.g\. 10\), got 1",
    ),
    (
        "reverse-kl-eval-samples-1",
        [*TARGET, "objective.eval_samples=1"],
        ConfigError,
        r"objective\.eval_samples must be an integer >= 2 \(e\.g\. 4096\), got 1",
    ),
    (
        "reverse-kl-n-samples-0",
        [*TARGET, "objective.n_samples=0"],
        ConfigError,
        r"objective\.n_samples must be null \(the batch size\) or a positive integer, got 0",
    ),
    ("reverse-kl-without-target", ["objective=reverse_kl"], ConfigError, r"but none was given; use dataset=target"),
    # target dataset options
    (
        "target-name-unknown",
        [*TARGET, "dataset.name=nosuch"],
        ConfigError,
        r"unknown target 'nosuch'; dataset\.name must be one of",
    ),
    ("target-dim-1", [*TARGET, "dataset.name=banana", "dataset.dim=1"], ConfigError, r"dim.*>= 2.*got.*1"),
    (
        "target-option-it-lacks",
        [*TARGET, "dataset.curvature=0.5"],
        ConfigError,
        r"option 'curvature' does not apply to target 'mixture2d'.*remove it or set it to null",
    ),
    # model / dataset mismatches
    (
        "manifold-model-on-euclidean-data",
        ["model=sphere"],
        ConfigError,
        r"models data on the unit sphere; use dataset=vmf_sphere",
    ),
    ("vector-model-on-images", ["model=planar", "dataset=digits"], ConfigError, r"acts on vector data"),
    (
        "variational-dequant-on-vectors",
        ["dequantization=variational"],
        ConfigError,
        r"dequantization=variational applies to integer image data.*use dequantization=uniform",
    ),
    ("coupling-on-1d", ["dataset=step1d"], ConfigError, r"coupling flows need at least 2 dimensions"),
    ("flow-matching-on-non-cnf", ["objective=flow_matching"], ConfigError, r"model=cnf"),
    # shapes, dtypes and values of data and batches
    (
        "datamodule-shape-mismatch",
        datamodule_shape_mismatch,
        DataError,
        r"examples have shape \(3,\), but the config says dataset\.shape=\[2\]; fix dataset\.shape",
    ),
    ("datamodule-nan", datamodule_nan, DataError, r"1 NaN/inf values \(first in example 3\); clean the data files"),
    ("datamodule-images-off-grid", datamodule_off_grid_images, DataError, r"image data must be integers in \[0, 3\]"),
    (
        "flow-log-prob-wrong-shape",
        flow_wrong_shape,
        DataError,
        r"expects inputs of shape \(batch, 2\), got \(4, 3\); the model was built for another dataset shape",
    ),
    (
        "step-wrong-shape",
        module_step(lambda: (torch.randn(4, 3),)),
        DataError,
        r"expects inputs of shape \(batch, 2\), got \(4, 3\)",
    ),
    # (a NaN/inf in a *training* batch is a fault handled by on_nonfinite: tests/test_faults.py)
    (
        "step-nan-val-batch",
        module_step(_nan_batch, stage="validation"),
        DataError,
        r"val batch contains 1 NaN/inf values; check the dataset files",
    ),
    (
        "step-integer-batch",
        module_step(lambda: (torch.ones(4, 2, dtype=torch.long),)),
        DataError,
        r"dtype torch\.int64, but flows take real-valued inputs of a floating dtype.*\.float\(\)",
    ),
    (
        "step-complex-batch",
        module_step(lambda: (torch.ones(4, 2, dtype=torch.complex64),)),
        DataError,
        r"dtype torch\.complex64, but flows take real-valued inputs of a floating dtype",
    ),
    (
        "step-labels-out-of-range",
        module_step(
            lambda: (torch.rand(4, 1, 8, 8).mul(16).round(), torch.tensor([0, 1, 2, 12])),
            "dataset=digits",
            "objective=hybrid",
            "objective.num_classes=10",
            model="resflow",
        ),
        ConfigError,
        r"labels range over \[0, 12\] but objective\.num_classes=10",
    ),
    pytest.param(
        "step-float-labels",
        module_step(
            lambda: (torch.rand(4, 1, 8, 8).mul(16).round(), torch.tensor([0.0, 1.5, 2.0, 3.0])),
            "dataset=digits",
            "objective=hybrid",
            model="resflow",
        ),
        DataError,
        r"labels must be integer class indices, got dtype torch\.float32; store them as int64",
        id="step-float-labels",
    ),
    (
        "step-hybrid-without-labels",
        module_step(lambda: (torch.randn(4, 2),), "objective=hybrid", model="resflow"),
        ConfigError,
        r"objective=hybrid needs class labels, but the batches of checkerboard carry none; use a labelled dataset",
    ),
    # missing dataset files: each names the expected path
    (
        "missing-mnist",
        _setup("dataset=mnist", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/mnist/MNIST/raw/\S*-ubyte does not exist.*download=true",
    ),
    (
        "missing-cifar10",
        _setup("dataset=cifar10", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/cifar10/cifar-10-batches-py/\S+ does not exist.*cifar-10-python\.tar\.gz",
    ),
    (
        "missing-power",
        _setup("dataset=power", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/power/data\.npy does not exist",
    ),
    (
        "missing-gas",
        _setup("dataset=gas", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/gas/ethylene_CO\.pickle does not exist.*ethylene_CO\.npy",
    ),
    (
        "missing-hepmass",
        _setup("dataset=hepmass", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/hepmass/1000_train\.csv does not exist",
    ),
    (
        "missing-miniboone",
        _setup("dataset=miniboone", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/miniboone/data\.npy does not exist",
    ),
    (
        "missing-bsds300",
        _setup("dataset=bsds300", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/BSDS300/BSDS300\.hdf5 does not exist",
    ),
    (
        "missing-imagenet32",
        _setup("dataset=imagenet32", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/imagenet32/\S+\.npz does not exist",
    ),
    (
        "missing-celebahq",
        _setup("dataset=celebahq", "paths.data_dir={tmp}"),
        DataError,
        r"expected file \S*/celebahq/00000\.png does not exist",
    ),
    (
        "data-dir-nonexistent",
        _setup("dataset=mnist", "paths.data_dir=/nonexistent/flowforge"),
        DataError,
        r"/nonexistent/flowforge/mnist/MNIST/raw/\S+ does not exist",
    ),
    ("data-dir-unreadable", data_dir_unreadable, DataError, r"(permission|not readable).*MNIST/raw"),
    # truncated, corrupt, wrong-format and empty files
    (
        "truncated-mnist-idx",
        mnist_truncated,
        DataError,
        r"train-images-idx3-ubyte.*one of the files is corrupt or truncated.*fetch them again",
    ),
    (
        "truncated-cifar-pickle",
        cifar_truncated,
        DataError,
        r"data_batch_3.*one of the files is corrupt or truncated.*pickle data was truncated.*fetch them again",
    ),
    (
        "truncated-power-npy",
        power_truncated,
        DataError,
        r"power/data\.npy: the file is corrupt or truncated.*Extract it again",
    ),
    ("corrupt-miniboone-npy", miniboone_not_npy, DataError, r"miniboone/data\.npy: the file is corrupt or truncated"),
    (
        "truncated-imagenet-npz",
        imagenet_truncated,
        DataError,
        r"val_data\.npz: the file is corrupt or truncated.*Download it again",
    ),
    (
        "power-wrong-columns",
        power_wrong_columns,
        DataError,
        r"power/data\.npy holds an array of shape \(100, 7\); expected a table with 8 columns",
    ),
    (
        "hepmass-files-mismatched",
        hepmass_mismatched,
        DataError,
        r"1000_train\.csv has 28 columns but 1000_test\.csv has 25",
    ),
    (
        "empty-power-file",
        power_empty,
        DataError,
        r"power/data\.npy holds no rows \(the file is empty\); extract it again",
    ),
    (
        "dataset-limit-0",
        _setup("+dataset.limit=0"),
        ConfigError,
        r"dataset\.limit must be null or a positive integer, got 0",
    ),
    # checkpoints
    (
        "eval-missing-ckpt",
        eval_missing_ckpt,
        ConfigError,
        r"nope\.ckpt does not exist; pass the path of a \.ckpt file written by train\.py",
    ),
    ("eval-garbage-ckpt", eval_garbage_ckpt, ConfigError, r"bad\.ckpt is not a readable checkpoint"),
    (
        "eval-ckpt-without-config",
        eval_ckpt_without_config,
        ConfigError,
        r"holds no flowforge run configuration; was it written by train\.py",
    ),
    (
        "eval-ckpt-weights-of-other-model",
        eval_state_of_other_model,
        ConfigError,
        r"maf\.ckpt was written by model RealNVP.*weights do not match \(Missing key.*use the same model config",
    ),
    ("train-resume-missing-ckpt", resume_missing_ckpt, ConfigError, r"nope\.ckpt does not exist"),
    (
        "train-resume-from-other-model",
        resume_from_other_model,
        ConfigError,
        r"maf\.ckpt was written by model MAF, but this run builds model RealNVP, "
        r"and the weights do not match.*use the same model config",
    ),
    # optimizer, trainer, data-size and layer-width values that passed silently or crashed
    (
        "lr-zero",
        ["optim.optimizer.lr=0"],
        ConfigError,
        r"optim\.optimizer\.lr must be a finite number > 0, got 0 \(0 would train nothing.*"
        r"e\.g\. optim\.optimizer\.lr=1e-3",
    ),
    ("lr-inf", ["optim.optimizer.lr=inf"], ConfigError, r"optim\.optimizer\.lr must be a finite number > 0, got inf"),
    ("lr-nan", ["optim.optimizer.lr=nan"], ConfigError, r"optim\.optimizer\.lr must be a finite number > 0, got nan"),
    (
        "lr-negative",
        ["optim.optimizer.lr=-0.1"],
        ConfigError,
        r"optim\.optimizer\.lr must be a finite number > 0, got -0\.1",
    ),
    (
        "lr-string",
        ["optim.optimizer.lr=fast"],
        ConfigError,
        r"optim\.optimizer\.lr must be a finite number > 0, got 'fast'",
    ),
    (
        "gradient-clip-negative",
        ["trainer.gradient_clip_val=-1"],
        ConfigError,
        r"trainer\.gradient_clip_val must be null \(no clipping\) or a finite number >= 0, got -1; "
        r"e\.g\. trainer\.gradient_clip_val=1\.0",
    ),
    (
        "accumulate-grad-batches-0",
        ["trainer.accumulate_grad_batches=0"],
        ConfigError,
        r"trainer\.accumulate_grad_batches must be a positive integer, got 0; "
        r"e\.g\. trainer\.accumulate_grad_batches=1",
    ),
    (
        "warmup-string",
        ["optim.warmup_steps=abc"],
        ConfigError,
        r"optim\.warmup_steps must be >= 0, got 'abc' \(an integer\); e\.g\. optim\.warmup_steps=1000",
    ),
    (
        "n-train-negative",
        ["dataset.n_train=-5"],
        ConfigError,
        r"dataset\.n_train must be a positive integer, got -5; e\.g\. dataset\.n_train=2000",
    ),
    (
        "coupling-hidden-0",
        ["model.hidden=[0]"],
        ConfigError,
        r"model\.hidden must be a list of positive layer widths, got \[0\]; e\.g\. model\.hidden=\[64,64\]",
    ),
    (
        "sample-num-samples-string",
        sample_with("num_samples=abc"),
        ConfigError,
        r"num_samples must be a positive integer, got 'abc'; e\.g\. num_samples=64",
    ),
    (
        "sample-num-samples-float",
        sample_with("num_samples=2.5"),
        ConfigError,
        r"num_samples must be a positive integer, got 2\.5; e\.g\. num_samples=64",
    ),
    (
        "sample-temperature-inf",
        sample_with("temperature=inf"),
        ConfigError,
        r"temperature must be a finite number > 0, got inf; e\.g\. temperature=0\.7",
    ),
    (
        "sample-temperature-nan",
        sample_with("temperature=nan"),
        ConfigError,
        r"temperature must be a finite number > 0, got nan; e\.g\. temperature=0\.7",
    ),
    (
        "uci-nan-values",
        power_with_nan,
        DataError,
        r"power/data\.npy holds 1 NaN/inf values \(first at row \d+, column \d+: nan\); the file is damaged.*"
        r"Extract it again",
    ),
    (
        "data-file-symlink-loop",
        power_symlink_loop,
        DataError,
        r"expected file \S*/power/data\.npy cannot be read: \S*/power/data\.npy is a symbolic link loop; "
        r"replace the link",
    ),
    (
        "data-file-dangling-symlink",
        power_dangling_symlink,
        DataError,
        r"power/data\.npy is a symbolic link to \S*elsewhere\.npy, which does not exist; fix or replace the link",
    ),
    (
        "eval-ckpt-is-directory",
        eval_ckpt_is_directory,
        ConfigError,
        r"ckpt_path=\S*/run is a directory \(it holds checkpoints/last\.ckpt\); pass the path of a \.ckpt file.*"
        r"e\.g\. ckpt_path=\S*/run/checkpoints/last\.ckpt",
    ),
    (
        "eval-ckpt-symlink-loop",
        eval_ckpt_symlink_loop,
        ConfigError,
        r"ckpt_path=\S*/loop\.ckpt cannot be read: \S*/loop\.ckpt is a symbolic link loop",
    ),
    (
        "lipschitz-check-every-0",
        [*RESFLOW, "lipschitz_check_every=0"],
        ConfigError,
        r"lipschitz_check_every must be a positive integer, got 0; e\.g\. lipschitz_check_every=1000",
    ),
    (
        "lipschitz-init-iters-0",
        [*RESFLOW, "lipschitz_init_iters=0"],
        ConfigError,
        r"lipschitz_init_iters must be null or a positive integer, got 0",
    ),
    # one run per folder
    (
        "run-dir-in-use",
        run_dir_in_use,
        ConfigError,
        r"the run directory \S*/run is in use by another run: pid \d+ on \S+ \(python train\.py model=glow\).*"
        r"Use another run directory \(hydra\.run\.dir=\.\.\.\)",
    ),
    # resuming with settings that would silently change the experiment
    (
        "resume-other-batch-size",
        resume_with("dataset.batch_size=4"),
        ConfigError,
        r"resuming from \S*first\.ckpt would silently change the experiment: 1 setting\(s\) differ from the run that "
        r"wrote it \(dataset\.batch_size: 8 -> 4\)\. Resume with the original values; or start a new run",
    ),
    ("resume-other-n-train", resume_with("dataset.n_train=32"), ConfigError, r"\(dataset\.n_train: 16 -> 32\)"),
    (
        "resume-other-dataset",
        resume_with("dataset.name=moons"),
        ConfigError,
        r"\(dataset\.name: 'checkerboard' -> 'moons'\)",
    ),
    (
        "resume-other-seed",
        resume_with("seed=5"),
        ConfigError,
        r"\(seed: 0 -> 5\).*seed, dataset\.\* and model\.\* cannot change on resume",
    ),
    (
        "resume-other-lr",
        resume_with("optim.optimizer.lr=0.01"),
        ConfigError,
        r"\(optim\.optimizer\.lr: 0\.001 -> 0\.01\).*e\.g\. resume_overrides=\[optim\.optimizer\.lr\]",
    ),
    (
        "resume-overrides-seed",
        resume_with("seed=5", "resume_overrides=[seed]"),
        ConfigError,
        r"resume_overrides=\['seed'\] names \['seed'\], but the seed, the data \(dataset\.\*\) and the architecture "
        r"\(model\.\*\) cannot change on resume",
    ),
    # precision
    (
        "precision-16-mixed-roulette-on-cpu",
        _train(*RESFLOW, "estimator=roulette", "trainer.precision=16-mixed"),
        ConfigError,
        r"trainer\.precision=16-mixed \(float16\) needs a GPU.*use trainer\.precision=bf16-mixed",
    ),
    ("precision-unknown", _train("trainer.precision=12"), Exception, r"[Pp]recision.*12.*(supported|one of|valid)"),
]


def _case_id(case):
    return case.id if hasattr(case, "id") else case[0]


def _case(case):
    if hasattr(case, "values"):  # a pytest.param carrying marks
        return pytest.param(*case.values[1:], marks=case.marks, id=case.id)
    return pytest.param(*case[1:], id=case[0])


IDS = [_case_id(c) for c in CASES]


@pytest.mark.parametrize("trigger,error,pattern", [_case(c) for c in CASES])
def test_bad_input_gives_clear_error(trigger, error, pattern, tmp_path):
    with pytest.raises(error) as info:
        if callable(trigger):
            trigger(tmp_path)
        else:
            _build(trigger, tmp_path)
    exc = info.value
    message = str(exc) + ("\n" + str(exc.__cause__) if exc.__cause__ is not None else "")
    assert re.search(pattern, message, re.DOTALL), message


def test_table_counts_cases():
    assert len(CASES) >= 125
    assert len(set(IDS)) == len(IDS)
