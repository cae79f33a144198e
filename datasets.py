"""Training data: the 2D point clouds (each a float32 tensor of shape [n, 2]), and which data a run uses.

Every generator is deterministic given its seed and uses only numpy, so a fresh,
independent sample of the same distribution (for scoring) is one call away:
`get_dataset(name, n, seed=other_seed)`.

--dataset also takes the user's own data (docs/own_data.md), read and checked here before any work:
  a point file (.csv, .tsv, .txt, .npy)  its two columns, mapped into the range the 2D defaults are tuned
                                          for; a fifth of the file held out to score the frames against
  a picture (.png, .jpg)                 points drawn where the picture is dark, fresh ones for any seed
  a folder of images                     images/folder.py
"""
import argparse
import os
import sys

import numpy as np
import pandas as pd
import PIL.Image
import torch

from images import data as image_data
from images import folder as image_folder

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
    """`n` points of the 2D dataset `name` (or of a picture, --dataset my_drawing.png) as a float32 tensor
    [n, 2], deterministic by seed."""
    rng = np.random.default_rng(seed)
    if data_kind(name) == "picture":
        return torch.from_numpy(picture_points(read_picture(name), n, rng).astype(np.float32))
    if name not in POINT_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(POINT_DATASETS)}")
    return torch.from_numpy(POINT_DATASETS[name](n, rng).astype(np.float32))


IMAGE_DATASETS = image_data.IMAGE_DATASETS
DATASETS = tuple(POINT_DATASETS) + IMAGE_DATASETS
DataError = image_data.DataError

POINT_FILES = {".csv": ",", ".tsv": "\t", ".txt": r"\s+", ".npy": None}  # suffix -> column separator
PICTURES = (".png", ".jpg", ".jpeg")
TARGET_HALF_WIDTH = 4.0  # a file's points are mapped into [-4, 4] along their longer side: the dino's range
HELD_OUT_SHARE, HELD_OUT_MAX = 0.2, 2000  # a fifth of a point file scores the frames, at most 2,000 points
STABLE_HELD_OUT = 1000  # fewer held-out points than this: the floor wobbles by more than 5% (docs/own_data.md)
SPLIT_SEED = 12345  # the held-out points are the same whatever --seed: runs of several seeds are comparable


def add_flags(parser):
    """--dataset (a built-in name, a file or a folder) and the flags that say how to read the user's own data."""
    parser.add_argument("--dataset", default="dino", type=dataset_argument, metavar="NAME_OR_PATH",
                        help=f"what to learn to draw: {', '.join(DATASETS)}; or a point file "
                             f"({', '.join(POINT_FILES)}), a picture ({', '.join(PICTURES)}) or a folder of images")
    own = parser.add_argument_group("your own data (--dataset FILE or FOLDER; docs/own_data.md)")
    own.add_argument("--columns", nargs=2, metavar=("X", "Y"), default=None,
                     help="a point file's two columns, by header name or 0-based index (needed beyond two columns)")
    own.add_argument("--image_size", type=int, default=None,
                     help="a folder's images resized to this many pixels square (default: their own size when they "
                          "all share one square size of at most 64, else 32)")
    own.add_argument("--channels", type=int, choices=(1, 3), default=None,
                     help="a folder's images as grey (1) or colour (3) (default: 1 when every image is grey)")


def dataset_argument(text):
    """The argparse type of --dataset: a built-in name as it is, a folder with a trailing '/' (which is
    how a saved config.json still says 'images' when the folder is gone), a file as it is."""
    if text in DATASETS:
        return text
    if os.path.isdir(text):
        return text.rstrip("/" + os.sep) + "/"
    if os.path.isfile(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: no such file or folder, and not a built-in dataset "
                                     f"({', '.join(DATASETS)})")


KINDS = {"points": "a built-in dataset", "images": "a built-in dataset", "point_file": "a point file",
         "picture": "a picture", "image_folder": "a folder of images"}


