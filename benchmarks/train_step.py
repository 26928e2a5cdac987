#!/usr/bin/env python
"""Time one training step and a large log_prob of flowforge flows against zuko, nflows and normflows.

One step = ``loss = -log_prob(x).mean(); loss.backward(); Adam.step()`` on a batch of each size in
``--batch`` (default 500 and 4096); the log_prob part evaluates ``log_prob`` on ``--logprob-points``
points (default 100,000) without gradients.  Data: 2-D checkerboard (default) or ``--data digits``
(scikit-learn's 8x8 digits flattened to 64-D, dequantised and scaled to [0, 1]).  Four families with
matched sizes (same number of coupling / autoregressive layers, same hidden widths, same bins;
parameter counts are printed so the match is visible):

* RealNVP - 8 affine couplings, MLP conditioners [64, 64], ActNorm per step (zuko has no ActNorm).
* MAF     - 5 MADE layers [64, 64] with alternating orders.
* NSF     - 4 rational-quadratic spline layers, 8 bins, bound 5, MLP [64, 64]; flowforge, nflows and
            normflows use the Glow-style step ActNorm -> LU linear -> spline coupling; zuko's NSF is
            autoregressive (with D = 2 that is a coupling whose first coordinate gets an
            unconditional spline) and has no ActNorm / LU mixing.
* Glow    - 8 steps ActNorm -> LU linear -> affine coupling with sigmoid scale (zuko has no Glow).
* RealNVP-bare / NSF-bare - the same without ActNorm (and LU), i.e. structure-matched to zuko.

Timing: ``torch.set_num_threads`` is left at its default (unless ``--threads``); each model gets ``--warmup`` steps,
then the
models are timed round-robin (``--rounds`` rounds of ``--steps`` steps each, switching model after every
``--block`` steps, the model order rotated each round) so machine noise hits all of them alike; every
step is timed separately and the median per-step time is reported.  On a machine shared with other
jobs, ``--threads 1 --clock cpu`` (CPU time of the main thread) gives much tighter numbers.
Ratios are ``flowforge / fastest peer that has the family`` (target <= 1).

Usage::

    python benchmarks/train_step.py                       # everything, ~3 min on 2 cores
    python benchmarks/train_step.py --data digits         # the same on 64-D data
    python benchmarks/train_step.py --families nsf glow --rounds 3 --steps 10 --out bench.md
    python benchmarks/train_step.py --threads 1 --clock cpu  # noise-robust variant for a busy machine
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

# The four families of the comparison, plus two structure-matched variants: zuko's RealNVP has no ActNorm
# and zuko's NSF has no ActNorm / LU mixing, so ``*-bare`` drops those layers in flowforge and normflows
# too (flowforge's NSF() always adds them, so its bare variant is built from coupling_stack directly).
FAMILIES = ("realnvp", "maf", "nsf", "glow", "realnvp-bare", "nsf-bare")
LIBS = ("flowforge", "zuko", "nflows", "normflows")
FAMILY_TITLE = {
    "realnvp": "RealNVP",
    "maf": "MAF",
    "nsf": "NSF",
    "glow": "Glow",
    "realnvp-bare": "RealNVP, no ActNorm (matched to zuko)",
    "nsf-bare": "NSF, no ActNorm/LU (matched to zuko)",
}

# Matched sizes.
HIDDEN = [64, 64]
REALNVP_STEPS = 8
MAF_LAYERS = 5
NSF_STEPS = 4
NSF_BINS = 8
NSF_BOUND = 5.0
GLOW_STEPS = 8


# --------------------------------------------------------------------------------------------------
# Model builders: each returns (module holding every trainable parameter, x -> per-sample log p(x), note)
# --------------------------------------------------------------------------------------------------

LogProb = Callable[[Tensor], Tensor]


class ContextFree(nn.Module):
    """A network with the ``(inputs, context)`` signature that the peers' couplings call."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor, context=None) -> Tensor:
        return self.net(inputs)


