#!/usr/bin/env python
"""One GPU verification command: step time, peak memory, host syncs, DDP and bf16 training on one table.

``python benchmarks/gpu_check.py`` on a machine with a CUDA GPU runs, each part within its own time budget
(the whole run stays under 8 minutes), and prints one Markdown table:

* **step time and peak memory** of the ResFlow, Monotone, Glow and FFJORD CIFAR-10 recipes
  (``conf/experiment/{resflow,monotone,glow,ffjord}_cifar10.yaml``) and the TarFlow ImageNet 64 recipe
  (``tarflow_imagenet64``), the model at the recipe's real size, at batch ``--batch``, default 64 (TarFlow: at most
  8) in three modes: fp32; bf16-mixed (the forward under
  ``torch.autocast("cuda", dtype=torch.bfloat16)``, as Lightning's ``precision=bf16-mixed`` does); and compiled
  (the training loss ``model.bits_per_dim(x).mean()`` wrapped in ``torch.compile``, fp32).  One step is the
  loss, backward, an Adam step and, for residual models, the recipe's per-step power iteration
  (``update_lipschitz`` with ``lipschitz_step_iters`` and ``lipschitz_step_method``).  The step time is the
  median of the timed steps after the warm-up steps; the peak memory is ``torch.cuda.max_memory_allocated`` over
  the mode's steps.
* **host syncs per step**: one step run under ``torch.cuda.set_sync_debug_mode("warn")``, the warnings counted,
  split into the training step (loss, backward, Adam) and the power-iteration update after it.
* **DDP smoke**: ``train.py`` with 2 processes (NCCL) on a small Glow and fake CIFAR-10 files, when
  ``torch.cuda.device_count() >= 2``; otherwise the row says it was skipped.
* **bits/dim after 200 steps** of a small Glow on fake CIFAR-10 files (``flowforge.data.fake``), trained in
  fp32 and in bf16-mixed from the same initialisation and batches, evaluated in fp32 on the test split.

A part that fails or runs out of its budget puts the error in its cell and the script goes on.  Each model's
modes run in a worker process, killed when a mode overruns its budget, so that an interrupted compile cannot
break the parts after it.  Without a GPU
the script refuses, unless given ``--device cpu --tiny``: a dry run of every part at toy sizes on the CPU
(the recipes shrunk as ``smoke=true`` shrinks them, batch 8, 2 training steps for the bits/dim row, compile
with the ``eager`` backend) that checks the command end to end in well under a minute.

Usage::

    python benchmarks/gpu_check.py                      # one GPU: < 8 min
    python benchmarks/gpu_check.py --out gpu_check.md   # also write the table to a file
    python benchmarks/gpu_check.py --models glow resflow --modes fp32 bf16-mixed
    python benchmarks/gpu_check.py --device cpu --tiny  # dry run on the CPU (< 1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from _configs import compose  # benchmarks/_configs.py (scripts run as python benchmarks/<name>.py)
from _report import emit

ROOT = Path(__file__).resolve().parents[1]

#: table name -> experiment recipe
RECIPES = {
    "ResFlow": "resflow_cifar10",
    "Monotone": "monotone_cifar10",
    "Glow": "glow_cifar10",
    "FFJORD": "ffjord_cifar10",
    "TarFlow": "tarflow_imagenet64",
}
#: a smaller batch for the recipes whose activations at --batch would not fit one GPU (TarFlow ImageNet 64: 1024
#: tokens through 64 transformer layers of width 768)
MAX_BATCH = {"TarFlow": 8}
MODES = ("fp32", "bf16-mixed", "compiled")
#: the small model of the bits/dim and DDP rows (overrides on top of experiment=glow_cifar10)
SMALL_GLOW = ["model.num_scales=3", "model.num_steps=8", "model.channels=128"]
TINY_GLOW = ["model.num_scales=2", "model.num_steps=2", "model.channels=16"]


class Budget(Exception):
    """A part ran past its time budget."""


@contextlib.contextmanager
def budget(seconds: float | None):
    """Raise :class:`Budget` in the main thread when the block runs longer than ``seconds`` (SIGALRM)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    fired = []

    def _alarm(signum, frame):
        fired.append(True)
        raise Budget(f"over its {seconds:.3g} s budget")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Exception as e:
        # code interrupted by the alarm may swallow the Budget and fail with an unrelated error of its own
        # (torch.compile does: a half-traced frame surfaces as a KeyError); the alarm is still the cause
        if fired and not isinstance(e, Budget):
            raise Budget(f"over its {seconds:.3g} s budget") from e
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_cell(e: BaseException) -> str:
    """The table cell of a failed part: the error's type and first line (a budget overrun however wrapped)."""
    cause = e
    while cause is not None:
        if isinstance(cause, Budget):
            msg = (str(cause).strip().splitlines() or ["over its budget"])[0]
            return msg if msg.startswith("skipped") else "error: " + msg
        cause = cause.__cause__ or cause.__context__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    text = text.replace("|", "/")
    return "error: " + (text[:140] + "..." if len(text) > 140 else text)


