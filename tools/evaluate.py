"""Judge a trained 2D experiment: sample quality against the number of sampling steps.

    python tools/evaluate.py exps/base exps/moons ...    # prints a markdown table, one row per sampler

For each experiment it draws 1,000 samples five times over (seeds 0-4; EMA weights where kept)
with every sampler of its formulation (or --samplers): DDPM's ancestral sampler over all T steps,
and the others at 50, 20 and 10 network evaluations (DDPM's at their default timestep spacing,
--sweep: at every spacing), and reports the means of
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


def settings(formulation, sweep=False, samplers=None, evaluations=STEPS):
    """[(sampler, steps, spacing)]: every sampler of the formulation (or those named), the ancestral ddpm over all
    T, the others at STEPS evaluations: Heun at the most steps within them (2 n - 1 evaluations: 49, 19, 9);
    DDPM's few-step samplers at their default timestep spacing (sweep: at every spacing)."""
    rows = []
    for sampler in samplers or formulation.SAMPLERS:
        if sampler == "ddpm":
            rows.append(("ddpm", None, "uniform"))
        elif sampler in ode.SAMPLERS:
            rows += [(sampler, steps if sampler == "euler" else (steps + 1) // 2, None) for steps in evaluations]
        else:
            spacings = ((ddpm.SPACINGS if sweep else (ddpm.DEFAULT_SPACING[sampler],))
                        if "timestep_spacing" in formulation.SAMPLING_FLAGS else (None,))
            rows += [(sampler, steps, spacing) for spacing in spacings for steps in evaluations]
    return rows


def evaluate(experiment_dir, n=1000, num_seeds=5, sweep=False, samplers=None, options=None, evaluations=STEPS,
             sigma_max=None):
    """Rows of the table for one experiment. options: sampling keywords (eta, s_churn) for every sampler; those
    not given are the experiment's where it set them, else each sampler's default. sigma_max: EDM's grid top
    instead of the experiment's (it changes no training)."""
    model, formulation, config = load_experiment(experiment_dir)
    if datasets.data_kind(config["dataset"]) not in ("points", "picture"):  # fresh data to score against
        raise CheckpointError(f"{experiment_dir} learned {config['dataset']}: evaluate.py scores against fresh "
                              "draws, which only the built-in 2D sets and pictures have (sample.py --score scores a "
                              "point file against its held-out points)")
    if sigma_max is not None:
        if "sigma_max" not in formulation.FLAGS:
            raise CheckpointError(f"--sigma_max is for EDM experiments; {experiment_dir} is not one")
        config = {**config, "sigma_max": sigma_max}
        formulation = type(formulation)(config)
    scorer = metrics.PointScorer(config["dataset"], n, seed=config["seed"])
    reference = datasets.get_dataset(config["dataset"], 20_000, seed=config["seed"] + 30_000)
    real = datasets.get_dataset(config["dataset"], n, seed=config["seed"] + 40_000)
    real_nn = metrics.nearest_neighbour_distance(real, reference)
    objective = config.get("objective", "ddpm")
    bad = [s for s in samplers or () if s not in formulation.SAMPLERS]
    if bad:
        raise CheckpointError(f"--samplers {' '.join(bad)}: not a sampler of {experiment_dir} (--objective {objective})")
    extra = {k: v for k, v in (options or {}).items() if k in formulation.SAMPLING_FLAGS and v is not None}
    extra.update({k: config[k] for k in ("s_churn",) if k in formulation.SAMPLING_FLAGS and k not in extra
                  and config.get(k) is not None})
    rows = []
    for sampler, steps, spacing in settings(formulation, sweep, samplers, evaluations):
        if steps is not None and formulation.sampling_error(sampler, steps, config["num_timesteps"]):
            continue  # e.g. DDPM with T below 50
        keywords = {**extra, **({"timestep_spacing": spacing} if spacing else {})}
        # one draw of 1,000 samples gives a score anywhere from ~0.7x to ~3x the floor: average seeds
        draws = [formulation.sample(model, (n, 2), sampler=sampler, num_inference_steps=steps,
                                    generator=torch.Generator().manual_seed(seed), **keywords)
                 for seed in range(num_seeds)]
        scores = [scorer(x) for x in draws]
        steps_run = steps or config["num_timesteps"]
        noted = ", ".join(([spacing] if spacing else []) + [f"{k} {v:g}" for k, v in extra.items()])
        row = {"experiment": experiment_dir, "dataset": config["dataset"], "objective": objective,
               "sampler": f"{sampler} {steps_run} steps" + (f" ({noted})" if noted else ""),
               "evaluations": ode.evaluations(sampler, steps_run) if sampler in ode.SAMPLERS else steps_run,
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
    parser.add_argument("--sweep", action="store_true", help="DDPM: every timestep spacing, not only each sampler's default")
    parser.add_argument("--samplers", nargs="+", default=None, help="only these samplers (default: all of each formulation's)")
    parser.add_argument("--eta", type=cli.nonnegative_float, default=None,
                        help="noise of ddim and dpmpp_2m_sde (default: each sampler's own)")
    parser.add_argument("--s_churn", type=cli.nonnegative_float, default=None,
                        help="EDM's euler and heun: S_churn (default: the experiment's)")
    parser.add_argument("--sigma_max", type=cli.positive_float, default=None,
                        help="EDM: the top of the sampling grid (default: the experiment's)")
    parser.add_argument("--evaluations", type=cli.positive_int, nargs="+", default=list(STEPS),
                        help="network evaluations of the few-step samplers (Heun: the most steps within them)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| dataset | objective | sampler | network evaluations | score | floor | score / floor | sharpness | "
          "line corners | outside |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for experiment in args.experiments:
        try:
            rows = evaluate(experiment, args.num_samples, args.num_seeds, args.sweep, args.samplers,
                            {"eta": args.eta, "s_churn": args.s_churn}, args.evaluations, args.sigma_max)
        except CheckpointError as e:
            parser.error(str(e))
        for r in rows:
            extra = (f"{r['corners_%']:.2f}% | {r['outside_%']:.2f}%" if "corners_%" in r else " | ")
            print(f"| {r['dataset']} | {r['objective']} | {r['sampler']} | {r['evaluations']} | {r['score']:.5f} | "
                  f"{r['floor']:.5f} | "
                  f"{r['score'] / r['floor']:.2f} | {r['sharpness']:.1f} | {extra} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
