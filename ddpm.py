"""tiny-diffusion: denoising diffusion probabilistic models (Ho et al. 2020) in one file.

    python ddpm.py --dataset dino            # train, then look at exps/base/images/

Where things live (equation numbers are those of the DDPM paper, arXiv:2006.11239):
  NoiseScheduler.add_noise     forward process q(x_t | x_0)                  eq. 4
  NoiseScheduler.q_posterior   posterior q(x_{t-1} | x_t, x_0)               eq. 6-7
  diffusion_loss               the loss || eps - eps_theta(x_t, t) ||^2     eq. 14 (Algorithm 1)
  NoiseScheduler.step          one ancestral reverse step                    eq. 11 (Algorithm 2)
  NoiseScheduler.ddim_step     one DDIM step (Song et al. 2021, eq. 12)
  sample()                     the reverse process, for DDPM and DDIM alike

Every tensor of data may have any shape [B, ...]: the schedule's per-timestep
coefficients are broadcast over the trailing dimensions.
"""
import argparse
import copy
import functools
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import datasets
import plotting
from frames import Frames
from checkpoints import CheckpointError, atomic_save, atomic_save_npy, atomic_write_text, load_checkpoint
from positional_embeddings import RandomDirectionEmbedding, make_embedding

# ---------------------------------------------------------------------------------------
# The noise schedule, the forward process and the reverse steps
# ---------------------------------------------------------------------------------------

SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid")
PREDICTIONS = ("epsilon", "x0", "v")
SAMPLERS = ("ddpm", "ddim")


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

    @classmethod
    def from_config(cls, config, device="cpu"):
        # configs from before --clip_sample: images clipped at 1, 2D points not at all
        clip = config.get("clip_sample", 1.0 if datasets.is_image_dataset(config["dataset"]) else 0.0)
        return cls(config["num_timesteps"], config["beta_schedule"], config.get("beta_start"),
                   config.get("beta_end"), config.get("prediction", "epsilon"), clip or None, device)

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

    def ddim_step(self, model_output, t, prev_t, x_t, eta, noise):
        """One DDIM step x_t -> x_{prev_t} (Song et al. 2021, eq. 12), prev_t < t; prev_t = -1
        means x_0. eta = 0 is deterministic; eta = 1 with prev_t = t - 1 is the DDPM step."""
        x0, eps = self.predict_x0_and_eps(model_output, x_t, t)
        alpha_bar = self._at(self.alphas_cumprod, t, x_t)
        alpha_bar_prev = (self._at(self.alphas_cumprod, prev_t, x_t) if prev_t[0] >= 0
                          else torch.ones_like(alpha_bar))
        # eq. 16: sigma_t(eta)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
        return alpha_bar_prev.sqrt() * x0 + direction + sigma * noise

    def inference_timesteps(self, num_inference_steps=None):
        """Descending timesteps to visit: all T, or num_inference_steps evenly spaced."""
        n = self.num_timesteps if num_inference_steps is None else num_inference_steps
        return torch.linspace(self.num_timesteps - 1, 0, n, dtype=torch.float64).round().long().tolist()


@torch.no_grad()
def sample(model, scheduler, shape, *, sampler="ddpm", num_inference_steps=None, eta=0.0,
           generator=None, device="cpu", labels=None, guidance_scale=1.0, trajectory=False,
           precision="fp32"):
    """Run the reverse process from x_T ~ N(0, I) of `shape` [B, ...] and return x_0.

    sampler "ddpm" walks all T steps with `step` (num_inference_steps must be None or T);
    "ddim" walks num_inference_steps with `ddim_step` and its eta. With `labels` [B] the model
    is class-conditional and guidance_scale w mixes eps = eps_null + w (eps_label - eps_null)
    (classifier-free guidance, Ho & Salimans 2022). trajectory=True returns every x_t too.
    precision "bf16" runs the network in bfloat16 (autocast); the update itself stays in fp32.
    """
    if sampler == "ddpm" and num_inference_steps not in (None, scheduler.num_timesteps):
        raise ValueError("the ddpm sampler walks every timestep; use --sampler ddim for fewer steps")
    x = torch.randn(shape, generator=generator, device=device)
    steps = [x] if trajectory else None
    timesteps = scheduler.inference_timesteps(num_inference_steps)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            # the network gets t as [1]: one timestep for the whole batch (the MLP embeds it once)
            model_output = model_prediction(model, x, t_batch[:1], labels, guidance_scale).float()
        noise = torch.randn(shape, generator=generator, device=device) if t > 0 else torch.zeros_like(x)
        if sampler == "ddpm":
            x = scheduler.step(model_output, t_batch, x, noise)
        else:
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            prev_batch = torch.full((shape[0],), prev_t, device=device, dtype=torch.long)
            x = scheduler.ddim_step(model_output, t_batch, prev_batch, x, eta, noise)
        if trajectory:
            steps.append(x)
    return torch.stack(steps) if trajectory else x


