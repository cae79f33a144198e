"""Reflow (formulations/reflow.py) and MeanFlow (formulations/meanflow.py) against closed forms.

On Gaussian data x ~ N(MU, S^2) the flow path z_t = (1 - t) x + t eps has Gaussian marginals N(m_t, s_t^2),
m_t = (1 - t) MU, s_t^2 = (1 - t)^2 S^2 + t^2, its ODE is linear and carries z_t to z_r = m_r + (s_r / s_t)(z_t - m_t):
so the velocity, the average velocity over any (r, t) and the straight coupling are all known exactly, written out
below. Every expected value is one of those, or the teacher's own sampler run here, never the code's output."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm
from formulations import flow, meanflow, reflow
from helpers import ROOT, outputs, stop_after_step

MU, S = 1.5, 0.5  # the data: N(MU, S^2) in each coordinate
SMALL = ["--dataset_size", "128", "--train_batch_size", "32", "--eval_batch_size", "32", "--save_images_step", "1",
         "--quiet", "--compile", "off", "--frame_worker", "off"]


def mean(t):
    return (1 - t) * MU


def std(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def col(t):
    return t.reshape(-1, 1)


def exact_average_velocity(z, r, t):
    """u(z, r, t) = (z - z_r) / (t - r) with z_r where the ODE carries z from t to r (r < t)."""
    z_r = col(mean(r)) + col(std(r) / std(t)) * (z - col(mean(t)))
    return (z - z_r) / col(t - r)


def exact_velocity(z, t):
    """v(z, t) = dm_t/dt + (ds_t/dt / s_t)(z - m_t)."""
    ds_dt = (-(1 - t) * S**2 + t) / std(t)
    return -MU + col(ds_dt / std(t)) * (z - col(mean(t)))


class ExactAverageVelocity(torch.nn.Module):
    """A 'network' that answers with the exact u, reading (t, r) from the times MeanFlow gives it: (s t, s (t - r)),
    s = meanflow.TIME_SCALE; at r = t (Euler, Heun) the exact velocity."""

    def forward(self, z, times):
        times = times.double().expand(len(z), 2) / meanflow.TIME_SCALE
        t = times[:, 0]
        r = t - times[:, 1]
        z = z.double()
        average = exact_average_velocity(z, r, torch.where(r < t, t, t + 1))  # (where r = t the other branch)
        return torch.where(col(r < t), average, exact_velocity(z, t)).float()


def times_inside(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.95 * torch.rand(n, generator=g, dtype=torch.float64)
    return t * torch.rand(n, generator=g, dtype=torch.float64), t  # r < t


# ---- MeanFlow ---------------------------------------------------------------------------------------------

def test_meanflow_target_with_the_exact_velocity_is_the_exact_average_velocity():
    """u_tgt = v - (t - r)(v . d_z u + d_t u), the JVP of the exact u with the exact v, is u itself (the MeanFlow
    identity, their eq. 6): at 64 random (z, r, t) to float64 precision; and a wrong tangent is not."""
    r, t = times_inside(64, 0)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    v = exact_velocity(z, t)
    target = meanflow.meanflow_target(exact_average_velocity, z, r, t, v)
    torch.testing.assert_close(target, exact_average_velocity(z, r, t), rtol=1e-10, atol=1e-10)
    far = (target - exact_average_velocity(z, r, t - 0.1)).abs().max()  # the closed form can tell a near miss
    assert far > 1e-2


def test_training_and_sampling_give_the_network_the_same_times():
    """The loss's u_theta (average_velocity) and the samplers' (step_velocity) both hand the network (t, t - r) on
    TIME_SCALE: with the exact 'network' both return the closed-form u at the same (z, r, t)."""
    r, t = times_inside(8, 11)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(12))
    exact = exact_average_velocity(z.double(), r, t).float()
    trained = meanflow.average_velocity(ExactAverageVelocity(), z, r.float(), t.float())
    torch.testing.assert_close(trained, exact, rtol=1e-4, atol=1e-4)
    formulation = meanflow_formulation()
    for i in range(8):
        sampled = formulation.step_velocity(ExactAverageVelocity(), z[i:i + 1], float(r[i]), float(t[i]))
        torch.testing.assert_close(sampled, exact[i:i + 1], rtol=1e-4, atol=1e-4)


class SmoothNet(torch.nn.Module):
    """A float64 network of (z, times) with times (s t, s (t - r)) entering differently, for the JVP."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.w = torch.nn.Parameter(torch.randn(4, 16, generator=g, dtype=torch.float64))
        self.out = torch.nn.Parameter(torch.randn(16, 2, generator=g, dtype=torch.float64) / 4)

    def forward(self, z, times):
        times = times.to(z.dtype) / meanflow.TIME_SCALE * torch.tensor([1.7, -2.3], dtype=z.dtype)
        return torch.tanh(torch.cat([z, times.expand(len(z), 2)], dim=1) @ self.w) @ self.out


