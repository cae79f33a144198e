"""The frames of a training run: sample, score and draw the model as it was at an epoch.

A frame is `eval_batch_size` samples from the full reverse process. On a CPU with two or
more cores the frames are made in one worker process while training goes on: training
a small MLP at batch 32 cannot use a second core, but sampling 1,000 points x 200 steps
per frame can (docs/speed.md). Each frame's noise comes from its own generator, seeded
by (seed, frame index), so a frame is the same whichever process makes it and whenever
(after a resume too). ddpm.train hands over its build_model, build_scheduler and sample
functions (by reference: they reach the worker by name, not as code).
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

BASICS = ("frame", "epoch", "step", "loss", "seconds")  # a frame's row of metrics.csv before its score


def frame_generator(seed, frame_index, device="cpu"):
    return torch.Generator(device).manual_seed(seed * 1_000_003 + frame_index + 1)


def use_worker(config, device):
    """--frame_worker auto: a second process on a multi-core CPU, for a real amount of 2D sampling
    (it costs a process start of a few seconds)."""
    choice = config.get("frame_worker", "auto")
    if choice == "auto":
        n_frames = config["num_epochs"] // config["save_images_step"] + 1
        work = n_frames * config["eval_batch_size"] * (config["num_inference_steps"] or config["num_timesteps"])
        return (device == "cpu" and (os.cpu_count() or 1) >= 2 and work >= 2_000_000
                and not datasets.is_image_dataset(config["dataset"]))
    return choice == "on"


class FrameMaker:
    """Makes frames from a snapshot of the weights: samples, scores them, draws the PNG."""

    def __init__(self, config, exp_dir, device, core):
        build_model, build_scheduler, self.sample = core
        self.config, self.device = config, device
        self.model = build_model(config).to(device).eval()
        self.guide_model = build_model(config).to(device).eval() if config.get("guide_epoch") else None
        self.scheduler = build_scheduler(config, device)
        self.scorer = metrics.make_scorer(config)
        self.shape = (config["eval_batch_size"], *datasets.sample_shape(config))
        # images in chunks of 100: the activations of a chunk stay in cache (docs/speed.md)
        self.chunk = 100 if datasets.is_image_dataset(config["dataset"]) else self.shape[0]
        self.images = os.path.join(exp_dir, "images")
        os.makedirs(self.images, exist_ok=True)
        self.drawer = plotting.FrameDrawer(datasets.is_image_dataset(config["dataset"]))

    def __call__(self, frame_index, epoch, state_dict, guide_state=None):
        tic = time.perf_counter()
        self.model.load_state_dict(state_dict)
        guide, guidance = None, self.config.get("guidance_scale", 1.0)
        if guide_state is not None:  # autoguidance: away from the weights of --guide_epoch
            self.guide_model.load_state_dict(guide_state)
            guide, guidance = self.guide_model, self.config["autoguidance"]
        generator = frame_generator(self.config["seed"], frame_index, self.device)
        n, chunks = self.shape[0], []
        conditional = bool(getattr(self.model, "num_classes", None))
        for start in range(0, n, self.chunk):
            size = min(self.chunk, n - start)
            labels = None
            if conditional:  # an even spread of labels
                labels = torch.arange(start, start + size, device=self.device) % self.model.num_classes
            chunks.append(self.sample(
                self.model, self.scheduler, (size, *self.shape[1:]), sampler=self.config["sampler"],
                num_inference_steps=self.config["num_inference_steps"], eta=self.config["eta"],
                timestep_spacing=self.config.get("timestep_spacing"),
                generator=generator, device=self.device, labels=labels,
                guidance_scale=guidance, guide=guide, guidance_interval=self.config.get("guidance_interval"),
                precision=self.config.get("precision", "fp32"),
                guide_x0_only=self.config.get("guide_x0_only", False)).cpu())
        x = torch.cat(chunks)
        # class-conditional: the score also says how often the classifier agrees with the requested label
        score = self.scorer(x, torch.arange(n) % self.model.num_classes) if conditional else self.scorer(x)
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
        """core: (build_model, build_scheduler, sample) of ddpm.py."""
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
