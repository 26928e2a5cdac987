"""benchmarks/npe.py: sbi's NPE and flowforge's conditional NSF/MAF on the same simulations (C2ST, training time).

The priors it hands to sbi, the training rule it gives flowforge's models (sbi's ``train()`` defaults) and the
matching of sbi's NSF to flowforge's recipe are checked without sbi; the side-by-side smoke run needs sbi and is
skipped where it is not installed."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import npe as bench  # noqa: E402  (benchmarks/npe.py)

from flowforge.sbi.tasks import TASKS  # noqa: E402


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prior_handed_to_sbi_is_the_tasks_prior(name):
    """Support and covariance of ``prior_of(task)`` against the task: the Gaussians' covariances in closed form
    (bernoulli_glm: the inverse of its precision B, float64) and against 200000 prior draws (5%); the boxes'
    support against ``task.in_support`` on points inside and outside."""
    task = TASKS[name]()
    prior = bench.prior_of(task)
    g = torch.Generator().manual_seed(0)
    draws = task.sample_prior(200_000, g).double()
    assert torch.isfinite(prior.log_prob(draws.float())).all()
    if hasattr(task, "low"):
        wide = (torch.rand(4000, task.dim_theta, generator=g) - 0.5) * 3 * (task.high - task.low)
        finite = torch.isfinite(prior.log_prob(wide))
        assert torch.equal(finite, task.in_support(wide))
        assert 0 < int(finite.sum()) < len(wide)
        inside = wide[task.in_support(wide)]
        log_volume = task.dim_theta * torch.log(torch.tensor(task.high - task.low, dtype=torch.float64))
        expected = torch.full((len(inside),), float(-log_volume))
        assert torch.allclose(prior.log_prob(inside), expected, atol=1e-5)
    else:
        cov = prior.covariance_matrix.double()
        if name == "bernoulli_glm":
            assert torch.allclose(cov, torch.linalg.inv(task.precision), rtol=1e-4, atol=1e-6)
        else:
            assert torch.allclose(cov, task.prior_var * torch.eye(task.dim_theta, dtype=torch.float64))
        empirical = torch.cov(draws.T)
        scale = cov.diagonal().sqrt()
        assert torch.allclose(empirical / scale.outer(scale), cov / scale.outer(scale), atol=0.05)


class _Scripted(torch.nn.Module):
    """A stand-in model whose validation loss follows a script (epoch k: ``losses[k]``), recording its parameter
    at each validation, so that the stopping epoch and the restored weights can be read off."""

    def __init__(self, losses):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.losses, self.seen = list(losses), []

    def log_prob(self, theta, x):
        if self.training:
            return -(self.w - 1.0).square().expand(len(theta))  # Adam moves w every step
        self.seen.append(float(self.w.detach()))
        return torch.full((len(theta),), -self.losses[len(self.seen) - 1])


def test_flowforge_loop_stops_as_sbi_and_returns_the_best_weights():
    """sbi's rule: stop once 20 epochs in a row bring no lower validation loss, then load the best epoch's
    weights.  Best at epoch 3 (index 2) -> 23 epochs trained, w as validated after epoch 3."""
    losses = [5.0, 4.0, 3.0] + [3.0 + 0.01 * k for k in range(1, 40)]
    model = _Scripted(losses)
    train = (torch.zeros(400, 2), torch.zeros(400, 2))
    val = (torch.zeros(40, 2), torch.zeros(40, 2))
    args = bench.parse(["--methods", "flowforge-nsf"])
    epochs = bench.fit(model, train, val, args, torch.Generator().manual_seed(0))
    assert epochs == 3 + bench.STOP_AFTER_EPOCHS
    assert len(model.seen) == epochs
    assert float(model.w.detach()) == model.seen[2] != model.seen[-1]
    capped = _Scripted([5.0 - k for k in range(10)])  # still improving: --max-epochs ends it
    assert bench.fit(capped, train, val, bench.parse(["--max-epochs", "4"]), torch.Generator()) == 4
    assert float(capped.w.detach()) == capped.seen[3]


def test_sbi_nsf_is_matched_to_the_flowforge_recipe():
    """The sbi NSF's transforms, hidden units, bins and tail bound are the npe_<task> recipes' (and the MAF's
    layers and width are sbi's default MAF's: 5 transforms of 50 hidden units)."""
    for name in TASKS:
        cfg = bench.compose([f"experiment=npe_{name}"])
        assert cfg.model.num_steps == bench.NSF_MATCHED["num_transforms"]
        assert list(cfg.model.hidden) == [bench.NSF_MATCHED["hidden_features"]] * 2
        assert cfg.model.bins == bench.NSF_MATCHED["num_bins"]
        assert cfg.model.bound == bench.NSF_MATCHED["tail_bound"]
        assert cfg.model.autoregressive is False
    maf = bench.compose(["dataset=sbi", "dataset.task=two_moons", *bench.MAF_OVERRIDES]).model
    assert maf.num_layers == 5 and list(maf.hidden) == [50, 50]


def test_quick_defaults_and_explicit_options():
    args = bench.parse(["--quick", "--observations", "1"])
    assert (args.num_simulations, args.observations, args.num_posterior_samples, args.max_epochs) == (1000, 1, 1000, 5)
    args = bench.parse([])
    assert (args.num_simulations, args.observations, args.num_posterior_samples, args.max_epochs) == (
        10000,
        10,
        10000,
        None,
    )
    with pytest.raises(SystemExit):
        bench.parse(["--observations", "11"])


@pytest.mark.slow
def test_npe_side_by_side_quick_run(tmp_path, capsys):
    """All four estimators on gaussian_linear (closed-form posterior: no reference files needed), 1000
    simulations, 1 epoch, one observation: a row each, C2ST a valid accuracy, times and ratios reported."""
    pytest.importorskip("sbi")
    out = tmp_path / "npe.md"
    argv = ["--quick", "--tasks", "gaussian_linear", "--observations", "1", "--num-posterior-samples", "100"]
    argv += ["--max-epochs", "1", "--data-dir", str(tmp_path / "none"), "--threads", "1", "--out", str(out)]
    rows = bench.main(argv)
    assert [r.method for r in rows] == list(bench.METHODS)
    for r in rows:
        assert 0.4 <= r.c2st <= 1.0 and len(r.c2st_per_obs) == 1, r
        assert r.train_s > 0 and r.params > 0 and r.epochs >= 1, r
    text = out.read_text()
    assert "| gaussian_linear | sbi-maf |" in text and "| 1.00 |" in text
    assert text in capsys.readouterr().out
    assert not (ROOT / "sbi-logs").exists() and not Path("sbi-logs").exists()  # sbi's default TensorBoard logs
