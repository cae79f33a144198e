"""--dataset with the user's own data: point files, a picture, folders of images; and every bad input.

Every file is written here by the test itself (the folders of digits from the shared MNIST subset)."""
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

import datasets
import ddpm
import sample as sample_py
from images import data as image_data
from helpers import parse_config

FAST = ["--compile", "off", "--frame_worker", "off", "--quiet"]
TINY_IMAGES = ["--num_epochs", "1", "--dataset_size", "40", "--train_batch_size", "8", "--unet_channels", "8",
               "--num_timesteps", "20", "--eval_batch_size", "6", *FAST]


def blob(n=3000, seed=0):
    """n points of a Gaussian far from the origin and wider than tall: (1000, -50) +- (20, 5)."""
    rng = np.random.default_rng(seed)
    return np.stack([1000 + 20 * rng.normal(size=n), -50 + 5 * rng.normal(size=n)], axis=1)


def write_table(path, points, separator=",", header=None):
    with open(path, "w") as f:
        if header:
            f.write(separator.join(header) + "\n")
        for x, y in points:
            f.write(f"{float(x)!r}{separator}{float(y)!r}\n")
    return str(path)


# ---- point files --------------------------------------------------------------------------

def test_point_files_read_the_same_points_in_every_format(tmp_path):
    points = blob(300)
    files = [write_table(tmp_path / "a.csv", points, ",", ["x", "y"]), write_table(tmp_path / "b.csv", points, ","),
             write_table(tmp_path / "c.tsv", points, "\t", ["x", "y"]), write_table(tmp_path / "d.txt", points, "   ")]
    np.save(tmp_path / "e.npy", points)
    for path in files + [str(tmp_path / "e.npy")]:
        np.testing.assert_array_equal(datasets.read_point_file(path), points, err_msg=path)


def test_columns_by_name_or_index(tmp_path):
    points = blob(200)
    table = np.column_stack([np.arange(200), points[:, 1], points[:, 0]])  # id, y, x
    path = write_table(tmp_path / "three.csv", [], ",")
    with open(path, "w") as f:
        f.write("id,north,east\n" + "".join(f"{int(a)},{float(b)!r},{float(c)!r}\n" for a, b, c in table))
    np.testing.assert_array_equal(datasets.read_point_file(path, ["east", "north"]), points)
    np.testing.assert_array_equal(datasets.read_point_file(path, ["2", "1"]), points)


def test_units_map_round_trip(tmp_path):
    """Train on a file far from the origin; config.json's map is the file's box into [-4, 4]; frames.npy and
    sample.py's output come back in the file's units, with the file's mean and spread."""
    points = blob(3000)
    path = write_table(tmp_path / "blob.csv", points, ",", ["east", "north"])
    out = tmp_path / "exps"
    ddpm.main(["--dataset", path, "--out_dir", str(out), "--experiment_name", "blob", "--num_epochs", "12",
               "--num_timesteps", "50", "--eval_batch_size", "500", "--save_images_step", "12", *FAST])
    config = json.load(open(out / "blob" / "config.json"))
    low, high = points.min(0), points.max(0)
    np.testing.assert_allclose(config["data_map"]["center"], (low + high) / 2)
    np.testing.assert_allclose(config["data_map"]["scale"], 4 / ((high - low).max() / 2))
    train, _ = datasets.load_training_data(config)
    assert abs(float(train[:, 0].abs().max()) - 4) < 0.5 and float(train.abs().max()) <= 4  # the long side fills +-4
    frames = np.load(out / "blob" / "frames.npy")
    samples = sample_py.main([str(out / "blob"), "--num_samples", "1000", "--output", str(tmp_path / "s.npy")])
    mean, std = points.mean(0), points.std(0)
    for got in (frames[-1], samples):
        assert np.all(np.abs(got.mean(0) - mean) < 0.25 * std), (got.mean(0), mean)
        assert np.all((0.6 * std < got.std(0)) & (got.std(0) < 1.5 * std)), (got.std(0), std)
    metrics = open(out / "blob" / "metrics.csv").read().splitlines()
    score, floor = (float(v) for v in metrics[-1].split(",")[4:6])
    assert 0 < floor < score < 10 * floor  # scored against held-out points, in the file's units


