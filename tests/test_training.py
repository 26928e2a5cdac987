"""The Lightning layer: optimiser and weight decay, warm-up, EMA, checkpoints and resume, NaN
handling, seeding, accumulation and bf16 — run in-process through the real Hydra config tree."""

import math

import pytest
import torch
from conftest import compose

from flowforge import experiment
from flowforge.errors import NonFiniteLossError
from flowforge.training.module import FlowModule, build_optimizer, linear_warmup, lr_multiplier

FAST = [
    "dataset=toy2d",
    "dataset.n_train=1000",
    "dataset.n_val=500",
    "dataset.n_test=500",
    "dataset.batch_size=100",
    "dataset.eval_batch_size=500",
    "model=realnvp",
    "model.num_steps=2",
    "model.hidden=[16]",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "callbacks.sample_figures.every_n_epochs=100",
]


def run(tmp_path, *overrides, expect_error=None):
    cfg = compose([*FAST, *overrides, f"paths.output_dir={tmp_path}"])
    if expect_error:
        with pytest.raises(expect_error):
            experiment.train(cfg)
        return None
    return experiment.train(cfg)


def test_adamw_weight_decay_really_decays(tmp_path):
    """One AdamW step with decay differs from one without by exactly -lr * wd * theta_0."""
    cfg = compose([*FAST, "optim=adamw", "optim.optimizer.lr=0.01", "optim.optimizer.weight_decay=0.5"])
    params = []
    for wd in (0.5, 0.0):
        torch.manual_seed(0)
        cfg.optim.optimizer.weight_decay = wd
        _, module = experiment.build(cfg)
        x = torch.randn(64, 2)
        module.model(x)  # ActNorm init
        opt = module.configure_optimizers()["optimizer"]
        theta0 = [p.detach().clone() for p in module.parameters()]
        module.metrics(x)["loss"].mean().backward()
        opt.step()
        params.append([p.detach().clone() for p in module.parameters()])
    for p_wd, p_plain, p0 in zip(*params, theta0):
        torch.testing.assert_close(p_wd - p_plain, -0.01 * 0.5 * p0, atol=1e-6, rtol=1e-4)


