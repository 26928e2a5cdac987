import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: with -n 2 on 2 cores, more threads oversubscribe the CPU and
    # small convolutions stall for milliseconds each
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (ROOT / "conf" / "dataset").glob("*.yaml"))

# small sizes so every model builds and runs fast in tests
SMALL = {
    "planar": ["model.num_layers=3"],
    "radial": ["model.num_layers=3"],
    "nice": ["model.num_steps=2", "model.hidden=[16]", "model.channels=8"],
    "realnvp": ["model.num_steps=2", "model.hidden=[16]", "model.channels=8"],
    "glow": ["model.num_steps=2", "model.hidden=[16]", "model.channels=8"],
    "nsf": ["model.num_steps=2", "model.hidden=[16]", "model.channels=8", "model.bins=4"],
    "maf": ["model.num_layers=2", "model.hidden=[16]"],
    "iaf": ["model.num_layers=2", "model.hidden=[16]", "model.max_density_passes=64"],
    "resflow": [
        "model.num_blocks=2",
        "model.hidden=[8]",
        "model.blocks_per_scale=[1]",
        "model.channels=4",
        "model.fc_blocks=1",
        "model.fc_hidden=[8]",
    ],
    "iresnet": [
        "model.num_blocks=2",
        "model.hidden=[8]",
        "model.blocks_per_scale=[1]",
        "model.channels=4",
        "model.fc_blocks=1",
        "model.fc_hidden=[8]",
    ],
    "impflow": [
        "model.num_blocks=2",
        "model.hidden=[8]",
        "model.blocks_per_scale=[1]",
        "model.channels=4",
        "model.fc_blocks=1",
        "model.fc_hidden=[8]",
    ],
    "monotone": [
        "model.num_blocks=2",
        "model.depth=2",
        "model.growth=4",
        "model.fc_g=mlp",
        "model.fc_hidden=[8]",
        "model.blocks_per_scale=[1]",
        "model.fc_blocks=1",
    ],
    "cnf": [
        "model.num_blocks=2",
        "model.hidden=[8]",
        "model.channels=4",
        "model.kernels=[3,3]",
        "model.num_scales=2",
        "model.blocks_per_scale=1",
        "model.method=rk4",
        "model.step_size=0.5",
    ],
    "sphere": ["model.num_layers=2"],
    "simplex": [],
}
# models whose log-det is estimated: exact-reference tests select estimator=exact and tight inverses
# tight solves, adjoints included (the brute-force Jacobian differentiates through them)
_TIGHT_SOLVES = [f"model.{s}_solver.{t}=1e-13" for s in ("forward", "inverse", "backward") for t in ("atol", "rtol")]
_TIGHT_SOLVES.append("model.backward_solver.max_iters=1000")
EXACT_OVERRIDES = {
    "resflow": ["estimator=exact", "model.inverse_atol=1e-13", "model.inverse_rtol=1e-13"],
    "iresnet": ["estimator=exact", "model.inverse_atol=1e-13", "model.inverse_rtol=1e-13"],
    "impflow": ["estimator=exact", *_TIGHT_SOLVES],
    "monotone": ["estimator=exact", *_TIGHT_SOLVES],
    "cnf": [
        "estimator=exact",
        "model.method=dopri5",
        "model.step_size=null",
        "model.atol=1e-10",
        "model.rtol=1e-10",
        "model.adjoint=false",
    ],
}
ESTIMATED = set(EXACT_OVERRIDES)
VECTOR_ONLY = {"planar", "radial"}
MANIFOLD = {"sphere": "sphere", "simplex": "simplex"}  # model -> the dataset.manifold it needs
NEEDS_2D = {"nice", "realnvp", "glow", "nsf"}


def compose(overrides=(), config_name="train"):
    """Compose the real Hydra config tree with overrides (no run directory needed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
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
