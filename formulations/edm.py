"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the same
network, preconditioned, trained on log-normal noise levels and sampled with their Heun sampler.

    python ddpm.py --dataset dino --objective edm                    # its measured 2D defaults (docs/formulations.md)
    python ddpm.py --dataset dino --objective edm --paper_settings   # the paper's: grid from 80, no churn

Noise is added without shrinking the data: x = x_0 + sigma eps, sigma from 0 up to sigma_max. Equation
and table numbers are the paper's (arXiv:2206.00364):
  the denoiser      D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), F the network              (eq. 7)
  preconditioning   c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
                    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4, with sd = sigma_data,
                    the standard deviation of the training data, measured before training        (Table 1)
  the loss          E lambda(sigma) || D(x_0 + sigma eps; sigma) - x_0 ||^2,
                    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2                 (eq. 8, Table 1)
  the noise levels  ln(sigma) ~ N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2                    (Table 1)
                    and a share --low_noise_fraction from the lowest fifth of the rho = 7 ramp below
                    (sigma from 0.002 to 0.085, uniform in sigma^(1/7)), as DDPM's training draws its t
  sampling          the ODE dx/dsigma = (x - D(x; sigma)) / sigma from x ~ N(0, sigma_max^2 I) to sigma = 0,
                    with Heun's method (their Algorithm 1) or Euler's (extensions/ode.py), on the grid
                    sigma_i = (smax^(1/rho) + i / (N - 1) (smin^(1/rho) - smax^(1/rho)))^rho, rho = 7,
                    and sigma_N = 0                                                               (eq. 5)
                    smax: --sigma_max, by default the top of the trained levels, exp(P_mean + 3 P_std) = 11
                    (the paper's 80 lies where the network never trained); --s_churn adds noise before
                    each step, their stochastic sampler (Algorithm 2, S_tmin = 0, S_tmax = inf, S_noise = 1);
                    or DDIM / DPM-Solver++(2M) on the path alpha = 1, sigma (extensions/dpm_solver.py)
The network sees c_noise as 1000 c_noise, the scale its sinusoidal embedding has for DDPM's timesteps.
"""
import math

import torch

import datasets
from engine import cli
from extensions import dpm_solver, guidance as guided, ode
from formulations.interface import Formulation

P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0   # the paper's grid (eq. 5)
TRAINED_SIGMA_MAX = math.exp(P_MEAN + 3 * P_STD)  # 11.0, the grid's top by default: 0.13% of the training levels lie above


def add_flags(parser):
    parser.add_argument("--sigma_max", type=cli.positive_float, default=None, help="--objective edm: the noise "
                        f"level its sampling grid starts at (default: {TRAINED_SIGMA_MAX:.0f}, the top of the trained levels; "
                        f"the paper's {SIGMA_MAX:g}: --paper_settings)")
    parser.add_argument("--s_churn", type=cli.nonnegative_float, default=None, help="--objective edm, euler and heun: "
                        "S_churn of their stochastic sampler, noise added before each step (0: deterministic)")


def measure_sigma_data(config):
    """sigma_data: the standard deviation of every coordinate (pixel) of the run's training data."""
    data, _ = datasets.load_training_data(config)
    return float(data.double().std())


class EDM(Formulation):
    """EDM as a formulation (formulations/__init__.py): training noise levels, the loss, samplers."""
    SAMPLERS = ode.SAMPLERS + dpm_solver.SAMPLERS
    FLAGS = ("sigma_max", "s_churn")
    SAMPLING_FLAGS = ("sampler", "num_inference_steps", "eta", "s_churn")
    # measured on the 2D sets (docs/formulations.md): its log-normal levels need no low-noise share
    DEFAULTS = {"low_noise_fraction": 0.0, "sampler": "dpmpp_2m_sde", "num_inference_steps": 50}
    PAPER = {"low_noise_fraction": 0.0, "sigma_max": SIGMA_MAX, "s_churn": 0.0, "sampler": "heun",
             "num_inference_steps": 25}

    def __init__(self, config, device="cpu"):
        self.sigma_data = config["sigma_data"]
        self.sigma_max = config.get("sigma_max") or SIGMA_MAX  # configs from before --sigma_max: the paper's
        self.low_noise_fraction = config.get("low_noise_fraction", 0.0)
        self.clip_sample = config.get("clip_sample") or None  # clamp D to [-c, c] when sampling
        self.num_timesteps = config["num_timesteps"]  # --guidance_interval LO HI of T guides sigma / (1 + sigma) there
        self.precision = config.get("precision", "fp32")

    @staticmethod
    def prepare(config, given=()):
        """config with sigma_data measured from the training data, and the grid's top."""
        if config.get("sigma_max") is None:
            config["sigma_max"] = TRAINED_SIGMA_MAX
        if config.get("sigma_data") is None:
            config["sigma_data"] = measure_sigma_data(config)
        return config

    @staticmethod
    def sampling_error(sampler, num_inference_steps, num_timesteps):  # any number of steps will do
        return cli.sampler_error("edm", sampler, EDM.SAMPLERS)

    def preconditioning(self, sigma):
        """(c_skip, c_out, c_in, c_noise) of Table 1 for sigma [B] (or [1]), shaped to broadcast like sigma."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def denoise(self, net, x, sigma, labels=None, guidance=None, guided_here=False):
        """D(x; sigma) of eq. 7, sigma [B] or [1] (one level for the whole batch, as in sampling)."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        shape = (-1, *([1] * (x.dim() - 1)))
        F_x = guided.network_output(net, c_in.reshape(shape) * x, 1000 * c_noise, labels, guidance, guided_here,
                                    self.precision)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * F_x

    def sample_timesteps(self, n, generator, device="cpu"):
        """Training noise levels sigma [n]: ln(sigma) ~ N(P_mean, P_std^2), a share low_noise_fraction from the
        lowest fifth of the rho = 7 ramp."""
        sigma = (P_MEAN + P_STD * torch.randn(n, generator=generator, device=device)).exp()
        if self.low_noise_fraction > 0:
            ramp = 0.8 + 0.2 * torch.rand(n, generator=generator, device=device)
            first, last = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
            low = (first + ramp * (last - first)) ** RHO
            sigma = torch.where(torch.rand(n, generator=generator, device=device) < self.low_noise_fraction, low, sigma)
        return sigma

    def loss(self, net, x_start, noise, sigma, labels=None):
        """lambda(sigma) || D(x_0 + sigma eps; sigma) - x_0 ||^2, averaged over the batch (eq. 8)."""
        shape = (-1, *([1] * (x_start.dim() - 1)))
        denoised = self.denoise(net, x_start + sigma.reshape(shape) * noise, sigma, labels)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return (weight * (denoised - x_start).square().flatten(1).mean(1)).mean()

    def sigmas(self, steps):
        """The sampling grid of eq. 5: `steps` levels from sigma_max down to SIGMA_MIN, then 0."""
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        first, last = self.sigma_max ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
        return ((first + ramp * (last - first)) ** RHO).tolist() + [0.0]

    def denoised(self, model, x, sigma, labels=None, guidance=None):
        """D(x; sigma) for a float sigma > 0, guided where the guidance interval holds sigma, clamped by clip_sample."""
        inside = guidance is not None and guidance.applies(round(sigma / (1 + sigma) * (self.num_timesteps - 1)))
        denoised = self.denoise(model, x, torch.full((1,), sigma, device=x.device), labels, guidance, inside)
        return denoised.clamp(-self.clip_sample, self.clip_sample) if self.clip_sample is not None else denoised

    def slope(self, model, x, sigma, labels=None, guidance=None):
        """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE of eq. 1 with sigma(t) = t."""
        return (x - self.denoised(model, x, sigma, labels, guidance)) / sigma

    @torch.inference_mode()
    def sample(self, model, shape, *, sampler="heun", num_inference_steps=None, eta=None, s_churn=None,
               generator=None, device="cpu", labels=None, guidance=None, trajectory=False):
        """From x ~ N(0, sigma_max^2 I) of `shape` [B, ...] to sigma = 0 in num_inference_steps steps on the grid of
        eq. 5: Euler or Heun on dx/dsigma = (x - D) / sigma (Algorithm 1; with s_churn, Algorithm 2), or DDIM /
        DPM-Solver++(2M) (eta > 0: stochastic)."""
        error = self.sampling_error(sampler, num_inference_steps, self.num_timesteps)
        if error:
            raise ValueError(error)
        grid = self.sigmas(num_inference_steps or self.DEFAULTS["num_inference_steps"])
        x = grid[0] * torch.randn(shape, generator=generator, device=device)
        path = [x] if trajectory else None
        if sampler in ode.SAMPLERS:
            gamma = min((s_churn or 0.0) / (len(grid) - 1), math.sqrt(2) - 1)  # Algorithm 2's gamma_i
            x = ode.solve(lambda x, s: self.slope(model, x, s, labels, guidance), x, grid, sampler, path, gamma,
                          generator)
        else:
            x = dpm_solver.solve(lambda x, i: self.denoised(model, x, grid[i], labels, guidance), x,
                                 [(1.0, s) for s in grid], sampler, dpm_solver.noise_level(sampler, eta), generator, path)
        return torch.stack(path) if trajectory else x