def model_prediction(model, x, t, labels=None, guidance_scale=1.0):
    if labels is None:
        return model(x, t)
    if guidance_scale == 1.0:
        return model(x, t, labels)
    null = torch.full_like(labels, model.null_label)
    t = t.expand(len(x))  # t may be [1], shared by the batch
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    conditional, unconditional = out.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


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
        # and multiplied once, not B times: a frame of 1,000 points takes 1.2-1.5x less CPU. In
        # training the split form made the compiled step ~40% slower, so training keeps the concat.
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
    return NoiseScheduler.from_config(config, device)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the training loop checks after each step."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def pick_device(name, rank=0):
    """auto: cuda, then mps, then cpu. Under torchrun each rank takes the GPU of its local rank."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


def init_distributed(device):
    """Join torchrun's process group when WORLD_SIZE > 1: gloo on CPU, nccl on CUDA. (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu":  # share the cores between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return torch.distributed.get_rank(), world_size


def sample_timesteps(n, num_timesteps, low_noise_fraction, generator, device="cpu"):
    """Training timesteps [n]: uniform over 0..T-1 as in Algorithm 1, except that a share
    `low_noise_fraction` of them is drawn uniformly from the lowest fifth, ceil(T/5) steps.
    Uniform t spends most of training at high noise; the 2D samples' sharpness is set at the
    lowest noise levels, where the network must snap a point onto the data (README, "Defaults")."""
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
    if low_noise_fraction > 0:
        low = torch.randint(0, math.ceil(num_timesteps / 5), (n,), generator=generator, device=device)
        t = torch.where(torch.rand(n, generator=generator, device=device) < low_noise_fraction, low, t)
    return t


def learning_rate_at(step, total_steps, config):
    """--lr_schedule: "constant", or "cosine": from learning_rate down to 0 over the run
    (Loshchilov & Hutter 2017), so the last steps make small, precise moves."""
    if config.get("lr_schedule", "constant") == "constant":
        return config["learning_rate"]
    return config["learning_rate"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def ema_decay_at(step, decay):
    """EMA warm-up: average over roughly the first `step` updates until that exceeds 1/(1-decay)."""
    return min(decay, (1 + step) / (10 + step))


def diffusion_loss(net, scheduler, x_start, noise, t, labels=None, precision="fp32", min_snr_gamma=0.0):
    """The loss of Algorithm 1 on a batch: noise it (eq. 4), regress the target (eq. 14).
    `net` is anything called as net(x_t, t[, labels]): the model, its DistributedDataParallel
    wrapper, or the model with other weights (compiled_training_step)."""
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


def compiled_training_step(model, scheduler, optimizer, precision="fp32", min_snr_gamma=0.0, fallback=None, log=print):
    """training_step as one torch.compile'd function: step(x_start, noise, t, labels=None) -> loss.

    The 2D MLP's step on a CPU is mostly the overhead of ~100 small ops and of the autograd engine.
    Here torch.func takes the gradient while the graph is traced, so forward, backward, clipping
    and AdamW (written out as torch.optim.AdamW computes it, on that optimizer's state, so that
    checkpoints and --resume do not change) compile into a few fused loops around the matrix
    products: 2.3x the eager step's steps/s (README, "Speed") for a compile of ~4 s (~20 s uncached).
    Single process only: DistributedDataParallel averages gradients inside loss.backward().
    If compiling fails at the first call, `fallback` (the same step, eager) takes over."""
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    for p in params:  # AdamW's state, made now rather than at the first optimizer.step()
        if not optimizer.state[p]:  # (a resumed run has it from the checkpoint)
            optimizer.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                      exp_avg_sq=torch.zeros_like(p))
    group = optimizer.param_groups[0]
    # every tensor goes in as an argument: fewer guards for torch.compile to check at each call
    weights = [p.detach() for p in params]  # the same storage: AdamW below updates the model
    state = [[optimizer.state[p][key] for p in params] for key in ("exp_avg", "exp_avg_sq", "step")]

    def step(weights, exp_avgs, exp_avg_sqs, state_steps, x_start, noise, t, labels, lr, step_size,
             bias_correction2_sqrt):
        def loss_of(weights):
            def net(*inputs):
                return torch.func.functional_call(model, dict(zip(names, weights)), inputs)
            return diffusion_loss(net, scheduler, x_start, noise, t, labels, precision, min_snr_gamma)

        grads, loss = torch.func.grad_and_value(loss_of)(weights)
        # clip_grad_norm_(max_norm=1): scale every gradient by min(1, 1 / total norm)
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        clip = (1.0 / (total_norm + 1e-6)).clamp(max=1.0)
        # AdamW (Loshchilov & Hutter 2019, Algorithm 2) as torch.optim.AdamW does it, on its state
        beta1, beta2 = group["betas"]
        for w, g, exp_avg, exp_avg_sq, count in zip(weights, grads, exp_avgs, exp_avg_sqs, state_steps):
            g = g * clip
            count.add_(1)
            w.mul_(1 - lr * group["weight_decay"])                    # decoupled weight decay
            exp_avg.lerp_(g, 1 - beta1)                               # m_t
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)    # v_t
            w.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + group["eps"]))
        return loss.detach()

    # one graph per batch shape (a short last batch: two). cpp_wrapper (on a CPU, where it was measured):
    # the code that calls the kernels is C++ rather than Python, ~8% more steps/s at batch 32 (medians
    # of 7 runs each of a 3,000-step loop: 1,767 vs 1,633), no change at batch 128; a first compile
    # takes ~20 s either way, ~4 s from the cache.
    on_cpu = params[0].device.type == "cpu"
    compiled = torch.compile(step, dynamic=False, options={"cpp_wrapper": True} if on_cpu else None)
    calls = 0

    def optimizer_step(x_start, noise, t, labels=None):
        nonlocal compiled, calls
        calls += 1
        # this step's learning rate and AdamW bias corrections go in as tensors (a changing number
        # would recompile), computed here once (inside the graph they are recomputed per element)
        beta1, beta2 = group["betas"]
        n = float(state[2][0]) + 1
        scalars = [torch.tensor(v) for v in (group["lr"], group["lr"] / (1 - beta1**n), math.sqrt(1 - beta2**n))]
        if compiled is not None:
            try:
                return compiled(weights, *state, x_start, noise, t, labels, *scalars)
            except Exception as e:  # e.g. no C++ compiler: the first call fails before it changes anything
                if fallback is None or calls > 1:
                    raise
                log(f"note: torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
                    "training without it")
                compiled = None
        return fallback(x_start, noise, t, labels)

    return optimizer_step


