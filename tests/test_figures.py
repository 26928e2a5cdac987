"""The figures say what they show: axes over the data's coordinates, colour bars on densities, a title with the
model, dataset, epoch, score and temperature; sample.py's figure shows every sample it drew, at its temperature."""

import matplotlib.pyplot as plt
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose
from matplotlib.collections import PathCollection
from omegaconf import OmegaConf

from flowforge import experiment
from flowforge.flows.base import Transform
from flowforge.flows.distributions import DiagonalGaussian, StandardNormal
from flowforge.flows.manifold_flow import SimplexFlow, SphereFlow
from flowforge.flows.model import Flow
from flowforge.training import visualize
from flowforge.training.callbacks import SampleFigures

TITLE = visualize.figure_title(
    "RealNVP", "moons", "epoch 3, step 120", visualize.score_text({"val/nll": 1.2345}, "val"), 0.7
)


class Scale(Transform):
    """x -> a * x (elementwise), log-det sum log |a|."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.as_tensor(a, dtype=torch.float32)

    def forward(self, x, context=None):
        return x * self.a, self.a.abs().log().sum().expand(x.shape[0])

    def inverse(self, z, context=None):
        return z / self.a


def scale_flow(dim, base=None):
    a = torch.linspace(0.5, 1.5, dim)
    return Flow(Scale(a), base or StandardNormal([dim]), [dim]).eval()


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib Figure objects written by visualize.save_figure (closed, but inspectable)."""
    drawn = []
    save = visualize.save_figure

    def record(fig, path, dpi=80, panels=None):
        drawn.append(fig)
        return save(fig, path, dpi, panels)

    monkeypatch.setattr(visualize, "save_figure", record)
    return drawn


def colorbars(fig):
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def panels(fig):
    return [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None]


def suptitle(fig):
    return fig._suptitle.get_text().replace("\n", " ") if fig._suptitle is not None else ""


def scatter_count(ax):
    return sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))


def test_title_names_model_dataset_epoch_score_and_temperature():
    assert TITLE == "RealNVP on moons, epoch 3, step 120, val NLL 1.2345 nats, samples at T=0.7"
    assert visualize.score_text({"test/bpd": torch.tensor(3.21), "test/nll": 5.0}, "test") == "test bits/dim 3.2100"
    assert visualize.score_text({"val/nll": 1.0}, "test") is None


