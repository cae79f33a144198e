"""flow.py and edm.py against closed forms: Gaussian data, whose exact velocity and denoiser are known, and
the change of variables that makes DDIM an Euler step of the flow ODE."""
import math

import pytest
import torch

import ddpm
from formulations import edm, flow
from extensions import ode
from helpers import ExactGaussianDenoiser

MU, STD = 1.5, 0.5  # the data: N(MU, STD^2) in every coordinate


class ExactVelocity(torch.nn.Module):
    """E[eps - x_0 | x_t = x] for x_t = (1 - t) x_0 + t eps, x_0 ~ N(MU, STD^2), written out: x_t is Gaussian
    with mean (1 - t) MU and variance V = (1 - t)^2 STD^2 + t^2, Cov(x_0, x_t) = (1 - t) STD^2, Cov(eps, x_t) = t.
    Called as the network is: time = 1000 t."""

    def forward(self, x, time):
        t = (time / 1000).double().reshape(-1, *([1] * (x.dim() - 1)))
        V = (1 - t) ** 2 * STD**2 + t**2
        centred = x.double() - (1 - t) * MU
        x0 = MU + (1 - t) * STD**2 / V * centred
        eps = t / V * centred
        return (eps - x0).float()


class ExactF(torch.nn.Module):
    """The network output F that makes EDM's D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) the exact
    denoiser of N(MU, STD^2): D = MU + STD^2 / (STD^2 + sigma^2) (x - MU). Called as the network is."""

    def __init__(self, formulation):
        super().__init__()
        self.f = formulation

    def forward(self, x_in, time):
        sigma = torch.exp(4 * time.double() / 1000).reshape(-1, *([1] * (x_in.dim() - 1)))  # 1000 c_noise -> sigma
        sd2 = self.f.sigma_data**2
        x = x_in.double() * (sigma**2 + sd2).sqrt()                                           # undo c_in
        exact = MU + STD**2 / (STD**2 + sigma**2) * (x - MU)
        c_skip, c_out = sd2 / (sigma**2 + sd2), sigma * self.f.sigma_data / (sigma**2 + sd2).sqrt()
        return ((exact - c_skip * x) / c_out).float()


def flow_matching(**config):
    return flow.FlowMatching({"num_timesteps": 1000, "clip_sample": 0.0, **config})


def edm_formulation(sigma_data=0.5):
    return edm.EDM({"num_timesteps": 1000, "clip_sample": 0.0, "sigma_data": sigma_data})


def assert_orders(euler, heun, euler_band, heun_least):
    """Errors at n, 2n, 4n steps: halving the step halves Euler's error (first order) and quarters Heun's
    (second order): the ratios of successive errors near 2, and above ~4 less slack."""
    euler_ratios = [euler[i] / euler[i + 1] for i in range(len(euler) - 1)]
    heun_ratios = [heun[i] / heun[i + 1] for i in range(len(heun) - 1)]
    assert all(euler_band[0] < r < euler_band[1] for r in euler_ratios), (euler, euler_ratios)
    assert all(r > heun_least for r in heun_ratios), (heun, heun_ratios)
    assert heun[-1] < 0.1 * euler[-1]


def flow_errors(sampler, steps_list, x1):
    """Max error of the ODE solution at t = 0 against the exact one: the flow of Gaussian marginals keeps the
    standardised value (x - mean_t) / std_t, so x_1 ~ N(0, 1) goes to MU + STD x_1."""
    f, exact = flow_matching(), MU + STD * x1.double()
    errors = []
    for steps in steps_list:
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        x = ode.solve(lambda x, t: f.velocity(ExactVelocity(), x, t), x1.clone(), grid, sampler)
        errors.append(float((x.double() - exact).abs().max()))
    return errors


def test_flow_euler_converges_at_first_order_and_heun_at_second():
    x1 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert_orders(flow_errors("euler", (10, 20, 40), x1), flow_errors("heun", (10, 20, 40), x1), (1.6, 2.5), 3.2)


def edm_errors(sampler, steps_list, noise):
    """The same for EDM's ODE dx/dsigma = (x - D) / sigma: it keeps (x - MU) / sqrt(STD^2 + sigma^2), so
    x = SIGMA_MAX noise goes to MU + STD (SIGMA_MAX noise - MU) / sqrt(STD^2 + SIGMA_MAX^2) at sigma = 0."""
    e = edm_formulation()
    x_T = edm.SIGMA_MAX * noise.double()
    exact = MU + STD * (x_T - MU) / math.sqrt(STD**2 + edm.SIGMA_MAX**2)
    errors = []
    for steps in steps_list:
        x = ode.solve(lambda x, s: e.slope(ExactF(e), x, s), x_T.float(), e.sigmas(steps), sampler)
        errors.append(float((x.double() - exact).abs().max()))
    return errors


