"""The test metrics of amortised posterior estimation: C2ST of the model's posterior against the reference.

For each standard observation ``x_o`` of an sbi data module (:class:`flowforge.data.sbi.SBIDataModule`, its
``posterior_reference``), at the end of testing:

1. draw ``n`` samples of ``q(theta | x_o)`` (``n``: ``dataset.num_posterior_samples``, by default as many as the
   reference holds), in the task's units, keeping those inside the prior's support (samples outside it are redrawn,
   as sbi's posterior does; after ``max_rounds`` rounds the rest are kept as drawn);
2. log ``test/c2st/obs_<k>``: :func:`flowforge.metrics.c2st` of them against the reference samples, and the mean
   over the observations as ``test/c2st`` (0.5 is a perfect posterior); with fewer samples than the reference
   holds, the C2ST takes as many reference samples (the first ``n``), so both classes are equally large;
3. log ``test/theta_nll``, the mean of ``-log q(theta_o | x_o)`` at the true parameters in the units of ``theta``
   (the standardisation's log-det accounted: ``-log q'(theta_o' | x_o') + sum_i log s_theta,i``).

At the end of testing, :func:`flowforge.training.sbi_figures.posterior_pair_plot` draws the model's samples
against the reference for the first ``dataset.pair_plots`` observations into ``<dirpath>/posterior_obs<k>.png``.
Sampling uses its own seeded random stream, so every DDP process computes the same values.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from flowforge.metrics import c2st

log = logging.getLogger("flowforge")


class PosteriorChecks(pl.Callback):
    """Module docstring.  ``dirpath``: the folder of the pair plots (None: none drawn); ``seed``: the seed of the
    posterior samples and of the C2ST classifier."""

    def __init__(self, dirpath: str | Path | None = None, seed: int = 1, max_rounds: int = 20):
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.seed = seed
        self.max_rounds = max_rounds
        self.drawn: dict[int, Tensor] = {}
        self.paths: list[Path] = []

    @torch.no_grad()
    def posterior_samples(self, model, datamodule, x_o: Tensor, n: int) -> Tensor:
        """``n`` samples of ``q(theta | x_o)`` in the task's units (inside the prior's support where possible)."""
        device = next(model.parameters()).device
        context = datamodule.standardize_x(x_o.to(device).float())
        kept, have = [], 0
        for round_ in range(self.max_rounds):
            theta = datamodule.unstandardize_theta(model.sample(n, context=context).float()).cpu()
            inside = datamodule.task.in_support(theta)
            if round_ == self.max_rounds - 1:
                kept.append(torch.cat([theta[inside], theta[~inside]]))
                log.warning(
                    "posterior of %s: fewer than %d of the samples fell inside the prior's support after %d rounds; "
                    "the rest are kept as drawn",
                    datamodule.task.name,
                    n,
                    self.max_rounds,
                )
            else:
                kept.append(theta[inside])
            have += len(kept[-1])
            if have >= n:
                break
        return torch.cat(kept)[:n]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        reference = getattr(datamodule, "posterior_reference", None)
        if reference is None:
            return
        model = pl_module.model
        was_training = model.training
        model.eval()
        scores = []
        self.drawn = {}
        try:
            with torch.random.fork_rng(devices=[] if pl_module.device.type == "cpu" else [pl_module.device]):
                torch.manual_seed(self.seed)
                for k, (x_o, ref) in enumerate(zip(reference.observations, reference.samples)):
                    n = datamodule.posterior_sample_count(len(ref))
                    samples = self.posterior_samples(model, datamodule, x_o, n)
                    score = c2st(ref[:n], samples, seed=self.seed)
                    scores.append(score)
                    pl_module.log(f"test/c2st/obs_{k + 1}", score, batch_size=1)
                    if k < datamodule.pair_plots:
                        self.drawn[k] = samples
                theta = datamodule.standardize_theta(reference.true_parameters.to(pl_module.device))
                x = datamodule.standardize_x(reference.observations.to(pl_module.device))
                with torch.no_grad():
                    nll = -model.log_prob(theta, x).double().mean() + datamodule.theta_log_det()
            pl_module.log("test/c2st", sum(scores) / len(scores), batch_size=1)
            pl_module.log("test/theta_nll", float(nll), batch_size=1)
        finally:
            model.train(was_training)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        reference = getattr(datamodule, "posterior_reference", None)
        if reference is None or self.dirpath is None or not trainer.is_global_zero:
            return
        from flowforge.training.sbi_figures import posterior_pair_plot

        metrics = getattr(trainer, "callback_metrics", {})
        for k, samples in sorted(self.drawn.items()):
            score = metrics.get(f"test/c2st/obs_{k + 1}")
            title = f"{datamodule.task.name}: posterior of observation {k + 1} (model vs reference)"
            if score is not None:
                title += f", C2ST {float(score):.3f}"
            self.paths.append(
                posterior_pair_plot(
                    samples,
                    reference.samples[k],
                    self.dirpath / f"posterior_obs{k + 1}.png",
                    true_theta=reference.true_parameters[k],
                    title=title,
                )
            )
