"""Flow matching with the straight path (rectified flow): the same denoiser, another formulation.

    python ddpm.py --dataset dino --objective flow            # its measured 2D defaults (docs/formulations.md)
    python ddpm.py --dataset dino --objective flow --paper_settings   # SD3's logit-normal times, Euler

Lipman et al. 2023 ("Flow Matching for Generative Modeling") and Liu et al. 2023 ("Flow Straight and
Fast"); the timestep distribution of Esser et al. 2024 ("Scaling Rectified Flow Transformers", SD3).
Time runs from t = 0 (data) to t = 1 (noise):
  the path       x_t = (1 - t) x_0 + t eps,  eps ~ N(0, I)                          (SD3 eq. 2-3)
  the target     the velocity dx_t/dt = eps - x_0; the network v_theta(x_t, t) regresses it:
                 L = E || v_theta(x_t, t) - (eps - x_0) ||^2                         (SD3 eq. 6)
  the times      t ~ U(0, 1) (--flow_time uniform), or logit-normal(0, 1): t = sigmoid(n), n ~ N(0, 1), which
                 puts most of training in the middle of the path (SD3 eq. 19, its default); either way a share
                 --low_noise_fraction of them from the lowest fifth, t < 0.2, as DDPM's training draws its t
  sampling       from x_1 ~ N(0, I) solve the ODE dx/dt = v_theta(x, t) back to t = 0 with Euler or Heun
                 steps (extensions/ode.py) on a grid even in t; or, with the x_0 = x_t - t v that the velocity
                 implies, DDIM or DPM-Solver++(2M) on the path alpha = 1 - t, sigma = t (extensions/dpm_solver.py),
                 whose SDE form (--sampler dpmpp_2m_sde) is the reverse SDE with the score -(x_t + (1 - t) v) / t.
How it relates to DDPM: with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), DDPM's z_t = alpha x_0
+ sigma eps divided by (alpha + sigma) is this path at t = sigma / (alpha + sigma), and DDIM's eta = 0
step is exactly an Euler step of this ODE (tests/test_objectives.py checks it).
The network sees the time as 1000 t, the scale its sinusoidal embedding has for DDPM's timesteps.
"""
import torch
import torch.nn.functional as F

from engine import cli
from extensions import dpm_solver, guidance as guided, ode, spacing
from formulations.interface import Formulation

TIMES = ("uniform", "logit_normal")
SPACINGS = ("uniform", "quadratic")  # the sampling grid: t_i = 1 - i/n, or (1 - i/n)^2 (DPM-Solver++'s default)


def add_flags(parser):
    parser.add_argument("--flow_time", default=TIMES[0], choices=TIMES, help="--objective flow and meanflow: the "
                        "training times before the low-noise share, uniform or logit-normal (flow: (0, 1), SD3's; "
                        "meanflow: (-0.4, 1), its paper's; image runs' default)")


