"""Posterior pair plots of simulation-based inference: samples of ``q(theta | x_o)`` with the reference posterior's
samples overlaid, one panel per pair of parameters (lower triangle: both sample sets as points; diagonal: both
marginal histograms), the true parameter marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from flowforge.training.visualize import plt, save_figure

MODEL_COLOUR, REFERENCE_COLOUR = "tab:blue", "tab:orange"


def posterior_pair_plot(
    samples: Tensor,
    reference: Tensor,
    path: Path,
    true_theta: Tensor | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    max_points: int = 2000,
) -> Path:
    """Write the pair plot of ``samples`` (the model's, ``(n, d)``) against ``reference`` (``(m, d)``) to ``path``
    (module docstring); at most ``max_points`` of each are scattered, all go into the histograms."""
    samples, reference = samples.detach().cpu().double().numpy(), reference.detach().cpu().double().numpy()
    d = samples.shape[1]
    labels = list(labels) if labels is not None else [f"theta_{i + 1}" for i in range(d)]
    size = min(2.0, 14.0 / d)
    fig, axes = plt.subplots(d, d, figsize=(size * d + 0.5, size * d + 0.5), squeeze=False)
    both = np.concatenate([samples, reference])
    lo, hi = np.quantile(both, 0.001, axis=0), np.quantile(both, 0.999, axis=0)
    pad = 0.05 * (hi - lo) + 1e-9
    lo, hi = lo - pad, hi + pad
    truth = None if true_theta is None else true_theta.detach().cpu().double().numpy().reshape(-1)
    few_s, few_r = samples[:max_points], reference[:max_points]
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                bins = np.linspace(lo[i], hi[i], 40)
                ax.hist(reference[:, i], bins=bins, density=True, color=REFERENCE_COLOUR, alpha=0.5, label="reference")
                ax.hist(samples[:, i], bins=bins, density=True, histtype="step", color=MODEL_COLOUR, label="model")
                ax.set_yticks([])
                if truth is not None:
                    ax.axvline(truth[i], color="k", lw=0.8)
            else:
                ax.scatter(few_r[:, j], few_r[:, i], s=1, color=REFERENCE_COLOUR, alpha=0.3, rasterized=True)
                ax.scatter(few_s[:, j], few_s[:, i], s=1, color=MODEL_COLOUR, alpha=0.3, rasterized=True)
                if truth is not None:
                    ax.plot(truth[j], truth[i], "k+", ms=6)
                ax.set_ylim(lo[i], hi[i])
            ax.set_xlim(lo[j], hi[j])
            ax.tick_params(labelsize=6)
            if i == d - 1:
                ax.set_xlabel(labels[j], fontsize=8)
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i], fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper right", frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
