"""Callbacks: sample figures written to the run directory and sent to image-capable loggers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from flowforge.training import visualize
from flowforge.training.faults import locate_nonfinite, nonfinite_samples

log = logging.getLogger("flowforge")


class SampleFigures(pl.Callback):
    """After every ``every_n_epochs``-th validation (and at the end of training) draw a figure of the
    model: a 2-D density plot, a 1-D density, or a grid of sampled images at ``temperature``; models on a
    manifold (``model.manifold``) get :func:`flowforge.training.visualize.manifold_figure` (S^2 in an
    equal-area projection, S^1 over the angle, the 3-simplex as a ternary plot; none in other dimensions).

    With an objective whose ``figure`` is ``"fit"`` (``objective=regression``) the figure is the fit instead: the
    target curve and the model's ``F(x)`` on a dense grid of ``[-2, 2]``
    (:func:`flowforge.training.visualize.fit_plot_1d`), and ``<dirpath>/fit.csv`` (columns ``x, target,
    prediction`` on 400 grid points) is rewritten with it.

    Each figure's title names the model family and the dataset (from the run's config), when it was drawn
    (``epoch E, step N`` after a validation, ``final, step N`` at the end of testing), the score logged at that
    point (``val/...`` or ``test/...`` from the trainer's ``callback_metrics``: bits/dim for images, else the NLL
    in nats, the MSE for regression) and the temperature of the samples.

    A conditional model ``p(x | c)`` is drawn at several contexts: a class-conditional
    image model as a grid with one row of samples per class (the first :data:`MAX_ROWS` classes), a 2-D model as one
    column per context (its density, and its samples over the data of that context); a context vector is taken at
    4 points of the data's contexts (:func:`flowforge.training.visualize.figure_contexts`).

    Figures go to ``<dirpath>/val_epoch{E}.png`` and ``<dirpath>/test.png``, and to W&B / TensorBoard when those
    log.
    """

    def __init__(self, dirpath: str, every_n_epochs: int = 1, num_images: int = 64, temperature: float = 1.0):
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.temperature = temperature
        self.last_path: Path | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the epoch-end hooks, where the module reduces its validation metrics over the split and the ranks,
        # so the title shows this validation's score
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.draw(trainer, pl_module, f"val_epoch{trainer.current_epoch}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module, "test")

    @torch.no_grad()
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> Path | None:
        """Draw the figure ``<dirpath>/<tag>.png`` (``tag``: ``val_epoch{E}`` or ``test``) on the global-zero
        process; called on every process, as the metrics in its title are synchronised across them."""
        title = self.title(trainer, pl_module, tag)
        if not trainer.is_global_zero:
            return None
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            if getattr(model, "conditional", False):
                return self._draw_conditional(trainer, pl_module, model, tag, title)
            return self._draw(trainer, pl_module, model, tag, title)
        except (FloatingPointError, ValueError, RuntimeError) as e:  # numerical failures: reported, run goes on
            try:
                found = (
                    conditional_nonfinite_samples(model, self._contexts(trainer, model), 256, self.temperature)
                    if getattr(model, "conditional", False)
                    else nonfinite_samples(model, 256, self.temperature)
                )
            except (FloatingPointError, ValueError, RuntimeError):
                found = None
            where = found[1] if found else None
            cause = (
                (
                    f"sampling produced {found[0]} NaN/inf values"
                    + (f", first in the inverse of {where}" if where else "")
                )
                if found
                else str(e)
            )
            message = f"figure {tag} skipped at step {trainer.global_step}: {cause}"
            log.warning(message)
            events = getattr(pl_module, "fault_events", None)
            if events is not None:
                events.append(
                    {
                        "step": int(trainer.global_step),
                        "kind": "sampling",
                        "what": message,
                        "where": where,
                        "policy": "warn",
                    }
                )
            return None
        finally:
            model.train(was_training)

    def title(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> str:
        """The figure's title (:func:`flowforge.training.visualize.figure_title`): family, dataset, epoch and step,
        the ``val`` or ``test`` score in ``trainer.callback_metrics`` and the sampling temperature."""
        config = (getattr(pl_module, "hparams", None) or {}).get("config") or {}
        target = str((config.get("model") or {}).get("_target_", ""))
        family = target.rsplit(".", 1)[-1].removesuffix("_family") or type(pl_module.model).__name__
        dataset = (config.get("dataset") or {}).get("name") or type(getattr(trainer, "datamodule", None)).__name__
        stage = "test" if tag.startswith("test") else "val"
        step = f"step {getattr(trainer, 'global_step', '?')}"
        when = f"final, {step}" if stage == "test" else f"epoch {getattr(trainer, 'current_epoch', '?')}, {step}"
        fit = pl_module.objective.figure == "fit"
        return visualize.figure_title(
            family=None if family == "Flow" else family,
            dataset=None if dataset == "NoneType" else str(dataset),
            when=when,
            score=visualize.score_text(getattr(trainer, "callback_metrics", {}), stage),
            temperature=None if fit else self.temperature,
        )

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model, tag: str, title: str) -> Path | None:
        path = self.dirpath / f"{tag}.png"
        fit = pl_module.objective.figure == "fit"
        if not model.is_image and not fit and nonfinite_samples(model, 256, self.temperature):
            raise FloatingPointError("samples contain NaN/inf")  # density plots would draw them without complaint
        data = None if model.is_image else self._data(trainer)  # (image splits need not be tensor datasets)
        with torch.autocast(device_type=pl_module.device.type, enabled=False):
            if fit:
                if model.dim != 1:
                    return None  # the fit figure plots 1-D functions only
                dm = trainer.datamodule
                split = dm.splits.get("test") or dm.splits.get("val")
                y, x = split.tensors[0][:5000].float(), split.tensors[1][:5000].float()
                visualize.fit_plot_1d(
                    _OnDevice(model, pl_module.device),
                    x,
                    y,
                    path,
                    target_fn=_target_function(dm),
                    csv_path=self.dirpath / "fit.csv",
                    title=title,
                )
            else:
                images = None
                if model.is_image:
                    images = model.sample(self.num_images, temperature=self.temperature).cpu()
                    if not torch.isfinite(images).all():
                        raise FloatingPointError("sampled images contain NaN/inf")
                figure = visualize.model_figure(
                    _OnDevice(model, pl_module.device), path, data, images, temperature=self.temperature, title=title
                )
                if figure is None:
                    return None
        self.last_path = path
        for logger in trainer.loggers:
            _log_image(logger, f"samples/{tag.split('_')[0]}", path, trainer.global_step)
        return path

    def _contexts(self, trainer: pl.Trainer, model) -> torch.Tensor:
        """The raw contexts a conditional model is drawn at (class docstring)."""
        if model.context.classes is not None:
            return torch.arange(min(model.context.classes, MAX_ROWS))
        dm = trainer.datamodule
        split = dm.splits.get("test") or dm.splits.get("val")
        return visualize.figure_contexts(split.tensors[1][:5000])

    def _draw_conditional(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model, tag: str, title: str
    ) -> Path | None:
        if not model.is_image and model.dim != 2:
            return None  # (no figure of p(x | c) in other dimensions: nothing to sample)
        path = self.dirpath / f"{tag}.png"
        contexts = self._contexts(trainer, model)
        rows = len(contexts)
        per_row = max(1, self.num_images // rows) if model.is_image else 1000
        on_device = _OnDevice(model, pl_module.device)
        with torch.autocast(device_type=pl_module.device.type, enabled=False):
            drawn = on_device.sample(rows * per_row, contexts.repeat_interleave(per_row, 0), self.temperature)
            if not torch.isfinite(drawn).all():
                raise FloatingPointError("samples contain NaN/inf")
            drawn = drawn.reshape(rows, per_row, *drawn.shape[1:])
            data = data_contexts = None
            if not model.is_image:
                dm = trainer.datamodule
                split = dm.splits.get("test") or dm.splits.get("val")
                data, data_contexts = split.tensors[0][:5000].float(), split.tensors[1][:5000]
            figure = visualize.conditional_figure(
                on_device,
                path,
                contexts,
                data,
                data_contexts,
                images=drawn if model.is_image else None,
                samples=None if model.is_image else drawn,
                temperature=self.temperature,
                title=title,
            )
        if figure is None:
            return None
        self.last_path = path
        for logger in trainer.loggers:
            _log_image(logger, f"samples/{tag.split('_')[0]}", path, trainer.global_step)
        return path

    @staticmethod
    def _data(trainer: pl.Trainer) -> torch.Tensor:
        dm = trainer.datamodule
        split = dm.splits.get("test") or dm.splits.get("val")
        return split.tensors[0][:5000].float()


def _target_function(datamodule):
    """The exact regression target of data modules that have one (step1d), else None (interpolated data)."""
    from flowforge.data.toy2d import Step1DDataModule, step_function

    return step_function if isinstance(datamodule, Step1DDataModule) else None


def conditional_nonfinite_samples(
    model, contexts: torch.Tensor, n: int, temperature: float = 1.0, prefix: str = "model."
) -> tuple[int, str | None] | None:
    """:func:`~flowforge.training.faults.nonfinite_samples` of a conditional model: ``n`` samples at each of the
    raw ``contexts``; None when all are finite, else the count of NaN/inf values and the first module whose inverse
    produced them, at the first context that gives any."""
    for c in contexts:
        state = torch.random.get_rng_state()
        x = model.sample(n, context=c, temperature=temperature)
        if not bool(torch.isfinite(x).all()):
            torch.random.set_rng_state(state)
            where = locate_nonfinite(model, lambda c=c: model.sample(n, context=c, temperature=temperature), prefix)
            return int((~torch.isfinite(x)).sum()), where
    return None


#: a class-conditional image model's figure shows at most this many classes (one row each)
MAX_ROWS = 10


class _OnDevice:
    """Moves plotting inputs (and contexts) to the model's device and results back to the CPU."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.is_image, self.dim = model.is_image, model.dim
        self.manifold = getattr(model, "manifold", None)
        self.base = getattr(model, "base", None)
        self.conditional = getattr(model, "conditional", False)

    def _context(self, context):
        return None if context is None else torch.as_tensor(context).to(self.device)

    def __call__(self, x, context=None):
        z, log_det = self.model(x.to(self.device), self._context(context))
        return z.cpu(), log_det.cpu()

    def log_prob(self, x, context=None):
        return self.model.log_prob(x.to(self.device), self._context(context)).cpu()

    def sample(self, n, context=None, temperature=1.0):
        if context is None:
            return self.model.sample(n, temperature=temperature).cpu()
        return self.model.sample(n, context=self._context(context), temperature=temperature).cpu()


def _log_image(logger, key: str, path: Path, step: int) -> None:
    name = type(logger).__name__
    if name == "WandbLogger":
        logger.log_image(key=key, images=[str(path)], step=step)
    elif name == "TensorBoardLogger":
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"))
        logger.experiment.add_image(key, img, step, dataformats="HWC")
