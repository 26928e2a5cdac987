#!/usr/bin/env python
"""What conditioning costs an unconditional model: flowforge at a git revision without the context argument against
the working tree, side by side in one run.

Every transform takes ``context=None`` and the :class:`~flowforge.flows.model.Flow` checks and embeds a context
before its layers run; an unconditional model must pay nothing measurable for that.  This script unpacks ``src/`` and
``conf/`` of ``--before`` (a git revision, default the last one whose transforms took no context) into a temporary
folder and times, for each model, one training step ``loss = -log_prob(x).mean(); backward(); Adam.step()`` under
each version: a fresh worker process per (version, model, round), composed from that version's own configs with
the same overrides and the same seed, so both build the same network.  The versions take turns for ``--rounds``
rounds (the order swapped every round); each worker runs ``--warmup`` untimed steps, then ``--steps`` timed ones,
and reports their median.  The table gives the median over rounds of each version and the ratio after / before
(1.00: no cost), with the parameter counts (equal: the unconditional model is unchanged).

Models (small, CPU-sized; one thread per worker): RealNVP, MAF, NSF and Residual Flow on 2-D checkerboard points
(batch 500), Glow on 8x8 digits (batch 64).

Usage::

    python benchmarks/conditional_overhead.py                      # ~3 min on 2 cores
    python benchmarks/conditional_overhead.py --rounds 7 --out conditional_overhead.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import emit  # noqa: E402

#: the last revision whose transforms took no context argument
BEFORE = "5c6676c"

MODELS = {
    "realnvp": ["model=realnvp", "dataset=toy2d", "dataset.batch_size=500"],
    "maf": ["model=maf", "dataset=toy2d", "dataset.batch_size=500"],
    "nsf": ["model=nsf", "dataset=toy2d", "dataset.batch_size=500"],
    "resflow": ["experiment=resflow_toy", "dataset.batch_size=500"],
    "glow": ["model=glow", "dataset=digits", "dataset.batch_size=64", "model.channels=32"],
}


def worker(src: str, conf: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """One version's median training-step time of one model (run in a fresh process with ``src`` first on the
    path)."""
    import time

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    sys.path.insert(0, src)
    import flowforge.experiment as experiment

    assert experiment.__file__.startswith(src), (experiment.__file__, src)
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    torch.manual_seed(0)
    model = experiment.instantiate(cfg.model)
    shape = tuple(cfg.dataset.shape)
    batch = int(cfg.dataset.batch_size)
    g = torch.Generator().manual_seed(1)
    if len(shape) == 3:
        x = torch.randint(0, int(cfg.dataset.num_levels), (batch, *shape), generator=g).float()
        loss_fn = lambda: model.bits_per_dim(x).mean()  # noqa: E731
    else:
        x = torch.randn(batch, *shape, generator=g)
        loss_fn = lambda: -model.log_prob(x).mean()  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "ms": 1e3 * statistics.median(times),
        "params": sum(p.numel() for p in model.parameters()),
        "loss": float(loss),
    }


def run_worker(version_dir: Path, overrides: list[str], args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(
            {
                "src": str(version_dir / "src"),
                "conf": str(version_dir / "conf"),
                "overrides": overrides,
                "warmup": args.warmup,
                "steps": args.steps,
            }
        ),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(version_dir / "src"), WANDB_MODE="offline")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=version_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({version_dir.name}, {overrides}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def unpack(revision: str, dest: Path) -> Path:
    """``src/`` and ``conf/`` of ``revision`` under ``dest``."""
    dest.mkdir(parents=True)
    archive = dest.parent / f"{dest.name}.tar"
    with open(archive, "wb") as fh:
        subprocess.run(["git", "archive", revision, "src", "conf"], cwd=ROOT, stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE, help=f"git revision to compare against (default {BEFORE})")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        opts = json.loads(args.worker)
        print(json.dumps(worker(opts["src"], opts["conf"], opts["overrides"], opts["warmup"], opts["steps"])))
        return

    with tempfile.TemporaryDirectory(prefix="cond_overhead_") as tmp:
        versions = {"before": unpack(args.before, Path(tmp) / "before"), "after": ROOT}
        results: dict[str, dict[str, list[dict]]] = {m: {"before": [], "after": []} for m in args.models}
        for r in range(args.rounds):
            for model in args.models:
                order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                for v in order:
                    results[model][v].append(run_worker(versions[v], MODELS[model], args))
                print(
                    f"round {r + 1}/{args.rounds} {model}: "
                    + ", ".join(f"{v} {results[model][v][-1]['ms']:.2f} ms" for v in ("before", "after")),
                    flush=True,
                )
    lines = [
        "# Unconditional models before and after the context argument",
        "",
        f"- {datetime.date.today()}, CPU, one thread per worker; before = `{args.before}`, after = the working tree",
        f"- median training step (forward, backward, Adam) over {args.steps} steps after {args.warmup} warm-up, "
        f"then the median over {args.rounds} rounds of fresh processes (versions alternating)",
        "",
        "| model | overrides | params before | params after | before (ms) | after (ms) | after / before |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        b = statistics.median(x["ms"] for x in results[model]["before"])
        a = statistics.median(x["ms"] for x in results[model]["after"])
        pb, pa = results[model]["before"][0]["params"], results[model]["after"][0]["params"]
        lines.append(f"| {model} | `{' '.join(MODELS[model])}` | {pb:,} | {pa:,} | {b:.2f} | {a:.2f} | {a / b:.3f} |")
    emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
