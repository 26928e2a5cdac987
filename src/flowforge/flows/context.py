"""The context of a conditional flow ``p(x | c)``: what it is, its checks, and its embedding.

A conditional model's every layer sees the same features ``h = e(c)`` of the raw context ``c``:

    log p(x | c) = log p_Z(f(x; h) | h) + log |det df(x; h)/dx|,   h = e(c),

where ``e`` is the context embedding (:class:`ContextEmbedding`) and the base ``p_Z`` may depend on ``h`` too
(:class:`~flowforge.flows.distributions.ConditionalDiagonalGaussian`).  The raw context is either

- a vector, ``context={features: K}``: ``c`` of shape ``(batch, K)``, floats (e.g. an observation in
  simulation-based inference, a continuous parameter of a toy density); or
- a class label, ``context={classes: K}``: ``c`` of shape ``(batch,)``, integers in ``[0, K)``.

``model.context_net`` chooses ``e``: ``null`` (the vector itself, or the one-hot code of the label), ``{name: mlp,
hidden: [64, 64], features: 32}`` (an MLP of the vector or of the one-hot code) or ``{name: embedding, features:
32}`` (a learned table, labels only; class-conditional Glow's embedding).  The embedding is trained with the flow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError, DataError
from flowforge.nn import MLP

NETS = ("mlp", "embedding")


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def parse_context(context: Any) -> dict[str, int] | None:
    """``None`` (an unconditional model) or ``{"features": K}`` / ``{"classes": K}`` (module docstring)."""
    if context is None:
        return None
    if isinstance(context, Mapping):
        context = dict(context)
        keys = sorted(context)
        if keys in (["features"], ["classes"]):
            return {keys[0]: _positive(context[keys[0]], f"model.context.{keys[0]}")}
    raise ConfigError(
        f"model.context must be null, {{features: K}} (a context vector of K numbers) or {{classes: K}} (a class "
        f"label in [0, K)), got {context!r}; conditional datasets set it (dataset.conditional=true)"
    )


class ContextEmbedding(nn.Module):
    """``c -> h = e(c)`` of shape ``(batch, features)`` (module docstring), with the checks of the raw context."""

    def __init__(self, context: Any, net: Any = None):
        super().__init__()
        spec = parse_context(context)
        if spec is None:
            raise ConfigError("a context embedding needs model.context ({features: K} or {classes: K})")
        self.classes = spec.get("classes")
        self.raw_features = spec.get("features")
        width = self.raw_features or self.classes
        net = dict(net) if isinstance(net, Mapping) else net
        if net is None:
            self.net: nn.Module | None = None
            self.features = width
        elif isinstance(net, dict) and net.get("name") in NETS:
            name = net.pop("name")
            features = _positive(net.pop("features", 32), f"model.context_net.features ({name})")
            hidden = list(net.pop("hidden", [64] if name == "mlp" else []))
            act = net.pop("act", "relu")
            if net:
                raise ConfigError(f"model.context_net ({name}) has unknown options {sorted(net)}")
            if name == "embedding":
                if self.classes is None:
                    raise ConfigError(
                        "model.context_net.name=embedding embeds class labels, but the context is a vector "
                        f"({self.raw_features} features); use name=mlp"
                    )
                if hidden:
                    raise ConfigError("model.context_net.name=embedding takes no hidden layers; use name=mlp")
                self.net = nn.Embedding(self.classes, features)
            else:
                self.net = MLP(
                    width,
                    [_positive(h, "model.context_net.hidden") for h in hidden],
                    features,
                    act=act,
                    zero_last=False,
                )
            self.features = features
        else:
            raise ConfigError(
                f"model.context_net must be null, {{name: mlp, hidden: [...], features: F}} or {{name: embedding, "
                f"features: F}}, got {net!r}"
            )
        if self.classes is not None:
            self.register_buffer("eye", torch.eye(self.classes), persistent=False)

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """The shape of one raw context: ``()`` for a label, ``(K,)`` for a vector."""
        return () if self.classes is not None else (self.raw_features,)

    def describe(self) -> str:
        if self.classes is not None:
            return f"a class label in [0, {self.classes}) per example, shape (batch,)"
        return f"a context vector of {self.raw_features} numbers per example, shape (batch, {self.raw_features})"

    def check(self, c: Tensor, batch: int | None) -> Tensor:
        """``c`` as a tensor of shape ``(batch, *raw_shape)``, or a :class:`DataError` naming what is wrong."""
        if not isinstance(c, Tensor):
            c = torch.as_tensor(c)
        if tuple(c.shape[1:]) != self.raw_shape or c.dim() != 1 + len(self.raw_shape):
            raise DataError(
                f"the model is conditional and expects {self.describe()}; got a context of shape {tuple(c.shape)}"
            )
        if batch is not None and c.shape[0] != batch:
            raise DataError(
                f"the context has {c.shape[0]} rows but the batch has {batch} examples; pass one context per example"
            )
        if self.classes is not None:
            if torch.is_floating_point(c) or c.dtype == torch.bool or torch.is_complex(c):
                raise DataError(f"class labels must be integers, got a context of dtype {c.dtype}")
            # host sync: only on the CPU, where it costs nothing; on a GPU an out-of-range label is a device assert
            if c.device.type == "cpu" and c.numel() and not torch.compiler.is_compiling():
                lo, hi = int(c.min()), int(c.max())
                if lo < 0 or hi >= self.classes:
                    raise DataError(f"class labels must lie in [0, {self.classes}), got labels in [{lo}, {hi}]")
        elif not torch.is_floating_point(c):
            raise DataError(f"a context vector must be floating point, got dtype {c.dtype}")
        return c

    def forward(self, c: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The features ``h = e(c)``, ``(batch, features)``, in ``dtype`` (a checked ``c``: :meth:`check`)."""
        if self.classes is not None:
            if isinstance(self.net, nn.Embedding):
                h = self.net(c)
            else:
                h = self.eye[c]
                h = h if self.net is None else self.net(h)
        else:
            h = c if self.net is None else self.net(c.to(dtype or c.dtype))
        return h if dtype is None else h.to(dtype)


def make_context(context: Any = None, context_net: Any = None) -> ContextEmbedding | None:
    """The embedding of a conditional model, or None for an unconditional one (``model.context`` null)."""
    if parse_context(context) is None:
        if context_net is not None:
            raise ConfigError(
                "model.context_net is set but the model has no context (model.context is null); conditional "
                "datasets set it (dataset.conditional=true), or leave context_net null"
            )
        return None
    return ContextEmbedding(context, context_net)


def context_features(embedding: ContextEmbedding | None) -> int:
    """The number of context features every conditional layer reads (0 for an unconditional model)."""
    return 0 if embedding is None else embedding.features


def unconditional_only(family: str, context: Any = None, context_net: Any = None) -> None:
    """A :class:`~flowforge.errors.ConfigError` when a family that does not condition is given a context."""
    if parse_context(context) is not None or context_net is not None:
        raise ConfigError(
            f"model={family} does not condition on a context; use a conditional family (the README's families table, "
            "column 'conditional') or an unconditional dataset (dataset.conditional=false)"
        )
