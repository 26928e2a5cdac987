"""Base distributions on manifolds: uniform and von Mises-Fisher on S^{d-1}, Dirichlet on the simplex.

Densities are with respect to the manifold's own volume, as the differential volume ratios of
:mod:`flowforge.flows.sphere` and :mod:`flowforge.flows.simplex`:

* ``UniformSphere``: ``log p(x) = -log |S^{d-1}|``, ``|S^{d-1}| = 2 pi^(d/2) / Gamma(d/2)``.
* ``VonMisesFisher``: ``log p(x) = log C_d(kappa) + kappa mu^T x`` with
  ``C_d(kappa) = kappa^nu / ((2 pi)^(d/2) I_nu(kappa))``, ``nu = d/2 - 1``; for d = 3,
  ``C_3 = kappa / (4 pi sinh kappa)``.  Mean resultant length ``E[mu^T x] = A_d(kappa) = I_{d/2}(kappa) /
  I_{d/2-1}(kappa)``.
* ``Dirichlet``: ``log p(p) = log Gamma(sum alpha) - sum log Gamma(alpha_i) + sum (alpha_i - 1) log p_i
  - log(sqrt(n))``: the usual density w.r.t. ``dp_1 ... dp_{n-1}`` divided by ``sqrt(n)``, the volume of
  the simplex's tangent-space parallelotope spanned by the coordinate edges ``e_i - e_n`` (so the
  density integrates to 1 over the simplex's surface measure, the measure the simplex flows use).

Bessel functions (no scipy).  With ``h_mu(kappa) = I_mu(kappa) / (kappa/2)^mu`` (finite and positive at
``kappa = 0``, ``h_mu(0) = 1 / Gamma(mu + 1)``) the normaliser is ``log C_d = nu log 2 - (d/2) log(2 pi)
- log h_nu(kappa)``.  ``h`` starts from ``h_0 = I_0 = exp(kappa) i0e(kappa)`` (even d) or
``h_{-1/2} = cosh(kappa) / sqrt(pi)`` (odd d) and climbs with the ratios ``s_mu = h_{mu+1} / h_mu``,
which satisfy the (Perron continued-fraction) recurrence ``s_mu = 1 / (mu + 1 + kappa^2 s_{mu+1} / 4)``
from ``I_{mu} - I_{mu+2} = (2 (mu+1) / kappa) I_{mu+1}``; it is run downwards (the stable direction) from
``mu = nu + K``, ``K = 20 + 6 sqrt(kappa)``, started at the Amos-type estimate ``s ~ 2 / (mu + 1/2 +
sqrt((mu + 3/2)^2 + kappa^2))``.  The start error contracts by about ``exp(-K^2 / kappa)``, so the
result is accurate to float64 round-off for every ``d >= 2`` and ``0 <= kappa <= 1e6`` (``kappa > 1e6``
raises).  ``A_d(kappa) = kappa s_nu / 2``; the gradient uses ``d log C_d / d kappa = -A_d(kappa)``.

Sampling: Wood (1994) rejection sampler for vMF (vectorised; measured acceptance >= 0.65 for every kappa, d);
``t = mu^T x`` first, then ``x = t mu + sqrt(1 - t^2) w`` with ``w`` uniform on the unit sphere of
``mu^perp``.  The ``Beta((d-1)/2, (d-1)/2)`` proposal variate is ``(1 + g_1 / ||g||) / 2`` for a standard
normal ``g`` in R^d (first coordinate of a uniform point), so everything takes a ``torch.Generator``.

Temperature ``T``: vMF draws with ``kappa / T^2`` (like a Gaussian's precision; ``T = 0`` returns
``mu``); the uniform law is the ``kappa = 0`` member, so ``T > 0`` leaves it unchanged; Dirichlet
draws with ``alpha / T^2`` (same mean; for large ``alpha`` the covariance scales by about ``T^2``;
``T = 0`` returns the mean).  Negative ``T`` (and ``T = 0`` for the uniform) raise
:class:`~flowforge.errors.ConfigError`.  Sampling is not reparameterised (no path gradient to
``mu``, ``kappa``, ``alpha``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowforge.errors import ConfigError

KAPPA_MAX = 1e6


def _check_dim(dim: int, name: str, what: str = "the unit sphere in R^dim", minimum: int = 2) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < minimum:
        raise ConfigError(f"{name} lives on {what} and needs an integer dim >= {minimum}, got {dim!r}")
    return dim


def _check_temperature(temperature: float, name: str, allow_zero: bool = True) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t < 0 or (t == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0 (the uniform law has no mode to collapse onto)"
        raise ConfigError(f"{name}: the sampling temperature must be {need}, got {temperature!r}")
    return t


def log_sphere_area(dim: int) -> float:
    """``log |S^{dim-1}| = log(2 pi^(dim/2) / Gamma(dim/2))``."""
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


# ----------------------------------------------------------------------------- Bessel ratios
def _bessel_terms(kappa: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(log h_nu(kappa), s_nu(kappa))`` in float64 (no gradient), ``nu = dim/2 - 1``."""
    k = kappa.detach().to(torch.float64)
    # host sync: the number of terms below depends on kappa; one read gives it and checks kappa (NaN if invalid)
    k_max = float(torch.where(torch.isfinite(k) & (k >= 0), k, math.nan).max())
    if not math.isfinite(k_max):
        raise ConfigError(f"the vMF concentration kappa must be finite and >= 0, got {kappa.tolist()}")
    if k_max > KAPPA_MAX:
        raise ConfigError(f"vMF concentration kappa = {k_max:.4g} exceeds the supported {KAPPA_MAX:g}")
    nu = 0.5 * dim - 1
    nu0 = 0.0 if dim % 2 == 0 else -0.5
    steps = int(round(nu - nu0))  # s_{nu0}, ..., s_{nu-1} lead from h_{nu0} to h_nu
    extra = 20 + int(math.ceil(6 * math.sqrt(k_max)))
    k2 = k * k
    top = nu + extra
    s = 2.0 / (top + 0.5 + torch.sqrt((top + 1.5) ** 2 + k2))
    ratios = {}
    for j in range(steps + extra, -1, -1):  # mu = nu0 + j, downwards
        mu = nu0 + j
        s = 1.0 / (mu + 1.0 + 0.25 * k2 * s)
        if j <= steps:
            ratios[j] = s
    if dim % 2 == 0:
        log_h = torch.log(torch.special.i0e(k)) + k
    else:  # log cosh k - log sqrt(pi), without overflow
        log_h = k + torch.log1p(torch.exp(-2 * k)) - math.log(2.0) - 0.5 * math.log(math.pi)
    for j in range(steps):
        log_h = log_h + torch.log(ratios[j])
    return log_h, ratios[steps]


