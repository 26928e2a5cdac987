#!/usr/bin/env python
"""Time one training step of the paper-size CIFAR-10 Residual Flow (``experiment=resflow_cifar10``).

The model is built with the exact model kwargs of ``conf/experiment/resflow_cifar10.yaml`` (on top of
``conf/model/resflow.yaml``): blocks_per_scale 16-16-16, 512 hidden channels (3-1-3 kernels), 4 FC blocks
of [128, 128], LipSwish, coeff 0.98, ActNorm, pre-activation, 256 levels, logit alpha 0.05; estimator
``mem_eff``: 2 exact terms + geometric(0.5) roulette, Neumann gradients, backward-in-forward.  The parameter
count is checked against the recipe's 25,174,233.

One step = ``flow.bits_per_dim(x).mean()`` + backward + Adam + ``update_lipschitz(flow, max_iters=1,
method="krylov")`` (the recipe's ``lipschitz_step_iters`` and ``lipschitz_step_method``; ``--step-iters``,
``--step-method``), on random integer pixels.  One untimed warm-up step (ActNorm and the first, to-tolerance
norm estimates), then the median of ``--steps`` timed steps.

* CPU: batch ``--cpu-batch`` (default 4); compared with the reference implementation's ~10 s/step on
  this kind of 2-core machine (a reference constant, not measured here).
* CUDA (when available): batch ``--gpu-batch`` (default 64) in fp32 and under
  ``torch.autocast("cuda", dtype=torch.bfloat16)``; the TF32 switches are printed with the table.

Usage::

    python benchmarks/resflow_cifar10_step.py                  # CPU: ~1-2 min on 2 cores
    python benchmarks/resflow_cifar10_step.py --steps 5 --out cifar.md
    python benchmarks/resflow_cifar10_step.py --no-cpu         # GPU rows only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)

EXPECTED_PARAMS = 25_174_233
# Not measured here: the reference implementation (rtqichen/residual-flows) at batch 4 on a 2-core CPU
# machine of this kind, about 10 s per training step (a reference figure, not measured here).
REFERENCE_CPU_S_PER_STEP = 10.0

MODEL_KWARGS = dict(  # conf/model/resflow.yaml overridden by conf/experiment/resflow_cifar10.yaml
    blocks_per_scale=[16, 16, 16],
    channels=512,
    kernels=[3, 1, 3],
    fc_blocks=4,
    fc_hidden=[128, 128],
    act="lipswish",
    coeff=0.98,
    actnorm=True,
    preact=True,
    squeeze_first=False,
    factor_out=False,
    norm="spectral",
    learn_p=False,
    sn_rtol=1e-3,
    sn_max_iters=200,
    base="normal",
    num_levels=256,
    logit_alpha=0.05,
)


def build(device):
    from flowforge.estimators import LogDetEstimator
    from flowforge.flows.resflow import ResidualFlow

    est = LogDetEstimator("roulette", n_exact_terms=2, dist="geometric", p=0.5, neumann_grad=True, mem_eff=True)
    torch.manual_seed(0)
    return ResidualFlow((3, 32, 32), estimator=est, **MODEL_KWARGS).to(device)


STEP_ITERS = 1  # the recipe's lipschitz_step_iters
STEP_METHOD = "krylov"  # the recipe's lipschitz_step_method
INIT_ITERS = 8  # the recipe's lipschitz_init_iters


def time_steps(flow, batch: int, steps: int, warmup: int, device, autocast_dtype=None) -> dict:
    from flowforge.nn.lipschitz import update_lipschitz

    opt = torch.optim.Adam(flow.parameters(), lr=1e-3, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(1)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def ctx():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    times, fb, lip, iters, losses = [], [], [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        x = torch.randint(0, 256, (batch, 3, 32, 32), generator=g).float().to(device)
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = flow.bits_per_dim(x).mean()
        loss.backward()
        opt.step()
        sync()
        t1 = time.perf_counter()
        info = update_lipschitz(flow, max_iters=STEP_ITERS, method=STEP_METHOD)
        sync()
        t2 = time.perf_counter()
        losses.append(loss.item())
        if i >= warmup:
            times.append(t2 - t0)
            fb.append(t1 - t0)
            lip.append(t2 - t1)
            iters.append(info.get("power_iterations", 0))
        print(
            f"  step {i} ({'warm-up' if i < warmup else 'timed'}): {t2 - t0:.2f} s (power iteration "
            f"{t2 - t1:.2f} s, {info.get('power_iterations')} it.), bpd {losses[-1]:.3f}",
            flush=True,
        )
    out = {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "fb": statistics.median(fb),
        "lip": statistics.median(lip),
        "iters": max(iters),
        "bpd": losses[-1],
    }
    if cuda:
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main(argv=None) -> int:
    global STEP_ITERS, STEP_METHOD
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    p.add_argument("--cpu-batch", type=int, default=4)
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU row")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N); default: torch's default")
    p.add_argument("--out", default=None, help="also write the Markdown report to this path")
    p.add_argument(
        "--step-iters",
        type=int,
        default=STEP_ITERS,
        help=f"power iterations per step at most (the recipe's lipschitz_step_iters, default {STEP_ITERS})",
    )
    p.add_argument(
        "--step-method",
        choices=["subspace", "krylov"],
        default=STEP_METHOD,
        help=f"the per-step update (the recipe's lipschitz_step_method, default {STEP_METHOD})",
    )
    args = p.parse_args(argv)
    STEP_ITERS, STEP_METHOD = args.step_iters, args.step_method
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    flow = build("cpu")
    # the recipe's count includes the two frozen roulette-distribution scalars every block stores (as the
    # reference implementation does), so count all parameters; trainable ones are reported too
    n_params = sum(p.numel() for p in flow.parameters())
    n_train = sum(p.numel() for p in flow.parameters() if p.requires_grad)
    print(
        f"parameters: {n_params:,}, trainable {n_train:,} "
        f"(expected {EXPECTED_PARAMS:,}: {'OK' if n_params == EXPECTED_PARAMS else 'MISMATCH'})",
        flush=True,
    )
    rows = []
    if not args.no_cpu:
        print(f"CPU, batch {args.cpu_batch}, threads {torch.get_num_threads()}:", flush=True)
        r = time_steps(flow, args.cpu_batch, args.steps, args.warmup, torch.device("cpu"))
        rows.append((f"CPU ({torch.get_num_threads()} threads), fp32", args.cpu_batch, r))
    gpu_note = ""
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        for label, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            print(f"CUDA {label}, batch {args.gpu_batch}:", flush=True)
            flow = build(dev)  # fresh model per configuration
            r = time_steps(flow, args.gpu_batch, args.steps, args.warmup, dev, dtype)
            rows.append((f"{torch.cuda.get_device_name(0)}, {label}", args.gpu_batch, r))
            del flow
            torch.cuda.empty_cache()
        gpu_note = (
            f"TF32: torch.backends.cuda.matmul.allow_tf32 = {torch.backends.cuda.matmul.allow_tf32}, "
            f"torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32} (library defaults left alone)"
        )
    else:
        gpu_note = "No CUDA device in this run: the batch-64 fp32 / bf16-autocast GPU rows were skipped."

    lines = [
        "# CIFAR-10 Residual Flow (experiment=resflow_cifar10): training step time",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, python {platform.python_version()}, {platform.machine()} {os.cpu_count()} CPUs",
        f"- parameters: {n_params:,} incl. frozen roulette scalars, {n_train:,} trainable "
        f"(recipe: {EXPECTED_PARAMS:,}, {'match' if n_params == EXPECTED_PARAMS else 'MISMATCH'})",
        f"- step = bits_per_dim(x).mean() + backward + Adam + update_lipschitz (rtol 1e-3, <= {STEP_ITERS} "
        f"warm-started {STEP_METHOD} iterations per step, as the recipe's lipschitz_step_iters and "
        "lipschitz_step_method; the first forward initialises each layer by Lanczos, up to 200 steps); "
        "estimator: 2 exact terms + geometric(0.5) roulette, Neumann gradient, backward-in-forward; random "
        f"integer pixels; {args.warmup} warm-up step(s), median of {args.steps} timed steps",
        f"- {gpu_note}",
        "",
        "| Device / precision | batch | median s/step | min–max s | fwd+bwd+Adam s | power iter. s "
        "| max power it. | peak GPU GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, batch, r in rows:
        peak = f"{r['peak_gb']:.1f}" if "peak_gb" in r else "—"
        lines.append(
            f"| {label} | {batch} | **{r['median']:.2f}** | {r['min']:.2f}–{r['max']:.2f} | {r['fb']:.2f} | "
            f"{r['lip']:.2f} | {r['iters']} | {peak} |"
        )
    cpu = [r for label, _, r in rows if label.startswith("CPU")]
    if cpu:
        s = cpu[0]["median"]
        lines += [
            "",
            f"CPU vs the reference implementation at batch {args.cpu_batch}: {s:.2f} / "
            f"{REFERENCE_CPU_S_PER_STEP:.0f} s = **{s / REFERENCE_CPU_S_PER_STEP:.2f}** (the reference's "
            f"~{REFERENCE_CPU_S_PER_STEP:.0f} s/step is a **published constant, not measured here**).",
        ]
    lines += ["", f"Benchmark wall time: {time.perf_counter() - t_start:.1f} s"]
    text = "\n".join(lines) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
