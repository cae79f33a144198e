"""Draw samples from a trained experiment without retraining.

    python sample.py exps/base --num_samples 5000 --sampler ddim --num_inference_steps 20 --output dino.npy

Rebuilds the network from EXPERIMENT_DIR/config.json, loads its weights (the EMA weights,
model_ema.pth, where the run kept them; else model.pth), runs the reverse process with the
experiment's own sampler and guidance unless told otherwise, and writes the samples as .npy
plus a PNG of them beside it.
"""
import argparse
import json
import os
import sys
import time

import torch

import datasets
import ddpm
from engine import cli, ddp, frames, metrics
from engine.checkpoints import CheckpointError, atomic_save_npy, load_weights, safe_load
from engine.plotting import save_samples_png
from extensions import guidance
from images import defaults as image_defaults


def build_parser():
    p = cli.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    p.add_argument("experiment_dir", help="an experiment folder written by ddpm.py, e.g. exps/base")
    p.add_argument("--num_samples", type=cli.positive_int, default=1000, help="how many samples to draw")
    samplers = list(dict.fromkeys(s for f in ddpm.FORMULATIONS.values() for s in f.SAMPLERS))
    p.add_argument("--sampler", choices=samplers, default=None, help="default: the experiment's (each formulation "
                   "has its own: " + "; ".join(f"{k} {', '.join(f.SAMPLERS)}" for k, f in ddpm.FORMULATIONS.items()) + ")")
    p.add_argument("--num_inference_steps", type=cli.positive_int, default=None,
                   help="steps of a few-step sampler (default: the experiment's, else all T)")
    p.add_argument("--eta", type=cli.nonnegative_float, default=None, help="noise of ddim / dpmpp_2m_sde "
                   "(default: the experiment's, else the sampler's own)")
    p.add_argument("--timestep_spacing", choices=ddpm.SPACINGS, default=None,
                   help="DDPM and flow: the times a few-step sampler visits (default: the experiment's, else the sampler's "
                        "own)")
    p.add_argument("--s_churn", type=cli.nonnegative_float, default=None,
                   help="EDM, euler and heun: noise added before each step (default: the experiment's)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same samples")
    p.add_argument("--label", default=None, help="class to draw, by index or (a folder's) class name "
                   "(class-conditional models; default: every class in turn)")
    p.add_argument("--guidance_scale", type=cli.nonnegative_float, default=None,
                   help="classifier-free guidance weight of a class-conditional model (default: the experiment's)")
    p.add_argument("--autoguidance", type=cli.nonnegative_float, default=None,
                   help="autoguidance weight of an unconditional model, away from its model_guide.pth "
                        "(default: the experiment's; 1 = off)")
    p.add_argument("--guidance_interval", type=cli.nonnegative_int, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide only the steps with LO <= t <= HI (default: the experiment's)")
    p.add_argument("--guide_x0_only", action=argparse.BooleanOptionalAction, default=None,
                   help="guided ddim steps: x_0 from the guided prediction, the noise direction from the model's "
                        "own (default: the experiment's, with ddim); off, an experiment's default --autoguidance "
                        f"{image_defaults.DEFAULTS['autoguidance']:g} becomes {image_defaults.PLAIN_AUTOGUIDANCE:g}, "
                        "as ddpm.py sets it")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="auto: EMA weights where the experiment has them")
    p.add_argument("--batch_size", type=cli.positive_int, default=None,
                   help="samples per call of the sampler (default: as the run's frames: 100 images, all points)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: cuda, then mps, then cpu")
    p.add_argument("--output", default=None, help="a .npy file (default: EXPERIMENT_DIR/samples.npy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--score", action="store_true",
                   help="also print the sample-quality score against fresh data, with its noise floor")
    return p


def load_experiment(experiment_dir, weights="auto", device="cpu"):
    """(model, formulation, config) of a finished or interrupted experiment."""
    config_path = os.path.join(experiment_dir, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
        model = ddpm.build_model(config)
        formulation = ddpm.FORMULATIONS[config.get("objective", "ddpm")](config, device)
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: no such file (is {experiment_dir} an experiment folder?)")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{config_path} is malformed ({type(e).__name__}: {e})")
    ema_path = os.path.join(experiment_dir, "model_ema.pth")
    raw_path = os.path.join(experiment_dir, "model.pth")
    if weights == "ema" and not os.path.exists(ema_path):
        raise CheckpointError(f"{experiment_dir} has no EMA weights (model_ema.pth)")
    path = ema_path if weights != "raw" and os.path.exists(ema_path) else raw_path
    load_weights(model, safe_load(path), path)
    return model.to(device).eval(), formulation, config


def load_guide(experiment_dir, config, device="cpu"):
    """Autoguidance's weaker model: the weights the run kept at its --guide_epoch (model_guide.pth)."""
    path = os.path.join(experiment_dir, "model_guide.pth")
    if not os.path.exists(path):
        raise CheckpointError(f"{experiment_dir} has no model_guide.pth (trained with --autoguidance 1?)")
    guide = ddpm.build_model(config)
    load_weights(guide, safe_load(path), path)
    return guide.to(device).eval()


def sampling_settings(args, config, formulation, parser):
    """The keywords of formulation.sample: what the command line says, else the experiment's own where the
    sampler is the experiment's, else the sampler's defaults. A flag the formulation does not take is refused."""
    sampler = args.sampler or config.get("sampler") or formulation.DEFAULTS.get("sampler", "ddpm")
    same = args.sampler in (None, config.get("sampler"))
    settings = {"sampler": sampler}
    for key in ("num_inference_steps", "eta", "timestep_spacing", "s_churn"):
        given = getattr(args, key)
        if key not in formulation.SAMPLING_FLAGS:
            if given is not None:
                parser.error(f"--{key} is not for --objective {config.get('objective', 'ddpm')}'s samplers")
            continue
        settings[key] = given if given is not None else (config.get(key) if same else None)
    return settings


def guidance_for(args, config, conditional, sampler, parser, device):
    """The Guidance of these samples: the experiment's, with what the command line changes (or None)."""
    if args.guide_x0_only and sampler != "ddim":
        parser.error("--guide_x0_only is for --sampler ddim")
    if conditional and args.autoguidance not in (None, 1.0):
        parser.error("--autoguidance is for unconditional experiments; class-conditional ones use --guidance_scale")
    if not conditional and args.guidance_scale not in (None, 1.0):
        parser.error("--guidance_scale is for class-conditional experiments; unconditional ones use --autoguidance")
    error = guidance.interval_error(args.guidance_interval, config["num_timesteps"])
    if error:
        parser.error(error)
    x0_only = args.guide_x0_only if args.guide_x0_only is not None else (
        config.get("guide_x0_only", False) and sampler == "ddim")
    interval = args.guidance_interval or config.get("guidance_interval")
    settings = {**config, "guide_x0_only": x0_only, "guidance_interval": interval}
    if conditional:
        settings["guidance_scale"] = args.guidance_scale if args.guidance_scale is not None else config.get(
            "guidance_scale", 1.0)
        return frames.guidance(settings)
    weight = args.autoguidance if args.autoguidance is not None else config.get("autoguidance", 1.0)
    if weight == 1.0:
        return None
    # a run that guided eps too has its weight resolved in its config already: remapped only for x_0-only runs
    settings["autoguidance"] = image_defaults.autoguidance_weight(weight, x0_only or not config.get("guide_x0_only"),
                                                                  args.autoguidance is not None)
    try:
        return frames.guidance(settings, load_guide(args.experiment_dir, config, device))
    except CheckpointError as e:
        parser.error(str(e))


def class_index(label, config, num_classes, parser):
    """The class index of --label: a number, or one of a folder's class names."""
    names = config.get("class_names")
    if names and label in names:
        return names.index(label)
    if label.lstrip("-").isdigit() and 0 <= int(label) < num_classes:
        return int(label)
    parser.error(f"--label {label}: expected 0..{num_classes - 1}" + (f" or a class name ({', '.join(names)})"
                                                                      if names else ""))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    output = args.output or os.path.join(args.experiment_dir, "samples.npy")
    if not output.endswith(".npy"):
        parser.error(f"--output must end in .npy, got {output}")
    if os.path.exists(output) and not args.overwrite:
        parser.error(f"{output} exists; pass --overwrite to replace it")
    device = ddp.pick_device(args.device)
    try:
        model, formulation, config = load_experiment(args.experiment_dir, args.weights, device)
    except CheckpointError as e:
        parser.error(str(e))
    sampling = sampling_settings(args, config, formulation, parser)
    sampler, steps = sampling["sampler"], sampling["num_inference_steps"]
    error = formulation.sampling_error(sampler, steps, config["num_timesteps"])
    if error:
        parser.error(error)
    conditional = getattr(model, "num_classes", None) is not None
    if args.label is not None and not conditional:
        parser.error("--label needs a class-conditional experiment (trained with --class_conditional)")
    if conditional and config.get("class_names"):  # a folder's classes: which index is which
        print("classes: " + ", ".join(f"{i} = {name}" for i, name in enumerate(config["class_names"])))
    label = class_index(args.label, config, model.num_classes, parser) if args.label is not None else None
    guided = guidance_for(args, config, conditional, sampler, parser, device)

    tic = time.time()
    chunk = args.batch_size or frames.chunk_size({**config, "eval_batch_size": args.num_samples})
    samples = frames.draw(formulation, model, args.num_samples, datasets.sample_shape(config), chunk,
                          torch.Generator(device).manual_seed(args.seed), device, label, guidance=guided,
                          **sampling)
    samples = datasets.to_data_units(config, samples).numpy()  # a point file's samples in its own units
    seconds = time.time() - tic
    atomic_save_npy(output, samples)
    png = output[:-4] + ".png"
    steps_text = f"{steps or formulation.DEFAULTS.get('num_inference_steps') or config['num_timesteps']} steps"
    save_samples_png(samples, png, f"{config['dataset']}: {sampler}, {steps_text}", datasets.plot_limits(config))
    print(f"wrote {len(samples)} samples to {output} and {png} ({sampler}, {steps_text}, {seconds:.1f} s)")
    if args.score:
        score = metrics.make_scorer({**config, "eval_batch_size": len(samples)})(samples)
        print("score " + ", ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in score.items()))
    return samples


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"sample.py: error: {e}")