def mean_resultant_length(kappa: float | Tensor, dim: int) -> Tensor:
    """``A_d(kappa) = E[mu^T x] = I_{d/2}(kappa) / I_{d/2-1}(kappa)`` for ``x ~ vMF(mu, kappa)`` on S^{d-1}."""
    kappa = torch.as_tensor(kappa, dtype=torch.float64)
    _, s = _bessel_terms(kappa, dim)
    return 0.5 * kappa * s


class _LogNormalizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: Tensor, dim: int) -> Tensor:
        log_h, s = _bessel_terms(kappa, dim)
        nu = 0.5 * dim - 1
        ctx.save_for_backward(kappa)
        ctx.resultant = (0.5 * kappa.detach().double() * s).to(kappa.dtype)
        return (nu * math.log(2.0) - 0.5 * dim * math.log(2 * math.pi) - log_h).to(kappa.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -grad * ctx.resultant, None


def vmf_log_normalizer(kappa: float | Tensor, dim: int) -> Tensor:
    """``log C_d(kappa)``, differentiable in ``kappa`` (``d/d kappa = -A_d(kappa)``)."""
    kappa = torch.as_tensor(kappa, dtype=torch.get_default_dtype()) if not torch.is_tensor(kappa) else kappa
    return _LogNormalizer.apply(kappa, dim)


# ----------------------------------------------------------------------------- samplers
def _uniform_tangent(mu: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` unit vectors uniform on the sphere of ``mu^perp`` (projected standard normals)."""
    g = torch.randn(n, mu.shape[0], generator=generator, dtype=mu.dtype, device=mu.device)
    g = g - (g @ mu)[:, None] * mu
    return g / g.norm(dim=1, keepdim=True)


def sample_uniform_sphere(
    n: int, dim: int, generator: torch.Generator | None = None, dtype=torch.float32, device=None
) -> Tensor:
    """``n`` points uniform on S^{dim-1} (normalised standard normals)."""
    g = torch.randn(n, dim, generator=generator, dtype=dtype, device=device)
    return g / g.norm(dim=1, keepdim=True)


def sample_vmf(mu: Tensor, kappa: float | Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws of vMF(mu, kappa) on S^{d-1} by Wood's (1994) rejection algorithm (computed in float64,
    returned in ``mu``'s dtype); ``mu`` must be a unit vector."""
    out_dtype = mu.dtype
    mu = mu.detach().to(torch.float64)
    d = mu.shape[0]
    k = float(kappa)
    m1 = d - 1.0
    b = m1 / (2 * k + math.sqrt(4 * k * k + m1 * m1))
    x0 = (1 - b) / (1 + b)
    c = k * x0 + m1 * math.log(1 - x0 * x0)
    t = torch.empty(n, dtype=torch.float64, device=mu.device)
    one_minus_t = torch.empty_like(t)
    todo = torch.arange(n, device=mu.device)
    while todo.numel():  # host sync: the draws still rejected are selected by value
        m = todo.numel()
        g = torch.randn(m, d, generator=generator, dtype=torch.float64, device=mu.device)
        z = 0.5 * (1 + g[:, 0] / g.norm(dim=1))  # Beta((d-1)/2, (d-1)/2)
        u = torch.rand(m, generator=generator, dtype=torch.float64, device=mu.device)
        denom = 1 - (1 - b) * z
        w = (1 - (1 + b) * z) / denom
        one_minus_w = 2 * b * z / denom
        accept = k * w + m1 * torch.log(1 - x0 * w) - c >= torch.log(u)
        t[todo[accept]] = w[accept]
        one_minus_t[todo[accept]] = one_minus_w[accept]
        todo = todo[~accept]
    perp = _uniform_tangent(mu, n, generator)
    radius = torch.sqrt((one_minus_t * (1 + t)).clamp_min(0))
    x = t[:, None] * mu + radius[:, None] * perp
    return (x / x.norm(dim=1, keepdim=True)).to(out_dtype)


# ----------------------------------------------------------------------------- distributions
class UniformSphere(nn.Module):
    """The uniform distribution on S^{dim-1} (w.r.t. surface measure)."""

    manifold = "sphere"

    def __init__(self, dim: int):
        super().__init__()
        self.dim = _check_dim(dim, "UniformSphere")
        self.register_buffer("_ref", torch.zeros(()))  # carries dtype / device

    def log_prob(self, z: Tensor) -> Tensor:
        return z.new_full((z.shape[0],), -log_sphere_area(self.dim))

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        _check_temperature(temperature, "UniformSphere", allow_zero=False)
        return sample_uniform_sphere(n, self.dim, dtype=self._ref.dtype, device=self._ref.device)


class VonMisesFisher(nn.Module):
    """vMF(mu, kappa) on S^{dim-1}: ``mu = mu_raw / ||mu_raw||``, ``kappa = exp(log_kappa)`` (both learned when
    ``learn``; a fixed ``kappa`` may be 0, the uniform law)."""

    manifold = "sphere"

    def __init__(self, dim: int, mu: Sequence[float] | None = None, kappa: float = 1.0, learn: bool = True):
        super().__init__()
        self.dim = _check_dim(dim, "VonMisesFisher")
        if mu is None:
            mu_t = torch.zeros(dim)
            mu_t[-1] = 1.0
        else:
            mu_t = torch.as_tensor(mu, dtype=torch.float32).clone()
            if mu_t.shape != (dim,) or not torch.isfinite(mu_t).all() or float(mu_t.norm()) == 0:
                raise ConfigError(
                    f"the vMF mean direction mu must be a finite non-zero vector of length {dim}, got {mu!r}"
                )
            mu_t = mu_t / mu_t.norm()
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not 0 <= kappa <= KAPPA_MAX:
            raise ConfigError(f"the vMF concentration kappa must be a number in [0, {KAPPA_MAX:g}], got {kappa!r}")
        if learn and kappa == 0:
            raise ConfigError(
                "a learned vMF concentration must start at kappa > 0 (e.g. 1.0); for kappa = 0 use base=uniform"
            )
        self.learn = learn
        if learn:
            self.mu_raw = nn.Parameter(mu_t)
            self.log_kappa = nn.Parameter(torch.tensor(math.log(kappa)))
        else:
            self.register_buffer("mu_raw", mu_t)
            self.register_buffer("kappa_fixed", torch.tensor(float(kappa)))

    @property
    def mu(self) -> Tensor:
        return self.mu_raw / self.mu_raw.norm()

    @property
    def kappa(self) -> Tensor:
        return self.log_kappa.exp() if self.learn else self.kappa_fixed

    def log_normalizer(self) -> Tensor:
        return vmf_log_normalizer(self.kappa, self.dim)

    def log_prob(self, z: Tensor) -> Tensor:
        return self.log_normalizer() + self.kappa * (z @ self.mu)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        t = _check_temperature(temperature, "VonMisesFisher")
        mu = self.mu
        if t == 0:
            return mu.expand(n, -1).clone()
        # host sync: Wood's rejection sampler takes kappa on the host and redraws until every sample is accepted
        return sample_vmf(mu, float(self.kappa) / t**2, n, generator)

    def mean_resultant_length(self) -> Tensor:
        return mean_resultant_length(float(self.kappa), self.dim)


class Dirichlet(nn.Module):
    """Dirichlet(alpha) on the simplex in R^dim w.r.t. its surface measure (see the module docstring);
    ``alpha = exp(log_alpha)`` (learned when ``learn``)."""

    manifold = "simplex"

    def __init__(self, dim: int, concentration: float | Sequence[float] = 1.0, learn: bool = True):
        super().__init__()
        self.dim = _check_dim(dim, "Dirichlet", "the probability simplex in R^dim")
        alpha = torch.as_tensor(concentration, dtype=torch.float64)
        if alpha.dim() == 0:
            alpha = alpha.expand(dim).clone()
        if alpha.shape != (dim,) or not torch.isfinite(alpha).all() or bool((alpha <= 0).any()):
            raise ConfigError(
                f"the Dirichlet concentration must be a positive number or {dim} positive numbers, "
                f"got {concentration!r}"
            )
        log_alpha = torch.log(alpha).float()
        if learn:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)

    @property
    def concentration(self) -> Tensor:
        return self.log_alpha.exp()

    def log_prob(self, z: Tensor) -> Tensor:
        alpha = self.concentration
        log_norm = torch.lgamma(alpha.sum()) - torch.lgamma(alpha).sum() - 0.5 * math.log(self.dim)
        return log_norm + torch.log(z) @ (alpha - 1)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        t = _check_temperature(temperature, "Dirichlet")
        alpha = self.concentration
        if t == 0:
            return (alpha / alpha.sum()).expand(n, -1).clone()
        p = torch.distributions.Dirichlet(alpha / t**2, validate_args=False).sample((n,))
        p = p.clamp_min(torch.finfo(p.dtype).tiny)
        return p / p.sum(1, keepdim=True)
