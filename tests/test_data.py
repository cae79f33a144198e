"""Datasets, embeddings and the sample-quality score."""
import numpy as np
import pytest
import torch

import datasets
from engine import metrics
from positional_embeddings import EMBEDDINGS, make_embedding


@pytest.mark.parametrize("kind", EMBEDDINGS)
@pytest.mark.parametrize("size", [2, 16, 128])
def test_embedding_shapes(kind, size):
    emb = make_embedding(kind, size, scale=25.0, max_value=50)
    out = emb(torch.linspace(-4, 4, 7))
    expected = size if kind in ("sinusoidal", "learnable") else 1
    assert out.shape == (7, expected) and emb.output_size == expected
    assert torch.isfinite(out).all()


def test_sinusoidal_embedding_is_sin_and_cos_of_scaled_input():
    emb = make_embedding("sinusoidal", 8, scale=2.0)
    x = torch.tensor([0.3])
    freqs = torch.exp(-np.log(10000.0) * torch.arange(4) / 3)
    torch.testing.assert_close(emb(x)[0], torch.cat([torch.sin(0.6 * freqs), torch.cos(0.6 * freqs)]))
    assert torch.equal(make_embedding("zero", 8)(x), torch.zeros(1, 1))


@pytest.mark.parametrize("name", list(datasets.POINT_DATASETS))
def test_point_datasets_shape_dtype_determinism(name):
    a = datasets.get_dataset(name, 500, seed=3)
    b = datasets.get_dataset(name, 500, seed=3)
    c = datasets.get_dataset(name, 500, seed=4)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.abs().max() < 6  # inside the frames' fixed axes


def test_classic_datasets_have_their_documented_shapes():
    line = datasets.get_dataset("line", 20000)
    assert line[:, 0].abs().max() <= 2 and line[:, 1].abs().max() <= 4
    corners = ((line[:, 0].abs() > 1.5) & (line[:, 1].abs() > 3)).float().mean()
    assert abs(float(corners) - 0.0625) < 0.01  # uniform on the rectangle
    circle = datasets.get_dataset("circle", 20000)
    radius = circle.norm(dim=1)
    on_ring = (radius - 3).abs() < 0.1
    assert ((radius < 0.1) | on_ring).all()  # the grid origin stays at 0, the rest on the circle of radius 3
    dino = datasets.get_dataset("dino", 20000)
    assert -3.5 < float(dino[:, 0].min()) < -2 and 2.5 < float(dino[:, 0].max()) < 4
    moons = datasets.get_dataset("moons", 20000)
    # x in [-1, 2] and y in [-0.5, 1] before (x + 0.3) * 2 - 1, (y + 0.3) * 3 - 1; noise 0.03
    assert -2.6 < moons[:, 0].min() < -2.2 and 3.4 < moons[:, 0].max() < 3.8
    assert -1.9 < moons[:, 1].min() < -1.5 and 2.7 < moons[:, 1].max() < 3.2


def test_energy_distance_and_its_floor():
    x = datasets.get_dataset("moons", 1000, seed=1)
    assert metrics.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    scorer = metrics.PointScorer("moons", 1000, seed=0)
    fresh = scorer(datasets.get_dataset("moons", 1000, seed=99))
    shifted = scorer(datasets.get_dataset("moons", 1000, seed=99) + 0.3)
    assert scorer.floor > 0
    assert fresh["score"] < 3 * scorer.floor  # real data scores near its floor
    assert shifted["score"] > 10 * scorer.floor
    # the floor is about 2 E|X - X'| / n for the V-statistic
    y = datasets.get_dataset("moons", 1000, seed=5)
    assert scorer.floor == pytest.approx(2 * float(torch.cdist(y, y).mean()) / 1000, rel=0.5)