def train(config, exp_dir, resume=False, log=print, rank=0, world_size=1):
    """Train a diffusion model as `config` says, writing every output to `exp_dir`.

    Returns a dict with the final score, floor and timing. Writes a checkpoint every
    `checkpoint_every` epochs and on SIGINT/SIGTERM, and resumes from one if `resume`.
    Under torchrun (world_size > 1) each rank trains on its own shard of every epoch and
    rank 0 alone makes frames and writes files.
    """
    start_time = time.time()
    device = pick_device(config["device"], rank)
    distributed = world_size > 1
    main_process = rank == 0
    torch.manual_seed(config["seed"])  # model initialisation: the same on every rank
    # denormal floats (|x| < 1e-38) creep into activations and optimizer states as training
    # goes on and slow x86 CPUs down several times; flushing them to zero changes nothing visible
    torch.set_flush_denormal(True)

    data, labels = datasets.load_training_data(config)  # [N, ...], [N] or None
    data = data.to(device)
    labels = labels.to(device) if labels is not None else None
    scheduler = build_scheduler(config, device)
    model = build_model(config).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False) if config["ema_decay"] > 0 else None
    if ema_model is not None:
        ema_params, model_params = list(ema_model.parameters()), list(model.parameters())
    # fused AdamW: one kernel for all parameters instead of a dozen small ops per tensor
    fused = device.split(":")[0] in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], fused=fused)
    net = model  # what the training step calls: the model, or a wrapper that shares its weights
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    # the order of the examples is the same on every rank; the noise differs from rank to rank
    order_generator = torch.Generator(device).manual_seed(config["seed"])
    noise_generator = (torch.Generator(device).manual_seed(config["seed"] + 1 + rank) if distributed
                       else order_generator)

    N, B = len(data), config["train_batch_size"]
    shard_size = N // world_size  # rank r takes positions r, r + W, ... of each epoch's order
    steps_per_epoch = math.ceil(shard_size / B)
    num_epochs = config["num_epochs"]
    T = config["num_timesteps"]
    losses = torch.zeros(num_epochs * steps_per_epoch, device=device)  # one per optimizer step
    rows = {}  # frame index -> its row of metrics.csv, without the score until the frame is made
    start_epoch, start_batch, step, perm = 0, 0, 0, None
    parallel_frames = main_process and use_frame_worker(config, device)
    if device == "cpu" and not datasets.is_image_dataset(config["dataset"]) and not distributed:
        # the MLP's matrices are tiny: a second thread gains little, and it spins against the
        # frame worker or any other busy process (measured in bench.py)
        torch.set_num_threads(1)
    frames = Frames(config, exp_dir, device, parallel=parallel_frames) if main_process else None

    if resume:
        state = load_checkpoint(os.path.join(exp_dir, "checkpoint.pt"), model, ema_model, optimizer)
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        perm = state["perm"].to(device) if state["perm"] is not None else None
        losses[:step] = state["losses"][:step].to(device)
        order_generator.set_state(state["train_rng"])
        if distributed:
            if len(state.get("rank_rngs") or []) != world_size:
                raise CheckpointError(f"{exp_dir} was trained with another number of processes")
            noise_generator.set_state(state["rank_rngs"][rank])
        if main_process:
            for row, frame in zip(state["metrics"], state["frames"]):
                rows[row["frame"]] = row
                frames.done[row["frame"]] = (frame, {k: v for k, v in row.items() if k not in METRIC_BASICS})
            for row, weights in state.get("pending_frames", []):  # not made before the stop: make them now
                rows[row["frame"]] = row
                frames.submit(row["frame"], row["epoch"], weights)
            log(f"resuming {exp_dir} at epoch {start_epoch}, step {step}")
        start_time -= state["seconds"]

    def finished_frames(wait=True):
        """(frames [n, ...], metric rows) of every frame made so far (wait: for the worker too)."""
        frames.collect(wait=wait)
        done = sorted(frames.done)
        table = [{**{k: v for k, v in rows[i].items() if k != "seconds"}, **frames.done[i][1],
                  "seconds": rows[i]["seconds"]} for i in done]  # score, floor, ... before seconds
        return [frames.done[i][0] for i in done], table

    def save_checkpoint(epoch, batch, wait=False):
        """On every rank at the same step (the ranks' noise generators are gathered); rank 0 writes.
        Frames the worker has not made yet go in as their weights, to be made after a resume:
        waiting for them here would stall training at every checkpoint."""
        rank_rngs = None
        if distributed:
            rank_rngs = [None] * world_size
            torch.distributed.all_gather_object(rank_rngs, noise_generator.get_state())
        if not main_process:
            return
        frame_list, table = finished_frames(wait)
        atomic_save({
            "model": model.state_dict(), "ema": ema_model.state_dict() if ema_model else None,
            "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch, "step": step,
            "perm": perm.cpu() if perm is not None else None, "losses": losses[:step].cpu(),
            "frames": torch.stack(frame_list) if frame_list else torch.zeros(0), "metrics": table,
            "pending_frames": [(rows[i], weights) for i, weights in frames.unfinished()],
            "train_rng": order_generator.get_state(), "rank_rngs": rank_rngs,
            "seconds": time.time() - start_time,
        }, os.path.join(exp_dir, "checkpoint.pt"))

    def stop_here(epoch, batch, signum):
        save_checkpoint(epoch, batch)
        if main_process:
            frame_list, table = finished_frames()
            frames.close()
            write_outputs(exp_dir, config, model, ema_model, losses[:step], frame_list, table)
            progress.close()
            name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
            log(f"{name}: stopped at step {step} (epoch {epoch}); checkpoint written. Continue with: "
                f"python ddpm.py --experiment_name {config['experiment_name']} --out_dir {config['out_dir']} --resume")
        sys.exit(130 if signum == signal.SIGINT else 143)

    total_steps = num_epochs * steps_per_epoch
    loss_options = {"precision": config["precision"], "min_snr_gamma": config.get("min_snr_gamma", 0.0)}
    optimizer_step = functools.partial(training_step, net, scheduler, optimizer, **loss_options)
    if use_compiled_step(config, device, distributed, total_steps):
        optimizer_step = compiled_training_step(model, scheduler, optimizer, fallback=optimizer_step, log=log,
                                                **loss_options)
    progress = tqdm(total=total_steps, initial=step, desc=config["experiment_name"], unit="step", mininterval=0.5,
                    dynamic_ncols=True, disable=config.get("quiet", False) or not main_process)
    with StopRequest() as stop:
        for epoch in range(start_epoch, num_epochs):
            if perm is None:
                perm = torch.randperm(N, generator=order_generator, device=device)
            shard = perm[rank:shard_size * world_size:world_size]
            model.train()
            for batch in range(start_batch, steps_per_epoch):
                index = shard[batch * B:(batch + 1) * B]
                x_start = data[index]
                noise = torch.randn(x_start.shape, generator=noise_generator, device=device)
                t = sample_timesteps(len(x_start), T, config.get("low_noise_fraction", 0.0),
                                     noise_generator, device)
                y = None
                if labels is not None:  # drop the label 10% of the time so the model also learns p(x)
                    drop = torch.rand(len(index), generator=noise_generator, device=device) < 0.1
                    y = torch.where(drop, model.null_label, labels[index])
                if config.get("lr_schedule", "constant") != "constant":
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate_at(step, total_steps, config)
                losses[step] = optimizer_step(x_start, noise, t, y)  # Algorithm 1, in training_step
                if ema_model is not None:  # ema += (1 - decay) (weights - ema), one fused op
                    torch._foreach_lerp_(ema_params, model_params, 1 - ema_decay_at(step, config["ema_decay"]))
                step += 1
                if stop.signal is not None and not distributed:  # under DDP the ranks stop together, below
                    stop_here(epoch, batch + 1, stop.signal)
            start_batch, perm = 0, None

            # once per epoch: one host sync (and under DDP one all-reduce) for the epoch's losses
            epoch_losses = losses[step - steps_per_epoch:step]
            if distributed:
                flag = torch.tensor([float(stop.signal or 0)], device=device)
                reduced = torch.cat([epoch_losses, flag])
                torch.distributed.all_reduce(reduced[:-1])                      # sum of the ranks' losses
                torch.distributed.all_reduce(reduced[-1:], op=torch.distributed.ReduceOp.MAX)
                epoch_losses.copy_(reduced[:-1] / world_size)                  # loss.npy: the mean over ranks
                distributed_stop = int(reduced[-1])  # acted on at the end of this epoch, below
            epoch_loss = float(epoch_losses.mean())
            if not math.isfinite(epoch_loss):
                bad = int(torch.nonzero(~torch.isfinite(epoch_losses))[0]) + step - steps_per_epoch
                progress.close()
                if frames is not None:
                    frames.close()
                raise NonFiniteLoss(
                    f"the loss became non-finite at step {bad} (epoch {epoch}); the learning rate "
                    f"{config['learning_rate']:g} is probably too high (or the data has NaN/inf). "
                    "Nothing after the last good checkpoint was written.")
            progress.update(steps_per_epoch)
            last_epoch = epoch == num_epochs - 1
            if main_process and ((epoch + 1) % config["save_images_step"] == 0 or last_epoch):
                frame_index = len(rows)
                rows[frame_index] = {"frame": frame_index, "epoch": epoch, "step": step, "loss": epoch_loss,
                                     "seconds": time.time() - start_time}
                frames.submit(frame_index, epoch, (ema_model if ema_model is not None else model).state_dict())
                frames.collect()
                if frames.done:
                    latest = frames.done[max(frames.done)][1]
                    progress.set_postfix(loss=f"{epoch_loss:.3f}", score=f"{latest['score']:.4f}",
                                         floor=f"{latest['floor']:.4f}", refresh=False)
            if (epoch + 1) % config["checkpoint_every"] == 0 or last_epoch:
                save_checkpoint(epoch + 1, 0, wait=last_epoch)
            if distributed and distributed_stop:
                stop_here(epoch + 1, 0, distributed_stop)
    progress.close()
    if not main_process:
        return None
    frame_list, table = finished_frames()
    frames.close()
    loop_seconds = time.time() - start_time
    write_outputs(exp_dir, config, model, ema_model, losses[:step], frame_list, table)
    final = table[-1]
    return {"score": final["score"], "floor": final["floor"], "loss": final["loss"], "steps": step,
            "loop_seconds": loop_seconds, "seconds": time.time() - start_time, "frames": len(table),
            "sampling_seconds": frames.seconds["sampling"], "drawing_seconds": frames.seconds["drawing"],
            "parallel_frames": parallel_frames}


