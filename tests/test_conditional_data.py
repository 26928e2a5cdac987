"""Data that carries a context: (x, label) batches of labelled datasets, the conditional 2-D toys, the conditional
Gaussian and its closed form, and the clear errors of bad conditional configurations."""

import math

import numpy as np
import pytest
import torch
from conftest import compose

from flowforge import experiment
from flowforge.data.conditional_gaussian import ConditionalGaussian, ConditionalGaussianDataModule
from flowforge.data.digits import DigitsDataModule
from flowforge.data.toy2d import Toy2DDataModule
from flowforge.data.toy2d_conditional import ConditionalToy2DDataModule, sample_conditional_toy
from flowforge.errors import ConfigError, DataError


def _batch(dm, split="train"):
    dm.setup()
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return next(iter(loader))


def test_digits_conditional_yields_labels():
    dm = DigitsDataModule(batch_size=32, conditional=True, num_classes=10)
    assert dm.context == {"classes": 10}
    x, y = _batch(dm)
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
    assert DigitsDataModule(batch_size=8).context is None


def test_labels_are_checked_against_num_classes():
    dm = DigitsDataModule(batch_size=8, conditional=True, num_classes=5)  # digits has 10 classes
    with pytest.raises(DataError, match=r"labels must lie in \[0, 5\)"):
        dm.setup()


def test_conditional_needs_labels_and_num_classes():
    with pytest.raises(ConfigError, match="has none"):
        Toy2DDataModule(name="moons", conditional=True, num_classes=2)
    with pytest.raises(ConfigError, match="needs dataset.num_classes"):
        DigitsDataModule(conditional=True)
    with pytest.raises(ConfigError, match="num_classes must be an integer"):
        DigitsDataModule(conditional=True, num_classes=1)
    with pytest.raises(ConfigError, match="conditional must be true or false"):
        DigitsDataModule(conditional="yes", num_classes=10)


class _Missing(ConditionalGaussianDataModule):
    """A conditional dataset whose val split lost its contexts, or has one too few, or a NaN."""

    def __init__(self, fault, **kw):
        super().__init__(n_train=50, n_val=20, n_test=20, **kw)
        self.fault = fault

    def load_splits(self):
        out = super().load_splits()
        x, c = out["val"]
        if self.fault == "none":
            out["val"] = (x, None)
        elif self.fault == "short":
            out["val"] = (x, c[:-1])
        else:
            c = c.clone()
            c[3, 1] = float("nan")
            out["val"] = (x, c)
        return out


@pytest.mark.parametrize(
    "fault, message",
    [("none", "val split carries no context"), ("short", "20 examples and 19 contexts"), ("nan", "1 NaN/inf context")],
)
def test_a_split_without_a_context_for_every_example_is_a_data_error(fault, message):
    with pytest.raises(DataError, match=message):
        _Missing(fault).setup()


@pytest.mark.parametrize("name", ["moons", "rings"])
def test_conditional_toys_yield_x_and_c(name):
    dm = ConditionalToy2DDataModule(name=name, n_train=200, n_val=50, n_test=50, batch_size=64)
    x, c = _batch(dm)
    assert x.shape == (64, 2) and c.shape == (64, 1)
    assert x.dtype == c.dtype == torch.float32
    assert 0 <= float(c.min()) and float(c.max()) <= 1
    x, c = _batch(dm, "test")
    assert x.shape == (50, 2) and c.shape == (50, 1)


def test_conditional_toys_change_shape_with_c():
    """rings: the radius is 0.5 + c (inner ring) or twice that, so the mean radius is 1.5 (0.5 + c)."""
    n = 20000
    for c in (0.0, 1.0):
        r = sample_conditional_toy("rings", np.full(n, c), seed=1).norm(dim=1)
        assert abs(float(r.mean()) - 1.5 * (0.5 + c)) < 0.02
    # moons: the rotation by (pi / 2) c turns the long axis of the point cloud from x to y
    flat, turned = (sample_conditional_toy("moons", np.full(n, c), seed=2) for c in (0.0, 1.0))
    assert float(flat[:, 0].var()) > 2 * float(flat[:, 1].var())
    assert float(turned[:, 1].var()) > 1.5 * float(turned[:, 0].var())


