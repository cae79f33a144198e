"""A folder of the user's own images (--dataset path/to/folder/): PNG and JPEG files, searched recursively.

    folder/                      no subfolders: one unlabelled set
    folder/cats/*.png            subfolders name the classes (sorted: 0 = cats, 1 = dogs) for
    folder/dogs/more/*.jpg       --class_conditional and sample.py --label; an image belongs to
                                 the subfolder directly under `folder`, however deep it sits

Every image is laid on white where it is transparent, cropped to its centre square and resized to
--image_size (default: the images' own size when they all share one square size of at most 64 pixels,
else 32). It keeps three channels unless every image is grey (R = G = B at every pixel), or --channels
says otherwise. The values run from -1 (black) to 1 (white), as MNIST's do.

The score of a frame (engine.metrics.FolderScorer): there is no classifier for the user's images, and none is invented.
It is the 2D score's energy distance (engine/metrics.py) with each image one point in pixel space: the
frame's images against a fixed random half of the folder, over a floor, the same distance for the other
images of the folder against that half. It measures how close the samples' spread of pixels is to the
data's; it does not see copies (a model that draws its training images scores at the floor).
"""
import os

import numpy as np
import PIL.Image
import torch

from images.data import DataError

SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_SIZE, LARGEST_OWN_SIZE = 32, 64


def open_rgba(path):
    """The image at `path` as uint8 [H, W, 4] (RGBA), fully decoded: DataError for an unreadable,
    truncated or empty one."""
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not later
            return np.asarray(image.convert("RGBA"))
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({str(e).splitlines()[0] or type(e).__name__})")


def scan(folder):
    """[(path, class name or None)] of every PNG / JPEG under `folder`, sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        relative = os.path.relpath(root, folder)
        label = None if relative == "." else relative.split(os.sep)[0]
        found += [(os.path.join(root, f), label) for f in sorted(files) if f.lower().endswith(SUFFIXES)]
    return found


def _on_white(rgba):
    """RGBA uint8 [H, W, 4] -> RGB uint8 [H, W, 3], transparent parts laid on white."""
    alpha = rgba[..., 3:].astype(np.float32) / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def _square(rgb, size):
    """The centre square of an RGB image resized to size x size, as [3, size, size] in [-1, 1]."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = PIL.Image.fromarray(rgb[top:top + side, left:left + side])
    if side != size:
        image = image.resize((size, size), PIL.Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1


def _is_grey(rgb):
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _header_size(path):
    """(width, height) from the file's header alone: the default size is known before any image is decoded."""
    try:
        with PIL.Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({str(e).splitlines()[0] or type(e).__name__})")


_cache = {}  # (folder, size, channels) -> (images, labels, description): a run reads its folder twice


def _read(folder, image_size, channels):
    files = scan(folder)
    if len(files) < 2:
        raise DataError(f"{folder}: " + ("no images (.png, .jpg, .jpeg) in it or its subfolders" if not files else
                                         "one image; a folder needs two or more (half of them score the frames)"))
    sizes = sorted({_header_size(path) for path, _ in files})  # (width, height)
    if image_size is None:
        own = sizes[0][0]
        image_size = own if len(sizes) == 1 and sizes[0][0] == sizes[0][1] and own <= LARGEST_OWN_SIZE else DEFAULT_SIZE
    if image_size < 4:
        raise DataError(f"--image_size {image_size}: the U-Net halves an image twice; at least 4 pixels")
    squares, greys = [], []
    for path, _ in files:  # each image decoded (a truncated one fails here) and shrunk at once: big photos fit
        rgb = _on_white(open_rgba(path))
        greys.append(_is_grey(rgb))
        squares.append(_square(rgb, image_size))
    images = np.stack(squares)                                             # [N, 3, S, S]
    channels = channels or (1 if all(greys) else 3)
    if channels == 1:  # grey images: any channel; colour ones: their luma (ITU-R 601), as PIL's "L" is
        images = images[:, :1] if all(greys) else np.tensordot([0.299, 0.587, 0.114], images, ([0], [1]))[:, None]
    names = sorted({label for _, label in files if label is not None})
    labels = torch.tensor([names.index(label) if label is not None else -1 for _, label in files])
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(files)))  # classes mixed: --dataset_size takes
    images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))  # a fair share of each
    description = {"image_size": image_size, "channels": channels, "class_names": names or None,
                   "image_count": len(files), "unlabelled": int((labels < 0).sum()), "sizes": sizes,
                   "modes": "grey" if all(greys) else ("colour" if not any(greys) else "grey and colour")}
    return images[order], labels[order], description


def _cached(folder, image_size=None, channels=None):
    key = (os.path.abspath(folder), image_size, channels)
    if key not in _cache:
        found = _read(folder, image_size, channels)
        _cache.clear()  # kept under the flags as given and as resolved: describe asks one way, load the other
        _cache[key] = _cache[(key[0], found[2]["image_size"], found[2]["channels"])] = found
    return _cache[key]


def describe(folder, image_size=None, channels=None, class_conditional=False, log=print):
    """What config.json keeps of a folder (image_size, channels, class_names, image_count), after reading
    every image once; says in one line what it found and, once, what it resized or converted."""
    images, labels, found = _cached(folder, image_size, channels)
    names = found["class_names"]
    if class_conditional and (not names or len(names) < 2):
        raise DataError(f"{folder}: --class_conditional needs the images in two or more subfolders, one per class; "
                        f"found {len(names or [])}")
    if class_conditional and found["unlabelled"]:
        raise DataError(f"{folder}: --class_conditional: {found['unlabelled']} images sit directly in the folder, "
                        "outside any class subfolder")
    size, channels = found["image_size"], found["channels"]
    classes = f"; classes {', '.join(f'{i} = {n}' for i, n in enumerate(names))}" if names else ""
    log(f"{folder}: {found['image_count']:,} images, used at {size}x{size}, "
        f"{'1 channel (grey)' if channels == 1 else '3 channels (colour)'}{classes}")
    if len(found["sizes"]) > 1 or found["sizes"][0] != (size, size):
        shown = ", ".join(f"{w}x{h}" for w, h in found["sizes"][:4]) + (", ..." if len(found["sizes"]) > 4 else "")
        log(f"note: {folder}: images of {len(found['sizes'])} size(s) ({shown}) cropped to their centre square "
            f"and resized to {size}x{size}")
    if found["modes"] == "grey and colour" or (channels == 1) != (found["modes"] == "grey"):
        log(f"note: {folder}: {found['modes']} images converted to {'grey' if channels == 1 else 'colour'}")
    return {"image_size": size, "channels": channels, "class_names": names, "image_count": found["image_count"]}


def load(folder, image_size, channels):
    """(images [N, channels, size, size] float32 in [-1, 1], labels [N] long: -1 outside a class) in a fixed
    shuffled order."""
    images, labels, _ = _cached(folder, image_size, channels)
    return images, labels
