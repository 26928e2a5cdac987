#!/usr/bin/env python
"""flowforge's TarFlow side by side with the official code (apple/ml-tarflow): the same weights, the same numbers.

The official TarFlow (Zhai et al. 2025, "Normalizing Flows are Capable Generative Models") is one file,
``transformer_flow.py`` of https://github.com/apple/ml-tarflow.  The script imports it at run time from
``--reference-dir`` (get it with ``git clone https://github.com/apple/ml-tarflow`` and pass that folder).  It builds
the reference ``Model(C, H, patch_size, channels, num_blocks, layers_per_block, nvp=True, num_classes=K)`` and
flowforge's ``TarFlow(shape=(C, H, H), channels=..., heads=channels // 64, ..., affine="nvp",
first_token="identity", context={"classes": K})`` (the reference's attention heads are 64 wide), randomises the
reference's zero-initialised output projections and its class embeddings, and copies every weight into flowforge:

- ``blocks[i].{proj_in, pos_embed, proj_out}`` -> ``model.blocks[i].{proj_in, pos_embed, proj_out}``;
- ``blocks[i].attn_blocks[l].{attention, mlp}.*`` -> ``model.blocks[i].layers[l].{attention, mlp}.*``;
- ``blocks[i].class_embed`` ``(K, 1, C)`` -> ``model.blocks[i].context_proj.weight`` ``(C, K)`` (flowforge embeds a
  label as its one-hot code, so ``context_proj`` of the code is the label's row of ``class_embed``);
- flowforge's null context (what classifier-free guidance extrapolates away from) is set to ``ones(K) / K``, whose
  projection is the mean class embedding the reference's unconditional pass adds.

Checks (``float32`` and ``float64``, unconditional and class-conditional, ``--seed``):

- log-density: the reference sees ``x`` in [-1, 1] and gives ``log p(x) = -|z|^2 / 2 - D/2 log(2 pi) + D logdets``
  (its per-block log-det is a mean over the ``D`` dimensions); flowforge sees ``(x + 1) / 2`` in [0, 1] and gives
  ``model.log_prob(y) - D log 2`` (its map to [-1, 1]).  The table gives the largest absolute difference over the
  batch, per sample and per dimension;
- sampling: the same base draw ``z``, ``(n, T, d)`` for the reference and ``(n, D)`` (its flattening) for flowforge,
  through the reference's ``reverse`` and flowforge's ``model.inverse`` with and without the key/value cache; then
  guided sampling through ``model.sample`` (drawing the same ``z`` from the same seed): classifier-free guidance of
  strength ``--guidance`` for the conditional model, attention-temperature guidance (``--attn-temperature``) for
  the unconditional one, constant and annealed.  The table gives the largest absolute difference of the samples in
  [-1, 1].

Timing (``--device``, ``--dtype``; the models take turns for ``--rounds`` rounds, the order rotated each round,
medians reported):

- a training step at batch ``--batch``: ``zero_grad``, forward, loss, backward and an ``AdamW`` step (the reference's
  loss ``0.5 mean z^2 - mean logdets``, flowforge's ``-mean log p``), ``--steps`` steps per turn;
- sampling ``--samples`` images without guidance: the reference's ``reverse`` (its key/value cache grows by
  concatenation) against flowforge's ``model.sample`` with its preallocated cache, with its one-token step compiled
  (``compile=True``) and without a cache (``cache=False``: every step reruns the transformer over the whole prefix);
- flowforge's training step with its loss compiled (``torch.compile``, as ``compile=true``); the first compiled step
  and the first compiled sampling call, which compile, are timed apart (``--no-compiled`` skips both).

The default model is CPU-sized (3 x 16 x 16 images, patch 2: 64 tokens of 12 numbers; channels 128, 4 blocks of 2
layers); ``--paper`` is the paper's ImageNet 64 model (3 x 64 x 64, patch 2: 1024 tokens; channels 768, 8 blocks of 8
layers) for a GPU; ``--quick`` a small smoke run.

Usage::

    python benchmarks/tarflow_reference.py --reference-dir /path/to/ml-tarflow --threads 1
    python benchmarks/tarflow_reference.py --reference-dir /path/to/ml-tarflow --classes 10 --out tarflow_ref.md
    python benchmarks/tarflow_reference.py --reference-dir /path/to/ml-tarflow --paper --device cuda --no-uncached
    python benchmarks/tarflow_reference.py --reference-dir /path/to/ml-tarflow --quick
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from _report import emit  # benchmarks/_report.py (scripts run as python benchmarks/<name>.py)

HEAD_DIM = 64  # the reference's attention head width (MetaBlock's head_dim default)
AGREEMENT_CLASSES = 10
TARGET_PER_DIM = 1e-5

CPU = dict(channels_in=3, img=16, patch=2, channels=128, blocks=4, layers=2, batch=32, samples=16)
PAPER = dict(channels_in=3, img=64, patch=2, channels=768, blocks=8, layers=8, batch=16, samples=4)
QUICK = dict(channels_in=1, img=8, patch=2, channels=64, blocks=2, layers=1, batch=4, samples=2)


@dataclass
class Config:
    channels_in: int
    img: int
    patch: int
    channels: int
    blocks: int
    layers: int
    batch: int
    samples: int

    @property
    def dim(self) -> int:
        return self.channels_in * self.img * self.img

    @property
    def tokens(self) -> int:
        return (self.img // self.patch) ** 2

    def describe(self) -> str:
        return (
            f"{self.channels_in} x {self.img} x {self.img} images, patch {self.patch} ({self.tokens} tokens of "
            f"{self.channels_in * self.patch**2}), channels {self.channels} ({self.channels // HEAD_DIM} heads of "
            f"{HEAD_DIM}), {self.blocks} blocks x {self.layers} layers"
        )


# ----------------------------------------------------------------------------------------------- models
def import_reference(path: str):
    """The module ``transformer_flow`` of ``path`` (apple/ml-tarflow), or exit with how to get it."""
    if not os.path.isfile(os.path.join(path or "", "transformer_flow.py")):
        sys.exit(
            f"The official TarFlow code (transformer_flow.py) was not found in {path!r}. Get it with\n"
            "  git clone https://github.com/apple/ml-tarflow\n"
            "and pass that folder with --reference-dir."
        )
    sys.path.insert(0, os.path.abspath(path))
    try:
        return importlib.import_module("transformer_flow")
    finally:
        sys.path.pop(0)


def build_pair(ref_module, cfg: Config, classes: int, dtype: torch.dtype, device: str, seed: int):
    """The reference model (output projections and class embeddings randomised) and flowforge's TarFlow carrying a
    copy of every weight, both in ``dtype`` on ``device``, in eval mode."""
    from flowforge.flows.tarflow import TarFlow

    torch.manual_seed(seed)
    ref = ref_module.Model(
        cfg.channels_in, cfg.img, cfg.patch, cfg.channels, cfg.blocks, cfg.layers, nvp=True, num_classes=classes
    )
    with torch.no_grad():
        for block in ref.blocks:
            block.proj_out.weight.normal_(0.0, 0.1 / math.sqrt(cfg.channels))
            block.proj_out.bias.normal_(0.0, 0.02)
            if block.class_embed is not None:
                block.class_embed.normal_(0.0, 0.5)
    model = TarFlow(
        shape=(cfg.channels_in, cfg.img, cfg.img),
        num_levels=256,
        channels=cfg.channels,
        heads=cfg.channels // HEAD_DIM,
        num_blocks=cfg.blocks,
        layers_per_block=cfg.layers,
        patch_size=cfg.patch,
        affine="nvp",
        first_token="identity",
        context={"classes": classes} if classes else None,
        context_dropout=0.1 if classes else 0.0,
    )
    copy_weights(ref, model)
    ref, model = ref.to(device=device, dtype=dtype).eval(), model.to(device=device, dtype=dtype).eval()
    if model.null_context is not None:  # set in the final dtype: 1 / K rounded to float32 is not 1 / K in float64
        with torch.no_grad():
            model.null_context.fill_(1.0 / classes)
    return ref, model


def copy_weights(ref, model) -> None:
    """Every weight of the reference into flowforge's blocks (module docstring)."""
    blocks = model.blocks
    if len(blocks) != len(ref.blocks):
        raise ValueError(f"{len(ref.blocks)} reference blocks but {len(blocks)} flowforge blocks")
    with torch.no_grad():
        for src, dst in zip(ref.blocks, blocks):
            target = dst.state_dict()
            for name, value in src.state_dict().items():
                if name == "attn_mask":
                    continue
                if name == "class_embed":
                    target["context_proj.weight"].copy_(value[:, 0, :].T)
                    continue
                key = name.replace("attn_blocks.", "layers.")
                if target[key].shape != value.shape:
                    raise ValueError(f"{name} {tuple(value.shape)} -> {key} {tuple(target[key].shape)}")
                target[key].copy_(value)


