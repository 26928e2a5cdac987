"""Backward-in-forward (Chen et al., 2019, Sec. 3.3): the gradient of a residual block's log-det is
computed during the forward pass and its graph freed at once, so the memory of one block's log-det
graph is never held across the network.

Given ``compute(x) -> (g(x), logdet(x))`` (deterministic: the probes and the roulette draw are fixed
before), the forward returns ``g(x)`` and ``logdet`` and stores ``d sum_b logdet_b / d(x, theta)``.
In the backward, with upstream gradients ``a_b = dL/dlogdet_b``:

- if every ``a_b`` is the same scalar ``a`` (mean or sum losses), the parameter gradient is ``a`` times
  the stored one (exact);
- otherwise (per-sample weighted losses) ``sum_b a_b d logdet_b / dtheta`` cannot be recovered from
  the stored sum, so the log-det graph is rebuilt with the same draws and back-propagated with the
  weights ``a_b`` (exact, at the cost of one more pass).  The reference implementation assumed one
  scalar for the whole batch; this does not.

The input gradient is always ``a_b * d logdet_b / dx_b`` (samples do not interact inside g).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class BackwardInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compute: Callable, x: Tensor, *params: Tensor):
        with torch.enable_grad():
            xl = x.detach().requires_grad_(True)
            gx, logdet = compute(xl)
            inputs = (xl,) + params
            grads = torch.autograd.grad(logdet.sum(), inputs, retain_graph=True, allow_unused=True)
        ctx.compute, ctx.x, ctx.gx = compute, xl, gx
        ctx.logdet_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        ctx.params = params
        return gx.detach(), logdet.detach()

    @staticmethod
    def backward(ctx, grad_gx: Tensor, grad_logdet: Tensor):
        params, xl = ctx.params, ctx.x
        inputs = (xl,) + params
        with torch.enable_grad():
            dg = torch.autograd.grad(ctx.gx, inputs, grad_gx, allow_unused=True)
        dg = [torch.zeros_like(t) if g is None else g for g, t in zip(dg, inputs)]
        gx_ld, *gp_ld = ctx.logdet_grads
        a = grad_logdet
        grad_x = dg[0] + gx_ld * a.view(-1, *([1] * (xl.dim() - 1)))
        # host sync: whether the loss weighs every sample alike decides between the stored gradient and a rebuild
        if bool((a == a[0]).all()):
            grad_p = [d + a[0] * g for d, g in zip(dg[1:], gp_ld)]
        else:
            with torch.enable_grad():
                x2 = xl.detach().requires_grad_(True)
                _, logdet = ctx.compute(x2)
                gp = torch.autograd.grad(logdet, params, a, allow_unused=True)
            grad_p = [d if g is None else d + g for d, g in zip(dg[1:], gp)]
        ctx.gx = ctx.logdet_grads = ctx.compute = None
        return (None, grad_x, *grad_p)


def backward_in_forward(compute: Callable, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    params = tuple(p for p in params if p.requires_grad)
    return BackwardInForward.apply(compute, x, *params)
