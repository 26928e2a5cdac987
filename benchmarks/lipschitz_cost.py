#!/usr/bin/env python
"""Cost of keeping spectral norms current: flowforge against the official Residual Flows code, one process.

Prints one Markdown table:

* per-step power-iteration update of the CIFAR-10 Residual Flow (``experiment=resflow_cifar10``, built as in
  ``benchmarks/resflow_cifar10_step.py``): flowforge's ``update_lipschitz(flow, max_iters=1, method="krylov")``
  (the recipe's ``lipschitz_step_iters: 1``, ``lipschitz_step_method: krylov``) against the official model's
  ``compute_weight(update=True)`` on every spectral-norm layer (the power iteration its layers run inside a training
  forward, ``--sn-tol 1e-3``, no iteration cap). Before each timed update both models' weights get the same kind of
  perturbation, the size of one Adam step (``lr * sign(noise)``, lr 1e-3). The two sides alternate, ``--steps`` times;
  medians.
* first-step initialisation: flowforge's first ``update_lipschitz`` on a fresh model against the official
  model's first training-mode forward (which initialises its layers' ``u``, ``v``) minus its second one;
* layers stopped by the iteration cap in flowforge's per-step update (the official update has no cap);
* g-network floor: forward + backward of the residual branch with spectral normalisation over the same network
  built from plain ``nn.Linear``/``nn.Conv2d`` (toy MLP 2-128-128-128-128-2, LipSwish, batch 500; the
  CIFAR-10 3-1-3 conv branch, 512 channels, batch 4).  flowforge's layers do not iterate in the forward; the
  official layers, in training mode, run their power iteration there (to its tolerance), which is part of its
  floor.

The official code is read from ``--official-dir`` (a copy of https://github.com/rtqichen/residual-flows; get it
with ``git clone https://github.com/rtqichen/residual-flows``).

Usage::

    python benchmarks/lipschitz_cost.py                # ~5 min on 2 busy cores
    python benchmarks/lipschitz_cost.py --steps 3 --out lipschitz.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)
from torch import nn

OFFICIAL_DIR = "/work/scratch/residual-flows"
LR = 1e-3


def _official(path: str):
    if not os.path.isdir(os.path.join(path, "resflows")):
        sys.exit(
            f"official Residual Flows code not found in {path!r}: get it with "
            "`git clone https://github.com/rtqichen/residual-flows` and pass --official-dir"
        )
    sys.path.insert(0, path)
    import resflows.layers.base as base
    from resflows.resflow import ResidualFlow

    return base, ResidualFlow


def _perturb(model: nn.Module, gen: torch.Generator) -> None:
    """An Adam-sized step on every weight: ``lr * sign(noise)``."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(LR * torch.sign(torch.randn(p.shape, generator=gen)))


def _official_sn_layers(model: nn.Module) -> list[nn.Module]:
    """The official model's normalised layers (spectral-norm or induced-norm with ``vnorms`` 2222): those with a
    ``compute_weight`` method."""
    return [m for m in model.modules() if callable(getattr(m, "compute_weight", None))]


def cifar_rows(official_dir: str, steps: int) -> list[tuple[str, str, str]]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from resflow_cifar10_step import INIT_ITERS, STEP_ITERS, STEP_METHOD, build

    from flowforge.nn.lipschitz import set_init_iters, update_lipschitz

    _, OfficialFlow = _official(official_dir)
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0)).float() / 256.0

    flow = build(torch.device("cpu"))
    set_init_iters(flow, INIT_ITERS)  # the recipe's cap on the first estimate
    t0 = time.process_time()
    init_info = update_lipschitz(flow)
    ff_init = time.process_time() - t0

    torch.manual_seed(0)
    official = OfficialFlow(
        (4, 3, 32, 32), n_blocks=[16, 16, 16], intermediate_dim=512, factor_out=False, quadratic=False,
        init_layer=None, actnorm=True, fc_actnorm=False, batchnorm=False, dropout=0.0, fc=False, coeff=0.98,
        vnorms="2222", n_lipschitz_iters=None, sn_atol=1e-3, sn_rtol=1e-3, n_power_series=None, n_dist="poisson",
        n_samples=1, kernels="3-1-3", activation_fn="swish", fc_end=True, fc_idim=128, n_exact_terms=2, preact=True,
        neumann_grad=True, grad_in_forward=True, first_resblock=True, learn_p=False,
    )  # fmt: skip
    official.train()
    with torch.no_grad():  # the first training forward initialises u, v; the second iterates warm-started
        t0 = time.process_time()
        official(x, 0)
        first = time.process_time() - t0
        t0 = time.process_time()
        official(x, 0)
        plain = time.process_time() - t0
    off_init = first - plain
    off_layers = _official_sn_layers(official)

    gen = torch.Generator().manual_seed(1)
    ff_t, off_t, unconverged = [], [], []
    for _ in range(steps):
        _perturb(flow, gen)
        t0 = time.process_time()
        info = update_lipschitz(flow, max_iters=STEP_ITERS, method=STEP_METHOD)
        ff_t.append(time.process_time() - t0)
        unconverged.append(len(info["unconverged"]))
        _perturb(official, gen)
        t0 = time.process_time()
        with torch.no_grad():
            for m in off_layers:
                m.compute_weight(update=True)
        off_t.append(time.process_time() - t0)
    ff, off = statistics.median(ff_t), statistics.median(off_t)
    return [
        ("CIFAR-10 per-step update (CPU s, median)", f"{ff:.2f}", f"{off:.2f} (ratio {ff / off:.2f})"),
        ("CIFAR-10 first-step initialisation (CPU s)", f"{ff_init:.2f}", f"{off_init:.2f} ({ff_init / off_init:.2f})"),
        (
            "layers stopped by the cap per step",
            f"{statistics.median(unconverged):.0f} of {init_info['num_layers']}",
            f"no cap ({len(off_layers)} layers)",
        ),
    ]


