"""callbacks.estimator_gap: exact bits/dim from the full Jacobian beside the estimator's, at validation and test."""

import math

import hydra.utils
import pytest
import pytorch_lightning as pl
import torch
from conftest import SMALL, compose, instantiate_model

from flowforge.errors import ConfigError
from flowforge.training.estimator_gap import EstimatorGap, estimated_log_prob, exact_log_prob
from flowforge.training.module import FlowModule


def _model(*overrides):
    cfg = compose(["model=iresnet", "dataset=digits", *SMALL["iresnet"], *overrides])
    return instantiate_model(cfg), cfg


def test_exact_log_prob_is_the_change_of_variables_with_the_brute_force_jacobian():
    """On a flow with a closed-form log-det (MAF, float64) the row-by-row Jacobian gives its log_prob to 1e-9."""
    cfg = compose(["model=maf", "dataset=toy2d", *SMALL["maf"]])
    flow = instantiate_model(cfg).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    torch.testing.assert_close(exact_log_prob(flow, x), flow.log_prob(x), atol=1e-9, rtol=0)


def test_estimated_equals_exact_for_the_exact_estimator_and_not_for_a_one_term_series():
    torch.manual_seed(0)
    flow, _ = _model("estimator=exact", "model.coeff=0.98")
    flow.double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    with torch.no_grad():
        flow(x)  # ActNorm's data-dependent initialisation
    flow.eval()
    exact = exact_log_prob(flow, x)
    torch.testing.assert_close(estimated_log_prob(flow, x), exact, atol=1e-7, rtol=0)
    assert not flow.training  # the mode is restored

    torch.manual_seed(0)
    biased, _ = _model(
        "estimator=power_series", "estimator.n_terms=1", "estimator.probe=rademacher", "model.coeff=0.98"
    )
    biased.load_state_dict(flow.state_dict())
    biased.double().eval()
    gap = (exact_log_prob(biased, x) - estimated_log_prob(biased, x)).abs().max()
    assert gap > 1e-4, gap  # a one-term series misses tr(J^2)/2 and beyond


def test_the_callback_logs_exact_estimated_and_gap_at_validation_and_test(tmp_path):
    torch.manual_seed(0)
    flow, cfg = _model("estimator=exact")
    datamodule = hydra.utils.instantiate(cfg.dataset)
    trainer = pl.Trainer(
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[EstimatorGap()],
    )
    module = FlowModule(flow)
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("val/bpd_exact", "val/bpd_estimated", "val/bpd_gap"):
        assert math.isfinite(metrics[key]), key
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert abs(metrics["test/bpd_gap"]) < 1e-4  # the exact estimator has no gap
    assert metrics["test/bpd_gap"] == pytest.approx(metrics["test/bpd_exact"] - metrics["test/bpd_estimated"], abs=1e-5)
    # the estimate matches the module's own test bits/dim (same weights, exact log-det; dequantisation noise differs)
    assert metrics["test/bpd_exact"] == pytest.approx(metrics["test/bpd"], abs=0.05)


def test_data_too_large_for_the_jacobian_is_refused(tmp_path):
    cfg = compose(["model=realnvp", "dataset=mnist", *SMALL["realnvp"]])
    module = FlowModule(instantiate_model(cfg))
    with pytest.raises(ConfigError, match=r"at most 256 dimensions.*784 dimensions.*~callbacks\.estimator_gap"):
        EstimatorGap().setup(None, module, "fit")
    with pytest.raises(ConfigError, match="max_batches must be a positive integer or null, got 0"):
        EstimatorGap(max_batches=0)
    with pytest.raises(ConfigError, match="draws must be a positive integer, got 0"):
        EstimatorGap(draws=0)
