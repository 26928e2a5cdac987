"""TarFlow exactness: the log-determinant against the brute-force Jacobian (float64), inverse round trips, key/value
cached sampling against uncached sampling, guidance (strength 0, the annealing schedule token by token), the
denoising step against its closed form on a Gaussian model, context dropout, Gaussian noise augmentation and bits per
dimension, bf16 autocast, and the clear errors of the sampling options and of the model config."""

import math

import pytest
import torch

from flowforge.errors import ConfigError
from flowforge.flows.model import Flow
from flowforge.flows.preprocessing import GaussianDequantization
from flowforge.flows.tarflow import TarFlow, TarFlowBlock, TarFlowModel

TINY = dict(channels=8, heads=2, num_blocks=2, layers_per_block=1)


def perturbed(module, std=0.3, out_std=0.1, seed=0):
    """Every parameter moved by N(0, std^2) noise, the output layers ``proj_out`` (which start at zero: at init every
    block is the identity and an exactness test would be trivial) by N(0, out_std^2), which keeps the log-scales
    moderate and the Jacobian well conditioned for the brute-force determinant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = out_std if "proj_out" in name else std
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def tiny(shape, seed=0, out_std=0.1, **kwargs):
    """A tiny TarFlow in float64 with every parameter perturbed (:func:`perturbed`)."""
    options = dict(TINY)
    options.update(kwargs)
    if len(shape) == 3:
        options.setdefault("num_levels", 256)
        options.setdefault("patch_size", 1)
    return perturbed(TarFlow(shape, **options), out_std=out_std, seed=seed).double()


def brute_log_det(f, x):
    """``log |det df/dx|`` per sample from the full autograd Jacobian of ``f`` (which returns ``(z, log_det)``)."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(
            lambda v, xi=xi: f(v.reshape(1, *xi.shape))[0].reshape(-1), xi.reshape(-1), vectorize=True
        )
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        out.append(logabs)
    return torch.stack(out)


