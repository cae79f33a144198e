"""Training data: the 2D point clouds (each a float32 tensor of shape [n, 2]), and which data a run uses.

Every generator is deterministic given its seed and uses only numpy, so a fresh,
independent sample of the same distribution (for scoring) is one call away:
`get_dataset(name, n, seed=other_seed)`.
"""
import os

import numpy as np
import pandas as pd
import torch

from images import data as image_data

HERE = os.path.dirname(os.path.abspath(__file__))
DINO_PATH = os.path.join(HERE, "static", "dino.tsv")


def dino(n, rng):
    # The 142 points of the Datasaurus "dino" (raw units: x ~ 22..98, y ~ 3..99),
    # resampled with N(0, 0.15^2) jitter and mapped into roughly [-4, 4]^2.
    points = pd.read_csv(DINO_PATH, sep="\t")
    ix = rng.integers(0, len(points), n)
    x = points["x"].to_numpy()[ix] + rng.normal(size=n) * 0.15
    y = points["y"].to_numpy()[ix] + rng.normal(size=n) * 0.15
    return np.stack([(x / 54 - 1) * 4, (y / 48 - 1) * 4], axis=1)


def line(n, rng):
    # A uniform rectangle, |x| <= 2, |y| <= 4 (the classic "line").
    return np.stack([rng.uniform(-2, 2, n), rng.uniform(-4, 4, n)], axis=1)


def moons(n, rng):
    # Two interleaving half circles with Gaussian noise 0.03, as make_moons draws them
    # (t uniform in [0, pi] instead of a grid), stretched to fill about [-4, 4]^2.
    n_outer = n // 2
    t = rng.uniform(0, np.pi, n)
    outer = np.stack([np.cos(t), np.sin(t)], axis=1)
    inner = np.stack([1 - np.cos(t), 1 - np.sin(t) - 0.5], axis=1)
    X = np.where((np.arange(n) < n_outer)[:, None], outer, inner)
    X = X + rng.normal(size=(n, 2)) * 0.03
    X = X[rng.permutation(n)]
    return np.stack([(X[:, 0] + 0.3) * 2 - 1, (X[:, 1] + 0.3) * 3 - 1], axis=1)


def circle(n, rng):
    # Points of a 5x5 grid in [-0.4, 0.4]^2 pushed onto the unit circle (the grid origin
    # stays at 0), each moved by up to 0.03 in a random direction, scaled by 3.
    x = np.round(rng.uniform(-0.5, 0.5, n) / 0.2) * 0.2
    y = np.round(rng.uniform(-0.5, 0.5, n) / 0.2) * 0.2
    norm = np.sqrt(x**2 + y**2) + 1e-10
    x, y = x / norm, y / norm
    theta = rng.uniform(0, 2 * np.pi, n)
    r = rng.uniform(0, 0.03, n)
    return np.stack([x + r * np.cos(theta), y + r * np.sin(theta)], axis=1) * 3


# --- the standard 2D suite of the diffusion and normalising-flow papers (FFJORD, Grathwohl et al. 2019) ---

def eight_gaussians(n, rng):
    # Eight Gaussians (std 0.35) evenly spaced on a circle of radius 2.83.
    angle = rng.integers(0, 8, n) * (np.pi / 4)
    centers = np.stack([np.cos(angle), np.sin(angle)], axis=1) * 4
    return (centers + rng.normal(size=(n, 2)) * 0.5) / 1.414


def checkerboard(n, rng):
    # Uniform on the black squares of a 4x4 checkerboard covering [-4, 4]^2.
    x = rng.uniform(-2, 2, n)
    y = rng.uniform(0, 1, n) - rng.integers(0, 2, n) * 2 + np.floor(x) % 2
    return np.stack([x, y], axis=1) * 2


def two_spirals(n, rng):
    # Two interleaved Archimedean spirals, 1.5 turns each.
    r = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
    sign = np.where(rng.uniform(0, 1, n) < 0.5, 1.0, -1.0)
    x = sign * (-np.cos(r) * r + rng.uniform(0, 0.5, n))
    y = sign * (np.sin(r) * r + rng.uniform(0, 0.5, n))
    return (np.stack([x, y], axis=1) + rng.normal(size=(n, 2)) * 0.1) / 3


def swissroll(n, rng):
    # The 2D Swiss roll: t from 1.5 pi to 4.5 pi, (t cos t, t sin t) plus noise, / 5.
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(0, 1, n))
    X = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + rng.normal(size=(n, 2))
    return X / 5


def pinwheel(n, rng):
    # Five curved blades: Gaussian blobs bent by a rotation that grows with the radius.
    blade = rng.integers(0, 5, n)
    features = rng.normal(size=(n, 2)) * np.array([0.3, 0.1]) + np.array([1.0, 0.0])
    angle = blade * (2 * np.pi / 5) + 0.25 * np.exp(features[:, 0])
    cos, sin = np.cos(angle), np.sin(angle)
    x = features[:, 0] * cos - features[:, 1] * sin
    y = features[:, 0] * sin + features[:, 1] * cos
    return np.stack([x, y], axis=1) * 2


def rings(n, rng):
    # Four concentric circles of radius 3, 2.25, 1.5 and 0.75 with noise 0.08.
    radius = rng.integers(1, 5, n) * 0.75
    theta = rng.uniform(0, 2 * np.pi, n)
    X = np.stack([np.cos(theta), np.sin(theta)], axis=1) * radius[:, None]
    return X + rng.normal(size=(n, 2)) * 0.08


POINT_DATASETS = {
    "dino": dino, "moons": moons, "line": line, "circle": circle,
    "8gaussians": eight_gaussians, "checkerboard": checkerboard, "2spirals": two_spirals,
    "swissroll": swissroll, "pinwheel": pinwheel, "rings": rings,
}
CLASSIC_DATASETS = ("dino", "moons", "line", "circle")


def get_dataset(name, n=8000, seed=0):
    """`n` points of the 2D dataset `name` as a float32 tensor [n, 2], deterministic by seed."""
    if name not in POINT_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(POINT_DATASETS)}")
    rng = np.random.default_rng(seed)
    return torch.from_numpy(POINT_DATASETS[name](n, rng).astype(np.float32))


IMAGE_DATASETS = image_data.IMAGE_DATASETS
DATASETS = tuple(POINT_DATASETS) + IMAGE_DATASETS
DataError = image_data.DataError


def is_image_dataset(name):
    return name in IMAGE_DATASETS


def sample_shape(config):
    """Shape of one sample, without the batch dimension: (2,) for points, (1, 28, 28) for images."""
    return (1, 28, 28) if is_image_dataset(config["dataset"]) else (2,)


def check_available(config):
    """Fail early, before any work, when the data can't be had."""
    if is_image_dataset(config["dataset"]):
        for split in image_data.IDX_FILES:  # finds (or downloads) and parses every file
            image_data.load_images(config, split)


def load_training_data(config, device="cpu"):
    """(data [N, ...], labels [N] or None) on `device` for a training run described by `config`.

    Images: the first --dataset_size training images, with their labels when the model is
    class-conditional."""
    if not is_image_dataset(config["dataset"]):
        return get_dataset(config["dataset"], config["dataset_size"], config["seed"]).to(device), None
    images, labels = image_data.load_images(config, "train")
    images, labels = images[:config["dataset_size"]].to(device), labels[:config["dataset_size"]].to(device)
    return images, (labels if config.get("class_conditional") else None)
