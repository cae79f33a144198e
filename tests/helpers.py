"""Running the command-line tools in a subprocess, as a user would."""
import json
import os
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
    config, given = experiment.parse(parser, argv, ddpm.flag_error)
    return config, given, parser


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
