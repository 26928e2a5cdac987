"""Experiment entry points behind ``train.py``, ``eval.py`` and ``sample.py``.

Hydra composes the configuration; this module only instantiates what the config names, wires it into
a Lightning ``Trainer`` and reports where the results went.  Nothing here does mathematics.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import hydra.errors
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from flowforge.checks import check_moved_keys, check_run_config, positive_finite, positive_int
from flowforge.data.base import broken_link
from flowforge.errors import ConfigError, FlowforgeError, NonFiniteLossError
from flowforge.flows.dequantization import check_dequantization, make_dequantizer
from flowforge.flows.registry import family_names
from flowforge.interrupt import StopRequested
from flowforge.run_info import (
    config_tree,
    is_rank_zero,
    job_name,
    log_to_files,
    parameter_count,
    quiet_known_noise,
    run_name,
    write_status,
)
from flowforge.smoke import shrink
from flowforge.threads import set_threads
from flowforge.training.callbacks import SampleFigures
from flowforge.training.checkpoint_io import AtomicCheckpointIO
from flowforge.training.fault_policy import POLICY_KEYS, FaultPolicy, TrainingStopped, fault_policy
from flowforge.training.faults import FaultInjection, locate_nonfinite, nonfinite_samples, nonfinite_tensors
from flowforge.training.lipschitz_maintenance import LipschitzMaintenance
from flowforge.training.module import FlowModule
from flowforge.training.objectives import make_objective
from flowforge.training.posterior_checks import PosteriorChecks
from flowforge.training.resume import EvaluationSeeds, ExactResume, check_resume_config
from flowforge.training.run_lock import run_lock
from flowforge.trust import check_stored_targets, load_torch_file
from flowforge.wandb_mode import wandb_mode

log = logging.getLogger("flowforge")


def _run_id() -> str:
    """Name of a run's folder: ``slurm-<job id>`` inside a SLURM batch job (``<array job>_<task>`` for arrays), so
    a requeued job finds its own checkpoints again; otherwise the start time."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NAME") not in (None, "bash", "interactive"):
        if env.get("SLURM_ARRAY_JOB_ID"):
            return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
        return f"slurm-{env['SLURM_JOB_ID']}"
    from datetime import datetime

    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _slurm_tasks(devices: Any) -> int:
    """SLURM tasks per node for ``trainer.devices``: Lightning's DDP under SLURM runs one task per device."""
    if isinstance(devices, int) and devices > 0:
        return devices
    raise ConfigError(
        f"hydra/launcher=slurm needs trainer.devices as the number of GPUs per node (a positive "
        f"integer), got {devices!r}; e.g. trainer.devices=4"
    )


def _slurm_gpus(accelerator: str, devices: Any) -> int | None:
    return None if str(accelerator) == "cpu" else _slurm_tasks(devices)


def context_of(dataset: Any) -> Any:
    """``model.context`` of a run (:mod:`flowforge.flows.context`) from its dataset config: the dataset's own
    ``context`` (a conditional dataset such as dataset=sbi), ``{classes: num_classes}`` for a labelled dataset with
    ``conditional: true``, else None (an unconditional model)."""
    context = dataset.get("context") if hasattr(dataset, "get") else None
    if context is not None:
        return context
    if hasattr(dataset, "get") and dataset.get("conditional"):
        classes = dataset.get("num_classes")
        if not classes:
            raise ConfigError(
                f"dataset.conditional=true needs class labels, but dataset={dataset.get('name')} declares no "
                "num_classes; conditional datasets: digits, mnist, cifar10 (labels), sbi, conditional toys"
            )
        return {"classes": classes}
    return None


if not OmegaConf.has_resolver("context_of"):
    OmegaConf.register_new_resolver("context_of", context_of)
if not OmegaConf.has_resolver("slurm_tasks"):
    OmegaConf.register_new_resolver("slurm_tasks", _slurm_tasks)
    OmegaConf.register_new_resolver("slurm_gpus", _slurm_gpus)
if not OmegaConf.has_resolver("wandb_mode"):
    OmegaConf.register_new_resolver("wandb_mode", wandb_mode)
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", _run_id, use_cache=True)
if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", run_name)
    OmegaConf.register_new_resolver("job_name", job_name)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets flowforge's own clear errors through unwrapped."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except hydra.errors.InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, FlowforgeError):
            raise cause from None
        raise


