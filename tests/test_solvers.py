"""Fixed-point solvers (Picard, Anderson, Broyden) and implicit differentiation: convergence on
contractions, per-sample masks, reported failure on problems built not to converge, acceleration,
and implicit gradients against unrolled autograd and finite differences."""

import logging

import pytest
import torch
from conftest import assert_directional_derivative

from flowforge.errors import ConfigError, ConvergenceError
from flowforge.solvers import Solver, as_solver, check_convergence, implicit_solve

METHODS = ["picard", "anderson", "broyden"]


def tanh_contraction(b=6, n=20, lip=0.95, seed=0):
    """T(x) = tanh(A x) + c per sample with ||A_b||_2 = lip: a contraction with constant <= lip."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    a = a / torch.linalg.matrix_norm(a, 2)[:, None, None] * lip
    c = torch.randn(b, n, generator=g, dtype=torch.float64)
    calls = []

    def step(x, idx):
        calls.append(len(idx))
        return torch.tanh((a[idx] @ x[..., None]).squeeze(-1)) + c[idx]

    return step, calls


@pytest.mark.parametrize("method", METHODS)
def test_converges_on_contraction_to_tolerance(method):
    step, _ = tanh_contraction()
    x, stats = Solver(method, atol=1e-11, rtol=0, max_iters=3000, memory=5)(
        step, torch.zeros(6, 20, dtype=torch.float64)
    )
    assert stats.converged.all() and stats.num_failed == 0
    res = (step(x, torch.arange(6)) - x).abs().amax(1)
    # the returned point is T(x_k) at a converged x_k: its own residual is at most lip * 1e-11
    assert (res <= 1e-11).all(), res
    assert (stats.residual <= 1e-11).all() and (stats.iterations >= 2).all()
    assert stats.method == method


@pytest.mark.parametrize("method", METHODS)
def test_per_sample_masks_freeze_converged_samples(method):
    """One sample contracts slowly (constant 0.98) and the rest fast (0.3): the fast ones stop early,
    the map is evaluated on fewer samples afterwards, and the frozen ones do not move."""
    lip = torch.tensor([0.3, 0.3, 0.3, 0.98], dtype=torch.float64)
    c = torch.tensor([[1.0, -1.0]] * 4, dtype=torch.float64)
    calls = []

    def step(x, idx):
        calls.append(len(idx))
        return lip[idx, None] * torch.sin(x) + c[idx]

    x, stats = Solver(method, atol=1e-12, rtol=0, max_iters=5000)(step, torch.zeros(4, 2, dtype=torch.float64))
    assert stats.converged.all()
    assert stats.iterations[:3].max() < stats.iterations[3], stats.iterations
    assert min(calls) == 1 and calls[0] == 4
    torch.testing.assert_close(x, lip[:, None] * torch.sin(x) + c, atol=1e-11, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_reports_failure_when_there_is_no_fixed_point(method, caplog):
    """T(x) = x + 1 has no fixed point: every method must report all samples as failed (never a
    silent answer), with the residual it reached, and the policy warns or raises."""
    solver = Solver(method, atol=1e-6, rtol=0, max_iters=40)
    x, stats = solver(lambda x, idx: x + 1.0, torch.zeros(3, 4))
    assert stats.num_failed == 3 and not stats.converged.any()
    assert (stats.residual >= 0.5).all()
    with caplog.at_level(logging.WARNING, logger="flowforge"):
        check_convergence(stats, "test solve", solver, "warn")
    assert "3 of 3 samples did not converge in 40" in caplog.text
    with pytest.raises(ConvergenceError, match="did not converge"):
        check_convergence(stats, "test solve", solver, "raise")


def test_nonfinite_iterates_are_failures():
    """An expanding map overflows to inf: the samples stop and are failed, not returned as converged."""
    x, stats = Solver("picard", max_iters=5000)(lambda x, idx: 1e30 * x + 1.0, torch.ones(2, 3))
    assert stats.num_failed == 2 and stats.iterations.max() < 20


def test_accelerated_methods_need_far_fewer_iterations_on_a_slow_contraction():
    """On T(x) = A x + 0.005 sin(x) + c with A symmetric, spectrum in [0, 0.985], Picard needs over
    300 iterations; Anderson and Broyden need under a third of them (the benchmark's target on the
    monotone forward)."""
    g = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(4, 30, 30, generator=g, dtype=torch.float64))[0]
    a = q @ torch.diag_embed(torch.rand(4, 30, generator=g, dtype=torch.float64) * 0.985) @ q.transpose(1, 2)
    c = torch.randn(4, 30, generator=g, dtype=torch.float64)

    def step(x, idx):
        return (a[idx] @ x[..., None]).squeeze(-1) + 0.005 * torch.sin(x) + c[idx]

    x0 = torch.zeros(4, 30, dtype=torch.float64)
    iters = {}
    for method in METHODS:
        _, stats = Solver(method, atol=1e-9, rtol=0, max_iters=20000, memory=5 if method == "anderson" else 30)(
            step, x0
        )
        assert stats.converged.all(), method
        iters[method] = float(stats.iterations.float().mean())
    assert iters["picard"] > 300, iters
    assert iters["anderson"] <= iters["picard"] / 3, iters
    assert iters["broyden"] <= iters["picard"] / 3, iters


def test_damping_tames_an_oscillating_map():
    """T(x) = -0.99 x + c oscillates: plain Picard converges at rate 0.99, damping 0.5 at rate 0.005."""
    c = torch.randn(3, 5, dtype=torch.float64)
    plain = Solver("picard", atol=1e-10, rtol=0, max_iters=10000)(
        lambda x, idx: -0.99 * x + c[idx], torch.zeros_like(c)
    )
    damped = Solver("picard", atol=1e-10, rtol=0, max_iters=10000, damping=0.5)(
        lambda x, idx: -0.99 * x + c[idx], torch.zeros_like(c)
    )
    assert plain[1].converged.all() and damped[1].converged.all()
    assert damped[1].iterations.max() * 50 < plain[1].iterations.min()
    torch.testing.assert_close(damped[0], c / 1.99, atol=1e-9, rtol=0)


def test_picard_fallback_finishes_what_the_accelerated_method_left():
    step, _ = tanh_contraction(lip=0.9)
    x, stats = Solver("broyden", atol=1e-10, rtol=0, max_iters=2, fallback_iters=2000)(
        step, torch.zeros(6, 20, dtype=torch.float64)
    )
    assert stats.converged.all() and stats.method == "broyden+picard"
    assert (stats.iterations > 2).all()
    assert ((step(x, torch.arange(6)) - x).abs().amax(1) < 1e-9).all()


def test_half_precision_input_is_solved_in_float32():
    c = torch.randn(2, 3)
    x, stats = Solver("anderson", atol=1e-6, rtol=0)(
        lambda x, idx: 0.5 * torch.sin(x) + c[idx], torch.zeros(2, 3).bfloat16()
    )
    assert x.dtype == torch.float32 and stats.converged.all()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(method="newton"), "unknown solver method 'newton'"),
        (dict(atol=0, rtol=0), "could never stop"),
        (dict(max_iters=0), "max_iters"),
        (dict(damping=0.0), "damping"),
        (dict(memory=0), "memory"),
        (dict(atol=-1), "atol"),
    ],
)
def test_bad_solver_config(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        Solver(**kwargs)


def test_as_solver_from_names_and_mappings():
    assert as_solver("broyden", atol=1e-3).method == "broyden" and as_solver("broyden", atol=1e-3).atol == 1e-3
    assert as_solver({"method": "picard", "max_iters": 7}).max_iters == 7
    with pytest.raises(ConfigError, match="unknown solver options"):
        as_solver({"method": "picard", "tolerance": 1e-3})


# ----------------------------------------------------------------------------------- implicit gradients
def implicit_problem(seed=0):
    torch.manual_seed(seed)
    n = 5
    w = torch.randn(n, n, dtype=torch.float64)
    w = (w / torch.linalg.matrix_norm(w, 2) * 0.8).requires_grad_(True)  # T is a contraction with constant 0.72
    c = torch.randn(4, n, dtype=torch.float64, requires_grad=True)

    def step(x, idx):
        return 0.9 * torch.tanh(x @ w.T) + c[idx]

    return w, c, step


def loss_of(x, c):
    return (x.pow(2).sum(1) * torch.arange(1, 5, dtype=torch.float64)).sum() + (x * c).sum()


@pytest.mark.parametrize("method", METHODS)
def test_implicit_gradient_matches_unrolled_autograd(method):
    w, c, step = implicit_problem()
    tight = Solver(method, atol=1e-13, rtol=0, max_iters=2000)
    records = []
    x, _ = implicit_solve(step, torch.zeros(4, 5, dtype=torch.float64), tight, tight, records.append)
    g_implicit = torch.autograd.grad(loss_of(x, c), [w, c])
    assert len(records) == 1 and records[0].converged.all()
    xu = torch.zeros(4, 5, dtype=torch.float64)
    for _ in range(400):  # autograd through every step of the iteration
        xu = step(xu, torch.arange(4))
    g_unrolled = torch.autograd.grad(loss_of(xu, c), [w, c])
    for a, b in zip(g_implicit, g_unrolled):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_implicit_gradient_matches_finite_differences():
    w, c, step = implicit_problem(1)
    tight = Solver("anderson", atol=1e-13, rtol=0, max_iters=2000)

    def loss():
        x, _ = implicit_solve(step, torch.zeros(4, 5, dtype=torch.float64), tight, tight)
        return loss_of(x, c)

    gw, gc = torch.autograd.grad(loss(), [w, c])
    for p, g in ((w, gw), (c, gc)):
        assert_directional_derivative(loss, p, g)


def test_implicit_solve_without_grad_builds_no_graph():
    w, c, step = implicit_problem()
    with torch.no_grad():
        x, stats = implicit_solve(step, torch.zeros(4, 5, dtype=torch.float64), Solver(), Solver())
    assert not x.requires_grad and stats.converged.all()


def test_backward_nonconvergence_is_reported():
    """An adjoint solve capped at one iteration cannot reach 1e-14: the record says so."""
    w, c, step = implicit_problem()
    records = []
    x, _ = implicit_solve(
        step,
        torch.zeros(4, 5, dtype=torch.float64),
        Solver(atol=1e-12, rtol=0),
        Solver("picard", atol=1e-14, rtol=0, max_iters=1),
        records.append,
    )
    loss_of(x, c).backward()
    assert records[0].num_failed == 4


def test_samples_without_progress_stop_early_as_stalled(caplog):
    """Picard on T(x) = c - x cycles between x0 and c - x0 forever (the fixed point c / 2 is never
    approached): with patience 20 the samples stop after ~21 iterations, not at max_iters, and are
    reported as unconverged and stalled (the float32 precision floor of a tight tolerance looks the same:
    the residual stops improving).  Anderson solves the same linear map at once."""
    c = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    solver = Solver("picard", atol=1e-7, rtol=0, max_iters=10000, patience=20)
    _, stats = solver(lambda x, idx: c[idx] - x, torch.zeros(2, 2))
    assert stats.num_failed == 2 and stats.num_stalled == 2 and stats.iterations.max() <= 25
    with caplog.at_level(logging.WARNING, logger="flowforge"):
        check_convergence(stats, "test solve", solver, "warn")
    assert "without progress" in caplog.text and "precision" in caplog.text
    x, stats = Solver("anderson", atol=1e-7, rtol=0, patience=20)(lambda x, idx: c[idx] - x, torch.zeros(2, 2))
    assert stats.converged.all() and stats.num_stalled == 0
    torch.testing.assert_close(x, c / 2, atol=1e-6, rtol=0)
