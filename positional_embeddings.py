"""Embeddings that turn a scalar (a coordinate or a timestep) into a feature vector.

Every embedding of a scalar maps a tensor of shape [B] to [B, output_size]; an embedding of a
point maps [B, 2] to [B, output_size]. The MLP in ddpm.py embeds the point (make_point_embedding)
and the timestep, and concatenates them; the U-Net (images/unet.py) embeds its timestep with the
same SinusoidalEmbedding.
"""
import math

import torch
import torch.nn as nn


def geometric_frequencies(n: int, endpoint: bool = True) -> torch.Tensor:
    """n frequencies from 1 down to 1/10000 (endpoint=False: stopping one step short of it, as
    the Transformer and DDPM's U-Net do), spaced geometrically (Vaswani et al. 2017)."""
    exponent = torch.arange(n, dtype=torch.float32) / (max(n - 1, 1) if endpoint else n)
    return torch.exp(-math.log(10000.0) * exponent)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sin/cos features (Vaswani et al. 2017), as DDPM embeds t.

    For inputs that live in a small range (2D coordinates within +-4.7) a `scale`
    (the MLP's --input_scale, 200 by default) spreads them over many periods: these are
    Fourier features (Tancik et al. 2020), which let an MLP fit sharp detail it would
    otherwise blur.
    """

    def __init__(self, size: int, scale: float = 1.0, endpoint: bool = True):
        super().__init__()
        if size < 2 or size % 2:
            raise ValueError(f"sinusoidal embedding size must be even and >= 2, got {size}")
        self.output_size = size
        self.scale = scale
        self.register_buffer("frequencies", geometric_frequencies(size // 2, endpoint), persistent=False)

    def forward(self, x):  # x: [B] -> [B, size]
        angles = (x.float() * self.scale)[:, None] * self.frequencies[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class RandomDirectionEmbedding(nn.Module):
    """Sinusoidal features of a whole point along random directions: sin/cos of f_k (u_k . p)
    with the sinusoidal embedding's frequencies f_k (scale down to scale/10000, geometric) and
    unit vectors u_k at random angles. One sinusoidal embedding per coordinate only varies
    along the axes; these features vary along many directions, so the MLP's first layer
    already sees oblique ridges at every frequency (random Fourier features, Tancik et al.
    2020, with the frequencies spread from coarse to fine). The directions are a buffer in
    the state_dict, drawn from a fixed seed."""

    def __init__(self, size: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if size < 2 or size % 2:
            raise ValueError(f"random-direction embedding size must be even and >= 2, got {size}")
        self.output_size = size
        half = size // 2
        frequencies = scale * geometric_frequencies(half)
        angles = torch.rand(half, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
        directions = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # [half, 2]
        self.register_buffer("B", frequencies[:, None] * directions)               # [half, 2]

    def forward(self, p):  # p: [B, 2] -> [B, size]
        angles = p.float() @ self.B.T
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class LearnableEmbedding(nn.Module):
    """A learned linear map from the scalar to `size` features."""

    def __init__(self, size: int, max_value: float = 1.0):
        super().__init__()
        self.output_size = size
        self.max_value = max_value  # inputs are divided by it to keep them O(1)
        self.linear = nn.Linear(1, size)

    def forward(self, x):  # [B] -> [B, size]
        return self.linear(x.float()[:, None] / self.max_value)


class LinearEmbedding(nn.Module):
    """The scalar itself, rescaled: one feature."""

    def __init__(self, size: int, scale: float = 1.0):
        super().__init__()
        self.output_size = 1
        self.scale = scale
        self.size = size

    def forward(self, x):  # [B] -> [B, 1]
        return (x.float() / self.size * self.scale)[:, None]


class IdentityEmbedding(nn.Module):
    """The raw scalar: one feature."""

    output_size = 1

    def forward(self, x):  # [B] -> [B, 1]
        return x.float()[:, None]


class ZeroEmbedding(nn.Module):
    """Drops the input: one feature that is always 0 (the model never sees it)."""

    output_size = 1

    def forward(self, x):  # [B] -> [B, 1]
        return torch.zeros_like(x, dtype=torch.float32)[:, None]


EMBEDDINGS = ("sinusoidal", "learnable", "linear", "identity", "zero")


class SeveralTimes(nn.Module):
    """Several scalars [B, k] (MeanFlow's t and t - r), each embedded by its own embedding, side by side."""

    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = nn.ModuleList(embeddings)
        self.output_size = sum(e.output_size for e in embeddings)

    def forward(self, x):  # [B, k] -> [B, output_size]
        return torch.cat([embed(x[:, i]) for i, embed in enumerate(self.embeddings)], dim=-1)


def make_embedding(kind: str, size: int, scale: float = 1.0, max_value: float = 1.0, times: int = 1) -> nn.Module:
    """Build an embedding by name. `scale` is used by sinusoidal and linear, `max_value` by learnable.
    times k > 1: an embedding of k scalars [B, k], each its own (SeveralTimes)."""
    if times > 1:
        return SeveralTimes([make_embedding(kind, size, scale, max_value) for _ in range(times)])
    if kind == "sinusoidal":
        return SinusoidalEmbedding(size, scale)
    if kind == "learnable":
        return LearnableEmbedding(size, max_value)
    if kind == "linear":
        return LinearEmbedding(size, scale)
    if kind == "identity":
        return IdentityEmbedding()
    if kind == "zero":
        return ZeroEmbedding()
    raise ValueError(f"unknown embedding {kind!r}; choose from {', '.join(EMBEDDINGS)}")


class PerAxisEmbedding(nn.Module):
    """A point [B, 2] embedded one coordinate at a time, the two feature vectors side by side (the classic's way)."""

    def __init__(self, kind: str, size: int, scale: float = 1.0):
        super().__init__()
        self.x, self.y = make_embedding(kind, size, scale=scale), make_embedding(kind, size, scale=scale)
        self.output_size = self.x.output_size + self.y.output_size

    def forward(self, p):  # [B, 2] -> [B, output_size]
        return torch.cat([self.x(p[:, 0]), self.y(p[:, 1])], dim=-1)


def make_point_embedding(kind: str, size: int, scale: float = 1.0) -> nn.Module:
    """The embedding of a 2D point: "fourier" embeds the whole point along random directions, as wide
    (2 size) as any other kind applied to each coordinate (PerAxisEmbedding)."""
    if kind == "fourier":
        return RandomDirectionEmbedding(2 * size, scale=scale)
    return PerAxisEmbedding(kind, size, scale)