def test_meanflow_jvp_is_the_finite_difference_along_the_path():
    """The bracket of the target, one JVP with the tangent (v, 0, 1), equals the central difference of the network's
    u(z + h v, r, t + h) - u(z - h v, r, t - h) over 2h (r fixed), through average_velocity's times."""
    net = SmoothNet()
    r, t = times_inside(16, 3)
    g = torch.Generator().manual_seed(4)
    z, v = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)

    def u(z, r, t):
        return meanflow.average_velocity(net, z, r, t).double()
    with torch.no_grad():
        h = 1e-5
        finite = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
        target = meanflow.meanflow_target(u, z, r, t, v)
    torch.testing.assert_close(target, v - col(t - r) * finite, rtol=1e-6, atol=1e-6)


def meanflow_formulation(**config):
    return meanflow.MeanFlow({"num_timesteps": 1000, "clip_sample": 0.0, **config})


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_steps_of_the_exact_average_velocity_map_noise_onto_the_data_gaussian(steps):
    """The 'average' sampler with the exact u lands where the ODE does, in any number of steps: z_0 = MU + S z_1
    sample by sample (z_1 the generator's first draw), so 20,000 samples have the data's mean and deviation."""
    formulation = meanflow_formulation()
    x = formulation.sample(ExactAverageVelocity(), (20_000, 2), sampler="average", num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(5))
    z_1 = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, MU + S * z_1, rtol=0, atol=1e-5)
    assert abs(float(x.mean()) - MU) < 4 * S / (40_000 ** 0.5)
    assert abs(float(x.std()) - S) < 0.01


def test_meanflow_draws_t_above_r_and_keeps_r_below_t_for_the_interval_fraction_only():
    """(t, r): r <= t always; r < t for a share --interval_fraction (0.25: 4 se of 40,000 draws); both inside (0, 1);
    logit-normal(-0.4, 1): the median of t's draws is the larger of two, sigmoid(-0.4 + 0.6745) (the median of the
    max of two normals is at their 0.7071 quantile, 0.5449 sd)."""
    formulation = meanflow_formulation(interval_fraction=0.25, flow_time="logit_normal")
    times = formulation.sample_timesteps(40_000, torch.Generator().manual_seed(6))
    t, r = times[:, 0], times[:, 1]
    assert times.shape == (40_000, 2) and bool((r <= t).all()) and bool((t < 1).all()) and bool((r > 0).all())
    share = float((r < t).float().mean())
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / 40_000) ** 0.5
    expected_median = float(torch.sigmoid(torch.tensor(-0.4 + 0.5449)))
    assert abs(float(t.median()) - expected_median) < 0.01


