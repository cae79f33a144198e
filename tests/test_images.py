"""Images: the IDX reader, the image batches, the U-Net, the classifier score and a tiny MNIST run."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasets
from engine import ddp
import ddpm
from images import data as image_data
from images import defaults as image_defaults
from images import unet
from conftest import ROOT
from helpers import numpy_betas, parse_config, sample_draws, write_fake_mnist


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A data dir with the four IDX .gz files: 200 train and 100 test fake digits."""
    return write_fake_mnist(tmp_path_factory.mktemp("tiny_mnist"))


def test_idx_round_trip(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        image_data.write_idx(str(tmp_path / name), array)
        back = image_data.read_idx(str(tmp_path / name))
        assert back.dtype == np.uint8 and back.shape == (7, 28, 28)
        np.testing.assert_array_equal(back, array)
    raw = open(tmp_path / "a-idx3-ubyte", "rb").read()
    assert raw[:4] == b"\x00\x00\x08\x03" and int.from_bytes(raw[4:8], "big") == 7


@pytest.mark.parametrize("corruption, message", [
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: raw + b"\x00", "longer than its header"),
    (lambda raw: b"\x01" + raw[1:], "not an IDX file"),
    (lambda raw: raw[:2] + b"\x42" + raw[3:], "not an IDX file"),
    (lambda raw: raw[:6], "truncated inside its header"),
    (lambda raw: b"", "not an IDX file"),
])
def test_corrupt_idx_is_a_one_line_error(tmp_path, corruption, message):
    array = np.zeros((3, 28, 28), np.uint8)
    image_data.write_idx(str(tmp_path / "x"), array)
    raw = open(tmp_path / "x", "rb").read()
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(corruption(raw)))
    with pytest.raises(image_data.DataError, match=message) as error:
        image_data.read_idx(str(path))
    assert "\n" not in str(error.value)


def test_broken_gzip_is_a_one_line_error(tmp_path):
    image_data.write_idx(str(tmp_path / "x.gz"), np.zeros((3, 28, 28), np.uint8))
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(image_data.DataError, match="cannot read"):
        image_data.read_idx(str(tmp_path / "x.gz"))


def test_image_batches_shape_range_and_subset(tiny_dir):
    config = {"dataset": "mnist", "data_dir": tiny_dir, "dataset_size": 50, "seed": 0}
    data, labels = datasets.load_training_data(config)
    assert data.shape == (50, 1, 28, 28) and data.dtype == torch.float32 and labels is None
    assert float(data.min()) == -1.0 and float(data.max()) == 1.0
    data, labels = datasets.load_training_data({**config, "class_conditional": True})
    assert labels.shape == (50,) and labels.dtype == torch.long and 0 <= labels.min() <= labels.max() <= 9
    test_images, test_labels = image_data.load_images(config, "test")
    assert test_images.shape == (100, 1, 28, 28) and len(test_labels) == 100


def test_mismatched_images_and_labels(tmp_path, tiny_dir):
    for name in os.listdir(tiny_dir):
        os.symlink(os.path.join(tiny_dir, name), tmp_path / name)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    image_data.write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(199, np.uint8))
    with pytest.raises(image_data.DataError, match="200 images but"):
        image_data.load_images({"dataset": "mnist", "data_dir": str(tmp_path)}, "train")


def test_missing_files_without_network_say_where_to_put_them(tmp_path, monkeypatch):
    tried = []
    monkeypatch.setitem(image_data.IMAGE_SOURCES["mnist"], "mirrors", ["http://127.0.0.1:9/a/", "http://127.0.0.1:9/b/"])
    real_download = image_data.download
    monkeypatch.setattr(image_data, "download", lambda url, path, md5: tried.append(url) or real_download(url, path, md5, 2))
    with pytest.raises(image_data.DataError, match=f"in {tmp_path}") as error:
        datasets.check_available({"dataset": "mnist", "data_dir": str(tmp_path)})
    assert "\n" not in str(error.value)
    assert tried == ["http://127.0.0.1:9/a/train-images-idx3-ubyte.gz", "http://127.0.0.1:9/b/train-images-idx3-ubyte.gz"]
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_download_checks_md5_and_writes_atomically(tmp_path):
    source = tmp_path / "mirror.gz"
    source.write_bytes(b"some bytes")
    url = source.as_uri()
    assert not image_data.download(url, str(tmp_path / "out" / "f.gz"), "0" * 32)
    assert os.listdir(tmp_path / "out") == []
    import hashlib
    assert image_data.download(url, str(tmp_path / "out" / "f.gz"), hashlib.md5(b"some bytes").hexdigest())
    assert (tmp_path / "out" / "f.gz").read_bytes() == b"some bytes"


