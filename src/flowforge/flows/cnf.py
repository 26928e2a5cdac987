"""Continuous normalizing flow block (Chen et al., 2018; FFJORD, Grathwohl et al., 2019).

Time runs from ``t = 0`` (data) to ``t = T`` (base, ``T = t1``).  The state obeys ``dx/dt = v(x, t)`` and,
by the instantaneous change of variables,

    z = x(T),        log |det dz/dx| = int_0^T tr(dv/dx (x(t), t)) dt,

both obtained from one ODE solve of the joint state ``(x, l)`` with ``dl/dt = tr(dv/dx)``.  The inverse
integrates from T back to 0; :meth:`CNF.inverse_and_log_det` returns ``(x, -int tr)`` from that same
backward solve.  The trace is exact (``D`` vector-Jacobian products) or Hutchinson's estimate
``eps^T (dv/dx) eps`` with probes drawn once per solve and fixed over time (unbiased for the integral).

Internally time is rescaled to ``s = t / T in [0, 1]``: the solver integrates ``dx/ds = T v(x, sT)`` (and
``T`` times every other integrand).  That is the same ODE; it lets a learnable ``T`` (``train_t1``:
``T = t1 theta^2`` with ``theta`` starting at 1, so T stays positive and ``t1`` is exact in any dtype) get
its gradient through the dynamics' parameters, and keeps one code path for adjoints.  Tolerances act
exactly as on ``[0, T]``; ``step_size`` of fixed-step methods is given in real time (the solver steps
``step_size / T`` in ``s``).

RNODE (Finlay et al., 2020): in training mode with ``kinetic > 0`` or ``jacobian > 0`` the solve also
integrates ``KE = int_0^T ||v||^2 dt`` and ``JF = int_0^T ||eps^T dv/dx||^2 dt`` (a Hutchinson estimate of
``int ||dv/dx||_F^2 dt``); ``last_regularization = kinetic * KE + jacobian * JF`` per sample, for the
training loss to add.

Augmented CNF (ANODE, Dupont et al., 2019), ``augment_dim = A > 0`` on vectors: the ODE state is
``(x, a) in R^{D+A}``.  ``forward(x)`` draws ``a ~ N(0, I_A)``, integrates, and returns ``z in R^{D+A}`` with

    log_det = int_0^T tr(dv/d(x, a)) dt - log N(a; 0, I_A),

so ``log p_Z(z) + log_det = log p(x, a) - log q(a)`` is an unbiased single-sample estimate of the
variational lower bound ``E_q[log p(x, a) - log q(a)] <= log p(x)`` (equality when the flow keeps ``a``
independent of ``x``).  The likelihood is then a bound, not exact; round trips are ``x -> x`` only
(``inverse`` drops the last ``A`` coordinates), and ``inverse_and_log_det`` returns the negated forward
convention, ``-int tr + log N(a(0); 0, I)``.

Conditional CNF ``p(x | c)``: the velocity reads the context features ``h = e(c)``, ``dx/dt = v(x, t, h)``
(:mod:`flowforge.nn.velocity`), and ``h`` is constant along the path, so the log-det is still the trace integral in
x.  The dynamics close over ``h``; with the adjoint, ``h`` (when it requires a gradient, e.g. the output of a
context network) is handed to the adjoint solve with the parameters, so ``dL/dh = -int a(t)^T dv/dh dt`` reaches
the context network as well.

Numerics: the solve runs with autocast disabled, in the input's dtype (float16/bfloat16 inputs are
promoted to float32); float64 inputs stay float64 end to end.  Under ``torch.inference_mode`` (Lightning's
evaluation loops) the solve steps out of inference mode, without gradients, because the divergence needs
autograd.  Adaptive step-size control sees the state through a detached norm, so backpropagation through
the solver (``adjoint=False``) differentiates the discretised map and not the step selection.  The exact
trace uses forward-mode products (:func:`exact_divergence_jvp`).  A failed forward solve (torchdiffeq's
"underflow in dt", ``max_num_steps`` exceeded, or a non-finite result) raises :class:`ConvergenceError`;
failures inside an adjoint backward solve surface as torchdiffeq's own AssertionError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowforge import interrupt
from flowforge.errors import ConfigError, ConvergenceError, DataError
from flowforge.estimators.exact import MAX_EXACT_DIM
from flowforge.estimators.hutchinson import PROBES
from flowforge.estimators.trace import TRACES, draw_probes, exact_divergence_jvp, hutchinson_divergence
from flowforge.flows.base import Transform

try:  # the solver table of the installed torchdiffeq (private module: fall back to the 0.2.5 names)
    from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS

    METHODS = tuple(sorted(k for k in _TORCHDIFFEQ_SOLVERS if k != "scipy_solver"))
except ImportError:  # pragma: no cover
    METHODS = (
        "adaptive_heun",
        "bosh3",
        "dopri5",
        "dopri8",
        "euler",
        "explicit_adams",
        "fehlberg2",
        "fixed_adams",
        "heun2",
        "heun3",
        "implicit_adams",
        "midpoint",
        "rk4",
    )
FIXED_STEP = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")


class CNFTrace:
    """The ``logdet_estimator`` of a CNF block: which divergence it uses in training (``name``) and in
    eval mode (``eval_name``).  ``stochastic`` is True for the Hutchinson estimator (the training module
    then reports the estimator's standard deviation at test time)."""

    def __init__(self, name: str, probe: str, n_probes: int, eval_name: str):
        self.name, self.probe, self.n_probes, self.eval_name = name, probe, n_probes, eval_name

    @property
    def stochastic(self) -> bool:
        return self.name == "hutchinson"

    def __repr__(self) -> str:
        return f"CNFTrace({self.name}, eval={self.eval_name}, probe={self.probe}x{self.n_probes})"


class _PruneZeroGrad(torch.autograd.Function):
    """Identity whose backward drops an all-zero gradient (returns None), so autograd does not backpropagate
    zeros through the divergence's double-backward graph.  torchdiffeq concatenates the tuple state, so a loss
    on ``z`` alone (e.g. a Jacobian of ``z``) sends exact zeros into the log-det branch; skipping it makes such
    backward passes cost one pass through ``v`` instead of ``D`` (exact trace) or ``n_probes`` more."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        try:
            # host sync: dropping an all-zero gradient saves a double-backward pass through the divergence
            return grad if bool(grad.any()) else None
        except RuntimeError:  # batched gradients (vmap) allow no data-dependent branch: keep the gradient
            return grad


class _Dynamics(nn.Module):
    """The right-hand side of one solve in rescaled time ``s``: ``d/ds (x, l, KE, JF) = T (v, div, ||v||^2,
    ||eps^T J||^2)``.  A fresh instance per solve carries that solve's probes, so an adjoint backward pass
    run later uses exactly the probes of its forward pass."""

    def __init__(
        self, cnf: CNF, trace: str | None, probes: Tensor | None, regularize: bool, context: Tensor | None = None
    ):
        super().__init__()
        self.cnf = cnf
        self.trace, self.probes, self.regularize = trace, probes, regularize
        self.context = context
        self.phase = "forward"  # evaluations after the solve returned come from the adjoint backward pass

    def velocity(self, t: Tensor, x: Tensor) -> Tensor:
        """``v(x, t)``, or ``v(x, t, h)`` for a conditional solve."""
        if self.context is None:
            return self.cnf.velocity(t, x)
        return self.cnf.velocity(t, x, self.context)

    def forward(self, s: Tensor, state: tuple) -> tuple:
        interrupt.check()  # a stop requested (SIGTERM) ends the solve here, not hundreds of evaluations later
        cnf = self.cnf
        cnf.nfe[self.phase] += 1
        keep_graph = torch.is_grad_enabled()
        x = state[0]
        big_t = cnf.end_time(x.dtype, x.device)
        t = s.to(x.dtype) * big_t
        needs_vjp = self.trace == "hutchinson" or (self.regularize and cnf.jacobian > 0)
        if self.trace is None or not needs_vjp:  # no reverse-mode products: autograd only if the caller wants it
            v = self.velocity(t, x)
            out = [big_t * v]
            if self.trace is None:
                return tuple(out)
            div, frob = exact_divergence_jvp(lambda xx: self.velocity(t, xx), x), None
        else:
            with torch.enable_grad():
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                v = self.velocity(t, x)
                if self.trace == "exact":
                    div = exact_divergence_jvp(lambda xx: self.velocity(t, xx), x)
                    _, frob = hutchinson_divergence(v, x, self.probes, keep_graph, return_frobenius=True)
                elif self.regularize and cnf.jacobian > 0:
                    div, frob = hutchinson_divergence(v, x, self.probes, keep_graph, return_frobenius=True)
                else:
                    div, frob = hutchinson_divergence(v, x, self.probes, keep_graph), None
            out = [big_t * v]
        extra = [big_t * div]
        if self.regularize:
            kinetic = v.reshape(v.shape[0], -1).pow(2).sum(1)
            extra += [big_t * kinetic, big_t * (frob if frob is not None else torch.zeros_like(kinetic))]
        out += [_PruneZeroGrad.apply(e) for e in extra] if keep_graph else extra
        if not keep_graph:
            out = [o.detach() for o in out]
        return tuple(out)


def _detached_mixed_norm(state: tuple) -> Tensor:
    """The error norm of adaptive step-size control: the largest RMS norm over the state's parts (as
    torchdiffeq's default for tuple states), computed without autograd history so the chosen steps are
    constants to backpropagation (gradients differentiate the discretised solve, not its step selection)."""
    return torch.stack([s.detach().pow(2).mean().sqrt() for s in state]).max()


class CNF(Transform):
    """One continuous normalizing flow block ``x -> x(T)`` (see the module docstring).

    Args:
        velocity: ``v(t, x)`` module on the ODE state (``(B, D + augment_dim)`` or ``(B, C, H, W)``).
        dim / shape: the data shape of one sample, ``dim`` for vectors or ``shape`` for either.
        trace: ``exact`` | ``hutchinson`` divergence in training mode.
        probe, n_probes: Hutchinson probes (gaussian | rademacher), averaged per sample.
        t1, train_t1: the integration time T, learnable when ``train_t1`` (``T = t1 theta^2``, theta from 1).
        method: a torchdiffeq method (dopri5, rk4, euler, ...); fixed-step ones need ``step_size``.
        atol, rtol: solver tolerances; ``adjoint_atol``/``adjoint_rtol`` default to them.
        adjoint_seminorm: the adjoint solve's step control ignores the parameter-gradient integrals (Kidger et
            al., 2021, "seminorm"): they do not feed back into the dynamics, so their local error need not limit
            the step; fewer backward evaluations for the same state and adjoint accuracy.
        adjoint: gradients by the adjoint method (``odeint_adjoint``, O(1) memory) instead of backprop
            through the solver's operations.
        kinetic, jacobian: RNODE weights (training mode only).
        augment_dim: ANODE's extra dimensions (vectors only).
        eval_trace: divergence in eval mode; None: exact when the state has at most
            ``eval_exact_max_dim`` dimensions, else the training trace.
        max_num_steps: cap on adaptive solver steps (None: torchdiffeq's default, effectively none).
    """

    def __init__(
        self,
        velocity: nn.Module,
        dim: int | None = None,
        shape: Sequence[int] | None = None,
        trace: str = "exact",
        probe: str = "gaussian",
        n_probes: int = 1,
        t1: float = 1.0,
        train_t1: bool = False,
        method: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        step_size: float | None = None,
        adjoint: bool = True,
        adjoint_atol: float | None = None,
        adjoint_rtol: float | None = None,
        adjoint_seminorm: bool = True,
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        augment_dim: int = 0,
        eval_trace: str | None = None,
        eval_exact_max_dim: int = 2,
        max_num_steps: int | None = None,
    ):
        super().__init__()
        if (dim is None) == (shape is None):
            raise ConfigError("CNF needs exactly one of dim (vectors) or shape (vectors or images)")
        self.shape = (int(dim),) if dim is not None else tuple(int(s) for s in shape)
        if len(self.shape) not in (1, 3) or min(self.shape) < 1:
            raise ConfigError(f"CNF data must be vectors (D,) or images (C, H, W), got shape {self.shape}")
        if int(augment_dim) != augment_dim or augment_dim < 0:
            raise ConfigError(f"augment_dim must be an integer >= 0, got {augment_dim}")
        self.augment_dim = int(augment_dim)
        if self.augment_dim and len(self.shape) != 1:
            raise ConfigError(
                f"augment_dim={augment_dim}: augmented CNFs are implemented for flat vectors only, the data have "
                f"image shape {self.shape}; set model.augment_dim=0 for images"
            )
        self.state_shape = (self.shape[0] + self.augment_dim,) if self.augment_dim else self.shape
        state_dim = math.prod(self.state_shape)
        for key, val in (("trace", trace), ("eval_trace", eval_trace)):
            if val is not None and val not in TRACES:
                raise ConfigError(f"unknown CNF {key} '{val}'; choose one of {TRACES}")
        if probe not in PROBES:
            raise ConfigError(f"unknown Hutchinson probe '{probe}'; choose one of {PROBES}")
        if int(n_probes) != n_probes or n_probes < 1:
            raise ConfigError(f"n_probes must be an integer >= 1, got {n_probes}")
        if method not in METHODS:
            raise ConfigError(f"unknown ODE solver method '{method}'; choose one of {METHODS} (model.method)")
        if method in FIXED_STEP and step_size is None:
            raise ConfigError(
                f"method={method} is a fixed-step solver: set model.step_size (e.g. 0.1 for 10 steps over t1=1), "
                f"or use an adaptive method such as dopri5"
            )
        if step_size is not None and not step_size > 0:
            raise ConfigError(f"step_size must be > 0, got {step_size}")
        tolerances = (("atol", atol), ("rtol", rtol), ("adjoint_atol", adjoint_atol), ("adjoint_rtol", adjoint_rtol))
        for key, val in tolerances:
            if val is not None and not val > 0:
                raise ConfigError(f"{key} must be > 0, got {val}")
        if not t1 > 0:
            raise ConfigError(f"t1 (the integration time) must be > 0, got {t1}")
        if kinetic < 0 or jacobian < 0:
            raise ConfigError(f"RNODE weights must be >= 0, got kinetic={kinetic}, jacobian={jacobian}")
        if max_num_steps is not None and int(max_num_steps) < 1:
            raise ConfigError(f"max_num_steps must be >= 1 or null, got {max_num_steps}")
        if eval_trace is None:
            eval_trace = "exact" if state_dim <= int(eval_exact_max_dim) else trace
        for key, val in (("trace", trace), ("eval_trace", eval_trace)):
            if val == "exact" and state_dim > MAX_EXACT_DIM:
                raise ConfigError(
                    f"CNF {key}=exact needs {state_dim} vector-Jacobian products per function evaluation "
                    f"(limit {MAX_EXACT_DIM}); use estimator=hutchinson"
                )

        self.velocity = velocity
        self.trace, self.eval_trace = trace, eval_trace
        self.probe, self.n_probes = probe, int(n_probes)
        self.logdet_estimator = CNFTrace(trace, probe, self.n_probes, eval_trace)
        self.method, self.atol, self.rtol = method, float(atol), float(rtol)
        self.step_size = None if step_size is None else float(step_size)
        self.adjoint = bool(adjoint)
        self.adjoint_atol = self.atol if adjoint_atol is None else float(adjoint_atol)
        self.adjoint_rtol = self.rtol if adjoint_rtol is None else float(adjoint_rtol)
        self.adjoint_seminorm = bool(adjoint_seminorm)
        self.kinetic, self.jacobian = float(kinetic), float(jacobian)
        self.max_num_steps = None if max_num_steps is None else int(max_num_steps)
        self.train_t1 = bool(train_t1)
        self.t1_init = float(t1)
        if self.train_t1:
            self.t1_sqrt_scale = nn.Parameter(torch.tensor(1.0))
        self.nfe = {"forward": 0, "backward": 0}
        self.last_regularization: Tensor | None = None
        self.last_reg_terms: dict = {}

    # ------------------------------------------------------------------ properties
    @property
    def t1(self) -> Tensor:
        """The integration time T (a tensor; differentiable when ``train_t1``)."""
        if self.train_t1:
            return self.end_time(self.t1_sqrt_scale.dtype, self.t1_sqrt_scale.device)
        return torch.tensor(self.t1_init)

    def end_time(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """T in ``dtype`` (``t1`` is a Python float, so float64 models get it to full precision)."""
        if self.train_t1:
            return self.t1_init * self.t1_sqrt_scale.to(dtype) ** 2
        return torch.full((), self.t1_init, dtype=dtype, device=device)

    @property
    def dim(self) -> int:
        """Dimension of the ODE state (data plus augmented dimensions)."""
        return math.prod(self.state_shape)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last RNODE terms (they may hold an autograd graph, which
        ``copy.deepcopy`` refuses, e.g. when an EMA callback copies the model after a training step)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["last_regularization"], state["last_reg_terms"] = None, {}
        state["nfe"] = dict(self.nfe)
        return state

    def reset_nfe(self) -> None:
        self.nfe["forward"] = 0
        self.nfe["backward"] = 0

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, augment_dim={self.augment_dim}, trace={self.trace}/{self.eval_trace}, "
            f"method={self.method}, atol={self.atol}, rtol={self.rtol}, adjoint={self.adjoint}"
        )

    # ------------------------------------------------------------------ solving
    def _check(self, x: Tensor, shape: tuple) -> Tensor:
        if tuple(x.shape[1:]) != shape:
            raise DataError(
                f"this CNF block expects inputs of shape (batch, {', '.join(map(str, shape))}), got {tuple(x.shape)}"
            )
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x

    def _solve(
        self, x0: Tensor, reverse: bool, with_logdet: bool, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Integrate the state from ``x0`` over ``[0, T]`` (``[T, 0]`` when ``reverse``) given the context features
        ``context`` (None: unconditional); returns the end state and ``int tr`` along the path (None without
        ``with_logdet``); stores RNODE terms."""
        import torchdiffeq

        # (Lightning's eval loops) the divergence needs autograd; a compiled training step is never in inference mode
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                h = None if context is None else context.clone()
                return self._solve(x0.clone(), reverse, with_logdet, h)
        if context is not None and context.shape[0] != x0.shape[0]:
            raise DataError(
                f"the context features have {context.shape[0]} rows but the batch has {x0.shape[0]} examples"
            )
        regularize = with_logdet and not reverse and self.training and (self.kinetic > 0 or self.jacobian > 0)
        trace = (self.trace if self.training else self.eval_trace) if with_logdet else None
        needs_probe = trace == "hutchinson" or (regularize and self.jacobian > 0)
        probes = draw_probes(x0, self.probe, self.n_probes) if needs_probe else None
        func = _Dynamics(self, trace, probes, regularize, context)

        zeros = x0.new_zeros(x0.shape[0])
        state = (x0,) + ((zeros,) if with_logdet else ()) + ((zeros, zeros) if regularize else ())
        grid = torch.arange(2, dtype=x0.dtype, device=x0.device)  # made on the device: no host-to-device copy
        if reverse:
            grid = 1 - grid
        options = {}
        if self.step_size is not None:
            # host sync (learned T only): the fixed step in the rescaled time [0, 1] is step_size / T
            t1 = float(self.t1.detach()) if self.train_t1 else self.t1_init
            options["step_size"] = self.step_size / t1
        if self.method not in FIXED_STEP:
            options["norm"] = _detached_mixed_norm
            if self.max_num_steps is not None:
                options["max_num_steps"] = self.max_num_steps
        kwargs = dict(method=self.method, atol=self.atol, rtol=self.rtol, options=options)
        try:
            with torch.autocast(device_type=x0.device.type, enabled=False):
                if self.adjoint and torch.is_grad_enabled():
                    params = tuple(p for p in self.parameters() if p.requires_grad)
                    if context is not None and context.requires_grad:
                        params += (context,)  # the closed-over context gets its gradient from the adjoint too
                    out = torchdiffeq.odeint_adjoint(
                        func,
                        state,
                        grid,
                        adjoint_params=params,
                        adjoint_atol=self.adjoint_atol,
                        adjoint_rtol=self.adjoint_rtol,
                        adjoint_options=self._adjoint_options(options),
                        **kwargs,
                    )
                else:
                    out = torchdiffeq.odeint(func, state, grid, **kwargs)
        except AssertionError as e:  # torchdiffeq signals failures by assertions
            raise ConvergenceError(self._failure(str(e))) from None
        finally:
            func.phase = "backward"
        end = [o[-1] for o in out]
        # host sync: a non-finite end state is raised as a clear error (the solve syncs on its steps anyway)
        if not all(bool(torch.isfinite(e).all()) for e in end):
            raise ConvergenceError(self._failure("the solution is not finite"))
        if regularize:
            ke, jf = end[2], end[3]
            self.last_regularization = self.kinetic * ke + self.jacobian * jf
            self.last_reg_terms = {"kinetic": ke.detach().mean(), "jacobian": jf.detach().mean()}
        elif with_logdet and not reverse:
            self.last_regularization, self.last_reg_terms = None, {}
        return end[0], (end[1] if with_logdet else None)

    def _adjoint_options(self, options: dict) -> dict:
        """The adjoint solve's options: the forward ones without the forward's state norm, plus the seminorm."""
        out = {k: v for k, v in options.items() if k != "norm"}
        if self.adjoint_seminorm and self.method not in FIXED_STEP:
            out["norm"] = "seminorm"
        return out

    def _failure(self, what: str) -> str:
        step = f"step_size={self.step_size}" if self.step_size is not None else f"atol={self.atol}, rtol={self.rtol}"
        return (
            f"CNF ODE solve failed (method={self.method}, {step}, "
            f"t1={float(self.t1.detach()):.4g}): {what}. The dynamics "
            f"became stiff or diverged: lower the learning rate, add RNODE regularisation (model.kinetic / "
            f"model.jacobian, e.g. 0.01), loosen model.atol/model.rtol, or set model.max_num_steps; a fixed-step "
            f"solver (model.method=rk4 model.step_size=0.05) never underflows"
        )

    # ------------------------------------------------------------------ the transform
    def _augment_logq(self, a: Tensor) -> Tensor:
        """``log N(a; 0, I_A)`` per sample."""
        return -0.5 * a.pow(2).sum(1) - 0.5 * self.augment_dim * math.log(2 * math.pi)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self._check(x, self.shape)
        log_q = None
        if self.augment_dim:
            a = torch.randn(x.shape[0], self.augment_dim, dtype=x.dtype, device=x.device)
            log_q = self._augment_logq(a)
            x = torch.cat([x, a], dim=1)
        z, trace_integral = self._solve(x, reverse=False, with_logdet=True, context=context)
        return z, (trace_integral if log_q is None else trace_integral - log_q)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        z = self._check(z, self.state_shape)
        x, _ = self._solve(z, reverse=True, with_logdet=False, context=context)
        return x[:, : self.shape[0]] if self.augment_dim else x

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self._check(z, self.state_shape)
        x, neg_trace_integral = self._solve(z, reverse=True, with_logdet=True, context=context)
        if not self.augment_dim:
            return x, neg_trace_integral
        return x[:, : self.shape[0]], neg_trace_integral + self._augment_logq(x[:, self.shape[0] :])


def cnf_blocks(model: nn.Module) -> list[CNF]:
    """All CNF blocks inside ``model``."""
    return [m for m in model.modules() if isinstance(m, CNF)]


def reset_nfe(model: nn.Module) -> None:
    """Zero the function-evaluation counters of every CNF block in ``model``."""
    for m in cnf_blocks(model):
        m.reset_nfe()


def clear_step_records(model: nn.Module) -> None:
    """Before a training step: zero the evaluation counters and forget the last RNODE penalty of every CNF block,
    so the step's summary and penalty come from that step only."""
    for m in cnf_blocks(model):
        m.reset_nfe()
        m.last_regularization, m.last_reg_terms = None, {}


def nfe_summary(model: nn.Module) -> dict[str, int]:
    """``{"nfe/forward": n, "nfe/backward": n}`` summed over the CNF blocks since their last reset ({} without
    CNF blocks).  Backward counts the evaluations of adjoint solves (0 with direct backpropagation)."""
    blocks = cnf_blocks(model)
    if not blocks:
        return {}
    return {
        "nfe/forward": sum(m.nfe["forward"] for m in blocks),
        "nfe/backward": sum(m.nfe["backward"] for m in blocks),
    }


def cnf_regularization(model: nn.Module) -> Tensor | None:
    """Sum over the CNF blocks of ``last_regularization`` (per sample), or None when no block has one."""
    terms = [m.last_regularization for m in cnf_blocks(model) if m.last_regularization is not None]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total