def use_compiled_step(config, device, distributed, total_steps):
    """--compile: auto compiles the step of a 2D run on a CPU that is long enough to repay the
    compile (bench.py: ~2x steps/s for a ~4 s compile, ~20 s uncached); on compiles any
    single-process 2D run."""
    choice = config.get("compile", "auto")
    if choice == "auto":
        return device == "cpu" and not distributed and not datasets.is_image_dataset(config["dataset"]) \
            and total_steps >= 5000
    return choice == "on" and not distributed


def use_frame_worker(config, device):
    """Make frames in a worker process on a CPU with a core to spare (frames.py says why)."""
    choice = config.get("frame_worker", "auto")
    if choice == "auto":  # worth a process start (a few seconds) only for a real amount of sampling
        n_frames = config["num_epochs"] // config["save_images_step"] + 1
        work = n_frames * config["eval_batch_size"] * (config["num_inference_steps"] or config["num_timesteps"])
        return (device == "cpu" and (os.cpu_count() or 1) >= 2 and work >= 2_000_000
                and not datasets.is_image_dataset(config["dataset"]))
    return choice == "on"


class NonFiniteLoss(RuntimeError):
    pass


METRIC_BASICS = ("frame", "epoch", "step", "loss", "seconds")  # known when a frame is asked for


