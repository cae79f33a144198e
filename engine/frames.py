"""The frames of a training run: sample, score and draw the model as it was at an epoch.

A frame is `eval_batch_size` samples from the reverse process. On a CPU with two or more cores
the frames of a 2D run are made in one worker process while training goes on: training the MLP
(one thread) cannot use a second core, but sampling 1,000 points x 200 steps per frame can
(docs/speed.md). `draw` is the sampling loop that sample.py uses too. Each frame's noise comes from its own generator, seeded
by (seed, frame index), so a frame is the same whichever process makes it and whenever
(after a resume too). ddpm.train hands over its build_model function and its formulation's class (by reference: they
reach the worker by name, not as code).
"""
import concurrent.futures
import math
import multiprocessing
import os
import signal
import time

import torch

import datasets
from engine import metrics, plotting
from extensions.guidance import Guidance

BASICS = ("frame", "epoch", "step", "loss", "seconds")  # a frame's row of metrics.csv before its score


def frame_generator(seed, frame_index, device="cpu"):
    return torch.Generator(device).manual_seed(seed * 1_000_003 + frame_index + 1)


def frame_count(config):
    """How many frames a run makes at most: one every --save_images_step epochs, and one after the last."""
    return config["num_epochs"] // config["save_images_step"] + 1


def chunk_size(config):
    """Samples per call of the sampler: images in chunks of 100, whose activations stay in cache (docs/speed.md)."""
    return 100 if datasets.is_image_dataset(config["dataset"]) else config["eval_batch_size"]


def memory_error(config):
    """Why a frame of --eval_batch_size samples can't fit in this machine's memory, in one line; None if it can.
    A 2D frame's score compares every pair of its points with a fresh sample as large (metrics.py): three
    n x n float64 distance matrices; its sampling holds n x hidden_size activations."""
    n = config["eval_batch_size"]
    if datasets.is_image_dataset(config["dataset"]):  # a chunk's U-Net activations, the frame itself (28x28: MNIST)
        pixels = math.prod(datasets.sample_shape(config))
        need = min(n, 100) * 2_000_000 * pixels // 784 + n * pixels * 4 * 3
    else:
        need = 8 * n * n + n * config.get("hidden_size", 128) * 4 * 8
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > total / 2:
        return (f"--eval_batch_size {n}: a frame of that many samples needs about {need / 2**30:.0f} GiB of memory, "
                f"more than half of this machine's {total / 2**30:.0f} GiB")
    return None


def guidance(config, guide_model=None):
    """The Guidance of a run's frames (extensions/guidance.py): classifier-free guidance at --guidance_scale for a
    class-conditional run, autoguidance at --autoguidance away from `guide_model`, or none (None)."""
    if config.get("class_conditional") and config.get("guidance_scale", 1.0) != 1.0:
        scale = config["guidance_scale"]
    elif guide_model is not None and config.get("autoguidance", 1.0) != 1.0:
        scale = config["autoguidance"]
    else:
        return None
    interval = config.get("guidance_interval")
    return Guidance(scale, guide_model, tuple(interval) if interval else None, config.get("guide_x0_only", False))


def sampling_options(formulation, config):
    """The keywords of formulation.sample that a config dict sets (its SAMPLING_FLAGS: sampler, steps, ...)."""
    return {k: config.get(k) for k in formulation.SAMPLING_FLAGS}


def draw(formulation, model, n, shape, chunk, generator, device, label=None, **sampling):
    """n samples [n, *shape] on the CPU, `chunk` at a time, one generator running through them all. A
    class-conditional model draws `label`, or the labels 0, 1, ..., 9, 0, 1, ... in turn. `sampling`: the
    keywords of formulation.sample (sampler, num_inference_steps, ..., guidance)."""
    classes, chunks = getattr(model, "num_classes", None), []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        labels = None
        if classes:
            labels = (torch.full((size,), label, device=device) if label is not None
                      else torch.arange(start, start + size, device=device) % classes)
        chunks.append(formulation.sample(model, (size, *shape), generator=generator, device=device, labels=labels,
                                         **sampling).cpu())
    return torch.cat(chunks)


def use_worker(config, device):
    """--frame_worker auto: a second process on a multi-core CPU, for a real amount of 2D sampling
    (it costs a process start of a few seconds)."""
    choice = config.get("frame_worker", "auto")
    if choice == "auto":
        work = frame_count(config) * config["eval_batch_size"] * (config["num_inference_steps"] or config["num_timesteps"])
        return (device == "cpu" and (os.cpu_count() or 1) >= 2 and work >= 2_000_000
                and not datasets.is_image_dataset(config["dataset"]))
    return choice == "on"


