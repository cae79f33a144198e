"""Training data: 2D point clouds (each a float32 tensor of shape [n, 2]) and 28x28 images.

Every generator is deterministic given its seed and uses only numpy, so a fresh,
independent sample of the same distribution (for scoring) is one call away:
`get_dataset(name, n, seed=other_seed)`.
"""
import gzip
import hashlib
import os
import tempfile
import urllib.request

import numpy as np
import pandas as pd
import torch

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


class DataError(RuntimeError):
    """Data that can't be found or read; the message is one line for the user."""


# ---------------------------------------------------------------------------------------
# Images: MNIST and Fashion-MNIST from the standard IDX files (28x28 grey, 10 classes)
# ---------------------------------------------------------------------------------------
IDX_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SOURCES = {  # mirrors tried in order, the published MD5 of each file, extra local folders
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/",
                    "http://yann.lecun.com/exdb/mnist/"],
        "md5": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        "local": [],
    },
    "fashion_mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
        "md5": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        "local": ["/usr/share/datasets/fashion-mnist"],  # Debian's dataset-fashion-mnist
    },
}
IMAGE_DATASETS = tuple(IMAGE_SOURCES)
DATASETS = tuple(POINT_DATASETS) + IMAGE_DATASETS
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path):
    """An IDX file (optionally gzipped) as a numpy array; DataError if it is not a whole, valid one.

    Layout: 2 zero bytes, a dtype byte, a byte with the number of dims, one big-endian
    uint32 per dim, then the values, nothing after them.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); delete it to download it again")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(raw)} bytes for dims {dims}, expected {expected}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path, array):
    """Write a uint8 array as an IDX file (gzipped if the name ends in .gz): for tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if path.endswith(".gz") else raw)


def image_data_dir(config):
    return config.get("data_dir") or os.path.join("data", config["dataset"])


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def download(url, path, md5, timeout=30):
    """Fetch url to path atomically, checking its MD5; True on success, False on any failure."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        if _md5(tmp) != md5:
            return False
        os.replace(tmp, path)
        return True
    except (OSError, ValueError):  # URLError and timeouts are OSErrors
        return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_idx_files(config, fetch=True):
    """{file name: path} of the four IDX files of an image dataset, downloading what is missing.

    Looks in --data_dir (default data/<dataset>), then the dataset's known local folders,
    then downloads into --data_dir from each mirror in turn.
    """
    name, folder = config["dataset"], image_data_dir(config)
    source = IMAGE_SOURCES[name]
    found = {}
    for file in source["md5"]:
        candidates = [os.path.join(d, file) for d in [folder] + source["local"]]
        candidates += [c[:-3] for c in candidates]  # also accept the unzipped files
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None and fetch:
            target = os.path.join(folder, file)
            if any(download(mirror + file, target, source["md5"][file]) for mirror in source["mirrors"]):
                path = target
        if path is None:
            raise DataError(f"{name}: {file} not found and could not be downloaded; put the four IDX .gz files "
                            f"({', '.join(source['md5'])}) in {folder}/ or pass --data_dir")
        found[file] = path
    return found


def load_images(config, split="train"):
    """(images [N, 1, 28, 28] float32 in [-1, 1], labels [N] long) of one split."""
    files = find_idx_files(config)
    image_file, label_file = IDX_FILES[split]
    images, labels = read_idx(files[image_file]), read_idx(files[label_file])
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{files[image_file]}: expected uint8 images [N, H, W] and labels [N], "
                        f"got {images.dtype} {images.shape} and {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{files[image_file]} has {len(images)} images but {files[label_file]} "
                        f"has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{files[label_file]}: labels must be 0..9, found {labels.max()}")
    images = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).unsqueeze(1)  # [N, 1, H, W]
    return images, torch.from_numpy(labels.astype(np.int64))


def is_image_dataset(name):
    return name in IMAGE_DATASETS


def sample_shape(config):
    """Shape of one sample, without the batch dimension: (2,) for points, (1, 28, 28) for images."""
    return (1, 28, 28) if is_image_dataset(config["dataset"]) else (2,)


def check_available(config):
    """Fail early, before any work, when the data can't be had."""
    if is_image_dataset(config["dataset"]):
        for split in IDX_FILES:  # finds (or downloads) and parses every file
            load_images(config, split)


def load_training_data(config):
    """(data [N, ...], labels [N] or None) for a training run described by `config`.

    Images: the first --dataset_size training images, with their labels when the model is
    class-conditional."""
    if not is_image_dataset(config["dataset"]):
        return get_dataset(config["dataset"], config["dataset_size"], config["seed"]), None
    images, labels = load_images(config, "train")
    images, labels = images[:config["dataset_size"]], labels[:config["dataset_size"]]
    return images, (labels if config.get("class_conditional") else None)
