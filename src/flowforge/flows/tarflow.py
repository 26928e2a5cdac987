"""TarFlow: transformer autoregressive flows (Zhai et al., 2025, "Normalizing Flows are Capable Generative Models").

The data are cut into ``T`` tokens ``u_1 .. u_T`` of ``d`` numbers: ``p x p`` patches of an image (``d = C p^2``,
raster order) or groups of ``token_size`` entries of a vector.  Each of the ``K`` blocks is a MAF over tokens whose
conditioner is a causal transformer (learned positional embeddings, pre-norm attention and MLP layers):

    z_t = (u_t - mu_t(u_{<t})) * exp(-alpha_t(u_{<t})),     log |det dz/du| = - sum_{t, i} alpha_{t, i},

where ``(alpha_t, mu_t)`` is the transformer's output at position ``t - 1`` (the outputs shifted right by one, so
token ``t`` only sees tokens before it).  The first token's ``(alpha_1, mu_1)`` is 0 (``first_token=identity``, the
paper's choice) or a learned constant (``first_token=learned``).  ``affine=nvp`` learns ``alpha`` and ``mu``;
``affine=plain`` only ``mu`` (volume preserving; the scale then comes from a learned diagonal base).  The token order
reverses between blocks, so every token is transformed given every other one across two blocks.

The inverse is sequential over tokens: ``u_t = z_t exp(alpha_t) + mu_t``.  With a key/value cache
(:class:`KVCache`) step ``t`` runs the transformer on token ``u_{t-1}`` alone, reusing the keys and values of the
earlier tokens: ``T - 1`` one-token passes per block instead of ``T - 1`` passes over the whole prefix.
``sample(..., compile=True)`` compiles that one-token step (:meth:`TarFlowBlock.decode`) with ``torch.compile``, the
position a symbolic integer, so that one compilation serves every step after the first, in every block.

Guidance (sampling only): at every step the affine parameters of a second, "unconditional" pass ``(alpha^u, mu^u)``
are extrapolated away from, ``alpha <- alpha + w (alpha - alpha^u)`` (and ``mu`` likewise).  For a class-conditional
model the second pass sees the null context (classifier-free guidance; the model is trained with
``context_dropout`` > 0 so it learns one); for an unconditional model it is the same model with its attention
logits divided by ``attn_temperature`` (the paper's guidance for unconditional models).

Images live in [0, 1] in flowforge; TarFlow maps them to [-1, 1] (``2 y - 1``, log-det ``D log 2``) as the paper.
Training noise: uniform dequantisation, or Gaussian noise augmentation ``y = (x + 1/2) / K + (sigma / 2) eps``
(``noise_std`` = sigma in the model's [-1, 1] units, the paper's).  A model trained with noise denoises its samples
by one score step (Tweedie's formula; the score from the flow by autograd):

    x_hat = y + s^2 grad_y log p(y),     s = sigma / 2 (the noise std in [0, 1] units).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.errors import ConfigError
from flowforge.flows.base import Compose, Transform
from flowforge.flows.context import context_features, make_context
from flowforge.flows.distributions import make_base
from flowforge.flows.model import Flow
from flowforge.flows.multiscale import Reshape
from flowforge.flows.preprocessing import GaussianDequantization, Symmetric, UniformDequantization
from flowforge.flows.registry import register_family

AFFINES = ("nvp", "plain")
FIRST_TOKENS = ("identity", "learned")
GUIDES = ("ab", "a", "b")


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least float32 (bf16/fp16 log-scales are exponentiated and summed in float32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# ------------------------------------------------------------------------------------------------ tokens
def auto_patch_size(shape: Sequence[int], max_tokens: int = 256) -> int:
    """The smallest ``p`` dividing H and W with ``(H / p) (W / p) <= max_tokens``."""
    _, h, w = shape
    for p in range(1, min(h, w) + 1):
        if h % p == 0 and w % p == 0 and (h // p) * (w // p) <= max_tokens:
            return p
    raise ConfigError(
        f"no patch size divides the image {h} x {w} into at most {max_tokens} tokens; set model.patch_size"
    )


class Tokens(Transform):
    """``(B, *shape) -> (B, T, d)``: images into ``p x p`` patches (raster order, ``d = C p^2``, the layout of
    ``torch.nn.functional.unfold``), vectors into groups of ``d`` consecutive entries.  A permutation: log-det 0."""

    def __init__(self, shape: Sequence[int], patch_size: int = 1, token_size: int = 1):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) == 3:
            c, h, w = self.shape
            p = int(patch_size)
            if p < 1 or h % p or w % p:
                raise ConfigError(f"model.patch_size={patch_size} must divide the image height {h} and width {w}")
            self.patch = p
            self.num_tokens, self.token_dim = (h // p) * (w // p), c * p * p
        else:
            (dim,) = self.shape
            g = int(token_size)
            if g < 1 or dim % g:
                raise ConfigError(f"model.token_size={token_size} must divide the data dimension {dim}")
            self.patch = None
            self.num_tokens, self.token_dim = dim // g, g

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.patch is None:
            u = x.reshape(x.shape[0], self.num_tokens, self.token_dim)
        else:
            u = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)
        return u, x.new_zeros(x.shape[0])

    def inverse(self, u: Tensor, context: Tensor | None = None) -> Tensor:
        if self.patch is None:
            return u.reshape(u.shape[0], *self.shape)
        return F.fold(u.transpose(1, 2), self.shape[1:], self.patch, stride=self.patch)


# ------------------------------------------------------------------------------------------------ transformer
class KVCache:
    """The keys and values of the tokens seen so far by one attention layer, in buffers of ``capacity`` positions
    allocated on the first step (no re-allocation as the sequence grows)."""

    def __init__(self, capacity: int):
        self.capacity, self.length = int(capacity), 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v`` of shape ``(B, heads, t, head_dim)``; the keys and values of every position so far."""
        if self.k is None:
            b, h, _, d = k.shape
            self.k = k.new_empty(b, h, self.capacity, d)
            self.v = v.new_empty(b, h, self.capacity, d)
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention, causal over the tokens; with a :class:`KVCache`, the new tokens attend to
    every cached one.  ``temperature`` divides the attention logits (the unconditional guidance of TarFlow)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, channels // heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values ``(B, heads, t, head_dim)`` of ``x`` ``(B, t, C)``."""
        b, t, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def _merge(self, out: Tensor) -> Tensor:
        """The heads' outputs ``(B, heads, t, head_dim)`` through the output projection: ``(B, t, C)``."""
        b, _, t, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def forward(self, x: Tensor, cache: KVCache | None = None, temperature: float = 1.0) -> Tensor:
        q, k, v = self._qkv(x)
        scale = self.head_dim**-0.5 / temperature
        if cache is None:
            return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
        if x.shape[1] != 1:
            raise ValueError("the key/value cache takes one token per step")
        k, v = cache.extend(k, v)
        return self._merge(F.scaled_dot_product_attention(q, k, v, scale=scale))

    def step(self, x: Tensor, keys: Tensor, values: Tensor, pos: int, scale: Tensor) -> Tensor:
        """One token ``x`` ``(B, 1, C)`` at position ``pos`` over buffers ``keys, values`` ``(B, heads, T,
        head_dim)`` of every position: its key and value are written at ``pos`` and it attends to positions
        ``0 .. pos``, ``softmax(q K^T scale) V``.  Written as plain products so that the compiled step
        (:meth:`TarFlowBlock.decode`) fuses them."""
        q, k, v = self._qkv(x)
        keys[:, :, pos : pos + 1] = k
        values[:, :, pos : pos + 1] = v
        keys, values = keys[:, :, : pos + 1], values[:, :, : pos + 1]
        return self._merge(((q @ keys.transpose(-1, -2)) * scale).softmax(-1) @ values)


