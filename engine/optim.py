"""The schedules of a training run's optimizer: the learning rate and the EMA decay at each step."""
import math


def learning_rate_at(step, total_steps, config):
    """--lr_schedule "constant", or "cosine" from learning_rate to 0 (Loshchilov & Hutter 2017)."""
    if config.get("lr_schedule", "constant") == "constant":
        return config["learning_rate"]
    return config["learning_rate"] * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def ema_decay_at(step, decay):
    """EMA warm-up: the decay (1 + step) / (10 + step) until it reaches `decay`; until then the EMA is a
    power average, step s's weights counting about s^8 (an image run never reaches 0.999: docs/mnist.md)."""
    return min(decay, (1 + step) / (10 + step))
