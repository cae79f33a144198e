import numpy as np
import PIL.Image

import datasets
from engine import plotting


def read_rgb(path):
    return np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float64)


def test_fast_2d_frame_equals_a_full_draw(tmp_path):
    """Frames of points are pasted on a cached background; the PNG must match a full savefig of
    the same points and title, with nothing left over from the frame drawn before."""
    points = datasets.get_dataset("dino", 1000).numpy()
    drawer = plotting.FrameDrawer()
    drawer.draw(points * 0.5 + 1, str(tmp_path / "before.png"), "epoch 1")
    drawer.draw(points, str(tmp_path / "fast.png"), "epoch 250")

    full = plotting.FrameDrawer()
    full.artist.set_offsets(points)
    full.title.set_text("epoch 250")
    full.fig.savefig(tmp_path / "full.png")

    fast, reference = read_rgb(tmp_path / "fast.png"), read_rgb(tmp_path / "full.png")
    before = read_rgb(tmp_path / "before.png")
    assert fast.shape == reference.shape
    differs = np.abs(fast - reference).max(axis=-1) > 0
    assert differs.mean() < 1e-3  # a few anti-aliased pixels where points overlap the spines
    assert (np.abs(before - reference).max(axis=-1) > 0).mean() > 0.01  # the check can tell frames apart


def test_tradeoff_figure_means_and_bad_table(tmp_path):
    """The trade-off plot's per-setting means are the plain means of the table's rows; a table
    without the columns is a one-line error with status 2 from the command line."""
    from tools import figures
    from helpers import assert_one_line_error, run_tool
    table = tmp_path / "measured.csv"
    table.write_text("setting,seed,draw,confident,frechet_ratio\n"
                     "a,0,0,90.0,1.10\na,1,0,92.0,1.30\nb,0,0,81.0,1.00\n")
    means = figures.draw_tradeoff(table, tmp_path / "tradeoff.png")
    assert set(means) == {"a", "b"}
    assert np.allclose(means["a"], (91.0, 1.20)) and np.allclose(means["b"], (81.0, 1.00))
    assert PIL.Image.open(tmp_path / "tradeoff.png").size[0] > 300

    (tmp_path / "bad.csv").write_text("setting,confident\na,90\n")
    line = assert_one_line_error(run_tool("tools/figures.py", "--tradeoff", tmp_path / "bad.csv", tmp_path / "bad.png"))
    assert "frechet_ratio" in line and not (tmp_path / "bad.png").exists()


def test_image_formulations_show_each_runs_last_frame_in_order(tmp_path):
    """figures.py --formulations on image runs: one panel per run, left to right, each its last frame. Run a
    ends on white digits after a black frame, run b the other way round: the left half must be the bright one."""
    import json
    from tools import figures
    runs = []
    for name, first, last in (("a", 0.0, 1.0), ("b", 1.0, 0.0)):
        exp = tmp_path / name
        exp.mkdir()
        (exp / "config.json").write_text(json.dumps({"dataset": "mnist", "objective": "flow", "sampler": "heun"}))
        (exp / "metrics.csv").write_text("frame,score,floor,confident\n0,30,10,0.5\n1,20,10,0.6\n")
        np.save(exp / "frames.npy", np.stack([np.full((64, 1, 28, 28), first), np.full((64, 1, 28, 28), last)]).astype(np.float32))
        runs.append(str(exp))
    figures.draw_formulations(runs, tmp_path / "f.png")
    gray = read_rgb(tmp_path / "f.png").mean(axis=-1)
    middle = gray[gray.shape[0] // 4: 3 * gray.shape[0] // 4]
    left, right = middle[:, : gray.shape[1] // 2].mean(), middle[:, gray.shape[1] // 2:].mean()
    assert left > right + 60, (left, right)
