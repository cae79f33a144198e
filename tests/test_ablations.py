"""ablations.py: the runs each study plans, skipping and resuming, and a tiny study end to end."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tools import ablations
import ddpm
from tools import figures


def parsed(flags):
    """What ddpm.py itself makes of the command line ablations.py builds."""
    return vars(ddpm.build_parser().parse_args(ablations.command("x", flags, "out")[2:]))


@pytest.mark.parametrize("study", list(ablations.STUDIES))
def test_each_run_differs_from_classic_in_the_studied_flag_only(study):
    flag, values = ablations.STUDIES[study]
    runs = ablations.study_runs(study)
    assert [label for label, _, _ in runs] == [str(v) for v in values] + [ablations.OURS]
    seeds = set()
    for label, name, flags in runs[:-1]:
        config = parsed(flags)
        differing = {k for k, v in ablations.CLASSIC.items() if config[k] != v}
        value = config[flag]
        assert differing == ({flag} if value != ablations.CLASSIC[flag] else set())
        assert str(value) == label
        assert config["save_images_step"] == 40  # frames at epochs 40, 80, ..., 200
        seeds.add(config["seed"])
    assert seeds == {ablations.CLASSIC["seed"]}
    assert len({name for _, name, _ in runs}) == len(runs)


def test_classic_is_pinned_and_ours_follows_the_parser_defaults(monkeypatch):
    real = ddpm.build_parser

    def moved_defaults():  # another engineer changes ddpm.py's defaults
        parser = real()
        parser.set_defaults(num_timesteps=100, learning_rate=3e-3, dataset="moons")
        return parser
    monkeypatch.setattr(ddpm, "build_parser", moved_defaults)
    runs = ablations.study_runs("hidden_size")
    classic = parsed(runs[3][2])
    assert runs[3][1] == "classic" and classic["num_timesteps"] == 50 and classic["learning_rate"] == 1e-3
    label, name, flags = runs[-1]
    assert (label, name) == (ablations.OURS, "ours_default")
    ours = parsed(flags)
    assert ours["num_timesteps"] == 100 and ours["learning_rate"] == 3e-3 and ours["dataset"] == "dino"
    assert ours["num_epochs"] // ours["save_images_step"] == 5  # five evenly spaced columns in the grid
    argv = ablations.command(name, flags, "out")
    flags_given = [a for a in argv if a.startswith("--")]  # plain `python ddpm.py --dataset dino`
    assert flags_given == ["--experiment_name", "--out_dir", "--dataset", "--save_images_step", "--quiet"]


def test_bad_study_name_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        ablations.main(["learning_rates"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learning_rates" in err and "learning_rate" in err


def fake_run(exp_dir, flags, epochs_done, finished_files=True, checkpoint=False):
    os.makedirs(exp_dir, exist_ok=True)
    config = {**ablations.resolved(flags), "world_size": 1}
    with open(os.path.join(exp_dir, "config.json"), "w") as f:
        json.dump(config, f)
    rows = "".join(f"{i},{e},{e * 10},0.5,0.01,0.005,{e}.0\n" for i, e in enumerate(range(epochs_done)))
    with open(os.path.join(exp_dir, "metrics.csv"), "w") as f:
        f.write("frame,epoch,step,loss,score,floor,seconds\n" + rows)
    np.save(os.path.join(exp_dir, "frames.npy"), np.zeros((epochs_done, 4, 2), np.float32))
    if finished_files:
        open(os.path.join(exp_dir, "loss.png"), "w").close()
    if checkpoint:
        open(os.path.join(exp_dir, "checkpoint.pt"), "w").close()


def test_run_state_done_resume_stale(tmp_path):
    flags = {**ablations.CLASSIC, "num_epochs": 3, "save_images_step": 1}
    exp = str(tmp_path / "run")
    assert ablations.run_state(exp, flags) == "fresh"
    fake_run(exp, flags, 3)
    assert ablations.run_state(exp, flags) == "done"
    assert ablations.run_state(exp, {**flags, "learning_rate": 1e-2}) == "overwrite"  # other flags: stale
    assert ablations.run_state(exp, {**flags, "num_epochs": 6}) == "overwrite"
    fake_run(exp, flags, 2, finished_files=False, checkpoint=True)
    os.remove(os.path.join(exp, "loss.png"))
    assert ablations.run_state(exp, flags) == "resume"
    os.remove(os.path.join(exp, "checkpoint.pt"))
    assert ablations.run_state(exp, flags) == "overwrite"


def test_run_all_skips_done_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch):
    flags = {**ablations.CLASSIC, "num_epochs": 3, "save_images_step": 1}
    fake_run(str(tmp_path / "done"), flags, 3)
    fake_run(str(tmp_path / "half"), flags, 1, finished_files=False, checkpoint=True)
    launched = []

    class FakePopen:
        def __init__(self, argv, **kwargs):
            launched.append(argv)
            self.pid, self.returncode = len(launched), 0
            name = argv[argv.index("--experiment_name") + 1]
            if name == "broken" and "--resume" in argv:  # an unreadable checkpoint
                self.returncode = 1
                return
            fake_run(str(tmp_path / name), flags, 3)

        def communicate(self):
            return "", None
    monkeypatch.setattr(ablations.subprocess, "Popen", FakePopen)
    fake_run(str(tmp_path / "broken"), flags, 1, finished_files=False, checkpoint=True)
    runs = [("done", flags), ("half", flags), ("new", flags), ("broken", flags)]
    assert ablations.run_all(runs, str(tmp_path), jobs=2) == {}
    modes = sorted((argv[argv.index("--experiment_name") + 1], argv[-1]) for argv in launched)
    assert modes == [("broken", "--overwrite"), ("broken", "--resume"), ("half", "--resume"), ("new", "--quiet")]
    launched.clear()
    ablations.run_all([("done", flags)], str(tmp_path), jobs=1, force=True)
    assert "--overwrite" in launched[0]


def test_tiny_study_end_to_end_draws_a_grid_and_skips_on_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(ablations, "QUICK", {"num_epochs": 2, "dataset_size": 64, "eval_batch_size": 50,
                                             "hidden_size": 16, "embedding_size": 8})
    monkeypatch.setitem(ablations.STUDIES, "learning_rate", ("learning_rate", [1e-2]))
    argv = ["learning_rate", "--quick", "--jobs", "2", "--out_dir", str(tmp_path / "runs"),
            "--static_dir", str(tmp_path / "static")]
    assert ablations.main(argv) == {}
    grid = tmp_path / "static" / "learning_rate.png"
    with Image.open(grid) as image:  # 2 rows (the value + ours), NUM_COLUMNS epoch columns
        assert image.size == figures.grid_size_pixels(2, ablations.NUM_COLUMNS)
    metrics = ablations.read_metrics(str(tmp_path / "runs" / "learning_rate=0.01"))
    assert [int(r["epoch"]) for r in metrics] == [0, 1]  # save_images_step = 1 for 2 epochs
    table = ablations.study_table("learning_rate", ablations.study_runs("learning_rate", ablations.QUICK),
                                  str(tmp_path / "runs"))
    rows = [line.split(" | ")[0] for line in table.splitlines()[4:]]
    assert rows == ["| 0.01", "| ours (default)"] and "failed" not in table
    stamp = os.path.getmtime(tmp_path / "runs" / "ours_default" / "model.pth")
    assert ablations.main(argv) == {}  # everything done: nothing retrained
    assert os.path.getmtime(tmp_path / "runs" / "ours_default" / "model.pth") == stamp


def test_a_run_from_before_a_flag_existed_is_not_stale_when_it_matches_the_old_behaviour(tmp_path):
    flags = {**ablations.CLASSIC, "num_epochs": 3, "save_images_step": 1}
    exp = str(tmp_path / "run")
    fake_run(exp, flags, 3)
    with open(os.path.join(exp, "config.json")) as f:
        config = json.load(f)
    for key in ablations.BEFORE_FLAG:  # as an older ddpm.py wrote it
        del config[key]
    with open(os.path.join(exp, "config.json"), "w") as f:
        json.dump(config, f)
    assert ablations.run_state(exp, flags) == "done"
    # the same old run is stale for a configuration that uses the new behaviour
    assert ablations.run_state(exp, {**flags, "lr_schedule": "cosine"}) == "overwrite"


def test_tables_go_between_their_markers_and_the_prose_stays(tmp_path):
    doc = tmp_path / "ablations.md"
    doc.write_text("# Ablations\n\nProse about rates.\n\n<!-- table: learning_rate -->\nOLD TABLE\n<!-- /table -->\n\n"
                   "More prose.\n")
    ablations.write_tables(["learning_rate", "hidden_size"], {}, str(tmp_path / "runs"), str(doc))
    text = doc.read_text()
    assert "Prose about rates." in text and "More prose." in text and "OLD TABLE" not in text
    assert text.count("<!-- table: learning_rate -->") == 1 and text.count("<!-- table: hidden_size -->") == 1
    assert text.index("### learning_rate") < text.index("More prose.") < text.index("### hidden_size")
    assert "| 0.01 | not run |" in text  # no runs in that folder