# ----------------------------------------------------------------------------------------------- configs
def recipe_config(recipe: str, tiny: bool, extra: list[str] = ()):
    cfg = compose([f"experiment={recipe}", *extra])
    if tiny:
        from flowforge.smoke import shrink

        shrink(cfg)
    return cfg


def build_model(cfg, device):
    """The recipe's flow with its dequantisation, on ``device``."""
    from flowforge.experiment import apply_dequantization, instantiate

    torch.manual_seed(0)
    model = instantiate(cfg.model)
    apply_dequantization(cfg, model)
    return model.to(device)


def has_lipschitz(model) -> bool:
    from flowforge.nn.lipschitz import lipschitz_layers

    return bool(lipschitz_layers(model))


# ----------------------------------------------------------------------------------------------- timing
class Stepper:
    """One training step of a flow: loss (optionally autocast or compiled), backward, Adam, power iteration."""

    def __init__(self, model, mode: str, lip_iters, compile_backend: str, lip_method: str = "subspace"):
        from flowforge.nn.lipschitz import update_lipschitz

        self.model = model
        self.mode = mode
        self.device = next(model.parameters()).device
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.lip = has_lipschitz(model)
        self.lip_iters = lip_iters
        self.lip_method = lip_method
        self.update_lipschitz = update_lipschitz

        def loss_fn(x):
            return model.bits_per_dim(x).mean()

        self.loss_fn = torch.compile(loss_fn, backend=compile_backend) if mode == "compiled" else loss_fn

    def autocast(self):
        if self.mode != "bf16-mixed":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_part(self, x):
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(x)
        loss.backward()
        self.opt.step()
        return loss

    def lip_part(self):
        if self.lip:
            self.update_lipschitz(self.model, max_iters=self.lip_iters, method=self.lip_method)

    def step(self, x):
        loss = self.train_part(x)
        self.lip_part()
        return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(fn) -> int:
    """Host-device synchronisations ``fn()`` makes, counted from ``torch.cuda.set_sync_debug_mode("warn")``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.set_sync_debug_mode(0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def random_pixels(batch: int, shape, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *shape), generator=g).float().to(device)


def time_mode(cfg, mode: str, args, device) -> dict:
    """Step time, peak memory and sync counts of one recipe in one mode."""
    from flowforge.flows.base import initialize

    model = build_model(cfg, device)
    shape = tuple(cfg.dataset.get("shape") or (3, 32, 32))
    if hasattr(model, "shape"):
        shape = tuple(model.shape)
    x0 = random_pixels(args.batch, shape, device, 0)
    lip_iters = cfg.get("lipschitz_step_iters")
    # the data-dependent initialisation, once, outside the timed and compiled step
    initialize(model, x0, run=lambda x: model.bits_per_dim(x))
    stepper = Stepper(model, mode, lip_iters, args.compile_backend, cfg.get("lipschitz_step_method", "subspace"))
    out = {"params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        stepper.step(random_pixels(args.batch, shape, device, 1 + i))
    sync(device)
    if mode == "compiled":
        out["compile_s"] = time.perf_counter() - t0
    times = []
    loss = None
    t_end = time.perf_counter() + args.step_time
    for i in range(args.steps):
        x = random_pixels(args.batch, shape, device, 100 + i)
        sync(device)
        t = time.perf_counter()
        loss = stepper.step(x)
        sync(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() > t_end:
            break
    out["ms"] = 1e3 * statistics.median(times)
    out["n"] = len(times)
    out["loss"] = float(loss.detach())
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        x = random_pixels(args.batch, shape, device, 999)
        sync(device)
        out["sync_train"] = count_syncs(lambda: stepper.train_part(x))
        out["sync_lip"] = count_syncs(stepper.lip_part) if stepper.lip else 0
    return out


# ----------------------------------------------------------------------------------------------- isolation
#: seconds a fresh worker process may take to compose its recipe before its first mode starts
WORKER_START_S = 120.0


def configure(args) -> None:
    """Process-wide settings of a run, in the main process and in every worker."""
    if not args.donated_buffers:
        import torch._functorch.config as functorch_config

        # backward-in-forward (the residual recipes' mem_eff estimator) calls autograd.grad inside the compiled
        # loss, which AOTAutograd's donated buffers refuse ("requires create_graph=False and retain_graph=False")
        functorch_config.donated_buffer = False
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def mode_worker(conn, name: str, recipe: str, modes: list[str], args, device_type: str) -> None:
    """A worker process: compose ``recipe``, then time ``modes`` in order, reporting over ``conn``.

    Messages: ``("start", mode, None)`` before a mode; ``("done", mode, result)`` or ``("error", mode, cell)``
    after it; ``("config_error", None, cell)`` when the recipe does not compose.
    """
    configure(args)
    device = torch.device(device_type)
    try:
        cfg = recipe_config(recipe, args.tiny)
    except Exception as e:  # noqa: BLE001  (the row reports it)
        conn.send(("config_error", None, error_cell(e)))
        return
    for mode in modes:
        conn.send(("start", mode, None))
        print(f"{name} {mode} ...", flush=True)
        try:
            conn.send(("done", mode, time_mode(cfg, mode, args, device)))
        except Exception as e:  # noqa: BLE001
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                traceback.print_exc()
            conn.send(("error", mode, error_cell(e)))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_modes(name: str, recipe: str, modes, args, device, part_budget) -> dict[str, dict | str]:
    """Each mode's :func:`time_mode` result, or its error cell, timed in worker processes.

    A mode over its budget (``part_budget(args.mode_budget)`` seconds from its start) has its worker killed, and
    a fresh worker runs the modes after it; so does a worker that dies (a crash, the out-of-memory killer).  A
    compile or a CUDA context cut short in one part thus never leaves state behind for the next: an interrupted
    ``torch.compile`` can leave dynamo's caches in a state that fails later, unrelated models.  Workers are forked
    from a server that has imported torch and flowforge once (``forkserver``: CUDA is initialised in the workers
    only).
    """
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "flowforge.experiment"])
    out: dict[str, dict | str] = {}
    pending = list(modes)
    while pending:
        try:
            limit = part_budget(WORKER_START_S)
        except Budget as e:
            out.update({m: error_cell(e) for m in pending})
            break
        conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=mode_worker, args=(child_conn, name, recipe, list(pending), args, device.type), daemon=True
        )
        proc.start()
        child_conn.close()
        current = None
        deadline = time.monotonic() + limit
        try:
            while pending:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    victim = current or pending[0]
                    out[victim] = (
                        f"error: over its {limit:.3g} s budget"
                        if current
                        else f"error: the worker process did not start within {limit:.3g} s"
                    )
                    pending.remove(victim)
                    break
                try:
                    kind, mode, payload = conn.recv()
                except EOFError:
                    proc.join(10)
                    victim = current or pending[0]
                    out[victim] = f"error: the worker process died (exit code {proc.exitcode})"
                    pending.remove(victim)
                    break
                if kind == "config_error":
                    out.update({m: payload for m in pending})
                    pending.clear()
                elif kind == "start":
                    try:
                        limit = part_budget(args.mode_budget)
                    except Budget as e:
                        out.update({m: error_cell(e) for m in pending})
                        pending.clear()
                        break
                    current = mode
                    deadline = time.monotonic() + limit
                else:  # "done" or "error"
                    out[mode] = payload
                    pending.remove(mode)
                    current = None
                    deadline = time.monotonic() + WORKER_START_S
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(30)
            conn.close()
    return out


# ----------------------------------------------------------------------------------------------- bits/dim
def fake_cifar10(root: Path, n: int) -> list[str]:
    from flowforge.data import fake

    fake.write_fake_datasets(root, ["cifar10"], n=n)
    return [f"paths.data_dir={root}", *fake.hydra_overrides("cifar10", n)]


def train_bpd(cfg, precision: str, steps: int, device, seed: int = 0) -> float:
    """Train the configured flow ``steps`` steps (Adam, recipe lr) in ``precision``; the test split's bits/dim
    in fp32 (mean over examples)."""
    from flowforge.experiment import build, instantiate
    from flowforge.flows.base import initialize
    from flowforge.nn.lipschitz import update_lipschitz
    from flowforge.training.module import build_optimizer

    torch.manual_seed(seed)
    datamodule, module = build(cfg)
    model = module.model.to(device)
    datamodule.prepare_data()
    datamodule.setup("fit")
    opt = build_optimizer(instantiate(cfg.optim.optimizer), model.parameters(), precision)  # as training resolves it
    lip = has_lipschitz(model)
    lip_iters = cfg.get("lipschitz_step_iters")
    torch.manual_seed(seed + 1)
    step = 0
    while step < steps:
        for batch in datamodule.train_dataloader():
            x = module.batch_input(batch).to(device)
            if step == 0:
                initialize(model, x, run=lambda v: model.bits_per_dim(v))
            opt.zero_grad(set_to_none=True)
            ctx = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if precision == "bf16-mixed"
                else contextlib.nullcontext()
            )
            with ctx:
                loss = model.bits_per_dim(x).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.trainer.gradient_clip_val or 1e9))
            opt.step()
            if lip:
                update_lipschitz(model, max_iters=lip_iters, method=cfg.get("lipschitz_step_method", "subspace"))
            step += 1
            if step >= steps:
                break
    datamodule.setup("test")
    model.eval()
    total, count = 0.0, 0
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            x = module.batch_input(batch, "test").to(device)
            bpd = model.bits_per_dim(x)
            total += float(bpd.double().sum())
            count += bpd.shape[0]
    return total / count


# ----------------------------------------------------------------------------------------------- DDP
def ddp_smoke(data_overrides: list[str], run_dir: Path, timeout: float, tiny: bool) -> str:
    """``train.py`` with 2 NCCL processes on a small Glow for 3 steps; returns the cell text."""
    cmd = [
        sys.executable,
        "train.py",
        "experiment=glow_cifar10",
        "trainer=ddp",
        "++trainer.devices=2",
        "++trainer.max_steps=3",
        "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "callbacks.sample_figures.every_n_epochs=100",
        "dataset.batch_size=16",
        f"hydra.run.dir={run_dir}",
        *(TINY_GLOW if tiny else SMALL_GLOW),
        *data_overrides,
    ]
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        tail = (errors or lines or ["no output"])[-1].strip()
        return error_cell(RuntimeError(f"train.py exit {proc.returncode}: {tail}"))
    metrics = run_dir / "metrics.json"
    note = ""
    if metrics.exists():
        import json

        m = json.loads(metrics.read_text())
        bpd = m.get("test/bpd", m.get("test/loss"))
        if bpd is not None:
            note = f", test {float(bpd):.3f}"
    return f"ok ({wall:.0f} s{note})"


# ----------------------------------------------------------------------------------------------- table
def fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def header_lines(device) -> list[str]:
    lines = [
        "- device: "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"),
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, "
        f"python {platform.python_version()}",
    ]
    if device.type == "cuda":
        lines.append(
            f"- GPUs: {torch.cuda.device_count()}; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy sizes (the dry run; required with --device cpu)")
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--batch", type=int, default=None, help="images per step (default 64; 8 with --tiny)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (compilation happens here)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode at most")
    p.add_argument("--step-time", type=float, default=None, help="stop timing a mode after this many seconds")
    p.add_argument("--mode-budget", type=float, default=None, help="seconds per (model, mode) part (default 40)")
    p.add_argument("--bpd-steps", type=int, default=None, help="training steps of the bits/dim row (default 200)")
    p.add_argument("--bpd-budget", type=float, default=None, help="seconds per bits/dim run (default 60)")
    p.add_argument("--ddp-budget", type=float, default=150.0, help="seconds for the DDP smoke run")
    p.add_argument(
        "--total-budget",
        type=float,
        default=450.0,
        help="seconds for the whole run: each part gets at most what is left (default 450)",
    )
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; eager with --tiny)")
    p.add_argument(
        "--donated-buffers",
        action="store_true",
        help="keep torch.compile's donated backward buffers on (torch's default; the residual recipes then fail)",
    )
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check.py needs a CUDA GPU, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine, or use "
            "`--device cpu --tiny` for a dry run of every part at toy sizes on the CPU.",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu" and not args.tiny:
        print("--device cpu runs only the dry mode: add --tiny (the recipes at real size need a GPU).", file=sys.stderr)
        return 2
    tiny = args.tiny
    device = torch.device(args.device)
    args.batch = args.batch or (8 if tiny else 64)
    args.step_time = args.step_time or (5.0 if tiny else 15.0)
    args.mode_budget = args.mode_budget or (20.0 if tiny else 40.0)
    args.bpd_steps = args.bpd_steps if args.bpd_steps is not None else (2 if tiny else 200)
    args.bpd_budget = args.bpd_budget or (30.0 if tiny else 60.0)
    args.compile_backend = args.compile_backend or ("eager" if tiny else "inductor")
    if tiny:
        args.steps = min(args.steps, 2)
        args.warmup = min(args.warmup, 1)
    configure(args)
    t_start = time.perf_counter()

    def part_budget(seconds: float) -> float:
        """The part's budget, cut to what is left of the total; raises Budget when nothing is left."""
        left = args.total_budget - (time.perf_counter() - t_start)
        if left < 1:
            raise Budget(f"skipped: the run's {args.total_budget:.0f} s total budget is spent")
        return min(seconds, left)

    for line in header_lines(device):
        print(line, flush=True)

    rows: list[list[str]] = []
    size = "smoke size" if tiny else "recipe size"
    for name in args.models:
        recipe = RECIPES[name]
        model_args = copy.copy(args)
        model_args.batch = min(args.batch, MAX_BATCH.get(name, args.batch))
        label = f"{name} ({recipe}, {size}, batch {model_args.batch})"
        cells = {k: {} for k in ("ms", "mem", "sync")}
        notes = []
        results = run_modes(name, recipe, args.modes, model_args, device, part_budget)
        for mode in args.modes:
            r = results[mode]
            if isinstance(r, str):
                for k in cells:
                    cells[k][mode] = r
                print(f"  {name} {mode}: {r}", flush=True)
                continue
            cells["ms"][mode] = f"{r['ms']:.1f}"
            if "params" in r and not any(n.startswith("params") for n in notes):
                notes.append(f"params {r['params']:,}")
            if "compile_s" in r:
                notes.append(f"compile + warm-up {r['compile_s']:.0f} s")
            if r["loss"] != r["loss"] or abs(r["loss"]) == float("inf"):
                notes.append(f"{mode}: non-finite loss")
            cells["mem"][mode] = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "n/a (CPU)"
            cells["sync"][mode] = f"{r['sync_train']} + {r['sync_lip']}" if "sync_train" in r else "n/a (CPU)"
            print(f"  {name} {mode}: {r}", flush=True)
        for key, what in (("ms", "step time (ms)"), ("mem", "peak memory (GiB)"), ("sync", "host syncs per step")):
            row = [what, label] + [cells[key].get(m, "-") for m in MODES]
            row.append("; ".join(notes) if key == "ms" else ("train step + power iteration" if key == "sync" else ""))
            rows.append(row)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        data_overrides: list[str] = []
        try:
            data_overrides = fake_cifar10(tmp / "data", 64 if tiny else 1024)
            data_error = None
        except Exception as e:  # noqa: BLE001
            data_error = error_cell(e)

        # bits/dim after N steps, fp32 vs bf16-mixed
        glow = TINY_GLOW if tiny else SMALL_GLOW
        label = f"Glow small ({', '.join(o.split('.', 1)[1] for o in glow)}), fake CIFAR-10, batch {16 if tiny else 64}"
        bpd = {}
        for precision in ("fp32", "bf16-mixed"):
            print(f"bits/dim {precision} ...", flush=True)
            if data_error:
                bpd[precision] = data_error
                continue
            try:
                cfg = compose(
                    ["experiment=glow_cifar10", *glow, *data_overrides, f"dataset.batch_size={16 if tiny else 64}"]
                )
                with budget(part_budget(args.bpd_budget)):
                    bpd[precision] = f"{train_bpd(cfg, precision, args.bpd_steps, device):.4f}"
            except Exception as e:  # noqa: BLE001
                if os.environ.get("GPU_CHECK_TRACEBACK"):
                    traceback.print_exc()
                bpd[precision] = error_cell(e)
            print(f"  {bpd[precision]}", flush=True)
        note = ""
        try:
            note = f"bf16 - fp32 = {float(bpd['bf16-mixed']) - float(bpd['fp32']):+.4f}; test split in fp32"
        except ValueError:
            note = "test split in fp32"
        rows.append([f"bits/dim after {args.bpd_steps} steps", label, bpd["fp32"], bpd["bf16-mixed"], "-", note])

        # DDP smoke
        n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
        if n_gpu >= 2 and not data_error:
            print("DDP smoke ...", flush=True)
            try:
                ddp = ddp_smoke(data_overrides, tmp / "ddp_run", part_budget(args.ddp_budget), tiny)
            except subprocess.TimeoutExpired as e:
                ddp = f"error: over its {e.timeout:.0f} s budget"
            except Exception as e:  # noqa: BLE001
                ddp = error_cell(e)
        elif data_error:
            ddp = data_error
        else:
            ddp = f"skipped, {n_gpu} GPU" if device.type == "cuda" else "skipped, CPU dry run (no GPU)"
        rows.append(
            ["DDP 2-process (NCCL) smoke", "train.py experiment=glow_cifar10, small Glow, 3 steps", ddp, "-", "-", ""]
        )

    total = time.perf_counter() - t_start
    lines = [
        "# GPU check" + (" (CPU dry run, toy sizes)" if tiny else ""),
        "",
        *header_lines(device),
        f"- batch {args.batch} for the step rows; {args.warmup} warm-up steps, then the median of up to {args.steps} "
        f"timed steps; compile backend {args.compile_backend}, donated buffers "
        f"{'on' if args.donated_buffers else 'off'}; total {total:.0f} s",
        '- host syncs: `torch.cuda.set_sync_debug_mode("warn")` warnings in one step, counted as training step '
        "+ power iteration",
        "",
        "| check | model | fp32 | bf16-mixed | compiled | notes |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    text = "\n".join(lines) + "\n"
    print()
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
