"""The classic tiny-diffusion's eight ablation studies, reproduced with numbers.

    python tools/ablations.py learning_rate     # train that study's runs, draw static/learning_rate.png
    python tools/ablations.py all               # every study and figure; the tables into docs/ablations.md
    python tools/ablations.py -h                # the studies and their values

Each study changes one flag of the CLASSIC configuration (the one the classic's claims are
about) and keeps the seed, so rows differ only in the studied value. Each grid also gets one
row "ours (default)": plain `python ddpm.py --dataset dino` with ddpm.py's current defaults.
Every run is `python ddpm.py ...` in a subprocess (one torch thread each, up to --jobs at
a time) under exps/ablations/<run>/; a finished run is skipped, an interrupted one resumed.
"""
import os
import sys

if __name__ == "__main__":  # run as a script from anywhere: import the project from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import argparse
import json
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from engine import cli
import datasets
from engine import ddp
import ddpm
from engine import experiment
from engine.frames import frame_count
from tools import figures
from engine import metrics
from sample import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

CLASSIC = {  # the classic tiny-diffusion's configuration, pinned: ddpm.py's defaults may move
    "dataset": "dino", "dataset_size": 8000, "num_timesteps": 50, "beta_schedule": "linear",
    "beta_start": 1e-4, "beta_end": 0.02, "learning_rate": 1e-3, "train_batch_size": 32,
    "num_epochs": 200, "hidden_size": 128, "hidden_layers": 3, "embedding_size": 128,
    "time_embedding": "sinusoidal", "input_embedding": "sinusoidal", "prediction": "epsilon",
    "ema_decay": 0.0, "sampler": "ddpm", "eval_batch_size": 1000, "seed": 0,
}
STUDIES = {  # study: (the flag it varies, its values)
    "datasets": ("dataset", ["moons", "dino", "line", "circle"]),
    "learning_rate": ("learning_rate", [1e-2, 1e-3, 1e-4, 1e-5]),
    "num_timesteps": ("num_timesteps", [5, 10, 25, 50, 100, 250]),
    "beta_schedule": ("beta_schedule", ["linear", "quadratic", "cosine", "sigmoid"]),
    "hidden_size": ("hidden_size", [16, 32, 64, 128, 256, 512]),
    "num_hidden_layers": ("hidden_layers", [1, 2, 3, 4, 5]),
    "time_embedding": ("time_embedding", ["learnable", "sinusoidal", "linear", "zero"]),
    "input_embedding": ("input_embedding", ["learnable", "sinusoidal", "linear", "identity"]),
}
NUM_COLUMNS = 5  # grid columns: 1/5, 2/5, ... of training (epochs 40, 80, ..., 200 for the classic)
QUICK = {"num_epochs": 5, "dataset_size": 1000}  # --quick: a smoke test of the whole pipeline
OURS = "ours (default)"


# ---------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------

def command(name, flags, out_dir, mode=None):
    """The ddpm.py command line of one run; mode is None, "resume" or "overwrite"."""
    argv = [sys.executable, os.path.join(ROOT, "ddpm.py"), "--experiment_name", name, "--out_dir", out_dir]
    return argv + cli.as_argv(flags) + ["--quiet"] + ([f"--{mode}"] if mode else [])


def resolved(flags):
    """Every setting of the run: its flags plus ddpm.py's defaults for the rest, as config.json has them."""
    config = vars(ddpm.build_parser().parse_args(command("x", flags, "x")[2:]))
    config["precision"] = ddp.resolve_precision(config["precision"], datasets.is_image_dataset(config["dataset"]),
                                                ddp.pick_device("auto"))
    return {k: v for k, v in config.items() if k not in experiment.RUN_FLAGS + ("experiment_name", "out_dir")}


def default_config():
    """ddpm.py's defaults as its parser has them now (what `python ddpm.py` trains)."""
    return resolved({})


# what a run behaved like before a flag existed: its config.json lacks the flag
BEFORE_FLAG = {"lr_schedule": "constant", "low_noise_fraction": 0.0, "min_snr_gamma": 0.0, "clip_sample": 0.0}

# flags newer than the classic, pinned to its behaviour when this ddpm.py has them
CLASSIC.update({k: v for k, v in {"input_scale": 25.0, "precision": "fp32", **BEFORE_FLAG}.items()
                if k in default_config()})


def run_name(flag, value):
    return "classic" if value == CLASSIC[flag] else f"{flag}={value}"


