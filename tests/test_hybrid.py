"""Hybrid modelling (Residual Flows, Sec. 6): heads at every scale end, the loss
``lam * nll + CE``, training to above-chance accuracy, the Hydra objective group and its errors."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import compose

from flowforge import experiment
from flowforge.errors import ConfigError
from flowforge.estimators import LogDetEstimator
from flowforge.flows.hybrid import HybridClassifier
from flowforge.flows.resflow import ResidualFlow
from flowforge.nn.lipschitz import update_lipschitz
from flowforge.training.module import FlowModule
from flowforge.training.objectives import parse_objective

SMALL_RESFLOW = [
    "model.blocks_per_scale=[1,1]",
    "model.channels=4",
    "model.fc_blocks=1",
    "model.fc_hidden=[8]",
    "model.num_blocks=2",
    "model.hidden=[8]",
]


def small_flow(shape=(1, 8, 8), **kwargs):
    opts = dict(
        estimator=LogDetEstimator("exact"),
        blocks_per_scale=[1, 1],
        channels=4,
        fc_blocks=1,
        fc_hidden=[8],
        coeff=0.9,
        num_levels=256,
        logit_alpha=0.05,
    )
    if len(shape) == 1:
        opts.update(num_blocks=2, hidden=[8], num_levels=None, logit_alpha=None)
    opts.update(kwargs)
    return ResidualFlow(shape, **opts)


@pytest.mark.parametrize(
    "shape, kwargs, heads",
    [
        ((1, 8, 8), {}, [(1, 8, 8), (4, 4, 4)]),
        ((1, 8, 8), {"factor_out": True}, [(1, 8, 8), (2, 4, 4)]),
        ((1, 8, 8), {"squeeze_first": True, "blocks_per_scale": [1]}, [(4, 4, 4)]),
        ((1, 16, 16), {"squeeze_first": True, "factor_out": True, "fc_blocks": 0}, [(4, 8, 8), (8, 4, 4)]),
    ],
)
def test_one_head_per_scale(shape, kwargs, heads):
    """Heads sit at the input of every inter-scale Squeeze (not squeeze_first's) and of the final flatten,
    also inside FactorOut.inner."""
    clf = HybridClassifier(small_flow(shape, **kwargs), num_classes=3, head_channels=5)
    assert clf.point_shapes == heads and len(clf.heads) == len(heads)
    log_p, logits = clf(torch.rand(4, *shape))
    assert logits.shape == (4, 3) and log_p.shape == (4,) and torch.isfinite(log_p).all()


def test_log_prob_matches_the_flow_and_logits_have_class_shape():
    flow = small_flow().eval()
    clf = HybridClassifier(flow, num_classes=7, head_channels=6)
    x = torch.rand(5, 1, 8, 8)
    log_p, logits = clf(x)
    assert logits.shape == (5, 7)
    torch.testing.assert_close(log_p, flow.log_prob(x))
    assert all(p.grad is None for p in clf.parameters())
    logits.sum().backward()  # the heads and the flow both feed the logits
    assert clf.linear.weight.grad is not None and clf.heads[0].conv.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())


def test_vector_data_use_one_head_on_z():
    flow = small_flow((6,)).eval()
    clf = HybridClassifier(flow, num_classes=4, head_channels=8)
    assert len(clf.heads) == 0 and clf.n_heads == 1
    x = torch.randn(3, 6)
    log_p, logits = clf(x)
    assert logits.shape == (3, 4)
    torch.testing.assert_close(log_p, flow.log_prob(x))


def images(n=64):
    """Two classes of 1x8x8 images (levels 0..255) that differ in mean brightness."""
    y = torch.arange(n) % 2
    base = torch.where(y[:, None, None, None] == 1, 170.0, 85.0)
    x = (base + 40 * torch.randn(n, 1, 8, 8)).round().clamp(0, 255)
    return x, y


@pytest.mark.parametrize("lam", [0, 1])
def test_loss_is_lam_nll_plus_cross_entropy(lam):
    flow = small_flow().eval()
    module = FlowModule(flow, objective={"name": "hybrid", "lam": lam, "num_classes": 2, "head_channels": 8})
    x, y = images(8)
    torch.manual_seed(1)
    values = module.metrics(x, y)
    torch.manual_seed(1)  # the same dequantisation noise
    u, log_weight = flow.dequantizer(x)
    log_p, logits = module.classifier(u)
    nll = -(log_p + log_weight)
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(values["loss"], ce if lam == 0 else nll + ce)
    torch.testing.assert_close(values["nll"], nll)
    torch.testing.assert_close(values["bpd"], nll / (64 * math.log(2)))
    torch.testing.assert_close(values["ce"], ce)
    assert set(values) == {"loss", "nll", "bpd", "ce", "acc"}
    assert values["nll"].requires_grad == (lam != 0)


def test_lam_one_over_d_and_objective_errors():
    assert parse_objective({"name": "hybrid", "lam": "1/D", "num_classes": 10}, 784)["lam"] == 1 / 784
    assert parse_objective({"name": "mle"}, 2) is None
    with pytest.raises(ConfigError, match="mle, hybrid, classification"):
        parse_objective({"name": "contrastive"}, 2)
    with pytest.raises(ConfigError, match="objective.lam"):
        parse_objective({"name": "hybrid", "lam": "1/N", "num_classes": 10}, 2)
    with pytest.raises(ConfigError, match="objective.num_classes"):
        parse_objective({"name": "hybrid", "lam": 1, "num_classes": None}, 2)
    with pytest.raises(ConfigError, match="objective=hybrid"):
        parse_objective({"name": "classification", "lam": 1, "num_classes": 10}, 2)


def test_hybrid_training_beats_chance():
    torch.manual_seed(0)
    flow = small_flow(estimator=LogDetEstimator("power_series", n_terms=2))  # cheap log-det: a fast test
    module = FlowModule(
        flow,
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
        objective={"name": "hybrid", "lam": "1/D", "num_classes": 2, "head_channels": 16},
    )
    x, y = images(64)
    opt = module.configure_optimizers()["optimizer"]
    head_params = {id(p) for p in module.classifier.heads.parameters()} | {
        id(p) for p in module.classifier.linear.parameters()
    }
    assert head_params <= {id(p) for g in opt.param_groups for p in g["params"]}
    ce = []
    for _ in range(20):
        opt.zero_grad()
        values = module.metrics(x, y)
        values["loss"].mean().backward()
        opt.step()
        update_lipschitz(module.model)
        ce.append(float(values["ce"].mean()))
    with torch.no_grad():
        values = module.metrics(x, y)
    assert values["acc"].mean() > 0.8
    assert float(values["ce"].mean()) < 0.5 * ce[0]


def test_experiment_config_selects_the_hybrid_objective():
    for name in ("resflow_hybrid_cifar10", "resflow_hybrid_mnist"):
        cfg = compose([f"experiment={name}"])
        assert cfg.objective.name == "hybrid" and cfg.objective.lam == "1/D" and cfg.objective.num_classes == 10
    assert compose(["experiment=resflow_hybrid_mnist", "objective=classification"]).objective.lam == 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["objective=hybrid", "dataset=digits", "model=resflow"],
        ["experiment=resflow_hybrid_cifar10", "dataset=digits", "dataset.flip=false", "estimator=auto"],
    ],
)
def test_build_and_fast_dev_run(tmp_path, overrides):
    cfg = compose(
        [
            *overrides,
            *SMALL_RESFLOW,
            "dataset.batch_size=32",
            "dataset.eval_batch_size=64",
            f"paths.output_dir={tmp_path}",
        ]
    )
    datamodule, module = experiment.build(cfg)
    assert module.classifier is not None and len(module.classifier.heads) == 2
    assert module.objective.lam == 1 / 64
    trainer = pl.Trainer(
        fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=datamodule)
    for key in ("loss", "nll", "bpd", "ce", "acc"):
        assert math.isfinite(float(trainer.callback_metrics[f"train/{key}"]))
    assert "val/acc" in trainer.callback_metrics


def test_unlabelled_data_raise_config_error():
    cfg = compose(["objective=hybrid", "dataset=toy2d", "model=resflow", *SMALL_RESFLOW])
    datamodule, module = experiment.build(cfg)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    with pytest.raises(ConfigError, match="labelled dataset"):
        module.training_step(batch, 0)


def test_unknown_objective_raises_config_error():
    cfg = compose(["dataset=toy2d", "model=resflow", *SMALL_RESFLOW])
    cfg.objective.name = "contrastive"
    with pytest.raises(ConfigError, match="unknown objective 'contrastive'"):
        experiment.build(cfg)
