"""Reflow (Liu et al. 2023, "Flow Straight and Fast"): straighten a trained flow by training it on its own pairs.

    python ddpm.py --dataset dino --objective flow --experiment_name dino_flow          # the teacher
    python ddpm.py --objective reflow --teacher exps/dino_flow --experiment_name dino_reflow
    python sample.py exps/dino_reflow --num_inference_steps 1                          # one Euler step

A trained flow's ODE carries each noise x_1 to one x_0: a coupling of noise and data. Flow matching learned the
average of the straight lines between INDEPENDENT (x_0, x_1) pairs, so its paths curve where those lines cross, and
a few Euler steps cut the curves. Reflow trains a new flow on the straight lines between the teacher's own pairs:
  the pairs   x_1 ~ N(0, I), x_0 = the teacher's ODE solution from x_1 (TEACHER: Heun, 100 steps, 199 evaluations)
  the loss    flow matching's on them (their eq. 1 with (X_0, X_1) the coupling, time reversed to flow.py's):
              x_t = (1 - t) x_0 + t x_1,  || v_theta(x_t, t) - (x_1 - x_0) ||^2,  t ~ U(0, 1), but a share
              --endpoint_fraction at t = 1 exactly: all that one Euler step x_0 = x_1 - v(x_1, 1) asks of the network
  why         the teacher's paths do not cross (an ODE's never do), so neither do the lines between its pairs: the
              velocity that fits them is the line's own, and one Euler step x_0 = x_1 - v(x_1, 1) lands on it.
  again       a reflow experiment is a teacher too: --teacher exps/dino_reflow gives the 3-rectified flow.
The choices (measured in docs/one_step.md): the student starts from the teacher's weights (its EMA), as their
2-rectified flows do, and trains for a share REFLOW_EPOCHS of the teacher's epochs; the pairs, --dataset_size of
them, are made once at the start (again, identically, on --resume) and never regenerated. Everything else (the data,
the network, T) is the teacher's: prepare() copies it from its config.json. Sampling is flow matching's.
"""
import json
import os
import time

import torch

from engine import checkpoints, cli
from extensions import ode
from formulations import flow

TEACHER = {"sampler": "heun", "num_inference_steps": 100}  # 199 evaluations: the pairs' endpoints exact to the eye
REFLOW_EPOCHS = 0.4  # the student's epochs, a share of its teacher's (unless --num_epochs)
PAIR_BATCH = 1000  # pairs made per call of the teacher's ODE
FROM_TEACHER = ("dataset", "columns", "data_dir", "num_timesteps", "hidden_size", "hidden_layers", "embedding_size",
                "time_embedding", "input_embedding", "input_scale", "class_conditional", "image_size", "channels",
                "unet_channels", "unet_depth", "unet_attention")  # a flag among these must agree with the teacher
# the student's own, not copied from the teacher (it samples unguided unless told)
OWN = ("objective", "teacher", "experiment_name", "out_dir", "resume", "overwrite", "quiet", "device", "frame_worker",
       "compile", "precision", "paper_settings", "num_epochs", "dataset_size", "sampler", "num_inference_steps", "eta",
       "timestep_spacing", "low_noise_fraction", "endpoint_fraction", "save_images_step", "checkpoint_every",
       "autoguidance", "guide_epoch", "guidance_interval", "guide_x0_only")


def add_flags(parser):
    parser.add_argument("--teacher", default=None, metavar="EXPERIMENT_DIR",
                        help="--objective reflow: the trained flow-matching (or reflow) experiment whose pairs it "
                             "trains on and whose weights it starts from")
    parser.add_argument("--endpoint_fraction", type=cli.closed_unit_interval, default=None,
                        help="--objective reflow: the share of its training times at t = 1, where one Euler step "
                             f"reads the network (default: {Reflow.DEFAULTS['endpoint_fraction']:g}; the paper's 0)")


def read_teacher(path):
    """The teacher's config.json, or ValueError saying why it can't teach."""
    if not path:
        raise ValueError("--objective reflow needs --teacher EXPERIMENT_DIR, a trained --objective flow experiment")
    try:
        with open(os.path.join(path, "config.json")) as f:
            teacher = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--teacher {path}: cannot read its config.json ({getattr(e, 'strerror', None) or e})")
    if teacher.get("objective") not in ("flow", "reflow"):
        raise ValueError(f"--teacher {path} is an --objective {teacher.get('objective', 'ddpm')} experiment; "
                         "reflow straightens a flow: its teacher is --objective flow (or reflow)")
    if not any(os.path.exists(os.path.join(path, name)) for name in ("model_ema.pth", "model.pth")):
        raise ValueError(f"--teacher {path} has no trained weights (model_ema.pth): let its run finish first")
    return teacher


