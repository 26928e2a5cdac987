#!/usr/bin/env python
"""Time one training step of flowforge flows against zuko and normflows on 2-D checkerboard data.

One step = ``loss = -log_prob(x).mean(); loss.backward(); Adam.step()`` on a batch of ``--batch``
points (default 500).  Four families with matched sizes (same number of coupling / autoregressive
layers, same hidden widths, same bins; parameter counts are printed so the match is visible):

* RealNVP - 8 affine couplings, MLP conditioners [64, 64], ActNorm per step (zuko has no ActNorm).
* MAF     - 5 MADE layers [64, 64] with alternating orders.
* NSF     - 4 rational-quadratic spline layers, 8 bins, bound 5, MLP [64, 64]; flowforge and
            normflows use the Glow-style step ActNorm -> LU linear -> spline coupling; zuko's NSF is
            autoregressive (with D = 2 that is a coupling whose first coordinate gets an
            unconditional spline) and has no ActNorm / LU mixing.
* Glow    - 8 steps ActNorm -> LU linear -> affine coupling with sigmoid scale (zuko has no Glow).
* RealNVP-bare / NSF-bare - the same without ActNorm (and LU), i.e. structure-matched to zuko.

Timing: ``torch.set_num_threads`` is left at its default (unless ``--threads``); each model gets ``--warmup`` steps, then the
models are timed round-robin (``--rounds`` rounds of ``--steps`` steps each, switching model after every
``--block`` steps, the model order rotated each round) so machine noise hits all of them alike; every
step is timed separately and the median per-step time is reported.  On a machine shared with other
jobs, ``--threads 1 --clock cpu`` (CPU time of the main thread) gives much tighter numbers.  Ratios are ``flowforge / fastest peer that has the family`` (target <= 1).

Usage::

    python benchmarks/train_step.py                       # everything, ~1.5 min on 2 cores
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
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)

# The four families of the comparison, plus two structure-matched variants: zuko's RealNVP has no ActNorm
# and zuko's NSF has no ActNorm / LU mixing, so ``*-bare`` drops those layers in flowforge and normflows
# too (flowforge's NSF() always adds them, so its bare variant is built from coupling_stack directly).
FAMILIES = ("realnvp", "maf", "nsf", "glow", "realnvp-bare", "nsf-bare")
LIBS = ("flowforge", "zuko", "normflows")
FAMILY_TITLE = {
    "realnvp": "RealNVP", "maf": "MAF", "nsf": "NSF", "glow": "Glow",
    "realnvp-bare": "RealNVP, no ActNorm (matched to zuko)", "nsf-bare": "NSF, no ActNorm/LU (matched to zuko)",
}

# Matched sizes.
HIDDEN = [64, 64]
REALNVP_STEPS = 8
MAF_LAYERS = 5
NSF_STEPS = 4
NSF_BINS = 8
NSF_BOUND = 5.0
GLOW_STEPS = 8
DIM = 2


# --------------------------------------------------------------------------------------------------
# Model builders: each returns (module holding every trainable parameter, x -> per-sample log p(x), note)
# --------------------------------------------------------------------------------------------------

LogProb = Callable[[Tensor], Tensor]


def build_flowforge(family: str) -> tuple[nn.Module, LogProb, str]:
    from flowforge.flows import MAF, NSF, Glow, RealNVP

    if family in ("realnvp", "realnvp-bare"):
        actnorm = family == "realnvp"
        m = RealNVP((DIM,), num_steps=REALNVP_STEPS, hidden=HIDDEN, actnorm=actnorm)
        note = ("ActNorm + " if actnorm else "") + "affine coupling (tanh-clamped scale)"
    elif family == "maf":
        m = MAF((DIM,), num_layers=MAF_LAYERS, hidden=HIDDEN)
        note = "MADE affine"
    elif family == "nsf":
        m = NSF((DIM,), num_steps=NSF_STEPS, hidden=HIDDEN, bins=NSF_BINS, bound=NSF_BOUND)
        note = "ActNorm + LU + RQ-spline coupling"
    elif family == "nsf-bare":
        from flowforge.flows.architectures import coupling_stack
        from flowforge.flows.model import build_flow
        from flowforge.flows.spline import RationalQuadraticSpline

        spline = RationalQuadraticSpline(bins=NSF_BINS, bound=NSF_BOUND)
        m = build_flow((DIM,), coupling_stack((DIM,), spline, NSF_STEPS, HIDDEN, actnorm=False, lu=False))
        note = "RQ-spline coupling (coupling_stack, no ActNorm/LU)"
    elif family == "glow":
        m = Glow((DIM,), num_steps=GLOW_STEPS, hidden=HIDDEN)
        note = "ActNorm + LU + affine coupling (sigmoid scale)"
    else:
        raise ValueError(family)
    return m, m.log_prob, note


def build_zuko(family: str) -> Optional[tuple[nn.Module, LogProb, str]]:
    import zuko

    if family in ("realnvp", "realnvp-bare"):
        m = zuko.flows.RealNVP(features=DIM, transforms=REALNVP_STEPS, hidden_features=tuple(HIDDEN))
        note = "affine coupling, no ActNorm"
    elif family == "maf":
        m = zuko.flows.MAF(DIM, transforms=MAF_LAYERS, hidden_features=tuple(HIDDEN))
        note = "MADE affine"
    elif family in ("nsf", "nsf-bare"):
        m = zuko.flows.NSF(DIM, bins=NSF_BINS, transforms=NSF_STEPS, hidden_features=tuple(HIDDEN))
        note = "**autoregressive** RQ spline (no ActNorm/LU)"
    else:
        return None  # zuko has no Glow
    return m, (lambda x: m().log_prob(x)), note


def build_normflows(family: str) -> tuple[nn.Module, LogProb, str]:
    import normflows as nf
    from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling

    class NSFNet(nn.Module):
        """nf.nets.MLP with the ``(inputs, context)`` signature the spline coupling expects."""

        def __init__(self, in_features: int, out_features: int):
            super().__init__()
            self.mlp = nf.nets.MLP([in_features, *HIDDEN, out_features], init_zeros=True)

        def forward(self, inputs: Tensor, context=None) -> Tensor:
            return self.mlp(inputs)

    half = DIM // 2
    flows: list = []  # listed in the data -> base (density) direction, reversed below
    if family in ("realnvp", "realnvp-bare"):
        for _ in range(REALNVP_STEPS):
            flows += [nf.flows.ActNorm((DIM,))] if family == "realnvp" else []
            flows += [
                nf.flows.AffineCouplingBlock(nf.nets.MLP([half, *HIDDEN, 2 * (DIM - half)], init_zeros=True)),
                nf.flows.Permute(DIM, mode="swap"),
            ]
        note = ("ActNorm + " if family == "realnvp" else "") + "AffineCouplingBlock + swap"
    elif family == "maf":
        for i in range(MAF_LAYERS):
            if i:
                flows.append(nf.flows.Permute(DIM, mode="swap"))
            made = nf.flows.MaskedAffineAutoregressive(
                DIM, HIDDEN[0], num_blocks=len(HIDDEN) - 1, use_residual_blocks=False
            )
            # normflows' log_prob runs each layer's ``inverse``; for MaskedAffineAutoregressive that is
            # the D-pass direction.  Reverse() puts the one-pass MADE direction on the density side,
            # i.e. a true MAF (and the fastest way to use normflows here).
            flows.append(nf.flows.Reverse(made))
        note = "Reverse(MaskedAffineAutoregressive) + swap"
    elif family in ("nsf", "nsf-bare"):
        for i in range(NSF_STEPS):
            mask = (torch.arange(DIM) % 2 == (i + 1) % 2).int()  # transformed features: mask > 0
            coupling = PiecewiseRationalQuadraticCoupling(
                mask=mask, transform_net_create_fn=NSFNet, num_bins=NSF_BINS, tails="linear",
                tail_bound=NSF_BOUND, apply_unconditional_transform=False,
            )
            # The coupling's ``forward`` is the data -> base direction; normflows' log_prob calls
            # ``inverse``, so wrap it (CoupledRationalQuadraticSpline does the same swap internally).
            if family == "nsf":
                flows += [nf.flows.ActNorm((DIM,)), nf.flows.InvertibleAffine(DIM, use_lu=True)]
            flows.append(nf.flows.Reverse(coupling))
        note = ("ActNorm + InvertibleAffine(LU) + " if family == "nsf" else "") + "RQ-spline coupling"
    elif family == "glow":
        for _ in range(GLOW_STEPS):
            flows += [
                nf.flows.ActNorm((DIM,)),
                nf.flows.InvertibleAffine(DIM, use_lu=True),
                nf.flows.AffineCouplingBlock(
                    nf.nets.MLP([half, *HIDDEN, 2 * (DIM - half)], init_zeros=True), scale_map="sigmoid"
                ),
                nf.flows.Permute(DIM, mode="swap"),
            ]
        note = "ActNorm + InvertibleAffine(LU) + sigmoid coupling + swap"
    else:
        raise ValueError(family)
    model = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(DIM, trainable=False), flows=flows[::-1])
    return model, model.log_prob, note


BUILDERS = {"flowforge": build_flowforge, "zuko": build_zuko, "normflows": build_normflows}


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
    times: list = field(default_factory=list)  # seconds per step
    last_loss: float = float("nan")

    def step(self, x: Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = -self.log_prob(x).mean()
        loss.backward()
        self.opt.step()
        return loss.item()

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    def quartiles_ms(self) -> tuple[float, float]:
        if len(self.times) < 4:
            return self.median_ms, self.median_ms
        q = statistics.quantiles(self.times, n=4)
        return 1e3 * q[0], 1e3 * q[2]


def build_entries(families, libs, lr: float, seed: int, batch: int) -> list[Entry]:
    entries = []
    for family in families:
        for lib in libs:
            torch.manual_seed(seed)
            built = BUILDERS[lib](family)
            if built is None:
                continue
            model, log_prob, note = built
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
            entries.append(Entry(family, lib, model, log_prob, note, opt, params))
    return entries


def make_batches(batch: int, n_batches: int, seed: int) -> list[Tensor]:
    from flowforge.data.toy2d import sample_toy

    pool = sample_toy("checkerboard", batch * n_batches, seed=seed)
    return [b.contiguous() for b in pool.split(batch)]


def run(
    entries: list[Entry], batches: list[Tensor], warmup: int, rounds: int, steps: int, block: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    k = 0
    for e in entries:
        for _ in range(warmup):
            loss = e.step(batches[k % len(batches)])
            k += 1
        with torch.no_grad():
            lp = e.log_prob(batches[0])
        if lp.shape != (batches[0].shape[0],):
            raise RuntimeError(f"{e.lib} {e.family}: log_prob shape {tuple(lp.shape)}, expected per-sample")
        if not math.isfinite(loss):
            print(f"WARNING: {e.lib} {e.family}: non-finite loss after warm-up", file=sys.stderr)
    perf = clock
    n = len(entries)
    for r in range(rounds):
        order = entries[r % n:] + entries[: r % n]  # rotate so nobody always runs first / after X
        # Round-robin in blocks of ``block`` steps: with block=1 every model's steps are spread evenly
        # over the round, so a burst of machine load hits all models alike.
        for start in range(0, steps, block):
            for e in order:
                for _ in range(min(block, steps - start)):
                    x = batches[k % len(batches)]
                    k += 1
                    t0 = perf()
                    e.last_loss = e.step(x)
                    e.times.append(perf() - t0)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def fmt_ms(e: Optional[Entry]) -> str:
    if e is None:
        return "—"
    return f"{e.median_ms:.2f}"


def fmt_params(e: Optional[Entry]) -> str:
    return "—" if e is None else f"{e.params:,}"


def report(entries: list[Entry], args, wall: float) -> str:
    import normflows
    import zuko

    by = {(e.family, e.lib): e for e in entries}
    families = [f for f in args.families if any(e.family == f for e in entries)]
    libs = [l for l in LIBS if l in args.libs]
    lines = [
        "# flowforge training-step benchmark (2-D checkerboard)",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()} "
        f"({'default' if args.threads is None else 'set by --threads'}), clock {args.clock}, "
        f"zuko {zuko.__version__}, normflows {normflows.__version__}, python {platform.python_version()}, "
        f"{platform.machine()} {os.cpu_count()} CPUs",
        f"- step = -log_prob(x).mean() + backward + Adam; batch {args.batch}; warm-up {args.warmup} steps; "
        f"{args.rounds} round-robin rounds x {args.steps} steps (switching model every {args.block} step(s)); median ms/step (IQR in the second table)",
        f"- sizes: RealNVP {REALNVP_STEPS} couplings, MAF {MAF_LAYERS} MADE layers, NSF {NSF_STEPS} spline "
        f"layers x {NSF_BINS} bins (bound {NSF_BOUND:g}), Glow {GLOW_STEPS} steps; hidden {HIDDEN} everywhere",
        "",
    ]
    head = "| Family | " + " | ".join(f"{l} ms" for l in libs) + " | params (" + " / ".join(libs) + ") | flowforge / fastest peer |"
    lines += [head, "|" + "---|" * (len(libs) + 3)]
    for f in families:
        row = [FAMILY_TITLE[f]]
        row += [fmt_ms(by.get((f, l))) for l in libs]
        row.append(" / ".join(fmt_params(by.get((f, l))) for l in libs))
        ff = by.get((f, "flowforge"))
        peers = [by[(f, l)] for l in libs if l != "flowforge" and (f, l) in by]
        if ff is not None and peers:
            best = min(peers, key=lambda e: e.median_ms)
            ratio = ff.median_ms / best.median_ms
            mark = "OK" if ratio <= 1.0 else "SLOWER"
            row.append(f"**{ratio:.2f}** vs {best.lib} ({mark})")
        else:
            row.append("—")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| Family | Library | structure | params | median ms | IQR ms | final loss |", "|---|---|---|---|---|---|---|"]
    for f in families:
        for l in libs:
            e = by.get((f, l))
            if e is None:
                if l == "zuko" and f == "glow":
                    lines.append(f"| {FAMILY_TITLE[f]} | zuko | no Glow in zuko | — | — | — | — |")
                continue
            q1, q3 = e.quartiles_ms()
            lines.append(
                f"| {FAMILY_TITLE[f]} | {l} | {e.note} | {e.params:,} | {e.median_ms:.2f} | {q1:.2f}–{q3:.2f} | {e.last_loss:.3f} |"
            )
    lines += [
        "",
        "Notes: zuko's NSF is autoregressive (for D = 2 equivalent to a coupling whose first coordinate also "
        "gets an unconditional spline) and has no ActNorm/LU mixing; zuko's RealNVP has no ActNorm; zuko has no "
        "Glow. normflows' MAF layers are wrapped in `Reverse` so that log_prob uses the one-pass MADE direction. "
        "Parameter counts differ slightly because flowforge's coupling conditioners read the whole (masked) "
        "vector and emit parameters for every coordinate, while zuko/normflows feed only the kept half and emit "
        "only the transformed half (normflows' NSF is smallest for that reason).",
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model per round (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (default 5)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps per model (default 10)")
    p.add_argument("--block", type=int, default=1,
                   help="consecutive steps of one model before switching to the next (default 1)")
    p.add_argument("--batch", type=int, default=500, help="batch size (default 500)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), help="subset of " + " ".join(FAMILIES) + " (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N); default: leave torch's default alone")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (perf_counter, default) or cpu (CPU time of the main thread: stable on a loaded "
                        "machine, but only meaningful with --threads 1)")
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS, help="subset of libraries")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown report to this path")
    args = p.parse_args(argv)
    args.families = parse_families(args.families)
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
    entries = build_entries(args.families, args.libs, args.lr, args.seed, args.batch)
    batches = make_batches(args.batch, 16, args.seed)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    run(entries, batches, args.warmup, args.rounds, args.steps, args.block, clock)
    text = report(entries, args, time.perf_counter() - t0)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
