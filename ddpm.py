"""tiny-diffusion: denoising diffusion probabilistic models (Ho et al. 2020) in one file.

    python ddpm.py --dataset dino            # train, then look at exps/base/images/

Where things live (equation numbers are those of the DDPM paper, arXiv:2006.11239):
  NoiseScheduler.add_noise     forward process q(x_t | x_0)                  eq. 4
  NoiseScheduler.q_posterior   posterior q(x_{t-1} | x_t, x_0)               eq. 6-7
  diffusion_loss               the loss || eps - eps_theta(x_t, t) ||^2     eq. 14 (Algorithm 1)
  NoiseScheduler.step          one ancestral reverse step                    eq. 11 (Algorithm 2)
  NoiseScheduler.ddim_step     one DDIM step (Song et al. 2021, eq. 12)
  NoiseScheduler.dpm_solver_step  one DPM-Solver++(2M) step (Lu et al. 2022), ODE or SDE
  sample()                     the reverse process, for every sampler
  model_prediction             guidance: classifier-free (Ho & Salimans 2022) or autoguidance
  train()                      the training loop, Algorithm 1

Every tensor of data may have any shape [B, ...]: the schedule's per-timestep
coefficients are broadcast over the trailing dimensions. The engineering around the
core (compiled step, frame worker, torchrun, checkpoints, image data) lives in the small
modules named where it is called.
"""
import argparse
import copy
import functools
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import compiled_step
import datasets
import ddp
import experiment
import image_defaults
import timestep_spacing
from checkpoints import Checkpointer, CheckpointError, StopRequest
from frames import Frames
from positional_embeddings import RandomDirectionEmbedding, make_embedding

# ---------------------------------------------------------------------------------------
# The noise schedule, the forward process and the reverse steps
# ---------------------------------------------------------------------------------------

SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid")
PREDICTIONS = ("epsilon", "x0", "v")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
SPACINGS = ("uniform",) + timestep_spacing.SPACINGS
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmpp_2m": "quadratic", "dpmpp_2m_sde": "quadratic"}
DEFAULT_ETA = {"ddim": 0.0, "dpmpp_2m_sde": 0.8}  # measured: docs/samplers.md


def default_beta_range(num_timesteps):
    """DDPM's betas 1e-4 .. 0.02 were chosen for T = 1000. The last one, rescaled by 1000 / T
    (as Improved DDPM does), makes the forward process end in noise for any T: with T = 50
    the unscaled 0.02 stops at alpha_bar_T = 0.60, far from the N(0, I) that sampling starts
    from. The first one stays 1e-4: the smallest noise level sets the finest detail drawn."""
    return 1e-4, min(0.02 * 1000 / num_timesteps, 0.999)


def make_betas(schedule, num_timesteps, beta_start, beta_end):
    T = num_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "quadratic":  # linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    if schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


