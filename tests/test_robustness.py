"""Nothing lost: refusal to clobber, Ctrl-C and resume, corrupt files, NaN losses."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from engine import optim
from helpers import ROOT, TINY, assert_one_line_error, outputs, run_tool, train

RUN = ["--dataset", "moons", "--dataset_size", "2000", "--num_epochs", "12", "--eval_batch_size", "100",
       "--checkpoint_every", "3", "--quiet"]


def test_existing_experiment_is_not_clobbered(tmp_path):
    assert train(tmp_path, "exp", *TINY).returncode == 0
    before = (tmp_path / "exp" / "loss.npy").read_bytes()
    line = assert_one_line_error(train(tmp_path, "exp", *TINY, "--seed", "3"))
    assert "--resume" in line and "--overwrite" in line
    assert (tmp_path / "exp" / "loss.npy").read_bytes() == before
    assert train(tmp_path, "exp", *TINY, "--seed", "3", "--overwrite").returncode == 0
    assert (tmp_path / "exp" / "loss.npy").read_bytes() != before


def test_sigint_then_resume_matches_an_uninterrupted_run(tmp_path):
    # frames in the worker process, one per epoch: a checkpoint is likely to hold frames not made yet
    # (kept as their weights, made after the resume). 30 epochs: the SIGINT comes ~0.3 s after the
    # first checkpoint (epoch 3), long before the run could finish
    run = [*RUN, "--frame_worker", "on", "--save_images_step", "1", "--num_epochs", "30"]
    assert train(tmp_path, "whole", *run).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(ROOT, "ddpm.py"), "--out_dir", str(tmp_path), "--experiment_name", "cut", *run]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:  # wait until training is under way
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]  # stopped early, not finished
    assert "--resume" in out + err and "Traceback" not in err
    resumed = train(tmp_path, "cut", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    _, loss_whole, frames_whole = outputs(tmp_path / "whole")
    _, loss_cut, frames_cut = outputs(tmp_path / "cut")
    assert np.array_equal(loss_whole, loss_cut)
    assert np.array_equal(frames_whole, frames_cut)


def test_resume_refuses_a_changed_flag(tmp_path):
    assert train(tmp_path, "exp", *TINY).returncode == 0
    line = assert_one_line_error(train(tmp_path, "exp", "--resume", "--hidden_size", "64"))
    assert "hidden_size" in line


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    assert train(tmp_path, "exp", *TINY).returncode == 0
    checkpoint = tmp_path / "exp" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # truncated
    line = assert_one_line_error(train(tmp_path, "exp", "--resume", "--num_epochs", "5"), status=1)
    assert "checkpoint.pt is not a PyTorch file: it is truncated or damaged" in line
    checkpoint.write_bytes(b"not a checkpoint at all")
    assert "checkpoint.pt is not a PyTorch file" in assert_one_line_error(
        train(tmp_path, "exp", "--resume", "--num_epochs", "5"), 1)


def test_damaged_weights_are_refused_in_words(tmp_path):
    # the loader's own messages ("pop from empty list", "Invalid argument") say nothing to a user
    import io
    import torch
    assert train(tmp_path, "exp", *TINY).returncode == 0
    weights = tmp_path / "exp" / "model_ema.pth"
    raw = weights.read_bytes()
    cases = {"empty": (b"", "is empty (0 bytes)"), "truncated": (raw[:len(raw) // 2], "truncated or damaged"),
             "a flipped byte": (raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:], "fails its checksum")}
    import argparse
    buffer = io.BytesIO()
    torch.save({"weight": argparse.Namespace(code="a class weights_only loading refuses")}, buffer)
    cases["pickled code"] = (buffer.getvalue(), "loading those could run code")
    for name, (content, words) in cases.items():
        weights.write_bytes(content)
        line = assert_one_line_error(run_tool("sample.py", tmp_path / "exp", "--output", tmp_path / "x.npy",
                                              "--overwrite"))
        assert "model_ema.pth" in line and words in line, (name, line)


def test_config_that_does_not_match_the_checkpoint(tmp_path):
    assert train(tmp_path, "exp", *TINY).returncode == 0
    config_path = tmp_path / "exp" / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 64
    config_path.write_text(json.dumps(config))
    line = assert_one_line_error(train(tmp_path, "exp", "--resume", "--num_epochs", "5"), status=1)
    assert "does not match" in line
    from helpers import run_tool
    assert "does not match" in assert_one_line_error(run_tool("sample.py", tmp_path / "exp", "--output",
                                                              tmp_path / "s.npy"))
    config_path.write_text("{ not json")
    assert "config.json" in assert_one_line_error(train(tmp_path, "exp", "--resume"))
    assert "config.json" in assert_one_line_error(run_tool("sample.py", tmp_path / "exp", "--output",
                                                           tmp_path / "s.npy"))


def test_non_finite_loss_stops_with_a_one_line_message_and_writes_no_weights(tmp_path):
    # from the shell, diverging in the first epoch (no checkpoint yet; the next test has one)
    result = train(tmp_path, "nan", *TINY, "--learning_rate", "1e12", "--num_epochs", "4")
    line = assert_one_line_error(result, status=1)
    assert "step" in line and "learning rate" in line
    assert not (tmp_path / "nan" / "model.pth").exists()  # no weights from a diverged run


def test_a_loss_that_turns_non_finite_late_keeps_the_checkpoint_of_the_last_good_epoch(tmp_path, monkeypatch):
    # in-process: the learning rate jumps to 1e12 at step 16 (the third epoch of 8 steps), after the
    # checkpoints of epochs 1 and 2 (--checkpoint_every 1). The run stops at the end of epoch 3 with the
    # one-line message, writes no outputs, and checkpoint.pt is still that of epoch 2: finite, the same
    # weights as those of the same run stopped there
    import pytest
    import torch
    import ddpm
    flags = [*TINY, "--checkpoint_every", "1", "--lr_schedule", "constant", "--compile", "off", "--frame_worker", "off"]
    constant = optim.learning_rate_at
    monkeypatch.setattr(optim, "learning_rate_at", lambda step, total, config: 1e12 if step >= 16 else constant(step, total, config))
    with pytest.raises(SystemExit) as stopped:
        ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "late", *flags, "--num_epochs", "4"])
    message = str(stopped.value.code)
    assert message.startswith("ddpm.py: error: the loss became non-finite at step") and "(epoch 2)" in message
    monkeypatch.setattr(optim, "learning_rate_at", constant)
    ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "two", *flags, "--num_epochs", "2"])
    kept = torch.load(tmp_path / "late" / "checkpoint.pt", weights_only=True)
    good = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert (kept["epoch"], kept["step"]) == (2, 16)
    for key, value in good["model"].items():
        assert torch.isfinite(kept["model"][key]).all()
        assert torch.equal(kept["model"][key], value), key
    assert sorted(os.listdir(tmp_path / "late")) == ["checkpoint.pt", "config.json", "images"]  # no outputs


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    line = assert_one_line_error(train(blocker, "exp", *TINY))
    assert "cannot write" in line


def test_not_enough_disk_space_fails_before_training(tmp_path, monkeypatch, capsys):
    import shutil
    import pytest
    import ddpm
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    with pytest.raises(SystemExit) as exit_info:
        ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "full", *TINY])
    assert exit_info.value.code == 2
    assert "disk space" in capsys.readouterr().err
    assert not (tmp_path / "full" / "loss.npy").exists()


def test_a_disk_that_fills_before_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch, capsys):
    import errno
    import pytest
    import ddpm
    from engine import checkpoints

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints, "atomic_save", full)  # every checkpoint.pt write fails
    with pytest.raises(SystemExit) as exit_info:
        ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "full", *TINY, "--checkpoint_every", "1"])
    message = str(exit_info.value.code)
    assert "No space left on device" in message and "no checkpoint had been written yet" in message
    assert "is kept" not in message and not (tmp_path / "full" / "checkpoint.pt").exists()


def test_a_frame_too_large_for_memory_is_refused_before_training(tmp_path):
    line = assert_one_line_error(train(tmp_path, "big", *TINY, "--eval_batch_size", "1000000000"))
    assert "--eval_batch_size 1000000000" in line and "GiB of memory" in line
    assert not (tmp_path / "big").exists()
