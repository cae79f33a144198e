"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): the same
network, preconditioned, trained on log-normal noise levels and sampled with their deterministic Heun sampler.

    python ddpm.py --dataset dino --objective edm             # Heun, 25 steps (49 network evaluations)

Noise is added without shrinking the data: x = x_0 + sigma eps, sigma from 0 up to SIGMA_MAX. Equation
and table numbers are the paper's (arXiv:2206.00364):
  the denoiser      D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), F the network              (eq. 7)
  preconditioning   c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
                    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4, with sd = sigma_data,
                    the standard deviation of the training data, measured before training        (Table 1)
  the loss          E lambda(sigma) || D(x_0 + sigma eps; sigma) - x_0 ||^2,
                    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2                 (eq. 8, Table 1)
  the noise levels  ln(sigma) ~ N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2                    (Table 1)
  sampling          the ODE dx/dsigma = (x - D(x; sigma)) / sigma from x ~ N(0, SIGMA_MAX^2 I) to sigma = 0,
                    with Heun's method (their Algorithm 1) or Euler's (extensions/ode.py), on the grid
                    sigma_i = (smax^(1/rho) + i / (N - 1) (smin^(1/rho) - smax^(1/rho)))^rho, rho = 7,
                    and sigma_N = 0                                                               (eq. 5)
The network sees c_noise as 1000 c_noise, the scale its sinusoidal embedding has for DDPM's timesteps.
"""
import torch

import datasets
from extensions import guidance as guided, ode

P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
DEFAULTS = {"sampler": "heun", "num_inference_steps": 25}  # for the flags not given: 49 evaluations a sample


def measure_sigma_data(config):
    """sigma_data: the standard deviation of every coordinate (pixel) of the run's training data."""
    data, _ = datasets.load_training_data(config)
    return float(data.double().std())


class EDM:
    """What ddpm.train and ddpm.sample ask of a formulation: training noise levels, the loss, a sampler."""

    def __init__(self, config, device="cpu"):
        self.sigma_data = config["sigma_data"]
        self.clip_sample = config.get("clip_sample") or None  # clamp D to [-c, c] when sampling
        self.num_timesteps = config["num_timesteps"]  # --guidance_interval LO HI of T guides sigma / (1 + sigma) there

    def preconditioning(self, sigma):
        """(c_skip, c_out, c_in, c_noise) of Table 1 for sigma [B] (or [1]), shaped to broadcast like sigma."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def denoise(self, net, x, sigma, labels=None, precision="fp32", guidance=None, guided_here=False):
        """D(x; sigma) of eq. 7, sigma [B] or [1] (one level for the whole batch, as in sampling)."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        shape = (-1, *([1] * (x.dim() - 1)))
        F_x = guided.network_output(net, c_in.reshape(shape) * x, 1000 * c_noise, labels, guidance, guided_here,
                                    precision)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * F_x

    def sample_timesteps(self, n, generator, device="cpu"):
        """Training noise levels sigma [n]: ln(sigma) ~ N(P_mean, P_std^2)."""
        return (P_MEAN + P_STD * torch.randn(n, generator=generator, device=device)).exp()

    def loss(self, net, x_start, noise, sigma, labels=None, precision="fp32"):
        """lambda(sigma) || D(x_0 + sigma eps; sigma) - x_0 ||^2, averaged over the batch (eq. 8)."""
        shape = (-1, *([1] * (x_start.dim() - 1)))
        denoised = self.denoise(net, x_start + sigma.reshape(shape) * noise, sigma, labels, precision)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return (weight * (denoised - x_start).square().flatten(1).mean(1)).mean()

    def sigmas(self, steps):
        """The sampling grid of eq. 5: `steps` levels from SIGMA_MAX down to SIGMA_MIN, then 0."""
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        first, last = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
        return ((first + ramp * (last - first)) ** RHO).tolist() + [0.0]

    def slope(self, model, x, sigma, labels=None, guidance=None, precision="fp32"):
        """dx/dsigma = (x - D(x; sigma)) / sigma, guided where the guidance interval holds sigma."""
        inside = guidance is not None and guidance.applies(round(sigma / (1 + sigma) * (self.num_timesteps - 1)))
        denoised = self.denoise(model, x, torch.full((1,), sigma, device=x.device), labels, precision, guidance, inside)
        if self.clip_sample is not None:
            denoised = denoised.clamp(-self.clip_sample, self.clip_sample)
        return (x - denoised) / sigma

    @torch.inference_mode()
    def sample(self, model, shape, *, sampler="heun", num_inference_steps=None, generator=None, device="cpu",
               labels=None, guidance=None, precision="fp32", trajectory=False, **ddpm_only):
        """From x ~ N(0, SIGMA_MAX^2 I) of `shape` [B, ...] to sigma = 0 in num_inference_steps steps (Heun:
        Algorithm 1); the keywords of DDPM's samplers (eta, timestep_spacing) do nothing here."""
        grid = self.sigmas(num_inference_steps or DEFAULTS["num_inference_steps"])
        x = grid[0] * torch.randn(shape, generator=generator, device=device)
        path = [x] if trajectory else None
        x = ode.solve(lambda x, s: self.slope(model, x, s, labels, guidance, precision), x, grid, sampler, path)
        return torch.stack(path) if trajectory else x