class NoiseScheduler:
    """The variance schedule beta_1..beta_T and everything derived from it.

    Timesteps are 0-based here: t = 0 .. T-1 stands for the paper's 1 .. T.
    """

    def __init__(self, num_timesteps=50, beta_schedule="quadratic", beta_start=None, beta_end=None,
                 prediction="epsilon", clip_sample=None, device="cpu"):
        if beta_start is None or beta_end is None:
            default_start, default_end = default_beta_range(num_timesteps)
            beta_start = default_start if beta_start is None else beta_start
            beta_end = default_end if beta_end is None else beta_end
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.clip_sample = clip_sample  # clamp predicted x0 to [-c, c] when sampling

        # computed in float64, stored in float32
        betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)                       # alpha_bar_t
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)  # alpha_bar_{t-1}, 1 at t=0

        def buffer(x):
            return x.to(device=device, dtype=torch.float32)

        self.betas = buffer(betas)
        self.alphas = buffer(alphas)
        self.alphas_cumprod = buffer(alphas_cumprod)
        self.alphas_cumprod_prev = buffer(alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = buffer(alphas_cumprod.sqrt())
        self.sqrt_one_minus_alphas_cumprod = buffer((1 - alphas_cumprod).sqrt())
        # eq. 7: posterior mean = coef1 * x_0 + coef2 * x_t, variance = beta_tilde_t
        self.posterior_mean_coef1 = buffer(betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod))
        self.posterior_mean_coef2 = buffer((1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod))
        self.posterior_variance = buffer(betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod))
        # DPM-Solver's time variable: lambda_t = log(alpha_t / sigma_t) = log SNR_t / 2, falling in t
        self.log_snr = (alphas_cumprod.log() - (1 - alphas_cumprod).log()) / 2              # float64 [T]

    @staticmethod
    def _at(coefficients, t, x):
        """coefficients[t] shaped [B, 1, 1, ...] to broadcast against x [B, ...]."""
        return coefficients[t].reshape(-1, *([1] * (x.dim() - 1)))

    # -- forward process -----------------------------------------------------------------
    def add_noise(self, x_start, noise, t):
        """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), eq. 4."""
        return (self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def reconstruct_x0(self, x_t, t, noise):
        """Invert eq. 4: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return ((x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * noise)
                / self._at(self.sqrt_alphas_cumprod, t, x_t))

    def q_posterior(self, x_start, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0), eq. 6-7."""
        mean = (self._at(self.posterior_mean_coef1, t, x_t) * x_start
                + self._at(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._at(self.posterior_variance, t, x_t)

    # -- what the network predicts ---------------------------------------------------------
    def training_target(self, x_start, noise, t):
        """The regression target of the network for the chosen parameterisation."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "x0":
            return x_start
        # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022)
        return (self._at(self.sqrt_alphas_cumprod, t, x_start) * noise
                - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)

    def predict_x0_and_eps(self, model_output, x_t, t):
        """Both x_0 and eps implied by the network's output at (x_t, t)."""
        sqrt_ab = self._at(self.sqrt_alphas_cumprod, t, x_t)
        sqrt_1m_ab = self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction == "epsilon":
            eps = model_output
            x0 = (x_t - sqrt_1m_ab * eps) / sqrt_ab
        elif self.prediction == "x0":
            x0 = model_output
            eps = (x_t - sqrt_ab * x0) / sqrt_1m_ab
        else:
            x0 = sqrt_ab * x_t - sqrt_1m_ab * model_output
            eps = sqrt_1m_ab * x_t + sqrt_ab * model_output
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            eps = (x_t - sqrt_ab * x0) / sqrt_1m_ab
        return x0, eps

    def min_snr_weight(self, t, gamma):
        """Min-SNR-gamma loss weights [B] (Hang et al. 2023): the loss of the x_0 error weighted by
        min(SNR_t, gamma), SNR_t = alpha_bar_t / (1 - alpha_bar_t), written for the network's target:
        the eps error is the x_0 error times SNR_t, the v error times SNR_t + 1. Low-noise steps,
        whose x_0 error is tiny anyway, then stop taking a large share of the gradient."""
        alpha_bar = self.alphas_cumprod[t]
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=gamma)
        if self.prediction == "epsilon":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1)
        return clipped

    # -- reverse process ---------------------------------------------------------------------
    def step(self, model_output, t, x_t, noise):
        """One ancestral step x_t -> x_{t-1} (Algorithm 2): a draw from the posterior
        q(x_{t-1} | x_t, x_0) with x_0 predicted by the network; no noise at t = 0.
        With epsilon-prediction this is eq. 11 written through x_0."""
        x0, _ = self.predict_x0_and_eps(model_output, x_t, t)
        mean, variance = self.q_posterior(x0, x_t, t)
        return mean + variance.sqrt() * noise  # variance is 0 at t = 0

    def ddim_step(self, model_output, t, prev_t, x_t, eta, noise, direction_output=None):
        """One DDIM step x_t -> x_{prev_t} (Song et al. 2021, eq. 12), prev_t < t; prev_t = -1
        means x_0. eta = 0 is deterministic; eta = 1 with prev_t = t - 1 is the DDPM step.
        direction_output, if given, supplies the eps of the step's noise direction; x_0 still comes
        from model_output (guidance on x_0 only: `sample`'s guide_x0_only)."""
        x0, eps = self.predict_x0_and_eps(model_output, x_t, t)
        if direction_output is not None:
            _, eps = self.predict_x0_and_eps(direction_output, x_t, t)
        alpha_bar_prev = (self._at(self.alphas_cumprod, prev_t, x_t) if prev_t[0] >= 0
                          else torch.ones_like(self._at(self.alphas_cumprod, t, x_t)))
        return self._ddim_update(x0, eps, self._at(self.alphas_cumprod, t, x_t), alpha_bar_prev, eta, noise)

    @staticmethod
    def _ddim_update(x0, eps, alpha_bar, alpha_bar_prev, eta, noise):
        # eq. 16: sigma_t(eta)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
        return alpha_bar_prev.sqrt() * x0 + direction + sigma * noise

    def dpm_solver_step(self, x0, t, prev_t, x_t, last=None, eta=0.0, noise=None):
        """One DPM-Solver++(2M) step x_t -> x_{prev_t} (Lu et al. 2022, "DPM-Solver++", Algorithm 2),
        t and prev_t ints. x0 is the network's x_0 at t; last = (t', x0') of the step before.
        Their update is DDIM's (eta = 0) on x0 extrapolated half a step in lambda_t = log(alpha_t /
        sigma_t), alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar):
            D = x0 + (x0 - x0') / (2 r),  r = (lambda_t - lambda_t') / (lambda_{prev_t} - lambda_t)
        last=None gives the first-order step (DPM-Solver-1 is DDIM). With eta = 1 and noise, DDIM's
        eta = 1 on the same D: their SDE-DPM-Solver++(2M), whose first-order step is the DDPM step;
        0 < eta < 1 lies between. prev_t = -1 returns x0 (the last step, first order)."""
        if prev_t < 0:
            return x0
        if last is not None:
            last_t, last_x0 = last
            r = float((self.log_snr[t] - self.log_snr[last_t]) / (self.log_snr[prev_t] - self.log_snr[t]))
            x0 = x0 + (x0 - last_x0) / (2 * r)
        alpha_bar, alpha_bar_prev = self.alphas_cumprod[t], self.alphas_cumprod[prev_t]
        eps = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()  # the eps that goes with D
        return self._ddim_update(x0, eps, alpha_bar, alpha_bar_prev, eta, 0.0 if noise is None else noise)

    def inference_timesteps(self, num_inference_steps=None, spacing="uniform"):
        """Descending timesteps to visit: all T, or n of them evenly spaced in t ("uniform"), or
        spaced to put more of them at low noise (timestep_spacing.py)."""
        T = self.num_timesteps
        n = T if num_inference_steps is None else num_inference_steps
        if spacing == "uniform" or n >= T:
            return torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long().tolist()
        return timestep_spacing.spaced(self.log_snr, n, spacing)


def sampling_error(sampler, num_inference_steps, num_timesteps):
    """Why a sampler can't take these steps, in one line; None if it can."""
    if num_inference_steps is not None and num_inference_steps > num_timesteps:
        return f"--num_inference_steps {num_inference_steps} exceeds the diffusion's T = {num_timesteps} timesteps"
    if sampler == "ddpm" and num_inference_steps not in (None, num_timesteps):
        return "the ddpm sampler walks every timestep; use another --sampler for fewer --num_inference_steps"
    return None


def guidance_interval_error(interval, num_timesteps):
    """Why the guided steps `interval` (lo, hi) don't fit T timesteps, in one line; None if they do."""
    if interval and not 0 <= interval[0] <= interval[1] < num_timesteps:
        return f"--guidance_interval needs 0 <= LO <= HI < T = {num_timesteps}, got {list(interval)}"
    return None


@torch.inference_mode()  # no autograd bookkeeping at all: a few % faster than no_grad
def sample(model, scheduler, shape, *, sampler="ddpm", num_inference_steps=None, eta=None, timestep_spacing=None,
           generator=None, device="cpu", labels=None, guidance_scale=1.0, guide=None, guidance_interval=None,
           trajectory=False, precision="fp32", guide_x0_only=False):
    """Run the reverse process from x_T ~ N(0, I) of `shape` [B, ...] and return x_0.

    sampler "ddpm" walks all T steps with `step` (num_inference_steps must be None or T);
    "ddim" walks num_inference_steps with `ddim_step` and its eta; "dpmpp_2m" and "dpmpp_2m_sde"
    (with its eta) with `dpm_solver_step`. Each visits the timesteps `timestep_spacing` picks, one
    network evaluation a step (None: the sampler's DEFAULT_SPACING, DEFAULT_ETA). With `labels` [B] the
    model is class-conditional and guidance_scale w mixes eps = eps_null + w (eps_label - eps_null)
    (classifier-free guidance, Ho & Salimans 2022); without labels, a `guide` model (a weaker version
    of the model) takes eps_null's place (autoguidance). guidance_interval (lo, hi) guides only the
    steps with lo <= t <= hi, one network evaluation elsewhere (Kynkäänniemi et al. 2024: guidance at
    the highest noise levels costs variety, at the lowest it does little). trajectory=True returns
    every x_t too. guide_x0_only: a guided ddim step takes x_0 from the guided prediction but the eps
    of its noise direction from the model's own (after CFG++, Chung et al. 2024; docs/mnist.md).
    precision "bf16" runs the network in bfloat16 (autocast); the update itself stays in fp32.
    """
    error = sampling_error(sampler, num_inference_steps, scheduler.num_timesteps)
    if error:
        raise ValueError(error)
    x = torch.randn(shape, generator=generator, device=device)
    steps = [x] if trajectory else None
    timesteps = scheduler.inference_timesteps(num_inference_steps, timestep_spacing or DEFAULT_SPACING[sampler])
    eta = DEFAULT_ETA.get(sampler, 0.0) if eta is None else eta
    last = None  # (t, x0) of the step before, for DPM-Solver++(2M)
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            # the network gets t as [1]: one timestep for the whole batch (the MLP embeds it once)
            guided = guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1]
            model_output, own_output = model_prediction(model, x, t_batch[:1], labels,
                                                        guidance_scale if guided else 1.0, guide, own=True)
        # guide_x0_only: a guided step's noise direction from the model's own output (unguided: the same output)
        direction = own_output.float() if guide_x0_only and own_output is not model_output else None
        model_output = model_output.float()
        stochastic = t > 0 and sampler != "dpmpp_2m"  # ddpm and ddim draw noise at eta = 0 too, as they always did
        noise = torch.randn(shape, generator=generator, device=device) if stochastic else torch.zeros_like(x)
        if sampler == "ddpm":
            x = scheduler.step(model_output, t_batch, x, noise)
        elif sampler == "ddim":
            prev_batch = torch.full((shape[0],), prev_t, device=device, dtype=torch.long)
            x = scheduler.ddim_step(model_output, t_batch, prev_batch, x, eta, noise, direction)
        else:  # first order at the first step (no history yet)
            x0, _ = scheduler.predict_x0_and_eps(model_output, x, t_batch)
            x = scheduler.dpm_solver_step(x0, t, prev_t, x, last, eta if sampler == "dpmpp_2m_sde" else 0.0, noise)
            last = (t, x0)
        if trajectory:
            steps.append(x)
    return torch.stack(steps) if trajectory else x


