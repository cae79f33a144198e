"""The formulations: ways to turn noise into data that share one network, one training loop and one sampler call.

DDPM is the story ddpm.py tells (ddpm.DDPM); the others live here, one file each, their equations cited:
  flow.py   flow matching on the straight path (Lipman et al. 2023, Liu et al. 2023, Esser et al. 2024)
  edm.py    EDM's preconditioned denoiser (Karras et al. 2022)
Each implements `Formulation` below, and that is all ddpm.train, the frames and sample.py ask of it:
ddpm.FORMULATIONS maps --objective to the class, and nothing else asks which formulation it has.
"""
from typing import Protocol

from engine import cli
from extensions import dpm_solver
from formulations import edm, flow


class Formulation(Protocol):
    """Built from a run's config: Formulation(config, device)."""
    SAMPLERS: tuple        # the --sampler names it samples with
    FLAGS: tuple           # the flags only it reads (others refuse them), e.g. ("flow_time",)
    SAMPLING_FLAGS: tuple  # the keywords of its sample() besides those below, e.g. ("sampler", "num_inference_steps")
    DEFAULTS: dict         # its own defaults for flags not given (2D runs; images/defaults.py has the image ones)
    PAPER: dict            # its paper's settings, for --paper_settings
    num_timesteps: int     # T: --guidance_interval LO HI is given in 0 .. T-1 for every formulation

    @staticmethod
    def prepare(config):
        """config with what it measures from the data before a run (EDM's sigma_data), or ValueError."""

    def sample_timesteps(self, n, generator, device="cpu"):
        """Training times [n], in its own time variable (DDPM's t, flow's t, EDM's sigma)."""

    def loss(self, net, x_start, noise, t, labels=None):
        """The loss of a batch x_start [B, ...] with noise [B, ...] at times t [B]: a scalar tensor."""

    def sample(self, model, shape, *, generator=None, device="cpu", labels=None, guidance=None, trajectory=False,
               **sampling):
        """From noise to data: x_0 of `shape` [B, ...] (trajectory: every step's x too). sampling: its
        SAMPLING_FLAGS; one that can't be used raises ValueError(sampling_error(...))."""

    @staticmethod
    def sampling_error(sampler, num_inference_steps, num_timesteps):
        """Why it can't sample so, in one line; None if it can."""


def add_flags(parser, formulations, spacings, default_spacing):
    """The sampling flags every formulation shares, and those of one formulation alone (its FLAGS)."""
    group = parser.add_argument_group("formulations and their samplers (--objective; docs/formulations.md)")
    add = group.add_argument
    samplers = list(dict.fromkeys(s for f in formulations.values() for s in f.SAMPLERS))
    add("--sampler", default="ddpm", choices=samplers, help="the frames' sampler: ddpm walks all T steps; default: "
        + ", ".join(f"{name} {f.DEFAULTS.get('sampler', 'ddpm')}" for name, f in formulations.items()))
    add("--num_inference_steps", type=cli.positive_int, default=None, help="steps of the other samplers (default: "
        + ", ".join(f"{name} {f.DEFAULTS.get('num_inference_steps') or 'T'}" for name, f in formulations.items()) + ")")
    add("--eta", type=cli.nonnegative_float, default=None, help="noise of ddim and dpmpp_2m_sde: 0 none, 1 the "
        f"ancestral step's (default: ddim 0, dpmpp_2m_sde {dpm_solver.DEFAULT_ETA:g})")
    add("--timestep_spacing", default=None, choices=spacings, help="the times a few-step sampler visits: DDPM's "
        f"(default: {', '.join(f'{k} {v}' for k, v in default_spacing.items())}); flow's uniform or quadratic in t")
    add("--paper_settings", action="store_true", help="each formulation's paper's training times and sampler "
        "instead of the project's measured 2D defaults (docs/formulations.md)")
    flow.add_flags(group)
    edm.add_flags(group)
