"""Figures: 2-D density plots (data | model density | model samples), 1-D densities, 1-D regression fits
(target curve and the model's F(x) on a grid, also written as CSV), image grids (PNG), and manifold
plots: S^2 in the equal-area Mollweide projection (longitude ``atan2(x_2, x_1)``, latitude ``asin(x_3)``),
S^1 as densities over the angle, the 3-simplex as a ternary plot (``(p_2 + p_3 / 2, p_3 sqrt(3) / 2)``).
Conditional models ``p(x | c)`` get one panel per context: 2-D densities ``p(x | c_k)`` for several contexts
(:func:`conditional_density_plot_2d`) and, for images, a grid with one row of samples per class or context
(:func:`context_grid`).

Every figure takes a ``title`` (drawn as its suptitle; :func:`figure_title` composes the usual one: model
family, dataset, when it was drawn, the likelihood score known then, and the sampling temperature) and,
where it draws samples, a ``temperature``.  Axes carry their coordinates (``x1``, ``x2`` over the data's
range; longitude/latitude; the angle on S^1; the simplex's corners), and density panels a colour bar
naming what they show.  At a temperature ``T != 1`` the density panel shows the tempered density ``p_T``,
the push-forward of the base distribution with its standard deviation scaled by ``T`` (the distribution
the samples are drawn from, :func:`tempered_log_prob`); for models whose base has no such form (manifold
flows) it shows ``p`` and says that it is at ``T=1``.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
from torch import Tensor  # noqa: E402

from flowforge.flows.distributions import DiagonalGaussian  # noqa: E402

#: point clouds up to this size are drawn as scatter plots (every point visible), larger ones as 2-D histograms
SCATTER_MAX = 5000


# ----------------------------------------------------------------------------- titles
def figure_title(
    family: str | None = None,
    dataset: str | None = None,
    when: str | None = None,
    score: str | None = None,
    temperature: float | None = None,
) -> str:
    """The suptitle of a figure: ``"<family> on <dataset>, <when>, <score>, samples at T=<temperature>"``; parts
    given as None are left out."""
    head = " on ".join(p for p in (family, dataset) if p)
    parts = [head, when, score, None if temperature is None else f"samples at T={temperature:g}"]
    return ", ".join(p for p in parts if p)


def score_text(metrics: Mapping[str, float | Tensor], stage: str) -> str | None:
    """The likelihood score among ``metrics`` (keys ``<stage>/<name>``) as text: bits per dimension when logged
    (images), else the NLL in nats per example, else the MSE (regression), else the loss; None when none is there."""
    for key, label, fmt in (
        ("bpd", "bits/dim", "{:.4f}"),
        ("nll", "NLL", "{:.4f} nats"),
        ("mse", "MSE", "{:.4g}"),
        ("loss", "loss", "{:.4f}"),
    ):
        value = metrics.get(f"{stage}/{key}")
        if value is not None:
            return f"{stage} {label} {fmt.format(float(value))}"
    return None


def _suptitle(fig, title: str | None) -> None:
    if title:
        width = max(30, int(fig.get_figwidth() * 13))
        fig.suptitle(textwrap.fill(title, width), fontsize=max(10.0, 0.8 * fig.get_figwidth()))


# ----------------------------------------------------------------------------- densities
def tempered_log_prob(model, x: Tensor, temperature: float = 1.0, context: Tensor | None = None) -> Tensor | None:
    """``log p_T(x)``: the log-density of ``model.sample(n, temperature)``, i.e. of ``f^{-1}(z)`` with ``z`` from the
    base Gaussian with its standard deviation scaled by ``T``:
    ``log N(f(x); mu, T^2 sigma^2) + log |det df/dx|`` (``model.log_prob`` at ``T = 1``).  None when the model's base
    is not a :class:`~flowforge.flows.distributions.DiagonalGaussian` (manifold bases are tempered otherwise).
    ``context``: the raw context of a conditional model, one per row of ``x`` (its base must not depend on it)."""
    if temperature == 1.0:
        return model.log_prob(x) if context is None else model.log_prob(x, context)
    base = getattr(model, "base", None)
    if not isinstance(base, DiagonalGaussian) or getattr(base, "conditional", False):
        return None
    z, log_det = model(x) if context is None else model(x, context)
    loc, log_scale = base.loc.to(z), base.log_scale.to(z)
    eps = (z - loc) * torch.exp(-log_scale) / temperature
    const = log_scale.sum() + base.dim * (math.log(temperature) + 0.5 * math.log(2 * math.pi))
    return -0.5 * eps.square().reshape(z.shape[0], -1).sum(1) - const + log_det


def _density(model, grid: Tensor, temperature: float) -> tuple[Tensor, str]:
    """The model's density on ``grid`` at ``temperature`` and its colour-bar label."""
    log_p = tempered_log_prob(model, grid, temperature)
    if log_p is not None:
        return log_p.exp().float(), "p(x)" if temperature == 1.0 else f"p_T(x), T={temperature:g}"
    return model.log_prob(grid).exp().float(), "p(x) at T=1"