def build_flowforge(family: str, dim: int) -> tuple[nn.Module, LogProb, str]:
    from flowforge.flows import MAF, NSF, Glow, RealNVP

    if family in ("realnvp", "realnvp-bare"):
        actnorm = family == "realnvp"
        m = RealNVP((dim,), num_steps=REALNVP_STEPS, hidden=HIDDEN, actnorm=actnorm)
        note = ("ActNorm + " if actnorm else "") + "affine coupling (tanh-clamped scale)"
    elif family == "maf":
        m = MAF((dim,), num_layers=MAF_LAYERS, hidden=HIDDEN)
        note = "MADE affine"
    elif family == "nsf":
        m = NSF((dim,), num_steps=NSF_STEPS, hidden=HIDDEN, bins=NSF_BINS, bound=NSF_BOUND)
        note = "ActNorm + LU + RQ-spline coupling"
    elif family == "nsf-bare":
        from flowforge.flows.architectures import coupling_stack
        from flowforge.flows.model import build_flow
        from flowforge.flows.spline import RationalQuadraticSpline

        spline = RationalQuadraticSpline(bins=NSF_BINS, bound=NSF_BOUND)
        m = build_flow((dim,), coupling_stack((dim,), spline, NSF_STEPS, HIDDEN, actnorm=False, lu=False))
        note = "RQ-spline coupling (coupling_stack, no ActNorm/LU)"
    elif family == "glow":
        m = Glow((dim,), num_steps=GLOW_STEPS, hidden=HIDDEN)
        note = "ActNorm + LU + affine coupling (sigmoid scale)"
    else:
        raise ValueError(family)
    return m, m.log_prob, note


def build_zuko(family: str, dim: int) -> tuple[nn.Module, LogProb, str] | None:
    import zuko

    if family in ("realnvp", "realnvp-bare"):
        m = zuko.flows.RealNVP(features=dim, transforms=REALNVP_STEPS, hidden_features=tuple(HIDDEN))
        note = "affine coupling, no ActNorm"
    elif family == "maf":
        m = zuko.flows.MAF(dim, transforms=MAF_LAYERS, hidden_features=tuple(HIDDEN))
        note = "MADE affine"
    elif family in ("nsf", "nsf-bare"):
        m = zuko.flows.NSF(dim, bins=NSF_BINS, transforms=NSF_STEPS, hidden_features=tuple(HIDDEN))
        note = "**autoregressive** RQ spline (no ActNorm/LU)"
    else:
        return None  # zuko has no Glow
    return m, (lambda x: m().log_prob(x)), note


def build_normflows(family: str, dim: int) -> tuple[nn.Module, LogProb, str]:
    import normflows as nf
    from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling

    def NSFNet(in_features: int, out_features: int) -> nn.Module:
        return ContextFree(nf.nets.MLP([in_features, *HIDDEN, out_features], init_zeros=True))

    half = dim // 2
    flows: list = []  # listed in the data -> base (density) direction, reversed below
    if family in ("realnvp", "realnvp-bare"):
        for _ in range(REALNVP_STEPS):
            flows += [nf.flows.ActNorm((dim,))] if family == "realnvp" else []
            flows += [
                nf.flows.AffineCouplingBlock(nf.nets.MLP([half, *HIDDEN, 2 * (dim - half)], init_zeros=True)),
                nf.flows.Permute(dim, mode="swap"),
            ]
        note = ("ActNorm + " if family == "realnvp" else "") + "AffineCouplingBlock + swap"
    elif family == "maf":
        for i in range(MAF_LAYERS):
            if i:
                flows.append(nf.flows.Permute(dim, mode="swap"))
            made = nf.flows.MaskedAffineAutoregressive(
                dim, HIDDEN[0], num_blocks=len(HIDDEN) - 1, use_residual_blocks=False
            )
            # normflows' log_prob runs each layer's ``inverse``; for MaskedAffineAutoregressive that is
            # the D-pass direction.  Reverse() puts the one-pass MADE direction on the density side,
            # i.e. a true MAF (and the fastest way to use normflows here).
            flows.append(nf.flows.Reverse(made))
        note = "Reverse(MaskedAffineAutoregressive) + swap"
    elif family in ("nsf", "nsf-bare"):
        for i in range(NSF_STEPS):
            mask = (torch.arange(dim) % 2 == (i + 1) % 2).int()  # transformed features: mask > 0
            coupling = PiecewiseRationalQuadraticCoupling(
                mask=mask,
                transform_net_create_fn=NSFNet,
                num_bins=NSF_BINS,
                tails="linear",
                tail_bound=NSF_BOUND,
                apply_unconditional_transform=False,
            )
            # The coupling's ``forward`` is the data -> base direction; normflows' log_prob calls
            # ``inverse``, so wrap it (CoupledRationalQuadraticSpline does the same swap internally).
            if family == "nsf":
                flows += [nf.flows.ActNorm((dim,)), nf.flows.InvertibleAffine(dim, use_lu=True)]
            flows.append(nf.flows.Reverse(coupling))
        note = ("ActNorm + InvertibleAffine(LU) + " if family == "nsf" else "") + "RQ-spline coupling"
    elif family == "glow":
        for _ in range(GLOW_STEPS):
            flows += [
                nf.flows.ActNorm((dim,)),
                nf.flows.InvertibleAffine(dim, use_lu=True),
                nf.flows.AffineCouplingBlock(
                    nf.nets.MLP([half, *HIDDEN, 2 * (dim - half)], init_zeros=True), scale_map="sigmoid"
                ),
                nf.flows.Permute(dim, mode="swap"),
            ]
        note = "ActNorm + InvertibleAffine(LU) + sigmoid coupling + swap"
    else:
        raise ValueError(family)
    model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(dim, trainable=False), flows=flows[::-1])
    return model, model.log_prob, note