def check_context(cfg: DictConfig, model: Any) -> None:
    """A dataset that carries a context needs a conditional model: a model config that does not pass
    ``model.context`` would train p(x) and silently drop the context."""
    context = context_of(cfg.dataset)
    if context is not None and not getattr(model, "conditional", False):
        context = OmegaConf.to_container(context) if isinstance(context, DictConfig) else context
        raise ConfigError(
            f"dataset={cfg.dataset.get('name')} carries a context ({context}) "
            f"but model={cfg.model.get('_target_')} built an unconditional model; its config must pass "
            "context: ${context_of:${dataset}} (and the family condition on it), or use an unconditional dataset"
        )


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, FlowModule]:
    """Instantiate the data module and the LightningModule (with its flow) from a composed config."""
    check_run_config(cfg)
    datamodule = instantiate(cfg.dataset)
    model = instantiate(cfg.model)
    check_context(cfg, model)
    apply_dequantization(cfg, model)
    check_estimator(cfg, model)
    module = FlowModule(
        model=model,
        optimizer=hydra.utils.instantiate(cfg.optim.optimizer),
        warmup_steps=cfg.optim.warmup_steps,
        schedule=cfg.optim.get("schedule", "constant"),
        min_lr=cfg.optim.get("min_lr", 0.0),
        config=OmegaConf.to_container(cfg, resolve=True),
        objective=make_objective(OmegaConf.to_container(cfg.objective, resolve=True) if cfg.get("objective") else None),
        target=getattr(datamodule, "target", None),
        compile=cfg.get("compile", False),
        callbacks=[
            FaultPolicy(**_fault_options(cfg)[0]),
            LipschitzMaintenance(
                **{arg: cfg[key] for arg, key in LIPSCHITZ_KEYS.items() if key in cfg},
                checkpoint_every=cfg.get("checkpoint_every_n_steps"),
            ),
            *posterior_checks(cfg, datamodule),
        ],
    )
    return datamodule, module


def posterior_checks(cfg: DictConfig, datamodule: pl.LightningDataModule) -> list[pl.Callback]:
    """C2ST against the reference posteriors and pair plots for simulation-based inference data (a data module with
    ``posterior_reference``, :mod:`flowforge.data.sbi`); none for other data."""
    if not hasattr(datamodule, "posterior_reference"):
        return []
    out = _output_dir(cfg)
    return [PosteriorChecks(None if out is None else out / "figures")]


#: top-level keys of ``conf/train.yaml`` that configure :class:`LipschitzMaintenance`
LIPSCHITZ_KEYS = {
    "step_iters": "lipschitz_step_iters",
    "check_every": "lipschitz_check_every",
    "step_method": "lipschitz_step_method",
    "init_iters": "lipschitz_init_iters",
}


def _fault_options(cfg: DictConfig) -> tuple[dict, dict]:
    """The ``faults`` group split into the :class:`FaultPolicy` options and the :class:`FaultInjection` ones."""
    faults = OmegaConf.to_container(cfg.faults, resolve=True) if cfg.get("faults") else {}
    return {k: faults.pop(k) for k in POLICY_KEYS if k in faults}, faults


def apply_dequantization(cfg: DictConfig, model: torch.nn.Module) -> str | None:
    """Give an image model the dequantiser ``cfg.dequantization`` names; returns its name (None for vectors).

    Models are built with uniform dequantisation (or Gaussian noise augmentation, TarFlow's ``model.noise_std``);
    any other choice replaces uniform ``model.dequantizer`` (so its parameters are trained with the flow).  Vector
    data are not quantised: only ``uniform`` is accepted.
    """
    options = dict(cfg.get("dequantization") or {})
    name = check_dequantization(options.pop("name", "uniform"))
    if not getattr(model, "is_image", False):
        if name != "uniform":
            dataset = cfg.dataset.get("name") or "the dataset"
            raise ConfigError(
                f"dequantization={name} applies to integer image data (e.g. dataset=digits, mnist, cifar10), but "
                f"{dataset} is vector data of shape {tuple(model.data_shape)}; use dequantization=uniform (the default)"
            )
        return None
    if name != "uniform":
        if model.dequantizer.name != "uniform":
            raise ConfigError(
                f"dequantization={name} replaces uniform dequantisation, but this model already adds "
                f"{model.dequantizer.name} noise (model.noise_std); choose one: model.noise_std=null or "
                "dequantization=uniform"
            )
        model.dequantizer = make_dequantizer(name, model.data_shape, cfg.dataset.num_levels, **options)
    return model.dequantizer.name


def check_estimator(cfg: DictConfig, model: torch.nn.Module) -> None:
    """A stochastic log-det estimator only means something for models that estimate their log-det."""
    name = (cfg.get("estimator") or {}).get("name", "exact")
    if name not in ("exact", "auto") and not any(hasattr(m, "logdet_estimator") for m in model.modules()):
        target = str(cfg.model.get("_target_", "?")).rsplit(".", 1)[-1]
        raise ConfigError(
            f"estimator={name} applies to flows whose log-det is estimated "
            f"(model={family_names(lambda f: f.log_det == 'estimated')}); "
            f"{target} has a closed-form log-det: use estimator=exact"
        )


