"""The experiment around ddpm.train: the command line checked and the run launched (parse, launch), the
folder OUT_DIR/EXPERIMENT_NAME made (never clobbered) or reopened for --resume and filled with
config.json and the run's outputs, each written atomically, and the bookkeeping of the training loop
(Run: frames, checkpoints, the progress bar, Ctrl-C).
"""
import contextlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import datasets
from engine import cli, ddp, frames, plotting
from engine.checkpoints import Checkpointer, CheckpointError, StopRequest, atomic_save, atomic_save_npy, atomic_write_text
from images import defaults as image_defaults

RUN_FLAGS = ("resume", "overwrite", "quiet", "device", "frame_worker", "compile")  # how to run, not what to train


def add_flags(parser):
    """The flags that say how a run is run (RUN_FLAGS) and where its outputs go, not what it trains."""
    group = parser.add_argument_group("running: outputs, resuming, device, speed")
    add = group.add_argument
    add("--experiment_name", default="base", help="outputs go to OUT_DIR/EXPERIMENT_NAME")
    add("--out_dir", default="exps", help="folder that holds the experiments")
    add("--checkpoint_every", type=cli.positive_int, default=10, help="write checkpoint.pt every N epochs")
    add("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="auto: cuda, then mps, then cpu")
    add("--resume", action="store_true", help="continue the experiment from its checkpoint")
    add("--overwrite", action="store_true", help="replace an existing experiment")
    add("--quiet", action="store_true", help="no progress bar")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="bf16: autocast the network to bfloat16 (training and sampling); auto: bf16 for image datasets on "
             "hardware with native bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32")
    add("--compile", default="auto", choices=("auto", "on", "off"),
        help="compile the 2D training step with torch.compile (auto: runs of 5,000+ steps on a CPU; one process)")
    add("--frame_worker", default="auto", choices=("auto", "on", "off"),
        help="make frames in a second process while training (auto: 2D runs on a multi-core CPU)")


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch_losses, first_step, epoch, learning_rate):
        bad = int(np.flatnonzero(~np.isfinite(epoch_losses.cpu().numpy()))[0]) + first_step
        super().__init__(f"the loss became non-finite at step {bad} (epoch {epoch}); the learning rate "
                         f"{learning_rate:g} is probably too high (or the data has NaN/inf). "
                         "Nothing after the last good checkpoint was written.")


def parse(parser, argv, formulations):
    """(config, the flags given on the command line): the flags, what the user's own data adds
    (datasets.describe: read and checked here, before any folder exists), the formulation's defaults (or its
    paper's, --paper_settings) and the image defaults (images/defaults.py) for those not given, checked before
    any work: the image flags, flag_error below, the formulation's own check and what it measures (its
    `prepare`); the first that fails exits with one line and status 2. formulations: ddpm.FORMULATIONS."""
    config = vars(parser.parse_args(argv))  # first: -h prints the help with the defaults
    given = cli.flags_given(parser, argv)
    try:  # the user's own data read and checked, what it adds to the config (a units map, image size, ...)
        config = datasets.describe(config, given)
    except datasets.DataError as e:
        parser.error(str(e))
    formulation = formulations[config["objective"]]
    own = formulation.PAPER if config.get("paper_settings") else formulation.DEFAULTS
    config.update({k: v for k, v in own.items() if k not in given})  # before the image defaults that follow them
    config = image_defaults.apply(config, given)
    error = image_defaults.flag_error(config) or flag_error(config, given, formulations)
    if error:
        parser.error(error)
    try:
        config = formulation.prepare(config, given)  # EDM measures sigma_data, reflow reads its teacher
        formulation(config)  # built once: a schedule that can't be made is a ValueError
    except (ValueError, datasets.DataError) as e:
        parser.error(str(e))
    return config, given


def flag_error(config, given=(), formulations=None):
    """Why this run can't start here (flags that exclude each other, a flag of another formulation, its
    sampler, the MLP's embedding, its data, its device, the memory a frame needs), in one line; None if it can."""
    if config["resume"] and config["overwrite"]:
        return "--resume and --overwrite exclude each other"
    formulation = formulations[config["objective"]]
    for flag in [f for f in sorted(given) if f not in formulation.FLAGS]:
        owners = [name for name, other in formulations.items() if flag in other.FLAGS]
        if owners:
            return f"--{flag} is for --objective {' or '.join(owners)}; --objective {config['objective']} does not use it"
    error = formulation.sampling_error(config["sampler"], config["num_inference_steps"], config["num_timesteps"])
    if error:
        return error
    odd = config["embedding_size"] % 2 and "sinusoidal" in (config["time_embedding"], config["input_embedding"])
    if odd and not datasets.is_image_dataset(config["dataset"]):
        return f"--embedding_size must be even for sinusoidal embeddings, got {config['embedding_size']}"
    try:
        datasets.check_available(config)
    except datasets.DataError as e:
        return str(e)
    return ddp.device_error(config["device"]) or frames.memory_error(config)


