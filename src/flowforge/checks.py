"""Checks of run-configuration values that would otherwise pass silently or crash far from their cause.

Each check raises a :class:`flowforge.errors.ConfigError` that names the key, the value and a valid example.
:func:`check_run_config` applies them to a composed ``train.py`` configuration before anything is built.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from flowforge.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(key: str, value: Any, example: str) -> int:
    """``value`` as a positive integer, else a ConfigError naming ``key`` and ``example``."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}; e.g. {key}={example}")
    return value


def optional_positive_int(key: str, value: Any) -> int | None:
    """``value`` when it is null or a positive integer, else a ConfigError naming ``key``."""
    if value is not None and (not _is_int(value) or value < 1):
        raise ConfigError(f"{key} must be null or a positive integer, got {value!r}")
    return value


def nonnegative_int(key: str, value: Any, example: str) -> int:
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r} (an integer); e.g. {key}={example}")
    return value


def positive_finite(key: str, value: Any, example: str, why: str = "") -> float:
    """``value`` as a finite number > 0 (``why`` explains what 0 or inf would do)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}{why}; e.g. {key}={example}")
    return float(value)


def optional_nonnegative_finite(key: str, value: Any, example: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{key} must be null (no clipping) or a finite number >= 0, got {value!r}; e.g. {key}={example}"
        )
    return float(value)


def layer_widths(key: str, value: Any, example: str) -> None:
    """A list of hidden-layer widths: every entry a positive integer."""
    if value is None:
        return
    widths = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
    if not all(_is_int(w) and w >= 1 for w in widths):
        raise ConfigError(f"{key} must be a list of positive layer widths, got {widths!r}; e.g. {key}={example}")


def check_run_config(cfg: DictConfig) -> None:
    """The optimizer, trainer, data-size and layer-width values of a training configuration."""
    optim = cfg.get("optim") or {}
    optimizer = optim.get("optimizer") or {}
    if "lr" in optimizer:
        positive_finite(
            "optim.optimizer.lr",
            optimizer.lr,
            "1e-3",
            " (0 would train nothing, inf or nan would destroy the weights at the first step)",
        )
    if "warmup_steps" in optim:
        nonnegative_int("optim.warmup_steps", optim.warmup_steps, "1000")
    if "schedule" in optim or "min_lr" in optim:
        check_schedule(optim.get("schedule", "constant"), optim.get("min_lr", 0.0))
    trainer = cfg.get("trainer") or {}
    optional_nonnegative_finite("trainer.gradient_clip_val", trainer.get("gradient_clip_val"), "1.0")
    if trainer.get("accumulate_grad_batches") is not None:
        positive_int("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches, "1")
    dataset = cfg.get("dataset") or {}
    for split in ("n_train", "n_val", "n_test"):
        if dataset.get(split) is not None:
            positive_int(f"dataset.{split}", dataset[split], "2000")
    model = cfg.get("model") or {}
    for key in ("hidden", "fc_hidden"):
        if key in model:
            layer_widths(f"model.{key}", model[key], "[64,64]")


#: top-level keys of earlier configurations and where they are now
MOVED_KEYS = {
    key: f"faults.{key}"
    for key in (
        "on_nonfinite",
        "on_solver_failure",
        "on_power_iteration_failure",
        "fault_lr_factor",
        "max_fault_events",
    )
}


def check_moved_keys(keys: list[str]) -> None:
    """A ConfigError for an override (``key=value``, ``+key=value``) or a config key that has moved."""
    for item in keys:
        key = str(item).lstrip("+~").split("=", 1)[0]
        if key in MOVED_KEYS:
            raise ConfigError(
                f"{key} is now {MOVED_KEYS[key]} (the faults config group); e.g. {MOVED_KEYS[key]}="
                f"{str(item).split('=', 1)[1] if '=' in str(item) else '...'}"
            )


SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str, min_lr: float) -> tuple[str, float]:
    if schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not (isinstance(min_lr, (int, float)) and not isinstance(min_lr, bool) and 0 <= min_lr < math.inf):
        raise ConfigError(f"optim.min_lr must be a number >= 0 (the learning rate the cosine ends at), got {min_lr!r}")
    return schedule, float(min_lr)
