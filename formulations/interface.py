"""The one interface every formulation implements: DDPM (ddpm.DDPM), flow matching, EDM, reflow, MeanFlow.

ddpm.train, the frames and sample.py call these and nothing else; none of them asks which formulation it has.
A formulation may inherit `prepare` and `training_data` from here (most do: they need nothing before a run);
the rest it writes itself.
"""
from typing import Protocol


class Formulation(Protocol):
    """Built from a run's config: Formulation(config, device)."""
    SAMPLERS: tuple        # the --sampler names it samples with
    FLAGS: tuple           # the flags only it reads (others refuse them), e.g. ("flow_time",)
    SAMPLING_FLAGS: tuple  # the keywords of its sample() besides those below, e.g. ("sampler", "num_inference_steps")
    DEFAULTS: dict         # its own defaults for flags not given (2D runs; images/defaults.py has the image ones)
    PAPER: dict            # its paper's settings, for --paper_settings
    num_timesteps: int     # T: --guidance_interval LO HI is given in 0 .. T-1 for every formulation

    @staticmethod
    def prepare(config, given=()):
        """config with what it needs before a run (EDM measures sigma_data, reflow reads its teacher), or
        ValueError; `given`: the flags on the command line. Default: nothing."""
        return config

    def training_data(self, model, data, labels):
        """(data, labels) the training loop draws its batches from, once the model is built: the data itself,
        except for reflow, which starts the model from its teacher and trains on the teacher's pairs."""
        return data, labels

    def sample_timesteps(self, n, generator, device="cpu"):
        """Training times [n] (or [n, k]: MeanFlow's (t, r)), in its own time variable (DDPM's t, flow's t, EDM's sigma)."""

    def loss(self, net, x_start, noise, t, labels=None):
        """The loss of a batch x_start [B, ...] with noise [B, ...] at times t [B]: a scalar tensor."""

    def sample(self, model, shape, *, generator=None, device="cpu", labels=None, guidance=None, trajectory=False,
               **sampling):
        """From noise to data: x_0 of `shape` [B, ...] (trajectory: every step's x too). sampling: its
        SAMPLING_FLAGS; one that can't be used raises ValueError(sampling_error(...))."""

    @staticmethod
    def sampling_error(sampler, num_inference_steps, num_timesteps):
        """Why it can't sample so, in one line; None if it can."""
