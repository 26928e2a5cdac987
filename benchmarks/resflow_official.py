#!/usr/bin/env python
"""Time the Residual Flows toy training step: flowforge against the official code, in one process.

The official code is rtqichen/residual-flows (``--official-dir``; get it with
``git clone https://github.com/rtqichen/residual-flows``).  This script imports its modules and builds
the toy model the way its ``train_toy.py`` does (``--arch iresnet``): ``--nblocks`` ``iResBlock`` s whose
g is ``[Swish, InducedNormLinear] x 5`` (2-128-128-128-128-2, ``vnorms=222222`` -> spectral norm,
coeff 0.9, the last layer zero-initialised), 2 exact terms + geometric(0.5) roulette with one Gaussian
probe, ``optimizers.Adam(lr=1e-3, weight_decay=1e-5)``, ``update_lipschitz(model, 5)`` after each step
(5 warm-started power iterations per layer, ``--n-lipschitz-iters``, no tolerance).
flowforge's equivalent: ``ResidualFlow((2,), hidden=[128]*4, act="lipswish", coeff=0.9, actnorm=False)``
with ``LogDetEstimator("roulette", n_exact_terms=2, dist="geometric", p=0.5, ...)``,
``torch.optim.Adam(lr=1e-3, weight_decay=1e-5, fused=True)`` (what ``optim.optimizer.fused: auto`` builds on the
CPU) and ``update_lipschitz(flow, max_iters=5)``.

Variants (each timed for both libraries):

- ``neumann``: Neumann gradient series + backward-in-forward (official ``neumann_grad=True,
  grad_in_forward=True``; flowforge ``neumann_grad=True, mem_eff=True``);
- ``backprop``: plain backprop through the roulette series (official ``neumann_grad=False,
  grad_in_forward=False``, what ``train_toy.py`` hard-codes; flowforge ``neumann_grad=False, mem_eff=False``).

A step is ``zero_grad; loss = -mean log p(x); backward; Adam; power iteration``, timed in three parts.
``--warmup`` untimed steps per model, then the models take turns, one step each, for ``--rounds``
rounds of ``--steps`` steps, the order rotated each round; medians are reported.  Every model sees the
same batches.  ``--nll-steps N`` trains the two ``neumann`` models to N steps and reports their test
NLL on held-out points with the exact 2x2 log-det (eval mode in both libraries).

Usage::

    python benchmarks/resflow_official.py --threads 1
    python benchmarks/resflow_official.py --threads 1 --variants neumann --nll-steps 300 --out toy_official.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import warnings

import resflow_toy
import torch
from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)
from resflow_toy import Entry, iqr, med, run_timing, test_nll, train_to

DIM = 2
COEFF = 0.9
N_EXACT = 2
GEOM_P = 0.5
WEIGHT_DECAY = 1e-5
TARGET_RATIO = 0.5
DEFAULT_OFFICIAL_DIR = "/work/scratch/residual-flows"
VARIANTS = {"neumann": (True, True), "backprop": (False, False)}


def import_official(path: str):
    if not os.path.isdir(os.path.join(path, "resflows")):
        sys.exit(
            f"The official Residual Flows code was not found at {path!r}. Get it with\n"
            "  git clone https://github.com/rtqichen/residual-flows\n"
            "and pass its folder with --official-dir."
        )
    sys.path.insert(0, path)
    import resflows.layers as layers
    import resflows.layers.base as base_layers
    import resflows.optimizers as optim

    return layers, base_layers, optim


def build_official(official, args, neumann_grad: bool, grad_in_forward: bool):
    layers, base_layers, optim = official
    dims = [DIM, *args.hidden, DIM]
    blocks = []
    for _ in range(args.nblocks):
        nnet = []
        for in_dim, out_dim in zip(dims[:-1], dims[1:]):  # train_toy.py build_nnet, vnorms 222222
            nnet.append(base_layers.Swish())
            nnet.append(
                base_layers.get_linear(
                    in_dim,
                    out_dim,
                    coeff=COEFF,
                    n_iterations=args.n_lipschitz_iters,
                    atol=None,
                    rtol=None,
                    domain=2.0,
                    codomain=2.0,
                    zero_init=(out_dim == DIM),
                )
            )
        blocks.append(
            layers.iResBlock(
                torch.nn.Sequential(*nnet),
                n_dist="geometric",
                geom_p=GEOM_P,
                n_exact_terms=N_EXACT,
                n_power_series=None,
                exact_trace=False,
                brute_force=False,
                n_samples=1,
                neumann_grad=neumann_grad,
                grad_in_forward=grad_in_forward,
            )
        )
    model = layers.SequentialFlow(blocks)
    log_z = -0.5 * math.log(2 * math.pi)

    def log_prob(x):
        z, delta_logp = model(x, x.new_zeros(x.shape[0], 1))
        return (log_z - z.pow(2) / 2).sum(1) - delta_logp.view(-1)

    def loss_fn(x):
        return -log_prob(x).mean()

    lin = (base_layers.InducedNormLinear, base_layers.SpectralNormLinear)

    def lipschitz():  # train_toy.py update_lipschitz
        for m in model.modules():
            if isinstance(m, lin):
                m.compute_weight(update=True, n_iterations=args.n_lipschitz_iters)

    opt = optim.Adam(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    return model, loss_fn, lipschitz, log_prob, opt


def build_flowforge(args, neumann_grad: bool, mem_eff: bool):
    """flowforge's toy model as resflow_toy.py builds it, with the official script's power iterations and Adam."""
    from flowforge.nn.lipschitz import update_lipschitz

    flow, loss_fn, _, log_prob = resflow_toy.build_flowforge(args.hidden, neumann_grad, mem_eff, args.nblocks)

    def lipschitz():
        update_lipschitz(flow, max_iters=args.n_lipschitz_iters)

    params = [p for p in flow.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr, weight_decay=WEIGHT_DECAY, fused=True)  # optim.optimizer.fused: auto
    return flow, loss_fn, lipschitz, log_prob, opt


def build_entries(official, args):
    entries = []
    for v in args.variants:
        ng, gif = VARIANTS[v]
        for lib in ("flowforge", "official"):
            torch.manual_seed(args.seed)
            if lib == "official":
                model, loss_fn, lip, lp, opt = build_official(official, args, ng, gif)
                note = f"neumann_grad={ng}, grad_in_forward={gif}"
            else:
                model, loss_fn, lip, lp, opt = build_flowforge(args, ng, gif)
                note = f"neumann_grad={ng}, mem_eff={gif}"
            e = Entry(f"{lib}-{v}", f"{lib}: {v}", lib, model, loss_fn, lip, lp, note)
            e.opt = opt
            e.params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            e.variant = v
            entries.append(e)
    return entries


def report(entries, args, nll_entries, wall: float) -> str:
    lines = [
        "# Residual Flows toy step: flowforge vs the official code (same process, interleaved)",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, "
        f"python {platform.python_version()}, {platform.machine()} {os.cpu_count()} CPUs; official code "
        f"from {args.official_dir}",
        f"- model: {args.nblocks} residual blocks, g = MLP {'-'.join(map(str, [DIM, *args.hidden, DIM]))}, "
        f"LipSwish, coeff {COEFF}; batch {args.batch}; Adam lr {args.lr}, weight decay {WEIGHT_DECAY}; log-det "
        f"{N_EXACT} exact terms + geometric({GEOM_P}) roulette, 1 Gaussian probe; {args.n_lipschitz_iters} "
        "power iterations per layer after each step",
        f"- warm-up {args.warmup} steps; {args.rounds} rounds x {args.steps} steps, one step per model per turn, "
        "order rotated each round; median s/step",
        "",
        "| Model | median s/step | IQR s | fwd+bwd s | Adam s | power iter. s | params | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        q1, q3 = iqr(e.times)
        lines.append(
            f"| {e.title} ({e.note}) | **{med(e.times):.4f}** | {q1:.4f}–{q3:.4f} | {med(e.fwd_bwd):.4f} | "
            f"{med(e.adam):.4f} | {med(e.lip):.4f} | {e.params:,} | {e.last_loss:.3f} |"
        )
    lines += [
        "",
        "| flowforge / official | step | fwd+bwd | Adam | power iter. | target |",
        "|---|---|---|---|---|---|",
    ]
    by = {e.key: e for e in entries}
    for v in args.variants:
        f, o = by[f"flowforge-{v}"], by[f"official-{v}"]
        r = med(f.times) / med(o.times)
        tgt = f"<= {TARGET_RATIO} ({'OK' if r <= TARGET_RATIO else 'MISSED'})" if v == "neumann" else "—"
        lines.append(
            f"| {v} | **{r:.2f}** | {med(f.fwd_bwd) / med(o.fwd_bwd):.2f} | {med(f.adam) / med(o.adam):.2f} | "
            f"{med(f.lip) / med(o.lip):.2f} | {tgt} |"
        )
    if nll_entries:
        lines += [
            "",
            f"Test NLL after {args.nll_steps} training steps each (same batches), {args.n_test} held-out "
            "checkerboard points, eval mode, exact 2x2 log-det in both:",
            "",
            "| Model | test NLL (nats) |",
            "|---|---|",
        ]
        lines += [f"| {e.title} | {e.test_nll:.4f} |" for e in nll_entries]
    lines += ["", f"Benchmark wall time: {wall:.1f} s"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-dir", default=DEFAULT_OFFICIAL_DIR, help="folder of rtqichen/residual-flows")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--nblocks", type=int, default=10)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 128, 128, 128])
    p.add_argument("--n-lipschitz-iters", type=int, default=5, help="power iterations per step (train_toy.py: 5)")
    p.add_argument("--nll-steps", type=int, default=0, help="train the neumann pair to N steps, report test NLL")
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown report to this path")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    t0 = time.perf_counter()
    official = import_official(args.official_dir)

    import numpy as np

    from flowforge.data.toy2d import sample_toy

    np.random.seed(args.seed)  # the official roulette draws from numpy's global generator
    pool = sample_toy("checkerboard", args.batch * 64, seed=args.seed)
    batches = [b.contiguous() for b in pool.split(args.batch)]
    entries = build_entries(official, args)
    run_timing(entries, batches, args.warmup, args.rounds, args.steps, clock)
    nll_entries = [e for e in entries if e.variant == "neumann"] if args.nll_steps > 0 else []
    if nll_entries:
        train_to(nll_entries, batches, args.nll_steps, clock)
        x_test = sample_toy("checkerboard", args.n_test, seed=args.seed + 1)
        for e in nll_entries:
            e.test_nll = test_nll(e, x_test)
    emit(report(entries, args, nll_entries, time.perf_counter() - t0), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
