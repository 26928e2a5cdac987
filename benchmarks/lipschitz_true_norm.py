#!/usr/bin/env python
"""True spectral norms of every normalised layer of a trained Residual Flow, against each layer's ``coeff``.

Spectral normalisation keeps an estimate ``sigma_hat`` of each weight's operator norm, updated by power
iteration after every optimiser step, and uses ``W_hat = W / max(1, sigma_hat / coeff)``.  The guarantee the
residual blocks need (``Lip(g) < 1``) holds only if the true norm of ``W_hat`` is at most ``coeff``.  This
script trains, then computes the true operator norm of every normalised layer's ``W_hat``:

* linear layers and 1x1 convolutions: the largest singular value of the weight matrix (exact SVD);
* k x k convolutions whose unrolled operator has a small side (``min(in*H*W, out*H'*W') <= --exact-max``, and
  at most 2e10 float64 operations to build its Gram matrix): the largest eigenvalue of the Gram matrix of the
  unrolled zero-padded convolution (exact);
* larger k x k convolutions: a certified bracket.  The lower bound is ``|A v|`` for a unit ``v`` after a long
  power iteration on the true zero-padded operator in float64; the upper bound is the norm of the circular
  convolution on the zero-extended ``(H + p) x (W + p)`` grid (``p`` the padding), of which the zero-padded
  convolution is a restriction: the maximum over frequencies of the per-frequency ``Cout x Cin`` matrix norms of
  the kernel's 2-D DFT.

Two runs: ``model=resflow dataset=digits`` (the default model size with 4 FC blocks) trained ``--digits-steps``
steps (default 200) with flowforge's training step (objective loss, backward, grad-norm clip, optimiser step,
``update_lipschitz`` with the run's ``lipschitz_step_iters``), and the CIFAR-10 recipe
(``experiment=resflow_cifar10``, 25M parameters) trained ``--cifar-steps`` steps (default 3) at batch 4 on random
pixels. With ``--official`` the official Residual Flows code (rtqichen/residual-flows, ``--official-dir``) trains
its own ``ResidualFlow`` on the same digits batches (1x8x8 inputs, the same block layout and sizes, its own
spectral-norm layers and their update rule, one power iteration per forward as its training does) and its layers'
true norms are computed the same way. Prints one Markdown table (``--out`` writes it too).

Usage::

    python benchmarks/lipschitz_true_norm.py                   # digits + CIFAR-10 (a few minutes on 2 cores)
    python benchmarks/lipschitz_true_norm.py --official        # adds the official code's digits model
    python benchmarks/lipschitz_true_norm.py --skip-cifar --digits-steps 50
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _configs import compose  # benchmarks/_configs.py (scripts run as python benchmarks/<name>.py)
from _report import emit

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = "/work/scratch/residual-flows"
#: largest float64 work (multiply-adds x 2) spent on one exact Gram matrix; larger convolutions get a bracket
EXACT_FLOPS = 2e10


# --------------------------------------------------------------------------------------------- true norms
def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def conv_gram_norm(w, input_size, stride: int, padding: int, output_padding=0, chunk: int = 256) -> float:
    """Exact operator norm of the zero-padded convolution ``x -> conv2d(x, w)`` on ``(Cin, H, W)`` inputs: the
    square root of the largest eigenvalue of ``A^T A`` (or ``A A^T``, whichever is smaller), built column by
    column with the convolution and its adjoint (float64)."""
    w = w.detach().to(torch.float64)
    c_out, c_in = w.shape[:2]
    h, wd = input_size
    y0 = F.conv2d(torch.zeros(1, c_in, h, wd, dtype=w.dtype), w, None, stride, padding)
    ho, wo = y0.shape[-2:]
    n_in, n_out = c_in * h * wd, c_out * ho * wo

    def op(x):
        return F.conv2d(x, w, None, stride, padding)

    def adj(y):
        return F.conv_transpose2d(y, w, None, stride, padding, output_padding)

    if n_in <= n_out:
        n, shape, first, second = n_in, (c_in, h, wd), op, adj
    else:
        n, shape, first, second = n_out, (c_out, ho, wo), adj, op
    gram = torch.empty(n, n, dtype=w.dtype)
    for a, b in _chunks(n, chunk):
        basis = torch.zeros(b - a, n, dtype=w.dtype)
        basis[torch.arange(b - a), torch.arange(a, b)] = 1.0
        cols = second(first(basis.reshape(b - a, *shape)))
        if cols.shape[-2:] != shape[-2:]:
            raise ValueError(f"adjoint shape {tuple(cols.shape)} does not match {shape}: check output_padding")
        gram[:, a:b] = cols.reshape(b - a, n).t()
    gram = 0.5 * (gram + gram.t())
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def conv_power_lower(w, input_size, stride, padding, output_padding=0, v0=None, iters=100, rtol=1e-9) -> float:
    """A lower bound on the zero-padded convolution's norm: ``|A v|`` for the unit ``v`` that a float64 power
    iteration on ``A^T A`` reaches (started from ``v0`` when given)."""
    w = w.detach().to(torch.float64)
    c_in = w.shape[1]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, c_in, *input_size, generator=g, dtype=w.dtype) if v0 is None else v0.detach().to(w.dtype)
    v = v.reshape(1, c_in, *input_size)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        u = F.conv2d(v, w, None, stride, padding)
        new = float(u.norm())
        v = F.conv_transpose2d(u, w, None, stride, padding, output_padding)
        v = v / v.norm()
        if abs(new - sigma) <= rtol * new:
            sigma = new
            break
        sigma = new
    return float(F.conv2d(v, w, None, stride, padding).norm())


def conv_fft_upper(w, input_size, padding: int) -> float:
    """An upper bound on the zero-padded (``padding = (k - 1) / 2``), stride-1 convolution's norm: the norm of the
    circular convolution on the zero-extended grid ``(H + padding, W + padding)``, i.e. the largest per-frequency
    ``Cout x Cin`` matrix norm of the kernel's 2-D DFT."""
    w = w.detach().to(torch.float64)
    # the zero-padded convolution reads x at offsets -p..p: on a cyclic grid of H + p, offsets -p..-1 and H..H+p-1
    # both land in the p zero rows, so the zero-padded map is the cyclic one restricted to the embedded input
    n_h, n_w = input_size[0] + padding, input_size[1] + padding
    spec = torch.fft.fft2(w, s=(n_h, n_w))  # (Cout, Cin, n_h, n_w)
    mats = spec.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])
    return float(torch.linalg.matrix_norm(mats, ord=2).max())