def data_kind(name):
    """'points' (built-in), 'images' (built-in), 'point_file', 'picture' or 'image_folder'."""
    if name in POINT_DATASETS:
        return "points"
    if name in IMAGE_DATASETS:
        return "images"
    if name.endswith("/"):
        return "image_folder"
    return "picture" if os.path.splitext(name)[1].lower() in PICTURES else "point_file"


def is_image_dataset(name):
    return data_kind(name) in ("images", "image_folder")


def sample_shape(config):
    """Shape of one sample, without the batch dimension: (2,) for points, (1, 28, 28) for MNIST, (C, S, S)
    for a folder of images."""
    kind = data_kind(config["dataset"])
    if kind == "image_folder":
        return (config["channels"], config["image_size"], config["image_size"])
    return (1, 28, 28) if kind == "images" else (2,)


def describe(config, given, log=None):
    """config with what the user's own data adds to it (nothing for the built-in sets): a point file's
    units map, a folder's image size, channels and class names. Reads and checks the data: DataError
    (one line naming the file) when it can't be used. Says in one line what it found."""
    kind, name = data_kind(config["dataset"]), config["dataset"]
    log = log or (lambda line: print(line, flush=True) if os.environ.get("RANK", "0") == "0" else None)
    for flag, wanted in (("columns", "point_file"), ("image_size", "image_folder"), ("channels", "image_folder")):
        if flag in given and kind != wanted:
            raise DataError(f"--{flag} is for --dataset {KINDS[wanted]}; {name} is {KINDS[kind]}")
    if kind == "point_file":
        points = read_point_file(name, config.get("columns"))
        train, held_out = split_held_out(points)
        B = config["train_batch_size"]
        if len(train) < B:
            raise DataError(f"{name}: {len(points)} points are too few for a batch of {B} (--train_batch_size): "
                            f"it needs at least {minimum_points(B)}, a fifth of them held out to score")
        low, high = points.min(axis=0), points.max(axis=0)
        if (high - low).max() == 0:
            raise DataError(f"{name}: all {len(points)} points are equal ({low[0]:g}, {low[1]:g}): nothing to learn")
        center, half_width = (low + high) / 2, (high - low).max() / 2
        config = {**config, "data_map": {"center": center.tolist(), "scale": float(TARGET_HALF_WIDTH / half_width)}}
        log(f"{name}: {len(points):,} points; training on {min(len(train), config['dataset_size']):,} "
            f"(--dataset_size), {len(held_out):,} held out to score each frame; mapped into "
            f"[-{TARGET_HALF_WIDTH:g}, {TARGET_HALF_WIDTH:g}] around ({center[0]:.4g}, {center[1]:.4g}), "
            f"x {config['data_map']['scale']:.4g}; outputs in the file's units")
        if len(held_out) < STABLE_HELD_OUT:
            print(f"warning: {name}: only {len(held_out)} points held out to score; a stable noise floor needs "
                  f"{STABLE_HELD_OUT} ({minimum_points(0, STABLE_HELD_OUT):,} points in the file)", file=sys.stderr)
    elif kind == "picture":
        darkness = read_picture(name)[0]
        log(f"{name}: a {darkness.shape[1]}x{darkness.shape[0]} picture; {config['dataset_size']:,} points an epoch "
            "(--dataset_size), drawn where it is dark")
    elif kind == "image_folder":
        config = {**config, **image_folder.describe(name, config.get("image_size"), config.get("channels"),
                                                    config.get("class_conditional"), log)}
    return config


def check_available(config):
    """Fail early, before any work, when the data can't be had (the user's own data: describe)."""
    if data_kind(config["dataset"]) == "images":
        for split in image_data.IDX_FILES:  # finds (or downloads) and parses every file
            image_data.load_images(config, split)