def test_shared_mnist_subset_reads(shared_mnist):
    config = {"dataset": "mnist", "data_dir": shared_mnist, "dataset_size": 60000, "seed": 0, "class_conditional": True}
    data, labels = datasets.load_training_data(config)
    assert data.shape == (4000, 1, 28, 28) and data.min() == -1 and data.max() == 1
    assert set(labels.tolist()) == set(range(10))
    assert -0.9 < float(data.mean()) < -0.6  # mostly black background, as MNIST is
    assert image_data.load_images(config, "test")[0].shape == (1000, 1, 28, 28)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_is_found(tmp_path):
    config = {"dataset": "fashion_mnist", "data_dir": str(tmp_path), "dataset_size": 100, "seed": 0}
    data, _ = datasets.load_training_data(config)
    assert data.shape == (100, 1, 28, 28) and data.min() >= -1 and data.max() <= 1
    assert image_data.load_images(config, "test")[0].shape == (10000, 1, 28, 28)


@pytest.mark.parametrize("conditional", [False, True])
def test_unet_shapes_and_time_dependence(conditional):
    torch.manual_seed(0)
    model = unet.UNet(channels=16, depth=1, attention=True, num_classes=10 if conditional else None)
    for layer in model.modules():  # the zero-initialised output layers would hide any dependence
        if isinstance(layer, torch.nn.Conv2d) and not layer.weight.any():
            layer.reset_parameters()
    x = torch.randn(3, 1, 28, 28)
    y = torch.tensor([1, 2, 3]) if conditional else None
    out_a = model(x, torch.tensor([0, 0, 0]), y)
    out_b = model(x, torch.tensor([500, 500, 500]), y)
    assert out_a.shape == (3, 1, 28, 28)
    assert (out_a - out_b).abs().mean() > 0.01 * out_a.abs().mean()
    if conditional:
        assert model.null_label == 10 and model.num_classes == 10
        out_c = model(x, torch.tensor([0, 0, 0]), torch.tensor([4, 5, 6]))
        assert (out_c - out_a).abs().mean() > 0.01 * out_a.abs().mean()