def test_held_out_points_are_not_trained_on(tmp_path):
    points = blob(2000)
    path = write_table(tmp_path / "p.csv", points)
    config, _, _ = parse_config(["--dataset", path, "--dataset_size", "100000"])
    train, _ = datasets.load_training_data(config)
    _, held_out = datasets.point_file_split(config)
    assert len(train) == 1600 and len(held_out) == 400
    trained_rows = {tuple(np.round(p, 6)) for p in datasets.to_data_units(config, train).numpy()}
    assert not trained_rows & {tuple(np.round(p, 6)) for p in held_out}


# ---- a picture ----------------------------------------------------------------------------

def test_picture_points_follow_darkness(tmp_path):
    """Two equal squares, black and grey (153 of 255) on white: points fall in them as 1 : (255 - 153) / 255,
    inside the squares, the upper square's points above the lower's (y up)."""
    picture = np.full((60, 100), 255, np.uint8)
    picture[5:25, 10:30] = 0      # upper left, black
    picture[35:55, 70:90] = 153   # lower right, grey
    PIL.Image.fromarray(picture).save(tmp_path / "two.png")
    n = 20_000
    x = datasets.get_dataset(str(tmp_path / "two.png"), n, seed=1).numpy()
    black = x[:, 0] < 0
    p = 1 / (1 + (255 - 153) / 255)
    assert abs(black.mean() - p) < 4 * np.sqrt(p * (1 - p) / n), (black.mean(), p)
    assert x[black, 1].min() > x[~black, 1].max()  # the black square is drawn on top
    assert np.allclose(np.abs(x).max(0)[0], 4, atol=0.01)  # the dark pixels' box fills [-4, 4] along x
    # inside a pixel the points are uniform: each 1/4 of the squares' width holds 1/4 of their points
    quarters = np.histogram(x[black, 0], 4, range=(-4, x[black, 0].max()))[0] / black.sum()
    assert np.all(np.abs(quarters - 0.25) < 0.02), quarters
    assert len(np.unique(np.round(x[:, 0], 3))) > 1000  # jittered, not pixel centres


# ---- folders of images --------------------------------------------------------------------

