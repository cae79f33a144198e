"""The formulations (ddpm.DDPM, formulations/flow.py, formulations/edm.py) through everything around them:
--resume and torchrun, guidance, the samplers they name, bf16, sample.py's labels, the frames' spacing, the
training times of their papers, what they refuse, EDM's stochastic sampler. Each expected value is written
out here (a closed form, a loop by hand, a count, a rank's own record) or is the same run uninterrupted, never
an output of the code under test taken as the answer."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasets
import ddpm
from engine import frames
from extensions import ode
from extensions.guidance import Guidance
from formulations import edm, flow
from helpers import ROOT, outputs, parse_config, stop_after_step, write_fake_mnist
from test_objectives import MU, STD, ExactF, ExactVelocity

OBJECTIVES = ("ddpm", "flow", "edm")
T = 1000  # num_timesteps of the formulations built here by hand
# a tiny 2D run: 128 points in batches of 32 (4 steps an epoch in one process), a frame of 32 points every epoch
SMALL = ["--dataset_size", "128", "--train_batch_size", "32", "--eval_batch_size", "32", "--save_images_step", "1",
         "--quiet", "--compile", "off", "--frame_worker", "off"]


def steps_flags(objective):
    """Few sampling steps for flow and EDM frames; DDPM's default sampler walks its T = 200 steps."""
    return [] if objective == "ddpm" else ["--num_inference_steps", "4"]


def run_in_process(out_dir, name, *flags):
    return ddpm.main(["--out_dir", str(out_dir), "--experiment_name", name, *map(str, flags)])


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def flow_matching(**config):
    return flow.FlowMatching({"num_timesteps": T, "clip_sample": 0.0, **config})


def edm_formulation(**config):
    return edm.EDM({"num_timesteps": T, "clip_sample": 0.0, "sigma_data": 0.5, "sigma_max": 80.0, **config})


def edm_denoised_by_hand(F, x, sigma, sigma_data=0.5):
    """D(x; sigma) = c_skip x + c_out F(c_in x; 1000 c_noise) with Table 1's coefficients, written out; F(x_in, time)
    is the network output (guided or not) as a function of its inputs."""
    sd2 = sigma_data**2
    c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * sigma_data / math.sqrt(sigma**2 + sd2)
    c_in, c_noise = 1 / math.sqrt(sigma**2 + sd2), math.log(sigma) / 4
    return c_skip * x + c_out * F(c_in * x, torch.tensor([1000 * c_noise]))