def model_prediction(model, x, t, labels=None, guidance_scale=1.0, guide=None, own=False):
    """The network's output at (x, t), guided when guidance_scale w != 1: out = weak + w (out - weak),
    which pushes the prediction away from a weaker one. With labels, the weaker one is the model's
    own without the label (classifier-free guidance); without, the `guide` model's: the same network
    earlier in training, whose errors the guidance steers away from (autoguidance, Karras et al. 2024).
    own=True returns (guided, the model's own output: with the label, without the guide)."""
    if labels is None:
        if guide is None or guidance_scale == 1.0:
            out = model(x, t)
            return (out, out) if own else out
        weak, strong = guide(x, t), model(x, t)
    elif guidance_scale == 1.0:
        out = model(x, t, labels)
        return (out, out) if own else out
    else:
        null = torch.full_like(labels, model.null_label)
        t = t.expand(len(x))  # t may be [1], shared by the batch
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        strong, weak = out.chunk(2)
    guided = weak + guidance_scale * (strong - weak)
    return (guided, strong) if own else guided


# ---------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.linear = nn.Linear(size, size)

    def forward(self, x):  # a residual block: x + GELU(Linear(x))
        return x + F.gelu(self.linear(x))


class MLP(nn.Module):
    """Predicts the noise in 2D points: embed x, y and t, concatenate, then an MLP."""

    def __init__(self, hidden_size=128, hidden_layers=3, embedding_size=128, num_timesteps=50,
                 time_embedding="sinusoidal", input_embedding="sinusoidal", input_scale=25.0):
        super().__init__()
        # sinusoidal input embeddings are Fourier features of the coordinates: the largest
        # frequency, input_scale, sets the finest detail the MLP can draw (Tancik et al. 2020)
        self.time_embedding = make_embedding(time_embedding, embedding_size, max_value=num_timesteps)
        if input_embedding == "fourier":  # one embedding of the point, as wide as the two below
            self.input_embedding = RandomDirectionEmbedding(2 * embedding_size, scale=input_scale)
            in_size = self.input_embedding.output_size + self.time_embedding.output_size
        else:
            self.input_embedding_x = make_embedding(input_embedding, embedding_size, scale=input_scale)
            self.input_embedding_y = make_embedding(input_embedding, embedding_size, scale=input_scale)
            in_size = (self.input_embedding_x.output_size + self.input_embedding_y.output_size
                       + self.time_embedding.output_size)
        layers = [nn.Linear(in_size, hidden_size), nn.GELU()]
        layers += [Block(hidden_size) for _ in range(hidden_layers)]
        layers.append(nn.Linear(hidden_size, 2))
        self.joint_mlp = nn.Sequential(*layers)

    def point_features(self, x):  # [B, 2] -> [B, features]
        if hasattr(self, "input_embedding"):
            return self.input_embedding(x)
        return torch.cat([self.input_embedding_x(x[:, 0]), self.input_embedding_y(x[:, 1])], dim=-1)

    def forward(self, x, t):  # x: [B, 2], t: [B], or [1] for one timestep shared by all B -> [B, 2]
        point = self.point_features(x)                                       # [B, P]
        if len(t) > 1:  # training: a timestep per point
            return self.joint_mlp(torch.cat([point, self.time_embedding(t)], dim=-1))
        # One timestep for the whole batch (every sampling step). The first layer on [point; time]
        # is W_point @ point + (W_time @ time + b): written as that sum, the time half is embedded
        # and multiplied once, not B times. Training keeps the concatenation, which compiles to a
        # faster step (docs/speed.md).
        first, P = self.joint_mlp[0], point.shape[1]
        time_term = F.linear(self.time_embedding(t), first.weight[:, P:], first.bias)  # [1, H]
        h = torch.addmm(time_term, point, first.weight[:, :P].T)            # [B, H]
        return self.joint_mlp[1:](h)


