import os
from pathlib import Path

import pytest
import torch

import flowforge.experiment  # noqa: F401  (registers the config resolvers)
from flowforge.flows.registry import model_configs

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: with -n 2 on 2 cores, more threads oversubscribe the CPU and
    # small convolutions stall for milliseconds each; the same for numpy's and scipy's BLAS (scikit-learn's
    # classifiers in the C2ST tests)
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first (in their order), so that with ``-n 2 --dist worksteal`` the long tests start
    early and the workers finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# model configs: conf/model/*.yaml, and <dir>/model/*.yaml for every dir of FLOWFORGE_CONFIG_PATH (families
# outside flowforge, their modules on PYTHONPATH), each paired with its family's declaration
# (flowforge.flows.registry): capabilities, shape limits and test sizes.  A config without a family is a clear error.
CONFIG_PATH = [Path(d) for d in os.environ.get("FLOWFORGE_CONFIG_PATH", "").split(os.pathsep) if d]
FAMILIES = model_configs(ROOT / "conf", *CONFIG_PATH)
MODELS = sorted(FAMILIES)
DATASETS = sorted(p.stem for p in (ROOT / "conf" / "dataset").glob("*.yaml"))

# small sizes so every model builds and runs fast in tests
SMALL = {name: list(f.test) for name, f in FAMILIES.items()}
#: families whose brute-force Jacobian runs one example at a time (``copies=False`` of
#: flowforge.testing.jacobian_matrix): a continuous flow's exact divergence costs the batch times the dimension, so
#: a batch of ``D`` copies costs ``D`` times a batch of one
LOOPED_JACOBIAN = {"cnf"}
# models whose log-det is estimated: exact-reference tests add these (estimator=exact, tight inverses and solves,
# adjoints included: the brute-force Jacobian differentiates through them)
EXACT_OVERRIDES = {name: list(f.exact_test) for name, f in FAMILIES.items() if f.exact_test}


def compose(overrides=(), config_name="train"):
    """Compose the real Hydra config tree with overrides (no run directory needed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    overrides = list(overrides)
    if CONFIG_PATH:
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{d.resolve()}" for d in CONFIG_PATH) + "]")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run, the job config carries no hydra node
    return cfg


def instantiate_model(cfg):
    from flowforge.experiment import instantiate

    return instantiate(cfg.model)


def settle_contraction(g, scale=0.5):
    """Move a contractive g off its init (random weights on every matrix / kernel), then run power
    iteration to tolerance so Lip(g) <= its bound holds tightly (for exact-reference tests)."""
    from flowforge.nn.lipschitz import update_lipschitz

    with torch.no_grad():
        for p in g.parameters():
            if p.requires_grad and p.dim() > 1:
                p.add_(scale * torch.randn_like(p))
    update_lipschitz(g, rtol=1e-12, max_iters=5000)
    return g


def assert_directional_derivative(loss, p, grad, eps=1e-6, tol=1e-6):
    """Central finite difference of ``loss()`` along a random direction of parameter ``p`` equals
    ``<grad, direction>`` within ``tol`` (relative to ``max(1, |loss|)``); ``p`` is restored."""
    d = torch.randn_like(p)
    with torch.no_grad():
        p.add_(eps * d)
        up = float(loss())
        p.sub_(2 * eps * d)
        down = float(loss())
        p.add_(eps * d)
    assert abs((up - down) / (2 * eps) - float((grad * d).sum())) < tol * max(1.0, abs(up))


def fast_dev_run(flow, datamodule, tmp_path):
    """One training, validation and test batch of ``flow`` on ``datamodule`` (no logger, no checkpoints);
    returns the trainer and the module."""
    import pytorch_lightning as pl

    from flowforge.training.module import FlowModule

    trainer = pl.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = FlowModule(flow)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    return trainer, module