def test_scheduler_posterior_on_image_tensors():
    # every ancestral step of sample() on [B, 1, 28, 28] is a draw from the posterior of eq. 7 with the
    # network's x_0, written out here: mean sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 + sqrt(alpha_t)
    # (1 - abar_{t-1}) / (1 - abar_t) x_t, variance beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t,
    # with x0 clamped to [-1, 1] (clip_sample) and the noise sample() drew
    T, shape = 100, (4, 1, 28, 28)
    scheduler = ddpm.NoiseScheduler(T, "cosine", prediction="x0", clip_sample=1.0)
    betas = numpy_betas("cosine", T, None, None)
    abar = np.cumprod(1 - betas)
    pattern = torch.linspace(-1, 1, 28 * 28).reshape(1, 1, 28, 28)

    def model(x, t):  # an x0-predicting network that depends on x_t and t, and overshoots [-1, 1]
        return 1.5 * torch.tanh(pattern + 0.2 * x) * (1 - 0.5 * t.float() / T)

    trajectory = ddpm.sample(model, scheduler, shape, sampler="ddpm", generator=torch.Generator().manual_seed(0),
                             trajectory=True).double()
    x_T, zs = sample_draws(shape, 0, list(range(T - 1, -1, -1)), "ddpm")
    torch.testing.assert_close(trajectory[0], x_T)
    for i, t in enumerate(range(T - 1, -1, -1)):
        x = trajectory[i]
        x0 = model(x.float(), torch.tensor([t])).double().clamp(-1, 1)
        ab, ab_prev = abar[t], (abar[t - 1] if t > 0 else 1.0)
        mean = np.sqrt(ab_prev) * betas[t] / (1 - ab) * x0 + np.sqrt(1 - betas[t]) * (1 - ab_prev) / (1 - ab) * x
        expected = mean + np.sqrt((1 - ab_prev) / (1 - ab) * betas[t]) * zs[i]
        torch.testing.assert_close(trajectory[i + 1], expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"t = {t}: {m}")
    assert float(trajectory[T // 2].std()) > 0.3  # mid-way the noise is a large part of what was checked


def test_frechet_distance_and_scorer_see_quality(tiny_dir, tmp_path):
    from images import classifier
    a = torch.randn(500, 8)
    assert abs(classifier.frechet_distance(a, a)) < 1e-6
    assert classifier.frechet_distance(a, a + 1) == pytest.approx(8, rel=1e-3)
    config = {"dataset": "mnist", "data_dir": tiny_dir, "out_dir": str(tmp_path), "eval_batch_size": 100}
    scorer = classifier.ImageScorer(config, log=lambda *a: None)
    assert scorer.test_accuracy > 0.5 and os.path.exists(scorer.path)
    test_images, test_labels = image_data.load_images(config, "test")
    real = scorer(test_images, test_labels)
    noise = scorer(torch.rand(100, 1, 28, 28) * 2 - 1)
    assert real["score"] < noise["score"] and real["agreement"] == pytest.approx(scorer.test_accuracy)
    assert real["confident"] >= noise["confident"] and sum(real["classes"]) == pytest.approx(1)
    assert classifier.ImageScorer(config).test_accuracy == scorer.test_accuracy  # cached, not retrained


def test_tiny_image_run_writes_every_output(tiny_dir, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "ddpm.py"), "--dataset", "mnist", "--data_dir", tiny_dir,
           "--out_dir", str(tmp_path), "--experiment_name", "tiny", "--dataset_size", "64", "--num_epochs", "2",
           "--unet_channels", "8", "--num_timesteps", "20", "--num_inference_steps", "5", "--eval_batch_size", "16",
           "--save_images_step", "1", "--class_conditional", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    exp = tmp_path / "tiny"
    for name in ("config.json", "model.pth", "model_ema.pth", "loss.npy", "frames.npy", "metrics.csv",
                 "loss.png", "images/0000.png", "images/0001.png"):
        assert (exp / name).exists(), name
    frames = np.load(exp / "frames.npy")
    assert frames.shape == (2, 16, 1, 28, 28) and np.isfinite(frames).all() and np.abs(frames).max() <= 1 + 1e-5
    config = json.loads((exp / "config.json").read_text())
    assert config["num_timesteps"] == 20 and config["beta_schedule"] == "cosine" and config["sampler"] == "ddim"
    # --precision auto is resolved before config.json is written: what the run used, for this machine
    assert config["precision"] == ddp.resolve_precision("auto", True, "cpu") in ("fp32", "bf16")
    assert len((exp / "metrics.csv").read_text().strip().splitlines()) == 3
    assert "agreement" in (exp / "metrics.csv").read_text().splitlines()[0]  # class-conditional frames
    model = ddpm.build_model(config)
    model.load_state_dict(torch.load(exp / "model_ema.pth", weights_only=True))
    assert model.num_classes == 10
    # sample.py on an image experiment: a chosen label, a PNG grid beside the .npy
    sample = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), str(exp), "--num_samples", "6",
                             "--label", "7", "--guidance_scale", "2", "--output", str(tmp_path / "s.npy")],
                            capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert sample.returncode == 0, sample.stderr[-2000:]
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (6, 1, 28, 28) and (tmp_path / "s.png").exists()
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), str(exp), "--label", "12",
                          "--output", str(tmp_path / "t.npy")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--label" in bad.stderr and "Traceback" not in bad.stderr


def test_corrupt_data_exits_2_with_one_line(tmp_path, tiny_dir):
    for name in os.listdir(tiny_dir):
        (tmp_path / name).write_bytes(open(os.path.join(tiny_dir, name), "rb").read())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "ddpm.py"), "--dataset", "mnist", "--data_dir",
                             str(tmp_path), "--out_dir", str(tmp_path / "exps")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "train-images-idx3-ubyte.gz" in result.stderr