def _samples(model, samples: Tensor | None, n_samples: int, temperature: float) -> Tensor:
    return (model.sample(n_samples, temperature=temperature) if samples is None else samples).detach().float().cpu()


def _points_2d(ax, pts: Tensor, lim: float, what: str) -> None:
    """``pts`` as a scatter plot (alpha falling with the count), or a 2-D histogram above :data:`SCATTER_MAX`."""
    n = pts.shape[0]
    if n <= SCATTER_MAX:
        alpha = min(1.0, max(0.05, 20.0 / math.sqrt(n))) if n else 1.0
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=alpha, linewidths=0)
        ax.set_title(f"{what} (n={n})")
    else:
        ax.hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=100, range=[[-lim, lim], [-lim, lim]])
        ax.set_title(f"{what} (n={n}, 2-D histogram)")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)


@torch.no_grad()
def density_plot_2d(
    model,
    data: Tensor,
    path: Path,
    n_grid: int = 150,
    n_samples: int = 2000,
    samples: Tensor | None = None,
    temperature: float = 1.0,
    title: str | None = None,
) -> Path:
    """Three panels over the data's range: the data, the model density on a grid (with its colour bar) and the
    model's samples (``samples``, else ``n_samples`` drawn at ``temperature``); axes ``x1``, ``x2``.  The PNG records
    each panel's pixel box (:func:`panel_boxes`)."""
    lim = float(data.abs().max()) * 1.1 + 1e-3
    g = torch.linspace(-lim, lim, n_grid)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    p, label = _density(model, grid, temperature)
    samples = _samples(model, samples, n_samples, temperature)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    _points_2d(axes[0], data.float().cpu(), lim, "data")
    im = axes[1].imshow(p.reshape(n_grid, n_grid).numpy(), extent=[-lim, lim, -lim, lim], origin="lower")
    axes[1].set_title("model density" if temperature == 1.0 else f"model density at T={temperature:g}")
    cbar = fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label=label)
    _points_2d(axes[2], samples, lim, f"model samples, T={temperature:g}")
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    _suptitle(fig, title)
    return save_figure(fig, path, panels=[[axes[0]], [axes[1], cbar.ax], [axes[2]]])


