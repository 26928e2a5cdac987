"""Figures: 2-D density plots (model density next to samples), 1-D densities, 1-D regression fits
(target curve and the model's F(x) on a grid, also written as CSV), image grids (PNG), and manifold
plots: S^2 in the equal-area Mollweide projection (longitude ``atan2(x_2, x_1)``, latitude ``asin(x_3)``),
S^1 as densities over the angle, the 3-simplex as a ternary plot (``(p_2 + p_3 / 2, p_3 sqrt(3) / 2)``)."""

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
    rows = ["x,target,prediction"] + [
        f"{a:.6g},{b:.6g},{c:.6g}" for a, b, c in zip(x.tolist(), target.tolist(), prediction.tolist())
    ]
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
            ax.imshow(
                img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1
            )
    return save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 80) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- manifolds
def _lon_lat(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = x.double()
    lon = torch.atan2(x[:, 1], x[:, 0])
    lat = torch.asin((x[:, 2] / x.norm(dim=1)).clamp(-1, 1))
    return lon.numpy(), lat.numpy()


@torch.no_grad()
def sphere_plot(model, data: Tensor, path: Path, n_lon: int = 120, n_lat: int = 60, n_samples: int = 2000) -> Path:
    """Data on S^2, the model density on a longitude/latitude grid and model samples, each in the
    equal-area Mollweide projection."""
    lon = torch.linspace(-math.pi, math.pi, n_lon + 1)
    lat = torch.linspace(-math.pi / 2, math.pi / 2, n_lat + 1)
    lon_c, lat_c = 0.5 * (lon[1:] + lon[:-1]), 0.5 * (lat[1:] + lat[:-1])
    la, lo = torch.meshgrid(lat_c, lon_c, indexing="ij")
    grid = torch.stack([la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()], -1).reshape(-1, 3)
    density = model.log_prob(grid).exp().reshape(n_lat, n_lon).float()
    samples = model.sample(n_samples)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), subplot_kw={"projection": "mollweide"})
    for ax, pts, title in ((axes[0], data, "data"), (axes[2], samples, "model samples")):
        lon_p, lat_p = _lon_lat(pts)
        ax.scatter(lon_p, lat_p, s=1, alpha=0.3)
        ax.set_title(title)
    axes[1].pcolormesh(lon.numpy(), lat.numpy(), density.numpy(), shading="flat")
    axes[1].set_title("model density")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xticklabels([])
        ax.set_yticklabels([])
    return save_figure(fig, path)


@torch.no_grad()
def circle_plot(model, data: Tensor, path: Path, n_grid: int = 400, n_samples: int = 2000) -> Path:
    """S^1: histograms of the data's and the samples' angles next to the model density over the angle
    (all per unit arc length)."""
    theta = torch.linspace(-math.pi, math.pi, n_grid)
    grid = torch.stack([theta.cos(), theta.sin()], 1)
    density = model.log_prob(grid).exp().float()
    samples = model.sample(n_samples)
    fig, ax = plt.subplots(figsize=(6, 4))
    for pts, label in ((data, "data"), (samples, "model samples")):
        pts = pts.double()
        ax.hist(
            torch.atan2(pts[:, 1], pts[:, 0]).numpy(),
            bins=100,
            range=(-math.pi, math.pi),
            density=True,
            alpha=0.4,
            label=label,
        )
    ax.plot(theta.numpy(), density.numpy(), label="model density")
    ax.set_xlabel("angle")
    ax.legend()
    return save_figure(fig, path)


def _ternary(p: Tensor) -> tuple[np.ndarray, np.ndarray]:
    p = p.double()
    p = p / p.sum(1, keepdim=True)
    return (p[:, 1] + 0.5 * p[:, 2]).numpy(), (p[:, 2] * math.sqrt(3) / 2).numpy()


@torch.no_grad()
def ternary_plot(model, data: Tensor, path: Path, n_grid: int = 80, n_samples: int = 2000) -> Path:
    """The 3-simplex as a triangle: data, the model density on a barycentric grid, model samples."""
    import matplotlib.tri as mtri

    steps = torch.arange(1, n_grid, dtype=torch.float64) / n_grid
    a, b = torch.meshgrid(steps, steps, indexing="ij")
    keep = (a + b) < 1 - 0.5 / n_grid
    grid = torch.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1).float()
    density = model.log_prob(grid).exp().float().numpy()
    samples = model.sample(n_samples)
    gx, gy = _ternary(grid)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, pts, title in ((axes[0], data, "data"), (axes[2], samples, "model samples")):
        px, py = _ternary(pts)
        ax.scatter(px, py, s=1, alpha=0.3)
        ax.set_title(title)
    axes[1].tricontourf(mtri.Triangulation(gx, gy), density, levels=30)
    axes[1].set_title("model density")
    for ax in axes:
        ax.plot([0, 1, 0.5, 0], [0, 0, math.sqrt(3) / 2, 0], "k-", lw=0.8)
        ax.set_aspect("equal")
        ax.axis("off")
    return save_figure(fig, path)


def manifold_figure(model, manifold: str, dim: int, data: Tensor, path: Path):
    """The figure for a model on ``manifold`` in R^dim: S^2 -> :func:`sphere_plot`, S^1 -> :func:`circle_plot`,
    3-simplex -> :func:`ternary_plot`; None (no figure) for other dimensions."""
    if manifold == "sphere" and dim == 3:
        return sphere_plot(model, data, path)
    if manifold == "sphere" and dim == 2:
        return circle_plot(model, data, path)
    if manifold == "simplex" and dim == 3:
        return ternary_plot(model, data, path)
    return None


def model_figure(model, path: Path, data: Tensor | None = None, images: Tensor | None = None) -> Path | None:
    """The figure of a flow: a grid of ``images`` (its samples in [0, 1]) for image models, the figure of its manifold
    (:func:`manifold_figure`) for models on one, else a density plot next to ``data`` in 2-D and 1-D; None when
    there is no figure for the model (other dimensions)."""
    if model.is_image:
        return image_grid(images, path)
    if getattr(model, "manifold", None) is not None:
        return manifold_figure(model, model.manifold, model.dim, data, path)
    if model.dim == 2:
        return density_plot_2d(model, data, path)
    if model.dim == 1:
        return density_plot_1d(model, data, path)
    return None
