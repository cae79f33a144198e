"""Image runs (--dataset mnist / fashion_mnist): their own flags, and the defaults they take for
the flags a command line does not give (2D runs keep the defaults of ddpm.py's parser).

The values were measured for 28x28 images on a 2-core CPU (docs/mnist.md). A default that
depends on another setting gives way to what the user typed: the epochs are as many as it takes
to show the network IMAGES_SEEN training images, whatever the size of the training set; the
frame's sampling steps are capped at T, and the guided ones are shares of T; the ddpm sampler
walks every step, and its guided steps move eps too, at their own weight; the one frame is drawn
at the last epoch; a checkpoint is written about ten times a run. Only flags the user gave can
contradict each other.
"""
import argparse

import datasets
from engine import cli
from extensions import guidance
from images import data as image_data

IMAGES_SEEN = 360_000  # 90 epochs of 4,000 digits: 21-28 minutes of training on a 2-core CPU (docs/mnist.md)
DEFAULTS = {"dataset_size": 60000, "num_timesteps": 1000, "beta_schedule": "cosine", "clip_sample": 1.0,
            "prediction": "v", "min_snr_gamma": 5.0,
            "train_batch_size": 64, "learning_rate": 1e-3, "ema_decay": 0.999,
            "sampler": "ddim", "num_inference_steps": 150, "eta": 1.0, "eval_batch_size": 1000,
            "lr_schedule": "constant", "low_noise_fraction": 0.0, "autoguidance": 1.3,
            "flow_time": "logit_normal"}  # flow matching's: SD3's times, measured on images (docs/formulations.md)
PLAIN_AUTOGUIDANCE = 2.75  # the weight when guided steps move eps too (--no-guide_x0_only, other samplers: docs/mnist.md)
GUIDE_FRACTION = 0.22  # autoguidance's guide: the EMA weights after this share of the epochs, 20 of 90 (docs/mnist.md)
GUIDANCE_INTERVAL = (0.45, 0.86)  # autoguidance at these shares of T only: 450 <= t <= 859 of 1000 (docs/mnist.md)
AUTOGUIDED_STEPS = 40  # an autoguided frame: 40 DDIM steps, 16 of them guided: 56 network evaluations (docs/mnist.md)
DDPM_ONLY = ("beta_schedule", "prediction", "min_snr_gamma", "sampler", "num_inference_steps", "eta")
# flow matching and EDM on images: the samplers measured on MNIST (docs/formulations.md), not their 2D defaults
OTHER_FORMULATIONS = {"sampler": "heun", "num_inference_steps": 25, "sigma_max": 80.0}
# MeanFlow on images: frames at 2 evaluations, unguided (a guided step costs two); MeanFlow's
# paper's adaptive loss weight (docs/one_step.md)
ONE_STEP = {"meanflow": {"sampler": "average", "num_inference_steps": 2, "autoguidance": 1.0, "weight_power": 1.0}}


def add_flags(parser):
    images = parser.add_argument_group("images (--dataset mnist / fashion_mnist)")
    images.add_argument("--data_dir", default=None,
                        help="folder of the IDX .gz files (default: data/DATASET; downloaded when missing)")
    images.add_argument("--class_conditional", action="store_true", default=None,
                        help="train with labels (10%% dropped: classifier-free guidance) (default: off)")
    images.add_argument("--guidance_scale", type=cli.nonnegative_float, default=3.0,
                        help="classifier-free guidance of the frames of a class-conditional run")
    images.add_argument("--autoguidance", type=cli.nonnegative_float, default=1.0,
                        help="guidance weight w of an unconditional run's frames away from the model as it was at "
                             "--guide_epoch (autoguidance, Karras et al. 2024); 1 = off")
    images.add_argument("--guide_epoch", type=cli.positive_int, default=None,
                        help=f"the epoch whose EMA weights guide (default: {GUIDE_FRACTION:g} of the epochs)")
    images.add_argument("--guidance_interval", type=cli.nonnegative_int, nargs=2, metavar=("LO", "HI"), default=None,
                        help="guide only the sampling steps with LO <= t <= HI (Kynkäänniemi et al. 2024); "
                             f"default: all, or {GUIDANCE_INTERVAL[0]:g} T to {GUIDANCE_INTERVAL[1]:g} T when autoguided")
    images.add_argument("--guide_x0_only", action=argparse.BooleanOptionalAction, default=None,
                        help="guided ddim steps take x_0 from the guided prediction, the eps of their noise direction "
                             "from the model's own (after CFG++, Chung et al. 2024); default: on when autoguided with "
                             f"ddim, where --autoguidance defaults to {DEFAULTS['autoguidance']:g} "
                             f"(off: {PLAIN_AUTOGUIDANCE:g})")
    images.add_argument("--unet_channels", type=cli.positive_int, default=32,
                        help="U-Net width at 28x28 (x2 at 14x14 and 7x7)")
    images.add_argument("--unet_depth", type=cli.positive_int, default=1, help="residual blocks per U-Net level")
    images.add_argument("--unet_attention", action=argparse.BooleanOptionalAction, default=None,
                        help="self-attention at 7x7 (default: on)")
    parser.epilog = ("For image datasets, flags not given take these defaults instead: "
                     + ", ".join(f"--{k} {v}" for k, v in DEFAULTS.items())
                     + f"; --num_epochs: {IMAGES_SEEN:,} training images seen (90 epochs of 4,000); the frame's "
                       f"steps at most T, {AUTOGUIDED_STEPS} when autoguided, guided at "
                       f"{GUIDANCE_INTERVAL[0]:g} T <= t <= {GUIDANCE_INTERVAL[1]:g} T, x_0 only with ddim (--guide_x0_only; "
                       f"else --autoguidance {PLAIN_AUTOGUIDANCE:g}); the one frame at the last "
                       "epoch; about ten checkpoints; class-conditional runs: --autoguidance 1.")