def test_edm_heun_converges_at_second_order_and_euler_at_first():
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert_orders(edm_errors("euler", (20, 40, 80), noise), edm_errors("heun", (20, 40, 80), noise), (1.5, 2.6), 3.0)


@pytest.mark.parametrize("name", ["flow", "edm"])
@pytest.mark.parametrize("sampler", ode.SAMPLERS)
def test_samples_reproduce_the_mean_and_variance_of_gaussian_data(name, sampler):
    formulation = flow_matching() if name == "flow" else edm_formulation()
    net = ExactVelocity() if name == "flow" else ExactF(formulation)
    # Euler's first-order error needs more steps for the same accuracy
    x = formulation.sample(net, (20000, 2), sampler=sampler, num_inference_steps=40 if sampler == "heun" else 400,
                           generator=torch.Generator().manual_seed(0))
    mean, var = MU, STD**2
    if name == "edm":  # it starts from N(0, SIGMA_MAX^2), not N(MU, SIGMA_MAX^2 + STD^2): the exact ODE's image of it
        shrink = STD / math.sqrt(STD**2 + edm.SIGMA_MAX**2)
        mean, var = MU * (1 - shrink), STD**2 * edm.SIGMA_MAX**2 / (STD**2 + edm.SIGMA_MAX**2)
    # 20,000 draws: standard errors 0.0035 for the mean, 0.0025 for the variance
    assert float(x.mean()) == pytest.approx(mean, abs=0.012)
    assert float(x.var()) == pytest.approx(var, abs=0.01)
    assert abs(float(torch.corrcoef(x.T)[0, 1])) < 0.03


