"""The pictures of the README: the forward process, the reverse process, an animation of
both, and the ablation grids (rows = a hyperparameter's values, columns = epochs); for
docs/mnist.md, image runs side by side and the measured trade-off of MNIST frames.

Every 2D panel uses the same axes as the frames of ddpm.py ([-6, 6]^2), so cells compare.
"""
import os
import sys

if __name__ == "__main__":  # run as a script from anywhere: import the project from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402

from engine.plotting import LIMIT  # noqa: E402

CELL = 1.6        # inches per grid cell
LABEL_WIDTH = 1.3  # inches of row labels left of a grid
TITLE_HEIGHT = 0.6  # inches above a grid for its title and column titles
BOTTOM = 0.1        # inches below it
DPI = 90
DOT = dict(s=1.5, alpha=0.6, linewidths=0, color="C0")


def _panel(ax, points=None):
    if points is not None:
        ax.scatter(points[:, 0], points[:, 1], rasterized=True, **DOT)
    ax.set_xlim(-LIMIT, LIMIT)
    ax.set_ylim(-LIMIT, LIMIT)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def grid_size_pixels(nrows, ncols):
    """(width, height) in pixels of the PNG that draw_grid writes."""
    return (round((LABEL_WIDTH + ncols * CELL) * DPI), round((TITLE_HEIGHT + nrows * CELL + BOTTOM) * DPI))


def draw_grid(rows, column_titles, path, title=""):
    """rows: dicts with "label", "cells" (one [n, 2] array or None per column), and optional
    "notes" (one small text per cell) and "caption" (under the label). Writes one PNG."""
    nrows, ncols = len(rows), len(column_titles)
    width, height = grid_size_pixels(nrows, ncols)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    for r, row in enumerate(rows):
        for c in range(ncols):
            left = (LABEL_WIDTH + c * CELL) * DPI / width
            bottom = 1 - (TITLE_HEIGHT + (r + 1) * CELL) * DPI / height
            ax = fig.add_axes([left, bottom, CELL * DPI / width * 0.96, CELL * DPI / height * 0.96])
            _panel(ax, row["cells"][c])
            if row["cells"][c] is None:
                ax.text(0, 0, "no frame", ha="center", va="center", fontsize=8, color="gray")
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
            note = (row.get("notes") or [""] * ncols)[c]
            if note:
                ax.text(0.03, 0.03, note, transform=ax.transAxes, fontsize=6.5, color="0.25")
        y = 1 - (TITLE_HEIGHT + (r + 0.5) * CELL) * DPI / height
        fig.text(0.1 / (width / DPI), y, row["label"], fontsize=10, weight="bold", va="center")
        if row.get("caption"):
            fig.text(0.1 / (width / DPI), y - 0.2 * DPI / height, row["caption"], fontsize=6.5, va="top")
    fig.suptitle(title, x=0.5, y=1 - 0.12 * DPI / height, va="top", fontsize=11)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def forward_panels(scheduler, x0, num_panels, generator):
    """x_t of the forward process for num_panels evenly spaced t (t = 0 is the data)."""
    T = scheduler.num_timesteps
    steps = np.linspace(0, T, num_panels).round().astype(int)
    noise = torch.randn(x0.shape, generator=generator)
    panels = []
    for t in steps:  # the same noise at every t: each point slides along its own path
        x_t = x0 if t == 0 else scheduler.add_noise(x0, noise, torch.full((len(x0),), t - 1))
        alpha_bar = 1.0 if t == 0 else float(scheduler.alphas_cumprod[t - 1])
        panels.append((int(t), alpha_bar, x_t.numpy()))
    return panels


def draw_forward(rows, path, num_panels=7):
    """rows: (label, scheduler, x0); one row of the forward process per schedule."""
    grid_rows = []
    for label, scheduler, x0 in rows:
        panels = forward_panels(scheduler, x0, num_panels, torch.Generator().manual_seed(0))
        grid_rows.append({"label": label, "cells": [p[2] for p in panels],
                          "notes": [f"t={t}/{scheduler.num_timesteps}  ᾱ={a:.2f}" for t, a, _ in panels]})
    draw_grid(grid_rows, ["data"] + [f"{i}/{num_panels - 1} of T" for i in range(1, num_panels)], path,
              "forward process q(x_t | x_0): the data is noised step by step")


def draw_reverse(rows, path, num_panels=7):
    """rows: (label, trajectory [steps + 1, n, 2] from x_T to x_0)."""
    grid_rows = []
    for label, trajectory in rows:
        n = len(trajectory) - 1
        index = np.linspace(0, n, num_panels).round().astype(int)
        grid_rows.append({"label": label, "cells": [np.asarray(trajectory[i]) for i in index],
                          "notes": [f"step {i}/{n}" for i in index]})
    draw_grid(grid_rows, ["noise x_T"] + [f"{i}/{num_panels - 1} of the way" for i in range(1, num_panels - 1)]
              + ["sample x_0"], path, "reverse process p(x_{t-1} | x_t): a trained model turns noise into dinosaurs")


