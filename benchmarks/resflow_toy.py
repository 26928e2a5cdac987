#!/usr/bin/env python
"""Time one Residual Flow training step on 2-D checkerboard data: flowforge against normflows.

The Residual Flows toy benchmark: 10 residual blocks whose g is the Lipschitz MLP
2-128-128-128-128-2 (``--hidden``; LipSwish, Lipschitz bound 0.9, no ActNorm), batch 500, log-det by
2 exact terms + a geometric(0.5) Russian-roulette tail with one Gaussian Hutchinson probe, the Neumann
gradient series and backward-in-forward (``mem_eff``), Adam lr 1e-3.  One step is

    loss = -log_prob(x).mean(); loss.backward(); Adam.step(); power iteration on every Lipschitz layer

flowforge: ``ResidualFlow((2,), estimator=LogDetEstimator("roulette", ...))`` and
``flowforge.nn.lipschitz.update_lipschitz(flow)`` after each step (its defaults: rtol 1e-3, at most
200 iterations, warm-started).
normflows 1.7: ``nf.flows.Residual(nf.nets.LipschitzMLP(...), reduce_memory=True, ...)`` (a port of the
reference implementation) with a standard normal base, loss ``model.forward_kld(x)`` and
``nf.utils.update_lipschitz(model, None)`` after each step.  Its layers are built with
``max_lipschitz_iter=None, lipschitz_tolerance=1e-3`` so that call runs the reference schedule:
warm-started power iteration until ``||du||/sqrt(n) < atol + rtol max|u|`` (same for v) with
atol = rtol = 1e-3, at most 200 iterations.  (normflows' forward never updates u, v itself.)

Also timed (flowforge only): roulette + Neumann gradient without backward-in-forward, and plain
backprop through the roulette series (``neumann_grad=False, mem_eff=False``).

Timing follows ``train_step.py``: ``--warmup`` untimed steps per model, then the models take turns, one
step each, for ``--rounds`` rounds of ``--steps`` steps with the order rotated every round; each step is
timed separately and the median is reported, split into forward+backward, Adam and power iteration.
Every model sees the same sequence of batches (its own counter into one pool).

Test NLL: the two main models are trained on to ``--nll-steps`` steps each (same batches) and evaluated
on ``--n-test`` held-out checkerboard points in eval mode; both then use the exact 2x2 log-det
(flowforge: ``eval_exact_max_dim=2``; normflows: its ``brute_force`` branch, taken whenever the block is
not training and the data is 2-D).

Usage::

    python benchmarks/resflow_toy.py                                  # ~5 min on 2 idle cores
    python benchmarks/resflow_toy.py --nll-steps 0 --out toy.md       # timings only
    python benchmarks/resflow_toy.py --threads 1 --clock cpu          # steadier on a busy machine
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)
from torch import Tensor, nn

DIM = 2
NUM_BLOCKS = 10
COEFF = 0.9
N_EXACT = 2
GEOM_P = 0.5
SN_TOL = 1e-3
SN_MAX_ITERS = 200

# Not measured here: the reference implementation (rtqichen/residual-flows, train_toy.py) at this size
# takes about 0.30 s per training step on a 2-core CPU machine of this kind (a reference figure, not measured here).
REFERENCE_S_PER_STEP = 0.30
TARGET_S_PER_STEP = 0.15
TARGET_RATIO = 0.85


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    key: str
    title: str
    lib: str
    model: nn.Module
    loss_fn: Callable[[Tensor], Tensor]
    lipschitz_fn: Callable[[], object]
    log_prob_eval: Callable[[Tensor], Tensor]
    note: str
    opt: torch.optim.Optimizer = None
    params: int = 0
    count: int = 0  # steps taken (also the index into the batch pool)
    times: list = field(default_factory=list)
    fwd_bwd: list = field(default_factory=list)
    adam: list = field(default_factory=list)
    lip: list = field(default_factory=list)
    last_loss: float = float("nan")
    test_nll: float = float("nan")

    def step(self, x: Tensor, clock) -> float:
        t0 = clock()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x)
        loss.backward()
        t1 = clock()
        self.opt.step()
        t2 = clock()
        self.lipschitz_fn()
        t3 = clock()
        self.count += 1
        self._last = (t3 - t0, t1 - t0, t2 - t1, t3 - t2)
        return loss.item()

    def record(self) -> None:
        total, fb, ad, lp = self._last
        self.times.append(total)
        self.fwd_bwd.append(fb)
        self.adam.append(ad)
        self.lip.append(lp)


def build_flowforge(hidden, neumann_grad: bool, mem_eff: bool, num_blocks: int = NUM_BLOCKS):
    from flowforge.estimators import LogDetEstimator
    from flowforge.flows.resflow import ResidualFlow
    from flowforge.nn.lipschitz import update_lipschitz

    est = LogDetEstimator(
        "roulette", n_exact_terms=N_EXACT, dist="geometric", p=GEOM_P, neumann_grad=neumann_grad, mem_eff=mem_eff
    )
    flow = ResidualFlow(
        (DIM,),
        estimator=est,
        num_blocks=num_blocks,
        hidden=list(hidden),
        act="lipswish",
        coeff=COEFF,
        actnorm=False,
        sn_rtol=SN_TOL,
        sn_max_iters=SN_MAX_ITERS,
    )

    def loss_fn(x):
        return -flow.log_prob(x).mean()

    return flow, loss_fn, (lambda: update_lipschitz(flow)), flow.log_prob


def build_normflows(hidden):
    import normflows as nf

    channels = [DIM, *hidden, DIM]
    blocks = []
    for _ in range(NUM_BLOCKS):
        net = nf.nets.LipschitzMLP(
            channels, lipschitz_const=COEFF, max_lipschitz_iter=None, lipschitz_tolerance=SN_TOL, init_zeros=True
        )
        blocks.append(
            nf.flows.Residual(
                net,
                reduce_memory=True,
                geom_p=GEOM_P,
                n_exact_terms=N_EXACT,
                n_samples=1,
                brute_force=False,
                exact_trace=False,
            )
        )
    model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(DIM, trainable=False), flows=blocks)

    def lipschitz():
        # n_iterations=None -> each layer's own (atol, rtol) = 1e-3 test, capped at 200 iterations
        nf.utils.update_lipschitz(model, None)

    return model, model.forward_kld, lipschitz, model.log_prob


CONTENDERS = ("flowforge", "normflows", "flowforge-neumann", "flowforge-backprop")


def build_entry(key: str, hidden, lr: float, seed: int) -> Entry:
    torch.manual_seed(seed)
    if key == "normflows":
        model, loss_fn, lip, lp = build_normflows(hidden)
        title, lib = "normflows: roulette + Neumann + backward-in-forward", "normflows"
        note = "Residual(reduce_memory=True) + LipschitzMLP (InducedNormLinear, 2-norm)"
    else:
        ng, me = {"flowforge": (True, True), "flowforge-neumann": (True, False), "flowforge-backprop": (False, False)}[
            key
        ]
        model, loss_fn, lip, lp = build_flowforge(hidden, ng, me)
        title = {
            "flowforge": "flowforge: roulette + Neumann + backward-in-forward",
            "flowforge-neumann": "flowforge: roulette + Neumann (no backward-in-forward)",
            "flowforge-backprop": "flowforge: roulette, plain backprop",
        }[key]
        lib = "flowforge"
        note = f"neumann_grad={ng}, mem_eff={me}"
    e = Entry(key, title, lib, model, loss_fn, lip, lp, note)
    params = [p for p in model.parameters() if p.requires_grad]
    e.params = sum(p.numel() for p in params)
    e.opt = torch.optim.Adam(params, lr=lr)
    return e


# --------------------------------------------------------------------------------------------------
# Timing and evaluation
# --------------------------------------------------------------------------------------------------


def run_timing(entries, batches, warmup: int, rounds: int, steps: int, clock) -> None:
    for e in entries:
        for _ in range(warmup):
            e.last_loss = e.step(batches[e.count % len(batches)], clock)
        if not math.isfinite(e.last_loss):
            print(f"WARNING: {e.key}: non-finite loss after warm-up", file=sys.stderr)
    n = len(entries)
    for r in range(rounds):
        order = entries[r % n :] + entries[: r % n]
        for _ in range(steps):
            for e in order:
                e.last_loss = e.step(batches[e.count % len(batches)], clock)
                e.record()


def test_nll(e: Entry, x_test: Tensor, chunk: int = 1000, autograd_libs=("normflows", "official")) -> float:
    """Mean test NLL of ``e`` (the libraries in ``autograd_libs`` need autograd for their exact log-det)."""
    e.model.eval()
    total = 0.0
    for xb in x_test.split(chunk):
        if e.lib in autograd_libs:
            lp = e.log_prob_eval(xb)  # its brute-force 2x2 Jacobian needs autograd (enabled inside)
        else:
            with torch.no_grad():
                lp = e.log_prob_eval(xb)
        total += float(lp.detach().double().sum())
    e.model.train()
    return -total / x_test.shape[0]


def train_to(entries, batches, n_steps: int, clock) -> None:
    for e in entries:
        while e.count < n_steps:
            e.last_loss = e.step(batches[e.count % len(batches)], clock)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def iqr(xs) -> tuple[float, float]:
    if len(xs) < 4:
        return med(xs), med(xs)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def report(entries, args, nll_entries, wall: float) -> str:
    import normflows

    by = {e.key: e for e in entries}
    ff, nf_ = by.get("flowforge"), by.get("normflows")
    lines = [
        "# Residual Flow training step, 2-D checkerboard (flowforge vs normflows)",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()} "
        f"({'default' if args.threads is None else 'set by --threads'}), clock {args.clock}, normflows "
        f"{normflows.__version__}, python {platform.python_version()}, {platform.machine()} {os.cpu_count()} CPUs",
        f"- model: {NUM_BLOCKS} residual blocks, g = MLP {'-'.join(map(str, [DIM, *args.hidden, DIM]))}, LipSwish, "
        f"coeff {COEFF}, no ActNorm; batch {args.batch}; Adam lr {args.lr}; log-det: {N_EXACT} exact terms + "
        f"geometric({GEOM_P}) roulette, 1 Gaussian probe",
        f"- step = forward + backward + Adam + power iteration; warm-up {args.warmup} steps; {args.rounds} "
        f"round-robin rounds x {args.steps} steps (one step per model per turn, order rotated each round); "
        "median s/step",
        "",
        "| Model | median s/step | IQR s | fwd+bwd s | Adam s | power iter. s | params | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        q1, q3 = iqr(e.times)
        lines.append(
            f"| {e.title} | **{med(e.times):.3f}** | {q1:.3f}–{q3:.3f} | {med(e.fwd_bwd):.3f} | {med(e.adam):.4f} | "
            f"{med(e.lip):.3f} | {e.params:,} | {e.last_loss:.3f} |"
        )
    lines += ["", "| Check | value | target | |", "|---|---|---|---|"]
    if ff is not None and nf_ is not None:
        ratio = med(ff.times) / med(nf_.times)
        lines.append(
            f"| flowforge / normflows (s/step) | **{ratio:.2f}** | <= {TARGET_RATIO} | "
            f"{'OK' if ratio <= TARGET_RATIO else 'MISSED'} |"
        )
        lines.append(
            f"| flowforge / normflows, without power iteration | "
            f"{(med(ff.fwd_bwd) + med(ff.adam)) / (med(nf_.fwd_bwd) + med(nf_.adam)):.2f} | — | |"
        )
    if ff is not None:
        s = med(ff.times)
        lines.append(
            f"| flowforge s/step | **{s:.3f}** | <= {TARGET_S_PER_STEP} | "
            f"{'OK' if s <= TARGET_S_PER_STEP else 'MISSED'} |"
        )
        lines.append(
            f"| flowforge / reference implementation (reference {REFERENCE_S_PER_STEP} s/step, "
            f"**published constant, not measured here**) | {s / REFERENCE_S_PER_STEP:.2f} | <= "
            f"{TARGET_S_PER_STEP / REFERENCE_S_PER_STEP:.2f} | |"
        )
    if nll_entries:
        lines += [
            "",
            f"Test NLL after {args.nll_steps} training steps each (same batches), "
            f"{args.n_test} held-out checkerboard points (seed {args.seed + 1}), eval mode:",
            "",
            "| Model | test NLL (nats) | log-det at evaluation |",
            "|---|---|---|",
        ]
        for e in nll_entries:
            how = (
                "exact 2x2 Jacobian (estimator eval_exact_max_dim=2)"
                if e.lib == "flowforge"
                else "exact 2x2 Jacobian (iResBlock brute-force branch in eval mode)"
            )
            lines.append(f"| {e.title} | {e.test_nll:.4f} | {how} |")
    lines += [
        "",
        "Notes: power iteration after every step — flowforge: `update_lipschitz(flow)`, warm-started, stops "
        f"when sigma·||v_k − v_(k−1)|| <= rtol·sigma (rtol {SN_TOL}, at most {SN_MAX_ITERS} iterations); normflows: "
        f"`nf.utils.update_lipschitz(model, None)` with layers built with `max_lipschitz_iter=None, "
        f"lipschitz_tolerance={SN_TOL}`: warm-started, per layer, stops when ||Δu||/√n and ||Δv||/√n are below "
        f"{SN_TOL} + {SN_TOL}·max (at most 200 iterations) — a looser test than flowforge's. normflows' roulette "
        "uses numpy's global generator, flowforge's torch's; both draw N >= 1 so a step computes 2 + N terms "
        "(mean 4). normflows' LipschitzMLP applies LipSwish also before the first linear layer; its Swish and "
        "iResBlock carry a few extra scalars, hence the slightly different parameter counts. The reference "
        f"time ({REFERENCE_S_PER_STEP} s/step) is a reference constant, not measured in this run.",
        "",
        f"Benchmark wall time: {wall:.1f} s",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per model per round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per model (default 3)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[128, 128, 128, 128],
        help="hidden widths of each block's MLP (default 128 128 128 128, i.e. 2-128-128-128-128-2)",
    )
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument(
        "--nll-steps",
        type=int,
        default=300,
        help="train flowforge and normflows to this many steps, then report test NLL (0: skip)",
    )
    p.add_argument("--n-test", type=int, default=5000, help="held-out points for the test NLL")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N); default: torch's default")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (perf_counter) or cpu (main-thread CPU time; only meaningful with --threads 1)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown report to this path")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        print("WARNING: --clock cpu only counts the main thread; use it with --threads 1", file=sys.stderr)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    t0 = time.perf_counter()
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        flush=True,
    )

    import numpy as np

    from flowforge.data.toy2d import sample_toy

    np.random.seed(args.seed)  # normflows' roulette draws
    pool = sample_toy("checkerboard", args.batch * 64, seed=args.seed)
    batches = [b.contiguous() for b in pool.split(args.batch)]
    entries = [build_entry(k, args.hidden, args.lr, args.seed) for k in args.contenders]
    run_timing(entries, batches, args.warmup, args.rounds, args.steps, clock)
    print(f"timing done ({time.perf_counter() - t0:.0f} s)", flush=True)

    nll_entries = [e for e in entries if e.key in ("flowforge", "normflows")] if args.nll_steps > 0 else []
    if nll_entries:
        train_to(nll_entries, batches, args.nll_steps, clock)
        x_test = sample_toy("checkerboard", args.n_test, seed=args.seed + 1)
        for e in nll_entries:
            e.test_nll = test_nll(e, x_test)
    text = report(entries, args, nll_entries, time.perf_counter() - t0)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