def launch(config, parser, given, train):
    """Run train(config, exp_dir, resume, rank=..., world_size=...) as ddpm.py's main: on the device, under
    torchrun when launched so, in a new (or the resumed) experiment folder; report the result."""
    device = ddp.pick_device(config["device"])
    config["precision"] = ddp.resolve_precision(config["precision"], datasets.is_image_dataset(config["dataset"]), device)
    rank, world_size = ddp.init_distributed(device)
    exp_dir, config = ddp.on_rank_zero(world_size, lambda: prepare(config, parser, given))
    if rank == 0:
        batch = f" x {world_size} processes (global batch {config['train_batch_size'] * world_size})"
        print(f"device: {ddp.pick_device(config['device'], rank)}{batch if world_size > 1 else ''}; "
              f"writing to {exp_dir}", flush=True)
        write_config(exp_dir, config, world_size)
    try:
        result = train(config, exp_dir, resume=config["resume"], rank=rank, world_size=world_size)
    except (NonFiniteLoss, CheckpointError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
    except OSError as e:  # disk full or folder gone mid-run
        kept = ("the last complete checkpoint.pt is kept" if os.path.exists(os.path.join(exp_dir, "checkpoint.pt"))
                else "no checkpoint had been written yet")
        sys.exit(f"{parser.prog}: error: cannot write the outputs ({e.strerror or e}); {kept}")
    finally:
        ddp.finish(world_size)
    if rank == 0:
        print(report(result, exp_dir))
    return result


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
    n_frames = frames.frame_count(config)
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


def write_outputs(exp_dir, config, model, ema_model, losses, frame_list, table, guide=None):
    """model.pth, model_ema.pth, model_guide.pth (autoguidance's weights), loss.npy, loss.png,
    frames.npy and metrics.csv, each atomically. (The frame PNGs are drawn as the frames are made.)"""
    atomic_save(model.state_dict(), os.path.join(exp_dir, "model.pth"))
    if ema_model is not None:
        atomic_save(ema_model.state_dict(), os.path.join(exp_dir, "model_ema.pth"))
    if guide is not None:
        atomic_save(guide, os.path.join(exp_dir, "model_guide.pth"))
    losses = losses.cpu().numpy()
    shape = (0, config["eval_batch_size"], *datasets.sample_shape(config))
    atomic_save_npy(os.path.join(exp_dir, "loss.npy"), losses)
    atomic_save_npy(os.path.join(exp_dir, "frames.npy"), torch.stack(frame_list).numpy() if frame_list else np.zeros(shape))
    atomic_write_text(os.path.join(exp_dir, "metrics.csv"), pd.DataFrame(table).to_csv(index=False, float_format="%.6g"))
    plotting.draw_loss(losses, os.path.join(exp_dir, "loss.png"))


class Run:
    """The bookkeeping around the loop of ddpm.train: its clock and progress bar, the frames (engine/frames.py)
    and checkpoints (engine/checkpoints.py), the loss check at the end of each epoch, a stop on Ctrl-C
    between two steps, and the outputs at the end. Rank 0 alone writes."""

    def __init__(self, config, exp_dir, ranks, model, ema_model, optimizer, losses, order_generator,
                 noise_generator, core, started, log):
        """core: (build_model, the formulation's class) of ddpm.py, for the frames."""
        self.config, self.exp_dir, self.ranks, self.log = config, exp_dir, ranks, log
        self.model, self.ema_model, self.losses = model, ema_model, losses
        self.sampled_model = ema_model if ema_model is not None else model  # the weights frames and the guide use
        self.frames = frames.Frames(config, exp_dir, ranks.device, core) if ranks.main else None
        self.checkpoint = Checkpointer(os.path.join(exp_dir, "checkpoint.pt"), model, ema_model, optimizer, losses,
                                       order_generator, noise_generator, self.frames, ranks)
        self.started, self.bar, self.stop_request = started, None, StopRequest()

    def seconds(self):
        return time.time() - self.started

    def resume(self):
        """(epoch, batch, step, perm) to continue from, the checkpoint loaded into the run."""
        epoch, batch, step, perm, seconds = self.checkpoint.restore()
        self.started -= seconds
        if self.ranks.main:
            self.log(f"resuming {self.exp_dir} at epoch {epoch}, step {step}")
        return epoch, batch, step, perm

    @contextlib.contextmanager
    def progress(self, total_steps, step):
        """The progress bar, and Ctrl-C / SIGTERM turned into a request that the loop answers between steps."""
        self.bar = tqdm(total=total_steps, initial=step, desc=self.config["experiment_name"], unit="step",
                        mininterval=0.5, dynamic_ncols=True,
                        disable=self.config.get("quiet", False) or not self.ranks.main)
        with self.stop_request:
            yield

    def after_step(self, epoch, batch, step, perm):
        """A stop requested during the step: checkpoint here (under torchrun: all ranks, at the epoch's end)."""
        if self.stop_request.signal is not None and not self.ranks.distributed:
            self.stop(epoch, batch, step, perm)

    def end_of_epoch(self, epoch, step, steps_per_epoch):
        """The epoch's loss checked (non-finite: stop, the last checkpoint kept) and shown; autoguidance's guide
        kept at its epoch; a frame every --save_images_step epochs; a checkpoint every --checkpoint_every."""
        epoch_losses = self.losses[step - steps_per_epoch:step]
        # one host sync (under torchrun one all-reduce) per epoch; loss.npy: the ranks' mean
        stop_signal = self.ranks.average_epoch(epoch_losses, self.stop_request.signal)
        epoch_loss = float(epoch_losses.mean())
        if not math.isfinite(epoch_loss):
            self.bar.close()
            if self.frames is not None:
                self.frames.close()
            raise NonFiniteLoss(epoch_losses, step - steps_per_epoch, epoch, self.config["learning_rate"])
        self.bar.update(steps_per_epoch)
        score = self.frames.latest_score() if self.frames is not None else None
        if score is not None:
            self.bar.set_postfix(loss=f"{epoch_loss:.3f}", score=f"{score['score']:.4f}",
                                 floor=f"{score['floor']:.4f}", refresh=False)
        last_epoch = epoch == self.config["num_epochs"] - 1
        if self.ranks.main and epoch + 1 == self.config.get("guide_epoch"):  # autoguidance's weaker model, kept
            self.frames.keep_guide(self.sampled_model.state_dict())
        if self.ranks.main and ((epoch + 1) % self.config["save_images_step"] == 0 or last_epoch):
            row = {"frame": len(self.frames.rows), "epoch": epoch, "step": step, "loss": epoch_loss,
                   "seconds": self.seconds()}
            self.frames.submit(row, self.sampled_model.state_dict())
        if (epoch + 1) % self.config["checkpoint_every"] == 0 or last_epoch:
            self.checkpoint.save(epoch + 1, 0, step, None, self.seconds(), wait=last_epoch)
        if stop_signal:
            self.stop(epoch + 1, 0, step, None, stop_signal)

    def stop(self, epoch, batch, step, perm, signum=None):
        """Ctrl-C or SIGTERM: a checkpoint and the outputs so far, then exit 130 / 143."""
        signum = signum or self.stop_request.signal
        self.checkpoint.save(epoch, batch, step, perm, self.seconds())
        if self._write(step) is not None:
            self.log(f"{self.stop_request.name(signum)}: stopped at step {step} (epoch {epoch}); checkpoint written. "
                     f"Continue with: python ddpm.py --experiment_name {self.config['experiment_name']} "
                     f"--out_dir {self.config['out_dir']} --resume")
        sys.exit(self.stop_request.exit_status(signum))

    def finish(self, step):
        """Every output written; the final score and the timings (None on the other ranks)."""
        written = self._write(step)
        if written is None:
            return None
        table, loop_seconds = written
        return {**{k: table[-1][k] for k in ("score", "floor", "loss")}, "steps": step, "frames": len(table),
                "loop_seconds": loop_seconds, "seconds": self.seconds(), "parallel_frames": self.frames.parallel,
                "sampling_seconds": self.frames.seconds["sampling"], "drawing_seconds": self.frames.seconds["drawing"]}

    def _write(self, step):
        self.bar.close()
        if not self.ranks.main:
            return None
        frame_list, table = self.frames.finished()
        self.frames.close()
        loop_seconds = self.seconds()
        write_outputs(self.exp_dir, self.config, self.model, self.ema_model, self.losses[:step], frame_list, table,
                      self.frames.guide)
        return table, loop_seconds


def report(result, exp_dir):
    """The two lines ddpm.py prints at the end of a run."""
    where = "in a worker process, alongside training" if result["parallel_frames"] else "inline"
    return (f"done in {result['seconds']:.1f} s ({result['steps']} steps, {result['frames']} frames): "
            f"final score {result['score']:.5g} (noise floor {result['floor']:.5g}, "
            f"ratio {result['score'] / result['floor']:.2f}), outputs in {exp_dir}\n"
            f"time: training loop {result['loop_seconds']:.1f} s; frames {where}: sampling "
            f"{result['sampling_seconds']:.1f} s, drawing {result['drawing_seconds']:.1f} s")