@torch.no_grad()
def density_plot_1d(
    model,
    data: Tensor,
    path: Path,
    n_grid: int = 400,
    n_samples: int = 2000,
    samples: Tensor | None = None,
    temperature: float = 1.0,
    title: str | None = None,
) -> Path:
    """Histograms of the data and of the model's samples (``samples``, else ``n_samples`` at ``temperature``) with
    the model density on a grid over the data's range."""
    lo, hi = float(data.min()), float(data.max())
    pad = 0.1 * (hi - lo) + 1e-3
    g = torch.linspace(lo - pad, hi + pad, n_grid)[:, None]
    p, label = _density(model, g, temperature)
    samples = _samples(model, samples, n_samples, temperature)
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    bins = np.linspace(lo - pad, hi + pad, 101)
    ax.hist(data[:, 0].float().cpu().numpy(), bins=bins, density=True, alpha=0.4, label=f"data (n={data.shape[0]})")
    ax.hist(
        samples[:, 0].numpy(),
        bins=bins,
        density=True,
        alpha=0.4,
        label=f"model samples (n={samples.shape[0]}, T={temperature:g})",
    )
    ax.plot(g[:, 0].numpy(), p.numpy(), "k-", lw=1.5, label=f"model density {label}")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    _suptitle(fig, title)
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
def fit_plot_1d(
    model, x: Tensor, y: Tensor, path: Path, target_fn=None, csv_path=None, grid=FIT_GRID, title: str | None = None
) -> Path:
    """The target curve and the model's ``F(x)`` on the grid of :func:`fit_curve_1d` (dense ``[-2, 2]``), with the
    grid MSE in the axes' title; ``csv_path`` also gets the columns ``x, target, prediction``."""
    g, target, pred = fit_curve_1d(model, x, y, target_fn, grid)
    if csv_path is not None:
        write_fit_csv(csv_path, g, target, pred)
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    ax.plot(g.numpy(), target.numpy(), "k--", lw=1.5, label="target")
    ax.plot(g.numpy(), pred.numpy(), lw=1.5, label="model F(x)")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"grid MSE {float((pred - target).pow(2).mean()):.4g}")
    ax.legend()
    _suptitle(fig, title)
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