def test_conditional_toy_bad_config():
    with pytest.raises(ConfigError, match="one of"):
        ConditionalToy2DDataModule(name="spirals")
    with pytest.raises(ConfigError, match="features: 1"):
        ConditionalToy2DDataModule(name="moons", context={"features": 2})


def test_conditional_gaussian_log_prob_is_the_closed_form():
    """log p(x | c) against scipy's multivariate normal, and the entropy against the Monte Carlo mean of -log p."""
    from scipy.stats import multivariate_normal

    d = ConditionalGaussian(3, 2)
    x, c = d.sample(5000, torch.Generator().manual_seed(0))
    lp = d.log_prob(x, c)
    cov = d.covariance.numpy()
    mu = d.mean(c).numpy()
    ref = np.array([multivariate_normal(mu[i], cov).logpdf(x[i].numpy()) for i in range(20)])
    np.testing.assert_allclose(lp[:20].numpy(), ref, rtol=1e-10, atol=1e-10)
    # H[x | c] = E[-log p(x | c)]; standard error of the mean of -log p is sqrt(D / 2) / sqrt(n) ~ 0.017
    assert abs(float(-lp.mean()) - d.entropy()) < 0.06
    # the closed form of the entropy: 1/2 log det(2 pi e Sigma)
    assert d.entropy() == pytest.approx(0.5 * math.log(np.linalg.det(2 * math.pi * math.e * cov)), rel=1e-12)


def test_conditional_gaussian_data_module():
    dm = ConditionalGaussianDataModule(shape=[3], context={"features": 4}, n_train=100, n_val=30, n_test=30)
    x, c = _batch(dm, "val")
    assert x.shape == (30, 3) and c.shape == (30, 4) and x.dtype == c.dtype == torch.float32
    assert dm.density.dim == 3 and dm.density.context_dim == 4
    # the same A, b, Sigma in every run: the parameters depend only on the dimensions
    again = ConditionalGaussian(3, 4)
    assert torch.equal(again.A, dm.density.A) and torch.equal(again.L, dm.density.L)
    with pytest.raises(ConfigError, match="features"):
        ConditionalGaussianDataModule(context={"classes": 3})


@pytest.mark.parametrize(
    "overrides, context",
    [
        (["dataset=digits", "dataset.conditional=true"], {"classes": 10}),
        (["dataset=mnist", "dataset.conditional=true"], {"classes": 10}),
        (["dataset=cifar10", "dataset.conditional=true"], {"classes": 10}),
        (["dataset=imagenet32", "dataset.conditional=true"], {"classes": 1000}),
        (["dataset=digits"], None),
        (["dataset=toy2d_conditional"], {"features": 1}),
        (["dataset=conditional_gaussian"], {"features": 2}),
    ],
)
def test_model_context_follows_the_dataset_config(overrides, context):
    cfg = compose(["model=realnvp", *overrides])
    got = cfg.model.context
    assert (None if got is None else dict(got)) == context


def test_unlabelled_image_version_cannot_be_conditional(tmp_path):
    from flowforge.data.images import ImageNetDownsampledDataModule

    with pytest.raises(ConfigError, match="version=oord"):
        ImageNetDownsampledDataModule(
            shape=[3, 32, 32],
            num_levels=256,
            data_dir=str(tmp_path),
            version="oord",
            conditional=True,
            num_classes=1000,
        )
    with pytest.raises(ConfigError, match="1000 classes"):
        ImageNetDownsampledDataModule(
            shape=[3, 32, 32], num_levels=256, data_dir=str(tmp_path), conditional=True, num_classes=10
        )


def test_conditional_flag_on_an_unlabelled_dataset_config_is_a_config_error():
    cfg = compose(["model=realnvp", "dataset=toy2d", "+dataset.conditional=true", "+dataset.num_classes=2"])
    with pytest.raises(ConfigError, match="has none"):
        experiment.instantiate(cfg.dataset)