def _instantiate_group(node: DictConfig | None) -> list:
    if not node:
        return []
    return [hydra.utils.instantiate(v) for v in node.values() if v is not None and "_target_" in v]


def make_trainer(cfg: DictConfig, **overrides: Any) -> pl.Trainer:
    every = cfg.get("checkpoint_every_n_steps", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(
            f"checkpoint_every_n_steps must be a positive integer, got {every!r} (last.ckpt is rewritten "
            "that often; e.g. 200)"
        )
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar") is False:  # the bar's callback would make Lightning refuse the option
        callbacks = [cb for cb in callbacks if not isinstance(cb, pl.callbacks.ProgressBar)]
    injection = _fault_options(cfg)[1]
    if injection:
        callbacks.append(FaultInjection(**injection))
    loggers = _instantiate_group(cfg.get("logger"))
    for lg in loggers:
        # the CSV logger's copy (csv/version_0/hparams.yaml, written through OmegaConf at ~0.15 s a run) would repeat
        # the run folder's .hydra/config.yaml; W&B and TensorBoard show the configuration in their interfaces
        if not isinstance(lg, pl.loggers.CSVLogger):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    precision, accelerator = str(cfg.trainer.get("precision")), str(cfg.trainer.get("accelerator", "auto"))
    if precision in ("16-mixed", "16", "16-true") and (
        accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    ):
        raise ConfigError(
            f"trainer.precision={precision} (float16) needs a GPU, but this run trains on the CPU, where Lightning "
            "would silently switch to bfloat16; use trainer.precision=bf16-mixed on the CPU (or 32)"
        )
    overrides.setdefault("plugins", [AtomicCheckpointIO()])
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path`` as a file: a path is checked to exist; ``last`` is the newest ``last*.ckpt`` or SLURM
    ``hpc_ckpt_<n>.ckpt`` of this run's folder (None when there is none yet: a fresh start, so the same command
    can start and resume a job); null stays null."""
    value = cfg.get("ckpt_path")
    if value is None or value != "last":
        return value
    out = Path(cfg.paths.output_dir)
    found = [p for p in (out / "checkpoints").glob("last*.ckpt")] + list(out.glob("hpc_ckpt_*.ckpt"))
    if not found:
        log.info("ckpt_path=last: no checkpoint in %s yet; starting from scratch", out)
        return None
    return str(max(found, key=lambda p: p.stat().st_mtime_ns))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) the configured model, holding the lock of its run directory
    (:mod:`flowforge.training.run_lock`: one run per folder); returns the final metrics."""
    check_moved_keys(list(cfg.keys()))
    if cfg.get("smoke"):
        shrink(cfg)
    _record_overrides(cfg)
    _show_config(cfg)
    with run_lock(Path(cfg.paths.output_dir)):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
    set_threads(cfg.get("threads", "auto"), cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", 1))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    datamodule, module = build(cfg)
    num_parameters = _show_parameters(module.model)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path and cfg.get("train", True):  # resuming: a clear error for a missing or foreign checkpoint
        stored, ckpt = load_checkpoint(ckpt_path)
        load_weights(module, ckpt_path, model_name(cfg), ckpt)
        module.resume_changes = check_resume_config(
            OmegaConf.to_container(stored),
            OmegaConf.to_container(cfg, resolve=True),
            ckpt_path,
            list(cfg.get("resume_overrides") or []),
        )
    # A resumed fit skips the sanity validation: the run it continues did it at its start, and an extra
    # validation is not free of side effects (it can refine the power-iteration state of the EMA weights),
    # so it would make the resumed run differ from the uninterrupted one.
    trainer = make_trainer(cfg, **({"num_sanity_val_steps": 0} if ckpt_path and cfg.get("train", True) else {}))
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("train", True):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except TrainingStopped as stop:
            raise stop.error(f"{stop.reason}. Checkpoints: {out_dir / 'checkpoints'}") from None
        except (SIGTERMException, StopRequested):
            saved = [
                cb.saved_on_signal for cb in trainer.callbacks if isinstance(cb, ExactResume) and cb.saved_on_signal
            ]
            where = (
                f"saved {saved[0]}; resume with ckpt_path={saved[0]}"
                if saved
                else f"resume from the newest checkpoint in {out_dir / 'checkpoints'} (ckpt_path=last)"
            )
            print(f"stopped by SIGTERM at step {trainer.global_step}: {where}", flush=True)
            raise SystemExit(143) from None
        if ckpt_path and not any(
            getattr(cb, "trained", True) for cb in trainer.callbacks if isinstance(cb, ExactResume)
        ):
            # resuming a run that had already finished: Lightning skips the fit loop and its hooks, so the
            # weights for testing are taken from the checkpoint (its EMA average when EMA was on)
            load_weights(module, ckpt_path, model_name(cfg))
        _retire_hpc_checkpoints(Path(trainer.default_root_dir), out_dir / "checkpoints")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    policy = fault_policy(trainer)
    if policy is not None and policy.stop_reason:
        raise policy.stop_error(f"{policy.stop_reason}. Checkpoints: {out_dir / 'checkpoints'}")
    if cfg.get("test", True):
        _final_test(trainer, module, datamodule, out_dir)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    check_finite_result(metrics, module, datamodule, f"the run in {out_dir}")
    metrics["epochs_run"] = float(trainer.current_epoch)
    metrics["global_step"] = float(trainer.global_step)
    metrics["num_parameters"] = num_parameters
    if trainer.is_global_zero:
        flow = module.model
        _report(out_dir, metrics, trainer, flow.dequantizer.name if flow.is_image else None)
    return metrics


def _show_config(cfg: DictConfig) -> None:
    """Print the composed config as a tree (rank 0 only) and save it as ``config_tree.txt`` in the run folder."""
    if not is_rank_zero():
        return
    text = config_tree(cfg)
    print(text, end="" if text.endswith("\n") else "\n", flush=True)
    out_dir = _output_dir(cfg)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config_tree.txt").write_text(text)


def _show_parameters(model: torch.nn.Module) -> int:
    """Print (rank 0) and log the flow's parameter count; returns the total."""
    total, trainable = parameter_count(model)
    if is_rank_zero():
        line = f"model parameters: {total:,} ({trainable:,} trainable)"
        print(line, flush=True)
        log_to_files(log, line)
    return total


def _output_dir(cfg: DictConfig) -> Path | None:
    """The run folder (``paths.output_dir``), or None outside a Hydra run (e.g. a config composed in a test)."""
    try:
        value = OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - no Hydra runtime: nothing to mark
        return None
    return Path(value) if value else None


def _final_test(trainer: pl.Trainer, module: FlowModule, datamodule: pl.LightningDataModule, out_dir: Path) -> None:
    """``trainer.test``; SIGTERM during it (Lightning's SIGTERMException is a SystemExit without a code, which would
    end the program with status 0 and no metrics.json) ends the run with status 143 and the way to finish it."""
    try:
        trainer.test(module, datamodule=datamodule)
    except (SIGTERMException, StopRequested):
        print(
            f"stopped by SIGTERM during the final test (training had finished at step {trainer.global_step}); no "
            f"metrics.json was written. Test the trained weights by resuming with ckpt_path=last and "
            f"hydra.run.dir={out_dir} (the resume only tests), or with eval.py",
            flush=True,
        )
        raise SystemExit(143) from None


def _record_overrides(cfg: DictConfig) -> None:
    """Store the run's command-line overrides (Hydra's ``overrides.task``) as ``cfg.overrides``, so the saved config,
    the checkpoint and the W&B run all say which point of a sweep this run is (``flowforge.report`` matches
    table cells on them)."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("overrides") is not None or not HydraConfig.initialized():
        return
    with open_dict(cfg):
        cfg.overrides = list(HydraConfig.get().overrides.task)


def _retire_hpc_checkpoints(root: Path, checkpoints: Path) -> None:
    """After a completed fit, move SLURM's ``hpc_ckpt_<n>.ckpt`` into the checkpoint folder as
    ``preempted-hpc_ckpt_<n>.ckpt``: under SLURM Lightning would otherwise load the stale pre-emption state for
    ``trainer.test`` (and for a rerun of the job) instead of the trained weights."""
    for p in sorted(root.glob("hpc_ckpt_*.ckpt")):
        checkpoints.mkdir(parents=True, exist_ok=True)
        os.replace(p, checkpoints / f"preempted-{p.name}")


def _report(out_dir: Path, metrics: dict[str, float], trainer: pl.Trainer, dequantization: str | None = None) -> None:
    """Write metrics.json (plus ``"dequantization": name`` for image models, whose bits/dim it qualifies)
    and print where the results are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = dict(metrics) if dequantization is None else {**metrics, "dequantization": dequantization}
    (out_dir / "metrics.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    figures = [cb.last_path for cb in trainer.callbacks if isinstance(cb, SampleFigures) and cb.last_path]
    lines = [f"run directory: {out_dir}", f"metrics: {out_dir / 'metrics.json'}"]
    for lg in trainer.loggers:
        if type(lg).__name__ == "CSVLogger":
            lines.append(f"metric history: {Path(lg.log_dir) / 'metrics.csv'}")
    lines += [f"figure: {p}" for p in figures]
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("test/")}
    lines.append(f"test metrics: {shown}")
    if dequantization == "gaussian":
        lines.append(
            "dequantization: gaussian (bits/dim of the Gaussian-noise-augmented density in pixel units, not a bound "
            "on the discrete bits/dim)"
        )
    elif dequantization is not None:
        lines.append(f"dequantization: {dequantization}")
    print("\n".join(lines), flush=True)
    log_to_files(log, "\n".join(lines))


def load_checkpoint(ckpt_path: str, map_location: str = "cpu") -> tuple[DictConfig, dict]:
    """The run configuration stored in a flowforge checkpoint, and the checkpoint itself."""
    path = Path(ckpt_path)
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a directory{hint}; pass the path of a .ckpt file written by "
            f"train.py, e.g. ckpt_path={path / 'checkpoints' / 'last.ckpt'}"
        )
    if not path.is_file():
        link = broken_link(path)
        if link:
            raise ConfigError(f"ckpt_path={ckpt_path} cannot be read: {link}")
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist; pass the path of a .ckpt file written by train.py")
    try:
        ckpt = load_torch_file(path, map_location)
    except FlowforgeError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise ConfigError(f"ckpt_path={ckpt_path} is not a readable checkpoint ({e})") from e
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if not config:
        raise ConfigError(f"{ckpt_path} holds no flowforge run configuration; was it written by train.py?")
    return OmegaConf.create(config), ckpt


