#!/usr/bin/env python
"""Time a flowforge training step compiled with ``torch.compile`` against the same step run eagerly.

One step is ``loss = -log_prob(x).mean(); loss.backward(); Adam.step()`` (plus, for the residual toy, the power
iteration of every spectrally normalised layer after the update), on a batch of ``--batch`` (500) 2-D checkerboard
points.  Compiled: the loss function (the model's forward, and its backward through AOTAutograd) is wrapped in
``torch.compile`` with the default backend (inductor) and mode, as ``compile=true`` does in ``train.py``; backward,
Adam and the power iteration run as usual.  Models, sized as in ``train_step.py`` and ``resflow_toy.py``:

* RealNVP - 8 affine couplings with ActNorm, MLP conditioners [64, 64];
* Glow    - 8 steps ActNorm -> LU linear -> affine coupling, [64, 64];
* NSF     - 4 rational-quadratic spline layers, 8 bins, [64, 64];
* MAF     - 5 MADE layers [64, 64];
* ResFlow - the residual toy: 10 blocks, g = 2-128-128-128-128-2 LipSwish MLP, Lipschitz bound 0.9, no ActNorm,
            2 exact terms + a geometric(0.5) roulette tail, Neumann gradients (``--mem-eff`` adds
            backward-in-forward).

The models run one after the other (dynamo reset in between); the two copies of a model start from the same
weights.  Each variant gets ``--warmup`` untimed steps (the compiled
one compiles in its first call: its wall time is reported as the compile time, with inductor's caches off unless
``--cache``); then the eager and the compiled
variant take turns, ``--steps`` steps each, for ``--rounds`` rounds with the order swapped every round, each step
timed on its own; the
table gives the median ms and the ratio compiled / eager (below 1: compiling pays).  For the residual toy the
roulette draw (the number of series terms) is made on the host and shapes the graph: the compiled step runs it
eagerly and compiles the code after it for each drawn count, up to dynamo's recompile limit; the table's "graphs"
column counts the graphs compiled over the whole run (warm-up and timed steps).

Usage::

    python benchmarks/compile.py                                # all five, ~5 min on 2 cores (mostly compiling)
    python benchmarks/compile.py --models realnvp resflow --rounds 3 --out compile.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch._inductor.config
from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)

MODELS = ("realnvp", "glow", "nsf", "maf", "resflow")
TITLE = {"realnvp": "RealNVP", "glow": "Glow", "nsf": "NSF", "maf": "MAF", "resflow": "ResFlow toy"}
HIDDEN = [64, 64]


def checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points of the 2-D checkerboard density on [-4, 4]^2."""
    x1 = torch.rand(n, generator=generator) * 8 - 4
    x2 = torch.rand(n, generator=generator) * 2 - 2 + (torch.floor(x1) % 2) * 2
    x2 = torch.where(x2 > 2, x2 - 4, x2) * 2
    return torch.stack([x1, x2], 1)


def build(name: str, mem_eff: bool):
    """``(flow, after_step)``: the model and what runs after each update (the power iteration, or nothing)."""
    from flowforge.flows import MAF, NSF, Glow, RealNVP

    if name == "realnvp":
        return RealNVP((2,), num_steps=8, hidden=HIDDEN, actnorm=True), None
    if name == "glow":
        return Glow((2,), num_steps=8, hidden=HIDDEN), None
    if name == "nsf":
        return NSF((2,), num_steps=4, hidden=HIDDEN, bins=8, bound=5.0), None
    if name == "maf":
        return MAF((2,), num_layers=5, hidden=HIDDEN), None
    from flowforge.estimators import LogDetEstimator
    from flowforge.flows.resflow import ResidualFlow
    from flowforge.nn.lipschitz import update_lipschitz

    est = LogDetEstimator("roulette", n_exact_terms=2, dist="geometric", p=0.5, neumann_grad=True, mem_eff=mem_eff)
    flow = ResidualFlow((2,), estimator=est, num_blocks=10, hidden=[128] * 4, act="lipswish", coeff=0.9, actnorm=False)
    return flow, update_lipschitz