def image_grid(images: Tensor, path: Path, title: str | None = None) -> Path:
    """Images in [0, 1] of shape (N, C, H, W) tiled in a square grid (no ticks), ``title`` above."""
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size = max(1.0, 6.0 / cols)  # inches per image: small grids are not drawn tiny
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size + (0.6 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(
                img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1
            )
    _suptitle(fig, title)
    return save_figure(fig, path)


#: PNG text key holding the pixel boxes of a figure's panels (:func:`save_figure`, :func:`panel_boxes`)
PANELS_KEY = "flowforge:panels"


def save_figure(fig, path: Path, dpi: int = 80, panels=None) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure.  ``panels``: groups of axes (a panel and
    its colour bar) whose pixel boxes in the PNG are stored in its ``flowforge:panels`` text chunk (read back by
    :func:`panel_boxes`), so that panels can be cut out of the image with their labels and nothing else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    metadata = None
    if panels:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        scale, height = dpi / fig.dpi, fig.get_figheight() * dpi
        boxes = []
        for group in panels:
            box = Bbox.union([ax.get_tightbbox(renderer) for ax in group])
            x0, x1 = box.x0 * scale, box.x1 * scale
            top, bottom = height - box.y1 * scale, height - box.y0 * scale
            boxes.append([max(0, math.floor(x0)), max(0, math.floor(top)), math.ceil(x1), math.ceil(bottom)])
        metadata = {PANELS_KEY: json.dumps(boxes)}
    fig.savefig(path, dpi=dpi, metadata=metadata)
    plt.close(fig)
    return path


def panel_boxes(path: Path) -> list[tuple[int, int, int, int]] | None:
    """The ``(left, top, right, bottom)`` pixel boxes of the panels of a PNG written by :func:`save_figure` with
    ``panels``; None for other images."""
    from PIL import Image

    with Image.open(path) as img:
        text = img.info.get(PANELS_KEY)
    return [tuple(b) for b in json.loads(text)] if text else None


# ----------------------------------------------------------------------------- conditional models
def context_label(c: Tensor) -> str:
    """A context as a panel label: ``class k`` for a label, ``c = 0.25`` or ``c = (0.2, 0.5, ...)`` for a vector."""
    c = torch.as_tensor(c)
    if not torch.is_floating_point(c):
        return f"class {int(c)}"
    values = [f"{float(v):.3g}" for v in c.reshape(-1)[:4]]
    more = ", ..." if c.numel() > 4 else ""
    return f"c = {values[0]}" if c.numel() == 1 else f"c = ({', '.join(values)}{more})"


def figure_contexts(contexts: Tensor, n: int = 4) -> Tensor:
    """``n`` contexts to draw a conditional model at, from a split's contexts ``(N, K)``: for ``K = 1`` the
    quantiles 5%, ..., 95% (evenly spaced), so the panels span the range of ``c``; else the first ``n`` rows."""
    contexts = contexts.float()
    if contexts.shape[1] == 1:
        q = torch.linspace(0.05, 0.95, n, dtype=contexts.dtype)
        return torch.quantile(contexts[:, 0], q).unsqueeze(1)
    return contexts[:n]


def nearest_data(data: Tensor, data_contexts: Tensor, c: Tensor, k: int = 300) -> Tensor:
    """The ``k`` examples of ``data`` whose contexts are nearest to ``c`` (Euclidean): the data of ``p(x | c)``
    when the contexts are continuous."""
    d = (data_contexts.float().reshape(len(data_contexts), -1) - c.float().reshape(1, -1)).norm(dim=1)
    return data[d.argsort()[:k]]


@torch.no_grad()
def conditional_density_plot_2d(
    model,
    contexts: Tensor,
    path: Path,
    data: Tensor | None = None,
    data_contexts: Tensor | None = None,
    n_grid: int = 100,
    n_samples: int = 1000,
    temperature: float = 1.0,
    title: str | None = None,
    samples: Tensor | None = None,
) -> Path:
    """One column per context ``c_k`` (``contexts``: raw contexts, labels ``(n,)`` or vectors ``(n, K)``): the
    model density ``p(x | c_k)`` on a grid (top) and ``n_samples`` samples of ``p(x | c_k)`` at ``temperature``
    (bottom; ``samples``: ``(n, m, 2)`` drawn already), with the data of that context (``data`` whose
    ``data_contexts`` equal a label, or the 300 nearest to a vector) in black over the samples.  The range covers
    the data and the samples.  The PNG records each panel's pixel box (:func:`panel_boxes`)."""
    n = len(contexts)
    drawn = []
    for k in range(n):
        c = contexts[k]
        if samples is not None:
            drawn.append(samples[k].detach().float().cpu())
        else:
            drawn.append(model.sample(n_samples, context=c, temperature=temperature).detach().float().cpu())
    near = []
    for k in range(n):
        if data is None or data_contexts is None:
            near.append(None)
        elif not torch.is_floating_point(data_contexts):
            near.append(data[data_contexts == contexts[k]][:SCATTER_MAX].float())
        else:
            near.append(nearest_data(data, data_contexts, contexts[k]).float())
    extent = [p.abs().max() for p in [*drawn, *(d for d in near if d is not None and len(d))] if len(p)]
    lim = float(torch.stack(extent).max()) * 1.1 + 1e-3 if extent else 3.0
    lim = min(lim, 1e3)
    g = torch.linspace(-lim, lim, n_grid)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 0.6, 7.4), squeeze=False)
    panels = []
    for k in range(n):
        c = contexts[k]
        cs = c.unsqueeze(0).expand(grid.shape[0], *c.shape)
        log_p = tempered_log_prob(model, grid, temperature, cs)
        label = "p(x | c)" if temperature == 1.0 else f"p_T(x | c), T={temperature:g}"
        if log_p is None:
            log_p, label = model.log_prob(grid, cs), "p(x | c) at T=1"
        top, bottom = axes[0, k], axes[1, k]
        im = top.imshow(
            log_p.exp().float().reshape(n_grid, n_grid).numpy(), extent=[-lim, lim, -lim, lim], origin="lower"
        )
        top.set_title(f"density, {context_label(c)}")
        cbar = fig.colorbar(im, ax=top, fraction=0.046, pad=0.04, label=label)
        pts = drawn[k]
        bottom.scatter(
            pts[:, 0].numpy(),
            pts[:, 1].numpy(),
            s=2,
            alpha=min(1.0, 20.0 / math.sqrt(max(1, len(pts)))),
            linewidths=0,
            label="samples",
        )
        if near[k] is not None and len(near[k]):
            bottom.scatter(near[k][:, 0].numpy(), near[k][:, 1].numpy(), s=3, c="black", linewidths=0, label="data")
        bottom.set_xlim(-lim, lim)
        bottom.set_ylim(-lim, lim)
        bottom.set_title(
            f"samples (n={len(pts)}), {context_label(c)}" + (", data in black" if near[k] is not None else "")
        )
        for ax in (top, bottom):
            ax.set_aspect("equal")
            ax.set_xlabel("x1")
            ax.set_ylabel("x2")
        panels += [[top, cbar.ax], [bottom]]
    _suptitle(fig, title)
    return save_figure(fig, path, panels=panels)


