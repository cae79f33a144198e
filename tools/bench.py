"""Where the time goes: a benchmark of this machine, printed as a table and written to bench.json.

    python tools/bench.py            # about 4 minutes on a 2-core laptop CPU
    python tools/bench.py --quick    # smaller counts, for a smoke test

Measures, in one run so that ratios are fair: optimizer steps/s of the default MLP (ours and a
naive textbook loop), sampling throughput, frame drawing, the default dino run and the classic
workload end to end (wall time split into training, sampling and drawing; peak memory), and
the MNIST U-Net's images/s. The naive end-to-end figure is extrapolated from its measured parts.
"""
import os
import sys

if __name__ == "__main__":  # run as a script from anywhere: import the project from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import functools
import json
import platform
import re
import subprocess
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from tools import ablations  # noqa: E402
from engine import cli  # noqa: E402
from engine import compiled_step  # noqa: E402
import datasets  # noqa: E402
from images import defaults as image_defaults  # noqa: E402
import ddpm  # noqa: E402
from engine import plotting  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# the classic tiny-diffusion's workload: 50,000 steps at batch 32, 200 frames of 1,000 points x 50 steps
CLASSIC = cli.as_argv({**ablations.CLASSIC, "save_images_step": 1})


def default_config(**overrides):
    config = vars(ddpm.build_parser().parse_args([]))
    config.update(overrides)
    return config


def steps_per_second_ours(batch_size, steps, threads=1, compiled=True):
    """The loop of ddpm.train: a shuffled permutation, no host sync per step, and the step compiled
    into one graph (compiled_training_step) or eager (training_step, fused AdamW).
    Returns (steps/s, seconds of the first step: the compile, for the compiled one)."""
    torch.set_num_threads(threads)
    config = default_config(train_batch_size=batch_size)
    torch.manual_seed(0)
    model, scheduler = ddpm.build_model(config), ddpm.DDPM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    loss = functools.partial(ddpm.diffusion_loss, scheduler=scheduler)
    if compiled:
        optimizer_step = compiled_step.compiled_training_step(model, loss, optimizer, log=lambda message: None)
    else:
        optimizer_step = functools.partial(ddpm.training_step, model, loss, optimizer)
    data = datasets.get_dataset("dino", 8000)
    g = torch.Generator().manual_seed(0)
    losses = torch.zeros(steps)
    perm, position = torch.randperm(len(data), generator=g), 0
    tic = time.perf_counter()
    for step in range(steps + 20):
        if step == 1:
            first_step = time.perf_counter() - tic
        if step == 20:
            tic = time.perf_counter()
        if position + batch_size > len(data):
            perm, position = torch.randperm(len(data), generator=g), 0
        x = data[perm[position:position + batch_size]]
        position += batch_size
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, config["num_timesteps"], (len(x),), generator=g)
        losses[step % steps] = optimizer_step(x, noise, t)
    return steps / (time.perf_counter() - tic), first_step


def steps_per_second_naive(batch_size, steps, threads=1):
    """The textbook loop: DataLoader over a TensorDataset, default AdamW, .item() and a
    progress-bar postfix every step. One thread, like ours, so that the ratio is the loop's."""
    torch.set_num_threads(threads)
    config = default_config(train_batch_size=batch_size)
    torch.manual_seed(0)
    model, scheduler = ddpm.build_model(config), ddpm.DDPM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(datasets.get_dataset("dino", 8000)), batch_size=batch_size, shuffle=True)
    done, losses = 0, []
    # a live bar, as in the textbook loop; it writes to /dev/null so that the terminal's own
    # drawing time is left out (formatting the postfix every step is counted)
    devnull = open(os.devnull, "w")
    bar = tqdm(total=steps + 20, file=devnull)
    while done < steps + 20:
        for (x,) in loader:
            if done == 20:
                tic = time.perf_counter()
            noise = torch.randn(x.shape)
            t = torch.randint(0, config["num_timesteps"], (len(x),)).long()
            loss = F.mse_loss(model(scheduler.add_noise(x, noise, t), t), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=losses[-1], step=done)
            bar.update(1)
            done += 1
            if done >= steps + 20:
                break
    seconds = time.perf_counter() - tic
    bar.close()
    devnull.close()
    return steps / seconds


def sampling_throughput(threads, repeats):
    """Points x steps per second of the default 2D model's full reverse process (1,000 points x T steps)."""
    torch.set_num_threads(threads)
    config = default_config()
    model, scheduler = ddpm.build_model(config).eval(), ddpm.DDPM(config)
    ddpm.sample(model, scheduler, (1000, 2))
    tic = time.perf_counter()
    for _ in range(repeats):
        ddpm.sample(model, scheduler, (1000, 2))
    seconds = (time.perf_counter() - tic) / repeats
    return 1000 * scheduler.num_timesteps / seconds


