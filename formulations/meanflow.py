"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): one network evaluation per sample.

    python ddpm.py --dataset dino --objective meanflow                  # frames at 1 evaluation
    python sample.py exps/base --num_inference_steps 2                  # 2 steps along the average velocity

The path is flow matching's (flow.py): z_t = (1 - t) x + t eps, t = 0 data, t = 1 noise, velocity v = eps - x.
Flow matching learns the instantaneous velocity v(z_t, t); MeanFlow learns the AVERAGE velocity over [r, t]:
  average velocity  u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds                            (their eq. 3)
                    so that one step lands exactly: z_r = z_t - (t - r) u(z_t, r, t)           (eq. 12)
  the identity      u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)   (d/dt of (t - r) u = int_r^t v; eq. 6)
                    d/dt u = v . d_z u + d_t u: the total derivative along the path         (eq. 7-8)
  the loss          || u_theta(z_t, r, t) - sg(u_tgt) ||^2,  u_tgt = v - (t - r)(v . d_z u_theta + d_t u_theta)
                    (eq. 9-11), v the conditional velocity eps - x (eq. 11), the bracket ONE forward-mode
                    Jacobian-vector product of u_theta with the tangent (v, 0, 1) in (z, r, t) (torch.func.jvp)
  its weighting     sg(w) ||Delta||^2 with w = 1 / (||Delta||^2 + c)^p, c = 1e-3: their adaptive loss, p = 1 theirs,
                    --weight_power; 0, the plain squared error, is this project's 2D default (measured)
  the times         t, r: two draws (logit-normal(-0.4, 1), their default, or uniform), t the larger; only a share
                    --interval_fraction keeps r < t: the rest have r = t, where u = v and the loss is flow matching's
  sampling          z_0 = z_1 - u(z_1, 0, 1): one evaluation (eq. 12 at r = 0, t = 1); or n steps t_i = 1 - i/n
                    along the average velocity (--sampler average),
                    z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z_{t_i}, t_{i+1}, t_i);
                    or Euler / Heun on the instantaneous velocity u(z, t, t) = v (extensions/ode.py)