# Every image flag alone on the command line, beside --dataset mnist: it works with the other image
# defaults (derived ones give way: the frame's steps at most T, ddpm walks every step, the frame at the
# last epoch), or, for the cases listed in IMAGE_FLAG_ERRORS only, it is a one-line error that says why
# and names only flags the user gave.
IMAGE_FLAG_VALUES = {
    "dataset_size": ["1", "100"], "num_timesteps": ["1", "20", "100", "149", "5000"],
    "beta_schedule": ["linear", "quadratic", "sigmoid", "cosine"], "beta_start": ["0.5"], "beta_end": ["1e-5"],
    "clip_sample": ["0", "3"], "prediction": ["epsilon", "x0", "v"], "min_snr_gamma": ["0", "1"],
    "train_batch_size": ["1", "10000"], "learning_rate": ["1e-5"], "ema_decay": ["0", "0.5"],
    "num_epochs": ["1", "200"], "sampler": ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"],
    "num_inference_steps": ["1", "20", "1000", "1001"], "eta": ["0", "1"], "timestep_spacing": ["karras"],
    "eval_batch_size": ["1", "64"], "save_images_step": ["1", "1000"], "lr_schedule": ["constant", "cosine"],
    "low_noise_fraction": ["0.5"], "guidance_scale": ["0", "7"], "unet_channels": ["4", "8", "36", "2"],
    "unet_depth": ["2"], "embedding_size": ["7"], "hidden_size": ["16"], "input_embedding": ["identity"],
    "autoguidance": ["1", "2"], "guide_epoch": ["1", "1000"],
}
IMAGE_SWITCHES = ["--class_conditional", "--no-unet_attention", "--unet_attention", "--guide_x0_only", "--no-guide_x0_only"]
CASES = [[f"--{flag}", value] for flag, values in IMAGE_FLAG_VALUES.items() for value in values] + [
    ["--guidance_interval", *pair] for pair in (("0", "999"), ("200", "200"), ("5", "2"), ("0", "1000"))]


# The cases that must be refused, each with why: everything else in CASES must be accepted.
IMAGE_FLAG_ERRORS = {
    ("--num_inference_steps", "1001"): "exceeds",    # more steps than the T = 1000 of images
    ("--unet_channels", "36"): "--unet_channels 36",  # GroupNorm's 8 groups do not divide 36 ...
    ("--unet_channels", "2"): "--unet_channels 2",    # ... nor 2
    ("--guidance_interval", "5", "2"): "LO <= HI",
    ("--guidance_interval", "0", "1000"): "HI < T",
}


def test_every_listed_image_flag_error_is_a_case():
    assert set(IMAGE_FLAG_ERRORS) <= {tuple(case) for case in CASES}


