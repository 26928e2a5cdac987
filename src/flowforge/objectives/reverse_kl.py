"""Reverse-KL (variational) fitting of a flow ``q`` to an unnormalised target ``p~ = Z p``.

For ``x ~ q`` drawn by the reparameterisation ``x = f^{-1}(z)``, ``z ~ p_Z``,

    L(q) = E_q[log q(x) - log p~(x)] = KL(q || p) - log Z  >=  -log Z,

so minimising the mean of :func:`reverse_kl_loss` minimises ``KL(q || p)`` (the bound is tight iff
``q = p``); its gradient is the pathwise (reparameterisation) gradient through the flow's sampler.

:func:`importance_log_z` scores a fitted ``q`` by importance sampling with log weights
``log w = log p~(x) - log q(x)``, ``x ~ q``:

    Z_hat = (1/n) sum_i w_i,        log Z_hat = logsumexp(log w) - log n,
    ELBO  = (1/n) sum_i log w_i,    ESS = (sum_i w_i)^2 / sum_i w_i^2.

When ``q > 0`` wherever ``p~ > 0`` (true for a flow with a Gaussian base), ``E[Z_hat] = Z`` (unbiased
in ``Z``) and ``log Z_hat -> log Z`` as ``n -> inf`` (consistent), but by Jensen
``E[log Z_hat] <= log Z`` (biased low in ``log Z`` at finite ``n``); likewise
``E[ELBO] = log Z - KL(q || p) <= log Z``.  The standard error of ``log Z_hat`` is the delta method on
the weights, ``se = sd(w) / (sqrt(n) mean(w))``, reliable only when the ESS is not tiny.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowforge.errors import ConfigError, FlowforgeError


class NonFiniteWeightsError(FlowforgeError, FloatingPointError):
    """Importance weights ``log p~(x) - log q(x)`` were NaN or infinite for some ``x ~ q``."""


def _check_shapes(flow, target) -> None:
    shape = getattr(flow, "data_shape", None)  # (wrappers without it are not checked here)
    if shape is not None and tuple(shape) != (target.dim,):
        raise ConfigError(
            f"the flow models data of shape {list(shape)}, but target '{target.name}' lives in R^{target.dim}; "
            f"build the flow with dataset.shape=[{target.dim}] (dataset=target sets it from dataset.dim)"
        )


def skip_data_init(flow) -> None:
    """Mark data-initialised layers (ActNorm) as initialised, keeping their identity init.

    Reverse KL never feeds data through ``forward`` before training, so a data-dependent init would
    otherwise fire on the first later ``flow.log_prob(data)`` (e.g. an NLL evaluation) and overwrite the
    parameters the reverse-KL fit learned.  Idempotent; called by :func:`reverse_kl_loss`.
    """
    for m in flow.modules():
        buf = getattr(m, "initialized", None)
        if isinstance(buf, Tensor) and buf.numel() == 1 and not bool(buf):
            buf.fill_(1.0)
            if hasattr(m, "_ready"):  # the layer's host-side mirror of the buffer
                m._ready = True


def reverse_kl_loss(flow, target, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample reverse-KL loss ``log q(x) - log p~(x)`` for ``n`` reparameterised ``x ~ q``.

    Returns ``(loss_per_sample, x, log_q)``, each with leading dimension ``n``; the mean of the loss
    estimates ``KL(q || p) - log Z`` and its gradient is the pathwise gradient.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"reverse_kl_loss needs a positive integer number of samples, got n={n!r}")
    _check_shapes(flow, target)
    skip_data_init(flow)
    x, log_q = flow.rsample_and_log_prob(n)
    return log_q - target.log_prob(x), x, log_q


@torch.no_grad()
def _log_weights(flow, target, n: int, chunk: int) -> Tensor:
    was_training = flow.training
    flow.eval()  # exact log-dets / deterministic layers where a family distinguishes the modes
    try:
        out = []
        for start in range(0, n, chunk):
            x, log_q = flow.rsample_and_log_prob(min(chunk, n - start))
            out.append((target.log_prob(x) - log_q).to(torch.float64))
        return torch.cat(out)
    finally:
        flow.train(was_training)


def importance_log_z(flow, target, n: int, chunk: int = 4096, generator_seed: int | None = None) -> dict:
    """Importance-sampling estimate of ``log Z`` with ``n`` samples from the flow (no gradient).

    Samples are drawn ``chunk`` at a time with the flow in eval mode (its mode is restored after);
    ``generator_seed`` (optional) seeds a forked copy of torch's RNG for a reproducible estimate (the
    caller's RNG state is left as it was).  Returns a dict of floats:

    - ``log_z``: ``logsumexp(log w) - log n``;
    - ``log_z_se``: its delta-method standard error ``sd(w) / (sqrt(n) mean(w))``;
    - ``ess`` and ``ess_fraction``: ``(sum w)^2 / sum w^2`` and that over ``n``;
    - ``elbo``: ``mean(log w)`` (``<= log Z`` in expectation) and ``elbo_se``: ``sd(log w) / sqrt(n)``;
    - ``n``: the number of samples.

    Raises :class:`NonFiniteWeightsError` when any log weight is NaN or infinite.
    """
    for key, value in (("n", n), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"importance_log_z needs a positive integer {key}, got {key}={value!r}")
    if n < 2:
        raise ConfigError(f"importance_log_z needs n >= 2 samples for a standard error, got n={n}")
    _check_shapes(flow, target)
    skip_data_init(flow)
    if generator_seed is None:
        log_w = _log_weights(flow, target, n, chunk)
    else:
        cuda = sorted({t.device.index or 0 for t in (*flow.parameters(), *flow.buffers()) if t.is_cuda})
        with torch.random.fork_rng(devices=cuda):  # a reproducible draw that leaves the caller's RNG untouched
            torch.manual_seed(generator_seed)
            log_w = _log_weights(flow, target, n, chunk)
    bad = ~torch.isfinite(log_w)
    if bad.any():
        n_neg = int((log_w == -math.inf).sum())
        raise NonFiniteWeightsError(
            f"{int(bad.sum())} of {n} importance log weights log p~(x) - log q(x) are not finite "
            f"({n_neg} are -inf, {int(bad.sum()) - n_neg} NaN or +inf): the flow put mass where target "
            f"'{target.name}' has log density -inf or NaN (or its own log q(x) is not finite); train the flow "
            f"longer / with a smaller learning rate, or check the target's support"
        )
    log_sum = torch.logsumexp(log_w, 0)
    log_z = float(log_sum) - math.log(n)
    ess = float(torch.exp(2 * log_sum - torch.logsumexp(2 * log_w, 0)))
    w = torch.exp(log_w - log_w.max())  # weights scaled so the largest is 1 (the ratio sd/mean is scale-free)
    se = float(w.std(correction=1) / (math.sqrt(n) * w.mean()))
    return {
        "log_z": log_z,
        "log_z_se": se,
        "ess": ess,
        "ess_fraction": ess / n,
        "elbo": float(log_w.mean()),
        "elbo_se": float(log_w.std(correction=1)) / math.sqrt(n),
        "n": n,
    }