def test_adam_l2_weight_decay_changes_the_update():
    cfg = compose([*FAST, "optim.optimizer.weight_decay=0.1"])
    _, module = experiment.build(cfg)
    opt = module.configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["weight_decay"] == 0.1
    p = torch.nn.Parameter(torch.ones(3))
    o = type(opt)([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.zeros(3)
    o.step()
    assert torch.all(p < 1)  # a zero gradient still moves the weights: the decay is real


@pytest.mark.parametrize("optim", ["adam", "adamw"])
def test_fused_auto_takes_the_fused_kernels_and_updates_as_the_plain_loop(optim):
    """``fused: auto`` (the default) builds the fused optimizer on the CPU; its update equals torch's for-loop
    implementation's to float32 rounding (one step and a second one from the loaded state)."""
    cfg = compose([*FAST, f"optim={optim}"])
    _, module = experiment.build(cfg)
    x = torch.randn(64, 2)
    module.model(x)  # ActNorm init
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    theta0 = [p.detach().clone() for p in module.parameters()]
    plain = type(opt)(
        [p.detach().clone().requires_grad_() for p in module.parameters()],
        **{k: v for k, v in opt.defaults.items() if k in ("lr", "betas", "weight_decay")},
        foreach=False,
    )
    for _ in range(2):
        module.metrics(x)["loss"].mean().backward()
        for p, q in zip(module.parameters(), plain.param_groups[0]["params"]):
            q.grad = p.grad.clone()
        opt.step(), plain.step()
        opt.zero_grad(), plain.zero_grad()
        for p, q in zip(module.parameters(), plain.param_groups[0]["params"]):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert max(float((p.detach() - p0).abs().max()) for p, p0 in zip(module.parameters(), theta0)) > 1e-3  # it moved


def test_fused_auto_stays_off_under_mixed_precision_and_an_explicit_choice_is_kept():
    class Trainer:
        precision = "32-true"

    module = experiment.build(compose(FAST))[1]
    module._trainer = Trainer()
    assert module.fused_optimizer()
    for precision in ("16-mixed", "bf16-mixed"):  # Lightning's mixed-precision plugin cannot clip a fused optimizer
        Trainer.precision = precision
        assert not module.fused_optimizer()
        assert module.configure_optimizers()["optimizer"].defaults["fused"] is False
    module._trainer = None
    module.optimizer_factory = lambda params: torch.optim.Adam(params, fused=False)
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is False
    # the scripts that build an optimizer from the config resolve ``auto`` the same way
    factory = experiment.instantiate(compose(FAST).optim.optimizer)
    assert factory.keywords["fused"] == "auto"
    params = list(module.parameters())
    assert build_optimizer(factory, params).defaults["fused"] is True
    assert build_optimizer(factory, params, "bf16-mixed").defaults["fused"] is False


def test_linear_warmup_schedule():
    assert [linear_warmup(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert linear_warmup(0, 0) == 1.0


def test_cosine_schedule_after_warmup():
    m = [lr_multiplier(t, 2, "cosine", 12, 0.1) for t in range(14)]
    assert m[:3] == [0.5, 1.0, 1.0] and m[12:] == [0.1, 0.1]
    assert m[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: the mean
    assert all(a >= b for a, b in zip(m[2:], m[3:]))  # monotone decay
    assert [lr_multiplier(t, 2, "constant", 12, 0.1) for t in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_cosine_schedule_ends_the_run_at_min_lr(tmp_path):
    cfg = compose([*FAST, "optim.schedule=cosine", "optim.min_lr=1e-5", "optim.optimizer.lr=1e-3", "test=false"])
    cfg.paths.output_dir = str(tmp_path)
    experiment.train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    (sched,) = ckpt["lr_schedulers"]
    assert sched["last_epoch"] == 20 and sched["_last_lr"][0] == pytest.approx(1e-5)  # 2 epochs x 10 steps


def test_train_writes_metrics_checkpoints_and_figures(tmp_path):
    metrics = run(tmp_path, "callbacks.sample_figures.every_n_epochs=1")
    assert math.isfinite(metrics["test/nll"]) and math.isfinite(metrics["val/loss"])
    assert (tmp_path / "metrics.json").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "figures" / "val_epoch1.png").exists() and (tmp_path / "figures" / "test.png").exists()
    csv = next(tmp_path.glob("csv/*/metrics.csv")).read_text()
    assert "val/nll" in csv and "train/loss_step" in csv


def test_ema_weights_are_used_and_checkpointed(tmp_path):
    run(tmp_path, "callbacks.ema.decay=0.9")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert "current_model_state" in ckpt  # raw weights kept apart from the averaged ones
    diffs = [
        float((ckpt["state_dict"][k] - ckpt["current_model_state"][k]).abs().max())
        for k in ckpt["state_dict"]
        if k.endswith("weight")
    ]
    assert max(diffs) > 0  # the stored model is the average, not the last iterate
    metrics = experiment.evaluate(compose([f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"], "eval"))
    # same EMA weights, same test split: eval.py reproduces the run's test metric (noise-free toy data)
    saved = (tmp_path / "metrics.json").read_text()
    import json

    assert abs(metrics["test/nll"] - json.loads(saved)["test/nll"]) < 1e-5


def test_resume_continues_from_checkpoint(tmp_path):
    run(tmp_path / "a", "trainer.max_epochs=1")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    step_a = torch.load(last, weights_only=False)["global_step"]
    run(tmp_path / "b", "trainer.max_epochs=2", f"ckpt_path={last}")
    step_b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert step_a == 10 and step_b == 20


def test_same_seed_same_result(tmp_path):
    a = run(tmp_path / "a", "trainer.max_epochs=1", "seed=3")
    b = run(tmp_path / "b", "trainer.max_epochs=1", "seed=3")
    c = run(tmp_path / "c", "trainer.max_epochs=1", "seed=4")
    assert a["test/nll"] == b["test/nll"] and a["test/nll"] != c["test/nll"]


def test_nan_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    original = FlowModule.step_metrics

    def poisoned(self, batch, x, stage="train"):
        out = original(self, batch, x, stage)
        if self.training and self.global_step >= 13:  # in the second epoch
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(FlowModule, "step_metrics", poisoned)
    run(tmp_path, "trainer.max_epochs=3", expect_error=NonFiniteLossError)
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for c in ckpts:
        state = torch.load(c, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_loss_skip_policy_continues(tmp_path, monkeypatch):
    original = FlowModule.step_metrics

    def poisoned(self, batch, x, stage="train"):
        out = original(self, batch, x, stage)
        if self.training and self.global_step == 3:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(FlowModule, "step_metrics", poisoned)
    metrics = run(tmp_path, "faults.on_nonfinite=skip")
    assert math.isfinite(metrics["test/nll"])
    assert metrics["train/faults/nonfinite"] == 1.0


def test_gradient_accumulation_and_bf16_mixed_run(tmp_path):
    metrics = run(tmp_path, "trainer.accumulate_grad_batches=2", "trainer.precision=bf16-mixed", "trainer.max_epochs=1")
    assert math.isfinite(metrics["test/nll"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5  # 10 batches / 2


def _poison_gradient_at(monkeypatch, step):
    """At training step ``step`` the gradient of the model's first weight becomes NaN (the loss stays finite)."""
    original = FlowModule.on_train_start

    def on_train_start(self):
        original(self)
        name, p = next((n, q) for n, q in self.named_parameters() if n.endswith("weight"))
        p.register_hook(lambda g: g * float("nan") if self.global_step == step else g)

    monkeypatch.setattr(FlowModule, "on_train_start", on_train_start)


def test_nan_gradient_stops_with_the_step_and_the_layer(tmp_path, monkeypatch):
    """A NaN gradient under a finite loss: the update is dropped (every checkpoint stays finite) and the run
    stops naming the step and the parameter."""
    _poison_gradient_at(monkeypatch, 3)
    with pytest.raises(
        NonFiniteLossError,
        match=r"gradients of 1 parameter tensors became NaN/inf with a finite loss "
        r"at step 3 in model\.\S+weight \(first\)",
    ):
        experiment.train(compose([*FAST, f"paths.output_dir={tmp_path}", "trainer.max_epochs=3"]))
    for c in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = torch.load(c, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_gradient_skip_policy_drops_only_that_update(tmp_path, monkeypatch):
    _poison_gradient_at(monkeypatch, 3)
    metrics = run(tmp_path, "faults.on_nonfinite=skip", "trainer.max_epochs=1")
    assert math.isfinite(metrics["test/nll"])
    assert metrics["train/faults/nonfinite"] == 1.0


def test_resume_override_of_the_learning_rate_is_applied_and_logged(tmp_path, caplog):
    """Without resume_overrides a changed lr is refused (tests/test_bad_inputs.py); with it, the new lr replaces the one
    Lightning restores with the optimizer state (and the warm-up scheduler's base rate), and the change is logged."""
    run(tmp_path / "a", "trainer.max_epochs=1")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    run(
        tmp_path / "b",
        "trainer.max_epochs=2",
        f"ckpt_path={last}",
        "optim.optimizer.lr=0.0005",
        "resume_overrides=[optim.optimizer.lr]",
    )
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0005
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [0.0005]
    assert ckpt["hyper_parameters"]["config"]["optim"]["optimizer"]["lr"] == 0.0005
    assert "resume: optim.optimizer.lr changed from 0.001 to 0.0005 (resume_overrides)" in caplog.text
    assert "resume: optim.optimizer.lr = 0.0005 applied to the optimizer" in caplog.text
