#!/usr/bin/env python
"""Peak memory of one Residual Flow training step against the number of log-det series terms K.

Four ways to get ``log det(I + J_g)`` and its gradient, each with the truncated series of exactly K
terms (``LogDetEstimator("power_series", n_terms=K)``, so the count is deterministic):

* naive      - backprop through all K terms (``neumann_grad=False, mem_eff=False``)
* Neumann    - the Neumann gradient series (``neumann_grad=True``)
* mem-eff    - backward-in-forward (``mem_eff=True``)
* both       - ``neumann_grad=True, mem_eff=True`` (the Residual Flows setting)

on a small image Residual Flow (default: 3x32x32, blocks_per_scale 4-4-4, 64 hidden channels, one FC
block, batch 16; LipSwish, coeff 0.98, logit preprocessing and dequantisation as in the CIFAR-10 recipe).
One measured step = ``bits_per_dim(x).mean()`` forward + backward.  One model serves every (method, K):
it gets one untimed training step first (ActNorm and power-iteration init), then only its shared
estimator's ``n_terms`` / ``neumann_grad`` / ``mem_eff`` are switched between measurements.

What is measured (CPU has no ``max_memory_allocated``): the bytes held by the autograd graph.  A
``torch.autograd.graph.saved_tensors_hooks`` pack hook records every tensor autograd saves for backward,
counting each storage once (keyed by ``untyped_storage().data_ptr()``; parameters are excluded, they live
anyway), adds it to a live counter and attaches a ``weakref.finalize`` to the small handle it returns;
when autograd frees the saved tensor the handle dies and the bytes are subtracted.  The table reports
the maximum of the live counter over forward + backward.  Not seen by the hook: temporaries that are
never saved for backward, and tensors a custom ``autograd.Function`` keeps as plain ``ctx`` attributes
(flowforge's backward-in-forward keeps the log-det gradients w.r.t. x and the block parameters that way:
about one activation plus one copy of the block's parameters per block).  On a CUDA machine the script
also reports ``torch.cuda.max_memory_allocated`` over the step minus the memory allocated before it,
which sees everything.  ``--self-check`` validates the hook on cases with a known answer.

Usage::

    python benchmarks/resflow_memory.py --self-check
    python benchmarks/resflow_memory.py                       # ~1-2 min on 2 cores
    python benchmarks/resflow_memory.py --terms 2 5 10 20 --batch 16 --out mem.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
import weakref

import torch
from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)

METHODS = {  # name -> (neumann_grad, mem_eff)
    "naive": (False, False),
    "Neumann": (True, False),
    "mem-eff": (False, True),
    "both": (True, True),
}
MB = 2.0**20


class _Saved:
    """What the pack hook hands autograd: holds the tensor; its death tells us autograd let go of it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class GraphMemory:
    """Live and peak bytes of the tensors saved by autograd inside ``with GraphMemory(...) as m:``."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live = 0
        self.peak = 0
        self.count = 0  # saved tensors packed
        self._refs: dict[int, list] = {}  # storage pointer -> [handles alive, bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        handle = _Saved(t)
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if key == 0 or key in self.exclude or nbytes == 0:
            return handle
        self.count += 1
        ref = self._refs.get(key)
        if ref is None:
            self._refs[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            ref[0] += 1
        weakref.finalize(handle, self._release, key)
        return handle

    @staticmethod
    def _unpack(handle):
        return handle.tensor

    def _release(self, key):
        ref = self._refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self._refs[key]

    def reset_peak(self):
        self.peak = self.live

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False


def self_check() -> bool:
    """The hook against cases whose saved bytes are known; returns True when all pass."""
    n = 1000
    b = 4 * n  # float32
    ok = True

    def case(name, fn, expect_peak, exclude=()):
        nonlocal ok
        with GraphMemory(exclude=exclude) as m:
            loss = fn()
            during = m.live
            loss.backward()
        del loss
        import gc

        gc.collect()
        good = m.peak == expect_peak and m.live == 0
        ok &= good
        print(
            f"  {'PASS' if good else 'FAIL'} {name}: peak {m.peak} B (expected {expect_peak}), live before "
            f"backward {during} B, after backward {m.live} B (expected 0)"
        )

    x = torch.randn(n, requires_grad=True)
    w = torch.randn(n, requires_grad=True)
    case("(x*w).sum() saves x and w", lambda: (x * w).sum(), 2 * b)
    case("(x*x).sum() saves x twice, one storage", lambda: (x * x).sum(), b)
    case("(x*w).exp().sum() saves x, w and exp's output", lambda: (x * w).exp().sum(), 3 * b)
    case("(x[:500]*w[:500]).sum(): views count their whole storage", lambda: (x[:500] * w[:500]).sum(), 2 * b)
    case("(x*w).sum() with w excluded (a parameter)", lambda: (x * w).sum(), b, exclude=(w,))
    lin = torch.nn.Linear(n, 10)
    xb = torch.randn(8, n)
    case(
        "Linear(1000->10) on (8,1000), params excluded, saves the input",
        lambda: lin(xb).pow(2).sum(),
        4 * 8 * n + 4 * 8 * 10,
        exclude=tuple(lin.parameters()),
    )
    return ok


def build(method: str, k: int, args, device="cpu"):
    from flowforge.estimators import LogDetEstimator
    from flowforge.flows.resflow import ResidualFlow

    ng, me = METHODS[method]
    est = LogDetEstimator("power_series", n_terms=k, neumann_grad=ng, mem_eff=me)
    torch.manual_seed(args.seed)
    return ResidualFlow(
        tuple(args.shape),
        estimator=est,
        blocks_per_scale=args.blocks,
        channels=args.channels,
        fc_blocks=args.fc_blocks,
        fc_hidden=args.fc_hidden,
        act="lipswish",
        coeff=0.98,
        num_levels=256,
        logit_alpha=0.05,
    ).to(device)


def prepare(x: torch.Tensor, args):
    """One model (and one estimator object shared by all its blocks) for every (method, K): built once,
    given one untimed training step (ActNorm and power-iteration init), then only the estimator's
    ``n_terms`` / ``neumann_grad`` / ``mem_eff`` change between measurements (no optimizer steps)."""
    from flowforge.nn.lipschitz import update_lipschitz

    flow = build("naive", args.terms[0], args, x.device)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    flow.bits_per_dim(x).mean().backward()
    opt.step()
    update_lipschitz(flow)
    flow.zero_grad(set_to_none=True)
    ests = {id(m.logdet_estimator): m.logdet_estimator for m in flow.modules() if hasattr(m, "logdet_estimator")}
    if len(ests) != 1:
        raise RuntimeError(f"expected one shared estimator, found {len(ests)}")
    return flow, next(iter(ests.values()))


def measure(flow, est, method: str, k: int, x: torch.Tensor) -> dict:
    est.neumann_grad, est.mem_eff = METHODS[method]
    est.n_terms = k
    params = list(flow.parameters())
    flow.zero_grad(set_to_none=True)
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with GraphMemory(exclude=params) as m:
        loss = flow.bits_per_dim(x).mean()
        fwd_live = m.live
        loss.backward()
    out = {
        "graph_peak": m.peak,
        "after_forward": fwd_live,
        "leaked": m.live,
        "saved": m.count,
        "seconds": time.perf_counter() - t0,
    }
    if cuda:
        torch.cuda.synchronize()
        out["cuda_peak"] = torch.cuda.max_memory_allocated() - base
    flow.zero_grad(set_to_none=True)
    return out


def report(results, args, wall, device) -> str:
    ks = args.terms
    cuda = device.type == "cuda"
    lines = [
        "# Residual Flow: peak memory of one training step vs series terms K",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, python "
        f"{platform.python_version()}, {platform.machine()} {os.cpu_count()} CPUs",
        f"- model: ResidualFlow{tuple(args.shape)}, blocks_per_scale {args.blocks}, channels {args.channels}, "
        f"fc_blocks {args.fc_blocks} x {args.fc_hidden}, LipSwish, coeff 0.98; batch {args.batch}; "
        f"log-det: power series with exactly K terms, 1 Gaussian probe; step = bits_per_dim forward + backward",
        "- cell: peak MB held by the autograd graph (saved tensors, parameters excluded; see the script's "
        "docstring for what this does not see)",
        "",
        "| Method | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for method in METHODS:
        cells = [f"{results[(method, k)]['graph_peak'] / MB:.1f}" for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if cuda:
        lines += [
            "",
            "CUDA `max_memory_allocated` during the step minus memory allocated before it (MB):",
            "",
            "| Method | " + " | ".join(f"K={k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for method in METHODS:
            cells = [f"{results[(method, k)]['cuda_peak'] / MB:.1f}" for k in ks]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "| Check | value | target |", "|---|---|---|"]
    kref = 10 if 10 in ks else ks[len(ks) // 2]
    for key, label in (("graph_peak", "graph"),) + ((("cuda_peak", "CUDA"),) if cuda else ()):
        r = results[("both", kref)][key] / results[("naive", kref)][key]
        lines.append(f"| both / naive at K={kref} ({label}) | **{r:.3f}** | <= 0.2 |")
        both = [results[("both", k)][key] for k in ks]
        lines.append(f"| both: max / min over K={ks} ({label}) | {max(both) / min(both):.2f} | ~1 (flat in K) |")
    lines += [
        "",
        "Seconds per measured step (forward + backward, with the hook on):",
        "",
        "| Method | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(f"{results[(method, k)]['seconds']:.2f}" for k in ks) + " |")
    leaks = {key: r["leaked"] for key, r in results.items() if r["leaked"]}
    if leaks:
        lines += ["", f"WARNING: saved tensors still alive after backward: {leaks}"]
    lines += ["", f"Benchmark wall time: {wall:.1f} s"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--terms", type=int, nargs="+", default=[2, 5, 10, 20], help="series terms K (default 2 5 10 20)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 4, 4], help="blocks per scale (default 4 4 4)")
    p.add_argument("--channels", type=int, default=64, help="hidden channels of the conv nets (default 64)")
    p.add_argument("--fc-blocks", type=int, default=1)
    p.add_argument("--fc-hidden", type=int, nargs="+", default=[128, 128])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N); default: torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--self-check", action="store_true", help="validate the saved-tensor hook and exit")
    p.add_argument("--out", default=None, help="also write the Markdown report to this path")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.self_check:
        print("saved-tensor hook self-check:")
        ok = self_check()
        print("all passed" if ok else "SELF-CHECK FAILED")
        return 0 if ok else 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (args.batch, *args.shape), generator=g).float().to(device)
    flow, est = prepare(x, args)
    results = {}
    for k in args.terms:
        for method in args.methods:
            r = measure(flow, est, method, k, x)
            results[(method, k)] = r
            print(f"{method:8s} K={k:2d}: graph peak {r['graph_peak'] / MB:8.1f} MB, {r['seconds']:.1f} s", flush=True)
    if set(args.methods) != set(METHODS):
        print("note: the table needs all four methods; run without --methods for the report")
        return 0
    text = report(results, args, time.perf_counter() - t0, device)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