def correlation(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


# ---- 1. --resume ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_run_stopped_mid_epoch_and_resumed_matches_the_uninterrupted_run(objective, tmp_path, monkeypatch):
    """A stop requested after step 6 (epoch 1, batch 2 of 4, as a Ctrl-C between two steps is) writes a
    checkpoint and exits 130; --resume then finishes the run. Its loss.npy and frames.npy are those of the same
    run uninterrupted, bit for bit: the weights, AdamW and EMA state, the epoch's order and the noise stream of
    each formulation's training times all come back from the checkpoint."""
    flags = [*SMALL, "--num_epochs", "3", "--objective", objective, *steps_flags(objective)]
    run_in_process(tmp_path, "whole", *flags)
    stop_after_step(monkeypatch, 6, lambda: run_in_process(tmp_path, "cut", *flags))
    assert len(np.load(tmp_path / "cut" / "loss.npy")) == 6  # the outputs so far: it did stop part way
    run_in_process(tmp_path, "cut", "--resume", "--quiet", "--frame_worker", "off", "--compile", "off")
    config, loss_whole, frames_whole = outputs(tmp_path / "whole")
    _, loss_cut, frames_cut = outputs(tmp_path / "cut")
    assert config["objective"] == objective and loss_whole.shape == (12,) and frames_whole.shape == (3, 32, 2)
    assert np.array_equal(loss_whole, loss_cut)
    assert np.array_equal(frames_whole, frames_cut)


# ---- 2. and 6. torchrun -----------------------------------------------------------------------------------

RECORDING_LAUNCHER = """
import os, sys
import torch
sys.path.insert(0, {root!r})
import ddpm

record = {{"loss": [], "x": []}}
real_step = ddpm.training_step


def recording_step(net, loss_function, optimizer, x_start, noise, t, labels=None):
    loss = real_step(net, loss_function, optimizer, x_start, noise, t, labels)
    record["loss"].append(float(loss))   # this rank's own loss of this step, before any averaging
    record["x"].append(x_start.clone())  # this rank's batch
    return loss


ddpm.training_step = recording_step
ddpm.main(sys.argv[1:])
torch.save({{"loss": torch.tensor(record["loss"], dtype=torch.float64), "x": torch.stack(record["x"])}},
           os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
"""
DISTRIBUTED = ("flow", "edm")  # DDPM's torchrun run: tests/test_distributed.py


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """{objective: (experiment folder, [rank 0's, rank 1's record], torchrun's stdout)} of 2-process gloo runs of
    ddpm.py under torchrun (128 points, 64 per rank in batches of 32: 2 steps an epoch, 2 epochs), launched through
    a script that records each rank's batches and per-step losses. The launches run side by side: most of their
    time is the start of their processes. (Two runs one after the other in the same processes can hang: a rank
    that finishes first joins the next process group while the other still tears down the last.)"""
    launches = {}
    for objective in DISTRIBUTED:
        out = tmp_path_factory.mktemp(f"torchrun_{objective}")
        launcher = out / "launch.py"
        launcher.write_text(RECORDING_LAUNCHER.format(root=ROOT, out=str(out)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
               "--out_dir", str(out), "--experiment_name", objective, "--objective", objective, *SMALL,
               "--num_epochs", "2", *steps_flags(objective)]
        launches[objective] = out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                    env=dict(os.environ, OMP_NUM_THREADS="1"))
    runs = {}
    try:
        for objective, (out, process) in launches.items():
            stdout, stderr = process.communicate(timeout=240)
            assert process.returncode == 0, stderr[-3000:]
            ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
            runs[objective] = out / objective, ranks, stdout
    finally:  # a launch that hangs, or is left when another failed: SIGTERM, which torchrun passes on to its ranks
        for _, process in launches.values():  # (each in a session of its own), then SIGKILL after 30 s
            if process.poll() is None:
                process.terminate()
                try:
                    process.communicate(timeout=90)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    return runs


@pytest.mark.parametrize("objective", DISTRIBUTED)
def test_flow_and_edm_under_torchrun_write_one_set_of_outputs_from_disjoint_shards(objective, torchrun_runs):
    """Flow and EDM as tests/test_distributed.py checks DDPM: one process prints, one set of outputs, weights that load
    in a single process; and each epoch the two ranks train on disjoint halves that together are the 128
    training points (the dino points of seed 0, drawn here)."""
    exp, ranks, stdout = torchrun_runs[objective]
    assert stdout.count("done in") == 1  # only rank 0 prints
    config, loss, frames_npy = outputs(exp)
    assert config["world_size"] == 2 and config["objective"] == objective
    assert loss.shape == (4,) and np.isfinite(loss).all() and frames_npy.shape == (2, 32, 2)
    assert np.isfinite(frames_npy).all()
    assert sorted(os.listdir(exp / "images")) == ["0000.png", "0001.png"]
    model = ddpm.build_model(config)
    model.load_state_dict(torch.load(exp / "model.pth", weights_only=True))  # no "module." prefix
    points = datasets.get_dataset("dino", 128, seed=0)
    if objective == "edm":  # measured once, from all the training data, not from a rank's shard
        assert config["sigma_data"] == pytest.approx(float(points.double().std()), rel=1e-6)
    everything = sorted(map(tuple, points.tolist()))
    for epoch in (0, 1):
        shards = [r["x"][2 * epoch:2 * epoch + 2].reshape(-1, 2) for r in ranks]  # [64, 2] each
        rows = [set(map(tuple, shard.tolist())) for shard in shards]
        assert len(rows[0]) == len(rows[1]) == 64 and not rows[0] & rows[1]
        assert sorted(rows[0] | rows[1]) == everything


@pytest.mark.parametrize("objective", DISTRIBUTED)
def test_a_torchrun_runs_loss_npy_is_the_mean_of_the_ranks_losses(objective, torchrun_runs):
    """engine/ddp.Processes.average_epoch: loss.npy holds, step by step, the mean of the two ranks' own losses
    (recorded in each rank as its training step returned them), not rank 0's alone nor their sum."""
    exp, ranks, _ = torchrun_runs[objective]
    loss = np.load(exp / "loss.npy").astype(np.float64)
    rank0, rank1 = ranks[0]["loss"].numpy(), ranks[1]["loss"].numpy()
    assert loss.shape == rank0.shape == rank1.shape == (4,)
    np.testing.assert_allclose(loss, (rank0 + rank1) / 2, rtol=1e-6)
    assert np.abs(rank0 - rank1).min() > 1e-4  # the ranks' losses differ, so the mean is not either one


# ---- 3. guidance under flow and EDM -----------------------------------------------------------------------

class LabelledToy(torch.nn.Module):
    """A class-conditional toy network: linear in x, with offsets that depend on the time and the label; 10 is
    its null label (classifier-free guidance's 'no label')."""
    null_label = 10

    def forward(self, x, time, labels):
        return 0.8 * x - 0.3 * x.flip(-1) + 1e-3 * time.reshape(-1, 1) + 0.25 * labels.reshape(-1, 1).float() - 1.0


class Toy(torch.nn.Module):
    """An unconditional toy network a x + b + c time / 1000: two of them are the model and autoguidance's guide."""

    def __init__(self, a, b, c):
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x, time):
        return self.a * x + self.b + self.c * time.reshape(-1, 1) / 1000