def load_training_data(config, device="cpu"):
    """(data [N, ...], labels [N] or None) on `device` for a training run described by `config`.

    Images: the first --dataset_size training images, with their labels when the model is
    class-conditional. A point file: up to --dataset_size of its points not held out, mapped."""
    kind = data_kind(config["dataset"])
    if kind == "point_file":
        train, _ = point_file_split(config)
        return torch.from_numpy(to_model_units(config, train[:config["dataset_size"]])).to(device), None
    if kind == "image_folder":
        images, labels = image_folder.load(config["dataset"], config["image_size"], config["channels"])
        images = images[:config["dataset_size"]].to(device)
        return images, (labels[:config["dataset_size"]].to(device) if config.get("class_conditional") else None)
    if not is_image_dataset(config["dataset"]):
        return get_dataset(config["dataset"], config["dataset_size"], config["seed"]).to(device), None
    images, labels = image_data.load_images(config, "train")
    images, labels = images[:config["dataset_size"]].to(device), labels[:config["dataset_size"]].to(device)
    return images, (labels if config.get("class_conditional") else None)


# ---- the units map: a point file's own units <-> the model's [-4, 4]^2 ----------------------

def to_model_units(config, points):
    """[n, 2] points in the file's units -> float32, centred and scaled as the model sees them."""
    data_map = config["data_map"]
    return ((np.asarray(points, np.float64) - data_map["center"]) * data_map["scale"]).astype(np.float32)


def to_data_units(config, samples):
    """The model's samples [n, 2] back in the file's units (float64: a file far from 0 keeps its digits);
    unchanged for data without a map (built-in sets, pictures, images)."""
    data_map = config.get("data_map")
    if data_map is None:
        return samples
    return torch.as_tensor(samples, dtype=torch.float64) / data_map["scale"] + torch.tensor(data_map["center"],
                                                                                            dtype=torch.float64)


def plot_limits(config, limit=6.0):
    """((x_lo, x_hi), (y_lo, y_hi)) that frames of points are drawn in: [-6, 6]^2 in the model's units."""
    data_map = config.get("data_map") or {"center": [0.0, 0.0], "scale": 1.0}
    (cx, cy), half = data_map["center"], limit / data_map["scale"]
    return (cx - half, cx + half), (cy - half, cy + half)


# ---- point files ----------------------------------------------------------------------------

_cache = {}  # the last file read: (path, mtime, size, columns) -> points; a run reads its file more than once


def read_point_file(path, columns=None):
    """The two chosen columns of a point file as float64 [N, 2], in the file's own units; DataError (one
    line, naming the file) for anything that is not two columns of finite numbers."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size, tuple(columns or ()))
    if key not in _cache:
        _cache.clear()
        _cache[key] = _read_point_file(path, columns)
    return _cache[key]


def _read_point_file(path, columns):
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in POINT_FILES:
        raise DataError(f"{path}: unknown kind of file; --dataset takes a point file ({', '.join(POINT_FILES)}), "
                        f"a picture ({', '.join(PICTURES)}) or a folder of images")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: cannot read as .npy ({str(e).splitlines()[0]})")
        if array.ndim != 2 or array.dtype.kind not in "biuf":
            raise DataError(f"{path}: expected numbers of shape [N, 2], got {array.dtype} {array.shape}")
        table = pd.DataFrame(array)
    else:
        table = _read_table(path, POINT_FILES[suffix])
    names = [str(c) for c in table.columns]
    if columns is None:
        if len(names) == 1:
            separated = {",": " (separated by commas)", "\t": " (separated by tabs)"}.get(POINT_FILES[suffix], "")
            raise DataError(f"{path} has one column{separated}; points need two (x and y)")
        if len(names) > 2:
            raise DataError(f"{path} has {len(names)} columns ({', '.join(names)}); choose two with --columns X Y "
                            "(names or 0-based indices)")
        columns = names
    picked = [_column_index(path, names, c) for c in columns]
    if len(table) == 0:
        raise DataError(f"{path} has a header but no points")
    points = np.empty((len(table), 2))
    for j, index in enumerate(picked):
        column = table.iloc[:, index]
        values = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
        text = np.flatnonzero(np.isnan(values) & column.notna().to_numpy())  # read_csv made "", "nan" NaN already
        if len(text):
            raise DataError(f"{path}: data row {text[0] + 1}, column {names[index]}: {column.iloc[text[0]]!r} is not "
                            "a number")
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataError(f"{path}: data row {bad[0] + 1}, column {names[index]}: NaN, inf or an empty cell "
                            f"({len(bad)} in the column)")
        points[:, j] = values
    return points


def _read_table(path, separator):
    """A text table with or without a header row: a header is a first line with a field that is not a number."""
    with open(path, errors="replace") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise DataError(f"{path} is empty")
    fields = first.split() if separator == r"\s+" else first.rstrip("\r\n").split(separator)
    header = not all(_is_number(field) for field in fields)
    try:
        return pd.read_csv(path, sep=separator, header=0 if header else None, skip_blank_lines=True)
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as a table ({str(e).strip().splitlines()[-1]})")


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _column_index(path, names, column):
    """The index of a --columns entry: a header name first, else a 0-based index."""
    if column in names:
        return names.index(column)
    if column.lstrip("-").isdigit() and 0 <= int(column) < len(names):
        return int(column)
    raise DataError(f"{path}: no column {column!r}; its columns are {', '.join(names)} (indices 0..{len(names) - 1})")


def held_out_count(n):
    return min(int(n * HELD_OUT_SHARE), HELD_OUT_MAX)


def minimum_points(batch, held_out=0):
    """The fewest points a file needs for `batch` training points and `held_out` held-out ones."""
    n = batch
    while n - held_out_count(n) < batch or held_out_count(n) < held_out:
        n += 1
    return n


def split_held_out(points):
    """(training points, held-out points) of a file: a fifth (at most HELD_OUT_MAX) at random, always the same."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(points))
    held_out = held_out_count(len(points))
    return points[order[held_out:]], points[order[:held_out]]