@pytest.fixture
def digit_folder(tmp_path, shared_mnist):
    """Two class subfolders of PNGs written from the shared MNIST digits: 30 threes and 30 sevens."""
    folder = tmp_path / "digits"
    images = image_data.read_idx(os.path.join(shared_mnist, "train-images-idx3-ubyte.gz"))
    labels = image_data.read_idx(os.path.join(shared_mnist, "train-labels-idx1-ubyte.gz"))
    for digit, name in ((3, "threes"), (7, "sevens")):
        os.makedirs(folder / name)
        for i in np.flatnonzero(labels == digit)[:30]:
            PIL.Image.fromarray(images[i]).save(folder / name / f"{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """24 colour 16x16 PNGs: a square of one colour on another."""
    folder = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for i in range(24):
        image = np.zeros((16, 16, 3), np.uint8)
        image[:] = rng.integers(0, 256, 3)
        image[4:12, 4:12] = rng.integers(0, 256, 3)
        PIL.Image.fromarray(image).save(folder / f"{i}.png")
    return str(folder)


def test_digit_folder_channels_size_and_classes(digit_folder):
    config, _, _ = parse_config(["--dataset", digit_folder, "--class_conditional"])
    assert (config["channels"], config["image_size"], config["class_names"]) == (1, 28, ["sevens", "threes"])
    assert datasets.sample_shape(config) == (1, 28, 28)
    images, labels = datasets.load_training_data(config)
    assert images.shape == (60, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert sorted(np.bincount(labels.numpy()).tolist()) == [30, 30]
    # a label is its subfolder: a "seven" image equals one of the PNGs in sevens/
    sevens = [np.asarray(PIL.Image.open(os.path.join(digit_folder, "sevens", f)), np.float32) / 127.5 - 1
              for f in os.listdir(os.path.join(digit_folder, "sevens"))]
    first_seven = images[labels == 0][0, 0].numpy()
    assert any(np.allclose(first_seven, s) for s in sevens)
    config, _, _ = parse_config(["--dataset", digit_folder, "--image_size", "16", "--channels", "3"])
    assert datasets.load_training_data(config)[0].shape == (60, 3, 16, 16)


def test_rgb_and_mixed_folders(rgb_folder, tmp_path, capsys):
    config, _, _ = parse_config(["--dataset", rgb_folder])
    assert (config["channels"], config["image_size"]) == (3, 16)
    images, _ = datasets.load_training_data(config)
    assert images.shape == (24, 3, 16, 16) and (images[:, 0] != images[:, 1]).any()
    config, _, _ = parse_config(["--dataset", rgb_folder, "--channels", "1"])
    assert datasets.load_training_data(config)[0].shape == (24, 1, 16, 16)
    # mixed sizes and modes: resized to 32 and converted, said once each
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    PIL.Image.fromarray(np.full((20, 30), 90, np.uint8)).save(mixed / "grey.png")
    PIL.Image.fromarray(np.full((16, 16, 3), [200, 0, 0], np.uint8)).save(mixed / "red.jpg")
    capsys.readouterr()
    config, _, _ = parse_config(["--dataset", str(mixed)])
    out = capsys.readouterr().out
    assert (config["channels"], config["image_size"]) == (3, 32)
    assert out.count("resized to 32x32") == 1 and out.count("converted to colour") == 1, out
    images, _ = datasets.load_training_data(config)
    assert images.shape == (2, 3, 32, 32)


def test_class_conditional_folder_run_and_sample_by_class_name(digit_folder, tmp_path, capsys):
    out = tmp_path / "exps"
    ddpm.main(["--dataset", digit_folder, "--out_dir", str(out), "--experiment_name", "cond", "--class_conditional",
               *TINY_IMAGES])
    assert "0 = sevens, 1 = threes" in capsys.readouterr().out
    frames = np.load(out / "cond" / "frames.npy")
    assert frames.shape == (1, 6, 1, 28, 28)
    samples = sample_py.main([str(out / "cond"), "--label", "threes", "--num_samples", "2",
                              "--output", str(tmp_path / "threes.npy")])
    assert samples.shape == (2, 1, 28, 28) and "0 = sevens, 1 = threes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        sample_py.main([str(out / "cond"), "--label", "fives", "--output", str(tmp_path / "x.npy")])
    assert exit_info.value.code == 2 and "sevens, threes" in capsys.readouterr().err


def test_rgb_folder_run_draws_colour_frames(rgb_folder, tmp_path):
    out = tmp_path / "exps"
    ddpm.main(["--dataset", rgb_folder, "--out_dir", str(out), "--experiment_name", "rgb", *TINY_IMAGES])
    assert np.load(out / "rgb" / "frames.npy").shape == (1, 6, 3, 16, 16)
    png = np.asarray(PIL.Image.open(out / "rgb" / "images" / "0000.png").convert("RGB")).astype(int)
    assert (np.abs(png[..., 0] - png[..., 1]) > 30).mean() > 0.05  # a colour grid, not a grey one
    metrics = open(out / "rgb" / "metrics.csv").read().splitlines()
    assert metrics[0].startswith("frame,epoch,step,loss,score,floor")
    assert 0 < float(metrics[1].split(",")[5])  # the pixel-space floor


# ---- bad input: one line naming the file and what is wrong, exit 2, nothing written -----------

def bad_files(folder):
    """{case: (path, extra flags, words the message must hold)}, each file written here."""
    folder.mkdir(exist_ok=True)

    def text(name, content):
        (folder / name).write_text(content)
        return str(folder / name)

    def picture(name, array):
        PIL.Image.fromarray(array).save(folder / name)
        return str(folder / name)

    good = "".join(f"{i},{i % 7}\n" for i in range(300))
    png = picture("whole.png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    half = open(png, "rb").read()[:2000]  # a PNG cut off halfway through its pixels
    (folder / "truncated.png").write_bytes(half)
    (folder / "not_a_picture.jpg").write_text("hello")
    (folder / "no_images").mkdir(exist_ok=True)
    (folder / "no_images" / "notes.txt").write_text("nothing to see")
    (folder / "broken_folder").mkdir(exist_ok=True)
    (folder / "broken_folder" / "ok.png").write_bytes(open(png, "rb").read())
    (folder / "broken_folder" / "bad.png").write_bytes(half)
    (folder / "lonely").mkdir(exist_ok=True)
    (folder / "lonely" / "only.png").write_bytes(open(png, "rb").read())
    (folder / "flat").mkdir(exist_ok=True)
    for i in range(3):
        (folder / "flat" / f"{i}.png").write_bytes(open(png, "rb").read())
    np.save(folder / "three.npy", np.zeros((300, 3)))
    return {
        "missing path": (str(folder / "nowhere.csv"), [], ["nowhere.csv", "no such file"]),
        "empty file": (text("empty.csv", ""), [], ["empty.csv", "empty"]),
        "header only": (text("header.csv", "x,y\n"), [], ["header.csv", "no points"]),
        "text for a number": (text("text.csv", "x,y\n" + good + "3,abc\n"), [], ["text.csv", "'abc'", "not a number"]),
        "NaN": (text("nan.csv", good + "nan,1\n"), [], ["nan.csv", "NaN"]),
        "inf": (text("inf.tsv", good.replace(",", "\t") + "1\tinf\n"), [], ["inf.tsv", "inf"]),
        "empty cell": (text("hole.csv", good + "1,\n"), [], ["hole.csv", "empty cell"]),
        "one column": (text("one.txt", "".join(f"{i}\n" for i in range(300))), [], ["one.txt", "one column"]),
        "three columns": (text("three.csv", "a,b,c\n" + "1,2,3\n" * 300), [], ["three.csv", "--columns"]),
        "three columns (.npy)": (str(folder / "three.npy"), [], ["three.npy", "--columns"]),
        "unknown column": (text("abc.csv", "a,b,c\n" + "1,2,3\n" * 300), ["--columns", "a", "z"], ["abc.csv", "'z'"]),
        "too few points": (text("few.csv", "".join(f"{i},{i}\n" for i in range(100))), [], ["few.csv", "159"]),
        "all points equal": (text("same.csv", "2.5,7\n" * 300), [], ["same.csv", "all 300 points are equal"]),
        "picture with no dark pixels": (picture("white.png", np.full((20, 20), 255, np.uint8)), [], ["white.png", "no dark"]),
        "truncated picture": (str(folder / "truncated.png"), [], ["truncated.png", "cannot read"]),
        "not a picture": (str(folder / "not_a_picture.jpg"), [], ["not_a_picture.jpg", "cannot read"]),
        "unknown suffix": (text("points.dat", good), [], ["points.dat", "unknown kind"]),
        "folder without images": (str(folder / "no_images"), [], ["no_images", "no images"]),
        "folder of one image": (str(folder / "lonely"), [], ["lonely", "one image"]),
        "truncated image in a folder": (str(folder / "broken_folder"), [], ["bad.png", "cannot read"]),
        "--columns for a picture": (png, ["--columns", "0", "1"], ["--columns", "point file", "whole.png"]),
        "classes without subfolders": (str(folder / "flat"), ["--class_conditional"], ["flat", "subfolders"]),
    }


BAD_CASES = ["missing path", "empty file", "header only", "text for a number", "NaN", "inf", "empty cell",
             "one column", "three columns", "three columns (.npy)", "unknown column", "too few points",
             "all points equal", "picture with no dark pixels", "truncated picture", "not a picture",
             "unknown suffix", "folder without images", "folder of one image", "truncated image in a folder", "--columns for a picture",
             "classes without subfolders"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    path, flags, words = bad_files(tmp_path / "files")[case]
    out = tmp_path / "exps"
    with pytest.raises(SystemExit) as exit_info:
        ddpm.main(["--dataset", path, "--out_dir", str(out), "--experiment_name", "bad", *flags, *FAST])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ddpm.py: error:"), err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()  # nothing written, not even the folder


def test_few_held_out_points_warn_about_the_floor(tmp_path, capsys):
    path = write_table(tmp_path / "small.csv", blob(1000))
    parse_config(["--dataset", path])
    err = capsys.readouterr().err
    assert "warning" in err and "200 points held out" in err and "5,000 points" in err
    parse_config(["--dataset", write_table(tmp_path / "big.csv", blob(6000))])
    assert "warning" not in capsys.readouterr().err


def test_builtin_names_still_win_and_are_listed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dino").write_text("1,2\n")  # a file named like a built-in: the built-in
    config, _, parser = parse_config(["--dataset", "dino"])
    assert config["dataset"] == "dino" and "data_map" not in config
    assert "8gaussians" in parser.format_help() and "fashion_mnist" in parser.format_help()


def test_unet_takes_any_image_size_and_channels():
    from images import unet
    for size, channels in ((30, 3), (17, 1), (28, 1)):
        model = unet.build_unet({"dataset": "folder/", "channels": channels, "unet_channels": 8})
        assert model(torch.randn(2, channels, size, size), torch.tensor([3, 7])).shape == (2, channels, size, size)
