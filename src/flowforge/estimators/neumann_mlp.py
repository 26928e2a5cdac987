"""The Neumann-gradient log-det of a residual block whose ``g`` is a Lipschitz MLP, with hand-written
derivatives (no autograd graph through the series).

For ``g = L_n o ... o L_1`` whose stages are linear maps ``L(a) = a W^T + b`` and elementwise activations
``phi``, the Jacobian is ``J = W_n D_{n-1} W_{n-1} ... D_1 W_1`` with ``D = diag(phi'(h))`` at the
activation's input ``h``.  The value is the series estimate of :func:`flowforge.estimators.series.neumann_logdet`,

    est = sum_k w_k v^T J^k v / k,

and its gradient is that of the Neumann surrogate (Chen et al., 2019, Eq. 8)

    S = v^T J u,   u = sum_k w_k J^{k-1} v   (v, u held fixed),

worked out stage by stage from one forward tangent of ``u`` and one cotangent of ``v``:

    tangent:    t_0 = u,   t_{j+1} = t_j W^T (linear)  or  t_j * phi'(h) (activation)
    cotangent:  r = v,     r <- r W (linear)           or  r * phi'(h) (activation), from the last stage back
    dS/dW = r^T t_in (linear stage),   dS/dphi'(h) = r * t_in (activation stage),

``r`` and ``t_in`` being the cotangent at the stage's output and the tangent at its input.  ``dS/dphi'(h)``
reaches ``h`` (through ``phi''``) and the activation's own parameters, and from ``h`` the earlier weights and
``x`` through the forward pass.  The backward pass joins that with the upstream gradient of ``g(x)`` in one
sweep through the network, and weighs each sample's ``S`` by the upstream gradient of its own log-det, so the
gradient is exact for any loss (mean, sum or per-sample weights) without a host synchronisation.

On data of ``d`` dimensions with fewer dimensions than series terms (the 2-D toys), the ``d`` columns of ``J``
are pushed through the stages in one pass and every ``J^k v`` is a per-sample ``d x d`` product: fewer passes
through ``g`` for the same value.

Memory is that of one forward pass of ``g`` whatever the number of series terms, as with backward-in-forward
(:mod:`flowforge.estimators.mem_eff`), and no autograd graph is built through the series or ``g``.  The
activation's ``phi'`` and its derivatives come from
:meth:`~flowforge.nn.activations.ElementwiseActivation.second_order` (closed form for LipSwish, autograd over
the activation alone otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.estimators.series import neumann_series
from flowforge.nn.activations import ElementwiseActivation


@dataclass(frozen=True)
class MLPPlan:
    """The stages of ``g``: ``("linear", layer)`` or ``("act", activation)`` in order."""

    stages: tuple[tuple[str, nn.Module], ...]


def mlp_plan(g: nn.Module, x: Tensor) -> MLPPlan | None:
    """The plan of ``g`` when the hand-written route applies, else ``None``: ``g`` a sequence of linear layers
    with a 2-D ``normalized_weight()`` and elementwise activations with ``value_and_derivative``, ``x`` a
    batch of vectors, and autocast off."""
    if x.dim() != 2 or not isinstance(g, nn.Sequential) or not hasattr(g, "linearize"):
        return None
    if x.device.type in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(x.device.type):
        return None  # mixed precision keeps the autograd route and its casts
    stages = []
    for layer in g:
        if hasattr(layer, "normalized_weight") and isinstance(getattr(layer, "weight", None), Tensor):
            if layer.weight.dim() != 2:
                return None
            stages.append(("linear", layer))
        elif (
            isinstance(layer, ElementwiseActivation)
            and type(layer).value_and_derivative is not ElementwiseActivation.value_and_derivative
        ):
            stages.append(("act", layer))
        else:
            return None
    if not any(kind == "linear" for kind, _ in stages):
        return None
    return MLPPlan(tuple(stages))


def _tangent_pass(kinds: Sequence[str], stage_params: Sequence, t: Tensor) -> Tensor:
    """``J t`` through the stages (``t`` is not modified)."""
    fresh = False
    for kind, p in zip(kinds, stage_params):
        if kind == "linear":
            t, fresh = F.linear(t, p[0]), True
        else:
            t = t.mul_(p) if fresh else t * p
    return t


def _jacobian_pass(kinds: Sequence[str], stage_params: Sequence, x: Tensor) -> Tensor:
    """The per-sample Jacobian ``J`` (batch, out, d) of ``g`` at ``x`` (batch, d): the ``d`` columns of the
    identity pushed through the stages at every sample at once, as a (column, sample, feature) tangent."""
    batch, dim = x.shape
    if kinds[0] == "linear":  # column c of the identity leaves the first linear stage as W[:, c] at every sample
        t = stage_params[0][0].t().contiguous().unsqueeze(1).expand(dim, batch, -1)  # contiguous: products stay so
        kinds, stage_params = kinds[1:], stage_params[1:]
    else:
        t = torch.eye(dim, dtype=x.dtype, device=x.device).unsqueeze(1).expand(dim, batch, dim)
    return _tangent_pass(kinds, stage_params, t).permute(1, 2, 0)


def _normalize_weight(w: Tensor, m: Tensor, coeff: float) -> tuple[Tensor, tuple]:
    """``W_hat = W / f`` with ``f = max(1, |<W, M>| / coeff)`` (:class:`~flowforge.nn.lipschitz.LipschitzLayer`),
    and what :func:`_normalization_grad` needs."""
    sig = torch.dot(w.reshape(-1), m.reshape(-1))
    f = (sig.abs() / coeff).clamp_(min=1.0)
    w_hat = w / f
    return w_hat, (w_hat, m, f, torch.where(f > 1, sig.reciprocal(), 0.0))


def _normalization_grad(g: Tensor, saved: tuple) -> Tensor:
    """``dL/dW`` from ``G = dL/dW_hat`` (overwritten): ``G / f - [f > 1] <G, W_hat> M / <W, M>`` (where ``f > 1``,
    ``f = |<W, M>| / coeff``, so the derivative of ``1 / f`` is ``-M sign(<W, M>) coeff / <W, M>^2``)."""
    w_hat, m, f, inv_sig = saved
    c = torch.dot(g.reshape(-1), w_hat.reshape(-1)) * inv_sig
    return g.div_(f).addcmul_(m, c, value=-1.0)


def _thin(w: Tensor) -> bool:
    """Whether a weight (``out x in``) has fewer inputs than outputs: products with such a thin factor on the
    right are several times slower in the BLAS than their transposes (a 128 x 500 by 500 x 2 product costs about
    5x a 2 x 500 by 500 x 128 one on a CPU), so its gradient is accumulated transposed."""
    return w.shape[1] < w.shape[0]


def _add_outer(acc: dict[int, Tensor], j: int, r: Tensor, t: Tensor, thin: bool) -> None:
    """``acc[j] += r^T t`` (the gradient of a weight from the cotangent ``r`` at its output and the tangent or
    input ``t`` at its input), or ``+= t^T r`` (its transpose) for a ``thin`` weight."""
    a, b = (t, r) if thin else (r, t)
    if j in acc:
        acc[j].addmm_(a.t(), b)
    else:
        acc[j] = a.t() @ b


def _matmul_w(r: Tensor, w: Tensor) -> Tensor:
    """``r W`` for a weight ``W`` (``out x in``); a thin one (:func:`_thin`) is multiplied as the transpose of its
    contiguous transpose, the layout the BLAS handles fastest."""
    return F.linear(r, w.t().contiguous()) if _thin(w) else r @ w


class _NeumannMLP(torch.autograd.Function):
    """``(g(x), est)`` with the Neumann surrogate's gradient (module docstring).

    Inputs after ``(plan, probes, weights, x)``: for each linear stage its weight, its bias (a zero-size tensor
    for none) and the direction ``M`` of its spectral normalisation (``W_hat = W / max(1, |<W, M>| / coeff)``,
    applied here with its derivative; a zero-size tensor when the weight is passed normalised already), then the
    parameters of every activation, in stage order."""

    @staticmethod
    def forward(ctx, plan: MLPPlan, probes: Sequence[Tensor], weights: Sequence[float], x: Tensor, *tensors):
        linears = [tensors[3 * i : 3 * i + 3] for i in range(sum(k == "linear" for k, _ in plan.stages))]
        inputs, acts, lin_it = [], [], iter(linears)
        a = x.detach()
        stage_params, norms = [], {}
        for j, (kind, module) in enumerate(plan.stages):
            inputs.append(a)
            if kind == "linear":
                w, b, m = next(lin_it)
                if m.numel():
                    w, norms[j] = _normalize_weight(w, m, module.coeff)
                a = F.linear(a, w, b if b.numel() else None)
                stage_params.append((w, b))
            else:
                a, d, pullback = module.second_order(a)
                acts.append(pullback)
                stage_params.append(d)

        kinds = [k for k, _ in plan.stages]
        last = max((k for k, c in enumerate(weights, start=1) if c), default=0)
        dim = x.shape[1]
        est = x.new_zeros(x.shape[0])
        accs = []
        if 0 < dim < last:
            # fewer passes through g: the d columns of J in one pass, then every J^k v as d x d products
            jac = _jacobian_pass(kinds, stage_params, x)
            # J t per sample as a broadcast product and a sum: a batch of tiny matrix products is slower
            step = lambda t: (jac * t.unsqueeze(1)).sum(-1)  # noqa: E731
        else:
            step = lambda t: _tangent_pass(kinds, stage_params, t)  # noqa: E731
        for v in probes:
            est_v, acc = neumann_series(step, v, weights)
            est = est + est_v
            accs.append(acc)
        ctx.plan, ctx.inputs, ctx.acts, ctx.stage_params, ctx.norms = plan, inputs, acts, stage_params, norms
        ctx.probes, ctx.accs, ctx.any_term = list(probes), accs, last > 0
        return a, est / len(probes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor, grad_est: Tensor):
        plan, stage_params = ctx.plan, ctx.stage_params
        kinds = [k for k, _ in plan.stages]
        n = len(kinds)
        grad_w: dict[int, Tensor] = {}
        grad_b: dict[int, Tensor] = {}
        grad_d: dict[int, Tensor] = {}  # dS/dphi'(h) per activation stage
        if ctx.any_term:
            scale = (grad_est / len(ctx.probes)).unsqueeze(1)
            for v, u in zip(ctx.probes, ctx.accs):
                tangents = [u]
                for kind, p in zip(kinds, stage_params):
                    t = tangents[-1]
                    tangents.append(F.linear(t, p[0]) if kind == "linear" else t * p)  # kept: no in-place
                r = v * scale  # a fresh tensor, as is every r below: updated in place
                for j in reversed(range(n)):
                    t_in = tangents[j]
                    if kinds[j] == "linear":
                        _add_outer(grad_w, j, r, t_in, _thin(stage_params[j][0]))
                        if j:
                            r = _matmul_w(r, stage_params[j][0])
                    else:
                        if j in grad_d:
                            grad_d[j].addcmul_(r, t_in)
                        else:
                            grad_d[j] = r * t_in
                        r.mul_(stage_params[j])
        # one sweep through the forward pass: the upstream gradient of g(x) plus dS/dphi'(h) at every activation
        act_grads: list[Tensor | None] = []
        # pullbacks may overwrite their cotangents: delta is always a fresh tensor when one runs
        delta = grad_y.clone() if kinds[-1] == "act" else grad_y
        act_iter = len(ctx.acts)
        for j in reversed(range(n)):
            if kinds[j] == "linear":
                w, b = stage_params[j]
                _add_outer(grad_w, j, delta, ctx.inputs[j], _thin(w))
                if b.numel():
                    grad_b[j] = delta.sum(0)
                delta = _matmul_w(delta, w)
            else:
                act_iter -= 1
                delta, param_grads = ctx.acts[act_iter](delta, grad_d.get(j))
                act_grads.extend(reversed(param_grads))
        act_grads.reverse()
        out_grads: list[Tensor | None] = []
        for j, kind in enumerate(kinds):
            if kind == "linear":
                b = stage_params[j][1]
                gw = grad_w[j].t().contiguous() if _thin(stage_params[j][0]) else grad_w[j]
                gw = gw if j not in ctx.norms else _normalization_grad(gw, ctx.norms[j])
                out_grads += [gw, grad_b.get(j) if b.numel() else None, None]
        out_grads += act_grads
        ctx.acts = ctx.inputs = ctx.accs = ctx.norms = None
        return (None, None, None, delta, *out_grads)


def fused_neumann_logdet(
    g: nn.Module, x: Tensor, probes: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor] | None:
    """:func:`neumann_mlp_logdet` when ``g`` has a plan (:func:`mlp_plan`), else ``None``.  Inside a compiled step
    the route runs eagerly, between compiled pieces: its autograd function keeps Python state per call (the
    activations' pullbacks), and eagerly it costs less than what inductor makes of the autograd route (1.36x this
    route's step on the 2-core CPU for the residual toy).  Blocks that cannot have a plan (image inputs, a g that
    is not a sequence) return before that point and stay in the compiled graph."""
    if x.dim() != 2 or not isinstance(g, nn.Sequential):
        return None
    return _planned_neumann_logdet(g, x, probes, weights)


@torch.compiler.disable
def _planned_neumann_logdet(
    g: nn.Module, x: Tensor, probes: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor] | None:
    """The eager part of :func:`fused_neumann_logdet` (``torch.compiler.disable``: a graph break, not traced)."""
    plan = mlp_plan(g, x)
    return None if plan is None else neumann_mlp_logdet(plan, x, probes, weights)


def neumann_mlp_logdet(
    plan: MLPPlan, x: Tensor, probes: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """``(g(x), est)``: the value of :func:`~flowforge.estimators.series.neumann_logdet` averaged over
    ``probes``, with the Neumann gradient in ``x`` and every parameter of ``g`` (module docstring)."""
    tensors: list[Tensor] = []
    empty = x.new_zeros(0)
    for kind, module in plan.stages:
        if kind == "linear":
            b = module.bias if module.bias is not None else empty
            parts = module.normalization_parts() if hasattr(module, "normalization_parts") else None
            # the raw weight and its direction M (the normalisation and its derivative are applied inside), or
            # the normalised weight
            w, m = parts if parts is not None else (module.normalized_weight(), empty)
            tensors += [w, b, m]
    for kind, module in plan.stages:
        if kind == "act":
            tensors += [p for p in module.parameters() if p.requires_grad]
    return _NeumannMLP.apply(plan, tuple(probes), tuple(weights), x, *tensors)
