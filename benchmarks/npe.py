#!/usr/bin/env python
"""Amortised posterior estimation side by side with the sbi package: C2ST and training time per sbibm task.

For each task (Lueckmann et al. 2021, "Benchmarking Simulation-Based Inference"; flowforge's simulators,
``flowforge.sbi.tasks``) the script simulates ``--num-simulations`` pairs ``theta ~ p(theta)``,
``x ~ p(x | theta)`` once (``torch.Generator`` seeded with ``--seed``, the pairs of ``dataset=sbi``) and trains
four estimators of ``q(theta | x)`` on exactly those pairs, each from ``torch.manual_seed(--seed)``:

- ``sbi-maf``: sbi's ``NPE`` with its default density estimator (``density_estimator="maf"``: 5 MADE layers of 50
  hidden units in 2 blocks without residual connections, z-scored theta and x);
- ``sbi-nsf``: sbi's ``NPE`` with ``posterior_nn("nsf", hidden_features=50, num_transforms=5, num_bins=10,
  tail_bound=3.0)``, matched to flowforge's NSF below (sbi's conditioners are residual networks of 2 blocks);
- ``flowforge-nsf``: the ``npe_<task>`` recipe's model (``conf/experiment/npe_<task>.yaml``: 5 rational-quadratic
  coupling layers of 10 bins, tail bound 3, MLP conditioners [50, 50], each after an LU map);
- ``flowforge-maf``: ``model=maf`` with 5 MADE layers of [50, 50] hidden units.

flowforge's models see theta and x z-scored per dimension with the training split's statistics (as the
``dataset=sbi`` data module, sbi's ``z_score_theta`` / ``z_score_x`` "independent"); its posterior samples are
mapped back to the task's units.  Every estimator is trained with sbi's ``NPE.train()`` defaults (sbi 0.27.0,
``sbi/inference/trainers/npe/npe_base.py``): Adam with learning rate 5e-4, batches of 200, 10% of the simulations
held out for validation, gradient norm clipped at 5, training stopped once the validation loss has not improved
for 20 epochs, and the weights of the best validation loss returned.  ``--max-epochs`` caps the epochs (sbi's
default: no cap).  sbi draws its validation split at random; flowforge's loop holds out the last 10%
(``dataset=sbi``'s split), so the two sides train on the same pairs split differently.

Then, for the first ``--observations`` of the task's 10 standard observations, ``--num-posterior-samples``
posterior samples ``theta ~ q(theta | x_o)`` (outside the prior's support redrawn, as sbi's ``DirectPosterior``
does) are compared with as many of the reference posterior samples by C2ST (``flowforge.metrics.c2st``, sbibm's
classifier; 0.5 is a perfect posterior).  The reference posteriors are sbibm's files (``--data-dir`` holding
``sbibm/tasks/<task>/files``: ``pip download sbibm==1.1.0 --no-deps`` and unzip the wheel there), or for
``gaussian_linear`` and ``gaussian_mixture`` their closed forms when the files are missing.

Training time is the wall time of building the estimator and training it (sbi: ``append_simulations(...)
.train()`` including its z-scoring, with a tracker that logs nothing; flowforge: the model's construction and the
training loop); the ratio column divides it by ``sbi-maf``'s on the same task.

Usage::

    python benchmarks/npe.py --threads 1                                   # 5 tasks, 10000 simulations, 10 obs
    python benchmarks/npe.py --tasks two_moons slcp --num-posterior-samples 2000 --out npe.md
    python benchmarks/npe.py --quick                                        # 1000 simulations, 2 obs, a smoke run
    python benchmarks/npe.py --methods flowforge-nsf flowforge-maf          # without sbi installed
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from _configs import ROOT, compose  # benchmarks/_configs.py (scripts run as python benchmarks/<name>.py)
from _report import emit

TASK_NAMES = ("gaussian_linear", "gaussian_mixture", "two_moons", "slcp", "bernoulli_glm")
METHODS = ("sbi-maf", "sbi-nsf", "flowforge-nsf", "flowforge-maf")
BASELINE = "sbi-maf"
# sbi 0.27.0 NPE.train() defaults (sbi/inference/trainers/npe/npe_base.py)
BATCH_SIZE = 200
LEARNING_RATE = 5e-4
VALIDATION_FRACTION = 0.1
STOP_AFTER_EPOCHS = 20
CLIP_MAX_NORM = 5.0
# sbi's NSF as flowforge's npe_<task> recipes build it
NSF_MATCHED = {"hidden_features": 50, "num_transforms": 5, "num_bins": 10, "tail_bound": 3.0}
MAF_OVERRIDES = ["model=maf", "model.num_layers=5", "model.hidden=[50,50]"]
QUICK = {"num_simulations": 1000, "observations": 2, "num_posterior_samples": 1000, "max_epochs": 5}
FULL = {"num_simulations": 10000, "observations": 10, "num_posterior_samples": 10000, "max_epochs": None}


@dataclass
class Row:
    task: str
    method: str
    c2st: float
    c2st_per_obs: list[float] = field(default_factory=list)
    train_s: float = 0.0
    epochs: int = 0
    params: int = 0


# ----------------------------------------------------------------------------------------------- data
def load_data(task: str, args):
    """The ``dataset=sbi`` data module of ``task`` after setup: simulations, standardisation, reference."""
    from hydra.utils import instantiate

    cfg = compose(
        [
            "dataset=sbi",
            f"dataset.task={task}",
            f"dataset.num_simulations={args.num_simulations}",
            f"dataset.val_fraction={VALIDATION_FRACTION}",
            f"dataset.num_observations={args.observations}",
            f"dataset.seed={args.seed}",
            f"dataset.data_dir={args.data_dir}",
        ]
    )
    dm = instantiate(cfg.dataset)
    dm.setup("fit")
    return dm


def prior_of(task):
    """``p(theta)`` of a flowforge task as a ``torch.distributions.Distribution`` (for sbi's posterior): a box
    uniform or a Gaussian, with the task's support."""
    from torch.distributions import Independent, MultivariateNormal, Uniform

    from flowforge.sbi.tasks import BernoulliGLM, GaussianLinear

    d = task.dim_theta
    if isinstance(task, GaussianLinear):
        return MultivariateNormal(torch.zeros(d), task.prior_var * torch.eye(d))
    if isinstance(task, BernoulliGLM):
        return MultivariateNormal(torch.zeros(d), precision_matrix=task.precision.float())
    if hasattr(task, "low") and hasattr(task, "high"):
        # as sbi's BoxUniform: log_prob is -inf outside the box (no argument validation)
        box = Uniform(torch.full((d,), task.low), torch.full((d,), task.high), validate_args=False)
        return Independent(box, 1, validate_args=False)
    raise ValueError(f"no prior known for task {task.name}")


# ----------------------------------------------------------------------------------------------- sbi
class NoTracker:
    """sbi's tracker interface, logging nothing (sbi's default writes TensorBoard files under ./sbi-logs)."""

    log_dir = ""

    def log_metric(self, name, value, step=None):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def add_figure(self, name, figure, step=None):
        pass

    def flush(self):
        pass


def train_sbi(method: str, dm, args):
    """sbi's NPE on the data module's simulations; returns (sampler(x_o, n), epochs, params)."""
    from sbi.inference import NPE
    from sbi.neural_nets import posterior_nn

    theta, x = dm.simulate()
    estimator = "maf" if method == "sbi-maf" else posterior_nn("nsf", **NSF_MATCHED)
    inference = NPE(prior=prior_of(dm.task), density_estimator=estimator, tracker=NoTracker(), show_progress_bars=False)
    inference.append_simulations(theta, x)
    net = inference.train(
        training_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        validation_fraction=VALIDATION_FRACTION,
        stop_after_epochs=STOP_AFTER_EPOCHS,
        max_num_epochs=args.max_epochs if args.max_epochs is not None else 2**31 - 1,
        clip_max_norm=CLIP_MAX_NORM,
    )
    posterior = inference.build_posterior(net)
    epochs = int(inference._summary["epochs_trained"][-1])

    def sample(x_o, n):
        return posterior.sample((n,), x=x_o.reshape(1, -1), show_progress_bars=False).reshape(n, -1)

    return sample, epochs, sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------------------------- flowforge
def build_flowforge(method: str, task: str):
    from hydra.utils import instantiate

    overrides = [f"experiment=npe_{task}"] if method == "flowforge-nsf" else ["dataset=sbi", f"dataset.task={task}"]
    if method == "flowforge-maf":
        overrides += MAF_OVERRIDES
    return instantiate(compose(overrides).model)


def fit(model, train, val, args, generator: torch.Generator) -> int:
    """sbi's training rule on a flowforge model (module docstring); returns the epochs trained.  ``train``/``val``:
    ``(theta, x)`` standardised."""
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    best, best_state, since, epoch = math.inf, None, 0, 0
    max_epochs = args.max_epochs if args.max_epochs is not None else 2**31 - 1
    n = len(train[0])
    while epoch < max_epochs:
        model.train()
        for idx in torch.randperm(n, generator=generator).split(BATCH_SIZE):
            opt.zero_grad(set_to_none=True)
            loss = -model.log_prob(train[0][idx], train[1][idx]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM)
            opt.step()
        epoch += 1
        model.eval()
        with torch.no_grad():
            val_loss = float(-model.log_prob(val[0], val[1]).mean())
        if val_loss < best:
            best, since = val_loss, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since += 1
            if since >= STOP_AFTER_EPOCHS:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return epoch


def train_flowforge(method: str, dm, args):
    from flowforge.training.posterior_checks import PosteriorChecks

    model = build_flowforge(method, dm.task.name)
    train = tuple(t for t in dm.splits["train"].tensors)
    val = tuple(t for t in dm.splits["val"].tensors)
    epochs = fit(model, train, val, args, torch.Generator().manual_seed(args.seed))
    checks = PosteriorChecks()

    def sample(x_o, n):
        return checks.posterior_samples(model, dm, x_o, n)

    return sample, epochs, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- run
def run_method(method: str, dm, args) -> Row:
    from flowforge.metrics import c2st

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    trainer = train_sbi if method.startswith("sbi-") else train_flowforge
    sample, epochs, params = trainer(method, dm, args)
    train_s = time.perf_counter() - t0
    ref = dm.posterior_reference
    scores = []
    torch.manual_seed(args.seed + 1)
    for x_o, ref_samples in zip(ref.observations, ref.samples):
        n = min(args.num_posterior_samples, len(ref_samples))
        with torch.no_grad():
            drawn = sample(x_o, n).float()
        scores.append(c2st(ref_samples[:n], drawn, seed=args.seed + 1))
    return Row(dm.task.name, method, sum(scores) / len(scores), scores, train_s, epochs, params)


def report(rows: list[Row], args, elapsed: float) -> str:
    base = {r.task: r.train_s for r in rows if r.method == BASELINE}
    lines = [
        "# NPE: flowforge against sbi",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, sbi {sbi_version()}",
        "",
        f"{args.num_simulations} simulations, seed {args.seed}, {args.observations} observation(s), "
        f"{args.num_posterior_samples} posterior samples each; training: batch {BATCH_SIZE}, Adam {LEARNING_RATE}, "
        f"{VALIDATION_FRACTION:.0%} validation, stop after {STOP_AFTER_EPOCHS} epochs without improvement"
        + (f", at most {args.max_epochs} epochs" if args.max_epochs is not None else "")
        + ".",
        "",
        f"| task | method | C2ST (mean over obs) | train time (s) | time ratio vs {BASELINE} | epochs | parameters |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r.train_s / base[r.task]:.2f}" if r.task in base else "n/a"
        lines.append(f"| {r.task} | {r.method} | {r.c2st:.3f} | {r.train_s:.1f} | {ratio} | {r.epochs} | {r.params} |")
    lines += ["", "C2ST per observation:", ""]
    for r in rows:
        lines.append(f"- {r.task} / {r.method}: " + ", ".join(f"{s:.3f}" for s in r.c2st_per_obs))
    lines += ["", f"Total time {elapsed:.0f} s."]
    return "\n".join(lines) + "\n"


def sbi_version() -> str:
    try:
        import sbi

        return sbi.__version__
    except ImportError:
        return "not installed"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=list(TASK_NAMES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--num-simulations", type=int, default=None, help="simulation budget (10000; --quick: 1000)")
    p.add_argument("--observations", type=int, default=None, help="standard observations, 1..10 (10; --quick: 2)")
    p.add_argument("--num-posterior-samples", type=int, default=None, help="per observation (10000; --quick: 1000)")
    p.add_argument("--max-epochs", type=int, default=None, help="epoch cap (none, as sbi; --quick: 5)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1000 simulations, 2 obs, 1000 samples, 5 epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(ROOT / "data" / "sbi"), help="folder holding sbibm/tasks/<task>/files")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the Markdown report to this path")
    p.add_argument("--progress", default=None, help="append each finished row as a JSON line to this file")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.observations <= 10:
        p.error("--observations must lie in 1..10")
    return args


def main(argv=None) -> list[Row]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(m.startswith("sbi-") for m in args.methods) and sbi_version() == "not installed":
        sys.exit("sbi is not installed: `pip install sbi` (keep torch: pin it), or pass --methods flowforge-nsf ...")
    import logging
    import warnings

    t0 = time.perf_counter()
    rows = []
    logger = logging.getLogger("flowforge")
    level = logger.level
    # quiet while the estimators train; the caller's warning filters and log level come back afterwards
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        logger.setLevel(logging.ERROR)
        try:
            for task in args.tasks:
                dm = load_data(task, args)
                for method in args.methods:
                    row = run_method(method, dm, args)
                    rows.append(row)
                    print(
                        f"{task} {method}: C2ST {row.c2st:.3f}, {row.train_s:.1f} s, {row.epochs} epochs",
                        file=sys.stderr,
                        flush=True,
                    )
                    if args.progress:
                        with open(args.progress, "a") as fh:
                            fh.write(json.dumps(asdict(row)) + "\n")
        finally:
            logger.setLevel(level)
    emit(report(rows, args, time.perf_counter() - t0), args.out)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