def build_nflows(family: str, dim: int) -> tuple[nn.Module, LogProb, str]:
    from nflows import distributions, flows, transforms
    from nflows.nn.nets import MLP

    def net(in_features: int, out_features: int) -> nn.Module:
        return ContextFree(MLP((in_features,), (out_features,), HIDDEN))

    def mask(i: int) -> Tensor:
        return (torch.arange(dim) % 2 == (i + 1) % 2).int()  # transformed features: mask > 0

    layers: list = []  # data -> base direction, as nflows composes
    if family in ("realnvp", "realnvp-bare"):
        for i in range(REALNVP_STEPS):
            layers += [transforms.ActNorm(dim)] if family == "realnvp" else []
            layers.append(transforms.AffineCouplingTransform(mask(i), net))
        note = ("ActNorm + " if family == "realnvp" else "") + "AffineCouplingTransform (sigmoid scale)"
    elif family == "maf":
        for i in range(MAF_LAYERS):
            if i:
                layers.append(transforms.ReversePermutation(dim))
            layers.append(
                transforms.MaskedAffineAutoregressiveTransform(
                    dim, HIDDEN[0], num_blocks=len(HIDDEN) - 1, use_residual_blocks=False
                )
            )
        note = "MaskedAffineAutoregressiveTransform + reverse"
    elif family in ("nsf", "nsf-bare"):
        for i in range(NSF_STEPS):
            if family == "nsf":
                layers += [transforms.ActNorm(dim), transforms.LULinear(dim, identity_init=True)]
            layers.append(
                transforms.PiecewiseRationalQuadraticCouplingTransform(
                    mask(i), net, num_bins=NSF_BINS, tails="linear", tail_bound=NSF_BOUND
                )
            )
        note = ("ActNorm + LULinear + " if family == "nsf" else "") + "RQ-spline coupling"
    elif family == "glow":
        for i in range(GLOW_STEPS):
            layers += [
                transforms.ActNorm(dim),
                transforms.LULinear(dim, identity_init=True),
                transforms.AffineCouplingTransform(mask(i), net),
            ]
        note = "ActNorm + LULinear + AffineCouplingTransform (sigmoid scale)"
    else:
        raise ValueError(family)
    model = flows.Flow(transforms.CompositeTransform(layers), distributions.StandardNormal([dim]))
    return model, model.log_prob, note


BUILDERS = {"flowforge": build_flowforge, "zuko": build_zuko, "nflows": build_nflows, "normflows": build_normflows}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    family: str
    lib: str
    model: nn.Module
    log_prob: LogProb
    note: str
    opt: torch.optim.Optimizer
    params: int
    times: dict = field(default_factory=dict)  # phase ("batch 500", "log_prob") -> seconds per call
    last_loss: float = float("nan")
    test_nll: float = float("nan")

    def step(self, x: Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = -self.log_prob(x).mean()
        loss.backward()
        self.opt.step()
        return loss.item()

    def evaluate(self, x: Tensor) -> float:
        with torch.no_grad():
            return -self.log_prob(x).mean().item()

    def median_ms(self, phase: str) -> float:
        return 1e3 * statistics.median(self.times[phase])

    def quartiles_ms(self, phase: str) -> tuple[float, float]:
        t = self.times[phase]
        if len(t) < 4:
            return self.median_ms(phase), self.median_ms(phase)
        q = statistics.quantiles(t, n=4)
        return 1e3 * q[0], 1e3 * q[2]


def build_entries(families, libs, lr: float, seed: int, dim: int) -> list[Entry]:
    entries = []
    for family in families:
        for lib in libs:
            torch.manual_seed(seed)
            built = BUILDERS[lib](family, dim)
            if built is None:
                continue
            model, log_prob, note = built
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
            entries.append(Entry(family, lib, model, log_prob, note, opt, params))
    return entries


def load_points(data: str, n: int, seed: int) -> Tensor:
    """``n`` points of the benchmark data (drawn with replacement from digits' 1,797 images)."""
    if data == "checkerboard":
        from flowforge.data.toy2d import sample_toy

        return sample_toy("checkerboard", n, seed=seed)
    from sklearn.datasets import load_digits

    pixels = torch.from_numpy(load_digits().data).float()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(pixels), (n,), generator=g)
    return (pixels[pick] + torch.rand(n, pixels.shape[1], generator=g)) / 17.0