def build_model(config):
    """The network described by a config dict (as saved in config.json)."""
    if datasets.is_image_dataset(config["dataset"]):
        import unet
        return unet.build_unet(config)
    return MLP(config["hidden_size"], config["hidden_layers"], config["embedding_size"],
               config["num_timesteps"], config["time_embedding"], config["input_embedding"],
               config.get("input_scale", 25.0))


def build_scheduler(config, device="cpu"):
    """The NoiseScheduler described by a config dict; configs from before --clip_sample clipped
    images at 1 and 2D points not at all."""
    clip = config.get("clip_sample", 1.0 if datasets.is_image_dataset(config["dataset"]) else 0.0)
    return NoiseScheduler(config["num_timesteps"], config["beta_schedule"], config.get("beta_start"),
                          config.get("beta_end"), config.get("prediction", "epsilon"), clip or None, device)


# ---------------------------------------------------------------------------------------
# The loss and one optimizer step
# ---------------------------------------------------------------------------------------

def sample_timesteps(n, num_timesteps, low_noise_fraction, generator, device="cpu"):
    """Training timesteps [n]: uniform over 0..T-1 as in Algorithm 1, except that a share
    `low_noise_fraction` of them is drawn uniformly from the lowest fifth, ceil(T/5) steps.
    Uniform t spends most of training at high noise; the 2D samples' sharpness is set at the
    lowest noise levels, where the network must snap a point onto the data (docs/defaults.md)."""
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
    if low_noise_fraction > 0:
        low = torch.randint(0, math.ceil(num_timesteps / 5), (n,), generator=generator, device=device)
        t = torch.where(torch.rand(n, generator=generator, device=device) < low_noise_fraction, low, t)
    return t