class Reflow(flow.FlowMatching):
    """Reflow as a formulation (formulations/interface.py): flow matching's samplers, its own data and loss."""
    SAMPLERS = ode.SAMPLERS + ("ddim", "dpmpp_2m")  # deterministic only: the SDE's score -(x + (1 - t) v) / t holds
    # for flow matching's Gaussian path, not for the straight lines between a coupling's pairs
    FLAGS = ("teacher", "endpoint_fraction", "timestep_spacing")
    SAMPLING_FLAGS = ("sampler", "num_inference_steps", "timestep_spacing")  # no eta: ddim stays deterministic
    DEFAULTS = {"sampler": "euler", "num_inference_steps": 1, "low_noise_fraction": 0.0, "endpoint_fraction": 0.5}
    PAPER = {"low_noise_fraction": 0.0, "endpoint_fraction": 0.0, "sampler": "euler", "num_inference_steps": 1}

    def __init__(self, config, device="cpu"):
        super().__init__({**config, "flow_time": "uniform"}, device)  # t ~ U(0, 1), as theirs
        self.config, self.device = config, device
        self.endpoint_fraction = config.get("endpoint_fraction") or 0.0

    @staticmethod
    def sampling_error(sampler, num_inference_steps, num_timesteps):
        return cli.sampler_error("reflow", sampler, Reflow.SAMPLERS)

    @staticmethod
    def prepare(config, given=()):
        """The student's config: its teacher's, but for the run's own flags (OWN); a flag given that the teacher
        fixes (its data, its network) must agree with it."""
        teacher = read_teacher(config.get("teacher"))
        for key in [k for k in FROM_TEACHER if k in given and config.get(k) != teacher.get(k)]:
            raise ValueError(f"--{key} {config[key]}: the student is its teacher's network on its teacher's data, "
                             f"and {config['teacher']} has {key} {teacher.get(key)}; leave --{key} out")
        student = {**teacher, **{k: config[k] for k in config if k in OWN or k in given or k not in teacher}}
        if "num_epochs" not in given:
            student["num_epochs"] = max(1, round(REFLOW_EPOCHS * teacher["num_epochs"]))
        for key in ("save_images_step", "checkpoint_every"):
            if key not in given:
                student[key] = min(teacher.get(key, student[key]), student["num_epochs"])
        return student

    def training_data(self, model, data, labels):
        """The teacher's weights into `model`, and --dataset_size pairs (x_0, x_1) [N, 2, ...] made by its ODE (with
        the data's labels, cycled, for a class-conditional teacher): what the loss below trains on."""
        path = self.config["teacher"]
        teacher_config = read_teacher(path)
        ema = os.path.join(path, "model_ema.pth")
        weights = ema if os.path.exists(ema) else os.path.join(path, "model.pth")
        checkpoints.load_weights(model, checkpoints.safe_load(weights), weights)
        teacher = flow.FlowMatching(teacher_config, self.device)
        n = self.config["dataset_size"]
        generator = torch.Generator(self.device).manual_seed(self.config["seed"] + 50_000)
        noise = torch.randn((n,) + tuple(data.shape[1:]), generator=generator, device=self.device)     # x_1
        pair_labels = None if labels is None else labels[torch.arange(n, device=labels.device) % len(labels)]
        started = time.time()
        with torch.inference_mode():
            x_start = torch.cat([
                teacher.solve(model, noise[i:i + PAIR_BATCH], TEACHER["sampler"], TEACHER["num_inference_steps"],
                              labels=None if pair_labels is None else pair_labels[i:i + PAIR_BATCH])
                for i in range(0, n, PAIR_BATCH)])                                                   # x_0
        evaluations = 2 * TEACHER["num_inference_steps"] - 1
        if int(os.environ.get("RANK", 0)) == 0 and not self.config.get("quiet"):  # every rank makes them; one says so
            print(f"reflow: {n:,} pairs from {path}'s ODE ({TEACHER['sampler']}, {evaluations} evaluations each: "
                  f"{n * evaluations:,} network evaluations of one example) in {time.time() - started:.1f} s", flush=True)
        return torch.stack([x_start, noise], dim=1).clone(), pair_labels

    def sample_timesteps(self, n, generator, device="cpu"):
        """t ~ U(0, 1) (flow.py's, with its low-noise share if asked), a share endpoint_fraction set to 1."""
        t = super().sample_timesteps(n, generator, device)
        return torch.where(torch.rand(n, generator=generator, device=device) < self.endpoint_fraction, 1.0, t)

    def loss(self, net, x_start, noise, t, labels=None):
        """Flow matching's loss on the pairs: x_start [B, 2, ...] holds (x_0, x_1); `noise` is not used."""
        return super().loss(net, x_start[:, 0], x_start[:, 1], t, labels)

