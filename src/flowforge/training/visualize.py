"""Figures: 2-D density plots (model density next to samples), 1-D densities, image grids (PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
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
    return _save(fig, path)


@torch.no_grad()
def density_plot_1d(model, data: Tensor, path: Path, n_grid: int = 400) -> Path:
    lo, hi = float(data.min()), float(data.max())
    pad = 0.1 * (hi - lo) + 1e-3
    g = torch.linspace(lo - pad, hi + pad, n_grid)[:, None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(data[:, 0].numpy(), bins=100, density=True, alpha=0.5, label="data")
    ax.plot(g[:, 0].numpy(), model.log_prob(g).exp().numpy(), label="model")
    ax.legend()
    return _save(fig, path)


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
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