def context_grid(images: Tensor, contexts: Tensor, path: Path, title: str | None = None) -> Path:
    """Images in [0, 1] of shape ``(R, M, C, H, W)``: one row of ``M`` samples per context ``contexts[r]`` (a class
    label or a context vector), labelled at the left; ``title`` above."""
    rows, cols = images.shape[:2]
    size = max(0.6, min(1.5, 10.0 / cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(4.0, cols * size + 1.2), rows * size + (0.6 if title else 0)), squeeze=False
    )
    for r in range(rows):
        for m in range(cols):
            ax = axes[r, m]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            img = images[r, m].clamp(0, 1).permute(1, 2, 0).numpy()
            gray = img.shape[-1] == 1
            ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[r, 0].set_ylabel(context_label(contexts[r]), rotation=0, ha="right", va="center", fontsize=9)
    _suptitle(fig, title)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- manifolds
def _lon_lat(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = x.double()
    lon = torch.atan2(x[:, 1], x[:, 0])
    lat = torch.asin((x[:, 2] / x.norm(dim=1)).clamp(-1, 1))
    return lon.numpy(), lat.numpy()


def _manifold_density(model, grid: Tensor, temperature: float) -> tuple[np.ndarray, str]:
    """The model density on ``grid`` and its label: a manifold flow's samples at ``T != 1`` come from a tempered
    base of another form, so the density shown is always ``p`` (at ``T=1``)."""
    p = model.log_prob(grid).exp().float().cpu().numpy()
    return p, "p(x)" if temperature == 1.0 else "p(x) at T=1"


@torch.no_grad()
def sphere_plot(
    model,
    data: Tensor,
    path: Path,
    n_lon: int = 120,
    n_lat: int = 60,
    n_samples: int = 2000,
    samples: Tensor | None = None,
    temperature: float = 1.0,
    title: str | None = None,
) -> Path:
    """Data on S^2, the model density on a longitude/latitude grid (colour bar: density per unit area of the
    sphere) and model samples, each in the equal-area Mollweide projection."""
    lon = torch.linspace(-math.pi, math.pi, n_lon + 1)
    lat = torch.linspace(-math.pi / 2, math.pi / 2, n_lat + 1)
    lon_c, lat_c = 0.5 * (lon[1:] + lon[:-1]), 0.5 * (lat[1:] + lat[:-1])
    la, lo = torch.meshgrid(lat_c, lon_c, indexing="ij")
    grid = torch.stack([la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()], -1).reshape(-1, 3)
    density, label = _manifold_density(model, grid, temperature)
    samples = _samples(model, samples, n_samples, temperature)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), subplot_kw={"projection": "mollweide"})
    for ax, pts, what in ((axes[0], data, "data"), (axes[2], samples, f"model samples, T={temperature:g}")):
        lon_p, lat_p = _lon_lat(pts)
        ax.scatter(lon_p, lat_p, s=1, alpha=min(1.0, max(0.05, 20.0 / math.sqrt(max(1, len(lon_p))))))
        ax.set_title(f"{what} (n={len(lon_p)})", pad=14)
    mesh = axes[1].pcolormesh(lon.numpy(), lat.numpy(), density.reshape(n_lat, n_lon), shading="flat")
    axes[1].set_title("model density", pad=14)
    fig.colorbar(
        mesh,
        ax=axes[1],
        orientation="horizontal",
        fraction=0.06,
        pad=0.12,
        label=label.replace("p(x)", "p(x) per unit area"),
    )
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("longitude atan2(x2, x1)", fontsize=8)
        ax.set_ylabel("latitude asin(x3)", fontsize=8)
    _suptitle(fig, title)
    return save_figure(fig, path)