def make_batches(data: str, batch: int, n_batches: int, seed: int) -> list[Tensor]:
    return [b.contiguous() for b in load_points(data, batch * n_batches, seed).split(batch)]


def timed_rounds(entries: list[Entry], phase: str, call, rounds: int, steps: int, block: int, clock) -> None:
    """Round-robin: every model makes ``block`` calls in turn, the model order rotating each round, so a
    burst of machine load hits all models alike; every call is timed separately."""
    n = len(entries)
    for r in range(rounds):
        order = entries[r % n :] + entries[: r % n]
        for start in range(0, steps, block):
            for e in order:
                for _ in range(min(block, steps - start)):
                    t0 = clock()
                    call(e)
                    e.times.setdefault(phase, []).append(clock() - t0)


def run_steps(entries, batches, phase: str, warmup: int, rounds: int, steps: int, block: int, clock) -> None:
    k = [0]

    def step(e: Entry) -> None:
        e.last_loss = e.step(batches[k[0] % len(batches)])
        k[0] += 1

    for e in entries:
        for _ in range(warmup):
            step(e)
        with torch.no_grad():
            lp = e.log_prob(batches[0])
        if lp.shape != (batches[0].shape[0],):
            raise RuntimeError(f"{e.lib} {e.family}: log_prob shape {tuple(lp.shape)}, expected per-sample")
        if not math.isfinite(e.last_loss):
            print(f"WARNING: {e.lib} {e.family}: non-finite loss after warm-up", file=sys.stderr)
    timed_rounds(entries, phase, step, rounds, steps, block, clock)


def run_log_prob(entries, points: Tensor, rounds: int, clock) -> None:
    for e in entries:
        e.model.eval()
        e.evaluate(points[:1000])  # warm-up
    timed_rounds(entries, "log_prob", lambda e: e.evaluate(points), rounds, 3, 1, clock)
    for e in entries:
        e.model.train()


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def ratio_cell(entries: dict, family: str, libs: list, phase: str) -> str:
    ff = entries.get((family, "flowforge"))
    peers = [entries[(family, l)] for l in libs if l != "flowforge" and (family, l) in entries]
    if ff is None or not peers or phase not in ff.times:
        return "—"
    best = min(peers, key=lambda e: e.median_ms(phase))
    ratio = ff.median_ms(phase) / best.median_ms(phase)
    return f"**{ratio:.2f}** vs {best.lib} ({'OK' if ratio <= 1.0 else 'SLOWER'})"


