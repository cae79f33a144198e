"""Flow matching with the straight path (rectified flow): the same denoiser, another formulation.

    python ddpm.py --dataset dino --objective flow            # Heun, 25 steps (49 network evaluations)

Lipman et al. 2023 ("Flow Matching for Generative Modeling") and Liu et al. 2023 ("Flow Straight and
Fast"); the timestep distribution of Esser et al. 2024 ("Scaling Rectified Flow Transformers", SD3).
Time runs from t = 0 (data) to t = 1 (noise):
  the path       x_t = (1 - t) x_0 + t eps,  eps ~ N(0, I)                          (SD3 eq. 2-3)
  the target     the velocity dx_t/dt = eps - x_0; the network v_theta(x_t, t) regresses it:
                 L = E || v_theta(x_t, t) - (eps - x_0) ||^2                         (SD3 eq. 6)
  the times      t ~ logit-normal(0, 1): t = sigmoid(n), n ~ N(0, 1), which puts most of training
                 in the middle of the path (SD3 eq. 19, its default; --flow_time uniform: t ~ U(0, 1))
  sampling       from x_1 ~ N(0, I) solve the ODE dx/dt = v_theta(x, t) back to t = 0 with Euler or
                 Heun steps (extensions/ode.py) on a grid even in t.
How it relates to DDPM: with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), DDPM's z_t = alpha x_0
+ sigma eps divided by (alpha + sigma) is this path at t = sigma / (alpha + sigma), and DDIM's eta = 0
step is exactly an Euler step of this ODE (tests/test_objectives.py checks it).
The network sees the time as 1000 t, the scale its sinusoidal embedding has for DDPM's timesteps.
"""
import torch
import torch.nn.functional as F

from extensions import guidance as guided, ode

TIMES = ("logit_normal", "uniform")
DEFAULTS = {"sampler": "heun", "num_inference_steps": 25}  # for the flags not given: 49 evaluations a sample


def add_flags(parser):
    parser.add_argument("--flow_time", default="logit_normal", choices=TIMES,
                        help="--objective flow: the training times, logit-normal(0, 1) (SD3's) or uniform")


class FlowMatching:
    """What ddpm.train and ddpm.sample ask of a formulation: training times, the loss, a sampler."""

    def __init__(self, config, device="cpu"):
        self.time_distribution = config.get("flow_time", "logit_normal")
        self.clip_sample = config.get("clip_sample") or None  # clamp the predicted x_0 to [-c, c] when sampling
        self.num_timesteps = config["num_timesteps"]  # --guidance_interval LO HI of T guides LO <= t (T - 1) <= HI

    def add_noise(self, x_start, noise, t):
        """x_t = (1 - t) x_0 + t eps, t [B] broadcast over the trailing dimensions."""
        t = t.reshape(-1, *([1] * (x_start.dim() - 1)))
        return (1 - t) * x_start + t * noise

    def sample_timesteps(self, n, generator, device="cpu"):
        """Training times [n] in (0, 1)."""
        if self.time_distribution == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))  # logit-normal(0, 1)

    def loss(self, net, x_start, noise, t, labels=None, precision="fp32"):
        """|| v_theta(x_t, t) - (eps - x_0) ||^2 over the batch."""
        x_t = self.add_noise(x_start, noise, t)
        with torch.autocast(x_start.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            velocity = net(x_t, 1000 * t) if labels is None else net(x_t, 1000 * t, labels)
        return F.mse_loss(velocity.float(), noise - x_start)

    def velocity(self, model, x, t, labels=None, guidance=None, precision="fp32"):
        """v_theta(x, t) for a float t > 0, guided where the guidance interval holds t. With clip_sample
        the x_0 it implies, x - t v, is clamped, and v recomputed from it: (x - x_0) / t."""
        inside = guidance is not None and guidance.applies(round(t * (self.num_timesteps - 1)))
        time = torch.full((1,), 1000 * t, device=x.device)
        v = guided.network_output(model, x, time, labels, guidance, inside, precision)
        if self.clip_sample is not None:
            v = (x - (x - t * v).clamp(-self.clip_sample, self.clip_sample)) / t
        return v

    @torch.inference_mode()
    def sample(self, model, shape, *, sampler="heun", num_inference_steps=None, generator=None, device="cpu",
               labels=None, guidance=None, precision="fp32", trajectory=False, **ddpm_only):
        """From x_1 ~ N(0, I) of `shape` [B, ...] to x_0 in num_inference_steps Euler or Heun steps, evenly
        spaced in t; the keywords of DDPM's samplers (eta, timestep_spacing) do nothing here."""
        steps = num_inference_steps or DEFAULTS["num_inference_steps"]
        x = torch.randn(shape, generator=generator, device=device)                    # x_1 ~ N(0, I)
        path = [x] if trajectory else None
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        x = ode.solve(lambda x, t: self.velocity(model, x, t, labels, guidance, precision), x, grid, sampler, path)
        return torch.stack(path) if trajectory else x
