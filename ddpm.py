"""tiny-diffusion: denoising diffusion probabilistic models (Ho et al. 2020) in one file.

    python ddpm.py --dataset dino            # train, then look at exps/base/images/

Where things live (equation numbers are those of the DDPM paper, arXiv:2006.11239):
  make_betas, NoiseScheduler   the variance schedule beta_1 .. beta_T and alpha_bar_t
  NoiseScheduler.add_noise     forward process q(x_t | x_0)                  eq. 4
  NoiseScheduler.q_posterior   posterior q(x_{t-1} | x_t, x_0)               eq. 6-7
  NoiseScheduler.step          one ancestral reverse step                    eq. 11 (Algorithm 2)
  NoiseScheduler.ddim_step     one DDIM step (Song et al. 2021, eq. 12)
  sample()                     the reverse process from x_T ~ N(0, I)        Algorithm 2
  few_step_sample()            DDIM's and DPM-Solver++'s fewer steps
  MLP                          the network: Fourier features of the point and t, a residual MLP
  diffusion_loss               the loss || eps - eps_theta(x_t, t) ||^2     eq. 14
  DDPM                         all of it as a formulation: t, loss, sampler   (formulations/__init__.py)
  train()                      the training loop                             Algorithm 1

Data may have any shape [B, ...]. Everything else has its own room, called from here by one named call:
formulations/ (flow matching, EDM, reflow, MeanFlow: --objective), extensions/ (DPM-Solver++, spacings, guidance,
Min-SNR, ODE solvers), images/, engine/ (the run's machinery).
"""
import copy
import functools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets
import formulations
from engine import cli, compiled_step, ddp, experiment, optim
from extensions import dpm_solver, guidance as guided, min_snr, spacing
from images import defaults as image_defaults
from positional_embeddings import make_embedding, make_point_embedding

# ---- The noise schedule, the forward process and the reverse steps -------------------------

SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid")
PREDICTIONS = ("epsilon", "x0", "v")
SAMPLERS = ("ddpm",) + dpm_solver.SAMPLERS  # ancestral (Algorithm 2), DDIM, DPM-Solver++(2M) and its SDE form
SPACINGS = ("uniform",) + spacing.SPACINGS
DEFAULT_SPACING = spacing.DEFAULT  # of each sampler: DDIM's uniform, DPM-Solver++'s quadratic


def default_beta_range(num_timesteps, beta_start=None, beta_end=None):
    """(beta_start, beta_end), the defaults for those None: DDPM's 1e-4 .. 0.02 of T = 1000, the last rescaled by
    1000 / T (as Improved DDPM does) so that the forward process ends in noise for any T (T = 50 with 0.02 stops
    at alpha_bar_T = 0.60, far from the N(0, I) that sampling starts from)."""
    return (1e-4 if beta_start is None else beta_start,
            min(0.02 * 1000 / num_timesteps, 0.999) if beta_end is None else beta_end)