def data(model, n=3, seed=1):
    """``n`` points in the model's data space (images in (0, 1)), float64."""
    g = torch.Generator().manual_seed(seed)
    if model.is_image:
        return torch.rand(n, *model.data_shape, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return torch.randn(n, *model.data_shape, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ log-det
@pytest.mark.parametrize(
    "shape, options",
    [
        ((6,), dict(token_size=1)),
        ((6,), dict(token_size=2)),
        ((6,), dict(token_size=2, first_token="learned", num_blocks=3)),
        ((6,), dict(token_size=3, affine="plain", base="diagonal")),
        ((1, 4, 4), dict(patch_size=1)),
        ((1, 4, 4), dict(patch_size=2)),
        ((2, 4, 4), dict(patch_size=1, first_token="learned")),
        ((2, 4, 4), dict(patch_size=2)),
        ((2, 2, 4), dict(patch_size=2, affine="plain", base="diagonal")),
    ],
    ids=[
        "vec-t1",
        "vec-t2",
        "vec-learned-3blocks",
        "vec-plain",
        "img-c1-p1",
        "img-c1-p2",
        "img-c2-p1-learned",
        "img-c2-p2",
        "img-plain",
    ],
)
def test_model_log_det_is_the_jacobian(shape, options):
    """The model's forward (tokens, blocks and, for images, the map ``2 y - 1``) against the brute-force Jacobian."""
    model = tiny(shape, **options)
    x = data(model, n=2)
    _, log_det = model(x)
    ref = brute_log_det(model, x)
    torch.testing.assert_close(log_det, ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("first_token", ["identity", "learned"])
@pytest.mark.parametrize("affine", ["nvp", "plain"])
def test_block_log_det_is_the_jacobian(reverse, first_token, affine):
    block = TarFlowBlock(4, 2, 8, 1, 2, reverse=reverse, affine=affine, first_token=first_token)
    block = perturbed(block).double()
    u = torch.randn(2, 4, 2, dtype=torch.float64)
    _, log_det = block(u)
    ref = brute_log_det(block, u)
    torch.testing.assert_close(log_det, ref, atol=1e-9, rtol=0)
    if affine == "plain":  # volume preserving
        torch.testing.assert_close(log_det, torch.zeros_like(log_det), atol=0, rtol=0)


def test_block_is_autoregressive_in_processing_order():
    """Output token ``t`` depends on input tokens ``<= t`` only (in the flipped order for ``reverse``), and on its own
    input through ``exp(-alpha_t)`` alone: the Jacobian is triangular in processing order."""
    for reverse in (False, True):
        block = perturbed(TarFlowBlock(4, 2, 8, 1, 2, reverse=reverse)).double()
        u = torch.randn(1, 4, 2, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(
            lambda v, block=block: block(v.view(1, 4, 2))[0].reshape(-1), u.reshape(-1)
        )
        jac = jac.view(4, 2, 4, 2)
        order = [3, 2, 1, 0] if reverse else [0, 1, 2, 3]
        jac = jac[order][:, :, order]  # processing order
        for t in range(4):
            for s in range(t + 1, 4):
                assert jac[t, :, s].abs().max() == 0
            diag = jac[t, :, t]
            assert (diag - torch.diag(torch.diagonal(diag))).abs().max() == 0
        assert jac[3, :, 0].abs().max() > 1e-3  # across the sequence, not trivially diagonal


def test_conditional_log_det_is_the_jacobian_in_x():
    model = tiny((4,), context={"features": 3}, token_size=2)
    x = data(model, n=2)
    c = torch.randn(2, 3, dtype=torch.float64)
    _, log_det = model(x, c)
    ref = torch.stack([brute_log_det(lambda v, ci=ci: model(v, ci[None]), xi[None])[0] for xi, ci in zip(x, c)])
    torch.testing.assert_close(log_det, ref, atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------------ inverses
@pytest.mark.parametrize(
    "shape, options",
    [
        ((6,), dict(token_size=2, first_token="learned")),
        ((2, 4, 4), dict(patch_size=2, num_blocks=3)),
        ((6,), dict(token_size=1, affine="plain", base="diagonal", context={"classes": 3})),
    ],
    ids=["vec-learned", "img-p2", "vec-plain-conditional"],
)
@pytest.mark.parametrize("cache", [True, False])
def test_inverse_round_trip(shape, options, cache):
    model = tiny(shape, **options)
    x = data(model)
    c = torch.tensor([0, 2, 1]) if model.conditional else None
    h = model.embed(c, x.shape[0])
    t = model.transform
    y = x if model.preprocess is None else model.preprocess(x)[0]
    args = () if h is None else (h,)
    z, log_det = t(y, *args)
    with model.sampling(cache=cache):
        y_back, inv_log_det = t.inverse_and_log_det(z, *args)
        x_back = model.inverse(z, c)
    torch.testing.assert_close(y_back, y, atol=1e-10, rtol=0)
    torch.testing.assert_close(inv_log_det, -log_det, atol=1e-10, rtol=0)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ sampling
def sampler(shape, **kwargs):
    """A tiny float64 TarFlow with small output layers, so that its inverse stays finite on N(0, I) draws."""
    return tiny(shape, out_std=0.05, **kwargs)


def classes_model(shape=(6,), **kwargs):
    """A class-conditional :func:`sampler` trained with context dropout (it has a null context)."""
    return sampler(shape, token_size=2, context={"classes": 3}, context_dropout=0.5, **kwargs)


def seeded_samples(model, **kwargs):
    """4 samples drawn after ``torch.manual_seed(3)``: the same base draw for every sampler option."""
    torch.manual_seed(3)
    return model.sample(4, **kwargs)


@pytest.mark.parametrize(
    "build, sample_kwargs",
    [
        (lambda: sampler((6,), token_size=1), {}),
        (lambda: sampler((6,), token_size=1), dict(guidance=1.5, attn_temperature=0.6)),
        (lambda: sampler((1, 4, 4), patch_size=2, first_token="learned"), dict(guidance=0.8, attn_temperature=1.4)),
        (classes_model, dict(context=torch.tensor([0, 1, 2, 1]))),
        (classes_model, dict(context=torch.tensor([0, 1, 2, 1]), guidance=2.0, annealed_guidance=True)),
        (classes_model, dict(context=2, guidance=1.0, guide="a", attn_temperature=0.7)),
    ],
    ids=["uncond", "uncond-guided", "img-guided", "classes", "classes-cfg-annealed", "classes-cfg-a-temp"],
)
def test_cached_sampling_equals_uncached(build, sample_kwargs):
    model = build().eval()
    cached = seeded_samples(model, **sample_kwargs)
    uncached = seeded_samples(model, cache=False, **sample_kwargs)
    assert torch.isfinite(cached).all()
    torch.testing.assert_close(cached, uncached, atol=1e-12, rtol=0)
    if not sample_kwargs.get("guidance"):  # the context manager is the same switch for Flow.sample
        with model.sampling(cache=False):
            assert all(b.sampling.cache is False for b in model.blocks)
            torch.manual_seed(3)
            plain = Flow.sample(model, 4, sample_kwargs.get("context"))
        assert all(b.sampling.cache is True for b in model.blocks)  # restored on exit
        torch.testing.assert_close(plain, cached, atol=1e-12, rtol=0)


@pytest.fixture
def eager_decode(monkeypatch):
    """``sample(..., compile=True)`` with :meth:`TarFlowBlock.decode` run eagerly: the compiled step's mathematics
    without the compilation's seconds."""
    import flowforge.flows.tarflow as tarflow

    monkeypatch.setattr(tarflow, "_compiled_decode", lambda device_type: tarflow._decode)


SAMPLERS = [
    (lambda: sampler((6,), token_size=1), dict(guidance=1.5, attn_temperature=0.6)),
    (lambda: sampler((1, 4, 4), patch_size=2, first_token="learned", num_blocks=3), {}),
    (classes_model, dict(context=torch.tensor([0, 1, 2, 1]), guidance=2.0, annealed_guidance=True)),
    (classes_model, dict(context=2, guidance=1.0, guide="a", attn_temperature=0.7)),
]
SAMPLER_IDS = ["uncond-guided", "img-learned-3blocks", "classes-cfg-annealed", "classes-cfg-a-temp"]


@pytest.mark.parametrize("build, sample_kwargs", SAMPLERS, ids=SAMPLER_IDS)
def test_decode_step_equals_the_cached_sampler(eager_decode, build, sample_kwargs):
    """The compiled sampler's step (:meth:`TarFlowBlock.decode`: key/value buffers of every position, written at
    the step's position, attention over the positions up to it) gives the cached sampler's samples, guided and
    conditional too: float64, to 1e-12."""
    model = build().eval()
    cached = seeded_samples(model, **sample_kwargs)
    assert torch.isfinite(cached).all()
    torch.testing.assert_close(seeded_samples(model, compile=True, **sample_kwargs), cached, atol=1e-12, rtol=0)


def test_decode_step_under_bf16_autocast(eager_decode):
    """Under bf16 autocast (keys and values in bf16) the compiled sampler's step gives the cached sampler's samples
    to bf16 rounding."""
    model = sampler((2, 4, 4), patch_size=2).float().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(5)
        cached = model.sample(3)
        torch.manual_seed(5)
        fixed = model.sample(3, compile=True)
    assert torch.isfinite(fixed).all()
    torch.testing.assert_close(fixed, cached, atol=0.05, rtol=0)


@pytest.mark.slow
def test_compiled_sampling_equals_eager():
    """``sample(..., compile=True)`` really compiled (torch.compile), class-conditional with classifier-free
    guidance whose second pass also has an attention temperature: the eager cached sampler's samples to 1e-10
    (float64); a second call reuses the compilation."""
    build, kwargs = SAMPLERS[3]
    model = build().eval()
    eager = seeded_samples(model, **kwargs)
    for _ in range(2):
        torch.testing.assert_close(seeded_samples(model, compile=True, **kwargs), eager, atol=1e-10, rtol=0)


def test_guidance_zero_is_plain_sampling_and_guidance_changes_samples():
    for model, kwargs in (
        (sampler((6,), token_size=1), dict(attn_temperature=0.5)),
        (classes_model(), dict(context=1)),
    ):
        model.eval()
        context = kwargs.get("context")
        torch.manual_seed(4)
        plain = Flow.sample(model, 5, context)
        torch.manual_seed(4)
        zero = model.sample(5, guidance=0.0, **kwargs)
        torch.testing.assert_close(zero, plain, atol=0, rtol=0)
        torch.manual_seed(4)
        guided = model.sample(5, guidance=1.0, **kwargs)
        assert (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize("guide", ["ab", "a", "b"])
def test_guidance_schedule_token_by_token(guide):
    """Every sampled token ``u_t = z_t exp(alpha~_t) + mu~_t`` with ``alpha~ = alpha + w_t (alpha - alpha^u)`` (and
    ``mu~`` likewise, per ``guide``), ``(alpha^u, mu^u)`` from the pass at attention temperature 0.5, and the annealed
    weight ``w_t = w (t - 1) / (T - 1)`` for tokens ``t = 2 .. T``: full strength at the last token."""
    T, w = 5, 1.7
    block = perturbed(TarFlowBlock(T, 2, 8, 1, 2, first_token="learned")).double()
    z = torch.randn(3, T, 2, dtype=torch.float64)
    for annealed in (False, True):
        block.sampling.guidance, block.sampling.guide, block.sampling.annealed = w, guide, annealed
        block.sampling.attn_temperature = 0.5
        u, _ = block.inverse_and_log_det(z)
        out = block._trunk(u, None)[:, :-1]
        out_u = block._trunk(u, None, temperature=0.5)[:, :-1]
        alpha, mu = block._split(out)
        alpha_u, mu_u = block._split(out_u)
        weights = torch.tensor([w * t / (T - 1) if annealed else w for t in range(1, T)], dtype=torch.float64)
        weights = weights.view(1, T - 1, 1)
        if "a" in guide:
            alpha = alpha + weights * (alpha - alpha_u)
        if "b" in guide:
            mu = mu + weights * (mu - mu_u)
        first_alpha, first_mu = block._split(block.first.view(1, 1, -1))
        torch.testing.assert_close(u[:, :1], z[:, :1] * first_alpha.exp() + first_mu, atol=1e-12, rtol=0)
        torch.testing.assert_close(u[:, 1:], z[:, 1:] * alpha.exp() + mu, atol=1e-12, rtol=0)
        if annealed:
            assert weights[0, -1, 0] == w
    block.sampling.guidance = 0.0


def test_annealed_guidance_with_one_step_is_full_strength():
    """With two tokens per block, the only sampled step is the last one: annealed and constant guidance agree."""
    model = classes_model((4,), num_blocks=3).eval()
    torch.manual_seed(5)
    annealed = model.sample(4, context=1, guidance=1.3, annealed_guidance=True)
    torch.manual_seed(5)
    constant = model.sample(4, context=1, guidance=1.3)
    torch.testing.assert_close(annealed, constant, atol=0, rtol=0)
    torch.manual_seed(5)
    weaker = model.sample(4, context=1, guidance=0.65)
    assert (weaker - constant).abs().max() > 1e-3


def test_attention_temperature_guidance_is_void_on_one_token():
    """The attention over a single token is 1 at any temperature: with two tokens per block an unconditional
    model's guidance changes nothing."""
    model = sampler((4,), token_size=2).eval()
    torch.manual_seed(5)
    guided = model.sample(4, guidance=1.3, attn_temperature=0.5)
    torch.manual_seed(5)
    plain = model.sample(4)
    torch.testing.assert_close(guided, plain, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ denoising
def test_denoise_is_tweedie_on_a_gaussian_model():
    """With ``proj_out`` weights zero every block is an elementwise affine map with constant parameters (its
    biases), so ``p(y)`` is a diagonal Gaussian ``N(m, v)`` and the score step is ``y - s^2 (y - m) / v``."""
    noise_std = 0.2
    model = tiny((2, 4, 4), patch_size=2, noise_std=noise_std, first_token="learned", base="diagonal")
    with torch.no_grad():
        for b in model.blocks:
            b.proj_out.weight.zero_()
    model.eval()
    dim = model.dim
    y0 = torch.full((1, *model.data_shape), 0.25, dtype=torch.float64)
    z0 = model(y0)[0]
    z1 = model(y0 + 1)[0]
    tokens, flat = model.transform.transforms[0], model.transform.transforms[-1]

    def pixels(t):
        """A vector in the base's layout (tokens flattened) in the image layout of ``y``, flattened."""
        return tokens.inverse(flat.inverse(t.view(1, dim))).view(-1)

    a = pixels(z1 - z0)  # z = a y + c per dimension (in the image layout)
    c = pixels(z0) - a * 0.25
    loc, scale = pixels(model.base.loc), pixels(model.base.log_scale.exp())
    m = (loc - c) / a  # z ~ N(loc, scale^2)  =>  y ~ N((loc - c) / a, scale^2 / a^2)
    v = (scale / a) ** 2
    y = torch.rand(4, *model.data_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flat = y.view(4, dim)
    log_normal = (-0.5 * (flat - m) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)).sum(1)
    torch.testing.assert_close(model.log_prob(y), log_normal, atol=1e-10, rtol=0)  # the model is that Gaussian
    s2 = (noise_std / 2) ** 2
    ref = flat - s2 * (flat - m) / v
    torch.testing.assert_close(model.denoise(y).view(4, dim), ref, atol=1e-10, rtol=0)
    half = flat - 0.5 * s2 * (flat - m) / v
    torch.testing.assert_close(model.denoise(y, strength=0.5).view(4, dim), half, atol=1e-10, rtol=0)
    assert (ref - flat).abs().max() > 1e-3


def test_sample_with_denoise_is_one_score_step_of_the_sample():
    model = sampler((1, 4, 4), patch_size=2, noise_std=0.1).eval()
    torch.manual_seed(6)
    raw = model.sample(3)
    torch.manual_seed(6)
    denoised = model.sample(3, denoise=1.0)
    torch.testing.assert_close(denoised, model.denoise(raw), atol=1e-12, rtol=0)
    assert (denoised - raw).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------------ errors
def test_sampling_option_errors():
    uncond = TarFlow((4,), **TINY)
    cond = TarFlow((4,), context={"classes": 3}, **TINY)
    with pytest.raises(ValueError, match="needs a model trained with context dropout"):
        cond.sample(2, context=0, guidance=1.0)
    with pytest.raises(ValueError, match="set attn_temperature != 1"):
        uncond.sample(2, guidance=1.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        uncond.sample(2, guidance=-0.5, attn_temperature=0.5)
    with pytest.raises(ValueError, match="finite number >= 0"):
        uncond.sample(2, guidance=float("nan"), attn_temperature=0.5)
    with pytest.raises(ValueError, match="guide must be one of"):
        uncond.sample(2, guidance=1.0, guide="c", attn_temperature=0.5)
    with pytest.raises(ValueError, match="attn_temperature must be > 0"):
        uncond.sample(2, guidance=1.0, attn_temperature=0.0)
    with pytest.raises(ValueError, match="compile=True compiles the key/value cached sampler's one-token step"):
        uncond.sample(2, cache=False, compile=True)
    image = TarFlow((1, 4, 4), num_levels=256, patch_size=2, **TINY)
    with pytest.raises(ValueError, match="trained with uniform dequantisation"):
        image.denoise(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="trained with uniform dequantisation"):
        image.sample(2, denoise=1.0)


@pytest.mark.parametrize(
    "shape, options, match",
    [
        ((4,), dict(channels=10, heads=4), "model.channels=10 must be a multiple of model.heads=4"),
        (
            (1, 4, 6),
            dict(num_levels=256, patch_size=4),
            "model.patch_size=4 must divide the image height 4 and width 6",
        ),
        ((6,), dict(token_size=4), "model.token_size=4 must divide the data dimension 6"),
        ((4,), dict(affine="plain"), "set model.base=diagonal"),
        ((4,), dict(noise_std=0.1), "vector data are used as they are"),
        ((1, 4, 4), dict(num_levels=256, noise_std=-0.1), "noise_std must be a positive number"),
        ((4,), dict(affine="rqs"), "model.affine='rqs' is not one of nvp, plain"),
        ((4,), dict(first_token="zero"), "model.first_token='zero' is not one of identity, learned"),
        ((4,), dict(context_dropout=0.1), "context_dropout applies to conditional models"),
        ((4,), dict(context={"classes": 2}, context_dropout=1.0), r"context_dropout must lie in \[0, 1\)"),
        ((1, 4, 4), dict(), "need num_levels"),
    ],
)
def test_config_errors(shape, options, match):
    kwargs = dict(channels=8, heads=2)
    kwargs.update(options)
    with pytest.raises(ConfigError, match=match):
        TarFlow(shape, **kwargs)


# ------------------------------------------------------------------------------------------------ context dropout
def test_context_dropout_uses_the_null_context_in_training_only():
    model = classes_model()
    x = data(model, n=16)
    c = torch.arange(16) % 3
    model.eval()
    lp_eval = model.log_prob(x, c)
    torch.testing.assert_close(model.log_prob(x, c), lp_eval, atol=0, rtol=0)  # deterministic
    null = model.null_context.expand(16, -1)
    z, log_det = model._forward(x, null)
    lp_null = model._base_log_prob(z, null) + log_det
    model.train()
    torch.manual_seed(8)
    lp_train = model.log_prob(x, c)
    torch.manual_seed(8)
    drop = torch.rand(16, 1) < 0.5  # the draw the embedding makes
    assert 0 < int(drop.sum()) < 16
    torch.testing.assert_close(lp_train, torch.where(drop[:, 0], lp_null, lp_eval), atol=1e-12, rtol=0)
    assert (lp_null - lp_eval).abs().min() > 1e-6  # the dropped rows do differ from eval mode
    unconditional = tiny((6,), token_size=2).train()
    x6 = data(unconditional)
    torch.testing.assert_close(unconditional.log_prob(x6), unconditional.eval().log_prob(x6), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ noise augmentation
def test_gaussian_dequantization_statistics():
    K, s, n = 4, 0.05, 200_000
    deq = GaussianDequantization(K, s)
    x = torch.randint(0, K, (n, 3), generator=torch.Generator().manual_seed(0)).double()
    torch.manual_seed(9)
    y, log_weight = deq(x)
    noise = y - (x + 0.5) / K
    # the mean of n draws has std s / sqrt(n) = 1.1e-4: 5 standard errors; the sample std within 1 %
    assert noise.mean(0).abs().max() < 5 * s / math.sqrt(n)
    torch.testing.assert_close(noise.std(0), torch.full((3,), s, dtype=torch.float64), atol=0, rtol=0.01)
    torch.testing.assert_close(log_weight, torch.full((n,), -3 * math.log(K), dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="must be positive"):
        GaussianDequantization(K, 0.0)


def test_bits_per_dim_of_a_noise_augmented_model():
    noise_std, K = 0.1, 256
    model = tiny((1, 4, 4), patch_size=2, noise_std=noise_std, num_levels=K)
    assert isinstance(model.dequantizer, GaussianDequantization)
    assert model.dequantizer.std == noise_std / 2 and model.dequantizer.num_levels == K
    x = torch.randint(0, K, (3, 1, 4, 4), generator=torch.Generator().manual_seed(1)).double()
    torch.manual_seed(10)
    bpd = model.bits_per_dim(x)
    torch.manual_seed(10)
    y = (x + 0.5) / K + noise_std / 2 * torch.randn_like(x)
    D = 16
    ref = -(model.log_prob(y) - D * math.log(K)) / (D * math.log(2))
    torch.testing.assert_close(bpd, ref, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------ bf16
def test_bf16_autocast_on_cpu():
    """Under bf16 autocast the transformer runs in bf16 and each block sums its log-scales in float32."""
    model = perturbed(TarFlow((2, 4, 4), num_levels=256, patch_size=2, context={"classes": 3}, **TINY))
    assert isinstance(model, TarFlowModel)
    x = torch.rand(4, 2, 4, 4)
    c = torch.tensor([0, 1, 2, 0])
    _, ref = model(x, c)
    u = model.transform.transforms[0](2 * x - 1)[0]
    h = model.embed(c, 4)
    block = model.blocks[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, log_det = model(x, c)
        lp = model.log_prob(x, c)
        alpha, _ = block.params(u, h)
        _, block_log_det = block(u, h)
    assert alpha.dtype == torch.bfloat16
    assert block_log_det.dtype == torch.float32
    torch.testing.assert_close(block_log_det, -alpha.float().sum(dim=(1, 2)), atol=1e-5, rtol=0)
    assert log_det.dtype == torch.float32 and lp.dtype == torch.float32
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all() and torch.isfinite(lp).all()
    # bf16 keeps ~3 significant digits of each log-scale
    torch.testing.assert_close(log_det, ref, atol=0.05 * float(ref.detach().abs().max()), rtol=0)


def test_sampling_in_train_mode_never_drops_the_context():
    torch.manual_seed(0)
    model = TarFlow(
        (4,), channels=8, heads=2, num_blocks=2, layers_per_block=1, context={"classes": 3}, context_dropout=0.9
    )
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    model.train()
    c = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(1)
    x_train = model.sample(4, context=c)
    model.eval()
    torch.manual_seed(1)
    torch.testing.assert_close(x_train, model.sample(4, context=c), rtol=1e-6, atol=1e-6)


def test_a_temperature_passed_by_position_is_refused():
    from flowforge.flows import RealNVP

    for model in (TarFlow((4,), channels=8, heads=2, num_blocks=2, layers_per_block=1), RealNVP((2,), num_steps=2)):
        with pytest.raises(TypeError, match="pass the temperature by keyword"):
            model.sample(4, 0.7)