def point_file_split(config):
    """(training points, held-out points) of a run's point file, in the file's units."""
    return split_held_out(read_point_file(config["dataset"], config.get("columns")))


# ---- pictures -------------------------------------------------------------------------------

_pictures = {}


def read_picture(path):
    """(darkness [H, W] in [0, 1], (x centre, y centre, scale)) of a picture, cached. Darkness: how much
    darker than the background (its lightest 1% of pixels) each pixel is, after transparent parts are
    laid on white; the centre and scale map the bounding box of the dark pixels into [-4, 4]^2."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _pictures:
        _pictures.clear()
        _pictures[key] = _read_picture(path)
    return _pictures[key]


def _read_picture(path):
    rgba = image_folder.open_rgba(path)                              # [H, W, 4] uint8, or DataError
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1 - alpha)                # over white
    lightness = rgb @ np.array([0.299, 0.587, 0.114])                # ITU-R 601 luma, 0..255
    background = np.percentile(lightness, 99)
    darkness = np.clip((background - lightness) / max(background, 1e-9), 0, 1)
    if not darkness.any():
        raise DataError(f"{path}: no dark pixels (every pixel is as light as the background); draw dark on light "
                        "or on transparent")
    rows, cols = np.nonzero(darkness)
    H = darkness.shape[0]
    x_lo, x_hi, y_lo, y_hi = cols.min(), cols.max() + 1, H - 1 - rows.max(), H - rows.min()  # y up
    scale = TARGET_HALF_WIDTH / (max(x_hi - x_lo, y_hi - y_lo) / 2)
    return darkness, ((x_lo + x_hi) / 2, (y_lo + y_hi) / 2, scale)


def picture_points(picture, n, rng):
    """n points [n, 2] drawn from a picture: a pixel with probability proportional to its darkness, then a
    uniform place inside it; y up, in the model's units."""
    darkness, (cx, cy, scale) = picture
    H, W = darkness.shape
    cumulative = np.cumsum(darkness.ravel())
    pixel = np.searchsorted(cumulative, rng.uniform(0, cumulative[-1], n), side="right")
    row, col = np.divmod(np.minimum(pixel, H * W - 1), W)
    x = col + rng.uniform(0, 1, n)
    y = (H - 1 - row) + rng.uniform(0, 1, n)
    return np.stack([(x - cx) * scale, (y - cy) * scale], axis=1)
