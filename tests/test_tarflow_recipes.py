"""The TarFlow recipes (conf/experiment/tarflow_*.yaml): each composes with the settings of the command it follows,
each lists its reference and departures, the ImageNet 64 models have the official layout and parameter count
(built on the meta device: nothing is allocated), and every recipe trains end to end as a smoke run on fake data
(one fast_dev_run each, in process)."""

import math

import pytest
import torch
from conftest import ROOT, compose

from flowforge import experiment
from flowforge.data.fake import write_fake_datasets
from flowforge.flows.tarflow import TarFlowBlock, TarFlowModel

RECIPES = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("tarflow_*.yaml"))
QUIET = ["+trainer.fast_dev_run=true", "~callbacks.progress_bar", "trainer.enable_progress_bar=false"]


def test_the_recipes_are_the_expected_ones():
    assert RECIPES == ["tarflow_digits", "tarflow_imagenet64", "tarflow_imagenet64_cond", "tarflow_mnist"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_with_reference_and_departures(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.task_name == name
    assert cfg.model._target_ == "flowforge.flows.tarflow.TarFlow"
    assert isinstance(cfg.reference.paper, str) and "Zhai et al. 2025" in cfg.reference.paper
    assert cfg.reference.code.repo == "apple/ml-tarflow"
    for entry in cfg.departures:  # each departure names a key of the composed run
        node = cfg
        for part in entry.key.split("."):
            assert part in node, (name, entry.key)
            node = node[part]
    # the official train.py's optimizer and schedule: AdamW (0.9, 0.95), weight decay 1e-4, cosine to 1e-6
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW"
    assert list(cfg.optim.optimizer.betas) == [0.9, 0.95] and cfg.optim.optimizer.weight_decay == 1.0e-4
    assert cfg.optim.schedule == "cosine" and cfg.optim.min_lr == 1.0e-6
    assert cfg.callbacks.ema is None  # the official train.py averages no weights
    assert cfg.trainer.gradient_clip_val is None  # nor clips gradients


def test_imagenet64_recipe_is_the_official_density_command():
    """README 'Unconditional ImageNet64 density modelling': --patch_size=2 --channels=768 --blocks=8
    --layers_per_block=8 --noise_type=uniform --batch_size=256 --epochs=100 --lr=1e-4 --nvp (fp32)."""
    cfg = compose(["experiment=tarflow_imagenet64"])
    m = cfg.model
    assert (m.patch_size, m.channels, m.heads, m.num_blocks, m.layers_per_block) == (2, 768, 12, 8, 8)
    assert m.channels // m.heads == 64  # the official head_dim
    assert m.affine == "nvp" and m.noise_std is None and m.first_token == "identity" and m.expansion == 4
    assert cfg.dataset.name == "imagenet64" and cfg.dataset.batch_size == 256 and cfg.dataset.flip is True
    assert cfg.dataset.conditional is False
    assert cfg.trainer.max_epochs == 100 and cfg.trainer.precision == 32
    assert cfg.optim.optimizer.lr == 1.0e-4
    # one epoch of warm-up, as utils.CosineLRSchedule(optimizer, len(data_loader), ...)
    assert cfg.optim.warmup_steps == math.ceil((1_281_167 - cfg.dataset.val_size) / 256)


def test_imagenet64_cond_recipe_is_the_official_conditional_command():
    """README 'Conditional ImageNet64': the same model with --noise_std=0.05 --epochs=200 --drop_label=0.1."""
    base, cfg = compose(["experiment=tarflow_imagenet64"]), compose(["experiment=tarflow_imagenet64_cond"])
    assert cfg.dataset.conditional is True and cfg.dataset.num_classes == 1000
    assert cfg.model.noise_std == 0.05 and cfg.model.context_dropout == 0.1
    assert cfg.trainer.max_epochs == 200 and cfg.trainer.precision == "bf16-mixed"
    for key in ("channels", "heads", "num_blocks", "layers_per_block", "patch_size", "affine"):
        assert cfg.model[key] == base.model[key], key
    assert cfg.dataset.batch_size == 256 and cfg.optim.optimizer.lr == 1.0e-4


def layer_parameters(d: int, expansion: int = 4) -> int:
    """One pre-norm transformer layer of width d: LayerNorm + qkv + output projection, LayerNorm + 2-layer MLP."""
    attention = 2 * d + (d * 3 * d + 3 * d) + (d * d + d)
    mlp = 2 * d + (d * expansion * d + expansion * d) + (expansion * d * d + d)
    return attention + mlp


def block_parameters(d: int, layers: int, tokens: int, token_dim: int, context: int = 0) -> int:
    """One TarFlow block: token projection in, positional embeddings, layers, (alpha, mu) projection out."""
    return (
        (token_dim * d + d) + tokens * d + layers * layer_parameters(d) + (d * 2 * token_dim + 2 * token_dim)
    ) + context * d


def meta_model(name: str) -> TarFlowModel:
    cfg = compose([f"experiment={name}"])
    with torch.device("meta"):
        return experiment.instantiate(cfg.model)


def test_imagenet64_model_layout_and_parameter_count():
    """8 blocks of 8 layers over 1024 tokens of 12 numbers (2 x 2 patches of 3 channels), width 768, 12 heads:
    460,142,784 parameters, counted by hand."""
    model = meta_model("tarflow_imagenet64")
    blocks = model.blocks
    assert len(blocks) == 8 and all(isinstance(b, TarFlowBlock) for b in blocks)
    assert [b.reverse for b in blocks] == [False, True] * 4  # the token order reverses between blocks
    for b in blocks:
        assert (b.num_tokens, b.token_dim, len(b.layers)) == (1024, 12, 8)
        assert b.pos_embed.shape == (1024, 768)
        assert all(layer.attention.heads == 12 and layer.attention.head_dim == 64 for layer in b.layers)
    by_hand = 8 * block_parameters(768, 8, 1024, 12)
    assert by_hand == 460_142_784
    assert sum(p.numel() for p in model.parameters()) == by_hand
    assert model.null_context is None and model.noise_std is None


def test_imagenet64_cond_model_adds_label_embedding_projections_and_null_context():
    model = meta_model("tarflow_imagenet64_cond")
    assert model.noise_std == 0.05 and model.context_dropout == 0.1
    assert model.null_context is not None and model.null_context.shape == (768,)
    # 1000 x 768 label embedding, a 768 x 768 projection per block (no bias), the 768-entry null context
    by_hand = 8 * block_parameters(768, 8, 1024, 12, context=768) + 1000 * 768 + 768
    assert sum(p.numel() for p in model.parameters()) == by_hand == 465_630_144


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_data")
    write_fake_datasets(root, ["mnist", "imagenet64"], n=16)
    return root


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_smoke_run_trains_and_tests(name, fake_data, tmp_path):
    """``python train.py experiment=<name> smoke=true trainer.fast_dev_run=true`` on fake data, in process: one
    training step (the cosine schedule included), one validation and one test batch; the test bits/dim is finite
    and positive."""
    cfg = compose(
        [f"experiment={name}", "smoke=true", f"paths.data_dir={fake_data}", f"paths.output_dir={tmp_path}", *QUIET]
    )
    metrics = experiment.train(cfg)
    assert math.isfinite(metrics["test/bpd"]) and metrics["test/bpd"] > 0, metrics
