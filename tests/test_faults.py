"""Faults during training, caused on purpose with ``FaultInjection`` (``+faults.<kind>=<step>``) and run in-process
through the real Hydra config tree: detection, the report (step and layer), and each policy.

Covered here, 6 of FaultInjection's 7 kinds (``signal`` / ``signal_at_step`` is tested in tests/test_resume.py):

1. ``nan_batch``: a NaN in a training batch (stop, skip);
2. ``nan_output`` + ``layer``: a NaN loss located at the injected layer (a coupling, an inner Linear), and
   ``locate_nonfinite`` itself on a hand-built network;
3. ``nan_grad`` + ``parameter``: a NaN gradient under a finite loss (stop, skip, reduce_lr);
4. ``solver_failure`` + ``layer``: a fixed-point solve of a monotone block that does not converge (stop, warn,
   skip);
5. ``power_iteration_failure`` + ``layer``: a power iteration of a residual flow's spectral norm stopped at its cap
   (stop, warn);
6. ``exploding_inverse`` + ``layer``: a divergent inverse under ``objective=reverse_kl`` (stop, skip), located by
   ``nonfinite_samples``, and the ``sampling`` event of ``SampleFigures`` for figures of broken samples.

Also: ``last.ckpt`` after a stop (the last good weights, and resuming from it), ``max_fault_events``, and the
ConfigErrors of bad fault configs that tests/test_bad_inputs.py's table does not already try.
"""

import math
import re

import pytest
import torch
from conftest import SMALL, compose
from torch import nn

from flowforge import experiment
from flowforge.errors import ConfigError, ConvergenceError, NonFiniteLossError
from flowforge.training.callbacks import SampleFigures
from flowforge.training.faults import locate_nonfinite, nonfinite_samples
from flowforge.training.module import FlowModule

FAST = [
    "dataset=toy2d",
    "dataset.n_train=600",
    "dataset.n_val=200",
    "dataset.n_test=200",
    "dataset.batch_size=100",
    "dataset.eval_batch_size=200",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_figures.every_n_epochs=100",
]  # 6 optimizer steps per epoch
REALNVP = ["model=realnvp", *SMALL["realnvp"], "model.actnorm=true"]  # ActNorm on: the layer paths below count it
MONOTONE = ["model=monotone", *SMALL["monotone"]]
RESFLOW = ["model=resflow", *SMALL["resflow"]]
REVERSE_KL = ["dataset=target", "objective=reverse_kl", "objective.eval_samples=512"]
COUPLING = "model.transform.transforms.1"  # realnvp: ActNorm, Coupling, ActNorm, Coupling
INNER_LINEAR = "model.transform.transforms.3.conditioner.net.0"
WEIGHT = "model.transform.transforms.1.conditioner.net.2.weight"
BLOCK = "model.transform.transforms.1"  # monotone / resflow: ActNorm, block, ActNorm, block, ActNorm
SN_LAYER = "model.transform.transforms.1.g.0"  # resflow: the first spectrally normalised layer
K = 2  # the step every fault is injected at (not 0: ActNorm initialises from the data there)


@pytest.fixture
def train(monkeypatch):
    """``train(out, *overrides, error=None, match=None)`` runs ``experiment.train`` on FAST + overrides and returns
    ``(metrics, module)``, or ``(exception, module)`` after checking ``error`` / ``match``."""
    built = []
    original = experiment.build

    def build(cfg):
        datamodule, module = original(cfg)
        built.append(module)
        return datamodule, module

    monkeypatch.setattr(experiment, "build", build)

    def run(out, *overrides, error=None, match=None, base=FAST):
        cfg = compose([*base, *overrides, f"paths.output_dir={out}"])
        if error is None:
            return experiment.train(cfg), built[-1]
        with pytest.raises(error, match=match) as info:
            experiment.train(cfg)
        return info.value, built[-1]

    return run


@pytest.fixture
def step_changes(monkeypatch):
    """{step: max |change| of any parameter during that training step} for the runs that follow."""
    changes, before = {}, {}
    start, end = FlowModule.on_train_batch_start, FlowModule.on_train_batch_end

    def on_start(self, batch, batch_idx):
        before["step"] = int(self.global_step)
        before["params"] = [p.detach().clone() for p in self.parameters()]
        return start(self, batch, batch_idx)

    def on_end(self, outputs, batch, batch_idx):
        changes[before["step"]] = max(
            float((p.detach() - q).abs().max()) for p, q in zip(self.parameters(), before["params"])
        )
        return end(self, outputs, batch, batch_idx)

    monkeypatch.setattr(FlowModule, "on_train_batch_start", on_start)
    monkeypatch.setattr(FlowModule, "on_train_batch_end", on_end)
    return changes


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def assert_checkpoints_finite(out):
    """Every checkpoint's weights (raw and averaged) and optimizer states are finite (not the callbacks' states:
    ModelCheckpoint keeps ``kth_value = inf`` by design)."""
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for path in ckpts:
        ckpt = torch.load(path, weights_only=False)
        parts = [ckpt["state_dict"], ckpt.get("current_model_state"), ckpt["optimizer_states"]]
        bad = [t for t in _tensors(parts) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        assert not bad, path.name


def last_ckpt(out):
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)