def test_tempered_density_is_the_density_of_the_tempered_samples():
    base = DiagonalGaussian([2])
    with torch.no_grad():
        base.loc.copy_(torch.tensor([0.3, -1.0]))
        base.log_scale.copy_(torch.tensor([0.2, -0.4]))
    flow, x, t = scale_flow(2, base), torch.randn(50, 2), 0.5
    a = torch.linspace(0.5, 1.5, 2)
    # x = z / a with z ~ N(loc, (t sigma)^2): x ~ N(loc / a, (t sigma / a)^2)
    expected = torch.distributions.Normal(base.loc / a, t * base.log_scale.exp() / a).log_prob(x).sum(1)
    torch.testing.assert_close(visualize.tempered_log_prob(flow, x, t), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(visualize.tempered_log_prob(flow, x, 1.0), flow.log_prob(x))
    sphere = SphereFlow([3], num_layers=1, manifold="sphere")
    assert visualize.tempered_log_prob(sphere, torch.randn(4, 3), 0.5) is None  # not a Gaussian base


def test_2d_density_figure_has_coordinates_colour_bar_and_title(tmp_path, figures):
    data = torch.randn(300, 2) * 2
    path = visualize.model_figure(scale_flow(2), tmp_path / "d.png", data, temperature=0.7, title=TITLE)
    assert path.stat().st_size > 1000
    (fig,) = figures
    data_ax, density_ax, samples_ax = panels(fig)
    lim = float(data.abs().max()) * 1.1
    for ax in (data_ax, density_ax, samples_ax):
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("x1", "x2") and len(ax.get_xticks()) > 1
        assert abs(ax.get_xlim()[1] - lim) < 0.01 * lim
    (cbar,) = colorbars(fig)
    assert cbar.get_ylabel() == "p_T(x), T=0.7" and "T=0.7" in density_ax.get_title()
    assert "epoch 3" in suptitle(fig) and "1.2345" in suptitle(fig) and "T=0.7" in suptitle(fig)
    assert scatter_count(data_ax) == 300 and scatter_count(samples_ax) == 2000
    # the PNG records each panel's pixel box (flowforge.figures cuts panels out with it): side by side, below the
    # title, the density's box wide enough for its colour bar
    boxes = visualize.panel_boxes(path)
    height, width = plt.imread(path).shape[:2]
    assert len(boxes) == 3 and all(0 <= b[0] < b[2] <= width and 20 < b[1] < b[3] <= height for b in boxes)
    assert boxes[0][2] <= boxes[1][0] and boxes[1][2] <= boxes[2][0]
    assert boxes[1][2] - boxes[1][0] > 1.1 * (boxes[0][2] - boxes[0][0])


def test_large_point_clouds_become_histograms(tmp_path, figures):
    visualize.density_plot_2d(scale_flow(2), torch.randn(8000, 2), tmp_path / "d.png", samples=torch.randn(100, 2))
    data_ax, _, samples_ax = panels(figures[0])
    assert scatter_count(data_ax) == 0 and "2-D histogram" in data_ax.get_title()
    assert scatter_count(samples_ax) == 100 and colorbars(figures[0])[0].get_ylabel() == "p(x)"


def test_1d_density_and_fit_figures(tmp_path, figures):
    flow = scale_flow(1)
    visualize.model_figure(flow, tmp_path / "d1.png", torch.randn(200, 1), temperature=0.5, title=TITLE)
    visualize.fit_plot_1d(flow, torch.randn(50, 1), torch.randn(50), tmp_path / "fit.png", title=TITLE)
    density, fit = figures
    (ax,) = density.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x", "density")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("T=0.5" in s and "n=2000" in s for s in labels) and any("p_T(x)" in s for s in labels)
    assert (fit.axes[0].get_xlabel(), fit.axes[0].get_ylabel()) == ("x", "y")
    assert "grid MSE" in fit.axes[0].get_title()
    assert all("epoch 3" in suptitle(f) for f in figures)


def test_image_grid_has_no_ticks_and_a_title(tmp_path, figures):
    path = visualize.image_grid(torch.rand(10, 1, 8, 8), tmp_path / "g.png", title=TITLE)
    assert path.stat().st_size > 0
    (fig,) = figures
    assert len(fig.axes) == 12 and not any(ax.axison for ax in fig.axes)
    assert sum(len(ax.images) for ax in fig.axes) == 10 and "T=0.7" in suptitle(fig)


@pytest.mark.parametrize("kind", ["sphere", "circle", "simplex"])
def test_manifold_figures_have_colour_bars_and_titles(kind, tmp_path, figures):
    if kind == "simplex":
        flow = SimplexFlow([3], manifold="simplex")
        data = torch.distributions.Dirichlet(torch.ones(3)).sample((100,))
    else:
        d = 3 if kind == "sphere" else 2
        flow = SphereFlow([d], num_layers=1, manifold="sphere")
        data = torch.nn.functional.normalize(torch.randn(100, d), dim=1)
    path = visualize.model_figure(flow.eval(), tmp_path / "m.png", data, temperature=0.5, title=TITLE)
    assert path.stat().st_size > 1000
    (fig,) = figures
    assert "epoch 3" in suptitle(fig) and "1.2345" in suptitle(fig)
    if kind == "circle":
        (ax,) = fig.axes
        assert ax.get_xlabel().startswith("angle") and ax.get_ylabel() == "density per unit arc length"
        assert any("p(x) at T=1" in t.get_text() for t in ax.get_legend().get_texts())
        return
    (cbar,) = colorbars(fig)
    label = cbar.get_xlabel() + cbar.get_ylabel()
    assert label.startswith("p(x)") and label.endswith("at T=1")  # manifold bases: the density is shown at T=1
    data_ax, _, samples_ax = panels(fig)
    assert scatter_count(data_ax) == 100 and scatter_count(samples_ax) == 2000
    if kind == "sphere":
        assert data_ax.get_xlabel().startswith("longitude") and data_ax.get_ylabel().startswith("latitude")
    else:
        assert {t.get_text() for t in data_ax.texts} == {"x1", "x2", "x3"}


# ---------------------------------------------------------------------------------------------- training and sample.py
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two short epochs of a tiny RealNVP on moons with the figure callback and a checkpoint callback, then a test."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = compose(
        [
            "dataset.name=moons",
            "dataset.n_train=256",
            "dataset.n_val=128",
            "dataset.n_test=128",
            "dataset.batch_size=64",
            "model.num_steps=2",
            "model.hidden=[8]",
        ]
    )
    datamodule, module = experiment.build(cfg)
    figures = SampleFigures(str(tmp / "figures"), every_n_epochs=1)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", monitor="val/loss", save_last=True)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        callbacks=[figures, checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
    )
    drawn = []
    save = visualize.save_figure
    visualize.save_figure = lambda fig, path, dpi=80, panels=None: drawn.append(fig) or save(fig, path, dpi, panels)
    try:
        trainer.fit(module, datamodule=datamodule)
        val_nll = float(trainer.callback_metrics["val/nll"])
        trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        visualize.save_figure = save
    return tmp, trainer, drawn, val_nll


