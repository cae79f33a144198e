"""Which timesteps a few-step sampler visits, besides DDIM's evenly spaced ones.

Each spacing puts more of the n steps at low noise, where the fine detail of a sample is decided
(docs/samplers.md measures them):
  quadratic   t ~ (i/n)^2 (Song et al. 2021, DDIM's appendix)
  logsnr      evenly in lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022, DPM-Solver)
  karras      evenly in sigma^(1/7), sigma = e^(-lambda_t) (Karras et al. 2022, eq. 5, rho = 7)
The timesteps are those of the trained schedule, integers; where rounding makes two coincide
they are moved apart, so that each of the n steps is a distinct t.
"""
import math

import torch

SPACINGS = ("quadratic", "logsnr", "karras")
DEFAULT = {"ddpm": "uniform", "ddim": "uniform", "dpmpp_2m": "quadratic", "dpmpp_2m_sde": "quadratic"}  # docs/samplers.md


def timesteps(log_snr, n, spacing="uniform"):
    """n descending timesteps from T-1 to 0: evenly spaced in t ("uniform", DDIM's), or `spaced` below;
    all T of them for n >= T."""
    T = len(log_snr)
    if spacing == "uniform" or n >= T:
        return torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long().tolist()
    return spaced(log_snr, n, spacing)


def spaced(log_snr, n, spacing):
    """n descending timesteps from T-1 to 0; log_snr [T] is lambda_t of the schedule (falling in t)."""
    T = len(log_snr)
    high, low = float(log_snr[-1]), float(log_snr[0])  # lambda at t = T-1 and at t = 0
    if spacing == "quadratic":
        t = ((T - 1) * torch.linspace(1, 0, n, dtype=torch.float64) ** 2).round().long().tolist()
    else:
        if spacing == "logsnr":
            targets = torch.linspace(high, low, n, dtype=torch.float64)
        elif spacing == "karras":
            targets = -7 * torch.linspace(math.exp(-high / 7), math.exp(-low / 7), n, dtype=torch.float64).log()
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}")
        index = torch.searchsorted(-log_snr, -targets).clamp(1, T - 1)  # interpolate t at each target lambda
        above, below = log_snr[index - 1], log_snr[index]
        t = ((index - 1) + (above - targets) / (above - below)).clamp(0, T - 1).round().long().tolist()
    for k in range(n - 2, -1, -1):  # distinct: each at least one above the next ...
        t[k] = max(t[k], t[k + 1] + 1)
    for k in range(n):  # ... and below the one before, within 0 .. T-1
        t[k] = min(t[k], T - 1 if k == 0 else t[k - 1] - 1)
    return t
