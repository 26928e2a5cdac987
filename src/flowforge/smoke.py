"""``+smoke=true``: the same run at a tiny size, to prove a recipe or a whole sweep end to end on a CPU.

:func:`shrink` rewrites a composed run configuration in place: the model keeps its family, data shape and
options but gets a tiny width and depth (:data:`SIZES`, by model class); training runs one epoch of at most
``train_batches`` batches of ``batch_size`` on the CPU in float32, validation and test one batch; the data
module keeps at most ``limit`` examples per split, and image hold-outs shrink to what
``python -m flowforge.data.fake`` writes (:data:`DATA_SIZES`; checksums are not verified).  Everything else (the
estimator, the objective, the
dequantisation, the callbacks, the sweep's table metadata) is left alone, so a smoke run exercises the same
code path as the real one.  Sweep files document their smoke command; ``python -m flowforge.data.fake DIR``
writes tiny files in every dataset's real format for sweeps over file-backed datasets.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, open_dict

#: tiny constructor arguments per model class (only keys the model config has are set)
SIZES: dict[str, dict] = {
    "RealNVP": {"num_steps": 2, "hidden": [16], "channels": 8, "num_scales": 2},
    "Glow": {"num_steps": 2, "hidden": [16], "channels": 8, "num_scales": 2},
    "NICE": {"num_steps": 2, "hidden": [16], "channels": 8},
    "NSF": {"num_steps": 2, "hidden": [16], "channels": 8, "bins": 4},
    "MAF": {"num_layers": 2, "hidden": [16]},
    "IAF": {"num_layers": 2, "hidden": [16]},
    "ResidualFlow": {
        "num_blocks": 2,
        "hidden": [8],
        "blocks_per_scale": [1],
        "channels": 4,
        "fc_blocks": 1,
        "fc_hidden": [8],
        "depth": 2,
        "growth": 4,
        "fc_growth": 8,
    },
    "IResNet": {
        "num_blocks": 2,
        "hidden": [8],
        "blocks_per_scale": [1],
        "channels": 4,
        "fc_blocks": 1,
        "fc_hidden": [8],
    },
    "ImplicitFlow": {
        "num_blocks": 2,
        "hidden": [8],
        "blocks_per_scale": [1],
        "channels": 4,
        "fc_blocks": 1,
        "fc_hidden": [8],
    },
    "MonotoneFlow": {
        "num_blocks": 2,
        "depth": 2,
        "growth": 4,
        "fc_g": "mlp",
        "fc_hidden": [8],
        "blocks_per_scale": [1],
        "fc_blocks": 1,
    },
    "FFJORD": {
        "num_blocks": 2,
        "hidden": [8],
        "channels": 4,
        "kernels": [3, 3],
        "blocks_per_scale": 1,
        "method": "rk4",
        "step_size": 0.5,
    },
    "planar_family": {"num_layers": 3},
    "radial_family": {"num_layers": 3},
}


#: tiny evaluation hold-outs per data module class (the smoke files of ``flowforge.data.fake`` have 16 val and
#: test images; checksums of the official files cannot match them)
DATA_SIZES: dict[str, dict] = {
    "CIFAR10DataModule": {"val_size": 16, "verify_checksums": False},
    "ImageNetDownsampledDataModule": {"val_size": 16},
    "CelebAHQDataModule": {"num_images": 10, "num_val": 2, "num_test": 2},
}


def shrink(cfg: DictConfig, limit: int = 32, batch_size: int = 16, train_batches: int = 2) -> DictConfig:
    """Make ``cfg`` a smoke run (see the module docstring); returns it."""
    with open_dict(cfg):
        model_class = str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1]
        for key, value in SIZES.get(model_class, {}).items():
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