def drawing_seconds(n_frames, naive):
    frames = np.random.default_rng(0).normal(size=(n_frames, 1000, 2)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        tic = time.perf_counter()
        if naive:  # a new 10x10-inch figure per frame, as the classic did
            for i, frame in enumerate(frames):
                plt.figure(figsize=(10, 10))
                plt.scatter(frame[:, 0], frame[:, 1])
                plt.xlim(-6, 6)
                plt.ylim(-6, 6)
                plt.savefig(os.path.join(folder, f"{i:04d}.png"))
                plt.close()
        else:
            plotting.draw_frames(frames, folder)
        return time.perf_counter() - tic


def run_end_to_end(name, flags, out_dir):
    """`python ddpm.py` in a subprocess: wall time, its own time split, peak resident memory."""
    cmd = ["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "ddpm.py"), "--out_dir", out_dir,
           "--experiment_name", name, "--quiet", *flags]
    if not os.path.exists("/usr/bin/time"):
        cmd = cmd[2:]
    tic = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if result.returncode != 0:
        raise SystemExit(f"bench.py: error: {name} run failed: {result.stderr.strip().splitlines()[-1]}")
    out = result.stdout
    figures = {"wall_s": wall}
    m = re.search(r"training loop ([\d.]+) s; frames (.*?): sampling ([\d.]+) s, drawing ([\d.]+) s", out)
    figures.update(training_loop_s=float(m.group(1)), frames_where=m.group(2), sampling_s=float(m.group(3)),
                   drawing_s=float(m.group(4)))
    m = re.search(r"\((\d+) steps, (\d+) frames\): final score ([\d.e-]+) \(noise floor ([\d.e-]+)", out)
    figures.update(steps=int(m.group(1)), frames=int(m.group(2)), score=float(m.group(3)), floor=float(m.group(4)))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    figures["peak_rss_mb"] = int(m.group(1)) / 1024 if m else None
    return figures


def unet_images_per_second(quick, precision="fp32"):
    config = image_defaults.apply(vars(ddpm.build_parser().parse_args(["--dataset", "mnist"])), {"dataset"})
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model, scheduler = ddpm.build_model(config), ddpm.DDPM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    B = config["train_batch_size"]
    x = torch.rand(B, 1, 28, 28) * 2 - 1
    steps = 3 if quick else 15
    for i in range(steps + 2):
        if i == 2:
            tic = time.perf_counter()
        ddpm.training_step(model, functools.partial(ddpm.diffusion_loss, scheduler=scheduler, precision=precision),
                           optimizer, x, torch.randn_like(x), torch.randint(0, 1000, (B,)))
    train_ips = steps * B / (time.perf_counter() - tic)
    model.eval()
    tic = time.perf_counter()
    ddpm.sample(model, scheduler, (64, 1, 28, 28), sampler="ddim", num_inference_steps=50)
    sample_seconds = time.perf_counter() - tic
    return {"train_images_per_s": train_ips, "ddim50_64_images_s": sample_seconds,
            "ddim50_images_per_s": 64 / sample_seconds, "unet_parameters": sum(p.numel() for p in model.parameters())}


def main():
    parser = cli.ArgumentParser(prog="tools/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke test, not a measurement)")
    parser.add_argument("--output", default="bench.json", help="where to write the figures as JSON (default: bench.json)")
    parser.add_argument("--skip_end_to_end", action="store_true", help="leave out the two full runs")
    args = parser.parse_args()
    steps = 300 if args.quick else 3000
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
               "torch": torch.__version__}

    print("measuring optimizer steps/s ...", flush=True)
    for batch in (32, 1024):
        n = steps if batch == 32 else steps // 10
        for threads in (1, 2):
            results[f"steps_per_s_b{batch}_{threads}thread_ours"], results[f"compile_s_b{batch}_{threads}thread"] = \
                steps_per_second_ours(batch, n, threads)
        results[f"steps_per_s_b{batch}_1thread_eager"] = steps_per_second_ours(batch, n, 1, compiled=False)[0]
        results[f"steps_per_s_b{batch}_naive"] = steps_per_second_naive(batch, n, threads=1)
    print("measuring sampling and drawing ...", flush=True)
    for threads in (1, 2):
        results[f"sampling_points_steps_per_s_{threads}thread"] = sampling_throughput(threads, 3 if args.quick else 10)
    n_draw = 20 if args.quick else 200
    results["drawing_200_frames_s_ours"] = drawing_seconds(n_draw, naive=False) * 200 / n_draw
    results["drawing_200_frames_s_naive"] = drawing_seconds(10, naive=True) * 20

    naive_steps = results["steps_per_s_b32_naive"]
    classic_frame_s = 1000 * 50 / results["sampling_points_steps_per_s_2thread"]  # 1,000 points x 50 steps
    results["classic_naive_estimate_s"] = (50_000 / naive_steps + 200 * classic_frame_s
                                           + results["drawing_200_frames_s_naive"])
    if not args.skip_end_to_end:
        with tempfile.TemporaryDirectory() as out_dir:
            print("running the default dino run end to end ...", flush=True)
            results["default_run"] = run_end_to_end("default", [] if not args.quick else ["--num_epochs", "10"],
                                                    out_dir)
            print("running the classic workload end to end ...", flush=True)
            classic = CLASSIC if not args.quick else cli.as_argv({**ablations.CLASSIC, "save_images_step": 1,
                                                                   "num_epochs": 10})
            results["classic_run"] = run_end_to_end("classic", classic, out_dir)
    if datasets.is_image_dataset("mnist"):
        print("measuring the MNIST U-Net ...", flush=True)
        results["mnist_unet"] = unet_images_per_second(args.quick)
        results["mnist_unet_bf16_train_images_per_s"] = unet_images_per_second(args.quick, "bf16")["train_images_per_s"]

    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print_table(results)