def load_stored_run(ckpt_path: str) -> tuple[DictConfig, dict]:
    """:func:`load_checkpoint` for eval / sample: the stored configuration is untrusted, so its ``_target_`` entries
    are vetted (:func:`flowforge.trust.check_stored_targets`) before anything is built from it."""
    run_cfg, ckpt = load_checkpoint(ckpt_path)
    check_stored_targets(run_cfg, f"ckpt_path={ckpt_path}")
    return run_cfg, ckpt


def model_name(cfg: DictConfig) -> str:
    return str(cfg.model.get("_target_", "?")).rsplit(".", 1)[-1]


def load_weights(module: FlowModule, ckpt_path: str, this_model: str, ckpt: dict | None = None) -> None:
    """Load a checkpoint's weights into ``module``; a ConfigError when they belong to another model."""
    if ckpt is None:
        run_cfg, ckpt = load_checkpoint(ckpt_path)
    else:
        run_cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    try:
        module.load_state_dict(ckpt.get("state_dict", {}))
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()[:200]
        raise ConfigError(
            f"ckpt_path={ckpt_path} was written by model {model_name(run_cfg)}, but this run builds model "
            f"{this_model}, and the weights do not match ({detail}); "
            "use the same model config as the run that wrote the checkpoint, or drop ckpt_path"
        ) from None


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test metrics of a checkpoint (its EMA weights when EMA was on) on the test split, with the random streams of
    its run's final test (:class:`EvaluationSeeds`): the final checkpoint of a run gives the test metrics the run
    reported, stochastic ones (image bits/dim under dequantisation noise) included."""
    set_threads(cfg.get("threads", "auto"), cfg.get("accelerator", "cpu"))
    run_cfg, ckpt = load_stored_run(cfg.ckpt_path)
    if cfg.get("data_dir"):
        run_cfg.dataset.data_dir = cfg.data_dir
    datamodule, module = build(run_cfg)
    load_weights(module, cfg.ckpt_path, model_name(run_cfg), ckpt)
    num_parameters = _show_parameters(module.model)
    out_dir = _output_dir(cfg)
    trainer = pl.Trainer(
        accelerator=cfg.get("accelerator", "cpu"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(out_dir) if out_dir else None,
        callbacks=[_evaluation_seeds(run_cfg, ckpt)],
    )
    trainer.test(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    check_finite_result(metrics, module, datamodule, f"the checkpoint {cfg.ckpt_path}")
    metrics["num_parameters"] = num_parameters
    if out_dir is not None:
        _report(out_dir, {**metrics, "ckpt_path": str(cfg.ckpt_path)}, trainer)
    else:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _evaluation_seeds(run_cfg: DictConfig, ckpt: dict) -> EvaluationSeeds:
    """The final test's random streams of the run that wrote ``ckpt``: its seed (the one ExactResume stored, which
    a ``seed: null`` run drew) and its step."""
    stored = (ckpt.get("callbacks") or {}).get("ExactResume") or {}
    seed = stored.get("seed", run_cfg.get("seed"))
    return EvaluationSeeds(seed if seed is not None else 0, int(ckpt.get("global_step", 0)))


def check_finite_result(
    metrics: dict[str, float], module: FlowModule, datamodule: pl.LightningDataModule, what: str
) -> None:
    """A validation or test metric that is NaN/inf is a failed result, never a finished one: raise a
    :class:`NonFiniteLossError` naming the metrics and the first non-finite layer on a test batch."""
    bad = {k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/")) and not math.isfinite(v)}
    if not bad:
        return
    shown = ", ".join(f"{k}={v}" for k, v in bad.items())
    raise NonFiniteLossError(
        f"{what} gives non-finite results ({shown}); first non-finite layer: "
        f"{first_nonfinite_layer(module, datamodule)}. "
        "The weights are unusable: lower optim.optimizer.lr (or set trainer.gradient_clip_val) and train again, or "
        "evaluate an earlier checkpoint"
    )


def first_nonfinite_layer(module: FlowModule, datamodule: pl.LightningDataModule) -> str:
    """The first parameter or buffer holding NaN/inf, else the first module with finite inputs and a non-finite
    output on the first test batch (replayed with hooks)."""
    bad = nonfinite_tensors(module)
    if bad:
        return f"{bad[0]} (holds NaN/inf)"
    try:
        datamodule.setup("test")
        batch = next(iter(datamodule.test_dataloader()))
        device = next(module.parameters()).device
        batch = move_data_to_device(batch, device)
        x = module.batch_input(batch, "test")
    except (FlowforgeError, StopIteration, RuntimeError) as e:
        return f"unknown (the test batch could not be replayed: {e})"
    where = locate_nonfinite(module, lambda: module.step_metrics(batch, x, "test"))
    return where or "none found on the first test batch (the NaN/inf arose in the reduction over the test set)"


#: sample.py's image grid shows at most this many of the samples (``samples.pt`` keeps all)
SAMPLE_GRID_MAX = 256


def sample_title(run_cfg: DictConfig, ckpt: dict, temperature: float, options: dict | None = None) -> str:
    """The title of a ``sample.py`` figure: the family, the dataset, the checkpoint's epoch, step and score, and the
    sampling options given."""
    from flowforge.training import visualize

    title = visualize.figure_title(
        family=model_name(run_cfg).removesuffix("_family"),
        dataset=str(run_cfg.dataset.get("name") or "") or None,
        when=f"checkpoint epoch {ckpt.get('epoch', '?')}, step {ckpt.get('global_step', '?')}",
        score=_checkpoint_score(ckpt),
        temperature=temperature,
    )
    return title + "".join(f", {k}={v}" for k, v in sorted((options or {}).items()))


def checked_samples(
    cfg: DictConfig, temperature: float, draw: Callable[[], torch.Tensor], locate: Callable[[], Any], modules: Any
) -> torch.Tensor:
    """``draw()``, or a :class:`NonFiniteLossError` naming the first non-finite layer when the samples hold NaN/inf:
    the random state is rewound and ``locate()`` replays the draw layer by layer (``(count, where)`` or None), and
    a parameter or buffer of ``modules`` holding NaN/inf is named first."""
    state = torch.random.get_rng_state()
    x = draw()
    if not bool(torch.isfinite(x).all()):
        torch.random.set_rng_state(state)
        found = locate()
        count, where = found if found else (int((~torch.isfinite(x)).sum()), None)
        bad = nonfinite_tensors(modules)
        where = f"{bad[0]} (holds NaN/inf)" if bad else where
        raise NonFiniteLossError(
            f"sampling from {cfg.ckpt_path} at temperature={temperature} produced {count} NaN/inf values (first "
            f"non-finite layer: {where or 'none found'}); nothing was written. The checkpoint's weights are unusable "
            "or the temperature too high: try temperature=0.7, or an earlier checkpoint"
        )
    return x


@torch.no_grad()
def sample(cfg: DictConfig) -> Path:
    """Draw ``num_samples`` samples from a checkpoint at ``temperature`` and write them (``samples.pt``) with a
    figure: for images a grid of the first :data:`SAMPLE_GRID_MAX`, else every sample next to the test data and the
    model's density at that temperature (:func:`flowforge.training.visualize.model_figure`), titled with the model
    family, dataset, the checkpoint's epoch and step, the validation loss it was saved with (when its checkpoint
    callback recorded one) and the temperature.  A conditional model samples at ``context``
    (:func:`sample_contexts`; :func:`_sample_conditional`)."""
    from flowforge.training import visualize

    set_threads(cfg.get("threads", "auto"))
    run_cfg, ckpt = load_stored_run(cfg.ckpt_path)
    datamodule, module = build(run_cfg)
    load_weights(module, cfg.ckpt_path, model_name(run_cfg), ckpt)
    num_samples = positive_int("num_samples", cfg.num_samples, "64")
    temperature = positive_finite("temperature", cfg.temperature, "0.7")
    model = module.model.eval()
    out = Path(cfg.output_dir)
    contexts = sample_contexts(cfg.get("context"), model, cfg.ckpt_path)
    options = sampling_options(cfg.get("sampling"), model)
    torch.manual_seed(cfg.seed)
    if contexts is not None:
        return _sample_conditional(
            cfg, run_cfg, ckpt, datamodule, model, contexts, num_samples, temperature, out, options
        )
    x = checked_samples(
        cfg,
        temperature,
        lambda: model.sample(num_samples, temperature=temperature, **options),
        lambda: nonfinite_samples(model, num_samples, temperature),
        module,
    )
    out.mkdir(parents=True, exist_ok=True)
    torch.save(x, out / "samples.pt")
    data = None
    if not model.is_image:
        datamodule.setup("test")
        data = datamodule.splits["test"].tensors[0]
    name = "samples.png" if model.is_image else "density.png"
    shown = min(num_samples, SAMPLE_GRID_MAX)
    title = sample_title(run_cfg, ckpt, temperature, options) + (
        f" ({shown} of {num_samples} shown)" if model.is_image and shown < num_samples else ""
    )
    path = visualize.model_figure(model, out / name, data, x[:shown], samples=x, temperature=temperature, title=title)
    if path is None:
        path = "(no figure for a model of this dimension or on this manifold; samples.pt holds the samples)"
    print(f"samples: {out / 'samples.pt'}\nfigure: {path}")
    return path


def sampling_options(value: Any, model: torch.nn.Module) -> dict[str, Any]:
    """``sample.py``'s ``sampling`` options that are set (not null): keyword arguments of the model's own ``sample``
    beyond ``n``, ``context`` and ``temperature`` (TarFlow: guidance, guide, attn_temperature, annealed_guidance,
    denoise, cache, compile); a ConfigError naming the ones the model takes for any other."""
    if value is None:
        return {}
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, dict):
        raise ConfigError(
            f"sampling must be a mapping of the model's sampling options, e.g. sampling.guidance=2, got {value!r}"
        )
    value = {k: v for k, v in value.items() if v is not None}
    params = inspect.signature(model.sample).parameters
    taken = [k for k in params if k not in ("n", "context", "temperature")]
    unknown = sorted(set(value) - set(taken))
    if unknown:
        family = type(model).__name__
        offered = ", ".join(taken) if taken else "none"
        raise ConfigError(f"sampling options {unknown} are not options of {family}.sample (it takes: {offered})")
    return value


def sample_contexts(value: Any, model: torch.nn.Module, ckpt_path: str) -> torch.Tensor | None:
    """The raw contexts ``sample.py`` draws at, from its ``context`` option: None for an unconditional model;
    for a class-conditional model a label (``context=3``), a list of labels (``context=[0,3]``) or, unset, every
    class (``arange(K)``); for a model of a context vector of ``K`` numbers one vector (``context=[0.2,0.5]``, or
    ``context=0.2`` when ``K = 1``) or a list of vectors.  Returns ``(R,)`` labels or ``(R, K)`` vectors; a
    ConfigError naming the fix for a context the model cannot take."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    spec = getattr(model, "context", None)
    if spec is None:
        if value is not None:
            raise ConfigError(
                f"context={value!r} was given, but the model of ckpt_path={ckpt_path} is unconditional; drop "
                "context=..., or sample from a conditional model (trained with dataset.conditional=true or a "
                "dataset with a context)"
            )
        return None
    classes, features = spec.classes, spec.raw_features
    if classes is not None:
        if value is None:
            return torch.arange(classes)
        labels = value if isinstance(value, list) else [value]
        if not labels or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < classes for v in labels):
            raise ConfigError(
                f"the model of ckpt_path={ckpt_path} is conditional on a class label in [0, {classes}); got "
                f"context={value!r}: pass a label (context=3), a list of labels (context=[0,3]) or leave context "
                "unset for one row per class"
            )
        return torch.tensor(labels, dtype=torch.long)
    example = "[" + ",".join(["0.5"] * features) + "]"
    if value is None:
        raise ConfigError(
            f"the model of ckpt_path={ckpt_path} is conditional on a context vector of {features} numbers; pass "
            f"one, e.g. context={example} (or a list of them for one panel each)"
        )
    rows = value if isinstance(value, list) and value and all(isinstance(v, list) for v in value) else [value]
    parsed = []
    for row in rows:
        row = row if isinstance(row, list) else [row]
        if len(row) != features or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in row):
            raise ConfigError(
                f"the model of ckpt_path={ckpt_path} is conditional on a context vector of {features} numbers; got "
                f"context={value!r}: pass e.g. context={example}"
            )
        parsed.append([float(v) for v in row])
    c = torch.tensor(parsed, dtype=torch.float32)
    if not bool(torch.isfinite(c).all()):
        raise ConfigError(f"context={value!r} holds NaN/inf values; pass finite numbers")
    return c