# ----------------------------------------------------------------------------------------------- agreement
@contextmanager
def float64_casts():
    """Inside the ``with``, ``Tensor.float()`` leaves float64 tensors as they are.  The reference casts to float32
    before its layer norms and exponentials (its mixed-precision design); in the float64 comparison those casts
    become no-ops so that the reference computes in float64 throughout."""
    original = torch.Tensor.float

    def float_keeping_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = float_keeping_float64
    try:
        yield
    finally:
        torch.Tensor.float = original


def reference_log_prob(ref, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``log p(x)`` of the reference model, ``x`` in [-1, 1]: its per-dimension mean log-det times ``D``."""
    z, _, logdets = ref(x, labels)
    d = x[0].numel()
    return -0.5 * z.pow(2).sum(dim=(1, 2)) - 0.5 * d * math.log(2 * math.pi) + d * logdets


def agreement(ref_module, cfg: Config, classes: int, dtype: torch.dtype, args) -> dict[str, float]:
    """Largest absolute differences between the reference and flowforge (module docstring)."""
    device = args.device
    ref, model = build_pair(ref_module, cfg, classes, dtype, device, args.seed)
    n, d = cfg.batch, cfg.dim
    g = torch.Generator().manual_seed(args.seed + 1)
    x = (torch.rand(n, cfg.channels_in, cfg.img, cfg.img, generator=g, dtype=dtype) * 2 - 1).to(device)
    labels = torch.randint(classes, (n,), generator=g).to(device) if classes else None
    out = {}
    with torch.no_grad(), float64_casts() if dtype == torch.float64 else nullcontext():
        lp_ref = reference_log_prob(ref, x, labels)
        lp_ff = model.log_prob((x + 1) / 2, labels) - d * math.log(2)
        diff = (lp_ref - lp_ff).abs().max().item()
        out["log_prob"], out["log_prob_per_dim"] = diff, diff / d
        out["log_prob_scale"] = lp_ref.abs().max().item()

        m = cfg.samples
        y = labels[:m] if classes else None
        z = torch.randn(m, d, generator=g, dtype=dtype).to(device)
        z_ref = z.view(m, cfg.tokens, -1)
        s_ref = ref.reverse(z_ref, y)
        for name, cache in (("sample", True), ("sample_uncached", False)):
            with model.sampling(cache=cache):
                s_ff = model.inverse(z, y) * 2 - 1
            out[name] = (s_ref - s_ff).abs().max().item()
        out["sample_scale"] = s_ref.abs().max().item()

        w = args.guidance
        temp = 1.0 if classes else args.attn_temperature
        for name, annealed in (("guided", False), ("guided_annealed", True)):
            torch.manual_seed(args.seed + 2)  # flowforge's base draw: the same z, reproduced from the seed
            z_guided = torch.randn(m, d, dtype=dtype, device=device).view(m, cfg.tokens, -1)
            s_ref = ref.reverse(z_guided, y, guidance=w, attn_temp=temp, annealed_guidance=annealed)
            torch.manual_seed(args.seed + 2)
            s_ff = model.sample(m, y, guidance=w, attn_temperature=temp, annealed_guidance=annealed) * 2 - 1
            out[name] = (s_ref - s_ff).abs().max().item()
    return out


# ----------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timing(ref_module, cfg: Config, classes: int, args) -> dict[str, tuple[float, float]]:
    """Median milliseconds of a training step and of sampling (module docstring): ``name -> (ms, spread)``, the
    spread being the interquartile range."""
    from flowforge.training.module import build_optimizer

    device, dtype = args.device, getattr(torch, args.dtype)
    ref, model = build_pair(ref_module, cfg, classes, dtype, device, args.seed)
    g = torch.Generator().manual_seed(args.seed + 3)
    x = (torch.rand(cfg.batch, cfg.channels_in, cfg.img, cfg.img, generator=g, dtype=dtype) * 2 - 1).to(device)
    labels = torch.randint(classes, (cfg.batch,), generator=g).to(device) if classes else None
    y = (x + 1) / 2
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    # what flowforge's training builds (optim.optimizer.fused: auto): torch's fused AdamW on the CPU and CUDA
    ff_opt = build_optimizer(partial(torch.optim.AdamW, lr=1e-4, fused="auto"), model.parameters())

    def ref_step():
        ref_opt.zero_grad(set_to_none=True)
        z, _, logdets = ref(x, labels)
        ref.get_loss(z, logdets).backward()
        ref_opt.step()

    def ff_loss():
        return -model.log_prob(y, labels).mean()

    def ff_step(loss=ff_loss):
        ff_opt.zero_grad(set_to_none=True)
        loss().backward()
        ff_opt.step()

    m = cfg.samples
    c = labels[:m] if classes else None
    z_ref = torch.randn(m, cfg.tokens, cfg.dim // cfg.tokens, generator=g, dtype=dtype).to(device)

    def ref_sample():
        with torch.no_grad():
            ref.reverse(z_ref, c)

    def ff_sample(cache: bool, compile: bool = False):
        def run():
            return model.sample(m, c, cache=cache, compile=compile)

        return run

    results: dict[str, tuple[float, float]] = {}
    ref.train(), model.train()
    step = {"reference": ref_step, "flowforge": ff_step}
    if not args.no_compiled:  # the loss compiled as compile=true compiles it; the first step compiles
        compiled_loss = torch.compile(ff_loss)
        t0 = time.perf_counter()
        ff_step(compiled_loss)
        sync(device)
        results["compile: first training step s"] = (time.perf_counter() - t0, 0.0)
        step["flowforge compiled"] = lambda: ff_step(compiled_loss)
    results.update(take_turns(step, args.steps, args.rounds, device, prefix="step"))
    ref.eval(), model.eval()
    sample = {"reference": ref_sample, "flowforge cached": ff_sample(True)}
    if not args.no_compiled:
        # the first call compiles; its samples against the eager cached sampler's from the same seed
        torch.manual_seed(args.seed)
        eager = ff_sample(True)()
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        compiled = ff_sample(True, compile=True)()
        sync(device)
        results["compile: first call s"] = (time.perf_counter() - t0, 0.0)
        results["compile: largest sample difference"] = ((compiled - eager).abs().max().item(), 0.0)
        sample["flowforge cached, compiled"] = ff_sample(True, compile=True)
    if not args.no_uncached:
        sample["flowforge uncached"] = ff_sample(False)
    results.update(take_turns(sample, 1, args.rounds, device, prefix="sample"))
    return results


def take_turns(fns: dict, steps: int, rounds: int, device: str, prefix: str) -> dict[str, tuple[float, float]]:
    """One untimed call of each, then ``rounds`` rounds of ``steps`` timed calls of each, the order rotated."""
    names = list(fns)
    for name in names:
        fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                fns[name]()
                sync(device)
                times[name].append(1e3 * (time.perf_counter() - t0))
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[f"{prefix}: {name}"] = (statistics.median(ts), q[2] - q[0])
    return out


# ----------------------------------------------------------------------------------------------- report
def report(cfg: Config, classes: int, agree: dict, times: dict, args, elapsed: float) -> str:
    lines = [
        "# TarFlow: flowforge against apple/ml-tarflow",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {device_name(args.device)}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        "",
        f"{cfg.describe()}; seed {args.seed}.",
        "",
    ]
    if agree:
        lines += [
            f"Agreement (largest absolute difference; log p over a batch of {cfg.batch} in [-1, 1] units, samples: "
            f"{cfg.samples} images in [-1, 1]; guidance {args.guidance}: classifier-free with {AGREEMENT_CLASSES} "
            f"classes, attention temperature {args.attn_temperature} unconditional):",
            "",
            "| dtype | model | log p per sample | log p per dim | max abs log p | sample (cached) | sample (uncached) "
            "| guided | guided, annealed | max abs sample |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for (dtype, kind), a in agree.items():
            lines.append(
                f"| {dtype} | {kind} | {a['log_prob']:.2e} | {a['log_prob_per_dim']:.2e} | {a['log_prob_scale']:.1f} "
                f"| {a['sample']:.2e} | {a['sample_uncached']:.2e} | {a['guided']:.2e} | {a['guided_annealed']:.2e} "
                f"| {a['sample_scale']:.2f} |"
            )
        worst = max(a["log_prob_per_dim"] for a in agree.values())
        verdict = "within" if worst <= TARGET_PER_DIM else "NOT within"
        lines += ["", f"Largest log p difference per dimension {worst:.2e}: {verdict} {TARGET_PER_DIM:.0e}.", ""]
    if times:
        context = f"class-conditional ({classes} classes)" if classes else "unconditional"
        lines += [
            f"Timing ({args.device}, {args.dtype}, {context}; median ms over {args.rounds} rounds, the order rotated; "
            f"training step: batch {cfg.batch}, AdamW, {args.steps} steps per turn; sampling: {cfg.samples} images, "
            "no guidance):",
            "",
            "| operation | median ms | IQR ms | flowforge / reference |",
            "| --- | --- | --- | --- |",
        ]
        for name, (ms, iqr) in times.items():
            op = name.split(":")[0]
            if op == "compile":
                continue
            base = times[f"{op}: reference"][0]
            ratio = "1.00" if name.endswith("reference") else f"{ms / base:.2f}"
            lines.append(f"| {name} | {ms:.1f} | {iqr:.1f} | {ratio} |")
        lines.append("")
        if "compile: first call s" in times:
            first, diff = times["compile: first call s"][0], times["compile: largest sample difference"][0]
            lines += [
                f"Compiled sampler (`model.sample(..., compile=True)`): first call {first:.1f} s (compilation, not in "
                "the medians); its samples differ from the eager cached sampler's (same seed) by "
                f"{diff:.2e} at most. Compiled training step (the loss compiled with `torch.compile`, as "
                f"`compile=true` does): first step {times['compile: first training step s'][0]:.1f} s.",
                "",
            ]
    lines.append(f"Total time {elapsed:.0f} s.")
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", default=os.environ.get("FLOWFORGE_TARFLOW_REFERENCE", "ml-tarflow"))
    p.add_argument("--paper", action="store_true", help="the paper's ImageNet 64 model (for a GPU)")
    p.add_argument("--quick", action="store_true", help="a small model, 2 rounds: a smoke run")
    p.add_argument("--channels", type=int, default=None, help="transformer width, a multiple of 64")
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--layers-per-block", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="training-step and log p batch")
    p.add_argument("--samples", type=int, default=None, help="images per sampling call")
    p.add_argument("--classes", type=int, default=0, help="timing: a class-conditional model of this many classes")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--attn-temperature", type=float, default=0.5, help="guidance of the unconditional model")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (5; --quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per turn (3; --quick: 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"), help="timing dtype")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-agreement", action="store_true", help="timing only")
    p.add_argument("--no-timing", action="store_true", help="agreement only")
    p.add_argument("--no-uncached", action="store_true", help="skip the uncached flowforge sampler in the timing")
    p.add_argument("--no-compiled", action="store_true", help="skip flowforge's compiled step and sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    args = p.parse_args(argv)
    base = QUICK if args.quick else PAPER if args.paper else CPU
    overrides = dict(
        channels_in=args.in_channels,
        img=args.img_size,
        patch=args.patch_size,
        channels=args.channels,
        blocks=args.num_blocks,
        layers=args.layers_per_block,
        batch=args.batch,
        samples=args.samples,
    )
    args.config = Config(**{k: v if overrides[k] is None else overrides[k] for k, v in base.items()})
    if args.config.channels % HEAD_DIM:
        p.error(f"--channels must be a multiple of {HEAD_DIM} (the reference's attention head width)")
    if args.config.samples > args.config.batch:
        p.error("--samples must not exceed --batch (the samples take the batch's first labels)")
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.steps = args.steps or (1 if args.quick else 3)
    return args


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref_module = import_reference(args.reference_dir)
    t0 = time.perf_counter()
    cfg = args.config
    agree: dict[tuple[str, str], dict[str, float]] = {}
    if not args.no_agreement:
        for dtype in (torch.float32, torch.float64):
            for classes in (0, AGREEMENT_CLASSES):
                kind = f"{classes} classes" if classes else "unconditional"
                agree[(str(dtype).removeprefix("torch."), kind)] = agreement(ref_module, cfg, classes, dtype, args)
                print(f"agreement {dtype} {kind}: done", file=sys.stderr, flush=True)
    times = {} if args.no_timing else timing(ref_module, cfg, args.classes, args)
    emit(report(cfg, args.classes, agree, times, args, time.perf_counter() - t0), args.out)
    return agree, times


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
