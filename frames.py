"""The frames of a training run: sample, score and draw the model as it was at an epoch.

A frame is `eval_batch_size` samples from the full reverse process. On a CPU with two or
more cores the frames are made in one worker process while training goes on: training
a small MLP at batch 32 cannot use a second core, but sampling 1,000 points x 50 steps
per frame can (see bench.py). Each frame's noise comes from its own generator, seeded
by (seed, frame index), so a frame is the same whichever process makes it and whenever
(after a resume too).
"""
import concurrent.futures
import multiprocessing
import os
import signal
import time

import torch

import datasets
import metrics
import plotting


def frame_generator(seed, frame_index, device="cpu"):
    return torch.Generator(device).manual_seed(seed * 1_000_003 + frame_index + 1)


class FrameMaker:
    """Makes frames from a snapshot of the weights: samples, scores them, draws the PNG."""

    def __init__(self, config, exp_dir, device):
        import ddpm  # here, not at the top: ddpm imports this module
        self.ddpm, self.config, self.device = ddpm, config, device
        self.model = ddpm.build_model(config).to(device).eval()
        self.scheduler = ddpm.build_scheduler(config, device)
        self.scorer = metrics.make_scorer(config)
        self.shape = (config["eval_batch_size"], *datasets.sample_shape(config))
        self.chunk = 100 if datasets.is_image_dataset(config["dataset"]) else self.shape[0]
        self.images = os.path.join(exp_dir, "images")
        os.makedirs(self.images, exist_ok=True)
        self.drawer = plotting.FrameDrawer(datasets.is_image_dataset(config["dataset"]))

    def __call__(self, frame_index, epoch, state_dict):
        tic = time.perf_counter()
        self.model.load_state_dict(state_dict)
        generator = frame_generator(self.config["seed"], frame_index, self.device)
        n, chunks = self.shape[0], []
        for start in range(0, n, self.chunk):  # images: ~3x faster in chunks than in one batch of 1,000
            size = min(self.chunk, n - start)
            labels = None
            if getattr(self.model, "num_classes", None):  # class-conditional: an even spread of labels
                labels = torch.arange(start, start + size, device=self.device) % self.model.num_classes
            chunks.append(self.ddpm.sample(
                self.model, self.scheduler, (size, *self.shape[1:]), sampler=self.config["sampler"],
                num_inference_steps=self.config["num_inference_steps"], eta=self.config["eta"],
                generator=generator, device=self.device, labels=labels,
                guidance_scale=self.config.get("guidance_scale", 1.0),
                precision=self.config.get("precision", "fp32")).cpu())
        x = torch.cat(chunks)
        score = self.scorer(x)
        sampled = time.perf_counter()
        self.drawer.draw(x.numpy(), os.path.join(self.images, f"{frame_index:04d}.png"), f"epoch {epoch + 1}")
        return frame_index, x, score, {"sampling": sampled - tic, "drawing": time.perf_counter() - sampled}


_worker_maker = None


def _start_worker(config, exp_dir):
    global _worker_maker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which then waits for us
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the trainer does, so frames match whichever process makes them
    _worker_maker = FrameMaker(config, exp_dir, "cpu")


def _run_in_worker(frame_index, epoch, state_dict):
    return _worker_maker(frame_index, epoch, state_dict)


class Frames:
    """Hands frame jobs to a worker process (parallel=True) or makes them at once, and keeps
    the finished frames in order: `done` maps frame index -> (samples, score)."""

    def __init__(self, config, exp_dir, device, parallel):
        self.done = {}
        self.unmade = {}  # frame index -> (epoch, weights) of a frame submitted but not made yet
        self.pending = []  # (frame index, future) of the jobs handed to the worker, in order
        self.seconds = {"sampling": 0.0, "drawing": 0.0}  # spent making frames, in whichever process
        self.config, self.exp_dir, self.device, self.maker = config, exp_dir, device, None
        if parallel:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(config, exp_dir))
        else:
            self.pool, self.maker = None, FrameMaker(config, exp_dir, device)

    def submit(self, frame_index, epoch, weights):
        """Make a frame from `weights` (a state dict), copied at once: training goes on changing them."""
        state_dict = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        self.unmade[frame_index] = (epoch, state_dict)
        if self.pool is None:
            self._store(self.maker(frame_index, epoch, state_dict))
        else:
            self.pending.append((frame_index, self.pool.submit(_run_in_worker, frame_index, epoch, state_dict)))

    def collect(self, wait=False):
        """Move finished jobs into `done`; with wait=True, all of them: this process, idle while it
        waits, makes the frames the worker has not started, from the last one back while the worker
        goes on from the first (the classic workload, run alone: 73 s -> 55 s)."""
        while wait and self.pending and self.pending[-1][1].cancel():
            frame_index, _ = self.pending.pop()
            if self.maker is None:
                self.maker = FrameMaker(self.config, self.exp_dir, self.device)
            self._store(self.maker(frame_index, *self.unmade[frame_index]))
        still = []
        for frame_index, future in self.pending:
            if wait or future.done():
                self._store(future.result())
            else:
                still.append((frame_index, future))
        self.pending = still

    def unfinished(self):
        """[(frame index, weights)] of the frames submitted but not made yet."""
        return [(i, weights) for i, (_, weights) in sorted(self.unmade.items())]

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