INTERVAL = (300, 600)  # guided timesteps, in DDPM's 0 .. T-1
# the interval's edges as round(.) sees them: 299.6 and 600.4 round into it, 299.4 and 600.6 out of it
INSIDE, OUTSIDE = (299.6, 450.0, 600.4), (299.4, 600.6, 100.0, 900.0)


def guidance_cases():
    """(name, model, labels, Guidance, weak(x, time), strong(x, time)): classifier-free guidance (weak: the model
    with its null label) and autoguidance (weak: the guide), each network called directly."""
    labels = torch.tensor([0, 3, 7, 9, 2])
    cfg_model, model, guide = LabelledToy(), Toy(0.9, 0.2, 0.5), Toy(0.4, -0.3, 1.5)
    return [("classifier-free", cfg_model, labels, Guidance(2.5, None, INTERVAL),
             lambda x, time: cfg_model(x, time, torch.full((5,), 10)), lambda x, time: cfg_model(x, time, labels)),
            ("autoguidance", model, None, Guidance(2.5, guide, INTERVAL), guide, model)]


@pytest.mark.parametrize("case", range(2), ids=["classifier_free", "autoguidance"])
def test_flow_velocity_is_weak_plus_w_times_strong_minus_weak_inside_the_interval(case):
    """FlowMatching.velocity at time t: weak + w (strong - weak) where round(t (T - 1)) lies in the guidance
    interval, else the model's own (strong) output; the network sees the time as 1000 t."""
    name, model, labels, guidance, weak, strong = guidance_cases()[case]
    f = flow_matching()
    x = torch.randn(5, 2, generator=seeded(0))
    for position, inside in [(p, True) for p in INSIDE] + [(p, False) for p in OUTSIDE]:
        t = position / (T - 1)
        time = torch.tensor([1000 * t])
        expected = weak(x, time) + 2.5 * (strong(x, time) - weak(x, time)) if inside else strong(x, time)
        v = f.velocity(model, x, t, labels, guidance)
        torch.testing.assert_close(v, expected, msg=lambda m: f"{name}, t (T-1) = {position}: {m}")
        assert (strong(x, time) - weak(x, time)).abs().max() > 0.1  # guided and unguided differ here


@pytest.mark.parametrize("case", range(2), ids=["classifier_free", "autoguidance"])
def test_edm_denoiser_and_slope_are_guided_inside_the_interval(case):
    """EDM.denoised and EDM.slope at noise level sigma: D = c_skip x + c_out F with F = weak + w (strong - weak)
    where round(sigma / (1 + sigma) (T - 1)) lies in the guidance interval, else the model's own F; the slope is
    (x - D) / sigma."""
    name, model, labels, guidance, weak, strong = guidance_cases()[case]
    e = edm_formulation()
    x = 3 * torch.randn(5, 2, generator=seeded(1))
    for position, inside in [(p, True) for p in INSIDE] + [(p, False) for p in OUTSIDE]:
        u = position / (T - 1)
        sigma = u / (1 - u)  # sigma / (1 + sigma) = u

        def F(x_in, time):
            return weak(x_in, time) + 2.5 * (strong(x_in, time) - weak(x_in, time)) if inside else strong(x_in, time)

        expected = edm_denoised_by_hand(F, x, sigma)
        torch.testing.assert_close(e.denoised(model, x, sigma, labels, guidance), expected,
                                   msg=lambda m: f"{name}, sigma / (1 + sigma) (T-1) = {position}: {m}")
        torch.testing.assert_close(e.slope(model, x, sigma, labels, guidance), (x - expected) / sigma)


