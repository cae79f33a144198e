"""Min-SNR-gamma loss weights (Hang et al. 2023), the image runs' --min_snr_gamma 5.

The loss of the x_0 error weighted by min(SNR_t, gamma), SNR_t = alpha_bar_t / (1 - alpha_bar_t),
written for the network's target: the eps error is the x_0 error times SNR_t, the v error times
SNR_t + 1. Low-noise steps, whose x_0 error is tiny anyway, then stop taking a large share of the
gradient. ddpm.diffusion_loss calls `weighted_loss` in place of eq. 14's plain mean.
"""


def weight(scheduler, t, gamma):
    """The loss weight [B] of each example's squared error in the network's own target."""
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if scheduler.prediction == "epsilon":
        return clipped / snr
    if scheduler.prediction == "v":
        return clipped / (snr + 1)
    return clipped


def weighted_loss(prediction, target, scheduler, t, gamma):
    """The mean over the batch of each example's squared error [B, ...] times its weight."""
    squared_error = (prediction - target).square().flatten(1).mean(1)
    return (weight(scheduler, t, gamma) * squared_error).mean()
