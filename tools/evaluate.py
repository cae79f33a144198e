"""Judge a trained 2D experiment: sample quality against the number of sampling steps.

    python tools/evaluate.py exps/base exps/moons ...    # prints a markdown table, one row per sampler

For each experiment it draws 1,000 samples five times over (seeds 0-4; EMA weights where kept)
with DDPM over all T steps, and with DDIM, DPM-Solver++(2M) and its SDE form over 50, 20
and 10 steps (network evaluations), each at its default timestep spacing (--sweep: at every
spacing), and reports the means of
  - the energy-distance score against fresh data and its noise floor (metrics.py),
  - sharpness: mean distance from a sample to its nearest neighbour in 20,000 fresh data
    points, divided by the same figure for 1,000 real points (1.0 = as sharp as the data),
  - for `line` (a uniform rectangle |x| <= 2, |y| <= 4): the share of samples in the corner
    regions |x| > 1.5, |y| > 3 (6.25% for the real thing) and outside the rectangle.
"""
import os
import sys

if __name__ == "__main__":  # run as a script from anywhere: import the project from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from engine import cli
import datasets
import ddpm
from extensions import ode
from engine import metrics
from engine.checkpoints import CheckpointError
from sample import load_experiment

STEPS = (50, 20, 10)  # network evaluations


def settings(sweep=False, objective="ddpm"):
    """[(sampler, steps, spacing)]: DDPM over all T, then each few-step sampler at STEPS evaluations; flow
    matching and EDM: Euler at STEPS, Heun at the most steps within them (2 n - 1 evaluations: 49, 19, 9)."""
    if objective != "ddpm":
        return [(sampler, steps if sampler == "euler" else (steps + 1) // 2, None)
                for sampler in ode.SAMPLERS for steps in STEPS]
    rows = [("ddpm", None, "uniform")]
    for sampler in ddpm.SAMPLERS[1:4]:
        spacings = ddpm.SPACINGS if sweep else (ddpm.DEFAULT_SPACING[sampler],)
        rows += [(sampler, steps, spacing) for spacing in spacings for steps in STEPS]
    return rows


def evaluate(experiment_dir, n=1000, num_seeds=5, sweep=False):
    model, scheduler, config = load_experiment(experiment_dir)
    scorer = metrics.PointScorer(config["dataset"], n, seed=config["seed"])
    reference = datasets.get_dataset(config["dataset"], 20_000, seed=config["seed"] + 30_000)
    real = datasets.get_dataset(config["dataset"], n, seed=config["seed"] + 40_000)
    real_nn = metrics.nearest_neighbour_distance(real, reference)
    rows = []
    objective = config.get("objective", "ddpm")
    for sampler, steps, spacing in settings(sweep, objective):
        if objective == "ddpm" and steps is not None and steps > scheduler.num_timesteps:
            continue
        # one draw of 1,000 samples gives a score anywhere from ~0.7x to ~3x the floor: average seeds
        draws = [ddpm.sample(model, scheduler, (n, 2), sampler=sampler, num_inference_steps=steps,
                             timestep_spacing=spacing, generator=torch.Generator().manual_seed(seed))
                 for seed in range(num_seeds)]
        scores = [scorer(x) for x in draws]
        row = {"experiment": experiment_dir, "dataset": config["dataset"], "objective": objective,
               "sampler": f"{sampler} {steps or scheduler.num_timesteps} steps" + (f" ({spacing})" if spacing else ""),
               "evaluations": ode.evaluations(sampler, steps) if objective != "ddpm" else steps or scheduler.num_timesteps,
               "score": np.mean([s["score"] for s in scores]), "floor": scores[0]["floor"],
               "sharpness": np.mean([metrics.nearest_neighbour_distance(x, reference) for x in draws]) / real_nn}
        if config["dataset"] == "line":
            x = torch.cat(draws).numpy()
            row["corners_%"] = 100 * np.mean((np.abs(x[:, 0]) > 1.5) & (np.abs(x[:, 1]) > 3))
            row["outside_%"] = 100 * np.mean((np.abs(x[:, 0]) > 2) | (np.abs(x[:, 1]) > 4))
        rows.append(row)
    return rows


def main(argv=None):
    parser = cli.ArgumentParser(prog="tools/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="experiment folders of 2D runs")
    parser.add_argument("--num_samples", type=cli.positive_int, default=1000, help="samples per draw")
    parser.add_argument("--num_seeds", type=cli.positive_int, default=5,
                        help="draws of NUM_SAMPLES per sampler; the figures are their means (line: pooled)")
    parser.add_argument("--sweep", action="store_true", help="every timestep spacing, not only each sampler's default")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| dataset | objective | sampler | network evaluations | score | floor | score / floor | sharpness | "
          "line corners | outside |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for experiment in args.experiments:
        try:
            rows = evaluate(experiment, args.num_samples, args.num_seeds, args.sweep)
        except CheckpointError as e:
            parser.error(str(e))
        for r in rows:
            extra = (f"{r['corners_%']:.2f}% | {r['outside_%']:.2f}%" if "corners_%" in r else " | ")
            print(f"| {r['dataset']} | {r['objective']} | {r['sampler']} | {r['evaluations']} | {r['score']:.5f} | "
                  f"{r['floor']:.5f} | "
                  f"{r['score'] / r['floor']:.2f} | {r['sharpness']:.1f} | {extra} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
