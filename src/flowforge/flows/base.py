"""The transform contract every flow layer follows.

A transform is a bijection f(.; c) from data space to base space, optionally conditioned on a context c.
``forward(x, context=None)`` returns ``(z, log_det)`` with ``z = f(x; c)`` and ``log_det = log |det df/dx|`` per
sample (natural log, shape ``(batch,)``; the Jacobian is in x only, c is held fixed); ``inverse(z, context=None)``
returns ``x = f^{-1}(z; c)``.  Composition follows the chain rule, every layer seeing the same context:

    log |det d(f_K o ... o f_1)/dx| = sum_k log |det df_k/dx_{k-1}|.

``context`` is the already-embedded context, a float tensor ``(batch, context_features)`` (the
:class:`~flowforge.flows.model.Flow` embeds and checks the raw context once, see :mod:`flowforge.flows.context`);
a layer that does not depend on it ignores it.  Composites call their parts without a context when there is none,
so a transform written as ``forward(self, x)`` / ``inverse(self, z)`` still works in an unconditional model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError


class Transform(nn.Module):
    """Base class: subclasses implement :meth:`forward` and :meth:`inverse`.

    ``pathwise_inverse`` says whether ``inverse_and_log_det`` is differentiable in the parameters along the
    sampling path (False for inverses computed without gradient, such as a bisection).
    """

    pathwise_inverse: bool = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log |det dx/dz|)``.  The default runs the forward once more at ``x``."""
        if context is None:
            x = self.inverse(z)
            return x, -self.forward(x)[1]
        x = self.inverse(z, context)
        return x, -self.forward(x, context)[1]


class Compose(Transform):
    """``f = f_K o ... o f_1``: applies ``transforms`` in order, summing log-determinants."""

    def __init__(self, transforms: Iterable[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x) if context is None else t(x, context)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        for t in reversed(self.transforms):
            z = t.inverse(z) if context is None else t.inverse(z, context)
        return z

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ld = t.inverse_and_log_det(z) if context is None else t.inverse_and_log_det(z, context)
            log_det = log_det + ld
        return z, log_det

    def __len__(self) -> int:
        return len(self.transforms)


class Inverse(Transform):
    """The inverse bijection ``f^{-1}``: swaps the fast and the slow direction of ``transform``.

    ``forward(x) = (f^{-1}(x), log |det df^{-1}/dx|)``; used e.g. to make IAF from a MAF layer.
    """

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (
            self.transform.inverse_and_log_det(x)
            if context is None
            else (self.transform.inverse_and_log_det(x, context))
        )

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return (self.transform(z) if context is None else self.transform(z, context))[0]

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z) if context is None else self.transform(z, context)


def samples_pathwise(t: Transform) -> bool:
    """Whether every layer of ``t`` samples with a pathwise gradient (the inverse of an :class:`Inverse` is its
    inner transform's forward, always differentiable)."""
    if isinstance(t, Inverse):
        return True
    if isinstance(t, Compose):
        return all(samples_pathwise(s) for s in t.transforms)
    return bool(getattr(t, "pathwise_inverse", True))


DIRECTIONS = ("density", "sampling")


def oriented(layers: Iterable[Transform], direction: str, family: str) -> Compose:
    """Stack ``layers`` as given (``density``: each layer's closed form maps data to base, so ``log p(x)`` is
    exact and fast) or as their inverses (``sampling``: the closed form maps base to data, so samples and
    their log-density are differentiable along the sampling path, as reverse-KL / variational inference
    needs; Rezende & Mohamed, 2015 used planar flows this way)."""
    if direction == "density":
        return Compose(layers)
    if direction == "sampling":
        return Compose(Inverse(t) for t in reversed(list(layers)))
    raise ConfigError(f"model.direction of {family} must be one of {DIRECTIONS}, got {direction!r}")


def pending_init(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose data-dependent initialisation has not run yet (``_ready`` is False)."""
    return [m for m in model.modules() if getattr(m, "_ready", True) is False]


def refresh_ready(model: nn.Module) -> None:
    """Re-read every data-initialised layer's ``_ready`` flag from its ``initialized`` buffer (a host read per
    layer): needed after something writes the buffers in place, as weight averaging does when it swaps the averaged
    weights in for validation and back (``load_state_dict`` refreshes the flags by itself)."""
    for m in model.modules():
        if not hasattr(m, "_ready"):
            continue
        refresh = getattr(m, "refresh_ready", None)
        if callable(refresh):
            refresh()
        elif isinstance(getattr(m, "initialized", None), Tensor):
            m._ready = bool(m.initialized)  # host sync: once per call, outside any training step


def initialize(model: nn.Module, x: Tensor, run: Callable[[Tensor], object] | None = None) -> nn.Module:
    """Run the data-dependent initialisation of every layer of ``model`` that has one, once, on the batch ``x``.

    Layers such as :class:`~flowforge.flows.actnorm.ActNorm` set their parameters from the first batch they see
    (and spectrally normalised layers start their power iteration there).  Each keeps a Python flag ``_ready``, so
    its forward branches on host state only, never on a device tensor; this function runs one forward of
    ``run(x)`` (default ``model.log_prob(x)``, or ``model(x)`` for a module without ``log_prob``) under
    ``torch.no_grad()`` in training mode, so each pending layer initialises itself from the data it sees in
    training.  The random number generators are restored afterwards, so the init draws nothing from the
    training streams.  Call it before compiling a training step (``torch.compile`` cannot trace the init branch)
    and, under DDP, on every process (the statistics are all-reduced).  Does nothing when no layer is pending;
    returns ``model``.  A model that is never initialised explicitly initialises itself on its first forward.
    """
    if not pending_init(model):
        return model
    if run is None:
        run = getattr(model, "log_prob", None) or model
    was_training = model.training
    devices = [x.device] if x.device.type == "cuda" else []
    model.train()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            run(x)
    finally:
        model.train(was_training)
    return model


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: per-sample totals of elementwise log-dets."""
    return x.reshape(x.shape[0], -1).sum(1)
