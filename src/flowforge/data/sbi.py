"""Simulations of an sbibm task for amortised neural posterior estimation (NPE): the flow models ``q(theta | x)``.

``num_simulations`` pairs ``theta ~ p(theta)``, ``x ~ p(x | theta)`` (:mod:`flowforge.sbi.tasks`, seeded by
``seed``) are split into training and validation simulations (``val_fraction``, the last ones); the test split holds
the task's standard observations ``(theta_o, x_o)`` (:mod:`flowforge.sbi.reference`).  Batches are ``(theta, x)``:
the model's input is the parameter, its context the simulation.

Both are z-scored with the statistics of the training split (sbi's ``z_score_theta`` / ``z_score_x``
"independent"):  ``theta' = (theta - m_theta) / s_theta``, ``x' = (x - m_x) / s_x``.  The model's densities are of
``theta'``; in the units of ``theta``,

    log q(theta | x) = log q'(theta' | x') - sum_i log s_theta,i,

which :meth:`SBIDataModule.theta_log_det` gives (``sum_i log s_theta,i``).  ``posterior_reference`` holds the
observations and reference posterior samples in the task's own units, which
:class:`flowforge.training.posterior_checks.PosteriorChecks` compares the model's posterior samples with (C2ST).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from flowforge.data.base import SPLITS, FlowDataModule
from flowforge.errors import ConfigError, DataError
from flowforge.sbi.reference import NUM_OBSERVATIONS, PosteriorReference, load_reference
from flowforge.sbi.tasks import make_task


def _positive_int(value: Any, key: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"dataset.{key} must be a positive integer, got {value!r} (e.g. {example})")
    return value


class SBIDataModule(FlowDataModule):
    """``(theta, x)`` simulations of the sbibm task ``task`` (module docstring).

    Args:
        task: gaussian_linear, gaussian_mixture, two_moons, slcp or bernoulli_glm.
        num_simulations: the simulation budget (sbibm's are 1000, 10000 and 100000).
        val_fraction: the share of the simulations held out for validation.
        num_observations: how many of the 10 standard observations the test split holds (at most ``limit``).
        num_posterior_samples: posterior samples drawn per observation for C2ST (null: as many as the reference
            holds, 10000 in sbibm).
        pair_plots: for how many observations a posterior pair plot is drawn at the end of a run.
        context: ``{features: dim_x}``, the model's context (the config sets it from the task).
        dims: the config's table ``{task: {theta: dim_theta, x: dim_x}}`` (checked against the tasks).
    """

    def __init__(
        self,
        task: str = "gaussian_linear",
        num_simulations: int = 10000,
        val_fraction: float = 0.1,
        num_observations: int = NUM_OBSERVATIONS,
        num_posterior_samples: int | None = None,
        pair_plots: int = 1,
        shape: Any = None,
        context: Any = None,
        dims: Any = None,
        **kwargs: Any,
    ):
        self.task = make_task(task)
        self.num_simulations = _positive_int(num_simulations, "num_simulations", "1000, 10000 or 100000")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction must lie in (0, 1), got {val_fraction!r} (e.g. 0.1)")
        self.num_val = max(1, round(self.num_simulations * val_fraction))
        if self.num_simulations - self.num_val < 2:
            raise ConfigError(
                f"dataset.num_simulations={num_simulations} leaves fewer than 2 training simulations after the "
                f"validation share {val_fraction}; simulate more (e.g. 1000)"
            )
        self.num_observations = _positive_int(num_observations, "num_observations", NUM_OBSERVATIONS)
        if self.num_observations > NUM_OBSERVATIONS:
            raise ConfigError(
                f"dataset.num_observations must be at most {NUM_OBSERVATIONS} (sbibm's standard observations), got "
                f"{num_observations}"
            )
        if num_posterior_samples is not None:
            _positive_int(num_posterior_samples, "num_posterior_samples", "10000, or null for the reference's count")
        self.num_posterior_samples = num_posterior_samples
        if isinstance(pair_plots, bool) or not isinstance(pair_plots, int) or pair_plots < 0:
            raise ConfigError(f"dataset.pair_plots must be an integer >= 0, got {pair_plots!r}")
        self.pair_plots = pair_plots
        from flowforge.sbi.tasks import TASKS

        for name, d in dict(dims or {}).items():
            if name in TASKS and dict(d) != {"theta": TASKS[name].dim_theta, "x": TASKS[name].dim_x}:
                raise ConfigError(
                    f"dataset.dims.{name}={dict(d)} does not match the task (theta: {TASKS[name].dim_theta}, "
                    f"x: {TASKS[name].dim_x})"
                )
        expected_shape = [self.task.dim_theta]
        if shape is not None and [int(s) for s in shape] != expected_shape:
            raise ConfigError(
                f"dataset.shape={list(shape)} does not match task {task} (theta has {self.task.dim_theta} numbers); "
                f"leave dataset.shape to the config's default"
            )
        expected_context = {"features": self.task.dim_x}
        if context is not None and dict(context) != expected_context:
            raise ConfigError(
                f"dataset.context={dict(context)} does not match task {task} (x has {self.task.dim_x} numbers); "
                f"leave dataset.context to the config's default"
            )
        for key in ("num_levels", "logit_alpha"):
            if kwargs.get(key) is not None:
                raise ConfigError(f"sbi data are continuous vectors, but dataset.{key}={kwargs[key]!r}; set it to null")
        kwargs.setdefault("name", task)
        super().__init__(shape=expected_shape, **kwargs)
        self.context = expected_context
        self.posterior_reference: PosteriorReference | None = None
        self.theta_mean = self.theta_std = self.x_mean = self.x_std = None

    # ----------------------------------------------------------------- standardisation
    def standardize_theta(self, theta: Tensor) -> Tensor:
        return (theta - self.theta_mean.to(theta)) / self.theta_std.to(theta)

    def unstandardize_theta(self, theta: Tensor) -> Tensor:
        return theta * self.theta_std.to(theta) + self.theta_mean.to(theta)

    def standardize_x(self, x: Tensor) -> Tensor:
        return (x - self.x_mean.to(x)) / self.x_std.to(x)

    def theta_log_det(self) -> float:
        """``sum_i log s_theta,i``: subtract it from a log-density of standardised ``theta`` to get one of
        ``theta`` (module docstring)."""
        return float(self.theta_std.double().log().sum())

    def posterior_sample_count(self, reference_count: int) -> int:
        """Posterior samples to draw per observation for C2ST: ``num_posterior_samples``, or as many as the reference
        holds; with ``limit`` (quick runs) at most ``max(limit, 10)``."""
        n = self.num_posterior_samples or reference_count
        return n if self.limit is None else min(n, max(self.limit, 10))

    # ----------------------------------------------------------------- splits
    def simulate(self) -> tuple[Tensor, Tensor]:
        """The ``num_simulations`` pairs ``(theta, x)`` of this seed, in the task's units."""
        g = torch.Generator().manual_seed(self.seed)
        theta = self.task.sample_prior(self.num_simulations, g)
        x = self.task.simulate(theta, g)
        if not torch.isfinite(x).all():
            raise DataError(f"task {self.task.name}: the simulator produced NaN/inf values (seed {self.seed})")
        return theta, x

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        theta, x = self.simulate()
        n_train = self.num_simulations - self.num_val
        stats = lambda v: (v[:n_train].mean(0), v[:n_train].std(0).clamp_min(1e-6))  # noqa: E731
        self.theta_mean, self.theta_std = stats(theta)
        self.x_mean, self.x_std = stats(x)
        count = self.num_observations if self.limit is None else min(self.num_observations, self.limit)
        self.posterior_reference = load_reference(self.task, self.data_dir, count, seed=self.seed)
        ref = self.posterior_reference
        raw = {
            "train": (theta[:n_train], x[:n_train]),
            "val": (theta[n_train:], x[n_train:]),
            "test": (ref.true_parameters, ref.observations),
        }
        for split in SPLITS:
            t, c = raw[split]
            t, c = self.standardize_theta(t), self.standardize_x(c)
            if self.limit is not None:
                t, c = t[: self.limit], c[: self.limit]
            self.splits[split] = TensorDataset(self.check(t, split), c.float())