def print_table(r):
    rows = [("machine", r["machine"])]
    for batch in (32, 1024):
        ours1, ours2 = r[f"steps_per_s_b{batch}_1thread_ours"], r[f"steps_per_s_b{batch}_2thread_ours"]
        naive = r[f"steps_per_s_b{batch}_naive"]
        rows.append((f"steps/s, batch {batch}: ours (1 / 2 threads) | naive",
                     f"{ours1:.0f} / {ours2:.0f} | {naive:.0f}   (x{max(ours1, ours2) / naive:.1f}); "
                     f"compile {r[f'compile_s_b{batch}_1thread']:.0f} s"))
        eager = r[f"steps_per_s_b{batch}_1thread_eager"]
        rows.append(("  ours with the eager step (training_step), 1 thread", f"{eager:.0f} (x{eager / naive:.1f})"))
    for threads in (1, 2):
        rate = r[f"sampling_points_steps_per_s_{threads}thread"]
        rows.append((f"sampling, {threads} thread(s): points x steps / s",
                     f"{rate / 1e6:.2f} M ({50_000 / rate * 1000:.0f} ms per 1,000 points x 50 steps, "
                     f"{200_000 / rate * 1000:.0f} ms x 200)"))
    rows.append(("drawing 200 frames: ours | naive (new 10x10 figure)",
                 f"{r['drawing_200_frames_s_ours']:.1f} s | {r['drawing_200_frames_s_naive']:.1f} s"))
    for key, title in (("default_run", "default dino run (python ddpm.py)"),
                       ("classic_run", "classic workload (50k steps b32, 200 frames)")):
        if key in r:
            e = r[key]
            rows.append((title, f"{e['wall_s']:.1f} s wall: training loop {e['training_loop_s']:.1f} s, frames "
                                f"{e['frames_where']}: sampling {e['sampling_s']:.1f} s + drawing {e['drawing_s']:.1f} s"))
            rows.append(("  steps, frames, score / floor, peak RSS",
                         f"{e['steps']}, {e['frames']}, {e['score'] / e['floor']:.2f}, "
                         f"{e['peak_rss_mb']:.0f} MB" if e["peak_rss_mb"] else "n/a"))
    rows.append(("classic workload, naive loop (extrapolated)", f"{r['classic_naive_estimate_s']:.0f} s"))
    if "classic_run" in r:
        rows.append(("  speed-up of ours", f"x{r['classic_naive_estimate_s'] / r['classic_run']['wall_s']:.1f}"))
    if "mnist_unet" in r:
        u = r["mnist_unet"]
        rows.append(("MNIST U-Net: training images/s (fp32 | bf16)",
                     f"{u['train_images_per_s']:.0f} | {r['mnist_unet_bf16_train_images_per_s']:.0f} "
                     f"({u['unet_parameters']:,} params)"))
        rows.append(("MNIST U-Net: 64 images, 50-step DDIM", f"{u['ddim50_64_images_s']:.1f} s "
                                                            f"({u['ddim50_images_per_s']:.0f} images/s)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
