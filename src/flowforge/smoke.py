"""``+smoke=true``: the same run at a tiny size, to prove a recipe or a whole sweep end to end on a CPU.

:func:`shrink` rewrites a composed run configuration in place: the model keeps its family, data shape and
options but gets a tiny width and depth (the ``smoke`` sizes its family declares in
:mod:`flowforge.flows.registry`, found from the model's ``_target_``); training runs one epoch of at most
``train_batches`` batches of ``batch_size`` on the CPU in float32, validation and test one batch; the data
module keeps at most ``limit`` examples per split, and image hold-outs shrink to what
``python -m flowforge.data.fake`` writes (:data:`DATA_SIZES`; checksums are not verified).  Everything else
(the estimator, the objective, the dequantisation, the callbacks, the sweep's table metadata) is left alone, so
a smoke run exercises the same code path as the real one.  Sweep files document their smoke command;
``python -m flowforge.data.fake DIR`` writes tiny files in every dataset's real format for sweeps over
file-backed datasets.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, open_dict

from flowforge.errors import ConfigError
from flowforge.flows.registry import family_of

#: tiny evaluation hold-outs per data module class (the smoke files of ``flowforge.data.fake`` have 16 val and
#: test images; checksums of the official files cannot match them)
DATA_SIZES: dict[str, dict] = {
    "CIFAR10DataModule": {"val_size": 16, "verify_checksums": False},
    "ImageNetDownsampledDataModule": {"val_size": 16},
    "CelebAHQDataModule": {"num_images": 10, "num_val": 2, "num_test": 2},
}


def smoke_sizes(target: str) -> dict:
    """The smoke constructor arguments of the family whose factory ``target`` names ({} without a target)."""
    if not target:
        return {}
    family = family_of(target)
    if family is None:
        raise ConfigError(
            f"smoke=true needs the smoke sizes of the model's family, but {target} (model._target_) is no registered "
            "flow family's factory: declare the family next to it with register_family (flowforge.flows.registry)"
        )
    return dict(family.smoke)


def shrink(cfg: DictConfig, limit: int = 32, batch_size: int = 16, train_batches: int = 2) -> DictConfig:
    """Make ``cfg`` a smoke run (see the module docstring); returns it."""
    with open_dict(cfg):
        for key, value in smoke_sizes(str(cfg.model.get("_target_") or "")).items():
            if key in cfg.model:
                current = cfg.model[key]
                if key == "blocks_per_scale" and isinstance(value, list) and isinstance(current, ListConfig):
                    value = [1] * len(current)  # one block in each of the recipe's scales
                cfg.model[key] = value
        trainer = cfg.trainer
        trainer.accelerator, trainer.devices, trainer.precision = "cpu", 1, 32
        for key in ("strategy", "sync_batchnorm"):
            trainer.pop(key, None)
        trainer.num_nodes = 1
        trainer.max_epochs, trainer.max_steps = 1, -1
        trainer.limit_train_batches, trainer.limit_val_batches, trainer.limit_test_batches = train_batches, 1, 1
        trainer.num_sanity_val_steps = 0
        data = cfg.dataset
        data.update(DATA_SIZES.get(str(data.get("_target_", "")).rsplit(".", 1)[-1], {}))
        data.limit = min(int(data.get("limit") or limit), limit)
        data.batch_size = min(int(data.batch_size), batch_size)
        if data.get("eval_batch_size") is not None:
            data.eval_batch_size = min(int(data.eval_batch_size), batch_size)
        if "num_workers" in data:
            data.num_workers = 0
        figures = (cfg.get("callbacks") or {}).get("sample_figures")
        if figures is not None and "num_images" in figures:
            figures.num_images = 4
        if cfg.get("objective") is not None and cfg.objective.get("eval_samples"):
            cfg.objective.eval_samples = min(int(cfg.objective.eval_samples), 256)
    return cfg
