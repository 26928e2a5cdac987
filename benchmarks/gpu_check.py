"""One GPU verification command: ``python benchmarks/gpu_check.py [--out gpu_check.md]``.

Prints one Markdown table for the ResFlow, Monotone, Glow and FFJORD CIFAR-10 recipes
(``conf/experiment/*_cifar10.yaml``, models at their real size, ``--batch`` images per step): median step
time and peak memory (``torch.cuda.max_memory_allocated``) of the training loss's forward + backward +
Adam step in fp32, under ``torch.autocast("cuda", torch.bfloat16)`` (what Lightning's ``bf16-mixed``
does) and with the loss compiled by ``torch.compile``; the number of host-device synchronisations in one
fp32 step (``torch.cuda.set_sync_debug_mode("warn")``, warnings counted); a 2-process DDP (NCCL) smoke
run of train.py when two GPUs exist; and bits/dim after ``--bpd-steps`` steps of a small Glow on fake
CIFAR-10 files in fp32 and bf16-mixed. Every part has its own time budget and a failing part puts its
error in its row; the script goes on.

Without a GPU it refuses, unless given ``--device cpu --tiny``: a dry mode that runs every part at a toy
size on the CPU (used by tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["resflow_cifar10", "monotone_cifar10", "glow_cifar10", "ffjord_cifar10"]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


def build_model(recipe: str, tiny: bool):
    from flowforge import experiment

    cfg = compose([f"experiment={recipe}"])
    if tiny:
        from flowforge.smoke import shrink

        cfg = shrink(cfg)
    model = experiment.instantiate(cfg.model)
    return model


def image_batch(batch: int, device) -> torch.Tensor:
    # dequantised pixels in the unit cube, as the data module hands them to the model
    return (
        torch.randint(0, 256, (batch, 3, 32, 32), device=device).float() + torch.rand(batch, 3, 32, 32, device=device)
    ) / 256


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_stats(model, x, device, mode: str, steps: int, warmup: int, budget: float) -> str:
    """Median step time and peak memory of ``mode`` (fp32, bf16, compiled)."""
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def loss_fn(x):
        return -model.log_prob(x).mean()

    fn = torch.compile(loss_fn) if mode == "compiled" else loss_fn
    times = []
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    if not times:
        return f"over budget ({budget:.0f} s) in warm-up"
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (cpu)"
    return f"{statistics.median(times) * 1000:.0f} ms, {mem}"


def sync_count(model, x, device) -> str:
    if device.type != "cuda":
        return "n/a (cpu)"
    model = model.to(device).train()
    with torch.no_grad():
        model.log_prob(x)  # data-dependent initialisation outside the counted step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = -model.log_prob(x).mean()
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return str(sum("synchroniz" in str(w.message) for w in caught))


def guarded(fn, *args, **kwargs) -> str:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # one part failing must not stop the others
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def train_run(args, overrides, budget) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=budget,
    )


def fake_data(folder: Path) -> None:
    from flowforge.data.fake import write_fake_datasets

    write_fake_datasets(folder, datasets=["cifar10"])


def bpd_run(args, precision: str, data: Path, out: Path) -> str:
    steps = 3 if args.tiny else args.bpd_steps
    accel = "cpu" if args.device == "cpu" else "gpu"
    overrides = [
        "experiment=glow_cifar10",
        "model.num_scales=2",
        "model.num_steps=2",
        f"model.channels={8 if args.tiny else 64}",
        f"paths.data_dir={data}",
        "++dataset.verify_checksums=false",
        "++dataset.val_size=16",
        f"trainer.max_steps={steps}",
        f"trainer.accelerator={accel}",
        "trainer.devices=1",
        f"++trainer.precision={precision}",
        f"hydra.run.dir={out}",
    ] + (["smoke=true"] if args.tiny else [])
    proc = train_run(args, overrides, args.part_budget)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "HYDRA_FULL_ERROR" not in ln] or ["?"]
        return "error: " + lines[-1][:160]
    for line in reversed(proc.stdout.splitlines() + proc.stderr.splitlines()):
        if "bpd" in line:
            return line.strip()[-80:]
    return "finished (no bpd line found)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes (dry mode, with --device cpu)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--part-budget", type=float, default=60.0, help="seconds per part")
    p.add_argument("--bpd-steps", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible. Run it on a GPU machine, or use --device cpu --tiny for the dry run.",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu" and not args.tiny:
        print("gpu_check: --device cpu is only the dry mode; add --tiny.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.tiny:
        args.batch, args.steps, args.warmup = 2, 1, 1
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    lines = [
        f"device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}",
        "",
        f"| part | result (batch {args.batch}) |",
        "|---|---|",
    ]
    for recipe in RECIPES:
        for mode in ("fp32", "bf16", "compiled"):
            if args.tiny and mode == "compiled":
                lines.append(f"| {recipe} {mode} | skipped (tiny: compiling takes minutes on a CPU) |")
                continue

            def one(recipe=recipe, mode=mode):
                torch.manual_seed(0)
                model = build_model(recipe, args.tiny)
                return step_stats(
                    model, image_batch(args.batch, device), device, mode, args.steps, args.warmup, args.part_budget
                )

            lines.append(f"| {recipe} {mode} | {guarded(one)} |")
        syncs = guarded(lambda r=recipe: sync_count(build_model(r, args.tiny), image_batch(args.batch, device), device))
        lines.append(f"| {recipe} syncs/step | {syncs} |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        guarded(fake_data, tmp / "data")
        if device.type == "cuda" and torch.cuda.device_count() >= 2:

            def ddp():
                proc = train_run(
                    args,
                    [
                        "experiment=glow_cifar10",
                        "model.num_scales=2",
                        "model.num_steps=2",
                        "model.channels=32",
                        f"paths.data_dir={tmp / 'data'}",
                        "++dataset.verify_checksums=false",
                        "++dataset.val_size=16",
                        "trainer.max_steps=5",
                        "trainer.accelerator=gpu",
                        "trainer.devices=2",
                        "+trainer.strategy=ddp",
                        f"hydra.run.dir={tmp / 'ddp'}",
                    ],
                    args.part_budget,
                )
                return (
                    "ok" if proc.returncode == 0 else "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
                )

            lines.append(f"| DDP 2 x NCCL smoke | {guarded(ddp)} |")
        else:
            lines.append("| DDP 2 x NCCL smoke | skipped (fewer than 2 GPUs) |")
        for precision in ("32", "bf16-mixed"):
            bpd = guarded(bpd_run, args, precision, tmp / "data", tmp / precision)
            lines.append(f"| bits/dim glow fake CIFAR-10 {precision} | {bpd} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
