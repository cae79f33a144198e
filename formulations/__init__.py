"""The formulations: ways to turn noise into data that share one network, one training loop and one sampler call.

DDPM is the story ddpm.py tells (ddpm.DDPM); the others live here, one file each, their equations cited:
  flow.py   flow matching on the straight path (Lipman et al. 2023, Liu et al. 2023, Esser et al. 2024)
  edm.py       EDM's preconditioned denoiser (Karras et al. 2022)
  reflow.py    a trained flow retrained on its own (noise, sample) pairs: straight paths (Liu et al. 2023)
  meanflow.py  the average velocity over an interval: one-step sampling from scratch (Geng et al. 2025)
Each implements `Formulation` (interface.py), and that is all ddpm.train, the frames and sample.py ask of it:
ddpm.FORMULATIONS maps --objective to the class, and nothing else asks which formulation it has.
"""
from engine import cli
from extensions import dpm_solver
from formulations import edm, flow, meanflow, reflow
from formulations.interface import Formulation  # noqa: F401 (ddpm.DDPM implements it)

OTHERS = {"flow": flow.FlowMatching, "edm": edm.EDM, "reflow": reflow.Reflow, "meanflow": meanflow.MeanFlow}


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
    reflow.add_flags(group)
    meanflow.add_flags(group)