class FrameMaker:
    """Makes frames from a snapshot of the weights: samples, scores them, draws the PNG."""

    def __init__(self, config, exp_dir, device, core):
        build_model, Formulation = core
        self.config, self.device = config, device
        self.model = build_model(config).to(device).eval()
        self.guide_model = build_model(config).to(device).eval() if config.get("guide_epoch") else None
        self.formulation = Formulation(config, device)
        self.scorer = metrics.make_scorer(config)
        self.shape = (config["eval_batch_size"], *datasets.sample_shape(config))
        self.images = os.path.join(exp_dir, "images")
        os.makedirs(self.images, exist_ok=True)
        self.drawer = plotting.FrameDrawer(datasets.is_image_dataset(config["dataset"]), datasets.plot_limits(config))

    def __call__(self, frame_index, epoch, state_dict, guide_state=None):
        tic = time.perf_counter()
        self.model.load_state_dict(state_dict)
        if guide_state is not None:  # autoguidance: away from the weights of --guide_epoch
            self.guide_model.load_state_dict(guide_state)
        config, n = self.config, self.shape[0]
        x = draw(self.formulation, self.model, n, self.shape[1:], chunk_size(config),
                 frame_generator(config["seed"], frame_index, self.device), self.device,
                 guidance=guidance(config, self.guide_model if guide_state is not None else None),
                 **sampling_options(self.formulation, config))
        x = datasets.to_data_units(config, x)  # a point file's frames in its own units (others: unchanged)
        # class-conditional: the score also says how often the classifier agrees with the requested label
        classes = getattr(self.model, "num_classes", None)
        score = self.scorer(x, torch.arange(n) % classes) if classes else self.scorer(x)
        sampled = time.perf_counter()
        self.drawer.draw(x.numpy(), os.path.join(self.images, f"{frame_index:04d}.png"), f"epoch {epoch + 1}")
        return frame_index, x, score, {"sampling": sampled - tic, "drawing": time.perf_counter() - sampled}


_worker_maker = None


def _start_worker(*maker_args):
    global _worker_maker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which then waits for us
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the trainer does, so frames match whichever process makes them
    _worker_maker = FrameMaker(*maker_args)


def _run_in_worker(frame_index, epoch, state_dict, guide_state):
    return _worker_maker(frame_index, epoch, state_dict, guide_state)


def copy_to_cpu(state_dict):
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


class Frames:
    """Hands frame jobs to a worker process (use_worker) or makes them at once, and keeps the
    finished frames and their rows of metrics.csv in order."""

    def __init__(self, config, exp_dir, device, core):
        """core: (build_model, the formulation's class) of ddpm.py."""
        self.rows = {}  # frame index -> its row of metrics.csv (the score added once it is made)
        self.done = {}  # frame index -> (samples, score)
        self.unmade = {}  # frame index -> (epoch, weights, guide weights) of a frame submitted but not made yet
        self.pending = []  # (frame index, future) of the jobs handed to the worker, in order
        self.seconds = {"sampling": 0.0, "drawing": 0.0}  # spent making frames, in whichever process
        self.guide = None  # autoguidance's weights, once kept (keep_guide)
        self.maker_args, self.maker = (config, exp_dir, device, core), None
        self.parallel = use_worker(config, device)
        if self.parallel:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(config, exp_dir, "cpu", core))
        else:
            self.pool, self.maker = None, FrameMaker(*self.maker_args)

    def keep_guide(self, weights):
        """Autoguidance: the weights (a state dict) that guide every frame from now on."""
        self.guide = copy_to_cpu(weights)

    def submit(self, row, weights):
        """Make frame row["frame"] from `weights` (a state dict), copied at once: training goes on
        changing them; guided by the kept guide weights, if any."""
        self._submit(row, copy_to_cpu(weights), self.guide)

    def _submit(self, row, weights, guide):
        frame_index = row["frame"]
        self.rows[frame_index] = row
        job = (row["epoch"], weights, guide)
        self.unmade[frame_index] = job
        if self.pool is None:
            self._store(self.maker(frame_index, *job))
        else:
            self.pending.append((frame_index, self.pool.submit(_run_in_worker, frame_index, *job)))

    def latest_score(self):
        """The score of the newest frame made so far, or None."""
        self.collect()
        return self.done[max(self.done)][1] if self.done else None

    def collect(self, wait=False):
        """Move finished jobs into `done`; with wait=True, all of them: this process, idle while it
        waits, makes the frames the worker has not started, from the last one back while the worker
        goes on from the first."""
        while wait and self.pending and self.pending[-1][1].cancel():
            frame_index, _ = self.pending.pop()
            if self.maker is None:
                self.maker = FrameMaker(*self.maker_args)
            self._store(self.maker(frame_index, *self.unmade[frame_index]))
        still = []
        for frame_index, future in self.pending:
            if wait or future.done():
                self._store(future.result())
            else:
                still.append((frame_index, future))
        self.pending = still

    def finished(self, wait=True):
        """(frames [n, ...], metric rows) of every frame made so far (wait: for the worker too)."""
        self.collect(wait=wait)
        done = sorted(self.done)
        table = [{**{k: v for k, v in self.rows[i].items() if k != "seconds"}, **self.done[i][1],
                  "seconds": self.rows[i]["seconds"]} for i in done]  # score, floor, ... before seconds
        return [self.done[i][0] for i in done], table

    def unfinished(self):
        """[(row, weights, guide weights)] of the frames submitted but not made yet: a checkpoint keeps them."""
        return [(self.rows[i], weights, guide) for i, (_, weights, guide) in sorted(self.unmade.items())]

    def restore(self, checkpoint):
        """The frames of a checkpoint: those made, and those to make now; the guide weights, if kept."""
        self.guide = checkpoint.get("guide")
        for row, frame in zip(checkpoint["metrics"], checkpoint["frames"]):
            self.rows[row["frame"]] = {k: v for k, v in row.items() if k in BASICS}
            self.done[row["frame"]] = (frame, {k: v for k, v in row.items() if k not in BASICS})
        for row, weights, *guide in checkpoint.get("pending_frames", []):  # no guide in older checkpoints
            self._submit(row, weights, guide[0] if guide else None)

    def _store(self, result):
        frame_index, x, score, seconds = result
        self.done[frame_index] = (x, score)
        del self.unmade[frame_index]
        for key, value in seconds.items():
            self.seconds[key] += value

    def close(self):
        if self.pool is not None:
            self.collect(wait=True)
            self.pool.shutdown()