def diffusion_loss(net, scheduler, x_start, noise, t, labels=None, precision="fp32", min_snr_gamma=0.0):
    """The loss of Algorithm 1 on a batch: noise it (eq. 4), regress the target (eq. 14).
    `net` is anything called as net(x_t, t[, labels]): the model, its DistributedDataParallel
    wrapper, or the model with other weights (compiled_step.py)."""
    x_t = scheduler.add_noise(x_start, noise, t)                     # forward process, eq. 4
    with torch.autocast(x_start.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        prediction = net(x_t, t) if labels is None else net(x_t, t, labels)
    target = scheduler.training_target(x_start, noise, t)
    if min_snr_gamma:  # per-example squared error, weighted by the timestep
        squared_error = (prediction.float() - target).square().flatten(1).mean(1)
        return (scheduler.min_snr_weight(t, min_snr_gamma) * squared_error).mean()
    return F.mse_loss(prediction.float(), target)                    # eq. 14, the simple loss


def training_step(net, scheduler, optimizer, x_start, noise, t, labels=None, precision="fp32", min_snr_gamma=0.0):
    """One optimizer step: the loss, its gradient, clipping to norm 1, an AdamW update."""
    loss = diffusion_loss(net, scheduler, x_start, noise, t, labels, precision, min_snr_gamma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()                                                  # DDP averages gradients here
    nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
    optimizer.step()
    return loss.detach()


def learning_rate_at(step, total_steps, config):
    """--lr_schedule: "constant", or "cosine": from learning_rate down to 0 over the run
    (Loshchilov & Hutter 2017), so the last steps make small, precise moves."""
    if config.get("lr_schedule", "constant") == "constant":
        return config["learning_rate"]
    return config["learning_rate"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def ema_decay_at(step, decay):
    """EMA warm-up: the decay (1 + step) / (10 + step) until it reaches `decay` (at step 9 / (1 - decay) - 10).
    Until then the EMA is a power average: step s's weights count about s^8, centred 10% of the steps
    back (a 5,670-step image run never reaches 0.999: docs/mnist.md)."""
    return min(decay, (1 + step) / (10 + step))


# ---------------------------------------------------------------------------------------
# Training: Algorithm 1
# ---------------------------------------------------------------------------------------

def train(config, exp_dir, resume=False, log=print, rank=0, world_size=1):
    """Train a diffusion model as `config` says, writing every output to `exp_dir`; returns the
    final score and timings. Under torchrun each rank trains on its own shard of every epoch."""
    started = time.time()
    device = ddp.pick_device(config["device"], rank)
    ranks = ddp.Processes(rank, world_size, device)
    torch.manual_seed(config["seed"])  # model initialisation: the same on every rank
    # denormal floats (|x| < 1e-38) creep into activations and optimizer states as training goes
    # on and slow x86 CPUs down several times; flushing them to zero changes nothing visible
    torch.set_flush_denormal(True)
    is_image = datasets.is_image_dataset(config["dataset"])
    if device == "cpu" and not is_image and not ranks.distributed:
        torch.set_num_threads(1)  # the MLP's tiny matrices: a second thread spins against the frame worker

    data, labels = datasets.load_training_data(config)                  # [N, ...], [N] or None
    data, labels = data.to(device), (labels.to(device) if labels is not None else None)
    scheduler, model = build_scheduler(config, device), build_model(config).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False) if config["ema_decay"] > 0 else None
    sampled_model = ema_model if ema_model is not None else model  # the weights the frames (and the guide) use
    weights, ema_weights = list(model.parameters()), (list(ema_model.parameters()) if ema_model else None)
    # fused AdamW: one kernel for all parameters instead of a dozen small ops per tensor
    optimizer = torch.optim.AdamW(weights, lr=config["learning_rate"], fused=device.split(":")[0] in ("cpu", "cuda"))
    order_generator = torch.Generator(device).manual_seed(config["seed"])  # the same on every rank
    noise_generator = ranks.noise_generator(config["seed"], order_generator)
    B, T, num_epochs = config["train_batch_size"], config["num_timesteps"], config["num_epochs"]
    steps_per_epoch = math.ceil(ranks.shard_size(len(data)) / B)
    total_steps = num_epochs * steps_per_epoch
    losses = torch.zeros(total_steps, device=device)  # one per step, read back once an epoch
    frames = Frames(config, exp_dir, device, (build_model, build_scheduler, sample)) if ranks.main else None
    run = experiment.Run(config, exp_dir, ranks, model, ema_model, losses, frames, started, log)
    checkpoint = Checkpointer(f"{exp_dir}/checkpoint.pt", model, ema_model, optimizer, losses,
                              order_generator, noise_generator, frames, ranks)
    start_epoch, start_batch, step, perm = run.resume(checkpoint) if resume else (0, 0, 0, None)
    optimizer_step = make_optimizer_step(config, model, ranks.wrap(model), scheduler, optimizer, log,
                                         compiled_step.wanted(config, device, ranks.distributed, total_steps, is_image))
    run.start_progress(total_steps, step)

    with StopRequest() as stop:
        for epoch in range(start_epoch, num_epochs):
            if perm is None:
                perm = torch.randperm(len(data), generator=order_generator, device=device)
            shard = ranks.shard(perm)
            model.train()
            for batch in range(start_batch, steps_per_epoch):
                index = shard[batch * B:(batch + 1) * B]
                x_start = data[index]                                            # x_0 ~ q(x_0)
                noise = torch.randn(x_start.shape, generator=noise_generator, device=device)  # eps ~ N(0, I)
                t = sample_timesteps(len(index), T, config.get("low_noise_fraction", 0.0), noise_generator, device)
                y = None
                if labels is not None:  # drop the label 10% of the time so the model also learns p(x)
                    drop = torch.rand(len(index), generator=noise_generator, device=device) < 0.1
                    y = torch.where(drop, model.null_label, labels[index])
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(step, total_steps, config)
                losses[step] = optimizer_step(x_start, noise, t, y)   # a gradient step on eq. 14
                if ema_model is not None:  # ema += (1 - decay) (weights - ema), one fused op
                    torch._foreach_lerp_(ema_weights, weights, 1 - ema_decay_at(step, config["ema_decay"]))
                step += 1
                if stop.signal is not None and not ranks.distributed:  # under DDP: together, below
                    run.stop(checkpoint, epoch, batch + 1, step, perm, stop)
            start_batch, perm = 0, None

            epoch_loss, stop_signal = run.end_of_epoch(epoch, step, steps_per_epoch, stop.signal)
            last_epoch = epoch == num_epochs - 1
            if ranks.main and epoch + 1 == config.get("guide_epoch"):  # autoguidance's weaker model, kept
                frames.keep_guide(sampled_model.state_dict())
            if ranks.main and ((epoch + 1) % config["save_images_step"] == 0 or last_epoch):
                frames.submit(run.frame_row(epoch, step, epoch_loss), sampled_model.state_dict())
            if (epoch + 1) % config["checkpoint_every"] == 0 or last_epoch:
                checkpoint.save(epoch + 1, 0, step, None, run.seconds(), wait=last_epoch)
            if stop_signal:
                run.stop(checkpoint, epoch + 1, 0, step, None, stop, stop_signal)
    return run.finish(step)


def make_optimizer_step(config, model, net, scheduler, optimizer, log, compiled):
    """training_step bound to this run, or the same step compiled into one graph (compiled_step.py)."""
    options = {"precision": config["precision"], "min_snr_gamma": config.get("min_snr_gamma", 0.0)}
    eager = functools.partial(training_step, net, scheduler, optimizer, **options)
    if not compiled:
        return eager

    def loss(net, x_start, noise, t, labels):
        return diffusion_loss(net, scheduler, x_start, noise, t, labels, **options)
    return compiled_step.compiled_training_step(model, loss, optimizer, fallback=eager, log=log)



# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def build_parser():
    p = cli.ArgumentParser(prog="ddpm.py", description="Train a denoising diffusion model (DDPM) on 2D points or images.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--dataset", default="dino", choices=datasets.DATASETS, help="what to learn to draw")
    add("--dataset_size", type=cli.positive_int, default=8000, help="training points (2D) or the number of images to use")
    add("--train_batch_size", type=cli.positive_int, default=128, help="examples per optimizer step")
    add("--eval_batch_size", type=cli.positive_int, default=1000, help="samples drawn per frame")
    add("--num_epochs", type=cli.positive_int, default=250, help="passes over the training data")
    add("--learning_rate", type=cli.positive_float, default=2e-3, help="AdamW learning rate")
    add("--lr_schedule", default="cosine", choices=("constant", "cosine"), help="cosine: decay the learning rate to 0")
    add("--low_noise_fraction", type=cli.closed_unit_interval, default=0.5,
        help="share of training timesteps drawn from the lowest fifth of the T (0: uniform)")
    add("--min_snr_gamma", type=cli.nonnegative_float, default=0.0,
        help="weight each timestep's loss by min(SNR, gamma) in x_0 terms (Hang et al. 2023); 0: the simple loss")
    add("--num_timesteps", type=cli.positive_int, default=200, help="T, the length of the diffusion")
    add("--beta_schedule", default="quadratic", choices=SCHEDULES, help="how the noise variance grows")
    add("--beta_start", type=cli.unit_interval, default=1e-4, help="first beta (linear/quadratic/sigmoid)")
    add("--beta_end", type=cli.unit_interval, default=None,
        help="last beta; default 0.02 * 1000/T, which ends in noise for any T (the classic: 0.02)")
    add("--prediction", default="epsilon", choices=PREDICTIONS, help="what the network predicts")
    add("--embedding_size", type=cli.positive_int, default=128, help="features per embedded scalar")
    add("--hidden_size", type=cli.positive_int, default=128, help="width of the MLP")
    add("--hidden_layers", type=cli.positive_int, default=3, help="residual blocks of the MLP")
    add("--time_embedding", default="sinusoidal", choices=("sinusoidal", "learnable", "linear", "zero"),
        help="how the MLP sees t (zero: it does not)")
    add("--input_embedding", default="fourier", choices=("sinusoidal", "learnable", "linear", "identity", "fourier"),
        help="how the MLP sees x and y (fourier: sinusoidal features of the point along random directions)")
    add("--input_scale", type=cli.positive_float, default=200.0,
        help="largest frequency of the fourier / sinusoidal input features (they go down to it / 10000)")
    add("--ema_decay", type=cli.ema_range, default=0.995, help="EMA of the weights for frames and sampling; 0: off")
    add("--clip_sample", type=cli.nonnegative_float, default=5.0,
        help="clamp the predicted x_0 to [-c, c] when sampling, as DDPM does for images (every 2D dataset here "
             "lies within |x|, |y| <= 4.7); 0: no clamp")
    add("--sampler", default="ddpm", choices=SAMPLERS,
        help="sampler for the frames: ddpm (all T steps), ddim, dpmpp_2m (DPM-Solver++(2M)) or its SDE form")
    add("--num_inference_steps", type=cli.positive_int, default=None,
        help="steps (network evaluations) of the ddim and dpmpp samplers (default: all T)")
    add("--eta", type=cli.nonnegative_float, default=None,
        help="noise of ddim and dpmpp_2m_sde: 0 deterministic, 1 like DDPM (default: ddim 0, dpmpp_2m_sde 0.8)")
    add("--timestep_spacing", default=None, choices=SPACINGS,
        help="which timesteps a few-step sampler visits: evenly in t, in log-SNR, or Karras et al.'s; "
             f"default per sampler: {', '.join(f'{k} {v}' for k, v in DEFAULT_SPACING.items())}")
    add("--save_images_step", type=cli.positive_int, default=10, help="sample a frame every N epochs")
    add("--seed", type=int, default=0, help="same seed, same machine: same outputs")
    experiment.add_flags(p)
    image_defaults.add_flags(p)
    return p


def validate(config, parser):
    """Checks between flags, before any work: one line and exit status 2 for the first that fails."""
    is_image = datasets.is_image_dataset(config["dataset"])
    start, end = default_beta_range(config["num_timesteps"])
    start = config["beta_start"] if config["beta_start"] is not None else start
    end = config["beta_end"] if config["beta_end"] is not None else end
    sinusoidal = "sinusoidal" in (config["time_embedding"], config["input_embedding"])
    for failed, message in [  # --compile on for images: the U-Net's step compiled for minutes, and not in bf16
        (config["beta_schedule"] != "cosine" and start > end, f"--beta_start {start:g} is larger than --beta_end {end:g}"),
        (not is_image and sinusoidal and config["embedding_size"] % 2,
         f"--embedding_size must be even for sinusoidal embeddings, got {config['embedding_size']}"),
        (config["resume"] and config["overwrite"], "--resume and --overwrite exclude each other"),
        (is_image and config["compile"] == "on", "--compile on is for the 2D MLP; image runs train with the eager step"),
        (config["autoguidance"] != 1 and not is_image, "--autoguidance is for image datasets (--dataset mnist, ...)"),
        (config["autoguidance"] != 1 and config["class_conditional"],
         "--autoguidance is for unconditional runs; class-conditional runs use --guidance_scale"),
        (config["guide_epoch"] and config["autoguidance"] == 1,
         "--guide_epoch is for autoguidance (unconditional image runs, guidance weight other than 1)"),
        ((config["guide_epoch"] or 0) > config["num_epochs"],
         f"--guide_epoch {config['guide_epoch']} is after the last epoch ({config['num_epochs']})"),
        (config["guidance_interval"] and config["autoguidance"] == 1 and not config["class_conditional"],
         "--guidance_interval is for guided image runs (--autoguidance or --class_conditional)"),
        (config["guide_x0_only"] and config["autoguidance"] == 1 and not config["class_conditional"],
         "--guide_x0_only is for guided image runs (--autoguidance or --class_conditional)"),
        (config["guide_x0_only"] and config["sampler"] != "ddim", "--guide_x0_only is for --sampler ddim"),
    ]:
        if failed:
            parser.error(message)
    error = (sampling_error(config["sampler"], config["num_inference_steps"], config["num_timesteps"])
             or guidance_interval_error(config["guidance_interval"], config["num_timesteps"])
             or (is_image and image_defaults.model_error(config)) or experiment.environment_error(config))
    if error:
        parser.error(error)


def parse_config(argv=None):
    """(config, flags given on the command line, parser): the flags, the image defaults for those
    not given, checked; a bad one exits with one line and status 2."""
    parser = build_parser()
    config = vars(parser.parse_args(argv))  # first: -h prints the help with the defaults
    given = cli.flags_given(parser, argv)
    config = image_defaults.apply(config, given)
    validate(config, parser)
    return config, given, parser


def main(argv=None):
    config, given, parser = parse_config(argv)
    device = ddp.pick_device(config["device"])
    config["precision"] = ddp.resolve_precision(config["precision"], datasets.is_image_dataset(config["dataset"]), device)
    rank, world_size = ddp.init_distributed(device)
    exp_dir, config = ddp.on_rank_zero(world_size, lambda: experiment.prepare(config, parser, given))
    if rank == 0:
        batch = f" x {world_size} processes (global batch {config['train_batch_size'] * world_size})"
        print(f"device: {ddp.pick_device(config['device'], rank)}{batch if world_size > 1 else ''}; "
              f"writing to {exp_dir}", flush=True)
        experiment.write_config(exp_dir, config, world_size)
    try:
        result = train(config, exp_dir, resume=config["resume"], rank=rank, world_size=world_size)
    except (experiment.NonFiniteLoss, CheckpointError) as e:
        sys.exit(f"ddpm.py: error: {e}")
    except OSError as e:  # disk full or folder gone mid-run: the last complete checkpoint is intact
        sys.exit(f"ddpm.py: error: cannot write the outputs ({e.strerror or e}); the last complete checkpoint.pt is kept")
    finally:
        ddp.finish(world_size)
    if rank == 0:
        print(experiment.report(result, exp_dir))
    return result


if __name__ == "__main__":
    main()