# ----------------------------------------------------------------------------- 1. nan_batch
def test_nan_batch_stops_naming_the_step_and_the_data(tmp_path, train):
    err, module = train(
        tmp_path,
        *REALNVP,
        f"+faults.nan_batch={K}",
        error=NonFiniteLossError,
        match=rf"training batch contains 1 NaN/inf values at step {K} in the data",
    )
    assert "policy on_nonfinite=stop" in str(err)
    assert [(e["step"], e["kind"], e["policy"]) for e in module.fault_events] == [(K, "nonfinite", "stop")]
    assert_checkpoints_finite(tmp_path)


def test_nan_batch_skip_drops_that_step_and_finishes(tmp_path, train, step_changes):
    metrics, module = train(tmp_path, *REALNVP, f"+faults.nan_batch={K}", "faults.on_nonfinite=skip")
    assert metrics["train/faults/nonfinite"] == 1.0
    assert math.isfinite(metrics["test/nll"]) and math.isfinite(metrics["test/loss"])
    assert [(e["step"], e["policy"]) for e in module.fault_events] == [(K, "skip")]
    assert module.fault_events[0]["where"].startswith("the data")
    assert step_changes[K] == 0.0 and step_changes[K - 1] > 0 and step_changes[K + 1] > 0
    assert last_ckpt(tmp_path)["global_step"] == 6  # the run went to the end


# ----------------------------------------------------------------------------- 2. nan_output, locate_nonfinite
@pytest.mark.parametrize("layer,type_name", [(COUPLING, "Coupling"), (INNER_LINEAR, "Linear")])
def test_nan_loss_is_located_at_the_injected_layer(tmp_path, train, layer, type_name):
    err, module = train(
        tmp_path, *REALNVP, f"+faults.nan_output={K}", f"+faults.layer={layer}", error=NonFiniteLossError
    )
    where = f"{layer} ({type_name})"
    assert f"the training loss became nan at step {K} in {where};" in str(err)
    assert module.fault_events == [
        {"step": K, "kind": "nonfinite", "what": "the training loss became nan", "where": where, "policy": "stop"}
    ]


class _Reciprocal(nn.Module):
    def forward(self, x):
        return 1.0 / x  # inf where x == 0: from finite inputs


def test_locate_nonfinite_names_the_origin_not_the_layers_that_propagate_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), _Reciprocal(), nn.Linear(3, 3), nn.Tanh())
    x = torch.randn(5, 3)
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()  # ReLU(0) = 0, then 1/0 = inf, then inf - inf = NaN in the next Linear
    assert not torch.isfinite(net(x)).all()
    assert locate_nonfinite(net, lambda: net(x)) == "2 (_Reciprocal)"
    assert locate_nonfinite(net, lambda: net(x), prefix="model.g.") == "model.g.2 (_Reciprocal)"
    # a replay that raises after the origin: still located, the exception does not escape
    assert locate_nonfinite(net, lambda: (net(x), 1 / 0)) == "2 (_Reciprocal)"
    # a non-finite input is not the fault of the first layer to see it
    assert locate_nonfinite(net, lambda: net(torch.full((2, 3), float("nan")))) is None
    with torch.no_grad():
        net[0].bias.fill_(1.0)
    assert torch.isfinite(net(x)).all()
    assert locate_nonfinite(net, lambda: net(x)) is None


# ----------------------------------------------------------------------------- 3. nan_grad
def test_nan_gradient_stop_names_the_parameter(tmp_path, train):
    train(
        tmp_path,
        *REALNVP,
        f"+faults.nan_grad={K}",
        f"+faults.parameter={WEIGHT}",
        error=NonFiniteLossError,
        match=rf"gradients of 1 parameter tensors became NaN/inf with a finite loss at step {K} in "
        rf"{re.escape(WEIGHT)} \(first\)",
    )
    assert_checkpoints_finite(tmp_path)


