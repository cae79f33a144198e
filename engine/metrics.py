"""Sample-quality scores for 2D point clouds.

The score of a frame is the energy distance (Szekely & Rizzo 2013) between the generated
points and a fresh sample of the same size from the dataset's own distribution:

    E(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|

estimated with all pairs (the V-statistic: within-sample means include the zero diagonal).
For two independent samples of size n from the *same* distribution the estimate is not
0 but about 2 E|X - X'| / n: that is the noise floor, the best any sampler can score at
that n. A frame "within 2x the floor" is statistically close to perfect.

A point file (--dataset my_points.csv) has no generator to draw fresh points from: its frames are
scored against the fifth of the file held out from training (datasets.split_held_out), in the file's
units, and its floor is what real training points of the file score against those held-out points.
"""
import numpy as np
import torch

import datasets


def energy_distance(x, y):
    """V-statistic energy distance between point sets x [n, d] and y [m, d]."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(2 * xy - xx - yy)


class PointScorer:
    """Scores samples of a 2D dataset against a fixed fresh reference sample.

    The reference and the floor samples are drawn with seeds far from the training
    seed, so they are independent of the training data.
    """

    def __init__(self, dataset, n, seed=0, floor_repeats=8):
        self.reference = datasets.get_dataset(dataset, n, seed=seed + 10_000)
        floors = [
            energy_distance(datasets.get_dataset(dataset, n, seed=seed + 20_000 + 2 * i),
                            datasets.get_dataset(dataset, n, seed=seed + 20_001 + 2 * i))
            for i in range(floor_repeats)
        ]
        self.floor = float(np.mean(floors))  # mean over repeats: a stable yardstick

    def __call__(self, samples):
        """{"score": energy distance to the reference, "floor": its noise floor}."""
        samples = torch.as_tensor(samples).detach().cpu()
        score = energy_distance(samples, self.reference) if torch.isfinite(samples).all() else float("inf")
        return {"score": score, "floor": self.floor}


def nearest_neighbour_distance(points, reference, chunk=4096):
    """Mean distance from each point to its nearest neighbour in `reference` (sharpness)."""
    points = torch.as_tensor(points, dtype=torch.float32)
    reference = torch.as_tensor(reference, dtype=torch.float32)
    nearest = [torch.cdist(p, reference).min(dim=1).values for p in points.split(chunk)]
    return float(torch.cat(nearest).mean())


class HeldOutScorer:
    """Scores samples of a point file, in the file's units, against the points held out from training.

    The frame's first m samples (m = the frame's size, at most the training points there are) against
    all held-out points; the floor: m real training points against the same held-out points, the mean
    over `floor_repeats` draws. Both compare sets of the same sizes, so the floor is what a sampler that
    draws exactly the file's distribution would score."""

    def __init__(self, config, floor_repeats=8):
        train, self.reference = datasets.point_file_split(config)
        self.n = min(config["eval_batch_size"], len(train))
        rng = np.random.default_rng(config["seed"] + 20_000)
        self.floor = float(np.mean([energy_distance(train[rng.choice(len(train), self.n, replace=False)], self.reference)
                                    for _ in range(floor_repeats)]))

    def __call__(self, samples):
        samples = torch.as_tensor(samples).detach().cpu()[:self.n]
        score = energy_distance(samples, self.reference) if torch.isfinite(samples).all() else float("inf")
        return {"score": score, "floor": self.floor}


class FolderScorer:
    """scorer(frame [n, C, S, S]) -> {"score", "floor"}: the energy distance in pixel space to a fixed half
    of the folder, and the floor that real images of the folder's other half score (images/folder.py explains why)."""

    def __init__(self, config, floor_repeats=4):
        from images import folder
        images, _ = folder.load(config["dataset"], config["image_size"], config["channels"])
        flat = images.reshape(len(images), -1).double()
        self.n = min(config["eval_batch_size"], len(flat) // 2)  # frames are scored on their first n samples
        order = torch.from_numpy(np.random.default_rng(config["seed"] + 10_000).permutation(len(flat)))
        self.reference, rest = flat[order[:self.n]], flat[order[self.n:]]
        rng = np.random.default_rng(config["seed"] + 20_000)
        self.floor = float(np.mean([energy_distance(rest[torch.from_numpy(rng.choice(len(rest), self.n, replace=False))],
                                                    self.reference) for _ in range(floor_repeats)]))

    def __call__(self, frame, labels=None):
        frame = torch.as_tensor(frame).reshape(len(frame), -1)[:self.n].double()
        score = energy_distance(frame, self.reference) if torch.isfinite(frame).all() else float("inf")
        return {"score": score, "floor": self.floor}


def make_scorer(config):
    """The sample-quality scorer for a run's dataset (images: classifier.ImageScorer; a folder of images:
    FolderScorer; a point file: HeldOutScorer)."""
    kind = datasets.data_kind(config["dataset"])
    if kind == "images":
        from images import classifier
        return classifier.ImageScorer(config)
    if kind == "image_folder":
        return FolderScorer(config)
    if kind == "point_file":
        return HeldOutScorer(config)
    return PointScorer(config["dataset"], config["eval_batch_size"], config["seed"])
