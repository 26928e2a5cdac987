"""TarFlow through the experiment layer: a class-conditional model trained with Gaussian noise augmentation and
context dropout, its metrics qualified as the noisy density's, and sample.py with guidance and denoising."""

import json
import math

import pytest
import torch
from conftest import compose

from flowforge import experiment
from flowforge.errors import ConfigError

RUN = [
    "dataset=digits",
    "dataset.conditional=true",
    "+dataset.limit=128",
    "dataset.batch_size=64",
    "dataset.eval_batch_size=128",
    "model=tarflow",
    "model.channels=16",
    "model.heads=2",
    "model.num_blocks=2",
    "model.layers_per_block=1",
    "model.patch_size=2",
    "model.noise_std=0.1",
    "model.context_dropout=0.2",
    "optim=adamw",
    "optim.schedule=cosine",
    "optim.min_lr=1e-6",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "callbacks.sample_figures.num_images=20",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tarflow")
    metrics = experiment.train(compose([*RUN, f"paths.output_dir={out}"]))
    return out, metrics


def _sample(tmp_path, ckpt, *overrides):
    cfg = compose([f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "num_samples=4", *overrides], "sample")
    path = experiment.sample(cfg)
    return path, torch.load(tmp_path / "samples.pt")


def test_noise_augmented_conditional_run_reports_its_dequantisation(run):
    out, metrics = run
    assert math.isfinite(metrics["test/bpd"]) and metrics["test/bpd"] > 0
    assert json.loads((out / "metrics.json").read_text())["dequantization"] == "gaussian"


def test_sample_with_guidance_and_denoising(run, tmp_path):
    ckpt = run[0] / "checkpoints" / "last.ckpt"
    torch.manual_seed(0)
    _, plain = _sample(tmp_path / "plain", ckpt, "context=3")
    _, zero = _sample(tmp_path / "zero", ckpt, "context=3", "sampling.guidance=0")
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)  # guidance 0 is plain sampling (same seed)
    path, guided = _sample(tmp_path / "cfg", ckpt, "context=3", "sampling.guidance=2", "sampling.denoise=1")
    assert guided.shape == (4, 1, 8, 8) and torch.isfinite(guided).all() and path.exists()
    assert not torch.allclose(guided, plain)
    _, uncached = _sample(tmp_path / "nocache", ckpt, "context=3", "sampling.cache=false")
    torch.testing.assert_close(uncached, plain, rtol=1e-5, atol=1e-5)


def test_sampling_options_a_model_does_not_take_are_refused(run, tmp_path):
    ckpt = run[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"\['foo'\] are not options of TarFlowModel.sample \(it takes: guidance"):
        _sample(tmp_path / "foo", ckpt, "context=3", "+sampling.foo=1")
    with pytest.raises(ValueError, match="guide must be one of"):
        _sample(tmp_path / "guide", ckpt, "context=3", "sampling.guidance=1", "sampling.guide=c")


def test_noise_std_and_another_dequantisation_are_refused(tmp_path):
    cfg = compose([*RUN, "dequantization=variational", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="already adds gaussian noise"):
        experiment.train(cfg)