def test_training_figures_carry_epoch_and_the_logged_score(trained):
    tmp, trainer, drawn, val_nll = trained
    assert sorted(p.name for p in (tmp / "figures").glob("*.png")) == ["test.png", "val_epoch0.png", "val_epoch1.png"]
    last_val, test = suptitle(drawn[1]), suptitle(drawn[2])
    assert last_val.startswith("RealNVP on moons, epoch 1, step 4, val NLL ") and f"{val_nll:.4f}" in last_val
    test_nll = float(trainer.callback_metrics["test/nll"])
    assert "final, step 4" in test and f"test NLL {test_nll:.4f} nats" in test and "T=1" in test
    assert colorbars(drawn[2])[0].get_ylabel() == "p(x)"


def test_sample_py_figure_shows_every_sample_at_its_temperature(trained, tmp_path, figures):
    tmp = trained[0]
    cfg = compose(
        [f"ckpt_path={tmp / 'ckpt' / 'last.ckpt'}", "num_samples=500", "temperature=0.5", f"output_dir={tmp_path}"],
        config_name="sample",
    )
    path = experiment.sample(cfg)
    assert path == tmp_path / "density.png" and path.stat().st_size > 1000
    assert torch.load(tmp_path / "samples.pt").shape == (500, 2)
    (fig,) = figures
    _, density_ax, samples_ax = panels(fig)
    assert scatter_count(samples_ax) == 500 and "T=0.5" in samples_ax.get_title()
    assert colorbars(fig)[0].get_ylabel() == "p_T(x), T=0.5"
    title = suptitle(fig)
    assert title.startswith("RealNVP on moons, checkpoint epoch 1, step 4, val/loss ") and "T=0.5" in title


def test_sample_py_image_grid_is_capped_and_says_so(tmp_path, figures):
    cfg = compose(["dataset=digits", "model=glow", "model.num_steps=2", "model.hidden=[16]", "model.channels=8"])
    _, module = experiment.build(cfg)
    ckpt = tmp_path / "glow.ckpt"
    config = {"config": OmegaConf.to_container(cfg, resolve=True)}
    torch.save({"hyper_parameters": config, "state_dict": module.state_dict(), "epoch": 0, "global_step": 0}, ckpt)
    out = tmp_path / "s"
    sample_cfg = compose([f"ckpt_path={ckpt}", "num_samples=300", "temperature=0.5", f"output_dir={out}"], "sample")
    assert experiment.sample(sample_cfg) == out / "samples.png"
    assert torch.load(out / "samples.pt").shape == (300, 1, 8, 8)
    (fig,) = figures
    assert sum(len(ax.images) for ax in fig.axes) == experiment.SAMPLE_GRID_MAX == 256
    assert suptitle(fig) == "Glow on digits, checkpoint epoch 0, step 0, samples at T=0.5 (256 of 300 shown)"
