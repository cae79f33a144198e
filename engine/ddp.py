"""Where a run executes: the device, and the processes of a torchrun launch.

    torchrun --standalone --nproc_per_node=2 ddpm.py --dataset dino

Under torchrun every process (rank) trains the same model on its own shard of each epoch with
DistributedDataParallel, which averages the gradients inside loss.backward(); rank 0 alone makes
frames and writes files. With one process every method here is a no-op, so ddpm.train reads the
same either way.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from datasets import is_image_dataset
from engine.checkpoints import CheckpointError


def pick_device(name, rank=0):
    """auto: cuda, then mps, then cpu. Under torchrun each rank takes the GPU of its local rank."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


def device_error(name):
    """A one-line reason why --device NAME can't be used here, or None."""
    if name == "cuda" and not torch.cuda.is_available():
        return "--device cuda: CUDA is not available on this machine"
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "--device mps: MPS is not available on this machine"
    return None


def init_distributed(device):
    """Join torchrun's process group when WORLD_SIZE > 1: gloo on CPU, nccl on CUDA. (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu":  # share the cores between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return dist.get_rank(), world_size


def on_rank_zero(world_size, prepare):
    """prepare() on rank 0 and its result on every rank; if it exits (a bad flag), all ranks exit."""
    if world_size == 1:
        return prepare()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [prepare()]
        finally:  # on SystemExit too: the other ranks get None and stop
            dist.broadcast_object_list(box, src=0)
    else:
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            sys.exit(2)
    return box[0]


def finish(world_size):
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


class Processes:
    """The ranks of one training run, as train() needs them, and this process's device and threads."""

    def __init__(self, rank, world_size, config):
        self.rank, self.world_size, self.device = rank, world_size, pick_device(config["device"], rank)
        self.distributed, self.main = world_size > 1, rank == 0
        # denormal floats (|x| < 1e-38) creep into activations and optimizer states as training goes
        # on and slow x86 CPUs down several times; flushing them to zero changes nothing visible
        torch.set_flush_denormal(True)
        if self.device == "cpu" and not is_image_dataset(config["dataset"]) and not self.distributed:
            torch.set_num_threads(1)  # the MLP's tiny matrices: a second thread spins against the frame worker

    def wrap(self, model):
        """What the training step calls: the model, or a DDP wrapper sharing its weights."""
        if not self.distributed:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.startswith("cuda") else None)

    def noise_generator(self, seed, order_generator):
        """The example order is the same on every rank (one generator); the noise differs by rank."""
        if not self.distributed:
            return order_generator
        return torch.Generator(self.device).manual_seed(seed + 1 + self.rank)

    def shard_size(self, n):
        return n // self.world_size

    def shard(self, perm):
        """Rank r takes positions r, r + W, r + 2W, ... of the epoch's order."""
        return perm[self.rank:self.shard_size(len(perm)) * self.world_size:self.world_size]

    def gather_rng(self, generator):
        """Every rank's generator state, for a checkpoint (collective: every rank calls it); None alone."""
        if not self.distributed:
            return None
        states = [None] * self.world_size
        dist.all_gather_object(states, generator.get_state())
        return states

    def restore_rng(self, generator, states, where):
        if not self.distributed:
            return
        if len(states or []) != self.world_size:
            raise CheckpointError(f"{where} was trained with another number of processes")
        generator.set_state(states[self.rank])

    def average_epoch(self, epoch_losses, stop_signal):
        """Replace the epoch's losses by their mean over the ranks (one all-reduce) and return the
        stop signal any rank got (they stop together, at the end of the epoch); alone: 0."""
        if not self.distributed:
            return 0
        flag = torch.tensor([float(stop_signal or 0)], device=epoch_losses.device)
        reduced = torch.cat([epoch_losses, flag])
        dist.all_reduce(reduced[:-1])                                   # sum of the ranks' losses
        dist.all_reduce(reduced[-1:], op=dist.ReduceOp.MAX)
        epoch_losses.copy_(reduced[:-1] / self.world_size)
        return int(reduced[-1])


def resolve_precision(precision, is_image, device):
    """--precision auto: bf16 for the U-Net where the hardware has native bf16 (on a 2-core
    AVX512-BF16 CPU it nearly doubled the images/s, docs/speed.md), fp32 for the 2D MLP, whose
    tiny matrices gain nothing from it."""
    if precision != "auto":
        return precision
    if not is_image:
        return "fp32"
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"
