"""Writing outputs atomically, loading checkpoints safely, and the checkpoint of a training run.

Every file is written to a temporary name in the same folder and renamed into place, so a
crash or Ctrl-C never leaves a half-written file, and the previous version survives until
the new one is complete. Every load uses torch.load(weights_only=True): a checkpoint from
elsewhere can hold tensors and plain containers, never code.

checkpoint.pt holds everything --resume needs to continue a run exactly where it stopped: the
weights, the EMA and AdamW state, the position in the epoch's order, the random generators, the
losses and the frames so far (those not made yet as their weights).
"""
import io
import os
import signal
import tempfile
import zipfile

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint or config that can't be used; the message is one line for the user."""


def _atomic_write_bytes(path, data):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npy(path, array):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    _atomic_write_bytes(path, buffer.getvalue())


def atomic_write_text(path, text):
    _atomic_write_bytes(path, text.encode())


def strip_ddp_prefix(state_dict):
    """Weights saved from a DistributedDataParallel or torch.compile wrapper load anywhere; so do MLPs saved
    before the per-axis input embedding was one module (input_embedding_x. -> input_embedding.x.)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        for axis in "xy":
            if key.startswith(f"input_embedding_{axis}."):
                key = f"input_embedding.{axis}." + key[len(f"input_embedding_{axis}."):]
        out[key] = value
    return out


def safe_load(path):
    """torch.load with weights_only=True, every failure turned into a one-line CheckpointError that says,
    in words, what is wrong with the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file")
    except Exception as e:  # truncated, damaged, foreign or not a torch file at all
        raise CheckpointError(f"{path} {why_unreadable(path, e)}")


def why_unreadable(path, error):
    """What is wrong with a file torch.load refused, for the user: the loader's own messages ("pop from
    empty list", "Invalid argument") say little."""
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive whose directory is at its end
        return "is not a PyTorch file: it is truncated or damaged, or a file of another kind"
    if "weights only load failed" in str(error).lower():
        return ("holds Python objects other than tensors and plain containers, and loading those could run "
                "code (torch.load with weights_only=True refuses them)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, RuntimeError) as e:
        damaged = str(e)
    if damaged:
        return f"is damaged: part of it ({damaged}) fails its checksum"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"is a PyTorch file that can't be read as weights ({first_line[:120]})"


def load_weights(model, state_dict, path):
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold model weights")
    try:
        model.load_state_dict(strip_ddp_prefix(state_dict))
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the model that config.json describes "
                              f"({str(e).splitlines()[0][:160]})")


CHECKPOINT_KEYS = ("model", "ema", "optimizer", "epoch", "batch", "step", "perm", "losses",
                   "frames", "metrics", "train_rng", "seconds")


def load_checkpoint(path, model, ema_model=None, optimizer=None):
    """Restore model, EMA and optimizer from checkpoint.pt; return the whole state dict."""
    state = safe_load(path)
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a tiny-diffusion training checkpoint")
    load_weights(model, state["model"], path)
    if ema_model is not None:
        if state["ema"] is None:
            raise CheckpointError(f"{path} has no EMA weights but config.json asks for --ema_decay > 0")
        load_weights(ema_model, state["ema"], path)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: optimizer state does not match the model ({e})")
    return state


class Checkpointer:
    """Writes and restores checkpoint.pt of one training run (every rank calls save together)."""

    def __init__(self, path, model, ema_model, optimizer, losses, order_generator, noise_generator,
                 frames, processes):
        self.path, self.model, self.ema_model, self.optimizer = path, model, ema_model, optimizer
        self.losses, self.order_generator, self.noise_generator = losses, order_generator, noise_generator
        self.frames, self.processes = frames, processes

    def save(self, epoch, batch, step, perm, seconds, wait=False):
        """The state after `step` optimizer steps, `batch` batches into `epoch`. Frames the worker has
        not made yet go in as their weights (wait=True: made first): waiting for them at every
        checkpoint would stall training."""
        rank_rngs = self.processes.gather_rng(self.noise_generator)
        if not self.processes.main:
            return
        frame_list, table = self.frames.finished(wait)
        atomic_save({
            "model": self.model.state_dict(), "ema": self.ema_model.state_dict() if self.ema_model else None,
            "optimizer": self.optimizer.state_dict(), "epoch": epoch, "batch": batch, "step": step,
            "perm": perm.cpu() if perm is not None else None, "losses": self.losses[:step].cpu(),
            "frames": torch.stack(frame_list) if frame_list else torch.zeros(0), "metrics": table,
            "pending_frames": self.frames.unfinished(), "guide": self.frames.guide,
            "train_rng": self.order_generator.get_state(), "rank_rngs": rank_rngs, "seconds": seconds,
        }, self.path)

    def restore(self):
        """Load the checkpoint into the run; (epoch, batch, step, perm, seconds) to continue from."""
        state = load_checkpoint(self.path, self.model, self.ema_model, self.optimizer)
        step = state["step"]
        self.losses[:step] = state["losses"][:step].to(self.losses.device)
        self.order_generator.set_state(state["train_rng"])
        self.processes.restore_rng(self.noise_generator, state.get("rank_rngs"), os.path.dirname(self.path))
        if self.frames is not None:
            self.frames.restore(state)
        perm = state["perm"].to(self.losses.device) if state["perm"] is not None else None
        return state["epoch"], state["batch"], step, perm, state["seconds"]


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the training loop checks after each step, so that a
    stop lands between two steps and the checkpoint it writes is consistent."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def exit_status(self, signum):
        return 130 if signum == signal.SIGINT else 143

    def name(self, signum):
        return "SIGINT" if signum == signal.SIGINT else "SIGTERM"