@pytest.mark.parametrize("flags", CASES + [[s] for s in IMAGE_SWITCHES], ids=lambda f: " ".join(f))
def test_each_image_flag_alone_works_or_names_only_itself(flags, tiny_dir, capsys):
    argv = ["--dataset", "mnist", "--data_dir", tiny_dir, *flags]
    refusal = IMAGE_FLAG_ERRORS.get(tuple(flags))
    if refusal is not None:
        with pytest.raises(SystemExit) as exit_info:
            parse_config(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ddpm.py: error:"), err
        assert flags[0] in err and refusal in err, err
        named = {word.strip("(),:;.'").split("=")[0] for word in err.split() if word.startswith("--")}
        assert named <= {flags[0], "--dataset", "--data_dir"}, err
        return
    config, given, _ = parse_config(argv)  # a valid flag: refusing it fails here
    flag = flags[0].lstrip("-").replace("no-", "")
    assert flag in given
    steps = config["num_inference_steps"]
    assert steps is None or steps <= config["num_timesteps"]
    assert config["save_images_step"] <= config["num_epochs"] or flag == "save_images_step"
    for key, value in image_defaults.DEFAULTS.items():  # what the user did not touch keeps its image default
        if key not in given and key not in ("num_inference_steps", "save_images_step"):
            if key == "autoguidance" and config["class_conditional"]:
                value = 1.0  # classifier-free guidance instead
            elif key == "autoguidance" and not config["guide_x0_only"]:
                value = image_defaults.PLAIN_AUTOGUIDANCE  # guided steps that move eps too: their own weight
            assert config[key] == value, key
    if config["autoguidance"] != 1:  # the guide's epoch falls inside the run, the guided steps inside T
        assert 1 <= config["guide_epoch"] <= config["num_epochs"]
        low, high = config["guidance_interval"]
        assert 0 <= low <= high < config["num_timesteps"]


def test_image_flags_that_contradict_each_other_are_errors(tiny_dir, capsys):
    for flags, named in ((["--num_timesteps", "100", "--num_inference_steps", "150"], "--num_inference_steps"),
                         (["--sampler", "ddpm", "--num_inference_steps", "10"], "--sampler"),
                         (["--class_conditional", "--autoguidance", "2"], "--autoguidance"),
                         (["--autoguidance", "1", "--guide_epoch", "3"], "--guide_epoch"),
                         (["--autoguidance", "1", "--guidance_interval", "0", "500"], "--guidance_interval"),
                         (["--num_timesteps", "100", "--guidance_interval", "0", "500"], "--guidance_interval"),
                         (["--autoguidance", "1", "--guide_x0_only"], "--guide_x0_only"),
                         (["--sampler", "ddpm", "--guide_x0_only"], "--guide_x0_only")):
        with pytest.raises(SystemExit):
            parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, *flags])
        assert named in capsys.readouterr().err
    # derived defaults adapt: a short diffusion caps the frame's steps, ddpm walks all of them
    config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, "--num_timesteps", "20"])
    assert config["num_inference_steps"] == 20
    low, high = image_defaults.GUIDANCE_INTERVAL  # the guided steps: the same shares of a shorter T
    assert config["guidance_interval"] == [round(low * 19), round(high * 19)]
    config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir])
    assert config["num_inference_steps"] == image_defaults.AUTOGUIDED_STEPS  # autoguided: the few-step frame
    assert config["guide_x0_only"] and config["autoguidance"] == image_defaults.DEFAULTS["autoguidance"]
    for flags in (["--sampler", "ddpm"], ["--no-guide_x0_only"]):  # guided steps that move eps too: their weight
        config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, *flags])
        assert not config["guide_x0_only"] and config["autoguidance"] == image_defaults.PLAIN_AUTOGUIDANCE
    config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, "--class_conditional"])
    assert not config["guide_x0_only"]  # classifier-free guidance keeps its plain steps
    config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, "--autoguidance", "1"])
    assert config["num_inference_steps"] == image_defaults.DEFAULTS["num_inference_steps"]  # unguided: 150
    config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, "--num_inference_steps", "50"])
    assert config["num_inference_steps"] == 50  # what the user typed wins
    config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, "--sampler", "ddpm"])
    assert config["num_inference_steps"] is None
    config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, "--num_epochs", "100"])
    assert config["save_images_step"] == 100  # one frame, at the end
    assert config["guide_epoch"] == round(100 * image_defaults.GUIDE_FRACTION)  # autoguidance's guide
    config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, "--class_conditional"])
    assert config["autoguidance"] == 1 and config["guide_epoch"] is None  # classifier-free guidance instead
    assert config["guidance_interval"] is None  # ... at every step
    assert config["num_inference_steps"] == image_defaults.DEFAULTS["num_inference_steps"]  # of all 150
    with pytest.raises(SystemExit):
        parse_config(["--dataset", "moons", "--autoguidance", "2"])  # 2D runs keep no guide
    assert "--autoguidance" in capsys.readouterr().err
    # the epochs show the network the same number of images whatever the size of the training set
    for flags, images in (([], 200), (["--dataset_size", "100"], 100), (["--dataset_size", "5000"], 200)):
        config, _, _ = parse_config(["--dataset", "mnist", "--data_dir", tiny_dir, *flags])
        assert config["num_epochs"] == image_defaults.IMAGES_SEEN // images == config["save_images_step"]
        assert 8 <= config["num_epochs"] / config["checkpoint_every"] <= 11  # about ten checkpoints