#: sample.py's per-context image grid shows at most this many rows (classes) and columns (samples per class)
CONTEXT_GRID_ROWS, CONTEXT_GRID_COLS = 10, 32


def _sample_conditional(
    cfg: DictConfig,
    run_cfg: DictConfig,
    ckpt: dict,
    datamodule: pl.LightningDataModule,
    model: torch.nn.Module,
    contexts: torch.Tensor,
    num_samples: int,
    temperature: float,
    out: Path,
    options: dict[str, Any] | None = None,
) -> Path:
    """:func:`sample` for a conditional model: ``num_samples`` samples at each of the raw ``contexts`` (``R``),
    saved as ``samples.pt`` ``(num_samples, ...)`` for one context and ``(R, num_samples, ...)`` for several, with
    ``contexts.pt``; the figure has one row (images) or one column (2-D densities) per context."""
    from flowforge.training import visualize
    from flowforge.training.callbacks import conditional_nonfinite_samples

    rows = len(contexts)
    x = checked_samples(
        cfg,
        temperature,
        lambda: model.sample(
            rows * num_samples,
            context=contexts.repeat_interleave(num_samples, 0),
            temperature=temperature,
            **(options or {}),
        ),
        lambda: conditional_nonfinite_samples(model, contexts, num_samples, temperature),
        model,
    )
    x = x.reshape(rows, num_samples, *x.shape[1:])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(x[0] if rows == 1 else x, out / "samples.pt")
    torch.save(contexts, out / "contexts.pt")
    title = sample_title(run_cfg, ckpt, temperature, options)
    data = data_contexts = None
    if model.is_image:
        shown_rows, shown_cols = min(rows, CONTEXT_GRID_ROWS), min(num_samples, CONTEXT_GRID_COLS)
        if (shown_rows, shown_cols) != (rows, num_samples):
            title += f" ({shown_rows} of {rows} contexts, {shown_cols} of {num_samples} samples each shown)"
        path = visualize.conditional_figure(
            model, out / "samples.png", contexts[:shown_rows], images=x[:shown_rows, :shown_cols], title=title
        )
    else:
        datamodule.setup("test")
        tensors = datamodule.splits["test"].tensors
        if len(tensors) > 1:
            data, data_contexts = tensors[0][:5000].float(), tensors[1][:5000]
        path = visualize.conditional_figure(
            model, out / "density.png", contexts, data, data_contexts, samples=x, temperature=temperature, title=title
        )
    if path is None:
        path = "(no figure for a model of this dimension; samples.pt holds the samples)"
    print(f"samples: {out / 'samples.pt'}\ncontexts: {out / 'contexts.pt'}\nfigure: {path}")
    return path