# ---- 4. --sampler euler / heun are Euler and Heun -----------------------------------------------------------

class CountingVelocity(torch.nn.Module):
    """A toy network, nonlinear in x and t (so that Euler and Heun differ), that counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, time):
        self.calls += 1
        return torch.sin(2 * x) * time.reshape(-1, 1) / 1000 - 0.5 * x + 0.3


def flow_by_hand(net, x, n, heun):
    """Euler (or Heun, Euler at the last step) on dx/dt = net(x, 1000 t) over t_i = 1 - i / n."""
    for i in range(n):
        t, t_next = 1 - i / n, 1 - (i + 1) / n
        d = net(x, torch.tensor([1000 * t]))
        x_next = x + (t_next - t) * d
        if heun and i < n - 1:
            x_next = x + (t_next - t) * (d + net(x_next, torch.tensor([1000 * t_next]))) / 2
        x = x_next
    return x


@pytest.mark.parametrize("sampler", ode.SAMPLERS)
def test_flow_euler_and_heun_are_the_loops_written_out(sampler):
    """FlowMatching.sample(sampler=euler/heun, n steps) from x_1 (the generator's first draw) is Euler's (Heun's)
    method on t_i = 1 - i / n, at n (2n - 1) network evaluations."""
    n, shape = 6, (50, 2)
    net = CountingVelocity()
    x = flow_matching().sample(net, shape, sampler=sampler, num_inference_steps=n, generator=seeded(3))
    assert net.calls == (n if sampler == "euler" else 2 * n - 1)
    x_1 = torch.randn(shape, generator=seeded(3))
    expected = flow_by_hand(CountingVelocity(), x_1, n, heun=sampler == "heun")
    torch.testing.assert_close(x, expected)
    other = flow_by_hand(CountingVelocity(), x_1, n, heun=sampler != "heun")
    assert (x - other).abs().max() > 1e-3  # the check tells Euler from Heun


@pytest.mark.parametrize("sampler", ode.SAMPLERS)
def test_edm_euler_and_heun_are_the_loops_written_out_on_the_eq5_grid(sampler):
    """EDM.sample(sampler=euler/heun, N steps) from x = sigma_max z (z the generator's first draw) is Euler's (Heun's,
    Euler at the last step) method on dx/dsigma = (x - D(x; sigma)) / sigma over the grid of eq. 5, written out:
    sigma_i = (smax^(1/7) + i / (N - 1) (0.002^(1/7) - smax^(1/7)))^7, then 0."""
    n, shape, sigma_max = 5, (50, 2), 11.0
    net = CountingVelocity()
    x = edm_formulation(sigma_max=sigma_max).sample(net, shape, sampler=sampler, num_inference_steps=n,
                                                    generator=seeded(4))
    assert net.calls == (n if sampler == "euler" else 2 * n - 1)
    grid = [(sigma_max ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - sigma_max ** (1 / 7))) ** 7 for i in range(n)]
    grid.append(0.0)
    reference = CountingVelocity()

    def slope(x, sigma):
        return (x - edm_denoised_by_hand(reference, x, sigma)) / sigma

    y = sigma_max * torch.randn(shape, generator=seeded(4))
    for i in range(n):
        s, s_next = grid[i], grid[i + 1]
        d = slope(y, s)
        y_next = y + (s_next - s) * d
        if sampler == "heun" and i < n - 1:
            y_next = y + (s_next - s) * (d + slope(y_next, s_next)) / 2
        y = y_next
    torch.testing.assert_close(x, y)


# ---- 5. bf16 autocasts ------------------------------------------------------------------------------------

class AutocastProbe(torch.nn.Module):
    """A network that records, at each call, whether autocast is on and the dtype its Linear layer computes in."""

    def __init__(self):
        super().__init__()
        self.linear, self.seen = torch.nn.Linear(2, 2), []

    def forward(self, x, time, labels=None):
        out = self.linear(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out


def formulation_with(objective, precision):
    config = {"dataset": "dino", "num_timesteps": 50, "beta_schedule": "linear", "sigma_data": 0.5,
              "precision": precision}
    return ddpm.FORMULATIONS[objective](config)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bf16_puts_the_network_under_autocast_in_training_and_sampling(objective, precision):
    """With precision bf16 the network runs under CPU autocast to bfloat16 (its Linear computes in bfloat16) in
    each formulation's loss and sampler; with fp32 it does not. The loss itself stays a float32 scalar."""
    formulation, net = formulation_with(objective, precision), AutocastProbe()
    g = seeded(0)
    x0, noise = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    loss = formulation.loss(net, x0, noise, formulation.sample_timesteps(8, g))
    assert loss.dtype == torch.float32 and loss.shape == ()
    sampler = "ddim" if objective == "ddpm" else "euler"
    x = formulation.sample(net, (4, 2), sampler=sampler, num_inference_steps=2, generator=g)
    assert x.dtype == torch.float32
    expected = (True, torch.bfloat16) if precision == "bf16" else (False, torch.float32)
    assert len(net.seen) == 3 and all(seen == expected for seen in net.seen), net.seen


# ---- 7. sample.py --label ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def class_conditional_run(tmp_path_factory):
    """A tiny class-conditional image run on fake digits (2 steps of a narrow U-Net, T = 20, 2 ddim steps)."""
    out = tmp_path_factory.mktemp("conditional")
    data_dir = write_fake_mnist(out)
    run_in_process(out, "cond", "--dataset", "mnist", "--data_dir", data_dir, "--dataset_size", "64",
                   "--num_epochs", "1", "--train_batch_size", "32", "--unet_channels", "8", "--no-unet_attention",
                   "--num_timesteps", "20", "--num_inference_steps", "2", "--eval_batch_size", "10",
                   "--class_conditional", "--precision", "fp32", "--quiet", "--frame_worker", "off")
    return out / "cond"


def labels_seen_by_sample_py(exp, tmp_path, monkeypatch, *flags):
    """The labels of every network call sample.py's sampling makes: 12 samples in chunks of 5, 2 ddim steps."""
    import sample as sample_py
    from images import unet
    seen, forward = [], unet.UNet.forward

    def recording_forward(model, x, t, y=None):
        seen.append(None if y is None else y.tolist())
        return forward(model, x, t, y)

    monkeypatch.setattr(unet.UNet, "forward", recording_forward)
    output = tmp_path / f"samples{len(list(tmp_path.iterdir()))}.npy"
    samples = sample_py.main([str(exp), "--num_samples", "12", "--batch_size", "5", "--output", str(output), *flags])
    assert samples.shape == (12, 1, 28, 28)
    return seen


def test_sample_py_label_conditions_every_network_call_on_that_label(class_conditional_run, tmp_path, monkeypatch):
    """sample.py --label 3: unguided, every call of the network gets labels all 3; with the run's classifier-free
    guidance (scale 3) each call stacks the batch twice, labels all 3 then all the null label 10. Without
    --label the labels go 0, 1, ..., 9, 0, 1 through the 12 samples (chunks of 5: 0-4, 5-9, 0-1), each chunk's
    labels at both of its steps."""
    exp = class_conditional_run
    sizes = [5, 5, 2]
    seen = labels_seen_by_sample_py(exp, tmp_path, monkeypatch, "--label", "3", "--guidance_scale", "1")
    assert seen == [[3] * size for size in sizes for _ in range(2)]
    seen = labels_seen_by_sample_py(exp, tmp_path, monkeypatch, "--label", "3")
    assert seen == [[3] * size + [10] * size for size in sizes for _ in range(2)]
    seen = labels_seen_by_sample_py(exp, tmp_path, monkeypatch, "--guidance_scale", "1")
    cycle = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1]]
    assert seen == [labels for labels in cycle for _ in range(2)]


# ---- 8. the frames' timestep spacing ----------------------------------------------------------------------

def test_frames_use_the_runs_timestep_spacing(tmp_path):
    """A DDPM run with --sampler dpmpp_2m --num_inference_steps 5 --timestep_spacing karras: its last frame is
    ddpm.sample with the EMA weights, that frame's generator and karras spacing, and not the same sampler with
    uniform spacing or quadratic (dpmpp_2m's default)."""
    run_in_process(tmp_path, "karras", *SMALL, "--num_epochs", "2", "--ema_decay", "0.9", "--sampler", "dpmpp_2m",
                   "--num_inference_steps", "5", "--timestep_spacing", "karras")
    config, _, frames_npy = outputs(tmp_path / "karras")
    ema = ddpm.build_model(config)
    ema.load_state_dict(torch.load(tmp_path / "karras" / "model_ema.pth", weights_only=True))
    last = frames_npy[-1]

    def redraw(spacing):
        return ddpm.sample(ema.eval(), ddpm.DDPM(config), last.shape, sampler="dpmpp_2m", num_inference_steps=5,
                           timestep_spacing=spacing,
                           generator=frames.frame_generator(config["seed"], len(frames_npy) - 1)).numpy()

    np.testing.assert_allclose(redraw("karras"), last, rtol=0, atol=1e-5)
    for other in ("uniform", "quadratic"):
        assert np.abs(redraw(other) - last).max() > 1e-3, other


# ---- 9. EDM's training noise levels -----------------------------------------------------------------------

LOW_SIGMA = (80 ** (1 / 7) * 0.2 + 0.002 ** (1 / 7) * 0.8) ** 7  # 0.0851: the lowest fifth of the rho = 7 ramp


def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_edm_noise_levels_are_the_papers_log_normal_with_the_low_noise_share():
    """P_mean = -1.2, P_std = 1.2 (Karras et al. 2022, Table 1): with low_noise_fraction 0, ln(sigma) of 200,000
    draws has that mean and standard deviation; with f = 0.3, the share of sigma below 0.0851 (the lowest fifth of
    the ramp from 80 to 0.002) is f + (1 - f) P(lognormal < 0.0851)."""
    assert edm.P_MEAN == -1.2 and edm.P_STD == 1.2
    n = 200_000
    log_sigma = edm_formulation(low_noise_fraction=0.0).sample_timesteps(n, seeded(0)).double().log()
    assert abs(float(log_sigma.mean()) + 1.2) < 4 * 1.2 / math.sqrt(n)          # standard error 0.0027
    assert abs(float(log_sigma.std()) - 1.2) < 4 * 1.2 / math.sqrt(2 * n)      # standard error 0.0019
    assert LOW_SIGMA == pytest.approx(0.0851, abs=1e-4)
    f = 0.3
    sigma = edm_formulation(low_noise_fraction=f).sample_timesteps(n, seeded(1))
    expected = f + (1 - f) * normal_cdf((math.log(LOW_SIGMA) + 1.2) / 1.2)    # 0.402
    share = float((sigma < LOW_SIGMA).double().mean())
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (share, expected)


# ---- 10. flow's low-noise share; sample() refuses what the command line refuses ----------------------------

def test_flow_low_noise_fraction_draws_that_share_from_the_lowest_fifth():
    """Uniform times with low_noise_fraction f = 0.3: P(t < 0.2) = f + (1 - f) 0.2 and, the low share being
    uniform on (0, 0.2), P(t < 0.1) = f / 2 + (1 - f) 0.1."""
    n, f = 200_000, 0.3
    t = flow_matching(flow_time="uniform", low_noise_fraction=f).sample_timesteps(n, seeded(0))
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    for edge, expected in ((0.2, f + (1 - f) * 0.2), (0.1, f / 2 + (1 - f) * 0.1)):
        share = float((t < edge).double().mean())
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (edge, share, expected)


REFUSED = [("ddpm", "ddpm", 20), ("ddpm", "dpmpp_2m", 201), ("ddpm", "heun", None), ("flow", "ddpm", None),
           ("edm", "ddpm", None)]


@pytest.mark.parametrize("objective, sampler, steps", REFUSED, ids=[f"{o}-{s}-{n}" for o, s, n in REFUSED])
def test_sample_refuses_what_the_command_line_refuses_with_the_same_message(objective, sampler, steps, capsys):
    """On T = 200: DDPM's sampler with 20 steps, more steps than T, a sampler of another formulation. The command
    line exits 2 naming it; the formulation's sample() raises ValueError with the message sampling_error gives,
    and that message is the command line's, before any network call."""
    argv = ["--objective", objective, "--sampler", sampler] + (["--num_inference_steps", str(steps)] if steps else [])
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    command_line = capsys.readouterr().err
    assert exit_info.value.code == 2
    Formulation = ddpm.FORMULATIONS[objective]
    message = Formulation.sampling_error(sampler, steps, 200)
    assert message and message in command_line, (message, command_line)
    formulation = Formulation({"dataset": "dino", "num_timesteps": 200, "beta_schedule": "linear", "sigma_data": 0.5})
    net = CountingVelocity()
    with pytest.raises(ValueError) as refused:
        formulation.sample(net, (4, 2), sampler=sampler, num_inference_steps=steps)
    assert str(refused.value) == message and net.calls == 0


# ---- 11. EDM's stochastic sampler (Algorithm 2) and the stochastic samplers on Gaussian data ----------------

def test_one_euler_step_with_churn_is_algorithm_2_by_hand():
    """ode.solve with churn gamma: sigma_hat = (1 + gamma) sigma, x_hat = x + sqrt(sigma_hat^2 - sigma^2) z with z
    the generator's next draw, then Euler from (x_hat, sigma_hat) to the next level."""
    x, sigma, sigma_next, gamma = torch.randn(40, 2, generator=seeded(0)), 2.0, 1.2, 0.3

    def slope(x, s):
        return torch.tanh(x) / s + 0.1 * s

    out = ode.solve(slope, x, [sigma, sigma_next], "euler", churn=gamma, generator=seeded(5))
    z = torch.randn(x.shape, generator=seeded(5))
    sigma_hat = (1 + gamma) * sigma
    x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * z
    torch.testing.assert_close(out, x_hat + (sigma_next - sigma_hat) * slope(x_hat, sigma_hat))


@pytest.mark.parametrize("s_churn", [1.0, 10.0], ids=["gamma_S_churn_over_N", "gamma_capped"])
def test_edm_sample_with_s_churn_is_algorithm_2_written_out(s_churn):
    """EDM.sample(euler, N = 4 steps, s_churn): gamma = min(S_churn / N, sqrt(2) - 1) at every step (S_tmin = 0,
    S_tmax = inf, S_noise = 1); the start sigma_max z_0, each step's z the generator's next draw."""
    n, shape, sigma_max = 4, (30, 2), 11.0
    e = edm_formulation(sigma_max=sigma_max)
    net = CountingVelocity()
    x = e.sample(net, shape, sampler="euler", num_inference_steps=n, s_churn=s_churn, generator=seeded(6))
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    grid = [(sigma_max ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - sigma_max ** (1 / 7))) ** 7 for i in range(n)]
    grid.append(0.0)
    g = seeded(6)
    y = sigma_max * torch.randn(shape, generator=g)
    for s, s_next in zip(grid[:-1], grid[1:]):
        s_hat = (1 + gamma) * s
        y = y + math.sqrt(s_hat**2 - s**2) * torch.randn(shape, generator=g)
        y = y + (s_next - s_hat) * (y - edm_denoised_by_hand(CountingVelocity(), y, s_hat)) / s_hat
    torch.testing.assert_close(x, y)