class FlowMatching(Formulation):
    """Flow matching as a formulation (formulations/__init__.py): training times, the loss, samplers."""
    SAMPLERS = ode.SAMPLERS + dpm_solver.SAMPLERS
    FLAGS = ("flow_time", "timestep_spacing")
    SAMPLING_FLAGS = ("sampler", "num_inference_steps", "eta", "timestep_spacing")
    DEFAULTS = {"sampler": "dpmpp_2m_sde", "num_inference_steps": 50}  # measured on the 2D sets (docs/formulations.md)
    PAPER = {"flow_time": "logit_normal", "low_noise_fraction": 0.0, "sampler": "euler", "num_inference_steps": 50}

    def __init__(self, config, device="cpu"):
        self.time_distribution = config.get("flow_time", "logit_normal")
        self.low_noise_fraction = config.get("low_noise_fraction", 0.0)
        self.clip_sample = config.get("clip_sample") or None  # clamp the predicted x_0 to [-c, c] when sampling
        self.num_timesteps = config["num_timesteps"]  # --guidance_interval LO HI of T guides LO <= t (T - 1) <= HI
        self.precision = config.get("precision", "fp32")
        if config.get("timestep_spacing") not in (None,) + SPACINGS:
            raise ValueError(f"--timestep_spacing {config['timestep_spacing']} is not one of --objective flow's: "
                             + ", ".join(SPACINGS))

    @staticmethod
    def sampling_error(sampler, num_inference_steps, num_timesteps):  # any number of steps will do
        return cli.sampler_error("flow", sampler, FlowMatching.SAMPLERS)

    def add_noise(self, x_start, noise, t):
        """x_t = (1 - t) x_0 + t eps, t [B] broadcast over the trailing dimensions."""
        t = t.reshape(-1, *([1] * (x_start.dim() - 1)))
        return (1 - t) * x_start + t * noise

    def sample_timesteps(self, n, generator, device="cpu"):
        """Training times [n] in (0, 1): uniform or logit-normal, a share low_noise_fraction in (0, 0.2)."""
        if self.time_distribution == "uniform":
            t = torch.rand(n, generator=generator, device=device)
        else:
            t = torch.sigmoid(torch.randn(n, generator=generator, device=device))  # logit-normal(0, 1)
        if self.low_noise_fraction > 0:
            low = 0.2 * torch.rand(n, generator=generator, device=device)
            t = torch.where(torch.rand(n, generator=generator, device=device) < self.low_noise_fraction, low, t)
        return t

    def loss(self, net, x_start, noise, t, labels=None):
        """|| v_theta(x_t, t) - (eps - x_0) ||^2 over the batch."""
        x_t = self.add_noise(x_start, noise, t)
        with torch.autocast(x_start.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            velocity = net(x_t, 1000 * t) if labels is None else net(x_t, 1000 * t, labels)
        return F.mse_loss(velocity.float(), noise - x_start)

    def velocity(self, model, x, t, labels=None, guidance=None):
        """v_theta(x, t) for a float t > 0, guided where the guidance interval holds t. With clip_sample
        the x_0 it implies, x - t v, is clamped, and v recomputed from it: (x - x_0) / t."""
        inside = guidance is not None and guidance.applies(round(t * (self.num_timesteps - 1)))
        time = torch.full((1,), 1000 * t, device=x.device)
        v = guided.network_output(model, x, time, labels, guidance, inside, self.precision)
        if self.clip_sample is not None:
            v = (x - (x - t * v).clamp(-self.clip_sample, self.clip_sample)) / t
        return v

    @torch.inference_mode()
    def sample(self, model, shape, *, sampler="heun", num_inference_steps=None, eta=None, timestep_spacing=None,
               generator=None, device="cpu", labels=None, guidance=None, trajectory=False):
        """From x_1 ~ N(0, I) of `shape` [B, ...] to x_0 in num_inference_steps steps, spaced evenly in t or
        quadratically: Euler or Heun on the ODE, or DDIM / DPM-Solver++(2M) (eta > 0: stochastic) with the x_0
        the velocity implies."""
        error = self.sampling_error(sampler, num_inference_steps, self.num_timesteps)
        if error or timestep_spacing not in (None,) + SPACINGS:
            raise ValueError(error or f"timestep_spacing {timestep_spacing!r} is not one of {SPACINGS}")
        x = torch.randn(shape, generator=generator, device=device)                    # x_1 ~ N(0, I)
        path = [x] if trajectory else None
        x = self.solve(model, x, sampler, num_inference_steps, eta, timestep_spacing, generator, labels, guidance, path)
        return torch.stack(path) if trajectory else x

    def solve(self, model, x, sampler, num_inference_steps=None, eta=None, timestep_spacing=None, generator=None,
              labels=None, guidance=None, path=None):
        """x_0 from a given x_1 (reflow's pairs start here); path: a list that gets every step's x."""
        ramp = torch.linspace(1, 0, (num_inference_steps or self.DEFAULTS["num_inference_steps"]) + 1, dtype=torch.float64)
        quadratic = (timestep_spacing or spacing.DEFAULT.get(sampler, "uniform")) == "quadratic"  # DPM-Solver++'s
        grid = (ramp ** (2 if quadratic else 1)).tolist()
        if sampler in ode.SAMPLERS:
            x = ode.solve(lambda x, t: self.velocity(model, x, t, labels, guidance), x, grid, sampler, path)
        else:
            def denoise(x, i):  # x_0 = x_t - t v
                return x - grid[i] * self.velocity(model, x, grid[i], labels, guidance)
            x = dpm_solver.solve(denoise, x, [(1 - t, t) for t in grid], sampler, dpm_solver.noise_level(sampler, eta),
                                 generator, path)
        return x
