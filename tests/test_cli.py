"""ddpm.py and sample.py end to end: outputs, reproducibility, bad input."""
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

import ddpm
from helpers import TINY, assert_one_line_error, outputs, run_tool, train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exps")
    result = train(out, "tiny", *TINY, "--ema_decay", "0.9")
    assert result.returncode == 0, result.stderr
    return out / "tiny", result


def test_tiny_run_writes_every_output(tiny_run):
    exp, result = tiny_run
    config, loss, frames = outputs(exp)
    steps = 3 * (256 // 32)
    assert loss.shape == (steps,) and np.isfinite(loss).all()
    assert frames.shape == (3, 64, 2) and frames.dtype == np.float32
    assert sorted(os.listdir(exp / "images")) == ["0000.png", "0001.png", "0002.png"]
    metrics = pd.read_csv(exp / "metrics.csv")
    assert list(metrics.columns) == ["frame", "epoch", "step", "loss", "score", "floor", "seconds"]
    assert list(metrics["step"]) == [8, 16, 24] and list(metrics["epoch"]) == [0, 1, 2]
    assert (metrics["floor"] > 0).all()
    # the epoch's mean loss in metrics.csv is the mean of that epoch's entries of loss.npy
    np.testing.assert_allclose(metrics["loss"], loss.reshape(3, 8).mean(axis=1), rtol=1e-4)
    for name in ("model.pth", "model_ema.pth", "checkpoint.pt", "loss.png"):
        assert (exp / name).stat().st_size > 0
    for key in ("dataset", "num_timesteps", "beta_schedule", "hidden_size", "seed", "learning_rate"):
        assert key in config
    assert "final score" in result.stdout and "noise floor" in result.stdout


def test_config_rebuilds_the_model(tiny_run):
    # config.json alone rebuilds the network, the scheduler and the sampler that made the run's frames:
    # the rebuilt EMA model draws the last frame again, sample for sample (frames use the EMA weights)
    from engine import frames
    exp, _ = tiny_run
    with open(exp / "config.json") as f:
        config = json.load(f)
    ema, raw = ddpm.build_model(config), ddpm.build_model(config)
    ema.load_state_dict(torch.load(exp / "model_ema.pth", weights_only=True))
    raw.load_state_dict(torch.load(exp / "model.pth", weights_only=True))
    scheduler = ddpm.DDPM(config)
    last = np.load(exp / "frames.npy")[-1]

    def last_frame(model):
        return ddpm.sample(model.eval(), scheduler, last.shape, sampler=config["sampler"],
                           num_inference_steps=config["num_inference_steps"], eta=config["eta"],
                           timestep_spacing=config["timestep_spacing"],
                           generator=frames.frame_generator(config["seed"], len(np.load(exp / "frames.npy")) - 1)).numpy()

    np.testing.assert_allclose(last_frame(ema), last, rtol=0, atol=1e-5)
    assert np.abs(last_frame(raw) - last).max() > 1e-3  # the raw weights draw another frame


def test_same_seed_same_outputs(tmp_path):
    a = train(tmp_path, "a", *TINY)
    b = train(tmp_path, "b", *TINY, "--frame_worker", "on")  # frames made in the worker process
    c = train(tmp_path, "c", *TINY, "--seed", "1")
    assert a.returncode == b.returncode == c.returncode == 0, (a.stderr, b.stderr, c.stderr)
    _, loss_a, frames_a = outputs(tmp_path / "a")
    _, loss_b, frames_b = outputs(tmp_path / "b")
    _, loss_c, frames_c = outputs(tmp_path / "c")
    # the same seed: the very same losses and frames, whichever process makes the frames
    assert np.array_equal(loss_a, loss_b) and np.array_equal(frames_a, frames_b)
    assert sorted(os.listdir(tmp_path / "b" / "images")) == ["0000.png", "0001.png", "0002.png"]
    assert not np.array_equal(loss_a, loss_c)


def test_training_learns(tmp_path):
    # a short run on a simple dataset must beat its own first frame by a clear margin
    result = train(tmp_path, "learn", "--dataset", "circle", "--dataset_size", "2000", "--num_epochs", "12",
                   "--train_batch_size", "64", "--eval_batch_size", "500", "--save_images_step", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    metrics = pd.read_csv(tmp_path / "learn" / "metrics.csv")
    first, last = metrics["score"].iloc[0], metrics["score"].iloc[-1]
    assert last < first / 3, (first, last)
    assert last < 10 * metrics["floor"].iloc[-1]


# Each bad command line with what its one-line error must say: the flag at fault (and the value or the reason)
BAD_FLAGS = [
    (["--num_epochs", "0"], "--num_epochs", "positive integer"), (["--num_epochs", "-3"], "--num_epochs", "-3"),
    (["--num_epochs", "two"], "--num_epochs", "'two'"), (["--train_batch_size", "0"], "--train_batch_size", "got 0"),
    (["--eval_batch_size", "0"], "--eval_batch_size", "got 0"), (["--dataset_size", "-1"], "--dataset_size", "got -1"),
    (["--num_timesteps", "0"], "--num_timesteps", "got 0"), (["--learning_rate", "0"], "--learning_rate", "positive"),
    (["--learning_rate", "-1e-3"], "--learning_rate", "expected one argument"),  # argparse: "-1e-3" reads as a flag
    (["--learning_rate=-1e-3"], "--learning_rate", "positive number, got -1e-3"),
    (["--learning_rate", "nan"], "--learning_rate", "finite"),
    (["--hidden_size", "0"], "--hidden_size", "got 0"), (["--hidden_layers", "0"], "--hidden_layers", "got 0"),
    (["--embedding_size", "0"], "--embedding_size", "got 0"), (["--embedding_size", "7"], "--embedding_size", "even"),
    (["--save_images_step", "0"], "--save_images_step", "got 0"),
    (["--checkpoint_every", "0"], "--checkpoint_every", "got 0"), (["--dataset", "dragon"], "--dataset", "'dragon'"),
    (["--beta_schedule", "exp"], "--beta_schedule", "'exp'"), (["--time_embedding", "fourier"], "--time_embedding", "'fourier'"),
    (["--input_embedding", "zero"], "--input_embedding", "'zero'"), (["--device", "tpu"], "--device", "'tpu'"),
    (["--beta_start", "0"], "--beta_start", "(0, 1)"), (["--beta_end", "1.5"], "--beta_end", "1.5"),
    (["--beta_start", "0.1", "--beta_end", "0.01"], "--beta_start 0.1 > --beta_end 0.01", ""),
    (["--ema_decay", "1"], "--ema_decay", "[0, 1)"), (["--ema_decay", "-0.1"], "--ema_decay", "-0.1"),
    (["--prediction", "score"], "--prediction", "'score'"), (["--sampler", "euler"], "--sampler", "euler"),
    (["--eta", "-1"], "--eta", "-1"), (["--num_inference_steps", "0"], "--num_inference_steps", "got 0"),
    (["--num_inference_steps", "100"], "--num_inference_steps", "ddpm"),  # the default sampler walks all T
    (["--sampler", "ddpm", "--num_inference_steps", "10"], "--num_inference_steps", "ddpm"),
    (["--resume", "--overwrite"], "--resume and --overwrite", ""), (["--no_such_flag"], "--no_such_flag", ""),
    (["--dataset", "mnist", "--compile", "on"], "--compile", "image"),
    (["--timestep_spacing", "cubic"], "--timestep_spacing", "'cubic'"),
    (["--sampler", "dpmpp_2m", "--num_inference_steps", "201"], "--num_inference_steps 201", "T = 200"),
]


@pytest.mark.parametrize("flags, flag, reason", BAD_FLAGS, ids=[" ".join(case[0]) for case in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, flag, reason):
    # in-process for speed; test_bad_flag_from_the_shell runs the real command
    with pytest.raises(SystemExit) as exit_info:
        ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "bad", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ddpm.py: error:"), err
    assert flag in err and reason in err, err  # it names the flag at fault, and why
    assert not (tmp_path / "bad").exists()  # nothing was created before the check


def test_bad_flag_from_the_shell(tmp_path):
    line = assert_one_line_error(train(tmp_path, "bad", "--num_epochs", "0"))
    assert "--num_epochs" in line and "positive integer" in line


def test_help_lists_every_flag_with_default():
    result = run_tool("ddpm.py", "-h")
    assert result.returncode == 0
    for flag in ("--experiment_name", "--dataset", "--train_batch_size", "--eval_batch_size", "--num_epochs",
                 "--learning_rate", "--num_timesteps", "--beta_schedule", "--embedding_size", "--hidden_size",
                 "--hidden_layers", "--time_embedding", "--input_embedding", "--save_images_step", "--seed",
                 "--device", "--dataset_size", "--out_dir", "--ema_decay", "--prediction", "--sampler",
                 "--num_inference_steps", "--eta", "--beta_start", "--beta_end", "--resume", "--overwrite",
                 "--checkpoint_every"):
        assert flag in result.stdout, flag
    assert "(default: dino)" in " ".join(result.stdout.split())


def test_sample_py_reproduces_and_uses_ema(tiny_run, tmp_path):
    exp, _ = tiny_run
    args = [exp, "--num_samples", "300", "--sampler", "ddim", "--num_inference_steps", "10", "--seed", "5"]
    a = run_tool("sample.py", *args, "--output", tmp_path / "a.npy")
    b = run_tool("sample.py", *args, "--output", tmp_path / "b.npy")
    c = run_tool("sample.py", *args, "--output", tmp_path / "c.npy", "--weights", "raw")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    samples_a, samples_b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert samples_a.shape == (300, 2)
    assert np.array_equal(samples_a, samples_b)
    assert not np.allclose(samples_a, np.load(tmp_path / "c.npy"))  # default weights are the EMA ones ...
    # ... read from model_ema.pth: with the raw weights put there, the default draws the raw samples
    import shutil
    import sample as sample_py
    swapped = tmp_path / "swapped"
    shutil.copytree(exp, swapped)
    shutil.copy(exp / "model.pth", swapped / "model_ema.pth")
    d = sample_py.main([str(swapped), *map(str, args[1:]), "--output", str(tmp_path / "d.npy")])
    assert np.array_equal(d, np.load(tmp_path / "c.npy"))
    assert (tmp_path / "a.png").stat().st_size > 0
    again = run_tool("sample.py", *args, "--output", tmp_path / "a.npy")
    assert "exists" in assert_one_line_error(again)


def test_sample_py_bad_input(tmp_path):
    assert "config.json" in assert_one_line_error(run_tool("sample.py", tmp_path, "--output", tmp_path / "x.npy"))
    assert "num_samples" in assert_one_line_error(run_tool("sample.py", tmp_path, "--num_samples", "0"))


def test_few_step_samplers_make_the_frames_and_sample_py_uses_them(tmp_path):
    result = train(tmp_path, "sde", *TINY, "--sampler", "dpmpp_2m_sde", "--num_inference_steps", "8",
                   "--timestep_spacing", "karras")
    assert result.returncode == 0, result.stderr
    config, _, frames = outputs(tmp_path / "sde")
    assert (config["sampler"], config["num_inference_steps"], config["timestep_spacing"]) == ("dpmpp_2m_sde", 8, "karras")
    assert frames.shape == (3, 64, 2) and np.isfinite(frames).all()
    # sample.py keeps the experiment's sampler; the deterministic one gives the same samples twice
    args = [tmp_path / "sde", "--num_samples", "200"]
    a = run_tool("sample.py", *args, "--output", tmp_path / "a.npy")
    b = run_tool("sample.py", *args, "--output", tmp_path / "b.npy", "--seed", "1")
    c = run_tool("sample.py", *args, "--output", tmp_path / "c.npy", "--sampler", "dpmpp_2m")
    d = run_tool("sample.py", *args, "--output", tmp_path / "d.npy", "--sampler", "dpmpp_2m", "--eta", "1")
    assert a.returncode == b.returncode == c.returncode == d.returncode == 0, (a.stderr, c.stderr)
    assert "dpmpp_2m_sde, 8 steps" in a.stdout and "dpmpp_2m, 200 steps" in c.stdout
    assert not np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert np.array_equal(np.load(tmp_path / "c.npy"), np.load(tmp_path / "d.npy"))  # dpmpp_2m has no eta


def test_every_tool_has_help_that_exits_0_and_explains_each_flag():
    # -h exits 0 with a usage line; every option of the argparse tools says what it is, and no default
    # is printed as a bare "None"
    for script in ("sample.py", "tools/evaluate.py", "tools/bench.py", "tools/ablations.py", "tools/figures.py",
                   "images/classifier.py"):
        result = run_tool(script, "-h")
        assert result.returncode == 0 and "usage" in result.stdout, (script, result.stderr[-500:])
        text = " ".join(result.stdout.split())
        assert "(default: None)" not in text, script
        lines, checked = result.stdout.splitlines(), 0
        for i, line in enumerate(lines):
            match = re.match(r"^  (?:-\w, )?(--[\w-]+)((?: \S+)*?)(\s{2,}\S.*)?$", line)
            if match and match.group(1) != "--help":
                checked += 1
                # the help text sits on the option's line or, for a long option, on the next
                described = match.group(3) or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 8))
                assert described, (script, line)
        assert script == "tools/figures.py" or checked > 1, script