@torch.no_grad()
def circle_plot(
    model,
    data: Tensor,
    path: Path,
    n_grid: int = 400,
    n_samples: int = 2000,
    samples: Tensor | None = None,
    temperature: float = 1.0,
    title: str | None = None,
) -> Path:
    """S^1: histograms of the data's and the samples' angles next to the model density over the angle
    (all per unit arc length)."""
    theta = torch.linspace(-math.pi, math.pi, n_grid)
    grid = torch.stack([theta.cos(), theta.sin()], 1)
    density, label = _manifold_density(model, grid, temperature)
    samples = _samples(model, samples, n_samples, temperature)
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    for pts, what in ((data, "data"), (samples, f"model samples, T={temperature:g}")):
        pts = pts.double()
        ax.hist(
            torch.atan2(pts[:, 1], pts[:, 0]).numpy(),
            bins=100,
            range=(-math.pi, math.pi),
            density=True,
            alpha=0.4,
            label=f"{what} (n={pts.shape[0]})",
        )
    ax.plot(theta.numpy(), density, "k-", lw=1.5, label=f"model density {label}")
    ax.set_xlim(-math.pi, math.pi)
    ax.set_xlabel("angle atan2(x2, x1) (rad)")
    ax.set_ylabel("density per unit arc length")
    ax.legend(fontsize=8)
    _suptitle(fig, title)
    return save_figure(fig, path)


def _ternary(p: Tensor) -> tuple[np.ndarray, np.ndarray]:
    p = p.double()
    p = p / p.sum(1, keepdim=True)
    return (p[:, 1] + 0.5 * p[:, 2]).numpy(), (p[:, 2] * math.sqrt(3) / 2).numpy()


@torch.no_grad()
def ternary_plot(
    model,
    data: Tensor,
    path: Path,
    n_grid: int = 80,
    n_samples: int = 2000,
    samples: Tensor | None = None,
    temperature: float = 1.0,
    title: str | None = None,
) -> Path:
    """The 3-simplex as a triangle with corners ``x1``, ``x2``, ``x3`` (the vertices ``e_1, e_2, e_3``): data, the
    model density on a barycentric grid (with its colour bar), model samples."""
    import matplotlib.tri as mtri

    steps = torch.arange(1, n_grid, dtype=torch.float64) / n_grid
    a, b = torch.meshgrid(steps, steps, indexing="ij")
    keep = (a + b) < 1 - 0.5 / n_grid
    grid = torch.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1).float()
    density, label = _manifold_density(model, grid, temperature)
    samples = _samples(model, samples, n_samples, temperature)
    gx, gy = _ternary(grid)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, pts, what in ((axes[0], data, "data"), (axes[2], samples, f"model samples, T={temperature:g}")):
        px, py = _ternary(pts)
        ax.scatter(px, py, s=1, alpha=min(1.0, max(0.05, 20.0 / math.sqrt(max(1, len(px))))))
        ax.set_title(f"{what} (n={len(px)})")
    tri = axes[1].tricontourf(mtri.Triangulation(gx, gy), density, levels=30)
    axes[1].set_title("model density")
    fig.colorbar(tri, ax=axes[1], fraction=0.046, pad=0.04, label=label)
    h = math.sqrt(3) / 2
    for ax in axes:
        ax.plot([0, 1, 0.5, 0], [0, 0, h, 0], "k-", lw=0.8)
        for (x, y), name, va in (((0, 0), "x1", "top"), ((1, 0), "x2", "top"), ((0.5, h), "x3", "bottom")):
            ax.annotate(name, (x, y), ha="center", va=va, fontsize=9)
        ax.set_xlim(-0.08, 1.08)
        ax.set_ylim(-0.1, h + 0.1)
        ax.set_aspect("equal")
        ax.axis("off")
    _suptitle(fig, title)
    return save_figure(fig, path)


