"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a second-order multistep solver
of the diffusion ODE, one network evaluation a step, and its SDE form. ddpm.sample calls `step`.

Written in this project's terms, its update is DDIM's (Song et al. 2021, eq. 12) on an x_0
extrapolated half a step in lambda_t = log(alpha_t / sigma_t), alpha = sqrt(alpha_bar),
sigma = sqrt(1 - alpha_bar) (NoiseScheduler.log_snr):
    D = x0 + (x0 - x0') / (2 r),   r = (lambda_t - lambda_t') / (lambda_{prev_t} - lambda_t)
where x0' is the prediction of the step before, at t'. The first step has no history and is DDIM
(DPM-Solver-1 is DDIM). With eta = 1 and noise it is DDIM's eta = 1 on the same D: their
SDE-DPM-Solver++(2M), whose first-order step is the DDPM step; 0 < eta < 1 lies between.
docs/samplers.md measures it.
"""

DEFAULT_ETA = 0.8  # of dpmpp_2m_sde (docs/samplers.md)


def step(scheduler, x0, t, prev_t, x_t, last=None, eta=0.0, noise=None):
    """(x_{prev_t}, (t, x0)): one step from x_t [B, ...] with the network's x0 at t (ints); `last` is
    the (t', x0') this returned the step before, None at the first. prev_t = -1 returns x0."""
    if prev_t < 0:
        return x0, (t, x0)
    extrapolated = x0
    if last is not None:
        last_t, last_x0 = last
        lam = scheduler.log_snr
        r = float((lam[t] - lam[last_t]) / (lam[prev_t] - lam[t]))
        extrapolated = x0 + (x0 - last_x0) / (2 * r)
    alpha_bar = scheduler.alphas_cumprod[t]
    eps = (x_t - alpha_bar.sqrt() * extrapolated) / (1 - alpha_bar).sqrt()  # the eps that goes with D
    return scheduler.ddim_step(extrapolated, eps, t, prev_t, x_t, eta, 0.0 if noise is None else noise), (t, x0)