def layer_norm_bounds(w, kind: str, input_size=None, stride=1, padding=0, output_padding=0, v0=None, exact_max=4096):
    """``(lower, upper, method)`` for the operator of weight ``w``: ``kind`` is ``"linear"`` or ``"conv"``."""
    w = w.detach().cpu().to(torch.float64)
    if kind == "linear" or w.shape[-1] == 1 and w.shape[-2] == 1:
        s = float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2))
        return s, s, "SVD"
    c_out, c_in = w.shape[:2]
    h, wd = input_size
    n_small = min(c_in * h * wd, c_out * ((h + 2 * padding - w.shape[-1]) // stride + 1) ** 2)
    # the Gram matrix costs n_small convolutions and adjoints of one image: exact only while that stays cheap
    flops = 4 * n_small * c_out * c_in * w.shape[-1] ** 2 * h * wd
    if n_small <= exact_max and flops <= EXACT_FLOPS:
        s = conv_gram_norm(w, input_size, stride, padding, output_padding)
        return s, s, "unrolled"
    if stride != 1 or 2 * padding != w.shape[-1] - 1:
        raise ValueError("the FFT upper bound is implemented for stride-1 convolutions with padding (k - 1) / 2")
    lo = conv_power_lower(w, input_size, stride, padding, output_padding, v0=v0)
    hi = conv_fft_upper(w, input_size, padding)
    return lo, hi, "bracket"


def flowforge_layers(model, exact_max: int) -> list[dict]:
    """True-norm bounds of every spectrally normalised layer of a flowforge model."""
    from flowforge.nn.lipschitz import lipschitz_layers

    names = {id(m): n for n, m in model.named_modules()}
    rows = []
    for layer in lipschitz_layers(model):
        with torch.no_grad():
            w = layer.normalized_weight()
        conv = w.dim() == 4
        v0 = getattr(layer, "v", None) if conv and getattr(layer, "kernel_size", 1) > 1 else None
        lo, hi, method = layer_norm_bounds(
            w,
            "conv" if conv else "linear",
            getattr(layer, "input_size", None),
            getattr(layer, "stride", 1),
            getattr(layer, "padding", 0),
            getattr(layer, "_output_padding", 0),
            v0=v0 if v0 is not None and v0.numel() == w.shape[1] * math.prod(layer.input_size or (1,)) else None,
            exact_max=exact_max,
        )
        rows.append({"name": names[id(layer)], "coeff": float(layer.coeff), "lo": lo, "hi": hi, "method": method})
    return rows


# --------------------------------------------------------------------------------------------- training
def digits_batches(steps: int, batch_size: int, seed: int = 0):
    """``steps`` training batches of the bundled digits (integer levels 0..16 as float, shape (B, 1, 8, 8))."""
    cfg = compose(["model=resflow", "dataset=digits", f"dataset.batch_size={batch_size}"])
    from flowforge.experiment import instantiate

    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    out = []
    torch.manual_seed(seed)
    while len(out) < steps:
        for batch in dm.train_dataloader():
            out.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
            if len(out) == steps:
                break
    return out


def train_flowforge(overrides: list[str], batches) -> tuple[torch.nn.Module, float]:
    """flowforge's training step on ``batches``: the objective's loss, backward, the run's grad-norm clip, the
    optimiser step (its full learning rate, no warm-up) and ``update_lipschitz`` (as ``LipschitzMaintenance``
    after each step). Returns the model and the wall time."""
    from flowforge.experiment import build, instantiate
    from flowforge.flows.base import initialize
    from flowforge.nn.lipschitz import set_init_iters, update_lipschitz
    from flowforge.training.module import build_optimizer

    cfg = compose(overrides)
    torch.manual_seed(0)
    _, module = build(cfg)
    model = module.model
    set_init_iters(model, cfg.get("lipschitz_init_iters"))  # as LipschitzMaintenance does when fitting starts
    opt = build_optimizer(instantiate(cfg.optim.optimizer), model.parameters())  # fp32, as training resolves it
    clip = cfg.trainer.get("gradient_clip_val")
    step_iters = cfg.get("lipschitz_step_iters")
    t0 = time.perf_counter()
    model.train()
    for i, x in enumerate(batches):
        x = module.batch_input(x)
        if i == 0:
            initialize(model, x, run=lambda v: module.step_metrics(v, v, "train"))
        opt.zero_grad(set_to_none=True)
        loss = module.step_metrics(x, x, "train")["loss"].mean()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        opt.step()
        update_lipschitz(model, max_iters=step_iters, method=cfg.get("lipschitz_step_method", "subspace"))
        if i % 50 == 0 or i == len(batches) - 1:
            print(f"  step {i}: loss {float(loss):.4f}", flush=True)
    return model, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- official code
def official_run(official_dir: str, batches, flowforge_cfg) -> tuple[list[dict], float]:
    """The official ResidualFlow built to the layout of ``flowforge_cfg.model`` on the batches' image shape, trained
    on ``batches`` with its own layers and update rule; its normalised layers' true norms and the training time."""
    if not Path(official_dir).is_dir():
        raise FileNotFoundError(
            f"{official_dir} not found: git clone https://github.com/rtqichen/residual-flows {official_dir}"
        )
    sys.path.insert(0, official_dir)
    import resflows.layers as layers
    import resflows.layers.base as base_layers
    from resflows.resflow import ResidualFlow as OfficialResidualFlow

    # train_img.py's update_lipschitz: compute_weight(update=True) on every spectral- and induced-norm layer
    normed = (
        base_layers.SpectralNormConv2d,
        base_layers.SpectralNormLinear,
        base_layers.InducedNormConv2d,
        base_layers.InducedNormLinear,
    )
    convs = (base_layers.SpectralNormConv2d, base_layers.InducedNormConv2d)

    m = flowforge_cfg.model
    torch.manual_seed(0)
    np.random.seed(0)  # the official roulette draws its series length with numpy
    random.seed(0)
    model = OfficialResidualFlow(
        tuple(batches[0].shape),
        n_blocks=list(m.blocks_per_scale),
        intermediate_dim=int(m.channels),
        factor_out=bool(m.factor_out),
        quadratic=False,
        init_layer=layers.LogitTransform(float(m.logit_alpha)),
        actnorm=bool(m.actnorm),
        fc_actnorm=bool(m.actnorm),
        batchnorm=False,
        dropout=0,
        fc=False,
        coeff=float(m.coeff),
        vnorms="2222",
        n_lipschitz_iters=None,
        sn_atol=1e-3,
        sn_rtol=1e-3,
        n_power_series=None,
        n_dist="geometric",
        n_samples=1,
        kernels="-".join(str(k) for k in m.kernels),
        activation_fn="swish",
        fc_end=True,
        fc_idim=int(m.fc_hidden[0]),
        n_exact_terms=int(flowforge_cfg.estimator.get("n_exact_terms") or 2),
        preact=bool(m.preact),
        neumann_grad=True,
        grad_in_forward=True,
        first_resblock=True,
        learn_p=False,
        classification=False,
        classification_hdim=256,
        n_classes=10,
        block_type="resblock",
    )
    opt = torch.optim.Adam(model.parameters(), lr=float(flowforge_cfg.optim.optimizer.lr))
    levels = int(flowforge_cfg.dataset.num_levels)
    t0 = time.perf_counter()
    model.train()
    for i, x in enumerate(batches):
        # uniform dequantisation to [0, 1) as the official train_img.py does (x + U) / levels
        xx = (x + torch.rand_like(x)) / levels
        zero = torch.zeros(xx.shape[0], 1)
        z, delta_logp = model(xx, zero)
        logpz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).reshape(z.shape[0], -1).sum(1, keepdim=True)
        logpx = logpz - delta_logp - math.log(levels) * xx[0].numel()
        loss = -logpx.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # train_img.py's update_lipschitz after each step (iterates to sn_tol)
            for mod in model.modules():
                if isinstance(mod, normed):
                    mod.compute_weight(update=True)
        if i % 50 == 0 or i == len(batches) - 1:
            print(f"  official step {i}: loss {float(loss):.4f}", flush=True)
    wall = time.perf_counter() - t0
    rows = []
    model.eval()
    for name, mod in model.named_modules():
        if not isinstance(mod, normed):
            continue
        with torch.no_grad():
            w = mod.compute_weight(update=False)
        if isinstance(mod, convs):
            h, wd = int(mod.spatial_dims[0]), int(mod.spatial_dims[1])
            stride = mod.stride if isinstance(mod.stride, int) else mod.stride[0]
            pad = mod.padding if isinstance(mod.padding, int) else mod.padding[0]
            lo, hi, method = layer_norm_bounds(w, "conv", (h, wd), stride, pad)
        else:
            lo, hi, method = layer_norm_bounds(w, "linear")
        rows.append({"name": name, "coeff": float(mod.coeff), "lo": lo, "hi": hi, "method": method})
    return rows, wall


# --------------------------------------------------------------------------------------------- report
def summary(rows: list[dict]) -> dict:
    methods = {}
    for r in rows:
        methods[r["method"]] = methods.get(r["method"], 0) + 1
    return {
        "n": len(rows),
        "methods": ", ".join(f"{v} {k}" for k, v in sorted(methods.items())),
        "worst_lo": max(r["lo"] - r["coeff"] for r in rows),
        "worst_hi": max(r["hi"] - r["coeff"] for r in rows),
        "above": sum(r["lo"] > r["coeff"] * (1 + 1e-9) for r in rows),
        "maybe": sum(r["lo"] <= r["coeff"] * (1 + 1e-9) < r["hi"] / r["coeff"] * r["coeff"] for r in rows),
        "worst_name": max(rows, key=lambda r: r["hi"] - r["coeff"])["name"],
    }


def excess(s: dict) -> str:
    if abs(s["worst_hi"] - s["worst_lo"]) < 1e-9:
        return f"{s['worst_lo']:+.2e}"
    return f"[{s['worst_lo']:+.2e}, {s['worst_hi']:+.2e}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--digits-steps", type=int, default=200)
    p.add_argument("--cifar-steps", type=int, default=3)
    p.add_argument("--cifar-batch", type=int, default=4)
    p.add_argument("--skip-cifar", action="store_true")
    p.add_argument("--official", action="store_true", help="also train and measure the official code on digits")
    p.add_argument("--official-dir", default=OFFICIAL_DIR)
    p.add_argument("--exact-max", type=int, default=4096, help="largest Gram side computed exactly for k x k convs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    results = []  # (model, criterion, summary, train wall, norm wall, note)

    print(f"digits: {args.digits_steps} steps of model=resflow dataset=digits", flush=True)
    batches = digits_batches(args.digits_steps, 64)
    # 4 FC blocks as the official ResidualFlow builds (its fc_nblocks is fixed at 4); the rest the default size
    digits_overrides = ["model=resflow", "dataset=digits", "model.fc_blocks=4"]
    model, wall = train_flowforge(digits_overrides, batches)
    t = time.perf_counter()
    rows = flowforge_layers(model, args.exact_max)
    results.append(("digits, model=resflow (fc_blocks=4)", "flowforge", summary(rows), wall, time.perf_counter() - t))
    print(f"  {results[-1][2]}", flush=True)

    if args.official:
        print("digits: official ResidualFlow, same layout and batches", flush=True)
        try:
            cfg = compose(digits_overrides)
            rows_o, wall_o = official_run(args.official_dir, batches, cfg)
            results.append(("digits, model=resflow (fc_blocks=4)", "official", summary(rows_o), wall_o, 0.0))
            # (norm time of the digits model is under a second)
            print(f"  {results[-1][2]}", flush=True)
        except Exception as e:  # noqa: BLE001  (the table says so)
            print(f"  official run failed: {type(e).__name__}: {e}", flush=True)
            results.append(("digits, model=resflow (fc_blocks=4)", f"official: {type(e).__name__}: {e}", None, 0, 0))

    if not args.skip_cifar:
        print(f"CIFAR-10 recipe: {args.cifar_steps} steps at batch {args.cifar_batch}, random pixels", flush=True)
        g = torch.Generator().manual_seed(0)
        cifar = [
            torch.randint(0, 256, (args.cifar_batch, 3, 32, 32), generator=g).float() for _ in range(args.cifar_steps)
        ]
        cifar_overrides = ["experiment=resflow_cifar10", f"dataset.batch_size={args.cifar_batch}"]
        model, wall = train_flowforge(cifar_overrides, cifar)
        t = time.perf_counter()
        rows = flowforge_layers(model, args.exact_max)
        label = f"CIFAR-10 recipe, {args.cifar_steps} steps"
        results.append((label, "flowforge", summary(rows), wall, time.perf_counter() - t))
        print(f"  {results[-1][2]}", flush=True)
        del model
        if args.official:
            print("CIFAR-10: official ResidualFlow, same layout and batches", flush=True)
            try:
                t = time.perf_counter()
                rows_o, wall_o = official_run(args.official_dir, cifar, compose(cifar_overrides))
                results.append((label, "official", summary(rows_o), wall_o, time.perf_counter() - t - wall_o))
                print(f"  {results[-1][2]}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  official run failed: {type(e).__name__}: {e}", flush=True)
                results.append((label, f"official: {type(e).__name__}: {e}", None, 0, 0))

    lines = [
        "| model | criterion | layers | true norm computed by | worst true norm - coeff | layers above coeff | "
        "worst layer | train s | norms s |",
        "|---|---|---:|---|---|---:|---|---:|---:|",
    ]
    for name, crit, s, tw, nw in results:
        if s is None:
            lines.append(f"| {name} | {crit} | - | - | - | - | - | - | - |")
            continue
        above = f"{s['above']}" + (f" (+{s['maybe']} undecided)" if s["maybe"] else "")
        lines.append(
            f"| {name} | {crit} | {s['n']} | {s['methods']} | {excess(s)} | {above} | {s['worst_name']} | "
            f"{tw:.0f} | {nw:.0f} |"
        )
    text = "\n".join(lines) + f"\n\nTotal {time.perf_counter() - t_start:.0f} s, torch {torch.__version__}.\n"
    print()
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