STOCHASTIC = [("flow", "dpmpp_2m_sde", 100, None), ("edm", "heun", 200, 40.0)]
DETERMINISTIC = [("flow", "heun", 25, None), ("edm", "heun", 40, None)]


@pytest.mark.parametrize("name, sampler, steps, s_churn", STOCHASTIC + DETERMINISTIC,
                         ids=[f"{c[0]}-{c[1]}-churn{c[3]}" for c in STOCHASTIC + DETERMINISTIC])
def test_stochastic_samplers_draw_the_gaussian_data_and_forget_their_start(name, sampler, steps, s_churn):
    """Data N(1.5, 0.5^2), the exact velocity / denoiser: flow's dpmpp_2m_sde and EDM's heun with S_churn 40
    reproduce its mean and variance within 4 standard errors (20,000 x 2 draws: 0.0025 and 0.0018) and their
    samples are nearly uncorrelated with the starting noise (|corr| < 0.1); the deterministic samplers map the
    starting noise to the sample almost linearly (corr > 0.99)."""
    formulation = flow_matching() if name == "flow" else edm_formulation()
    net = ExactVelocity() if name == "flow" else ExactF(formulation)
    shape = (20_000, 2)
    options = {"s_churn": s_churn} if s_churn is not None else {}
    x = formulation.sample(net, shape, sampler=sampler, num_inference_steps=steps, generator=seeded(0), **options)
    start = torch.randn(shape, generator=seeded(0))  # x_1 (flow), x_T / sigma_max (EDM): the generator's first draw
    if (name, sampler, steps, s_churn) in STOCHASTIC:
        count = x.numel()
        assert abs(float(x.mean()) - MU) < 4 * STD / math.sqrt(count)
        assert abs(float(x.var()) - STD**2) < 4 * STD**2 * math.sqrt(2 / count)
        assert abs(correlation(x, start)) < 0.1
    else:
        assert correlation(x, start) > 0.99
