"""Running the command-line tools in a subprocess, as a user would."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset_size", "256", "--train_batch_size", "32", "--num_epochs", "3", "--eval_batch_size", "64",
        "--save_images_step", "1", "--quiet"]


def run_tool(script, *args, cwd=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def train(out_dir, name, *args, **kwargs):
    return run_tool("ddpm.py", "--out_dir", out_dir, "--experiment_name", name, *args, **kwargs)


def outputs(exp_dir):
    with open(os.path.join(exp_dir, "config.json")) as f:
        config = json.load(f)
    return config, np.load(os.path.join(exp_dir, "loss.npy")), np.load(os.path.join(exp_dir, "frames.npy"))


def assert_one_line_error(result, status=2):
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def parse_config(argv):
    """(config, flags given, parser) of ddpm.py's command line, checked as ddpm.main checks it."""
    import ddpm
    from engine import experiment
    parser = ddpm.build_parser()
    config, given = experiment.parse(parser, argv, ddpm.FORMULATIONS)
    return config, given, parser


def digit_like(n, rng):
    """n fake 28x28 uint8 'digits': a bright bar whose position is the label, plus noise."""
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 4:24, 2 + 2 * label:4 + 2 * label] = 255
    return images, labels


def write_fake_mnist(folder):
    """The four MNIST IDX .gz files in `folder`: 200 train and 100 test fake digits; returns the folder as str."""
    from images import data as image_data
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 100)):
        images, labels = digit_like(n, rng)
        image_file, label_file = image_data.IDX_FILES[split]
        image_data.write_idx(os.path.join(folder, image_file), images)
        image_data.write_idx(os.path.join(folder, label_file), labels)
    return str(folder)


def numpy_betas(schedule, T, start, end):
    """The beta schedules written out independently, in numpy (float64)."""
    if schedule == "linear":
        return np.linspace(start, end, T)
    if schedule == "quadratic":
        return np.linspace(np.sqrt(start), np.sqrt(end), T) ** 2
    if schedule == "sigmoid":
        return 1 / (1 + np.exp(-np.linspace(-6, 6, T))) * (end - start) + start
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2  # cosine: Nichol & Dhariwal, eq. 17
    return np.minimum(1 - f[1:] / f[:-1], 0.999)


def sample_draws(shape, seed, timesteps, sampler):
    """x_T and the noise z of every step, as ddpm.sample draws them from torch.Generator().manual_seed(seed):
    x_T first, then one N(0, I) per visited timestep t > 0 (ddpm, ddim, dpmpp_2m_sde; dpmpp_2m draws none).
    Returns (x_T, [z per step]) in float64, z = 0 where nothing is drawn."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=g)
    zs = [torch.randn(shape, generator=g) if t > 0 and sampler != "dpmpp_2m" else torch.zeros(shape)
          for t in timesteps]
    return x_T.double(), [z.double() for z in zs]


class ExactGaussianDenoiser(torch.nn.Module):
    """The optimal network for data N(mu, s^2 I), in closed form:
    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t),
    given in the parameterisation the scheduler expects."""

    def __init__(self, scheduler, mu, std):
        super().__init__()
        self.s, self.mu, self.var = scheduler, mu, std**2

    def forward(self, x, t):
        abar = self.s.alphas_cumprod[t].reshape(-1, *([1] * (x.dim() - 1)))
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * self.mu) / (abar * self.var + 1 - abar)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return {"epsilon": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[self.s.prediction]


def stop_after_step(monkeypatch, step, start_run):
    """start_run() with a stop requested after training step `step`, as a Ctrl-C between two steps is (the flag the
    SIGINT handler sets): it must write its checkpoint and exit 130. The real Run.after_step is back afterwards."""
    import pytest
    from engine import experiment
    after_step = experiment.Run.after_step

    def stopping(run, epoch, batch, done, perm):
        if done == step:
            run.stop_request.signal = signal.SIGINT
        return after_step(run, epoch, batch, done, perm)

    monkeypatch.setattr(experiment.Run, "after_step", stopping)
    with pytest.raises(SystemExit) as stopped:
        start_run()
    monkeypatch.setattr(experiment.Run, "after_step", after_step)
    assert stopped.value.code == 130