def draw_animation(forward, reverse, path, max_frames=60, fps=15, hold=10):
    """A GIF: forward [T + 1, n, 2] (data to noise), then reverse [steps + 1, n, 2] (noise to data)."""
    def thin(frames):  # at most max_frames, always the first and the last
        index = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
        return [(i, np.asarray(frames[i])) for i in index]
    T, steps = len(forward) - 1, len(reverse) - 1
    shots = [(f"forward  t = {i}/{T}", x) for i, x in thin(forward)]
    shots = [shots[0]] * hold + shots + [shots[-1]] * (hold // 2)
    back = [(f"reverse  step {i}/{steps}", x) for i, x in thin(reverse)]
    shots += back + [back[-1]] * hold
    fig, ax = plt.subplots(figsize=(3.6, 3.6), dpi=72)
    _panel(ax)
    scatter = ax.scatter([], [], s=3, linewidths=0, color="C0")
    counter = ax.set_title(shots[0][0], fontsize=11, family="monospace")
    fig.tight_layout()  # with a title in place, so it keeps room for the counter

    def update(k):
        text, x = shots[k]
        scatter.set_offsets(x)
        counter.set_text(text)
        return scatter, counter
    FuncAnimation(fig, update, frames=len(shots), blit=False).save(path, writer=PillowWriter(fps=fps))
    plt.close(fig)
    return len(shots)


def draw_image_runs(unconditional_dir, conditional_dir, path, n=10):
    """Two grids side by side from the last frames of two image runs: n x n unconditional samples,
    and n samples of each digit 0-9 of a class-conditional run (its frame asks for label i % 10)."""
    from engine.plotting import image_grid
    left = np.load(f"{unconditional_dir}/frames.npy")[-1][: n * n, 0]                  # [n*n, 28, 28]
    right = np.load(f"{conditional_dir}/frames.npy")[-1][:, 0]
    rows = np.stack([right[digit::10][:n] for digit in range(10)]).reshape(-1, *right.shape[1:])
    guidance = json.load(open(f"{conditional_dir}/config.json")).get("guidance_scale")
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.3), dpi=DPI)
    for ax, images, title in ((axes[0], left, "unconditional"),
                              (axes[1], rows, f"class-conditional, guidance {guidance:g}: rows 0-9")):
        ax.imshow(image_grid(images, ncols=n), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_tradeoff(csv_path, path, real_confident=91.4):
    """MNIST frames as points: confident share (%) against Frechet distance / its floor, one colour per
    setting (the table's columns: setting, confident, frechet_ratio), each setting's mean as a large
    marker, the 1,000 real test digits as a star and the issue's target (>= 90%, <= 1.0x) shaded.
    Returns {setting: (mean confident, mean frechet_ratio)}."""
    import pandas as pd
    table = pd.read_csv(csv_path)
    missing = {"setting", "confident", "frechet_ratio"} - set(table.columns)
    if missing:
        raise ValueError(f"{csv_path} has no column {', '.join(sorted(missing))}")
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=DPI)
    means = {}
    for i, (setting, rows) in enumerate(table.groupby("setting", sort=False)):
        means[setting] = (rows["confident"].mean(), rows["frechet_ratio"].mean())
        ax.scatter(rows["frechet_ratio"], rows["confident"], s=18, alpha=0.6, color=f"C{i}")
        ax.scatter(means[setting][1], means[setting][0], s=110, marker="D", edgecolors="black", color=f"C{i}",
                   label=f"{setting}: {means[setting][0]:.1f}%, {means[setting][1]:.2f}x ({len(rows)})")
    top = max(table["confident"].max(), real_confident) + 1
    left = min(0.85, table["frechet_ratio"].min() - 0.05)
    ax.fill_between([left, 1.0], 90, top, color="green", alpha=0.12, label="target: >= 90%, <= 1.0x")
    ax.scatter(1.0, real_confident, s=160, marker="*", color="black", label=f"real test digits: {real_confident:g}%, 1.00x")
    ax.set_xlim(left, table["frechet_ratio"].max() + 0.05)
    ax.set_ylim(table["confident"].min() - 1, top)
    ax.set_xlabel("Frechet distance / its floor (lower: more like the real spread)")
    ax.set_ylabel("confident >= 0.9 (%)")
    ax.set_title("MNIST frames of 1,000 samples, the default run's weights (seeds 0-2)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return means


FORMULATION_COLUMNS = ["deterministic, ~20 evaluations", "stochastic, ~20", "stochastic, ~10"]
FORMULATION_SAMPLERS = {  # per formulation, its best sampler and steps in each column (docs/formulations.md)
    "ddpm": (("dpmpp_2m", 20), ("dpmpp_2m_sde", 20), ("dpmpp_2m_sde", 10)),
    "flow": (("dpmpp_2m", 20), ("dpmpp_2m_sde", 20), ("dpmpp_2m_sde", 10)),
    "edm": (("dpmpp_2m", 20), ("dpmpp_2m_sde", 20), ("dpmpp_2m_sde", 10))}
FORMULATION_NAMES = {"ddpm": "DDPM", "flow": "flow matching", "edm": "EDM"}


def draw_image_formulations(experiments, path, n=8):
    """Image runs of each formulation side by side: n x n digits of each run's last frame, titled with the
    frame's measures from its metrics.csv (confident share, Frechet distance / floor)."""
    import pandas as pd
    from engine.plotting import image_grid
    fig, axes = plt.subplots(1, len(experiments), figsize=(3.4 * len(experiments), 3.9), dpi=DPI, squeeze=False)
    for ax, experiment in zip(axes[0], experiments):
        config = json.load(open(f"{experiment}/config.json"))
        last = pd.read_csv(f"{experiment}/metrics.csv").iloc[-1]
        images = np.load(f"{experiment}/frames.npy")[-1][: n * n, 0]                       # [n*n, 28, 28]
        ax.imshow(image_grid(images, ncols=n), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        name = FORMULATION_NAMES[config.get("objective", "ddpm")]
        steps = f", {config['num_inference_steps']} steps" if config.get("num_inference_steps") else ""
        ax.set_title(f"{name}, {config['sampler']}{steps}\n{100 * last['confident']:.1f}% confident, "
                     f"Frechet {last['score'] / last['floor']:.2f}x floor", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_formulations(experiments, path, n=1000):
    """One row per experiment (DDPM, flow matching, EDM on the same data): its samples with its best
    deterministic and stochastic samplers (FORMULATION_SAMPLERS), seed 0, with the score and sharpness of that draw; for
    image runs, their last frames (draw_image_formulations)."""
    import datasets
    if datasets.is_image_dataset(json.load(open(f"{experiments[0]}/config.json"))["dataset"]):
        return draw_image_formulations(experiments, path)
    from engine import metrics
    from extensions import ode
    from sample import load_experiment
    rows = []
    for experiment in experiments:
        model, formulation, config = load_experiment(experiment)
        objective = config.get("objective", "ddpm")
        scorer = metrics.PointScorer(config["dataset"], n, seed=config["seed"])
        reference = datasets.get_dataset(config["dataset"], 20_000, seed=config["seed"] + 30_000)
        real_nn = metrics.nearest_neighbour_distance(datasets.get_dataset(config["dataset"], n, seed=config["seed"]
                                                                          + 40_000), reference)
        cells, notes = [], []
        for sampler, steps in FORMULATION_SAMPLERS[objective]:
            x = formulation.sample(model, (n, 2), sampler=sampler, num_inference_steps=steps,
                                   generator=torch.Generator().manual_seed(0))
            evaluations = ode.evaluations(sampler, steps) if sampler in ode.SAMPLERS else steps
            cells.append(x.numpy())
            notes.append(f"{sampler}, {evaluations} evaluations\nscore {scorer(x)['score'] / scorer.floor:.2f}x floor, "
                         f"sharpness {metrics.nearest_neighbour_distance(x, reference) / real_nn:.1f}")
        rows.append({"label": FORMULATION_NAMES[objective], "cells": cells, "notes": notes})
    draw_grid(rows, FORMULATION_COLUMNS, path, "one network, three formulations, their default runs")


if __name__ == "__main__":  # python tools/figures.py RUN_DIR COND_RUN_DIR static/mnist.png
    import sys
    if len(sys.argv) >= 3 and sys.argv[1] == "--formulations" and sys.argv[-1].endswith(".png"):
        draw_formulations(sys.argv[2:-1], sys.argv[-1])
    elif len(sys.argv) == 4 and sys.argv[1] == "--tradeoff" and sys.argv[3].endswith(".png"):
        try:
            draw_tradeoff(*sys.argv[2:4])
        except (OSError, ValueError) as e:  # a missing or malformed table: one line, status 2
            print(f"figures.py: error: {e}", file=sys.stderr)
            sys.exit(2)
    elif len(sys.argv) == 4 and sys.argv[3].endswith(".png"):
        draw_image_runs(*sys.argv[1:4])
    else:
        asked = sys.argv[1:] in (["-h"], ["--help"])
        print("usage: python tools/figures.py RUN_DIR COND_RUN_DIR OUT.png: the last frame of an unconditional image "
              "run beside the rows 0-9 of a class-conditional one;\n"
              "       python tools/figures.py --tradeoff MEASURED.csv OUT.png: confident share against Frechet / floor "
              "(docs/mnist_tradeoff.csv);\n"
              "       python tools/figures.py --formulations DDPM_RUN FLOW_RUN EDM_RUN OUT.png: 2D samples of each "
              "formulation with its best deterministic and stochastic samplers (image runs: their last frames)", file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