def _checkpoint_score(ckpt: dict) -> str | None:
    """The monitored validation score a checkpoint was saved with (its ModelCheckpoint's ``current_score``, e.g.
    ``val/loss``), as text; None when the checkpoint records none."""
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict):
            score, monitor = state.get("current_score"), state.get("monitor")
            if score is not None and monitor:
                return f"{monitor} {float(score):.4f} at its last validation"
    return None


def main(fn, cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; flowforge's own errors end the program with their message, not a traceback.

    The run folder's ``status.json`` (:mod:`flowforge.run_info`) follows the run: ``running``, then ``finished``,
    ``failed`` (with the error) or ``stopped`` (SIGTERM, exit status 143)."""
    quiet_known_noise()
    out_dir = _output_dir(cfg) if is_rank_zero() else None

    def status(state: str, **fields: Any) -> None:
        if out_dir is not None:
            write_status(out_dir, state, **fields)

    status("running", pid=os.getpid())
    try:
        result = fn(cfg)
    except FlowforgeError as e:
        log.error("%s: %s", type(e).__name__, e)
        status("failed", error=type(e).__name__, message=str(e))
        raise SystemExit(f"error: {e}") from None
    except SystemExit as e:
        if e.code == 143:
            status("stopped", error="SIGTERM", message="stopped by SIGTERM (exit status 143)")
        elif e.code not in (None, 0):
            status("failed", error="SystemExit", message=str(e.code))
        raise
    except KeyboardInterrupt:
        status("stopped", error="KeyboardInterrupt", message="interrupted")
        raise
    except BaseException as e:
        log_to_files(log, f"{type(e).__name__}: {e}")  # the console gets Hydra's traceback
        status("failed", error=type(e).__name__, message=str(e))
        raise
    metrics = out_dir / "metrics.json" if out_dir is not None else None
    status("finished", **({"metrics": str(metrics)} if metrics is not None and metrics.is_file() else {}))
    return result
