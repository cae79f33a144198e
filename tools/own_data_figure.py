"""The README's "Your own data" picture: a drawing the project does not ship, and what a run learned from it.

    python tools/own_data_figure.py --draw static/own_star.png       # the drawing: a star, black outline, grey inside
    python ddpm.py --dataset static/own_star.png --experiment_name star
    python tools/own_data_figure.py exps/star static/own_data.png     # the drawing beside the run's frames
    python tools/own_data_figure.py --sprites sprites/                # docs/own_data.md's folder of colour images

The star's inside is grey (darkness 0.5), its outline black: a picture's points fall where it is dark, in
proportion to how dark, so the inside gets half the density of the outline.
"""
import argparse
import json
import os
import sys

if __name__ == "__main__":  # run as a script from anywhere: import the project from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import PIL.Image  # noqa: E402

from engine.plotting import LIMIT  # noqa: E402


def draw_star(path, size=240):
    """A five-pointed star, black outline 8 pixels wide, grey (128 of 255) inside, on white."""
    angles = np.pi / 2 + np.arange(11) * np.pi / 5
    radius = np.where(np.arange(11) % 2 == 0, 1.0, 0.42)
    fig = plt.figure(figsize=(size / 80, size / 80), dpi=80)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.fill(radius * np.cos(angles), radius * np.sin(angles), facecolor=(0.5, 0.5, 0.5), edgecolor="black",
            linewidth=8, joinstyle="round")
    ax.set_xlim(-1.15, 1.15)
    ax.set_ylim(-1.15, 1.15)
    ax.axis("off")
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    PIL.Image.open(path + ".tmp.png").convert("L").save(path)  # grey, as a scanned drawing would be
    os.remove(path + ".tmp.png")


def draw_sprites(folder, n=150, seed=3):
    """A folder of 16x16 colour PNGs in two classes: discs/ (red on blue) and squares/ (green on yellow)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    for name in ("discs", "squares"):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(n):
            cx, cy, r = rng.uniform(5, 11, 2).tolist() + [rng.uniform(2.5, 4.5)]
            image = np.zeros((16, 16, 3), np.uint8)
            if name == "discs":
                image[:], shape = (30, 60, 200), (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
                image[shape] = (230, 40, 30)
            else:
                image[:], shape = (240, 220, 60), (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
                image[shape] = (20, 150, 40)
            PIL.Image.fromarray(image).save(os.path.join(folder, name, f"{i:03d}.png"))


def figure(experiment, output, picks=(0, 2, 7, -1)):
    """The drawing (left) beside frames `picks` of the run, each titled with its epoch and score / floor."""
    config = json.load(open(os.path.join(experiment, "config.json")))
    frames = np.load(os.path.join(experiment, "frames.npy"))
    metrics = pd.read_csv(os.path.join(experiment, "metrics.csv"))
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(2.4 * (len(picks) + 1), 2.7), dpi=90)
    axes[0].imshow(PIL.Image.open(config["dataset"]), cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(f"{os.path.basename(config['dataset'])}", fontsize=9)
    for ax, pick in zip(axes[1:], picks):
        row = metrics.iloc[pick]
        ax.scatter(frames[pick][:, 0], frames[pick][:, 1], s=1.5, alpha=0.6, linewidths=0, rasterized=True)
        ax.set_xlim(-LIMIT, LIMIT)
        ax.set_ylim(-LIMIT, LIMIT)
        ax.set_aspect("equal")
        ax.set_title(f"epoch {int(row['epoch']) + 1}: score/floor {row['score'] / row['floor']:.2f}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", help="an experiment trained on a picture")
    p.add_argument("output", nargs="?", help="the figure's PNG")
    p.add_argument("--draw", metavar="PNG", help="only draw the star picture to this file")
    p.add_argument("--sprites", metavar="FOLDER", help="only write docs/own_data.md's folder of colour sprites")
    args = p.parse_args(argv)
    if args.draw:
        draw_star(args.draw)
    elif args.sprites:
        draw_sprites(args.sprites)
    elif args.experiment and args.output:
        figure(args.experiment, args.output)
    else:
        p.error("give --draw PNG, or EXPERIMENT and OUTPUT")


if __name__ == "__main__":
    main()