def test_nan_gradient_skip_drops_only_that_update(tmp_path, train, step_changes):
    metrics, module = train(
        tmp_path,
        *REALNVP,
        f"+faults.nan_grad={K}",
        f"+faults.parameter={WEIGHT}",
        "faults.on_nonfinite=skip",
        "test=false",
    )
    assert metrics["train/faults/nonfinite"] == 1.0
    assert [(e["step"], e["where"], e["policy"]) for e in module.fault_events] == [(K, f"{WEIGHT} (first)", "skip")]
    assert step_changes[K] == 0.0 and all(step_changes[s] > 0 for s in range(6) if s != K)
    assert_checkpoints_finite(tmp_path)
    assert last_ckpt(tmp_path)["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-3  # skip keeps the LR


def test_nan_gradient_reduce_lr_halves_the_learning_rate(tmp_path, train, step_changes, caplog):
    overrides = [*REALNVP, "optim.warmup_steps=0", "optim.optimizer.lr=0.002"]
    lr = compose([*FAST, *overrides]).optim.optimizer.lr
    metrics, module = train(
        tmp_path,
        *overrides,
        f"+faults.nan_grad={K}",
        f"+faults.parameter={WEIGHT}",
        "faults.on_nonfinite=reduce_lr",
        "test=false",
    )
    assert metrics["train/faults/nonfinite"] == 1.0
    assert [(e["step"], e["where"], e["policy"]) for e in module.fault_events] == [
        (K, f"{WEIGHT} (first)", "reduce_lr")
    ]
    assert step_changes[K] == 0.0 and step_changes[K + 1] > 0
    assert_checkpoints_finite(tmp_path)
    ckpt = last_ckpt(tmp_path)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == lr * 0.5
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [lr * 0.5]  # the warm-up scheduler keeps the reduction
    assert f"update dropped, learning rate now [{lr * 0.5}]" in caplog.text


# ----------------------------------------------------------------------------- 4. stop keeps the last good weights
def test_stop_saves_the_last_good_weights(tmp_path, train):
    """last.ckpt after a stop at step K holds exactly the weights of an unfaulted run stopped after K steps
    (without EMA, so the state dict is the raw weights).  Its global_step is K + 1: the dropped step K still
    counts as an optimizer step, as under on_nonfinite=skip."""
    no_ema = [*REALNVP, "~callbacks.ema"]
    train(
        tmp_path / "fault",
        *no_ema,
        f"+faults.nan_output={K}",
        f"+faults.layer={COUPLING}",
        error=NonFiniteLossError,
        match=rf"at step {K} in {re.escape(COUPLING)} \(Coupling\);",
    )
    train(tmp_path / "clean", *no_ema, f"trainer.max_steps={K}", "test=false")
    fault, clean = last_ckpt(tmp_path / "fault"), last_ckpt(tmp_path / "clean")
    assert fault["global_step"] == K + 1 and clean["global_step"] == K
    assert fault["state_dict"].keys() == clean["state_dict"].keys()
    for name, value in fault["state_dict"].items():
        assert torch.equal(value, clean["state_dict"][name]), name
    assert_checkpoints_finite(tmp_path / "fault")


def test_resume_after_a_stop_trains_the_rest_of_the_interrupted_epoch(tmp_path, train):
    """last.ckpt is written at the stop's batch boundary and Lightning's end-of-run validation cannot overwrite it
    with an end-of-epoch state: resuming (with the faulty batch counted as used) trains exactly the rest."""
    train(tmp_path, *REALNVP, f"+faults.nan_batch={K}", "trainer.max_epochs=2", error=NonFiniteLossError)
    resume = tmp_path / "stopped.ckpt"
    resume.write_bytes((tmp_path / "checkpoints" / "last.ckpt").read_bytes())
    assert torch.load(resume, weights_only=False)["global_step"] == K + 1
    metrics, module = train(
        tmp_path / "resumed", *REALNVP, "trainer.max_epochs=2", f"ckpt_path={resume}", "faults.on_nonfinite=skip"
    )
    assert module.fault_events == [] and math.isfinite(metrics["test/nll"])
    # 12 batches in 2 epochs: steps 0..K-1 and K (the faulty one) before the stop, K+1..11 after the resume
    assert last_ckpt(tmp_path / "resumed")["global_step"] == 12
    assert_checkpoints_finite(tmp_path / "resumed")


# ----------------------------------------------------------------------------- 5. max_fault_events
def test_more_faults_than_max_fault_events_stop_the_run(tmp_path, train):
    err, module = train(
        tmp_path,
        *REALNVP,
        "faults.on_nonfinite=skip",
        "faults.max_fault_events=1",
        f"+faults.nan_grad={K}",
        f"+faults.parameter={WEIGHT}",
        f"+faults.nan_batch={K + 2}",
        error=NonFiniteLossError,
        match=rf"at step {K + 2} in the data",
    )
    assert "that is fault number 2 (max_fault_events=1)" in str(err)
    assert [e["step"] for e in module.fault_events] == [K, K + 2]
    assert_checkpoints_finite(tmp_path)


def test_faults_up_to_max_fault_events_go_on(tmp_path, train):
    metrics, module = train(
        tmp_path,
        *REALNVP,
        "faults.on_nonfinite=skip",
        "faults.max_fault_events=2",
        "test=false",
        f"+faults.nan_grad={K}",
        f"+faults.parameter={WEIGHT}",
        f"+faults.nan_batch={K + 2}",
    )
    assert metrics["train/faults/nonfinite"] == 2.0 and len(module.fault_events) == 2


# ----------------------------------------------------------------------------- 6. solver_failure
def test_solver_failure_stop_names_the_step_and_the_block(tmp_path, train):
    err, module = train(
        tmp_path,
        *MONOTONE,
        f"+faults.solver_failure={K}",
        f"+faults.layer={BLOCK}",
        "faults.on_solver_failure=stop",
        error=ConvergenceError,
        match=rf"a fixed-point solve did not converge at step {K} in {re.escape(BLOCK)} \(forward",
    )
    assert "policy on_solver_failure=stop" in str(err)
    assert [(e["step"], e["kind"], e["where"].split(" ")[0]) for e in module.fault_events] == [(K, "solver", BLOCK)]
    assert_checkpoints_finite(tmp_path)


def test_solver_failure_warn_goes_on(tmp_path, train, step_changes):
    metrics, module = train(
        tmp_path,
        *MONOTONE,
        f"+faults.solver_failure={K}",
        f"+faults.layer={BLOCK}",
        "faults.on_solver_failure=warn",
        "test=false",
    )
    assert metrics["train/faults/solver"] >= 1
    assert {(e["step"], e["kind"], e["policy"]) for e in module.fault_events} == {(K, "solver", "warn")}
    assert step_changes[K] > 0  # warn keeps the update


def test_solver_failure_skip_drops_the_update(tmp_path, train, step_changes):
    metrics, module = train(
        tmp_path,
        *MONOTONE,
        f"+faults.solver_failure={K}",
        f"+faults.layer={BLOCK}",
        "faults.on_solver_failure=skip",
        "test=false",
    )
    assert metrics["train/faults/solver"] == 1.0
    assert [(e["step"], e["where"].split(" ")[0], e["policy"]) for e in module.fault_events] == [(K, BLOCK, "skip")]
    assert step_changes[K] == 0.0 and step_changes[K - 1] > 0 and step_changes[K + 1] > 0
    assert last_ckpt(tmp_path)["global_step"] == 6


# ----------------------------------------------------------------------------- 7. power_iteration_failure
def test_power_iteration_failure_stop_names_the_step_and_the_layer(tmp_path, train):
    err, module = train(
        tmp_path,
        *RESFLOW,
        f"+faults.power_iteration_failure={K}",
        f"+faults.layer={SN_LAYER}",
        "faults.on_power_iteration_failure=stop",
        error=ConvergenceError,
        match=rf"power iteration stopped at its iteration cap before its tolerance at step {K} in "
        rf"{re.escape(SN_LAYER)};",
    )
    assert module.fault_events == [
        {
            "step": K,
            "kind": "power_iteration",
            "where": SN_LAYER,
            "policy": "stop",
            "what": "power iteration stopped at its iteration cap before its tolerance",
        }
    ]
    assert_checkpoints_finite(tmp_path)


def test_power_iteration_failure_warn_goes_on(tmp_path, train):
    metrics, module = train(
        tmp_path,
        *RESFLOW,
        f"+faults.power_iteration_failure={K}",
        f"+faults.layer={SN_LAYER}",
        "faults.on_power_iteration_failure=warn",
    )
    assert metrics["train/faults/power_iteration"] >= 1 and math.isfinite(metrics["test/nll"])
    assert [(e["step"], e["where"]) for e in module.fault_events] == [(K, SN_LAYER)]


def test_power_iteration_failure_reduce_lr_keeps_the_applied_update(tmp_path, train, step_changes, caplog):
    """Found after the update: reduce_lr halves the learning rate but cannot drop an update already applied, and
    says so (no "update dropped"); a stop says the update was applied."""
    metrics, module = train(
        tmp_path,
        *RESFLOW,
        "optim.warmup_steps=0",
        f"+faults.power_iteration_failure={K}",
        f"+faults.layer={SN_LAYER}",
        "faults.on_power_iteration_failure=reduce_lr",
    )
    assert step_changes[K] > 0 and math.isfinite(metrics["test/nll"])
    lr = compose([*FAST, *RESFLOW]).optim.optimizer.lr
    assert last_ckpt(tmp_path)["optimizer_states"][0]["param_groups"][0]["lr"] == lr * 0.5
    assert f"learning rate now [{lr * 0.5}]" in caplog.text and "update dropped" not in caplog.text
    err, _ = train(
        tmp_path / "stop",
        *RESFLOW,
        f"+faults.power_iteration_failure={K}",
        f"+faults.layer={SN_LAYER}",
        "faults.on_power_iteration_failure=stop",
        error=ConvergenceError,
    )
    assert "the update of that step was applied" in str(err)


# ----------------------------------------------------------------------------- 8. exploding_inverse
def _fitted_realnvp(data_overrides=("dataset=toy2d",)):
    torch.manual_seed(0)
    datamodule, module = experiment.build(compose([*data_overrides, *REALNVP]))
    datamodule.setup("fit")
    flow = module.model
    module.metrics(datamodule.splits["train"].tensors[0][:200].float())  # ActNorm's data initialisation
    flow.eval()
    return datamodule, module


def _explode_inverse(layer):
    """Make ``layer.inverse`` return inf (as a divergent inverse does); returns the undo."""
    original = type(layer).inverse
    layer.__dict__["inverse"] = lambda z, *a, **k: original(layer, z, *a, **k) * float("inf")
    return lambda: layer.__dict__.pop("inverse", None)


def test_nonfinite_samples_names_the_layer_whose_inverse_exploded():
    _, module = _fitted_realnvp()
    flow = module.model
    assert nonfinite_samples(flow, 64) is None
    undo = _explode_inverse(flow.transform.transforms[3])
    try:
        count, where = nonfinite_samples(flow, 64)
    finally:
        undo()
    assert count > 0
    # named as in the LightningModule; the later layers 2, 1, 0 only propagate the inf
    assert where == "model.transform.transforms.3 (Coupling)"
    assert nonfinite_samples(flow, 64) is None


RADIAL_RKL = [*REVERSE_KL, "model=radial", "model.num_layers=3"]  # Radial's pathwise sample goes through .inverse
RADIAL = "model.transform.transforms.1"


def test_exploding_inverse_under_reverse_kl_stops_naming_the_layer(tmp_path, train):
    train(
        tmp_path,
        *RADIAL_RKL,
        f"+faults.exploding_inverse={K}",
        f"+faults.layer={RADIAL}",
        error=NonFiniteLossError,
        match=rf"the training loss became \S+ at step {K} in {re.escape(RADIAL)} \(Radial\);",
    )
    assert_checkpoints_finite(tmp_path)


def test_exploding_inverse_under_reverse_kl_skip_finishes(tmp_path, train, step_changes):
    metrics, module = train(
        tmp_path, *RADIAL_RKL, f"+faults.exploding_inverse={K}", f"+faults.layer={RADIAL}", "faults.on_nonfinite=skip"
    )
    assert metrics["train/faults/nonfinite"] == 1.0
    assert math.isfinite(metrics["test/loss"]) and math.isfinite(metrics["test/log_z"])
    assert [(e["step"], e["where"]) for e in module.fault_events] == [(K, f"{RADIAL} (Radial)")]
    assert step_changes[K] == 0.0 and step_changes[K + 1] > 0


def test_exploding_inverse_of_a_coupling_under_reverse_kl(tmp_path, train):
    train(
        tmp_path,
        *REVERSE_KL,
        *REALNVP,
        "model.actnorm=false",
        f"+faults.exploding_inverse={K}",
        f"+faults.layer={COUPLING}",
        "test=false",
        error=NonFiniteLossError,
        match=rf"at step {K} in {re.escape(COUPLING)} \(Coupling\)",
    )


def _break_inverse_while_drawing(monkeypatch, layer_name):
    """The flow's ``layer_name`` inverse returns inf during SampleFigures.draw only."""
    draw = SampleFigures.draw

    def broken_draw(self, trainer, pl_module, tag):
        undo = _explode_inverse(pl_module.get_submodule(layer_name))
        try:
            return draw(self, trainer, pl_module, tag)
        finally:
            undo()

    monkeypatch.setattr(SampleFigures, "draw", broken_draw)


DIGITS = ["dataset=digits", "+dataset.limit=200"]  # 8x8 images: a multi-scale realnvp, a Coupling at transforms.3
DIGITS_RUN = [
    *DIGITS,
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_figures.every_n_epochs=1",
    "callbacks.sample_figures.num_images=16",
]


def test_sample_figures_of_an_exploded_inverse_are_skipped_and_reported(tmp_path, train, monkeypatch):
    """Image model: the sampled grid is NaN/inf, the figure is skipped, the run goes on, and a ``sampling`` event
    names the layer; the training itself saw no fault."""
    _break_inverse_while_drawing(monkeypatch, "model.transform.transforms.3")
    metrics, module = train(tmp_path, *REALNVP, base=DIGITS_RUN)
    assert math.isfinite(metrics["test/loss"])
    events = module.fault_events
    assert [(e["kind"], e["what"].split(" skipped")[0]) for e in events] == [
        ("sampling", "figure val_epoch0"),
        ("sampling", "figure test"),
    ]
    for e in events:
        assert e["step"] == module.global_step and e["policy"] == "warn"
        assert e["where"] == "model.transform.transforms.3 (Coupling)"
        assert e["what"].endswith("first in the inverse of model.transform.transforms.3 (Coupling)")
    assert not list((tmp_path / "figures").glob("*.png"))


def test_sample_figures_draw_directly_on_a_broken_image_flow(tmp_path):
    from types import SimpleNamespace

    datamodule, module = _fitted_realnvp(DIGITS)
    trainer = SimpleNamespace(is_global_zero=True, global_step=7, datamodule=datamodule, loggers=[])
    figures = SampleFigures(dirpath=str(tmp_path), num_images=16)
    assert figures.draw(trainer, module, "ok") == tmp_path / "ok.png"
    # (not transforms.1: the inf it returned would pass ActNorm and come out of the logit's sigmoid as 0 or 1)
    undo = _explode_inverse(module.model.transform.transforms[3])
    try:
        assert figures.draw(trainer, module, "broken") is None
    finally:
        undo()
    assert not (tmp_path / "broken.png").exists()
    (event,) = module.fault_events
    assert event["step"] == 7 and event["kind"] == "sampling"
    assert event["what"].startswith("figure broken skipped at step 7: sampling produced ")
    assert event["where"] == "model.transform.transforms.3 (Coupling)"
    assert not module.model.training  # draw restores the mode it found (eval here)


def test_sample_figures_of_a_2d_flow_with_an_exploded_inverse_are_reported(tmp_path, train, monkeypatch):
    _break_inverse_while_drawing(monkeypatch, COUPLING)
    metrics, module = train(tmp_path, *REALNVP, "callbacks.sample_figures.every_n_epochs=1")
    assert math.isfinite(metrics["test/loss"])
    assert [e["kind"] for e in module.fault_events] == ["sampling", "sampling"]


# ----------------------------------------------------------------------------- 9. bad configs
@pytest.mark.parametrize(
    "overrides,match",
    [
        (["+faults.signal_at_step=3"], r"faults.signal and faults.signal_at_step go together"),
        (["+faults.signal=SIGKILL", "+faults.signal_at_step=3", "+faults.signal_after_step=4"], r"not both steps"),
        (
            ["+faults.signal=SIGKILL", "+faults.signal_after_step=-1"],
            r"faults.signal_after_step must be an optimizer step",
        ),
        (["+faults.signal=SIGHUP", "+faults.signal_at_step=3"], r"faults.signal must be one of .*got 'SIGHUP'"),
        (["+faults.signal=SIGTERM", "+faults.signal_phase=epoch"], r"signal_phase must be one of .*got 'epoch'"),
        (["+faults.signal_phase=test"], r"faults.signal_phase needs faults.signal"),
        (
            ["+faults.signal=SIGTERM", "+faults.signal_phase=inside_step"],
            r"signal_phase=inside_step needs faults.signal_at_step",
        ),
        ([f"+faults.nan_grad={K}"], r"faults.nan_grad needs faults.parameter"),
        ([f"+faults.exploding_inverse={K}"], r"faults.exploding_inverse needs faults.layer"),
        (
            [f"+faults.nan_output={K}", "+faults.layer=model.transform.transforms.9"],
            r"faults.layer='model.transform.transforms.9' is not a module of this model",
        ),
        (
            [f"+faults.nan_grad={K}", "+faults.parameter=model.transform.transforms.1.weight"],
            r"faults.parameter='model.transform.transforms.1.weight' is not a parameter of this model",
        ),
        ([f"+faults.solver_failure={K}", f"+faults.layer={COUPLING}"], r"has no iterative solver"),
        (
            [f"+faults.power_iteration_failure={K}", f"+faults.layer={COUPLING}"],
            r"is not a spectrally normalised layer",
        ),
        (["faults.on_nonfinite=warn"], r"on_nonfinite must be one of \('stop', 'skip', 'reduce_lr'\)"),
        (["faults.fault_lr_factor=1"], r"fault_lr_factor must be a number in \(0, 1\), got 1"),
        (["faults.fault_lr_factor=0"], r"fault_lr_factor must be a number in \(0, 1\), got 0"),
        (["faults.max_fault_events=1.5"], r"max_fault_events must be a positive integer, got 1.5"),
        (
            [f"+faults.exploding_inverse={K}", "+faults.layer=model.transform.transforms.1.conditioner"],
            r"faults.layer='model.transform.transforms.1.conditioner' is not a flow transform \(no inverse\), but "
            r"faults.exploding_inverse needs one",
        ),
        (["+faults.nan_batch=abc"], r"faults.nan_batch must be an optimizer step \(an integer >= 0\), got 'abc'"),
        (["+faults.nan_batch=-1"], r"faults.nan_batch must be an optimizer step \(an integer >= 0\), got -1"),
        # a layer that does not exist is refused at the start, even when its step would never come
        (["+faults.nan_output=1000", "+faults.layer=model.nosuch"], r"faults.layer='model.nosuch' is not a module"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_fault_configs_are_clear_config_errors(tmp_path, overrides, match):
    cfg = compose([*FAST, *REALNVP, *overrides, f"paths.output_dir={tmp_path}", "test=false"])
    with pytest.raises(ConfigError, match=match):
        experiment.train(cfg)


# ----------------------------------------------------------------------------- 10. nothing ends "fine" with NaN
def _no_checkpoints(out):
    return not list((out / "checkpoints").glob("*.ckpt"))


def test_unusable_weights_stop_without_saving_them(tmp_path, train):
    """lr=1e6: the first update ruins the weights; the stop saves no checkpoint that evaluates to NaN."""
    err, module = train(
        tmp_path,
        *REALNVP,
        "optim.optimizer.lr=1e6",
        error=NonFiniteLossError,
        match=r"the training loss became nan at step 1 in model\.transform.*the weights themselves "
        r"give a nan loss .*no checkpoint was written at the stop.*lower optim\.optimizer\.lr",
    )
    assert _no_checkpoints(tmp_path) and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("policy", ["skip", "reduce_lr"])
def test_a_run_with_nan_results_fails_naming_the_layer(tmp_path, train, policy):
    """Under skip / reduce_lr the run reaches its end with ruined weights: its NaN test result is an error naming
    the first non-finite layer, and no metrics.json claims a finished run."""
    train(
        tmp_path,
        *REALNVP,
        "optim.optimizer.lr=1e6",
        f"faults.on_nonfinite={policy}",
        error=NonFiniteLossError,
        match=r"gives non-finite results \(test/loss=nan.*first non-finite layer: model\.transform\.transforms\.\d+ "
        r"\(\w+\).*lower optim\.optimizer\.lr",
    )
    assert not (tmp_path / "metrics.json").exists()


def test_weights_that_become_nan_in_an_update_stop_before_any_save(tmp_path, train, monkeypatch):
    step = torch.optim.Adam.step
    calls = []

    def corrupting_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == K + 1:  # the update of step K
            with torch.no_grad():
                self.param_groups[0]["params"][3].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", corrupting_step)
    err, module = train(
        tmp_path,
        *REALNVP,
        "faults.on_nonfinite=skip",
        "checkpoint_every_n_steps=1",
        error=NonFiniteLossError,
        match=rf"the weights of 1 parameter tensors became NaN/inf in the update of step {K} in "
        r"model\.\S+ \(first\).*no policy can undo an applied update",
    )
    assert module.fault_events[-1]["kind"] == "nonfinite" and module.fault_events[-1]["policy"] == "stop"
    assert last_ckpt(tmp_path)["global_step"] == K  # the periodic save of step K never happened
    assert_checkpoints_finite(tmp_path)


@pytest.fixture
def nan_ckpt(tmp_path):
    """A real checkpoint whose coupling weights hold a NaN."""
    from test_bad_inputs import _save_ckpt

    path = _save_ckpt(tmp_path, REALNVP, "nan")
    data = torch.load(path, weights_only=True)
    key = next(k for k in data["state_dict"] if k.startswith("model.transform.transforms.1.") and k.endswith("weight"))
    data["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(data, path)
    return path, key


def test_eval_of_nan_weights_fails_naming_the_parameter(nan_ckpt):
    path, key = nan_ckpt
    with pytest.raises(
        NonFiniteLossError,
        match=rf"gives non-finite results \(test/loss=nan.*first non-finite layer: "
        rf"{re.escape(key)} \(holds NaN/inf\)",
    ):
        experiment.evaluate(compose([f"ckpt_path={path}"], config_name="eval"))


def test_sample_of_nan_weights_fails_and_writes_nothing(nan_ckpt, tmp_path):
    path, key = nan_ckpt
    out = tmp_path / "samples"
    with pytest.raises(
        NonFiniteLossError,
        match=rf"produced \d+ NaN/inf values \(first non-finite layer: "
        rf"{re.escape(key)} \(holds NaN/inf\)\); nothing was written",
    ):
        experiment.sample(compose([f"ckpt_path={path}", f"output_dir={out}"], config_name="sample"))
    assert not out.exists()


@pytest.mark.parametrize("batch", [1, 2])
def test_actnorm_init_on_a_tiny_batch_keeps_unit_scales(batch, caplog):
    from flowforge.flows.actnorm import ActNorm

    layer = ActNorm((2,))
    x = torch.randn(batch, 2) * 3 + 1
    layer(x)
    assert torch.equal(layer.log_scale, torch.zeros_like(layer.log_scale))  # not -1/2 log(min_var) = 4.6
    assert torch.allclose(layer.loc, -x.mean(0))
    assert (
        f"got a first batch of {batch} example(s) ({batch} values per channel), too few to estimate a scale"
        in caplog.text
    )
    big = ActNorm((2,))
    big(torch.randn(64, 2) * 3)
    assert float(big.log_scale.abs().min()) > 0.5  # ~ -log 3: estimated from the data


def test_training_from_a_batch_of_one_gives_a_sane_likelihood(tmp_path, train):
    """(No sanity validation, so ActNorm initialises on the first training batch: a scale of 100 from it gave a test
    NLL of 4e7 after these 30 steps.)"""
    metrics, _ = train(
        tmp_path,
        *REALNVP,
        "dataset.batch_size=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.max_steps=30",
        "~callbacks.ema",
    )
    assert metrics["test/nll"] < 100


# ----------------------------------------------------------------------------- 11. capped power iteration
def _exact_normalized_norms(module):
    from flowforge.nn.lipschitz import lipschitz_layers

    return [
        float(torch.linalg.matrix_norm(layer.normalized_weight().detach().double(), ord=2))
        for layer in lipschitz_layers(module.model)
        if layer.weight.dim() == 2
    ]


@pytest.fixture
def stale_capped_iteration(monkeypatch):
    """The capped per-step power iteration (``lipschitz_step_iters``) leaves the estimates where they were, as a cap
    that cannot keep up with large updates does."""
    import flowforge.training.lipschitz_maintenance as module_mod

    full = module_mod.update_lipschitz

    def capped_does_nothing(model, max_iters=None, rtol=None, method="subspace"):
        return {} if max_iters is not None else full(model, rtol=rtol, method=method)

    monkeypatch.setattr(module_mod, "update_lipschitz", capped_does_nothing)


LIP_CAP = [
    *RESFLOW,
    "lipschitz_step_iters=1",
    "lipschitz_check_every=3",
    "optim.optimizer.lr=0.05",
    "optim.warmup_steps=0",
    "~callbacks.ema",
]


def test_capped_power_iteration_breach_is_found_and_handled(tmp_path, train, stale_capped_iteration):
    metrics, module = train(tmp_path, *LIP_CAP, "faults.on_power_iteration_failure=warn", "test=false")
    events = [e for e in module.fault_events if e["kind"] == "power_iteration"]
    assert re.match(
        r"the Lipschitz bound was exceeded in 2 of 4 layers \(worst: true norm 0\.9\d+ > coeff 0\.9; "
        r"lipschitz_step_iters=1 iterations per step did not keep up",
        events[0]["what"],
    )
    assert events[0]["where"].startswith("model.transform.")
    assert max(_exact_normalized_norms(module)) <= 0.9 * (1 + 1e-3)  # the bound holds again at the end


def test_capped_power_iteration_breach_stops_under_stop(tmp_path, train, stale_capped_iteration):
    train(
        tmp_path,
        *LIP_CAP,
        "faults.on_power_iteration_failure=stop",
        error=ConvergenceError,
        match=r"the Lipschitz bound was exceeded .* at step 2 in model\.transform\..*on_power_iteration_failure=stop",
    )