class Variant:
    def __init__(self, name: str, flow, after_step, compiled: bool, lr: float):
        self.name, self.flow, self.after_step, self.compiled = name, flow, after_step, compiled
        self.opt = torch.optim.Adam(flow.parameters(), lr=lr)

        def loss_fn(x):
            return -flow.log_prob(x).mean()

        self.loss_fn = torch.compile(loss_fn) if compiled else loss_fn
        self.times: list[float] = []

    def step(self, x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(x)
        loss.backward()
        self.opt.step()
        if self.after_step is not None:
            self.after_step(self.flow)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--mem-eff", action="store_true", help="residual toy: add backward-in-forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", action="store_true", help="let inductor reuse kernels compiled by earlier runs")
    parser.add_argument("--out", default=None, help="also write the Markdown report here")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if not args.cache:  # compile times from scratch, not from an earlier run's cached kernels
        torch._inductor.config.force_disable_caches = True
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from flowforge.flows import initialize

    gen = torch.Generator().manual_seed(args.seed)
    pool = [checkerboard(args.batch, gen) for _ in range(8)]
    variants: list[Variant] = []
    compile_s: dict[str, float] = {}
    graphs: dict[str, int] = {}
    params: dict[str, int] = {}
    counter = 0
    for name in args.models:
        # one model at a time, as in a training run: the models share code (Compose.forward, ...), and dynamo
        # keeps at most recompile_limit compiled versions of a function
        dynamo.reset()
        torch.manual_seed(args.seed)
        flow, after = build(name, args.mem_eff)
        flow.train()
        initialize(flow, pool[0])  # data-dependent init, eagerly, before anything is compiled
        if after is not None:
            after(flow)
        params[name] = sum(p.numel() for p in flow.parameters() if p.requires_grad)
        eager = Variant(name, flow, after, False, 1e-3)
        comp = Variant(name, copy.deepcopy(flow), after, True, 1e-3)
        before = counters["stats"]["unique_graphs"]
        compile_s[name] = comp.step(pool[0])  # the first call compiles (forward, and backward at .backward())
        for i in range(args.warmup):
            eager.step(pool[i % len(pool)])
            comp.step(pool[i % len(pool)])
        for r in range(args.rounds):  # the two variants take turns, the first one alternating by round
            for v in (eager, comp) if r % 2 == 0 else (comp, eager):
                for _ in range(args.steps):
                    v.times.append(v.step(pool[counter % len(pool)]))
                    counter += 1
        graphs[name] = counters["stats"]["unique_graphs"] - before
        variants += [eager, comp]
    recompile_limit = getattr(dynamo.config, "recompile_limit", None) or dynamo.config.cache_size_limit

    by = {(v.name, v.compiled): v for v in variants}
    lines = [
        f"# torch.compile vs eager, one training step ({datetime.date.today()})",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} thread(s), Python {sys.version.split()[0]}",
        f"- batch {args.batch} of 2-D checkerboard points; Adam lr 1e-3; compiled: torch.compile(loss_fn), inductor, "
        f"default mode; {args.warmup} warm-up steps each, then {args.rounds} rounds x {args.steps} steps, "
        "eager and compiled interleaved, order swapped every round; models one after the other",
        f"- residual toy: 10 blocks 2-128x4-2, roulette (2 exact terms + geometric(0.5)), Neumann gradients"
        f"{', backward-in-forward' if args.mem_eff else ''}, power iteration after each step; dynamo recompile "
        f"limit {recompile_limit}",
        "",
        "| model | params | eager ms | compiled ms | compiled / eager | compile s (first step) | graphs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.models:
        e = statistics.median(by[(name, False)].times) * 1e3
        c = statistics.median(by[(name, True)].times) * 1e3
        lines.append(
            f"| {TITLE[name]} | {params[name]:,} | {e:.2f} | {c:.2f} | {c / e:.2f} | {compile_s[name]:.1f} | "
            f"{graphs[name]} |"
        )
    spread = []
    for name in args.models:
        for compiled in (False, True):
            t = sorted(by[(name, compiled)].times)
            q1, q3 = t[len(t) // 4] * 1e3, t[(3 * len(t)) // 4] * 1e3
            spread.append(f"{TITLE[name]} {'compiled' if compiled else 'eager'} {q1:.2f}-{q3:.2f}")
    lines += ["", "Interquartile ranges (ms): " + "; ".join(spread) + "."]
    assert all(math.isfinite(t) for v in variants for t in v.times)
    if os.environ.get("FLOWFORGE_BENCH_DEBUG"):
        for v in variants:
            print(v.name, v.compiled, [round(t * 1e3, 1) for t in v.times])
    emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
