"""Draw samples from a trained experiment without retraining.

    python sample.py exps/base --num_samples 5000 --sampler ddim --num_inference_steps 20 --output dino.npy

Rebuilds the network from EXPERIMENT_DIR/config.json, loads its weights (the EMA weights,
model_ema.pth, where the run kept them; else model.pth), runs the reverse process and
writes the samples as .npy plus a PNG of them beside it.
"""
import argparse
import json
import os
import sys
import time

import torch

import cli
import datasets
import ddp
import ddpm
import image_defaults
import metrics
from checkpoints import CheckpointError, atomic_save_npy, load_weights, safe_load
from plotting import save_samples_png


def build_parser():
    p = cli.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("experiment_dir", help="an experiment folder written by ddpm.py, e.g. exps/base")
    p.add_argument("--num_samples", type=cli.positive_int, default=1000)
    p.add_argument("--sampler", choices=ddpm.SAMPLERS, default=None, help="default: the experiment's")
    p.add_argument("--num_inference_steps", type=cli.positive_int, default=None,
                   help="DDIM steps (default: the experiment's, else all T)")
    p.add_argument("--eta", type=cli.nonnegative_float, default=None, help="DDIM's eta (default: the experiment's)")
    p.add_argument("--timestep_spacing", choices=ddpm.SPACINGS, default=None,
                   help="timesteps of a few-step sampler (default: the experiment's, else the sampler's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=None, help="class to draw (class-conditional models)")
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance weight")
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
    p.add_argument("--batch_size", type=cli.positive_int, default=10000, help="samples per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--output", default=None, help="a .npy file (default: EXPERIMENT_DIR/samples.npy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--score", action="store_true",
                   help="also print the sample-quality score against fresh data, with its noise floor")
    return p


def load_experiment(experiment_dir, weights="auto", device="cpu"):
    """(model, scheduler, config) of a finished or interrupted experiment."""
    config_path = os.path.join(experiment_dir, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
        model = ddpm.build_model(config)
        scheduler = ddpm.build_scheduler(config, device)
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
    return model.to(device).eval(), scheduler, config


def load_guide(experiment_dir, config, device="cpu"):
    """Autoguidance's weaker model: the weights the run kept at its --guide_epoch (model_guide.pth)."""
    path = os.path.join(experiment_dir, "model_guide.pth")
    if not os.path.exists(path):
        raise CheckpointError(f"{experiment_dir} has no model_guide.pth (trained with --autoguidance 1?)")
    guide = ddpm.build_model(config)
    load_weights(guide, safe_load(path), path)
    return guide.to(device).eval()


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
        model, scheduler, config = load_experiment(args.experiment_dir, args.weights, device)
    except CheckpointError as e:
        parser.error(str(e))
    sampler = args.sampler or config.get("sampler", "ddpm")
    same_sampler = args.sampler in (None, config.get("sampler"))  # then the experiment's settings hold
    steps = args.num_inference_steps if args.num_inference_steps is not None else (
        config.get("num_inference_steps") if same_sampler else None)
    eta = args.eta if args.eta is not None else (config.get("eta") if same_sampler else None)
    spacing = args.timestep_spacing or (config.get("timestep_spacing") if same_sampler else None)
    error = ddpm.sampling_error(sampler, steps, scheduler.num_timesteps)
    if error:
        parser.error(error)
    conditional = getattr(model, "num_classes", None) is not None
    if args.label is not None and not conditional:
        parser.error("--label needs a class-conditional experiment (trained with --class_conditional)")
    if conditional and args.label is not None and not 0 <= args.label < model.num_classes:
        parser.error(f"--label must be in 0..{model.num_classes - 1}")
    guidance = args.guidance_scale if args.guidance_scale is not None else config.get("guidance_scale", 1.0)
    guide = None
    autoguidance = args.autoguidance if args.autoguidance is not None else config.get("autoguidance", 1.0)
    if args.guide_x0_only and sampler != "ddim":
        parser.error("--guide_x0_only is for --sampler ddim")
    x0_only = args.guide_x0_only if args.guide_x0_only is not None else (
        config.get("guide_x0_only", False) and sampler == "ddim")
    if config.get("guide_x0_only") and not x0_only and args.autoguidance is None:
        autoguidance = image_defaults.whole_step_weight(autoguidance)  # as ddpm.py picks it for such a run
    if conditional and args.autoguidance not in (None, 1.0):
        parser.error("--autoguidance is for unconditional experiments; class-conditional ones use --guidance_scale")
    if not conditional and autoguidance != 1.0:
        try:
            guide, guidance = load_guide(args.experiment_dir, config, device), autoguidance
        except CheckpointError as e:
            parser.error(str(e))

    error = ddpm.guidance_interval_error(args.guidance_interval, scheduler.num_timesteps)
    if error:
        parser.error(error)
    interval = args.guidance_interval or config.get("guidance_interval")
    shape_tail = datasets.sample_shape(config)
    generator = torch.Generator(device).manual_seed(args.seed)
    tic = time.time()
    chunks = []
    for start in range(0, args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - start)
        labels = None
        if conditional:
            labels = (torch.full((n,), args.label, device=device) if args.label is not None
                      else (torch.arange(start, start + n, device=device) % model.num_classes))
        chunks.append(ddpm.sample(model, scheduler, (n, *shape_tail), sampler=sampler,
                                  num_inference_steps=steps, eta=eta, timestep_spacing=spacing,
                                  generator=generator, device=device,
                                  labels=labels, guidance_scale=guidance, guide=guide, guidance_interval=interval,
                                  precision=config.get("precision", "fp32"), guide_x0_only=x0_only).cpu())
    samples = torch.cat(chunks).numpy()
    seconds = time.time() - tic
    atomic_save_npy(output, samples)
    png = output[:-4] + ".png"
    steps_text = f"{steps or scheduler.num_timesteps} steps"
    save_samples_png(samples, png, f"{config['dataset']}: {sampler}, {steps_text}")
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
