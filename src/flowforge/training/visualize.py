"""Figures: 2-D density plots (model density next to samples), 1-D densities, 1-D regression fits
(target curve and the model's F(x) on a grid, also written as CSV), image grids (PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


@torch.no_grad()
def density_plot_2d(model, data: Tensor, path: Path, n_grid: int = 150, n_samples: int = 2000) -> Path:
    """Three panels: data, model density exp(log p) on a grid, model samples."""
    lim = float(data.abs().max()) * 1.1 + 1e-3
    g = torch.linspace(-lim, lim, n_grid)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    p = model.log_prob(grid).exp().reshape(n_grid, n_grid)
    samples = model.sample(n_samples)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=100, range=[[-lim, lim], [-lim, lim]])
    axes[0].set_title("data")
    axes[1].imshow(p.numpy(), extent=[-lim, lim, -lim, lim], origin="lower")
    axes[1].set_title("model density")
    axes[2].hist2d(samples[:, 0].numpy(), samples[:, 1].numpy(), bins=100, range=[[-lim, lim], [-lim, lim]])
    axes[2].set_title("model samples")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


@torch.no_grad()
def density_plot_1d(model, data: Tensor, path: Path, n_grid: int = 400) -> Path:
    lo, hi = float(data.min()), float(data.max())
    pad = 0.1 * (hi - lo) + 1e-3
    g = torch.linspace(lo - pad, hi + pad, n_grid)[:, None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(data[:, 0].numpy(), bins=100, density=True, alpha=0.5, label="data")
    ax.plot(g[:, 0].numpy(), model.log_prob(g).exp().numpy(), label="model")
    ax.legend()
    return save_figure(fig, path)


FIT_GRID = (-2.0, 2.0, 400)


@torch.no_grad()
def fit_curve_1d(model, x: Tensor, y: Tensor, target_fn=None, grid=FIT_GRID) -> tuple[Tensor, Tensor, Tensor]:
    """``(g, target(g), F(g))`` on ``g = linspace(*grid)``: ``F(g)`` is the model's forward output ``model(g)[0]``;
    the target is ``target_fn(g)`` when given, else the data ``(x, y)`` linearly interpolated at ``g``."""
    lo, hi, n = grid
    g = torch.linspace(lo, hi, int(n))[:, None]
    pred = model(g)[0].reshape(-1).float().cpu()
    if target_fn is not None:
        target = target_fn(g).reshape(-1).float()
    else:
        xs, order = x.reshape(-1).float().cpu().sort()
        ys = y.reshape(-1).float().cpu()[order]
        target = torch.from_numpy(np.interp(g.reshape(-1).numpy(), xs.numpy(), ys.numpy())).float()
    return g.reshape(-1), target, pred


@torch.no_grad()
def fit_plot_1d(model, x: Tensor, y: Tensor, path: Path, target_fn=None, csv_path=None, grid=FIT_GRID) -> Path:
    """The target curve and the model's ``F(x)`` on the grid of :func:`fit_curve_1d` (dense ``[-2, 2]``), with the
    grid MSE in the title; ``csv_path`` also gets the columns ``x, target, prediction``."""
    g, target, pred = fit_curve_1d(model, x, y, target_fn, grid)
    if csv_path is not None:
        write_fit_csv(csv_path, g, target, pred)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(g.numpy(), target.numpy(), "k--", lw=1.5, label="target")
    ax.plot(g.numpy(), pred.numpy(), lw=1.5, label="model F(x)")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"grid MSE {float((pred - target).pow(2).mean()):.4g}")
    ax.legend()
    return save_figure(fig, path)


def write_fit_csv(path: Path, x: Tensor, target: Tensor, prediction: Tensor) -> Path:
    """A CSV with header ``x,target,prediction`` and one row per grid point."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["x,target,prediction"] + [f"{a:.6g},{b:.6g},{c:.6g}" for a, b, c in zip(x.tolist(), target.tolist(), prediction.tolist())]
    path.write_text("\n".join(rows) + "\n")
    return path


def image_grid(images: Tensor, path: Path) -> Path:
    """Images in [0, 1] of shape (N, C, H, W) tiled in a square grid."""
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
    return save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 80) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