def write_outputs(exp_dir, config, model, ema_model, losses, frames, table):
    """model.pth, model_ema.pth, loss.npy, loss.png, frames.npy and metrics.csv, each atomically.
    (The frame PNGs are drawn as the frames are made.)"""
    atomic_save(model.state_dict(), os.path.join(exp_dir, "model.pth"))
    if ema_model is not None:
        atomic_save(ema_model.state_dict(), os.path.join(exp_dir, "model_ema.pth"))
    losses = losses.cpu().numpy()
    shape = (0, config["eval_batch_size"], *datasets.sample_shape(config))
    atomic_save_npy(os.path.join(exp_dir, "loss.npy"), losses)
    atomic_save_npy(os.path.join(exp_dir, "frames.npy"), torch.stack(frames).numpy() if frames else np.zeros(shape))
    atomic_write_text(os.path.join(exp_dir, "metrics.csv"), pd.DataFrame(table).to_csv(index=False, float_format="%.6g"))
    plotting.draw_loss(losses, os.path.join(exp_dir, "loss.png"))


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


def _number(kind, low=None, low_inclusive=False, high=None, high_inclusive=False, what=""):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_int = _number(int, 0, what="a positive integer")
nonnegative_int = _number(int, 0, low_inclusive=True, what="a non-negative integer")
positive_float = _number(float, 0, what="a positive number")
unit_interval = _number(float, 0, high=1, what="a number in (0, 1)")
ema_range = _number(float, 0, low_inclusive=True, high=1, what="in [0, 1)")
eta_range = _number(float, 0, low_inclusive=True, what="a number >= 0")