def test_autoguidance_keeps_the_ema_of_its_epoch_and_survives_a_resume(tiny_dir, tmp_path):
    from helpers import run_tool, train
    tiny = ["--dataset", "mnist", "--data_dir", tiny_dir, "--dataset_size", "64", "--unet_channels", "8",
            "--num_timesteps", "20", "--num_inference_steps", "5", "--eval_batch_size", "16",
            "--save_images_step", "1", "--checkpoint_every", "1"]
    guide_at_2 = ["--autoguidance", "2", "--guide_epoch", "2"]
    assert train(tmp_path, "plain", *tiny, "--num_epochs", "3", "--autoguidance", "1").returncode == 0
    guided = train(tmp_path, "guided", *tiny, "--num_epochs", "3", *guide_at_2)
    assert guided.returncode == 0, guided.stderr[-2000:]
    assert train(tmp_path, "cut", *tiny, "--num_epochs", "2", *guide_at_2).returncode == 0
    # the guide is the EMA weights after epoch 2: those a 2-epoch run of the same seed ends with
    ema_at_2 = torch.load(tmp_path / "cut" / "model_ema.pth", weights_only=True)
    guide = torch.load(tmp_path / "guided" / "model_guide.pth", weights_only=True)
    assert all(torch.equal(ema_at_2[k], guide[k]) for k in ema_at_2)
    assert not (tmp_path / "plain" / "model_guide.pth").exists()
    # up to epoch 2 the frames are the unguided ones (at epoch 2 the guide is the model itself); after, guided
    plain_frames, guided_frames = np.load(tmp_path / "plain" / "frames.npy"), np.load(tmp_path / "guided" / "frames.npy")
    assert np.array_equal(plain_frames[:2], guided_frames[:2]) and not np.allclose(plain_frames[2], guided_frames[2])
    # interrupted after epoch 2 (the 2-epoch run) and resumed for 3: the same frames
    resumed = train(tmp_path, "cut", "--resume", "--num_epochs", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "cut" / "frames.npy"), guided_frames)
    # sample.py uses the experiment's autoguidance; --autoguidance 1 turns it off
    a, b, c, e = (run_tool("sample.py", tmp_path / "guided", "--num_samples", "4", "--output", tmp_path / f"{n}.npy",
                           *flags) for n, flags in (("a", []), ("b", ["--autoguidance", "1"]), ("c", ["--autoguidance", "2"]),
                                                    ("e", ["--guidance_interval", "0", "19"])))
    assert a.returncode == b.returncode == c.returncode == e.returncode == 0, a.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))
    assert not np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    # the experiment guides the middle steps only ([9, 16] of T = 20); guiding all of them differs
    assert not np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "e.npy"))
    # the experiment guides x_0 only (its config's guide_x0_only); --no-guide_x0_only moves eps too: it differs
    assert json.load(open(tmp_path / "guided" / "config.json"))["guide_x0_only"] is True
    f = run_tool("sample.py", tmp_path / "guided", "--num_samples", "4", "--output", tmp_path / "f.npy", "--no-guide_x0_only")
    assert f.returncode == 0 and not np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "f.npy"))
    # at the default x_0-only weight, whole steps take the whole step's default weight, as ddpm.py would
    shutil.copytree(tmp_path / "guided", tmp_path / "at_default")
    config = json.load(open(tmp_path / "at_default" / "config.json"))
    (tmp_path / "at_default" / "config.json").write_text(json.dumps({**config, "autoguidance": image_defaults.DEFAULTS["autoguidance"]}))
    h, i, j = (run_tool("sample.py", tmp_path / "at_default", "--num_samples", "4", "--output", tmp_path / f"{n}.npy",
                        "--no-guide_x0_only", *flags)
               for n, flags in (("h", []), ("i", ["--autoguidance", str(image_defaults.PLAIN_AUTOGUIDANCE)]),
                                ("j", ["--autoguidance", str(image_defaults.DEFAULTS["autoguidance"])])))
    assert h.returncode == i.returncode == j.returncode == 0, h.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "h.npy"), np.load(tmp_path / "i.npy"))
    assert not np.allclose(np.load(tmp_path / "h.npy"), np.load(tmp_path / "j.npy"))
    bad = run_tool("sample.py", tmp_path / "guided", "--sampler", "ddpm", "--guide_x0_only", "--output", tmp_path / "g.npy")
    assert bad.returncode == 2 and "--guide_x0_only" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_tool("sample.py", tmp_path / "plain", "--autoguidance", "2", "--output", tmp_path / "d.npy")
    assert missing.returncode == 2 and "model_guide.pth" in missing.stderr and "Traceback" not in missing.stderr