class _LipSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * torch.sigmoid(x * self.beta) / 1.1


def _mlp(linear) -> nn.Sequential:
    dims, layers = [2, 128, 128, 128, 128, 2], []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(_LipSwish())
        layers.append(linear(a, b))
    return nn.Sequential(*layers)


def _conv_g(conv) -> nn.Sequential:
    return nn.Sequential(_LipSwish(), conv(3, 512, 3), _LipSwish(), conv(512, 512, 1), _LipSwish(), conv(512, 3, 3))


def _ratio(net, plain, x, reps: int, inner: int) -> float:
    def step(m):
        t0 = time.perf_counter()
        m(x).square().sum().backward()
        return time.perf_counter() - t0

    for _ in range(3):
        step(net), step(plain)
    ratios = []
    for _ in range(reps):
        a = b = 0.0
        for _ in range(inner):
            a += step(net)
            b += step(plain)
        ratios.append(a / b)
    return statistics.median(ratios)


def floor_rows(official_dir: str) -> list[tuple[str, str, str]]:
    from flowforge.nn.lipschitz import SpectralNormConv2d, SpectralNormLinear, update_lipschitz

    base, _ = _official(official_dir)
    torch.manual_seed(0)
    ff = _mlp(lambda a, b: SpectralNormLinear(a, b, coeff=0.98))
    update_lipschitz(ff)
    off = _mlp(lambda a, b: base.SpectralNormLinear(a, b, coeff=0.98, atol=1e-3, rtol=1e-3)).train()
    plain = _mlp(nn.Linear)
    x = torch.randn(500, 2)
    toy_ff, toy_off = _ratio(ff, plain, x, 5, 40), _ratio(off, plain, x, 5, 40)

    ffc = _conv_g(lambda a, b, k: SpectralNormConv2d(a, b, k, input_size=(32, 32), coeff=0.98))
    update_lipschitz(ffc)
    offc = _conv_g(
        lambda a, b, k: base.SpectralNormConv2d(a, b, k, 1, k // 2, coeff=0.98, atol=1e-3, rtol=1e-3)
    ).train()
    plainc = _conv_g(lambda a, b, k: nn.Conv2d(a, b, k, padding=k // 2))
    xc = torch.randn(4, 3, 32, 32)
    offc(xc)  # the official conv layers initialise u, v on their first forward
    conv_ff, conv_off = _ratio(ffc, plainc, xc, 3, 3), _ratio(offc, plainc, xc, 3, 3)
    return [
        ("g floor, toy MLP (wrapped / plain fwd+bwd)", f"{toy_ff:.2f}", f"{toy_off:.2f}"),
        ("g floor, CIFAR-10 conv g, batch 4 (wrapped / plain)", f"{conv_ff:.2f}", f"{conv_off:.2f}"),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-dir", default=OFFICIAL_DIR)
    p.add_argument("--steps", type=int, default=3, help="timed per-step updates of the CIFAR-10 model")
    p.add_argument("--no-cifar", action="store_true", help="only the g-floor rows")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = floor_rows(args.official_dir)
    if not args.no_cifar:
        rows = cifar_rows(args.official_dir, args.steps) + rows
    lines = ["| measurement (CPU, 1 thread) | flowforge | official |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
