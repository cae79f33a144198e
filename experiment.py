"""The experiment folder OUT_DIR/EXPERIMENT_NAME: made (never clobbered), reopened for --resume,
and filled with config.json and the run's outputs, each written atomically.
"""
import json
import os
import shutil

import numpy as np
import pandas as pd
import torch

import datasets
import plotting
from checkpoints import atomic_save, atomic_save_npy, atomic_write_text

RUN_FLAGS = ("resume", "overwrite", "quiet", "device", "frame_worker", "compile")  # how to run, not what to train


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch_losses, first_step, epoch, learning_rate):
        bad = int(np.flatnonzero(~np.isfinite(epoch_losses.cpu().numpy()))[0]) + first_step
        super().__init__(f"the loss became non-finite at step {bad} (epoch {epoch}); the learning rate "
                         f"{learning_rate:g} is probably too high (or the data has NaN/inf). "
                         "Nothing after the last good checkpoint was written.")


def prepare(config, parser, given):
    """(exp_dir, config) of a new experiment folder, or of the one --resume continues, whose saved
    config.json wins except for the flags in RUN_FLAGS and --num_epochs. `given`: the flags on the
    command line; one that contradicts the saved experiment is an error."""
    exp_dir = os.path.join(config["out_dir"], config["experiment_name"])
    config_path = os.path.join(exp_dir, "config.json")
    exists = os.path.isdir(exp_dir) and any(os.scandir(exp_dir))
    if config["resume"]:
        if not os.path.exists(os.path.join(exp_dir, "checkpoint.pt")):
            parser.error(f"--resume: no checkpoint in {exp_dir}")
        try:
            with open(config_path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            parser.error(f"--resume: cannot read {config_path}: {e}")
        for key in [k for k in config if k in given and k not in RUN_FLAGS + ("num_epochs",)]:
            if saved.get(key) != config[key]:
                parser.error(f"--resume: --{key} {config[key]} differs from the experiment's {saved.get(key)}")
        if "num_epochs" in given:
            saved["num_epochs"] = config["num_epochs"]
        saved.update({k: config[k] for k in RUN_FLAGS})
        return exp_dir, saved
    if exists and not config["overwrite"]:
        parser.error(f"{exp_dir} already exists; pass --resume to continue it or --overwrite to replace it")
    try:
        if exists:
            shutil.rmtree(exp_dir)
        os.makedirs(exp_dir, exist_ok=True)
        probe = os.path.join(exp_dir, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        parser.error(f"cannot write to {exp_dir}: {e.strerror or e}")
    check_disk_space(config, exp_dir, parser)
    return exp_dir, config


def check_disk_space(config, exp_dir, parser):
    """Refuse to start when the outputs (frames twice: frames.npy and the checkpoint; PNGs) can't fit."""
    n_frames = config["num_epochs"] // config["save_images_step"] + 1
    frame_bytes = config["eval_batch_size"] * int(np.prod(datasets.sample_shape(config))) * 4
    need = 2 * n_frames * frame_bytes + n_frames * 60_000 + 20_000_000
    free = shutil.disk_usage(exp_dir).free
    if free < need:
        parser.error(f"not enough disk space in {exp_dir}: the run needs about {need / 1e6:.0f} MB, "
                     f"{free / 1e6:.0f} MB are free")


def write_config(exp_dir, config, world_size):
    """config.json: every setting of the run (not how it was run), enough to rebuild model and scheduler."""
    saved = {k: v for k, v in config.items() if k not in RUN_FLAGS}
    saved["world_size"] = world_size
    atomic_write_text(os.path.join(exp_dir, "config.json"), json.dumps(saved, indent=2) + "\n")


def write_outputs(exp_dir, config, model, ema_model, losses, frames, table):
    """model.pth, model_ema.pth, loss.npy, loss.png, frames.npy and metrics.csv, each atomically.
    (The frame PNGs are drawn as the frames are made.)"""
    atomic_save(model.state_dict(), os.path.join(exp_dir, "model.pth"))
    if ema_model is not None:
        atomic_save(ema_model.state_dict(), os.path.join(exp_dir, "model_ema.pth"))
    losses = losses.cpu().numpy()
    shape = (0, config["eval_batch_size"], *datasets.sample_shape(config))
    atomic_save_npy(os.path.join(exp_dir, "loss.npy"), losses)
    atomic_save_npy(os.path.join(exp_dir, "frames.npy"), torch.stack(frames).numpy() if frames else np.zeros(shape))
    atomic_write_text(os.path.join(exp_dir, "metrics.csv"), pd.DataFrame(table).to_csv(index=False, float_format="%.6g"))
    plotting.draw_loss(losses, os.path.join(exp_dir, "loss.png"))