def test_meanflow_loss_is_zero_where_the_network_is_the_exact_average_velocity_of_a_point_mass():
    """Data all at one point x: every path is the straight line z_t = (1 - t) x + t eps, so u(z, r, t) = (z - x) / t
    exactly, for every eps; a network that answers it has loss 0, one off by 0.1 the squared error of that offset."""
    x = torch.tensor([[1.0, -2.0]]).expand(64, 2)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(7))
    formulation = meanflow_formulation(interval_fraction=1.0, flow_time="uniform")
    times = formulation.sample_timesteps(64, torch.Generator().manual_seed(8))

    class PointMass(torch.nn.Module):
        def __init__(self, offset):
            super().__init__()
            self.offset = offset

        def forward(self, z, times):
            return (z - torch.tensor([1.0, -2.0])) / (times[:, :1] / meanflow.TIME_SCALE) + self.offset
    assert float(formulation.loss(PointMass(0.0), x, noise, times)) < 1e-6
    # off by 0.1 in both coordinates: ||Delta||^2 = 0.02 for every example; the paper's weight (p = 1) makes it
    # 0.02 / (0.02 + 1e-3)
    assert float(formulation.loss(PointMass(0.1), x, noise, times)) == pytest.approx(0.02, rel=1e-4)
    adaptive = meanflow_formulation(interval_fraction=1.0, flow_time="uniform", weight_power=1.0)
    assert float(adaptive.loss(PointMass(0.1), x, noise, times)) == pytest.approx(0.02 / 0.021, rel=1e-4)


# ---- reflow -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny trained flow-matching experiment (2 epochs of 128 dino points, 4 Euler steps a frame)."""
    out = tmp_path_factory.mktemp("teacher")
    ddpm.main(["--out_dir", str(out), "--experiment_name", "flow", "--objective", "flow", *SMALL, "--num_epochs", "2",
               "--num_inference_steps", "4"])
    return out / "flow"


