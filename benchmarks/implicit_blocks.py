#!/usr/bin/env python
"""Residual, implicit and monotone blocks side by side, and Picard vs Anderson vs Broyden.

Part 1, per block type at equal width (one image block, input ``--shape`` 3x32x32 = CIFAR-10's first
scale, batch ``--batch``): every block uses the same contractive g, an i-DenseNet (depth 3, growth
``--growth``, CPila, coeff 0.98, concatenation weights 0.98; the implicit block has two of them), with
its weights scaled up so that every spectral normalisation is active (each layer at norm 0.98), then
power iteration to tolerance.  The log-det estimator is the same for all: 2 exact terms + geometric(0.5)
roulette, Neumann gradient.  Timed (median of ``--repeats``):
- forward: ``block(x)`` in training mode without grad (solve + log-det estimate);
- inverse: ``block.inverse(z)``;
- train step: forward with grad + ``backward`` of ``0.5 |z|^2 - log det`` (the implicit blocks solve
  their adjoint systems here).
Every solve runs to ``max |T(x) - x| <= --tol`` (default 1e-6, no relative part) with the given method
(Anderson memory 5, Broyden memory 30, no Picard fallback); iterations are the mean per sample.

Part 2, solver iterations at the paper's settings on trained models, each trained for ``--train-steps``
steps: the 1-D step-function fit (2 monotone blocks, i-DenseNet g depth 3 / growth 16 / CPila, coeff 0.99,
regression, Adam 0.01, batch 5000) and the 2-D checkerboard density (10 blocks, coeff 0.98, exact 2x2
log-det, Adam 1e-3, batch 500); then every block's forward and inverse are solved on 2000 points with
each method to the same tolerance.  Training drives Lip(g) up, which is
where Picard slows down; at initialisation the random dense g is a weak contraction and every method
needs a handful of iterations.  Target: the accelerated solver needs <= 1/3 of Picard's
iterations on the monotone forward.

Usage::

    python benchmarks/implicit_blocks.py                       # ~6 min on 2 idle cores (growth 64)
    python benchmarks/implicit_blocks.py --growth 172 --batch 4 --out implicit.md    # paper width
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time

import torch
from _report import emit  # benchmarks/_report.py
from torch import nn

from flowforge.data.toy2d import sample_toy
from flowforge.estimators import LogDetEstimator
from flowforge.flows.impflow import ImplicitBlock
from flowforge.flows.monotone import MonotoneBlock, MonotoneFlow
from flowforge.flows.residual import ResidualBlock
from flowforge.nn.densenet import dense_convnet
from flowforge.nn.lipschitz import update_lipschitz

METHODS = ("picard", "anderson", "broyden")


def solver(method: str, tol: float, max_iters: int) -> dict:
    """``method`` is picard, anderson, broyden (memory 5 / 30) or ``name:memory``, e.g. ``anderson:2``."""
    name, _, memory = method.partition(":")
    memory = int(memory) if memory else (5 if name == "anderson" else 30)
    return dict(method=name, atol=tol, rtol=0.0, max_iters=max_iters, memory=memory, fallback_iters=0)


def paper_g(shape, growth: int) -> nn.Module:
    g = dense_convnet(shape, depth=3, growth=growth, act="cpila", coeff=0.98, lip_coeff=0.98)
    with torch.no_grad():
        for p in g.parameters():
            if p.dim() > 1:
                p.mul_(10.0)  # every spectral normalisation active: each layer at norm coeff
    update_lipschitz(g, rtol=1e-6, max_iters=2000)
    return g


def make_block(kind: str, g1: nn.Module, g2: nn.Module, method: str, tol: float, max_iters: int) -> nn.Module:
    est = LogDetEstimator("roulette", n_exact_terms=2, neumann_grad=True)
    s = solver(method, tol, max_iters)
    back = dict(method="anderson", atol=1e-8, rtol=1e-6, max_iters=200)
    if kind == "residual":
        return ResidualBlock(g1, est, inverse_solver=s, backward_solver=back)
    if kind == "implicit":
        return ImplicitBlock(g1, g2, est, forward_solver=s, inverse_solver=s, backward_solver=back)
    return MonotoneBlock(g1, est, forward_solver=s, inverse_solver=s, backward_solver=back)


def solve_stats(block: nn.Module, kind: str):
    """The block's last solve of ``kind`` (forward / inverse), or None (a residual block's forward)."""
    if isinstance(block, ImplicitBlock):
        part = block.residual_z if kind == "forward" else block.residual_x
        return part.solves.get("inverse")
    if isinstance(block, ResidualBlock):
        return block.solves.get("inverse") if kind == "inverse" else None
    return block.solves.get(kind)


def iterations(block: nn.Module, kind: str) -> float:
    """Mean iterations per sample of the block's last solve of ``kind``."""
    stats = solve_stats(block, kind)
    return float("nan") if stats is None else float(stats.iterations.float().mean())


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def part1(args) -> list[str]:
    torch.manual_seed(0)
    shape = tuple(args.shape)
    g1, g2 = paper_g(shape, args.growth), paper_g(shape, args.growth)
    x = torch.randn(args.batch, *shape)
    rows = [
        "| block | solver | forward (s) | inverse (s) | train step (s) | forward iters | inverse iters |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("residual", "implicit", "monotone"):
        for method in METHODS:
            block = make_block(kind, g1, g2, method, args.tol, args.max_iters)
            block.train()
            with torch.no_grad():
                z = block(x)[0]

            def fwd(block=block):
                with torch.no_grad():
                    block(x)

            def inv(block=block, z=z):
                block.inverse(z)

            def step(block=block):
                zz, ld = block(x)
                (0.5 * zz.pow(2).sum() - ld.sum()).backward()

            t_f = timed(fwd, args.repeats)
            it_f = iterations(block, "forward")
            t_i = timed(inv, args.repeats)
            it_i = iterations(block, "inverse")
            t_s = timed(step, args.repeats)
            f_it = "-" if math.isnan(it_f) else f"{it_f:.1f}"
            rows.append(f"| {kind} | {method} | {t_f:.3f} | {t_i:.3f} | {t_s:.3f} | {f_it} | {it_i:.1f} |")
            print(rows[-1], flush=True)
    return rows


def train_toy(args):
    """The 2-D toy recipe (experiment=monotone_toy): maximum likelihood on the checkerboard."""
    flow = MonotoneFlow(
        (2,),
        estimator=LogDetEstimator("exact"),
        num_blocks=10,
        g="dense",
        act="cpila",
        depth=3,
        growth=16,
        coeff=0.98,
        lip_coeff=0.98,
        actnorm=False,
        forward_solver=solver("anderson", args.tol, 2000),
        inverse_solver=solver("anderson", args.tol, 2000),
    )
    data = sample_toy("checkerboard", 500 * max(args.train_steps, 1), seed=0)

    def loss(i):
        return -flow.log_prob(data[500 * i : 500 * (i + 1)]).mean()

    x_test = sample_toy("checkerboard", 2000, seed=1)
    return flow, loss, 1e-3, x_test, lambda: f"test NLL {float(-flow.log_prob(x_test).mean()):.3f} nats"


def train_fit1d(args):
    """The 1-D fitting recipe (experiment=fit1d_monotone): 2 blocks regressed onto the step function."""
    from flowforge.data.toy2d import step_function

    flow = MonotoneFlow(
        (1,),
        estimator=LogDetEstimator("exact"),
        num_blocks=2,
        g="dense",
        act="cpila",
        depth=3,
        growth=16,
        coeff=0.99,
        lip_coeff=0.98,
        actnorm=False,
        forward_solver=solver("anderson", args.tol, 2000),
        inverse_solver=solver("anderson", args.tol, 2000),
    )
    gen = torch.Generator().manual_seed(0)

    def loss(i):
        x = torch.rand(5000, 1, generator=gen) * 4 - 2
        return (flow(x)[0] - step_function(x)).pow(2).mean()

    x_test = torch.linspace(-2, 2, 2000)[:, None]
    return (
        flow,
        loss,
        1e-2,
        x_test,
        lambda: f"test MSE {float((flow(x_test)[0] - step_function(x_test)).pow(2).mean()):.4f}",
    )


def part2(args, recipe) -> list[str]:
    torch.manual_seed(0)
    flow, loss_fn, lr, x_test, score = recipe(args)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    t0 = time.perf_counter()
    for i in range(args.train_steps):
        loss = loss_fn(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_lipschitz(flow)
    train_time = time.perf_counter() - t0
    flow.eval()
    update_lipschitz(flow, rtol=1e-6, max_iters=2000)
    with torch.no_grad():
        quality = score()
    blocks = [m for m in flow.modules() if isinstance(m, MonotoneBlock)]
    inputs, h = [], x_test
    with torch.no_grad():
        for b in blocks:  # each block's own input distribution
            inputs.append(h)
            h = b(h)[0]
    outputs = [b(xi)[0].detach() for b, xi in zip(blocks, inputs)]
    rows = [
        f"Trained {args.train_steps} steps in {train_time:.0f} s; {quality} (2000 points). Iterations per "
        f"sample: the median over samples of each block's solve, averaged over the {len(blocks)} blocks (worst "
        "block in brackets); unconverged samples hit the cap of 20000.",
        "",
        "| solver | forward iters, median | forward unconverged | inverse iters, median | forward / Picard |",
        "|---|---|---|---|---|",
    ]
    picard = None
    for method in args.methods:
        fw, inv, failed = [], [], 0
        for b, xi, yi in zip(blocks, inputs, outputs):
            b.forward_solver = b.inverse_solver = type(b.forward_solver)(**solver(method, args.tol, 20000))
            with torch.no_grad():
                b(xi)
                st = solve_stats(b, "forward")
                fw.append(float(st.iterations.float().median()))
                failed += st.num_failed
                b.inverse(yi)
                inv.append(float(solve_stats(b, "inverse").iterations.float().median()))
        med = statistics.mean(fw)
        picard = picard or med
        rows.append(
            f"| {method} | {med:.1f} ({max(fw):.0f}) | {failed} of {len(blocks) * len(x_test)} | "
            f"{statistics.mean(inv):.1f} ({max(inv):.0f}) | {med / picard:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    p.add_argument("--growth", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-blocks", action="store_true")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["picard", "anderson:2", "anderson", "broyden"],
        help="part 2: solvers to compare (name or name:memory); the first is the reference",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    head = [
        f"# Residual / implicit / monotone blocks and fixed-point solvers ({datetime.date.today()})",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"tolerance max|T(x) - x| <= {args.tol}",
        "",
    ]
    body = []
    if not args.skip_blocks:
        body += (
            [
                f"## Blocks at equal width: input {tuple(args.shape)}, batch {args.batch}, i-DenseNet g growth "
                f"{args.growth} (weights at their spectral bounds)",
                "",
            ]
            + part1(args)
            + [""]
        )
    body += [
        "## Solver iterations on trained Monotone Flows at the paper's settings",
        "",
        "### 1-D step-function fit (2 blocks, coeff 0.99, lr 0.01, batch 5000)",
        "",
    ] + part2(args, train_fit1d)
    body += ["", "### 2-D checkerboard (10 blocks, coeff 0.98, lr 1e-3, batch 500)", ""] + part2(args, train_toy)
    emit("\n".join(head + body) + "\n", args.out)


if __name__ == "__main__":
    main()