class FeedForward(nn.Module):
    """Pre-norm MLP ``Linear(C, e C) -> GELU -> Linear(e C, C)``."""

    def __init__(self, channels: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.main = nn.Sequential(
            nn.Linear(channels, channels * expansion), nn.GELU(), nn.Linear(channels * expansion, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.main(self.norm(x))


class TransformerLayer(nn.Module):
    """``x + attention(x)`` then ``x + mlp(x)``."""

    def __init__(self, channels: int, heads: int, expansion: int = 4):
        super().__init__()
        self.attention = CausalSelfAttention(channels, heads)
        self.mlp = FeedForward(channels, expansion)

    def forward(self, x: Tensor, cache: KVCache | None = None, temperature: float = 1.0) -> Tensor:
        x = x + self.attention(x, cache, temperature)
        return x + self.mlp(x)

    def step(self, x: Tensor, keys: Tensor, values: Tensor, pos: int, scale: Tensor) -> Tensor:
        """:meth:`forward` of one token over key/value buffers (:meth:`CausalSelfAttention.step`)."""
        x = x + self.attention.step(x, keys, values, pos, scale)
        return x + self.mlp(x)


# ------------------------------------------------------------------------------------------------ the flow block
@dataclass
class SamplingOptions:
    """How :meth:`TarFlowBlock.inverse` runs (set by :meth:`TarFlowModel.sample`): guidance strength ``guidance``
    (0: none) on ``guide`` (``ab``: log-scale and shift, ``a``, ``b``), linearly annealed over the tokens or not,
    the second pass's context features ``null_context`` (None: the model's own context) and attention temperature,
    whether to use the key/value cache, and whether its one-token step runs compiled (:meth:`TarFlowBlock.decode`)."""

    guidance: float = 0.0
    guide: str = "ab"
    annealed: bool = False
    null_context: Tensor | None = None
    attn_temperature: float = 1.0
    cache: bool = True
    compiled: bool = False


class TarFlowBlock(Transform):
    """One autoregressive flow block over tokens ``(B, T, d)`` (module docstring); ``reverse`` flips the token
    order it processes.  The positional embedding of a token follows it through the flip."""

    def __init__(
        self,
        num_tokens: int,
        token_dim: int,
        channels: int,
        num_layers: int,
        heads: int,
        reverse: bool = False,
        affine: str = "nvp",
        first_token: str = "identity",
        context_features: int = 0,
        expansion: int = 4,
    ):
        super().__init__()
        self.num_tokens, self.token_dim, self.reverse = num_tokens, token_dim, reverse
        self.nvp = affine == "nvp"
        self.proj_in = nn.Linear(token_dim, channels)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, channels) * 1e-2)
        self.context_proj = nn.Linear(context_features, channels, bias=False) if context_features else None
        self.layers = nn.ModuleList(TransformerLayer(channels, heads, expansion) for _ in range(num_layers))
        out = 2 * token_dim if self.nvp else token_dim
        self.proj_out = nn.Linear(channels, out)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity
        nn.init.zeros_(self.proj_out.bias)
        self.first = nn.Parameter(torch.zeros(out)) if first_token == "learned" else None
        self.sampling = SamplingOptions()

    def _order(self, u: Tensor) -> Tensor:
        return u.flip(1) if self.reverse else u

    def _offsets(self, h: Tensor | None) -> Tensor:
        """What every token's input embedding adds: its positional embedding (processing order), plus the context's
        projection ``(1 or B, T, channels)``."""
        pos = (self.pos_embed.flip(0) if self.reverse else self.pos_embed).unsqueeze(0)
        if h is not None and self.context_proj is not None:
            return pos + self.context_proj(h).unsqueeze(1)
        return pos

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor]:
        if self.nvp:
            alpha, mu = out.chunk(2, dim=-1)
            return alpha, mu
        return torch.zeros_like(out), out

    def _first(self, like: Tensor) -> Tensor:
        """The first token's output ``(B, 1, out)``: zeros or the learned constant."""
        b = like.shape[0]
        width = self.proj_out.out_features
        if self.first is None:
            return like.new_zeros(b, 1, width)
        return self.first.to(like.dtype).expand(b, 1, width)

    def _trunk(self, u: Tensor, h: Tensor | None, temperature: float = 1.0) -> Tensor:
        """The transformer's outputs at every position of ``u`` (processing order), causal."""
        e = self.proj_in(u) + self._offsets(h)[:, : u.shape[1]]
        for layer in self.layers:
            e = layer(e, temperature=temperature)
        return self.proj_out(e)

    def params(self, u: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(alpha, mu)`` of every token of ``u`` (processing order): the outputs shifted right by one.  The
        transformer sees tokens ``1 .. T - 1`` only: being causal, its outputs there do not depend on token ``T``,
        whose own output would parameterise nothing."""
        t = u.shape[1]
        out = self._trunk(u[:, : t - 1] if t > 1 else u, h)
        return self._split(torch.cat([self._first(out), out[:, : t - 1]], dim=1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u = self._order(x)
        alpha, mu = self.params(u, context)
        z = (u - mu) * torch.exp(-_wide(alpha)).to(u.dtype)
        return self._order(z), -_wide(alpha).sum(dim=(1, 2))

    def decode(
        self, u: Tensor, pos: int, offsets: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], scale: Tensor
    ) -> Tensor:
        """The output that parameterises the token after position ``pos`` from the token ``u`` ``(B, 1, d)`` at
        ``pos``: a one-token pass over key/value buffers of every position, one pair per layer
        (:meth:`TransformerLayer.step`).  The compiled sampler's step (``sample(..., compile=True)``)."""
        e = self.proj_in(u) + offsets[:, pos : pos + 1]
        for layer, k, v in zip(self.layers, keys, values):
            e = layer.step(e, k, v, pos, scale)
        return self.proj_out(e)

    def _stepper(self, z: Tensor, h: Tensor | None, temperature: float) -> Callable[[list[Tensor]], Tensor]:
        """For one branch of the inverse (its context features ``h`` and attention temperature): ``tokens ->`` the
        output that parameterises token ``len(tokens)`` (processing order).  A one-token pass with a
        :class:`KVCache`, the compiled one-token pass (:meth:`decode`), or, without the cache, a pass over the whole
        prefix."""
        opts = self.sampling
        if not opts.cache:
            return lambda tokens: self._trunk(torch.cat(tokens, dim=1), h, temperature)[:, -1:]
        offsets = self._offsets(h)
        # detached: a reversed block's flipped embedding does not require grad, and the compiled step would
        # otherwise be compiled again for the blocks whose embedding does
        if opts.compiled:
            return self._compiled_stepper(z, offsets.detach(), temperature)
        caches = [KVCache(z.shape[1]) for _ in self.layers]

        def step(tokens: list[Tensor]) -> Tensor:
            i = len(tokens) - 1
            e = self.proj_in(tokens[-1]) + offsets[:, i : i + 1]
            for layer, cache in zip(self.layers, caches):
                e = layer(e, cache, temperature)
            return self.proj_out(e)

        return step

    def _compiled_stepper(self, z: Tensor, offsets: Tensor, temperature: float) -> Callable[[list[Tensor]], Tensor]:
        """:meth:`_stepper` through the compiled :meth:`decode`, over key/value buffers allocated once."""
        b, t = z.shape[:2]
        device, attention = z.device, self.layers[0].attention
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else z.dtype
        keys = [z.new_empty(b, attention.heads, t, attention.head_dim, dtype=dtype) for _ in self.layers]
        values = [torch.empty_like(k) for k in keys]
        scale = torch.tensor(attention.head_dim**-0.5 / temperature, dtype=_wide(keys[0]).dtype, device=device)
        decode = _compiled_decode(device.type)
        return lambda tokens: decode(self, tokens[-1], len(tokens) - 1, offsets, keys, values, scale)

    def inverse_and_log_det(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        opts = self.sampling
        z = self._order(z)
        t_max = z.shape[1]
        branches = [(context, 1.0)]
        if opts.guidance:
            branches.append((opts.null_context if opts.null_context is not None else context, opts.attn_temperature))
        steps = [self._stepper(z, h, temp) for h, temp in branches]
        alpha, mu = self._split(self._first(z))
        tokens = [z[:, :1] * torch.exp(_wide(alpha)).to(z.dtype) + mu]
        alphas = [alpha]
        for i in range(t_max - 1):
            outs = [step(tokens) for step in steps]
            alpha, mu = self._split(outs[0])
            if opts.guidance:
                w = opts.guidance * (i + 1) / (t_max - 1) if opts.annealed else opts.guidance
                alpha_u, mu_u = self._split(outs[1])
                if "a" in opts.guide:
                    alpha = alpha + w * (alpha - alpha_u)
                if "b" in opts.guide:
                    mu = mu + w * (mu - mu_u)
            tokens.append(z[:, i + 1 : i + 2] * torch.exp(_wide(alpha)).to(z.dtype) + mu)
            alphas.append(alpha)
        return self._order(torch.cat(tokens, dim=1)), _wide(torch.cat(alphas, dim=1)).sum(dim=(1, 2))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_log_det(z, context)[0]


def _decode(block: TarFlowBlock, *args: Any) -> Tensor:
    return block.decode(*args)


@functools.cache
def _compiled_decode(device_type: str) -> Callable[..., Tensor]:
    """:meth:`TarFlowBlock.decode` compiled with ``torch.compile``, once per process and device type, shared by
    every block.  The position is a Python int: dynamo compiles the first step (position 0) on its own, then one
    version with a symbolic position that serves every later step and block (a second batch size compiles once
    more, with the batch size symbolic).  On the CPU the compiled step is called from C++ (inductor's
    ``cpp_wrapper``): a one-token step is a few small products, and the Python code that otherwise calls them costs
    a tenth of the step."""
    return torch.compile(_decode, options={"cpp_wrapper": True} if device_type == "cpu" else None)


# ------------------------------------------------------------------------------------------------ the model
class TarFlowModel(Flow):
    """A :class:`~flowforge.flows.model.Flow` of TarFlow blocks with the paper's sampling options (guidance,
    attention temperature, denoising) and, for conditional models, context dropout during training (a learned null
    context replaces an example's context with probability ``context_dropout``: what classifier-free guidance
    extrapolates away from)."""

    def __init__(self, *args, noise_std: float | None = None, context_dropout: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_std = noise_std
        self.context_dropout = float(context_dropout)
        features = context_features(self.context)
        self.null_context = nn.Parameter(torch.zeros(features)) if features and self.context_dropout > 0 else None
        self._sampling_now = False  # sampling and denoising never drop the context, in train mode too

    @property
    def blocks(self) -> list[TarFlowBlock]:
        return [m for m in self.transform.modules() if isinstance(m, TarFlowBlock)]

    def embed(self, context: Any, batch: int | None) -> Tensor | None:
        h = super().embed(context, batch)
        if h is not None and self.training and self.null_context is not None and not self._sampling_now:
            drop = torch.rand(h.shape[0], 1, device=h.device) < self.context_dropout
            h = torch.where(drop, self.null_context.to(h.dtype).expand_as(h), h)
        return h

    @contextmanager
    def sampling(self, **options: Any):
        """Run the blocks' inverses with :class:`SamplingOptions` ``options`` inside the ``with``."""
        blocks, opts = self.blocks, SamplingOptions(**options)
        saved = [b.sampling for b in blocks]
        try:
            for b in blocks:
                b.sampling = opts
            yield
        finally:
            for b, s in zip(blocks, saved):
                b.sampling = s

    def check_guidance(self, guidance: float, guide: str, attn_temperature: float) -> None:
        if guidance < 0 or not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number >= 0 (0: none), got {guidance}")
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES} (which affine parameters are guided), got {guide!r}")
        if attn_temperature <= 0:
            raise ValueError(f"attn_temperature must be > 0, got {attn_temperature}")
        if not guidance:
            return
        if self.conditional and self.null_context is None:
            raise ValueError(
                "classifier-free guidance needs a model trained with context dropout (model.context_dropout > 0, "
                "e.g. 0.1 as the paper): this one never learned an unconditional prediction"
            )
        if not self.conditional and attn_temperature == 1.0:
            raise ValueError(
                "guidance of an unconditional model extrapolates away from the same model with its attention "
                "temperature changed: set attn_temperature != 1 (e.g. 0.5 or 1.5)"
            )

    def denoise(self, y: Tensor, context: Any = None, strength: float = 1.0) -> Tensor:
        """One score step ``y + strength s^2 grad_y log p(y | c)`` (module docstring; ``strength=1``: Tweedie's
        formula for the Gaussian noise the model was trained with)."""
        if self.noise_std is None:
            raise ValueError(
                "denoising removes the Gaussian noise a model was trained with; this model was trained with uniform "
                "dequantisation (model.noise_std: null): sample without denoise"
            )
        s2 = (self.noise_std / 2) ** 2
        with torch.enable_grad(), self._no_context_dropout():
            y = y.detach().requires_grad_(True)
            (score,) = torch.autograd.grad(self.log_prob(y, context).sum(), y)
        return (y + strength * s2 * score).detach()

    @contextmanager
    def _no_context_dropout(self):
        saved, self._sampling_now = self._sampling_now, True
        try:
            yield
        finally:
            self._sampling_now = saved

    def sample(
        self,
        n: int,
        context: Any = None,
        temperature: float = 1.0,
        guidance: float = 0.0,
        guide: str = "ab",
        attn_temperature: float = 1.0,
        annealed_guidance: bool = False,
        denoise: float = 0.0,
        cache: bool = True,
        compile: bool = False,
    ) -> Tensor:
        """``n`` samples (as :meth:`Flow.sample`), with guidance of strength ``guidance`` (module docstring),
        ``denoise`` > 0: then one score step of that strength (1: Tweedie), ``cache=False``: without the key/value
        cache (the same samples, slower), ``compile=True``: the cached sampler's one-token step compiled with
        ``torch.compile`` (the same samples to rounding; the first call compiles, seconds to a minute, and so does
        the first at a second batch size, dtype or device; later calls reuse those)."""
        self.check_sample_context(context)
        self.check_guidance(guidance, guide, attn_temperature)
        if compile and not cache:
            raise ValueError("compile=True compiles the key/value cached sampler's one-token step: keep cache=True")
        with torch.no_grad(), self._no_context_dropout():
            h = self._embed_for_sampling(n, context)
            null = self.null_context.to(h.dtype).expand_as(h) if guidance and self.conditional else None
            with self.sampling(
                guidance=guidance,
                guide=guide,
                annealed=annealed_guidance,
                null_context=null,
                attn_temperature=attn_temperature,
                cache=cache,
                compiled=compile,
            ):
                x = self._inverse(self._base_sample(n, temperature, h), h)
        if denoise:
            c = self.sample_context(n, context)
            x = self.denoise(x, c.to(x.device) if isinstance(c, Tensor) else c, denoise)
        return x


def TarFlow(
    shape: Sequence[int],
    num_levels: int | None = None,
    channels: int = 64,
    heads: int = 4,
    num_blocks: int = 4,
    layers_per_block: int = 2,
    patch_size: int | str = "auto",
    max_tokens: int = 256,
    token_size: int = 1,
    expansion: int = 4,
    affine: str = "nvp",
    first_token: str = "identity",
    noise_std: float | None = None,
    base: str = "normal",
    context: Any = None,
    context_net: Any = None,
    context_dropout: float = 0.0,
) -> TarFlowModel:
    """Model config ``tarflow`` (module docstring).  ``channels``/``heads``: transformer width and attention heads;
    ``num_blocks`` flow blocks of ``layers_per_block`` transformer layers; ``patch_size`` (images; ``auto``: the
    smallest leaving at most ``max_tokens`` tokens) or ``token_size`` (vectors); ``noise_std``: Gaussian noise
    augmentation (images; null: uniform dequantisation)."""
    shape = tuple(int(s) for s in shape)
    for name, value, choices in (("affine", affine, AFFINES), ("first_token", first_token, FIRST_TOKENS)):
        if value not in choices:
            raise ConfigError(f"model.{name}={value!r} is not one of {', '.join(choices)}")
    if heads < 1 or channels % heads:
        raise ConfigError(f"model.channels={channels} must be a multiple of model.heads={heads}")
    if num_blocks < 1 or layers_per_block < 1:
        raise ConfigError("model.num_blocks and model.layers_per_block must be at least 1")
    if affine == "plain" and base == "normal":
        raise ConfigError(
            "model.affine=plain blocks are volume preserving: the scale of the data must come from the base; "
            "set model.base=diagonal (a learned per-dimension scale) or use affine=nvp"
        )
    if not 0.0 <= context_dropout < 1.0:
        raise ConfigError(f"model.context_dropout must lie in [0, 1), got {context_dropout}")
    image = len(shape) == 3
    if len(shape) not in (1, 3):
        raise ConfigError(f"data must be vectors (D,) or images (C, H, W); got shape {shape}")
    if noise_std is not None and not image:
        raise ConfigError(
            "model.noise_std is Gaussian noise augmentation of quantised image data; vector data are used as they "
            "are: set model.noise_std=null"
        )
    if noise_std is not None and not (noise_std > 0 and math.isfinite(noise_std)):
        raise ConfigError(f"model.noise_std must be a positive number (the paper: 0.05 to 0.15), got {noise_std}")
    if image and num_levels is None:
        raise ConfigError(f"image data of shape {shape} need num_levels (set it in the dataset config)")
    patch = (auto_patch_size(shape, max_tokens) if patch_size == "auto" else int(patch_size)) if image else 1
    tokens = Tokens(shape, patch, token_size)
    emb = make_context(context, context_net)
    features = context_features(emb)
    if context_dropout and not features:
        raise ConfigError("model.context_dropout applies to conditional models; this one has no context")
    blocks = [
        TarFlowBlock(
            tokens.num_tokens,
            tokens.token_dim,
            channels,
            layers_per_block,
            heads,
            reverse=i % 2 == 1,
            affine=affine,
            first_token=first_token,
            context_features=features,
            expansion=expansion,
        )
        for i in range(num_blocks)
    ]
    dim = math.prod(shape)
    flat = Reshape((tokens.num_tokens, tokens.token_dim), (dim,))
    transform = Compose([tokens, *blocks, flat])
    base_dist = make_base(base, (dim,), features)
    preprocess, dequantizer = None, None
    if image:
        preprocess = Symmetric()
        dequantizer = (
            UniformDequantization(int(num_levels))
            if noise_std is None
            else GaussianDequantization(int(num_levels), float(noise_std) / 2)
        )
    return TarFlowModel(
        transform,
        base_dist,
        shape,
        preprocess,
        dequantizer,
        emb,
        noise_std=noise_std,
        context_dropout=context_dropout,
    )


register_family(
    TarFlow,
    "tarflow",
    conditional=True,
    title="TarFlow (Zhai et al., 2025)",
    test=(
        "model.channels=16",
        "model.heads=2",
        "model.num_blocks=2",
        "model.layers_per_block=1",
        "model.max_tokens=16",
    ),
    smoke={"channels": 16, "heads": 2, "num_blocks": 2, "layers_per_block": 1, "patch_size": "auto", "max_tokens": 64},
)
