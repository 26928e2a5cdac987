#!/usr/bin/env python
"""CNF on the 2-D checkerboard: flowforge against zuko, and flow matching against maximum likelihood.

Part 1 (flowforge vs zuko 1.6, same run): a CNF whose velocity is an MLP with three hidden layers of
``--hidden`` units and ELU, exact divergence (2-D), adaptive Dormand-Prince with atol = rtol = ``--tol``, fixed
end time T = 1, standard normal base, Adam lr ``--lr``, batch ``--batch``.

- flowforge: ``FFJORD((2,), estimator={"name": "exact"}, hidden=..., act="elu", train_t1=False)``: torchdiffeq's
  dopri5, gradients by the adjoint ODE (``adjoint=True``, the default, whose step control ignores the
  parameter-gradient integrals: ``adjoint_seminorm=True``), the adjoint with the full norm
  (``adjoint_seminorm=False``), and backpropagation through the solver (``adjoint=False``).
Time enters every layer as an extra input.
- zuko: ``zuko.flows.CNF(2, hidden_features=..., activation=ELU, atol, rtol, exact=True)``: zuko's own adaptive
  solver with its adaptive-checkpoint adjoint; time enters the first layer as 3 sine/cosine frequencies.

Every model sees the same batches; the models take turns one step at a time (so machine noise hits them alike)
for ``--steps`` steps, each step timed.  Reported: parameters, median seconds per step, ratio to flowforge
(adjoint), and test NLL (nats, exact divergence, eval mode) on ``--n-test`` held-out points after the same
number of steps.  flowforge's rows also give the mean number of function evaluations per step (forward /
adjoint backward).

Part 2 (flowforge only): the same velocity network trained by conditional flow matching
(``objective=flow_matching``: one network evaluation per step, no ODE solve) and by maximum likelihood, each
for the same wall-clock budget (the time part 1's adjoint run took, or ``--budget`` seconds); test NLL through
the ODE every ``--eval-every`` seconds of training time (evaluation time not counted).  Reported: the training
time each needs to first reach the target NLL (``--target``; default: the NLL maximum likelihood reaches at
the end of its budget, plus 0.02).

Usage::

    python benchmarks/cnf_checkerboard.py                     # about 15 min on 2 idle cores
    python benchmarks/cnf_checkerboard.py --steps 50 --budget 30 --out /tmp/cnf.md   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)
from torch import nn

from flowforge.data.toy2d import sample_toy
from flowforge.flows.cnf import nfe_summary, reset_nfe
from flowforge.flows.ffjord import FFJORD
from flowforge.objectives.flow_matching import flow_matching_flow_loss


def ours(args, adjoint: bool, seminorm: bool = True) -> nn.Module:
    return FFJORD(
        (2,),
        estimator={"name": "exact"},
        hidden=[args.hidden] * 3,
        act="elu",
        atol=args.tol,
        rtol=args.tol,
        adjoint=adjoint,
        adjoint_seminorm=seminorm,
        train_t1=False,
    )


def theirs(args) -> nn.Module:
    import zuko

    return zuko.flows.CNF(
        2, hidden_features=[args.hidden] * 3, activation=nn.ELU, atol=args.tol, rtol=args.tol, exact=True
    )


def nll_fn(name: str):
    if name == "zuko":
        return lambda m, x: -m().log_prob(x)
    return lambda m, x: -m.log_prob(x)


def test_nll(model, name: str, x: torch.Tensor, chunk: int = 1000) -> float:
    model.eval()
    f = nll_fn(name)
    with torch.no_grad() if name == "zuko" else torch.enable_grad():
        total = sum(float(f(model, x[i : i + chunk]).detach().sum()) for i in range(0, len(x), chunk))
    model.train()
    return total / len(x)


def part1(args, train: torch.Tensor, test: torch.Tensor) -> tuple[list[str], float]:
    torch.manual_seed(args.seed)
    models = {
        "flowforge (adjoint)": ours(args, True),
        "flowforge (adjoint, full norm)": ours(args, True, False),
        "flowforge (backprop)": ours(args, False),
        "zuko": theirs(args),
    }
    opts = {k: torch.optim.Adam(m.parameters(), lr=args.lr) for k, m in models.items()}
    times = {k: [] for k in models}
    nfe = {k: [] for k in models}
    names = list(models)
    for step in range(args.steps):
        x = train[(step * args.batch) % len(train) :][: args.batch]
        order = names[step % len(names) :] + names[: step % len(names)]
        for k in order:
            m, opt = models[k], opts[k]
            reset_nfe(m)
            t0 = time.perf_counter()
            loss = nll_fn("zuko" if k == "zuko" else "ours")(m, x).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times[k].append(time.perf_counter() - t0)
            if k != "zuko":
                s = nfe_summary(m)
                nfe[k].append((s["nfe/forward"], s["nfe/backward"]))
    ref = statistics.median(times[names[0]])
    rows = [
        "| model | parameters | s / step (median) | ratio to flowforge (adjoint) | NFE fwd / bwd per step | "
        f"test NLL after {args.steps} steps |",
        "|---|---|---|---|---|---|",
    ]
    for k, m in models.items():
        med = statistics.median(times[k])
        n_par = sum(p.numel() for p in m.parameters() if p.requires_grad)
        fe = (
            f"{statistics.mean(a for a, _ in nfe[k]):.0f} / {statistics.mean(b for _, b in nfe[k]):.0f}"
            if nfe[k]
            else "n/a"
        )
        nll = test_nll(m, "zuko" if k == "zuko" else "ours", test)
        rows.append(f"| {k} | {n_par} | {med:.3f} | {med / ref:.2f} | {fe} | {nll:.3f} |")
    return rows, sum(times[names[0]])


def part2(args, train: torch.Tensor, test: torch.Tensor, budget: float) -> list[str]:
    curves = {}
    for objective in ("mle", "flow_matching"):
        torch.manual_seed(args.seed)
        m = ours(args, True)
        opt = torch.optim.Adam(m.parameters(), lr=args.lr)
        spent, next_eval, step, curve = 0.0, args.eval_every, 0, []
        while spent < budget:
            x = train[(step * args.batch) % len(train) :][: args.batch]
            t0 = time.perf_counter()
            loss = (-m.log_prob(x) if objective == "mle" else flow_matching_flow_loss(m, x)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            spent += time.perf_counter() - t0
            step += 1
            if spent >= next_eval or spent >= budget:
                curve.append((spent, step, test_nll(m, "ours", test)))
                next_eval += args.eval_every
        curves[objective] = curve
    target = args.target if args.target is not None else curves["mle"][-1][2] + 0.02
    rows = [
        f"Target test NLL: {target:.3f} nats; budget {budget:.0f} s of training each.",
        "",
        "| objective | steps in budget | final test NLL | best test NLL | training time to target | steps to target |",
        "|---|---|---|---|---|---|",
    ]
    for objective, curve in curves.items():
        hit = next(((s, n) for s, n, v in curve if v <= target), None)
        when = f"{hit[0]:.1f} s" if hit else "not reached"
        rows.append(
            f"| {objective} | {curve[-1][1]} | {curve[-1][2]:.3f} | {min(v for *_, v in curve):.3f} | "
            f"{when} | {hit[1] if hit else '-'} |"
        )
    rows += ["", "Test NLL by training time (s: nats):", ""]
    for objective, curve in curves.items():
        rows.append(f"- {objective}: " + ", ".join(f"{s:.0f}: {v:.3f}" for s, _, v in curve))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--budget", type=float, default=None, help="part 2 seconds per objective (default: part 1's)")
    ap.add_argument("--eval-every", type=float, default=15.0)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-part2", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train = sample_toy("checkerboard", 50_000, seed=1)
    test = sample_toy("checkerboard", args.n_test, seed=2)
    rows1, spent = part1(args, train, test)
    import zuko

    text = [
        f"## CNF on the 2-D checkerboard ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, zuko {zuko.__version__})",
        "",
        f"Velocity MLP 2-{args.hidden}-{args.hidden}-{args.hidden}-2 (ELU), exact divergence, dopri5 "
        f"atol = rtol = {args.tol:g}, batch {args.batch}, Adam lr {args.lr:g}, {args.steps} steps each.",
        "",
        *rows1,
    ]
    if not args.skip_part2:
        text += [
            "",
            "### Flow matching vs maximum likelihood (flowforge, same velocity network)",
            "",
            *part2(args, train, test, args.budget or spent),
        ]
    text.append("\ncommand: python " + " ".join(sys.argv))
    emit("\n".join(text) + "\n", args.out)


if __name__ == "__main__":
    main()
