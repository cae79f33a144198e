"""The road from 200 network evaluations to 1: every formulation at its best sampler at each budget.

    python tools/road.py exps/dino_ddpm exps/dino_flow exps/dino_edm exps/dino_reflow exps/dino_meanflow \\
        --figure static/road_dino.png --csv docs/road_dino.csv

For each experiment (one per formulation, one 2D set) and each budget of network evaluations (200, 50, 20, 10, 4,
2, 1), every sampler of its formulation is run at that budget (tools/evaluate.py: 5 draws of 1,000, seeds 0-4;
Heun at the most steps within it, 2 n - 1 evaluations; DDPM's ancestral sampler at T only), and the row with the
lowest mean score is kept: its sampler, score / floor and sharpness. Picking the best on the draws that score it
flatters every formulation alike, a little. Prints a markdown table (rows: formulations; columns: budgets);
--figure draws score / floor against evaluations on log axes, one curve per formulation, beside each one's samples
at 1 evaluation.
"""
import csv
import os
import sys

if __name__ == "__main__":  # run as a script from anywhere: import the project from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from engine import cli
from engine.checkpoints import CheckpointError
from sample import load_experiment
from tools import evaluate

BUDGETS = (200, 50, 20, 10, 4, 2, 1)
NAMES = {"ddpm": "DDPM", "flow": "flow matching", "edm": "EDM", "reflow": "reflow (2-rectified flow)",
         "meanflow": "MeanFlow"}


def best_rows(experiment, budgets=BUDGETS, num_seeds=5):
    """{budget: the best row of tools/evaluate.py among the formulation's samplers within that many evaluations}."""
    rows = evaluate.evaluate(experiment, num_seeds=num_seeds, evaluations=[b for b in budgets if b != 200] + [200])
    best = {}
    for budget in budgets:  # the rows run at this budget: Heun's at its 2 n - 1 <= budget
        heun = 2 * ((budget + 1) // 2) - 1
        within = [r for r in rows if r["evaluations"] == budget or (r["sampler"].startswith("heun")
                                                                    and r["evaluations"] == heun)]
        if within:
            best[budget] = min(within, key=lambda r: r["score"] / r["floor"])
    return best


def one_step_samples(experiment, n=1000):
    """n samples at 1 evaluation (the formulation's best sampler there), seed 0."""
    model, formulation, config = load_experiment(experiment)
    sampler = {"ddpm": "dpmpp_2m", "meanflow": "average"}.get(config.get("objective", "ddpm"), "euler")
    return formulation.sample(model, (n, 2), sampler=sampler, num_inference_steps=1,
                              generator=torch.Generator().manual_seed(0)).numpy()


def draw(results, samples, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from engine.plotting import LIMIT
    fig = plt.figure(figsize=(4.2 + 1.9 * len(samples), 4.0), dpi=90)
    ax = fig.add_axes([0.07, 0.14, 3.2 / (4.2 + 1.9 * len(samples)), 0.74])
    for name, best in results.items():
        budgets = sorted(best)
        ax.plot(budgets, [best[b]["score"] / best[b]["floor"] for b in budgets], "o-", label=name, ms=4)
    ax.axhline(1, color="gray", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="score / noise floor (1 = as good as data)",
           title=title)
    ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
    ax.legend(fontsize=7)
    for k, (name, points) in enumerate(samples.items()):
        left = (4.2 + 1.9 * k) / (4.2 + 1.9 * len(samples))
        panel = fig.add_axes([left, 0.2, 1.75 / (4.2 + 1.9 * len(samples)), 0.62])
        panel.scatter(points[:, 0], points[:, 1], s=1.2, alpha=0.6, linewidths=0, rasterized=True)
        panel.set(xlim=(-LIMIT, LIMIT), ylim=(-LIMIT, LIMIT), xticks=[], yticks=[], aspect="equal")
        panel.set_title(f"{name}\n1 evaluation", fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = cli.ArgumentParser(prog="tools/road.py", description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="2D experiment folders, one per formulation, one dataset")
    parser.add_argument("--num_seeds", type=cli.positive_int, default=5, help="draws of 1,000 per sampler")
    parser.add_argument("--budgets", type=cli.positive_int, nargs="+", default=list(BUDGETS),
                        help="network evaluations (default: %(default)s)")
    parser.add_argument("--figure", default=None, help="a PNG: the curves and the 1-evaluation samples")
    parser.add_argument("--csv", default=None, help="a CSV of every cell: formulation, budget, sampler, score, ...")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results, samples, dataset = {}, {}, None
    for experiment in args.experiments:
        try:
            _, _, config = load_experiment(experiment)
            name = NAMES[config.get("objective", "ddpm")]
            results[name] = best_rows(experiment, args.budgets, args.num_seeds)
            if 1 in args.budgets:
                samples[name] = one_step_samples(experiment)
        except CheckpointError as e:
            parser.error(str(e))
        dataset = config["dataset"]
    budgets = sorted(args.budgets, reverse=True)
    print(f"{dataset}: score / floor (sharpness) at each budget of network evaluations, each formulation's best sampler")
    print("| formulation | " + " | ".join(f"{b} evaluations" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for name, best in results.items():
        cells = [f"{best[b]['score'] / best[b]['floor']:.2f} ({best[b]['sharpness']:.1f})" if b in best else "-"
                 for b in budgets]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nthe sampler of each cell:")
    for name, best in results.items():
        print(f"- {name}: " + "; ".join(f"{b}: {best[b]['sampler']}" for b in budgets if b in best))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["dataset", "formulation", "budget", "sampler", "evaluations", "score_over_floor",
                             "sharpness"])
            for name, best in results.items():
                for b in budgets:
                    if b in best:
                        r = best[b]
                        writer.writerow([dataset, name, b, r["sampler"], r["evaluations"],
                                         f"{r['score'] / r['floor']:.3f}", f"{r['sharpness']:.2f}"])
    if args.figure:
        draw(results, samples, args.figure, f"{dataset}: the road from 200 evaluations to 1")
        print(f"\nwrote {args.figure}")


if __name__ == "__main__":
    sys.exit(main())