def make_betas(schedule, num_timesteps, beta_start, beta_end):
    T = num_timesteps
    if schedule != "cosine" and beta_start > beta_end:  # the noise must grow
        raise ValueError(f"--beta_start {beta_start:g} > --beta_end {beta_end:g}")
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
    """The variance schedule beta_1..beta_T and everything derived from it, by default that of `python ddpm.py
    --dataset dino`. Timesteps are 0-based: t = 0 .. T-1 stands for the paper's 1 .. T."""

    def __init__(self, num_timesteps=200, beta_schedule="quadratic", beta_start=None, beta_end=None,
                 prediction="epsilon", clip_sample=5.0, device="cpu"):
        beta_start, beta_end = default_beta_range(num_timesteps, beta_start, beta_end)
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.clip_sample = clip_sample or None  # clamp predicted x0 to [-c, c] when sampling; 0 or None: no clamp

        betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)                       # alpha_bar_t
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)  # alpha_bar_{t-1}, 1 at t=0

        def buffer(x):  # computed in float64, stored in float32
            return x.to(device=device, dtype=torch.float32)
        self.betas = buffer(betas)
        self.alphas_cumprod = buffer(alphas_cumprod)
        self.sqrt_alphas_cumprod = buffer(alphas_cumprod.sqrt())
        self.sqrt_one_minus_alphas_cumprod = buffer((1 - alphas_cumprod).sqrt())
        # eq. 7: posterior mean = coef1 * x_0 + coef2 * x_t, variance = beta_tilde_t
        self.posterior_mean_coef1 = buffer(betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod))
        self.posterior_mean_coef2 = buffer((1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod))
        self.posterior_variance = buffer(betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod))
        # lambda_t = log(alpha_t / sigma_t) = log SNR_t / 2, falling in t: the time of DPM-Solver's spacings
        self.log_snr = (alphas_cumprod.log() - (1 - alphas_cumprod).log()) / 2              # float64 [T]

    @staticmethod
    def _at(coefficients, t, x):  # coefficients[t] shaped [B, 1, 1, ...] to broadcast against x [B, ...]
        return coefficients[t].reshape(-1, *([1] * (x.dim() - 1)))

    # -- forward process -----------------------------------------------------------------
    def add_noise(self, x_start, noise, t):
        """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), eq. 4."""
        return (self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

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
        """Both x_0 and eps implied by the network's output at (x_t, t): eq. 4 solved for the other."""
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

    # -- reverse process ---------------------------------------------------------------------
    def step(self, x0, t, x_t, noise):
        """One ancestral step x_t -> x_{t-1} (Algorithm 2): a draw from the posterior q(x_{t-1} | x_t, x_0)
        with the network's x_0, t an int; no noise at t = 0. With eps-prediction this is eq. 11 through x_0."""
        t = torch.full((1,), t, device=x_t.device, dtype=torch.long)
        mean, variance = self.q_posterior(x0, x_t, t)
        return mean + variance.sqrt() * noise  # variance is 0 at t = 0

    def ddim_step(self, x0, eps, t, prev_t, x_t, eta, noise):
        """One DDIM step x_t -> x_{prev_t} (Song et al. 2021, eq. 12) with the network's x_0 and eps,
        prev_t < t ints, prev_t = -1 meaning x_0. eta = 0 is deterministic; eta = 1 with prev_t = t - 1
        is the ancestral step."""
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.ones_like(alpha_bar)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()  # eq. 16
        direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps  # "direction pointing to x_t"
        return alpha_bar_prev.sqrt() * x0 + direction + sigma * noise

    def inference_timesteps(self, num_inference_steps=None, timestep_spacing="uniform"):
        """Descending timesteps to visit: all T, or n of them spaced as extensions/spacing.py says."""
        return spacing.timesteps(self.log_snr, num_inference_steps or self.num_timesteps, timestep_spacing)


def denoise(model, scheduler, x, t, labels=None, guidance=None, precision="fp32"):
    """The network's x_0 and eps at (x_t, t), t an int: one evaluation for the whole batch (or guided)."""
    if guidance is not None:
        return guided.denoise(model, scheduler, x, t, labels, guidance, precision)
    t = torch.full((1,), t, device=x.device, dtype=torch.long)  # [1]: the MLP embeds the timestep once
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        output = model(x, t) if labels is None else model(x, t, labels)
    return scheduler.predict_x0_and_eps(output.float(), x, t)


@torch.inference_mode()  # no autograd bookkeeping at all: a few % faster than no_grad
def sample(model, scheduler, shape, *, sampler="ddpm", num_inference_steps=None, eta=None, timestep_spacing=None,
           generator=None, device="cpu", labels=None, guidance=None, precision="fp32", trajectory=False):
    """Algorithm 2: from x_T ~ N(0, I) of `shape` [B, ...] down to x_0, which it returns (trajectory: every x_t
    too, [T + 1, B, ...]). The other samplers take few_step_sample's fewer steps. labels [B]: a class-conditional
    model's classes; guidance: an extensions.guidance.Guidance; precision "bf16": the network in bfloat16."""
    error = DDPM.sampling_error(sampler, num_inference_steps, scheduler.num_timesteps)
    if error:
        raise ValueError(error)
    if sampler != "ddpm":
        return few_step_sample(model, scheduler, shape, sampler, num_inference_steps, eta, timestep_spacing,
                               generator, device, labels, guidance, precision, trajectory)
    x = torch.randn(shape, generator=generator, device=device)                              # x_T ~ N(0, I)
    steps = [x] if trajectory else None
    for t in reversed(range(scheduler.num_timesteps)):                                     # the paper's T .. 1
        x0, _ = denoise(model, scheduler, x, t, labels, guidance, precision)
        noise = torch.randn(shape, generator=generator, device=device) if t > 0 else torch.zeros_like(x)  # z
        x = scheduler.step(x0, t, x, noise)                                                # x_{t-1}, eq. 11
        if trajectory:
            steps.append(x)
    return torch.stack(steps) if trajectory else x


def few_step_sample(model, scheduler, shape, sampler, num_inference_steps, eta, timestep_spacing, generator, device,
                    labels, guidance, precision, trajectory):
    """DDIM (eq. 12) or DPM-Solver++(2M) (extensions/dpm_solver.py) in num_inference_steps steps, at the
    timesteps `timestep_spacing` picks: one network evaluation a step; eta 0 is deterministic."""
    x = torch.randn(shape, generator=generator, device=device)                              # x_T ~ N(0, I)
    steps = [x] if trajectory else None
    timesteps = scheduler.inference_timesteps(num_inference_steps, timestep_spacing or DEFAULT_SPACING[sampler])
    eta = dpm_solver.noise_level(sampler, eta)  # ddim 0, dpmpp_2m_sde 0.8 unless given
    last = None  # DPM-Solver++(2M): the step before
    for t, prev_t in zip(timesteps, timesteps[1:] + [-1]):
        x0, eps = denoise(model, scheduler, x, t, labels, guidance, precision)
        stochastic = t > 0 and sampler != "dpmpp_2m"  # a draw at every t > 0 whatever eta: one random stream for all eta
        noise = torch.randn(shape, generator=generator, device=device) if stochastic else torch.zeros_like(x)
        if sampler == "ddim":
            x = scheduler.ddim_step(x0, eps, t, prev_t, x, eta, noise)                          # eq. 12
        else:
            x, last = dpm_solver.step(scheduler, x0, t, prev_t, x, last, eta, noise)       # DPM-Solver++
        if trajectory:
            steps.append(x)
    return torch.stack(steps) if trajectory else x


# ---- The network ---------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.linear = nn.Linear(size, size)

    def forward(self, x):  # a residual block: x + GELU(Linear(x))
        return x + F.gelu(self.linear(x))


class MLP(nn.Module):
    """The network of 2D runs: embed the point and t, concatenate, then an MLP (defaults: the dino run's)."""

    def __init__(self, hidden_size=128, hidden_layers=3, embedding_size=128, num_timesteps=200,
                 time_embedding="sinusoidal", input_embedding="fourier", input_scale=200.0, time_inputs=1):
        super().__init__()
        # time_inputs 2: MeanFlow's network sees two times, (t, t - r), each with its own embedding
        self.time_embedding = make_embedding(time_embedding, embedding_size, max_value=num_timesteps, times=time_inputs)
        # Fourier features of the point (Tancik et al. 2020): input_scale, the largest frequency, sets the finest detail
        self.input_embedding = make_point_embedding(input_embedding, embedding_size, input_scale)
        in_size = self.input_embedding.output_size + self.time_embedding.output_size
        layers = [nn.Linear(in_size, hidden_size), nn.GELU()]
        layers += [Block(hidden_size) for _ in range(hidden_layers)]
        layers.append(nn.Linear(hidden_size, 2))
        self.joint_mlp = nn.Sequential(*layers)

    def forward(self, x, t):  # x: [B, 2], t: [B] (or [B, 2]), or [1] for one timestep shared by all B -> [B, 2]
        point = self.input_embedding(x)                                     # [B, P]
        if len(t) > 1:  # training: a timestep per point
            return self.joint_mlp(torch.cat([point, self.time_embedding(t)], dim=-1))
        # One timestep for the whole batch (sampling): the first layer W [point; time] + b written as
        # W_point point + (W_time time + b) embeds and multiplies the time half once, not B times.
        first, P = self.joint_mlp[0], point.shape[1]
        time_term = F.linear(self.time_embedding(t), first.weight[:, P:], first.bias)  # [1, H]
        h = torch.addmm(time_term, point, first.weight[:, :P].T)            # [B, H]
        return self.joint_mlp[1:](h)


def build_model(config):
    """The network described by a config dict (as saved in config.json): the MLP, or a U-Net for images."""
    if datasets.is_image_dataset(config["dataset"]):
        from images import unet
        return unet.build_unet(config)
    return MLP(config["hidden_size"], config["hidden_layers"], config["embedding_size"],
               config["num_timesteps"], config["time_embedding"], config["input_embedding"],
               config.get("input_scale", 25.0), config.get("time_inputs", 1))  # before --input_scale: 25


# ---- The loss and one optimizer step -------------------------------------------------------

def diffusion_loss(net, x_start, noise, t, labels=None, *, scheduler, precision="fp32", min_snr_gamma=0.0):
    """The loss of Algorithm 1 on a batch: noise it (eq. 4), regress the target (eq. 14). `net`: the model,
    its DistributedDataParallel wrapper, or the model with other weights (engine/compiled_step.py)."""
    x_t = scheduler.add_noise(x_start, noise, t)                     # forward process, eq. 4
    with torch.autocast(x_start.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        prediction = net(x_t, t) if labels is None else net(x_t, t, labels)
    target = scheduler.training_target(x_start, noise, t)
    if min_snr_gamma:  # each timestep's error weighted by min(SNR, gamma) (extensions/min_snr.py)
        return min_snr.weighted_loss(prediction.float(), target, scheduler, t, min_snr_gamma)
    return F.mse_loss(prediction.float(), target)                    # eq. 14, the simple loss


class DDPM(NoiseScheduler, formulations.Formulation):
    """DDPM as a formulation (formulations/interface.py): the schedule of a config dict with Algorithm 1's training
    times and loss, Algorithm 2's sampler and the few-step ones. Flow matching, EDM, reflow, MeanFlow are its peers."""
    SAMPLERS, SAMPLING_FLAGS = SAMPLERS, ("sampler", "num_inference_steps", "eta", "timestep_spacing")
    FLAGS = ("beta_schedule", "beta_start", "beta_end", "prediction", "min_snr_gamma", "timestep_spacing")
    DEFAULTS, PAPER = {}, {"low_noise_fraction": 0.0, "sampler": "ddpm"}  # the parser's; Algorithm 1's uniform t

    def __init__(self, config, device="cpu"):  # configs from before --clip_sample: images at 1, points none
        clip = config.get("clip_sample", 1.0 if datasets.is_image_dataset(config["dataset"]) else 0.0)
        super().__init__(config["num_timesteps"], config["beta_schedule"], config.get("beta_start"),
                         config.get("beta_end"), config.get("prediction", "epsilon"), clip or None, device)
        self.precision, self.min_snr_gamma = config.get("precision", "fp32"), config.get("min_snr_gamma", 0.0)
        self.low_noise_fraction = config.get("low_noise_fraction", 0.0)

    @staticmethod
    def sampling_error(sampler, num_inference_steps, num_timesteps):
        """Why DDPM can't sample so, in one line; None if it can (the command line asks here too)."""
        if sampler not in SAMPLERS:
            return cli.sampler_error("ddpm", sampler, SAMPLERS)
        if num_inference_steps is not None and num_inference_steps > num_timesteps:
            return f"--num_inference_steps {num_inference_steps} exceeds the diffusion's T = {num_timesteps} timesteps"
        if sampler == "ddpm" and num_inference_steps not in (None, num_timesteps):
            return "the ddpm sampler walks every timestep; use another --sampler for fewer --num_inference_steps"
        return None

    def sample_timesteps(self, n, generator, device="cpu"):
        """Training timesteps [n]: uniform over 0..T-1 as in Algorithm 1, except a share low_noise_fraction drawn
        from the lowest fifth: the 2D samples' sharpness is set at the lowest noise levels, where the network
        must snap a point onto the data, and uniform t spends little time there (docs/defaults.md)."""
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        if self.low_noise_fraction > 0:
            low = torch.randint(0, math.ceil(self.num_timesteps / 5), (n,), generator=generator, device=device)
            t = torch.where(torch.rand(n, generator=generator, device=device) < self.low_noise_fraction, low, t)
        return t

    def loss(self, net, x_start, noise, t, labels=None):
        return diffusion_loss(net, x_start, noise, t, labels, scheduler=self, precision=self.precision,
                              min_snr_gamma=self.min_snr_gamma)

    def sample(self, model, shape, **sampling):
        return sample(model, self, shape, precision=self.precision, **sampling)


FORMULATIONS = {"ddpm": DDPM, **formulations.OTHERS}  # --objective: flow, edm, reflow, meanflow (formulations/)


def training_step(net, loss_function, optimizer, x_start, noise, t, labels=None):
    """One optimizer step: the loss (loss_function: diffusion_loss with its settings), its gradient,
    clipping to norm 1, an AdamW update."""
    loss = loss_function(net, x_start, noise, t, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()                                                  # DDP averages gradients here
    nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
    optimizer.step()
    return loss.detach()


# ---- Training: Algorithm 1 -----------------------------------------------------------------

def train(config, exp_dir, resume=False, log=print, rank=0, world_size=1):
    """Train a diffusion model as `config` says, writing every output to `exp_dir`; returns the
    final score and timings. Under torchrun each rank trains on its own shard of every epoch."""
    started = time.time()
    ranks = ddp.Processes(rank, world_size, config)  # the device and threads; under torchrun, this rank
    device = ranks.device
    torch.manual_seed(config["seed"])  # model initialisation: the same on every rank
    Formulation = FORMULATIONS[config.get("objective", "ddpm")]  # DDPM (above), or one of formulations/
    formulation, model = Formulation(config, device), build_model(config).to(device)
    data, labels = formulation.training_data(model, *datasets.load_training_data(config, device))  # [N, ...], [N]
    ema_model = copy.deepcopy(model).requires_grad_(False) if config["ema_decay"] > 0 else None
    weights, ema_weights = list(model.parameters()), (list(ema_model.parameters()) if ema_model else None)
    # fused AdamW: one kernel for all parameters instead of a dozen small ops per tensor
    optimizer = torch.optim.AdamW(weights, lr=config["learning_rate"], fused=device.split(":")[0] in ("cpu", "cuda"))
    order_generator = torch.Generator(device).manual_seed(config["seed"])  # the same on every rank
    noise_generator = ranks.noise_generator(config["seed"], order_generator)
    B, num_epochs = config["train_batch_size"], config["num_epochs"]
    steps_per_epoch = math.ceil(ranks.shard_size(len(data)) / B)
    total_steps = num_epochs * steps_per_epoch
    losses = torch.zeros(total_steps, device=device)  # one per step, read back once an epoch
    # the bookkeeping (engine/experiment.py): frames, checkpoints, the progress bar, Ctrl-C
    run = experiment.Run(config, exp_dir, ranks, model, ema_model, optimizer, losses, order_generator,
                         noise_generator, (build_model, Formulation), started, log)
    start_epoch, start_batch, step, perm = run.resume() if resume else (0, 0, 0, None)
    optimizer_step = functools.partial(training_step, ranks.wrap(model), formulation.loss, optimizer)  # DDPM: eq. 14
    if compiled_step.wanted(config, device, ranks.distributed, total_steps):  # the same step as one graph
        optimizer_step = compiled_step.compiled_training_step(model, formulation.loss, optimizer, optimizer_step, log)

    with run.progress(total_steps, step):
        for epoch in range(start_epoch, num_epochs):
            if perm is None:
                perm = torch.randperm(len(data), generator=order_generator, device=device)
            shard = ranks.shard(perm)
            model.train()
            for batch in range(start_batch, steps_per_epoch):
                index = shard[batch * B:(batch + 1) * B]
                x_start = data[index]                                            # x_0 ~ q(x_0)
                noise = torch.randn(x_start.shape, generator=noise_generator, device=device)  # eps ~ N(0, I)
                t = formulation.sample_timesteps(len(index), noise_generator, device)  # t ~ Uniform, mostly
                y = guided.drop_labels(labels, index, model, noise_generator)  # classifier-free training
                for group in optimizer.param_groups:
                    group["lr"] = optim.learning_rate_at(step, total_steps, config)
                losses[step] = optimizer_step(x_start, noise, t, y)   # a gradient step on eq. 14
                if ema_model is not None:  # ema += (1 - decay) (weights - ema), one fused op
                    torch._foreach_lerp_(ema_weights, weights, 1 - optim.ema_decay_at(step, config["ema_decay"]))
                step += 1
                run.after_step(epoch, batch + 1, step, perm)  # on Ctrl-C: a checkpoint, then exit
            start_batch, perm = 0, None
            run.end_of_epoch(epoch, step, steps_per_epoch)  # the loss check, frames, checkpoints
    return run.finish(step)


# ---- Command line --------------------------------------------------------------------------

def build_parser():
    p = cli.ArgumentParser(prog="ddpm.py", description="Train a denoising diffusion model on 2D points or images.")
    add = p.add_argument
    datasets.add_flags(p)  # --dataset: a built-in name, or a file or folder of your own (and how to read it)
    add("--objective", default="ddpm", choices=FORMULATIONS,
        help="DDPM (this file), or flow matching, EDM, reflow, MeanFlow (formulations/)")
    add("--dataset_size", type=cli.positive_int, default=8000, help="training points (2D) or images to use")
    add("--train_batch_size", type=cli.positive_int, default=128, help="examples per optimizer step")
    add("--eval_batch_size", type=cli.positive_int, default=1000, help="samples drawn per frame")
    add("--num_epochs", type=cli.positive_int, default=250, help="passes over the training data")
    add("--learning_rate", type=cli.positive_float, default=2e-3, help="AdamW learning rate")
    add("--lr_schedule", default="cosine", choices=("constant", "cosine"), help="cosine: decay the learning rate to 0")
    add("--low_noise_fraction", type=cli.closed_unit_interval, default=0.5, help="share of training times drawn "
        "from the lowest fifth of the noise levels, each formulation in its own time (0: none)")
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
        help="how the MLP sees the point (fourier: sinusoidal features along random directions)")
    add("--input_scale", type=cli.positive_float, default=200.0, help="largest frequency of the input features")
    add("--ema_decay", type=cli.ema_range, default=0.995, help="EMA of the weights for frames and sampling; 0: off")
    add("--clip_sample", type=cli.nonnegative_float, default=5.0,
        help="clamp the predicted x_0 to [-c, c] when sampling (every 2D dataset lies within 4.7); 0: no clamp")
    add("--save_images_step", type=cli.positive_int, default=10, help="sample a frame every N epochs")
    add("--seed", type=int, default=0, help="same seed, same machine: same outputs")
    formulations.add_flags(p, FORMULATIONS, SPACINGS, DEFAULT_SPACING)  # the samplers', flow's and EDM's
    experiment.add_flags(p)
    image_defaults.add_flags(p)
    return p


def main(argv=None):
    parser = build_parser()
    config, given = experiment.parse(parser, argv, FORMULATIONS)  # + their defaults; bad flags exit 2
    return experiment.launch(config, parser, given, train)      # the device, torchrun, the folder; then train()


if __name__ == "__main__":
    main()