def test_reflow_pairs_are_the_teachers_ode_solutions_and_the_student_starts_as_the_teacher(teacher):
    """training_data loads the teacher's EMA weights into the student and returns pairs (x_0, x_1): x_1 the noise of
    the generator seeded seed + 50,000, x_0 the teacher's own Heun sampler (100 steps) run from it by flow.py."""
    config = json.loads((teacher / "config.json").read_text())
    student_config = reflow.Reflow.prepare({**config, "objective": "reflow", "teacher": str(teacher),
                                            "dataset_size": 300, "num_epochs": 5}, given={"dataset_size", "num_epochs"})
    student = ddpm.build_model(student_config)
    pairs, labels = reflow.Reflow(student_config).training_data(student, torch.zeros(128, 2), None)
    teacher_model = ddpm.build_model(config)
    teacher_model.load_state_dict(torch.load(teacher / "model_ema.pth", weights_only=True))
    for a, b in zip(student.state_dict().values(), teacher_model.state_dict().values()):
        assert torch.equal(a, b)
    seed = torch.Generator().manual_seed(config["seed"] + 50_000)
    expected = flow.FlowMatching(config).sample(teacher_model, (300, 2), sampler="heun", num_inference_steps=100,
                                                generator=seed)
    x_1 = torch.randn(300, 2, generator=torch.Generator().manual_seed(config["seed"] + 50_000))
    assert pairs.shape == (300, 2, 2) and labels is None
    torch.testing.assert_close(pairs[:, 1], x_1, rtol=0, atol=0)
    torch.testing.assert_close(pairs[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert student_config["hidden_size"] == config["hidden_size"] and student_config["num_epochs"] == 5


def test_a_reflow_student_of_the_exact_straight_coupling_samples_the_gaussian_in_one_step():
    """Pairs of the exact coupling of N(0, 1) and N(MU, S^2) in each coordinate, x_0 = MU + S x_1: a small MLP trained
    with Reflow's loss on them takes one Euler step x_0 = x_1 - v(x_1, 1) to samples with the data's mean and
    deviation (flow matching's loss on independent pairs would have v(x_1, 1) = x_1 - MU: a deviation near 0)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(9)
    x_1 = torch.randn(4096, 2, generator=g)
    pairs = torch.stack([MU + S * x_1, x_1], dim=1)
    net = ddpm.MLP(hidden_size=64, hidden_layers=2, embedding_size=32, num_timesteps=1000, input_embedding="identity")
    formulation = reflow.Reflow({"num_timesteps": 1000, "clip_sample": 0.0, "teacher": "unused"})
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(600):
        batch = pairs[torch.randint(0, 4096, (256,), generator=g)]
        loss = formulation.loss(net, batch, torch.randn(256, 2, 2, generator=g), formulation.sample_timesteps(256, g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = formulation.sample(net, (20_000, 2), sampler="euler", num_inference_steps=1,
                           generator=torch.Generator().manual_seed(10))
    assert abs(float(x.mean()) - MU) < 0.05
    assert abs(float(x.std()) - S) < 0.05


# ---- the command line, --resume, torchrun ------------------------------------------------------------------

def run(*flags):
    return subprocess.run([sys.executable, "ddpm.py", *map(str, flags)], cwd=ROOT, capture_output=True, text=True)


def test_reflow_refuses_a_missing_or_wrong_teacher_and_a_network_flag_that_disagrees(teacher, tmp_path):
    """One line, exit status 2, no experiment folder: no --teacher, a folder that is not an experiment, a teacher
    that is not a flow, a --hidden_size the teacher does not have; --interval_fraction is MeanFlow's alone."""
    ddpm_teacher = tmp_path / "ddpm_teacher"
    ddpm_teacher.mkdir()
    (ddpm_teacher / "config.json").write_text(json.dumps({"objective": "ddpm"}))
    cases = [(["--objective", "reflow"], "needs --teacher"),
             (["--objective", "reflow", "--teacher", tmp_path], "cannot read its config.json"),
             (["--objective", "reflow", "--teacher", ddpm_teacher], "is an --objective ddpm experiment"),
             (["--objective", "reflow", "--teacher", teacher, "--hidden_size", "64"], "has hidden_size 128"),
             (["--objective", "flow", "--interval_fraction", "0.5"], "is for --objective meanflow")]
    for flags, message in cases:
        result = run(*flags, "--out_dir", tmp_path / "exps", "--experiment_name", "x")
        assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)
        assert len(result.stderr.strip().splitlines()[-1]) < 400 and "Traceback" not in result.stderr
        assert not (tmp_path / "exps" / "x").exists()


@pytest.mark.parametrize("objective", ["reflow", "meanflow"])
def test_a_resumed_reflow_or_meanflow_run_matches_the_uninterrupted_one(objective, teacher, tmp_path, monkeypatch):
    """Stopped after step 6 (as by Ctrl-C: a checkpoint, exit 130) and resumed, the loss.npy and frames.npy are those of
    the run uninterrupted, bit for bit (reflow makes the same pairs again; MeanFlow's (t, r) come from the saved stream)."""
    flags = ["--objective", objective, *SMALL, "--num_inference_steps", "2", "--num_epochs", "3"]
    flags += ["--teacher", str(teacher)] if objective == "reflow" else []
    ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "whole", *flags])
    stop_after_step(monkeypatch, 6, lambda: ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "cut", *flags]))
    ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "cut", "--resume", "--quiet", "--frame_worker", "off",
               "--compile", "off"])
    config, loss_whole, frames_whole = outputs(tmp_path / "whole")
    _, loss_cut, frames_cut = outputs(tmp_path / "cut")
    assert config["objective"] == objective and loss_whole.shape == (12,) and frames_whole.shape == (3, 32, 2)
    assert np.array_equal(loss_whole, loss_cut) and np.array_equal(frames_whole, frames_cut)
    if objective == "meanflow":
        assert config["time_inputs"] == 2


@pytest.mark.parametrize("objective", ["reflow", "meanflow"])
def test_reflow_and_meanflow_under_torchrun_train_disjoint_shards_and_write_one_set_of_outputs(objective, teacher,
                                                                                               tmp_path):
    """2 gloo processes: one set of outputs whose weights load in one process and sample at 1 evaluation, and a
    loss.npy of finite values (MeanFlow's target goes through the model inside DistributedDataParallel)."""
    flags = ["--teacher", str(teacher)] if objective == "reflow" else []
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "ddpm.py", "--out_dir", str(tmp_path), "--experiment_name", "x", "--objective", objective,
                             *SMALL, "--num_epochs", "2", *flags], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done in") == 1
    config, loss, frames = outputs(tmp_path / "x")
    assert config["world_size"] == 2 and loss.shape == (4,) and np.isfinite(loss).all()
    assert frames.shape == (2, 32, 2) and np.isfinite(frames).all()
    model = ddpm.build_model(config)
    model.load_state_dict(torch.load(tmp_path / "x" / "model.pth", weights_only=True))
