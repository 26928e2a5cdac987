"""Paper-style summary figures and tables from finished run directories (no training, no model code).

``python -m flowforge.figures fit1d <run_dir> [<run_dir> ...] --out fit1d.png``
    The 1-D regression fits (Monotone Flows' multiple step function experiment) in one figure: the target
    curve once and every run's prediction ``F(x)``, read from ``<run_dir>/figures/fit.csv`` (columns ``x,
    target, prediction`` on a grid of [-2, 2], written by :class:`flowforge.training.callbacks.SampleFigures`
    under ``objective=regression``), each labelled with the run's test MSE (``test/mse`` in
    ``<run_dir>/metrics.json``: the mean of ``(F(x) - y)^2`` over the test split).  Prints a markdown table
    ``| variant | test MSE |``.

``python -m flowforge.figures toy2d <run_dir> [<run_dir> ...] --out toys.png``
    A grid of the 2-D toy density plots (rows: datasets, columns: the data, then one column per model),
    cut from each run's ``figures/test.png`` (the three panels data | model density | model samples drawn by
    :func:`flowforge.training.visualize.density_plot_2d`; ``--panel all`` keeps all three), with the test
    NLL (``test/nll``, nats per example) in the titles.  Prints a markdown table ``| dataset | model ... |``.

A run's variant / model name is its ``task_name`` and its dataset ``dataset.name``, read from
``<run_dir>/.hydra/config.yaml`` (written by ``train.py``); without it, the directory name.  Missing files
end the program with a message naming the file and the run that should have written it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowforge.errors import ConfigError  # noqa: E402
from flowforge.training.visualize import panel_boxes, save_figure  # noqa: E402


# ---------------------------------------------------------------------------------------------- run files
def run_config(run_dir: Path) -> dict:
    """The run's saved Hydra config (``.hydra/config.yaml``) as a dict, or ``{}`` when there is none."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def run_name(run_dir: Path) -> str:
    """``task_name`` of the run (e.g. ``fit1d_monotone``), else the directory's name."""
    name = run_config(run_dir).get("task_name")
    return str(name) if name and name != "train" else Path(run_dir).name


def run_dataset(run_dir: Path) -> str:
    return str((run_config(run_dir).get("dataset") or {}).get("name") or "?")


def run_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass run directories of finished train.py runs (with test=true)")
    return json.loads(path.read_text())


def metric(run_dir: Path, key: str) -> float:
    value = run_metrics(run_dir).get(key)
    if value is None:
        raise ConfigError(
            f"{Path(run_dir) / 'metrics.json'} has no '{key}'; was the run tested (test=true)"
            f"{' with objective=regression' if key == 'test/mse' else ''}?"
        )
    return float(value)


def read_fit_csv(run_dir: Path) -> dict[str, np.ndarray]:
    """Columns ``x, target, prediction`` of ``<run_dir>/figures/fit.csv`` (or ``<run_dir>/fit.csv``)."""
    run_dir = Path(run_dir)
    for path in (run_dir / "figures" / "fit.csv", run_dir / "fit.csv"):
        if path.is_file():
            with path.open() as f:
                rows = list(csv.DictReader(f))
            if not rows or not {"x", "target", "prediction"} <= set(rows[0]):
                raise ConfigError(f"{path} must have the columns x, target, prediction")
            return {k: np.array([float(r[k]) for r in rows]) for k in ("x", "target", "prediction")}
    raise ConfigError(
        f"no fit.csv in {run_dir / 'figures'}; it is written by runs with objective=regression "
        f"(e.g. experiment=fit1d_monotone)"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- fit1d
def fit1d(run_dirs: Sequence[Path], out: Path, title: str | None = None) -> str:
    """One figure with the target and every run's fit (test MSE in the legend); returns the markdown table."""
    runs = [Path(r) for r in run_dirs]
    data = [(run_name(r), read_fit_csv(r), metric(r, "test/mse")) for r in runs]
    n = len(data)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.6 * (n + 1), 3.4), sharey=True)
    overview = axes[0]
    first = data[0][1]
    overview.plot(first["x"], first["target"], "k--", lw=2, label="target")
    for i, (name, fit, mse) in enumerate(data):
        label = f"{name} (MSE {mse:.3g})"
        overview.plot(fit["x"], fit["prediction"], lw=1.3, color=f"C{i}", label=label)
        ax = axes[i + 1]
        ax.plot(fit["x"], fit["target"], "k--", lw=1.5, label="target")
        ax.plot(fit["x"], fit["prediction"], lw=1.5, color=f"C{i}", label="F(x)")
        ax.set_title(f"{name}\ntest MSE {mse:.3g}", fontsize=9)
        ax.set_xlabel("x")
    overview.set_title(title or "all fits", fontsize=9)
    overview.set_xlabel("x")
    overview.set_ylabel("y")
    overview.legend(fontsize=7, loc="upper left")
    save_figure(fig, out, dpi=100)
    return markdown_table(["variant", "test MSE"], [(name, f"{mse:.4g}") for name, _, mse in data])