def report(entries: list[Entry], args, wall: float) -> str:
    import importlib.metadata as md

    by = {(e.family, e.lib): e for e in entries}
    families = [f for f in args.families if any(e.family == f for e in entries)]
    libs = [l for l in LIBS if l in args.libs]
    phases = [f"batch {b}" for b in args.batch] + (["log_prob"] if args.logprob_points else [])
    versions = ", ".join(f"{l} {md.version(l)}" for l in libs if l != "flowforge")
    lines = [
        f"# flowforge training-step benchmark ({args.data}, D = {args.dim})",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()} "
        f"({'default' if args.threads is None else 'set by --threads'}), clock {args.clock}, "
        f"{versions}, python {platform.python_version()}, {platform.machine()} {os.cpu_count()} CPUs",
        f"- step = -log_prob(x).mean() + backward + Adam at batch {' and '.join(map(str, args.batch))}; "
        f"warm-up {args.warmup} steps; {args.rounds} round-robin rounds x {args.steps} steps (switching model "
        f"every {args.block} step(s)); log_prob = no-grad log_prob of {args.logprob_points:,} points in eval "
        f"mode, {args.rounds} rounds x 3 calls; median ms (IQR in the second table)",
        f"- sizes: RealNVP {REALNVP_STEPS} couplings, MAF {MAF_LAYERS} MADE layers, NSF {NSF_STEPS} spline "
        f"layers x {NSF_BINS} bins (bound {NSF_BOUND:g}), Glow {GLOW_STEPS} steps; hidden {HIDDEN} everywhere",
        "",
    ]
    for phase in phases:
        lines += [f"## {phase}", ""]
        head = "| Family | " + " | ".join(f"{l} ms" for l in libs) + " | flowforge / fastest peer |"
        lines += [head, "|" + "---|" * (len(libs) + 2)]
        for f in families:
            row = [FAMILY_TITLE[f]]
            row += [f"{by[(f, l)].median_ms(phase):.2f}" if (f, l) in by else "—" for l in libs]
            row.append(ratio_cell(by, f, libs, phase))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "| Family | Library | structure | params | " + " | ".join(f"{p} IQR ms" for p in phases) + " | test NLL |",
        "|" + "---|" * (5 + len(phases)),
    ]
    for f in families:
        for l in libs:
            e = by.get((f, l))
            if e is None:
                if f == "glow" and l == "zuko":
                    lines.append(f"| {FAMILY_TITLE[f]} | zuko | no Glow in zuko | — |" + " — |" * (len(phases) + 1))
                continue
            iqr = ["{:.2f}–{:.2f}".format(*e.quartiles_ms(p)) for p in phases]
            lines.append(
                f"| {FAMILY_TITLE[f]} | {l} | {e.note} | {e.params:,} | " + " | ".join(iqr) + f" | {e.test_nll:.3f} |"
            )
    lines += [
        "",
        "Notes: zuko's NSF is autoregressive (for D = 2 equivalent to a coupling whose first coordinate also "
        "gets an unconditional spline) and has no ActNorm/LU mixing; zuko's RealNVP has no ActNorm; zuko has no "
        "Glow. nflows' affine couplings use its sigmoid scale and its LULinear starts at the identity. "
        "normflows' MAF layers are wrapped in `Reverse` so that log_prob uses the one-pass MADE direction. "
        "Every library's coupling conditioners read the kept half and emit parameters for the transformed half "
        "only. The test NLL (nats, on held-out points after all timed steps, every model trained on the same "
        "batches) shows that the models being timed do train; it is not a tuned comparison.",
        "",
        f"Benchmark wall time: {wall:.1f} s",
    ]
    return "\n".join(lines) + "\n"


def parse_families(values) -> list[str]:
    out = []
    for v in values:
        for f in v.replace(",", " ").split():
            f = f.lower()
            if f not in FAMILIES:
                raise SystemExit(f"unknown family '{f}'; choose from {', '.join(FAMILIES)}")
            if f not in out:
                out.append(f)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per model per round (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (default 5)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps per model (default 10)")
    p.add_argument(
        "--block", type=int, default=1, help="consecutive steps of one model before switching to the next (default 1)"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[500, 4096], help="batch sizes (default 500 4096)")
    p.add_argument(
        "--logprob-points",
        type=int,
        default=100_000,
        help="points for the no-grad log_prob timing (default 100000; 0 skips it)",
    )
    p.add_argument(
        "--data",
        choices=("checkerboard", "digits"),
        default="checkerboard",
        help="2-D checkerboard (default) or 64-D flattened digits",
    )
    p.add_argument(
        "--families", nargs="+", default=list(FAMILIES), help="subset of " + " ".join(FAMILIES) + " (default: all)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads(N); default: leave torch's default alone"
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (perf_counter, default) or cpu (CPU time of the main thread: stable on a loaded "
        "machine, but only meaningful with --threads 1)",
    )
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS, help="subset of libraries")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown report to this path")
    args = p.parse_args(argv)
    args.families = parse_families(args.families)
    args.dim = 2 if args.data == "checkerboard" else 64
    # normflows' LU init (torch.lu deprecation) and spline init emit harmless UserWarnings
    warnings.filterwarnings("ignore", category=UserWarning)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        print("WARNING: --clock cpu only counts the main thread; use it with --threads 1", file=sys.stderr)
    t0 = time.perf_counter()
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        flush=True,
    )
    entries = build_entries(args.families, args.libs, args.lr, args.seed, args.dim)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    for b in args.batch:
        batches = make_batches(args.data, b, 16, args.seed)
        run_steps(entries, batches, f"batch {b}", args.warmup, args.rounds, args.steps, args.block, clock)
        print(f"batch {b} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    held_out = load_points(args.data, max(args.logprob_points, 5000), args.seed + 1)
    if args.logprob_points:
        run_log_prob(entries, held_out[: args.logprob_points], args.rounds, clock)
    for e in entries:
        e.model.eval()
        e.test_nll = e.evaluate(held_out[:5000])
    text = report(entries, args, time.perf_counter() - t0)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