def apply(config, given):
    """config with the image defaults for every flag not `given` on the command line."""
    if not datasets.is_image_dataset(config["dataset"]):
        return config
    ddpm = config.get("objective", "ddpm") == "ddpm"  # flow matching and EDM keep their own sampler and loss
    config = {**config, **{k: v for k, v in DEFAULTS.items() if k not in given and (ddpm or k not in DDPM_ONLY)}}
    if not ddpm:
        own = ONE_STEP.get(config.get("objective"), OTHER_FORMULATIONS)
        config.update({k: v for k, v in own.items() if k not in given})
    if "num_epochs" not in given:
        n = min(config["dataset_size"], config.get("image_count") or image_data.count_images(config)
                or config["dataset_size"])  # image_count: a folder's (datasets.describe)
        config["num_epochs"] = max(1, round(IMAGES_SEEN / n))
    if config["class_conditional"] and "autoguidance" not in given:
        config["autoguidance"] = 1.0  # class-conditional runs have classifier-free guidance instead
    autoguided = config["autoguidance"] != 1.0
    if "guide_x0_only" not in given:
        config["guide_x0_only"] = autoguided and config["sampler"] == "ddim"
    config["autoguidance"] = autoguidance_weight(config["autoguidance"], config["guide_x0_only"], "autoguidance" in given)
    if "num_inference_steps" not in given and ddpm:
        steps = AUTOGUIDED_STEPS if autoguided else config["num_inference_steps"]
        config["num_inference_steps"] = None if config["sampler"] == "ddpm" else min(steps, config["num_timesteps"])
    if autoguided and "guide_epoch" not in given:
        config["guide_epoch"] = max(1, round(GUIDE_FRACTION * config["num_epochs"]))
    if autoguided and "guidance_interval" not in given:
        config["guidance_interval"] = [round(share * (config["num_timesteps"] - 1)) for share in GUIDANCE_INTERVAL]
    if "save_images_step" not in given:
        config["save_images_step"] = config["num_epochs"]
    if "checkpoint_every" not in given:  # about ten checkpoints a run, however long its epochs
        config["checkpoint_every"] = max(1, round(config["num_epochs"] / 9))
    return config


def autoguidance_weight(weight, x0_only, weight_given):
    """The autoguidance weight of guided steps: `weight`, except that the default (1.3, on the scale of
    guiding x_0 only) becomes PLAIN_AUTOGUIDANCE (2.75) when the guided steps move eps too (another
    sampler, or --no-guide_x0_only) and the weight was not given. ddpm.py and sample.py both ask here."""
    if weight_given or x0_only or weight != DEFAULTS["autoguidance"]:
        return weight
    return PLAIN_AUTOGUIDANCE


def flag_error(config):
    """Why the image and guidance flags of `config` don't go together, in one line; None if they do."""
    is_image = datasets.is_image_dataset(config["dataset"])
    for failed, message in [  # --compile on for images: the U-Net's step compiled for minutes, and not in bf16
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
            return message
    return (guidance.interval_error(config["guidance_interval"], config["num_timesteps"])
            or (is_image and model_error(config)) or None)


def model_error(config):
    """Why the U-Net of these flags can't be built (its GroupNorm and attention heads divide the
    channels), in one line; None if it can."""
    from images import unet
    try:
        unet.build_unet(config)
    except Exception as e:  # ValueError from GroupNorm, ZeroDivisionError below 4 channels, ...
        return f"no U-Net with --unet_channels {config['unet_channels']} ({str(e).splitlines()[0]})"
    return None