# ---------------------------------------------------------------------------------------------- toy2d
def _panel(png: Path, which: int) -> np.ndarray:
    """The ``which``-th of the three panels of a density_plot_2d figure: its box as recorded in the PNG, else (an
    image without one) the ``which``-th third."""
    img = plt.imread(png)
    boxes = panel_boxes(png)
    if boxes and len(boxes) == 3:
        left, top, right, bottom = boxes[which]
        return img[top:bottom, left:right]
    w = img.shape[1] // 3
    return img[:, which * w : (which + 1) * w]


def toy2d(run_dirs: Sequence[Path], out: Path, panel: str = "density") -> str:
    """Grid of density plots, rows = datasets, columns = models; returns the markdown table of test NLLs."""
    runs = [Path(r) for r in run_dirs]
    cells: dict[tuple[str, str], tuple[Path, float]] = {}
    datasets: list[str] = []
    models: list[str] = []
    for r in runs:
        ds, model = run_dataset(r), run_name(r)
        png = r / "figures" / "test.png"
        if not png.is_file():
            raise ConfigError(f"{png} does not exist; the test figure is drawn by runs with test=true")
        cells[(ds, model)] = (png, metric(r, "test/nll"))
        datasets += [ds] if ds not in datasets else []
        models += [model] if model not in models else []
    with_data = panel == "density"
    ncols = len(models) + with_data
    width = 3.0 if with_data else 7.5
    fig, axes = plt.subplots(len(datasets), ncols, figsize=(width * ncols, 2.9 * len(datasets)), squeeze=False)
    for i, ds in enumerate(datasets):
        if with_data:
            png = next(p for (d, _), (p, _) in cells.items() if d == ds)
            axes[i, 0].imshow(_panel(png, 0))
            axes[i, 0].set_title(f"{ds}: data", fontsize=9)
        for j, model in enumerate(models):
            ax = axes[i, j + with_data]
            if (ds, model) not in cells:
                ax.set_title(f"{model}: not run", fontsize=9)
                continue
            png, nll = cells[(ds, model)]
            ax.imshow(_panel(png, 1) if with_data else plt.imread(png))
            ax.set_title(f"{ds}: {model}\ntest NLL {nll:.3f}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    save_figure(fig, out, dpi=100)
    rows = [[ds] + [f"{cells[(ds, m)][1]:.3f}" if (ds, m) in cells else "-" for m in models] for ds in datasets]
    return markdown_table(["dataset"] + [f"{m} test NLL (nats)" for m in models], rows)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowforge.figures", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit1d", help="1-D regression fits with test MSE")
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("fit1d.png"))
    p.add_argument("--title", default=None)
    p = sub.add_parser("toy2d", help="grid of 2-D toy density plots with test NLL")
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("toys.png"))
    p.add_argument(
        "--panel",
        choices=("density", "all"),
        default="density",
        help="density: the data column then each model's density panel; all: each run's full figure",
    )
    args = parser.parse_args(argv)
    # a shell glob over a multirun directory also matches its multirun.yaml: keep the directories
    skipped = [r for r in args.run_dirs if r.exists() and not r.is_dir()]
    args.run_dirs = [r for r in args.run_dirs if r not in skipped]
    if skipped:
        print(f"skipped (not run directories): {', '.join(map(str, skipped))}", file=sys.stderr)
    if not args.run_dirs:
        print("error: no run directories given", file=sys.stderr)
        return 2
    try:
        if args.command == "fit1d":
            table = fit1d(args.run_dirs, args.out, args.title)
        else:
            table = toy2d(args.run_dirs, args.out, args.panel)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nfigure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
