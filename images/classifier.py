"""The image-quality score: a small classifier CNN trained on the training set, and what it sees.

Inception-based FID does not suit 28x28 grey digits (and needs downloaded weights), so each
image dataset gets its own classifier, trained once and cached in OUT_DIR/_classifier/ with
its test accuracy. For a frame of generated images it reports
  score      Frechet distance between the classifier's 128-d penultimate features of the
             samples and of the real test images (FID's formula, our features);
  floor      the same distance for real training images vs the test images, at the same n:
             the best a perfect generator can expect;
  confident  share of samples the classifier labels with softmax confidence >= 0.9;
  class_min, class_max, classes   share of samples per predicted class;
  nn_ratio   median distance (pixels) of a sample to its nearest training image, over the same
             for held-out test images: well below 1 would mean copied training images.
These numbers are comparable only between runs scored by the same classifier.

    python images/classifier.py --dataset mnist --data_dir ../shared/data/mnist-5k samples.npy [--labels 7]
"""
import os
import sys

if __name__ == "__main__":  # run as a script from anywhere: import the project from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import argparse
import hashlib
import json
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from images import data as image_data
from engine.checkpoints import atomic_save, safe_load


class Classifier(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # [B, 16, 14, 14]
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 32, 7, 7]
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),     # [B, 3136]
            nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU())       # [B, 128] the features
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):  # x [B, 1, 28, 28] in [-1, 1] -> (logits [B, 10], features [B, 128])
        features = self.conv(x)
        return self.head(F.dropout(features, 0.3, self.training)), features


def random_shift(x, generator, pixels=2):
    """Shift each image by up to `pixels` in x and y (zero = background -1 padding)."""
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


MAX_IMAGES_SEEN = 300_000  # 10 epochs of a small set; 5 of a 60,000-image one (1 gave Fashion-MNIST 82.6%)


def train_classifier(images, labels, test_images, test_labels, seed=0, epochs=10, batch_size=128):
    """Train on images [N, 1, 28, 28] for `epochs` (at most MAX_IMAGES_SEEN) -> (model, test accuracy)."""
    num_samples = min(MAX_IMAGES_SEEN, epochs * len(images))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = math.ceil(num_samples / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        logits, _ = model(random_shift(images[index], generator))
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    predicted = predict(model, test_images)[0].argmax(1)
    return model, float((predicted == test_labels).float().mean())


@torch.no_grad()
def predict(model, images, batch_size=500):
    """(probabilities [N, 10], features [N, 128]) of images [N, 1, 28, 28]."""
    outputs = [model(x) for x in torch.as_tensor(images, dtype=torch.float32).split(batch_size)]
    return torch.cat([o[0] for o in outputs]).softmax(1), torch.cat([o[1] for o in outputs])


def fingerprint(images):
    return hashlib.md5(images.numpy().tobytes()).hexdigest()[:10]


def load_or_train(config, train, test, log=print):
    """The classifier for this training set, from OUT_DIR/_classifier/ or trained now (and cached)."""
    (images, labels), (test_images, test_labels) = train, test
    folder = os.path.join(config.get("out_dir", "exps"), "_classifier")
    # the file names the training set and how long the classifier trains: a change to either retrains
    path = os.path.join(folder, f"{config['dataset']}-{fingerprint(images)}-{MAX_IMAGES_SEEN}.pt")
    model = Classifier()
    if os.path.exists(path):
        state = safe_load(path)
        model.load_state_dict(state["model"])
        return model.eval(), float(state["test_accuracy"]), path
    start = time.time()
    model, accuracy = train_classifier(images, labels, test_images, test_labels)
    atomic_save({"model": model.state_dict(), "test_accuracy": torch.tensor(accuracy),
                 "train_images": torch.tensor(len(images))}, path)
    with open(os.path.join(folder, "README.txt"), "w") as f:
        f.write("Classifiers that score image samples (classifier.py); the .pt files hold their test accuracy.\n")
    log(f"trained the scoring classifier in {time.time() - start:.0f} s: test accuracy {accuracy:.2%} ({path})")
    return model, accuracy, path


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of features a [n, d], b [m, d]."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def nearest_distance(images, reference, chunk=1000):
    """Pixel-space L2 distance [N] from each image to its nearest image in reference."""
    ref = reference.reshape(len(reference), -1)
    return torch.cat([torch.cdist(x.reshape(len(x), -1), ref).min(1).values for x in images.split(chunk)])


class ImageScorer:
    """scorer(frame [n, 1, 28, 28]) -> {"score", "floor", "confident", "class_min", "class_max", ...}."""

    def __init__(self, config, log=print):
        train = image_data.load_images(config, "train")
        test = image_data.load_images(config, "test")
        self.model, self.test_accuracy, self.path = load_or_train(config, train, test, log)
        self.train_images, self.test_images = train[0], test[0]
        self.test_features = predict(self.model, self.test_images)[1]
        n = min(config["eval_batch_size"], len(self.train_images))
        self.floor = frechet_distance(predict(self.model, self.train_images[-n:])[1], self.test_features)
        held_out = self.test_images[:n]  # how far real unseen images are from the training set
        self.test_nn = float(nearest_distance(held_out, self.train_images).median())

    def __call__(self, frame, labels=None):
        frame = torch.as_tensor(frame, dtype=torch.float32).reshape(-1, 1, 28, 28)
        if not torch.isfinite(frame).all():
            return {"score": float("inf"), "floor": self.floor, "confident": 0.0, "class_min": 0.0,
                    "class_max": 0.0, "nn_ratio": float("nan"), "classes": [0.0] * 10}
        probs, features = predict(self.model, frame)
        confidence, predicted = probs.max(1)
        classes = torch.bincount(predicted, minlength=10).float() / len(frame)
        out = {"score": frechet_distance(features, self.test_features), "floor": self.floor,
               "confident": float((confidence >= 0.9).float().mean()),
               "class_min": float(classes.min()), "class_max": float(classes.max()),
               "nn_ratio": float(nearest_distance(frame, self.train_images).median()) / self.test_nn,
               "classes": [round(float(c), 4) for c in classes]}
        if labels is not None:  # class-conditional: how often the classifier agrees with the request
            out["agreement"] = float((predicted == torch.as_tensor(labels)).float().mean())
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Score image samples (.npy [n, (1,) 28, 28] in [-1, 1]).")
    p.add_argument("samples", help="a .npy of images [n, (1,) 28, 28] in [-1, 1]")
    p.add_argument("--dataset", default="mnist", choices=image_data.IMAGE_DATASETS,
                   help="whose classifier scores them (default: mnist)")
    p.add_argument("--data_dir", default=None, help="folder of the IDX .gz files (default: data/DATASET)")
    p.add_argument("--out_dir", default="exps", help="where _classifier/ lives")
    p.add_argument("--labels", default=None, help="the requested label (an int) or a .npy of labels")
    args = p.parse_args(argv)
    samples = torch.from_numpy(np.load(args.samples)).float()
    samples = samples.reshape(-1, 1, 28, 28)
    labels = None
    if args.labels is not None:
        labels = (torch.full((len(samples),), int(args.labels)) if args.labels.lstrip("-").isdigit()
                  else torch.from_numpy(np.load(args.labels)).long().reshape(-1))
    config = {**vars(args), "eval_batch_size": len(samples)}
    try:
        scorer = ImageScorer(config)
    except image_data.DataError as e:
        p.exit(2, f"classifier.py: error: {e}\n")
    result = scorer(samples, labels)
    result["test_accuracy"] = scorer.test_accuracy
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
