"""The Monotone Flows / i-DenseNet / ImpFlow recipes: they compose, build the published layouts, pick
the paper's estimator settings, and the matched-size CIFAR-10 pair has equal parameter counts."""

from types import SimpleNamespace

import pytest
from conftest import compose, instantiate_model

from flowforge.errors import ConfigError
from flowforge.flows.impflow import ImplicitBlock
from flowforge.flows.monotone import MonotoneBlock
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.densenet import DenseLayer
from flowforge.training.concat_schedule import LearnableConcatFrom


def n_params(flow):
    return sum(p.numel() for p in flow.parameters())


def test_impflow_cifar10_matches_its_residual_flow_in_size():
    imp = instantiate_model(compose(["experiment=impflow_cifar10"]))
    res = instantiate_model(compose(["experiment=resflow_cifar10_matched"]))
    assert sum(isinstance(m, ImplicitBlock) for m in imp.modules()) == 6  # Table 3: no fully connected blocks
    assert sum(isinstance(m, ResidualBlock) for m in res.modules()) == 12
    a, b = n_params(imp), n_params(res)
    assert abs(a - b) / b < 2e-3 and 5.4e6 < a < 5.6e6, (a, b)  # the paper's "about 5.5M parameters"


def test_monotone_cifar10_layout_and_estimator():
    cfg = compose(["experiment=monotone_cifar10"])
    assert cfg.estimator.n_exact_terms == 10 and cfg.estimator.dist == "poisson"
    assert cfg.callbacks.concat_schedule.start_epoch == 25
    flow = instantiate_model(cfg)
    blocks = [m for m in flow.modules() if isinstance(m, MonotoneBlock)]
    assert len(blocks) == 3 * 16 + 4
    dense = next(m for m in flow.modules() if isinstance(m, DenseLayer))
    assert dense.layer.out_channels * 2 == 172  # growth 172 through the channel-doubling CPila
    assert n_params(flow) == 28_546_670


@pytest.mark.parametrize(
    "experiment,family",
    [
        ("monotone_mnist", MonotoneBlock),
        ("monotone_imagenet32", MonotoneBlock),
        ("monotone_imagenet64", MonotoneBlock),
        ("idensenet_cifar10", ResidualBlock),
        ("impflow_toy", ImplicitBlock),
        ("impflow_tabular", ImplicitBlock),
    ],
)
def test_recipes_build_at_reduced_size(experiment, family):
    cfg = compose([f"experiment={experiment}"])
    if "blocks_per_scale" in cfg.model and len(cfg.dataset.shape) == 3:
        cfg.model.blocks_per_scale = [1] * len(cfg.model.blocks_per_scale)
        cfg.model.growth, cfg.model.fc_blocks = 8, 1
    flow = instantiate_model(cfg)
    assert any(isinstance(m, family) for m in flow.modules())
    if experiment == "monotone_imagenet32":
        assert cfg.dataset.batch_size == 256 and cfg.optim.optimizer.lr == 4e-3
        assert cfg.callbacks.concat_schedule.start_epoch == 0
    if experiment == "impflow_tabular":
        assert cfg.estimator.eval_exact_max_dim == 10 and cfg.model.num_blocks == 20


def test_concat_weights_learn_from_the_configured_epoch():
    flow = instantiate_model(compose(["model=monotone", "model.num_blocks=1"]))
    layer = next(m for m in flow.modules() if isinstance(m, DenseLayer))
    cb = LearnableConcatFrom(start_epoch=2)
    for epoch, learnable in ((0, False), (1, False), (2, True), (5, True)):
        cb.on_train_epoch_start(SimpleNamespace(current_epoch=epoch), flow)
        assert layer.learnable_concat is learnable
    with pytest.raises(ConfigError, match="start_epoch"):
        LearnableConcatFrom(start_epoch=-1)


def test_unknown_g_network_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.g= one of"):
        instantiate_model(compose(["model=resflow", "model.g=transformer"]))
    with pytest.raises(ConfigError, match="model.fc_g= one of"):
        instantiate_model(compose(["model=monotone", "model.fc_g=conv"]))
