"""Image data: MNIST and Fashion-MNIST from the standard IDX files (28x28 grey, 10 classes).

The four files of a dataset are looked up in --data_dir (default data/<dataset>), then in the
dataset's known local folders, then downloaded from public mirrors, each checked against its
published MD5 and written atomically. The IDX parser checks magic number, dimensions and length,
so a corrupt or truncated file is a one-line DataError, not a traceback.
"""
import gzip
import hashlib
import os
import tempfile
import urllib.request

import numpy as np
import torch


class DataError(RuntimeError):
    """Data that can't be found or read; the message is one line for the user."""



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


def count_images(config, split="train"):
    """How many images a split holds (its label file's length), or None if its files are not at hand."""
    try:
        return len(read_idx(find_idx_files(config, fetch=False)[IDX_FILES[split][1]]))
    except DataError:
        return None


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
