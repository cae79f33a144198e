"""DDIM and DPM-Solver++(2M) on any Gaussian path x = alpha x_0 + sigma eps, the few-step samplers every
formulation shares: DDPM's (alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t)), flow matching's
(alpha = 1 - t, sigma = t) and EDM's (alpha = 1, sigma). All a step needs is the network's x_0 at the step's
start and the path's (alpha, sigma) at both ends; lambda = log(alpha / sigma) is the path's log-SNR / 2.

  DDIM (Song et al. 2021, eq. 12, eq. 16's noise)
      x_next = alpha' x_0 + sqrt(sigma'^2 - c^2) eps + c z,   eps = (x - alpha x_0) / sigma,
      c = eta sigma' sqrt(1 - (alpha sigma' / (alpha' sigma))^2)
    eta = 0 is deterministic (an Euler step of the probability-flow ODE in lambda); eta = 1 draws from the
    posterior q(x_next | x, x_0), the ancestral step.
  DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) is the same step on an x_0 extrapolated half a step in lambda
  from the step before's x_0':
      D = x_0 + (x_0 - x_0') / (2 r),   r = (lambda - lambda_before) / (lambda' - lambda)
    the first step has no history and is DDIM (DPM-Solver-1 is DDIM). With eta = 1 it is their SDE form,
    SDE-DPM-Solver++(2M), a discretisation of the reverse SDE with the score -eps / sigma that the network's
    x_0 implies; 0 < eta < 1 lies between (docs/samplers.md measures it).
The last step lands on sigma = 0 and returns the network's x_0. ddpm.sample calls `step`; flow matching and
EDM call `solve` on their own grids.
"""
import math

import torch

SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_2m_sde")
DEFAULT_ETA = 0.8  # of dpmpp_2m_sde on DDPM (docs/samplers.md)


def noise_level(sampler, eta=None):
    """The eta a sampler runs at: the one given, else ddim 0 and dpmpp_2m_sde DEFAULT_ETA; dpmpp_2m is the ODE's, 0."""
    if sampler == "dpmpp_2m":
        return 0.0
    return ({"dpmpp_2m_sde": DEFAULT_ETA}.get(sampler, 0.0) if eta is None else eta)


def log_snr(alpha, sigma):
    """lambda = log(alpha / sigma): -inf at pure noise (alpha = 0), +inf at the data (sigma = 0)."""
    return math.log(alpha) - math.log(sigma) if alpha > 0 and sigma > 0 else (math.inf if sigma == 0 else -math.inf)


def path_step(x0, x, now, nxt, last=None, eta=0.0, noise=None):
    """(x at nxt, (lambda, x0)): one step from x [B, ...] at now = (alpha, sigma) to nxt = (alpha', sigma') with
    the network's x0; `last` is the (lambda, x0) this returned the step before (None: a DDIM step)."""
    (alpha, sigma), (alpha_next, sigma_next) = now, nxt
    lam, lam_next = log_snr(alpha, sigma), log_snr(alpha_next, sigma_next)
    if sigma_next == 0:
        return x0, (lam, x0)
    denoised = x0
    if last is not None and math.isfinite(last[0]):  # after a start at pure noise (lambda = -inf) r is infinite
        r = (lam - last[0]) / (lam_next - lam)
        denoised = x0 + (x0 - last[1]) / (2 * r)
    eps = (x - alpha * denoised) / sigma                       # the eps that goes with D
    c = eta * sigma_next * math.sqrt(max(0.0, 1 - (alpha * sigma_next / (alpha_next * sigma)) ** 2))  # eq. 16
    x_next = alpha_next * denoised + math.sqrt(max(sigma_next**2 - c**2, 0.0)) * eps
    return (x_next + c * noise if c > 0 and noise is not None else x_next), (lam, x0)


def step(scheduler, x0, t, prev_t, x_t, last=None, eta=0.0, noise=None):
    """(x_{prev_t}, (t, x0)): path_step between DDPM's timesteps t > prev_t (ints, prev_t = -1: x_0); `last`
    is the (t', x0') this returned the step before, None at the first."""
    def at(t):  # (alpha, sigma) of timestep t, (1, 0) for -1
        abar = float(scheduler.alphas_cumprod[t]) if t >= 0 else 1.0
        return math.sqrt(abar), math.sqrt(1 - abar)
    history = None if last is None else (log_snr(*at(last[0])), last[1])
    x, _ = path_step(x0, x_t, at(t), at(prev_t), history, eta, noise)
    return x, (t, x0)


def solve(denoise, x, grid, sampler="dpmpp_2m", eta=0.0, generator=None, trajectory=None):
    """x_0 from x at grid[0]: grid a list of (alpha, sigma) from noise down to sigma = 0, denoise(x, i) the
    network's x_0 at grid[i]. sampler "ddim" or "dpmpp_2m(_sde)"; eta > 0 draws noise at every step but the
    last. trajectory: a list that gets every x appended."""
    last = None
    for i in range(len(grid) - 1):
        x0 = denoise(x, i)
        stochastic = eta > 0 and grid[i + 1][1] > 0
        noise = torch.randn(x.shape, generator=generator, device=x.device) if stochastic else None
        x, history = path_step(x0, x, grid[i], grid[i + 1], last, eta, noise)
        last = history if sampler != "ddim" else None
        if trajectory is not None:
            trajectory.append(x)
    return x
