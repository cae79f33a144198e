"""Writing outputs atomically and loading checkpoints safely.

Every file is written to a temporary name in the same folder and renamed into place, so a
crash or Ctrl-C never leaves a half-written file, and the previous version survives until
the new one is complete. Every load uses torch.load(weights_only=True): a checkpoint from
elsewhere can hold tensors and plain containers, never code.
"""
import io
import os
import tempfile

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
    """Weights saved from a DistributedDataParallel or torch.compile wrapper load anywhere."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def safe_load(path):
    """torch.load with weights_only=True, every failure turned into a one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file")
    except Exception as e:  # truncated, foreign or not a torch file at all
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first_line[:160]})")


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
