"""Guidance: sampling steps pushed away from a weaker prediction, out = weak + w (strong - weak).

ddpm.sample calls `denoise` here, in place of the plain network evaluation, when a Guidance is given;
ddpm.train calls `drop_labels` for the classifier-free training of class-conditional runs.
  classifier-free   the weaker prediction is the model's own without its label (Ho & Salimans 2022):
                    class-conditional runs, --guidance_scale w
  autoguidance      the weaker prediction is the same network earlier in training, whose errors the
                    guidance steers away from (Karras et al. 2024): unconditional image runs,
                    --autoguidance w, the weights of --guide_epoch
  interval          guide only the steps with lo <= t <= hi (Kynkaanniemi et al. 2024): guidance at
                    the highest noise levels costs variety, at the lowest it does little
  x_0 only          a guided DDIM step takes x_0 from the guided prediction but the eps of its noise
                    direction from the model's own (after CFG++, Chung et al. 2024; docs/mnist.md)
w = 1 is the model alone.
"""
from dataclasses import dataclass

import torch


@dataclass
class Guidance:
    scale: float = 1.0        # w
    guide: object = None      # autoguidance's weaker model; None: classifier-free (the model without its label)
    interval: tuple = None    # (lo, hi): the timesteps guided; None: all
    x0_only: bool = False     # guided steps move x_0 only (DDIM)

    def applies(self, t):
        return self.scale != 1.0 and (self.interval is None or self.interval[0] <= t <= self.interval[1])


def model_prediction(model, x, t, labels=None, guidance_scale=1.0, guide=None):
    """(guided output, the model's own output) of the network at (x, t), t [1] or [B]: the guided one is
    weak + w (own - weak), the weak one the guide's (no labels) or the model's without the label."""
    if labels is None:
        if guide is None or guidance_scale == 1.0:
            out = model(x, t)
            return out, out
        weak, strong = guide(x, t), model(x, t)
    elif guidance_scale == 1.0:
        out = model(x, t, labels)
        return out, out
    else:
        null = torch.full_like(labels, model.null_label)
        t = t.expand(len(x), *t.shape[1:])  # t may be [1] (or [1, 2]), shared by the batch
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        strong, weak = out.chunk(2)
    return weak + guidance_scale * (strong - weak), strong


def network_output(model, x, time, labels=None, guidance=None, guided=False, precision="fp32"):
    """The network's output at (x, time), time [1] shared by the batch, guided by `guidance` where
    `guided`: the velocity of flow.py, the F of edm.py."""
    scale, guide = (guidance.scale, guidance.guide) if guidance is not None and guided else (1.0, None)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        output, _ = model_prediction(model, x, time, labels, scale, guide)
    return output.float()


def denoise(model, scheduler, x, t, labels, guidance, precision="fp32"):
    """(x_0, eps) at (x_t, t) [B, ...], t an int, guided as `guidance` says: what ddpm.sample's steps use."""
    t_batch = torch.full((1,), t, device=x.device, dtype=torch.long)  # one timestep for the whole batch
    scale = guidance.scale if guidance.applies(t) else 1.0
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        output, own = model_prediction(model, x, t_batch, labels, scale, guidance.guide)
    x0, eps = scheduler.predict_x0_and_eps(output.float(), x, t_batch)
    if guidance.x0_only and own is not output:  # the noise direction from the model's own prediction
        _, eps = scheduler.predict_x0_and_eps(own.float(), x, t_batch)
    return x0, eps


def drop_labels(labels, index, model, generator, p_uncond=0.1):
    """Classifier-free training (Ho & Salimans 2022): the labels [B] of the batch `index`, each replaced by
    the model's null label with probability p_uncond, so that one network also learns p(x); None when
    the run has no labels."""
    if labels is None:
        return None
    drop = torch.rand(len(index), generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, model.null_label, labels[index])


def interval_error(interval, num_timesteps):
    """Why the guided steps `interval` (lo, hi) don't fit T timesteps, in one line; None if they do."""
    if interval and not 0 <= interval[0] <= interval[1] < num_timesteps:
        return f"--guidance_interval needs 0 <= LO <= HI < T = {num_timesteps}, got {list(interval)}"
    return None