def manifold_figure(
    model,
    manifold: str,
    dim: int,
    data: Tensor,
    path: Path,
    samples: Tensor | None = None,
    temperature: float = 1.0,
    title: str | None = None,
):
    """The figure for a model on ``manifold`` in R^dim: S^2 -> :func:`sphere_plot`, S^1 -> :func:`circle_plot`,
    3-simplex -> :func:`ternary_plot`; None (no figure) for other dimensions."""
    options = {"samples": samples, "temperature": temperature, "title": title}
    if manifold == "sphere" and dim == 3:
        return sphere_plot(model, data, path, **options)
    if manifold == "sphere" and dim == 2:
        return circle_plot(model, data, path, **options)
    if manifold == "simplex" and dim == 3:
        return ternary_plot(model, data, path, **options)
    return None


def model_figure(
    model,
    path: Path,
    data: Tensor | None = None,
    images: Tensor | None = None,
    samples: Tensor | None = None,
    temperature: float = 1.0,
    title: str | None = None,
) -> Path | None:
    """The figure of a flow: a grid of ``images`` (its samples in [0, 1]) for image models, the figure of its manifold
    (:func:`manifold_figure`) for models on one, else a density plot next to ``data`` in 2-D and 1-D; None when
    there is no figure for the model (other dimensions).  ``samples`` are the points drawn in the samples panel
    (default: 2000 drawn at ``temperature``); ``title`` is the figure's suptitle (:func:`figure_title`)."""
    if getattr(model, "conditional", False):
        raise ValueError("a conditional model's figure is conditional_figure (one panel per context)")
    if model.is_image:
        return image_grid(images, path, title=title)
    options = {"samples": samples, "temperature": temperature, "title": title}
    if getattr(model, "manifold", None) is not None:
        return manifold_figure(model, model.manifold, model.dim, data, path, **options)
    if model.dim == 2:
        return density_plot_2d(model, data, path, **options)
    if model.dim == 1:
        return density_plot_1d(model, data, path, **options)
    return None


def conditional_figure(
    model,
    path: Path,
    contexts: Tensor,
    data: Tensor | None = None,
    data_contexts: Tensor | None = None,
    images: Tensor | None = None,
    samples: Tensor | None = None,
    temperature: float = 1.0,
    title: str | None = None,
) -> Path | None:
    """The figure of a conditional flow at the raw ``contexts``: for image models a grid of ``images`` ``(R, M, C,
    H, W)`` with one row per context (:func:`context_grid`), in 2-D the density and samples per context
    (:func:`conditional_density_plot_2d`, ``samples`` ``(R, M, 2)`` when drawn already); None in other
    dimensions."""
    if model.is_image:
        return context_grid(images, contexts, path, title=title)
    if model.dim == 2:
        return conditional_density_plot_2d(
            model, contexts, path, data, data_contexts, samples=samples, temperature=temperature, title=title
        )
    return None