The network sees the two times as (10 t, 10 (t - r)) (TIME_SCALE; flow matching's 1000 t makes d_t u a thousand
times larger and the training diverge), each with its own embedding (the MLP's and the U-Net's time_inputs 2, which
prepare() puts in the config). tests/test_one_step.py checks the target against a Gaussian's closed form.
"""
import torch

from engine import cli
from extensions import guidance as guided, ode
from formulations.interface import Formulation

SAMPLERS = ("average",) + ode.SAMPLERS
TIME_MEAN, TIME_STD = -0.4, 1.0  # the logit-normal of (t, r): their best (Table 1)
ADAPTIVE_EPS = 1e-3  # c of w = 1 / (||Delta||^2 + c)^p
TIME_SCALE = 10  # the network sees (10 t, 10 (t - r)): smooth in t, so d_t u stays tame (docs/one_step.md)


def add_flags(parser):
    parser.add_argument("--interval_fraction", type=cli.closed_unit_interval, default=None,
                        help="--objective meanflow: the share of training pairs with r < t, the rest r = t (flow "
                             f"matching) (default: {MeanFlow.DEFAULTS['interval_fraction']:g}; its paper's "
                             f"{MeanFlow.PAPER['interval_fraction']:g})")
    parser.add_argument("--weight_power", type=cli.nonnegative_float, default=None,
                        help="--objective meanflow: p of the adaptive loss weight 1 / (||error||^2 + 1e-3)^p; 0: the "
                             f"plain squared error (default: {MeanFlow.DEFAULTS['weight_power']:g}; its paper's "
                             f"{MeanFlow.PAPER['weight_power']:g})")


def average_velocity(net, z, r, t, labels=None, precision="fp32"):
    """u_theta(z, r, t) for z [B, ...], r and t [B] (or [1], shared by the batch): the network sees (s t, s (t - r))."""
    times = TIME_SCALE * torch.stack([t, t - r], dim=-1)  # [B, 2]
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        u = net(z, times) if labels is None else net(z, times, labels)
    return u.float() if u.dtype.itemsize < 4 else u  # bfloat16 back to float32; float64 stays


def meanflow_target(u, z, r, t, v):
    """u_tgt = v - (t - r) (v . d_z u + d_t u) (eq. 10-11) for any average velocity u(z, r, t), v [B, ...] the velocity
    at (z, t): the bracket is one JVP of u with the tangent (dz, dr, dt) = (v, 0, 1) (eq. 8)."""
    _, du_dt = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return v - expand(t - r, z) * du_dt


def expand(t, x):  # t [B] shaped [B, 1, ...] to broadcast against x [B, ...]
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class MeanFlow(Formulation):
    """MeanFlow as a formulation (formulations/interface.py): training times (t, r), the loss, samplers."""
    SAMPLERS = SAMPLERS
    FLAGS = ("flow_time", "interval_fraction", "weight_power")
    SAMPLING_FLAGS = ("sampler", "num_inference_steps")
    # measured on the 2D sets (docs/one_step.md); its paper's below
    DEFAULTS = {"sampler": "average", "num_inference_steps": 1, "interval_fraction": 0.25, "weight_power": 0.0,
                "low_noise_fraction": 0.0, "input_scale": 25.0}
    PAPER = {"flow_time": "logit_normal", "low_noise_fraction": 0.0, "interval_fraction": 0.25, "weight_power": 1.0,
             "sampler": "average", "num_inference_steps": 1}

    def __init__(self, config, device="cpu"):
        self.time_distribution = config.get("flow_time", "logit_normal")
        self.low_noise_fraction = config.get("low_noise_fraction", 0.0)
        self.interval_fraction = config.get("interval_fraction") or 0.0
        self.weight_power = config.get("weight_power") or 0.0
        self.clip_sample = config.get("clip_sample") or None  # clamp the sample to [-c, c]
        self.num_timesteps = config["num_timesteps"]  # --guidance_interval LO HI of T guides LO <= t (T - 1) <= HI
        self.precision = config.get("precision", "fp32")

    @staticmethod
    def prepare(config, given=()):
        return {**config, "time_inputs": 2}  # the network sees (t, t - r): build_model reads it from config.json

    @staticmethod
    def sampling_error(sampler, num_inference_steps, num_timesteps):  # any number of steps will do
        return cli.sampler_error("meanflow", sampler, SAMPLERS)

    def sample_timesteps(self, n, generator, device="cpu"):
        """Training times [n, 2]: (t, r), r <= t, r = t but for a share interval_fraction; a share
        low_noise_fraction of the draws from (0, 0.2) first, as flow.py draws its t."""
        def draw():
            if self.time_distribution == "uniform":
                s = torch.rand(n, generator=generator, device=device)
            else:  # logit-normal(TIME_MEAN, TIME_STD)
                s = torch.sigmoid(TIME_MEAN + TIME_STD * torch.randn(n, generator=generator, device=device))
            if self.low_noise_fraction > 0:
                low = 0.2 * torch.rand(n, generator=generator, device=device)
                s = torch.where(torch.rand(n, generator=generator, device=device) < self.low_noise_fraction, low, s)
            return s
        a, b = draw(), draw()
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r = torch.where(torch.rand(n, generator=generator, device=device) < self.interval_fraction, r, t)
        return torch.stack([t, r], dim=1)

    def loss(self, net, x_start, noise, t, labels=None):
        """The adaptively weighted || u_theta(z_t, r, t) - sg(u_tgt) ||^2 over the batch, t [B, 2] = (t, r)."""
        t, r = t[:, 0], t[:, 1]
        z = (1 - expand(t, x_start)) * x_start + expand(t, x_start) * noise   # the path, flow.py's
        v = noise - x_start                                                 # dz_t/dt given x_0 and eps
        plain = getattr(net, "module", net)  # under DistributedDataParallel the target uses the model itself
        with torch.no_grad():  # the target carries no gradient (sg); in float32 (bf16 autocast and the JVP of a
            target = meanflow_target(lambda z, r, t: average_velocity(plain, z, r, t, labels), z, r, t, v)  # conv clash)
        error = (average_velocity(net, z, r, t, labels, self.precision) - target).flatten(1)
        squared = error.pow(2).sum(dim=1)                                   # ||Delta||^2 per example
        weight = (squared.detach() + ADAPTIVE_EPS) ** -self.weight_power  # 1 where p = 0
        return (weight * squared).mean()

    def step_velocity(self, model, z, r, t, labels=None, guidance=None):
        """u_theta(z, r, t) for floats r <= t, one evaluation (guided: two), as the samplers use it."""
        inside = guidance is not None and guidance.applies(round(t * (self.num_timesteps - 1)))
        times = TIME_SCALE * torch.tensor([[t, t - r]], device=z.device, dtype=torch.float32)  # [1, 2]
        return guided.network_output(model, z, times, labels, guidance, inside, self.precision)

    @torch.inference_mode()
    def sample(self, model, shape, *, sampler="average", num_inference_steps=None, generator=None, device="cpu",
               labels=None, guidance=None, trajectory=False):
        """From z_1 ~ N(0, I) of `shape` [B, ...] to z_0 in num_inference_steps steps even in t: along the average
        velocity (one evaluation a step, whatever its length), or Euler / Heun on u(z, t, t) = v."""
        error = self.sampling_error(sampler, num_inference_steps, self.num_timesteps)
        if error:
            raise ValueError(error)
        z = torch.randn(shape, generator=generator, device=device)                    # z_1 ~ N(0, I)
        path = [z] if trajectory else None
        grid = torch.linspace(1, 0, (num_inference_steps or self.DEFAULTS["num_inference_steps"]) + 1,
                              dtype=torch.float64).tolist()
        if sampler in ode.SAMPLERS:
            z = ode.solve(lambda z, t: self.step_velocity(model, z, t, t, labels, guidance), z, grid, sampler, path)
        else:
            for t, r in zip(grid[:-1], grid[1:]):
                z = z - (t - r) * self.step_velocity(model, z, r, t, labels, guidance)   # z_r, eq. 12
                if trajectory:
                    path.append(z)
        if self.clip_sample is not None:
            z = z.clamp(-self.clip_sample, self.clip_sample)
            if trajectory:
                path[-1] = z
        return torch.stack(path) if trajectory else z