def test_ddim_with_eta_0_is_the_euler_step_of_the_flow_ode_after_the_change_of_variables():
    # DDPM's z_t = alpha x_0 + sigma eps (alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)) divided by
    # alpha + sigma is the straight path at t = sigma / (alpha + sigma). The flow velocity of a DDPM model is
    # eps_hat - x0_hat of its prediction at z = (alpha + sigma) x; one Euler step of the flow ODE from t_a to
    # t_b, multiplied back by alpha_b + sigma_b, must be DDIM's step (eta = 0) from a to b.
    s = ddpm.NoiseScheduler(1000, "cosine", prediction="epsilon", clip_sample=None)
    model = ExactGaussianDenoiser(s, MU, STD)
    alpha, sigma = s.sqrt_alphas_cumprod.double(), s.sqrt_one_minus_alphas_cumprod.double()
    timesteps = s.inference_timesteps(12)
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    ddim_path = ddpm.sample(model, s, (500, 2), sampler="ddim", num_inference_steps=12, eta=0.0, trajectory=True,
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(ddim_path[0], z)
    for i, (a, b) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        z_a = ddim_path[i].double()
        t_a, t_b = float(sigma[a] / (alpha[a] + sigma[a])), float(sigma[b] / (alpha[b] + sigma[b]))
        x0_hat, eps_hat = s.predict_x0_and_eps(model(z_a.float(), torch.full((500,), a)).double(), z_a,
                                               torch.full((500,), a))
        x_a = z_a / (alpha[a] + sigma[a])
        x_b = x_a + (t_b - t_a) * (eps_hat - x0_hat)              # Euler on dx/dt = v
        torch.testing.assert_close(x_b * (alpha[b] + sigma[b]), ddim_path[i + 1].double(), rtol=1e-5, atol=1e-5)


def test_edm_denoiser_returns_its_input_as_sigma_goes_to_zero():
    e = edm_formulation(sigma_data=1.3)
    net = lambda x, time: torch.full_like(x, 7.0)  # noqa: E731  any bounded network output
    x = torch.randn(50, 2)
    for sigma, tolerance in ((1e-2, 0.1), (1e-4, 1e-3), (1e-6, 1e-5)):
        D = e.denoise(net, x, torch.full((1,), sigma))
        assert (D - x).abs().max() < tolerance, sigma
    c_skip, c_out, c_in, c_noise = e.preconditioning(torch.tensor([0.7]))
    sd = 1.3  # Table 1 written out
    assert float(c_skip) == pytest.approx(sd**2 / (0.7**2 + sd**2))
    assert float(c_out) == pytest.approx(0.7 * sd / math.sqrt(0.7**2 + sd**2))
    assert float(c_in) == pytest.approx(1 / math.sqrt(0.7**2 + sd**2))
    assert float(c_noise) == pytest.approx(math.log(0.7) / 4)


def test_losses_are_the_written_formulas():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    net = torch.nn.Linear(2, 2)
    seen = {}

    def recording_net(x, time):
        seen["x"], seen["time"] = x, time
        return net(x)

    f = flow_matching()
    t = torch.rand(64, generator=g)
    loss = f.loss(recording_net, x0, eps, t)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps                                     # SD3 eq. 2-3
    torch.testing.assert_close(seen["x"], x_t)
    torch.testing.assert_close(seen["time"], 1000 * t)
    torch.testing.assert_close(loss, ((net(x_t) - (eps - x0)) ** 2).mean())             # SD3 eq. 6
    e = edm_formulation(sigma_data=0.8)
    sigma = torch.rand(64, generator=g) * 3 + 0.01
    loss = e.loss(recording_net, x0, eps, sigma)
    s, sd = sigma[:, None], 0.8
    x = x0 + s * eps
    torch.testing.assert_close(seen["x"], x / (s**2 + sd**2).sqrt())                   # c_in x
    torch.testing.assert_close(seen["time"], 1000 * sigma.log() / 4)                   # c_noise
    D = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * net(x / (s**2 + sd**2).sqrt())
    weight = (s**2 + sd**2) / (s * sd) ** 2                                            # eq. 8, Table 1
    torch.testing.assert_close(loss, (weight * (D - x0) ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_training_times_follow_their_distributions():
    g = torch.Generator().manual_seed(0)
    t = flow_matching().sample_timesteps(200_000, g)
    logit = (t / (1 - t)).log()                                  # logit-normal(0, 1): the logit is N(0, 1)
    assert float(logit.mean()) == pytest.approx(0, abs=0.01) and float(logit.std()) == pytest.approx(1, abs=0.01)
    u = flow_matching(flow_time="uniform").sample_timesteps(200_000, g)
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005) and float((u < 0.1).float().mean()) == pytest.approx(
        0.1, abs=0.005)
    sigma = edm_formulation().sample_timesteps(200_000, g)
    assert float(sigma.log().mean()) == pytest.approx(edm.P_MEAN, abs=0.01)
    assert float(sigma.log().std()) == pytest.approx(edm.P_STD, abs=0.01)


def test_edm_grid_is_eq5_and_heun_counts_2n_minus_1_evaluations():
    e = edm_formulation()
    grid = e.sigmas(6)
    assert len(grid) == 7 and grid[-1] == 0 and grid[0] == pytest.approx(80) and grid[-2] == pytest.approx(0.002)
    i = 3  # eq. 5 at i = 3 of N = 6
    expected = (80 ** (1 / 7) + i / 5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert grid[i] == pytest.approx(expected)
    calls = []

    def counting(x, time):
        calls.append(1)
        return torch.zeros_like(x)

    for sampler, steps in (("euler", 7), ("heun", 7), ("heun", 1)):
        calls.clear()
        e.sample(counting, (4, 2), sampler=sampler, num_inference_steps=steps)
        assert len(calls) == ode.evaluations(sampler, steps) == (steps if sampler == "euler" else 2 * steps - 1)


@pytest.mark.parametrize("objective", ["flow", "edm"])
def test_a_tiny_run_of_each_objective_writes_its_outputs_and_sample_py_draws_from_it(objective, tmp_path):
    import numpy as np
    from helpers import TINY, outputs, run_tool, train
    result = train(tmp_path, objective, *TINY, "--objective", objective, "--num_inference_steps", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    config, loss, frames = outputs(tmp_path / objective)
    assert config["objective"] == objective and config["sampler"] == "dpmpp_2m_sde"  # their 2D default (docs)
    assert loss.shape == (24,) and np.isfinite(loss).all() and frames.shape == (3, 64, 2)
    if objective == "edm":  # measured from the training data, kept for sampling
        import datasets
        points = datasets.get_dataset("dino", 256, seed=0)
        assert config["sigma_data"] == pytest.approx(float(points.double().std()), rel=1e-6)
    for sampler, steps in (("euler", 3), ("heun", 2), ("dpmpp_2m_sde", 3)):
        out = tmp_path / f"{sampler}.npy"
        drawn = run_tool("sample.py", tmp_path / objective, "--sampler", sampler, "--num_inference_steps", steps,
                         "--num_samples", 10, "--output", out)
        assert drawn.returncode == 0, drawn.stderr
        assert np.load(out).shape == (10, 2) and f"{sampler}, {steps} steps" in drawn.stdout


def test_objective_flags_that_do_not_fit_are_one_line_errors(capsys):
    from helpers import parse_config
    for argv, named in ((["--objective", "flow", "--sampler", "ddpm"], "--sampler ddpm"),
                        (["--sampler", "heun"], "--sampler heun"),
                        (["--objective", "flow", "--timestep_spacing", "karras"], "--timestep_spacing"),
                        (["--s_churn", "5"], "--s_churn"),
                        (["--objective", "flow", "--sigma_max", "5"], "--sigma_max"),
                        (["--objective", "edm", "--prediction", "v"], "--prediction"),
                        (["--objective", "edm", "--flow_time", "uniform"], "--flow_time")):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and named in err, err