def build_parser():
    p = ArgumentParser(prog="ddpm.py", description="Train a denoising diffusion model (DDPM) on 2D points or images.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--experiment_name", default="base", help="outputs go to OUT_DIR/EXPERIMENT_NAME")
    p.add_argument("--out_dir", default="exps", help="folder that holds the experiments")
    p.add_argument("--dataset", default="dino", choices=datasets.DATASETS, help="what to learn to draw")
    p.add_argument("--dataset_size", type=positive_int, default=8000,
                   help="training points (2D) or the number of images to use")
    p.add_argument("--train_batch_size", type=positive_int, default=128, help="examples per optimizer step")
    p.add_argument("--eval_batch_size", type=positive_int, default=1000, help="samples drawn per frame")
    p.add_argument("--num_epochs", type=positive_int, default=250, help="passes over the training data")
    p.add_argument("--learning_rate", type=positive_float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--lr_schedule", default="cosine", choices=("constant", "cosine"),
                   help="cosine: decay the learning rate to 0 over the run")
    p.add_argument("--low_noise_fraction", type=_number(float, 0, True, 1, True, what="a number in [0, 1]"),
                   default=0.5, help="share of training timesteps drawn from the lowest fifth of the T (0: uniform)")
    p.add_argument("--min_snr_gamma", type=_number(float, 0, True, what="a number >= 0"), default=0.0,
                   help="weight each timestep's loss by min(SNR, gamma) in x_0 terms (Hang et al. 2023); 0: the simple loss")
    p.add_argument("--num_timesteps", type=positive_int, default=200, help="T, the length of the diffusion")
    p.add_argument("--beta_schedule", default="quadratic", choices=SCHEDULES, help="how the noise variance grows")
    p.add_argument("--beta_start", type=unit_interval, default=1e-4,
                   help="first beta (linear/quadratic/sigmoid)")
    p.add_argument("--beta_end", type=unit_interval, default=None,
                   help="last beta; default 0.02 * 1000/T, which ends in noise for any T (the classic: 0.02)")
    p.add_argument("--prediction", default="epsilon", choices=PREDICTIONS, help="what the network predicts")
    p.add_argument("--embedding_size", type=positive_int, default=128, help="features per embedded scalar")
    p.add_argument("--hidden_size", type=positive_int, default=128, help="width of the MLP")
    p.add_argument("--hidden_layers", type=positive_int, default=3, help="residual blocks of the MLP")
    p.add_argument("--time_embedding", default="sinusoidal", choices=("sinusoidal", "learnable", "linear", "zero"),
                   help="how the MLP sees t (zero: it does not)")
    p.add_argument("--input_embedding", default="fourier",
                   choices=("sinusoidal", "learnable", "linear", "identity", "fourier"),
                   help="how the MLP sees x and y (fourier: sinusoidal features of the point along random directions)")
    p.add_argument("--input_scale", type=positive_float, default=200.0,
                   help="largest frequency of the fourier / sinusoidal input features (they go down to it / 10000)")
    p.add_argument("--ema_decay", type=ema_range, default=0.995,
                   help="EMA of the weights for frames and sampling; 0 turns it off")
    p.add_argument("--clip_sample", type=_number(float, 0, True, what="a number >= 0"), default=5.0,
                   help="clamp the predicted x_0 to [-c, c] when sampling, as DDPM does for images (every 2D "
                        "dataset here lies within |x|, |y| <= 4.7); 0: no clamp")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS, help="sampler for the frames")
    p.add_argument("--num_inference_steps", type=positive_int, default=None,
                   help="steps of the ddim sampler (default: all T)")
    p.add_argument("--eta", type=eta_range, default=0.0, help="DDIM's eta: 0 deterministic, 1 like DDPM")
    p.add_argument("--save_images_step", type=positive_int, default=10, help="sample a frame every N epochs")
    p.add_argument("--checkpoint_every", type=positive_int, default=10, help="write checkpoint.pt every N epochs")
    p.add_argument("--seed", type=int, default=0, help="same seed, same machine: same outputs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto: cuda, then mps, then cpu")
    p.add_argument("--resume", action="store_true", help="continue the experiment from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="bf16: autocast the network to bfloat16 (training and sampling); auto: bf16 for "
                        "image datasets on hardware with native bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="compile the 2D training step with torch.compile (auto: runs of 5,000+ steps on a CPU; "
                        "single process only)")
    p.add_argument("--frame_worker", default="auto", choices=("auto", "on", "off"),
                   help="make frames in a second process while training (auto: 2D runs on a multi-core CPU)")
    images = p.add_argument_group("images (--dataset mnist / fashion_mnist)")
    images.add_argument("--data_dir", default=None,
                        help="folder of the IDX .gz files (default: data/DATASET; downloaded when missing)")
    images.add_argument("--class_conditional", action="store_true", default=None,
                        help="train with labels (10%% dropped: classifier-free guidance); None = off")
    images.add_argument("--guidance_scale", type=_number(float, 0, low_inclusive=True, what="a number >= 0"),
                        default=3.0, help="classifier-free guidance of the frames of a class-conditional run")
    images.add_argument("--unet_channels", type=positive_int, default=32,
                        help="U-Net width at 28x28 (x2 at 14x14 and 7x7)")
    images.add_argument("--unet_depth", type=positive_int, default=1, help="residual blocks per U-Net level")
    images.add_argument("--unet_attention", action=argparse.BooleanOptionalAction, default=None,
                        help="self-attention at 7x7; None = on")
    p.epilog = "For image datasets, flags not given take these defaults instead: " + ", ".join(
        f"--{k} {v}" for k, v in IMAGE_DEFAULTS.items()) + "."
    return p


# Defaults measured for 28x28 images on a 2-core CPU (README, "Images"), used for the flags a
# command line does not give when --dataset is an image dataset; 2D keeps the defaults above.
IMAGE_DEFAULTS = {"dataset_size": 60000, "num_timesteps": 1000, "beta_schedule": "cosine", "clip_sample": 1.0,
                  "prediction": "v", "min_snr_gamma": 5.0,
                  "train_batch_size": 64, "learning_rate": 1e-3, "ema_decay": 0.999, "num_epochs": 70,
                  "sampler": "ddim", "num_inference_steps": 150, "eta": 1.0, "eval_batch_size": 1000,
                  "save_images_step": 70, "lr_schedule": "constant", "low_noise_fraction": 0.0}


def apply_image_defaults(config, parser, argv):
    """config with IMAGE_DEFAULTS for every flag absent from argv, when the dataset is an image one."""
    if not datasets.is_image_dataset(config["dataset"]):
        return config
    spy = build_parser()  # parsed again without defaults: only the flags on the command line
    for action in spy._actions:
        action.default = argparse.SUPPRESS
    given = vars(spy.parse_args(argv))
    return {**config, **{k: v for k, v in IMAGE_DEFAULTS.items() if k not in given}}


def resolve_precision(precision, dataset, device):
    """--precision auto: bf16 for the U-Net where the hardware has native bf16 (measured on this
    project's 2-core AVX512-BF16 CPU: 235 vs 128 training images/s, 731 vs 386 sampled), fp32 for
    the 2D MLP, whose tiny matrices gain nothing from it (bench.py: 620 vs 800 steps/s at batch 32)."""
    if precision != "auto":
        return precision
    if not datasets.is_image_dataset(dataset):
        return "fp32"
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"


def validate(config, parser):
    """Checks between flags, before any work."""
    if config["num_inference_steps"] is not None:
        if config["num_inference_steps"] > config["num_timesteps"]:
            parser.error(f"--num_inference_steps {config['num_inference_steps']} exceeds "
                         f"--num_timesteps {config['num_timesteps']}")
        if config["sampler"] == "ddpm" and config["num_inference_steps"] != config["num_timesteps"]:
            parser.error("the ddpm sampler walks every timestep; use --sampler ddim with --num_inference_steps")
    start = config["beta_start"] if config["beta_start"] is not None else default_beta_range(config["num_timesteps"])[0]
    end = config["beta_end"] if config["beta_end"] is not None else default_beta_range(config["num_timesteps"])[1]
    if config["beta_schedule"] != "cosine" and start > end:
        parser.error(f"--beta_start {start:g} is larger than --beta_end {end:g}")
    if config["embedding_size"] % 2 and "sinusoidal" in (config["time_embedding"], config["input_embedding"]):
        parser.error(f"--embedding_size must be even for sinusoidal embeddings, got {config['embedding_size']}")
    if config["resume"] and config["overwrite"]:
        parser.error("--resume and --overwrite exclude each other")
    if config["compile"] == "on" and datasets.is_image_dataset(config["dataset"]):
        # measured on a 2-core CPU: ~3 minutes to compile the U-Net's step in fp32; under bf16 it fails
        parser.error("--compile on is for the 2D MLP; image runs train with the eager step")


RUN_FLAGS = ("resume", "overwrite", "quiet", "device", "frame_worker", "compile")  # how to run, not what to train


def prepare_experiment(config, parser):
    """Create (or reopen) the experiment folder; never clobber one silently."""
    exp_dir = os.path.join(config["out_dir"], config["experiment_name"])
    config_path = os.path.join(exp_dir, "config.json")
    exists = os.path.isdir(exp_dir) and any(os.scandir(exp_dir))
    if config["resume"]:
        if not os.path.exists(os.path.join(exp_dir, "checkpoint.pt")):
            parser.error(f"--resume: no checkpoint in {exp_dir}")
        try:
            with open(config_path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            parser.error(f"--resume: cannot read {config_path}: {e}")
        defaults = vars(parser.parse_args([]))
        for key, value in config.items():  # flags changed on this command line must agree
            if key in RUN_FLAGS or key in ("num_epochs",) or value == defaults.get(key):
                continue
            if saved.get(key) != value:
                parser.error(f"--resume: --{key} {value} differs from the experiment's {saved.get(key)}")
        if config["num_epochs"] != defaults["num_epochs"]:
            saved["num_epochs"] = config["num_epochs"]
        saved.update({k: config[k] for k in RUN_FLAGS})
        return exp_dir, saved
    if exists and not config["overwrite"]:
        parser.error(f"{exp_dir} already exists; pass --resume to continue it or --overwrite to replace it")
    try:
        if exists:
            shutil.rmtree(exp_dir)
        os.makedirs(exp_dir, exist_ok=True)
        probe = os.path.join(exp_dir, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        parser.error(f"cannot write to {exp_dir}: {e.strerror or e}")
    check_disk_space(config, exp_dir, parser)
    return exp_dir, config


def check_disk_space(config, exp_dir, parser):
    """Refuse to start when the outputs (frames twice: frames.npy and the checkpoint; PNGs) can't fit."""
    n_frames = config["num_epochs"] // config["save_images_step"] + 1
    frame_bytes = config["eval_batch_size"] * int(np.prod(datasets.sample_shape(config))) * 4
    need = 2 * n_frames * frame_bytes + n_frames * 60_000 + 20_000_000
    free = shutil.disk_usage(exp_dir).free
    if free < need:
        parser.error(f"not enough disk space in {exp_dir}: the run needs about {need / 1e6:.0f} MB, "
                     f"{free / 1e6:.0f} MB are free")


def main(argv=None):
    parser = build_parser()
    config = vars(parser.parse_args(argv))
    config = apply_image_defaults(config, parser, argv)
    validate(config, parser)
    try:
        datasets.check_available(config)
    except datasets.DataError as e:
        parser.error(str(e))
    if config["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if config["device"] == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        parser.error("--device mps: MPS is not available on this machine")
    device = pick_device(config["device"])
    config["precision"] = resolve_precision(config["precision"], config["dataset"], device)
    rank, world_size = init_distributed(device)
    if rank == 0:
        try:
            prepared = prepare_experiment(config, parser)
        except SystemExit:
            if world_size > 1:  # tell the other ranks to stop too
                torch.distributed.broadcast_object_list([None], src=0)
            raise
    else:
        prepared = None
    if world_size > 1:
        box = [prepared]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is None:
            sys.exit(2)
        prepared = box[0]
    exp_dir, config = prepared
    if rank == 0:
        print(f"device: {pick_device(config['device'], rank)}"
              + (f" x {world_size} processes (global batch {config['train_batch_size'] * world_size})"
                 if world_size > 1 else "") + f"; writing to {exp_dir}", flush=True)
        saved_config = {k: v for k, v in config.items() if k not in RUN_FLAGS}
        saved_config["world_size"] = world_size
        atomic_write_text(os.path.join(exp_dir, "config.json"), json.dumps(saved_config, indent=2) + "\n")
    try:
        result = train(config, exp_dir, resume=config["resume"], rank=rank, world_size=world_size)
    except (NonFiniteLoss, CheckpointError) as e:
        sys.exit(f"ddpm.py: error: {e}")
    except OSError as e:  # disk full or folder gone mid-run: the last complete checkpoint is intact
        sys.exit(f"ddpm.py: error: cannot write the outputs ({e.strerror or e}); "
                 "the last complete checkpoint.pt is kept")
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"done in {result['seconds']:.1f} s ({result['steps']} steps, {result['frames']} frames): "
              f"final score {result['score']:.5g} (noise floor {result['floor']:.5g}, "
              f"ratio {result['score'] / result['floor']:.2f}), outputs in {exp_dir}")
        where = "in a worker process, alongside training" if result["parallel_frames"] else "inline"
        print(f"time: training loop {result['loop_seconds']:.1f} s; frames {where}: sampling "
              f"{result['sampling_seconds']:.1f} s, drawing {result['drawing_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