def frame_step(num_epochs):
    return max(1, num_epochs // NUM_COLUMNS)


def study_runs(study, overrides=None):
    """[(row label, run name, flags)] for a study: its values, then ours (default)."""
    flag, values = STUDIES[study]
    overrides = overrides or {}
    runs = []
    for value in values:
        flags = {**CLASSIC, **overrides, flag: value}
        runs.append((str(value), run_name(flag, value), flags))
    runs.append((OURS, "ours_default", {"dataset": "dino", **overrides}))  # plain `python ddpm.py`
    for _, _, flags in runs:
        flags["save_images_step"] = frame_step(resolved(flags)["num_epochs"])
    return runs


def run_state(exp_dir, flags):
    """"done" (finished with these flags), "resume" (interrupted), "fresh" (nothing there)
    or "overwrite" (stale: other flags, or broken)."""
    if not os.path.isdir(exp_dir) or not any(os.scandir(exp_dir)):
        return "fresh"
    try:
        with open(os.path.join(exp_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return "overwrite"
    if any(saved.get(k, BEFORE_FLAG.get(k)) != v for k, v in resolved(flags).items()):
        return "overwrite"
    rows = read_metrics(exp_dir)
    finished = bool(rows) and rows[-1]["epoch"] == resolved(flags)["num_epochs"] - 1
    if finished and all(os.path.exists(os.path.join(exp_dir, f)) for f in ("frames.npy", "loss.png")):
        return "done"
    return "resume" if os.path.exists(os.path.join(exp_dir, "checkpoint.pt")) else "overwrite"


def read_metrics(exp_dir):
    """metrics.csv as a list of dicts, or None."""
    try:
        with open(os.path.join(exp_dir, "metrics.csv")) as f:
            header, *lines = f.read().split()
    except (OSError, ValueError):
        return None
    keys = header.split(",")
    return [dict(zip(keys, map(float, line.split(",")))) for line in lines]


def estimated_cost(flags):  # longest first keeps both workers busy to the end
    flags = resolved(flags)
    steps = flags["num_epochs"] * flags["dataset_size"] / flags["train_batch_size"]
    width = flags["hidden_size"] ** 2 * flags["hidden_layers"] / 128**2 / 3
    sampling = frame_count(flags) * flags["num_timesteps"] * 10
    return steps * (1 + width) + sampling


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------

RUNNING = {}  # pid: Popen, so SIGTERM can be passed on and every child checkpoints
_lock = threading.Lock()


def _forward_sigterm(signum, frame):
    with _lock:
        for process in RUNNING.values():
            process.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt


def run_all(runs, out_dir, jobs, force=False):
    """Run the distinct runs [(name, flags)] up to `jobs` at a time. Returns {name: error or None}."""
    todo = []
    for name, flags in runs:
        state = "overwrite" if force else run_state(os.path.join(out_dir, name), flags)
        if state == "done":
            print(f"  skip {name} (done)", flush=True)
        else:
            todo.append((name, flags, {"fresh": None}.get(state, state)))
    todo.sort(key=lambda run: -estimated_cost(run[1]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    counter = iter(range(1, len(todo) + 1))
    errors = {}

    def launch(argv):
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with _lock:
            RUNNING[process.pid] = process
        output, _ = process.communicate()
        with _lock:
            RUNNING.pop(process.pid)
        return process.returncode, (output.strip().splitlines() or ["(no output)"])[-1]

    def one(name, flags, mode):
        with _lock:
            k = next(counter)
        print(f"  [{k}/{len(todo)}] {name}: {'resuming' if mode == 'resume' else 'training'}", flush=True)
        started = time.time()
        argv = command(name, flags, out_dir, mode)
        returncode, last_line = launch(argv)
        if mode == "resume" and returncode not in (0, 130, 143):  # an unusable checkpoint: start over
            print(f"  [{k}/{len(todo)}] {name}: cannot resume ({last_line}); training from scratch", flush=True)
            argv = command(name, flags, out_dir, "overwrite")
            returncode, last_line = launch(argv)
        if returncode in (130, 143):
            errors[name] = "stopped"
            print(f"  [{k}/{len(todo)}] {name}: stopped, checkpoint written", flush=True)
            return
        if returncode != 0:
            errors[name] = last_line
            print(f"  [{k}/{len(todo)}] {name}: FAILED ({last_line})\n    command: {' '.join(argv)}", flush=True)
            return
        rows = read_metrics(os.path.join(out_dir, name))
        print(f"  [{k}/{len(todo)}] {name}: score {rows[-1]['score']:.4g} (floor {rows[-1]['floor']:.4g}) "
              f"in {time.time() - started:.0f} s", flush=True)

    previous = signal.signal(signal.SIGTERM, _forward_sigterm)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(one, *run) for run in todo]:
            future.result()
    except KeyboardInterrupt:  # the children got SIGINT/SIGTERM too and write their checkpoints
        pool.shutdown(wait=True, cancel_futures=True)
        print("interrupted: run the same command again to continue", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
    return errors


# ---------------------------------------------------------------------------------------
# Results: the grids and the tables
# ---------------------------------------------------------------------------------------

def load_result(exp_dir):
    """Frames, their epochs and the final numbers of one run, or None if it has none."""
    rows = read_metrics(exp_dir)
    if not rows or not os.path.exists(os.path.join(exp_dir, "frames.npy")):
        return None
    frames = np.load(os.path.join(exp_dir, "frames.npy"))
    final = rows[-1]
    return {"frames": frames, "epochs": [int(r["epoch"]) + 1 for r in rows], "score": final["score"],
            "floor": final["floor"], "loss": final["loss"], "seconds": final["seconds"]}


def missing(out_dir, name):
    return "failed" if os.path.isdir(os.path.join(out_dir, name)) else "not run"


def pick_columns(epochs, num_epochs):
    """For each column k/NUM_COLUMNS of training, the index of the frame nearest to it."""
    targets = [num_epochs * k / NUM_COLUMNS for k in range(1, NUM_COLUMNS + 1)]
    return [int(np.argmin([abs(e - target) for e in epochs])) for target in targets]


def draw_study(study, runs, out_dir, path):
    flag, _ = STUDIES[study]
    classic_epochs = runs[0][2]["num_epochs"]
    titles = [f"epoch {round(classic_epochs * k / NUM_COLUMNS)}" for k in range(1, NUM_COLUMNS + 1)]
    rows = []
    for label, name, flags in runs:
        result = load_result(os.path.join(out_dir, name))
        if result is None:
            rows.append({"label": label, "caption": missing(out_dir, name), "cells": [None] * NUM_COLUMNS})
            continue
        picks = pick_columns(result["epochs"], resolved(flags)["num_epochs"])
        notes = ["" if result["epochs"][i] == round(classic_epochs * (k + 1) / NUM_COLUMNS)
                 else f"epoch {result['epochs'][i]}" for k, i in enumerate(picks)]
        notes[-1] = (notes[-1] + "  " if notes[-1] else "") + f"{result['score'] / result['floor']:.1f}x floor"
        rows.append({"label": label, "cells": [result["frames"][i] for i in picks], "notes": notes,
                     "caption": "ddpm.py defaults" if label == OURS else None})
    figures.draw_grid(rows, titles, path, f"{study}: --{flag}  (score = energy distance to fresh data)")


def sharpness(points, dataset, n=1000):
    """(mean distance from each sample to the nearest of 10,000 fresh data points, the same for
    n fresh data points): how far samples stray from the shape, e.g. fuzz at the line's corners."""
    reference = datasets.get_dataset(dataset, 10_000, seed=30_000)
    points = torch.as_tensor(points)[torch.isfinite(torch.as_tensor(points)).all(dim=1)]
    data = datasets.get_dataset(dataset, n, seed=40_000)
    return (metrics.nearest_neighbour_distance(points, reference),
            metrics.nearest_neighbour_distance(data, reference))


def study_table(study, runs, out_dir):
    flag, _ = STUDIES[study]
    lines = [f"### {study} (`--{flag}`)", "",
             "| value | final score | floor | score / floor | final mean loss | training s | ᾱ_T | nn distance (data) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, name, flags in runs:
        r = load_result(os.path.join(out_dir, name))
        config = resolved(flags)
        alpha_bar_T = float(ddpm.DDPM(config).alphas_cumprod[-1])
        if r is None:
            lines.append(f"| {label} | {missing(out_dir, name)} | | | | | {alpha_bar_T:.2f} | |")
        else:
            nn, nn_data = sharpness(r["frames"][-1], config["dataset"])
            lines.append(f"| {label} | {r['score']:.4g} | {r['floor']:.4g} | {r['score'] / r['floor']:.2f} "
                         f"| {r['loss']:.4f} | {r['seconds']:.0f} | {alpha_bar_T:.2f} | {nn:.3f} ({nn_data:.3f}) |")
    return "\n".join(lines) + "\n"


def write_tables(studies, overrides, out_dir, path):
    """Each study's table into `path` between its markers <!-- table: STUDY --> and <!-- /table -->
    (docs/ablations.md keeps its prose around them); a new file of the tables where there is none."""
    text = open(path).read() if os.path.exists(path) else "# Ablation tables\n\nWritten by `python tools/ablations.py all`.\n"
    for study in studies:
        table = f"<!-- table: {study} -->\n{study_table(study, study_runs(study, overrides), out_dir)}<!-- /table -->"
        pattern = re.compile(rf"<!-- table: {study} -->.*?<!-- /table -->", re.S)
        text = pattern.sub(lambda _: table, text) if pattern.search(text) else text + "\n" + table + "\n"
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------
# The forward / reverse pictures and the animation
# ---------------------------------------------------------------------------------------

def reverse_trajectory(exp_dir, n=1000, seed=0):
    model, scheduler, config = load_experiment(exp_dir)  # EMA weights where the run kept them
    generator = torch.Generator().manual_seed(seed)
    return ddpm.sample(model, scheduler, (n, 2), sampler=config["sampler"],
                       num_inference_steps=config.get("num_inference_steps"), eta=config.get("eta", 0.0),
                       generator=generator, trajectory=True).numpy()


def draw_pictures(out_dir, static_dir):
    """forward.png, reverse.png and animation.gif from the classic and ours (default) runs."""
    x0 = datasets.get_dataset("dino", 1000, seed=1)
    schedules = []
    for label, name in (("classic", "classic"), (OURS, "ours_default")):
        with open(os.path.join(out_dir, name, "config.json")) as f:
            schedules.append((label, ddpm.DDPM(json.load(f)), x0))
    figures.draw_forward(schedules, os.path.join(static_dir, "forward.png"))
    trajectories = [(label, reverse_trajectory(os.path.join(out_dir, name)))
                    for label, name in (("classic", "classic"), (OURS, "ours_default"))]
    figures.draw_reverse(trajectories, os.path.join(static_dir, "reverse.png"))
    scheduler = schedules[1][1]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    forward = [x0.numpy()] + [scheduler.add_noise(x0, noise, torch.full((len(x0),), t)).numpy()
                              for t in range(scheduler.num_timesteps)]
    figures.draw_animation(forward, trajectories[1][1], os.path.join(static_dir, "animation.gif"))


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def build_parser():
    listing = "\n".join(f"  {s:<18} --{flag}: {', '.join(map(str, values))}" for s, (flag, values) in STUDIES.items())
    p = cli.ArgumentParser(description="Run the ablation studies of tiny-diffusion and draw their grids.",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=f"studies (each also gets a row '{OURS}'):\n{listing}\n  all                "
                                   "every study, forward.png, reverse.png, animation.gif, the tables of docs/ablations.md")
    p.add_argument("study", help="a study name (below) or 'all'")
    p.add_argument("--jobs", type=cli.positive_int, default=os.cpu_count() or 1, help="trainings at once")
    p.add_argument("--force", action="store_true", help="retrain runs whose outputs exist")
    p.add_argument("--out_dir", default=None, help="where the runs go (default: exps/ablations)")
    p.add_argument("--static_dir", default=None, help="where the figures go (default: static)")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tiny runs: a smoke test
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.study != "all" and args.study not in STUDIES:
        parser.error(f"unknown study {args.study!r}; choose from {', '.join(STUDIES)} or all")
    studies = list(STUDIES) if args.study == "all" else [args.study]
    overrides = dict(QUICK) if args.quick else {}
    args.out_dir = args.out_dir or ("exps/ablations_quick" if args.quick else "exps/ablations")
    args.static_dir = args.static_dir or (os.path.join(args.out_dir, "static") if args.quick else "static")
    os.makedirs(args.static_dir, exist_ok=True)
    started = time.time()
    plan = {name: flags for study in studies for _, name, flags in study_runs(study, overrides)}
    print(f"{', '.join(studies)}: {len(plan)} distinct runs under {args.out_dir}, {args.jobs} at a time", flush=True)
    errors = run_all(list(plan.items()), args.out_dir, args.jobs, args.force)
    for study in studies:
        path = os.path.join(args.static_dir, f"{study}.png")
        draw_study(study, study_runs(study, overrides), args.out_dir, path)
        print(f"wrote {path}", flush=True)
    if args.study == "all":  # the tables into docs/ablations.md; a --quick smoke test's beside its figures
        tables = os.path.join(args.static_dir, "ablations.md") if args.quick else os.path.join(ROOT, "docs", "ablations.md")
        write_tables(studies, overrides, args.out_dir, tables)
        draw_pictures(args.out_dir, args.static_dir)
        print(f"wrote {tables}, {args.static_dir}/forward.png, reverse.png, animation.gif", flush=True)
    print(f"done in {time.time() - started:.0f} s" + (f"; {len(errors)} runs failed: {', '.join(errors)}"
                                                     if errors else ""), flush=True)
    return errors


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
